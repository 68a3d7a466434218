"""Every user-facing flag below changes what it must change (each test FAILS if its flag is
ignored), and --amp runs on the CPU (bf16 autocast) in pre-training, AGW and DDAG.

Pre-training (train.py): --sinkhorn_temp, --sinkhorn_iters, --gumbel_samples, --gumbel_noise,
--perm_reduction matrix, --cl_weight, --cl_temp (train.mmgl_losses on one fixed fake batch,
the flag at its default against a changed value, the same Gumbel seed), --perm_bn,
--pretrained, --compile, --sync_bn, --amp (train.main in-process, torch.compile and
utils.wrap_ddp spied on, the network captured as it is built). Fine-tuning: --pretrained and
--stream one (the scripts' builders; the checkpoints their runs write), --rerank_k1/k2/lambda
(engine_finetune.evaluate's re-ranked distances), --milestones (the lr schedule), --margin
(AGW --method base and DDAG: the batch-hard triplet term), --compile/--sync_bn/--amp (AGW's
main in-process, spied on). --amp end to end: one tiny subprocess run of each trainer with
--amp --gpu cpu (the header says bf16 autocast, every logged loss is finite).

Everything runs on a tiny synthetic SYSU-MM01 at 48x24 (ResNet-18, one thread in the script
runs): the whole file takes well under a minute on one core.
"""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the root's train.py first: AGW/ holds a train.py too (its folder is only ever APPENDED to
# sys.path below, so it never shadows a root module)
import train  # noqa: E402
import checkpoint  # noqa: E402
import engine_finetune as engine  # noqa: E402
import logger  # noqa: E402
import model  # noqa: E402
import rerank  # noqa: E402
import utils  # noqa: E402
from cli import UserError  # noqa: E402
from conftest import output_args, run_script  # noqa: E402

assert Path(train.__file__).resolve() == ROOT / "train.py", f"imported {train.__file__} as the pre-training script"

H, W = 48, 24            # tiny images: 6 stripes of 8 rows; a 3x2 map at the end of ResNet-18
K = 6                    # --num_stripe's default
TINY = ["--arch", "resnet18", "--img_h", str(H), "--img_w", str(W), "--workers", "0", "--gpu", "cpu"]


# ----------------------------------------------------------------------------- fixtures, helpers
@pytest.fixture(scope="module")
def tiny_sysu(tmp_path_factory):
    """A synthetic SYSU-MM01 of 10 identities (7 training, 3 test; about 26 RGB and 12 IR
    training images), preprocessed at 48x24: a fine-tuning epoch of --batch-size 2 x
    --num_pos 4 is 4 steps, its test 4 queries against 8 gallery images per trial."""
    from pre_process_sysu import preprocess_sysu
    from tools.make_synthetic import make_sysu
    root = tmp_path_factory.mktemp("flags_sysu") / "SYSU-MM01"
    make_sysu(root, num_ids=10, seed=0, imgs_per_cam=(1, 2), cam_prob=0.5)
    preprocess_sysu(root, img_h=H, img_w=W, verbose=False)
    return root


@pytest.fixture(scope="module")
def imagenet_r18(tmp_path_factory):
    """A torchvision-format ResNet-18 state_dict (model.ResNet's key names, fc included),
    saved as --pretrained takes it. Its values come from their own seed, and the BN tensors
    are moved off their initial 1/0, so no network built by a script can hold them by chance."""
    torch.manual_seed(1234)
    sd = model.ResNet("resnet18").state_dict()
    g = torch.Generator().manual_seed(4321)
    for k, t in sd.items():
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g)
        if k.endswith("running_var"):
            t.copy_(1.0 + 0.2 * noise.abs())
        elif ".bn" in k or k.startswith("bn") or ".downsample.1." in k:
            t.add_(0.1 * noise)
    path = tmp_path_factory.mktemp("imagenet") / "resnet18_imagenet.pth"
    torch.save(sd, path)
    return path, sd


