"""Turn the SYSU-MM01 (or LLCM, or an unlabelled image folder's) training images into the
memory-mapped arrays training reads.

    python pre_process_sysu.py --data_path data/SYSU-MM01 [--workers 8] [--skip-bad]
    python pre_process_sysu.py --dataset llcm --data_path data/LLCM
    python pre_process_sysu.py --dataset folder --data_path DIR [--heldout 0.1]

An image folder (your own unlabelled RGB and IR crops): every jpg/png/bmp under DIR/rgb/
and DIR/ir/, at any depth, in sorted path order. A seeded fraction of each modality
(--heldout, default 10%, at least one image) is set aside for the held-out permutation
accuracy and listed in DIR/heldout_rgb.txt and DIR/heldout_ir.txt; the arrays hold the
rest, with label -1 (no identities) and camera 0.

LLCM: the images listed in idx/train_vis.txt and idx/train_nir.txt, in file order, with the
labels written there (the DEEN authors' loader uses them as they are); the camera number is
read from the file name (<pid>_c<cc>_...), 0 where the name holds none.

Training ids = exp/train_id.txt + exp/val_id.txt (the published protocol trains on both).
For each id in sorted order, each camera (RGB 1,2,4,5; IR 3,6) and each file in sorted
order, the image is converted to RGB and resized to 144 x 288 (w x h) with LANCZOS. Ids
are relabelled 0..N-1 in sorted pid order, the same label in both modalities. Written into
the dataset folder:

    train_rgb_resized_img.npy  uint8 [N, 288, 144, 3]   train_ir_resized_img.npy
    train_rgb_resized_label.npy int64 [N]               train_ir_resized_label.npy
    train_rgb_resized_cam.npy   int64 [N] (1..6)        train_ir_resized_cam.npy

Decoding runs in a process pool; images stream into ``np.lib.format.open_memmap`` files
(never two copies in memory). Files are written under temporary names and renamed only
when BOTH modalities succeeded, so an interrupted or failed run never leaves a
half-written array for training to read. A corrupt or unreadable image is an error naming
it; ``--skip-bad`` leaves such images out and reports them.
"""
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np

from cli import ArgumentParser, UserError, cli, resolve_path
from data_loader import iter_decoded
from data_manager import (FOLDER_HELDOUT, SYSU_IR_CAMS, SYSU_RGB_CAMS, folder_root, list_folder_images,
                          list_sysu_images, llcm_root, read_llcm_train, sysu_root, sysu_split_ids)
from logger import progress

MODALITIES = (("rgb", SYSU_RGB_CAMS["all"]), ("ir", SYSU_IR_CAMS))


def _tmp_name(path):
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale_tmps(root):
    """Remove the temporary files (``.<output>.tmp<pid>``) that a preprocessing killed
    mid-write (SIGKILL, power loss) left in ``root``, unless their process still runs.
    Returns the removed paths."""
    removed = []
    for t in sorted(Path(root).glob(".*.tmp[0-9]*")):
        m = re.fullmatch(r"\.(train_(rgb|ir)_resized_(img|label|cam)\.npy|heldout_(rgb|ir)\.txt)\.tmp(\d+)", t.name)
        if not m or Path(f"/proc/{m.group(5)}").exists():
            continue
        t.unlink()
        removed.append(t)
    return removed


def _npy_header(n, img_h, img_w):
    """A .npy (format 1.0) header for uint8 [n, img_h, img_w, 3], padded to a fixed 128
    bytes so it can be rewritten in place with another n."""
    d = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d, %d, %d, 3), }" % (n, img_h, img_w)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + (d.ljust(117) + "\n").encode("latin1")


def _decode_into_file(paths, tmp, workers, img_w, img_h, desc):
    """Decode ``paths`` into the .npy file ``tmp``, which ends up holding exactly the good
    images in order. -> (kept indices, [error messages of the bad ones]).

    Plain sequential writes, not a memory map: a disk that fills up mid-way is then an
    OSError (cleaned up by the caller), not a SIGBUS that kills the process."""
    kept, errors = [], []
    with open(tmp, "wb") as f:
        f.write(_npy_header(len(paths), img_h, img_w))
        for i, (img, err) in enumerate(progress(iter_decoded(paths, img_w, img_h, workers),
                                                total=len(paths), desc=desc)):
            if err is not None:
                errors.append(err)
                continue
            f.write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())   # compacted, in order
            kept.append(i)
        if len(kept) < len(paths):   # bad images left out: the header holds the true count
            f.seek(0)
            f.write(_npy_header(len(kept), img_h, img_w))
    return kept, errors


