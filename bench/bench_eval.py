"""Benchmark: vectorised eval_metrics vs the per-query reference-style evaluation.

    python bench/bench_eval.py [--repeat N] [--dtype float32|float64] [--seed S]

Three real-size cases with realistic ids/cameras (docs/EVALUATION.md) and realistic distances
(``-(q @ g.T)`` of L2-normalised features of noisy identity prototypes, float32 like
the fine-tuning pipeline's features):

* SYSU-MM01 all-search single-shot: 3,803 IR queries (cams 3/6) x 301 gallery
  (96 ids, RGB cams 1,2,4,5, one image per existing id/camera folder);
* SYSU-MM01 all-search multi-shot: 3,803 x 3,010 (ten images per folder);
* RegDB visible -> thermal: 2,060 x 2,060 (206 ids x 10 images).

For each case both implementations are timed alternately ``--repeat`` times and the
best time of each is kept (robust to other load on the machine). The timed reference
is ``eval_reference.py`` with numpy's default (quicksort) ``argsort`` -- the
cost the authors' per-query code pays. Correctness is checked against the same
reference run once, untimed, with the stable sort the protocol needs (ties by gallery order): float32
similarities do contain exact ties, which a quicksort may order either way.

The headline speed-up is the TOTAL reference time over the TOTAL vectorised time
of the three cases (dominated by the multi-shot case, the slowest one).
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402
import eval_metrics  # noqa: E402
from eval_reference import eval_regdb_reference, eval_sysu_reference  # noqa: E402

FEAT_DIM = 64
NOISE = 0.22          # per-coordinate feature noise: Rank-1 around 50-60%, like real models


def _features(rng, pids, protos, modality_shift):
    f = protos[pids] + modality_shift + NOISE * rng.standard_normal((len(pids), FEAT_DIM))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f


def make_sysu(rng, shots, dtype):
    """Query/gallery ids and cameras shaped like the SYSU-MM01 all-search test set."""
    num_ids, num_q = 96, 3803
    ids = np.arange(num_ids)
    # queries: ~40 IR images per id from cams 3 and 6, ordered id-major (as read from disk)
    per_id = np.full(num_ids, num_q // num_ids)
    per_id[:num_q % num_ids] += 1
    q_pids = np.repeat(ids, per_id)
    q_cams = np.where(rng.random(num_q) < 0.5, 3, 6)
    q_cams = np.concatenate([np.sort(q_cams[q_pids == i]) for i in ids])
    # gallery: 301 of the 96 x 4 (id, RGB camera) folders exist; every id keeps one
    pairs = [(i, c) for i in ids for c in (1, 2, 4, 5)]
    must = {4 * i + rng.integers(4) for i in ids}
    optional = [k for k in range(len(pairs)) if k not in must]
    chosen = sorted(must | set(rng.choice(optional, 301 - len(must), replace=False).tolist()))
    g_pids = np.repeat([pairs[k][0] for k in chosen], shots)
    g_cams = np.repeat([pairs[k][1] for k in chosen], shots)
    protos = rng.standard_normal((num_ids, FEAT_DIM)) / np.sqrt(FEAT_DIM)
    shift = 0.3 * rng.standard_normal(FEAT_DIM) / np.sqrt(FEAT_DIM)
    qf = _features(rng, q_pids, protos, shift).astype(dtype)
    gf = _features(rng, g_pids, protos, -shift).astype(dtype)
    return -(qf @ gf.T), q_pids, g_pids, q_cams, g_cams


def make_regdb(rng, dtype):
    num_ids = 206
    pids = np.repeat(np.arange(num_ids), 10)
    protos = rng.standard_normal((num_ids, FEAT_DIM)) / np.sqrt(FEAT_DIM)
    shift = 0.3 * rng.standard_normal(FEAT_DIM) / np.sqrt(FEAT_DIM)
    qf = _features(rng, pids, protos, shift).astype(dtype)
    gf = _features(rng, pids, protos, -shift).astype(dtype)
    return -(qf @ gf.T), pids, pids.copy()


def _best_times(fn_a, fn_b, repeat):
    """Best wall time of each of two callables, run alternately; their last results."""
    best = [np.inf, np.inf]
    out = [None, None]
    for _ in range(repeat):
        for k, fn in enumerate((fn_a, fn_b)):
            t = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best, out


def _same(a, b, atol=1e-10):
    return (len(a[0]) == len(b[0]) and np.allclose(a[0], b[0], rtol=0, atol=atol)
            and abs(a[1] - b[1]) <= atol and abs(a[2] - b[2]) <= atol)


def main():
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5,
                    help="timed runs per implementation and case; the best is kept")
    ap.add_argument("--dtype", default="float32", help="feature/distance dtype")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.repeat < 1:
        raise cli.UserError(f"--repeat must be >= 1, got {args.repeat}")
    cli.choice_check("--dtype", args.dtype, ("float32", "float64"))
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)

    cases = []
    for name, shots in (("SYSU all single-shot", 1), ("SYSU all multi-shot", 10)):
        d, qp, gp, qc, gc = make_sysu(rng, shots, dtype)
        cases.append((name, d,
                      lambda d=d, qp=qp, gp=gp, qc=qc, gc=gc: eval_metrics.eval_sysu(d, qp, gp, qc, gc),
                      lambda d=d, qp=qp, gp=gp, qc=qc, gc=gc, k="quicksort":
                          eval_sysu_reference(d, qp, gp, qc, gc, sort_kind=k),
                      lambda d=d, qp=qp, gp=gp, qc=qc, gc=gc:
                          eval_sysu_reference(d, qp, gp, qc, gc, sort_kind="stable")))
    d, qp, gp = make_regdb(rng, dtype)
    cases.append(("RegDB visible->thermal", d,
                  lambda: eval_metrics.eval_regdb(d, qp, gp),
                  lambda: eval_regdb_reference(d, qp, gp, sort_kind="quicksort"),
                  lambda: eval_regdb_reference(d, qp, gp, sort_kind="stable")))

    print(f"eval benchmark: {dtype.name} distances, best of {args.repeat} alternating runs; "
          f"reference = per-query loop (eval_reference.py, default argsort)")
    print(f"{'case':<24} {'Q x G':>12} {'ours s':>9} {'ref s':>9} {'ratio':>7}  "
          f"{'Rank-1':>7} {'mAP':>7} {'mINP':>7}  check")
    total_ours = total_ref = 0.0
    all_ok = True
    for name, d, ours, ref, ref_stable in cases:
        (t_ours, t_ref), (res, res_ref) = _best_times(ours, ref, args.repeat)
        ok = _same(res, ref_stable())
        all_ok &= ok
        total_ours += t_ours
        total_ref += t_ref
        shape = f"{d.shape[0]} x {d.shape[1]}"
        print(f"{name:<24} {shape:>12} {t_ours:9.4f} {t_ref:9.4f} {t_ref / t_ours:6.1f}x  "
              f"{res[0][0]:7.2%} {res[1]:7.2%} {res[2]:7.2%}  "
              f"{'identical' if ok else 'MISMATCH'}"
              f"{'' if _same(res, res_ref) else ' (quicksort ties differ)'}")
    print(f"eval speed-up: {total_ref / total_ours:.1f}x ({total_ours:.3f} s vs {total_ref:.3f} s, "
          f"total over the {len(cases)} cases)")
    if not all_ok:
        raise cli.UserError("vectorised and reference results differ (see MISMATCH above)")


if __name__ == "__main__":
    cli.cli(main)
