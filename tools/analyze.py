"""Compare checkpoints through their saved test features (``--save_features``): the modality
gap, distance distributions, t-SNE and CMC, one file per checkpoint side by side.

    python tools/analyze.py mmgl.npz random.npz --out analysis/ [--head FC] [--ids 10]

Writes into ``--out``:

* ``tsne.png``: per file, the images of ``--ids`` identities (the same ones in every panel
  where the files share them), both modalities; colour = identity, marker = modality;
* ``distances.png``: per file, density histograms of the Euclidean distance (features are
  L2-normalised) of same-id and different-id pairs, each within a modality and across;
* ``modality_gap.json`` (and the same table printed): per file, the mean cross-modality and
  intra-modality same-id distances, their ratio (the "modality gap": 1 = crossing the
  modality costs nothing), the mean cross-modality different-id distance, the overlap of the
  cross-modality same-id and different-id histograms (histogram intersection: 0 = separable,
  1 = identical) and the head's Rank-1/mAP (``features.evaluate``, as the test scripts);
* ``cmc.png``: the CMC curves (Rank 1-20, mean over trials) of all files.

Pairs are all pairs of the file's query and gallery images; when there are more than
``--max_pairs`` of a kind (same id / different ids), that many are drawn (``--seed``).
"""
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")   # files only, no display; before pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402  (installed with scikit-learn)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import features  # noqa: E402
from cli import ArgumentParser, UserError, check_writable, cli  # noqa: E402

DPI = 100
PANEL = (4.0, 3.6)          # inches per panel: 400 x 360 pixels
MARKERS = {"rgb": "o", "ir": "^"}
KINDS = (("same", "intra"), ("same", "cross"), ("diff", "intra"), ("diff", "cross"))
STYLE = {("same", "intra"): ("C0", "-"), ("same", "cross"): ("C2", "-"),
         ("diff", "intra"): ("C3", "--"), ("diff", "cross"): ("C1", "--")}


def get_args_parser():
    p = ArgumentParser("analyze.py", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help=".npz feature files (features.save_features)")
    p.add_argument("--head", default=None, help="head to analyse (default: each file's last head)")
    p.add_argument("--labels", nargs="+", default=None, help="one name per file for the plots and "
                   "the table (default: the checkpoint file names)")
    p.add_argument("--out", default="analysis", help="output folder")
    p.add_argument("--ids", default=10, type=int, help="identities in the t-SNE plot")
    p.add_argument("--max_pairs", default=200000, type=int,
                   help="most pairs per kind (same id / different ids) for the distances")
    p.add_argument("--rerank", action="store_true",
                   help="also report Rank-1/mAP after k-reciprocal re-ranking (rerank.py)")
    p.add_argument("--seed", default=0, type=int)
    return p


# ----------------------------------------------------------------------------- numbers
def sample_pairs(ids, cap, rng):
    """{'same': (i, j), 'diff': (i, j)} index pairs i < j of images with the same / different
    ids: all of them, or ``cap`` drawn ones when there are more."""
    n = len(ids)
    same = []
    for members in np.split(np.argsort(ids, kind="stable"),
                            np.flatnonzero(np.diff(np.sort(ids))) + 1):
        a, b = np.triu_indices(len(members), 1)
        same.append(np.stack([members[a], members[b]]))
    same = np.concatenate(same, axis=1) if same else np.zeros((2, 0), dtype=np.intp)
    if same.shape[1] > cap:
        same = same[:, np.sort(rng.choice(same.shape[1], cap, replace=False))]
    if n * (n - 1) // 2 - same.shape[1] <= cap:      # few enough to take them all
        i, j = np.triu_indices(n, 1)
        keep = ids[i] != ids[j]
        diff = np.stack([i[keep], j[keep]])
    else:                                            # draws (with replacement) until cap
        chunks, got = [], 0
        while got < cap:
            i, j = rng.integers(n, size=(2, 2 * cap))
            keep = ids[i] != ids[j]
            chunks.append(np.stack([np.minimum(i, j)[keep], np.maximum(i, j)[keep]]))
            got += int(keep.sum())
        diff = np.concatenate(chunks, axis=1)[:, :cap]
    return {"same": same, "diff": diff}


