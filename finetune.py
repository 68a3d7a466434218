"""The fine-tuning engine shared by AGW (``AGW/train.py``, ``AGW/test.py``) and DDAG
(``DDAG/train_ddag.py``, ``DDAG/test_ddag.py``): one copy of the authors' command-line
flags, ``--resume`` handling (MMGL pre-training checkpoint vs fine-tuning checkpoint vs
resumable state), optimiser and learning-rate schedule, the training loop (device-side
augmentation, AMP, DistributedDataParallel, NaN guard, logging), SYSU-MM01 / RegDB testing
and checkpointing.

A method script supplies only what is its own: the network (or a builder
``class_num -> network``), the names of its newly added modules (trained at the full
learning rate), a ``step_fn`` computing its loss, and the names of its evaluation features.

Checkpoints (under ``--model_path``, relative paths resolved against the method's folder):

* ``<run>_best.t``     ``{'net', 'epoch', 'cmc', 'mAP', 'mINP', 'feature'}`` (the authors'
  format: 'net' is a plain state_dict without 'module.'), best Rank-1 so far;
* ``<run>_epoch_N.t``  same format, every ``--save_epoch`` epochs;
* ``<run>_last.pth``   everything needed to continue after a crash (net, optimizer, AMP
  scaler, epoch, best, RNG states, the method's state such as DDAG's wG), every epoch.
"""
import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data_loader
import data_manager
import eval_metrics
import model
import utils
from utils import UserError

DATASETS = ("sysu", "regdb")
DEFAULT_DATA = {"sysu": "data/SYSU-MM01", "regdb": "data/RegDB"}
# SYSU-MM01: queries are IR (modal 2), gallery RGB (modal 1). RegDB: visible (1) queries
# against a thermal (2) gallery; --tvsearch swaps them.
VISIBLE, THERMAL = 1, 2
DEFAULT_MILESTONES = (20, 50)  # AGW's lr steps


# ============================================================================ arguments
def get_args_parser(description, epochs=80, milestones=DEFAULT_MILESTONES):
    """The authors' fine-tuning flags (their AGW/DDAG train.py) plus ours. ``epochs``/``milestones`` are
    the method's defaults (AGW: 80, (20, 50))."""
    # one-line argparse errors (error: ..., exit 2), defaults shown in --help
    p = utils.ArgumentParser(description=description)
    a = p.add_argument
    # --- the authors' flags
    a("--dataset", default="sysu", choices=DATASETS, help="dataset name")
    a("--lr", default=0.1, type=float, help="learning rate of the new modules (backbone: 0.1x); "
      "0.00035 for adam")
    a("--optim", default="sgd", choices=("sgd", "adam"), help="optimizer")
    a("--arch", default="resnet50", choices=("resnet50", "resnet18"), help="backbone")
    a("--resume", "-r", default="", type=str,
      help="checkpoint: a path or a name under --model_path. An MMGL pre-training state_dict "
           "initialises the backbone; a fine-tuning checkpoint {'net', 'epoch', ...} continues "
           "(or is tested); a <run>_last.pth continues exactly (optimizer, RNG, best)")
    a("--test-only", action="store_true", help="only test the --resume checkpoint")
    a("--model_path", default="save_model/", type=str,
      help="checkpoint folder (relative: to the method's folder)")
    a("--save_epoch", default=20, type=int, help="save <run>_epoch_N.t every N epochs")
    a("--log_path", default="log/", type=str, help="text/JSON log folder (relative: to the "
      "method's folder)")
    a("--vis_log_path", default="log/vis_log/", type=str, help="TensorBoard folder")
    a("--workers", default=4, type=int, help="data loading workers")
    a("--img_w", default=144, type=int, help="image width")
    a("--img_h", default=288, type=int, help="image height")
    a("--batch-size", default=8, type=int, help="identities per step (each with --num_pos RGB "
      "and --num_pos IR images)")
    a("--pad", default=10, type=int, help="train-time augmentation: zero padding before the "
      "random crop back to img_h x img_w (the authors' 10 pixels at 288x144)")
    a("--test-batch", default=64, type=int, help="test batch size")
    a("--margin", default=0.3, type=float, help="triplet loss margin")
    a("--num_pos", default=4, type=int, help="images per identity and modality in a step")
    a("--trial", default=1, type=int, help="RegDB trial (1..10)")
    a("--seed", default=0, type=int, help="random seed")
    a("--gpu", default="0", type=str, help="CUDA device index, or 'cpu'")
    a("--mode", default="all", choices=("all", "indoor"), help="SYSU-MM01 search mode")
    # --- ours
    a("--gall_mode", default="single", choices=("single", "multi"),
      help="SYSU-MM01 gallery: single-shot or multi-shot (10 images per id and camera)")
    a("--tvsearch", action="store_true", help="RegDB: thermal queries, visible gallery")
    a("--data_path", default=None, help="dataset folder (default: data/SYSU-MM01 or "
      "data/RegDB under the repository root)")
    a("--epochs", default=epochs, type=int, help="training epochs (numbered 0..epochs-1)")
    a("--milestones", default=None, type=int, nargs=2, metavar=("M1", "M2"),
      help=f"lr x0.1 from epoch M1, x0.01 from M2 (default: {milestones[0]} {milestones[1]})")
    a("--warmup_epochs", default=10, type=int, help="linear warm-up lr*(epoch+1)/W over the "
      "first W epochs (0: none)")
    a("--pretrained", default="", type=str,
      help="torchvision ImageNet ResNet weights file for the backbone (never downloaded)")
    a("--amp", action="store_true", help="mixed precision (bf16 where supported, else fp16 "
      "with loss scaling)")
    a("--channels_last", default=True, action=argparse.BooleanOptionalAction,
      help="channels-last (NHWC) memory layout for the network and its input (default on)")
    a("--compile", action="store_true", help="torch.compile the training network")
    a("--sync_bn", action="store_true", help="SyncBatchNorm under torchrun")
    a("--gather", action="store_true", help="under torchrun: triplet loss over the batches "
      "of all ranks (negatives from every rank), as one process with the whole batch")
    a("--trust-checkpoint", action="store_true",
      help="unpickle --resume fully (only for files you trust)")
    a("--visrank", default=0, type=int, metavar="K",
      help="write rank-list PNGs (query + top K gallery images, green = same identity) of a "
           "few queries to <log_path>/vis_rank/ (and TensorBoard when training)")
    a("--test_every", default=2, type=int, help="test every N epochs (and after the last); "
      "0: only after the last")
    a("--print_freq", default=50, type=int, help="print every N steps (and the last)")
    a("--deterministic", action="store_true", help="deterministic kernels (slower)")
    return p


