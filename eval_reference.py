"""The readable definitions the fast code must equal, one copy each, imported by the tests
(which cross-check) and the benchmarks (which time them): the SYSU / RegDB evaluation
(docs/EVALUATION.md), per query, that the vectorised eval_metrics.py must equal, and
k-reciprocal re-ranking written literally from its paper (``reference_rerank``, for
rerank.py).

This is deliberately the slow, obviously-correct shape of the widely used
AGW/DDAG evaluation: one Python iteration per query, one ``np.argsort`` per row,
the cam-3/cam-2 removal, unique gallery ids through ``np.unique`` + a loop over
the first-occurrence indices. It is written from the protocol's description, independently of
``eval_metrics.py``, and serves two purposes (one copy, imported by both):

* ``tests/test_eval.py`` cross-checks the vectorised ``eval_metrics`` against it;
* ``bench/bench_eval.py`` times it as the "reference-style" baseline.

``sort_kind`` defaults to ``'stable'`` (ties resolve by gallery order).
The benchmark passes ``'quicksort'``, the authors' default ``np.argsort``, so the
baseline is not slowed by a sort the authors never paid for (random float
distances have no ties, so the results are identical).
"""
import math

import numpy as np


def _ap_inp(hits):
    """AP and INP of one query from its 0/1 match vector over the kept ranking."""
    ranks = np.flatnonzero(hits) + 1          # 1-based ranks of the true matches
    n = len(ranks)
    ap = float(np.mean(np.arange(1, n + 1) / ranks))   # precision at each match
    inp = n / float(ranks[-1])                          # #matches / rank of last match
    return ap, inp


def _pad_flat(curve, length):
    """Cut the curve to ``length``; a shorter one stays flat at its last value."""
    curve = curve[:length]
    if len(curve) < length:
        curve = np.concatenate([curve, np.full(length - len(curve), curve[-1])])
    return curve


def _average(per_query, length):
    """Mean CMC (cut or padded to ``length``), mAP and mINP over the ``(cmc, hits)`` of the
    valid queries."""
    rows = [(_pad_flat(cmc, length), *_ap_inp(hits)) for cmc, hits in per_query]
    if not rows:
        raise ValueError("no valid query")
    cmc, ap, inp = zip(*rows)
    return np.mean(cmc, axis=0), float(np.mean(ap)), float(np.mean(inp))


def eval_sysu_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20,
                         sort_kind="stable"):
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)

    def per_query():
        for i in range(len(distmat)):
            order = np.argsort(distmat[i], kind=sort_kind)
            # SYSU rule: a cam-3 query never sees cam-2 gallery images (any id).
            remove = (q_camids[i] == 3) & (g_camids[order] == 2)
            ranked = g_pids[order][~remove]
            hits = (ranked == q_pids[i]).astype(np.int64)
            if not hits.any():
                continue                      # id absent from the kept gallery: skipped
            # CMC over the ranked list of unique ids, first occurrence kept.
            _, first_idx = np.unique(ranked, return_index=True)
            unique_ranked = np.array([ranked[j] for j in sorted(first_idx)])
            yield np.minimum((unique_ranked == q_pids[i]).cumsum(), 1).astype(np.float64), hits

    return _average(per_query(), min(max_rank, distmat.shape[1]))


def eval_regdb_reference(distmat, q_pids, g_pids, max_rank=20, sort_kind="stable"):
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)

    def per_query():
        for i in range(len(distmat)):
            order = np.argsort(distmat[i], kind=sort_kind)
            hits = (g_pids[order] == q_pids[i]).astype(np.int64)
            if hits.any():
                # Standard (market-style) CMC over the raw ranking.
                yield np.minimum(hits.cumsum(), 1).astype(np.float64), hits

    return _average(per_query(), min(max_rank, distmat.shape[1]))


def reference_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al., CVPR 2017, Eqs. 1-12, with rerank.py's stated conventions: neighbours
    in the joint query+gallery set, N(i, k) = first k+1 of i's stable ranking (i itself
    first), k1 // 2 for the expansion sets, QE over the first k2 of the ranking."""
    nq, ng = len(q_g), len(g_g)
    n = nq + ng
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i < nq and j < nq:
                d[i][j] = float(q_q[i][j])
            elif i < nq:
                d[i][j] = float(q_g[i][j - nq])
            elif j < nq:
                d[i][j] = float(q_g[j][i - nq])
            else:
                d[i][j] = float(g_g[i - nq][j - nq])
    ranking = [sorted(range(n), key=lambda j, i=i: (d[i][j], j)) for i in range(n)]

    def neighbours(i, k):                      # N(i, k)
        return set(ranking[i][:min(k + 1, n)])

    memo = {}

    def reciprocal(i, k):                      # R(i, k), Eq. 3
        if (i, k) not in memo:
            memo[i, k] = {j for j in neighbours(i, k) if i in neighbours(j, k)}
        return memo[i, k]

    v = []
    for p in range(n):
        r_p = reciprocal(p, k1)
        r_star = set(r_p)
        for q in r_p:                          # Eq. 4 (the 2/3 rule in integers: no rounding)
            r_q = reciprocal(q, k1 // 2)
            if 3 * len(r_p & r_q) > 2 * len(r_q):
                r_star |= r_q
        v.append({j: math.exp(-d[p][j]) for j in r_star})     # Eq. 7
    kk = min(k2, n)
    v_qe = []
    for p in range(n):                         # Eq. 11
        acc = {}
        for i in ranking[p][:kk]:
            for j, w in v[i].items():
                acc[j] = acc.get(j, 0.0) + w / kk
        v_qe.append(acc)
    out = np.zeros((nq, ng))
    for p in range(nq):
        for g in range(ng):
            a, b = v_qe[p], v_qe[nq + g]
            num = den = 0.0
            for j in set(a) | set(b):          # Eq. 10
                num += min(a.get(j, 0.0), b.get(j, 0.0))
                den += max(a.get(j, 0.0), b.get(j, 0.0))
            jac = 1 - num / den if den > 0 else 1.0
            out[p][g] = (1 - lambda_value) * jac + lambda_value * d[p][nq + g]   # Eq. 12
    return out