def pair_distances(feats, i, j):
    """Euclidean distances of feats[i] and feats[j], in chunks of a few MB."""
    out = np.empty(len(i), dtype=np.float64)
    step = max(1, (1 << 20) // feats.shape[1])
    for s in range(0, len(i), step):
        diff = feats[i[s:s + step]] - feats[j[s:s + step]]
        out[s:s + step] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def file_stats(ff, head, args, rng):
    """Distances by kind and the summary numbers of one file."""
    feats = np.concatenate([ff.query_feats[head], ff.gallery_feats[head]]).astype(np.float32)
    ids = np.concatenate([ff.query_ids, ff.gallery_ids])
    modality = np.concatenate([ff.query_modality, ff.gallery_modality])
    dist = {}
    for same, (i, j) in sample_pairs(ids, args.max_pairs, rng).items():
        d = pair_distances(feats, i, j)
        cross = modality[i] != modality[j]
        dist[same, "cross"], dist[same, "intra"] = d[cross], d[~cross]
    _, (cmc, mAP, mINP) = features.evaluate(ff, head)
    mean = {k: float(v.mean()) if len(v) else float("nan") for k, v in dist.items()}
    row = {"file": ff.path, "label": ff.label, "head": head, "dataset": ff.dataset, "mode": ff.mode,
           "cross_same_id": mean["same", "cross"], "intra_same_id": mean["same", "intra"],
           "modality_gap": (mean["same", "cross"] / mean["same", "intra"]
                            if mean["same", "intra"] > 0 else float("nan")),
           "cross_diff_id": mean["diff", "cross"], "intra_diff_id": mean["diff", "intra"],
           "overlap": None, "rank1": float(cmc[0]), "mAP": mAP, "mINP": mINP,
           "pairs": {f"{s}_id_{m}": int(len(dist[s, m])) for s, m in KINDS}}
    if args.rerank:
        _, (cmc_r, mAP_r, _) = features.evaluate(ff, head, rerank=True)
        row.update(rerank_rank1=float(cmc_r[0]), rerank_mAP=mAP_r)
    return row, dist, cmc


def overlap(a, b, bins):
    """Histogram intersection of two samples on common bins: sum of min bin probabilities."""
    if not len(a) or not len(b):
        return float("nan")
    pa = np.histogram(a, bins)[0] / len(a)
    pb = np.histogram(b, bins)[0] / len(b)
    return float(np.minimum(pa, pb).sum())


# ----------------------------------------------------------------------------- plots
def _figure(panels):
    fig, axes = plt.subplots(1, panels, figsize=(PANEL[0] * panels, PANEL[1]), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)     # no bbox_inches="tight": the pixel size stays panels x 400 x 360
    plt.close(fig)


def plot_distances(rows, dists, bins, path):
    plt, fig, axes = _figure(len(rows))
    for ax, row, dist in zip(axes, rows, dists):
        for kind in KINDS:
            if len(dist[kind]):
                colour, ls = STYLE[kind]
                ax.hist(dist[kind], bins, density=True, histtype="step", color=colour, ls=ls, lw=1.4,
                        label=f"{kind[0]} id, {kind[1]}-modality (mean {dist[kind].mean():.2f})")
        ax.set_title(f"{row['label']} ({row['head']}): gap {row['modality_gap']:.2f}, "
                     f"overlap {row['overlap']:.2f}", fontsize=9)
        ax.set_xlabel("Euclidean distance (L2-normalised features)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    _save(plt, fig, path)


def tsne_ids(files, k, rng):
    """``k`` identities with images in both modalities: the same ones in every file when
    the files share such identities, else each file's own."""
    sets = []
    for ff in files:
        ids = np.concatenate([ff.query_ids, ff.gallery_ids])
        mod = np.concatenate([ff.query_modality, ff.gallery_modality])
        sets.append(set(ids[mod == "rgb"].tolist()) & set(ids[mod == "ir"].tolist()))
    common = set.intersection(*sets)
    if common:
        sets = [common] * len(files)
    return [sorted(rng.choice(sorted(s), min(k, len(s)), replace=False).tolist()) if s else []
            for s in sets]


def plot_tsne(files, heads, args, rng, path, per_id=20):
    plt, fig, axes = _figure(len(files))
    for ax, ff, head, ids_shown in zip(axes, files, heads, tsne_ids(files, args.ids, rng)):
        feats = np.concatenate([ff.query_feats[head], ff.gallery_feats[head]])
        ids = np.concatenate([ff.query_ids, ff.gallery_ids])
        mod = np.concatenate([ff.query_modality, ff.gallery_modality])
        take = []
        for pid in ids_shown:     # at most per_id images of each identity and modality
            for m in MARKERS:
                where = np.flatnonzero((ids == pid) & (mod == m))
                take.extend(sorted(rng.permutation(where)[:per_id].tolist()))
        ax.set_title(f"{ff.label} ({head}): {len(ids_shown)} ids", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(take) < 5:
            ax.text(0.5, 0.5, "too few images for t-SNE", ha="center", transform=ax.transAxes)
            continue
        tsne = TSNE(n_components=2, perplexity=min(30.0, (len(take) - 1) / 3), init="pca",
                    learning_rate="auto", random_state=args.seed)
        # a few hundred points: one thread is fast (~1 s), while OpenMP threads on a busy
        # machine spin-wait (measured 25x slower on 2 shared cores)
        with threadpool_limits(1, user_api="openmp"):
            emb = tsne.fit_transform(feats[take].astype(np.float32))
        colour = {pid: plt.get_cmap("tab10" if len(ids_shown) <= 10 else "tab20")(c % 20)
                  for c, pid in enumerate(ids_shown)}
        for m, marker in MARKERS.items():
            sel = mod[take] == m
            ax.scatter(emb[sel, 0], emb[sel, 1], c=[colour[p] for p in ids[take][sel]], marker=marker,
                       s=18, alpha=0.8, linewidths=0)
        ax.legend([Line2D([], [], color="grey", marker=mk, ls="") for mk in MARKERS.values()],
                  list(MARKERS), fontsize=7, loc="best")
    _save(plt, fig, path)


def plot_cmc(rows, cmcs, path):
    plt, fig, axes = _figure(1)
    ax = axes[0]
    for row, cmc in zip(rows, cmcs):
        ranks = np.arange(1, min(20, len(cmc)) + 1)
        ax.plot(ranks, 100 * cmc[:len(ranks)], marker=".", label=f"{row['label']} ({row['head']})")
    ax.set_xticks([1, 5, 10, 15, 20])
    ax.set_xlabel("rank", fontsize=8)
    ax.set_ylabel("matching rate (%)", fontsize=8)
    ax.set_title("CMC (mean over the gallery trials)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


# ----------------------------------------------------------------------------- main
def _unique_labels(files):
    seen = {}
    for ff in files:
        seen[ff.label] = seen.get(ff.label, 0) + 1
        if seen[ff.label] > 1:
            ff.label = f"{ff.label} #{seen[ff.label]}"


def print_table(rows):
    width = max(8, *(len(r["label"]) for r in rows))
    cols = [("cross same-id", "cross_same_id"), ("intra same-id", "intra_same_id"),
            ("gap", "modality_gap"), ("cross diff-id", "cross_diff_id"), ("overlap", "overlap")]
    print("Modality gap (Euclidean distance of L2-normalised features; gap = cross / intra same-id):")
    print(f"{'file':<{width}}  {'head':<7}" + "".join(f" {c:>13}" for c, _ in cols) + "   Rank-1      mAP")
    for r in rows:
        extra = (f"  (re-ranked {r['rerank_rank1']:.2%} / {r['rerank_mAP']:.2%})"
                 if "rerank_rank1" in r else "")
        print(f"{r['label']:<{width}}  {r['head']:<7}" + "".join(f" {r[k]:13.3f}" for _, k in cols)
              + f"  {r['rank1']:7.2%}  {r['mAP']:7.2%}" + extra)


def main(args):
    if args.ids < 1 or args.max_pairs < 1:
        raise UserError(f"--ids and --max_pairs must be >= 1, got {args.ids} and {args.max_pairs}")
    files = [features.load_features(f) for f in args.files]
    heads = []
    for ff in files:
        head = args.head or ff.heads[-1]
        if head not in ff.heads:
            raise UserError(f"--head {head}: {ff.path} has only {', '.join(ff.heads)}")
        heads.append(head)
    if args.labels:
        if len(args.labels) != len(files):
            raise UserError(f"--labels: {len(args.labels)} given for {len(files)} files")
        for ff, label in zip(files, args.labels):
            ff.label = label
    _unique_labels(files)
    out = Path(args.out)
    check_writable(out)
    rows, dists, cmcs = [], [], []
    for ff, head in zip(files, heads):
        row, dist, cmc = file_stats(ff, head, args, np.random.default_rng(args.seed))
        rows.append(row)
        dists.append(dist)
        cmcs.append(cmc)
    top = max([2.0] + [float(d.max()) for dist in dists for d in dist.values() if len(d)])
    bins = np.linspace(0, top, 61)     # common bins: the panels and overlaps compare
    for row, dist in zip(rows, dists):
        row["overlap"] = overlap(dist["same", "cross"], dist["diff", "cross"], bins)
    print_table(rows)
    plot_distances(rows, dists, bins, out / "distances.png")
    plot_tsne(files, heads, args, np.random.default_rng(args.seed), out / "tsne.png")
    plot_cmc(rows, cmcs, out / "cmc.png")
    clean = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
             for r in rows]
    (out / "modality_gap.json").write_text(json.dumps(
        {"distance": "Euclidean, L2-normalised features", "files": clean}, indent=1) + "\n")
    print(f"wrote tsne.png, distances.png, cmc.png and modality_gap.json to {out}")


if __name__ == "__main__":
    cli(lambda: main(get_args_parser().parse_args()))