def backbone_targets(src):
    """{our backbone key: the torchvision tensor it must hold after load_imagenet}:
    conv1/bn1 -> both stems, layerX -> the shared body, fc dropped."""
    want = {}
    for k, v in src.items():
        if k.startswith("fc."):
            continue
        if k.startswith(("conv1.", "bn1.")):
            want[f"visible_module.visible.{k}"] = v
            want[f"thermal_module.thermal.{k}"] = v
        else:
            want[f"base_resnet.base.{k}"] = v
    return want


def n_imagenet(src):
    return sum(not k.startswith("fc.") for k in src)


def assert_holds_imagenet(state, src):
    for k, v in backbone_targets(src).items():
        assert torch.equal(state[k].cpu(), v), f"{k} does not hold the --pretrained tensor"


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def assert_started_from_imagenet(state, src):
    """A few training steps at lr <= 0.01 leave the conv weights near where --pretrained put
    them (cosine 0.9 or more; AGW's first conv moves most); a network that started from its
    own random weights is unrelated to the file (cosine ~0, |cos| < 0.05 at these sizes)."""
    for ours, theirs in (("visible_module.visible.conv1.weight", "conv1.weight"),
                         ("thermal_module.thermal.conv1.weight", "conv1.weight"),
                         ("base_resnet.base.layer2.0.conv1.weight", "layer2.0.conv1.weight"),
                         ("base_resnet.base.layer4.1.conv2.weight", "layer4.1.conv2.weight")):
        c = cosine(state[ours], src[theirs])
        assert c > 0.5, f"{ours}: cosine {c:.3f} to the --pretrained tensor"


_SCRIPTS = {}


def script_module(rel):
    """AGW/train.py or DDAG/train_ddag.py as a module (its folder appended to sys.path for
    model_agw / model_ddag). Loaded lazily, inside a test: DDAG's script imports its test
    script by the name ``test_ddag``, which tests/test_ddag.py holds too when it was collected;
    when it was not, DDAG's own test script is put under that name first."""
    if rel in _SCRIPTS:
        return _SCRIPTS[rel]
    path = ROOT / rel
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    if path.parent.name == "DDAG" and "test_ddag" not in sys.modules:
        _load("test_ddag", path.parent / "test_ddag.py")
    _SCRIPTS[rel] = _load("flags_" + rel.replace("/", "_").removesuffix(".py"), path)
    return _SCRIPTS[rel]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def agw():
    return script_module("AGW/train.py")


def ddag():
    return script_module("DDAG/train_ddag.py")


class SpyCompiled(nn.Module):
    """What the monkeypatched torch.compile returns: the module it was given, counting its
    calls and recording the autocast state each call runs under."""

    def __init__(self, mod):
        super().__init__()
        self._orig_mod = mod          # utils.unwrap follows it, as it does torch.compile's
        self.calls, self.autocast = 0, set()

    def forward(self, *a, **kw):
        self.calls += 1
        self.autocast.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return self._orig_mod(*a, **kw)


@pytest.fixture
def spies(monkeypatch):
    """torch.compile replaced by SpyCompiled (compiling on this CPU would take minutes) and
    utils.wrap_ddp wrapped to record the sync_bn it is given."""
    seen = {"compiled": [], "sync_bn": []}

    def fake_compile(mod, *a, **kw):
        seen["compiled"].append(SpyCompiled(mod))
        return seen["compiled"][-1]

    real_wrap = utils.wrap_ddp

    def wrap_ddp(net, device, sync_bn=False):
        seen["sync_bn"].append(sync_bn)
        seen.setdefault("wrapped_state", []).append({k: v.clone() for k, v in net.state_dict().items()})
        return real_wrap(net, device, sync_bn)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(utils, "wrap_ddp", wrap_ddp)
    return seen


# ----------------------------------------------------------------------------- pre-training losses
def fake_batch(b=4, d=16):
    """One fixed batch of what MMGLNet returns ('perm_logits' [2B, K, K], RGB rows first;
    'stripes' [2B, K, D], L2-normalised, each IR stripe close to its RGB stripe so the mutual
    PCC reading finds its matches) and the batch's permutations [B, K]."""
    g = torch.Generator().manual_seed(7)
    z_rgb = F.normalize(torch.randn(b, K, d, generator=g), dim=-1)
    z_ir = F.normalize(z_rgb + 0.3 * torch.randn(b, K, d, generator=g), dim=-1)
    out = {"perm_logits": 2.0 * torch.randn(2 * b, K, K, generator=g), "stripes": torch.cat([z_rgb, z_ir])}
    perms = torch.stack([torch.randperm(K, generator=g) for _ in range(b)])
    return out, perms


