"""The official DAVIS-2017 measures: region similarity J, boundary F-measure and their statistics.

Same rules as davis2017-evaluation (metrics.py, utils.py), including its empty-mask conventions,
so per-frame numbers equal the official tool's.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import spatial


def _check_shapes(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None) -> None:
    if gt.shape != pred.shape or (void is not None and void.shape != gt.shape):
        shapes = f"gt {gt.shape}, pred {pred.shape}" + ("" if void is None else f", void {void.shape}")
        raise ValueError(f"mask shapes differ: {shapes}")


def jaccard(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity |P and G| / |P or G| of two binary masks; void pixels are left out.

    An empty union (both masks empty outside the void) scores 1.
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    _check_shapes(gt, pred, void)
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    union = np.count_nonzero((gt | pred) & keep)
    if union == 0:
        return 1.0
    return np.count_nonzero(gt & pred & keep) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a binary mask (seg2bmap), over the last two axes.

    A pixel is on the boundary when it differs from its east, south or south-east neighbour
    (zero beyond the image); on the last row only the east neighbour counts, on the last column
    only the south one, and the bottom-right pixel is never a boundary. The boundary thus sits
    half a pixel towards the origin and the right and bottom image edges are never boundaries.
    """
    s = np.asarray(mask, bool)
    east, south, south_east = (np.zeros_like(s) for _ in range(3))
    east[..., :, :-1] = s[..., :, 1:]
    south[..., :-1, :] = s[..., 1:, :]
    south_east[..., :-1, :-1] = s[..., 1:, 1:]
    b = (s ^ east) | (s ^ south) | (s ^ south_east)
    b[..., -1, :] = s[..., -1, :] ^ east[..., -1, :]
    b[..., :, -1] = s[..., :, -1] ^ south[..., :, -1]
    b[..., -1, -1] = False
    return b


def bound_pixels(height: int, width: int, bound_th: float = 0.008) -> float:
    """Dilation radius in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th * image diagonal)."""
    if bound_th >= 1:
        if bound_th != int(bound_th):
            # the official disk of a fractional radius is an even-sized, off-centre kernel
            raise ValueError(f"bound_th >= 1 is a radius in pixels and must be whole, got {bound_th}")
        return float(bound_th)
    return float(math.ceil(bound_th * math.hypot(height, width)))


def _matched(src: np.ndarray, dst: np.ndarray, radius: float) -> int:
    """Number of points ``src`` [n, 2] within Euclidean ``radius`` of a point of ``dst`` [m, 2].

    With boundary pixel coordinates this equals sum(src_map * dilate(dst_map, disk(radius))),
    the disk being {x^2 + y^2 <= r^2}. Squared distances between pixels are whole numbers, so
    the next distance above a whole radius r is sqrt(r^2 + 1) and the 1e-6 slack is exact.
    """
    dist, _ = spatial.KDTree(dst).query(src, distance_upper_bound=radius + 0.5)
    return int(np.count_nonzero(dist <= radius + 1e-6))


def f_measure(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
              bound_th: float = 0.008) -> float:
    """Boundary F-measure of a binary prediction against a binary ground truth (official rules).

    Boundaries come from :func:`boundary_map` of each mask with void pixels cleared; a boundary
    pixel matches when the other boundary has a pixel within :func:`bound_pixels`. Empty
    boundaries: both empty -> P = R = 1; prediction only empty -> P = 1, R = 0; ground truth
    only empty -> P = 0, R = 1. F = 2PR / (P + R), 0 when P + R = 0.
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    _check_shapes(gt, pred, void)
    if gt.ndim != 2:
        raise ValueError(f"f_measure takes 2-D masks, got shape {gt.shape}")
    if void is not None:
        keep = ~np.asarray(void, bool)
        gt, pred = gt & keep, pred & keep
    radius = bound_pixels(*gt.shape, bound_th=bound_th)
    gt_b, pred_b = np.argwhere(boundary_map(gt)), np.argwhere(boundary_map(pred))
    if len(gt_b) == 0 or len(pred_b) == 0:
        precision, recall = float(len(pred_b) == 0), float(len(gt_b) == 0)
    else:
        precision = _matched(pred_b, gt_b, radius) / len(pred_b)
        recall = _matched(gt_b, pred_b, radius) / len(gt_b)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame scores, as the official tool.

    mean = NaN-aware mean; recall = fraction of frames scoring > 0.5 (a NaN frame counts as a
    miss); decay = NaN-aware mean of the first quarter minus that of the last quarter, where the
    quarters are the official overlapping bins: edges e_i = round_half_up(i * (n - 1) / 4),
    i = 0..4, bin i = frames e_i..e_{i+1} inclusive (not np.array_split).
    """
    x = np.asarray(per_frame, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("db_statistics needs at least one per-frame score")
    edges = np.floor(np.linspace(0, x.size - 1, 5) + 0.5).astype(int)
    first, last = x[edges[0]:edges[1] + 1], x[edges[3]:edges[4] + 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bin gives NaN, as intended
        return float(np.nanmean(x)), float(np.mean(x > 0.5)), float(np.nanmean(first) - np.nanmean(last))
