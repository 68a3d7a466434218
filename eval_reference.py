"""The readable definition of the SYSU / RegDB evaluation (docs/EVALUATION.md): the
per-query reference that the vectorised eval_metrics.py must equal.

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
