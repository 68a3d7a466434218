"""Synthetic datasets, SYSU-MM01 preprocessing and the evaluation file lists.

Everything runs on small synthetic sets written to tmp folders through the real code
paths (the generator, the pre_process_sysu.py script in a subprocess, data_manager). The
gallery draw is checked against an independent, deliberately naive implementation of the
published protocol (global ``random.seed(trial)`` + ``random.choice`` in nested loops).
"""
import hashlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data_loader  # noqa: E402
import data_manager as dm  # noqa: E402
from pre_process_sysu import preprocess_sysu  # noqa: E402
from tools.make_synthetic import _split_counts, make_regdb, make_sysu  # noqa: E402
from conftest import run_script  # noqa: E402
from cli import UserError  # noqa: E402

RGB_CAMS, IR_CAMS = (1, 2, 4, 5), (3, 6)
NPY = [f"train_{m}_resized_{k}.npy" for m in ("rgb", "ir") for k in ("img", "label", "cam")]


# ----------------------------------------------------------------------------- helpers
def assert_one_line_error(res, *must_contain):
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for s in must_contain:
        assert str(s) in lines[0], (s, lines[0])
    return lines[0]


def ids_of(root, split):
    text = (Path(root) / "exp" / f"{split}_id.txt").read_text()
    assert len(text.strip().splitlines()) == 1
    return [int(x) for x in text.strip().split(",")]


def folder_files(root, cam, pid):
    d = os.path.join(root, f"cam{cam}", f"{pid:04d}")
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


def tree_bytes(root):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def reference_gallery(data_path, mode, trial, gall_mode):
    """The published protocol written out naively from its description, with the GLOBAL stream."""
    cams = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    ids = ["%04d" % x for x in ids_of(data_path, "test")]
    random.seed(trial)
    files_rgb = []
    for pid in sorted(ids):
        for cam in cams:
            img_dir = os.path.join(data_path, cam, pid)
            if os.path.isdir(img_dir):
                new_files = sorted([img_dir + "/" + i for i in os.listdir(img_dir)])
                if gall_mode == "single":
                    files_rgb.append(random.choice(new_files))
                elif len(new_files) >= 10:
                    files_rgb.extend(random.sample(new_files, 10))
                else:
                    files_rgb.extend(new_files)
    pids = [int(p.split("/")[-2]) for p in files_rgb]
    cams_ = [int(p.split("/")[-3][3:]) for p in files_rgb]
    return files_rgb, pids, cams_


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sysu(tmp_path_factory):
    """14 ids; 3..12 images per folder so multi-shot meets folders both above and below
    10 files."""
    root = tmp_path_factory.mktemp("syn") / "SYSU-MM01"
    summary = make_sysu(root, num_ids=14, seed=3, imgs_per_cam=(3, 12))
    return root, summary


@pytest.fixture(scope="module")
def preprocessed(sysu):
    root, _ = sysu
    res = run_script(REPO / "pre_process_sysu.py", "--data_path", root, "--workers", "2",
                     check=False)
    assert res.returncode == 0, res.stderr
    return root, res.stdout


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "tiny"
    make_sysu(root, num_ids=6, seed=1, imgs_per_cam=(1, 2))
    return root


