"""Synthetic SYSU-MM01, RegDB and LLCM in their real on-disk layouts, and an unlabelled
RGB-IR image folder.

The real datasets need a signed licence, so the quick start and the tests run on these.
Each identity is a small "genome" of body SHAPE (head size, shoulder width, leg width and
gap, bag) and TEXTURE (torso and leg patterns with their frequencies). Both modalities
render the same shape and texture map:

* RGB (SYSU cams 1,2,4,5; RegDB Visible; LLCM vis, darkened) paints the texture with
  id-specific colours;
* IR (SYSU cams 3,6; RegDB Thermal; LLCM nir) maps it through id-specific HEAT levels that
  are drawn independently of the colours, shown as a grey image,

so colour alone cannot match across modalities, but shape and texture can. The body is
laid out top to bottom (hair and head, shoulders, patterned torso, belt, legs, shoes) over
a background that is lighter at the top than at the floor, so each of the 6 horizontal
stripes MMGL shuffles has position-specific content and the stripe order is learnable.
Every image gets its own jitter (shift, scale, width, flip, brightness, noise, clutter).

Deterministic by ``seed`` (same seed -> identical bytes). Usage:

    python tools/make_synthetic.py --dataset sysu --out data/SYSU-MM01 --num_ids 40 --seed 0
    python tools/make_synthetic.py --dataset both          # data/SYSU-MM01 and data/RegDB
    python tools/make_synthetic.py --dataset llcm          # data/LLCM
    python tools/make_synthetic.py --dataset folder        # data/folder: unlabelled rgb/, ir/
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import REPO_ROOT, ArgumentParser, UserError, cli  # noqa: E402

MARKER = "synthetic.json"   # written into every generated set; lets us replace our own output
SYSU_RGB_CAMS = (1, 2, 4, 5)
SYSU_IR_CAMS = (3, 6)
N_TORSO_TEX = 6
N_LEG_TEX = 3


# ----------------------------------------------------------------------------- identities
def _colour(rng, lo=0.05, hi=0.95):
    return rng.uniform(lo, hi, size=3)


def make_identity(rng):
    """The id-specific genome: shape, texture, RGB colours and (independent) heat levels.

    Vertical positions are fractions of the body box height, widths fractions of its
    width."""
    return {
        # shape
        "head_y": rng.uniform(0.085, 0.115), "head_rx": rng.uniform(0.13, 0.22),
        "neck": rng.uniform(0.17, 0.21), "waist": rng.uniform(0.50, 0.60),
        "torso_w": rng.uniform(0.55, 0.92), "taper": rng.uniform(-0.15, 0.25),
        "leg_w": rng.uniform(0.13, 0.25), "leg_gap": rng.uniform(0.02, 0.16),
        "belt": bool(rng.random() < 0.5), "bag": int(rng.integers(3)),  # none/left/right
        "bag_size": rng.uniform(0.12, 0.2),
        # texture
        "torso_tex": int(rng.integers(N_TORSO_TEX)), "torso_freq": rng.uniform(1.5, 5.0),
        "torso_phase": rng.uniform(0, 2 * np.pi), "logo_r": rng.uniform(0.12, 0.3),
        "split": rng.uniform(0.3, 0.7),
        "leg_tex": int(rng.integers(N_LEG_TEX)), "leg_freq": rng.uniform(2.0, 6.0),
        "knee": rng.uniform(0.62, 0.8),
        # RGB appearance
        "skin": np.array([0.85, 0.65, 0.5]) * rng.uniform(0.6, 1.1),
        "hair": _colour(rng, 0.0, 0.35), "torso_a": _colour(rng), "torso_b": _colour(rng),
        "legs_c": _colour(rng), "shoes_c": _colour(rng, 0.0, 0.5), "bag_c": _colour(rng),
        "belt_c": _colour(rng, 0.0, 0.6),
        # thermal appearance: NOT derived from the colours above
        "heat_head": rng.uniform(0.78, 1.0), "heat_torso": rng.uniform(0.35, 0.9),
        "heat_legs": rng.uniform(0.3, 0.85), "heat_shoes": rng.uniform(0.15, 0.4),
        "heat_bag": rng.uniform(0.1, 0.45), "heat_contrast": rng.uniform(0.25, 0.6),
    }


def _square(x):
    """A soft square wave in [0, 1] (keeps pattern edges after down/up-sampling)."""
    return 0.5 + 0.5 * np.tanh(4.0 * np.sin(x))


def render(g, h, w, rng, modality):
    """One image of identity ``g``: float32 [h, w, 3] ('rgb') or [h, w] ('ir') in [0, 1]."""
    # Per-image jitter: the body box is shifted, scaled, stretched and maybe mirrored.
    s = rng.uniform(0.88, 1.04)
    sx = s * rng.uniform(0.88, 1.12)
    dy, dx = rng.uniform(-0.035, 0.035), rng.uniform(-0.08, 0.08)
    yy = (np.arange(h, dtype=np.float32) + 0.5) / h
    xx = (np.arange(w, dtype=np.float32) + 0.5) / w
    by = ((yy - 0.5 - dy) / s + 0.5)[:, None]          # body coordinates
    bx = ((xx - 0.5 - dx) / sx + 0.5)[None, :]
    if rng.random() < 0.5:
        bx = 1.0 - bx
    by, bx = np.broadcast_arrays(by, bx)
    cx = bx - 0.5

    # Part masks, painted back to front.
    t_u = (by - g["neck"]) / (g["waist"] - g["neck"])                # 0..1 down the torso
    half = 0.5 * g["torso_w"] * (1.0 - g["taper"] * np.clip(t_u, 0, 1))
    torso = (t_u >= 0) & (t_u <= 1) & (np.abs(cx) <= half)
    # shoulders are rounded: cut the top outer corners
    torso &= ~((t_u < 0.08) & (np.abs(cx) > half - 0.08))
    leg_c = g["leg_gap"] / 2 + g["leg_w"] / 2
    legs_y = (by > g["waist"] - 0.01) & (by < 0.93)
    legs = legs_y & ((np.abs(cx - leg_c) < g["leg_w"] / 2) | (np.abs(cx + leg_c) < g["leg_w"] / 2))
    shoes = (by >= 0.93) & (by < 0.975) & ((np.abs(cx - leg_c) < g["leg_w"] / 2 + 0.04)
                                           | (np.abs(cx + leg_c) < g["leg_w"] / 2 + 0.04))
    ry = g["head_rx"] * 0.45                                          # ~round in pixels
    head_d = (cx / g["head_rx"]) ** 2 + ((by - g["head_y"]) / ry) ** 2
    head = head_d <= 1.0
    hair = head & (by < g["head_y"] - 0.25 * ry)
    neck = (by >= g["head_y"]) & (by < g["neck"] + 0.01) & (np.abs(cx) < 0.06)
    belt = torso & (t_u > 0.9) if g["belt"] else np.zeros_like(torso)
    if g["bag"]:
        side = 1.0 if g["bag"] == 1 else -1.0
        bag = ((np.abs(cx - side * (half + g["bag_size"] / 2 - 0.02)) < g["bag_size"] / 2)
               & (t_u > 0.35) & (t_u < 0.35 + g["bag_size"] * 3.5))
    else:
        bag = np.zeros_like(torso)

    # Texture in [0, 1], shared by both modalities.
    f, ph = g["torso_freq"], g["torso_phase"]
    tex_kind = g["torso_tex"]
    if tex_kind == 0:      # horizontal stripes
        t_torso = _square(2 * np.pi * f * t_u + ph)
    elif tex_kind == 1:    # vertical stripes
        t_torso = _square(2 * np.pi * f * 1.5 * cx + ph)
    elif tex_kind == 2:    # checker
        t_torso = _square(2 * np.pi * f * t_u + ph) * _square(2 * np.pi * f * 1.5 * cx) \
            + (1 - _square(2 * np.pi * f * t_u + ph)) * (1 - _square(2 * np.pi * f * 1.5 * cx))
    elif tex_kind == 3:    # diagonal stripes
        t_torso = _square(2 * np.pi * f * (t_u + 1.5 * cx) + ph)
    elif tex_kind == 4:    # plain shirt with a chest logo
        d = np.sqrt((cx / g["logo_r"]) ** 2 + ((t_u - 0.35) / (g["logo_r"] * 1.2)) ** 2)
        t_torso = np.clip(1.5 - 1.5 * d, 0, 1)
    else:                  # two-tone (jacket over shirt)
        t_torso = 0.5 + 0.5 * np.tanh(12 * (t_u - g["split"]))
    leg_u = (by - g["waist"]) / (0.93 - g["waist"])
    if g["leg_tex"] == 0:      # plain trousers, slightly shaded
        t_legs = 0.3 + 0.2 * leg_u
    elif g["leg_tex"] == 1:    # horizontally striped trousers
        t_legs = _square(2 * np.pi * g["leg_freq"] * leg_u)
    else:                      # shorts: bright cloth above the knee, skin below
        t_legs = 0.5 + 0.5 * np.tanh(12 * (g["knee"] - leg_u))

    if modality == "rgb":
        top, bottom = _colour(rng, 0.45, 1.0), _colour(rng, 0.1, 0.55)   # sky-ish / floor
        img = top[None, None] * (1 - yy[:, None, None]) + bottom[None, None] * yy[:, None, None]
        img = np.broadcast_to(img, (h, w, 3)).copy()
        _clutter(img, rng, lambda: _colour(rng, 0.1, 0.9))
        tt = t_torso[..., None]
        img[legs] = (g["legs_c"] * (0.55 + 0.45 * t_legs[..., None]))[legs]
        if g["leg_tex"] == 2:   # skin shows below the shorts
            skin_legs = legs & (t_legs < 0.5)
            img[skin_legs] = g["skin"] * 0.9
        img[shoes] = g["shoes_c"]
        img[torso] = (g["torso_a"] * (1 - tt) + g["torso_b"] * tt)[torso]
        img[belt] = g["belt_c"]
        img[bag] = g["bag_c"]
        img[neck] = g["skin"] * 0.9
        img[head] = g["skin"]
        img[hair] = g["hair"]
        img *= rng.uniform(0.75, 1.2)                             # illumination
        img *= rng.uniform(0.9, 1.1, size=3)                      # white balance
    else:
        floor = rng.uniform(0.05, 0.3)
        img = np.broadcast_to((floor * 0.6 + floor * 0.8 * yy)[:, None], (h, w)).copy()
        _clutter(img, rng, lambda: rng.uniform(0.05, 0.45))
        c = g["heat_contrast"]
        img[legs] = (g["heat_legs"] * (1 - c + c * t_legs))[legs]
        if g["leg_tex"] == 2:   # bare skin is warm
            img[legs & (t_legs < 0.5)] = g["heat_head"] * 0.9
        img[shoes] = g["heat_shoes"]
        img[torso] = (g["heat_torso"] * (1 - c + c * t_torso))[torso]
        img[belt] = g["heat_torso"] * 0.5
        img[bag] = g["heat_bag"]
        img[neck] = g["heat_head"] * 0.95
        img[head] = g["heat_head"]
        img[hair] = g["heat_head"] * 0.6
        img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img += rng.normal(0.0, 0.02, size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _clutter(img, rng, value):
    """A few random background rectangles (scene clutter, not tied to the identity)."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(0, 4))):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        img[y0:y0 + int(rng.integers(h // 8, h // 2)), x0:x0 + int(rng.integers(w // 8, w // 2))] = value()


