"""The PCC readings added to find out why PCC blocked the permutation task (mutual-NN
positives, the MLP projection head, the separate local branch, the weight schedule) and
the diagnostics that measure it (stripe probes, gradient cosine)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_H, SMALL_W

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diagnostics  # noqa: E402
from loss import pcc_loss  # noqa: E402
from model import load_backbone  # noqa: E402
from model import MMGLNet, TwoStreamBackbone  # noqa: E402


# ----------------------------------------------------------------------------- probes
def test_stripe_probe_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    n, k, d = 120, 6, 32
    labels = np.stack([rng.permutation(k) for _ in range(n)])
    groups = np.repeat(np.arange(30), 4)
    code = rng.normal(size=(k, d))
    feats = code[labels] + 0.3 * rng.normal(size=(n, k, d))
    assert diagnostics.stripe_probe(feats, labels, groups) > 0.95
    noise = rng.normal(size=(n, k, d))
    assert diagnostics.stripe_probe(noise, labels, groups) < 0.35   # chance 1/6
    assert diagnostics.stripe_probe(feats, labels, np.zeros(n)) is None   # one identity: no split


def test_stripe_probe_splits_by_identity():
    """Features that only name the identity (and, per identity, a fixed shuffle) are
    memorised by a probe that sees that identity, but an identity split cannot use them."""
    rng = np.random.default_rng(1)
    n_id, per, k = 20, 6, 6
    groups = np.repeat(np.arange(n_id), per)
    id_perm = np.stack([rng.permutation(k) for _ in range(n_id)])
    labels = id_perm[groups]
    id_code = rng.normal(size=(n_id, 16))
    feats = np.repeat(id_code[groups][:, None, :], k, 1) + np.eye(k)[None, :, :].repeat(16 // k + 1, 2)[..., :16]
    assert diagnostics.stripe_probe(feats, labels, groups) < 0.45


def test_identity_groups_from_folders():
    paths = ["/d/cam3/0007/0001.jpg", "/d/cam6/0007/0002.jpg", "/d/cam1/0011/0001.jpg"]
    assert list(diagnostics.identity_groups(paths)) == ["0007", "0007", "0011"]


def test_grad_cosine_signs_and_norms():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a = (w * torch.tensor([1.0, 0.0])).sum()
    cos, na, nb = diagnostics.grad_cosine(a, 2 * a, [w])
    assert cos == pytest.approx(1.0) and na == pytest.approx(1.0) and nb == pytest.approx(2.0)
    cos, _, _ = diagnostics.grad_cosine(a, -a, [w])
    assert cos == pytest.approx(-1.0)
    cos, _, _ = diagnostics.grad_cosine(a, (w * torch.tensor([0.0, 3.0])).sum(), [w])
    assert cos == pytest.approx(0.0)
    other = torch.nn.Parameter(torch.ones(1))
    assert diagnostics.grad_cosine(a, (other * 2).sum(), [w]) == (0.0, pytest.approx(1.0), 0.0)


# ----------------------------------------------------------------------------- mutual-NN PCC
def test_pcc_mutual_hand_case():
    """Two RGB and two IR images, K=1: RGB0 <-> IR1 and RGB1 <-> IR0 are mutual nearest
    neighbours, so each RGB stripe's positive is that IR stripe, against the other IR stripe."""
    e = torch.eye(4)
    rgb = torch.stack([e[0], e[1]])[:, None]
    ir = F.normalize(torch.stack([e[1] + 0.1 * e[2], e[0] + 0.1 * e[3]]), dim=-1)[:, None]
    t = 0.5
    sim = rgb[:, 0] @ ir[:, 0].t()
    want_rgb = F.cross_entropy(sim / t, torch.tensor([1, 0]))
    want_ir = F.cross_entropy(sim.t() / t, torch.tensor([1, 0]))
    assert pcc_loss(rgb, ir, t, form="mutual").item() == pytest.approx(0.5 * (want_rgb + want_ir).item(), rel=1e-5)