def run_name(args, method):
    """The authors' run suffix: 'sysu_agw_p4_n8_lr_0.1_seed_0' (+ '_adam', + '_trial_T')."""
    name = (f"{args.dataset}_{method}_p{args.num_pos}_n{args.batch_size}_lr_{args.lr}"
            f"_seed_{args.seed}")
    if args.optim != "sgd":
        name += f"_{args.optim}"
    if args.dataset == "regdb":
        name += f"_trial_{args.trial}"
    return name


def _tool_path(path, tool_dir):
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(tool_dir) / p).resolve()


def prepare_args(args, tool_dir):
    """Resolve paths (outputs against the method's folder, the dataset against the
    repository root by default) and check flag values argparse cannot."""
    args.model_path = str(_tool_path(args.model_path, tool_dir))
    args.log_path = str(_tool_path(args.log_path, tool_dir))
    args.vis_log_path = str(_tool_path(args.vis_log_path, tool_dir))
    args.data_path = str(utils.resolve_path(args.data_path, DEFAULT_DATA[args.dataset]))
    positive = {"batch_size": "--batch-size", "num_pos": "--num_pos", "test_batch": "--test-batch",
                "epochs": "--epochs", "img_w": "--img_w", "img_h": "--img_h",
                "save_epoch": "--save_epoch", "print_freq": "--print_freq"}
    for name, flag in positive.items():
        if getattr(args, name) < 1:
            raise UserError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise UserError(f"--batch-size must be >= 2 identities per step: with {args.batch_size} the "
                        f"triplet loss has no negative and the ID loss no contrast")
    for name in ("workers", "test_every", "warmup_epochs", "visrank", "pad"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    utils.check_schedule(args)
    if args.dataset == "regdb" and not 1 <= args.trial <= 10:
        raise UserError(f"--trial must be 1..10 for RegDB, got {args.trial}")
    return args


# ============================================================================ checkpoints
def checkpoint_kind(obj):
    """'last' (our resumable <run>_last.pth), 'finetune' ({'net': state_dict, 'epoch', ...},
    the authors' .t format) or 'pretrain' (anything else: a plain state_dict such as an
    MMGL checkpoint, or one nested under 'state_dict'/'model')."""
    if isinstance(obj, Mapping) and isinstance(obj.get("net"), Mapping):
        return "last" if "optimizer" in obj else "finetune"
    return "pretrain"


def checkpoint_num_classes(obj, key="classifier.weight"):
    """Identity count of a fine-tuning checkpoint (rows of its classifier), else None."""
    if checkpoint_kind(obj) == "pretrain":
        return None
    sd = obj["net"]
    w = sd.get(key, sd.get("module." + key))
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None


def load_finetune_state(net, state_dict, source, hint="--method/--arch/--dataset"):
    """Load a fine-tuning network's state_dict strictly, except for the tensors the authors'
    networks carry but never run (their stems' whole ResNets), which are skipped with a
    note. Any other missing, unexpected or mis-shaped tensor is a UserError naming a few."""
    net = utils.unwrap(net)
    notes = []
    report = model.load_backbone(net, state_dict, log=notes.append, source=source)
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
    print(f"loaded all {len(report['loaded'])} tensors of {source}"
          + (f" (skipped {skipped} never-used stem/base tensors of the authors' network)"
             if skipped else ""))


def read_resume(args):
    """(path, loaded object) of --resume; UserError if it is missing or unreadable."""
    path = utils.find_checkpoint(args.resume, args.model_path)
    return path, utils.load_checkpoint(path, trust=args.trust_checkpoint)


def read_test_checkpoint(args):
    """read_resume for the test scripts, where --resume is required."""
    if not args.resume:
        raise UserError("--resume CKPT is required: the checkpoint to test (a path, or a name "
                        "under --model_path)")
    return read_resume(args)


def load_resume(net, args, optimizer=None, scaler=None, state=None, loaded=None):
    """Apply ``--resume`` to ``net`` (and, for a '<run>_last.pth', to optimizer, AMP scaler,
    RNG and the method ``state`` dict). ``loaded``: read_resume(args) if already done.
    Returns (start_epoch, best_state)."""
    path, obj = loaded or read_resume(args)
    kind = checkpoint_kind(obj)
    if kind == "pretrain":
        # MMGL (or any backbone) checkpoint: heads dropped, counts printed, UserError if
        # nothing loads; fine-tuning starts from epoch 0.
        print(f"==> initialising the backbone from {path}")
        model.load_backbone(net, obj, source=str(path))
        return 0, None
    load_finetune_state(net, obj["net"], str(path))
    epoch = int(obj.get("epoch", -1))
    if kind == "finetune":
        print(f"==> loaded fine-tuning checkpoint {path} (epoch {epoch})")
        best = None
        cmc = obj.get("cmc")
        if cmc is not None:
            best = {"epoch": epoch, "rank1": float(np.asarray(cmc).reshape(-1)[0]),
                    "feature": obj.get("feature")}
        return epoch + 1, best
    # kind == 'last': continue exactly where the run stopped
    if optimizer is not None:
        optimizer.load_state_dict(obj["optimizer"])
    if scaler is not None and obj.get("scaler"):
        scaler.load_state_dict(obj["scaler"])
    if state is not None and obj.get("state"):
        state.update(obj["state"])
    if obj.get("rng"):
        utils.set_rng_state(obj["rng"])
    print(f"==> resuming {path}: epoch {epoch} done, continuing at epoch {epoch + 1}")
    return epoch + 1, obj.get("best")


def _checkpoint(net, epoch, metrics, feature):
    cmc, mAP, mINP = metrics if metrics is not None else (None, None, None)
    return {"net": utils.unwrap(net).state_dict(), "epoch": epoch, "cmc": cmc, "mAP": mAP,
            "mINP": mINP, "feature": feature}


# ============================================================================ optimiser
def _module_params(net, name):
    m = getattr(net, name, None)
    if m is None:
        raise ValueError(f"the network has no module {name!r}")
    return list(m.parameters()) if isinstance(m, nn.Module) else [m]


def build_optimizer(net, args, new_modules):
    """The authors' optimiser: group 0 = everything except ``new_modules`` (the backbone, at
    0.1 x lr), then one group per new module (at lr). SGD momentum 0.9, Nesterov, weight
    decay 5e-4; ``--optim adam``: Adam with the same groups and weight decay."""
    net = utils.unwrap(net)
    new_modules = list(new_modules)
    groups, taken = [], set()
    for name in new_modules:
        params = _module_params(net, name)
        taken.update(id(p) for p in params)
        groups.append({"params": params, "lr": args.lr, "name": name})
    base = [p for p in net.parameters() if id(p) not in taken]
    groups.insert(0, {"params": base, "lr": 0.1 * args.lr, "name": "backbone"})
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, weight_decay=5e-4, momentum=0.9, nesterov=True)
    return torch.optim.Adam(groups, lr=args.lr, weight_decay=5e-4)


