"""MMGL self-supervised pre-training (Wan et al., "Self-Supervised Modality-Aware Multiple
Granularity Pre-Training for RGB-Infrared Person Re-Identification", TIFS 2023).

The story, top to bottom:
  1. draw an UNPAIRED batch: B RGB images and B IR images, no identity labels used;
  2. augment on the device and cut every image into K horizontal stripes, shuffling the RGB
     and the IR image of pair j with the SAME random permutation O_j;
  3. encode both with a (two- or one-stream) ResNet;
  4. global granularity: predict O from the pooled feature through one head shared by both
     modalities, Sinkhorn-normalise (with Gumbel noise) and regress the permutation matrix
     with MSE;
  5. local granularity: part-aware cycle-contrastive loss (PCC) between stripe features of
     the two modalities;
  6. loss = MSE(RGB) + MSE(IR) + cl_weight * PCC; SGD; save a plain state_dict that the
     AGW/ and DDAG/ fine-tuning scripts load with ``--resume``.

    python train.py --dataset sysu --stream two --lr 0.1 --pcc --part --gpu 0
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import cli
import datasets
import diagnostics
import logger
import options
import utils
from cli import REPO_ROOT, UserError
from data_loader import (IMAGENET_MEAN, IMAGENET_STD, DeviceAugment, PermHeldout, UnpairedSampler, make_loader,
                         random_perms)
from loss import gumbel_sinkhorn, log_sinkhorn, pcc_loss, perm_accuracy, perm_matrix, perm_mse_loss
from model import MMGLNet


def paper_parser():
    """The flags the paper (and the authors' command line and run names) give."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("MMGL, the paper's settings (the authors' command: --dataset sysu --stream two "
                             "--lr 0.1 --pcc --part --gpu 0)")
    g.add_argument("--pcc", default=True, action=argparse.BooleanOptionalAction,
                   help="the local granularity: the PCC loss on the stripe features; on by default (the "
                        "authors' command passes it anyway), --no-pcc for the ablation")
    g.add_argument("--part", default=True, action=argparse.BooleanOptionalAction,
                   help="the stripe (part) feature branch PCC trains; on by default, --no-part drops it "
                        "and PCC with it")
    g.add_argument("--num_stripe", default=6, type=int, help="K horizontal stripes (K! permutations)")
    g.add_argument("--cl_weight", default=0.5, type=float, help="PCC's weight in the loss (run name: cw)")
    g.add_argument("--cl_temp", default=0.07, type=float, help="PCC's temperature (run name: ct)")
    g.add_argument("--sinkhorn_iters", default=20, type=int, help="Sinkhorn iterations (run name: so)")
    g.add_argument("--gumbel_samples", default=10, type=int, help="Gumbel-Sinkhorn samples per image (run "
                   "name: spm)")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", default=32, type=int,
                   help="images PER MODALITY per step (per GPU under torchrun)")
    g.add_argument("--optim", default="sgd", help="sgd (the authors': momentum 0.9, weight decay "
                   "5e-4) | adam (ours, weight decay 5e-4; give it a small --lr such as 1e-3)")
    return p


# Readings of what the paper leaves open, each a whole set of flags (--pcc_reading NAME sets
# them; a flag given on the command line wins; docs/PRETRAIN.md, "The paper vs our reading").
# 'mutual' (the default): "cycle-consistent RGB-IR patches" of the same body part are the
# positives, and PCC joins once the permutation features have formed; 'figure': the authors'
# figure, a stripe's soft nearest neighbours q_ir and q_rgb from the IR and RGB stripe sets as
# the positive pair, from the first step, with the paper's "MSE" between permutation matrices
# summed per matrix and the whole loss divided by K*K (matrix_scaled: that reading's balance
# of the two losses at the mean MSE's step size); it learns the permutation task better and
# fine-tunes worse (docs/STUDY.md); 'first': our first reading, the figure's pair against
# the mean MSE (PCC 36x heavier than in 'figure').
PCC_READINGS = {
    "mutual": {"pcc_form": "mutual", "pcc_pool": "part", "pcc_order": "original", "pcc_start_acc": 2.0,
               "perm_reduction": "mean"},
    "figure": {"pcc_form": "pair", "pcc_pool": "all", "pcc_order": "shuffled", "pcc_start_acc": 0.0,
               "perm_reduction": "matrix_scaled"},
    "first": {"pcc_form": "pair", "pcc_pool": "all", "pcc_order": "shuffled", "pcc_start_acc": 0.0,
              "perm_reduction": "mean"},
}
DEFAULT_READING = "mutual"


