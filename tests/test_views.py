"""View sampling follows COSETTLE_METHOD.md section 2 and 3, rule by rule."""
import math

import numpy as np
import pytest
import torch

from cosettle.pipeline.transforms import apply_view
from cosettle.pipeline.views import (
    View,
    sample_asy_offset,
    sample_crop,
    sample_frame_pair,
    sample_views,
    video_rng,
)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8, 13, 40, 300])
def test_frame_pair_gap_rule(n):
    rng = np.random.default_rng(1)
    pairs = np.array([sample_frame_pair(n, rng) for _ in range(4000)])
    a, b = pairs[:, 0], pairs[:, 1]
    gap = math.floor(0.15 * n)
    if n <= 4 or gap < 1:
        # independent uniform draws over every frame
        assert set(a) == set(range(n)) and set(b) == set(range(n))
        assert (a == b).mean() == pytest.approx(1 / n, abs=0.05)
    else:
        assert np.all(b - a == gap)
        # a uniform over [1, n - gap): both ends reached, nothing outside
        assert a.min() == 1 and a.max() == n - gap - 1
        lo, hi = 1, n - gap - 1
        assert a.mean() == pytest.approx((lo + hi) / 2, abs=0.05 * (hi - lo) + 0.05)


def test_crop_box_ranges():
    rng = np.random.default_rng(2)
    size = 224
    boxes = np.array([sample_crop(size, rng) for _ in range(5000)])
    top, left, h, w = boxes.T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= size) and np.all(left + w <= size)
    unclipped = (h < size) & (w < size)
    frac = h[unclipped] * w[unclipped] / size**2
    # rounding of w and h moves the area by at most about one row and one column
    assert frac.min() > 0.5 - 2 / size and frac.max() < 1.0 + 2 / size
    aspect = w[unclipped] / h[unclipped]
    assert aspect.min() > 0.75 - 0.02 and aspect.max() < 4 / 3 + 0.02
    # the log aspect ratio is uniform: about half the unclipped boxes are wider than tall
    assert np.mean(aspect > 1) == pytest.approx(0.5, abs=0.05)
    # top-left uniform over the valid range: the extremes occur
    assert (top == 0).any() and (top + h == size).any()


def test_asy_offsets_cover_the_window_range():
    rng = np.random.default_rng(3)
    offs = np.array([sample_asy_offset(14, 10.0, rng) for _ in range(20000)])
    assert offs.min() == 0 and offs.max() == 154 - 14


def test_views_are_reproducible_per_video():
    kw = dict(image_size=224, grid=14, asy_ratio=10.0)
    v1 = sample_views(50, 5, video_rng(0, "a/b.mp4"), **kw)
    v2 = sample_views(50, 5, video_rng(0, "a/b.mp4"), **kw)
    v3 = sample_views(50, 5, video_rng(0, "a/c.mp4"), **kw)
    v4 = sample_views(50, 5, video_rng(1, "a/b.mp4"), **kw)
    assert v1 == v2 and v1 != v3 and v1 != v4
    assert len({(v.frame_a, v.crop_top, v.asy_oy) for v in v1}) > 1  # views differ from each other


def _frames(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(2, 60, 80, 3), dtype=np.uint8)


def test_same_crop_and_flip_for_both_frames():
    fa, fb = _frames(0)
    view = View(0, 1, crop_top=30, crop_left=50, crop_h=120, crop_w=100, flip=True, asy_oy=0, asy_ox=0)
    pair = apply_view(np.stack([fa, fb]), view, 224)
    # frame b alone through the same view gives the second output: one crop and flip for both
    only_b = apply_view(np.stack([fb, fb]), view, 224)
    torch.testing.assert_close(pair[1], only_b[0])
    unflipped = apply_view(np.stack([fa, fb]), View(0, 1, 30, 50, 120, 100, False, 0, 0), 224)
    torch.testing.assert_close(pair, unflipped.flip(-1))


def test_apply_view_matches_direct_computation():
    fa, fb = _frames(1)
    view = View(0, 1, crop_top=10, crop_left=20, crop_h=150, crop_w=180, flip=False, asy_oy=0, asy_ox=0)
    out = apply_view(np.stack([fa, fb]), view, 224)
    x = torch.from_numpy(fa).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, (224, 224), mode="bilinear", antialias=True)
    x = x[:, :, 10:160, 20:200]
    x = torch.nn.functional.interpolate(x, (224, 224), mode="bicubic", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(out[:1], (x - mean) / std)