def learning_rate(epoch, args, milestones=None):
    """lr of the new modules at ``epoch``: linear warm-up lr*(epoch+1)/W over the first
    W = --warmup_epochs (10) epochs, then lr, x0.1 from milestones[0], x0.01 from
    milestones[1]."""
    m1, m2 = milestones or args.milestones or DEFAULT_MILESTONES
    warm = args.warmup_epochs
    if epoch < warm:
        return args.lr * (epoch + 1) / warm
    if epoch < m1:
        return args.lr
    if epoch < m2:
        return args.lr * 0.1
    return args.lr * 0.01


def adjust_learning_rate(optimizer, epoch, args, milestones=None):
    """Set the epoch's lr: group 0 (backbone) 0.1 x, the others 1 x. Returns the lr."""
    lr = learning_rate(epoch, args, milestones)
    optimizer.param_groups[0]["lr"] = 0.1 * lr
    for g in optimizer.param_groups[1:]:
        g["lr"] = lr
    return lr


# ============================================================================ devices / AMP
def feature_scale(feat):
    """{'feat_norm': mean L2 norm, 'feat_dist': mean pairwise Euclidean distance} of a batch
    of pooled features (device scalars, logged per step; the triplet losses scale with them)."""
    f = feat.detach().float()
    n = f.shape[0]
    return {"feat_norm": f.norm(dim=1).mean(), "feat_dist": torch.cdist(f, f).sum() / max(1, n * (n - 1))}


