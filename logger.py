"""The one logging layer of pre-training (train.py) and fine-tuning (AGW/, DDAG/): what a run
prints, writes and shows, the same in both stages.

* :class:`RunLog`: the run's outputs, written by rank 0 alone: the text log (stdout tee'd
  into ``<log_path>/<run>.txt``, headed by :func:`print_run_header`), one JSON line per epoch
  (``<run>.jsonl``) and TensorBoard (``<vis_log_path>/<run>/``); a run that fails before
  its first epoch is done leaves none of them (:class:`StartGuard`).
* :meth:`RunLog.log_every`: the one step printer (the shape of MAE's ``log_every``):

      Epoch: [3][ 50/695]  eta 1:02:10  lr 0.1  loss 0.8123 (0.8311)  ...  412 img/s

  each scalar as its last value (its epoch mean so far); the ETA is the run's. Values stay
  on the device (:class:`Meter`) and are read, in one host sync, only at print steps.
* One flat schema for the JSON lines and TensorBoard alike, in both stages:
  ``epoch``, ``step`` (the global step after the epoch), ``time`` (seconds),
  ``train/<name>`` (epoch means over ranks, ``train/step0_<name>`` the epoch's first step),
  ``val/<name>`` (pre-training's held-out set), ``test/<feature>/<metric>`` (fine-tuning's
  benchmark test). TensorBoard's x axis is the global step everywhere. :func:`read_jsonl`
  reads these files, and the older ones (flat unprefixed or nested), in this schema.
"""
import datetime
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import cli
import utils
from cli import REPO_ROOT, UserError


# ----------------------------------------------------------------------------- text log
class Tee:
    """Duplicate everything written to stdout into a log file (like the authors'
    ``Logger``), so a run's text log is what its terminal showed (plus the run header's
    full argument list, which goes to the file only)."""

    def __init__(self, path, stream=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)
        self.stream = stream or sys.stdout

    def write(self, s):
        self.stream.write(s)
        self.file.write(s)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return self.stream.isatty()

    def close(self):
        self.file.close()


class StartGuard:
    """Removes the outputs a run created (text log, JSON lines, TensorBoard run) if it fails
    before its first epoch is done, so a run that never started leaves nothing behind.
    ``disarm()`` once an epoch has finished; ``cleanup()`` on failure (cli.cli calls it)."""

    def __init__(self, *paths):
        self.new = [Path(p) for p in paths if not Path(p).exists()]
        self.armed = True
        cli.on_failure(self.cleanup)

    def disarm(self):
        self.armed = False

    def cleanup(self):
        if not self.armed:
            return
        for p in self.new:
            if isinstance(sys.stdout, Tee) and Path(sys.stdout.file.name) == p:
                sys.stdout.file.close()
                sys.stdout = sys.stdout.stream
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


def git_revision():
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_run_header(args, device, extra=None):
    """The header every run starts with: command, revision, time, device, ``extra`` lines.
    The full sorted argument list goes to the log file only (when stdout is tee'd into
    one), so the terminal stays short; without a log it is printed."""
    print("=" * 78)
    print(f"{' '.join(sys.argv)}")
    dtype, _ = utils.amp_setup(getattr(args, "amp", False), device)
    precision = {None: "fp32", "bfloat16": "bf16 autocast", "float16": "fp16 autocast + GradScaler"}[
        dtype and str(dtype).split(".")[-1]]
    print(f"git {git_revision()} | {datetime.datetime.now().isoformat(timespec='seconds')} "
          f"| device {device} | {precision} | world size {utils.get_world_size()}")
    arg_lines = [f"  {k:>20}: {getattr(args, k)}" for k in sorted(vars(args))]
    if isinstance(sys.stdout, Tee):
        sys.stdout.file.write("\n".join(arg_lines) + "\n")
        print(f"all {len(arg_lines)} arguments: {sys.stdout.file.name}")
    else:   # no log file (the test scripts): the arguments as a compact paragraph
        print(textwrap.fill(" ".join(f"{k}={getattr(args, k)}" for k in sorted(vars(args))), 100,
                            initial_indent="args: ", subsequent_indent="  "))
    for line in (extra or []):
        print(line)
    cli.flush_warnings()
    print("=" * 78)


