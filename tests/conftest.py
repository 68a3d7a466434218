"""Shared dataset fixtures: small synthetic SYSU-MM01 and RegDB sets, generated ONCE per
test session (tools/make_synthetic.py) in their real on-disk layouts.

``sysu_small`` is also preprocessed (pre_process_sysu.py) at SMALL_H x SMALL_W, so the
fine-tuning scripts run on it with ``SMALL_ARGS``:

    subprocess.run([sys.executable, "AGW/train.py", "--dataset", "sysu",
                    "--data_path", str(sysu_small), *SMALL_ARGS, ...])
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Small CPU settings for end-to-end runs: ResNet-18 at 96x48, no loader workers.
SMALL_H, SMALL_W = 96, 48
SMALL_ARGS = ["--arch", "resnet18", "--img_h", str(SMALL_H), "--img_w", str(SMALL_W),
              "--test-batch", "64", "--workers", "0", "--gpu", "cpu"]
SYSU_IDS = 40    # -> 24 train + 4 val (28 training identities) and 12 test identities
REGDB_IDS = 20   # -> 10 training and 10 test identities per trial, 10 images per modality


@pytest.fixture(scope="session")
def sysu_small(tmp_path_factory):
    """A synthetic SYSU-MM01 folder with its training npy files at SMALL_H x SMALL_W."""
    from pre_process_sysu import preprocess_sysu
    from tools.make_synthetic import make_sysu
    root = tmp_path_factory.mktemp("sysu_small") / "SYSU-MM01"
    make_sysu(root, num_ids=SYSU_IDS, seed=0)
    preprocess_sysu(root, img_h=SMALL_H, img_w=SMALL_W, verbose=False)
    return root


@pytest.fixture(scope="session")
def regdb_small(tmp_path_factory):
    """A synthetic RegDB folder (Visible/, Thermal/, idx/ for trials 1..10)."""
    from tools.make_synthetic import make_regdb
    root = tmp_path_factory.mktemp("regdb_small") / "RegDB"
    make_regdb(root, num_ids=REGDB_IDS, seed=0)
    return root


@pytest.fixture
def small_args():
    """SMALL_ARGS as a fixture (a fresh list each time it is requested)."""
    return list(SMALL_ARGS)
