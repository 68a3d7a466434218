"""torchrun / DistributedDataParallel (gloo on CPU): sharded samplers, rank-0-only outputs,
checkpoints that load into a single process, and the same loss as one process with the
same global batch."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_ARGS, SMALL_H, SMALL_W

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_loader import IdentitySampler, UnpairedSampler  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, args, nproc, cwd=ROOT, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args]
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("world", [2, 3])
def test_unpaired_sampler_shards_the_global_batch(world):
    rgb, ir = np.arange(100), np.arange(1000, 1060)
    one = list(UnpairedSampler(rgb, ir, 4 * world, seed=5, epoch=2, rank=0, world=1))
    ranks = [list(UnpairedSampler(rgb, ir, 4, seed=5, epoch=2, rank=r, world=world)) for r in range(world)]
    assert all(len(r) == len(one) for r in ranks)
    for step, (g_rgb, g_ir) in enumerate(one):
        # rank r's slice of every step, concatenated in rank order, IS the 1-process batch
        assert np.array_equal(np.concatenate([ranks[r][step][0] for r in range(world)]), g_rgb)
        assert np.array_equal(np.concatenate([ranks[r][step][1] for r in range(world)]), g_ir)
    seen = [np.concatenate([b[0] for b in r]) for r in ranks]
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(seen[a]) & set(seen[b])  # 100 images, 96 drawn: no repeats at all
    other_epoch = list(UnpairedSampler(rgb, ir, 4, seed=5, epoch=3, rank=0, world=world))
    assert not np.array_equal(other_epoch[0][0], ranks[0][0][0])


def test_unpaired_sampler_epoch_length():
    """--iters_per_epoch: a shorter epoch is the start of the full pass (capped runs see the
    batches they always saw); a longer one keeps cycling both modalities evenly."""
    rgb, ir = np.arange(100), np.arange(1000, 1060)
    full = list(UnpairedSampler(rgb, ir, 8, seed=5, epoch=2))
    assert len(full) == 12
    short = list(UnpairedSampler(rgb, ir, 8, seed=5, epoch=2, steps=5))
    assert len(short) == 5 and all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                                   for a, b in zip(short, full))
    long = list(UnpairedSampler(rgb[:10], ir[:6], 8, seed=5, epoch=2, steps=30))
    assert len(long) == 30 and all(len(r) == 8 and len(i) == 8 for r, i in long)
    count_rgb = np.bincount(np.concatenate([r for r, _ in long]))
    count_ir = np.bincount(np.concatenate([i for _, i in long]) - 1000)
    # 240 draws over 10 RGB / 6 IR images: whole random orders, so every image 24 / 40 times
    assert set(count_rgb) == {24} and set(count_ir) == {40}


def test_identity_sampler_shards_identities():
    rng = np.random.default_rng(0)
    rgb_label, ir_label = rng.integers(0, 20, 300), rng.integers(0, 20, 150)
    world, p, k = 2, 4, 2
    one = list(IdentitySampler(rgb_label, ir_label, k, p * world, seed=1, epoch=0, rank=0, world=1))
    ranks = [list(IdentitySampler(rgb_label, ir_label, k, p, seed=1, epoch=0, rank=r, world=world))
             for r in range(world)]
    for step, (g_rgb, g_ir) in enumerate(one):
        parts = [ranks[r][step] for r in range(world)]
        assert np.array_equal(np.concatenate([x[0] for x in parts]), g_rgb)
        ids = [set(rgb_label[x[0]]) for x in parts]
        assert len(ids[0]) == p and not ids[0] & ids[1]  # disjoint identities per step
        for r_rgb, r_ir in parts:  # RGB j and IR j share an identity
            assert np.array_equal(rgb_label[r_rgb], ir_label[r_ir])


def test_identity_sampler_epoch_length():
    """The authors' epoch, int(N / (batch x num_pos)) + 1 steps, or ``steps`` (fine-tuning's
    --iters_per_epoch): a shorter epoch is the start of the full one, a longer one goes on
    drawing identity batches alike."""
    rng = np.random.default_rng(0)
    rgb_label, ir_label = rng.integers(0, 20, 300), rng.integers(0, 20, 150)
    full = list(IdentitySampler(rgb_label, ir_label, 2, 4, seed=1, epoch=3))
    assert len(full) == 300 // 8 + 1
    short = list(IdentitySampler(rgb_label, ir_label, 2, 4, seed=1, epoch=3, steps=5))
    assert len(short) == 5 and all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                                   for a, b in zip(short, full))
    long = list(IdentitySampler(rgb_label, ir_label, 2, 4, seed=1, epoch=3, steps=60))
    assert len(long) == 60 and all(np.array_equal(rgb_label[r], ir_label[i]) for r, i in long)


# ----------------------------------------------------------------------------- pre-training
PRE = ["--arch", "resnet18", "--img_h", str(SMALL_H), "--img_w", str(SMALL_W), "--gpu", "cpu",
       "--workers", "0", "--val_images", "40", "--epochs", "1", "--iters_per_epoch", "3", "--print_freq", "1",
       "--warmup_epochs", "1", "--seed", "0"]


def printed_losses(stdout):
    return [float(m) for m in re.findall(r"^Epoch: \[\d+\]\[\d+/\d+\].* loss ([0-9.]+)", stdout, re.M)]


@pytest.fixture(scope="module")
def pretrain_ddp(sysu_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_pre")
    out = ["--model_path", str(tmp / "sm"), "--log_path", str(tmp / "log"), "--vis_log_path", str(tmp / "vis")]
    res2 = launch(ROOT / "train.py", ["--data_path", str(sysu_small), *PRE, "--batch-size", "4", "--gather", *out], 2)
    tmp1 = tmp / "one"
    out1 = ["--model_path", str(tmp1 / "sm"), "--log_path", str(tmp1 / "log"), "--vis_log_path", str(tmp1 / "vis")]
    res1 = launch(ROOT / "train.py", ["--data_path", str(sysu_small), *PRE, "--batch-size", "8", *out1], 1)
    return tmp, res2, res1


def test_pretrain_ddp_writes_once_and_loads_in_one_process(pretrain_ddp, sysu_small, tmp_path):
    tmp, res2, _ = pretrain_ddp
    name = next((tmp / "sm").glob("*_last.pth")).name[:-len("_last.pth")]   # the one run, tags and all
    assert sorted(p.name for p in (tmp / "sm").iterdir()) == [f"{name}_epoch_1.t", f"{name}_last.pth"]
    assert res2.stdout.count("run name:") == 1  # one header: rank 0 alone prints and logs
    assert (tmp / "log" / f"{name}.txt").read_text().count("run name:") == 1
    sd = torch.load(tmp / "sm" / f"{name}_epoch_1.t", weights_only=True)
    assert not [k for k in sd if k.startswith("module.")]
    # the DDP run's resumable checkpoint continues in a single process
    res = launch(ROOT / "train.py", ["--data_path", str(sysu_small), *PRE[:-6], "--epochs", "2",
                                     "--iters_per_epoch", "2", "--print_freq", "1", "--batch-size", "8",
                                     "--resume", str(tmp / "sm" / f"{name}_last.pth"), "--resume_anyway",
                                     "--model_path", str(tmp_path), "--log_path", str(tmp_path),
                                     "--vis_log_path", str(tmp_path)], 1)
    # (its own name: another batch and epoch length than the DDP run's)
    assert "continuing at epoch 1" in res.stdout and list(tmp_path.glob("*_epoch_2.t"))


def test_pretrain_ddp_loss_matches_one_process(pretrain_ddp):
    """Same global batch (2 x 4 vs 1 x 8 images per modality, same images per step): the
    printed (rank-averaged) loss follows the single-process one. Crops, flips, stripe
    permutations and Gumbel noise are drawn per rank, so equality is statistical."""
    _, res2, res1 = pretrain_ddp
    l2, l1 = printed_losses(res2.stdout), printed_losses(res1.stdout)
    assert len(l1) == len(l2) == 3
    np.testing.assert_allclose(l2, l1, rtol=0.1)


# ----------------------------------------------------------------------------- fine-tuning
# one epoch of FT_STEPS steps (--iters_per_epoch: the start of the authors' 15-step epoch here)
FT_STEPS = 5
FT = [*SMALL_ARGS, "--epochs", "1", "--iters_per_epoch", str(FT_STEPS), "--warmup_epochs", "0", "--test_every", "1",
      "--print_freq", "1"]


def fine_tune_ddp(script, extra, sysu_small, tmp, nproc, batch):
    out = ["--model_path", str(tmp / "sm"), "--log_path", str(tmp / "log"), "--vis_log_path", str(tmp / "vis")]
    return launch(ROOT / script, ["--dataset", "sysu", "--data_path", str(sysu_small), *FT, *extra,
                                  "--batch-size", str(batch), *out], nproc)


def step_losses(stdout):
    return [float(m) for m in re.findall(r"^Epoch: \[0\]\[\d+/\d+\].* loss ([0-9.]+)", stdout, re.M)]


@pytest.mark.parametrize("script,extra,test_script,test_extra", [
    ("AGW/train.py", ["--method", "agw", "--gather"], "AGW/test.py", []),
    ("DDAG/train_ddag.py", ["--wpa", "--graph", "--gather"], "DDAG/test_ddag.py", ["--wpa", "--graph"]),
])
def test_fine_tune_ddp_writes_once_loads_in_one_process_and_follows_one_process_loss(
        script, extra, test_script, test_extra, sysu_small, tmp_path):
    res2 = fine_tune_ddp(script, extra, sysu_small, tmp_path / "two", 2, 4)
    saved = sorted(p.name for p in (tmp_path / "two" / "sm").iterdir())
    best = [n for n in saved if n.endswith("_best.t")]
    assert len(best) == 1 and len([n for n in saved if n.endswith("_last.pth")]) == 1, saved
    assert not [n for n in saved if "tmp" in n]
    assert res2.stdout.count("All Average") <= 1 and res2.stdout.count("POOL:" if "AGW" in script else "FC:") >= 1
    sd = torch.load(tmp_path / "two" / "sm" / best[0], weights_only=False)["net"]
    assert not [k for k in sd if k.startswith("module.")]
    # the DDP checkpoint tests in a single process with the same numbers rank 0 printed
    res = launch(ROOT / test_script, ["--dataset", "sysu", "--data_path", str(sysu_small), *SMALL_ARGS,
                                      *test_extra, "--resume", str(tmp_path / "two" / "sm" / best[0]),
                                      "--log_path", str(tmp_path / "testlog")], 1, cwd=ROOT / script.split("/")[0])
    avg = res.stdout.split("All Average")[-1].strip().splitlines()[1]
    assert avg in res2.stdout
    # same global batch (2 ranks x 4 identities vs 1 x 8): the loss follows one process
    res1 = fine_tune_ddp(script, [e for e in extra if e != "--gather"], sysu_small, tmp_path / "one", 1, 8)
    l2, l1 = step_losses(res2.stdout), step_losses(res1.stdout)
    assert len(l1) == len(l2) == FT_STEPS
    np.testing.assert_allclose(np.mean(l2[:3]), np.mean(l1[:3]), rtol=0.15)
