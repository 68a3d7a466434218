"""Rank-list PNGs: size, frame colours by identity, SYSU camera rule."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visrank  # noqa: E402
from visrank import BORDER, GAP, GREEN, GREY, RED, THUMB_H, THUMB_W  # noqa: E402


def make_images(tmp, n, colour):
    paths = []
    for i in range(n):
        p = tmp / f"{colour[0]}_{i}.jpg"
        Image.new("RGB", (40 + i, 90), colour).save(p)
        paths.append(str(p))
    return paths


def frame_colour(img, cell):
    """Colour of the top-left frame pixel of cell ``cell`` (0 = query)."""
    cell_w = THUMB_W + 2 * BORDER
    x = 0 if cell == 0 else cell_w + 2 * GAP + (cell - 1) * (cell_w + GAP)
    return tuple(img.getpixel((x + 1, 1)))


def test_rank_list_png_size_and_frames(tmp_path):
    q_paths = make_images(tmp_path, 2, (0, 0, 255))
    g_paths = make_images(tmp_path, 5, (255, 255, 0))
    q_pids, q_cams = np.array([7, 8]), np.array([3, 6])
    g_pids, g_cams = np.array([7, 9, 7, 8, 9]), np.array([2, 1, 4, 5, 2])
    # query 0 (cam 3): nearest are g0 (cam 2: not ranked), g1 (wrong id), g2 (right id), ...
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                     [0.5, 0.4, 0.3, 0.1, 0.2]])
    out = visrank.save_rank_lists(tmp_path / "vis", dist, q_paths, q_pids, q_cams, g_paths, g_pids,
                                  g_cams, k=3, num_queries=2)
    assert [p.name for p in out] == ["q00000_id7.png", "q00001_id8.png"]
    img0 = Image.open(out[0]).convert("RGB")
    cell_w = THUMB_W + 2 * BORDER
    assert img0.size == (max(4 * cell_w + 3 * GAP + GAP, 6 * len(visrank.LEGEND)),
                         THUMB_H + 2 * BORDER + visrank.CAPTION_H + visrank.LEGEND_H)
    # captions and legend: dark text pixels under the images, none in a blank cell region
    band = np.asarray(img0)[THUMB_H + 2 * BORDER:]
    assert (band.min(axis=2) < 100).sum() > 100
    assert (np.asarray(img0)[THUMB_H + 2 * BORDER:, -20:].min() > 200)   # right margin stays white
    # query 0 (cam 3): g0 and g4 (cam 2) dropped -> g1 (id 9, red), g2 (id 7, green), g3 (id 8, red)
    assert [frame_colour(img0, c) for c in range(4)] == [GREY, RED, GREEN, RED]
    # the thumbnails are the images: the query cell's centre is the query's blue
    assert img0.getpixel((BORDER + THUMB_W // 2, BORDER + THUMB_H // 2))[2] > 200
    # query 1 (cam 6): every camera ranked -> g3 (id 8, green), g4 (id 9, red), g2 (id 7, red)
    img1 = Image.open(out[1]).convert("RGB")
    assert [frame_colour(img1, c) for c in range(1, 4)] == [GREEN, RED, RED]
