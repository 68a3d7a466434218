"""The SYSU-MM01 test scripts evaluate the protocol the flags ask for: with ``--mode indoor
--gall_mode multi`` the queries and every trial's gallery that AGW/test.py and
DDAG/test_ddag.py actually used (recorded by ``--save_features``, features.py) are the
lists of data_manager.process_query_sysu / process_gallery_sysu for that mode, not the
all-search single-shot default."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_manager  # noqa: E402
import features  # noqa: E402
from conftest import SMALL_ARGS, run_script  # noqa: E402
from model import MMGLNet  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """A pre-training file as train.py writes it (untrained: the protocol, not the numbers, is tested)."""
    path = tmp_path_factory.mktemp("sysu_protocol") / "mmgl_r18.t"
    torch.manual_seed(0)
    torch.save(MMGLNet("resnet18", "two").state_dict(), path)
    return path


@pytest.mark.parametrize("script", ["AGW/test.py", "DDAG/test_ddag.py"])
def test_indoor_multi_shot_evaluates_that_protocol(script, sysu_small, checkpoint_file, tmp_path):
    mode, gall_mode = "indoor", "multi"
    res = run_script(ROOT / script, "--dataset", "sysu", "--data_path", sysu_small, *SMALL_ARGS,
                     "--mode", mode, "--gall_mode", gall_mode, "--resume", checkpoint_file,
                     "--save_features", tmp_path / "feat", "--log_path", tmp_path / "log", threads=1)
    assert res.stdout.count("Test Trial:") == 10
    ff = features.load_features(tmp_path / "feat" / f"{checkpoint_file.stem}.npz")
    assert ff.dataset == "sysu" and ff.mode == f"{mode}_{gall_mode}"

    q_paths, q_pids, q_cams = data_manager.process_query_sysu(str(sysu_small), mode=mode)
    assert list(ff.query_paths) == list(q_paths)
    assert np.array_equal(ff.query_ids, q_pids) and np.array_equal(ff.query_cams, q_cams)

    assert len(ff.trial_index) == 10
    singles = 0
    for trial in range(10):
        g_paths, g_pids, g_cams = data_manager.process_gallery_sysu(str(sysu_small), mode=mode, trial=trial,
                                                                    gall_mode=gall_mode)
        used = ff.trial_index[trial]
        assert list(ff.gallery_paths[used]) == list(g_paths), trial
        assert np.array_equal(ff.gallery_ids[used], g_pids) and np.array_equal(ff.gallery_cams[used], g_cams)
        assert set(g_cams.tolist()) <= {1, 2}   # indoor: RGB cameras 1 and 2 only
        singles = len(data_manager.process_gallery_sysu(str(sysu_small), mode=mode, trial=trial,
                                                        gall_mode="single")[0])
        assert len(g_paths) > singles, trial   # multi-shot: several images per id and camera
    # the test really tells the protocols apart: the all-search galleries have cameras 4/5
    all_cams = data_manager.process_gallery_sysu(str(sysu_small), mode="all", trial=0, gall_mode="single")[2]
    assert {4, 5} & set(all_cams.tolist())
