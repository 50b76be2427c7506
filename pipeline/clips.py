"""Sampling of clip pairs for clip stores (VTHCL and CSTP plans) and the overlap labels.

A pair is two clips of T frames of one video, each with a crop box on the squashed
``image_size`` x ``image_size`` frame and a rotation. Every draw comes from the video's own
generator (``views.video_rng``), so a pair never depends on the shard or run that drew it.

Labels (``LABELS``, -1 where a plan does not define one):

- ``temporal_overlap``: class of |range_1 ∩ range_2| / |range_1| of the pair's two frame ranges,
  which have equal lengths, in ``TEMPORAL_OVERLAPS`` = (1.0, 0.8, 0.6, 0.4, 0.2) (``overlap_class``).
- ``spatial_overlap``: class of area(box_1 ∩ box_2) / area(box_1) in ``SPATIAL_OVERLAPS``.
- ``pace_1``, ``pace_2``: cstp: index of the clip's playback rate in ``PACES`` = (1, 2, 4, 8);
  vthcl: the slow and the fast frame stride themselves.
- ``rotation_1``, ``rotation_2``: index in ``ROTATIONS`` = (0, 90, 180, 270) degrees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .views import sample_crop, sample_crop_size

PLANS = ("vthcl", "cstp")
LABELS = ("temporal_overlap", "spatial_overlap", "pace_1", "pace_2", "rotation_1", "rotation_2")
NO_LABEL = -1
TEMPORAL_OVERLAPS = (1.0, 0.8, 0.6, 0.4, 0.2)
SPATIAL_OVERLAPS = (1.0, 0.8, 0.6, 0.4, 0.2)
OVERLAP_EDGES = (0.9, 0.7, 0.5, 0.3)  # midpoints between the class centres
PACES = (1, 2, 4, 8)
ROTATIONS = (0, 90, 180, 270)
SLOW_STRIDE = 8
FAST_STRIDE = 2

Box = tuple[int, int, int, int]  # top, left, h, w on the squashed image_size x image_size frame
Range = tuple[int, int]  # [start, stop) in frames (positions on the looped timeline, see sample_cstp)


@dataclass(frozen=True)
class ClipPair:
    """One sample of a clip store: what the extractor computes both clips' vectors from."""

    frames_1: tuple[int, ...]
    frames_2: tuple[int, ...]
    rate_1: int  # frame stride of clip 1
    rate_2: int
    range_1: Range
    range_2: Range
    box_1: Box
    box_2: Box
    rotation_deg_1: int  # counter-clockwise, applied after the crop
    rotation_deg_2: int
    labels: tuple[int, ...]  # in LABELS order

    def as_row(self) -> dict:
        row = {"frames_1": list(self.frames_1), "frames_2": list(self.frames_2),
               "rate_1": self.rate_1, "rate_2": self.rate_2}
        for i, (rng, box) in enumerate(((self.range_1, self.box_1), (self.range_2, self.box_2)), start=1):
            row[f"range_{i}_start"], row[f"range_{i}_stop"] = rng
            row.update(zip((f"box_{i}_top", f"box_{i}_left", f"box_{i}_h", f"box_{i}_w"), box))
        row["rotation_deg_1"], row["rotation_deg_2"] = self.rotation_deg_1, self.rotation_deg_2
        row.update(zip(LABELS, self.labels))
        return row

    @classmethod
    def from_row(cls, row: dict) -> ClipPair:
        """The pair a manifest row records (inverse of ``as_row``)."""
        def box(i):
            return tuple(int(row[f"box_{i}_{k}"]) for k in ("top", "left", "h", "w"))
        return cls(tuple(row["frames_1"]), tuple(row["frames_2"]), row["rate_1"], row["rate_2"],
                   (row["range_1_start"], row["range_1_stop"]), (row["range_2_start"], row["range_2_stop"]),
                   box(1), box(2), row["rotation_deg_1"], row["rotation_deg_2"], tuple(row[k] for k in LABELS))


def overlap_class(overlap: float) -> int:
    """Class of an overlap fraction among (1.0, 0.8, 0.6, 0.4, 0.2): the nearest centre, a tie going
    to the larger overlap (>= 0.9 -> 0, >= 0.7 -> 1, >= 0.5 -> 2, >= 0.3 -> 3, else 4, 0 included)."""
    for c, edge in enumerate(OVERLAP_EDGES):
        if overlap >= edge - 1e-9:
            return c
    return len(OVERLAP_EDGES)


