"""The fine-tuning engine AGW (``AGW/train.py``, ``AGW/test.py``) and DDAG
(``DDAG/train_ddag.py``, ``DDAG/test_ddag.py``) share, as plain functions: their flags,
the optimiser and learning-rate schedule, one training epoch (:func:`train_one_epoch`),
testing on the benchmark's protocol (:func:`evaluate`) and when to save what. Each method's
script owns its ``main``: the network, the loss, and the epoch loop calling these.

Checkpoints (checkpoint.py writes and reads them all), under ``--model_path``:
``<run>_best.t`` (best Rank-1 so far), ``<run>_epoch_N.t`` (every ``--save_epoch`` epochs,
N = epochs done), ``<run>_last.pth`` (every epoch, to continue after a crash).
"""
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

import checkpoint
import cli
import data_loader
import datasets
import eval_metrics
import features
import logger
import model
import options
import utils
import visrank
from cli import UserError

# ============================================================================ arguments
def get_args_parser(description, epochs=80, milestones=(20, 50)):
    """The authors' fine-tuning flags (their AGW/DDAG train.py) plus ours, over the flags
    every stage shares (options.parents()). ``epochs``/``milestones`` are the method's
    defaults (AGW: 80, (20, 50))."""
    # one-line argparse errors (error: ..., exit 2), defaults shown in --help
    p = cli.ArgumentParser(description=description, parents=options.parents())
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
    a("--milestones", default=list(milestones), type=int, nargs=2, metavar=("M1", "M2"),
      help="lr x0.1 from epoch M1, x0.01 from M2")
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
    """The authors' run suffix: 'sysu_agw_p4_n8_lr_0.1_seed_0' (+ '_adam', + '_one', + '_it<N>',
    + '_trial_T')."""
    name = (f"{args.dataset}_{method}_p{args.num_pos}_n{args.batch_size}_lr_{args.lr}"
            f"_seed_{args.seed}")
    if args.optim != "sgd":
        name += f"_{args.optim}"
    if args.stream != "two":   # the authors' networks are two-stream; a one-stream run must not share files
        name += f"_{args.stream}"
    if args.iters_per_epoch:   # capped epochs: not the authors' schedule
        name += f"_it{args.iters_per_epoch}"
    return name + datasets.get(args.dataset).run_suffix(args)


def prepare_args(args, tool_dir):
    """Resolve the paths (the path rule of cli.py: defaults in the method's folder) and
    check the flag values argparse cannot."""
    datasets.get_labelled(args.dataset, "fine-tuning and testing")
    options.check(args)
    options.resolve_paths(args, tool_dir)
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


def learning_rate(epoch, args):
    """lr of the new modules at ``epoch``: linear warm-up lr*(epoch+1)/W over the first
    W = --warmup_epochs (10) epochs, then lr, x0.1 from --milestones M1, x0.01 from M2."""
    m1, m2 = args.milestones
    warm = args.warmup_epochs
    if epoch < warm:
        return args.lr * (epoch + 1) / warm
    if epoch < m1:
        return args.lr
    if epoch < m2:
        return args.lr * 0.1
    return args.lr * 0.01


def adjust_learning_rate(optimizer, epoch, args):
    """Set the epoch's lr: group 0 (backbone) 0.1 x, the others 1 x. Returns the lr."""
    lr = learning_rate(epoch, args)
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
            self._images = (data_loader.load_images(self.q_paths, a.img_w, a.img_h, a.workers),
                            data_loader.load_images(self.g_paths, a.img_w, a.img_h, a.workers))
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
        for s in logger.progress(starts, desc=f"extracting {'RGB' if modal == 1 else 'IR'}"):
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
    modal = {datasets.RGB: "rgb", datasets.IR: "ir"}
    index = np.stack([np.asarray(i, dtype=np.int64) for i in ts.trial_index])
    features.save_features(path, list(feature_names), list(q_feats), list(g_feats), ts.q_pids, ts.g_pids,
                           ts.q_cams, ts.g_cams, modal[ts.q_modal], modal[ts.g_modal],
                           [str(p) for p in ts.q_paths], [str(p) for p in ts.g_paths], index,
                           args.dataset, ts.mode, str(args.resume))
    print(f"wrote features of {', '.join(feature_names)} to {path}")


