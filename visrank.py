"""Rank-list visualisation (``--visrank K`` on the test scripts): for a few queries, the
query image followed by its top-K gallery images, each framed green (same identity) or red
(wrong identity), as PNG files and TensorBoard images."""
from pathlib import Path

import numpy as np
from PIL import Image

from data_manager import decode_image

GREEN, RED, GREY = (0, 170, 0), (215, 0, 0), (128, 128, 128)
THUMB_H, THUMB_W, BORDER, GAP = 128, 64, 4, 8


def ranked_gallery(dist_row, q_cam, g_cams, sysu):
    """Gallery indices of one query by increasing distance (stable), with the SYSU camera
    rule applied: camera-2 items are not ranked for a camera-3 query."""
    order = np.argsort(dist_row, kind="stable")
    if sysu and q_cam == 3:
        order = order[g_cams[order] != 2]
    return order


def _framed(path, colour):
    img = decode_image(path, img_w=THUMB_W, img_h=THUMB_H)
    canvas = Image.new("RGB", (THUMB_W + 2 * BORDER, THUMB_H + 2 * BORDER), colour)
    canvas.paste(Image.fromarray(img), (BORDER, BORDER))
    return canvas


def rank_list_image(q_path, g_paths, correct):
    """One row: the query (grey frame), a gap, then the gallery images in rank order."""
    cell_w = THUMB_W + 2 * BORDER
    width = cell_w * (len(g_paths) + 1) + GAP * len(g_paths) + GAP
    row = Image.new("RGB", (width, THUMB_H + 2 * BORDER), (255, 255, 255))
    row.paste(_framed(q_path, GREY), (0, 0))
    for i, (path, ok) in enumerate(zip(g_paths, correct)):
        row.paste(_framed(path, GREEN if ok else RED), (cell_w + 2 * GAP + i * (cell_w + GAP), 0))
    return row


def save_rank_lists(out_dir, distmat, q_paths, q_pids, q_cams, g_paths, g_pids, g_cams, k,
                    sysu=True, num_queries=8, writer=None, tag="visrank", step=0):
    """Write ``num_queries`` rank lists (queries spread evenly over the query list) as
    ``<out_dir>/q<index>_id<pid>.png``; also to TensorBoard when ``writer`` is given.
    Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g_paths, g_pids, g_cams = list(g_paths), np.asarray(g_pids), np.asarray(g_cams)
    picks = np.unique(np.linspace(0, len(q_paths) - 1, min(num_queries, len(q_paths))).astype(int))
    written = []
    for qi in picks:
        order = ranked_gallery(distmat[qi], q_cams[qi], g_cams, sysu)[:k]
        correct = g_pids[order] == q_pids[qi]
        img = rank_list_image(q_paths[qi], [g_paths[j] for j in order], correct)
        path = out_dir / f"q{qi:05d}_id{int(q_pids[qi])}.png"
        img.save(path)
        written.append(path)
        if writer is not None:
            writer.add_image(f"{tag}/q{qi:05d}", np.asarray(img).transpose(2, 0, 1), step)
    return written