def pretrain_losses(*flags):
    """train.mmgl_losses with ``flags`` parsed by train.py's parser, the Gumbel noise seeded
    alike for every call (it is drawn from the global generator)."""
    args = train.get_args_parser().parse_args(list(flags))
    out, perms = fake_batch()
    torch.manual_seed(0)
    return {k: v.item() for k, v in train.mmgl_losses(out, perms, args).items()}, args


def test_pretrain_fake_batch_is_deterministic():
    """The comparisons below are meaningful: the same flags give the same losses bit for bit,
    and PCC is on and not trivially zero by default."""
    a, _ = pretrain_losses()
    b, _ = pretrain_losses()
    assert a == b
    assert a["pcc"] > 0 and math.isfinite(a["loss"])


@pytest.mark.parametrize("flag,value", [("--sinkhorn_temp", "0.3"), ("--sinkhorn_iters", "1"),
                                        ("--gumbel_samples", "3"), ("--gumbel_noise", "0.5"),
                                        ("--gumbel_noise", "0")])
def test_permutation_flags_change_the_permutation_loss(flag, value):
    base, _ = pretrain_losses()
    changed, args = pretrain_losses(flag, value)
    for m in ("perm_rgb", "perm_ir"):
        assert abs(changed[m] - base[m]) > 1e-6 * base[m], f"{flag} {value} left {m} unchanged"
    assert changed["pcc"] == base["pcc"]    # only the permutation term depends on it


def test_sinkhorn_flags_reach_the_held_out_decoding():
    """--sinkhorn_iters/--sinkhorn_temp also decode the held-out and training-batch accuracy
    (loss.perm_accuracy via evaluate_perm's args): the noise-free Sinkhorn they give differs."""
    from loss import gumbel_sinkhorn
    out, _ = fake_batch()
    soft = {}
    for flags in ([], ["--sinkhorn_iters", "1"], ["--sinkhorn_temp", "0.3"]):
        args = train.get_args_parser().parse_args(flags)
        soft[tuple(flags)] = gumbel_sinkhorn(out["perm_logits"], args.sinkhorn_iters, args.sinkhorn_temp,
                                             training=False)
    assert not torch.allclose(soft[()], soft[("--sinkhorn_iters", "1")])
    assert not torch.allclose(soft[()], soft[("--sinkhorn_temp", "0.3")])


def test_perm_reduction_matrix_is_k_squared_times_the_mean():
    mean, _ = pretrain_losses()
    matrix, _ = pretrain_losses("--perm_reduction", "matrix")
    for m in ("perm_rgb", "perm_ir"):
        assert matrix[m] == pytest.approx(K * K * mean[m], rel=1e-5)
    assert matrix["pcc"] == mean["pcc"]


def test_cl_weight_scales_the_pcc_term_exactly():
    mean = ["--perm_reduction", "mean"]   # PCC weighted --cl_weight itself
    base, args0 = pretrain_losses(*mean)
    heavy, args = pretrain_losses(*mean, "--cl_weight", "2.0")
    assert heavy["pcc"] == base["pcc"]
    assert heavy["loss"] - base["loss"] == pytest.approx((2.0 - args0.cl_weight) * base["pcc"], rel=1e-5)
    assert heavy["loss"] == pytest.approx(heavy["perm_rgb"] + heavy["perm_ir"] + 2.0 * heavy["pcc"], rel=1e-6)
    # and the weight a training epoch uses once PCC is on (train_one_epoch's pcc_weight)
    assert train.pcc_weight(3, args, pcc_from=0) == 2.0
    assert train.pcc_weight(3, args0, pcc_from=0) == args0.cl_weight


