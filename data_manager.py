"""The evaluation protocols' file lists, as in the AGW authors' ``data_manager.py``:
SYSU-MM01 queries and gallery draws (``process_query_sysu``, ``process_gallery_sysu``),
RegDB's idx files (``process_test_regdb``), LLCM's query/gallery draws, the training lists
of RegDB and LLCM, and the folder layout of your own images. Paths, identities and cameras
only: images are decoded in ``data_loader.py``.

The SYSU-MM01 gallery is drawn exactly as the published protocol does: the Python
``random`` stream seeded by the trial number, one ``choice`` per (test id, RGB camera) in
sorted-id / camera-list order. Reproducing that draw order is what makes "trial t" the
same gallery that every published SYSU-MM01 number was measured on. The LLCM gallery is
drawn by the same routine: its authors reused the SYSU-MM01 protocol code.
"""
import os
import random
from pathlib import Path

import numpy as np

from cli import UserError, choice_check

SYSU_RGB_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
SYSU_IR_CAMS = (3, 6)
SYSU_LAYOUT = ("expected SYSU-MM01 with cam1..cam6/<pid:04d>/<n:04d>.jpg and "
               "exp/train_id.txt, exp/val_id.txt, exp/test_id.txt; "
               "make a synthetic one with: python tools/make_synthetic.py --dataset sysu")
REGDB_LAYOUT = ("expected RegDB with Visible/, Thermal/ and idx/{train,test}_{visible,thermal}"
                "_<trial>.txt; make a synthetic one with: python tools/make_synthetic.py "
                "--dataset regdb")
LLCM_CAMS = {"vis": (1, 2, 3, 4, 5, 6, 7, 8, 9), "nir": (1, 2, 4, 5, 6, 7, 8, 9)}
LLCM_DIRECTIONS = ("vis2ir", "ir2vis")
LLCM_LAYOUT = ("expected LLCM with idx/train_vis.txt, idx/train_nir.txt, idx/test_id.txt, "
               "test_vis/cam1..cam9/<pid:04d>/ and test_nir/cam1,2,4..9/<pid:04d>/; make a "
               "synthetic one with: python tools/make_synthetic.py --dataset llcm")


# ----------------------------------------------------------------------------- SYSU-MM01
def sysu_root(data_path):
    """The dataset folder as a Path; a clear error when it is not a SYSU-MM01 folder."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root} ({SYSU_LAYOUT})")
    if not any((root / f"cam{c}").is_dir() for c in range(1, 7)):
        raise UserError(f"no cam1..cam6/ folders in {root} ({SYSU_LAYOUT})")
    return root


def read_ids(path):
    """Identity numbers of a SYSU split file (``exp/train_id.txt`` ...): one line of
    comma-separated integers, kept in file order. Tolerates a trailing newline/comma and
    whitespace; anything else non-numeric is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path} ({SYSU_LAYOUT})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read split file {path}: {e}")
    tokens = [t for t in text.replace("\n", ",").replace("\r", ",").split(",") if t.strip()]
    ids = []
    for t in tokens:
        try:
            ids.append(int(t))
        except ValueError:
            raise UserError(f"garbled split file {path}: {t.strip()[:40]!r} is not an integer "
                            f"id (expected one comma-separated line such as 1,2,5,7)") from None
    if not ids:
        raise UserError(f"split file {path} holds no ids (expected one comma-separated line "
                        f"such as 1,2,5,7)")
    return ids


def sysu_split_ids(root, *splits):
    """Sorted unique ids of the named splits ('train', 'val', 'test')."""
    ids = set()
    for s in splits:
        ids.update(read_ids(Path(root) / "exp" / f"{s}_id.txt"))
    return sorted(ids)


def _sysu_folders(root, ids, cams):
    """[(pid, cam, sorted file paths)] for each id (in the given order) and camera (in the
    given order) whose folder exists; the order every SYSU list is built in."""
    out = []
    for pid in ids:
        for cam in cams:
            folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
            if os.path.isdir(folder):
                files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
                out.append((pid, cam, files))
    return out


