"""SYSU-MM01, RegDB and LLCM evaluation (docs/EVALUATION.md): CMC, mAP and mINP,
vectorised.

Semantics are those of the widely used AGW/DDAG evaluation (see ``eval_sysu``);
``eval_reference.py`` is the straightforward per-query version that the
tests compare against. numpy only (no torch import), so it runs anywhere.

How it is fast (none of this changes a result):

* No Python loop over queries: queries are processed in chunks of rows, and
  within a chunk every step is a whole-array numpy operation.
* The SYSU camera rule (cam-3 queries never see cam-2 gallery images) is a
  rectangular mask, so cam-3 queries are evaluated against the gallery without
  its cam-2 columns. Dropping columns keeps the order of the others, so their
  ranking is unchanged. The LLCM rule (drop the query's own id seen by its own
  camera) depends on the id too, so there the chunks are per (id, camera); this
  loop over a few thousand groups is the one Python loop, about 1 s for a
  full-size LLCM trial.
* No argsort: AP, INP and CMC only need the rank of each TRUE match, i.e. the
  number of distances smaller than it (plus, for exact ties, the equal ones
  earlier in gallery order: the stable-sort rule). One ``np.sort`` of the
  distances (numpy's SIMD sort, several times faster than a stable argsort) and
  a batched binary search for the few matches per query give exactly that.
* The rank of the true id among UNIQUE gallery ids needs no de-duplicated list:
  it is the number of other ids having an item closer than the first match, one
  ``logical_or.reduceat`` over the gallery columns grouped by id.
"""
import numpy as np

import rerank

__all__ = ["eval_sysu", "eval_regdb", "eval_llcm", "evaluate_trials", "format_metrics"]

# Rows per chunk are chosen so a chunk holds about this many distances: big
# enough to amortise numpy's per-call overhead, small enough to stay in cache.
_CHUNK_ELEMS = 1 << 18

def _check_inputs(distmat, q_pids, g_pids, q_camids=None, g_camids=None, max_rank=20):
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {distmat.shape}")
    if not (np.issubdtype(distmat.dtype, np.floating) or np.issubdtype(distmat.dtype, np.integer)):
        raise ValueError(f"distmat must be a real-valued array, got dtype {distmat.dtype}")
    num_q, num_g = distmat.shape
    arrays = {"q_pids": (q_pids, num_q), "g_pids": (g_pids, num_g)}
    if q_camids is not None:
        arrays.update(q_camids=(q_camids, num_q), g_camids=(g_camids, num_g))
    out = [distmat]
    for name, (arr, n) in arrays.items():
        arr = np.asarray(arr)
        if arr.ndim > 1 and arr.size == n:     # e.g. a column vector
            arr = arr.reshape(-1)
        if arr.ndim != 1 or len(arr) != n:
            raise ValueError(f"{name} must be 1-D of length {n} to match distmat {distmat.shape}, "
                             f"got shape {np.shape(arr)}")
        out.append(arr)
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    return out


def _encode_ids(q_pids, g_pids):
    """Map ids to 0..U-1 over the gallery ids; a query id absent from the gallery -> -1."""
    uniq, g_codes = np.unique(g_pids, return_inverse=True)
    g_codes = g_codes.reshape(-1).astype(np.intp)
    if len(uniq) == 0:
        return np.full(len(q_pids), -1, dtype=np.intp), g_codes, 0
    pos = np.searchsorted(uniq, q_pids).clip(0, len(uniq) - 1)
    q_codes = np.where(uniq[pos] == q_pids, pos, -1).astype(np.intp)
    return q_codes, g_codes, len(uniq)


