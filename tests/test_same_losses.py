"""Both stages log alike, and their first losses are those of the recording. A short
pre-training + AGW + DDAG run:

* writes JSON lines of ONE flat schema in both stages (and TensorBoard tags of the same
  names, on the global step);
* gives the golden losses of tests/data/losses.json, compared only where the CPU's float
  kernels cannot move them beyond a tolerance that a real change exceeds.

What is compared, and why only that: a few SGD steps at lr 0.1 amplify the last-bit
differences of another CPU's kernels (AVX2 vs AVX-512 vs no vector ISA reduce sums in
another order): with the old design, fine-tuning from a checkpoint pre-trained for 6
SGD steps, AGW's first triplet loss was 7.716 on an AVX2-only CPU against the recorded
6.649. So every compared number is computed from weights that NO optimiser step has
touched:

* pre-training: the losses of the first step of epoch 0 (``train/step0_*``: a seeded
  network, seeded batch, crops, permutations and Gumbel noise, one forward pass);
* AGW and DDAG: the first step's losses of a run that starts from a checkpoint this test
  writes itself, a seeded freshly initialised ``MMGLNet`` saved without any training
  (:func:`fresh_checkpoint`): the backbone from that file, the heads seeded by the
  script, one forward pass.

Across ISAs (``ATEN_CPU_CAPABILITY=avx512`` / ``avx2`` / ``default`` on one AMD EPYC, one
thread) these numbers agree to ~1e-6 relative; they are compared to REL = 1e-4, while a
changed loss, data order, augmentation, initialisation or head moves them by far more.

Re-record (one command, from the repository root, one thread as the test runs):

    OMP_NUM_THREADS=1 python tests/test_same_losses.py --record
"""
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import logger  # noqa: E402
from conftest import SMALL_ARGS, SMALL_H, SMALL_W, output_args, run_script  # noqa: E402

GOLDEN = ROOT / "tests" / "data" / "losses.json"
REL = 1e-4
PRETRAIN_KEYS = ("loss", "perm_rgb", "perm_ir", "pcc")
FINETUNE_KEYS = ("loss", "id_loss", "tri_loss")


def fresh_checkpoint(path, seed=0):
    """A pre-training file nobody trained: ``MMGLNet`` (ResNet-18, two streams, the default
    heads) initialised under ``torch.manual_seed(seed)`` and saved as train.py saves its
    ``_epoch_N.t`` (a plain state_dict)."""
    from model import MMGLNet
    torch.manual_seed(seed)
    torch.save(MMGLNet("resnet18", "two").state_dict(), path)
    return path


def run_all(tmp, sysu):
    """A 2-epoch pre-training (3 steps each), then AGW and DDAG runs of one 3-step epoch
    (--iters_per_epoch) from :func:`fresh_checkpoint`, under ``tmp``/{pre,agw,ddag}."""
    tmp = Path(tmp)
    small = [a for a in SMALL_ARGS if a != "--test-batch" and a != "64"]
    run_script("train.py", "--dataset", "sysu", "--data_path", sysu, *small, "--batch-size", "8",
               "--iters_per_epoch", "3", "--epochs", "2", "--save_epoch", "2", "--val_images", "20",
               "--perm_feat", "stripes", "--pcc_start_acc", "0", "--print_freq", "100",
               "--no-diag", *output_args(tmp / "pre"), threads=1)
    ckpt = fresh_checkpoint(tmp / "sysu_two_fresh_resnet18.t")
    for stage, script in (("agw", "AGW/train.py"), ("ddag", "DDAG/train_ddag.py")):
        run_script(script, "--dataset", "sysu", "--data_path", sysu, *SMALL_ARGS, "--batch-size", "4",
                   "--num_pos", "2", "--epochs", "1", "--iters_per_epoch", "3", "--test_every", "0",
                   "--print_freq", "100",
                   "--resume", ckpt, *output_args(tmp / stage), threads=1)