def list_sysu_images(root, ids, cams):
    """Every image of ``ids`` (sorted) in ``cams``: (paths, pids, cams) as python lists."""
    paths, pids, cs = [], [], []
    for pid, cam, files in _sysu_folders(root, sorted(ids), cams):
        paths += files
        pids += [pid] * len(files)
        cs += [cam] * len(files)
    return paths, pids, cs


def _triple(paths, pids, cams):
    return list(paths), np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64)


def process_query_sysu(data_path, mode="all"):
    """SYSU-MM01 queries: every image of IR cameras 3 and 6 of the test ids, in BOTH modes
    (indoor mode changes only the gallery). -> (paths, pids int64, cams int64)."""
    choice_check("--mode", mode, tuple(SYSU_RGB_CAMS))
    root = sysu_root(data_path)
    return _triple(*list_sysu_images(root, sysu_split_ids(root, "test"), SYSU_IR_CAMS))


def _draw_gallery(folders, trial, gall_mode):
    """One gallery trial from the (pid, cam, files) folders.

    The reference protocol calls ``random.seed(trial)`` and then ``random.choice``. A
    private ``random.Random(trial)`` is seeded by the same Mersenne-Twister routine and
    yields the identical stream, without resetting the caller's global ``random`` state.

    Multi-shot draws ``sample(files, 10)`` from that stream. A folder with fewer than 10
    files is taken whole WITHOUT consuming randomness (the reference code crashes there), so
    whenever the reference would not crash the draws are identical."""
    rng = random.Random(trial)
    paths, pids, cams = [], [], []
    for pid, cam, files in folders:
        if gall_mode == "single":
            chosen = [rng.choice(files)]
        elif len(files) >= 10:
            chosen = rng.sample(files, 10)
        else:
            chosen = list(files)
        paths += chosen
        pids += [pid] * len(chosen)
        cams += [cam] * len(chosen)
    return _triple(paths, pids, cams)


def _gallery_folders(data_path, mode):
    choice_check("--mode", mode, tuple(SYSU_RGB_CAMS))
    root = sysu_root(data_path)
    # Empty folders are skipped: the reference's random.choice would raise on them.
    return [f for f in _sysu_folders(root, sysu_split_ids(root, "test"), SYSU_RGB_CAMS[mode])
            if f[2]]


def process_gallery_sysu(data_path, mode="all", trial=0, gall_mode="single"):
    """SYSU-MM01 gallery of one trial: for each test id (sorted) and each RGB camera
    (all: 1,2,4,5; indoor: 1,2) whose folder exists, one random image of the sorted file
    list (single-shot) or 10 (multi-shot), drawn from ``random`` seeded by ``trial``.
    -> (paths, pids int64, cams int64) in draw order."""
    choice_check("gall_mode", gall_mode, ("single", "multi"))
    return _draw_gallery(_gallery_folders(data_path, mode), trial, gall_mode)


def sysu_gallery_trials(data_path, mode="all", gall_mode="single", trials=range(10)):
    """The union of the galleries of ``trials`` so each image's feature is extracted once.

    -> (paths sorted unique, pids, cams, [index per trial]) where ``paths[index[t]]`` is
    exactly trial t's gallery in :func:`process_gallery_sysu` order (that order decides
    ties in the ranking, so it is kept)."""
    choice_check("gall_mode", gall_mode, ("single", "multi"))
    folders = _gallery_folders(data_path, mode)
    return _union_of_trials([_draw_gallery(folders, t, gall_mode) for t in trials])


def _union_of_trials(draws):
    """(paths sorted unique, pids, cams, [index per trial]) of several gallery draws."""
    info = {}
    for paths, pids, cams in draws:
        info.update(zip(paths, zip(pids.tolist(), cams.tolist())))
    union = sorted(info)
    pos = {p: i for i, p in enumerate(union)}
    index = [np.array([pos[p] for p in paths], dtype=np.int64) for paths, _, _ in draws]
    pids = [info[p][0] for p in union]
    cams = [info[p][1] for p in union]
    return (*_triple(union, pids, cams), index)


# ----------------------------------------------------------------------------- RegDB
def _read_regdb_idx(data_path, split, trial, modal):
    choice_check("modal", modal, ("visible", "thermal"))
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root} ({REGDB_LAYOUT})")
    f = root / "idx" / f"{split}_{modal}_{trial}.txt"
    if not f.is_file():
        raise UserError(f"RegDB index file not found: {f} ({REGDB_LAYOUT})")
    return _read_image_list(root, f, "RegDB", "<Visible|Thermal>/<pid>/<file>.bmp <label>")