# ----------------------------------------------------------------------------- generator
def test_sysu_layout(sysu):
    root, summary = sysu
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == \
        ["cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "exp"]
    train, val, test = ids_of(root, "train"), ids_of(root, "val"), ids_of(root, "test")
    every = train + val + test
    assert len(every) == len(set(every)) == 14
    assert (len(train), len(val), len(test)) == _split_counts(14)
    assert max(every) - min(every) + 1 > len(every)          # non-contiguous pids
    assert _split_counts(40)[2] >= 8                          # default set: enough test ids
    for pid in train + val:
        assert any(folder_files(root, c, pid) for c in RGB_CAMS)
        assert any(folder_files(root, c, pid) for c in IR_CAMS)
    for pid in test:
        assert any(folder_files(root, c, pid) for c in IR_CAMS)
        assert any(folder_files(root, c, pid) for c in (1, 2))
    assert any(not folder_files(root, c, pid) for pid in every for c in range(1, 7))
    sizes, modes = set(), {"rgb": set(), "ir": set()}
    for cam in range(1, 7):
        for d in (root / f"cam{cam}").iterdir():
            assert len(d.name) == 4 and int(d.name) in every
            for f in d.iterdir():
                assert len(f.name) == 8 and f.suffix == ".jpg"
                with Image.open(f) as im:
                    sizes.add(im.size)
                    modes["ir" if cam in IR_CAMS else "rgb"].add(im.mode)
    assert modes == {"rgb": {"RGB"}, "ir": {"RGB", "L"}}
    ws, hs = [s[0] for s in sizes], [s[1] for s in sizes]
    assert 50 <= min(ws) < max(ws) <= 80 and 100 <= min(hs) < max(hs) <= 160
    assert summary["rgb"] + summary["ir"] == sum(len(list((root / f"cam{c}").rglob("*.jpg")))
                                                 for c in range(1, 7))


def test_sysu_deterministic_by_seed(tmp_path):
    a = make_sysu(tmp_path / "a", num_ids=6, seed=5, imgs_per_cam=(1, 2))
    make_sysu(tmp_path / "b", num_ids=6, seed=5, imgs_per_cam=(1, 2))
    make_sysu(tmp_path / "c", num_ids=6, seed=6, imgs_per_cam=(1, 2))
    ta, tb, tc = (tree_bytes(tmp_path / n) for n in "abc")
    assert ta == tb and len(ta) > 20
    assert ta != tc
    # Regenerating over our own output replaces it completely (no stale files survive).
    (tmp_path / "a" / "train_rgb_resized_img.npy").write_bytes(b"stale")
    make_sysu(tmp_path / "a", num_ids=6, seed=5, imgs_per_cam=(1, 2))
    assert tree_bytes(tmp_path / "a") == ta and a["out"] == str(tmp_path / "a")
    # ... but a foreign non-empty folder is never overwritten.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not written by this tool"):
        make_sysu(tmp_path / "mine", num_ids=6)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_ir_images_carry_no_colour(sysu):
    root, _ = sysu
    ir_spread, rgb_spread = [], []
    for cam, out in ((3, ir_spread), (6, ir_spread), (1, rgb_spread), (5, rgb_spread)):
        for f in sorted((root / f"cam{cam}").rglob("*.jpg"))[:60]:
            a = np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)
            out.append(np.abs(a - a.mean(axis=2, keepdims=True)).max())
    assert max(ir_spread) <= 3          # grey up to JPEG rounding
    assert np.median(rgb_spread) > 40   # the RGB cameras really are colourful


