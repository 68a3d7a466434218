"""A short pre-training + AGW + DDAG run gives the same losses as the code of 2026-12-06
before the checkpoint/logging refactor (issue 24): the values in tests/data/losses.json
were written by ``python tests/test_same_losses.py --record`` on that code (commit
1ed8de2), with one torch thread, on a 2-core AMD EPYC.

Another CPU (Intel, other float kernels) reduces sums in another order, so the first
step's losses are compared to 1e-3 (relative) and the epoch means to 2e-2; a changed
loss, data order, initialisation or schedule moves them by far more.
"""
import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import logger  # noqa: E402
from conftest import SMALL_ARGS, SMALL_H, SMALL_W, output_args, run_script  # noqa: E402

GOLDEN = ROOT / "tests" / "data" / "losses.json"
# the recorded names -> the names in the logs' train/ keys (fine-tuning's total_loss is loss now)
PRETRAIN_KEYS = {"loss": "loss", "perm_rgb": "perm_rgb", "perm_ir": "perm_ir", "pcc": "pcc"}
FINETUNE_KEYS = {"total_loss": "loss", "id_loss": "id_loss", "tri_loss": "tri_loss"}


def _records(path):
    return logger.read_jsonl(path)   # older files (the recording) in today's flat schema


def _train(rec, key):
    return rec[f"train/{key}"]


def short_runs(tmp, sysu):
    """{stage: [per epoch: {loss name: value}], stage/step0: ...} of a 2-epoch pre-training
    and 2-epoch AGW / 1-epoch DDAG runs from its checkpoint."""
    tmp = Path(tmp)
    small = [a for a in SMALL_ARGS if a != "--test-batch" and a != "64"]
    run_script("train.py", "--dataset", "sysu", "--data_path", sysu, *small, "--batch-size", "8",
               "--iters_per_epoch", "3", "--epochs", "2", "--save_epoch", "2", "--val_images", "20",
               "--perm_feat", "stripes", "--pcc_start_acc", "0", "--print_freq", "100",
               "--no-diag", *output_args(tmp / "pre"), threads=1)
    ckpt = next((tmp / "pre" / "save").glob("*_epoch_2.t"))
    pre = _records(next((tmp / "pre" / "log").glob("*.jsonl")))
    out = {"pretrain": [{k: _train(r, new) for k, new in PRETRAIN_KEYS.items()} for r in pre]}
    for stage, script, epochs in (("agw", "AGW/train.py", 2), ("ddag", "DDAG/train_ddag.py", 1)):
        run_script(script, "--dataset", "sysu", "--data_path", sysu, *SMALL_ARGS, "--batch-size", "4",
                   "--num_pos", "2", "--epochs", str(epochs), "--test_every", "0", "--print_freq", "100",
                   "--resume", ckpt, *output_args(tmp / stage), threads=1)
        recs = _records(next((tmp / stage / "log").glob("*.jsonl")))
        out[stage] = [{k: _train(r, new) for k, new in FINETUNE_KEYS.items()} for r in recs]
        out[f"{stage}/step0"] = {k: _train(recs[0], f"step0_{new}") for k, new in FINETUNE_KEYS.items()}
    return out


def test_same_losses_as_before_the_refactor(sysu_small, tmp_path):
    want = json.loads(GOLDEN.read_text())
    got = short_runs(tmp_path, sysu_small)
    for stage in ("agw/step0", "ddag/step0"):
        assert got[stage] == pytest.approx(want[stage], rel=1e-3), stage
    for stage in ("pretrain", "agw", "ddag"):
        assert len(got[stage]) == len(want[stage]), stage
        for g, w in zip(got[stage], want[stage]):
            assert g == pytest.approx(w, rel=2e-2), stage


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    from pre_process_sysu import preprocess_sysu
    from tools.make_synthetic import make_sysu
    from conftest import SYSU_IDS
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "SYSU-MM01"
        make_sysu(root, num_ids=SYSU_IDS, seed=0)
        preprocess_sysu(root, img_h=SMALL_H, img_w=SMALL_W, verbose=False)
        GOLDEN.write_text(json.dumps(short_runs(Path(d) / "runs", root), indent=1) + "\n")
    print(GOLDEN.read_text())
