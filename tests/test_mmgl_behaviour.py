"""What the MMGL pre-training must DO, checked independently of any recorded number (each
test fails on a one-line bug):

* the stripe features of ``--pcc_order original`` are in body-part order (stripe k of the
  network's 'stripes' output is original part k, wherever the shuffle put it);
* inside a real ``train.train_one_epoch`` the RGB and the IR image of pair j reach the
  network shuffled by the SAME permutation, and the network is told that permutation;
* the lr schedule (linear warm-up, then cosine) has its exact values, and a run resumed
  across the warm-up boundary continues with exactly the uninterrupted run's lr;
* a one-stream network loading a checkpoint with two different stems gets the VISIBLE
  stem's values (and the warning says so).
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import logger  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from data_loader import IMAGENET_MEAN, IMAGENET_STD, DeviceAugment, random_perms  # noqa: E402

H, W, K = 96, 48, 6
SH = H // K


def shuffle_rows(x, perms):
    """NCHW ``x`` with stripe i of image b taken from stripe perms[b, i] (DeviceAugment's
    convention), written out independently of data_loader."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for i in range(K):
            j = int(perms[b, i])
            out[b, :, i * SH:(i + 1) * SH] = x[b, :, j * SH:(j + 1) * SH]
    return out


# ----------------------------------------------------------------------------- B1: stripe order
def local_mmgl(seed=0):
    """A real MMGLNet (heads, stripe_embed, forward) whose backbone is made strictly local:
    the stem averages each 16x16 block (one feature-map row per stripe) and copies its 3
    channels into the 512 channels local_conv_list expects; layer1-4 are identities. So a
    stripe's feature depends on that stripe's pixels only, and shuffling the input rows
    shuffles the feature map's rows, nothing else."""
    torch.manual_seed(seed)
    net = model.MMGLNet("resnet18", "two", num_stripe=K, proj_dim=16).eval()
    gain = torch.randn(net.out_dim, 3)   # a fixed random channel mix, so stripes differ in direction

    def stem(x1, x2=None, modal=0):
        x = torch.cat((x1, x2), 0) if modal == 0 else (x1 if modal == 1 else x2)
        pooled = F.avg_pool2d(x, SH)                              # [N, 3, K, W/16]
        return torch.einsum("nchw,dc->ndhw", pooled, gain)

    net.stem = stem
    body = net.base_resnet.base
    for name in ("layer1", "layer2", "layer3", "layer4"):
        setattr(body, name, torch.nn.Identity())
    return net