def test_perm_reduction_matrix_scaled_is_the_matrix_loss_over_k_squared():
    """--pcc_reading figure's: the loss of --perm_reduction matrix (MSE summed per K x K matrix
    + cl_weight x PCC) divided by K*K, i.e. the mean MSE with PCC at cl_weight / K*K, in the
    loss a step takes and in the weight an epoch logs."""
    scaled, args = pretrain_losses("--perm_reduction", "matrix_scaled")
    assert args.perm_reduction == "matrix_scaled" and args.cl_weight == 0.5
    matrix, _ = pretrain_losses("--perm_reduction", "matrix")
    mean, _ = pretrain_losses("--perm_reduction", "mean")
    assert scaled["loss"] * K * K == pytest.approx(matrix["loss"], rel=1e-5)
    assert scaled["perm_rgb"] == mean["perm_rgb"] and scaled["pcc"] == mean["pcc"]
    assert train.pcc_weight(3, args, pcc_from=0) == pytest.approx(0.5 / 36)


def test_no_pcc_has_no_pcc_weight():
    """--no-pcc: PCC's weight is 0 in every epoch (its logs said 0.5 before)."""
    args = train.get_args_parser().parse_args(["--no-pcc"])
    assert [train.pcc_weight(e, args, pcc_from=0) for e in range(3)] == [0.0, 0.0, 0.0]


def test_pcc_reading_sets_a_whole_reading_and_single_flags_win():
    first = train.parse_args(["--pcc_reading", "first"])
    assert {k: getattr(first, k) for k in train.PCC_READINGS["first"]} == train.PCC_READINGS["first"]
    default = train.parse_args([])
    assert default.pcc_reading == "mutual" and default.pcc_form == "mutual" and default.pcc_start_acc == 2
    for name, reading in train.PCC_READINGS.items():
        args = train.parse_args(["--pcc_reading", name])
        assert {k: getattr(args, k) for k in reading} == reading
    assert train.parse_args(["--pcc_reading", "figure"]).perm_reduction == "matrix_scaled"
    mixed = train.parse_args(["--pcc_reading", "first", "--pcc_form", "mutual"])
    assert mixed.pcc_form == "mutual" and mixed.pcc_pool == "all"
    with pytest.raises(UserError, match="--pcc_reading must be one of"):
        train.parse_args(["--pcc_reading", "third"])


def test_cl_temp_changes_the_pcc_loss():
    base, _ = pretrain_losses()
    hot, _ = pretrain_losses("--cl_temp", "0.5")
    assert abs(hot["pcc"] - base["pcc"]) > 1e-4
    assert hot["perm_rgb"] == base["perm_rgb"]


# ----------------------------------------------------------------------------- pre-training run
def test_pretrain_run_perm_bn_pretrained_compile_sync_bn_amp(tiny_sysu, imagenet_r18, tmp_path, spies,
                                                            monkeypatch, capsys):
    """train.main in-process, 2 steps: --perm_bn builds the BatchNorm1d (and the checkpoint
    has it), --pretrained's tensors are in the network before it trains, --compile's module is
    the one that trains, under bf16 autocast (--amp), and --sync_bn reaches utils.wrap_ddp."""
    path, src = imagenet_r18
    built = []

    class Captured(model.MMGLNet):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append((self, {k: v.clone() for k, v in self.state_dict().items()}))

    monkeypatch.setattr(train, "MMGLNet", Captured)
    args = train.get_args_parser().parse_args(
        ["--dataset", "sysu", "--data_path", str(tiny_sysu), *TINY, "--epochs", "1", "--iters_per_epoch", "2",
         "--batch-size", "4", "--val_images", "0", "--no-diag", "--print_freq", "1",
         "--perm_bn", "--pretrained", str(path), "--compile", "--sync_bn", "--amp",
         *map(str, output_args(tmp_path))])
    train.main(args)
    printed = capsys.readouterr().out
    assert "| bf16 autocast |" in printed
    assert f"loaded {n_imagenet(src)} ImageNet tensors (resnet18)" in printed
    (net, _), = built
    assert isinstance(net.perm_bn, nn.BatchNorm1d)
    assert_holds_imagenet(spies["wrapped_state"][0], src)   # as it went into training
    (compiled,) = spies["compiled"]
    assert utils.unwrap(compiled) is net
    assert compiled.calls == 2 and compiled.autocast == {torch.bfloat16}
    assert spies["sync_bn"] == [True]
    saved = torch.load(next((tmp_path / "save").glob("*_epoch_1.t")), weights_only=True)
    assert {"perm_bn.weight", "perm_bn.running_mean"} <= set(saved)


