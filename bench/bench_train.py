"""Benchmark: the training side of our pipeline vs the reference-style one, in ONE run.

    python bench/bench_train.py                          # CPU size (resnet18, 144x72 steps)
    python bench/bench_train.py --device cuda --arch resnet50 --img_h 288 --img_w 144 --batch-size 32

Three parts, each measured side by side in the same process:

1. Data pipeline: train-time augmentation of one batch of ``--aug_batch`` (64) uint8
   288x144 HWC images (always 288x144, the stored SYSU size), MMGL stripe shuffle included.
   * ours: a fancy-index read of the uint8 rows (what ``make_loader`` does), the uint8 batch
     to the device, ``data_loader.DeviceAugment`` with a permutation per image;
   * reference: the authors' per-image PIL pipeline, written here without torchvision:
     ``Image.fromarray`` -> pad 10 black (``ImageOps.expand``) -> random crop -> random
     horizontal flip (``Image.transpose``) -> float tensor /255 CHW -> ImageNet normalise ->
     stripe shuffle of that image -> ``torch.stack``. Timed once in this process (the
     per-batch CPU cost) and once through a ``DataLoader`` with ``--workers`` processes, as
     the authors' loaders run it.
   Compared with equal compute: ours on one torch thread vs the in-process reference, and
   (CPU) ours on ``--workers`` threads vs the ``--workers``-process loader; the headline is
   the less favourable of the two. Ours on one thread vs the loader is printed as well.
2. MMGL pre-training step. Ours is ``train.train_one_epoch`` itself (uint8 batch ->
   DeviceAugment + stripe shuffle -> MMGLNet -> ``train.mmgl_losses`` -> backward -> SGD),
   fed by ``make_loader`` over uint8 arrays; AMP and channels_last as ``--amp`` /
   ``--channels_last`` (AMP default: on for CUDA; channels_last: on, as the trainers). The reference feeds the SAME
   network and loss from per-image PIL transforms (stripe shuffle per image in the dataset,
   the RGB and IR image of a pair sharing the permutation) in a DataLoader with
   ``--workers`` processes, in fp32, reading the loss with ``.item()`` every step as the
   authors' meters do. Neither side runs the gradient-cosine diagnostic (``--no-diag``) or
   the Hungarian decoding of the batch's permutation accuracy that ``train_one_epoch`` does
   at print steps (:class:`_NoDecodeLog` drops it): both time the same training work.
3. AGW fine-tuning step. Ours is the engine's ``engine_finetune.train_one_epoch`` with AGW's own
   ``make_criterion`` (AGW/train.py: CE + WRT triplet on ``model_agw.AGWNet``); the reference
   is the authors' loop over per-image PIL transforms of identity-sampled pairs, fp32, same
   network, ``nn.CrossEntropyLoss`` + ``loss.TripletLoss_WRT``, same optimiser groups.
   ``--batch-size`` images per modality = (batch-size / num_pos) identities x ``--num_pos``.

On the CPU the default is ONE torch thread (``--threads``): on a shared or small machine
torch's default thread count oversubscribes the cores and the timings swing by several x.
Images are random uint8 (content does not change the cost). Each part alternates ours and
the reference ``--repeat`` times and keeps the best of each (robust to other load on a
shared machine); the reference's DataLoader is created afresh for each repeat and shut down
before ours runs, and its first ``--warmup`` steps (worker start-up) are not timed. Each
side COUNTS the steps and images it runs (ours: its loader hands a batch to the counter once
the training loop is done with it; the reference: its step function), a timed run that did
not run exactly ``--steps`` steps stops the bench, and every rate is the counted images (or
steps) over the measured seconds; the rows print the counts. On CUDA
the peak GPU memory of each training step and the projected time of 100 SYSU-MM01 epochs
(22,258 RGB images) at the measured rate are printed too.

The last line is the headline: on CUDA the pre-training step throughput; on the CPU the
data pipeline (there, network compute dominates both training steps equally, so their
ratio says little about the pipeline).
"""
import collections
import contextlib
import gc
import importlib.util
import io
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import engine_finetune  # noqa: E402
import logger  # noqa: E402
import train  # noqa: E402  (the top-level MMGL train.py; AGW/train.py is loaded by path below)
import utils  # noqa: E402
from bench import common  # noqa: E402
from data_loader import (IMAGENET_MEAN, IMAGENET_STD, DeviceAugment, IdentitySampler,  # noqa: E402
                         UnpairedSampler, make_loader, random_perms)