def test_pcc_mutual_only_cycle_consistent_queries_count():
    """RGB0 and RGB1 both find IR0 nearest; IR0 finds RGB0 back, so RGB1 has no positive and
    contributes nothing; with no mutual pair at all the loss is exactly 0."""
    rgb = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.3]]), dim=-1)[:, None]
    ir = F.normalize(torch.tensor([[1.0, 0.05], [-1.0, 0.2]]), dim=-1)[:, None]
    t = 0.2
    sim = rgb[:, 0] @ ir[:, 0].t()
    rgb_term = F.cross_entropy(sim[:1] / t, torch.tensor([0]))          # only RGB0 is matched back
    # IR0 -> RGB0 and RGB0 -> IR0: mutual; IR1 -> RGB1 (nearer of two), RGB1 -> IR0: not
    ir_term = F.cross_entropy(sim.t()[:1] / t, torch.tensor([0]))
    assert pcc_loss(rgb, ir, t, form="mutual").item() == pytest.approx(0.5 * (rgb_term + ir_term).item(), rel=1e-5)


def test_pcc_mutual_part_matches_within_the_part_but_contrasts_all():
    """pool='part': the positive of stripe k is searched among stripes k of the other
    modality, while every stripe of the other modality is a negative; gradients flow."""
    torch.manual_seed(0)
    rgb = F.normalize(torch.randn(3, 4, 8), dim=-1).requires_grad_()
    ir = F.normalize(torch.randn(5, 4, 8), dim=-1).requires_grad_()
    loss = pcc_loss(rgb, ir, 0.1, form="mutual", pool="part")
    loss.backward()
    assert rgb.grad.abs().sum() > 0 and ir.grad.abs().sum() > 0
    # reference: the same loss written out for the RGB queries, hard matches by loops
    q, o = rgb.detach().reshape(-1, 8), ir.detach().reshape(-1, 8)
    terms = []
    for i in range(len(q)):
        k = i % 4
        cand = [j for j in range(len(o)) if j % 4 == k]
        v = max(cand, key=lambda j: float(q[i] @ o[j]))
        back = max((r for r in range(len(q)) if r % 4 == k), key=lambda r: float(o[v] @ q[r]))
        if back == i:
            terms.append(F.cross_entropy((q[i] @ o.t())[None] / 0.1, torch.tensor([v])))
    from loss import _mutual_nce
    assert _mutual_nce(rgb.detach(), rgb.detach(), ir.detach(), 0.1, pool="part").item() == \
        pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------- network readings
def test_mlp_head_and_separate_branch_keys_shapes_and_gradients():
    torch.manual_seed(0)
    net = MMGLNet("resnet18", "two", num_stripe=6, pcc_head="mlp", local_branch="separate")
    heads = [k for k in net.state_dict() if not k.startswith(TwoStreamBackbone.BACKBONE_PREFIXES)]
    assert all(k.startswith(MMGLNet.HEAD_PREFIXES) for k in heads)
    assert any(k.startswith("pcc_mlp.") for k in heads) and any(k.startswith("local_layer4.") for k in heads)
    x = torch.randn(4, 3, SMALL_H, SMALL_W)
    out = net(x, x, features=True)
    assert out["stripes"].shape == (8, 6, 128) and out["stripe_pool"].shape == (8, 6, 512)
    assert torch.allclose(out["stripes"].norm(dim=-1), torch.ones(8, 6))
    # PCC's gradient reaches its own layer4 copy and layer3, never the shared layer4
    out["stripes"].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.base_resnet.base.layer4.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.local_layer4.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.base_resnet.base.layer3.parameters())
    # the fine-tuning backbone takes the shared layer4, not the stripe branch's copy
    back = TwoStreamBackbone("resnet18", "two")
    load_backbone(back, net.state_dict(), log=lambda *a: None)
    sd = net.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_held_out_evaluation_counts_the_heads_live_units():
    """val/head_alive: the share of the head's hidden units that fire for at least one
    held-out image; a head whose units are all off for every image outputs one matrix."""
    from types import SimpleNamespace
    from data_loader import DeviceAugment
    from train import evaluate_perm, parse_args
    torch.manual_seed(0)
    net = MMGLNet("resnet18", "two", num_stripe=6)
    rng = np.random.default_rng(0)
    n = 8
    imgs = lambda: rng.integers(0, 255, (n, SMALL_H, SMALL_W, 3), dtype=np.uint8)   # noqa: E731
    perms = lambda: np.stack([rng.permutation(6) for _ in range(n)])                 # noqa: E731
    paths = lambda cam: [f"{cam}/{i % 4:04d}/{i}.jpg" for i in range(n)]             # noqa: E731
    held = SimpleNamespace(rgb=imgs(), ir=imgs(), rgb_perms=perms(), ir_perms=perms(), sources=[("sysu", None)],
                           rgb_paths=paths("cam1"), ir_paths=paths("cam3"))
    args = parse_args(["--num_stripe", "6"])
    aug = DeviceAugment(SMALL_H, SMALL_W, device=torch.device("cpu"))
    live = evaluate_perm(net, held, aug, args, torch.device("cpu"), None)["head_alive"]
    assert 0.2 < live <= 1
    with torch.no_grad():
        net.fc1.bias[:512] = -1e4   # half the units can never fire
    half = evaluate_perm(net, held, aug, args, torch.device("cpu"), None)["head_alive"]
    assert half == pytest.approx(live / 2, abs=0.1)
    with torch.no_grad():
        net.fc1.bias[:] = -1e4
    assert evaluate_perm(net, held, aug, args, torch.device("cpu"), None)["head_alive"] == 0