def preprocess_sysu(data_path, workers=0, skip_bad=False, img_w=144, img_h=288, verbose=True):
    """Write the six ``train_{rgb,ir}_resized_{img,label,cam}.npy`` files into
    ``data_path``; returns a statistics dict (ids, images and per-camera counts per
    modality, skipped files, written paths)."""
    root = sysu_root(data_path)
    ids = sysu_split_ids(root, "train", "val")
    lists = {}
    for mod, cams in MODALITIES:
        paths, pids, cams_ = list_sysu_images(root, ids, cams)
        if not paths:
            raise UserError(f"no {mod.upper()} training images for the train+val ids under "
                            + ", ".join(f"cam{c}/" for c in cams) + f" of {root}")
        lists[mod] = (paths, pids, cams_)
    return write_arrays(root, lists, workers, skip_bad, img_w, img_h, verbose, relabel=True,
                        title="SYSU-MM01 training set (train_id + val_id)", cam_sets=dict(MODALITIES),
                        listed_ids=len(ids))


def preprocess_llcm(data_path, workers=0, skip_bad=False, img_w=144, img_h=288, verbose=True):
    """The same arrays for LLCM's training lists (labels as written in idx/)."""
    root = llcm_root(data_path)
    lists = {}
    for mod, modal in (("rgb", "visible"), ("ir", "infrared")):
        paths, labels = read_llcm_train(root, modal)
        cams = [int(m.group(1)) if (m := re.search(r"_c(\d+)_", Path(p).name)) else 0 for p in paths]
        lists[mod] = (paths, list(labels), cams)
    listed = len(set(lists["rgb"][1]) | set(lists["ir"][1]))
    return write_arrays(root, lists, workers, skip_bad, img_w, img_h, verbose, relabel=False,
                        title="LLCM training set (idx/train_vis.txt + idx/train_nir.txt)",
                        cam_sets={m: sorted(set(v[2])) for m, v in lists.items()}, listed_ids=listed)


def split_heldout(paths, fraction, seed=0):
    """(training paths, held-out paths): a seeded ``fraction`` of ``paths`` held out, at
    least one image when fraction > 0, never all of them; both in sorted order."""
    n = len(paths)
    k = min(n - 1, max(1, int(round(n * fraction)))) if fraction > 0 else 0
    held = set(np.random.default_rng(seed).choice(n, k, replace=False).tolist()) if k else set()
    return ([p for i, p in enumerate(paths) if i not in held],
            [p for i, p in enumerate(paths) if i in held])


def preprocess_folder(data_path, workers=0, skip_bad=False, img_w=144, img_h=288, verbose=True,
                      heldout=0.1):
    """The arrays for an unlabelled folder (rgb/ and ir/ at any depth), minus a seeded
    held-out fraction listed in heldout_{rgb,ir}.txt. Held-out images are decoded once
    here too, so a corrupt one follows the same --skip-bad rule as a training image."""
    if not 0 <= heldout < 1:
        raise UserError(f"--heldout must be in [0, 1), got {heldout}")
    root = folder_root(data_path)
    lists, held, bad = {}, {}, []
    for m, paths in list_folder_images(root).items():
        train, held[m] = split_heldout(paths, heldout, seed={"rgb": 0, "ir": 1}[m])
        lists[m] = (train, [-1] * len(train), [0] * len(train))
        for path, (_, err) in zip(list(held[m]), iter_decoded(held[m], img_w, img_h, workers)):
            if err is not None:
                bad.append(err)
                held[m].remove(path)
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{bad[0]}{more}; nothing was written; fix or remove the file(s), or pass "
                        f"--skip-bad to leave them out")
    stats = write_arrays(root, lists, workers, skip_bad, img_w, img_h, False, relabel=False,
                         title=f"image folder {root.name}/ (unlabelled)", cam_sets={"rgb": [0], "ir": [0]},
                         listed_ids=1)
    for m, name in FOLDER_HELDOUT.items():   # after the arrays: a failed run leaves the old pair
        tmp = _tmp_name(root / name)
        tmp.write_text("".join(f"{Path(p).relative_to(root).as_posix()}\n" for p in held[m]))
        os.replace(tmp, root / name)
        stats["files"].append(str(root / name))
    stats.update(unlabelled=True, heldout={m: len(v) for m, v in held.items()})
    stats["skipped"] += bad
    if verbose:
        print_stats(stats)
    return stats