def get_args_parser(reading=DEFAULT_READING):
    # the paper's flags first, then the data, backbone, optimisation, device and output flags
    # every stage shares, then our readings of what the paper leaves open and the ablations
    p = cli.ArgumentParser("train.py", description="MMGL self-supervised pre-training",
                           usage="python train.py [flags]   (the authors': --dataset sysu --stream two --lr 0.1 "
                                 "--pcc --part --gpu 0)", parents=[paper_parser(), *options.parents()])
    p.set_defaults(epochs=100, save_epoch=10)
    g = p.add_argument_group("pre-training data")
    g.add_argument("--val_images", default=300, type=int,
                   help="held-out test images per modality for the permutation accuracy printed after "
                        "every epoch (0: off)")
    r = PCC_READINGS[reading]
    g = p.add_argument_group("our reading of what the paper leaves open")
    g.add_argument("--pcc_reading", default=reading, help="a whole PCC reading at once: " + "; ".join(
        f"{name}: " + " ".join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}" for k, v in flags.items())
        for name, flags in PCC_READINGS.items()) + " (single flags given with it win)")
    g.add_argument("--pcc_form", default=r["pcc_form"], help="mutual: a real RGB stripe and IR stripe that are "
                   "each other's nearest neighbour (within --pcc_pool) are the positive pair, contrasted "
                   "against every stripe of the other modality | pair (the figure): the cross-modal and the "
                   "intra-modal soft nearest neighbours of a stripe are the positive pair | cycle: the "
                   "cross-modal neighbour, matched back into the stripe's own modality, must find the stripe")
    g.add_argument("--pcc_pool", default=r["pcc_pool"], help="where neighbours are searched: part: only stripes "
                   "with the same index k (see --pcc_order; pair/cycle also draw their negatives there) "
                   "| all: every stripe")
    g.add_argument("--pcc_order", default=r["pcc_order"], help="stripe index k is the body part, i.e. the "
                   "stripes put back in order before local_conv_list[k] (original) or the shuffled row (shuffled)")
    g.add_argument("--pcc_start_acc", default=r["pcc_start_acc"], type=float, help="PCC's weight is 0 until the "
                   "held-out stripe accuracy has reached this multiple of chance (1/K) after an epoch, i.e. "
                   "until the permutation features have formed; 0: PCC from the first epoch")
    g.add_argument("--sinkhorn_temp", default=1.0, type=float, help="Sinkhorn temperature")
    g.add_argument("--gumbel_noise", default=1.0, type=float, help="scale of the Gumbel noise")
    g.add_argument("--perm_reduction", default=r["perm_reduction"], help="the permutation MSE over the entries "
                   "(mean) | summed over each K x K matrix (matrix: the squared Frobenius distance, K*K times "
                   "larger) | matrix_scaled: the loss of 'matrix' divided by K*K, i.e. the mean MSE with PCC "
                   "weighted --cl_weight / K*K (matrix's balance of the two losses at mean's step size)")
    g = p.add_argument_group("ablations and diagnostics (not the paper's method)")
    g.add_argument("--perm_feat", default="gap", help="what the permutation head sees: gap (the paper's "
                   "figure: the globally pooled feature) | stripes (the K stripe-pooled features, "
                   "concatenated: a diagnostic/ablation)")
    g.add_argument("--perm_bn", action="store_true", help="BatchNorm1d on the pooled feature before fc1 "
                   "(the paper's figure shows none)")
    g.add_argument("--pcc_detach_pool", action="store_true", help="neighbour pools as constants (no "
                   "gradient through the neighbours, as NNCLR's support set)")
    g.add_argument("--pcc_head", default="linear", help="linear: PCC on the 1x1 stripe projections | mlp: "
                   "through a nonlinear projection head (BN, ReLU, Linear to 128)")
    g.add_argument("--local_branch", default="shared", help="shared: PCC's stripes come from the shared "
                   "last stage | separate: from the stripe branch's own copy of the last ResNet stage")
    g.add_argument("--pcc_start_epoch", default=0, type=int, help="PCC's weight is 0 before this epoch "
                   "(with --pcc_start_acc 0)")
    g.add_argument("--pcc_ramp_epochs", default=0, type=int, help="PCC's weight rises linearly from 0 to "
                   "--cl_weight over this many epochs once it is on")
    g.add_argument("--train_ratio", default=1.0, type=float,
                   help="pre-train on this seeded random fraction of the images (data-efficiency study)")
    g.add_argument("--dummy", action="store_true", help="random images instead of a dataset (smoke runs, benchmarks)")
    g.add_argument("--diag", default=True, action=argparse.BooleanOptionalAction,
                   help="after every epoch: linear probes of the original stripe index on the held-out "
                        "images and the cosine between the two losses' gradients (diagnostics.py)")
    return p


