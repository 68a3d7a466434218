"""Datasets and loading, as in the AGW authors' ``data_loader.py``: the preprocessed training arrays (SYSU-MM01, LLCM, your folder; memory-mapped), RegDB from its idx files, the
samplers (unpaired RGB/IR for MMGL, identity-balanced for AGW/DDAG) and the ONE
augmentation module, which runs batched on the training device.

Why this shape: the reference pipelines decode, PIL-transform and normalise each image in
DataLoader workers. Here workers only slice uint8 rows out of a memory-mapped array (one
fancy-index read per batch), the batch travels to the device as uint8 (4x fewer bytes than
float32, pinned for an async copy), and pad/crop/flip/normalise/stripe-shuffle are a few
batched tensor ops there.
"""
import ctypes
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from cli import UserError, check_stripes
from data_manager import read_regdb_train
from utils import get_rank, get_world_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SYSU_NPY = ("train_rgb_resized_img", "train_rgb_resized_label", "train_rgb_resized_cam",
            "train_ir_resized_img", "train_ir_resized_label", "train_ir_resized_cam")


# ----------------------------------------------------------------------------- datasets
def integer_array(values, source, hint):
    """``values`` (labels or cameras read from ``source``) as int64 [N]; a UserError ending in
    ``hint`` for anything else: another shape, NaN or non-integer numbers, text. A float array
    of whole numbers is accepted (what numpy writes after arithmetic on labels)."""
    a = np.asarray(values)
    if a.ndim != 1:
        raise UserError(f"{source}: expected a 1-D array of integers, got shape {a.shape}; {hint}")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            raise UserError(f"{source}: {int(bad.sum())} entries are not whole numbers (e.g. "
                            f"{a[bad][0]}); {hint}")
    elif a.dtype.kind not in "iub":
        raise UserError(f"{source}: expected integers, got {a.dtype} values; {hint}")
    return a.astype(np.int64)


class TrainData:
    """Common attributes of a two-modality training set.

    ``rgb_img``/``ir_img``: uint8 [N, H, W, 3] (memory-mapped for SYSU), ``*_label``: int64
    identity labels 0..C-1 shared by both modalities, ``*_cam``: camera numbers, and
    ``rgb_pool``/``ir_pool``: the indices the samplers may draw from (all of them unless
    :meth:`subsample` kept a fraction).
    """

    def _finish(self, name, labels_checked=False):
        for m in ("rgb", "ir"):
            img, lab = getattr(self, f"{m}_img"), getattr(self, f"{m}_label")
            if img.ndim != 4 or img.shape[3] != 3 or img.dtype != np.uint8:
                raise UserError(f"{name}: {m} images must be uint8 [N, H, W, 3], got "
                                f"{img.dtype} {tuple(img.shape)}; re-run the preprocessing")
            if len(img) != len(lab):
                raise UserError(f"{name}: {len(img)} {m} images but {len(lab)} labels; "
                                f"re-run the preprocessing")
            if len(img) == 0:
                raise UserError(f"{name}: no {m} training images")
            # identities 0..C-1, or -1 for every image of an unlabelled set (a folder): a
            # negative label among real ones would be an identity the samplers never draw
            lab = integer_array(lab, f"{name}: {m} labels", "re-run the preprocessing")
            if (lab < 0).any() and not (lab == -1).all() and not labels_checked:
                raise UserError(f"{name}: {int((lab < 0).sum())} {m} labels are negative (e.g. "
                                f"{int(lab[lab < 0][0])}); identity labels are 0..C-1; re-run the preprocessing")
            setattr(self, f"{m}_label", lab)
            setattr(self, f"{m}_pool", np.arange(len(img)))
        if self.rgb_img.shape[1:] != self.ir_img.shape[1:]:
            raise UserError(f"{name}: RGB images are {self.rgb_img.shape[1:3]} but IR images "
                            f"{self.ir_img.shape[1:3]}; re-run the preprocessing")
        self.name = name
        self.num_classes = int(max(self.rgb_label.max(), self.ir_label.max())) + 1

    @property
    def img_size(self):
        """(H, W) of the stored images."""
        return tuple(self.rgb_img.shape[1:3])

    def check_size(self, img_h, img_w, hint):
        if self.img_size != (img_h, img_w):
            raise UserError(f"{self.name} holds {self.img_size[0]}x{self.img_size[1]} images "
                            f"but --img_h/--img_w ask for {img_h}x{img_w}; {hint}")

    def check_batch(self, batch):
        """Pre-training draws ``batch`` distinct images per modality per step: refuse a set
        with fewer (the step would repeat images within one batch)."""
        for m in ("rgb", "ir"):
            n = len(getattr(self, f"{m}_pool"))
            if n < batch:
                raise UserError(f"{self.name}: {n} {m.upper()} training images, fewer than one batch "
                                f"(--batch-size {batch}); add images or lower --batch-size")

    def subsample(self, ratio, seed):
        """Keep a seeded random fraction of each modality's images (the paper's
        data-efficiency study). Every kept index is a real image; ratio 1.0 keeps all."""
        if not 0.0 < ratio <= 1.0:
            raise UserError(f"--train_ratio must be in (0, 1], got {ratio}")
        if ratio < 1.0:
            rng = np.random.default_rng(seed)
            for m in ("rgb", "ir"):
                n = len(getattr(self, f"{m}_img"))
                keep = max(1, int(round(n * ratio)))
                setattr(self, f"{m}_pool", np.sort(rng.choice(n, keep, replace=False)))
        return self

    def stats(self):
        ids = np.unique(self.rgb_label)
        return (f"{self.name}: {'unlabelled' if (ids < 0).all() else f'{len(ids)} ids'} | RGB "
                f"{len(self.rgb_pool)}/{len(self.rgb_img)} images | IR {len(self.ir_pool)}/"
                f"{len(self.ir_img)} images | {self.img_size[0]}x{self.img_size[1]}")


