"""The fine-tuning engine AGW (``AGW/train.py``, ``AGW/test.py``) and DDAG
(``DDAG/train_ddag.py``, ``DDAG/test_ddag.py``) share, as plain functions: their flags,
``--resume`` (MMGL pre-training checkpoint vs fine-tuning checkpoint vs resumable state),
the optimiser and learning-rate schedule, one training epoch (:func:`train_one_epoch`),
testing on the benchmark's protocol (:func:`evaluate`) and the checkpoints. Each method's
script owns its ``main``: the network, the loss, and the epoch loop calling these.

Checkpoints (under ``--model_path``, relative paths resolved against the method's folder):

* ``<run>_best.t``     ``{'net', 'epoch', 'cmc', 'mAP', 'mINP', 'feature'}`` (the authors'
  format: 'net' is a plain state_dict without 'module.'), best Rank-1 so far;
* ``<run>_epoch_N.t``  same format, every ``--save_epoch`` epochs;
* ``<run>_last.pth``   everything needed to continue after a crash (runstate.save_last:
  net, optimizer, AMP scaler, epoch, best, RNG states, the method's state such as
  DDAG's wG), every epoch.
"""
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data_loader
import data_manager
import datasets
import eval_metrics
import model
import options
import runstate
import utils
from utils import UserError

DEFAULT_MILESTONES = (20, 50)  # AGW's lr steps


# ============================================================================ arguments
def get_args_parser(description, epochs=80, milestones=DEFAULT_MILESTONES):
    """The authors' fine-tuning flags (their AGW/DDAG train.py) plus ours, over the flags
    every stage shares (options.parents()). ``epochs``/``milestones`` are the method's
    defaults (AGW: 80, (20, 50))."""
    # one-line argparse errors (error: ..., exit 2), defaults shown in --help
    p = utils.ArgumentParser(description=description, parents=options.parents())
    p.set_defaults(epochs=epochs, save_epoch=20)
    g = p.add_argument_group("fine-tuning")
    a = g.add_argument
    a("--optim", default="sgd", choices=("sgd", "adam"), help="optimizer (adam: lr 0.00035)")
    a("--test-only", action="store_true", help="only test the --resume checkpoint")
    a("--batch-size", default=8, type=int, help="identities per step (each with --num_pos RGB "
      "and --num_pos IR images)")
    a("--num_pos", default=4, type=int, help="images per identity and modality in a step")
    a("--pad", default=10, type=int, help="train-time augmentation: zero padding before the "
      "random crop back to img_h x img_w (the authors' 10 pixels at 288x144)")
    a("--margin", default=0.3, type=float, help="triplet loss margin")
    a("--milestones", default=None, type=int, nargs=2, metavar=("M1", "M2"),
      help=f"lr x0.1 from epoch M1, x0.01 from M2 (default: {milestones[0]} {milestones[1]})")
    g = p.add_argument_group("testing")
    a = g.add_argument
    a("--test-batch", default=64, type=int, help="test batch size")
    a("--mode", default="all", choices=("all", "indoor"), help="SYSU-MM01 search mode")
    a("--gall_mode", default="single", choices=("single", "multi"),
      help="SYSU-MM01 gallery: single-shot or multi-shot (10 images per id and camera)")
    a("--tvsearch", action="store_true", help="RegDB / LLCM: thermal (infrared) queries against the "
      "visible gallery; default visible to thermal")
    a("--test_every", default=2, type=int, help="test every N epochs (and after the last); "
      "0: only after the last")
    a("--rerank", action="store_true", help="k-reciprocal re-ranking (Zhong et al., CVPR 2017) of "
      "the query-gallery distances before evaluation; the result lines say '(re-ranked)'")
    a("--rerank_k1", default=20, type=int, help="re-ranking: k1 (k-reciprocal neighbours)")
    a("--rerank_k2", default=6, type=int, help="re-ranking: k2 (local query expansion)")
    a("--rerank_lambda", default=0.3, type=float, help="re-ranking: weight of the original distance")
    a("--save_features", default="", metavar="DIR", help="test scripts: write the query/gallery "
      "features of every head, ids, cameras, modalities and paths to DIR/<checkpoint>.npz "
      "(tools/analyze.py reads it)")
    a("--visrank", default=0, type=int, metavar="K",
      help="write rank-list PNGs (query + top K gallery images, green = same identity) of a "
           "few queries to <log_path>/vis_rank/ (and TensorBoard when training)")
    return p