def format_time(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress(iterable, total=None, desc="", enable=None):
    """A small progress bar with ETA on stderr; silent when stderr is not a terminal
    (logs and CI stay clean) or on a non-zero rank."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    if enable is None:
        enable = sys.stderr.isatty() and utils.is_main_process()
    if not enable:
        yield from iterable
        return
    start = last = time.time()
    for n, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if now - last > 0.2 or n == total:
            last = now
            rate = n / max(now - start, 1e-9)
            if total:
                eta = (total - n) / max(rate, 1e-9)
                msg = f"\r{desc} {n}/{total} [{format_time(now - start)}<{format_time(eta)}, {rate:.1f}it/s]"
            else:
                msg = f"\r{desc} {n} [{format_time(now - start)}, {rate:.1f}it/s]"
            sys.stderr.write(msg)
            sys.stderr.flush()
    sys.stderr.write("\n")


# ----------------------------------------------------------------------------- meters
class Meter:
    """Running sums of named scalars, on the device: ``update`` never syncs; ``read`` returns
    ({name: last value}, {name: mean since the epoch began}, {name: mean since the last
    read}) as floats in one host sync, each averaged over torchrun ranks (every rank must
    read at the same step). A name may be updated at some steps only (its own count)."""

    def __init__(self, device):
        self.device = device
        self.last, self.sums, self.counts = {}, {}, {}
        self.at_read = {}   # {name: (sum, count)} at the previous read: "since the last read" is derived
        self.first, self.img_per_s = {}, None   # set by RunLog.log_every

    def update(self, **values):
        for k, v in values.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
            self.last[k] = v
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def read(self):
        keys = list(self.sums)
        last = torch.stack([self.last[k] for k in keys])
        mean = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        recent = []
        for k, m in zip(keys, mean):
            s0, n0 = self.at_read.get(k, (0.0, 0))
            n = self.counts[k] - n0
            recent.append((self.sums[k] - s0) / n if n else m)   # not updated since: its epoch mean
        self.at_read = {k: (self.sums[k], self.counts[k]) for k in keys}
        last, mean, recent = utils.all_reduce_mean(torch.stack([last, mean, torch.stack(recent)])).cpu().tolist()
        return dict(zip(keys, last)), dict(zip(keys, mean)), dict(zip(keys, recent))


def _fmt(name, value):
    return f"{100 * value:.2f}%" if name.endswith("acc") else f"{value:.4f}"


# ----------------------------------------------------------------------------- the run's outputs
class RunLog:
    """Create at the start of ``main`` (before any data work): it checks that the output
    folders are writable and silences stdout on ranks other than 0. ``open`` (once the data
    is in) starts the text log, the JSON lines and TensorBoard and prints the run header;
    ``start`` sets where the run begins (epoch, global step); ``log_every`` runs an epoch's
    steps; ``epoch`` writes its JSON line and marks the run as started; ``close`` at the end
    (also on failure)."""

    def __init__(self, args, run, outputs=True, continuing=False):
        """``outputs=False``: print only, write nothing (benchmarks time the step loop).
        ``continuing``: this run resumes its own ``<run>_last.pth``, so its outputs exist
        and are appended to; otherwise outputs of a run of the same name stop it, unless
        --overwrite (:meth:`_claim`)."""
        self.run, self.rank0 = run, utils.is_main_process()
        self.epochs, self.print_freq = args.epochs, args.print_freq
        self.writer = self.json = self.guard = None
        self.locks = []
        self._stdout = sys.stdout
        self.start()
        if not outputs:
            return
        self.log_dir, self.vis_dir = Path(args.log_path), Path(args.vis_log_path)
        if self.rank0:
            # a wrong output folder fails now, not at the first save
            cli.check_writable(args.model_path, args.log_path, args.vis_log_path)
            self._claim(args, continuing)
            # a run that fails before its first epoch is done leaves none of these (cli.cli)
            self.guard = StartGuard(self.log_dir / f"{run}.txt", self.log_dir / f"{run}.jsonl",
                                    self.vis_dir / run)
        else:   # one log: the other ranks stay silent (their errors still reach stderr)
            sys.stdout = open(os.devnull, "w")

    def outputs(self, model_path):
        """The files and folders of this run that exist: its checkpoints (``<run>_last.pth``,
        ``<run>_best.t``, ``<run>_epoch_N.t``), text log, JSON lines and TensorBoard run."""
        model_dir = Path(model_path)
        ckpt = re.compile(re.escape(self.run) + r"_(last\.pth|best\.t|epoch_\d+\.t)")
        found = sorted(p for p in model_dir.iterdir() if ckpt.fullmatch(p.name)) if model_dir.is_dir() else []
        return found + [p for p in (self.log_dir / f"{self.run}.txt", self.log_dir / f"{self.run}.jsonl",
                                    self.vis_dir / self.run) if p.exists()]

    def _claim(self, args, continuing):
        """Never two live runs on one set of outputs (a lock held until the process ends),
        never a new run over an earlier one's outputs (unless --overwrite removes them)."""
        for folder in dict.fromkeys(Path(p).resolve() for p in (args.model_path, args.log_path)):
            f = open(folder / f".{self.run}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                pid = f.read().strip() or "?"
                f.close()
                raise UserError(f"another run (pid {pid}) is writing the outputs of {self.run} in {folder} "
                                f"now; wait for it to end, or give this run another --model_path/--log_path") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            self.locks.append(f)
        cli.on_failure(self.release)   # a run that fails before its loop leaves no lock file
        earlier = [] if continuing else self.outputs(args.model_path)
        if earlier and not getattr(args, "overwrite", False):
            last = Path(args.model_path) / f"{self.run}_last.pth"
            what = f"continue it with --resume {last}" if last.is_file() else f"see {earlier[0]}"
            raise UserError(f"a run of this name has outputs already: {what}, replace them ({len(earlier)}) with "
                            f"--overwrite, or change --model_path/--log_path")
        for p in earlier:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if earlier:
            cli.warn(f"--overwrite: removed {len(earlier)} output(s) of an earlier run {self.run}")

    def open(self, args, device, header_lines):
        if self.rank0:
            path = self.log_dir / f"{self.run}.txt"
            if not isinstance(sys.stdout, Tee):
                sys.stdout = Tee(path)
            self.json = self.log_dir / f"{self.run}.jsonl"
            from tensorboardX import SummaryWriter   # here: it imports boto3 etc., ~0.2 s a start
            self.writer = SummaryWriter(str(self.vis_dir / self.run))
        print_run_header(args, device, header_lines)

    def start(self, epoch=0, global_step=0):
        """The run (re)starts at ``epoch`` and ``global_step`` (a resumed run: where it stopped)."""
        self.start_epoch, self.global_step, self.t_start = epoch, global_step, time.time()

    def scalars(self, values, prefix=""):
        """TensorBoard scalars at the current global step."""
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(prefix + k, float(v), self.global_step)

    def log_every(self, loader, epoch, meter, lr, images_per_step, watch=None, last_good=None,
                  at_print=None):
        """Yield ``(step, batch)`` over ``loader``, counting global steps. The loop body puts
        its scalars into ``meter``; every --print_freq steps and at the last, ``watch``
        (utils.NonFiniteWatch) stops a run whose loss went non-finite (naming ``last_good``,
        the checkpoint left untouched, if it exists), ``at_print()`` adds what is measured at
        print steps only, then one line is printed and the means since the last print go to
        TensorBoard (``train/``). ``meter.first`` holds the epoch's first-step values."""
        steps = len(loader)
        t_print, printed = time.time(), -1
        for step, batch in enumerate(loader):
            yield step, batch
            self.global_step += 1
            if step % self.print_freq and step != steps - 1:   # print every --print_freq steps and the last
                continue
            if watch is not None:
                good = Path(last_good) if last_good else None
                watch.check(epoch, good if good is not None and good.is_file() else None)
            if at_print is not None:
                at_print()
            last, mean, recent = meter.read()
            if step == 0:
                meter.first = last
            now = time.time()
            ips = images_per_step * utils.get_world_size() * (step - printed) / max(now - t_print, 1e-9)
            done = epoch - self.start_epoch + (step + 1) / steps
            eta = (now - self.t_start) / done * (self.epochs - self.start_epoch - done)
            values = "  ".join(f"{k} {_fmt(k, last[k])} ({_fmt(k, mean[k])})" for k in last)
            print(f"Epoch: [{epoch}][{step + 1}/{steps}]  eta {format_time(eta)}  "
                  f"lr {lr:.4g}  {values}  {ips:.0f} img/s")
            self.scalars({**recent, "lr": lr, "img_per_s": ips}, prefix="train/")
            meter.img_per_s = ips
            t_print, printed = now, step

    def epoch(self, epoch, seconds, train=None, val=None, test=None):
        """The epoch's JSON line (and TensorBoard's val/ and test/ scalars): ``train``
        {name: value}, ``val`` {name: value}, ``test`` {feature: (cmc, mAP, mINP)}."""
        record = {"epoch": epoch, "step": self.global_step, "time": seconds}
        record.update({f"train/{k}": v for k, v in (train or {}).items()})
        record.update({f"val/{k}": v for k, v in (val or {}).items()})
        for feature, (cmc, mAP, mINP) in (test or {}).items():
            record.update({f"test/{feature}/rank1": cmc[0], f"test/{feature}/rank5": cmc[min(4, len(cmc) - 1)],
                           f"test/{feature}/mAP": mAP, f"test/{feature}/mINP": mINP})
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        if self.json is not None:
            self.scalars({k: v for k, v in record.items() if k.startswith(("val/", "test/"))})
            with open(self.json, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.writer.flush()
        if self.guard is not None:
            self.guard.disarm()
        return record

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.release()

    def release(self):
        """Remove the run's lock files (the locks themselves end with the process anyway)."""
        for f in self.locks:
            Path(f.name).unlink(missing_ok=True)
            f.close()
        self.locks = []
        if sys.stdout is not self._stdout:   # the log tee (rank 0) or the silenced stdout
            sys.stdout.flush()
            sys.stdout.close()
            sys.stdout = self._stdout


# ----------------------------------------------------------------------------- reading logs
def _upgrade(record):
    """A JSON line of the older schemas in the flat one: pre-training's unprefixed keys
    (``val_*`` held-out, the rest training), fine-tuning's nested ``{feature: {metric}}``
    and ``total_loss``."""
    if any("/" in k for k in record):
        return record
    out = {}
    for k, v in record.items():
        if k in ("epoch", "step", "time"):
            out[k] = v
        elif isinstance(v, dict):
            out.update({f"test/{k}/{m}": x for m, x in v.items()})
        elif k.startswith("val_"):
            out[f"val/{k[4:]}"] = v
        else:
            out[f"train/{k.replace('total_loss', 'loss')}"] = v
    return out


def read_jsonl(path):
    """The records of a trainer's ``<run>.jsonl``, in the flat schema (older files upgraded);
    UserError if ``path`` is not such a file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such log file: {path}")
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON lines ({e.msg}); expected a trainer's .jsonl log") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}: not JSON lines (a line is not an object)")
        records.append(_upgrade(obj))
    return records