def _read_image_list(root, f, name, line_form):
    """The lines ``<path relative to root> <integer label>`` of an index file ->
    (absolute paths, labels int64), in file order; blank lines are skipped."""
    paths, labels = [], []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"garbled line {n} of {f}: {line.strip()[:80]!r} "
                            f"(expected '{line_form}')")
        paths.append(str(root / parts[0]))
        labels.append(int(parts[1]))
    if not paths:
        raise UserError(f"{name} index file {f} lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def process_test_regdb(data_path, trial=1, modal="visible"):
    """RegDB test images of one trial: ``idx/test_{modal}_{trial}.txt`` ->
    (absolute paths, labels int64)."""
    return _read_regdb_idx(data_path, "test", trial, modal)


def read_regdb_train(data_path, trial, modal):
    """RegDB training images of one trial: ``idx/train_{modal}_{trial}.txt`` ->
    (absolute paths, labels int64)."""
    return _read_regdb_idx(data_path, "train", trial, modal)


# ----------------------------------------------------------------------------- LLCM
# The low-light cross-modality benchmark of DEEN (Zhang & Wang, CVPR 2023). Its authors'
# test lists are SYSU-MM01's, pointed at test_vis/ and test_nir/, so the SYSU helpers
# above serve unchanged.
def llcm_direction(tvsearch):
    """The LLCM search direction selected by ``--tvsearch``, named as for RegDB: visible
    queries against a near-infrared gallery by default ('vis2ir'), near-infrared queries
    against a visible gallery with the flag ('ir2vis')."""
    return "ir2vis" if tvsearch else "vis2ir"


def _llcm_sides(direction):
    """(query modality, gallery modality) of a direction, as 'vis' / 'nir'."""
    choice_check("direction", direction, LLCM_DIRECTIONS)
    return ("vis", "nir") if direction == "vis2ir" else ("nir", "vis")


def llcm_root(data_path):
    """The dataset folder as a Path; a clear error when it does not exist."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root} ({LLCM_LAYOUT})")
    return root


def llcm_test_ids(data_path):
    """Sorted test identities of ``idx/test_id.txt`` (one comma-separated line, as in
    SYSU-MM01's split files)."""
    f = llcm_root(data_path) / "idx" / "test_id.txt"
    if not f.is_file():   # checked here so that the message names the LLCM layout
        raise UserError(f"LLCM split file not found: {f} ({LLCM_LAYOUT})")
    return sorted(set(read_ids(f)))


def _llcm_test_folders(data_path, modal):
    """[(pid, cam, sorted files)] of the test ids under ``test_<modal>/cam<k>/<pid:04d>/``,
    ids ascending outer, cameras ascending inner: the order of every LLCM test list.

    A test id absent from a camera is normal and skipped (the authors test ``isdir``); a
    camera folder that is missing or empty means a broken copy of the dataset."""
    root = llcm_root(data_path)
    ids = llcm_test_ids(root)
    base = root / f"test_{modal}"
    for cam in LLCM_CAMS[modal]:
        d = base / f"cam{cam}"
        if not d.is_dir():
            raise UserError(f"LLCM camera folder not found: {d} ({LLCM_LAYOUT})")
        if not any(d.iterdir()):
            raise UserError(f"LLCM camera folder {d} is empty ({LLCM_LAYOUT})")
    folders = _sysu_folders(base, ids, LLCM_CAMS[modal])
    if not any(files for _, _, files in folders):
        raise UserError(f"no image of the {len(ids)} ids of {root / 'idx' / 'test_id.txt'} "
                        f"under {base} ({LLCM_LAYOUT})")
    return folders


def process_query_llcm(data_path, direction="vis2ir"):
    """LLCM queries: EVERY test image of the query modality (visible for 'vis2ir',
    near-infrared for 'ir2vis') in test-id then camera order (visible cameras 1..9,
    near-infrared 1,2,4..9: LLCM has no near-infrared camera 3), files sorted by name.
    The camera number is that of the ``cam<k>`` folder; both modalities share the numbers
    (each LLCM camera records both). -> (paths, pids int64, cams int64)."""
    paths, pids, cams = [], [], []
    for pid, cam, files in _llcm_test_folders(data_path, _llcm_sides(direction)[0]):
        paths += files
        pids += [pid] * len(files)
        cams += [cam] * len(files)
    return _triple(paths, pids, cams)


def _llcm_gallery_folders(data_path, direction):
    # Empty id folders are skipped: the reference's random.choice would raise on them.
    return [f for f in _llcm_test_folders(data_path, _llcm_sides(direction)[1]) if f[2]]


def process_gallery_llcm(data_path, direction="vis2ir", trial=0):
    """LLCM gallery of one trial: for each test id (ascending) and each camera of the
    gallery modality (near-infrared for 'vis2ir', visible for 'ir2vis') holding that id,
    one image of the sorted file list, chosen by ``random`` seeded with ``trial``: the
    DEEN authors' draw, which their test script repeats for trials 0..9.
    -> (paths, pids int64, cams int64) in draw order."""
    return _draw_gallery(_llcm_gallery_folders(data_path, direction), trial, "single")


def llcm_gallery_trials(data_path, direction="vis2ir", trials=range(10)):
    """The union of the LLCM galleries of ``trials`` so each image's feature is extracted
    once: (paths sorted unique, pids, cams, [index per trial]) with ``paths[index[t]]``
    exactly trial t's gallery in :func:`process_gallery_llcm` order."""
    folders = _llcm_gallery_folders(data_path, direction)
    return _union_of_trials([_draw_gallery(folders, t, "single") for t in trials])


def read_llcm_train(data_path, modal):
    """LLCM training images of one modality: ``idx/train_vis.txt`` ('visible') or
    ``idx/train_nir.txt`` ('infrared'), lines ``<vis|nir>/<pid:04d>/<file>.jpg <label>``
    -> (absolute paths, labels int64) in file order.

    Labels are used as written, as the authors' loader does: it neither relabels nor
    reorders them (its classifier has one output per training identity, 713), so the
    files number the training identities from 0."""
    choice_check("modal", modal, ("visible", "infrared"))
    root = llcm_root(data_path)
    f = root / "idx" / ("train_vis.txt" if modal == "visible" else "train_nir.txt")
    if not f.is_file():
        raise UserError(f"LLCM index file not found: {f} ({LLCM_LAYOUT})")
    return _read_image_list(root, f, "LLCM", "<vis|nir>/<pid:04d>/<file>.jpg <label>")


# ----------------------------------------------------------------------------- an image folder
FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FOLDER_LAYOUT = ("expected a folder with rgb/ and ir/ sub-folders of images (any depth; "
                 "jpg, png or bmp); make a synthetic one with: python tools/make_synthetic.py "
                 "--dataset folder")
FOLDER_HELDOUT = {"rgb": "heldout_rgb.txt", "ir": "heldout_ir.txt"}


def folder_root(data_path):
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"folder not found: {root} ({FOLDER_LAYOUT})")
    return root


def list_folder_images(data_path):
    """{'rgb': sorted image paths under rgb/, 'ir': ... under ir/}: every file with an image
    suffix at any depth (other files are ignored). An empty or missing modality is an error:
    MMGL needs both."""
    root = folder_root(data_path)
    lists = {}
    for m in ("rgb", "ir"):
        sub = root / m
        paths = sorted(str(p) for p in sub.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES
                       and p.is_file()) if sub.is_dir() else []
        if not paths:
            raise UserError(f"no {m.upper()} images under {sub}: MMGL pre-trains on both "
                            f"modalities ({FOLDER_LAYOUT})")
        lists[m] = paths
    return lists


def read_folder_heldout(data_path):
    """The held-out images ``pre_process_sysu.py --dataset folder`` set aside (never in the
    training arrays): {'rgb': paths, 'ir': paths}."""
    root = folder_root(data_path)
    lists = {}
    for m, name in FOLDER_HELDOUT.items():
        f = root / name
        if not f.is_file():
            raise UserError(f"missing {f}; run: python pre_process_sysu.py --dataset folder "
                            f"--data_path {root}")
        lists[m] = [str(root / line) for line in f.read_text().splitlines() if line.strip()]
    return lists