def gather_for_loss(feat, labels, args):
    """With --gather under torchrun: the features and labels of every rank's batch
    (gradient-correct all_gather), so a batch-wise loss (the triplet's hardest negatives)
    sees the whole global batch; otherwise unchanged."""
    if not args.gather or utils.get_world_size() == 1:
        return feat, labels
    return utils.all_gather_with_grad(feat), utils.all_gather_with_grad(labels)


# ============================================================================ testing
class TestSet:
    """Query/gallery lists of the evaluation protocol for ``args`` (file lists at once, the
    decoded images on first use and then kept, so testing every 2 epochs decodes once)."""

    __test__ = False  # not a pytest test class, whatever module imports it

    def __init__(self, args):
        self.args = args
        if args.dataset == "sysu":
            self.q_paths, self.q_pids, self.q_cams = data_manager.process_query_sysu(
                args.data_path, mode=args.mode)
            (self.g_paths, self.g_pids, self.g_cams,
             self.trial_index) = data_manager.sysu_gallery_trials(
                args.data_path, mode=args.mode, gall_mode=args.gall_mode)
            self.q_modal, self.g_modal = THERMAL, VISIBLE
            self.trials = list(range(len(self.trial_index)))
        else:
            vis = data_manager.process_test_regdb(args.data_path, trial=args.trial, modal="visible")
            thr = data_manager.process_test_regdb(args.data_path, trial=args.trial, modal="thermal")
            (self.q_paths, self.q_pids), (self.g_paths, self.g_pids) = (
                (thr, vis) if args.tvsearch else (vis, thr))
            self.q_modal, self.g_modal = (THERMAL, VISIBLE) if args.tvsearch else (VISIBLE, THERMAL)
            self.q_cams = self.g_cams = self.trial_index = None
            self.trials = [args.trial]
        self._images = None

    def images(self):
        if self._images is None:
            a = self.args
            t = time.time()
            self._images = (data_manager.load_images(self.q_paths, a.img_w, a.img_h, a.workers),
                            data_manager.load_images(self.g_paths, a.img_w, a.img_h, a.workers))
            print(f"loaded {len(self.q_paths)} query and {len(self.g_paths)} gallery images "
                  f"in {time.time() - t:.1f}s")
        return self._images

    def stats(self):
        n_g = (f"{len(self.trial_index[0])} images per trial, {len(self.g_paths)} distinct over "
               f"the {len(self.trial_index)} trials" if self.trial_index is not None
               else f"{len(self.g_paths)} images")
        return (f"  query    | {len(np.unique(self.q_pids)):5d} ids | {len(self.q_paths)} images\n"
                f"  gallery  | {len(np.unique(self.g_pids)):5d} ids | {n_g}")


