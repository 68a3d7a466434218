"""Every checkpoint the project writes or reads, in one place.

Files (under ``--model_path``):

* pre-training ``<run>_epoch_N.t``: the network's plain state_dict (what the authors'
  fine-tuning code and ours load with ``--resume``), N = epochs done;
* fine-tuning ``<run>_best.t`` and ``<run>_epoch_N.t``: the authors' format
  ``{'net', 'epoch', 'cmc', 'mAP', 'mINP'}`` ('epoch': the index of the last epoch, as
  theirs) plus ours ``'feature'`` and ``'stage': 'finetune'``; N = epochs done;
* ``<run>_last.pth``, both stages, every epoch: everything needed to continue after a crash,
  one schema

      {'stage': 'pretrain' | 'finetune', 'net': state_dict, 'optimizer', 'scaler',
       'epoch': index of the last finished epoch, 'best': best test result or None,
       'rng', 'args', 'state': the stage's own values (pre-training: scheduler,
       global_step, pcc_from; fine-tuning: global_step; DDAG: wG)}

What a file is (:func:`kind`) is read from its 'stage' field; files without one are the
authors' or our older ones: a ``{'net': ...}`` dict is a fine-tuned network (with an
'optimizer' too: an older fine-tuning ``_last.pth``), a ``{'model': ..., 'optimizer'}``
dict an older pre-training ``_last.pth``, anything else a network to initialise the
backbone from. The network inside any of them is found by one rule
(:func:`network_state`). Writes are atomic; reads use ``torch.load(weights_only=True)``.
"""
import os
import pickle
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

try:
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct, scalar

import model
import utils
from cli import UserError, warn


# ============================================================================ file I/O
def _free_space(path):
    """Free space on the filesystem holding ``path`` (or its nearest existing parent), as text."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


def save(obj, path):
    """Write atomically: a crash or a full disk mid-save leaves the previous file intact and
    no temporary file behind; a write failure is one UserError naming the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch reports a short write as RuntimeError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"cannot write checkpoint {path} ({reason}); {_free_space(path.parent)}; "
                        f"the previous checkpoint there, if any, is unchanged") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _safe_globals():
    """What ``weights_only`` loading may rebuild besides tensors: the numpy scalars and
    arrays the authors' ``.t`` files hold (their ``cmc``/``mAP``), our RNG states."""
    allowed = [np.dtype, np.ndarray, np.float64, np.float32, np.int64, np.int32,
               np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType,
               np.dtypes.Int32DType, np.dtypes.UInt32DType, np.dtypes.BoolDType]
    allowed += [_reconstruct, scalar]
    return allowed


def find(resume, model_path):
    """``--resume`` as given (relative to the cwd), else as a name under ``--model_path``
    (the authors' convention); UserError naming every place looked at."""
    given = Path(resume).expanduser()
    candidates = [given] if given.is_absolute() else [given.resolve(), Path(model_path) / given]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"--resume {resume}: no such checkpoint file (looked at "
                    + " and ".join(str(c) for c in candidates) + ")")


def load(path, trust=False):
    """Load a checkpoint with ``torch.load(weights_only=True)`` and an allow-list for
    numpy scalars. Anything else (an arbitrary pickled object) is refused unless the
    user passes ``--trust-checkpoint`` (``trust=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..); files of torch < 1.6 are a pickle (0x80 ...)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"{path} is not a PyTorch checkpoint (not a torch.save file)")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError / EOFError variants
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if not trust and isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e).lower():
            raise UserError(f"{path} holds objects other than tensors and numbers ({first}); if you "
                            f"trust this file, pass --trust-checkpoint to unpickle it fully") from None
        raise UserError(f"cannot read checkpoint {path}: truncated or corrupt ({first})") from None


# ============================================================================ what a file holds
STAGES = ("pretrain", "finetune")


def kind(obj):
    """(stage, resumable) of a loaded checkpoint: stage 'pretrain' (its network initialises a
    fine-tuning backbone) or 'finetune' (a fine-tuned network, loaded strictly); resumable:
    a ``<run>_last.pth``. Read from the 'stage' field of our files; see the module docstring
    for files without one."""
    if not isinstance(obj, Mapping):
        return "pretrain", False
    if obj.get("stage") in STAGES:
        return obj["stage"], "optimizer" in obj
    if "optimizer" in obj and isinstance(obj.get("model"), Mapping):   # older pre-training _last.pth
        return "pretrain", True
    if isinstance(obj.get("net"), Mapping):   # the authors' .t, our older fine-tuning files
        return "finetune", "optimizer" in obj
    return "pretrain", False   # a plain state_dict, or one nested under 'state_dict' / 'model'


def network_state(obj, source="checkpoint"):
    """The one rule for the network inside a checkpoint: ``obj`` itself if it maps names to
    tensors, else the first of its 'state_dict' / 'net' / 'model' entries that holds one
    (recursively); UserError if there is none."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return OrderedDict(obj)
        for key in ("state_dict", "net", "model"):
            if isinstance(obj.get(key), Mapping):
                return network_state(obj[key], source)
    raise UserError(f"{source} is not a state_dict (a mapping of parameter names to tensors)")


def num_classes(obj, key="classifier.weight"):
    """Identity count of a fine-tuned network (rows of its classifier), else None."""
    if kind(obj)[0] != "finetune":
        return None
    sd = network_state(obj)
    w = sd.get(key, sd.get("module." + key))
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None


