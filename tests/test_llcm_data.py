"""LLCM: the synthetic generator, the data_manager lists and the LLCM evaluation.

The query and gallery lists are checked against an independent, deliberately naive
reading of the DEEN authors' protocol (global ``random.seed(trial)`` + ``random.choice``
in nested loops over ``os.listdir``, camera and id parsed from the path as they do), and
``eval_llcm`` against a hand-worked case and a per-query loop.
"""
import hashlib
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets  # noqa: E402
import data_loader  # noqa: E402
import data_manager as dm  # noqa: E402
from eval_metrics import eval_llcm, eval_sysu, evaluate_trials  # noqa: E402
from tools.make_synthetic import main as make_synthetic_main  # noqa: E402
from tools.make_synthetic import make_llcm  # noqa: E402
from cli import UserError  # noqa: E402

VIS_CAMS = ["cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "cam7", "cam8", "cam9"]
NIR_CAMS = ["cam1", "cam2", "cam4", "cam5", "cam6", "cam7", "cam8", "cam9"]
NAME = re.compile(r"^(\d{4})_c(\d\d)_s\d{6}_f\d+_(vis|nir)\.jpg$")


# ----------------------------------------------------------------------------- reference
def ref_test_ids(root):
    with open(os.path.join(root, "idx", "test_id.txt")) as f:
        first = f.read().splitlines()[0]
    return sorted("%04d" % int(x) for x in first.split(","))


def ref_lists(root, direction, trial=None):
    """Queries (trial None) or the gallery of ``trial``: (paths, pids, cams)."""
    query_side, gallery_side = ("test_vis", "test_nir") if direction == "vis2ir" \
        else ("test_nir", "test_vis")
    side = query_side if trial is None else gallery_side
    cams = VIS_CAMS if side == "test_vis" else NIR_CAMS
    if trial is not None:
        random.seed(trial)
    files = []
    for pid in ref_test_ids(root):
        for cam in cams:
            img_dir = os.path.join(root, side, cam, pid)
            if os.path.isdir(img_dir):
                new_files = sorted([img_dir + "/" + f for f in os.listdir(img_dir)])
                if trial is None:
                    files.extend(new_files)
                else:
                    files.append(random.choice(new_files))
    # the authors parse "cam<k>/<pid:04d>" from the path
    rel = [p[len(str(root)):] for p in files]
    return (files, [int(r.split("cam")[1][2:6]) for r in rel],
            [int(r.split("cam")[1][0]) for r in rel])


def ref_eval_llcm(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20):
    """One query at a time: drop same-id same-camera gallery items, rank the rest."""
    cmcs, aps, inps = [], [], []
    length = min(max_rank, distmat.shape[1])
    for i in range(len(distmat)):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        ranked = g_pids[order][keep]
        hits = ranked == q_pids[i]
        if not hits.any():
            continue
        ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
        uniq = [p for k, p in enumerate(ranked) if p not in ranked[:k]]
        first = uniq.index(q_pids[i])
        cmcs.append((np.arange(length) >= first).astype(float))
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps))


def tree_bytes(root):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def one_line_error(call, *must_contain):
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for s in must_contain:
        assert str(s) in msg, (s, msg)
    return msg


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llcm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llcm") / "LLCM"
    summary = make_llcm(root, num_ids=15, seed=4, imgs_per_cam=(1, 4))
    return root, summary


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "LLCM"
    make_llcm(root, num_ids=5, seed=2, imgs_per_cam=(1, 2))
    return root