def extract_features(net, images_uint8, modal, args, device):
    """Features of uint8 NHWC ``images_uint8`` through ``net`` in eval mode, ``modal`` 1
    (visible stem) or 2 (thermal stem): one float32 [N, D] array per evaluation output of
    the network (already L2-normalised by it)."""
    net = utils.unwrap(net)
    was_training = net.training
    net.eval()
    amp_dtype, _ = utils.amp_setup(args.amp, device)
    cl = args.channels_last
    norm = data_loader.DeviceAugment(args.img_h, args.img_w, device=device)
    outs = None
    starts = range(0, len(images_uint8), args.test_batch)
    with torch.inference_mode(), utils.autocast(device, amp_dtype):
        for s in utils.progress(starts, desc=f"extracting {'RGB' if modal == 1 else 'IR'}"):
            # a copy: slices of a read-only memmap cannot back a tensor
            x = torch.from_numpy(np.array(images_uint8[s:s + args.test_batch]))
            x = norm.normalize(x.to(device, non_blocking=True))
            x = x if cl else x.contiguous()
            feats = net(x, x, modal)
            feats = feats if isinstance(feats, (tuple, list)) else (feats,)
            if outs is None:
                outs = [[] for _ in feats]
            for o, f in zip(outs, feats):
                o.append(f.float().cpu())
    net.train(was_training)
    outs = [torch.cat(o).numpy().astype(np.float32, copy=False) for o in outs]
    for i, o in enumerate(outs):   # a NaN here would only surface as NaN distances later
        utils.check_finite(o, f"evaluation features (output {i}) of the {'RGB' if modal == 1 else 'IR'} "
                              f"test images", net)
    return outs


def test(net, args, device, feature_names=("POOL", "FC"), tool_dir=None, testset=None,
         per_trial=True, tag="test", writer=None, step=0):
    """Evaluate ``net`` on the protocol of ``args`` and print the results. Returns
    {feature name: (cmc, mAP, mINP)}, the MEAN over the SYSU-MM01 gallery trials (RegDB:
    the one --trial). Each image's feature is extracted once (the SYSU gallery is the
    union of the 10 trial galleries, indexed per trial). With --visrank K, rank lists of
    the last feature (gallery trial 0 on SYSU) go to <log_path>/vis_rank/<tag>/."""
    ts = testset or TestSet(args)
    q_img, g_img = ts.images()
    t = time.time()
    q_feats = extract_features(net, q_img, ts.q_modal, args, device)
    g_feats = extract_features(net, g_img, ts.g_modal, args, device)
    if len(q_feats) != len(feature_names):
        raise ValueError(f"the network returns {len(q_feats)} evaluation features but "
                         f"feature_names has {len(feature_names)}: {feature_names}")
    t_extract = time.time() - t
    results, trials = {}, {}
    for name, qf, gf in zip(feature_names, q_feats, g_feats):
        if args.dataset == "sysu":
            trials[name], results[name] = eval_metrics.evaluate_sysu_trials(
                qf, ts.q_pids, ts.q_cams, gf, ts.g_pids, ts.g_cams, ts.trial_index)
        else:
            results[name] = eval_metrics.eval_regdb(-(qf @ gf.T), ts.q_pids, ts.g_pids)
            trials[name] = [results[name]]
    if args.dataset == "sysu":
        if per_trial:
            for i, trial in enumerate(ts.trials):
                print(f"Test Trial: {trial}")
                for name in feature_names:
                    print(eval_metrics.format_metrics(name, *trials[name][i]))
        print("All Average:")
    else:
        print(f"Test Trial: {args.trial}" + (" (thermal to visible)" if args.tvsearch else ""))
    for name in feature_names:
        print(eval_metrics.format_metrics(name, *results[name]))
    print(f"(feature extraction {t_extract:.1f}s, evaluation {time.time() - t - t_extract:.1f}s)")
    if args.visrank:
        _save_rank_lists(ts, q_feats[-1], g_feats[-1], feature_names[-1], args, tag, writer, step)
    return results


def _save_rank_lists(ts, qf, gf, name, args, tag, writer, step):
    import visrank
    if ts.trial_index is not None:  # SYSU-MM01: the gallery of trial 0
        idx = ts.trial_index[0]
        g_paths, g_pids, g_cams = [ts.g_paths[i] for i in idx], ts.g_pids[idx], ts.g_cams[idx]
        q_cams, sysu = ts.q_cams, True
    else:
        g_paths, g_pids, sysu = ts.g_paths, ts.g_pids, False
        g_cams = np.full(len(g_pids), ts.g_modal)
        q_cams = np.full(len(ts.q_pids), ts.q_modal)
        idx = slice(None)
    out_dir = Path(args.log_path) / "vis_rank" / tag
    written = visrank.save_rank_lists(out_dir, -(qf @ gf[idx].T), ts.q_paths, ts.q_pids, q_cams,
                                      g_paths, g_pids, g_cams, k=args.visrank, sysu=sysu,
                                      writer=writer, tag=f"visrank_{name}", step=step)
    print(f"wrote {len(written)} rank lists ({name}, top {args.visrank}) to {out_dir}")