def test_pcc_weight_schedule():
    from train import get_args_parser, parse_args, pcc_start, pcc_weight
    p = get_args_parser()
    a = p.parse_args(["--pcc_start_acc", "0", "--pcc_start_epoch", "3", "--pcc_ramp_epochs", "4",
                      "--perm_reduction", "mean"])
    assert [pcc_weight(e, a, pcc_start(a)) for e in range(8)] == [0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5]
    d = parse_args(["--pcc_reading", "mutual"])   # on once the stripe accuracy is 2x chance
    assert pcc_start(d) is None and [pcc_weight(e, d, None) for e in range(3)] == [0, 0, 0]  # waits
    assert [pcc_weight(e, d, 1) for e in range(3)] == [0, 0.5, 0.5]
    assert pcc_start(parse_args(["--pcc_reading", "figure"])) == 0   # PCC from the first step
    assert pcc_start(p.parse_args(["--val_images", "0"])) == 0 and pcc_start(p.parse_args(["--no-pcc"])) == 0


# ----------------------------------------------------------------------------- end to end
def test_diagnostics_reach_the_json_lines(sysu_small, tmp_path):
    from test_pretrain import TINY, run_train
    # shuffled: the PCC embedding probe runs too
    res = run_train(tmp_path, "--data_path", str(sysu_small), *TINY, "--epochs", "2", "--iters_per_epoch", "2",
                    "--perm_feat", "stripes", "--pcc_head", "mlp", "--pcc_start_acc", "0.5", "--val_images", "40",
                    "--diag", "--pcc_reading", "mutual", "--pcc_order", "shuffled")
    log = [json.loads(x) for x in next((tmp_path / "log").glob("*.jsonl")).read_text().splitlines()]
    assert [r["train/pcc_weight"] for r in log] == [0.0, 0.5]
    for r in log:
        assert 0 <= r["val/probe_backbone"] <= 1 and 0 <= r["val/probe_pcc"] <= 1 and 0 < r["val/head_alive"] <= 1
        assert -1 <= r["train/grad_cos_layer4"] <= 1 and r["train/grad_norm_perm_layer4"] > 0 and r["train/grad_norm_pcc_layer3"] > 0
    assert "stripe probe backbone" in res.stdout and "head units alive" in res.stdout and "grad cos(perm, pcc)" in res.stdout
    # the switch: any stripe accuracy passes 0.5 x chance, so PCC is on from epoch 1, said once
    assert res.stdout.count("PCC on from epoch 1: held-out stripe accuracy") == 1
    assert "_pcc_shuffled_mlp_startacc0.5" in next((tmp_path / "log").glob("*.jsonl")).name
    # a resumed run keeps the switch (it is in _last.pth), with no second announcement
    last = next((tmp_path / "sm").glob("*_last.pth"))
    obj = torch.load(last, weights_only=False)
    assert obj["state"]["pcc_from"] == 1
    assert "permutation head's hidden units fire" not in res.stdout
    obj["net"]["fc1.bias"].fill_(-1e4)   # every hidden unit of the head off for any image
    torch.save(obj, last)
    res = run_train(tmp_path, "--data_path", str(sysu_small), *TINY, "--epochs", "3", "--iters_per_epoch", "2",
                    "--perm_feat", "stripes", "--pcc_head", "mlp", "--pcc_start_acc", "0.5", "--val_images", "40",
                    "--diag", "--pcc_reading", "mutual", "--pcc_order", "shuffled", "--resume", str(last),
                    "--resume_anyway")   # a third epoch
    log = [json.loads(x) for x in next((tmp_path / "log").glob("*.jsonl")).read_text().splitlines()]
    assert log[-1]["train/pcc_weight"] == 0.5 and "PCC on from" not in res.stdout
    assert log[-1]["val/head_alive"] == 0
    assert res.stdout.count("warning: only 0% of the permutation head's hidden units fire") == 1