from loss import TripletLoss_WRT  # noqa: E402
from model import MMGLNet  # noqa: E402

SYSU_RGB_TRAIN = 22258    # SYSU-MM01 train+val RGB images: one pre-training epoch's length
SYSU_IR_TRAIN = 11909
PROJECT_EPOCHS = 100
AUG_H, AUG_W = 288, 144   # the data-pipeline part always works on the stored SYSU size
PAD = 10

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


# ============================================================================ reference pipeline
def reference_to_tensor(img):
    """torchvision's ToTensor + Normalize(ImageNet) on a PIL RGB image: float CHW."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    x = x.permute(2, 0, 1).contiguous().float().div(255.0)
    return x.sub_(_MEAN).div_(_STD)


def reference_train_transform(img_hwc, img_h, img_w, pad=PAD):
    """The authors' train transform (Pad(10), RandomCrop((h, w)), RandomHorizontalFlip,
    ToTensor, Normalize) on ONE uint8 HWC image with PIL; random draws through torch as
    torchvision makes them."""
    im = ImageOps.expand(Image.fromarray(img_hwc), border=pad, fill=0)
    w, h = im.size
    top = int(torch.randint(0, h - img_h + 1, (1,)))
    left = int(torch.randint(0, w - img_w + 1, (1,)))
    im = im.crop((left, top, left + img_w, top + img_h))
    if torch.rand(1) < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return reference_to_tensor(im)


def reference_stripe_shuffle(x, perm):
    """One CHW image cut into len(perm) horizontal stripes; output stripe i = input
    stripe perm[i] (the same convention as DeviceAugment)."""
    sh = x.shape[1] // len(perm)
    return torch.cat([x[:, p * sh:(p + 1) * sh] for p in perm.tolist()], dim=1)


class RefAugData(Dataset):
    """Part 1's reference dataset: one transformed + stripe-shuffled image per index."""

    def __init__(self, images, order, k):
        self.images, self.order, self.k = images, order, k

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        x = reference_train_transform(self.images[self.order[i]], AUG_H, AUG_W)
        return reference_stripe_shuffle(x, torch.randperm(self.k))


class RefPairData(Dataset):
    """MMGL reference dataset: item i = the (RGB, IR) pair i of the unpaired sampler, each
    transformed per image, both stripe-shuffled with ONE permutation drawn here."""

    def __init__(self, data, pairs, img_h, img_w, k):
        self.data, self.pairs, self.img_h, self.img_w, self.k = data, pairs, img_h, img_w, k

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        r, j = self.pairs[i]
        perm = torch.randperm(self.k)
        x_rgb = reference_train_transform(self.data.rgb_img[r], self.img_h, self.img_w)
        x_ir = reference_train_transform(self.data.ir_img[j], self.img_h, self.img_w)
        return reference_stripe_shuffle(x_rgb, perm), reference_stripe_shuffle(x_ir, perm), perm


class RefIdentityData(Dataset):
    """AGW reference dataset (the authors' SYSUData): item i = the (RGB, IR) indices of the
    identity sampler's position i, each image transformed, with its label."""

    def __init__(self, data, pairs, img_h, img_w):
        self.data, self.pairs, self.img_h, self.img_w = data, pairs, img_h, img_w

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        r, j = self.pairs[i]
        d = self.data
        return (reference_train_transform(d.rgb_img[r], self.img_h, self.img_w),
                reference_train_transform(d.ir_img[j], self.img_h, self.img_w),
                int(d.rgb_label[r]), int(d.ir_label[j]))