def test_main(args, net, feature_names, tool_dir, loaded=None):
    """What the method's test script runs: load --resume (required) into ``net`` (a
    network, or a builder ``class_num -> network`` that gets the checkpoint's identity
    count), test, print. ``loaded``: read_test_checkpoint(args) if the script already read
    it. Returns the metrics dict of :func:`test`."""
    prepare_args(args, tool_dir)
    path, obj = loaded or read_test_checkpoint(args)
    device = utils.select_device(args.gpu)
    utils.set_seed(args.seed, args.deterministic)
    if not isinstance(net, nn.Module):
        net = net(checkpoint_num_classes(obj) or 1)
    testset = TestSet(args)
    utils.print_run_header(args, device, extra=["Test set:", testset.stats()])
    if checkpoint_kind(obj) == "pretrain":
        print("note: testing a pre-training checkpoint (backbone only; the heads keep their "
              "initial values)")
        model.load_backbone(net, obj, source=str(path))
    else:
        load_finetune_state(net, obj["net"], str(path))
        if obj.get("epoch") is not None:
            print(f"==> checkpoint of epoch {obj['epoch']}")
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    writer = None
    if args.visrank:   # the rank lists go to TensorBoard too, under <vis_log_path>/<ckpt>_test
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(Path(args.vis_log_path) / f"{path.stem}_test"))
    try:
        return test(net, args, device, feature_names, tool_dir, testset=testset, tag=path.stem,
                    writer=writer)
    finally:
        if writer is not None:
            writer.close()


# ============================================================================ training
class _Meters:
    """Running sums of the step's named scalar tensors, kept ON the device (no host sync
    per step); read at print intervals and at the end of the epoch."""

    def __init__(self):
        self.sums, self.last, self.n = {}, {}, 0

    def update(self, values):
        self.n += 1
        device = values["total_loss"].device
        for k, v in values.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
            self.last[k] = v
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()

    def read(self):
        """({name: last value}, {name: average}) as python floats (one host sync)."""
        keys = list(self.sums)
        vals = torch.stack([self.last[k] for k in keys] + [self.sums[k] / self.n for k in keys])
        vals = vals.cpu().tolist()
        return dict(zip(keys, vals[:len(keys)])), dict(zip(keys, vals[len(keys):]))


def _fmt_step(epoch, step, steps, t_step, t_avg, eta, lr, last, avg):
    parts = [f"Epoch: [{epoch}][{step}/{steps}]", f"Time: {t_step:.3f} ({t_avg:.3f})",
             f"ETA: {utils.format_time(eta)}", f"lr: {lr:.4g}"]
    for k in last:
        if k == "acc":
            continue
        parts.append(f"{'Loss' if k == 'total_loss' else k}: {last[k]:.4f} ({avg[k]:.4f})")
    if "acc" in last:
        parts.append(f"Accu: {100 * avg['acc']:.2f}")
    return " ".join(parts)


def _data_stats(data, testset):
    return ["Dataset statistics:",
            f"  train    | {len(np.unique(data.rgb_label)):5d} ids | RGB {len(data.rgb_pool)} "
            f"images, IR {len(data.ir_pool)} images | {data.img_size[0]}x{data.img_size[1]}",
            testset.stats()]