def losses(tmp):
    """{stage/step0: {name: the first step's loss}} of :func:`run_all`'s logs."""
    tmp = Path(tmp)
    out = {}
    for stage, folder, keys in (("pretrain", "pre", PRETRAIN_KEYS), ("agw", "agw", FINETUNE_KEYS),
                                ("ddag", "ddag", FINETUNE_KEYS)):
        first = logger.read_jsonl(next((tmp / folder / "log").glob("*.jsonl")))[0]
        assert first["epoch"] == 0
        out[f"{stage}/step0"] = {k: first[f"train/step0_{k}"] for k in keys}
    return out


@pytest.fixture(scope="module")
def runs(sysu_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    run_all(tmp, sysu_small)
    return tmp


def test_same_first_losses_as_the_recording(runs):
    """Every stage's first-step losses, from untrained weights, equal the recording to
    REL (see the module docstring for why only those, and how to re-record)."""
    want = json.loads(GOLDEN.read_text())
    got = losses(runs)
    assert set(got) == set(want)
    for stage in want:
        assert set(got[stage]) == set(want[stage]), stage
        for k in want[stage]:
            assert got[stage][k] == pytest.approx(want[stage][k], rel=REL), (stage, k, got[stage], want[stage])


def _tensorboard_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(next(Path(folder).iterdir())))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_both_stages_write_one_flat_schema(runs):
    """epoch, step (global), time, then train/..., val/..., test/<feature>/<metric>: scalars
    only, the same names in both stages; TensorBoard's tags are JSON keys, on the global step."""
    lines = {stage: [json.loads(x) for x in next((runs / stage / "log").glob("*.jsonl")).read_text().splitlines()]
             for stage in ("pre", "agw", "ddag")}
    for stage, recs in lines.items():
        for rec in recs:
            assert list(rec)[:3] == ["epoch", "step", "time"], stage
            assert all(k.split("/")[0] in ("train", "val", "test") for k in list(rec)[3:]), (stage, rec)
            assert all(v is None or isinstance(v, (int, float)) for v in rec.values()), (stage, rec)
            # what both stages log for every epoch, under the same names
            assert {"train/loss", "train/lr", "train/step0_loss", "train/img_per_s"} <= set(rec), stage
        steps = [r["step"] for r in recs]
        assert steps == sorted(steps) and steps[0] > 0 and len(set(steps)) == len(steps), stage
    assert {"val/perm_acc", "val/stripe_acc", "val/perm_mse"} <= set(lines["pre"][-1])
    assert lines["pre"][-1]["step"] == 6   # 2 epochs x 3 steps
    assert lines["agw"][-1]["step"] == lines["ddag"][-1]["step"] == 3   # --iters_per_epoch 3
    for stage, feature in (("agw", "FC"), ("ddag", "FC")):
        last = lines[stage][-1]
        assert {f"test/{feature}/{m}" for m in ("rank1", "rank5", "mAP", "mINP")} <= set(last), stage
        assert 0 <= last[f"test/{feature}/rank1"] <= 1
        assert not any(k.startswith("test/") for k in lines[stage][0]) or len(lines[stage]) == 1
    # TensorBoard: the JSON lines' names (training ones at every print), on the global step
    for stage in ("pre", "agw"):
        tags = _tensorboard_tags(runs / stage / "log" / "vis")
        keys = set().union(*lines[stage])
        assert set(tags) <= keys | {"train/lr", "train/img_per_s"}, set(tags) - keys
        assert "train/loss" in tags
        assert max(max(s) for s in tags.values()) == lines[stage][-1]["step"]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    from pre_process_sysu import preprocess_sysu
    from tools.make_synthetic import make_sysu
    from conftest import SYSU_IDS
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "SYSU-MM01"
        make_sysu(root, num_ids=SYSU_IDS, seed=0)
        preprocess_sysu(root, img_h=SMALL_H, img_w=SMALL_W, verbose=False)
        run_all(Path(d) / "runs", root)
        GOLDEN.write_text(json.dumps(losses(Path(d) / "runs"), indent=1) + "\n")
    print(GOLDEN.read_text())