def run_name(args, method):
    """The authors' run suffix: 'sysu_agw_p4_n8_lr_0.1_seed_0' (+ '_adam', + '_trial_T')."""
    name = (f"{args.dataset}_{method}_p{args.num_pos}_n{args.batch_size}_lr_{args.lr}"
            f"_seed_{args.seed}")
    if args.optim != "sgd":
        name += f"_{args.optim}"
    return name + datasets.get(args.dataset).run_suffix(args)


def _tool_path(path, tool_dir):
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(tool_dir) / p).resolve()


def prepare_args(args, tool_dir):
    """Resolve paths (outputs against the method's folder, the dataset against the
    repository root by default) and check the flag values argparse cannot."""
    datasets.get_labelled(args.dataset, "fine-tuning and testing")
    options.check(args)
    for key in ("model_path", "log_path", "vis_log_path"):
        setattr(args, key, str(_tool_path(getattr(args, key), tool_dir)))
    args.data_path = str(datasets.get(args.dataset).data_path(args))
    for name, flag in (("batch_size", "--batch-size"), ("num_pos", "--num_pos"), ("test_batch", "--test-batch")):
        if getattr(args, name) < 1:
            raise UserError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise UserError(f"--batch-size must be >= 2 identities per step: with {args.batch_size} the "
                        f"triplet loss has no negative and the ID loss no contrast")
    if args.rerank_k1 < 1 or args.rerank_k2 < 1 or not 0 <= args.rerank_lambda <= 1:
        raise UserError(f"--rerank_k1/--rerank_k2 must be >= 1 and --rerank_lambda in [0, 1], got "
                        f"{args.rerank_k1}/{args.rerank_k2}/{args.rerank_lambda}")
    for name in ("test_every", "visrank", "pad"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    return args


# ============================================================================ checkpoints
def checkpoint_kind(obj):
    """'last' (a resumable fine-tuning <run>_last.pth), 'finetune' ({'net': state_dict,
    'epoch', ...}, the authors' .t format) or 'pretrain' (anything else: a plain state_dict
    such as an MMGL checkpoint, one nested under 'state_dict'/'model', or pre-training's
    <run>_last.pth, whose network initialises the backbone)."""
    stage = runstate.last_stage(obj)
    if stage is not None:
        return "last" if stage == "finetune" else "pretrain"
    return "finetune" if isinstance(obj, Mapping) and isinstance(obj.get("net"), Mapping) else "pretrain"


def pretrain_state(obj):
    """The network state in a 'pretrain' kind of checkpoint (a <run>_last.pth of pre-training
    holds it under 'net', or 'model' in older files; anything else is handed on as is)."""
    return runstate.normalise(obj)["net"] if runstate.last_stage(obj) == "pretrain" else obj


def checkpoint_num_classes(obj, key="classifier.weight"):
    """Identity count of a fine-tuning checkpoint (rows of its classifier), else None."""
    if checkpoint_kind(obj) == "pretrain":
        return None
    sd = obj["net"]
    w = sd.get(key, sd.get("module." + key))
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None


def load_finetune_state(net, state_dict, source, hint="--method/--arch/--dataset", log=print):
    """Load a fine-tuning network's state_dict strictly, except for the tensors the authors'
    networks carry but never run (their stems' whole ResNets), which are skipped with a
    note. Any other missing, unexpected or mis-shaped tensor is a UserError naming a few."""
    net = utils.unwrap(net)
    report = model.load_backbone(net, state_dict, log=lambda *_: None, source=source)
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


def read_resume(args, build=None):
    """(path, loaded object) of --resume; UserError if it is missing or unreadable or, given
    ``build`` (class_num -> network), if it does not fit the network: it is then loaded
    into a throwaway copy (the identity count read from the file), so that a wrong file
    fails before the run header and before any data is read."""
    path = utils.find_checkpoint(args.resume, args.model_path)
    obj = utils.load_checkpoint(path, trust=args.trust_checkpoint)
    if build is not None:
        load_checkpoint_into(build(checkpoint_num_classes(obj) or 1), path, obj, log=lambda *_: None)
    return path, obj


def load_checkpoint_into(net, path, obj, log=print):
    """The network part of any --resume kind into ``net``: a pre-training checkpoint into
    its backbone (heads keep their initial values), a fine-tuning one strictly."""
    if checkpoint_kind(obj) == "pretrain":
        model.load_backbone(net, pretrain_state(obj), log=log, source=str(path))
    else:
        load_finetune_state(net, obj["net"], str(path), log=log)


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
    start, best = _load_resume(net, args, optimizer, scaler, state, loaded)
    if start >= args.epochs:
        print(f"checkpoint is at epoch {start - 1}; --epochs {args.epochs} leaves nothing to train")
    return start, best


def _load_resume(net, args, optimizer, scaler, state, loaded):
    path, obj = loaded or read_resume(args)
    kind = checkpoint_kind(obj)
    if kind == "pretrain":
        # MMGL (or any backbone) checkpoint: heads dropped, counts printed, UserError if
        # nothing loads; fine-tuning starts from epoch 0.
        print(f"==> initialising the backbone from {path}")
        model.load_backbone(net, pretrain_state(obj), source=str(path))
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
    last = runstate.load_last(path, obj, "finetune", net, optimizer, scaler, load_net=False)
    if state is not None:
        state.update(last["state"])
    print(f"==> resuming {path}: epoch {epoch} done, continuing at epoch {epoch + 1}")
    return epoch + 1, last.get("best")


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
    """The benchmark's test lists for ``args`` (datasets.TestLists: query, union gallery,
    trial index, evaluator) with the decoded images, loaded on first use and then kept, so
    testing every 2 epochs decodes once."""

    __test__ = False  # not a pytest test class, whatever module imports it

    def __init__(self, args):
        self.args = args
        self.lists = datasets.get(args.dataset).test_lists(args)
        self._images = None

    def __getattr__(self, name):   # q_paths, g_pids, trial_index, ... of the lists
        if name.startswith("_") or name in ("args", "lists"):
            raise AttributeError(name)
        return getattr(self.lists, name)

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
        n_trials = len(self.trial_index)
        n_g = (f"{len(self.trial_index[0])} images per trial, {len(self.g_paths)} distinct over "
               f"the {n_trials} trials" if n_trials > 1 else f"{len(self.g_paths)} images")
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


def evaluate(net, args, device, feature_names=("POOL", "FC"), testset=None, per_trial=True,
             tag="test", writer=None, step=0, save_to=None):
    """Evaluate ``net`` on the protocol of ``args`` and print the results. Returns
    {feature name: (cmc, mAP, mINP)}, the MEAN over the gallery trials (RegDB: the one
    --trial). Each image's feature is extracted once (the gallery is the union of the trial
    galleries, indexed per trial). With --rerank the distances are k-reciprocal re-ranked
    first. With --visrank K, rank lists of the last feature (gallery trial 0) go to
    <log_path>/vis_rank/<tag>/. ``save_to``: write the features to that .npz
    (features.save_features)."""
    ts = testset or TestSet(args)
    q_img, g_img = ts.images()
    t = time.time()
    q_feats = extract_features(net, q_img, ts.q_modal, args, device)
    g_feats = extract_features(net, g_img, ts.g_modal, args, device)
    if len(q_feats) != len(feature_names):
        raise ValueError(f"the network returns {len(q_feats)} evaluation features but "
                         f"feature_names has {len(feature_names)}: {feature_names}")
    t_extract = time.time() - t
    if save_to:
        _save_features(save_to, ts, feature_names, q_feats, g_feats, args)
    rerank_args = (dict(k1=args.rerank_k1, k2=args.rerank_k2, lambda_value=args.rerank_lambda)
                   if args.rerank else None)
    results, trials = {}, {}
    for name, qf, gf in zip(feature_names, q_feats, g_feats):
        trials[name], results[name] = ts.lists.evaluate(qf, gf, rerank_args)
    if args.rerank:
        print(f"k-reciprocal re-ranking: k1={args.rerank_k1} k2={args.rerank_k2} "
              f"lambda={args.rerank_lambda}")
    tag_name = (lambda n: f"{n} (re-ranked)") if args.rerank else (lambda n: n)
    if len(ts.trials) > 1:
        if per_trial:
            for i, trial in enumerate(ts.trials):
                print(f"Test Trial: {trial}")
                for name in feature_names:
                    print(eval_metrics.format_metrics(tag_name(name), *trials[name][i]))
        print("All Average:" + (f" ({ts.direction})" if ts.direction else ""))
    else:
        print(f"Test Trial: {ts.trials[0]}" + (f" ({ts.direction})" if ts.direction else ""))
    for name in feature_names:
        print(eval_metrics.format_metrics(tag_name(name), *results[name]))
    print(f"(feature extraction {t_extract:.1f}s, evaluation {time.time() - t - t_extract:.1f}s)")
    if args.visrank:
        _save_rank_lists(ts, q_feats[-1], g_feats[-1], feature_names[-1], args, tag, writer, step)
    return results


def _save_features(path, ts, feature_names, q_feats, g_feats, args):
    import features
    modal = {datasets.VISIBLE: "visible", datasets.THERMAL: "infrared"}
    index = np.stack([np.asarray(i, dtype=np.int64) for i in ts.trial_index])
    features.save_features(path, list(feature_names), list(q_feats), list(g_feats), ts.q_pids, ts.g_pids,
                           ts.q_cams, ts.g_cams, modal[ts.q_modal], modal[ts.g_modal],
                           [str(p) for p in ts.q_paths], [str(p) for p in ts.g_paths], index,
                           args.dataset, ts.mode, str(args.resume))
    print(f"wrote features of {', '.join(feature_names)} to {path}")


def _save_rank_lists(ts, qf, gf, name, args, tag, writer, step):
    import visrank
    idx = ts.trial_index[0]   # the gallery of trial 0
    g_paths = [ts.g_paths[i] for i in idx]
    out_dir = Path(args.log_path) / "vis_rank" / tag
    written = visrank.save_rank_lists(out_dir, -(qf @ gf[idx].T), ts.q_paths, ts.q_pids, ts.q_cams,
                                      g_paths, ts.g_pids[idx], ts.g_cams[idx], k=args.visrank,
                                      sysu=ts.camera_rule, writer=writer, tag=f"visrank_{name}", step=step)
    print(f"wrote {len(written)} rank lists ({name}, top {args.visrank}) to {out_dir}")


def test_main(args, net, feature_names, tool_dir, loaded=None):
    """What the method's test script runs: load --resume (required) into ``net`` (a
    network, or a builder ``class_num -> network`` that gets the checkpoint's identity
    count), test, print. ``loaded``: read_test_checkpoint(args) if the script already read
    it. Returns the metrics dict of :func:`evaluate`."""
    prepare_args(args, tool_dir)
    path, obj = loaded or read_test_checkpoint(args)
    if args.save_features:   # a wrong folder fails now, not after the feature extraction
        utils.check_writable(args.save_features)
    device = utils.select_device(args.gpu)
    utils.set_seed(args.seed, args.deterministic)
    if not isinstance(net, nn.Module):
        net = net(checkpoint_num_classes(obj) or 1)
    notes = []   # a file that does not fit fails here, before the header; its notes follow it
    if checkpoint_kind(obj) == "pretrain":
        notes.append("note: testing a pre-training checkpoint (backbone only; the heads keep their "
                     "initial values)")
    load_checkpoint_into(net, path, obj, log=notes.append)
    if checkpoint_kind(obj) != "pretrain" and obj.get("epoch") is not None:
        notes.append(f"==> checkpoint of epoch {obj['epoch']}")
    testset = TestSet(args)
    utils.print_run_header(args, device, extra=["Test set:", testset.stats()])
    for line in notes:
        print(line)
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    writer = None
    if args.visrank:   # the rank lists go to TensorBoard too, under <vis_log_path>/<ckpt>_test
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(Path(args.vis_log_path) / f"{path.stem}_test"))
    try:
        save_to = Path(args.save_features) / f"{path.stem}.npz" if args.save_features else None
        return evaluate(net, args, device, feature_names, testset=testset, tag=path.stem, writer=writer,
                        save_to=save_to)
    finally:
        if writer is not None:
            writer.close()


