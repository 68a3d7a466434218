"""Rank-list visualisation (``--visrank K`` on the test scripts): for a few queries, the
query image followed by its top-K gallery images, each framed green (same identity) or red
(wrong identity) and captioned (rank, identity, camera, distance), with a one-line legend,
as PNG files and TensorBoard images."""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_loader import decode_image

GREEN, RED, GREY = (0, 170, 0), (215, 0, 0), (128, 128, 128)
THUMB_H, THUMB_W, BORDER, GAP = 128, 64, 4, 8
CAPTION_H, LEGEND_H = 40, 16   # three caption lines under each image, one legend line
LEGEND = "green: same id as the query, red: other id; d: ranking distance (lower first)"


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


def rank_list_image(q_path, g_paths, correct, q_caption=(), g_captions=None):
    """One row: the query (grey frame), a gap, then the gallery images in rank order; under
    each image its caption lines (``q_caption``, ``g_captions[i]``), and the legend below."""
    cell_w = THUMB_W + 2 * BORDER
    width = max(cell_w * (len(g_paths) + 1) + GAP * len(g_paths) + GAP, 6 * len(LEGEND))
    frame_h = THUMB_H + 2 * BORDER
    row = Image.new("RGB", (width, frame_h + CAPTION_H + LEGEND_H), (255, 255, 255))
    draw, font = ImageDraw.Draw(row), ImageFont.load_default()
    g_captions = g_captions or [()] * len(g_paths)
    cells = [(0, _framed(q_path, GREY), q_caption)]
    cells += [(cell_w + 2 * GAP + i * (cell_w + GAP), _framed(p, GREEN if ok else RED), cap)
              for i, (p, ok, cap) in enumerate(zip(g_paths, correct, g_captions))]
    for x, img, caption in cells:
        row.paste(img, (x, 0))
        for j, line in enumerate(caption):
            draw.text((x + 1, frame_h + 1 + 12 * j), line, fill=(0, 0, 0), font=font)
    draw.text((1, frame_h + CAPTION_H + 2), LEGEND, fill=(60, 60, 60), font=font)
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
        captions = [(f"rank {r + 1}", f"id {int(g_pids[j])} cam {int(g_cams[j])}", f"d {distmat[qi, j]:.3f}")
                    for r, j in enumerate(order)]
        img = rank_list_image(q_paths[qi], [g_paths[j] for j in order], correct,
                              ("query", f"id {int(q_pids[qi])} cam {int(q_cams[qi])}"), captions)
        path = out_dir / f"q{qi:05d}_id{int(q_pids[qi])}.png"
        img.save(path)
        written.append(path)
        if writer is not None:
            writer.add_image(f"{tag}/q{qi:05d}", np.asarray(img).transpose(2, 0, 1), step)
    return written