def save_network(path, net):
    """Pre-training's ``<run>_epoch_N.t``: the plain state_dict that fine-tuning loads."""
    return save(utils.unwrap(net).state_dict(), path)


def save_finetuned(path, net, epoch, metrics, feature):
    """Fine-tuning's ``<run>_best.t`` / ``<run>_epoch_N.t`` (the authors' format, plus
    'feature' and 'stage'); ``metrics``: (cmc, mAP, mINP) of ``feature`` or None."""
    cmc, mAP, mINP = metrics if metrics is not None else (None, None, None)
    return save({"stage": "finetune", "net": utils.unwrap(net).state_dict(), "epoch": epoch,
                 "cmc": cmc, "mAP": mAP, "mINP": mINP, "feature": feature}, path)


# ============================================================================ resumable state (<run>_last.pth)
def _plain(d):
    """args as plain python values (weights_only loading accepts no other objects)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else
                list(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in d.items()}


def save_last(path, stage, net, optimizer, scaler, epoch, args, best=None, state=None):
    """Write ``<run>_last.pth`` (atomically; see :func:`save`)."""
    return save({"stage": stage, "net": utils.unwrap(net).state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "best": best, "rng": utils.get_rng_state(),
                 "args": _plain(vars(args)), "state": dict(state or {})}, path)


def read_last(obj):
    """A resumable state of any schema in the current one."""
    if "model" in obj and "net" not in obj:   # pre-training files before the one schema
        state = {"scheduler": obj.get("scheduler"), "global_step": obj.get("global_step", 0)}
        obj = {**obj, "net": obj["model"], "state": state, "best": None}
    # files written before empty path flags were refused recorded an unset one as "" (now None)
    args = {k: None if v == "" else v for k, v in (obj.get("args") or {}).items()}
    return {**obj, "stage": kind(obj)[0], "state": obj.get("state") or {}, "args": args}


def check_resumable(path, obj, stage):
    """UserError unless ``obj`` is a resumable state written by ``stage``."""
    if kind(obj) != (stage, True):
        what = {"pretrain": ("pre-training", "train.py"), "finetune": ("fine-tuning", "AGW/DDAG")}
        raise UserError(f"{path} is not a resumable {what[stage][0]} checkpoint (expected a "
                        f"<run>_last.pth written by {what[stage][1]})")


# flags that never change what a run computes: a continued run may differ in them freely
OPERATIONAL_FLAGS = ("gpu", "workers", "print_freq", "save_epoch", "model_path", "log_path", "vis_log_path",
                     "resume", "trust_checkpoint", "overwrite", "resume_anyway", "diag", "compile",
                     "channels_last", "deterministic", "test_every", "test_batch", "visrank", "save_features",
                     "test_only")


FLAG_SPELLING = {"batch_size": "batch-size", "test_batch": "test-batch", "low_dim": "low-dim"}


def check_continuation(path, obj, args, fixed=(), free=()):
    """Before a run continues the ``<run>_last.pth`` ``obj`` (read from ``path``): a UserError
    if a flag in ``fixed`` (those that shape the network, the losses' reading, the optimiser's
    state) differs from the file's, or if any other result-changing flag does (data, image
    size, batch, schedule, seed, ...) unless --resume_anyway, which prints the differences
    with the run header instead. ``free``: the stage's flags that change nothing computed so
    far either (fine-tuning's --epochs: its schedule does not depend on it). Files that did
    not record a flag are not checked on it."""
    saved, now = read_last(obj)["args"], _plain(vars(args))
    differ = {k: (saved[k], now[k]) for k in now if k in saved and k not in OPERATIONAL_FLAGS + tuple(free)
              and saved[k] != now[k] and saved[k] is not None}

    def listing(keys):   # --flag saved -> this run's (the flags' spelling, not argparse's dest)
        return ", ".join(f"--{FLAG_SPELLING.get(k, k)} {differ[k][0]} -> {differ[k][1]}" for k in keys)
    hard = [k for k in fixed if k in differ]
    if hard:
        raise UserError(f"{path.name} has other flags ({listing(hard)}); a run continues only with "
                        f"the flags that shape its network, losses and optimiser")
    if differ and not args.resume_anyway:
        raise UserError(f"{path.name} has other flags ({listing(differ)}): not an exact resume; "
                        f"add --resume_anyway or pass the same flags")
    if differ:
        warn(f"--resume_anyway: continuing {path.name} with other flags ({listing(differ)})")


def load_last(path, obj, stage, net, optimizer=None, scaler=None, load_net=True, args=None,
              network_flags=()):
    """Continue from the resumable state ``obj`` read from ``path``: the network (unless the
    caller loads it itself), optimiser, AMP scaler and RNG states. A network that does not
    fit is a UserError naming the ``network_flags`` whose saved value differs from ``args``.
    Returns the state in the current schema (its 'epoch', 'best', 'state', 'args')."""
    check_resumable(path, obj, stage)
    obj = read_last(obj)
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


def load_imagenet(net, path, log=print):
    """``--pretrained PATH``: torchvision-format ImageNet ResNet weights (never downloaded)
    into ``net``'s backbone (model.load_imagenet maps the keys)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pretrained: ImageNet weights file not found: {path}")
    return model.load_imagenet(net, network_state(load(path), str(path)), path, log=log)