# ============================================================================ training
def data_stats(data, testset):
    """The run header's dataset lines."""
    return ["Dataset statistics:",
            f"  train    | {len(np.unique(data.rgb_label)):5d} ids | RGB {len(data.rgb_pool)} "
            f"images, IR {len(data.ir_pool)} images | {data.img_size[0]}x{data.img_size[1]}",
            testset.stats()]


def prepare_net(net, args, device):
    """The network on ``device`` (channels-last unless --no-channels_last) and the module
    that trains: under torchrun DistributedDataParallel (SyncBN with --sync_bn), compiled
    with --compile. ``net`` itself stays the bare module that is tested and saved (SyncBN
    swaps BatchNorm children in place, so an optimiser built on ``net`` holds the right
    tensors)."""
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    train_net = utils.wrap_ddp(net, device, args.sync_bn)
    return net, torch.compile(train_net) if args.compile else train_net


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


def identity_loader(data, epoch, args, device):
    """The epoch's identity-balanced batches: --batch-size ids x --num_pos images per
    modality, RGB j and IR j of the same identity, seeded by (--seed, epoch)."""
    sampler = data_loader.IdentitySampler(data.rgb_label, data.ir_label, args.num_pos, args.batch_size,
                                          seed=args.seed, epoch=epoch, rgb_pool=data.rgb_pool,
                                          ir_pool=data.ir_pool)
    return data_loader.make_loader(data, sampler, workers=args.workers, pin_memory=device.type == "cuda")


