"""Shared dataset fixtures: small synthetic SYSU-MM01 and RegDB sets, generated ONCE per
test session (tools/make_synthetic.py) in their real on-disk layouts.

``sysu_small`` is also preprocessed (pre_process_sysu.py) at SMALL_H x SMALL_W, so the
fine-tuning scripts run on it with ``SMALL_ARGS``:

    subprocess.run([sys.executable, "AGW/train.py", "--dataset", "sysu",
                    "--data_path", str(sysu_small), *SMALL_ARGS, ...])
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Under pytest-xdist (-n 2, what CI runs) each worker and every script it starts use ONE
# torch thread: two workers x two threads on two cores made OpenMP's spinning threads fight
# (the suite took longer than serially); one thread each keeps every core busy.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import engine_finetune  # noqa: E402
import model  # noqa: E402

# The suite's longest files, longest first (pytest --durations, 2026-12-07). xdist hands whole
# files to the two workers in collection order; left to itself it sorts them by their number
# of tests, which starts the few-test, minutes-long learning files last and leaves one worker
# running them alone at the end. Longest first, the two workers finish together.
LONGEST_FIRST = ("test_agw.py", "test_llcm.py", "test_ddag.py", "test_study.py", "test_ddp.py",
                 "test_pretrain_learns.py", "test_pretrain.py", "test_safety.py", "test_folder.py",
                 "test_same_losses.py", "test_diagnostics.py", "test_analysis.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):   # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order

# Small CPU settings for end-to-end runs: ResNet-18 at 96x48, no loader workers.
SMALL_H, SMALL_W = 96, 48
SMALL_ARGS = ["--arch", "resnet18", "--img_h", str(SMALL_H), "--img_w", str(SMALL_W),
              "--test-batch", "64", "--workers", "0", "--gpu", "cpu"]
SYSU_IDS = 40    # -> 24 train + 4 val (28 training identities) and 12 test identities
REGDB_IDS = 20   # -> 10 training and 10 test identities per trial, 10 images per modality
LLCM_IDS = 36    # -> about 24 training and 12 test identities


@pytest.fixture(scope="session")
def sysu_small(tmp_path_factory):
    """A synthetic SYSU-MM01 folder with its training npy files at SMALL_H x SMALL_W."""
    from pre_process_sysu import preprocess_sysu
    from tools.make_synthetic import make_sysu
    root = tmp_path_factory.mktemp("sysu_small") / "SYSU-MM01"
    make_sysu(root, num_ids=SYSU_IDS, seed=0)
    preprocess_sysu(root, img_h=SMALL_H, img_w=SMALL_W, verbose=False)
    return root


@pytest.fixture(scope="session")
def llcm_small(tmp_path_factory):
    """A synthetic LLCM folder (idx/, vis/, nir/, test_vis/, test_nir/) with its training
    npy files at SMALL_H x SMALL_W."""
    from pre_process_sysu import preprocess_llcm
    from tools.make_synthetic import make_llcm
    root = tmp_path_factory.mktemp("llcm_small") / "LLCM"
    make_llcm(root, num_ids=LLCM_IDS, seed=0, imgs_per_cam=(2, 3))
    preprocess_llcm(root, img_h=SMALL_H, img_w=SMALL_W, verbose=False)
    return root


@pytest.fixture(scope="session")
def regdb_small(tmp_path_factory):
    """A synthetic RegDB folder (Visible/, Thermal/, idx/ for trials 1..10)."""
    from tools.make_synthetic import make_regdb
    root = tmp_path_factory.mktemp("regdb_small") / "RegDB"
    make_regdb(root, num_ids=REGDB_IDS, seed=0)
    return root


@pytest.fixture
def small_args():
    """SMALL_ARGS as a fixture (a fresh list each time it is requested)."""
    return list(SMALL_ARGS)


# ----------------------------------------------------------------------------- script runs
# One result line of the fine-tuning scripts (AGW: POOL/FC, DDAG: FC/FC_att).
RESULT_LINE = re.compile(r"^(POOL|FC|FC_att):   Rank-1: (\d+\.\d\d)% \| Rank-5: (\d+\.\d\d)% \| "
                         r"Rank-10: (\d+\.\d\d)%\| Rank-20: (\d+\.\d\d)%\| mAP: (\d+\.\d\d)%\| "
                         r"mINP: (\d+\.\d\d)%$")


def run_script(script, *args, cwd=ROOT, check=True, threads=None):
    """Run a script in a fresh interpreter; ``threads=1`` makes CPU results bit-reproducible
    (with more threads, OpenMP may hand out fewer threads on a busy machine and reduce sums
    in another order)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    out = subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-3000:]}")
    return out


