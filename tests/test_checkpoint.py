"""What both stages share around the network: the checkpoint module (checkpoint.py: the one
`_last.pth` schema and the older files of both kinds, what a file is), the device-side meter
(logger.py), and the benchmark registry's answers for each benchmark (datasets.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_ARGS, run_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import datasets  # noqa: E402
import engine_finetune  # noqa: E402
import logger  # noqa: E402
import utils  # noqa: E402
from cli import UserError  # noqa: E402

TINY = ["--arch", "resnet18", "--img_h", "96", "--img_w", "48", "--gpu", "cpu", "--workers", "0",
        "--batch-size", "8", "--print_freq", "2", "--warmup_epochs", "1", "--iters_per_epoch", "2",
        "--val_images", "0"]


def test_meter_last_epoch_mean_and_mean_since_the_last_read():
    m = logger.Meter(torch.device("cpu"))
    for v in (1.0, 2.0, 6.0):
        m.update(loss=torch.tensor(v), acc=0.5)
    last, mean, recent = m.read()
    assert last == {"loss": 6.0, "acc": 0.5} and mean == recent == {"loss": 3.0, "acc": 0.5}
    m.update(loss=torch.tensor(7.0))           # a name may skip steps: its own count
    last, mean, recent = m.read()
    assert mean == {"loss": 4.0, "acc": 0.5} and recent == {"loss": 7.0, "acc": 0.5}


def _old_pretrain_schema(new):
    """A pre-training _last.pth as train.py wrote it before the one schema."""
    return {"model": new["net"], "optimizer": new["optimizer"], "scheduler": new["state"]["scheduler"],
            "scaler": new["scaler"], "epoch": new["epoch"], "global_step": new["state"]["global_step"],
            "rng": new["rng"], "args": new["args"]}


def test_old_and_new_pretraining_last_files_resume(sysu_small, tmp_path):
    """train.py writes the one schema; a file of the older schema (keys 'model', 'scheduler',
    'global_step') continues the same run, and a fine-tuning script takes either kind's network
    as its backbone initialisation."""
    common = ["--data_path", sysu_small, *TINY, "--model_path", tmp_path / "sm", "--log_path",
              tmp_path / "log", "--vis_log_path", tmp_path / "vis"]
    run_script(ROOT / "train.py", *common, "--epochs", "1")
    (last,) = (tmp_path / "sm").glob("*_last.pth")
    new = checkpoint.load(last)
    assert new["stage"] == "pretrain" and {"net", "optimizer", "scaler", "epoch", "rng", "args",
                                           "state", "best"} <= set(new)
    assert set(new["state"]) == {"scheduler", "global_step", "pcc_from"} and new["state"]["global_step"] == 2
    old = tmp_path / "old_last.pth"
    torch.save(_old_pretrain_schema(new), old)
    # a copy of the run's state, with more epochs: both need saying (--overwrite, --resume_anyway)
    out = run_script(ROOT / "train.py", *common, "--epochs", "2", "--resume", old, "--overwrite",
                     "--resume_anyway").stdout
    assert "continuing at epoch 1" in out
    assert checkpoint.load(last)["state"]["global_step"] == 4   # the old file's step count went on
    # either kind initialises a fine-tuning backbone
    for path in (last, old):
        obj = checkpoint.load(path)
        assert checkpoint.kind(obj) == ("pretrain", True)
        sd = checkpoint.network_state(obj)
        src = obj["net"] if "net" in obj else obj["model"]
        assert sd.keys() == src.keys() and all(torch.equal(sd[k], src[k]) for k in sd)


def test_old_fine_tuning_last_file_resumes(tmp_path):
    """A fine-tuning _last.pth of the older schema (no 'stage') continues: epoch, best, the
    method's state, optimiser; a pre-training state is refused with the stage named."""
    sys.path.insert(0, str(ROOT / "AGW"))
    from model_agw import AGWNet
    torch.manual_seed(0)
    net = AGWNet(5, arch="resnet18")
    args = engine_finetune.get_args_parser("t").parse_args(["--resume", str(tmp_path / "x_last.pth")])
    opt = engine_finetune.build_optimizer(net, args, net.new_modules())
    best = {"epoch": 2, "rank1": 0.5, "feature": "FC", "mAP": 0.4, "mINP": 0.3}
    torch.save({"net": net.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "epoch": 3,
                "best": best, "rng": utils.get_rng_state(), "state": {"wG": 0.25}, "args": {}},
               tmp_path / "x_last.pth")
    other = AGWNet(5, arch="resnet18")
    opt2 = engine_finetune.build_optimizer(other, args, net.new_modules())
    state = {"wG": 0.0}
    assert engine_finetune.load_resume(other, args, opt2, None, state) == (4, best)
    assert state == {"wG": 0.25}
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    with pytest.raises(UserError, match="not a resumable pre-training checkpoint"):
        checkpoint.check_resumable("x_last.pth", checkpoint.load(tmp_path / "x_last.pth"), "pretrain")