def _pairs(sampler):
    """The (rgb, ir) index pairs of a batch sampler, flattened in order."""
    return [(int(r), int(i)) for rb, ib in sampler for r, i in zip(rb, ib)]


def _ref_loader(dataset, batch, workers, device):
    return DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=True,
                      num_workers=workers, pin_memory=device.type == "cuda")


# ============================================================================ timing helpers
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# One timed run: its seconds and what it COUNTED running in them (the rates divide by these).
Timing = collections.namedtuple("Timing", "seconds steps images")


class StepCount:
    """The steps and images one side of a comparison has run. Ours: :class:`_Counted` adds a
    batch once the training loop is done with it; the reference: its step function adds at
    its end. A timed run's rate is its counted images (steps) over its seconds."""

    def __init__(self):
        self.steps = self.images = 0

    def add(self, images):
        self.steps += 1
        self.images += int(images)


def _measure(count, fn, device):
    """Run ``fn()`` between two device syncs: a :data:`Timing` of what ``count`` gained."""
    steps, images = count.steps, count.images
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return Timing(time.perf_counter() - t, count.steps - steps, count.images - images)


class _Counted:
    """A loader (its first ``n`` batches when ``n`` is given) with ``len`` (the engines' loops
    take len()), adding each (RGB, IR, ...) batch to ``count`` when the loop comes back for
    the next one or ends, i.e. once the step on that batch is done."""

    def __init__(self, loader, count, n=None):
        self.loader, self.count = loader, count
        self.n = len(loader) if n is None else min(n, len(loader))

    def __len__(self):
        return self.n

    def __iter__(self):
        for batch in itertools.islice(iter(self.loader), self.n):
            yield batch
            self.count.add(len(batch[0]) + len(batch[1]))


def _timed_reference(make_iter, step, warmup, steps, device, count):
    """:data:`Timing` of ``steps`` reference steps after ``warmup`` untimed ones (worker
    start-up, first-batch latency) on a fresh loader, whose workers are shut down before
    returning; ``step`` adds each step it runs to ``count``."""
    it = [make_iter()]   # a list, so that `finally` drops the loader's only reference

    def run(n):
        for _ in range(n):
            step(next(it[0]))
    try:
        run(warmup)
        return _measure(count, lambda: run(steps), device)
    finally:
        it.clear()
        gc.collect()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


class RandomData:
    """Random uint8 RGB/IR images with labels, the attributes the samplers and loaders use."""

    def __init__(self, n, img_h, img_w, num_ids, seed=0):
        g = np.random.default_rng(seed)
        for m in ("rgb", "ir"):
            setattr(self, f"{m}_img", g.integers(0, 256, (n, img_h, img_w, 3), dtype=np.uint8))
            setattr(self, f"{m}_label", np.arange(n, dtype=np.int64) % num_ids)
            setattr(self, f"{m}_pool", np.arange(n))
        self.num_classes = num_ids