def train_one_epoch(net, criterion, loader, aug, optimizer, scaler, epoch, lr, args, device,
                    clock, last_path):
    """One epoch over ``loader`` (:func:`identity_loader`).
    ``criterion(net, x_rgb, x_ir, labels_rgb, labels_ir) -> (loss, {name: scalar
    tensor})`` runs inside autocast; its named values ('id_loss', 'tri_loss', 'acc', ...)
    are printed every --print_freq steps (the one host sync) and averaged for the epoch.
    ``clock`` = (run start time, first epoch of this run) for the ETA; ``last_path``: the
    checkpoint a NaN stop names. Returns the epoch's averages (over ranks), with the first
    step's values as step0_*."""
    amp_dtype, _ = utils.amp_setup(args.amp, device)
    net.train()
    meter = runstate.Meter()
    watch = utils.NonFiniteWatch(device)
    steps = len(loader)
    t0 = t_last = time.time()
    last_printed = -1
    for step, (rgb, ir, y_rgb, y_ir) in enumerate(loader):
        rgb, ir = rgb.to(device, non_blocking=True), ir.to(device, non_blocking=True)
        y_rgb, y_ir = y_rgb.to(device, non_blocking=True), y_ir.to(device, non_blocking=True)
        x_rgb, x_ir = aug(rgb), aug(ir)
        if not args.channels_last:
            x_rgb, x_ir = x_rgb.contiguous(), x_ir.contiguous()
        with utils.autocast(device, amp_dtype):
            loss, logs = criterion(net, x_rgb, x_ir, y_rgb, y_ir)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # NaN/inf guard without a host sync per step, checked at print time (the last step
        # of an epoch always prints, so it is checked before anything is saved)
        watch.update(loss, step, None if scaler.is_enabled() else net.parameters())
        meter.update({"total_loss": loss, **logs})

        if step % args.print_freq == 0 or step == steps - 1:
            watch.check(epoch, last_path if last_path.is_file() else None)
            last, avg = meter.read()
            if step == 0:   # the epoch's first-step values go into its JSON line (step0_*)
                first = {f"step0_{k}": v for k, v in last.items()}
            now = time.time()
            t_step = (now - t_last) / (step - last_printed)
            t_avg = (now - t0) / (step + 1)
            # remaining time of the run from the pace so far (tests included)
            run_start, start_epoch = clock
            done = (epoch - start_epoch) + (step + 1) / steps
            eta = (now - run_start) / done * (args.epochs - start_epoch - done)
            print(_fmt_step(epoch, step, steps, t_step, t_avg, eta, lr, last, avg))
            t_last, last_printed = now, step
    _, avg = meter.read()
    return {k: utils.reduce_mean(v) for k, v in {**avg, **first}.items()}