def _save_rank_lists(ts, qf, gf, name, args, tag, writer, step):
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
    count), test, print. ``loaded``: read_for_test(args) if the script already read
    it. Returns the metrics dict of :func:`evaluate`."""
    prepare_args(args, tool_dir)
    path, obj = loaded or read_for_test(args)
    if args.save_features:   # a wrong folder fails now, not after the feature extraction
        cli.check_writable(args.save_features)
    device = utils.select_device(args.gpu)
    utils.set_seed(args.seed, args.deterministic)
    if not isinstance(net, nn.Module):
        net = net(checkpoint.num_classes(obj) or 1)
    notes = []   # a file that does not fit fails here, before the header; its notes follow it
    pretrained = checkpoint.kind(obj)[0] == "pretrain"
    if pretrained:
        notes.append("note: testing a pre-training checkpoint (backbone only; the heads keep their "
                     "initial values)")
    load_into(net, path, obj, log=notes.append)
    if not pretrained and obj.get("epoch") is not None:
        notes.append(f"==> checkpoint of epoch {obj['epoch']}")
    testset = TestSet(args)
    logger.print_run_header(args, device, extra=["Test set:", testset.stats()])
    for line in notes:
        print(line)
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    writer = None
    if args.visrank:   # the rank lists go to TensorBoard too, under <vis_log_path>/<ckpt>_test
        from tensorboardX import SummaryWriter   # here: it imports boto3 etc., ~0.2 s a start
        writer = SummaryWriter(str(Path(args.vis_log_path) / f"{path.stem}_test"))
    try:
        save_to = Path(args.save_features) / f"{path.stem}.npz" if args.save_features else None
        return evaluate(net, args, device, feature_names, testset=testset, tag=path.stem, writer=writer,
                        save_to=save_to)
    finally:
        if writer is not None:
            writer.close()


# ============================================================================ --resume
def read_resume(args, build=None):
    """(path, loaded object) of --resume; UserError if it is missing or unreadable or, given
    ``build`` (class_num -> network), if it does not fit the network: it is then loaded
    into a throwaway copy (the identity count read from the file), so that a wrong file
    fails before the run header and before any data is read."""
    path = checkpoint.find(args.resume, args.model_path)
    obj = checkpoint.load(path, trust=args.trust_checkpoint)
    if build is not None:
        load_into(build(checkpoint.num_classes(obj) or 1), path, obj, log=lambda *_: None)
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
    if checkpoint.kind(obj)[0] == "pretrain":
        model.load_backbone(net, checkpoint.network_state(obj, str(path)), log=log, source=str(path))
    else:
        model.load_finetuned(net, checkpoint.network_state(obj, str(path)), str(path), log=log)


def load_resume(net, args, optimizer=None, scaler=None, state=None, loaded=None):
    """Apply ``--resume`` to ``net`` (and, for a '<run>_last.pth', to optimizer, AMP scaler,
    RNG and the method's ``state`` dict, which gets its saved values, global_step among
    them). ``loaded``: read_resume(args) if already done. Returns (start_epoch, best)."""
    path, obj = loaded or read_resume(args)
    stage, resumable = checkpoint.kind(obj)
    if stage == "pretrain":
        # MMGL (or any backbone) checkpoint: heads dropped, counts printed, UserError if
        # nothing loads; fine-tuning starts from epoch 0.
        print(f"==> initialising the backbone from {path}")
        model.load_backbone(net, checkpoint.network_state(obj, str(path)), source=str(path))
        return 0, None
    model.load_finetuned(net, checkpoint.network_state(obj, str(path)), str(path))
    epoch = int(obj.get("epoch", -1))
    if not resumable:
        print(f"==> loaded fine-tuning checkpoint {path} (epoch {epoch})")
        best = None
        cmc = obj.get("cmc")
        if cmc is not None:
            best = {"epoch": epoch, "rank1": float(np.asarray(cmc).reshape(-1)[0]),
                    "feature": obj.get("feature")}
    else:   # continue exactly where the run stopped
        last = checkpoint.load_last(path, obj, "finetune", net, optimizer, scaler, load_net=False)
        if state is not None:
            state.update(last["state"])
        best = last.get("best")
        print(f"==> resuming {path}: epoch {epoch} done, continuing at epoch {epoch + 1}")
    if epoch + 1 >= args.epochs:
        print(f"checkpoint is at epoch {epoch}; --epochs {args.epochs} leaves nothing to train")
    return epoch + 1, best


# ============================================================================ one setup for both methods
# flags a fine-tuning <run>_last.pth continues only with: they shape the network or the
# optimiser's state (checkpoint.check_continuation compares the others too)
FIXED_FLAGS = ("optim", "arch", "stream", "method", "nl_width", "wpa", "graph", "part", "nheads", "low_dim",
               "wpa_proj")


def setup(args, build, method, tool_dir, state=None):
    """What AGW's and DDAG's ``main`` do before their epoch loop, ordered so that every error
    a user can cause stops the run before its header: the flags; --resume read, fitted to
    the network (``build``: class_num -> network) and, for a ``<run>_last.pth``, its flags
    compared; the run's outputs claimed (logger.RunLog); the data read and the batch
    checked. Then the header, the network, its optimiser (the network's ``new_modules()``
    at the full lr), --resume applied and the log's clock started. ``state``: the method's
    own values a ``_last.pth`` brings back (DDAG: wG). Returns a namespace with run, log,
    device, data, testset, net, train_net, optimizer, scaler, start_epoch, best, state,
    best_path, last_path."""
    prepare_args(args, tool_dir)
    resume = read_resume(args, build) if args.resume else None
    run = run_name(args, method)
    r = SimpleNamespace(run=run, state=dict(state or {}), best_path=Path(args.model_path) / f"{run}_best.t",
                        last_path=Path(args.model_path) / f"{run}_last.pth")
    continuing = False
    if resume and checkpoint.kind(resume[1]) == ("finetune", True):
        # --epochs may grow: the lr steps at --milestones, not at a fraction of the run
        checkpoint.check_continuation(resume[0], resume[1], args, fixed=FIXED_FLAGS, free=("epochs",))
        continuing = resume[0].resolve() == r.last_path.resolve()
    r.device = utils.init_device(args.gpu)
    utils.set_seed(args.seed + utils.get_rank(), args.deterministic)
    r.log = logger.RunLog(args, run, continuing=continuing)
    try:
        r.data = datasets.get(args.dataset).train_data(args)
        identity_sampler(r.data, 0, args)   # too few identities for --batch-size: stop before the header
        r.testset = TestSet(args)
        r.log.open(args, r.device, data_stats(r.data, r.testset))
        r.net, r.train_net = prepare_net(build(r.data.num_classes), args, r.device)
        r.optimizer = build_optimizer(r.net, args, r.net.new_modules())
        _, r.scaler = utils.amp_setup(args.amp, r.device)
        r.start_epoch, r.best = 0, None
        if resume:
            r.start_epoch, r.best = load_resume(r.net, args, r.optimizer, r.scaler, r.state, loaded=resume)
        elif not args.pretrained:
            print("note: no --resume and no --pretrained: the backbone starts from random weights")
        start_log(r.log, r.start_epoch, r.state, r.data, args)
    except BaseException:
        r.log.close()
        raise
    return r


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


def identity_sampler(data, epoch, args):
    """The epoch's identity-balanced batches: --batch-size ids x --num_pos images per
    modality, RGB j and IR j of the same identity, seeded by (--seed, epoch)."""
    return data_loader.IdentitySampler(data.rgb_label, data.ir_label, args.num_pos, args.batch_size,
                                       seed=args.seed, epoch=epoch, rgb_pool=data.rgb_pool, ir_pool=data.ir_pool,
                                       steps=args.iters_per_epoch)


def identity_loader(data, epoch, args, device):
    """:func:`identity_sampler`'s batches, loaded."""
    return data_loader.make_loader(data, identity_sampler(data, epoch, args), workers=args.workers,
                                   pin_memory=device.type == "cuda")