# ============================================================================ part 1: data pipeline
def bench_augment(args, device, rows):
    n_img, k = args.aug_batch, args.num_stripe
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (4 * n_img, AUG_H, AUG_W, 3), dtype=np.uint8)
    aug = DeviceAugment(AUG_H, AUG_W, pad=PAD, device=device)
    pin = device.type == "cuda"

    def ours():
        idx = np.sort(rng.choice(len(images), n_img, replace=False))
        x = torch.from_numpy(images[idx])            # the loader's one fancy-index read
        if pin:
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)
        out = aug(x, train=True, perms=random_perms(n_img, k, device=device))
        _sync(device)
        return out

    def reference():
        idx = rng.choice(len(images), n_img, replace=False)
        return torch.stack([reference_stripe_shuffle(reference_train_transform(images[i], AUG_H, AUG_W),
                                                     torch.randperm(k)) for i in idx])

    def best_of(fns):
        """Best seconds of each function over --aug_repeat alternating calls."""
        for fn in fns:
            fn()                                     # warm-up (allocator, kernels)
        best = [np.inf] * len(fns)
        for _ in range(args.aug_repeat):
            for j, fn in enumerate(fns):
                t = time.perf_counter()
                out = fn()
                best[j] = min(best[j], time.perf_counter() - t)
                assert out.shape == (n_img, 3, AUG_H, AUG_W)
        return [n_img / s for s in best]

    # Two comparisons with EQUAL compute: one core each (ours with one torch thread vs the
    # reference in this process), and, on the CPU, --workers cores each (ours with that many
    # torch threads vs the reference's DataLoader with that many worker processes).
    what = f"augment+stripes {n_img}x{AUG_H}x{AUG_W}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ours_1, ref_ips = best_of([ours, reference])
    torch.set_num_threads(threads)
    rows.append((f"{what}: 1 core each (ours 1 thread, ref in-process)", f"{ours_1:,.0f} img/s",
                 f"{ref_ips:,.0f} img/s", ours_1 / ref_ips))
    compared = [(ours_1 / ref_ips, ours_1, ref_ips, "1 core each")]
    if args.workers > 0:
        n_batches = max(1, args.warmup) + args.aug_repeat
        order = rng.integers(0, len(images), n_batches * n_img)
        count = StepCount()
        timing = _timed_reference(
            lambda: iter(_ref_loader(RefAugData(images, order, k), n_img, args.workers, device)),
            lambda b: count.add(len(b)), max(1, args.warmup), args.aug_repeat, device, count)
        _check_count("augment: reference DataLoader", timing, args.aug_repeat, n_img)
        loader_ips = timing.images / timing.seconds
        if device.type == "cpu":
            torch.set_num_threads(args.workers)
            ours_n, = best_of([ours])
            torch.set_num_threads(threads)
            rows.append((f"{what}: {args.workers} cores each (ours {args.workers} threads, ref "
                         f"DataLoader {args.workers} workers)", f"{ours_n:,.0f} img/s",
                         f"{loader_ips:,.0f} img/s", ours_n / loader_ips))
            compared.append((ours_n / loader_ips, ours_n, loader_ips, f"{args.workers} cores each"))
        rows.append((f"{what}: ours 1 thread vs ref DataLoader {args.workers} workers",
                     f"{ours_1:,.0f} img/s", f"{loader_ips:,.0f} img/s", ours_1 / loader_ips))
    # the headline is the LESS favourable of the equal-compute comparisons
    _, ours_ips, best_ref, how = min(compared)
    label = (f"data pipeline on {device.type} (augment + stripe shuffle of {n_img} {AUG_H}x{AUG_W} "
             f"images; {how}, the less favourable equal-compute comparison)")
    return label, ours_ips, best_ref


# ============================================================================ part 2: MMGL step
# What the MMGL step comparison leaves out on BOTH sides (printed with its row): the gradient
# cosine diagnostic (--diag, on an epoch's last step) and the Hungarian decoding of the batch's
# permutation accuracy (at print steps: an epoch's first and last), which train_one_epoch
# would run in every timed run here (each is one short epoch); the reference never runs them.
MMGL_WORK = "diagnostics and decoding off on both sides"


class _NoDecodeLog(logger.RunLog):
    """The run log of our MMGL side: ``train_one_epoch`` hands ``log_every`` its print-step
    extra (the Hungarian decoding of the batch's permutation accuracy), which this log drops;
    the NaN watch and the meter read at the last step stay (one host sync per run)."""

    def log_every(self, loader, epoch, meter, lr, images_per_step, watch=None, last_good=None,
                  at_print=None):
        return super().log_every(loader, epoch, meter, lr, images_per_step, watch, last_good)