def _match_ranks(sorted_rows, targets):
    """Number of entries of each sorted row smaller than each of that row's targets.

    A branch-free binary search run for all rows at once (numpy's searchsorted
    is 1-D only): ``pos`` grows by decreasing powers of two while the entry just
    before the candidate position is still smaller than the target. Every
    target must be <= its row's maximum (true here: targets are row entries).
    """
    n, g = sorted_rows.shape
    flat = sorted_rows.reshape(-1)
    row_last = (np.arange(n, dtype=np.intp) * g + (g - 1))[:, None]
    pos = np.zeros(targets.shape, dtype=np.intp)
    step = 1 << (g.bit_length() - 1)
    while step:
        # entry before candidate pos + step, clipped to the row's last entry
        # (which is never smaller than a target, so the clip is harmless)
        idx = np.minimum(pos + (step - g), 0)
        idx += row_last
        pos += (flat[idx] < targets) * step
        step >>= 1
    return pos


def _id_table(codes):
    """Where each id's items are, for per-query match lookups and per-id reductions.

    Returns ``table`` [ids present, L]: row k lists the positions (ascending) of
    the k-th id present in ``codes``, padded by repeating its first position;
    ``table_codes`` (the id code of each row), ``block_len`` (each row's true
    length), ``order`` (all positions grouped by id, so that id k occupies
    ``order[start[k]:start[k] + block_len[k]]``) and ``start``.
    """
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    start = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    block_len = np.diff(np.r_[start, len(codes)])
    j = np.arange(block_len.max())
    table = order[start[:, None] + np.where(j < block_len[:, None], j, 0)]
    return table, sorted_codes[start], block_len, order, start