# ----------------------------------------------------------------------------- generator
def test_llcm_layout_and_quirks(llcm):
    root, summary = llcm
    assert sorted(p.name for p in root.iterdir()) == \
        ["idx", "nir", "synthetic.json", "test_nir", "test_vis", "vis"]
    assert sorted(p.name for p in (root / "idx").iterdir()) == \
        ["test_id.txt", "train_nir.txt", "train_vis.txt"]
    assert sorted(p.name for p in (root / "test_vis").iterdir()) == VIS_CAMS
    assert sorted(p.name for p in (root / "test_nir").iterdir()) == NIR_CAMS   # no cam3
    text = (root / "idx" / "test_id.txt").read_text()
    assert len(text.splitlines()) == 1
    test = [int(x) for x in text.strip().split(",")]
    train = summary["splits"]["train"]
    assert not set(test) & set(train) and len(test) + len(train) == 15
    assert dm.llcm_test_ids(root) == sorted(test)

    # ids are absent from some cameras, and each camera folder lacks some test ids
    for side, cams in (("test_vis", VIS_CAMS), ("test_nir", NIR_CAMS)):
        held = {cam: {int(d.name) for d in (root / side / cam).iterdir()} for cam in cams}
        assert all(held[cam] and held[cam] <= set(test) for cam in cams)
        assert any(held[cam] != set(test) for cam in cams)
        for cam in cams:
            for d in (root / side / cam).iterdir():
                for f in d.iterdir():
                    m = NAME.match(f.name)
                    assert m and int(m[1]) == int(d.name) and int(m[2]) == int(cam[3:])
                    assert m[3] == side[5:]

    # training lists: '<vis|nir>/<pid:04d>/<file> <label>', label = rank among train ids
    labels = {pid: k for k, pid in enumerate(sorted(train))}
    for modal, sub in (("visible", "vis"), ("infrared", "nir")):
        lines = (root / "idx" / f"train_{sub}.txt").read_text().splitlines()
        listed = set()
        for line in lines:
            rel, label = line.split(" ")
            top, pid, name = rel.split("/")
            m = NAME.match(name)
            assert top == sub and m and m[1] == pid and m[3] == sub
            assert sub == "vis" or m[2] != "03"              # no near-infrared camera 3
            assert int(label) == labels[int(pid)]
            listed.add(rel)
        assert listed == {str(p.relative_to(root)) for p in (root / sub).rglob("*.jpg")}
        assert {int(x.split(" ")[1]) for x in lines} == set(range(len(train)))
        paths, labs = dm.read_llcm_train(root, modal)
        assert paths == [str(root / ln.split(" ")[0]) for ln in lines]
        assert labs.dtype == np.int64 and labs.tolist() == [int(ln.split(" ")[1]) for ln in lines]

    imgs = data_loader.load_images(paths[:3], img_w=48, img_h=96)     # near-infrared: grey
    assert imgs.shape == (3, 96, 48, 3)
    assert np.array_equal(imgs[..., 0], imgs[..., 1]) and np.array_equal(imgs[..., 1], imgs[..., 2])


