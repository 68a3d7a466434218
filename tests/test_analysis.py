"""Feature files (features.py), tools/analyze.py and tools/plot_log.py on small synthetic
files, through the real code paths (the tools run as scripts)."""
import json

import matplotlib.image
import numpy as np
import pytest

import eval_metrics
import features
from conftest import ROOT, run_script
from rerank import rerank_features
from cli import UserError

NUM_IDS, PER_MODALITY, DIM = 6, 8, 16


def synthetic(path, offset, label, dataset="sysu", seed=0):
    """A feature file of NUM_IDS ids: IR queries and a visible gallery around per-id
    prototypes, the modalities shifted apart by ``offset`` along one axis (larger offset =
    larger modality gap). Two heads; two gallery trials (even / odd gallery images)."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((NUM_IDS, DIM))
    shift = np.eye(DIM)[0] * offset
    ids = np.repeat(np.arange(NUM_IDS), PER_MODALITY)

    def feats(sign, noise):
        f = protos[ids] + sign * shift + noise * rng.standard_normal((len(ids), DIM))
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

    q = {"POOL": feats(-1, 0.8), "FC": feats(-1, 0.4)}
    g = {"POOL": feats(1, 0.8), "FC": feats(1, 0.4)}
    k = np.arange(len(ids))
    if dataset == "regdb":
        q_cams, g_cams, trials = np.full(len(ids), 1), np.full(len(ids), 2), [k]
    else:
        q_cams, g_cams, trials = np.where(k % 2, 6, 3), np.array([1, 2, 4, 5])[k % 4], [k[::2], k[1::2]]
    return features.save_features(
        path, ["POOL", "FC"], q, g, ids, ids, q_cams, g_cams, "ir", "rgb",
        [f"ir/{i:03d}.jpg" for i in k], [f"rgb/{i:03d}.jpg" for i in k], trials, dataset,
        "all", f"/ckpt/{label}_best.t", label=label)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("feats")
    return synthetic(d / "near.npz", 0.3, "near"), synthetic(d / "far", 1.5, "far", seed=1)


def test_round_trip(pair, tmp_path):
    ff = features.load_features(pair[0])
    assert pair[1].name == "far.npz"                        # suffix added
    assert ff.heads == ["POOL", "FC"] and ff.dataset == "sysu" and ff.mode == "all"
    assert ff.label == "near" and ff.checkpoint == "/ckpt/near_best.t"
    assert ff.query_feats["FC"].dtype == np.float32 and ff.query_feats["FC"].shape == (48, DIM)
    assert list(ff.query_modality) == ["ir"] * 48 and ff.gallery_paths[1] == "rgb/001.jpg"
    assert ff.trial_index.shape == (2, 24) and ff.query_ids.dtype == np.int64
    with np.load(pair[0], allow_pickle=False) as npz:      # plain arrays only
        assert np.array_equal(npz["gallery_feat_POOL"], ff.gallery_feats["POOL"])
        assert str(npz["label"]) == "near"
        arrays = dict(npz)
    # our files written before the one pair of modality names read the same
    arrays["query_modality"] = np.array(["infrared"] * 48)
    arrays["gallery_modality"] = np.array(["visible"] * 48)
    np.savez(tmp_path / "old.npz", **arrays)
    old = features.load_features(tmp_path / "old.npz")
    assert list(old.query_modality) == ["ir"] * 48 and list(old.gallery_modality) == ["rgb"] * 48
    # label defaults to the checkpoint's stem; a list of arrays in heads order is accepted
    p = features.save_features(tmp_path / "x.npz", ["FC"], [ff.query_feats["FC"]], [ff.gallery_feats["FC"]],
                               ff.query_ids, ff.gallery_ids, ff.query_cams, ff.gallery_cams,
                               ff.query_modality, ff.gallery_modality, ff.query_paths,
                               ff.gallery_paths, ff.trial_index, "sysu", "all", "a/b/ck_epoch_3.t")
    back = features.load_features(p)
    assert back.label == "ck_epoch_3" and np.array_equal(back.trial_index, ff.trial_index)
    for name in ("query_ids", "gallery_ids", "query_cams", "gallery_cams", "query_paths"):
        assert np.array_equal(getattr(back, name), getattr(ff, name)), name


@pytest.mark.parametrize("dataset", ["sysu", "regdb", "llcm"])
def test_evaluate_equals_eval_metrics(dataset, tmp_path):
    ff = features.load_features(synthetic(tmp_path / "f.npz", 0.5, "f", dataset=dataset))
    qf, gf = ff.query_feats["FC"], ff.gallery_feats["FC"]
    per_trial, mean = features.evaluate(ff)                     # default head: the last, FC
    if dataset == "sysu":
        ref_trials, ref = eval_metrics.evaluate_trials(qf, ff.query_ids, ff.query_cams, gf, ff.gallery_ids,
                                                       ff.gallery_cams, ff.trial_index, eval_metrics.eval_sysu)
    elif dataset == "regdb":    # what the test scripts do
        ref = eval_metrics.eval_regdb(-(qf @ gf.T), ff.query_ids, ff.gallery_ids)
        ref_trials = [ref]
    else:   # LLCM: its evaluator (same id AND camera dropped); mode 'all' is not its swapped VIS->IR
        ref_trials, ref = eval_metrics.evaluate_trials(qf, ff.query_ids, ff.query_cams, gf, ff.gallery_ids,
                                                       ff.gallery_cams, ff.trial_index, eval_metrics.eval_llcm)
    assert len(per_trial) == len(ref_trials)
    assert eval_metrics.format_metrics("FC", *mean) == eval_metrics.format_metrics("FC", *ref)
    np.testing.assert_array_equal(mean[0], ref[0])
    assert mean[1:] == ref[1:]
    # re-ranking: each trial's gallery re-ranked alone, then the same evaluation
    _, rr = features.evaluate(ff, "POOL", rerank=True, k1=5, k2=2)
    qp, gp = ff.query_feats["POOL"], ff.gallery_feats["POOL"]
    manual = []
    for i in ff.trial_index:
        d = rerank_features(qp, gp[i], k1=5, k2=2)
        score = {"sysu": eval_metrics.eval_sysu, "llcm": eval_metrics.eval_llcm}.get(dataset)
        manual.append(score(d, ff.query_ids, ff.gallery_ids[i], ff.query_cams, ff.gallery_cams[i]) if score
                      else eval_metrics.eval_regdb(d, ff.query_ids, ff.gallery_ids[i]))
    assert rr[1] == pytest.approx(eval_metrics._mean_metrics(manual)[1], abs=1e-12)
    with pytest.raises(UserError, match="no head 'X'"):
        features.evaluate(ff, "X")


def _png(path, size):
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == size[::-1], (path, img.shape)
    assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 20, f"{path} is nearly blank"
    assert path.stat().st_size <= 150_000, (path, path.stat().st_size)


def test_analyze_two_files(pair, tmp_path):
    out = tmp_path / "analysis"
    res = run_script(ROOT / "tools" / "analyze.py", *pair, "--out", out, "--ids", 4, threads=1)
    _png(out / "tsne.png", (800, 360))
    _png(out / "distances.png", (800, 360))
    _png(out / "cmc.png", (400, 360))
    lines = res.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Modality gap"))
    table = [ln for ln in lines[start + 2:] if ln.split() and ln.split()[0] in ("near", "far")]
    assert [ln.split()[0] for ln in table] == ["near", "far"], res.stdout
    report = json.loads((out / "modality_gap.json").read_text())
    rows = {r["label"]: r for r in report["files"]}
    keys = {"file", "label", "head", "cross_same_id", "intra_same_id", "modality_gap", "cross_diff_id",
            "overlap", "rank1", "mAP", "pairs"}
    assert all(keys <= set(r) for r in rows.values())
    assert rows["far"]["modality_gap"] > rows["near"]["modality_gap"] > 0
    assert rows["near"]["head"] == "FC" and 0 <= rows["near"]["overlap"] <= 1
    _, (cmc, mAP, _) = features.evaluate(features.load_features(pair[0]), "FC")
    assert rows["near"]["rank1"] == cmc[0] and rows["near"]["mAP"] == mAP
    # the same numbers again, from the printed table's gap column
    assert f"{rows['far']['modality_gap']:.3f}" in table[1]


def test_plot_log(tmp_path):
    logs = sorted((ROOT / "study").glob("agw/*_seed0/log/*.jsonl"))
    pre = sorted((ROOT / "study").glob("pretrain/gap_k6_*/log/*.jsonl"))
    assert len(logs) == 2 and pre
    out = tmp_path / "curves.png"
    res = run_script(ROOT / "tools" / "plot_log.py", *logs, "--out", out, threads=1)
    assert out.is_file() and "mmgl_seed0" in res.stdout      # identical stems told apart
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 20
    out2 = tmp_path / "pre.png"
    run_script(ROOT / "tools" / "plot_log.py", *pre, "--out", out2, "--fields", "*loss*,val/perm_acc")
    assert matplotlib.image.imread(out2).ndim == 3


def _one_error_line(res, needle):
    assert res.returncode == 2, (res.returncode, res.stderr)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert "Traceback" not in res.stderr


def test_bad_inputs(pair, tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not features\n")
    partial = tmp_path / "partial.npz"
    np.savez(partial, heads=np.array(["FC"]), query_ids=np.arange(3))
    analyze = ROOT / "tools" / "analyze.py"
    _one_error_line(run_script(analyze, text, "--out", tmp_path / "o", check=False),
                    "not an .npz archive")
    _one_error_line(run_script(analyze, pair[0], partial, "--out", tmp_path / "o", check=False),
                    "missing query_cams")
    _one_error_line(run_script(analyze, pair[0], "--head", "BN", "--out", tmp_path / "o", check=False),
                    "has only POOL, FC")
    _one_error_line(run_script(ROOT / "tools" / "plot_log.py", text, "--out", tmp_path / "p.png",
                               check=False), "not JSON lines")
    assert not (tmp_path / "o" / "tsne.png").exists()