def start_log(log, start_epoch, state, data, args):
    """Start ``log``'s clock and global step where the run begins: a resumed run's step from
    its file (popped from the method ``state``), or, for a file without one, epochs x the
    steps of an epoch (the same in every epoch; drawn only then)."""
    step = state.pop("global_step", None)
    if step is None:
        step = start_epoch * len(identity_sampler(data, 0, args)) if start_epoch else 0
    log.start(start_epoch, step)


def train_one_epoch(net, criterion, loader, aug, optimizer, scaler, epoch, lr, args, device, log, last_path):
    """One epoch over ``loader`` (:func:`identity_loader`).
    ``criterion(net, x_rgb, x_ir, labels_rgb, labels_ir) -> (loss, {name: scalar
    tensor})`` runs inside autocast; the loss and its named values ('id_loss', 'tri_loss',
    'acc', ...) are printed every --print_freq steps (log.log_every, the one host sync)
    and averaged for the epoch. ``last_path``: the checkpoint a NaN stop names. Returns the
    epoch's means (over ranks), with the first step's values as step0_*."""
    amp_dtype, _ = utils.amp_setup(args.amp, device)
    net.train()
    meter, watch = logger.Meter(device), utils.NonFiniteWatch(device)
    images = 2 * args.batch_size * args.num_pos
    for step, (rgb, ir, y_rgb, y_ir) in log.log_every(loader, epoch, meter, lr, images, watch, last_path):
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
        meter.update(loss=loss, **logs)
    _, means, _ = meter.read()
    return {"lr": lr, **means, **{f"step0_{k}": v for k, v in meter.first.items()}, "img_per_s": meter.img_per_s}


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
        checkpoint.save_finetuned(path, net, epoch, metrics[feature], feature)
    print(f"Best Epoch [{best['epoch']}] ({best.get('feature') or feature} Rank-1 {best['rank1']:.2%})")
    return best


def save_epoch(net, optimizer, scaler, epoch, args, run, best, metrics, feature, log, state=None):
    """Every epoch <run>_last.pth (resumable); every --save_epoch epochs <run>_epoch_N.t
    (N = epochs done)."""
    model_dir = Path(args.model_path)
    if (epoch + 1) % args.save_epoch == 0:
        checkpoint.save_finetuned(model_dir / f"{run}_epoch_{epoch + 1}.t", net, epoch,
                                  metrics[feature] if metrics else None, feature)
    checkpoint.save_last(model_dir / f"{run}_last.pth", "finetune", net, optimizer, scaler, epoch, args,
                         best=best, state={**(state or {}), "global_step": log.global_step})


def summary(best, run_start, best_path):
    done = (f"epoch {best['epoch']}, {best['feature']} Rank-1 {best['rank1']:.2%} -> {best_path}"
            if best else "none")
    print(f"==> Done in {logger.format_time(time.time() - run_start)}; best: {done}")