def write_arrays(root, lists, workers, skip_bad, img_w, img_h, verbose, relabel, title, cam_sets,
                 listed_ids):
    """Decode ``lists`` ({'rgb'|'ir': (paths, ids, cams)}) into the six arrays in ``root``;
    ``cam_sets``: {modality: its camera numbers} for the statistics.
    ``relabel``: labels 0..N-1 in sorted id order over the ids that kept an image (SYSU);
    otherwise the ids are the labels (LLCM's files hold them)."""
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    stale = remove_stale_tmps(root)
    if stale and verbose:
        print(f"removed {len(stale)} temporary file(s) of an interrupted preprocessing: "
              + ", ".join(t.name for t in stale))
    # the arrays' size is known: refuse up front rather than die mid-write on a full disk
    need = sum(len(v[0]) for v in lists.values()) * (img_h * img_w * 3 + 16) + 2**20
    free = shutil.disk_usage(root).free
    if free < need:
        raise UserError(f"not enough free space in {root}: the arrays need {need / 2**20:.0f} MiB, "
                        f"{free / 2**20:.0f} MiB are free; nothing was written")
    tmps, outputs, errors, stats = [], {}, [], {"data_path": str(root), "skipped": [], "removed_stale": stale}
    try:
        for mod, _ in MODALITIES:
            paths, pids, cams = lists[mod]
            dest = root / f"train_{mod}_resized_img.npy"
            tmp = _tmp_name(dest)
            tmps.append(tmp)
            kept, errs = _decode_into_file(paths, tmp, workers, img_w, img_h, f"{mod.upper()} images")
            errors += errs
            outputs[mod] = (tmp, dest, [pids[i] for i in kept], [cams[i] for i in kept])
        if errors:
            stats["skipped"] = errors
            if not skip_bad:
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                raise UserError(f"{errors[0]}{more}; nothing was written; fix or remove the "
                                f"file(s), or pass --skip-bad to leave them out")

        # Relabel over the ids that kept at least one image (sorted pid order, shared by
        # both modalities, so label k is the same person in RGB and IR).
        kept_ids = sorted(set(outputs["rgb"][2]) | set(outputs["ir"][2]))
        pid2label = {pid: (k if relabel else pid) for k, pid in enumerate(kept_ids)}
        written = []
        for mod, _ in MODALITIES:
            tmp, dest, pids, cams = outputs[mod]
            for key, values in (("label", [pid2label[p] for p in pids]), ("cam", cams)):
                f = root / f"train_{mod}_resized_{key}.npy"
                t = _tmp_name(f)
                tmps.append(t)
                with open(t, "wb") as fh:
                    np.save(fh, np.asarray(values, dtype=np.int64))
        for mod, _ in MODALITIES:
            tmp, dest, pids, cams = outputs[mod]
            for f in (dest, root / f"train_{mod}_resized_label.npy",
                      root / f"train_{mod}_resized_cam.npy"):
                os.replace(tmp if f == dest else _tmp_name(f), f)
                written.append(str(f))
    except OSError as e:   # a full disk or an I/O error mid-way: one line, no temp file left
        raise UserError(f"cannot write the arrays into {root} ({e.strerror or e}); "
                        f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there; nothing was "
                        f"written") from None
    finally:
        for t in tmps:
            if t.exists():
                t.unlink()

    stats.update(num_ids=len(kept_ids), listed_ids=listed_ids, files=written,
                 img_size=(img_h, img_w), title=title,
                 cams=sorted(set().union(*map(set, cam_sets.values()))))
    for mod, _ in MODALITIES:
        _, _, pids, cs = outputs[mod]
        stats[mod] = {"images": len(pids), "ids": len(set(pids)),
                      "per_cam": {c: int(sum(1 for x in cs if x == c)) for c in cam_sets[mod]}}
    # ids with images in only one modality (never in the real split; worth a warning)
    stats["missing_modality"] = {mod: sorted(set(kept_ids) - set(outputs[mod][2]))
                                 for mod, _ in MODALITIES}
    if verbose:
        print_stats(stats)
    return stats


