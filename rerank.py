"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), written from the paper's equations.

    dist = rerank_features(q_feats, g_feats)              # [Nq, Ng] float32, smaller = closer
    dist = re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3)

Distances. :func:`re_ranking` takes SQUARED EUCLIDEAN distances (the paper's d(p, g_i), Eq. 1
with M = I). Its Gaussian kernel exp(-d) (Eq. 7) is not scale-free, so the scale matters:
for L2-normalised features d = 2 - 2 x.y lies in [0, 4]. The test scripts rank by -(q @ g.T);
:func:`rerank_features` turns L2-normalised features into these distances (:func:`sq_euclidean`,
the one conversion in the repository) and is what callers should use; :func:`distance_blocks`
gives the three blocks once for several galleries (slice them per trial).

What each item's neighbours are taken from: the JOINT set of all queries and gallery items,
n = Nq + Ng, whose distance matrix is [[q_q, q_g], [q_g.T, g_g]] (never built: rows are
assembled chunk by chunk). Definitions, all on a row's STABLE ascending ranking (ties by
index, so results are deterministic), with every k clipped to n:

* N(i, k): the first k + 1 items of row i: i itself (distance 0) and its k nearest others;
* R(i, k) = {j in N(i, k) : i in N(j, k)}                                      (Eq. 3)
* R*(p, k1) = R(p, k1) united with R(q, k1 // 2) for every q in R(p, k1) such that
  |R(p, k1) & R(q, k1 // 2)| > 2/3 |R(q, k1 // 2)|                            (Eq. 4)
  (strictly more, as this project specifies it; should the paper's text read >=, the two
  differ only when the overlap is exactly 2/3)
* V[p, j] = exp(-d(p, j)) for j in R*(p, k1), else 0                           (Eq. 7)
  (as the equation writes it: no per-row normalisation)
* local query expansion: V_p <- mean of V_i over the first k2 items of p's ranking
  (p itself first, so k2 = 1 leaves V unchanged); applied to every row       (Eq. 11)
* d_J(p, g) = 1 - sum_j min(V[p, j], V[g, j]) / sum_j max(V[p, j], V[g, j])   (Eq. 10)
  (taken as 1 when both rows are all zero: no shared evidence)
* d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g)                          (Eq. 12)

How it stays fast and small (n up to ~10,000 for SYSU-MM01 multi-shot): only the top
max(k1 + 1, k2) of each row is ranked (a partition plus a stable sort of those few, with
ties at the cut resolved by index exactly as a full stable sort would); the neighbour sets
and V are scipy.sparse matrices (about n * (k1 + 1) and n * k2 * |R*| entries), and the sum
of minima in Eq. 10 is an inverted-index product (each query entry V[p, j] meets the gallery
entries of column j only), accumulated chunk by chunk. Peak extra memory: the [Nq, Ng]
float32 output plus bounded chunks and the sparse matrices (bench/bench_rerank.py measures it).
"""
import numpy as np
import scipy.sparse as sp

__all__ = ["re_ranking", "rerank_features", "distance_blocks", "sq_euclidean"]

# Elements per dense working block (rows of the joint distance matrix, pair expansions).
_CHUNK_ELEMS = 1 << 22


def sq_euclidean(a, b):
    """Squared Euclidean distances ``[len(a), len(b)]`` (float32, clipped at 0). For
    L2-normalised rows this is ``2 - 2 a.b``, i.e. ``2 + 2 * dist`` for the test scripts'
    ``dist = -(q @ g.T)``."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    d = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :]
    d -= 2 * (a @ b.T)
    return np.maximum(d, 0, out=d)


def distance_blocks(q_feats, g_feats):
    """(q_g, q_q, g_g) squared Euclidean distances, the diagonals exactly 0 (rounding leaves
    tiny non-zero self distances; the definitions put each item first in its own ranking)."""
    q_q = sq_euclidean(q_feats, q_feats)
    g_g = sq_euclidean(g_feats, g_feats)
    np.fill_diagonal(q_q, 0)
    np.fill_diagonal(g_g, 0)
    return sq_euclidean(q_feats, g_feats), q_q, g_g


def rerank_features(q_feats, g_feats, k1=20, k2=6, lambda_value=0.3):
    """:func:`re_ranking` of the squared Euclidean distances of the features (L2-normalised
    ones: the test scripts' features). Returns the re-ranked ``[Nq, Ng]`` float32 distances."""
    return re_ranking(*distance_blocks(q_feats, g_feats), k1, k2, lambda_value)


class _Joint:
    """The joint distance matrix [[q_q, q_g], [q_g.T, g_g]] read in row blocks."""

    def __init__(self, q_g, q_q, g_g):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.nq, self.ng = q_g.shape
        self.n = self.nq + self.ng

    def row_blocks(self, rows_per_block):
        """Yield (first row, block [r, n]); a block never spans queries and gallery."""
        nq = self.nq
        for r0 in range(0, nq, rows_per_block):
            r1 = min(nq, r0 + rows_per_block)
            yield r0, np.hstack([self.q_q[r0:r1], self.q_g[r0:r1]])
        for r0 in range(0, self.ng, rows_per_block):
            r1 = min(self.ng, r0 + rows_per_block)
            yield nq + r0, np.hstack([self.q_g[:, r0:r1].T, self.g_g[r0:r1]])

    def gather(self, rows, cols):
        """d(rows[e], cols[e]) for index arrays into the joint set (float64)."""
        nq = self.nq
        out = np.empty(len(rows))
        rq, cq = rows < nq, cols < nq
        for m, block, r, c in ((rq & cq, self.q_q, rows, cols),
                               (rq & ~cq, self.q_g, rows, cols - nq),
                               (~rq & cq, self.q_g, cols, rows - nq),   # d(g, q) = q_g[q, g]
                               (~rq & ~cq, self.g_g, rows - nq, cols - nq)):
            out[m] = block[r[m], c[m]]
        return out


def _top_ranked(joint, K):
    """The first ``K`` columns of each row's stable ascending ranking -> int [n, K].

    A full stable argsort of every row would cost n log n per row and an n x n index
    array; the first K of it are exactly the K entries smallest by (distance, column):
    all entries below the K-th smallest value, plus the lowest-indexed entries equal to it.
    """
    n = joint.n
    top = np.empty((n, K), dtype=np.intp)
    for r0, x in joint.row_blocks(max(1, _CHUNK_ELEMS // n)):
        if not np.isfinite(x).all():
            raise ValueError("re_ranking: the distances contain NaN or infinite values")
        if K < n:
            kth = np.partition(x, K - 1, axis=1)[:, K - 1:K]
            keep = x < kth
            tie = x == kth
            need = K - keep.sum(axis=1, keepdims=True)
            if (tie.sum(axis=1, keepdims=True) > need).any():   # more ties than places left
                tie &= np.cumsum(tie, axis=1) <= need
            keep |= tie
            cols = np.nonzero(keep)[1].reshape(len(x), K)     # ascending column order per row
        else:
            cols = np.broadcast_to(np.arange(n), x.shape)
        order = np.argsort(np.take_along_axis(x, cols, axis=1), axis=1, kind="stable")
        top[r0:r0 + len(x)] = np.take_along_axis(cols, order, axis=1)
    return top


def _indicator(n, cols):
    """CSR 0/1 matrix [n, n] with ones at (i, cols[i, :]) (each row's columns distinct)."""
    rows_, width = cols.shape
    indptr = np.arange(0, rows_ * width + 1, width)
    return sp.csr_matrix((np.ones(rows_ * width, dtype=np.int32), cols.reshape(-1), indptr),
                         shape=(n, n))


def _reciprocal(top, k):
    """R(i, k) of Eq. 3 for all i as a CSR 0/1 matrix: j in N(i, k) and i in N(j, k)."""
    n = len(top)
    nk = _indicator(n, top[:, :min(k + 1, n)])
    return nk.multiply(nk.T).tocsr()


def _kernel_sets(top, joint, k1):
    """V of Eq. 7 (before query expansion) as CSR float64 [n, n]."""
    r = _reciprocal(top, k1)
    rh = _reciprocal(top, k1 // 2)
    # |R(p, k1) & R(q, k1/2)| for every q in R(p, k1): row p of R(k1) dotted with row q of
    # R(k1/2), kept on R(k1)'s pattern only
    overlap = (r @ rh.T).multiply(r).tocoo()
    size_h = np.diff(rh.indptr)
    keep = 3 * overlap.data > 2 * size_h[overlap.col]           # Eq. 4, in integers
    pick = sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.int32),
                          (overlap.row[keep], overlap.col[keep])), shape=r.shape)
    rstar = (r + pick @ rh).tocsr()                               # union: pattern of the sum
    rstar.sum_duplicates()
    rows = np.repeat(np.arange(len(top)), np.diff(rstar.indptr))
    weights = np.exp(-joint.gather(rows, rstar.indices))         # Eq. 7
    return sp.csr_matrix((weights, rstar.indices, rstar.indptr), shape=rstar.shape)


def _sum_of_minima(vq, vg, out):
    """out[p, g] = sum_j min(vq[p, j], vg[g, j]) (CSR rows vq, vg) via vg's columns.

    Only columns where both rows are non-zero contribute, so each query entry (p, j)
    is paired with the gallery entries of column j; query rows go in chunks so that
    the pairs of a chunk stay within a few million.
    """
    nq, ng = out.shape
    vg = vg.tocsc()
    col_len = np.diff(vg.indptr)
    pair_cum = np.r_[0, np.cumsum(col_len[vq.indices])][vq.indptr]   # pairs before row p
    max_rows = max(1, _CHUNK_ELEMS // max(ng, 1))
    r0 = 0
    while r0 < nq:
        r1 = int(np.searchsorted(pair_cum, pair_cum[r0] + _CHUNK_ELEMS, side="right")) - 1
        r1 = min(nq, r0 + max_rows, max(r1, r0 + 1))
        e0, e1 = vq.indptr[r0], vq.indptr[r1]
        cols, vals = vq.indices[e0:e1], vq.data[e0:e1]
        local = np.repeat(np.arange(r1 - r0), np.diff(vq.indptr[r0:r1 + 1]))
        cnt = col_len[cols]
        total = int(cnt.sum())
        # position of each pair in vg's data: the column's start plus 0..cnt-1
        pos = np.repeat(vg.indptr[cols] - (np.cumsum(cnt) - cnt), cnt) + np.arange(total)
        mins = np.minimum(np.repeat(vals, cnt), vg.data[pos])
        flat = np.repeat(local * ng, cnt) + vg.indices[pos]
        out[r0:r1] = np.bincount(flat, weights=mins, minlength=(r1 - r0) * ng).reshape(r1 - r0, ng)
        r0 = r1


def re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranked query-gallery distances (module docstring: the definitions).

    ``q_g`` [Nq, Ng], ``q_q`` [Nq, Nq], ``g_g`` [Ng, Ng]: squared Euclidean distances
    (symmetric ``q_q``/``g_g`` with zero diagonals). ``k1``, ``k2`` >= 1 (clipped to the
    joint set's size, so a gallery smaller than ``k1`` is fine); ``0 <= lambda_value <= 1``.
    Returns ``d*`` as float32 [Nq, Ng]: ``lambda_value = 1`` gives ``q_g`` back,
    ``lambda_value = 0`` the Jaccard distance alone.
    """
    q_g, q_q, g_g = (np.asarray(x) for x in (q_g, q_q, g_g))
    if q_g.ndim != 2 or q_q.shape != (len(q_g),) * 2 or g_g.shape != (q_g.shape[1],) * 2:
        raise ValueError(f"re_ranking: need q_g [Nq, Ng], q_q [Nq, Nq], g_g [Ng, Ng]; got "
                         f"{q_g.shape}, {q_q.shape}, {g_g.shape}")
    if int(k1) != k1 or int(k2) != k2 or k1 < 1 or k2 < 1:
        raise ValueError(f"re_ranking: k1 and k2 must be integers >= 1, got {k1}, {k2}")
    if not 0 <= lambda_value <= 1:
        raise ValueError(f"re_ranking: lambda_value must be in [0, 1], got {lambda_value}")
    k1, k2 = int(k1), int(k2)
    nq, ng = q_g.shape
    out = np.zeros((nq, ng), dtype=np.float32)
    if nq == 0 or ng == 0:
        return out
    joint = _Joint(q_g, q_q, g_g)
    n = joint.n
    top = _top_ranked(joint, min(n, max(k1 + 1, k2)))
    v = _kernel_sets(top, joint, k1)
    if k2 > 1:   # Eq. 11: rows averaged over the first k2 of each ranking
        kk = min(k2, n)
        v = sp.csr_matrix((_indicator(n, top[:, :kk]) @ v) / kk)
    _sum_of_minima(v[:nq], v[nq:], out)
    # Eq. 10 with sum(max) = sum(V_p) + sum(V_g) - sum(min), then Eq. 12, in row blocks
    # (out holds sum(min) and becomes d* in place)
    s_q = np.asarray(v[:nq].sum(axis=1)).reshape(-1)
    s_g = np.asarray(v[nq:].sum(axis=1)).reshape(-1)
    step = max(1, _CHUNK_ELEMS // ng)
    for r0 in range(0, nq, step):
        block = out[r0:r0 + step].astype(np.float64)
        denom = s_q[r0:r0 + step, None] + s_g[None, :] - block
        jac = np.ones_like(block)
        np.subtract(1.0, block / np.where(denom > 0, denom, 1.0), out=jac, where=denom > 0)
        out[r0:r0 + step] = (1 - lambda_value) * jac + lambda_value * q_g[r0:r0 + step]
    return out