def test_make_synthetic_cli(tmp_path):
    res = run_script(REPO / "tools" / "make_synthetic.py", "--dataset", "regdb", "--out",
                     tmp_path / "r", "--num_ids", "4", "--imgs_per_id", "2", "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert "wrote synthetic RegDB" in res.stdout and str(tmp_path / "r") in res.stdout
    assert len(list((tmp_path / "r" / "Thermal").rglob("*.bmp"))) == 8
    assert len(list((tmp_path / "r" / "idx").glob("*.txt"))) == 40


# ----------------------------------------------------------------------------- pre-processing
def test_preprocess_end_to_end(preprocessed):
    root, stdout = preprocessed
    assert f"wrote into {root}" in stdout and "identities" in stdout and "cam6" in stdout
    train_ids = sorted(ids_of(root, "train") + ids_of(root, "val"))
    arrays = {}
    for mod, cams in (("rgb", RGB_CAMS), ("ir", IR_CAMS)):
        files, labels, cam_of = [], [], []
        for k, pid in enumerate(train_ids):
            for cam in cams:
                got = folder_files(root, cam, pid)
                files += got
                labels += [k] * len(got)
                cam_of += [cam] * len(got)
        img = np.load(root / f"train_{mod}_resized_img.npy", mmap_mode="r")
        lab = np.load(root / f"train_{mod}_resized_label.npy")
        cam = np.load(root / f"train_{mod}_resized_cam.npy")
        assert img.dtype == np.uint8 and img.shape == (len(files), 288, 144, 3)
        assert lab.dtype == np.int64 and lab.tolist() == labels
        assert cam.dtype == np.int64 and cam.tolist() == cam_of
        assert set(cam.tolist()) == set(cams)
        assert sorted(set(lab.tolist())) == list(range(len(train_ids)))
        for i in (0, len(files) // 2, len(files) - 1):
            with Image.open(files[i]) as im:
                ref = np.asarray(im.convert("RGB").resize((144, 288), Image.Resampling.LANCZOS))
            assert np.array_equal(img[i], ref), files[i]
        arrays[mod] = (np.array(img), lab, cam)
    # The in-process, single-worker path writes byte-identical arrays.
    stats = preprocess_sysu(root, workers=0, verbose=False)
    for mod in ("rgb", "ir"):
        for arr, key in zip(arrays[mod], ("img", "label", "cam")):
            assert np.array_equal(np.load(root / f"train_{mod}_resized_{key}.npy"), arr)
        assert stats[mod]["images"] == len(arrays[mod][1])
    assert stats["num_ids"] == len(train_ids) and not stats["skipped"]
    assert not list(root.glob(".*tmp*"))


def test_preprocess_corrupt_image_and_skip_bad(tiny):
    train = ids_of(tiny, "train")
    rgb_pid = next(p for p in train if folder_files(tiny, 1, p) or folder_files(tiny, 2, p))
    cam = 1 if folder_files(tiny, 1, rgb_pid) else 2
    garbage = tiny / f"cam{cam}" / f"{rgb_pid:04d}" / "9999.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 20)
    ir_pid, ir_cam = next((p, c) for p in train for c in IR_CAMS if folder_files(tiny, c, p))
    good = folder_files(tiny, ir_cam, ir_pid)[0]
    truncated = Path(good).with_name("9998.jpg")
    data = Path(good).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    res = run_script(REPO / "pre_process_sysu.py", "--data_path", tiny, "--workers", "2",
                     check=False)
    line = assert_one_line_error(res, garbage, "--skip-bad")
    assert "1 more" in line
    assert not any((tiny / f).exists() for f in NPY) and not list(tiny.glob(".*tmp*"))

    res = run_script(REPO / "pre_process_sysu.py", "--data_path", tiny, "--skip-bad", check=False)
    assert res.returncode == 0, res.stderr
    assert "skipped 2 unreadable images" in res.stdout
    assert str(garbage) in res.stdout and str(truncated) in res.stdout
    n_rgb = sum(len(folder_files(tiny, c, p)) for p in train + ids_of(tiny, "val") for c in RGB_CAMS)
    n_ir = sum(len(folder_files(tiny, c, p)) for p in train + ids_of(tiny, "val") for c in IR_CAMS)
    assert len(np.load(tiny / "train_rgb_resized_label.npy")) == n_rgb - 1
    # the kept images stay in order and in step with their labels after the bad one
    kept = [f for p in sorted(train + ids_of(tiny, "val")) for c in RGB_CAMS
            for f in folder_files(tiny, c, p) if f != str(garbage)]
    rgb = np.load(tiny / "train_rgb_resized_img.npy")
    assert np.array_equal(rgb, np.stack([data_loader.decode_image(f) for f in kept]))
    assert np.load(tiny / "train_rgb_resized_cam.npy").tolist() == \
        [int(Path(f).parts[-3][3:]) for f in kept]
    assert np.load(tiny / "train_ir_resized_img.npy", mmap_mode="r").shape == (n_ir - 1, 288, 144, 3)

    with pytest.raises(UserError, match="9999.jpg"):
        data_loader.load_images([good, str(garbage)], workers=2)


def test_bad_flags_of_the_data_tools_are_one_error_line(tmp_path):
    res = run_script(REPO / "tools" / "make_synthetic.py", "--dataset", "x", "--out", tmp_path,
                     check=False)
    assert_one_line_error(res, "invalid choice: 'x'", "make_synthetic.py --help")
    res = run_script(REPO / "pre_process_sysu.py", "--img_h", "tall", check=False)
    assert_one_line_error(res, "--img_h", "invalid int value", "pre_process_sysu.py --help")


def test_missing_dataset_and_split_files(tiny, tmp_path):
    missing = tmp_path / "nowhere"
    res = run_script(REPO / "pre_process_sysu.py", "--data_path", missing, check=False)
    assert_one_line_error(res, "dataset folder not found", missing, "cam1..cam6")

    (tiny / "exp" / "val_id.txt").unlink()
    res = run_script(REPO / "pre_process_sysu.py", "--data_path", tiny, check=False)
    assert_one_line_error(res, tiny / "exp" / "val_id.txt")

    test_file = tiny / "exp" / "test_id.txt"
    test_file.write_text("12,abc,7\n")
    with pytest.raises(UserError, match="garbled split file .*test_id.txt"):
        dm.process_query_sysu(tiny)
    test_file.unlink()
    for call in (lambda: dm.process_query_sysu(tiny, "all"),
                 lambda: dm.process_gallery_sysu(tiny, "indoor", 0)):
        with pytest.raises(UserError) as e:
            call()
        assert str(test_file) in str(e.value)
    with pytest.raises(UserError, match="--mode"):
        dm.process_query_sysu(tiny, "outdoor")


# ----------------------------------------------------------------------------- protocol lists
def test_query_is_every_ir_image_of_the_test_ids(sysu):
    root, _ = sysu
    test_ids = sorted(ids_of(root, "test"))
    expect = [f for pid in test_ids for cam in IR_CAMS for f in folder_files(root, cam, pid)]
    for mode in ("all", "indoor"):
        paths, pids, cams = dm.process_query_sysu(root, mode)
        assert paths == expect and len(paths) > 0
        assert pids.dtype == np.int64 and cams.dtype == np.int64
        assert pids.tolist() == [int(Path(p).parent.name) for p in expect]
        assert cams.tolist() == [int(Path(p).parent.parent.name[3:]) for p in expect]


def test_gallery_matches_the_published_draw(sysu):
    root, _ = sysu
    sizes = [len(folder_files(root, c, p)) for p in ids_of(root, "test") for c in RGB_CAMS
             if folder_files(root, c, p)]
    assert min(sizes) < 10 <= max(sizes)          # both multi-shot branches are exercised
    random.seed(12345)
    outside = random.random()
    for mode in ("all", "indoor"):
        for gall_mode in ("single", "multi"):
            trials = []
            for trial in range(10):
                random.seed(12345)
                got = dm.process_gallery_sysu(str(root), mode, trial, gall_mode)
                # the caller's global random stream is left alone
                assert random.random() == outside
                ref = reference_gallery(str(root), mode, trial, gall_mode)
                assert got[0] == ref[0], (mode, gall_mode, trial)
                assert got[1].tolist() == ref[1] and got[2].tolist() == ref[2]
                assert set(got[2].tolist()) <= set(RGB_CAMS if mode == "all" else (1, 2))
                trials.append(got)
            if gall_mode == "single":
                assert len({tuple(t[0]) for t in trials}) > 1   # trials really differ
            paths, pids, cams, index = dm.sysu_gallery_trials(root, mode, gall_mode)
            assert paths == sorted(set(paths)) and len(index) == 10
            for (tp, tpid, tcam), idx in zip(trials, index):
                assert [paths[i] for i in idx] == tp
                assert np.array_equal(pids[idx], tpid) and np.array_equal(cams[idx], tcam)


# ----------------------------------------------------------------------------- RegDB
def test_regdb_lists_and_grey_thermal(tmp_path):
    root = tmp_path / "RegDB"
    make_regdb(root, num_ids=8, seed=2, imgs_per_id=4)
    thermal = sorted((root / "Thermal").rglob("*.bmp"))
    assert len(thermal) == 32 and len(list((root / "Visible").rglob("*.bmp"))) == 32
    with Image.open(thermal[0]) as im:
        assert im.mode == "L"
    for trial in (1, 10):
        by_label = {}
        for modal in ("visible", "thermal"):
            paths, labels = dm.process_test_regdb(root, trial, modal)
            assert len(paths) == 16 and labels.dtype == np.int64
            assert labels.tolist() == [k for k in range(4) for _ in range(4)]
            assert all(Path(p).is_file() and Path(p).is_absolute() for p in paths)
            assert all(Path(p).parts[-3] == modal.capitalize() for p in paths)
            by_label[modal] = {(lab, Path(p).parent.name) for p, lab in zip(paths, labels)}
            tr_paths, tr_labels = dm.read_regdb_train(root, trial, modal)
            assert len(tr_paths) == 16 and sorted(set(tr_labels.tolist())) == [0, 1, 2, 3]
            test_pids = {Path(p).parent.name for p in paths}
            train_pids = {Path(p).parent.name for p in tr_paths}
            assert not test_pids & train_pids and len(test_pids | train_pids) == 8
        assert by_label["visible"] == by_label["thermal"]   # label k is one person
    paths, _ = dm.process_test_regdb(root, 1, "thermal")
    imgs = data_loader.load_images(paths[:5], img_w=64, img_h=128, workers=2)
    assert imgs.shape == (5, 128, 64, 3) and imgs.dtype == np.uint8
    assert np.array_equal(imgs[..., 0], imgs[..., 1]) and np.array_equal(imgs[..., 1], imgs[..., 2])
    vis = data_loader.load_images(dm.process_test_regdb(root, 1, "visible")[0][:5])
    assert vis.shape == (5, 288, 144, 3) and not np.array_equal(vis[..., 0], vis[..., 1])
    with pytest.raises(UserError, match="test_thermal_11.txt"):
        dm.process_test_regdb(root, 11, "thermal")


def test_preprocess_refuses_a_too_small_disk_up_front(tiny, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(UserError, match=r"not enough free space in .*: the arrays need \d+ MiB, 1 MiB are free"):
        preprocess_sysu(tiny, workers=0, verbose=False)
    assert not any((tiny / f).exists() for f in NPY) and not list(tiny.glob(".*tmp*"))


def _enlarge(root, copies=200):
    """Enough training images that the decoding pool is busy for a few seconds."""
    for pid in ids_of(root, "train"):
        for f in folder_files(root, 1, pid):
            for k in range(copies):
                Path(f).with_name(f"{9000 + k:04d}_{Path(f).name}").write_bytes(Path(f).read_bytes())


def _children(pid):
    import subprocess
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pids):
    return [c for c in pids if Path(f"/proc/{c}").exists()
            and "zombie" not in Path(f"/proc/{c}/status").read_text().lower()]


def test_ctrl_c_ends_preprocessing_every_time(tiny):
    """Ctrl-C in a terminal sends SIGINT to the whole process group: parent AND decoding
    workers. At random moments while the pool works, six times (a run that finished before
    the signal came is not counted; at most 12 runs): each run ends within the
    time bound with 'interrupted' and exit 130, and no worker outlives it (the pool used to
    hang about once in twelve: a worker blocked on its result pipe, the parent waiting)."""
    import signal
    import subprocess
    import time
    _enlarge(tiny)
    rng = random.Random(0)
    interrupted = 0
    for attempt in range(12):
        if interrupted == 6:
            break
        proc = subprocess.Popen([sys.executable, str(REPO / "pre_process_sysu.py"), "--data_path", str(tiny),
                                 "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True,
                                # as from a terminal: a suite started in the background (`cmd &`
                                # from a script) passes SIGINT down ignored
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        children, deadline = [], time.time() + 60
        while time.time() < deadline and len(children) < 2 and proc.poll() is None:
            time.sleep(0.05)
            children = _children(proc.pid)
        assert len(children) >= 2, "the decoding pool never started"
        time.sleep(rng.uniform(0, 0.6))
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"attempt {attempt}: still running 30 s after Ctrl-C (hung)")
        if proc.returncode == 0 and not err.strip():
            continue   # it finished before the signal came (a loaded machine): no Ctrl-C was tested
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", (attempt, err[-500:])
        deadline = time.time() + 10
        while time.time() < deadline and _alive(children):
            time.sleep(0.1)
        assert not _alive(children), f"attempt {attempt}: workers outlived the interrupted run"
        interrupted += 1
    assert interrupted == 6, f"only {interrupted} of 12 runs were still working when Ctrl-C came"
    assert not list(tiny.glob(".*.tmp*")), "an interrupted run left temporary files"


def test_stale_temporary_files_are_removed_and_said(tiny, capsys):
    """A preprocessing killed mid-write leaves .<array>.tmp<pid>; the next run removes the
    ones whose process is gone (and says so), never a live run's."""
    dead = tiny / ".train_rgb_resized_img.npy.tmp999999999"        # no such process
    live = tiny / f".train_ir_resized_img.npy.tmp{os.getppid()}"   # a process that runs
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    preprocess_sysu(tiny, img_h=48, img_w=24)
    out = capsys.readouterr().out
    assert not dead.exists() and live.exists()
    assert f"removed 1 temporary file(s) of an interrupted preprocessing: {dead.name}" in out
    live.unlink()


def test_killing_preprocessing_leaves_no_worker_alive(tiny):
    """kill -9 of pre_process_sysu.py while its decoding pool works: no worker survives."""
    import signal
    import subprocess
    import time
    _enlarge(tiny)   # enough work that the pool is busy when the parent dies
    proc = subprocess.Popen([sys.executable, str(REPO / "pre_process_sysu.py"), "--data_path", str(tiny),
                             "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    deadline = time.time() + 60
    while time.time() < deadline and len(children) < 2 and proc.poll() is None:
        time.sleep(0.05)
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        children = [int(x) for x in out.split()]
    assert len(children) >= 2, "the decoding pool never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    alive = children
    while time.time() < deadline and alive:
        time.sleep(0.2)
        alive = [c for c in children if Path(f"/proc/{c}").exists()
                 and "zombie" not in Path(f"/proc/{c}/status").read_text().lower()]
    assert not alive, f"workers {alive} outlived their parent"


def test_preprocess_disk_full_mid_write_is_one_line_and_leaves_nothing(tiny, monkeypatch):
    """The disk fills up while the arrays are written (after the up-front check passed):
    one UserError, no temp file, no array."""
    import builtins
    import errno
    import pre_process_sysu
    real_open = builtins.open

    class FillsUp:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 50_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(pre_process_sysu, "open", lambda *a, **k: FillsUp(real_open(*a, **k)), raising=False)
    with pytest.raises(UserError, match=r"cannot write the arrays into .* \(No space left on device\); .* MiB free"):
        preprocess_sysu(tiny, workers=0, verbose=False)
    assert not any((tiny / f).exists() for f in NPY) and not list(tiny.glob(".*tmp*"))


def test_a_decoding_worker_that_dies_is_one_error_not_a_hang(tmp_path, monkeypatch):
    """A worker that dies mid-way (killed, out of memory) ends the decoding with one error
    naming the image it did not deliver, and no worker is left behind; before, its results
    pipe could leave the parent waiting for ever."""
    import signal
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((32, 16, 3), 20 * i, np.uint8)).save(paths[-1])
    real = data_loader._decode_or_error

    def dies_on_5(task):   # the workers are forked: they inherit this function
        if task[0].endswith("5.png"):
            os._exit(3)
        return real(task)
    monkeypatch.setattr(data_loader, "_decode_or_error", dies_on_5)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("decoding hung after its worker died"))
    signal.alarm(60)
    try:
        with pytest.raises(UserError, match=r"worker stopped \(exit code 3\) before decoding .*5\.png; "
                                            r"--workers 0"):
            data_loader.load_images(paths, img_w=16, img_h=32, workers=2)
    finally:
        signal.alarm(0)
    assert not _children(os.getpid())
    assert data_loader.load_images(paths[:5], img_w=16, img_h=32, workers=2)[4, 0, 0, 0] == 80