def train(args, net, step_fn, new_modules, method, milestones, feature_names, tool_dir,
          on_epoch_end=None, state=None, best_by=None):
    """The whole fine-tuning run.

    net: the network, or a builder ``class_num -> network`` (called with the training
      set's identity count).
    step_fn(net, x_rgb, x_ir, labels_rgb, labels_ir, epoch, state) -> (loss, {name: scalar
      tensor}): runs inside autocast on augmented float batches; names such as 'id_loss',
      'tri_loss', 'acc' are printed and logged.
    new_modules: attribute names of the modules trained at the full lr (the rest: 0.1x),
      or a callable net -> names.
    milestones: (M1, M2) default for the lr steps (--milestones overrides).
    feature_names: the network's evaluation outputs, e.g. ('POOL', 'FC').
    best_by: the feature whose Rank-1 picks '<run>_best.t' (default: the LAST one, as the
      authors' scripts keep the best by cmc_att: FC for AGW, FC_att for DDAG).
    on_epoch_end(state, meters): called after each epoch with the epoch's average meters
      (e.g. DDAG's wG); ``state`` (a dict) is saved in '<run>_last.pth'.
    Returns {'run', 'best', 'final', 'best_path', 'last_path', 'log'}.
    """
    prepare_args(args, tool_dir)
    if args.milestones is None:  # --milestones overrides the method's schedule
        args.milestones = list(milestones or DEFAULT_MILESTONES)
    feature_names = tuple(feature_names)
    best_by = best_by or feature_names[-1]
    if best_by not in feature_names:
        raise ValueError(f"best_by {best_by!r} is not one of {feature_names}")
    state = {} if state is None else state
    # a missing or unreadable --resume fails now, before any data is loaded
    resume = read_resume(args) if args.resume else None
    device = utils.init_distributed(args.gpu)
    rank0 = utils.is_main_process()
    utils.set_seed(args.seed + utils.get_rank(), args.deterministic)
    run = run_name(args, method)
    model_dir = Path(args.model_path)
    best_path, last_path = model_dir / f"{run}_best.t", model_dir / f"{run}_last.pth"
    log_file, old_stdout, writer = None, sys.stdout, None
    log_dir = Path(args.log_path)
    # a run that fails before its first epoch is done leaves none of these (utils.cli)
    guard = utils.StartGuard(log_dir / f"{run}.txt", log_dir / f"{run}.jsonl", Path(args.vis_log_path) / run)
    try:
        if rank0:  # a wrong output folder fails now, not at the first save
            utils.check_writable(args.model_path, args.log_path, args.vis_log_path)
        else:  # one log: the other ranks stay silent (their errors still reach stderr)
            sys.stdout = open(os.devnull, "w")
        data = data_loader.load_train_data(args.dataset, args.data_path, args.trial,
                                           args.img_h, args.img_w, args.workers)
        testset = TestSet(args)
        if rank0:  # the log starts once the data is in: a run that cannot start leaves none
            log_file = utils.setup_log(args.log_path, run)
        utils.print_run_header(args, device, extra=_data_stats(data, testset))

        if not isinstance(net, nn.Module):
            net = net(data.num_classes)
        net.to(device)
        cl = args.channels_last
        if cl:
            net.to(memory_format=torch.channels_last)
        if callable(new_modules):
            new_modules = new_modules(net)
        optimizer = build_optimizer(net, args, new_modules)
        amp_dtype, scaler = utils.amp_setup(args.amp, device)
        start_epoch, best = 0, None
        if args.resume:
            start_epoch, best = load_resume(net, args, optimizer, scaler, state, loaded=resume)
        elif not args.pretrained:
            print("note: no --resume and no --pretrained: the backbone starts from random weights")

        # `net` stays the bare module (tested and saved); SyncBN conversion, when asked for,
        # swaps its BatchNorm children in place and keeps their parameters, so the optimizer
        # built above still holds the right tensors
        train_net = utils.wrap_ddp(net, device, args.sync_bn)
        if args.compile:
            train_net = torch.compile(train_net)

        if rank0:
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(str(Path(args.vis_log_path) / run))
            jlog = utils.JsonLog(Path(args.log_path) / f"{run}.jsonl")
        aug = data_loader.DeviceAugment(args.img_h, args.img_w, pad=args.pad, device=device)
        final = None
        if start_epoch >= args.epochs:
            print(f"checkpoint is at epoch {start_epoch - 1}; --epochs {args.epochs} leaves "
                  f"nothing to train")
        print("==> Start Training...")
        run_start = time.time()
        for epoch in range(start_epoch, args.epochs):
            lr = adjust_learning_rate(optimizer, epoch, args)
            sampler = data_loader.IdentitySampler(
                data.rgb_label, data.ir_label, args.num_pos, args.batch_size, seed=args.seed,
                epoch=epoch, rgb_pool=data.rgb_pool, ir_pool=data.ir_pool)
            loader = data_loader.make_loader(data, sampler, workers=args.workers,
                                             pin_memory=device.type == "cuda")
            meters = _train_epoch(train_net, loader, aug, optimizer, scaler, amp_dtype, cl,
                                  step_fn, epoch, lr, state, args, device, last_path,
                                  run_start, start_epoch)
            if on_epoch_end is not None:
                on_epoch_end(state, meters)

            last_epoch = epoch == args.epochs - 1
            due = last_epoch or (args.test_every and epoch > 0 and epoch % args.test_every == 0)
            metrics = None
            if rank0:
                if due:
                    print(f"Test Epoch: {epoch}")
                    metrics = test(net, args, device, feature_names, tool_dir, testset=testset,
                                   per_trial=False, tag=f"{run}_epoch_{epoch}", writer=writer,
                                   step=epoch)
                    final = metrics
                    r1 = float(metrics[best_by][0][0])
                    if best is None or r1 > best["rank1"]:
                        best = {"epoch": epoch, "rank1": r1, "feature": best_by,
                                "mAP": float(metrics[best_by][1]),
                                "mINP": float(metrics[best_by][2])}
                        utils.save_checkpoint(_checkpoint(net, epoch, metrics[best_by], best_by),
                                              best_path)
                    print(f"Best Epoch [{best['epoch']}] ({best.get('feature') or best_by} Rank-1 "
                          f"{best['rank1']:.2%})")
                if epoch > 0 and epoch % args.save_epoch == 0:
                    tested = metrics[best_by] if metrics else None
                    utils.save_checkpoint(_checkpoint(net, epoch, tested, best_by),
                                          model_dir / f"{run}_epoch_{epoch}.t")
                utils.save_checkpoint({"net": utils.unwrap(net).state_dict(),
                                       "optimizer": optimizer.state_dict(),
                                       "scaler": scaler.state_dict(),
                                       "epoch": epoch, "best": best, "rng": utils.get_rng_state(),
                                       "state": dict(state), "args": _plain(vars(args))},
                                      last_path)
                _log_epoch(writer, jlog, epoch, lr, meters, metrics, feature_names)
            guard.disarm()
            utils.barrier()
        summary = (f"epoch {best['epoch']}, {best.get('feature') or best_by} Rank-1 "
                   f"{best['rank1']:.2%} -> {best_path}" if best else "none")
        print(f"==> Done in {utils.format_time(time.time() - run_start)}; best: {summary}")
        return {"run": run, "best": best, "final": final, "best_path": str(best_path),
                "last_path": str(last_path), "log": str(log_file) if log_file else None}
    finally:
        if writer is not None:
            writer.close()
        if sys.stdout is not old_stdout:
            sys.stdout.flush()
            sys.stdout.close()
            sys.stdout = old_stdout
        utils.cleanup_distributed()


