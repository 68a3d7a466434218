"""Checkpoint safety (weights_only loading, numpy allow-list, atomic save), NaN stop,
and kill -9 then --resume."""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_H, SMALL_W, pretrain_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import cli  # noqa: E402
from cli import UserError  # noqa: E402


class Payload:
    """A pickled object a weights_only load must refuse."""

    def __init__(self):
        self.note = "arbitrary code could run here"


def test_authors_style_checkpoint_with_numpy_scalars_loads_safely(tmp_path):
    sd = {"classifier.weight": torch.randn(3, 4)}
    path = tmp_path / "sysu_agw_p4_n8_lr_0.1_seed_0_best.t"
    torch.save({"net": sd, "epoch": 40, "cmc": np.linspace(0.5, 0.9, 20), "mAP": np.float64(0.47),
                "mINP": np.float32(0.3)}, path)
    ckpt = checkpoint.load(path)
    assert torch.equal(ckpt["net"]["classifier.weight"], sd["classifier.weight"])
    assert float(ckpt["mAP"]) == pytest.approx(0.47) and ckpt["cmc"].shape == (20,)


def test_pickled_object_is_refused_without_trust(tmp_path):
    path = tmp_path / "evil.t"
    torch.save({"net": {}, "extra": Payload()}, path)
    with pytest.raises(UserError, match="--trust-checkpoint"):
        checkpoint.load(path)
    assert isinstance(checkpoint.load(path, trust=True)["extra"], Payload)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "nope.t")


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.t"
    checkpoint.save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_crash(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1)}, f, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*model.t \(disk full\); .* free there"):
        checkpoint.save({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.t"]  # no temp file left

    # a full disk as torch reports it (ENOSPC inside its zip writer): the same one line
    def enospc(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(UserError, match="unexpected pos"):
        checkpoint.save({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.t"]


@pytest.mark.parametrize("trust", [False, True])
def test_text_file_and_truncated_file_say_what_they_are(tmp_path, trust):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
        checkpoint.load(text, trust=trust)
    good = tmp_path / "good.t"
    torch.save({"w": torch.ones(1000)}, good)
    cut = tmp_path / "cut.t"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(cut, trust=trust)


def test_unwritable_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is not writable"):
        cli.check_writable(tmp_path / "ok", blocker / "sub")
    assert (tmp_path / "ok").is_dir() and not list((tmp_path / "ok").iterdir())


# ----------------------------------------------------------------------------- train.py faults
TINY = ["--arch", "resnet18", "--img_h", str(SMALL_H), "--img_w", str(SMALL_W), "--gpu", "cpu",
        "--workers", "0", "--batch-size", "8", "--print_freq", "2", "--warmup_epochs", "0", "--val_images", "40"]


def outs(tmp):
    return ["--model_path", str(tmp / "sm"), "--log_path", str(tmp / "log"), "--vis_log_path", str(tmp / "vis")]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(sysu_small, tmp_path):
    base = [sys.executable, str(ROOT / "train.py"), "--data_path", str(sysu_small), *TINY, *outs(tmp_path)]
    subprocess.run([*base, "--epochs", "1", "--iters_per_epoch", "2"], check=True, capture_output=True)
    files = {p.name: p.read_bytes() for p in (tmp_path / "sm").iterdir()}
    assert f"{pretrain_name(*TINY, '--iters_per_epoch', '2')}_last.pth" in files
    res = subprocess.run([*base, "--epochs", "2", "--iters_per_epoch", "4", "--lr", "1e12"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert re.search(r"^error: loss became (nan|inf|-inf) at epoch 0 step \d+; stopped before "
                     r"saving; last good checkpoint: ", res.stderr, re.M), res.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "sm").iterdir()} == files


def test_killed_run_resumes_from_its_last_epoch(sysu_small, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_path", str(sysu_small), *TINY, *outs(tmp_path),
           "--epochs", "3", "--iters_per_epoch", "6", "--save_epoch", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = pretrain_name(*TINY, "--iters_per_epoch", "6")
    last = tmp_path / "sm" / f"{name}_last.pth"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-run: epoch 0 saved, epoch 1 under way
    proc.wait()
    assert last.exists() and proc.returncode == -signal.SIGKILL
    done = torch.load(last, weights_only=False)["epoch"]
    assert done < 2
    res = subprocess.run([*cmd, "--resume", f"{name}_last.pth"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"continuing at epoch {done + 1}" in res.stdout
    assert (tmp_path / "sm" / f"{name}_epoch_3.t").is_file()
    assert torch.load(last, weights_only=False)["epoch"] == 2


def test_gpu_that_is_not_there_warns_and_runs_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dummy", *TINY[:6], "--gpu", "3",
                          "--workers", "0", "--batch-size", "4", "--epochs", "1", "--iters_per_epoch", "1",
                          *outs(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: --gpu 3 asked for CUDA but none is available; running on the CPU" in res.stdout
    assert "device cpu" in res.stdout
    # one warning line, not a second one from the warnings module on stderr
    assert (res.stdout + res.stderr).count("asked for CUDA") == 1, res.stderr


def test_npy_of_the_wrong_size_is_one_error_line(sysu_small, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data_path", str(sysu_small),
                          "--arch", "resnet18", "--gpu", "cpu", "--epochs", "1", *outs(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"holds {SMALL_H}x{SMALL_W} images but --img_h/--img_w ask for 288x144" in res.stderr


def test_nonfinite_bn_statistics_stop_evaluation_with_one_line(sysu_small):
    """Features blown up while the loss stayed finite: the evaluation names the cause
    instead of failing later on NaN distances."""
    import engine_finetune
    from model import TwoStreamBackbone
    net = TwoStreamBackbone("resnet18")
    net.forward = lambda x1, x2=None, modal=0: net.forward_body(net.stem(x1, x2, modal)).mean((2, 3))
    bn = net.base_resnet.base.layer3[0].bn1
    bn.running_mean.fill_(float("nan"))
    args = engine_finetune.get_args_parser("t").parse_args(["--data_path", str(sysu_small), "--arch", "resnet18",
                                                     "--img_h", str(SMALL_H), "--img_w", str(SMALL_W),
                                                     "--gpu", "cpu", "--test-batch", "8"])
    images = np.load(sysu_small / "train_rgb_resized_img.npy")[:8]
    with pytest.raises(UserError) as e:
        engine_finetune.extract_features(net, images, 1, args, torch.device("cpu"))
    msg = str(e.value)
    assert "evaluation features (output 0) of the RGB test images: 8 of 8 are not finite" in msg
    assert "base_resnet.base.layer3.0.bn1" in msg and len(msg) < 300
    bn.running_mean.fill_(0.0)
    engine_finetune.extract_features(net, images, 1, args, torch.device("cpu"))   # finite again: no error