def test_resume_under_another_pcc_reading_is_one_error_line(sysu_small, tmp_path):
    from test_pretrain import TINY, run_train
    # a run begun under --pcc_reading figure, continued under the default (mutual): refused,
    # naming the flags; continued with its own reading: fine
    old = ["--data_path", str(sysu_small), *TINY, "--iters_per_epoch", "1", "--val_images", "0"]
    run_train(tmp_path, *old, "--epochs", "1", "--pcc_reading", "figure")
    last = next((tmp_path / "sm").glob("*_last.pth"))
    res = run_train(tmp_path, *old, "--epochs", "2", "--resume", str(last), check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "(--pcc_form pair -> mutual" in err[0] and "--perm_reduction matrix_scaled -> mean" \
        in err[0], err
    assert res.stdout == ""   # refused before the run header and before any data is read
    res = run_train(tmp_path, *old, "--epochs", "2", "--pcc_reading", "figure", "--resume", str(last),
                    "--resume_anyway")   # --epochs 1 -> 2 only
    assert "Epoch 1 done" in res.stdout, res.stdout[-2000:]
    # a text file given as --resume: the same, before any work
    notes = tmp_path / "notes.t"
    notes.write_text("not a checkpoint")
    res = run_train(tmp_path, "--data_path", str(tmp_path / "nowhere"), *TINY, "--resume", str(notes),
                    "--trust-checkpoint", check=False)
    assert res.returncode == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "not a PyTorch checkpoint" in res.stderr


def test_a_dead_permutation_head_is_said():
    from train import dead_head, parse_args
    plain, bn = parse_args([]), parse_args(["--perm_bn"])
    assert dead_head({}, plain) is None and dead_head({"head_alive": 0.79}, plain) is None
    msg = dead_head({"head_alive": 0.09}, plain)
    assert msg.startswith("only 9% of the permutation head's hidden units fire") and "--perm_bn" in msg
    assert "--perm_bn" not in dead_head({"head_alive": 0.0}, bn)


def test_resnet50_runs_are_told_the_flags_it_needed(tmp_path, capsys):
    from train import parse_args, resnet50_advice
    default = resnet50_advice(parse_args([]))   # the authors' command: ResNet-50, PCC at 0.5
    assert default.startswith("--arch resnet50: ") and "only with --perm_bn and a PCC weight <= 0.1;" in default
    assert "only with --perm_bn;" in resnet50_advice(parse_args(["--no-pcc"]))
    assert "only with a PCC weight <= 0.1;" in resnet50_advice(parse_args(["--perm_bn"]))
    assert resnet50_advice(parse_args(["--perm_bn", "--cl_weight", "0.1"])) is None
    figure = ["--pcc_reading", "figure", "--perm_bn"]   # PCC at 0.5 / 36 against the mean MSE
    assert resnet50_advice(parse_args(figure)) is None
    assert "a PCC weight" in resnet50_advice(parse_args([*figure, "--cl_weight", "4"]))   # 4 / 36 > 0.1
    assert resnet50_advice(parse_args(["--arch", "resnet18"])) is None
    # and a ResNet-50 run prints it with its header, once
    import train
    argv = ["--dummy", "--img_h", "32", "--img_w", "16", "--num_stripe", "2", "--gpu", "cpu", "--workers", "0",
            "--batch-size", "2", "--iters_per_epoch", "1", "--epochs", "1", "--print_freq", "100", "--no-diag",
            "--model_path", str(tmp_path / "sm"), "--log_path", str(tmp_path / "log"),
            "--vis_log_path", str(tmp_path / "vis")]
    train.main(train.parse_args(argv))
    out = capsys.readouterr().out
    assert out.count("warning: --arch resnet50: ") == 1 and out.index("warning: --arch resnet50") < out.index("Epoch")