def test_stripes_come_back_in_body_part_order():
    """Stripe k of 'stripes' (with perms, as train.py passes them under the default
    --pcc_order original) is the projection of ORIGINAL part k: equal to stripe k of the
    unshuffled image's output; without perms it is the shuffled row, which differs."""
    net = local_mmgl()
    g = torch.Generator().manual_seed(1)
    x_rgb, x_ir = torch.randn(5, 3, H, W, generator=g), torch.randn(5, 3, H, W, generator=g)
    perms = random_perms(5, K, generator=g)
    perms[0] = torch.tensor([1, 2, 3, 4, 5, 0])   # a cycle: its inverse is not itself
    assert any(not torch.equal(p.argsort(), p) for p in perms)
    with torch.no_grad():
        plain = net(x_rgb, x_ir)["stripes"]                                 # [10, K, P]
        both = perms.repeat(2, 1)
        shuffled = net(shuffle_rows(x_rgb, perms), shuffle_rows(x_ir, perms), perms=both)["stripes"]
        raw = net(shuffle_rows(x_rgb, perms), shuffle_rows(x_ir, perms))["stripes"]
    assert shuffled.shape == plain.shape == (10, K, 16)
    torch.testing.assert_close(shuffled, plain, rtol=1e-5, atol=1e-6)
    # the check has teeth: without perms (--pcc_order shuffled) row k is projected as it lies
    assert not torch.allclose(raw, plain, atol=1e-3)
    # and one modality alone (modal 1 / 2, as the held-out evaluation calls it) alike
    with torch.no_grad():
        ir_only = net(None, shuffle_rows(x_ir, perms), modal=2, perms=perms)["stripes"]
    torch.testing.assert_close(ir_only, plain[5:], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- B2: shared permutation
class RampData(train.DummyData):
    """--dummy data whose every pixel says which row of the image it is: value 40 + 2*row
    in all channels and columns (never 0, the padding's black). RGB and IR differ by a
    constant only, so both are read the same way."""

    def __init__(self, n, img_h, img_w, seed=0):
        super().__init__(n, img_h, img_w, seed)
        ramp = (40 + 2 * np.arange(img_h)).astype(np.uint8)[None, :, None, None]
        self.rgb_img = np.broadcast_to(ramp, (n, img_h, img_w, 3)).copy()
        self.ir_img = self.rgb_img.copy()
        self.ir_img[..., 1:] += 1   # not the same bytes, the same rows


def read_perm(x):
    """The stripe permutation a ramp image was shuffled with, from its normalised NCHW
    pixels: DeviceAugment crops (a vertical offset d in [-pad, pad], the same for every
    stripe of an image), then output stripe i is crop stripe perms[i], so output row
    i*SH + r shows image row d + perms[i]*SH + r (or black padding). The middle column is
    inside the image whatever the horizontal crop and flip."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1) * 255
    col = x[:, :, W // 2].float() * std + mean               # [3, H]
    v = col[0].round().long()
    assert torch.allclose(col[0], v.float(), atol=1e-2)
    starts = []
    for i in range(K):
        rows = torch.arange(i * SH, (i + 1) * SH)
        seen = v[rows] > 0                                    # not padding
        assert seen.sum() >= SH - 10, v[rows]
        start = ((v[rows][seen] - 40) // 2) - (rows[seen] - i * SH)   # = d + perms[i]*SH
        assert (start == start[0]).all(), start               # one shift per stripe
        starts.append(int(start[0]))
    starts = np.array(starts)
    perm = (starts - starts.min()) // SH
    assert np.array_equal(np.sort(perm), np.arange(K)) and ((starts - starts.min()) % SH == 0).all(), starts
    return perm


def test_read_perm_reads_device_augment():
    """The reader above inverts DeviceAugment's crop + flip + shuffle (its own check)."""
    data = RampData(8, H, W)
    aug = DeviceAugment(H, W)
    torch.manual_seed(3)
    perms = random_perms(8, K)
    x = aug(torch.from_numpy(data.ir_img), train=True, perms=perms)
    assert [list(read_perm(x[b])) for b in range(8)] == perms.tolist()


def test_a_pair_shares_its_permutation_inside_train_one_epoch(tmp_path, monkeypatch):
    """A real (tiny) pre-training epoch (train.main, --dummy data replaced by ramp images):
    the network's forward is wrapped to record what it received. In every step and for
    every pair j the RGB image's stripes and the IR image's stripes were moved by one and
    the same permutation, and the ``perms`` handed to the network (--pcc_order original)
    are exactly those, RGB rows then IR rows."""
    calls = []
    forward = model.MMGLNet.forward

    def spy(self, x_rgb, x_ir=None, modal=0, pcc=None, perms=None, features=False):
        if self.training:
            calls.append((x_rgb.detach().clone(), x_ir.detach().clone(), None if perms is None else perms.clone()))
        return forward(self, x_rgb, x_ir, modal=modal, pcc=pcc, perms=perms, features=features)

    monkeypatch.setattr(model.MMGLNet, "forward", spy)
    monkeypatch.setattr(train, "DummyData", RampData)
    args = train.get_args_parser().parse_args([
        "--dummy", "--arch", "resnet18", "--img_h", str(H), "--img_w", str(W), "--gpu", "cpu",
        "--workers", "0", "--batch-size", "8", "--epochs", "1", "--iters_per_epoch", "2",
        "--print_freq", "100", "--no-diag", "--pcc_start_acc", "0", "--pcc_order", "original", "--seed", "5",
        "--model_path", str(tmp_path / "sm"), "--log_path", str(tmp_path / "log"),
        "--vis_log_path", str(tmp_path / "vis")])
    assert args.pcc_order == "original"
    train.main(args)
    assert len(calls) == 2
    for x_rgb, x_ir, perms in calls:
        b = x_rgb.shape[0]
        assert perms is not None and perms.shape == (2 * b, K)
        read_rgb = np.stack([read_perm(x_rgb[j]) for j in range(b)])
        read_ir = np.stack([read_perm(x_ir[j]) for j in range(b)])
        assert len({tuple(p) for p in read_rgb}) > 1          # pairs got different permutations
        assert np.array_equal(read_rgb, read_ir), (read_rgb, read_ir)
        assert np.array_equal(perms[:b].numpy(), read_rgb) and np.array_equal(perms[b:].numpy(), read_ir)


# ----------------------------------------------------------------------------- C2: lr schedule
def test_lr_at_is_warm_up_then_cosine():
    """Exact values: warm-up (e+1)/warmup for e < warmup, then 0.5 (1 + cos(pi t)) with
    t = (e - warmup) / (epochs - warmup)."""
    args = train.get_args_parser().parse_args(["--warmup_epochs", "2", "--epochs", "6"])
    got = [train.lr_at(e, args) for e in range(6)]
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert got == pytest.approx(want, abs=1e-15)
    assert got[3] == pytest.approx(0.8535533905932737, abs=1e-15)
    args = train.get_args_parser().parse_args(["--warmup_epochs", "0", "--epochs", "4"])
    assert [train.lr_at(e, args) for e in range(4)] == pytest.approx([1.0, 0.8535533905932737, 0.5,
                                                                      0.14644660940672627], abs=1e-15)


def test_resume_across_the_warm_up_boundary_keeps_the_lr(tmp_path, monkeypatch, capsys):
    """--warmup_epochs 2 --epochs 4 in one go (train.main in-process, --dummy data), its
    <run>_last.pth as it was after epoch 1 (the end of warm-up) kept aside, as if the run had
    been killed then; --resume from that file with the same flags: the JSON lines' train/lr
    of the resumed epochs 2 and 3 equal the uninterrupted run's, which are base lr x lr_at."""
    import shutil
    argv = ["--dummy", "--arch", "resnet18", "--img_h", "32", "--img_w", "16", "--num_stripe", "2",
            "--gpu", "cpu", "--workers", "0", "--batch-size", "2", "--iters_per_epoch", "1",
            "--warmup_epochs", "2", "--epochs", "4", "--lr", "0.1", "--print_freq", "100", "--no-diag",
            "--no-pcc", "--seed", "1"]
    kept = tmp_path / "killed_after_epoch_1_last.pth"
    save_last = checkpoint.save_last

    def keep(path, stage, net, optimizer, scaler, epoch, *a, **kw):
        out = save_last(path, stage, net, optimizer, scaler, epoch, *a, **kw)
        if epoch == 1:
            shutil.copy(path, kept)
        return out

    monkeypatch.setattr(checkpoint, "save_last", keep)

    def run(folder, *extra):
        args = train.get_args_parser().parse_args([*argv, "--model_path", str(folder / "sm"), "--log_path",
                                                   str(folder / "log"), "--vis_log_path", str(folder / "vis"),
                                                   *extra])
        train.main(args)
        return logger.read_jsonl(next((folder / "log").glob("*.jsonl")))

    full = run(tmp_path / "full")
    assert kept.is_file()
    resumed = run(tmp_path / "resumed", "--resume", str(kept))
    assert "continuing at epoch 2" in capsys.readouterr().out
    assert [r["epoch"] for r in full] == [0, 1, 2, 3] and [r["epoch"] for r in resumed] == [2, 3]
    args = train.get_args_parser().parse_args(["--warmup_epochs", "2", "--epochs", "4"])
    want = [0.1 * train.lr_at(e, args) for e in range(4)]
    assert want == pytest.approx([0.05, 0.1, 0.1, 0.05], abs=1e-12)
    assert [r["train/lr"] for r in full] == pytest.approx(want, abs=1e-12)
    assert [r["train/lr"] for r in resumed] == pytest.approx(want[2:], abs=1e-12)


# ----------------------------------------------------------------------------- C4: one-stream stems
def test_one_stream_network_loads_the_visible_stem():
    """A two-stream checkpoint whose stems differ, into a one-stream network (its single stem
    is both visible_module.visible and thermal_module.thermal): every stem tensor now holds
    the checkpoint's VISIBLE values (not the thermal ones), the body is loaded, and the
    warning names the visible stem. Stems that are equal: no warning."""
    torch.manual_seed(0)
    src = model.MMGLNet("resnet18", "two")
    with torch.no_grad():   # BN affine and statistics differ too, so every stem tensor is checked
        for i, stem in enumerate((src.visible_module.visible, src.thermal_module.thermal)):
            stem.bn1.weight.add_(0.5 * i)
            stem.bn1.bias.add_(0.25 * i)
            stem.bn1.running_mean.normal_()
            stem.bn1.running_var.uniform_(0.5 + i, 1.5 + i)
    sd = src.state_dict()
    stem_keys = [k[len("visible_module.visible."):] for k in sd if k.startswith("visible_module.visible.")]
    floats = [k for k in stem_keys if sd[f"visible_module.visible.{k}"].dtype.is_floating_point]
    assert len(floats) == 5   # conv1.weight, bn1 weight/bias/running_mean/running_var
    assert all(not torch.equal(sd[f"visible_module.visible.{k}"], sd[f"thermal_module.thermal.{k}"])
               for k in floats)

    net = model.TwoStreamBackbone("resnet18", "one")
    logs = []
    report = model.load_backbone(net, sd, log=logs.append)
    assert not report["missing_backbone"]
    own = net.state_dict()
    for k in stem_keys:
        assert torch.equal(own[f"visible_module.visible.{k}"], sd[f"visible_module.visible.{k}"]), k
        assert torch.equal(own[f"thermal_module.thermal.{k}"], sd[f"visible_module.visible.{k}"]), k
    for k in net.backbone_keys():
        if k.startswith("base_resnet."):
            assert torch.equal(own[k], sd[k]), k
    warnings = [x for x in logs if x.startswith("warning:")]
    assert len(warnings) == 1 and "stems differ; the visible stem was loaded" in warnings[0], logs
    # the shared stem computes what the checkpoint's visible stem computes, for both inputs
    x = torch.randn(2, 3, 32, 16)
    net.eval(), src.eval()
    with torch.no_grad():
        want = src.visible_module(x)
        assert torch.equal(net.stem(x, x, modal=1), want) and torch.equal(net.stem(x, x, modal=2), want)
    # equal stems: loaded, no warning
    same = dict(sd)
    same.update({f"thermal_module.thermal.{k}": sd[f"visible_module.visible.{k}"] for k in stem_keys})
    logs.clear()
    model.load_backbone(model.TwoStreamBackbone("resnet18", "one"), same, log=logs.append)
    assert not [x for x in logs if x.startswith("warning:")], logs