def _mmgl_args(args, steps):
    argv = ["--arch", args.arch, "--img_h", str(args.img_h), "--img_w", str(args.img_w),
            "--batch-size", str(args.batch_size), "--num_stripe", str(args.num_stripe),
            "--gpu", "cpu" if args.device == "cpu" else "0", "--workers", "0", "--no-diag",
            "--iters_per_epoch", str(steps), "--print_freq", "1000000", "--seed", str(args.seed)]
    argv += ["--amp"] if args.amp else []
    argv += ["--channels_last"] if args.channels_last else ["--no-channels_last"]
    return train.check_args(train.get_args_parser().parse_args(argv))


def bench_mmgl(args, device, rows, extra):
    B, steps, warmup = args.batch_size, args.steps, args.warmup
    # a few batches' worth of images; both samplers are cut to the asked number of steps
    data = RandomData((max(warmup, steps) + 2) * B, args.img_h, args.img_w, num_ids=8, seed=args.seed)
    ours_args = _mmgl_args(args, steps)
    ref_args = _mmgl_args(args, steps)
    ref_args.amp = False

    torch.manual_seed(args.seed)
    net = MMGLNet(args.arch, "two", num_stripe=args.num_stripe, part=ours_args.pcc).to(device)
    ref_net = MMGLNet(args.arch, "two", num_stripe=args.num_stripe, part=ref_args.pcc).to(device)
    ref_net.load_state_dict(net.state_dict())
    channels_last = args.channels_last                              # as train.main does
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    lr = args.lr * train.lr_at(0, ours_args)                # epoch 0 of the warm-up
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    _, scaler = utils.amp_setup(ours_args.amp, device)       # as train.main does
    aug = DeviceAugment(args.img_h, args.img_w, device=device)
    log = _NoDecodeLog(ours_args, "bench", outputs=False)   # prints only (its lines are discarded)
    epoch = [0]
    ours_count, ref_count = StepCount(), StepCount()

    def ours(n):
        # an epoch of exactly n steps, as train.main builds it from --iters_per_epoch
        ours_args.iters_per_epoch = n
        sampler = UnpairedSampler(data.rgb_pool, data.ir_pool, B, seed=args.seed, epoch=epoch[0],
                                  steps=n)
        loader = _Counted(make_loader(data, sampler, workers=0, pin_memory=device.type == "cuda"),
                          ours_count)
        epoch[0] += 1
        with contextlib.redirect_stdout(io.StringIO()):     # its per-epoch progress line
            # pcc_from 0: PCC on, as in every step after the switch (the steps it costs most)
            return _measure(ours_count, lambda: train.train_one_epoch(
                net, loader, opt, scaler, aug, 0, ours_args, device, log, 0, None), device)

    def ref_step(batch):
        x_rgb, x_ir, perms = (t.to(device, non_blocking=True) for t in batch)
        out = ref_net(x_rgb, x_ir, perms=perms.repeat(2, 1) if ref_args.pcc_order == "original" else None)
        losses = train.mmgl_losses(out, perms, ref_args)
        ref_opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        ref_opt.step()
        losses["loss"].item()
        ref_count.add(len(x_rgb) + len(x_ir))

    def reference():
        sampler = UnpairedSampler(np.arange(len(data.rgb_img)), np.arange(len(data.ir_img)), B,
                                  seed=args.seed + 1, steps=warmup + steps)
        ds = RefPairData(data, _pairs(sampler), args.img_h, args.img_w, args.num_stripe)
        return _timed_reference(lambda: iter(_ref_loader(ds, B, args.workers, device)), ref_step,
                                warmup, steps, device, ref_count)

    return _compare_steps("MMGL pre-training step", ours, reference, args, device, rows, extra,
                          epoch_steps=max(SYSU_RGB_TRAIN, SYSU_IR_TRAIN) // B, work=MMGL_WORK)


# ============================================================================ part 3: AGW step
def load_agw_script():
    """AGW/train.py as module 'agw_train' (by path: its name clashes with the top-level
    train.py), with AGW/ on sys.path AFTER the repository root for its ``model_agw``."""
    agw_dir = ROOT / "AGW"
    if str(agw_dir) not in sys.path:
        sys.path.append(str(agw_dir))
    spec = importlib.util.spec_from_file_location("agw_train", agw_dir / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_agw(args, device, rows, extra):
    agw = load_agw_script()
    from model_agw import builder   # only now: load_agw_script put AGW/ on sys.path
    B, steps, warmup = args.batch_size, args.steps, args.warmup
    if B % args.num_pos:
        raise cli.UserError(f"--batch-size {B} must be a multiple of --num_pos {args.num_pos}")
    ids = B // args.num_pos
    num_ids = max(2 * ids, 8)
    # the identity sampler's epoch (N / B + 1 steps) must cover the warm-up and timed runs
    data = RandomData(max(num_ids * args.num_pos * 2, (max(warmup, steps) + 1) * B), args.img_h,
                      args.img_w, num_ids=num_ids, seed=args.seed)
    argv = ["--arch", args.arch, "--img_h", str(args.img_h), "--img_w", str(args.img_w),
            "--batch-size", str(ids), "--num_pos", str(args.num_pos), "--workers", "0",
            "--gpu", "cpu" if args.device == "cpu" else "0", "--print_freq", "1000000",
            "--seed", str(args.seed), "--lr", str(args.lr)]
    argv += ["--amp"] if args.amp else []
    argv += ["--channels_last"] if args.channels_last else ["--no-channels_last"]
    fargs = agw.get_parser().parse_args(argv)

    torch.manual_seed(args.seed)
    net = builder(fargs)(num_ids).to(device)
    ref_net = builder(fargs)(num_ids).to(device)
    ref_net.load_state_dict(net.state_dict())
    cl = fargs.channels_last
    if cl:
        net.to(memory_format=torch.channels_last)
    opt = engine_finetune.build_optimizer(net, fargs, net.new_modules())
    ref_opt = engine_finetune.build_optimizer(ref_net, fargs, ref_net.new_modules())
    lr = engine_finetune.adjust_learning_rate(opt, 0, fargs)
    engine_finetune.adjust_learning_rate(ref_opt, 0, fargs)
    amp_dtype, scaler = utils.amp_setup(fargs.amp, device)
    criterion = agw.make_criterion(fargs)
    aug = DeviceAugment(args.img_h, args.img_w, pad=PAD, device=device)
    epoch = [0]
    log = logger.RunLog(fargs, "bench", outputs=False)   # prints only (its lines are discarded)
    ours_count, ref_count = StepCount(), StepCount()

    def ours(n):
        sampler = IdentitySampler(data.rgb_label, data.ir_label, args.num_pos, ids,
                                  seed=args.seed, epoch=epoch[0])
        loader = _Counted(make_loader(data, sampler, workers=0, pin_memory=device.type == "cuda"),
                          ours_count, n)
        epoch[0] += 1
        with contextlib.redirect_stdout(io.StringIO()):
            return _measure(ours_count, lambda: engine_finetune.train_one_epoch(
                net, criterion, loader, aug, opt, scaler, 0, lr, fargs, device, log, None), device)

    criterion_id, criterion_tri = nn.CrossEntropyLoss(), TripletLoss_WRT()

    def ref_step(batch):
        x_rgb, x_ir, y_rgb, y_ir = (t.to(device, non_blocking=True) for t in batch)
        labels = torch.cat((y_rgb, y_ir), 0)
        feat, logits = ref_net(x_rgb, x_ir)
        loss_id = criterion_id(logits, labels)
        loss_tri, _ = criterion_tri(feat, labels)
        loss = loss_id + loss_tri
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()
        loss.item()
        ref_count.add(len(x_rgb) + len(x_ir))

    rep = [0]

    def reference():
        pairs = []
        while len(pairs) < (warmup + steps) * B:
            pairs += _pairs(IdentitySampler(data.rgb_label, data.ir_label, args.num_pos, ids,
                                            seed=args.seed + 1, epoch=rep[0]))
            rep[0] += 1
        ds = RefIdentityData(data, pairs[: (warmup + steps) * B], args.img_h, args.img_w)
        return _timed_reference(lambda: iter(_ref_loader(ds, B, args.workers, device)), ref_step,
                                warmup, steps, device, ref_count)

    return _compare_steps("AGW fine-tuning step", ours, reference, args, device, rows, extra,
                          epoch_steps=int(SYSU_RGB_TRAIN / B) + 1)


def _check_count(what, timing, steps, images_per_step):
    """A timed run must have run exactly the steps (and images) asked: its rate divides by
    what it counted, and both sides of a comparison must count the same."""
    if timing.steps != steps or timing.images != steps * images_per_step:
        raise RuntimeError(f"{what} ran {timing.steps} steps ({timing.images} images) where "
                           f"{steps} steps ({steps * images_per_step} images) were asked")
    return timing


def _compare_steps(name, ours, reference, args, device, rows, extra, epoch_steps, work=None):
    """Warm ours up, alternate ``--repeat`` timed runs of each side, keep each side's fastest;
    every run must have counted exactly ``--steps`` steps. The rates are the counted images
    and steps over the measured seconds. Adds the row (+ CUDA extras) and returns (headline
    label, ours img/s, reference img/s, {"ours": Timing, "reference": Timing})."""
    per_step = 2 * args.batch_size
    if args.warmup:
        _check_count(f"{name}: ours' warm-up", ours(args.warmup), args.warmup, per_step)
    best, peak = [None, None], [0.0, 0.0]
    for _ in range(args.repeat):
        for j, (side, fn) in enumerate((("ours", lambda: ours(args.steps)), ("the reference", reference))):
            _reset_peak(device)
            timing = _check_count(f"{name}: {side}", fn(), args.steps, per_step)
            if best[j] is None or timing.seconds < best[j].seconds:
                best[j] = timing
            if device.type == "cuda":
                peak[j] = max(peak[j], _peak_gib(device))
    sps = [t.steps / t.seconds for t in best]
    ips = [t.images / t.seconds for t in best]
    rows.append((f"{name} ({args.batch_size}+{args.batch_size} img; {best[0].steps} and "
                 f"{best[1].steps} steps counted{'; ' + work if work else ''})",
                 f"{sps[0]:.2f} step/s = {ips[0]:,.1f} img/s",
                 f"{sps[1]:.2f} step/s = {ips[1]:,.1f} img/s", sps[0] / sps[1]))
    if device.type == "cuda":
        extra.append(f"{name}: peak GPU memory {peak[0]:.2f} GiB (ours) vs {peak[1]:.2f} GiB "
                     f"(reference) at batch {args.batch_size}+{args.batch_size}; each includes "
                     f"the other side's resident weights and momentum (an upper bound)")
        hours = [PROJECT_EPOCHS * epoch_steps / s / 3600 for s in sps]
        extra.append(f"{name}: {PROJECT_EPOCHS} SYSU-MM01 epochs ({epoch_steps} steps each) "
                     f"projected {hours[0]:.2f} h (ours) vs {hours[1]:.2f} h (reference)")
    label = f"{name.replace(' step', ' step throughput')} on {device.type}"
    return (label + (f" ({work})" if work else ""), ips[0], ips[1],
            {"ours": best[0], "reference": best[1]})


# ============================================================================ main
def get_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_device_args(p, reference="the reference")
    p.add_argument("--img_h", type=int, default=None, help="training-step image height "
                   "(default 144 on the CPU, 288 on CUDA)")
    p.add_argument("--img_w", type=int, default=None, help="(default 72 on the CPU, 144 on CUDA)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="images per modality per training step (default 8 on the CPU, 32 on CUDA)")
    p.add_argument("--num_pos", type=int, default=4, help="AGW: images per identity and modality")
    p.add_argument("--num_stripe", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per run "
                   "(default 3 on the CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on "
                   "the CPU, 5 on CUDA)")
    p.add_argument("--repeat", type=int, default=2, help="alternating timed runs per "
                   "implementation; the best is kept")
    p.add_argument("--aug_batch", type=int, default=64, help="images per augmented batch")
    p.add_argument("--aug_repeat", type=int, default=20, help="timed batches per implementation "
                   "in the data-pipeline part (best kept; loader: their total)")
    p.add_argument("--workers", type=int, default=None, help="reference DataLoader workers "
                   "(default 2 on the CPU, 4 on CUDA as the authors' scripts; 0: in-process)")
    p.add_argument("--parts", default="aug,mmgl,agw", help="comma list of aug, mmgl, agw")
    return p


def resolve_defaults(args):
    """Fill the device-dependent defaults and check the values."""
    common.resolve_defaults(
        args, {"img_h": (144, 288), "img_w": (72, 144), "batch_size": (8, 32), "steps": (3, 20),
               "warmup": (1, 5), "workers": (2, 4)},
        at_least_1=("img_h", "img_w", "batch_size", "num_pos", "steps", "repeat", "aug_batch",
                    "aug_repeat"), at_least_0=("warmup", "workers"))
    if args.img_h % args.num_stripe or AUG_H % args.num_stripe:
        raise cli.UserError(f"--num_stripe {args.num_stripe} must divide --img_h {args.img_h} "
                              f"and {AUG_H}")
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    for part in args.parts:
        cli.choice_check("--parts item", part, ("aug", "mmgl", "agw"))
    return args


def main():
    args = resolve_defaults(get_parser().parse_args())
    device, where = common.start(args)
    torch.manual_seed(args.seed)
    print(f"train benchmark on {args.device} ({where}); torch {torch.__version__}")
    print(f"steps: {args.arch}, {args.img_h}x{args.img_w}, batch {args.batch_size} RGB + "
          f"{args.batch_size} IR, ours amp={'on' if args.amp else 'off'} channels_last="
          f"{'on' if args.channels_last else 'off'}, reference fp32 with {args.workers} "
          f"DataLoader workers; best of {args.repeat} alternating runs of {args.steps} steps "
          f"after {args.warmup} warm-up, each run's steps counted; MMGL: {MMGL_WORK}")
    rows, extra, results = [], [], {}
    if "aug" in args.parts:
        results["aug"] = bench_augment(args, device, rows)
    if "mmgl" in args.parts:
        results["mmgl"] = bench_mmgl(args, device, rows, extra)
    if "agw" in args.parts:
        results["agw"] = bench_agw(args, device, rows, extra)

    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'ours':>30}  {'reference':>30}  {'ratio':>6}")
    for name, ours, ref, ratio in rows:
        print(f"{name:<{width}}  {ours:>30}  {ref:>30}  {ratio:5.1f}x")
    for line in extra:
        print(line)
    # headline: the pre-training step on CUDA; the data pipeline on the CPU, where network
    # compute dominates both training steps alike
    order = ("mmgl", "agw", "aug") if device.type == "cuda" else ("aug", "mmgl", "agw")
    key = next(k for k in order if k in results)
    label, ours_ips, ref_ips = results[key][:3]
    print(f"{label}: {ours_ips / ref_ips:.1f}x ({ours_ips:,.0f} img/s vs {ref_ips:,.0f} img/s)")


if __name__ == "__main__":
    cli.cli(main)