def test_due(epoch, args):
    """The authors' cadence: every --test_every epochs from epoch 2 on, and after the last."""
    return epoch == args.epochs - 1 or bool(args.test_every and epoch > 0 and epoch % args.test_every == 0)


def update_best(best, metrics, feature, epoch, net, path):
    """Keep <run>_best.t by ``feature``'s Rank-1 (the authors keep it by their cmc_att: FC
    for AGW, FC_att for DDAG); prints the best so far. Returns the best record."""
    r1 = float(metrics[feature][0][0])
    if best is None or r1 > best["rank1"]:
        best = {"epoch": epoch, "rank1": r1, "feature": feature, "mAP": float(metrics[feature][1]),
                "mINP": float(metrics[feature][2])}
        utils.save_checkpoint(_checkpoint(net, epoch, metrics[feature], feature), path)
    print(f"Best Epoch [{best['epoch']}] ({best.get('feature') or feature} Rank-1 {best['rank1']:.2%})")
    return best


def save_epoch(net, optimizer, scaler, epoch, args, run, best, metrics, feature, state=None):
    """Every epoch <run>_last.pth (resumable); every --save_epoch epochs <run>_epoch_N.t."""
    model_dir = Path(args.model_path)
    if epoch > 0 and epoch % args.save_epoch == 0:
        utils.save_checkpoint(_checkpoint(net, epoch, metrics[feature] if metrics else None, feature),
                              model_dir / f"{run}_epoch_{epoch}.t")
    runstate.save_last(model_dir / f"{run}_last.pth", "finetune", net, optimizer, scaler, epoch, args,
                       best=best, state=state)


def log_epoch(log, epoch, lr, stats, metrics, feature_names):
    """The epoch's TensorBoard scalars and JSON line (stats, lr, and per tested feature
    Rank-1/5, mAP, mINP)."""
    log.scalars(epoch, {**stats, "lr": lr})
    record = {"epoch": epoch, "lr": lr, **stats}
    if metrics:
        # the authors' scalar names: rank1/mAP/mINP of the first feature, *_att of the second
        for i, name in enumerate(feature_names):
            cmc, mAP, mINP = metrics[name]
            suffix = "" if i == 0 else "_att" if i == 1 else f"_{name}"
            log.scalars(epoch, {"rank1" + suffix: cmc[0], "mAP" + suffix: mAP, "mINP" + suffix: mINP})
            record[name] = {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
                            "mAP": float(mAP), "mINP": float(mINP)}
    log.epoch(**record)


def summary(best, run_start, best_path):
    done = (f"epoch {best['epoch']}, {best['feature']} Rank-1 {best['rank1']:.2%} -> {best_path}"
            if best else "none")
    print(f"==> Done in {utils.format_time(time.time() - run_start)}; best: {done}")
