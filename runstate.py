"""What a training run keeps beside its network, the same for pre-training (train.py) and
fine-tuning (AGW/, DDAG/ through engine_finetune.py):

* :class:`Meter`: running sums of the step's scalars, kept on the device and read (one
  host sync) only at print time;
* :class:`RunLog`: the run's outputs: the text log (stdout tee'd into
  ``<log_path>/<run>.txt``), one JSON line per epoch (``<run>.jsonl``) and TensorBoard
  (``<vis_log_path>/<run>/``), written by rank 0 alone; a run that fails before its first
  epoch is done leaves none of them;
* :func:`save_last` / :func:`load_last`: the resumable ``<run>_last.pth``, one schema:

      {'stage': 'pretrain' | 'finetune', 'net': state_dict, 'optimizer', 'scaler',
       'epoch': last finished epoch, 'best': best test result or None, 'rng', 'args',
       'state': the stage's own values (pre-training: scheduler, global_step;
                DDAG: wG)}

  Files written before this schema (pre-training's ``{'model', 'scheduler',
  'global_step', ...}``; fine-tuning's, which lacked only 'stage') load the same way.
"""
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

import utils
from utils import UserError


# ----------------------------------------------------------------------------- meter
class Meter:
    """Running sums of named scalar tensors, on the device: ``update`` never syncs, ``read``
    returns ({name: last value}, {name: mean since the last reset}) as floats in one sync
    (with ``all_ranks=True`` the means are averaged over torchrun ranks)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.last, self.n = {}, {}, 0

    def update(self, values):
        self.n += 1
        device = next(v.device for v in values.values() if torch.is_tensor(v))
        for k, v in values.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
            self.last[k] = v
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()

    def read(self, all_ranks=False):
        keys = list(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / self.n
        if all_ranks and utils.is_distributed():
            utils.get_dist().all_reduce(means)
            means = means / utils.get_world_size()
        vals = torch.cat([torch.stack([self.last[k] for k in keys]), means]).cpu().tolist()
        return dict(zip(keys, vals[:len(keys)])), dict(zip(keys, vals[len(keys):]))


# ----------------------------------------------------------------------------- run log
class RunLog:
    """Create at the start of ``main`` (before any data work): it checks that the output
    folders are writable and silences stdout on ranks other than 0. ``open`` (once the data
    is in) starts the text log, the JSON lines and TensorBoard and prints the run header;
    ``epoch`` writes an epoch's JSON line and marks the run as started; ``close`` at the
    end (also on failure)."""

    def __init__(self, args, run):
        self.run, self.rank0 = run, utils.is_main_process()
        self.log_dir, self.vis_dir = Path(args.log_path), Path(args.vis_log_path)
        self.writer = self.json = None
        self._stdout = sys.stdout
        self.guard = None
        if self.rank0:
            # a run that fails before its first epoch is done leaves none of these (utils.cli)
            self.guard = utils.StartGuard(self.log_dir / f"{run}.txt", self.log_dir / f"{run}.jsonl",
                                          self.vis_dir / run)
            # a wrong output folder fails now, not at the first save
            utils.check_writable(args.model_path, args.log_path, args.vis_log_path)
        else:   # one log: the other ranks stay silent (their errors still reach stderr)
            sys.stdout = open(os.devnull, "w")

    def open(self, args, device, header_lines):
        if self.rank0:
            utils.setup_log(self.log_dir, self.run)
            self.json = utils.JsonLog(self.log_dir / f"{self.run}.jsonl")
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(self.vis_dir / self.run))
        utils.print_run_header(args, device, header_lines)

    def scalars(self, step, values, prefix=""):
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, float(v), step)

    def epoch(self, **record):
        if self.json is not None:
            self.json.write(**record)
            self.writer.flush()
        if self.guard is not None:
            self.guard.disarm()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if sys.stdout is not self._stdout:   # the log tee (rank 0) or the silenced stdout
            sys.stdout.flush()
            sys.stdout.close()
            sys.stdout = self._stdout


# ----------------------------------------------------------------------------- resumable state
def _plain(d):
    """args as plain python values (weights_only loading accepts no other objects)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else
                list(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in d.items()}


def save_last(path, stage, net, optimizer, scaler, epoch, args, best=None, state=None):
    """Write ``<run>_last.pth`` (atomically; see utils.save_checkpoint)."""
    return utils.save_checkpoint({"stage": stage, "net": utils.unwrap(net).state_dict(),
                                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                  "epoch": epoch, "best": best, "rng": utils.get_rng_state(),
                                  "args": _plain(vars(args)), "state": dict(state or {})}, path)


def last_stage(obj):
    """'pretrain' or 'finetune' if ``obj`` is a resumable state (either schema), else None."""
    if not isinstance(obj, Mapping) or "optimizer" not in obj:
        return None
    if obj.get("stage") in ("pretrain", "finetune"):
        return obj["stage"]
    if isinstance(obj.get("model"), Mapping):   # pre-training files before the one schema
        return "pretrain"
    return "finetune" if isinstance(obj.get("net"), Mapping) else None


def normalise(obj):
    """A resumable state of either schema in the current one."""
    if "model" in obj and "net" not in obj:   # pre-training files before the one schema
        state = {"scheduler": obj.get("scheduler"), "global_step": obj.get("global_step", 0)}
        obj = {**obj, "net": obj["model"], "state": state, "best": None}
    return {**obj, "stage": last_stage(obj), "state": obj.get("state") or {}}


def check_stage(path, obj, stage):
    """UserError unless ``obj`` is a resumable state written by ``stage``."""
    if last_stage(obj) != stage:
        what = {"pretrain": ("pre-training", "train.py"), "finetune": ("fine-tuning", "AGW/DDAG")}
        raise UserError(f"{path} is not a resumable {what[stage][0]} checkpoint (expected a "
                        f"<run>_last.pth written by {what[stage][1]})")


def load_last(path, obj, stage, net, optimizer=None, scaler=None, load_net=True, args=None,
              network_flags=()):
    """Continue from the resumable state ``obj`` read from ``path``: the network (unless the
    caller loads it itself), optimiser, AMP scaler and RNG states. A network that does not
    fit is a UserError naming the ``network_flags`` whose saved value differs from ``args``.
    Returns the normalised state (its 'epoch', 'best', 'state', 'args')."""
    check_stage(path, obj, stage)
    obj = normalise(obj)
    if load_net:
        try:
            utils.unwrap(net).load_state_dict(obj["net"])
        except RuntimeError:
            saved = obj.get("args") or {}
            differ = [f"--{k} {saved[k]} (this run: {getattr(args, k)})" for k in network_flags
                      if k in saved and saved[k] != getattr(args, k)]
            raise UserError(f"{path} does not match this network: it was written with "
                            + (", ".join(differ) if differ else "another network layout")) from None
    if optimizer is not None:
        optimizer.load_state_dict(obj["optimizer"])
    if scaler is not None and obj.get("scaler"):
        scaler.load_state_dict(obj["scaler"])
    if obj.get("rng"):
        utils.set_rng_state(obj["rng"])
    return obj