def test_perm_bn_off_by_default():
    """The other side of --perm_bn: the network train.main builds without it has none."""
    args = train.get_args_parser().parse_args([])
    assert args.perm_bn is False
    net = model.MMGLNet("resnet18", perm_bn=args.perm_bn)
    assert net.perm_bn is None and not any(k.startswith("perm_bn.") for k in net.state_dict())


# ----------------------------------------------------------------------------- fine-tuning flags
def test_milestones_move_the_lr_steps():
    parse = agw().get_parser().parse_args
    lr = [engine.learning_rate(e, parse(["--warmup_epochs", "0", "--milestones", "3", "5"])) for e in range(7)]
    assert lr == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    default = parse(["--warmup_epochs", "0"])
    assert default.milestones == [20, 50]
    assert [engine.learning_rate(e, default) for e in (3, 5, 20, 50)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    # DDAG's own default (30, 50) and the flag there too
    ddag_args = ddag().get_parser().parse_args(["--warmup_epochs", "0", "--milestones", "2", "4"])
    assert [engine.learning_rate(e, ddag_args) for e in (1, 2, 4)] == pytest.approx([0.1, 0.01, 0.001])


class FixedFeatures(nn.Module):
    """A stand-in network returning fixed L2-normalised features (pairwise distances <= 2) and
    logits, AGW's (feat, logits) or DDAG's (x_pool, logits, None, None)."""

    def __init__(self, n, d=8, classes=3, ddag=False):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.feat = F.normalize(torch.randn(n, d, generator=g), dim=1)
        self.logits = torch.randn(n, classes, generator=g)
        self.ddag = ddag

    def forward(self, x_rgb, x_ir, adj=None):
        return (self.feat, self.logits, None, None) if self.ddag else (self.feat, self.logits)


def _tri_loss(make, parse, flags, ddag_style):
    args = parse(list(flags))
    crit = make(args, {"wG": 0.0}) if ddag_style else make(args)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    net = FixedFeatures(12, ddag=ddag_style)
    _, logs = crit(net, None, None, y, y)
    return logs["tri_loss"].item()


@pytest.mark.parametrize("which", ["agw_base", "ddag"])
def test_margin_sets_the_batch_hard_triplet_margin(which):
    """A margin above every distance (features on the unit sphere: <= 2) keeps every hinge
    active, so the triplet loss grows by exactly the margin's change."""
    if which == "ddag":
        make, parse, pre = ddag().make_criterion, ddag().get_parser().parse_args, []
    else:
        make, parse, pre = agw().make_criterion, agw().get_parser().parse_args, ["--method", "base"]
    t5 = _tri_loss(make, parse, pre + ["--margin", "5"], which == "ddag")
    t6 = _tri_loss(make, parse, pre + ["--margin", "6"], which == "ddag")
    t_default = _tri_loss(make, parse, pre, which == "ddag")
    assert t6 - t5 == pytest.approx(1.0, abs=1e-5)
    assert t_default < t5 - 4.0


class Projection(nn.Module):
    """A stand-in network for evaluate: a fixed random projection of the image pixels."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.register_buffer("w", torch.randn(3 * H * W, 16, generator=g))

    def forward(self, x1, x2, modal):
        x = x1 if modal == 1 else x2
        return F.normalize(x.reshape(len(x), -1).float() @ self.w, dim=1)


def test_rerank_flags_change_the_reranked_distances(tiny_sysu, monkeypatch, capsys):
    """engine_finetune.evaluate with --rerank: each of --rerank_k1/--rerank_k2/--rerank_lambda
    (parsed by AGW's parser) reaches rerank.re_ranking and changes the distances it returns."""
    dists = []
    real = rerank.re_ranking

    def spy(*a, **kw):
        dists[-1].append(real(*a, **kw))
        return dists[-1][-1]

    monkeypatch.setattr(rerank, "re_ranking", spy)
    parse = agw().get_parser().parse_args
    base = ["--dataset", "sysu", "--data_path", str(tiny_sysu), *TINY, "--rerank"]
    testset = engine.TestSet(parse(base))
    net = Projection()
    results = {}
    for extra in ([], ["--rerank_k1", "3"], ["--rerank_k2", "2"], ["--rerank_lambda", "0.8"]):
        dists.append([])
        results[tuple(extra)] = engine.evaluate(net, parse(base + extra), torch.device("cpu"), ("FC",),
                                                testset=testset, per_trial=False)
        assert len(dists[-1]) == len(testset.trials)   # re-ranked once per gallery trial
    printed = capsys.readouterr().out
    assert "k1=3 k2=6 lambda=0.3" in printed and "k1=20 k2=2" in printed and "lambda=0.8" in printed
    default = dists[0]
    for i, name in enumerate(("--rerank_k1", "--rerank_k2", "--rerank_lambda"), 1):
        assert any(not np.allclose(a, b) for a, b in zip(default, dists[i])), f"{name} left the distances alone"


def test_compile_and_sync_bn_reach_prepare_net(spies):
    """engine_finetune.prepare_net (AGW's and DDAG's setup): the training module is
    torch.compile's with --compile and the bare network without; wrap_ddp gets --sync_bn."""
    parse = agw().get_parser().parse_args
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    bare, train_net = engine.prepare_net(net, parse(["--compile", "--sync_bn"]), torch.device("cpu"))
    assert bare is net and isinstance(train_net, SpyCompiled) and train_net._orig_mod is net
    bare, train_net = engine.prepare_net(net, parse([]), torch.device("cpu"))
    assert train_net is net and len(spies["compiled"]) == 1
    assert spies["sync_bn"] == [True, False]


def test_sync_bn_converts_batchnorm_under_ddp(monkeypatch, capsys):
    """utils.wrap_ddp under a (faked) torchrun process group: --sync_bn turns every BatchNorm
    into SyncBatchNorm on CUDA, and on the CPU says it cannot (no process group or GPU here:
    DDP itself is replaced by a recorder, the device only named)."""
    class FakeDDP(nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module, self.device_ids = module, device_ids

    monkeypatch.setattr(utils, "is_distributed", lambda: True)
    monkeypatch.setattr(utils, "is_main_process", lambda: True)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    parse = agw().get_parser().parse_args

    def kinds(flags, device):
        net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        wrapped = utils.wrap_ddp(net, device, parse(flags).sync_bn)
        assert isinstance(wrapped, FakeDDP)
        return {type(m).__name__ for m in wrapped.module.modules()}

    cuda = torch.device("cuda", 0)
    assert "SyncBatchNorm" in kinds(["--sync_bn"], cuda)
    assert "SyncBatchNorm" not in kinds([], cuda) and "BatchNorm2d" in kinds([], cuda)
    assert "SyncBatchNorm" not in kinds(["--sync_bn"], torch.device("cpu"))
    assert "--sync_bn needs CUDA" in capsys.readouterr().out


def test_agw_run_compile_sync_bn_amp(tiny_sysu, tmp_path, spies, capsys):
    """AGW's main in-process: the compiled module trains (every step under bf16 autocast with
    --amp) and --sync_bn reaches wrap_ddp."""
    mod = agw()
    args = mod.get_parser().parse_args(
        ["--dataset", "sysu", "--data_path", str(tiny_sysu), *TINY, "--epochs", "1", "--batch-size", "2",
         "--num_pos", "4", "--print_freq", "100", "--compile", "--sync_bn", "--amp",
         *map(str, output_args(tmp_path))])
    mod.main(args)
    assert "| bf16 autocast |" in capsys.readouterr().out
    (compiled,) = spies["compiled"]
    assert compiled.calls == 4 and compiled.autocast == {torch.bfloat16}   # 4 steps (26 RGB / (2 x 4) + 1)
    assert spies["sync_bn"] == [True]


@pytest.mark.parametrize("rel", ["AGW/train.py", "DDAG/train_ddag.py"])
def test_pretrained_lands_in_the_finetuning_backbone(rel, imagenet_r18, capsys):
    """The scripts' builders with --pretrained: every backbone tensor is the file's."""
    path, src = imagenet_r18
    mod = script_module(rel)
    args = mod.get_parser().parse_args(["--arch", "resnet18", "--pretrained", str(path)])
    net = mod.builder(args)(5)
    assert f"loaded {n_imagenet(src)} ImageNet tensors (resnet18)" in capsys.readouterr().out
    assert_holds_imagenet(net.state_dict(), src)
    plain = mod.builder(mod.get_parser().parse_args(["--arch", "resnet18"]))(5)
    assert not torch.equal(plain.state_dict()["visible_module.visible.conv1.weight"], src["conv1.weight"])


def shares_one_stem(net):
    return net.visible_module.visible is net.thermal_module.thermal


def test_ddag_stream_one_builds_one_shared_stem():
    parse = ddag().get_parser().parse_args
    assert shares_one_stem(ddag().builder(parse(["--arch", "resnet18", "--stream", "one"]))(5))
    assert not shares_one_stem(ddag().builder(parse(["--arch", "resnet18"]))(5))


def test_agw_stream_one_builds_one_shared_stem():
    parse = agw().get_parser().parse_args
    assert shares_one_stem(agw().builder(parse(["--arch", "resnet18", "--stream", "one"]))(5))
    assert not shares_one_stem(agw().builder(parse(["--arch", "resnet18"]))(5))


# ----------------------------------------------------------------------------- --amp, end to end
def finite_losses(log_dir):
    """The one JSON-lines log's records, after checking every logged training value is finite."""
    (jsonl,) = Path(log_dir).glob("*.jsonl")
    records = logger.read_jsonl(jsonl)
    assert records, f"{jsonl} is empty"
    for r in records:
        values = {k: v for k, v in r.items() if k.startswith("train/") and isinstance(v, (int, float))}
        assert "train/loss" in values
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        assert not bad, f"non-finite logged values: {bad}"
    return records


AMP_RUNS = {
    "train.py": ["--epochs", "1", "--iters_per_epoch", "2", "--batch-size", "4", "--val_images", "20"],
    "AGW/train.py": ["--epochs", "1", "--iters_per_epoch", "2", "--batch-size", "2", "--num_pos", "4",
                     "--print_freq", "100"],
    # DDAG with its attention heads and one shared stem (--stream one)
    "DDAG/train_ddag.py": ["--epochs", "1", "--iters_per_epoch", "2", "--batch-size", "2", "--num_pos", "4",
                           "--print_freq", "100",
                           "--wpa", "--graph", "--stream", "one"],
}


@pytest.mark.parametrize("script", list(AMP_RUNS))
def test_amp_runs_on_the_cpu(script, tiny_sysu, imagenet_r18, tmp_path):
    """One short run of each trainer with --amp --gpu cpu (and --pretrained): exit 0, the
    header's precision is bf16 autocast, the ImageNet weights were loaded and are what the
    saved network grew from, every logged loss is finite. DDAG's run, --stream one, saves one
    stem under both prefixes."""
    path, src = imagenet_r18
    out = run_script(str(ROOT / script), "--dataset", "sysu", "--data_path", tiny_sysu, *TINY, "--amp",
                     "--pretrained", path, *AMP_RUNS[script], *output_args(tmp_path), threads=1)
    assert "| bf16 autocast |" in out.stdout
    assert f"loaded {n_imagenet(src)} ImageNet tensors (resnet18)" in out.stdout
    records = finite_losses(tmp_path / "log")
    assert [r["epoch"] for r in records] == [0] and records[0]["step"] == 2   # --iters_per_epoch 2
    if script == "train.py":
        state = torch.load(next((tmp_path / "save").glob("*_epoch_1.t")), weights_only=True)
        assert not any(k.startswith("perm_bn.") for k in state)   # --perm_bn off: no BatchNorm1d
    else:
        (last,) = (tmp_path / "save").glob("*_it2_last.pth")   # a capped epoch is in the run's name
        state = checkpoint.network_state(checkpoint.load(last))
        assert any(k.startswith("test/") for k in records[0]), "the epoch was not tested"
    assert_started_from_imagenet(state, src)
    if script.startswith("DDAG"):
        for k in ("conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.running_var"):
            assert torch.equal(state[f"visible_module.visible.{k}"], state[f"thermal_module.thermal.{k}"]), k
