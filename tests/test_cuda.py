"""The CUDA paths, run where a CUDA device exists (skipped elsewhere, so CI on a CPU stays
green): the three trainers and both test scripts with ``--gpu 0`` in fp32, bf16 autocast and
fp16 autocast + GradScaler; DeviceAugment's one-gather kernel equal to the CPU path for the
same draws; checkpoints written on CUDA resumed and tested on the CPU and back; NCCL set-up
under torchrun.

``MMGL_TEST_DEVICE=cpu`` runs the same tests on the CPU (a dry run of their logic on a
machine without a GPU; the fp16 case then runs bf16, as --amp does on a CPU)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_H, SMALL_W, output_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
from data_loader import DeviceAugment  # noqa: E402
from test_augment import draws  # noqa: E402
from test_ddp import free_port  # noqa: E402

DEV = os.environ.get("MMGL_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")
GPU = "0" if DEV == "cuda" else "cpu"
ON_CUDA = DEV == "cuda"
NET = ["--arch", "resnet18", "--img_h", str(SMALL_H), "--img_w", str(SMALL_W), "--workers", "2"]
PRE = [*NET, "--batch-size", "8", "--epochs", "2", "--iters_per_epoch", "6", "--warmup_epochs", "1",
       "--print_freq", "3", "--val_images", "40", "--seed", "0"]
PRE_NAME = "sysu_two_cw_0.5_ct_0.07_so_20_spm_10_resnet18"
FINE = [*NET, "--test-batch", "64", "--epochs", "2", "--warmup_epochs", "0", "--test_every", "1",
        "--print_freq", "100"]
# Runs a script with torch.cuda.is_bf16_supported() patched to False, so --amp takes the
# fp16 + GradScaler path it takes on GPUs without bf16 (V100, T4, 2080 Ti).
FORCE_FP16 = ("import runpy, sys, torch; torch.cuda.is_bf16_supported = lambda *a, **k: False; "
              "sys.argv = sys.argv[1:]; sys.path.insert(0, str(__import__('pathlib').Path(sys.argv[0]).resolve().parent)); "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
PRECISION = {"fp32": "fp32", "bf16": "bf16 autocast",
             "fp16": "fp16 autocast + GradScaler" if ON_CUDA else "bf16 autocast"}


def run(script, *args, precision="fp32", cwd=ROOT):
    """Run ``script`` on DEV in ``precision`` (fp32 | bf16 | fp16); check the header says so."""
    amp = [] if precision == "fp32" else ["--amp"]
    cmd = [sys.executable, str(script), *map(str, args), *amp]
    if precision == "fp16":
        cmd = [sys.executable, "-c", FORCE_FP16, *cmd[1:]]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    device = "cuda:0" if ON_CUDA and "--gpu" in args and args[list(args).index("--gpu") + 1] == "0" else "cpu"
    assert f"| device {device} | {PRECISION[precision]} |" in out.stdout, out.stdout[:2000]
    return out.stdout


def json_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def metrics(stdout, feature):
    """(Rank-1, mAP) in percent from the last result line of ``feature``."""
    m = re.findall(rf"^{feature}:   Rank-1: ([\d.]+)%.*mAP: ([\d.]+)%", stdout, re.M)
    return tuple(map(float, m[-1]))


# ----------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("k", [None, 3, 6])
def test_gather_kernel_on_the_device_equals_the_cpu_path(k):
    """The same crop offsets, flips and stripe permutations give the same normalised batch
    from the GPU's one gather as from the CPU's per-image path (equal up to float rounding
    of the multiply-add)."""
    aug = DeviceAugment(SMALL_H, SMALL_W, pad=10, device=DEV)
    x = torch.randint(0, 256, (32, SMALL_H, SMALL_W, 3), dtype=torch.uint8)
    oy, ox, flip, src = draws(32, SMALL_H, SMALL_W, aug, k, seed=3)
    cpu = DeviceAugment(SMALL_H, SMALL_W, pad=10)._crop_cpu(x, 10, oy, ox, flip, src)
    on = [t.to(DEV) if t is not None else None for t in (x, oy, ox, flip, src)]
    dev = aug._crop_gather(on[0], 10, *on[1:])
    assert dev.device.type == DEV and dev.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dev.cpu(), cpu, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- pre-training
@pytest.fixture(scope="module")
def pretrained(sysu_small, tmp_path_factory):
    """train.py on DEV in each precision, run when first asked for: {precision: (output
    folder, stdout)}."""
    class Runs(dict):
        def __missing__(self, precision):
            tmp = tmp_path_factory.mktemp(f"pre_{precision}")
            stdout = run(ROOT / "train.py", "--dataset", "sysu", "--data_path", sysu_small, "--gpu", GPU,
                         *PRE, *output_args(tmp), precision=precision)
            self[precision] = tmp, stdout
            return self[precision]
    return Runs()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_pretraining_runs_on_the_device(pretrained, precision):
    tmp, stdout = pretrained[precision]
    lines = json_lines(tmp / "log" / f"{PRE_NAME}.jsonl")
    assert [r["epoch"] for r in lines] == [0, 1]
    for r in lines:
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/perm_rgb", "train/perm_ir", "train/pcc",
                                                 "val/perm_mse")), r
        assert 0 <= r["val/perm_acc"] <= 1
    assert (tmp / "save" / f"{PRE_NAME}_epoch_2.t").is_file()
    # the checkpoint holds CPU-loadable tensors (load_checkpoint maps to the CPU)
    ckpt = checkpoint.load(tmp / "save" / f"{PRE_NAME}_last.pth")
    assert all(v.device.type == "cpu" for v in ckpt["net"].values())
    if precision == "fp16" and ON_CUDA:   # the scaler really ran: its scale is in the checkpoint
        assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 0


@pytest.mark.parametrize("direction", ["device_to_cpu", "cpu_to_device"])
def test_pretraining_resumes_across_devices(pretrained, sysu_small, tmp_path, direction):
    """A ``_last.pth`` written on one device continues on the other: epoch 2 of 3, with the
    optimiser state moved to the parameters' device."""
    tmp = tmp_path / "run"
    first, second = (GPU, "cpu") if direction == "device_to_cpu" else ("cpu", GPU)
    common = ["--dataset", "sysu", "--data_path", sysu_small, *PRE, *output_args(tmp)]
    run(ROOT / "train.py", "--gpu", first, *common)
    stdout = run(ROOT / "train.py", "--gpu", second, *common, "--epochs", "3",
                 "--resume", tmp / "save" / f"{PRE_NAME}_last.pth")
    assert "continuing at epoch 2" in stdout
    assert [r["epoch"] for r in json_lines(tmp / "log" / f"{PRE_NAME}.jsonl")] == [0, 1, 2]