class _Stacked:
    """Several uint8 [N_i, H, W, 3] arrays (memory maps) read as one [sum N_i, H, W, 3]
    without copying them: an index array is split by part and each part is read with one
    fancy index, as for a single array."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.offsets[-1]),) + tuple(arrays[0].shape[1:])
        self.ndim, self.dtype = len(self.shape), arrays[0].dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty(idx.shape + self.shape[1:], dtype=self.dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.arrays[p][idx[sel] - self.offsets[p]]
        return out


class UnionData(TrainData):
    """Pre-training on several training sets at once (``--dataset sysu,llcm``): their
    images in one index space, at one image size (each set checks --img_h/--img_w itself). Labels are offset per set so that no two
    sets share an identity (pre-training reads none; unlabelled sets keep -1); each set's
    ``--train_ratio`` fraction is drawn on its own."""

    def __init__(self, parts):
        self.parts, offset = parts, 0
        for m in ("rgb", "ir"):
            setattr(self, f"{m}_img", _Stacked([getattr(p, f"{m}_img") for p in parts]))
            setattr(self, f"{m}_cam", np.concatenate([getattr(p, f"{m}_cam") for p in parts]))
        labels = {"rgb": [], "ir": []}
        for p in parts:
            for m in labels:
                lab = getattr(p, f"{m}_label")
                labels[m].append(np.where(lab < 0, lab, lab + offset))
            offset += max(p.num_classes, 0)
        self.rgb_label, self.ir_label = (np.concatenate(labels[m]) for m in ("rgb", "ir"))
        self._finish(" + ".join(p.name for p in parts), labels_checked=True)   # each part checked its own

    def subsample(self, ratio, seed):
        for p in self.parts:
            p.subsample(ratio, seed)
        for m in ("rgb", "ir"):
            offsets = getattr(self, f"{m}_img").offsets
            setattr(self, f"{m}_pool", np.concatenate([getattr(p, f"{m}_pool") + o
                                                       for p, o in zip(self.parts, offsets)]))
        return self

    def stats(self):
        return "\n".join(p.stats() for p in self.parts)


class PreprocessedData(TrainData):
    """A training set from the npy files written by ``pre_process_sysu.py`` (SYSU-MM01, or
    LLCM with ``title='LLCM'``), opened with ``mmap_mode='r'``: start-up reads only
    headers, pages come in on demand."""

    LAYOUT = {"SYSU-MM01": "SYSU-MM01 with cam1..cam6/ and exp/",
              "LLCM": "LLCM with idx/, vis/, nir/, test_vis/ and test_nir/",
              "image folder": "a folder with rgb/ and ir/ sub-folders of images"}
    FLAG = {"LLCM": " --dataset llcm", "image folder": " --dataset folder"}

    def __init__(self, data_path, title="SYSU-MM01"):
        data_path = Path(data_path)
        if not data_path.is_dir():
            raise UserError(f"dataset folder not found: {data_path} (expected {self.LAYOUT[title]}; "
                            f"see docs/DATASETS.md)")
        cmd = self.preprocess_cmd = "python pre_process_sysu.py" + self.FLAG.get(title, "")
        arrays = {}
        for key in SYSU_NPY:
            f = data_path / f"{key}.npy"
            if not f.is_file():
                raise UserError(f"missing {f}; run: {cmd} --data_path {data_path}")
            try:
                arrays[key] = np.load(f, mmap_mode="r" if key.endswith("img") else None)
            except (ValueError, OSError) as e:
                raise UserError(f"cannot read {f} ({e}); re-run: {cmd} --data_path {data_path}")
        self.rgb_img, self.ir_img = arrays["train_rgb_resized_img"], arrays["train_ir_resized_img"]
        for m in ("rgb", "ir"):
            for what in ("label", "cam"):
                key = f"train_{m}_resized_{what}"
                setattr(self, f"{m}_{what}", integer_array(arrays[key], data_path / f"{key}.npy",
                                                           f"re-run: {cmd} --data_path {data_path}"))
        self._finish(f"{title} {data_path}")


class RegDBData(TrainData):
    """RegDB training set of one trial, decoded from the images listed in
    ``idx/train_{visible,thermal}_{trial}.txt`` (small: ~2k images per modality)."""

    def __init__(self, data_path, trial, img_h=288, img_w=144, workers=0):
        data_path = Path(data_path)
        if not data_path.is_dir():
            raise UserError(f"dataset folder not found: {data_path} (expected RegDB with "
                            f"Visible/, Thermal/ and idx/; see docs/DATASETS.md)")
        rgb_paths, self.rgb_label = read_regdb_train(data_path, trial, "visible")
        ir_paths, self.ir_label = read_regdb_train(data_path, trial, "thermal")
        self.rgb_img = load_images(rgb_paths, img_w=img_w, img_h=img_h, workers=workers)
        self.ir_img = load_images(ir_paths, img_w=img_w, img_h=img_h, workers=workers)
        self.rgb_label = np.asarray(self.rgb_label, dtype=np.int64)
        self.ir_label = np.asarray(self.ir_label, dtype=np.int64)
        self.rgb_cam = np.ones(len(self.rgb_label), dtype=np.int64)
        self.ir_cam = np.full(len(self.ir_label), 2, dtype=np.int64)
        self._finish(f"RegDB trial {trial}")


class PermHeldout:
    """The fixed held-out set of the permutation-accuracy evaluation (``train.py``).

    ``lists``: {'rgb': paths, 'ir': paths} of images the pre-training never trains on (the
    benchmark's ``heldout_lists``: SYSU-MM01's test-split ids, RGB cameras 1,2,4,5 and IR
    cameras 3,6, as pre-training reads train_id + val_id only; RegDB's test list of the
    trial). ``n`` images per modality are drawn by a seeded generator, and each
    gets a fixed permutation from a second one, so the same data folder, ``n`` and
    ``seed`` give the same images and permutations in every run.

    ``rgb``/``ir``: uint8 [n, H, W, 3]; ``rgb_perms``/``ir_perms``: int64 [n, K];
    ``rgb_paths``/``ir_paths``: the image files."""

    def __init__(self, lists, num_stripe, img_h, img_w, n=300, seed=0, workers=0):
        pick, perm_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
        # several training sets: [(name, lists), ...], n images per modality from each
        self.sources = lists if isinstance(lists, list) else [("", lists)]
        drawn = {"rgb": [], "ir": []}
        for name, source in self.sources:
            for m, paths in source.items():
                if not paths:
                    raise UserError(f"no {m} test images{f' of {name}' if name else ''} for the "
                                    f"held-out permutation accuracy (--val_images 0 turns it off)")
                keep = np.sort(pick.choice(len(paths), min(n, len(paths)), replace=False))
                drawn[m] += [(str(paths[i]), name, perm_rng.permutation(num_stripe)) for i in keep]
        for m, rows in drawn.items():
            setattr(self, f"{m}_paths", [r[0] for r in rows])
            setattr(self, f"{m}_source", np.array([r[1] for r in rows]))
            setattr(self, m, load_images(getattr(self, f"{m}_paths"), img_w=img_w, img_h=img_h,
                                         workers=workers))
            setattr(self, f"{m}_perms", np.stack([r[2] for r in rows]).astype(np.int64))

    def stats(self):
        each = (" (" + ", ".join(f"{name}: {(self.rgb_source == name).sum()} + {(self.ir_source == name).sum()}"
                                 for name, _ in self.sources) + ")") if len(self.sources) > 1 else ""
        return (f"held-out permutation set: {len(self.rgb)} RGB + {len(self.ir)} IR test "
                f"images with fixed permutations{each}")


# ----------------------------------------------------------------------------- samplers
class _EpochBatches(Sampler):
    """Base for samplers that yield whole batches ``(rgb_idx, ir_idx)`` for one epoch.

    The GLOBAL batch (``batch`` x world size) is drawn from a generator seeded by
    (seed, epoch), identically on every rank, and each rank keeps its own slice: ranks see
    disjoint samples, and N ranks with per-rank batch B see exactly the batches one process
    with batch N*B sees. Seeding by epoch also makes ``--resume`` reproduce the order.
    """

    def __init__(self, seed, epoch, rank=None, world=None):
        self.seed, self.epoch = int(seed), int(epoch)
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world
        self.batches = self._global_batches(np.random.default_rng([self.seed, self.epoch]))

    def __iter__(self):
        for rgb, ir in self.batches:
            n = len(rgb) // self.world
            sl = slice(self.rank * n, (self.rank + 1) * n)
            yield rgb[sl], ir[sl]

    def __len__(self):
        return len(self.batches)


class UnpairedSampler(_EpochBatches):
    """MMGL pre-training batches: ``batch_size`` RGB and ``batch_size`` IR images drawn
    independently (unpaired: no identity labels are used). One epoch walks a fresh random
    order of the larger modality once; the smaller one is cycled through its own random
    orders. ``steps`` > 0 fixes the epoch's length instead: fewer steps are the first ones of
    that pass, more keep cycling both modalities through fresh random orders (an epoch as
    long as a bigger set's, for a small one)."""

    def __init__(self, rgb_pool, ir_pool, batch_size, seed=0, epoch=0, rank=None, world=None, steps=0):
        self.rgb_pool, self.ir_pool = np.asarray(rgb_pool), np.asarray(ir_pool)
        self.batch_size, self.steps = batch_size, steps
        super().__init__(seed, epoch, rank, world)

    def _global_batches(self, rng):
        gb = self.batch_size * self.world
        # one pass, or longer when asked: then cut to the asked length (a shorter epoch is
        # the start of the same pass, so a capped run sees the batches it always saw)
        steps = max(1, max(len(self.rgb_pool), len(self.ir_pool)) // gb, self.steps)

        def stream(pool):
            reps = -(-steps * gb // len(pool))
            return np.concatenate([rng.permutation(pool) for _ in range(reps)])[: steps * gb]

        rgb, ir = stream(self.rgb_pool), stream(self.ir_pool)
        return [(rgb[s * gb:(s + 1) * gb], ir[s * gb:(s + 1) * gb]) for s in range(self.steps or steps)]


class IdentitySampler(_EpochBatches):
    """AGW/DDAG fine-tuning batches, as the authors' ``IdentitySampler``: each step picks
    ``batch_size`` distinct identities and, for each, ``num_pos`` RGB and ``num_pos`` IR
    images (drawn with replacement within the identity); position j of the RGB half and of
    the IR half share an identity. Steps per epoch: int(N / (batch_size*num_pos)) + 1 with
    N = max(#RGB, #IR) (per global batch under DDP, where each rank takes
    ``batch_size`` of the step's identities), or ``steps`` > 0 (each step is drawn alike,
    so a shorter epoch is the start of the full one)."""

    def __init__(self, rgb_label, ir_label, num_pos, batch_size, seed=0, epoch=0,
                 rgb_pool=None, ir_pool=None, rank=None, world=None, steps=0):
        self.num_pos, self.batch_size, self.steps = num_pos, batch_size, steps
        rgb_pool = np.arange(len(rgb_label)) if rgb_pool is None else np.asarray(rgb_pool)
        ir_pool = np.arange(len(ir_label)) if ir_pool is None else np.asarray(ir_pool)
        self.n = max(len(rgb_pool), len(ir_pool))
        rgb_label, ir_label = np.asarray(rgb_label)[rgb_pool], np.asarray(ir_label)[ir_pool]
        # only identities seen in both modalities can form a cross-modality group
        self.ids = np.intersect1d(np.unique(rgb_label), np.unique(ir_label))
        self.rgb_pos = {c: rgb_pool[rgb_label == c] for c in self.ids}
        self.ir_pos = {c: ir_pool[ir_label == c] for c in self.ids}
        world = get_world_size() if world is None else world
        if len(self.ids) < batch_size * world:
            raise UserError(f"--batch-size {batch_size} identities per step (x{world} ranks) but "
                            f"only {len(self.ids)} identities have both RGB and IR images")
        super().__init__(seed, epoch, rank, world)

    def _global_batches(self, rng):
        ids_per_step = self.batch_size * self.world
        steps = self.steps or int(self.n / (ids_per_step * self.num_pos)) + 1
        batches = []
        for _ in range(steps):
            chosen = rng.choice(self.ids, ids_per_step, replace=False)
            rgb = np.concatenate([rng.choice(self.rgb_pos[c], self.num_pos) for c in chosen])
            ir = np.concatenate([rng.choice(self.ir_pos[c], self.num_pos) for c in chosen])
            batches.append((rgb, ir))
        return batches


class _BatchFetch(Dataset):
    """Reads one whole batch per item: a fancy-index read of each memory-mapped array."""

    def __init__(self, data):
        self.data = data

    def __getitem__(self, item):
        ri, ii = item
        d = self.data
        return (torch.from_numpy(np.ascontiguousarray(d.rgb_img[ri])),
                torch.from_numpy(np.ascontiguousarray(d.ir_img[ii])),
                torch.from_numpy(d.rgb_label[ri]), torch.from_numpy(d.ir_label[ii]))


def make_loader(data, sampler, workers=0, pin_memory=False):
    """DataLoader yielding ``(rgb uint8 [B,H,W,3], ir uint8 [B,H,W,3], rgb_label, ir_label)``."""
    return DataLoader(_BatchFetch(data), sampler=sampler, batch_size=None,
                      num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


# ----------------------------------------------------------------------------- augmentation
def random_perms(batch, k, device=None, generator=None):
    """``batch`` permutations of range(k), each uniform over all k! orders (argsort of iid
    uniforms)."""
    return torch.rand(batch, k, device=device, generator=generator).argsort(dim=1)


class DeviceAugment:
    """The train-time transform of the authors' pipeline (Pad(10) with black, RandomCrop
    back to (img_h, img_w), RandomHorizontalFlip, ToTensor, Normalize with ImageNet
    statistics), applied to a whole uint8 NHWC batch on its device, plus MMGL's stripe
    shuffling folded into the same copy.

    Returns float32 NCHW in channels_last memory layout (NHWC underneath) on every device:
    it is a free by-product of NHWC input, and the networks run channels_last by default
    (on the CPU too, where it measured as fast or faster than NCHW for these ResNets).
    """

    def __init__(self, img_h, img_w, pad=10, flip=True, device="cpu"):
        self.img_h, self.img_w, self.pad, self.flip = img_h, img_w, pad, flip
        mean = torch.tensor(IMAGENET_MEAN, device=device) * 255.0
        std = torch.tensor(IMAGENET_STD, device=device) * 255.0
        # (x/255 - m)/s == x * (1/(255 s)) - m/s, tiled over a row of img_w pixels so the
        # broadcast runs along a long contiguous last dimension (an inner dimension of 3
        # is a slow broadcast on the CPU)
        self.scale, self.shift = (1.0 / std).repeat(img_w), (-mean / std).repeat(img_w)

    def _normalize_(self, f):
        """In place on float NHWC ``f`` [..., img_h, img_w, 3]."""
        rows = f.view(-1, self.img_w * 3)
        rows.mul_(self.scale.to(f.device)).add_(self.shift.to(f.device))
        return f

    def normalize(self, x):
        """uint8 NHWC [B, img_h, img_w, 3] -> normalised float NCHW (channels_last), no
        randomness."""
        f = x.to(torch.float32, memory_format=torch.contiguous_format)
        return self._normalize_(f).permute(0, 3, 1, 2)

    def __call__(self, x, train=True, perms=None):
        """``x``: uint8 [B, H, W, 3]. ``perms``: optional [B, K] stripe permutations;
        output stripe i (rows i*H/K ...) is input stripe perms[b, i]."""
        b, h, w, _ = x.shape
        dev = x.device
        if train:
            p = self.pad
            if h + 2 * p < self.img_h or w + 2 * p < self.img_w:
                raise UserError(f"images of {h}x{w} cannot be cropped to {self.img_h}x{self.img_w}")
            oy = torch.randint(0, h + 2 * p - self.img_h + 1, (b, 1), device=dev)
            ox = torch.randint(0, w + 2 * p - self.img_w + 1, (b, 1), device=dev)
            flip = torch.rand(b, 1, device=dev) < 0.5 if self.flip else torch.zeros(b, 1, dtype=torch.bool, device=dev)
        elif (h, w) != (self.img_h, self.img_w):
            raise UserError(f"test images are {h}x{w}, expected {self.img_h}x{self.img_w}")
        elif perms is None:
            return self.normalize(x)
        else:  # only the stripe shuffle
            p = 0
            oy = ox = torch.zeros(b, 1, dtype=torch.long, device=dev)
            flip = torch.zeros(b, 1, dtype=torch.bool, device=dev)
        src = None  # row order inside the crop: stripe i <- stripe perms[b, i]
        if perms is not None:
            k = perms.shape[1]
            check_stripes(k, self.img_h)
            sh = self.img_h // k
            src = perms.to(dev).repeat_interleave(sh, dim=1) * sh + torch.arange(sh, device=dev).repeat(k)
        crop = self._crop_cpu if dev.type == "cpu" else self._crop_gather
        return crop(x, p, oy, ox, flip, src)

    def _crop_gather(self, x, pad, oy, ox, flip, src):
        """On an accelerator: the crop, flip and stripe shuffle are ONE gather from the
        zero-padded batch (zero = black, like PIL's Pad); ``oy``/``ox`` index the padded image."""
        b, dev = x.shape[0], x.device
        x = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
        rows = torch.arange(self.img_h, device=dev).expand(b, -1) + oy
        cols = torch.arange(self.img_w, device=dev).expand(b, -1) + ox
        cols = torch.where(flip, cols.flip(1), cols)
        if src is not None:
            rows = rows.gather(1, src)
        x = x[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return self.normalize(x)

    def _crop_cpu(self, x, pad, oy, ox, flip, src):
        """Same draws, same result as the gather path (a test checks bit-equality). On a
        CPU a three-tensor advanced index is slow; instead each image is padded into one
        reused buffer, cropped (rows picked in stripe order by one index_select), flipped,
        converted and normalised on its own, so its ~0.5 MB of floats is still in cache
        for the normalisation (~1.4x faster than padding and converting the whole batch)."""
        b, h, w = x.shape[0], self.img_h, self.img_w
        oy, ox, flip = oy.view(-1).tolist(), ox.view(-1).tolist(), flip.view(-1).tolist()
        out = torch.empty(b, h, w, 3)
        padded = torch.zeros(x.shape[1] + 2 * pad, x.shape[2] + 2 * pad, 3, dtype=torch.uint8)
        inner = padded[pad:pad + x.shape[1], pad:pad + x.shape[2]]   # the border stays black
        crop = torch.empty(h, w, 3, dtype=torch.uint8)
        for i in range(b):
            inner.copy_(x[i])
            cols = padded[:, ox[i]:ox[i] + w]
            if src is None:
                crop.copy_(cols[oy[i]:oy[i] + h])
            else:
                torch.index_select(cols, 0, src[i] + oy[i], out=crop)
            out[i].copy_(crop.flip(1) if flip[i] else crop)
            self._normalize_(out[i])
        return out.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- images
def decode_image(path, img_w=144, img_h=288):
    """Decode one image fully, convert to RGB (grey 'L' thermal images become three equal
    channels) and resize to ``img_w`` x ``img_h`` with LANCZOS (the high-quality filter
    that replaced Pillow's ANTIALIAS). -> uint8 [img_h, img_w, 3].

    A missing, corrupt or truncated file raises :class:`UserError` naming it: Pillow
    refuses truncated data by default, so nothing half-decoded is ever kept."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # convert() forces the full decode
        im = im.resize((img_w, img_h), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises OSError/ValueError/SyntaxError/DecompressionBomb...
        msg = str(e).replace(str(path), "").strip(" '\":") or type(e).__name__
        raise UserError(f"cannot read image {path}: {msg}") from None


def _decode_or_error(task):
    """Decoding worker: (array, None) or (None, error message); never raises, so one bad file
    neither stops the decoding nor hides which file it was."""
    path, img_w, img_h = task
    try:
        return decode_image(path, img_w, img_h), None
    except UserError as e:
        return None, str(e)


def _worker_init():
    """Decoding worker start. Ctrl-C reaches the whole process group: the workers ignore it
    and leave the stopping to the parent, which kills them. On Linux the kernel also SIGTERMs
    a worker whose parent dies, even by SIGKILL, so no decoder outlives the run it served."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux/glibc: the parent's kill still ends the workers
    if os.getppid() == 1:   # the parent died before the request took effect
        os._exit(1)


def _decode_shard(conn, tasks):
    """Decoding worker: its share of the tasks, in order, each result down its own pipe."""
    _worker_init()
    for task in tasks:
        conn.send(_decode_or_error(task))
    conn.close()


def iter_decoded(paths, img_w=144, img_h=288, workers=0):
    """Yield ``(array or None, error or None)`` for each path, in order. ``workers`` > 0
    decodes in that many processes (JPEG decode + LANCZOS are CPU-bound): worker k takes
    paths k, k + workers, ... and sends each result through a pipe of its own, read in
    turn. No lock or queue is shared, so stopping early (first bad file, Ctrl-C) is a plain
    kill of every worker (a Ctrl-C under load once hung in multiprocessing.Pool's
    terminate(), which first takes the task queue's lock, held by any worker waiting for a
    task)."""
    tasks = [(str(p), img_w, img_h) for p in paths]
    if not (workers and workers > 0 and len(tasks) > 1):
        for t in tasks:
            yield _decode_or_error(t)
        return
    ctx = multiprocessing.get_context("fork")
    n = min(workers, len(tasks))
    procs, conns = [], []
    try:
        for k in range(n):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_decode_shard, args=(send, tasks[k::n]), daemon=True)
            proc.start()
            send.close()   # only the worker writes: its death is EOF here, not a wait
            procs.append(proc)
            conns.append(recv)
        for i, (path, _, _) in enumerate(tasks):
            k = i % n   # the worker of task i
            try:
                yield conns[k].recv()
            except EOFError:
                procs[k].join()
                raise UserError(f"the image decoding worker stopped (exit code {procs[k].exitcode}) "
                                f"before decoding {path}; --workers 0 decodes in this process and shows "
                                f"why") from None
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join()
        for conn in conns:
            conn.close()


def load_images(paths, img_w=144, img_h=288, workers=0):
    """Decode and resize ``paths`` -> uint8 [N, img_h, img_w, 3] (RGB; grey images give
    three equal channels). An unreadable file raises :class:`UserError` naming it."""
    out = np.empty((len(paths), img_h, img_w, 3), dtype=np.uint8)
    for i, (arr, err) in enumerate(iter_decoded(paths, img_w, img_h, workers)):
        if err is not None:
            raise UserError(err)
        out[i] = arr
    return out