def _query_stats(distmat, rows, cols, q_codes, g_codes, n_codes, unique_ids, out):
    """Rank the gallery columns ``cols`` for the queries ``rows`` and fill ``out``.

    ``out`` holds per-query arrays (indexed by the original query index):
    ``valid`` (the query's id has at least one item among ``cols``), ``first``
    (0-based CMC rank of the true id: among unique ids if ``unique_ids`` else
    in the raw ranking), ``ap`` and ``inp``.

    The rank of gallery item j in a stable ascending sort is
    ``#{i: d_i < d_j} + #{i: d_i == d_j, i < j}``. The first term is a binary
    search in the row's sorted distances; the second is non-zero only for
    exact ties, which are detected and counted for those few items only.
    """
    num_g = len(cols)
    if len(rows) == 0 or num_g == 0:
        return
    table, table_codes, block_len, order, start = _id_table(g_codes[cols])
    slot_of_code = np.full(n_codes, -1, dtype=np.intp)
    slot_of_code[table_codes] = np.arange(len(table_codes))
    # A gallery stored id by id (as protocols reads it) needs no regrouping
    # for the per-id reductions.
    grouped = np.array_equal(order, np.arange(num_g))

    def per_id(ufunc, values):
        """ufunc-reduce ``values[:, items of each id]`` -> [rows, ids present]."""
        return ufunc.reduceat(values if grouped else values.take(order, axis=1), start, axis=1)

    all_cols = num_g == distmat.shape[1]          # cols is then arange(num_g)
    gallery_pos = np.arange(num_g)
    # float16 -> float32 and integers -> float64 are exact conversions (ints up to 2**53).
    work_dtype = np.float32 if distmat.dtype in (np.float16, np.float32) else np.float64

    chunk = max(1, _CHUNK_ELEMS // num_g)
    for c0 in range(0, len(rows), chunk):
        r = rows[c0:c0 + chunk]
        q = q_codes[r]
        slot = np.where(q >= 0, slot_of_code[q], -1)    # -1: id absent from these columns
        cnt = np.where(slot >= 0, block_len[slot], 0)  # number of true matches
        valid = cnt > 0
        out["valid"][r] = valid
        if not valid.any():
            continue
        keep = np.flatnonzero(valid)
        r, slot, cnt = r[keep], slot[keep], cnt[keep]
        n = len(r)
        if not all_cols:
            x = distmat.take(r, axis=0).take(cols, axis=1)
        elif r[-1] - r[0] == n - 1:
            x = distmat[r[0]:r[-1] + 1]         # consecutive rows: a view, no copy
        else:
            x = distmat.take(r, axis=0)
        x = x.astype(work_dtype, copy=False)    # x is read-only below
        srt = np.sort(x, axis=1)
        if np.isnan(srt[:, -1]).any():            # NaN sorts last
            raise ValueError("distmat contains NaN distances; cannot rank the gallery")

        # Distances of each query's true matches (padding masked out below).
        j = np.arange(int(cnt.max()))
        in_block = j < cnt[:, None]
        mcol = table[slot][:, :len(j)]          # gallery positions of the matches
        mval = np.take_along_axis(x, mcol, axis=1)
        pos = _match_ranks(srt, mval)           # number of strictly smaller distances
        # A match is tied iff the next sorted distance equals it; then count
        # the equal distances earlier in gallery order (stable sort semantics).
        nxt = np.take_along_axis(srt, np.minimum(pos + 1, num_g - 1), axis=1)
        tied = in_block & (pos + 1 < num_g) & (nxt == mval)
        if tied.any():
            tr, tm = np.nonzero(tied)
            before = gallery_pos[None, :] < mcol[tr, tm][:, None]
            before &= x[tr] == mval[tr, tm][:, None]
            pos[tr, tm] += before.sum(axis=1)
        pos[~in_block] = num_g                  # padding ranks after everything
        pos.sort(axis=1)                        # k-th match <-> k-th smallest rank

        prec = (j + 1.0) / (pos + 1.0)          # precision at each match
        prec[~in_block] = 0.0
        out["ap"][r] = prec.sum(axis=1) / cnt
        out["inp"][r] = cnt / (pos[np.arange(n), cnt - 1] + 1.0)
        if not unique_ids:
            out["first"][r] = pos[:, 0]
            continue
        # Rank among unique ids = number of other ids whose first item ranks
        # before the true id's first match: ids with an item strictly closer
        # than that match, plus (ties only) ids whose closest item is at
        # exactly the same distance but earlier in gallery order.
        mine = np.where(in_block, mval, np.inf).min(axis=1)
        closer_ids = per_id(np.logical_or, x < mine[:, None])     # [n, ids present]
        first = np.count_nonzero(closer_ids, axis=1)
        # Rows whose FIRST match is tied with some other distance.
        maybe = np.flatnonzero((tied & (mval == mine[:, None])).any(axis=1))
        if len(maybe):
            at_mine = np.where(x[maybe] == mine[maybe, None], gallery_pos, num_g)
            earliest = per_id(np.minimum, at_mine)   # earliest position at that distance
            own = earliest[np.arange(len(maybe)), slot[maybe]]
            first[maybe] += np.count_nonzero((earliest < own[:, None]) & ~closer_ids[maybe],
                                             axis=1)
        out["first"][r] = first


def _summarise(out, length):
    valid = out["valid"]
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("no valid query: no query identity appears in the (kept) gallery; "
                         "check that query and gallery ids come from the same split")
    first = out["first"][valid]
    counts = np.bincount(first[first < length], minlength=length)
    cmc = np.cumsum(counts) / n_valid
    return cmc.astype(np.float64), float(np.mean(out["ap"][valid])), \
        float(np.mean(out["inp"][valid]))


def _new_out(num_q):
    return {"valid": np.zeros(num_q, dtype=bool), "first": np.zeros(num_q, dtype=np.intp),
            "ap": np.zeros(num_q), "inp": np.zeros(num_q)}


def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """SYSU-MM01 CMC / mAP / mINP (the AGW/DDAG protocol).

    ``distmat[i, j]`` is the distance between query i and gallery j (smaller =
    more similar; the scripts pass ``-similarity``).

    * Each query ranks the gallery by ascending distance; ties resolve by gallery
      order (a stable sort).
    * Gallery items from camera 2 are removed for queries from camera 3,
      regardless of identity.
    * CMC is over the ranked list of UNIQUE gallery ids (first occurrence kept):
      query curve = cumulative match over that list, clipped to 1.
    * mAP and mINP are over the raw kept ranking: AP = mean over the matches of
      the precision at each match; INP = #matches / rank of the last match.
    * Queries with no match in the kept gallery are skipped (not averaged).

    Returns ``(cmc, mAP, mINP)``: ``cmc`` a float64 array of length
    ``min(max_rank, #gallery)``, the mean over valid queries (where a query has
    fewer unique ids than that, its curve stays flat at its last value);
    ``mAP`` and ``mINP`` floats in [0, 1]. Raises ValueError if no query is valid.
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    num_q, num_g = distmat.shape
    q_codes, g_codes, n_codes = _encode_ids(q_pids, g_pids)
    out = _new_out(num_q)
    cam3 = q_camids == 3
    all_cols = np.arange(num_g)
    _query_stats(distmat, np.flatnonzero(cam3), all_cols[g_camids != 2], q_codes, g_codes,
                 n_codes, True, out)
    _query_stats(distmat, np.flatnonzero(~cam3), all_cols, q_codes, g_codes, n_codes, True,
                 out)
    return _summarise(out, min(int(max_rank), num_g))


def eval_regdb(distmat, q_pids, g_pids, max_rank=20):
    """RegDB CMC / mAP / mINP: the standard protocol, no camera filter.

    CMC is the standard (market-style) one over the raw ranking (no unique-id
    de-duplication); AP, INP, tie-breaking, skipped queries and the returned
    shapes are as in :func:`eval_sysu`.
    """
    distmat, q_pids, g_pids = _check_inputs(distmat, q_pids, g_pids, max_rank=max_rank)
    num_q, num_g = distmat.shape
    q_codes, g_codes, n_codes = _encode_ids(q_pids, g_pids)
    out = _new_out(num_q)
    _query_stats(distmat, np.arange(num_q), np.arange(num_g), q_codes, g_codes, n_codes,
                 False, out)
    return _summarise(out, min(int(max_rank), num_g))


def eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """LLCM CMC / mAP / mINP (the DEEN authors' evaluation).

    As :func:`eval_sysu` (unique-id CMC, AP/INP over the kept ranking, stable ties,
    queries without a kept match skipped) except for the camera rule: for each query,
    the gallery items of the SAME identity taken by the SAME camera number are removed.
    LLCM numbers the visible and near-infrared cameras alike (``cam<k>`` under both
    ``test_vis/`` and ``test_nir/``), so the rule compares numbers across modalities.
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    num_q, num_g = distmat.shape
    q_codes, g_codes, n_codes = _encode_ids(q_pids, g_pids)
    out = _new_out(num_q)
    all_cols = np.arange(num_g)
    # Queries sharing (id, camera) share the removed columns: rank each such group
    # against the gallery without them. Queries whose id is absent stay invalid.
    rows = np.flatnonzero(q_codes >= 0)
    keys, group = np.unique(np.stack([q_codes[rows], q_camids[rows]]), axis=1,
                            return_inverse=True)
    group = group.reshape(-1)
    members = np.split(rows[np.argsort(group, kind="stable")],
                       np.cumsum(np.bincount(group, minlength=keys.shape[1]))[:-1])
    untouched = []
    for (code, cam), r in zip(keys.T, members):
        same = (g_codes == code) & (g_camids == cam)
        if same.any():
            _query_stats(distmat, r, all_cols[~same], q_codes, g_codes, n_codes, True, out)
        else:
            untouched.append(r)
    if untouched:    # one pass for every query with nothing to remove
        _query_stats(distmat, np.sort(np.concatenate(untouched)), all_cols, q_codes, g_codes,
                     n_codes, True, out)
    return _summarise(out, min(int(max_rank), num_g))


def _mean_metrics(results):
    """Mean of several (cmc, mAP, mINP); curves of unequal length are padded flat."""
    length = max(len(c) for c, _, _ in results)
    curves = [np.concatenate([c, np.full(length - len(c), c[-1])]) for c, _, _ in results]
    return (np.mean(curves, axis=0), float(np.mean([m for _, m, _ in results])),
            float(np.mean([m for _, _, m in results])))


def evaluate_trials(q_feats, q_pids, q_cams, g_feats, g_pids, g_cams, trial_index, score,
                    max_rank=20, swap=False, rerank_args=None):
    """Evaluate every gallery trial from features extracted once.

    ``g_feats``/``g_pids``/``g_cams`` describe the UNION of the trial galleries and
    ``trial_index`` holds, per trial, the index array of that trial's gallery into the
    union (``data_manager.sysu_gallery_trials``). Features are L2-normalised, so the
    distance is ``-(q @ g.T)``; the similarity to the union is computed once and sliced per
    trial. ``score(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)`` is the benchmark's
    evaluator (:func:`eval_sysu`, :func:`eval_llcm`, or :func:`eval_regdb` ignoring the
    cameras). ``swap`` makes the trial's gallery items the ranking rows and the queries the
    ranked columns (LLCM's published visible-to-infrared scoring). ``rerank_args`` (a dict of
    k1, k2, lambda_value): each trial's distances are k-reciprocal re-ranked first
    (``rerank.re_ranking`` of the squared Euclidean distances; the neighbours come from the
    queries and that trial's gallery).

    Returns ``(per_trial, mean)``: a list of ``(cmc, mAP, mINP)`` per trial and their mean
    (cmc averaged elementwise).
    """
    q_feats, g_feats = np.asarray(q_feats), np.asarray(g_feats)
    if q_feats.ndim != 2 or g_feats.ndim != 2 or q_feats.shape[1] != g_feats.shape[1]:
        raise ValueError(f"features must be 2-D with the same width, got query {q_feats.shape} "
                         f"and gallery {g_feats.shape}")
    g_pids, g_cams = np.asarray(g_pids), np.asarray(g_cams)
    if len(trial_index) == 0:
        raise ValueError("trial_index is empty: no gallery trial to evaluate")
    if rerank_args is not None:   # the distance blocks once, sliced per trial
        q_g, q_q, g_g = rerank.distance_blocks(q_feats, g_feats)
    else:
        sim = q_feats @ g_feats.T
    per_trial = []
    for idx in trial_index:
        idx = np.asarray(idx)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.intp, copy=False)
        if rerank_args is not None:
            dist = rerank.re_ranking(q_g[:, idx], q_q, g_g[np.ix_(idx, idx)], **rerank_args)
        else:
            dist = sim[:, idx]                    # a fresh copy: negate it in place
            np.negative(dist, out=dist)
        if swap:
            per_trial.append(score(np.ascontiguousarray(dist.T), g_pids[idx], q_pids, g_cams[idx],
                                   q_cams, max_rank))
        else:
            per_trial.append(score(dist, q_pids, g_pids[idx], q_cams, g_cams[idx], max_rank))
    return per_trial, _mean_metrics(per_trial)


def format_metrics(name, cmc, mAP, mINP):
    """The authors' result line, e.g. ``POOL:   Rank-1: 50.00% | ... | mINP: 20.00%``.

    Rank-k beyond the end of a short curve reads its last value.
    """
    cmc = np.asarray(cmc, dtype=np.float64).reshape(-1)
    if cmc.size == 0:
        raise ValueError("format_metrics: empty CMC curve")

    def rank(k):
        return cmc[min(k, cmc.size) - 1]

    return ("{}:   Rank-1: {:.2%} | Rank-5: {:.2%} | Rank-10: {:.2%}| Rank-20: {:.2%}| "
            "mAP: {:.2%}| mINP: {:.2%}").format(name, rank(1), rank(5), rank(10), rank(20),
                                                mAP, mINP)