def test_pretraining_under_torchrun_sets_up_nccl(sysu_small, tmp_path):
    """torchrun with one process per GPU: NCCL process group (gloo on the CPU), --gather on."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "train.py"), "--dataset", "sysu",
           "--data_path", str(sysu_small), "--gpu", GPU, *PRE, "--gather", *map(str, output_args(tmp_path))]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "world size 1" in out.stdout
    assert (tmp_path / "save" / f"{PRE_NAME}_epoch_2.t").is_file()


# ----------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_agw_fine_tunes_from_a_device_checkpoint_and_tests_on_both(pretrained, sysu_small, tmp_path, precision):
    """AGW from the pre-training checkpoint of the same precision, on DEV; then test.py on DEV
    and on the CPU from the checkpoint written on DEV: the same metrics up to float rounding."""
    ckpt = pretrained[precision][0] / "save" / f"{PRE_NAME}_epoch_2.t"
    stdout = run("train.py", "--dataset", "sysu", "--data_path", sysu_small, "--gpu", GPU, *FINE,
                 "--resume", ckpt, *output_args(tmp_path), precision=precision, cwd=ROOT / "AGW")
    assert "loaded" in stdout and "backbone tensors" in stdout
    best = tmp_path / "save" / "sysu_agw_p4_n8_lr_0.1_seed_0_best.t"
    losses = [float(x) for x in re.findall(r"Loss: ([\d.]+)", stdout)]
    assert losses and all(math.isfinite(x) for x in losses)
    test = ["--dataset", "sysu", "--data_path", sysu_small, *NET, "--test-batch", "64", "--resume", best]
    on_dev = run("test.py", *test, "--gpu", GPU, precision=precision, cwd=ROOT / "AGW")
    on_cpu = run("test.py", *test, "--gpu", "cpu", cwd=ROOT / "AGW")
    r_dev, m_dev = metrics(on_dev, "FC")
    r_cpu, m_cpu = metrics(on_cpu, "FC")
    tol = 1.0 if precision == "fp32" else 3.0   # half-precision features vs fp32 features
    assert abs(m_dev - m_cpu) < tol, (on_dev[-600:], on_cpu[-600:])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ddag_trains_and_tests_on_the_device(pretrained, sysu_small, tmp_path, precision):
    ckpt = pretrained[precision][0] / "save" / f"{PRE_NAME}_epoch_2.t"
    stdout = run("train_ddag.py", "--dataset", "sysu", "--data_path", sysu_small, "--gpu", GPU, *FINE,
                 "--wpa", "--graph", "--optim", "adam", "--lr", "0.003", "--resume", ckpt, *output_args(tmp_path),
                 precision=precision, cwd=ROOT / "DDAG")
    assert "FC_att:" in stdout
    best = tmp_path / "save" / "sysu_ddag_wpa_graph_p4_n8_lr_0.003_seed_0_adam_best.t"
    on_dev = run("test_ddag.py", "--dataset", "sysu", "--data_path", sysu_small, *NET, "--test-batch", "64",
                 "--wpa", "--graph", "--gpu", GPU, "--resume", best, precision=precision, cwd=ROOT / "DDAG")
    assert 0 < metrics(on_dev, "FC_att")[1] <= 100
