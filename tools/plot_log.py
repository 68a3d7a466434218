"""Training curves from the JSON-lines logs the trainers write (``<log_path>/<run>.jsonl``, one
object per epoch), several runs overlaid, in one PNG:

    python tools/plot_log.py log/a.jsonl AGW/log/b.jsonl --out curves.png [--fields '*loss*,test/FC/*']

Every numeric field present (the logs' flat names, docs/ANALYSIS.md) is plotted against
``epoch`` (``step`` if there is no epoch). Panels: one for the losses (``*loss*``, the
pre-training's ``train/perm_rgb``/``perm_ir``/``pcc`` and ``*_mse``), one for the accuracies
(``*acc*``, in %), one for the retrieval metrics (``test/<head>/rank1/rank5/mAP/mINP``, in %),
and one per other field (``train/lr``, ``train/feat_norm`` ...). Colour = field, line style =
run (legend at the bottom; runs are named by file stem, plus the folder that tells them
apart when stems repeat). The ``train/step0_*`` diagnostics (the first step of each epoch)
are left out unless ``--fields`` names them.
"""
import fnmatch
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, no display; before pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import logger  # noqa: E402
from cli import ArgumentParser, UserError, check_writable, cli  # noqa: E402

X_FIELDS = ("epoch", "step")
LOSSES = ("train/perm_rgb", "train/perm_ir", "train/pcc")
METRIC = re.compile(r"^test/.*/(rank\d+|mAP|mINP)$")
STYLES = ("-", "--", ":", "-.")
MARKS = (".", "x", "+", "^", "s")     # with STYLES: 20 runs told apart


def run_style(r):
    return {"ls": STYLES[r % len(STYLES)], "marker": MARKS[r // len(STYLES) % len(MARKS)]}


def get_args_parser():
    p = ArgumentParser("plot_log.py", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="JSON-lines logs (<log_path>/<run>.jsonl)")
    p.add_argument("--out", default="curves.png", help="output PNG")
    p.add_argument("--fields", default=None, help="comma-separated fields or patterns "
                   "('*loss*,test/FC/rank1'; default: all numeric fields but step0_*)")
    p.add_argument("--labels", default=None, help="comma-separated run names (default: file stems)")
    return p


def read_log(path):
    """[{field: number}] of one log (logger.read_jsonl: today's flat schema, older files
    upgraded); UserError if it is not one."""
    records = [{k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for rec in logger.read_jsonl(path)]
    if not records:
        raise UserError(f"{path}: empty log")
    return records


def run_labels(paths):
    """File stems; where stems repeat, prefixed by the nearest folder that differs."""
    paths = [Path(p).resolve() for p in paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    for depth in range(1, max(len(p.parts) for p in paths)):
        tags = [p.parts[-1 - depth] if len(p.parts) > depth else "" for p in paths]
        if len(set(zip(tags, stems))) == len(stems):
            return [f"{t}/{s}" for t, s in zip(tags, stems)]
    return [str(p) for p in paths]


def panel_of(field):
    if METRIC.search(field):
        return "retrieval (%)"
    if "acc" in field:
        return "accuracy (%)"
    if "loss" in field or field in LOSSES or field.endswith("_mse"):
        return "losses"
    return field


def main(args):
    runs = [read_log(p) for p in args.logs]
    labels = args.labels.split(",") if args.labels else run_labels(args.logs)
    if len(labels) != len(runs):
        raise UserError(f"--labels names {len(labels)} runs but {len(runs)} logs are given")
    present = list(dict.fromkeys(k for run in runs for rec in run for k in rec))
    x_name = next((x for x in X_FIELDS if any(x in rec for run in runs for rec in run)), None)
    if args.fields:
        patterns = [f.strip() for f in args.fields.split(",") if f.strip()]
        fields = [f for f in present
                  if f not in X_FIELDS and any(fnmatch.fnmatchcase(f, p) for p in patterns)]
    else:
        fields = [f for f in present if f not in X_FIELDS and not f.startswith("train/step0_")]
    if not fields:
        raise UserError(f"no field to plot (--fields {args.fields}); the logs have: {', '.join(present)}")
    panels = {}
    for f in fields:
        panels.setdefault(panel_of(f), []).append(f)
    out = Path(args.out)
    check_writable(out.parent)

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.4), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels.items()):
        scale = 100 if title.endswith("(%)") else 1
        named = set()                # each field once in the panel's legend
        for r, run in enumerate(runs):
            for c, f in enumerate(names):
                pts = [(rec.get(x_name, i), rec[f]) for i, rec in enumerate(run) if f in rec]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, [scale * y for y in ys], color=f"C{c % 10}", ms=4, lw=1.1,
                            markevery=max(1, len(pts) // 15), **run_style(r),
                            label=None if f in named else f)
                    named.add(f)
        ax.set_title(title if len(names) > 1 or title == names[0] else f"{title}: {names[0]}", fontsize=9)
        ax.set_xlabel(x_name or "record", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend([Line2D([], [], color="k", **run_style(r)) for r in range(len(runs))],
               labels, loc="lower center", ncol=min(len(runs), 2), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(runs) / 2) / rows, 1, 1))
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"{len(runs)} run(s): {', '.join(labels)}")
    print(f"{len(fields)} field(s) in {len(panels)} panel(s) against {x_name or 'record'} -> {out}")


if __name__ == "__main__":
    cli(lambda: main(get_args_parser().parse_args()))
