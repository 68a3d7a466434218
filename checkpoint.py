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
import re
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
    return {**obj, "stage": kind(obj)[0], "state": obj.get("state") or {}}


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


def check_continuation(path, obj, args, fixed=()):
    """Before a run continues the ``<run>_last.pth`` ``obj`` (read from ``path``): a UserError
    if a flag in ``fixed`` (those that shape the network, the losses' reading, the optimiser's
    state) differs from the file's, or if any other result-changing flag does (data, image
    size, batch, schedule, seed, ...) unless --resume_anyway, which prints the differences
    with the run header instead. Files that did not record a flag are not checked on it."""
    saved, now = read_last(obj).get("args") or {}, _plain(vars(args))
    differ = {k: (saved[k], now[k]) for k in now if k in saved and k not in OPERATIONAL_FLAGS
              and saved[k] != now[k] and saved[k] is not None}

    def listing(keys):   # --flag saved -> this run's
        return ", ".join(f"--{k} {differ[k][0]} -> {differ[k][1]}" for k in keys)
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


# ============================================================================ --resume in fine-tuning
def read_resume(args, build=None):
    """(path, loaded object) of --resume; UserError if it is missing or unreadable or, given
    ``build`` (class_num -> network), if it does not fit the network: it is then loaded
    into a throwaway copy (the identity count read from the file), so that a wrong file
    fails before the run header and before any data is read."""
    path = find(args.resume, args.model_path)
    obj = load(path, trust=args.trust_checkpoint)
    if build is not None:
        load_into(build(num_classes(obj) or 1), path, obj, log=lambda *_: None)
    return path, obj


def read_for_test(args):
    """read_resume for the test scripts, where --resume is required."""
    if not args.resume:
        raise UserError("--resume CKPT is required: the checkpoint to test (a path, or a name "
                        "under --model_path)")
    return read_resume(args)


def load_into(net, path, obj, log=print):
    """The network of any --resume file into ``net``: a pre-training one into its backbone
    (heads keep their initial values), a fine-tuned one strictly."""
    if kind(obj)[0] == "pretrain":
        load_backbone(net, obj, log=log, source=str(path))
    else:
        load_finetuned(net, network_state(obj, str(path)), str(path), log=log)


def load_resume(net, args, optimizer=None, scaler=None, state=None, loaded=None):
    """Apply ``--resume`` to ``net`` (and, for a '<run>_last.pth', to optimizer, AMP scaler,
    RNG and the method's ``state`` dict, which gets its saved values, global_step among
    them). ``loaded``: read_resume(args) if already done. Returns (start_epoch, best)."""
    path, obj = loaded or read_resume(args)
    stage, resumable = kind(obj)
    if stage == "pretrain":
        # MMGL (or any backbone) checkpoint: heads dropped, counts printed, UserError if
        # nothing loads; fine-tuning starts from epoch 0.
        print(f"==> initialising the backbone from {path}")
        load_backbone(net, obj, source=str(path))
        return 0, None
    load_finetuned(net, network_state(obj, str(path)), str(path))
    epoch = int(obj.get("epoch", -1))
    if not resumable:
        print(f"==> loaded fine-tuning checkpoint {path} (epoch {epoch})")
        best = None
        cmc = obj.get("cmc")
        if cmc is not None:
            best = {"epoch": epoch, "rank1": float(np.asarray(cmc).reshape(-1)[0]),
                    "feature": obj.get("feature")}
    else:   # continue exactly where the run stopped
        last = load_last(path, obj, "finetune", net, optimizer, scaler, load_net=False)
        if state is not None:
            state.update(last["state"])
        best = last.get("best")
        print(f"==> resuming {path}: epoch {epoch} done, continuing at epoch {epoch + 1}")
    if epoch + 1 >= args.epochs:
        print(f"checkpoint is at epoch {epoch}; --epochs {args.epochs} leaves nothing to train")
    return epoch + 1, best