def _plain(d):
    """args as plain python values (weights_only loading accepts no other objects)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else
                list(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in d.items()}


def _train_epoch(net, loader, aug, optimizer, scaler, amp_dtype, cl, step_fn, epoch, lr, state,
                 args, device, last_path, run_start, start_epoch):
    net.train()
    meters = _Meters()
    steps = len(loader)
    watch = utils.NonFiniteWatch(device)
    t0 = t_last = time.time()
    last_printed = -1
    for step, (rgb, ir, y_rgb, y_ir) in enumerate(loader):
        rgb, ir = rgb.to(device, non_blocking=True), ir.to(device, non_blocking=True)
        y_rgb, y_ir = y_rgb.to(device, non_blocking=True), y_ir.to(device, non_blocking=True)
        x_rgb, x_ir = aug(rgb), aug(ir)
        if not cl:
            x_rgb, x_ir = x_rgb.contiguous(), x_ir.contiguous()
        with utils.autocast(device, amp_dtype):
            loss, logs = step_fn(net, x_rgb, x_ir, y_rgb, y_ir, epoch, state)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # NaN/inf guard without a host sync per step, checked at print time (the last step
        # of an epoch always prints, so it is checked before anything is saved)
        watch.update(loss, step, None if scaler.is_enabled() else net.parameters())
        meters.update({"total_loss": loss, **logs})

        if step % args.print_freq == 0 or step == steps - 1:
            watch.check(epoch, last_path if last_path.is_file() else None)
            last, avg = meters.read()
            if step == 0:   # the epoch's first-step values go into its JSON line (step0_*)
                first = {f"step0_{k}": v for k, v in last.items()}
            now = time.time()
            t_step = (now - t_last) / (step - last_printed)
            t_avg = (now - t0) / (step + 1)
            # remaining time of the run from the pace so far (tests included)
            done = (epoch - start_epoch) + (step + 1) / steps
            eta = (now - run_start) / done * (args.epochs - start_epoch - done)
            print(_fmt_step(epoch, step, steps, t_step, t_avg, eta, lr, last, avg))
            t_last, last_printed = now, step
    _, avg = meters.read()
    return {k: utils.reduce_mean(v) for k, v in {**avg, **first}.items()}


def _log_epoch(writer, jlog, epoch, lr, meters, metrics, feature_names):
    for k, v in meters.items():
        writer.add_scalar(k, v, epoch)
    writer.add_scalar("lr", lr, epoch)
    record = {"epoch": epoch, "lr": lr, **meters}
    if metrics:
        # the authors' scalar names: rank1/mAP/mINP of the first feature, *_att of the second
        for i, name in enumerate(feature_names):
            cmc, mAP, mINP = metrics[name]
            suffix = "" if i == 0 else "_att" if i == 1 else f"_{name}"
            for key, val in (("rank1", cmc[0]), ("mAP", mAP), ("mINP", mINP)):
                writer.add_scalar(key + suffix, float(val), epoch)
            record[name] = {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
                            "mAP": float(mAP), "mINP": float(mINP)}
    writer.flush()
    jlog.write(**record)
