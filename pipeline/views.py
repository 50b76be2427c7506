"""Sampling of training views: frame pair, shared crop, flip and asymmetric offset.

Follows COSETTLE_METHOD.md sections 2 and 3 exactly. Each video draws its views from its own
generator, keyed by the run seed and the video's relative path, so a view never depends on which
shard or which resumed run drew it.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np

CLIP_GAP = 0.15
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class View:
    """One training sample of a video: what the extractor computes A, B and A_asy from."""

    frame_a: int
    frame_b: int
    crop_top: int
    crop_left: int
    crop_h: int
    crop_w: int
    flip: bool
    asy_oy: int
    asy_ox: int

    def as_row(self) -> dict:
        return asdict(self)


def video_rng(seed: int, video_key: str) -> np.random.Generator:
    """The generator a video's views are drawn from (stable across shards and runs)."""
    return np.random.default_rng([seed, zlib.crc32(video_key.encode("utf-8"))])


def sample_frame_pair(n: int, rng: np.random.Generator, clip_gap: float = CLIP_GAP) -> tuple[int, int]:
    """Frame indices (a, b): b = a + int(clip_gap * n), or two independent draws for short clips."""
    gap = int(clip_gap * n)
    if n <= 4 or gap < 1:
        return int(rng.integers(0, n)), int(rng.integers(0, n))
    a = int(rng.integers(1, n - gap))  # the release reads a - 1 too, hence the lower bound 1
    return a, a + gap


def sample_crop_size(
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int]:
    """(h, w) of a RandomResizedCrop box on a size x size image: area and aspect ratio drawn."""
    area = size * size * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(int(round(math.sqrt(area * aspect))), size)
    h = min(int(round(math.sqrt(area / aspect))), size)
    return h, w


def sample_crop(
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box on a size x size image."""
    h, w = sample_crop_size(size, rng, scale, ratio)
    top = int(rng.integers(0, size - h + 1))
    left = int(rng.integers(0, size - w + 1))
    return top, left, h, w


def asy_grid_size(grid: int, asy_ratio: float) -> int:
    """Side S of the enlarged positional grid the asymmetric window is cut from."""
    return int((1 + asy_ratio) * grid)


def sample_asy_offset(grid: int, asy_ratio: float, rng: np.random.Generator) -> tuple[int, int]:
    """Offset (oy, ox) of the grid x grid window, each uniform in [0, S - grid]."""
    span = asy_grid_size(grid, asy_ratio) - grid
    return int(rng.integers(0, span + 1)), int(rng.integers(0, span + 1))


def sample_views(
    n_frames: int,
    k: int,
    rng: np.random.Generator,
    *,
    image_size: int,
    grid: int,
    asy_ratio: float,
    clip_gap: float = CLIP_GAP,
    crop_scale: tuple[float, float] = CROP_SCALE,
    crop_ratio: tuple[float, float] = CROP_RATIO,
) -> list[View]:
    """Draw k views of a video with n_frames frames."""
    views = []
    for _ in range(k):
        a, b = sample_frame_pair(n_frames, rng, clip_gap)
        top, left, h, w = sample_crop(image_size, rng, crop_scale, crop_ratio)
        flip = bool(rng.random() < 0.5)
        oy, ox = sample_asy_offset(grid, asy_ratio, rng)
        views.append(View(a, b, top, left, h, w, flip, oy, ox))
    return views