def test_registry(sysu_small, regdb_small):
    """Every script asks the registry: names, default folders, run suffixes, flag checks, and
    test lists whose trial galleries index the union gallery."""
    assert datasets.NAMES == ("sysu", "regdb", "llcm", "folder")
    with pytest.raises(UserError, match="--dataset must be one of sysu, regdb, llcm, folder"):
        datasets.get("market")
    args = engine_finetune.get_args_parser("t").parse_args(["--data_path", str(sysu_small), *SMALL_ARGS])
    sysu = datasets.get("sysu")
    assert sysu.run_suffix(args) == "" and str(sysu.data_path(args)) == str(sysu_small)
    lists = sysu.test_lists(args)
    assert len(lists.trial_index) == 10 and lists.camera_rule and lists.q_modal == datasets.IR
    assert set(np.concatenate(lists.trial_index)) == set(range(len(lists.g_paths)))
    args = engine_finetune.get_args_parser("t").parse_args(["--dataset", "regdb", "--trial", "3",
                                                            "--data_path", str(regdb_small), "--tvsearch"])
    regdb = datasets.get("regdb")
    assert regdb.run_suffix(args) == "_trial_3"
    lists = regdb.test_lists(args)
    assert lists.trials == [3] and lists.direction == "thermal to visible"
    assert lists.q_modal == datasets.IR and len(lists.trial_index[0]) == len(lists.g_paths)
    args.trial = 11
    with pytest.raises(UserError, match="--trial must be 1..10"):
        regdb.check_args(args)


def test_kind_is_read_from_the_file(tmp_path):
    """Our files carry 'stage'; the authors' and our older ones are told apart by their keys;
    every kind's network is found by the one rule (checkpoint.network_state)."""
    sys.path.insert(0, str(ROOT / "AGW"))
    from model_agw import AGWNet
    net = AGWNet(5, arch="resnet18")
    sd = net.state_dict()
    checkpoint.save_network(tmp_path / "pre_epoch_3.t", net)
    checkpoint.save_finetuned(tmp_path / "ft_best.t", net, 4, (np.array([0.5, 0.6]), 0.4, 0.3), "FC")
    cases = {
        "pre_epoch_3.t": ("pretrain", False),                    # ours: the plain state_dict
        "ft_best.t": ("finetune", False),                        # ours: 'stage' read
    }
    for name, want in cases.items():
        obj = checkpoint.load(tmp_path / name)
        assert checkpoint.kind(obj) == want, name
        assert checkpoint.network_state(obj).keys() == sd.keys(), name
    assert checkpoint.load(tmp_path / "ft_best.t")["stage"] == "finetune"
    assert checkpoint.num_classes(checkpoint.load(tmp_path / "ft_best.t")) == 5
    authors = {"net": {"module." + k: v for k, v in sd.items()}, "epoch": 7, "cmc": np.zeros(3), "mAP": 0.1}
    assert checkpoint.kind(authors) == ("finetune", False)
    assert checkpoint.kind({"state_dict": sd}) == ("pretrain", False)
    assert checkpoint.network_state({"state_dict": sd}).keys() == sd.keys()
    with pytest.raises(UserError, match="not a state_dict"):
        checkpoint.network_state({"epoch": 3})


def test_one_path_rule_for_every_script(tmp_path, monkeypatch):
    """Given paths are relative to the folder you run from; defaults live in the script's
    folder (train.py: the repository root; AGW/DDAG: theirs)."""
    import options
    monkeypatch.chdir(tmp_path)
    for script_dir in (ROOT, ROOT / "AGW"):
        args = engine_finetune.get_args_parser("t").parse_args(["--model_path", "mine"])
        options.resolve_paths(args, script_dir)
        assert args.model_path == str(tmp_path / "mine")
        assert args.log_path == str(script_dir / "log") and args.vis_log_path == str(script_dir / "log" / "vis_log")


def test_a_file_from_before_empty_path_flags_were_refused_resumes_exactly():
    """Files written when an unset path flag was "" (now None: an empty path is refused)
    continue without --resume_anyway; a real difference in that flag is still caught."""
    sys.path.insert(0, str(ROOT))
    import train
    args = train.parse_args(["--dataset", "sysu"])
    assert args.pretrained is None
    saved = {"stage": "pretrain", "optimizer": {}, "net": {}, "args": {**checkpoint._plain(vars(args)),
                                                                       "pretrained": ""}}
    checkpoint.check_continuation(Path("x_last.pth"), saved, args)   # no error
    saved["args"]["pretrained"] = "imagenet.pth"
    with pytest.raises(UserError, match=r"--pretrained imagenet.pth -> None"):
        checkpoint.check_continuation(Path("x_last.pth"), saved, args)
