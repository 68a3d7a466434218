"""Straightforward per-query reference of the SYSU / RegDB evaluation (SPEC §2).

This is deliberately the slow, obviously-correct shape of the widely used
AGW/DDAG evaluation: one Python iteration per query, one ``np.argsort`` per row,
the cam-3/cam-2 removal, unique gallery ids through ``np.unique`` + a loop over
the first-occurrence indices. It is written from the SPEC text, independently of
``eval_metrics.py``, and serves two purposes (one copy, imported by both):

* ``tests/test_eval.py`` cross-checks the vectorised ``eval_metrics`` against it;
* ``bench/bench_eval.py`` times it as the "reference-style" baseline.

``sort_kind`` defaults to ``'stable'`` (SPEC: ties resolve by gallery order).
The benchmark passes ``'quicksort'``, the authors' default ``np.argsort``, so the
baseline is not slowed by a sort the authors never paid for (random float
distances have no ties, so the results are identical).
"""
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


def _reference_eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20,
                         sort_kind="stable"):
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    length = min(max_rank, num_g)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(num_q):
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
        cmc = np.minimum((unique_ranked == q_pids[i]).cumsum(), 1).astype(np.float64)
        all_cmc.append(_pad_flat(cmc, length))
        ap, inp = _ap_inp(hits)
        all_ap.append(ap)
        all_inp.append(inp)
    if not all_cmc:
        raise ValueError("no valid query")
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), float(np.mean(all_inp))


def _reference_eval_regdb(distmat, q_pids, g_pids, max_rank=20, sort_kind="stable"):
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    num_q, num_g = distmat.shape
    length = min(max_rank, num_g)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(num_q):
        order = np.argsort(distmat[i], kind=sort_kind)
        hits = (g_pids[order] == q_pids[i]).astype(np.int64)
        if not hits.any():
            continue
        # Standard (market-style) CMC over the raw ranking.
        cmc = np.minimum(hits.cumsum(), 1).astype(np.float64)
        all_cmc.append(_pad_flat(cmc, length))
        ap, inp = _ap_inp(hits)
        all_ap.append(ap)
        all_inp.append(inp)
    if not all_cmc:
        raise ValueError("no valid query")
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), float(np.mean(all_inp))
