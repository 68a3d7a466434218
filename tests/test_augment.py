"""DeviceAugment: the CPU path and the accelerator (gather) path give bit-identical
results for the same draws, and the augmentation matches the authors' transform
semantics (pad with black, crop back, flip, ImageNet normalisation)."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_loader import IMAGENET_MEAN, IMAGENET_STD, DeviceAugment, random_perms  # noqa: E402


def draws(b, h, w, aug, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = aug.pad
    oy = torch.randint(0, h + 2 * p - aug.img_h + 1, (b, 1), generator=g)
    ox = torch.randint(0, w + 2 * p - aug.img_w + 1, (b, 1), generator=g)
    flip = torch.rand(b, 1, generator=g) < 0.5
    src = None
    if k:
        sh = aug.img_h // k
        src = random_perms(b, k, generator=g).repeat_interleave(sh, dim=1) * sh + torch.arange(sh).repeat(k)
    return oy, ox, flip, src


def test_cpu_and_gather_paths_are_bit_identical():
    aug = DeviceAugment(24, 12, pad=3)
    x = torch.randint(0, 256, (16, 24, 12, 3), dtype=torch.uint8)
    for k in (None, 3, 6):
        args = draws(16, 24, 12, aug, k)
        assert torch.equal(aug._crop_cpu(x, 3, *args), aug._crop_gather(x, 3, *args))


def test_augmentation_semantics_on_a_known_image():
    """Pad 2, crop offset (0, 0), no flip: the top-left 2-pixel border is black, i.e. -mean/std
    after normalisation, and the rest is the image shifted by 2 pixels."""
    aug = DeviceAugment(8, 4, pad=2)
    x = torch.randint(0, 256, (1, 8, 4, 3), dtype=torch.uint8)
    zero = torch.zeros(1, 1, dtype=torch.long)
    out = aug._crop_cpu(x, 2, zero, zero, torch.zeros(1, 1, dtype=torch.bool), None)[0]
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), -mean / std, rtol=1e-5)
    expect = (x[0, :6, :2].numpy() / 255.0 - mean) / std
    np.testing.assert_allclose(out[:, 2:, 2:].permute(1, 2, 0).numpy(), expect, rtol=1e-5, atol=1e-5)
    flipped = aug._crop_cpu(x, 2, zero, zero, torch.ones(1, 1, dtype=torch.bool), None)[0]
    assert torch.equal(flipped, out.flip(2))


def test_train_mode_randomness_and_shapes():
    aug = DeviceAugment(32, 16)
    x = torch.randint(0, 256, (8, 32, 16, 3), dtype=torch.uint8)
    torch.manual_seed(1)
    a = aug(x, train=True)
    torch.manual_seed(1)
    b = aug(x, train=True)
    torch.manual_seed(2)
    c = aug(x, train=True)
    assert a.shape == (8, 3, 32, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