def load_finetuned(net, state_dict, source, hint="--method/--arch/--dataset", log=print):
    """Load a fine-tuned network's state_dict strictly, except for the tensors the authors'
    networks carry but never run (their stems' whole ResNets), which are skipped with a
    note. Any other missing, unexpected or mis-shaped tensor is a UserError naming a few."""
    net = utils.unwrap(net)
    report = load_backbone(net, state_dict, log=lambda *_: None, source=source)
    own = net.state_dict()
    written = {own[k].data_ptr() for k in report["loaded"]}
    missing = [k for k, v in own.items()
               if v.data_ptr() not in written and not k.endswith("num_batches_tracked")]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", report["unexpected"]),
                       ("pre-training head", report["dropped_head"]),
                       ("of a different shape", report["mismatched"])):
        if keys:
            more = " ..." if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{more})")
    if problems:
        raise UserError(f"{source} does not fit this network: " + "; ".join(problems)
                        + f". Was it trained with other {hint}?")
    skipped = len(report["skipped_unused"])
    log(f"loaded all {len(report['loaded'])} tensors of {source}"
        + (f" (skipped {skipped} never-used stem/base tensors of the authors' network)"
           if skipped else ""))


# ============================================================================ loading networks
# Key names: ours follow the authors' AGW network (visible_module.visible.*,
# thermal_module.thermal.*, base_resnet.base.*), so their files and ours load both ways;
# torchvision's ImageNet ResNet keys map onto both stems and the body (load_imagenet).
def _strip_module(sd):
    """Drop the 'module.' prefix DataParallel/DDP checkpoints carry."""
    return OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in sd.items())


_BLOCK_RE = re.compile(r"(?:^|\.)layer([1-4])\.(\d+)\.conv(\d)\.weight$")


def guess_arch(sd):
    """Name the ResNet a state_dict looks like ('resnet50', ...), or None."""
    blocks, block = {}, "basic"
    for k in sd:
        m = _BLOCK_RE.search(k)
        if m:
            layer, idx, conv = int(m.group(1)), int(m.group(2)), int(m.group(3))
            blocks[layer] = max(blocks.get(layer, 0), idx + 1)
            if conv == 3:
                block = "bottleneck"
    if not blocks:
        return None
    counts = tuple(blocks.get(i, 0) for i in range(1, 5))
    return model.KNOWN_LAYOUTS.get((block, counts), f"a {block} ResNet with blocks {counts}")


