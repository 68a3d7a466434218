"""rerank.py against a slow reference written literally from the paper (plain loops and
sets, one probe at a time): same numbers on small cases, edge cases, no failure on tiny
galleries. The reference (``eval_reference.reference_rerank``) is also what
bench/bench_rerank.py times."""
import numpy as np
import pytest

import eval_metrics
from eval_reference import reference_rerank
from rerank import distance_blocks, re_ranking, rerank_features


def clustered(nq, ng, num_ids=5, dim=8, noise=0.5, seed=0):
    """L2-normalised features around ``num_ids`` prototypes and their ids."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((num_ids, dim))
    qi, gi = rng.integers(num_ids, size=nq), rng.integers(num_ids, size=ng)
    qf = protos[qi] + noise * rng.standard_normal((nq, dim))
    gf = protos[gi] + noise * rng.standard_normal((ng, dim))
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    return qf.astype(np.float32), gf.astype(np.float32), qi, gi


def distances(qf, gf, decimals=None):
    """The three distance blocks (optionally rounded, which makes many exact ties)."""
    blocks = distance_blocks(qf, gf)
    return blocks if decimals is None else [np.round(b, decimals) for b in blocks]


CASES = [  # nq, ng, k1, k2, lambda, seed, rounding
    (8, 12, 20, 6, 0.3, 0, None),      # n < k1: every k clipped
    (15, 25, 5, 3, 0.3, 1, None),
    (20, 30, 4, 1, 0.3, 2, None),      # k2 = 1: no query expansion
    (12, 18, 7, 4, 0.3, 3, None),      # odd k1
    (10, 20, 6, 6, 0.0, 4, None),      # Jaccard distance alone
    (10, 20, 6, 6, 1.0, 5, None),      # original distance alone
    (16, 24, 6, 3, 0.3, 6, 1),         # many exact ties: stable order decides
    (30, 40, 20, 6, 0.3, 7, None),     # the defaults
]


@pytest.mark.parametrize("nq,ng,k1,k2,lam,seed,decimals", CASES)
def test_matches_reference(nq, ng, k1, k2, lam, seed, decimals):
    qf, gf, _, _ = clustered(nq, ng, seed=seed)
    blocks = distances(qf, gf, decimals)
    ours = re_ranking(*blocks, k1=k1, k2=k2, lambda_value=lam)
    ref = reference_rerank(*blocks, k1=k1, k2=k2, lambda_value=lam)
    assert ours.shape == (nq, ng) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    if lam == 1.0:
        assert np.array_equal(ours, blocks[0])


@pytest.mark.parametrize("ng", [1, 2, 3])
def test_tiny_gallery(ng):
    qf, gf, _, _ = clustered(5, ng, seed=ng)
    ours = rerank_features(qf, gf)       # k1 = 20 > n = 5 + ng
    assert ours.shape == (5, ng) and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, reference_rerank(*distances(qf, gf)), rtol=0, atol=1e-5)
    assert re_ranking(*distances(qf[:1], gf[:1])).shape == (1, 1)
    assert re_ranking(np.zeros((3, 0)), np.zeros((3, 3)), np.zeros((0, 0))).shape == (3, 0)


def test_bad_arguments():
    blocks = distances(*clustered(4, 6)[:2])
    for kwargs in ({"k1": 0}, {"k2": 0}, {"k1": 2.5}, {"lambda_value": 1.5}):
        with pytest.raises(ValueError):
            re_ranking(*blocks, **kwargs)
    with pytest.raises(ValueError, match="need q_g"):
        re_ranking(blocks[0], blocks[2], blocks[1])
    blocks[0][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        re_ranking(*blocks)


def test_improves_map_on_clustered_set():
    """Identities whose images form tight groups that sit close to other groups: the
    k-reciprocal evidence separates them better than the raw distance."""
    rng = np.random.default_rng(0)
    num_ids, per_id, dim = 20, 10, 16
    protos = rng.standard_normal((num_ids, dim))
    ids = np.repeat(np.arange(num_ids), per_id)
    f = protos[ids] + 1.1 * rng.standard_normal((len(ids), dim))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    query = np.arange(len(ids)) % per_id == 0
    qf, gf, qi, gi = f[query], f[~query], ids[query], ids[~query]
    _, map_before, _ = eval_metrics.eval_regdb(-(qf @ gf.T), qi, gi)
    _, map_after, _ = eval_metrics.eval_regdb(rerank_features(qf, gf), qi, gi)
    assert map_after > map_before + 0.05, (map_before, map_after)