def test_llcm_deterministic_by_seed(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_llcm(tmp_path / name, num_ids=5, seed=seed, imgs_per_cam=(1, 2))
    ta, tb, tc = (tree_bytes(tmp_path / n) for n in "abc")
    assert ta == tb and len(ta) > 30
    assert ta != tc
    lists = [[os.path.relpath(p, tmp_path / n) for p in dm.process_query_llcm(tmp_path / n)[0]]
             for n in "ab"]
    assert lists[0] == lists[1] and lists[0]


def test_llcm_cli(tmp_path, capsys):
    make_synthetic_main(["--dataset", "llcm", "--out", str(tmp_path / "L"), "--num_ids", "4",
                         "--imgs_per_cam", "1", "1", "--seed", "3"])
    out = capsys.readouterr().out
    assert "wrote synthetic LLCM" in out and str(tmp_path / "L") in out
    assert dm.llcm_test_ids(tmp_path / "L") and (tmp_path / "L" / "idx" / "train_nir.txt").is_file()


# ----------------------------------------------------------------------------- protocol lists
@pytest.mark.parametrize("direction", ["vis2ir", "ir2vis"])
def test_llcm_lists_match_the_published_rules(llcm, direction):
    root, _ = llcm
    q_side, g_side = ("vis", "nir") if direction == "vis2ir" else ("nir", "vis")
    paths, pids, cams = dm.process_query_llcm(root, direction)
    ref = ref_lists(root, direction)
    assert paths == ref[0] and len(paths) > 20
    assert pids.dtype == np.int64 and cams.dtype == np.int64
    assert pids.tolist() == ref[1] and cams.tolist() == ref[2]
    assert all(f"{os.sep}test_{q_side}{os.sep}" in p for p in paths)

    sizes = [len(os.listdir(root / f"test_{g_side}" / c / d))
             for c in os.listdir(root / f"test_{g_side}")
             for d in os.listdir(root / f"test_{g_side}" / c)]
    assert max(sizes) > 1                        # the draw really chooses
    random.seed(777)
    outside = random.random()
    trials = []
    for trial in range(10):
        random.seed(777)
        got = dm.process_gallery_llcm(str(root), direction, trial)
        assert random.random() == outside        # the caller's global stream is left alone
        ref = ref_lists(str(root), direction, trial)
        assert got[0] == ref[0], trial
        assert got[1].tolist() == ref[1] and got[2].tolist() == ref[2]
        assert len(set(zip(got[1].tolist(), got[2].tolist()))) == len(got[0])  # 1 per (id, cam)
        assert g_side == "vis" or 3 not in got[2]
        trials.append(got)
    assert len({tuple(t[0]) for t in trials}) > 1

    u_paths, u_pids, u_cams, index = dm.llcm_gallery_trials(root, direction)
    assert u_paths == sorted(set(u_paths)) and len(index) == 10
    for (tp, tpid, tcam), idx in zip(trials, index):
        assert [u_paths[i] for i in idx] == tp
        assert np.array_equal(u_pids[idx], tpid) and np.array_equal(u_cams[idx], tcam)
    _, _, _, index = dm.llcm_gallery_trials(root, direction, trials=[3, 8])
    assert [len(i) for i in index] == [len(trials[3][0]), len(trials[8][0])]


def test_llcm_direction_flag():
    assert dm.llcm_direction(False) == "vis2ir" and dm.llcm_direction(True) == "ir2vis"


# ----------------------------------------------------------------------------- bad input
def test_llcm_bad_inputs(tiny, tmp_path):
    one_line_error(lambda: dm.process_query_llcm(tmp_path / "nowhere"), "dataset folder not found",
                   tmp_path / "nowhere", "idx/test_id.txt")
    one_line_error(lambda: dm.process_query_llcm(tiny, "rgb2ir"), "direction", "vis2ir")
    one_line_error(lambda: dm.read_llcm_train(tiny, "thermal"), "modal", "infrared")

    # a missing, then an empty camera folder
    cam5 = tiny / "test_nir" / "cam5"
    cam5.rename(tmp_path / "cam5")
    for call in (lambda: dm.process_query_llcm(tiny, "ir2vis"),
                 lambda: dm.process_gallery_llcm(tiny, "vis2ir", 0)):
        one_line_error(call, "LLCM camera folder not found", cam5)
    (tmp_path / "cam5").rename(cam5)
    cam2 = tiny / "test_vis" / "cam2"
    for d in cam2.iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    one_line_error(lambda: dm.llcm_gallery_trials(tiny, "ir2vis"), "is empty", cam2)
    assert dm.process_query_llcm(tiny, "ir2vis")[0]       # the other modality is fine

    # an unreadable image
    paths = dm.process_query_llcm(tiny, "ir2vis")[0]
    Path(paths[1]).write_bytes(b"not a jpeg" * 30)
    one_line_error(lambda: data_loader.load_images(paths[:3]), "cannot read image", paths[1])

    # a garbled, then missing training list; a missing split file
    train_nir = tiny / "idx" / "train_nir.txt"
    train_nir.write_text("nir/0001/0001_c01_s000001_f1_nir.jpg one\n")
    one_line_error(lambda: dm.read_llcm_train(tiny, "infrared"), "garbled line 1", train_nir)
    train_nir.unlink()
    one_line_error(lambda: dm.read_llcm_train(tiny, "infrared"), "LLCM index file not found",
                   train_nir)
    (tiny / "idx" / "test_id.txt").unlink()
    for call in (lambda: dm.process_query_llcm(tiny), lambda: dm.llcm_gallery_trials(tiny),
                 lambda: dm.llcm_test_ids(tiny)):
        one_line_error(call, "LLCM split file not found", tiny / "idx" / "test_id.txt")


# ----------------------------------------------------------------------------- evaluation
def test_eval_llcm_hand_worked():
    """Same-id same-camera gallery items are removed; other cameras and ids stay.

    q0 (id 1, cam 1) loses g0 but keeps g1 (id 2, also cam 1); kept ranking g1(2) g2(1)
    g4(2) g3(1): AP (1/2 + 2/4)/2, INP 2/4, first id hit at unique rank 2.
    q1 (id 2, cam 4) loses g4; kept g3(1) g2(1) g1(2) g0(1): AP 1/3, INP 1/3, unique rank 2.
    q2 (id 3, cam 2) loses its only match g5: skipped.
    q3 (id 1, cam 3) loses nothing; g0 g2 g4 g1 g3: AP (1 + 1 + 3/5)/3, INP 3/5, rank 1."""
    g_pids = np.array([1, 2, 1, 1, 2, 3])
    g_cams = np.array([1, 1, 5, 2, 4, 2])
    q_pids, q_cams = np.array([1, 2, 3, 1]), np.array([1, 4, 2, 3])
    dist = np.array([[0.1, 0.2, 0.3, 0.5, 0.4, 0.9],
                     [0.6, 0.3, 0.2, 0.1, 0.05, 0.9],
                     [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                     [0.1, 0.4, 0.2, 0.7, 0.3, 0.8]])
    cmc, mAP, mINP = eval_llcm(dist, q_pids, g_pids, q_cams, g_cams)
    assert np.allclose(cmc, [1 / 3, 1, 1, 1, 1, 1])
    assert mAP == pytest.approx((0.5 + 1 / 3 + 2.6 / 3) / 3)
    assert mINP == pytest.approx((0.5 + 1 / 3 + 0.6) / 3)
    # SYSU-MM01's rule (cam-3 queries drop cam-2 items) gives other numbers here
    assert eval_sysu(dist, q_pids, g_pids, q_cams, g_cams)[1] != pytest.approx(mAP)
    with pytest.raises(ValueError, match="no valid query"):
        eval_llcm(dist[2:3], q_pids[2:3], g_pids, q_cams[2:3], g_cams)


@pytest.mark.parametrize("seed", [0, 1])
def test_eval_llcm_matches_a_per_query_loop(seed):
    rng = np.random.default_rng(seed)
    q_pids, q_cams = rng.integers(0, 12, 60), rng.integers(1, 10, 60)
    g_pids, g_cams = rng.integers(0, 10, 80), rng.integers(1, 10, 80)
    dist = rng.integers(0, 6, (60, 80)).astype(np.float32)      # many exact ties
    got = eval_llcm(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    ref = ref_eval_llcm(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert np.allclose(got[0], ref[0]) and got[1] == pytest.approx(ref[1])
    assert got[2] == pytest.approx(ref[2])


def test_llcm_scoring_roles(llcm):
    """The LLCM benchmark scores 'vis2ir' as the authors' script does it (each drawn
    near-infrared image ranks all visible queries: swap=True); the query-ranks-gallery
    scoring (swap=False) differs there; 'ir2vis' ranks the gallery."""
    root, _ = llcm
    rng = np.random.default_rng(0)
    means = {}
    for direction in ("vis2ir", "ir2vis"):
        _, q_pids, q_cams = dm.process_query_llcm(root, direction)
        _, g_pids, g_cams, index = dm.llcm_gallery_trials(root, direction, trials=range(3))
        # identity signal plus noise, unit length like the scripts' features
        centres = rng.normal(size=(2000, 16))
        q = centres[q_pids] + rng.normal(size=(len(q_pids), 16))
        g = centres[g_pids] + rng.normal(size=(len(g_pids), 16))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        score, swap = datasets.get("llcm").scorer("visible_to_infrared" if direction == "vis2ir"
                                                  else "infrared_to_visible")
        assert score is eval_llcm and swap == (direction == "vis2ir")
        for published in (True, False):
            per_trial, mean = evaluate_trials(q, q_pids, q_cams, g, g_pids, g_cams, index, score,
                                              swap=swap and published)
            for (cmc, mAP, mINP), idx in zip(per_trial, index):
                if published and direction == "vis2ir":
                    ref = ref_eval_llcm(-(g[idx] @ q.T), g_pids[idx], q_pids, g_cams[idx], q_cams)
                else:
                    ref = ref_eval_llcm(-(q @ g[idx].T), q_pids, g_pids[idx], q_cams, g_cams[idx])
                assert np.allclose(cmc, ref[0]) and mAP == pytest.approx(ref[1])
                assert mINP == pytest.approx(ref[2])
            assert mean[1] == pytest.approx(np.mean([t[1] for t in per_trial]))
            means[direction, published] = mean[1]
    assert means["vis2ir", True] != pytest.approx(means["vis2ir", False])
    assert means["ir2vis", True] == means["ir2vis", False]