def print_stats(stats):
    root = stats["data_path"]
    print(f"wrote into {root}:")
    for f in stats["files"]:
        print(f"  {Path(f).name}")
    h, w = stats["img_size"]
    if stats.get("unlabelled"):
        print(f"{stats['title']}: images {w}x{h} (w x h); training RGB {stats['rgb']['images']}, "
              f"IR {stats['ir']['images']}; held out for the permutation accuracy (never trained "
              f"on): RGB {stats['heldout']['rgb']}, IR {stats['heldout']['ir']}")
        _print_skipped(stats["skipped"])
        return
    print(f"{stats['title']}: {stats['num_ids']} identities, images {w}x{h} (w x h)")
    cams = stats["cams"]
    print(f"  {'modality':<9}{'ids':>6}{'images':>8}" + "".join(f"{'cam' + str(c):>7}" for c in cams))
    for mod in ("rgb", "ir"):
        s = stats[mod]
        print(f"  {mod.upper():<9}{s['ids']:>6}{s['images']:>8}"
              + "".join(f"{s['per_cam'].get(c, '-'):>7}" for c in cams))
    if stats["listed_ids"] != stats["num_ids"]:
        print(f"warning: {stats['listed_ids'] - stats['num_ids']} listed train/val ids have no images")
    for mod, missing in stats["missing_modality"].items():
        if missing:
            print(f"warning: {len(missing)} ids have no {mod.upper()} image: {missing[:10]}")
    _print_skipped(stats["skipped"])


def _print_skipped(skipped):
    if skipped:
        n = len(skipped)
        print(f"skipped {n} unreadable image{'s' if n > 1 else ''}:")
        for e in skipped:
            print(f"  {e}")


def main(argv=None):
    p = ArgumentParser(description="Resize the SYSU-MM01 training images (train_id + "
                                            "val_id) into memory-mappable .npy arrays.")
    p.add_argument("--dataset", default="sysu", choices=("sysu", "llcm", "folder"),
                   help="which training set (folder: unlabelled images under DIR/rgb/ and DIR/ir/)")
    p.add_argument("--data_path", default=None,
                   help="dataset folder (default: data/SYSU-MM01 or data/LLCM under the repository "
                        "root; --dataset folder needs it)")
    p.add_argument("--heldout", type=float, default=0.1,
                   help="folder: seeded fraction of each modality set aside for the held-out "
                        "permutation accuracy (at least one image)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (0 = in this process; default min(8, CPUs))")
    p.add_argument("--skip-bad", "--skip_bad", dest="skip_bad", action="store_true",
                   help="leave unreadable/corrupt images out (reported) instead of stopping")
    p.add_argument("--img_h", type=int, default=288,
                   help="stored height (the published protocol: 288; smaller only for CPU demos)")
    p.add_argument("--img_w", type=int, default=144, help="stored width (published: 144)")
    args = p.parse_args(argv)
    if args.img_h < 16 or args.img_w < 8:
        raise UserError(f"--img_h/--img_w too small: {args.img_h}x{args.img_w}")
    common = dict(workers=args.workers, skip_bad=args.skip_bad, img_w=args.img_w, img_h=args.img_h)
    if args.dataset == "folder":
        if not args.data_path:
            raise UserError("--dataset folder needs --data_path DIR (a folder with rgb/ and ir/)")
        preprocess_folder(resolve_path(args.data_path), heldout=args.heldout, **common)
        return
    run, default = {"sysu": (preprocess_sysu, "data/SYSU-MM01"), "llcm": (preprocess_llcm, "data/LLCM")}[args.dataset]
    run(resolve_path(args.data_path, default), **common)


if __name__ == "__main__":
    cli(main)
