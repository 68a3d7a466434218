"""Pre-training on your own unlabelled images (--dataset folder) and on several training
sets at once (--dataset sysu,llcm): the real files through preprocessing and train.py."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_ARGS, SMALL_H, SMALL_W, output_args, run_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
from data_loader import PreprocessedData, UnionData, load_images  # noqa: E402
from data_manager import list_folder_images, read_folder_heldout  # noqa: E402

RUN = ["--arch", "resnet18", "--img_h", str(SMALL_H), "--img_w", str(SMALL_W), "--gpu", "cpu",
       "--workers", "0", "--batch-size", "8", "--warmup_epochs", "0", "--iters_per_epoch", "3",
       "--print_freq", "3", "--no-diag"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A synthetic unlabelled folder (jpg/png/bmp at several depths, one text file),
    preprocessed at SMALL_H x SMALL_W with the default 10% held out."""
    from tools.make_synthetic import make_folder
    root = tmp_path_factory.mktemp("folder") / "crops"
    make_folder(root, num_ids=12, seed=0)
    res = run_script(ROOT / "pre_process_sysu.py", "--dataset", "folder", "--data_path", root,
                     "--img_h", SMALL_H, "--img_w", SMALL_W, "--workers", "0")
    return root, res.stdout


def jsonl(log_dir):
    (f,) = Path(log_dir).glob("*.jsonl")
    return [json.loads(line) for line in f.read_text().splitlines()]


def test_folder_preprocessing_holds_out_images_it_never_trains_on(folder):
    root, stdout = folder
    found = list_folder_images(root)
    assert {Path(p).suffix for p in found["rgb"] + found["ir"]} == {".jpg", ".png", ".bmp"}
    assert not any(p.endswith(".txt") for p in found["rgb"])   # notes.txt is not an image
    data = PreprocessedData(root, title="image folder")
    held = read_folder_heldout(root)
    for m in ("rgb", "ir"):
        n = len(found[m])
        assert len(held[m]) == round(0.1 * n) and len(getattr(data, f"{m}_img")) == n - len(held[m])
        assert (getattr(data, f"{m}_label") == -1).all()
        # decoded by the same routine: a held-out image in the arrays would match a row exactly
        train = np.asarray(getattr(data, f"{m}_img"))
        for img in load_images(held[m], img_w=SMALL_W, img_h=SMALL_H):
            assert not (train == img).all(axis=(1, 2, 3)).any()
    assert f"held out for the permutation accuracy (never trained on): RGB {len(held['rgb'])}, " \
           f"IR {len(held['ir'])}" in stdout
    assert "unlabelled" in data.stats()


def test_pretraining_on_a_folder_logs_heldout_accuracy(folder, tmp_path):
    root, _ = folder
    held = read_folder_heldout(root)
    res = run_script(ROOT / "train.py", "--dataset", "folder", "--data_path", root, *RUN, "--epochs", "2",
                     *output_args(tmp_path))
    assert f"held-out permutation set: {len(held['rgb'])} RGB + {len(held['ir'])} IR" in res.stdout
    rows = jsonl(tmp_path / "log")
    assert len(rows) == 2 and all(0 <= r["val/perm_acc"] <= 1 and "val/stripe_acc" in r for r in rows)
    assert list((tmp_path / "save").glob("folder_two_cw_0.5_ct_0.07_so_20_spm_10_resnet18_*epoch_2.t"))


def test_folder_checkpoint_initialises_agw(folder, sysu_small, tmp_path):
    root, _ = folder
    run_script(ROOT / "train.py", "--dataset", "folder", "--data_path", root, *RUN, "--epochs", "1",
               "--val_images", "0", *output_args(tmp_path))
    (ckpt,) = (tmp_path / "save").glob("folder_two_cw_0.5_ct_0.07_so_20_spm_10_resnet18_*epoch_1.t")
    cwd = ROOT / "AGW"
    res = run_script(cwd / "train.py", "--dataset", "sysu", "--data_path", sysu_small, *SMALL_ARGS,
                     "--epochs", "1", "--iters_per_epoch", "1", "--warmup_epochs", "0", "--test_every", "0",
                     "--resume", ckpt,
                     *output_args(tmp_path / "agw"), cwd=cwd)
    assert "loaded 126/126 backbone tensors" in res.stdout


def test_union_reads_each_set_in_one_index_space(sysu_small, llcm_small):
    a, b = PreprocessedData(sysu_small), PreprocessedData(llcm_small, title="LLCM")
    u = UnionData([a, b])
    n = len(a.rgb_img)
    assert len(u.rgb_img) == n + len(b.rgb_img)
    got = u.rgb_img[np.array([n + 1, 0, n])]    # out of order, across the boundary
    assert (got[0] == b.rgb_img[1]).all() and (got[1] == a.rgb_img[0]).all() and (got[2] == b.rgb_img[0]).all()
    # no identity shared between the sets
    assert set(u.rgb_label[:n]).isdisjoint(u.rgb_label[n:])
    u.subsample(0.5, seed=0)
    assert (u.rgb_pool[u.rgb_pool >= n] - n).max() < len(b.rgb_img)
    assert 0 < (u.rgb_pool < n).sum() < n and 0 < (u.rgb_pool >= n).sum() < len(b.rgb_img)


def test_joint_pretraining_reports_each_set(sysu_small, llcm_small, folder, tmp_path):
    res = run_script(ROOT / "train.py", "--dataset", "sysu,llcm,folder",
                     "--data_path", f"{sysu_small},{llcm_small},{folder[0]}", *RUN, "--epochs", "1",
                     "--val_images", "20", *output_args(tmp_path))
    (row,) = jsonl(tmp_path / "log")
    for name in ("sysu", "llcm", "folder"):
        assert 0 <= row[f"val/perm_acc_{name}"] <= 1 and f"{name} " in res.stdout.split("per set")[1]
    held = read_folder_heldout(folder[0])
    assert f"(sysu: 20 + 20, llcm: 20 + 20, folder: {len(held['rgb'])} + {len(held['ir'])})" in res.stdout
    assert "SYSU-MM01" in res.stdout and "LLCM" in res.stdout and "unlabelled" in res.stdout
    assert list((tmp_path / "save").glob("sysu+llcm+folder_two_cw_0.5_ct_0.07_so_20_spm_10_resnet18_*epoch_1.t"))


def test_registry_names_the_sets():
    bench = datasets.get("sysu,regdb")
    assert bench.name == "sysu+regdb" and not bench.labelled and datasets.get("sysu").labelled
    assert not datasets.get("folder").labelled
