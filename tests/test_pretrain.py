"""MMGL pre-training (train.py): stripe shuffling, checkpoint format, exact resume, errors
(that the permutation task is learnt: test_pretrain_learns.py)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_H, SMALL_W, pretrain_name, run_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
from data_loader import DeviceAugment, PreprocessedData, random_perms  # noqa: E402
from model import TwoStreamBackbone  # noqa: E402

TINY = ["--arch", "resnet18", "--img_h", str(SMALL_H), "--img_w", str(SMALL_W), "--gpu", "cpu",
        "--workers", "0", "--batch-size", "8", "--print_freq", "2", "--warmup_epochs", "1", "--val_images", "40",
        "--no-diag"]   # a small held-out set, no diagnostics: tests/test_diagnostics.py turns them on


def unshuffle_stripes(x, perms):
    """The inverse of DeviceAugment's stripe shuffle on an NCHW tensor: the stripe at
    position i goes back to position perms[b, i]."""
    b, c, h, w = x.shape
    k = perms.shape[1]
    sh = h // k
    src = perms.argsort(dim=1).repeat_interleave(sh, dim=1) * sh + torch.arange(sh).repeat(k)
    return x.gather(2, src[:, None, :, None].expand(b, c, h, w))


def run_train(tmp, *args, check=True):
    return run_script(ROOT / "train.py", "--model_path", tmp / "sm", "--log_path", tmp / "log",
                      "--vis_log_path", tmp / "log" / "vis", *args, check=check)


def load_agw_net():
    spec = importlib.util.spec_from_file_location("model_agw", ROOT / "AGW" / "model_agw.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.AGWNet


# ----------------------------------------------------------------------------- stripes
def test_stripe_shuffle_inverse_is_identity_on_real_images(sysu_small):
    data = PreprocessedData(sysu_small)
    x = torch.from_numpy(np.array(data.rgb_img[:8]))
    aug = DeviceAugment(SMALL_H, SMALL_W)
    perms = random_perms(8, 6)
    plain = aug(x, train=False)
    shuffled = aug(x, train=False, perms=perms)
    assert not torch.equal(shuffled, plain)
    assert torch.equal(unshuffle_stripes(shuffled, perms), plain)
    # stripe i of the output is stripe perms[i] of the input, exactly
    sh = SMALL_H // 6
    for b in range(8):
        for i in range(6):
            j = int(perms[b, i])
            assert torch.equal(shuffled[b, :, i * sh:(i + 1) * sh], plain[b, :, j * sh:(j + 1) * sh])


def test_rgb_and_ir_of_a_pair_share_the_permutation(sysu_small):
    """In training the same perms tensor shuffles both halves of the pair; with the random
    crop/flip drawn independently per image, undoing the shuffle must give back an
    unshuffled augmentation of the same image (checked with crop/flip off: pad 0, no flip)."""
    data = PreprocessedData(sysu_small)
    rgb = torch.from_numpy(np.array(data.rgb_img[:4]))
    ir = torch.from_numpy(np.array(data.ir_img[:4]))
    aug = DeviceAugment(SMALL_H, SMALL_W, pad=0, flip=False)
    perms = random_perms(4, 6)
    xr, xi = aug(rgb, train=True, perms=perms), aug(ir, train=True, perms=perms)
    assert torch.equal(unshuffle_stripes(xr, perms), aug(rgb, train=False))
    assert torch.equal(unshuffle_stripes(xi, perms), aug(ir, train=False))


# ----------------------------------------------------------------------------- checkpoints
TWO_STREAM = [*TINY, "--epochs", "2", "--iters_per_epoch", "3", "--save_epoch", "1", "--seed", "3",
              "--deterministic"]


@pytest.fixture(scope="module")
def two_stream_run(sysu_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre_two")
    res = run_train(tmp, "--data_path", str(sysu_small), *TWO_STREAM)
    return tmp, res


@pytest.mark.parametrize("stream", ["two", "one"])
def test_checkpoint_holds_exactly_agw_backbone_plus_heads(stream, sysu_small, two_stream_run, tmp_path):
    if stream == "two":
        tmp, res = two_stream_run
    else:
        tmp = tmp_path
        res = run_train(tmp, "--data_path", str(sysu_small), *TINY, "--stream", "one", "--epochs", "1",
                        "--iters_per_epoch", "2")
    name = pretrain_name(*TWO_STREAM) if stream == "two" else \
        pretrain_name(*TINY, "--stream", "one", "--iters_per_epoch", "2")
    files = sorted(p.name for p in (tmp / "sm").iterdir())
    assert f"{name}_epoch_1.t" in files and f"{name}_last.pth" in files, files
    sd = torch.load(tmp / "sm" / f"{name}_epoch_1.t", weights_only=True)
    agw = load_agw_net()(class_num=10, arch="resnet18")
    backbone = {k for k in agw.state_dict() if k.startswith(TwoStreamBackbone.BACKBONE_PREFIXES)}
    heads = {k for k in sd if not k.startswith(TwoStreamBackbone.BACKBONE_PREFIXES)}
    assert set(sd) - heads == backbone
    assert heads and all(k.startswith(("fc1.", "fc2.", "local_conv_list.")) for k in heads)
    assert {k.split(".")[0] for k in heads} == {"fc1", "fc2", "local_conv_list"}
    if stream == "one":  # the single stem is written under BOTH stem prefixes
        for k in sd:
            if k.startswith("visible_module.visible."):
                assert torch.equal(sd[k], sd[k.replace("visible_module.visible.", "thermal_module.thermal.")])
    # it drops straight into the AGW network: every backbone tensor matched
    missing, unexpected = agw.load_state_dict({k: v for k, v in sd.items() if k in backbone}, strict=False)
    assert not [k for k in missing if k.startswith(TwoStreamBackbone.BACKBONE_PREFIXES)]
    assert "perm_acc" in res.stdout and "img/s" in res.stdout


def test_logs_tensorboard_and_json(two_stream_run):
    tmp, res = two_stream_run
    name = pretrain_name(*TWO_STREAM)
    text = (tmp / "log" / f"{name}.txt").read_text()
    assert text.count("Epoch: [") >= 2
    # the full argument list is in the log file, not on the terminal
    assert "          batch_size: 8" in text and "batch_size: 8" not in res.stdout
    assert f"arguments: {tmp / 'log' / (name + '.txt')}" in res.stdout
    lines = (tmp / "log" / f"{name}.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"train/perm_acc"' in lines[0]
    assert list((tmp / "log" / "vis" / name).glob("events.out.tfevents.*"))


def test_resume_is_exact(sysu_small, two_stream_run, tmp_path):
    """2 epochs in one go == 1 epoch, then --resume for the 2nd (same seed, deterministic CPU)."""
    tmp, _ = two_stream_run
    name = pretrain_name(*TWO_STREAM)
    common = ["--data_path", str(sysu_small), *TINY, "--iters_per_epoch", "3", "--save_epoch", "1",
              "--seed", "3", "--deterministic"]
    run_train(tmp_path, *common, "--epochs", "1")
    # more epochs than the file was written for: said with --resume_anyway (exact here: with one
    # warm-up epoch the lr factor is 1.0 in both; test_mmgl_behaviour checks a real schedule)
    res = run_train(tmp_path, *common, "--epochs", "2", "--resume", f"{name}_last.pth", "--resume_anyway")
    assert "continuing at epoch 1" in res.stdout
    full = torch.load(tmp / "sm" / f"{name}_epoch_2.t", weights_only=True)
    resumed = torch.load(tmp_path / "sm" / f"{name}_epoch_2.t", weights_only=True)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    first = torch.load(tmp_path / "sm" / f"{name}_epoch_1.t", weights_only=True)
    assert any(not torch.equal(first[k], full[k]) for k in full)  # epoch 2 did train


def test_train_ratio_uses_a_seeded_fraction(sysu_small, tmp_path):
    # an epoch longer than the small fraction's one pass: the sampler cycles through it
    data = PreprocessedData(sysu_small)
    n_rgb = int(round(len(data.rgb_img) * 0.25))
    steps = max(n_rgb, int(round(len(data.ir_img) * 0.25))) // 4 + 3
    res = run_train(tmp_path, "--data_path", str(sysu_small), *TINY, "--epochs", "1", "--batch-size", "4",
                    "--iters_per_epoch", str(steps), "--train_ratio", "0.25", "--print_freq", "1")
    assert f"RGB {n_rgb}/{len(data.rgb_img)} images" in res.stdout
    assert f"Epoch: [0][{steps}/{steps}]" in res.stdout
    assert list((tmp_path / "sm").glob("*_ratio_0.25_*epoch_1.t"))


def test_adam_run_is_named_for_it_and_resumes_only_with_it(sysu_small, tmp_path):
    """--optim adam: Adam's state in _last.pth, '_adam' in the run name, and continuing it
    with the default SGD is one error line naming the flag."""
    res = run_train(tmp_path, "--data_path", str(sysu_small), *TINY, "--epochs", "2", "--iters_per_epoch", "1",
                    "--optim", "adam", "--lr", "0.001", "--val_images", "0")
    last = tmp_path / "sm" / f"{pretrain_name(*TINY, '--optim', 'adam', '--lr', '0.001', '--iters_per_epoch', '1')}_last.pth"
    assert last.is_file(), res.stdout[-2000:]
    state = torch.load(last, map_location="cpu", weights_only=False)["optimizer"]["state"]
    assert state and all("exp_avg" in v for v in state.values())
    bad = run_train(tmp_path, "--data_path", str(sysu_small), *TINY, "--epochs", "3", "--iters_per_epoch", "1",
                    "--val_images", "0", "--resume", str(last), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "has other flags (--optim adam -> sgd" in bad.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args,needle", [
    (["--stream", "three"], "--stream must be one of"),
    (["--dataset", "market"], "--dataset must be one of"),
    (["--num_stripe", "5"], "--num_stripe"),
    (["--resume", "nope_last.pth"], "--resume nope_last.pth: no such checkpoint file"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--lr", "abc"], "invalid float value"),
    (["--perm_feat", "mean"], "--perm_feat must be one of"),
    (["--pcc_form", "loop"], "--pcc_form must be one of"),
    (["--pcc_pool", "some"], "--pcc_pool must be one of"),
    (["--pcc_order", "sorted"], "--pcc_order must be one of"),
    (["--val_images", "-1"], "--val_images must be >= 0"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--lr", "-0.1"], "--lr must be positive"),
])
def test_bad_flags_are_one_error_line(args, needle, sysu_small, tmp_path):
    res = run_train(tmp_path, "--data_path", str(sysu_small), *TINY, "--epochs", "1", *args, check=False)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr


def test_missing_npy_says_to_preprocess(tmp_path):
    from tools.make_synthetic import make_sysu
    root = tmp_path / "SYSU-MM01"
    make_sysu(root, num_ids=8, seed=1)
    res = run_train(tmp_path, "--data_path", str(root), *TINY, "--epochs", "1", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "run: python pre_process_sysu.py --data_path" in res.stderr


def test_fine_tune_checkpoint_is_not_resumable(two_stream_run, sysu_small, tmp_path):
    tmp, _ = two_stream_run
    plain = tmp / "sm" / f"{pretrain_name(*TWO_STREAM)}_epoch_1.t"
    res = run_train(tmp_path, "--data_path", str(sysu_small), *TINY, "--epochs", "1",
                    "--resume", str(plain), check=False)
    assert res.returncode == 2 and "not a resumable pre-training checkpoint" in res.stderr


# ----------------------------------------------------------------------------- learning
# ----------------------------------------------------------------------------- held-out permutation accuracy
def test_heldout_set_is_test_ids_only_and_evaluation_is_deterministic(sysu_small):
    """The held-out images are test-split identities only (pre-training reads train_id +
    val_id), drawn and permuted the same way every time; one checkpoint evaluated twice
    gives identical numbers, and the numbers are those of the Hungarian decoding of the
    noise-free logits of exactly those images and permutations."""
    from data_loader import PermHeldout
    from data_manager import sysu_split_ids
    from loss import perm_accuracy
    from model import MMGLNet
    from train import evaluate_perm, get_args_parser

    a = PermHeldout(datasets.get("sysu").heldout_lists(sysu_small), 6, SMALL_H, SMALL_W, n=50, seed=0)
    b = PermHeldout(datasets.get("sysu").heldout_lists(sysu_small), 6, SMALL_H, SMALL_W, n=50, seed=0)
    test_ids, train_ids = set(sysu_split_ids(sysu_small, "test")), set(sysu_split_ids(sysu_small, "train", "val"))
    for m, cams in (("rgb", {"cam1", "cam2", "cam4", "cam5"}), ("ir", {"cam3", "cam6"})):
        paths = getattr(a, f"{m}_paths")
        assert len(paths) == 50 and paths == getattr(b, f"{m}_paths")
        assert np.array_equal(getattr(a, f"{m}_perms"), getattr(b, f"{m}_perms"))
        assert np.array_equal(getattr(a, m), getattr(b, m))
        pids = {int(Path(p).parent.name) for p in paths}
        assert pids <= test_ids and not pids & train_ids
        assert {Path(p).parent.parent.name for p in paths} <= cams
        assert sorted(getattr(a, f"{m}_perms")[0]) == list(range(6))
    # another seed: other images or other permutations
    c = PermHeldout(datasets.get("sysu").heldout_lists(sysu_small), 6, SMALL_H, SMALL_W, n=50, seed=1)
    assert c.rgb_paths != a.rgb_paths or not np.array_equal(c.rgb_perms, a.rgb_perms)

    torch.manual_seed(0)
    net = MMGLNet("resnet18", "two", num_stripe=6)
    net.train()   # evaluate_perm must switch BN to eval mode and back
    args = get_args_parser().parse_args([])
    aug = DeviceAugment(SMALL_H, SMALL_W)
    dev = torch.device("cpu")
    first = evaluate_perm(net, a, aug, args, dev, None, batch=16)
    second = evaluate_perm(net, b, aug, args, dev, None, batch=50)
    assert net.training
    assert first == pytest.approx(second, abs=1e-6)
    net.eval()
    with torch.no_grad():
        x = aug(torch.from_numpy(a.ir), train=False, perms=torch.from_numpy(a.ir_perms))
        logits = net(x, x, modal=2, pcc=False)["perm_logits"]
    assert perm_accuracy(logits, torch.from_numpy(a.ir_perms)) == pytest.approx(
        (first["perm_acc_ir"], first["stripe_acc_ir"]))


def test_resume_into_another_network_names_the_flag(two_stream_run, sysu_small, tmp_path):
    tmp, _ = two_stream_run
    last = tmp / "sm" / f"{pretrain_name(*TWO_STREAM)}_last.pth"
    res = run_train(tmp_path, "--data_path", str(sysu_small), *TINY, "--epochs", "1",
                    "--num_stripe", "3", "--resume", str(last), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 300, err
    assert "has other flags (--num_stripe 6 -> 3" in err[0]


def test_start_failures_leave_no_logs_and_unwritable_output_fails_first(sysu_small, tmp_path):
    # a data error: no text log, no JSON lines, no TensorBoard run
    res = run_train(tmp_path, "--data_path", str(tmp_path / "nowhere"), *TINY, "--epochs", "1", check=False)
    assert res.returncode == 2 and "dataset folder not found" in res.stderr
    assert not list((tmp_path / "log").rglob("*.txt")) and not list((tmp_path / "log").rglob("*.jsonl"))
    assert not list((tmp_path / "log").rglob("events.out.tfevents.*"))
    # --model_path under a file: one line before any data or model work
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_script(ROOT / "train.py", "--data_path", str(sysu_small), *TINY, "--epochs", "1",
                     "--model_path", blocker / "sm", "--log_path", tmp_path / "log2", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: output folder {blocker / 'sm'} is not writable")
    assert "Epoch" not in res.stdout