def load_imagenet(net, path, log=print):
    """Load torchvision-format ImageNet ResNet weights (``--pretrained PATH``) into a
    :class:`ResNet` or a :class:`TwoStreamBackbone` (conv1/bn1 -> both stems, layerX ->
    base_resnet.base.layerX, fc dropped). Never downloads."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pretrained: ImageNet weights file not found: {path}")
    src = _strip_module(network_state(load(path), str(path)))
    net = utils.unwrap(net)
    own = net.state_dict()
    if isinstance(net, model.TwoStreamBackbone):
        strip = re.compile(r"^(visible_module\.visible|thermal_module\.thermal|base_resnet\.base)\.")
        wanted = {k: strip.sub("", k) for k in net.backbone_keys()}
    elif isinstance(net, model.ResNet):
        wanted = {k: k for k in own if not k.startswith("fc.")}
    else:
        raise TypeError(f"load_imagenet expects a ResNet or TwoStreamBackbone, got {type(net).__name__}")
    to_load, missing, mismatched = {}, [], []
    for dst, key in wanted.items():
        if key not in src:
            # Older torchvision files predate BN's num_batches_tracked buffer.
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
        elif src[key].shape != own[dst].shape:
            mismatched.append(key)
        else:
            to_load[dst] = src[key]
    if isinstance(net, model.ResNet) and all(k in src and src[k].shape == own[k].shape
                                             for k in ("fc.weight", "fc.bias")):
        to_load.update({k: src[k] for k in ("fc.weight", "fc.bias")})
    if missing or mismatched:
        looks = guess_arch(src) or "no ResNet"
        raise UserError(f"--pretrained {path} does not hold {net.arch} ImageNet weights in "
                        f"torchvision's key format (it looks like {looks}; {len(missing)} "
                        f"tensors missing, {len(mismatched)} of a different shape)")
    net.load_state_dict(to_load, strict=False)
    n_src = len({k: None for k in wanted.values() if k in src})
    log(f"loaded {n_src} ImageNet tensors ({net.arch}) from {path}")
    return n_src


# The authors' stems each hold a whole ResNet and their base a whole ResNet too; these
# tensors never run. Anything else unknown is reported as 'unexpected'.
_UNUSED_RE = re.compile(r"^(?:(?:visible_module\.visible|thermal_module\.thermal)\."
                        r"(?:layer\d|fc|avgpool)\.|base_resnet\.base\.(?:conv1|bn1|fc|avgpool)\.)")


def _fmt_keys(keys, n=3):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def load_backbone(net, obj, log=print, source="checkpoint"):
    """Initialise ``net`` (a TwoStreamBackbone subclass: AGW/DDAG) from the network in
    ``obj`` (:func:`network_state`): an MMGL pre-training checkpoint (ours or the authors') or the authors'
    fine-tuning networks.

    'module.' prefixes are stripped, pre-training heads (fc1., fc2., local_conv_list)
    dropped, the authors' never-run stem/base ResNet tensors skipped, and every tensor
    whose name and shape match ``net`` loaded. Returns a report dict of key lists:
    loaded, skipped_unused, dropped_head, mismatched, missing_backbone, unexpected.
    UserError when no backbone tensor loads (a wrong file must never mean a silent
    from-scratch run)."""
    net = utils.unwrap(net)
    sd = _strip_module(network_state(obj, source))
    own = net.state_dict()
    report = {k: [] for k in ("loaded", "skipped_unused", "dropped_head", "mismatched",
                              "missing_backbone", "unexpected")}
    to_load = OrderedDict()
    for k, v in sd.items():
        if k.startswith(model.MMGLNet.HEAD_PREFIXES):
            report["dropped_head"].append(k)
        elif k in own:
            if own[k].shape == v.shape:
                to_load[k] = v
            else:
                report["mismatched"].append(k)
        elif _UNUSED_RE.match(k):
            report["skipped_unused"].append(k)
        else:
            report["unexpected"].append(k)

    # Same key names but another depth/width (e.g. a resnet50 file into --arch resnet18)
    # would load a few coincidentally equal-shaped BN vectors: refuse it outright.
    looks = guess_arch({k: v for k, v in sd.items() if k.startswith(net.BACKBONE_PREFIXES)})
    if looks in model.KNOWN_LAYOUTS.values() and looks != net.arch:
        raise UserError(f"{source} holds a {looks} backbone but the network is {net.arch} "
                        f"(--arch {looks}?)")

    backbone = net.backbone_keys()
    if getattr(net, "stream", "two") == "one":
        # One shared stem: if the checkpoint has two different stems, keep the visible
        # one deterministically (load order would otherwise let thermal win silently).
        differ = False
        for k in [k for k in to_load if k.startswith("thermal_module.thermal.")]:
            twin = "visible_module.visible." + k[len("thermal_module.thermal."):]
            if twin in to_load:
                differ |= not torch.equal(to_load[twin], to_load[k])
                del to_load[k]
        if differ:
            log("warning: the network has one shared stem but the checkpoint's visible and "
                "thermal stems differ; the visible stem was loaded")
    report["loaded"] = list(to_load)
    # A tensor counts as loaded if its storage was written: with one shared stem the
    # visible and thermal keys are the same tensor.
    written = {own[k].data_ptr() for k in to_load}
    report["missing_backbone"] = [k for k in backbone if own[k].data_ptr() not in written]
    n_ok = len(backbone) - len(report["missing_backbone"])
    if n_ok == 0:
        looks = guess_arch(sd)
        hint = f" (it looks like {looks})" if looks else f" (its keys: {_fmt_keys(sd)})"
        raise UserError(f"{source} matches no backbone key of the {net.arch} network{hint}")
    net.load_state_dict(to_load, strict=False)

    n_other = sum(not k.startswith(net.BACKBONE_PREFIXES) for k in to_load)
    log(f"loaded {n_ok}/{len(backbone)} backbone tensors from {source} "
        f"(dropped {len(report['dropped_head'])} pre-training head tensors, "
        f"skipped {len(report['skipped_unused'])} unused)"
        + (f", plus {n_other} other matching tensors" if n_other else ""))
    if report["mismatched"]:
        log(f"warning: {len(report['mismatched'])} tensors have a different shape and were not "
            "loaded: " + _fmt_keys(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                    for k in report["mismatched"]))
    if report["missing_backbone"]:
        log(f"warning: {len(report['missing_backbone'])} backbone tensors are not in {source} "
            "and keep their initial values: " + _fmt_keys(report["missing_backbone"]))
    if report["unexpected"]:
        log(f"note: {len(report['unexpected'])} tensors of {source} have no counterpart in the "
            "network and were ignored: " + _fmt_keys(report["unexpected"]))
    return report
