"""The run-state layer both stages share (runstate.py) and the benchmark registry
(datasets.py): the one `_last.pth` schema and the older files of both kinds, the device-side
meter, and the registry's answers for each benchmark."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_ARGS, run_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import engine_finetune  # noqa: E402
import runstate  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402

TINY = ["--arch", "resnet18", "--img_h", "96", "--img_w", "48", "--gpu", "cpu", "--workers", "0",
        "--batch-size", "8", "--print_freq", "2", "--warmup_epochs", "1", "--iters_per_epoch", "2",
        "--val_images", "0"]
PRE_NAME = "sysu_two_cw_0.5_ct_0.07_so_20_spm_10_resnet18"


def test_meter_syncs_at_read_and_resets():
    m = runstate.Meter()
    for v in (1.0, 2.0, 6.0):
        m.update({"loss": torch.tensor(v), "acc": 0.5})
    last, mean = m.read()
    assert last == {"loss": 6.0, "acc": 0.5} and mean == {"loss": 3.0, "acc": 0.5}
    m.reset()
    m.update({"loss": torch.tensor(4.0)})
    assert m.read()[1] == {"loss": 4.0}


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
    last = tmp_path / "sm" / f"{PRE_NAME}_last.pth"
    new = utils.load_checkpoint(last)
    assert new["stage"] == "pretrain" and {"net", "optimizer", "scaler", "epoch", "rng", "args",
                                           "state", "best"} <= set(new)
    assert set(new["state"]) == {"scheduler", "global_step", "pcc_from"} and new["state"]["global_step"] == 2
    old = tmp_path / "old_last.pth"
    torch.save(_old_pretrain_schema(new), old)
    out = run_script(ROOT / "train.py", *common, "--epochs", "2", "--resume", old).stdout
    assert "continuing at epoch 1" in out
    assert utils.load_checkpoint(last)["state"]["global_step"] == 4   # the old file's step count went on
    # either kind initialises a fine-tuning backbone
    for path in (last, old):
        obj = utils.load_checkpoint(path)
        assert engine_finetune.checkpoint_kind(obj) == "pretrain"
        sd = engine_finetune.pretrain_state(obj)
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
    opt = engine_finetune.build_optimizer(net, args, AGWNet.NEW_MODULES)
    best = {"epoch": 2, "rank1": 0.5, "feature": "FC", "mAP": 0.4, "mINP": 0.3}
    torch.save({"net": net.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "epoch": 3,
                "best": best, "rng": utils.get_rng_state(), "state": {"wG": 0.25}, "args": {}},
               tmp_path / "x_last.pth")
    other = AGWNet(5, arch="resnet18")
    opt2 = engine_finetune.build_optimizer(other, args, AGWNet.NEW_MODULES)
    state = {"wG": 0.0}
    assert engine_finetune.load_resume(other, args, opt2, None, state) == (4, best)
    assert state == {"wG": 0.25}
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    with pytest.raises(UserError, match="not a resumable pre-training checkpoint"):
        runstate.check_stage("x_last.pth", utils.load_checkpoint(tmp_path / "x_last.pth"), "pretrain")


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
    assert len(lists.trial_index) == 10 and lists.camera_rule and lists.q_modal == datasets.THERMAL
    assert set(np.concatenate(lists.trial_index)) == set(range(len(lists.g_paths)))
    args = engine_finetune.get_args_parser("t").parse_args(["--dataset", "regdb", "--trial", "3",
                                                            "--data_path", str(regdb_small), "--tvsearch"])
    regdb = datasets.get("regdb")
    assert regdb.run_suffix(args) == "_trial_3"
    lists = regdb.test_lists(args)
    assert lists.trials == [3] and lists.direction == "thermal to visible"
    assert lists.q_modal == datasets.THERMAL and len(lists.trial_index[0]) == len(lists.g_paths)
    args.trial = 11
    with pytest.raises(UserError, match="--trial must be 1..10"):
        regdb.check_args(args)