def parse_args(argv=None):
    """The command line, with --pcc_reading's flags as the defaults of the flags it sets."""
    known, _ = get_args_parser().parse_known_args(argv)
    cli.choice_check("--pcc_reading", known.pcc_reading, tuple(PCC_READINGS))
    return get_args_parser(known.pcc_reading).parse_args(argv)


def check_args(args):
    options.check(args)
    cli.choice_check("--perm_feat", args.perm_feat, ("gap", "stripes"))
    cli.choice_check("--pcc_form", args.pcc_form, ("pair", "cycle", "mutual"))
    cli.choice_check("--pcc_head", args.pcc_head, ("linear", "mlp"))
    cli.choice_check("--local_branch", args.local_branch, ("shared", "separate"))
    cli.choice_check("--perm_reduction", args.perm_reduction, ("mean", "matrix", "matrix_scaled"))
    cli.choice_check("--pcc_pool", args.pcc_pool, ("all", "part"))
    cli.choice_check("--pcc_order", args.pcc_order, ("shuffled", "original"))
    cli.choice_check("--optim", args.optim, ("sgd", "adam"))
    cli.choice_check("--pcc_reading", args.pcc_reading, tuple(PCC_READINGS))
    cli.check_stripes(args.num_stripe, args.img_h)
    for name in ("val_images", "pcc_ramp_epochs", "pcc_start_epoch", "pcc_start_acc"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "sinkhorn_iters", "gumbel_samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.pcc and not args.part:
        args.pcc = False  # PCC lives on the part branch: --no-part implies --no-pcc
    if args.pcc and args.pcc_start_acc and pcc_start(args) is not None:   # no held-out set to wait on
        cli.warn(f"{'--dummy' if args.dummy else '--val_images 0'} leaves no held-out set for "
                   f"--pcc_start_acc {args.pcc_start_acc:g}: PCC is on from epoch {args.pcc_start_epoch}")
    return args


def pcc_start(args):
    """The epoch PCC is on from, as far as known before training: --pcc_start_epoch, or None
    while --pcc_start_acc waits for the held-out stripe accuracy (:func:`pcc_switch`)."""
    waits = args.pcc and args.pcc_start_acc and not args.dummy and args.val_images
    return None if waits else args.pcc_start_epoch


# the flags that decide the network's tensors (a _last.pth resumes only with the same ones)
NETWORK_FLAGS = ("arch", "stream", "num_stripe", "perm_feat", "perm_bn", "pcc", "part", "pcc_head", "local_branch")
# the flags that decide the losses' reading and the optimiser: a run continues only under the ones it began with
READING_FLAGS = ("pcc_form", "pcc_pool", "pcc_order", "pcc_detach_pool", "perm_reduction", "optim")


# The run name: the authors' (sysu_two_cw_0.5_ct_0.07_so_20_spm_10) for their command, plus a
# tag for each flag below that differs from its default, so that runs of other settings (a
# second seed, another lr) never share files. Two runs of one name cannot share outputs either
# (logger.RunLog refuses, naming --resume and --overwrite).
NAME_TAGS = (("arch", "{arch}"), ("perm_feat", "{perm_feat}"), ("perm_bn", "permbn"),
             ("perm_reduction", "mse_{perm_reduction}"), ("pcc_readings", "pcc_{pcc_readings}"),
             ("train_ratio", "ratio_{train_ratio}"), ("optim", "{optim}"), ("num_stripe", "k{num_stripe}"),
             ("img_h", "{img_h}x{img_w}"), ("img_w", "{img_h}x{img_w}"), ("sinkhorn_temp", "st{sinkhorn_temp:g}"),
             ("gumbel_noise", "gn{gumbel_noise:g}"), ("lr", "lr{lr:g}"), ("batch_size", "b{batch_size}"),
             ("iters_per_epoch", "it{iters_per_epoch}"), ("seed", "seed{seed}"))
# PCC's reading (only when PCC is on), joined into one tag: flag -> its part of the tag
PCC_TAGS = (("pcc_form", "{}"), ("pcc_pool", "{}"), ("pcc_order", "{}"), ("pcc_head", "{}"),
            ("local_branch", "{}"), ("pcc_detach_pool", "detach"), ("pcc_start_acc", "startacc{:g}"),
            ("pcc_start_epoch", "start{}"), ("pcc_ramp_epochs", "ramp{}"))


def run_name(args):
    """The authors' ``sysu_two_cw_0.5_ct_0.07_so_20_spm_10`` + a tag per non-default setting."""
    default = vars(get_args_parser().parse_args([]))
    values = dict(vars(args), pcc_readings="_".join(
        fmt.format(getattr(args, k)) for k, fmt in PCC_TAGS if getattr(args, k) != default[k]) if args.pcc else "")
    default["pcc_readings"] = ""
    bench = datasets.get(args.dataset)
    name = (f"{bench.name}_{args.stream}_cw_{args.cl_weight if args.pcc else 0}_ct_{args.cl_temp}"
            f"_so_{args.sinkhorn_iters}_spm_{args.gumbel_samples}" + bench.run_suffix(args))
    tags = dict.fromkeys(fmt.format(**values) for k, fmt in NAME_TAGS if values[k] != default[k])
    return "_".join([name, *tags])


class DummyData:
    """``--dummy``: random uint8 images with the real shapes, for smoke runs and benchmarks."""

    def __init__(self, n, img_h, img_w, seed=0):
        g = np.random.default_rng(seed)
        for m in ("rgb", "ir"):
            setattr(self, f"{m}_img", g.integers(0, 256, (n, img_h, img_w, 3), dtype=np.uint8))
            setattr(self, f"{m}_label", np.zeros(n, dtype=np.int64))
            setattr(self, f"{m}_pool", np.arange(n))

    def stats(self):
        return f"dummy data: {len(self.rgb_img)} random images per modality"


def lr_at(epoch, args):
    """Our reading (the paper gives lr 0.1 and 'warm-up' only): linear warm-up over
    ``--warmup_epochs``, then cosine decay to 0 at ``--epochs``."""
    if epoch < args.warmup_epochs:
        return (epoch + 1) / args.warmup_epochs
    t = (epoch - args.warmup_epochs) / max(1, args.epochs - args.warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def full_pcc_weight(args):
    """PCC's weight against the permutation MSE once it is fully on: --cl_weight (the paper's
    0.5), over K*K under --perm_reduction matrix_scaled (the loss of 'matrix', MSE summed per
    K x K matrix + cl_weight * PCC, divided by K*K: the same balance at the mean MSE's step)."""
    return args.cl_weight / args.num_stripe ** 2 if args.perm_reduction == "matrix_scaled" else args.cl_weight


def pcc_weight(epoch, args, pcc_from):
    """PCC's weight in ``epoch``: :func:`full_pcc_weight` from epoch ``pcc_from`` on
    (:func:`pcc_start`, :func:`pcc_switch`; None: not yet), 0 before; with --pcc_ramp_epochs
    a linear ramp up to it. The schedule is our reading: the paper gives none."""
    if not args.pcc or pcc_from is None or epoch < pcc_from:
        return 0.0
    if args.pcc_ramp_epochs:
        return full_pcc_weight(args) * min(1.0, (epoch - pcc_from + 1) / args.pcc_ramp_epochs)
    return full_pcc_weight(args)


def pcc_switch(pcc_from, val, epoch, args):
    """--pcc_start_acc: after an epoch whose held-out stripe accuracy reached the threshold,
    PCC is on from the next epoch on (decided on rank 0, sent to every rank). Returns
    (the epoch PCC is on from or None, a line to print when it switches, else '')."""
    line = ""
    if args.pcc and args.pcc_start_acc and pcc_from is None and val:
        need = args.pcc_start_acc / args.num_stripe
        if val["stripe_acc"] >= need:
            pcc_from = epoch + 1
            line = (f"PCC on from epoch {epoch + 1}: held-out stripe accuracy {val['stripe_acc']:.1%} "
                    f">= {args.pcc_start_acc:g} x chance ({need:.1%})")
    if utils.is_distributed():
        box = [pcc_from]
        torch.distributed.broadcast_object_list(box, src=0)
        pcc_from = box[0]
    return pcc_from, line


def mmgl_losses(out, perms, args, cl_weight=None):
    """Eq. (global) + Eq. (local) of the paper for one batch (``cl_weight``: this epoch's
    PCC weight, :func:`pcc_weight`; default :func:`full_pcc_weight`).

    ``out['perm_logits']``: [2B, K, K], RGB rows first then IR, both through the SAME head so
    the two modalities share one permutation space. ``perms``: [B, K], the permutation applied
    to pair j (its RGB and its IR image alike)."""
    b = perms.shape[0]
    target = perm_matrix(perms).to(out["perm_logits"].dtype)
    losses = {}
    for i, m in enumerate(("rgb", "ir")):
        soft = gumbel_sinkhorn(out["perm_logits"][i * b:(i + 1) * b].float(), args.sinkhorn_iters,
                               args.sinkhorn_temp, args.gumbel_samples, args.gumbel_noise)
        losses[f"perm_{m}"] = perm_mse_loss(soft, target.float(), "matrix" if args.perm_reduction == "matrix"
                                            else "mean")
    total = losses["perm_rgb"] + losses["perm_ir"]
    if args.pcc:
        z = out["stripes"].float()
        z_rgb, z_ir = z[:b], z[b:]
        reading = dict(pool=args.pcc_pool, form=args.pcc_form, detach_pool=args.pcc_detach_pool)
        if args.gather and utils.is_distributed():
            pool_rgb, pool_ir = utils.all_gather_with_grad(z_rgb), utils.all_gather_with_grad(z_ir)
            losses["pcc"] = pcc_loss(z_rgb, z_ir, args.cl_temp, pool_rgb=pool_rgb, pool_ir=pool_ir,
                                     offset=utils.get_rank() * b, gather=utils.all_gather_with_grad, **reading)
        else:
            losses["pcc"] = pcc_loss(z_rgb, z_ir, args.cl_temp, **reading)
        total = total + (full_pcc_weight(args) if cl_weight is None else cl_weight) * losses["pcc"]
    losses["loss"] = total
    return losses


def train_one_epoch(net, loader, optimizer, scaler, aug, epoch, args, device, log, pcc_from, last_path):
    """One pass over the unpaired sampler. No host-device sync per step: the losses stay on
    the device and are read at print steps only (log.log_every), where a non-finite loss
    stops the run before anything is saved (``last_path``: the checkpoint that stays good).
    Returns the epoch's means (over ranks) and, with --diag, the gradient diagnostics."""
    net.train()
    amp_dtype, _ = utils.amp_setup(args.amp, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    meter, watch = logger.Meter(device), utils.NonFiniteWatch(device)
    weight = pcc_weight(epoch, args, pcc_from)
    lr = optimizer.param_groups[0]["lr"]
    grad_stats = {}

    def batch_accuracy():   # the latest training batch's permutation accuracy (print steps only)
        with torch.no_grad():
            acc, stripe_acc = perm_accuracy(out["perm_logits"].detach().float(), perms.repeat(2, 1),
                                            n_iters=args.sinkhorn_iters, temp=args.sinkhorn_temp)
        meter.update(perm_acc=acc, stripe_acc=stripe_acc)

    steps = log.log_every(loader, epoch, meter, lr, 2 * args.batch_size, watch, last_path, batch_accuracy)
    for step, (rgb, ir, _, _) in steps:
        rgb = rgb.to(device, non_blocking=True)
        ir = ir.to(device, non_blocking=True)
        # the SAME permutation for the RGB and the IR image of pair j (paper: "shuffled
        # with the same random order", so both modalities answer the same puzzle)
        perms = random_perms(rgb.shape[0], args.num_stripe, device=device)
        x_rgb = aug(rgb, train=True, perms=perms).contiguous(memory_format=memory_format)
        x_ir = aug(ir, train=True, perms=perms).contiguous(memory_format=memory_format)
        with utils.autocast(device, amp_dtype):
            out = net(x_rgb, x_ir, perms=perms.repeat(2, 1) if args.pcc_order == "original" else None)
        losses = mmgl_losses(out, perms, args, weight)
        if args.diag and args.pcc and step == len(loader) - 1 and not utils.is_distributed():
            grad_stats = diagnostics.loss_gradients(utils.unwrap(net), losses)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()

        watch.update(losses["loss"], step, None if scaler.is_enabled() else net.parameters())
        meter.update(**{"loss": losses["loss"], **losses}, pcc_weight=weight)   # the total printed first
    if log.writer is not None:
        log_images(log.writer, x_rgb, x_ir, out, perms, args, log.global_step)
    _, means, _ = meter.read()
    return {"lr": lr, **means, **{f"step0_{k}": v for k, v in meter.first.items()}, "img_per_s": meter.img_per_s,
            **grad_stats}


@torch.no_grad()
def evaluate_perm(net, heldout, aug, args, device, amp_dtype, batch=64):
    """Held-out permutation accuracy: every held-out image shuffled by its FIXED
    permutation, no augmentation, no Gumbel noise, BN in eval mode; decoded as in training
    (noise-free Sinkhorn, Hungarian). Returns perm_acc / stripe_acc (both
    modalities), the same per modality (``_rgb``, ``_ir``) and perm_mse (the noise-free
    MSE against the true matrices, which moves before the accuracy does)."""
    net = utils.unwrap(net)
    was_training = net.training
    net.eval()
    logits, perms = [], []
    probe = {"stripe_pool": [], "stripes": [], "perm_hidden": []}
    branch = net.local_conv_list is not None
    stats = {}
    for modal, m in ((1, "rgb"), (2, "ir")):
        imgs, p_all = getattr(heldout, m), torch.from_numpy(getattr(heldout, f"{m}_perms"))
        out = []
        for i in range(0, len(imgs), batch):
            p = p_all[i:i + batch].to(device)
            x = aug(torch.from_numpy(imgs[i:i + batch]).to(device), train=False, perms=p)
            with utils.autocast(device, amp_dtype):
                # the PCC probe only in shuffled order: in original order row j IS part j
                res = net(x, x, modal=modal, pcc=branch and args.diag and args.pcc_order == "shuffled",
                          features=args.diag)
            out.append(res["perm_logits"].float())
            for key in probe:
                if key in res:
                    probe[key].append(res[key].float().cpu().numpy())
        out = torch.cat(out)
        utils.check_finite(out.cpu().numpy(), f"held-out permutation logits of the {m.upper()} images", net)
        acc, stripe = perm_accuracy(out, p_all, n_iters=args.sinkhorn_iters, temp=args.sinkhorn_temp)
        stats[f"perm_acc_{m}"], stats[f"stripe_acc_{m}"] = acc, stripe
        logits.append(out)
        perms.append(p_all.to(device))
    logits, perms = torch.cat(logits), torch.cat(perms)
    stats["perm_acc"], stats["stripe_acc"] = perm_accuracy(
        logits, perms, n_iters=args.sinkhorn_iters, temp=args.sinkhorn_temp)
    if len(heldout.sources) > 1:   # several training sets: each one's accuracy too
        source = np.concatenate([heldout.rgb_source, heldout.ir_source])
        for name, _ in heldout.sources:
            sel = torch.from_numpy(source == name).to(logits.device)
            stats[f"perm_acc_{name}"], stats[f"stripe_acc_{name}"] = perm_accuracy(
                logits[sel], perms[sel], n_iters=args.sinkhorn_iters, temp=args.sinkhorn_temp)
    soft = gumbel_sinkhorn(logits, args.sinkhorn_iters, args.sinkhorn_temp, training=False)
    stats["perm_mse"] = perm_mse_loss(soft, perm_matrix(perms)).item()
    if args.diag:
        # labels: which original stripe each (shuffled) row shows
        groups = diagnostics.identity_groups(heldout.rgb_paths + heldout.ir_paths)
        for key, name in (("stripe_pool", "probe_backbone"), ("stripes", "probe_pcc")):
            if probe[key]:
                stats[name] = diagnostics.stripe_probe(np.concatenate(probe[key]), perms.cpu().numpy(), groups)
        # dead ReLUs in the head's hidden layer: a head whose units are off for every
        # held-out image outputs one matrix for all of them (accuracy at chance)
        stats["head_alive"] = float((np.concatenate(probe["perm_hidden"]) > 0).any(axis=0).mean())
    net.train(was_training)
    return stats


def log_images(writer, x_rgb, x_ir, out, perms, args, step):
    """TensorBoard: the shuffled stripes the network saw (first 4 pairs, RGB over IR) and
    the predicted (noise-free Sinkhorn) vs true permutation matrix of the first pair."""
    mean = torch.tensor(IMAGENET_MEAN, device=x_rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x_rgb.device).view(1, 3, 1, 1)
    n = min(4, x_rgb.shape[0])
    imgs = torch.cat([x_rgb[:n], x_ir[:n]], 0).float() * std + mean
    grid = torch.cat([torch.cat(list(imgs[:n]), 2), torch.cat(list(imgs[n:]), 2)], 1)
    writer.add_image("input/shuffled_stripes", grid.clamp(0, 1).cpu(), step)
    pred = log_sinkhorn(out["perm_logits"][:1].detach().float(), args.sinkhorn_iters, args.sinkhorn_temp).exp()[0]
    true = perm_matrix(perms[:1])[0].float()
    pair = torch.cat([pred.cpu(), torch.ones(pred.shape[0], 1), true.cpu()], 1)
    writer.add_image("perm/predicted_vs_true", pair.repeat_interleave(16, 0).repeat_interleave(16, 1)[None], step)


def main(args):
    check_args(args)
    bench = datasets.get(args.dataset)
    device = utils.init_device(args.gpu)
    utils.set_seed(args.seed + utils.get_rank(), deterministic=args.deterministic)
    options.resolve_paths(args, REPO_ROOT)
    if not args.dummy:
        args.data_path = str(bench.data_path(args))   # as resolved, so a resume can compare it
    # a missing, unreadable or wrong-kind --resume file, or one written with other flags,
    # fails here, before the run header and before any data is read
    resume_path = checkpoint.find(args.resume, args.model_path) if args.resume else None
    resume_obj = None
    name = run_name(args)
    last_path = Path(args.model_path) / f"{name}_last.pth"
    if resume_path:
        resume_obj = checkpoint.load(resume_path, trust=args.trust_checkpoint)
        checkpoint.check_resumable(resume_path, resume_obj, "pretrain")
        checkpoint.check_continuation(resume_path, resume_obj, args, fixed=NETWORK_FLAGS + READING_FLAGS)
    advice = resnet50_advice(args)
    if advice:
        cli.warn(advice)
    # continuing this run's own _last.pth appends to its outputs; any other start must not meet them
    log = logger.RunLog(args, name, continuing=bool(resume_path) and resume_path.resolve() == last_path.resolve())

    # ---- data: uint8 arrays (memory-mapped for SYSU); unpaired batches, no labels used
    if args.dummy:
        data = DummyData(max(4 * args.batch_size, 64), args.img_h, args.img_w, args.seed)
    else:
        data = bench.train_data(args)
        data.subsample(args.train_ratio, args.seed)
        data.check_batch(args.batch_size * utils.get_world_size())
    # held-out permutation accuracy: test-split images only, fixed permutations
    heldout = None
    if utils.is_main_process() and not args.dummy and args.val_images:
        heldout = PermHeldout(bench.heldout_sources(args), args.num_stripe, args.img_h, args.img_w,
                              n=args.val_images, seed=0, workers=args.workers)
    # the logs start once the data is in, so a run that cannot start leaves none behind
    log.open(args, device, [data.stats(), heldout.stats() if heldout else
                            "held-out permutation accuracy: off", f"run name: {name}"])

    # ---- model: AGW-compatible backbone + permutation head + stripe projections
    # the stripe branch exists only when PCC trains it (an unused branch would break DDP)
    net = MMGLNet(args.arch, args.stream, num_stripe=args.num_stripe, part=args.pcc, perm_feat=args.perm_feat,
                  perm_bn=args.perm_bn, pcc_head=args.pcc_head, local_branch=args.local_branch)
    if args.pretrained:   # not the paper's (it pre-trains from scratch): ImageNet weights as a start
        checkpoint.load_imagenet(net, args.pretrained)
    net = net.to(device)
    if args.channels_last:  # NHWC: tensor-core kernels on a GPU; on the CPU as fast or faster too
        net = net.to(memory_format=torch.channels_last)
    net = utils.wrap_ddp(net, device, args.sync_bn)
    model = torch.compile(net) if args.compile else net

    if args.optim == "adam":   # not the paper's: for short CPU runs
        optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=5e-4)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_at(e, args))
    amp_dtype, scaler = utils.amp_setup(args.amp, device)

    # ---- --resume: a pre-training <run>_last.pth continues where it stopped
    start_epoch, pcc_from = 0, pcc_start(args)
    if resume_path:
        ckpt = checkpoint.load_last(resume_path, resume_obj, "pretrain", net, optimizer, scaler, args=args,
                                    network_flags=NETWORK_FLAGS)
        scheduler.load_state_dict(ckpt["state"]["scheduler"])
        start_epoch = ckpt["epoch"] + 1
        log.start(start_epoch, ckpt["state"]["global_step"])
        pcc_from = ckpt["state"].get("pcc_from", pcc_from)
        if "pcc_from" not in ckpt["state"] and "pcc_start_acc" not in (ckpt.get("args") or {"pcc_start_acc": 0}):
            pcc_from = 0   # written before PCC had a schedule: it was on from the first epoch
        print(f"resumed {resume_path}: continuing at epoch {start_epoch}")

    # ---- train: one epoch, the held-out accuracy, the checkpoints, the logs
    aug = DeviceAugment(args.img_h, args.img_w, device=device)
    try:
        warned_head = False
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            sampler = UnpairedSampler(data.rgb_pool, data.ir_pool, args.batch_size, seed=args.seed, epoch=epoch,
                                      steps=args.iters_per_epoch)
            loader = make_loader(data, sampler, workers=args.workers, pin_memory=device.type == "cuda")
            stats = train_one_epoch(model, loader, optimizer, scaler, aug, epoch, args, device, log, pcc_from,
                                    last_path if last_path.is_file() else resume_path)
            scheduler.step()
            val, saved = {}, []
            if utils.is_main_process():
                if (epoch + 1) % args.save_epoch == 0 or epoch + 1 == args.epochs:
                    path = Path(args.model_path) / f"{name}_epoch_{epoch + 1}.t"   # N = epochs done
                    saved.append(str(checkpoint.save_network(path, net)))
                val = evaluate_perm(net, heldout, aug, args, device, amp_dtype) if heldout else {}
            pcc_from, switched = pcc_switch(pcc_from, val, epoch, args)   # before the save: a resumed run switches alike
            if utils.is_main_process():
                checkpoint.save_last(last_path, "pretrain", net, optimizer, scaler, epoch, args,
                                     state={"scheduler": scheduler.state_dict(), "global_step": log.global_step,
                                            "pcc_from": pcc_from})
                log.epoch(epoch, time.time() - t0, train=stats, val=val)
                print(f"Epoch {epoch} done in {logger.format_time(time.time() - t0)}; {epoch_summary(val, stats, heldout)}"
                      f"saved {', '.join(saved + [str(last_path)])}")
                if switched:
                    print(switched)
                head = None if warned_head else dead_head(val, args)
                if head:   # once a run, into its log too
                    print(f"warning: {head}")
                    warned_head = True
            utils.barrier()
    finally:
        log.close()
        utils.cleanup()
    return log


def resnet50_advice(args):
    """The flags that ResNet-50 needed in our CPU-sized runs and this run lacks, as a warning;
    None for other backbones or when it has them. Without --perm_bn the head's units died;
    with PCC on at weight 0.5 (--pcc_reading mutual) its gradient stalled the permutation
    task, at 0.1 it learnt."""
    if args.arch != "resnet50":
        return None
    missing = [flag for flag, lacking in (("--perm_bn", not args.perm_bn),
                                          ("a PCC weight <= 0.1", args.pcc and full_pcc_weight(args) > 0.1)) if lacking]
    if not missing:
        return None
    return (f"--arch resnet50: in our CPU-sized ResNet-50 runs (144x72, synthetic data) the permutation task "
            f"learnt only with {' and '.join(missing)}; not yet measured at full size "
            f"(docs/STUDY.md, 'the paper's backbone')")


def dead_head(val, args, below=0.25):
    """The warning for a permutation head whose hidden ReLUs have died (fewer than ``below``
    of them fire for any held-out image: its output hardly depends on the image), or None."""
    alive = val.get("head_alive")
    if alive is None or alive >= below:
        return None
    return (f"only {alive:.0%} of the permutation head's hidden units fire on the held-out images (dead "
            f"ReLUs): its output hardly depends on the image and the accuracy stays at chance"
            + ("" if args.perm_bn else "; --perm_bn (BatchNorm before the head) keeps them alive")
            + " (docs/STUDY.md, 'the permutation head')")


def epoch_summary(val, stats, heldout):
    """The end-of-epoch line's middle: held-out accuracies, probes, gradient cosine."""
    line = (f"held-out perm_acc {val['perm_acc']:.2%} (RGB {val['perm_acc_rgb']:.2%}, "
            f"IR {val['perm_acc_ir']:.2%}) stripe_acc {val['stripe_acc']:.2%} "
            f"mse {val['perm_mse']:.4f}; " if val else "")
    if val and len(heldout.sources) > 1:
        line += "per set " + ", ".join(f"{n} {val[f'perm_acc_{n}']:.2%}" for n, _ in heldout.sources) + "; "
    probes = [f"{k[6:]} {val[k]:.1%}" for k in ("probe_backbone", "probe_pcc") if val.get(k) is not None]
    if probes:
        line += f"stripe probe {', '.join(probes)}; "
    if val and "head_alive" in val:
        line += f"head units alive {val['head_alive']:.0%}; "
    if "grad_cos_layer4" in stats:
        line += f"grad cos(perm, pcc) layer4 {stats['grad_cos_layer4']:+.3f}; "
    return line + f"training-batch perm_acc {stats['perm_acc']:.2%}; "


if __name__ == "__main__":
    cli.cli(lambda: main(parse_args()))
