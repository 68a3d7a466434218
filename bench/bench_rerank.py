"""Benchmark: rerank.py (vectorised, sparse) vs the slow per-probe reference from the paper.

    python bench/bench_rerank.py [--ref_query 400 --ref_gallery 800] [--query 3803 --gallery 6197]

1. Side by side on the same input, at a size where the reference (eval_reference.py:
   plain Python loops and sets, written literally from the paper's equations) takes ~10-20 s:
   times, their ratio and the largest difference of the two outputs.
2. Ours alone at SYSU-MM01 multi-shot size, n = Nq + Ng = 10,000 items (3,803 IR queries as
   in the real test set): time (best of ``--repeat``) and peak memory. The peak is what
   numpy/scipy allocate above what is held before the call (tracemalloc), for
   ``re_ranking`` on the three given distance blocks and for ``rerank_features`` (which also
   builds those blocks from the features), and in units of ONE n x n float32 matrix.

Inputs: L2-normalised features of noisy identity prototypes (96 ids, like the SYSU test
set), squared Euclidean distances, default k1=20, k2=6, lambda=0.3.
"""
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import rerank  # noqa: E402
from eval_reference import reference_rerank  # noqa: E402

NUM_IDS = 96
FEAT_DIM = 256
NOISE = 1.0


def features(rng, nq, ng):
    protos = rng.standard_normal((NUM_IDS, FEAT_DIM)) / np.sqrt(FEAT_DIM)
    out = []
    for n in (nq, ng):
        f = protos[rng.integers(NUM_IDS, size=n)] + NOISE / np.sqrt(FEAT_DIM) * \
            rng.standard_normal((n, FEAT_DIM))
        out.append((f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32))
    return out


def peak_extra(fn):
    """(result, peak bytes allocated by ``fn`` above what was held before it)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return out, peak


def main():
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref_query", type=int, default=400, help="queries of the side-by-side case")
    ap.add_argument("--ref_gallery", type=int, default=800, help="gallery of the side-by-side case")
    ap.add_argument("--query", type=int, default=3803, help="queries of the large case")
    ap.add_argument("--gallery", type=int, default=6197, help="gallery of the large case")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of ours; the best is kept")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in ("ref_query", "ref_gallery", "query", "gallery", "repeat"):
        if getattr(args, name) < 1:
            raise cli.UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    rng = np.random.default_rng(args.seed)

    print(f"re-ranking benchmark: k1=20 k2=6 lambda=0.3, {NUM_IDS} ids, {FEAT_DIM}-d features; "
          "reference = per-probe loops and sets (eval_reference.py)")
    d = rerank.distance_blocks(*features(rng, args.ref_query, args.ref_gallery))
    t = time.perf_counter()
    ref = reference_rerank(*d)
    t_ref = time.perf_counter() - t
    t_ours = min(_timed(lambda: rerank.re_ranking(*d))[0] for _ in range(args.repeat))
    diff = float(np.abs(rerank.re_ranking(*d) - ref).max())
    n = args.ref_query + args.ref_gallery
    print(f"{'case':<34} {'ours s':>9} {'ref s':>9} {'ratio':>8}  max |ours - ref|")
    print(f"{f'side by side, {args.ref_query} x {args.ref_gallery} (n={n})':<34} {t_ours:9.4f} "
          f"{t_ref:9.2f} {t_ref / t_ours:7.0f}x  {diff:.1e}")

    qf, gf = features(rng, args.query, args.gallery)
    d = rerank.distance_blocks(qf, gf)
    n = args.query + args.gallery
    nn_mb = n * n * 4 / 2**20
    t_ours = min(_timed(lambda: rerank.re_ranking(*d))[0] for _ in range(args.repeat))
    _, peak = peak_extra(lambda: rerank.re_ranking(*d))
    del d
    t = time.perf_counter()
    _, peak_feat = peak_extra(lambda: rerank.rerank_features(qf, gf))
    t_feat = time.perf_counter() - t
    print(f"ours alone, {args.query} x {args.gallery} (n={n:,}): re_ranking {t_ours:.2f} s, peak extra "
          f"{peak / 2**20:.0f} MiB = {peak / 2**20 / nn_mb:.2f} x one n x n float32 ({nn_mb:.0f} MiB)")
    print(f"  rerank_features (distances built too): {t_feat:.2f} s under tracemalloc, peak extra "
          f"{peak_feat / 2**20:.0f} MiB = {peak_feat / 2**20 / nn_mb:.2f} x n x n float32; process "
          f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


if __name__ == "__main__":
    cli.cli(main)