def _to_uint8(x):
    return (x * 255.0 + 0.5).astype(np.uint8)


def _image_size(rng, heights=(100, 160), widths=(50, 80)):
    h = int(rng.integers(heights[0], heights[1] + 1))
    w = int(np.clip(round(h * rng.uniform(0.4, 0.55)), widths[0], widths[1]))
    return h, w


def _check_seed(seed):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed!r}")


# ----------------------------------------------------------------------------- output dirs
def _check_range(imgs_per_cam):
    lo, hi = imgs_per_cam
    if not 1 <= lo <= hi:
        raise UserError(f"imgs_per_cam must be (lo, hi) with 1 <= lo <= hi, got {imgs_per_cam}")
    return lo, hi


def _prepare_out(out_dir):
    """A fresh temporary sibling to generate into; the result replaces ``out_dir`` only at
    the end, and only if ``out_dir`` is absent, empty, or a set this tool wrote before (so
    stale images or npy files of an earlier set never mix with the new one)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise UserError(f"--out {out} is not empty and was not written by this tool "
                            f"(no {MARKER}); choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return out, tmp


def _commit_out(out, tmp, meta):
    (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------- SYSU-MM01
def _split_counts(n):
    n_val = max(1, int(round(0.1 * n)))
    n_test = max(2, int(round(0.3 * n)))
    return n - n_val - n_test, n_val, n_test


def make_sysu(out_dir, num_ids=40, seed=0, imgs_per_cam=(3, 6), cam_prob=0.8,
              ir_grey_frac=0.1, heights=(100, 160), widths=(50, 80), max_pid=533,
              quality=90):
    """Write a synthetic SYSU-MM01 into ``out_dir``: ``cam1..cam6/<pid:04d>/<n:04d>.jpg``
    and ``exp/{train,val,test}_id.txt`` (one comma-separated line each).

    ``num_ids`` distinct pids are sampled from 1..``max_pid`` (non-contiguous) and split
    ~60/10/30 % into train/val/test. Each (id, camera) folder exists with probability
    ``cam_prob`` and holds ``imgs_per_cam`` (inclusive range) images, with the guarantees
    the protocols need: every id has >=1 IR camera and an RGB image in cam1 or cam2 (so the
    indoor gallery has every test id). IR images are 3-channel grey JPEGs, a fraction
    ``ir_grey_frac`` of them single-channel 'L' JPEGs. Returns a summary dict."""
    _check_seed(seed)
    if num_ids < 5:
        raise UserError(f"--num_ids must be at least 5 for SYSU-MM01 (train/val/test splits), got {num_ids}")
    if num_ids > max_pid:
        raise UserError(f"--num_ids must be at most {max_pid}, got {num_ids}")
    lo, hi = _check_range(imgs_per_cam)
    start = time.time()
    out, tmp = _prepare_out(out_dir)
    try:
        rng = np.random.default_rng(seed)
        pids = np.sort(rng.choice(np.arange(1, max_pid + 1), num_ids, replace=False))
        order = rng.permutation(pids)
        n_train, n_val, _ = _split_counts(num_ids)
        splits = {"train": sorted(order[:n_train].tolist()),
                  "val": sorted(order[n_train:n_train + n_val].tolist()),
                  "test": sorted(order[n_train + n_val:].tolist())}
        (tmp / "exp").mkdir()
        for name, ids in splits.items():
            (tmp / "exp" / f"{name}_id.txt").write_text(",".join(map(str, ids)) + "\n")

        counts = {c: 0 for c in range(1, 7)}
        n_grey = 0
        for pid in pids.tolist():
            g = make_identity(np.random.default_rng([seed, pid]))
            prng = np.random.default_rng([seed, pid, 1])
            cams = {c for c in range(1, 7) if prng.random() < cam_prob}
            if not cams & set(SYSU_IR_CAMS):
                cams.add(int(prng.choice(SYSU_IR_CAMS)))
            if not cams & {1, 2}:
                cams.add(int(prng.choice([1, 2])))
            for cam in sorted(cams):
                crng = np.random.default_rng([seed, pid, 2, cam])
                folder = tmp / f"cam{cam}" / f"{pid:04d}"
                folder.mkdir(parents=True)
                modality = "ir" if cam in SYSU_IR_CAMS else "rgb"
                for n in range(1, int(crng.integers(lo, hi + 1)) + 1):
                    h, w = _image_size(crng, heights, widths)
                    img = _to_uint8(render(g, h, w, crng, modality))
                    if modality == "ir":
                        if crng.random() < ir_grey_frac:
                            pil = Image.fromarray(img, "L")
                            n_grey += 1
                        else:   # IR cameras of SYSU-MM01 store grey pictures as 3 channels
                            pil = Image.fromarray(np.repeat(img[..., None], 3, axis=2), "RGB")
                    else:
                        pil = Image.fromarray(img, "RGB")
                    pil.save(folder / f"{n:04d}.jpg", quality=quality)
                    counts[cam] += 1
        meta = {"dataset": "sysu", "num_ids": num_ids, "seed": seed,
                "imgs_per_cam": list(imgs_per_cam), "cam_prob": cam_prob,
                "ir_grey_frac": ir_grey_frac, "note": "synthetic data from tools/make_synthetic.py"}
        _commit_out(out, tmp, meta)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"out": str(out), "ids": {k: len(v) for k, v in splits.items()}, "splits": splits,
            "per_cam": counts, "rgb": sum(counts[c] for c in SYSU_RGB_CAMS),
            "ir": sum(counts[c] for c in SYSU_IR_CAMS), "ir_grey": n_grey,
            "seconds": time.time() - start}


# ----------------------------------------------------------------------------- RegDB
def make_regdb(out_dir, num_ids=20, seed=0, imgs_per_id=10, trials=10, size=(64, 128)):
    """Write a synthetic RegDB into ``out_dir``: ``Visible/<pid>/*.bmp`` (RGB),
    ``Thermal/<pid>/*.bmp`` (8-bit grey) with ``imgs_per_id`` images per modality, and
    ``idx/{train,test}_{visible,thermal}_<trial>.txt`` for trials 1..``trials``: each trial
    puts a seeded random half of the ids in train and the rest in test; a line is
    ``Visible/<pid>/<file>.bmp <label>`` with label = position of the id in that trial's
    sorted train (or test) id list. Returns a summary dict."""
    _check_seed(seed)
    if num_ids < 2:
        raise UserError(f"--num_ids must be at least 2 for RegDB, got {num_ids}")
    if imgs_per_id < 1:
        raise UserError(f"imgs_per_id must be >= 1, got {imgs_per_id}")
    start = time.time()
    w, h = size
    out, tmp = _prepare_out(out_dir)
    try:
        files = {"Visible": {}, "Thermal": {}}
        for pid in range(num_ids):
            g = make_identity(np.random.default_rng([seed, pid]))
            for folder, modality, tag in (("Visible", "rgb", "v"), ("Thermal", "ir", "t")):
                irng = np.random.default_rng([seed, pid, 3 if modality == "rgb" else 4])
                d = tmp / folder / str(pid)
                d.mkdir(parents=True)
                names = []
                for n in range(1, imgs_per_id + 1):
                    img = _to_uint8(render(g, h, w, irng, modality))
                    name = f"{tag}_{pid:04d}_{n:02d}.bmp"
                    Image.fromarray(img, "RGB" if modality == "rgb" else "L").save(d / name)
                    names.append(name)
                files[folder][pid] = names
        (tmp / "idx").mkdir()
        for trial in range(1, trials + 1):
            perm = np.random.default_rng([seed, 1000 + trial]).permutation(num_ids)
            half = num_ids // 2
            for split, ids in (("train", sorted(perm[:half].tolist())),
                               ("test", sorted(perm[half:].tolist()))):
                for folder, modal in (("Visible", "visible"), ("Thermal", "thermal")):
                    lines = [f"{folder}/{pid}/{name} {label}"
                             for label, pid in enumerate(ids) for name in files[folder][pid]]
                    (tmp / "idx" / f"{split}_{modal}_{trial}.txt").write_text("\n".join(lines) + "\n")
        _commit_out(out, tmp, {"dataset": "regdb", "num_ids": num_ids, "seed": seed,
                               "imgs_per_id": imgs_per_id, "trials": trials,
                               "note": "synthetic data from tools/make_synthetic.py"})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"out": str(out), "ids": num_ids, "images": 2 * num_ids * imgs_per_id,
            "trials": trials, "seconds": time.time() - start}


# ----------------------------------------------------------------------------- LLCM
LLCM_CAMS = {"vis": tuple(range(1, 10)), "nir": (1, 2, 4, 5, 6, 7, 8, 9)}  # no NIR camera 3


def _llcm_names(pid, cam, modal, n, rng):
    """``n`` file names in LLCM's pattern ``<pid:04d>_c<cam:02d>_s<6 digits>_f<frame>_<modal>
    .jpg`` (one sequence, increasing frames). Frame numbers of different lengths make the
    name order differ from the frame order, as in the real set."""
    s = int(rng.integers(100000, 235960))
    frames = int(rng.integers(1, 9000)) + np.cumsum(rng.integers(1, 900, size=n))
    return [f"{pid:04d}_c{cam:02d}_s{s:06d}_f{f}_{modal}.jpg" for f in frames.tolist()]


def make_llcm(out_dir, num_ids=30, seed=0, imgs_per_cam=(1, 3), cam_prob=0.5,
              heights=(100, 160), widths=(50, 80), max_pid=1064, dark=(0.3, 0.75), quality=90):
    """Write a synthetic LLCM into ``out_dir`` in the layout its authors' code reads:

    * ``idx/train_vis.txt``, ``idx/train_nir.txt``: lines ``<vis|nir>/<pid:04d>/<file> <label>``
      with label = rank of the id among the sorted training ids (the same in both files);
    * ``vis/<pid:04d>/``, ``nir/<pid:04d>/``: the training images of all cameras together;
    * ``idx/test_id.txt``: the test ids, one comma-separated line;
    * ``test_vis/cam1..cam9/<pid:04d>/`` and ``test_nir/cam{1,2,4..9}/<pid:04d>/`` (LLCM
      has no near-infrared camera 3).

    ``num_ids`` distinct pids are sampled from 1..``max_pid`` and split about 2:1 into
    train/test (LLCM: 713/351), disjoint. Each (id, camera) holds ``imgs_per_cam``
    (inclusive range) images with probability ``cam_prob``, so ids miss some cameras; but
    every id has a visible and a near-infrared camera, and every test camera folder holds
    a test id. Visible images are darkened by a factor drawn from ``dark`` (low light);
    near-infrared ones are grey pictures stored as 3 channels. Returns a summary dict."""
    _check_seed(seed)
    if not 4 <= num_ids <= max_pid:
        raise UserError(f"--num_ids must be between 4 and {max_pid} for LLCM, got {num_ids}")
    lo, hi = _check_range(imgs_per_cam)
    start = time.time()
    out, tmp = _prepare_out(out_dir)
    try:
        rng = np.random.default_rng(seed)
        pids = rng.choice(np.arange(1, max_pid + 1), num_ids, replace=False)
        n_test = max(2, int(round(num_ids * 351 / 1064)))
        test = sorted(pids[:n_test].tolist())
        train = sorted(pids[n_test:].tolist())
        cams = {}
        for pid in train + test:
            prng = np.random.default_rng([seed, pid, 1])
            for modal, all_cams in LLCM_CAMS.items():
                got = [c for c in all_cams if prng.random() < cam_prob]
                cams[pid, modal] = got or [int(prng.choice(all_cams))]
        for modal, all_cams in LLCM_CAMS.items():   # no empty test camera folder
            for c in all_cams:
                if not any(c in cams[pid, modal] for pid in test):
                    cams[int(rng.choice(test)), modal].append(c)

        counts = {"train_vis": 0, "train_nir": 0, "test_vis": 0, "test_nir": 0}
        lines = {"vis": [], "nir": []}
        for pid in sorted(train + test):
            g = make_identity(np.random.default_rng([seed, pid]))
            is_test = pid in test
            for m, modal in enumerate(LLCM_CAMS):
                for cam in sorted(cams[pid, modal]):
                    crng = np.random.default_rng([seed, pid, 2, m, cam])
                    rel = (Path(f"test_{modal}") / f"cam{cam}" if is_test else Path(modal)) \
                        / f"{pid:04d}"
                    (tmp / rel).mkdir(parents=True, exist_ok=True)
                    n = int(crng.integers(lo, hi + 1))
                    for name in _llcm_names(pid, cam, modal, n, crng):
                        h, w = _image_size(crng, heights, widths)
                        if modal == "vis":
                            img = _to_uint8(render(g, h, w, crng, "rgb") * crng.uniform(*dark))
                        else:
                            img = np.repeat(_to_uint8(render(g, h, w, crng, "ir"))[..., None], 3,
                                            axis=2)
                        Image.fromarray(img, "RGB").save(tmp / rel / name, quality=quality)
                        if not is_test:
                            lines[modal].append(f"{rel.as_posix()}/{name} {train.index(pid)}")
                    counts[("test_" if is_test else "train_") + modal] += n
        (tmp / "idx").mkdir()
        for modal in LLCM_CAMS:
            (tmp / "idx" / f"train_{modal}.txt").write_text("\n".join(lines[modal]) + "\n")
        (tmp / "idx" / "test_id.txt").write_text(",".join(map(str, test)) + "\n")
        _commit_out(out, tmp, {"dataset": "llcm", "num_ids": num_ids, "seed": seed,
                               "imgs_per_cam": list(imgs_per_cam), "cam_prob": cam_prob,
                               "note": "synthetic data from tools/make_synthetic.py"})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"out": str(out), "ids": {"train": len(train), "test": len(test)},
            "splits": {"train": train, "test": test}, "images": counts,
            "seconds": time.time() - start}


# ----------------------------------------------------------------------------- an unlabelled folder
FOLDER_LAYOUT = {"rgb": ("day/cam_a", "day/cam_b", "dusk"), "ir": ("night/cam_a", "night/cam_c")}
FOLDER_FORMATS = ("jpg", "png", "bmp")


def make_folder(out_dir, num_ids=30, seed=0, imgs_per_id=(2, 5), heights=(100, 160),
                widths=(50, 80), quality=90):
    """Write an UNLABELLED set of person crops into ``out_dir``, the layout ``--dataset
    folder`` reads: ``rgb/`` and ``ir/`` with sub-folders of several depths, jpg, png and bmp
    files named by frame (no identity, camera or split in any name), and one non-image file
    that the reader must ignore. ``num_ids`` people are rendered, each into ``imgs_per_id``
    (inclusive range) images per modality. Returns a summary dict."""
    _check_seed(seed)
    if num_ids < 1:
        raise UserError(f"--num_ids must be at least 1, got {num_ids}")
    lo, hi = _check_range(imgs_per_id)
    start = time.time()
    out, tmp = _prepare_out(out_dir)
    try:
        counts = {"rgb": 0, "ir": 0}
        frame = np.random.default_rng([seed, 7]).permutation(100000)   # names carry no identity
        for person in range(num_ids):
            g = make_identity(np.random.default_rng([seed, person]))
            prng = np.random.default_rng([seed, person, 1])
            for modality, folders in FOLDER_LAYOUT.items():
                for _ in range(int(prng.integers(lo, hi + 1))):
                    h, w = _image_size(prng, heights, widths)
                    img = _to_uint8(render(g, h, w, prng, modality))
                    folder = tmp / modality / folders[int(prng.integers(len(folders)))]
                    folder.mkdir(parents=True, exist_ok=True)
                    ext = FOLDER_FORMATS[int(prng.integers(len(FOLDER_FORMATS)))]
                    name = folder / f"frame_{int(frame[sum(counts.values())]):05d}.{ext}"
                    pil = Image.fromarray(img, "L" if modality == "ir" else "RGB")
                    pil.save(name, **({"quality": quality} if ext == "jpg" else {}))
                    counts[modality] += 1
        (tmp / "rgb" / "notes.txt").write_text("not an image: the reader skips it\n")
        _commit_out(out, tmp, {"dataset": "folder", "num_ids": num_ids, "seed": seed,
                               "imgs_per_id": list(imgs_per_id),
                               "note": "synthetic data from tools/make_synthetic.py"})
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"out": str(out), "images": counts, "seconds": time.time() - start}


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    p = ArgumentParser(description="Write a synthetic SYSU-MM01, RegDB and/or LLCM in the "
                                            "real layouts (for the quick start and the tests).")
    p.add_argument("--dataset", default="sysu", choices=["sysu", "regdb", "llcm", "folder", "both", "all"],
                   help="both = sysu + regdb; all = sysu + regdb + llcm; folder = unlabelled "
                        "rgb/ and ir/ crops (for train.py --dataset folder)")
    p.add_argument("--out", default=None,
                   help="output folder (default data/SYSU-MM01, data/RegDB or data/LLCM under the "
                        "repository root); with --dataset both or all, the PARENT folder of "
                        "SYSU-MM01/, RegDB/ (and LLCM/)")
    p.add_argument("--num_ids", type=int, default=None,
                   help="identities (default: sysu 40, regdb 20, llcm 30, folder 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imgs_per_cam", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="SYSU and LLCM: images per (id, camera), inclusive range "
                        "(default: sysu 3 6, llcm 1 3)")
    p.add_argument("--imgs_per_id", type=int, default=10, help="RegDB: images per id and modality")
    p.add_argument("--folder_imgs", type=int, nargs=2, default=(2, 5), metavar=("LO", "HI"),
                   help="folder: images per person and modality, inclusive range")
    args = p.parse_args(argv)

    parent = Path(args.out).expanduser().resolve() if args.out else REPO_ROOT / "data"
    several = args.dataset in ("both", "all")
    if args.dataset in ("sysu", "both", "all"):
        out = parent / "SYSU-MM01" if (several or not args.out) else parent
        r = make_sysu(out, num_ids=args.num_ids or 40, seed=args.seed,
                      imgs_per_cam=tuple(args.imgs_per_cam or (3, 6)))
        pc = r["per_cam"]
        print(f"wrote synthetic SYSU-MM01 to {r['out']} in {r['seconds']:.1f}s")
        print(f"  ids: {r['ids']['train']} train, {r['ids']['val']} val, {r['ids']['test']} test "
              f"(exp/train_id.txt, val_id.txt, test_id.txt)")
        print(f"  RGB images: {r['rgb']} (" + ", ".join(f"cam{c} {pc[c]}" for c in SYSU_RGB_CAMS) + ")")
        print(f"  IR images:  {r['ir']} (" + ", ".join(f"cam{c} {pc[c]}" for c in SYSU_IR_CAMS)
              + f"; {r['ir_grey']} stored as 1-channel grey)")
        print(f"  next: python pre_process_sysu.py --data_path {r['out']}")
    if args.dataset in ("regdb", "both", "all"):
        out = parent / "RegDB" if (several or not args.out) else parent
        r = make_regdb(out, num_ids=args.num_ids or 20, seed=args.seed, imgs_per_id=args.imgs_per_id)
        print(f"wrote synthetic RegDB to {r['out']} in {r['seconds']:.1f}s")
        print(f"  {r['ids']} ids x {args.imgs_per_id} images per modality (Visible/, Thermal/); "
              f"idx/ splits for trials 1..{r['trials']}")
    if args.dataset == "folder":
        out = parent if args.out else parent / "folder"
        r = make_folder(out, num_ids=args.num_ids or 30, seed=args.seed, imgs_per_id=tuple(args.folder_imgs))
        print(f"wrote an unlabelled RGB-IR folder to {r['out']} in {r['seconds']:.1f}s: "
              f"{r['images']['rgb']} images under rgb/, {r['images']['ir']} under ir/ (jpg, png, bmp)")
        print(f"  next: python pre_process_sysu.py --dataset folder --data_path {r['out']}")
    if args.dataset in ("llcm", "all"):
        out = parent / "LLCM" if (several or not args.out) else parent
        r = make_llcm(out, num_ids=args.num_ids or 30, seed=args.seed,
                      imgs_per_cam=tuple(args.imgs_per_cam or (1, 3)))
        n = r["images"]
        print(f"wrote synthetic LLCM to {r['out']} in {r['seconds']:.1f}s")
        print(f"  ids: {r['ids']['train']} train (idx/train_vis.txt, idx/train_nir.txt), "
              f"{r['ids']['test']} test (idx/test_id.txt)")
        print(f"  images: train {n['train_vis']} visible + {n['train_nir']} near-infrared; "
              f"test {n['test_vis']} visible (cam1..9) + {n['test_nir']} near-infrared "
              f"(cam1,2,4..9)")
        print(f"  next: python pre_process_sysu.py --dataset llcm --data_path {r['out']}")


if __name__ == "__main__":
    cli(main)