def load_script(path):
    """A script of the repository as a module, by its file (``train.py`` and ``AGW/train.py``
    share a name), its own folder on sys.path while it loads, as when it runs as a script."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"script_{path.replace('/', '_')[:-3]}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    folder = str((ROOT / path).parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def pretrain_name(*argv):
    """The run name train.py gives this command line (train.run_name: the authors' name plus a
    tag per non-default setting), so tests need not spell the tags out."""
    import cli
    train = load_script("train.py")
    args = train.check_args(train.parse_args([str(a) for a in argv]))
    cli._PENDING_WARNINGS.clear()   # its notes are the run's to print, not this process's
    return train.run_name(args)


def output_args(tmp):
    """--model_path/--log_path/--vis_log_path under ``tmp``."""
    return ["--model_path", tmp / "save", "--log_path", tmp / "log",
            "--vis_log_path", tmp / "log" / "vis"]


def epoch_results(stdout):
    """{epoch: {feature name: result line}} from a training log's 'Test Epoch' blocks."""
    res, epoch = {}, None
    for line in stdout.splitlines():
        m = re.match(r"Test Epoch: (\d+)$", line)
        if m:
            epoch = int(m.group(1))
        elif epoch is not None and RESULT_LINE.match(line):
            res.setdefault(epoch, {})[line.split(":")[0]] = line
    return res


def final_lines(stdout):
    """{feature name: line} after the last 'All Average:' (SYSU) or 'Test Trial' (RegDB)."""
    lines = stdout.splitlines()
    start = max(i for i, ln in enumerate(lines)
                if ln.startswith(("All Average:", "Test Trial")))
    return {ln.split(":")[0]: ln for ln in lines[start + 1:] if RESULT_LINE.match(ln)}


def rank1(line):
    """Rank-1 of a result line, as a fraction."""
    return float(RESULT_LINE.match(line).group(2)) / 100


# ----------------------------------------------------------------------------- fine-tuning init
def check_mmgl_initialises_backbone(net, parse_args, stream, tmp_path, capsys, seed):
    """Save an MMGL pre-training state_dict (``stream`` two/one) as the pre-training script
    does and ``--resume`` a fine-tuning ``net`` from it (``parse_args(path)`` gives the
    script's args): a NEW run (epoch 0, no best), every backbone tensor copied, the
    pre-training heads dropped and reported, the method's own modules untouched."""
    torch.manual_seed(seed)
    mmgl = model.MMGLNet("resnet18", stream)
    path = tmp_path / f"sysu_{stream}_epoch_100.t"
    torch.save(mmgl.state_dict(), path)
    src = mmgl.state_dict()
    heads = {k for k in src if k.startswith(model.MMGLNet.HEAD_PREFIXES)}
    assert heads
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert engine_finetune.load_resume(net, parse_args(str(path))) == (0, None)
    n = len(net.backbone_keys())
    printed = capsys.readouterr().out
    assert f"loaded {n}/{n} backbone tensors" in printed
    assert f"dropped {len(heads)} pre-training head tensors" in printed
    own, backbone = net.state_dict(), set(net.backbone_keys())
    for k in own:
        assert torch.equal(own[k], src[k] if k in backbone else before[k]), k
    report = model.load_backbone(net, src, log=lambda *_: None)
    assert set(report["dropped_head"]) == heads
    assert report["missing_backbone"] == report["mismatched"] == report["unexpected"] == []