def temporal_overlap_class(range1: Range, range2: Range) -> int:
    """Class of |range1 ∩ range2| / |range1| for half-open frame ranges [start, stop) of equal length."""
    (a0, a1), (b0, b1) = range1, range2
    if a1 - a0 != b1 - b0 or a1 <= a0:
        raise ValueError(f"temporal overlap needs two ranges of the same positive length, got {range1} and {range2}")
    return overlap_class(max(0, min(a1, b1) - max(a0, b0)) / (a1 - a0))


def spatial_overlap_class(box1: Box, box2: Box) -> int:
    """Class of area(box1 ∩ box2) / area(box1) for boxes (top, left, h, w)."""
    t1, l1, h1, w1 = box1
    t2, l2, h2, w2 = box2
    if h1 <= 0 or w1 <= 0:
        raise ValueError(f"spatial overlap needs a non-empty first box, got {box1}")
    ih = max(0, min(t1 + h1, t2 + h2) - max(t1, t2))
    iw = max(0, min(l1 + w1, l2 + w2) - max(l1, l2))
    return overlap_class(ih * iw / (h1 * w1))


# ---------------------------------------------------------------- vthcl


def vthcl_strides(n: int, frames: int, slow: int, fast: int) -> tuple[int, int]:
    """(slow, fast) strides for an n-frame video: as given when the slow span (frames - 1) * slow + 1
    fits, else scaled down: slow' = max(1, (n - 1) // (frames - 1)), fast' = max(1, fast * slow' // slow)."""
    if frames == 1 or (frames - 1) * slow + 1 <= n:
        return slow, fast
    s = max(1, (n - 1) // (frames - 1))
    return s, max(1, fast * s // slow)


def clip_frames(start: int, stride: int, frames: int, n: int) -> tuple[int, ...]:
    """start, start + stride, ...: ``frames`` indices, clamped to the last frame n - 1."""
    return tuple(min(start + stride * t, n - 1) for t in range(frames))


def sample_vthcl(n: int, k: int, rng: np.random.Generator, *, frames: int, image_size: int, slow_stride: int,
                 fast_stride: int, crop_scale, crop_ratio) -> list[ClipPair]:
    """k slow/fast pairs: clip 1 at the slow stride, clip 2 at the fast one, same start frame (uniform
    over the starts whose slow clip fits), one crop box (RandomResizedCrop) for both, no rotation."""
    slow, fast = vthcl_strides(n, frames, slow_stride, fast_stride)
    span = (frames - 1) * slow + 1
    pairs = []
    for _ in range(k):
        start = int(rng.integers(0, max(n - span, 0) + 1))
        box = sample_crop(image_size, rng, crop_scale, crop_ratio)
        ranges = ((start, start + span), (start, start + (frames - 1) * fast + 1))
        labels = (NO_LABEL, NO_LABEL, slow, fast, NO_LABEL, NO_LABEL)
        pairs.append(ClipPair(clip_frames(start, slow, frames, n), clip_frames(start, fast, frames, n), slow, fast,
                              *ranges, box, box, 0, 0, labels))
    return pairs


# ---------------------------------------------------------------- cstp


def temporal_offset(length: int, cls: int) -> int:
    """Start offset d of the later range (both ``length`` frames long) realising overlap class
    ``cls``: the d in [0, length] of that class nearest to (1 - overlap) * length (the smaller on a
    tie); when no d has it (length < 5), the nearest one."""
    target = (1 - TEMPORAL_OVERLAPS[cls]) * length
    ok = [d for d in range(length + 1) if overlap_class((length - d) / length) == cls]
    return min(ok or range(length + 1), key=lambda d: (abs(d - target), d))


def cstp_frames(range_: Range, pace: int, frames: int, n: int) -> tuple[int, ...]:
    """T frames at stride ``pace``, centred in the range (offset (length - frames * pace) // 2), on a
    video looped when a position passes its end (index = position mod n)."""
    offset = (range_[1] - range_[0] - frames * pace) // 2
    return tuple((range_[0] + offset + pace * t) % n for t in range(frames))


def spatial_boxes(size: int, cls: int, rng: np.random.Generator, crop_scale, crop_ratio,
                  tries: int = 100) -> tuple[Box, Box]:
    """Two equal-size boxes whose overlap class is ``cls``: overlap o = SPATIAL_OVERLAPS[cls] is split
    into fy * fx = o (fy log-uniform in [o, 1]); the box size is a RandomResizedCrop draw capped so
    both boxes fit; box 2 is box 1 moved by round((1 - fy) h) rows and round((1 - fx) w) columns,
    each direction drawn; the pair's position is uniform. Redrawn until the class is exact."""
    o = SPATIAL_OVERLAPS[cls]
    for _ in range(tries):
        fy = math.exp(rng.uniform(math.log(o), 0.0))
        fx = o / fy
        h, w = sample_crop_size(size, rng, crop_scale, crop_ratio)
        h, w = max(1, min(h, int(size / (2 - fy)))), max(1, min(w, int(size / (2 - fx))))
        dy, dx = min(round((1 - fy) * h), size - h), min(round((1 - fx) * w), size - w)
        top, left = int(rng.integers(0, size - h - dy + 1)), int(rng.integers(0, size - w - dx + 1))
        down, right = rng.random() < 0.5, rng.random() < 0.5
        box1 = (top + (0 if down else dy), left + (0 if right else dx), h, w)
        box2 = (top + (dy if down else 0), left + (dx if right else 0), h, w)
        if spatial_overlap_class(box1, box2) == cls:
            return box1, box2
    raise ValueError(f"cannot realise spatial overlap class {cls} on a {size}px image")


def sample_cstp(n: int, k: int, rng: np.random.Generator, *, frames: int, image_size: int, crop_scale,
                crop_ratio) -> list[ClipPair]:
    """k CSTP pairs. Per pair: temporal class, pace of each clip, spatial class and rotation of each
    clip drawn uniformly. Both ranges are R = frames * max(pace_1, pace_2) frames long; the later one
    starts ``temporal_offset(R, class)`` after the earlier (which clip is later: drawn); the earlier
    start is uniform over [0, n - R - d] (0 when the video is shorter, which is then looped). Each
    clip takes ``frames`` frames at its pace, centred in its range (``cstp_frames``). The two
    overlap labels are computed from the ranges and boxes (``*_overlap_class``)."""
    pairs = []
    for _ in range(k):
        t_cls, p1, p2 = (int(rng.integers(0, len(c))) for c in (TEMPORAL_OVERLAPS, PACES, PACES))
        pace1, pace2 = PACES[p1], PACES[p2]
        length = frames * max(pace1, pace2)
        d = temporal_offset(length, t_cls)
        first = int(rng.integers(0, max(n - length - d, 0) + 1))
        s1, s2 = (first, first + d) if rng.random() < 0.5 else (first + d, first)
        range1, range2 = (s1, s1 + length), (s2, s2 + length)
        box1, box2 = spatial_boxes(image_size, int(rng.integers(0, len(SPATIAL_OVERLAPS))), rng, crop_scale,
                                   crop_ratio)
        r1, r2 = (int(rng.integers(0, len(ROTATIONS))) for _ in range(2))
        labels = (temporal_overlap_class(range1, range2), spatial_overlap_class(box1, box2), p1, p2, r1, r2)
        pairs.append(ClipPair(cstp_frames(range1, pace1, frames, n), cstp_frames(range2, pace2, frames, n),
                              pace1, pace2, range1, range2, box1, box2, ROTATIONS[r1], ROTATIONS[r2], labels))
    return pairs


def plan_params(plan: str, slow_stride: int = SLOW_STRIDE, fast_stride: int = FAST_STRIDE) -> dict:
    """The plan's parameters, as recorded in the store settings."""
    if plan == "vthcl":
        if not 1 <= fast_stride <= slow_stride:
            raise ValueError(f"vthcl needs 1 <= --fast-stride <= --slow-stride, got {fast_stride} and {slow_stride}")
        return {"slow_stride": slow_stride, "fast_stride": fast_stride}
    if plan == "cstp":
        return {"temporal_overlaps": list(TEMPORAL_OVERLAPS), "spatial_overlaps": list(SPATIAL_OVERLAPS),
                "paces": list(PACES), "rotations": list(ROTATIONS)}
    raise ValueError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")


def sample_pairs(plan: str, n: int, k: int, rng: np.random.Generator, *, frames: int, image_size: int,
                 params: dict, crop_scale, crop_ratio) -> list[ClipPair]:
    """k pairs of an n-frame video under ``plan`` with its ``plan_params``."""
    if plan == "vthcl":
        return sample_vthcl(n, k, rng, frames=frames, image_size=image_size, slow_stride=params["slow_stride"],
                            fast_stride=params["fast_stride"], crop_scale=crop_scale, crop_ratio=crop_ratio)
    if plan == "cstp":
        return sample_cstp(n, k, rng, frames=frames, image_size=image_size, crop_scale=crop_scale,
                           crop_ratio=crop_ratio)
    raise ValueError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
