"""eval_metrics: SYSU / RegDB CMC, mAP, mINP (docs/EVALUATION.md).

Hand-worked cases: every expected number below is derived by hand in the comments,
never by calling the code. Then a randomised cross-check of the vectorised
implementation against the straightforward per-query reference
(eval_reference.py, written from the protocol's description, independent of eval_metrics).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_metrics  # noqa: E402
from eval_metrics import eval_regdb, eval_sysu, evaluate_trials, format_metrics  # noqa: E402
from eval_reference import eval_regdb_reference, eval_sysu_reference  # noqa: E402

EXACT = 1e-12


def assert_metrics(got, cmc, mAP, mINP):
    got_cmc, got_map, got_minp = got
    assert isinstance(got_map, float) and isinstance(got_minp, float)
    assert got_cmc.dtype == np.float64
    np.testing.assert_allclose(got_cmc, cmc, rtol=0, atol=EXACT)
    assert got_map == pytest.approx(mAP, abs=EXACT)
    assert got_minp == pytest.approx(mINP, abs=EXACT)


# A small SYSU-like gallery used by several cases:
#   index: 0  1  2  3  4
#   pid:   1  2  3  1  4
#   cam:   2  2  1  1  4
G_PIDS = np.array([1, 2, 3, 1, 4])
G_CAMS = np.array([2, 2, 1, 1, 4])


def test_cam3_query_whose_only_match_is_in_cam2_is_skipped():
    # Query A: pid 2, cam 3. pid 2 exists only at g1 (cam 2), which a cam-3 query never
    # sees -> no match in the kept gallery -> skipped.
    # Query B: pid 1, cam 3, distances 0.1..0.5 in gallery order: ranking g0 g1 g2 g3 g4;
    # cam-2 items g0, g1 removed -> kept ranking g2(pid 3) g3(pid 1) g4(pid 4):
    # match at rank 2 -> AP = 1/2, INP = 1/1 match / rank 2 = 0.5.
    # Unique ids [3, 1, 4] -> curve [0, 1, 1]; length min(20, 5) = 5, flat -> [0,1,1,1,1].
    # Were query A counted, every average would be halved.
    d = np.array([[0.5, 0.1, 0.2, 0.3, 0.4],
                  [0.1, 0.2, 0.3, 0.4, 0.5]])
    got = eval_sysu(d, np.array([2, 1]), G_PIDS, np.array([3, 3]), G_CAMS)
    assert_metrics(got, [0, 1, 1, 1, 1], 0.5, 0.5)


def test_cam3_removal_changes_the_rank_and_cam6_keeps_cam2():
    # Same distances for both queries (pid 1): g0 .1, g1 .3, g2 .2, g3 .5, g4 .4
    # -> ranking g0(1) g2(3) g1(2) g4(4) g3(1).
    d_row = [0.1, 0.3, 0.2, 0.5, 0.4]
    # cam 3: g0, g1 (cam 2) removed -> g2(3) g4(4) g3(1): match at rank 3.
    #   AP = 1/3, INP = 1/3, unique ids [3, 4, 1] -> [0, 0, 1] -> flat [0,0,1,1,1].
    got3 = eval_sysu(np.array([d_row]), np.array([1]), G_PIDS, np.array([3]), G_CAMS)
    assert_metrics(got3, [0, 0, 1, 1, 1], 1 / 3, 1 / 3)
    # cam 6: nothing removed -> matches at ranks 1 and 5.
    #   AP = (1/1 + 2/5) / 2 = 0.7, INP = 2/5 = 0.4.
    #   unique ids [1, 3, 2, 4] -> [1, 1, 1, 1]; only 4 unique ids < length 5 -> flat
    #   at its last value -> [1, 1, 1, 1, 1].
    got6 = eval_sysu(np.array([d_row]), np.array([1]), G_PIDS, np.array([6]), G_CAMS)
    assert_metrics(got6, [1, 1, 1, 1, 1], 0.7, 0.4)
    # Both together: cmc = mean -> [0.5, 0.5, 1, 1, 1]; mAP = (1/3 + 0.7)/2 = 31/60;
    # mINP = (1/3 + 0.4)/2 = 11/30.
    got = eval_sysu(np.array([d_row, d_row]), np.array([1, 1]), G_PIDS, np.array([3, 6]), G_CAMS)
    assert_metrics(got, [0.5, 0.5, 1, 1, 1], 31 / 60, 11 / 30)


def test_duplicate_gallery_ids_unique_cmc_vs_raw_map():
    # Query pid 5 (cam 6); gallery pids 7 7 7 5 8 5 (cam 1), distances increasing in
    # gallery order -> raw ranking 7 7 7 5 8 5: matches at ranks 4 and 6.
    #   AP = (1/4 + 2/6) / 2 = 7/24, INP = 2/6 = 1/3 (both SYSU and RegDB).
    # SYSU CMC over unique ids [7, 5, 8]: match at unique rank 2 -> [0, 1, 1] -> length
    #   min(20, 6) = 6, flat -> [0, 1, 1, 1, 1, 1].
    # RegDB (standard) CMC over the raw ranking: first match at rank 4 -> [0,0,0,1,1,1].
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    g_pids = np.array([7, 7, 7, 5, 8, 5])
    got = eval_sysu(d, np.array([5]), g_pids, np.array([6]), np.ones(6, int))
    assert_metrics(got, [0, 1, 1, 1, 1, 1], 7 / 24, 1 / 3)
    got = eval_regdb(d, np.array([5]), g_pids)
    assert_metrics(got, [0, 0, 0, 1, 1, 1], 7 / 24, 1 / 3)


def test_query_id_absent_from_gallery_is_skipped():
    # Query pid 9 is not in the gallery at all -> skipped by both protocols.
    # The other query (pid 3, cam 6): distances rank g2(3) first -> AP = INP = 1,
    # curve all ones (length 5).
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                  [0.5, 0.4, 0.1, 0.2, 0.3]])
    got = eval_sysu(d, np.array([9, 3]), G_PIDS, np.array([6, 6]), G_CAMS)
    assert_metrics(got, [1, 1, 1, 1, 1], 1.0, 1.0)
    got = eval_regdb(d, np.array([9, 3]), G_PIDS)
    assert_metrics(got, [1, 1, 1, 1, 1], 1.0, 1.0)


def test_max_rank_and_short_gallery_lengths():
    # Gallery of 3 < max_rank 20 -> curve of length 3. Query pid 2: ranking 1 2 3,
    # match at rank 2 -> [0, 1, 1]; AP = 1/2; INP = 1/2.
    d = np.array([[0.1, 0.2, 0.3]])
    g_pids = np.array([1, 2, 3])
    cams = np.array([1, 1, 1])
    assert_metrics(eval_sysu(d, np.array([2]), g_pids, np.array([6]), cams), [0, 1, 1], 0.5, 0.5)
    assert_metrics(eval_regdb(d, np.array([2]), g_pids), [0, 1, 1], 0.5, 0.5)
    # max_rank 2 < gallery 3 -> length 2: [0, 1].
    assert_metrics(eval_sysu(d, np.array([2]), g_pids, np.array([6]), cams, max_rank=2),
                   [0, 1], 0.5, 0.5)
    assert_metrics(eval_regdb(d, np.array([2]), g_pids, max_rank=1), [0], 0.5, 0.5)


def test_minp_value():
    # Query pid 1; raw ranking (gallery order, distances increasing):
    # pids 2 1 1 3 4 5 1 6 -> matches at ranks 2, 3 and 7.
    #   INP = 3 matches / rank 7 of the last one = 3/7.
    #   AP = (1/2 + 2/3 + 3/7) / 3 = (21/42 + 28/42 + 18/42) / 3 = 67/126.
    # RegDB CMC: first match at rank 2 -> [0, 1, 1, 1, 1, 1, 1, 1].
    # SYSU unique ids [2, 1, 3, 4, 5, 6]: rank 2 -> [0, 1, 1, 1, 1, 1] -> flat to length 8.
    d = np.arange(1, 9, dtype=float)[None, :] / 10
    g_pids = np.array([2, 1, 1, 3, 4, 5, 1, 6])
    assert_metrics(eval_regdb(d, np.array([1]), g_pids), [0] + [1] * 7, 67 / 126, 3 / 7)
    assert_metrics(eval_sysu(d, np.array([1]), g_pids, np.array([3]), np.ones(8, int)),
                   [0] + [1] * 7, 67 / 126, 3 / 7)


def test_eval_regdb_hand_case():
    # q0 pid 1: distances .1 .2 .9 .3 over pids 2 1 1 3 -> ranking 2 1 3 1:
    #   matches at ranks 2 and 4 -> AP = (1/2 + 2/4)/2 = 1/2, INP = 2/4, CMC [0, 1, 1, 1].
    # q1 pid 3: distances .4 .3 .2 .1 -> ranking 3 1 1 2: match at rank 1 -> AP = INP = 1,
    #   CMC [1, 1, 1, 1].
    # Mean: CMC [0.5, 1, 1, 1], mAP 0.75, mINP 0.75. No camera rule in RegDB.
    d = np.array([[0.1, 0.2, 0.9, 0.3],
                  [0.4, 0.3, 0.2, 0.1]])
    got = eval_regdb(d, np.array([1, 3]), np.array([2, 1, 1, 3]))
    assert_metrics(got, [0.5, 1, 1, 1], 0.75, 0.75)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_ties_resolve_by_gallery_order(dtype):
    # All distances equal: the stable order is the gallery order.
    # pids 2 1 3, query pid 1 -> match at rank 2: AP = INP = 1/2, CMC [0, 1, 1].
    d = np.full((1, 3), 5, dtype=dtype)
    assert_metrics(eval_regdb(d, np.array([1]), np.array([2, 1, 3])), [0, 1, 1], 0.5, 0.5)
    # pids 1 2 3 -> match first: AP = INP = 1, CMC [1, 1, 1].
    assert_metrics(eval_regdb(d, np.array([1]), np.array([1, 2, 3])), [1, 1, 1], 1.0, 1.0)
    # Unique-id CMC with a tie: pids 2 1 2, distances 5 5 1 -> ranking g2(2) g0(2) g1(1):
    # unique ids [2, 1] -> [0, 1] -> flat [0, 1, 1]; match at raw rank 3 -> AP = INP = 1/3.
    d = np.array([[5, 5, 1]], dtype=dtype)
    got = eval_sysu(d, np.array([1]), np.array([2, 1, 2]), np.array([6]), np.array([1, 1, 1]))
    assert_metrics(got, [0, 1, 1], 1 / 3, 1 / 3)
    # pids 1 2 2 instead: ranking g2(2) g0(1) g1(2): unique [2, 1] -> [0, 1, 1]; rank 2.
    got = eval_sysu(d, np.array([1]), np.array([1, 2, 2]), np.array([6]), np.array([1, 1, 1]))
    assert_metrics(got, [0, 1, 1], 0.5, 0.5)


def test_negative_zero_ties_with_zero():
    # -0.0 == 0.0: a tie, so gallery order decides: pids 2 1 -> match at rank 2.
    for dtype in (np.float32, np.float64):
        d = np.array([[0.0, -0.0]], dtype=dtype)
        assert_metrics(eval_regdb(d, np.array([1]), np.array([2, 1])), [0, 1], 0.5, 0.5)


def test_errors():
    d = np.zeros((1, 2))
    with pytest.raises(ValueError, match="no valid query"):
        eval_sysu(d, np.array([1]), np.array([2, 3]), np.array([6]), np.array([1, 1]))
    with pytest.raises(ValueError, match="no valid query"):
        # the only match is in cam 2 and the query is from cam 3
        eval_sysu(d, np.array([2]), np.array([2, 3]), np.array([3]), np.array([2, 1]))
    with pytest.raises(ValueError, match="no valid query"):
        eval_regdb(d, np.array([1]), np.array([2, 3]))
    with pytest.raises(ValueError, match="g_pids"):
        eval_regdb(d, np.array([1]), np.array([2, 3, 4]))
    with pytest.raises(ValueError, match="2-D"):
        eval_regdb(np.zeros(3), np.array([1]), np.array([2, 3, 4]))
    with pytest.raises(ValueError, match="NaN"):
        eval_regdb(np.array([[np.nan, 1.0]]), np.array([1]), np.array([1, 2]))


# ----------------------------------------------------------------- randomised cross-check
def _random_case(rng, num_q, num_g, num_ids, sorted_gallery):
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    g_cams = rng.choice([1, 2, 4, 5], num_g)
    if sorted_gallery:               # stored id by id, like data_manager's galleries
        order = np.lexsort((g_cams, g_pids))
        g_pids, g_cams = g_pids[order], g_cams[order]
    q_cams = rng.choice([3, 6], num_q)
    # distinct distances: no ties (ties are covered by test_ties_* and below)
    d = rng.permutation(num_q * num_g).reshape(num_q, num_g) / (num_q * num_g) - 0.5
    return d, q_pids, g_pids, q_cams, g_cams


def _same_as_reference(fn, ref, *args):
    """fn(*args) equals ref(*args) to 1e-12, or both find no valid query."""
    try:
        want = ref(*args)
    except ValueError:
        with pytest.raises(ValueError, match="no valid query"):
            fn(*args)
        return
    got = fn(*args)
    assert len(got[0]) == len(want[0])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=EXACT)
    assert abs(got[1] - want[1]) <= EXACT and abs(got[2] - want[2]) <= EXACT


@pytest.mark.parametrize("variant", ["default", "small_chunks"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (30, 19), (50, 60), (200, 301)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_random(monkeypatch, variant, shape, seed):
    if variant != "default":
        # many small chunks: exercises the chunk loop
        monkeypatch.setattr(eval_metrics, "_CHUNK_ELEMS", 40)
    rng = np.random.default_rng(seed)
    num_q, num_g = shape
    for sorted_gallery in (False, True):
        for dtype in (np.float64, np.float32):
            d, qp, gp, qc, gc = _random_case(rng, num_q, num_g, max(2, num_g // 4), sorted_gallery)
            d = d.astype(dtype)
            if num_g == 1:
                gp[:] = qp[0]
                gc[:] = 1
            for max_rank in (20, 5):
                _same_as_reference(eval_sysu, eval_sysu_reference, d, qp, gp, qc, gc, max_rank)
                _same_as_reference(eval_regdb, eval_regdb_reference, d, qp, gp, max_rank)


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_with_ties(seed):
    # Heavily tied distances (a few distinct values, incl. +-0 and +-inf): the protocol's
    # stable sort decides, and the reference uses np.argsort(kind='stable').
    rng = np.random.default_rng(100 + seed)
    values = np.array([0.0, -0.0, 1.0, -1.0, 0.5, np.inf, -np.inf])
    for num_q, num_g in ((40, 25), (60, 90)):
        qp, gp = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
        qc, gc = rng.choice([1, 3, 6], num_q), rng.choice([1, 2, 3, 4], num_g)
        for d in (rng.choice(values, (num_q, num_g)),
                  rng.integers(0, 3, (num_q, num_g)).astype(np.float32),
                  1.0 + rng.integers(0, 3, (num_q, num_g)) * 2.0 ** -50):  # near ties, float64
            _same_as_reference(eval_sysu, eval_sysu_reference, d, qp, gp, qc, gc)
            _same_as_reference(eval_regdb, eval_regdb_reference, d, qp, gp)


def test_evaluate_trials_equals_per_trial_eval():
    rng = np.random.default_rng(7)
    num_q, num_union, dim = 40, 60, 16

    def feats(n):
        # exactly 4 entries of +-0.5 -> unit norm, and every dot product is exact in
        # float32 whatever the summation order (so slicing cannot change a bit)
        f = np.zeros((n, dim), np.float32)
        for i in range(n):
            f[i, rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return f

    qf, gf = feats(num_q), feats(num_union)
    qp, gp = rng.integers(0, 8, num_q), rng.integers(0, 8, num_union)
    qc, gc = rng.choice([3, 6], num_q), rng.choice([1, 2, 4, 5], num_union)
    trials = [np.sort(rng.choice(num_union, 25, replace=False)) for _ in range(3)]
    per_trial, mean = evaluate_trials(qf, qp, qc, gf, gp, gc, trials, eval_sysu)
    assert len(per_trial) == 3
    for got, idx in zip(per_trial, trials):
        want = eval_sysu(-(qf @ gf[idx].T), qp, gp[idx], qc, gc[idx])
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1] and got[2] == want[2]
    np.testing.assert_allclose(mean[0], np.mean([c for c, _, _ in per_trial], axis=0),
                               rtol=0, atol=EXACT)
    assert mean[1] == pytest.approx(np.mean([m for _, m, _ in per_trial]), abs=EXACT)
    assert mean[2] == pytest.approx(np.mean([m for _, _, m in per_trial]), abs=EXACT)


def test_format_metrics_exact_line():
    cmc = np.zeros(20)
    cmc[0], cmc[4], cmc[9], cmc[19] = 0.5, 0.75, 0.8, 0.9
    assert format_metrics("POOL", cmc, 0.4, 0.2) == (
        "POOL:   Rank-1: 50.00% | Rank-5: 75.00% | Rank-10: 80.00%| Rank-20: 90.00%| "
        "mAP: 40.00%| mINP: 20.00%")
    # a curve shorter than 20: Rank-5/10/20 read its last value
    assert format_metrics("FC_att", np.array([0.25, 0.5, 0.75]), 0.12345, 0.5) == (
        "FC_att:   Rank-1: 25.00% | Rank-5: 75.00% | Rank-10: 75.00%| Rank-20: 75.00%| "
        "mAP: 12.35%| mINP: 50.00%")
