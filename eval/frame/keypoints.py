"""JHMDB pose propagation (CRW protocol): joint label maps, keypoint decoding, PCK, ground truth."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
import torch

NUM_JOINTS = 15


def read_jhmdb_joints(path: Path) -> np.ndarray:
    """Joint positions [T, 15, 2] as 0-based (x, y) pixels from a JHMDB ``joint_positions.mat``.

    The file's ``pos_img`` is 2 x 15 x T in 1-based MATLAB pixels, hence the - 1.
    """
    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError) as err:
        raise ValueError(f"{path}: not a readable MATLAB file ({err})") from None
    if "pos_img" not in mat:
        raise ValueError(f"{path}: no 'pos_img' variable")
    pos = np.asarray(mat["pos_img"], dtype=np.float64)
    if pos.shape == (2, NUM_JOINTS):
        pos = pos[..., None]  # MATLAB drops the trailing axis of a one-frame video
    if pos.ndim != 3 or pos.shape[:2] != (2, NUM_JOINTS):
        raise ValueError(f"{path}: 'pos_img' has shape {pos.shape}, expected (2, {NUM_JOINTS}, T)")
    return pos.transpose(2, 1, 0) - 1


def _gaussian_1d(centres: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """[J, size] 1-D factor of CRW's ``draw_labelmap_np`` along one axis.

    CRW pastes a fixed patch g[i] = exp(-(i - c)^2 / (2 sigma^2)), i < 6 sigma + 1, c = (6 sigma + 1) // 2,
    at cell ul = int(p - 3 sigma) (truncation towards zero), clipped to [ul, int(p + 3 sigma + 1)):
    the peak sits on a whole cell, not at the sub-cell position, and near the low edge the
    truncation shifts it; both are kept because scores must equal CRW's.
    """
    patch = 6 * sigma + 1
    centre = patch // 2
    lo = np.trunc(centres - 3 * sigma).astype(np.int64)[:, None]
    hi = np.trunc(centres + 3 * sigma + 1).astype(np.int64)[:, None]
    cells = np.arange(size)[None, :]
    offset = cells - lo
    inside = (offset >= 0) & (offset < np.ceil(patch)) & (cells < hi)
    return np.where(inside, np.exp(-((offset - centre) ** 2) / (2 * sigma**2)), 0.0)


def joint_heatmaps(joints_xy: np.ndarray, grid_hw: tuple[int, int], sigma: float = 0.5) -> np.ndarray:
    """Label maps [J + 1, h, w] of joints given as (x, y) in grid cells (CRW protocol).

    Channel 1 + j is joint j's unnormalised Gaussian (peak 1, see :func:`_gaussian_1d` for CRW's
    placement); a joint whose patch falls outside the grid leaves its channel all zero. Channel 0
    is the background: 1 where every joint channel is 0, else 0.
    """
    joints = np.asarray(joints_xy, dtype=np.float64)
    if joints.ndim != 2 or joints.shape[1] != 2 or not np.isfinite(joints).all():
        raise ValueError(f"joints must be a finite [J, 2] array of (x, y), got shape {joints.shape}")
    h, w = grid_hw
    maps = _gaussian_1d(joints[:, 1], h, sigma)[:, :, None] * _gaussian_1d(joints[:, 0], w, sigma)[:, None, :]
    background = (maps.sum(0) == 0).astype(np.float64)
    return np.concatenate([background[None], maps], axis=0)


def decode_keypoints(heatmaps: np.ndarray | torch.Tensor, orig_hw: tuple[int, int], topk: int = 3,
                     background: bool = True) -> np.ndarray:
    """Joint positions [J, 2] (x, y) in original-frame pixels from label maps [J (+1), h, w].

    CRW's rule: drop channel 0 when ``background``; per joint take the ``topk`` highest cells,
    normalise their values to sum 1, take the weighted mean cell (x, y), then scale by
    W / w and H / h (cell index times stride, no half-cell shift). An all-zero map gives NaN
    (invisible).
    """
    maps = torch.as_tensor(heatmaps).detach().cpu().to(torch.float64)
    if maps.ndim != 3:
        raise ValueError(f"heatmaps must be [C, h, w], got shape {tuple(maps.shape)}")
    if background:
        maps = maps[1:]
    _, h, w = maps.shape
    flat = maps.flatten(1)
    values, index = torch.topk(flat, k=min(topk, h * w), dim=1)
    weights = values / values.sum(1, keepdim=True)
    x = ((index % w) * weights).sum(1) / w * orig_hw[1]
    y = (torch.div(index, w, rounding_mode="floor") * weights).sum(1) / h * orig_hw[0]
    coords = torch.stack([x, y], dim=1)
    coords[flat.sum(1) == 0] = float("nan")
    return coords.numpy()


def pck_distances(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Normalised errors [T - 1, J] of one video, frames 1..T-1; NaN where the joint is not scored.

    As CRW's eval_pck.py: joints predicted invisible (NaN) are not scored and are left out of
    the frame's box; box = 0.6 * ||(max x - min x, max y - min y)|| over the other ground-truth
    joints (max starting from -1, min from 1e6, as CRW); error = ||p - g|| / box, which is
    counted as wrong (inf) for a zero box.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[2] != 2:
        raise ValueError(f"pred and gt must both be [T, J, 2], got {pred.shape} and {gt.shape}")
    pred, gt = pred[1:], gt[1:]
    visible = ~np.isnan(pred).any(-1)
    hi = np.maximum(np.where(visible[..., None], gt, -np.inf).max(axis=1), -1.0)
    lo = np.minimum(np.where(visible[..., None], gt, np.inf).min(axis=1), 1e6)
    box = 0.6 * np.linalg.norm(hi - lo, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        error = np.linalg.norm(pred - gt, axis=-1) / box[:, None]
    # a scored joint with a NaN error (zero box, zero distance) stays scored and counts as wrong
    return np.where(visible, np.where(np.isnan(error), np.inf, error), np.nan)


def pck(pred: np.ndarray | Sequence[np.ndarray], gt: np.ndarray | Sequence[np.ndarray],
        alphas: Sequence[float] = (0.1, 0.2)) -> dict[str, float]:
    """PCK (0-1 scale) of one video [T, J, 2] or of a list of videos, keyed "PCK@<alpha>".

    Errors from :func:`pck_distances` (frames k >= 1) are pooled per joint over all frames of all
    videos; a joint is correct when error <= alpha; the fraction correct per joint is averaged
    over the joints (NaN-aware: a joint never scored is left out).
    """
    preds = [pred] if isinstance(pred, np.ndarray) and pred.ndim == 3 else list(pred)
    gts = [gt] if isinstance(gt, np.ndarray) and gt.ndim == 3 else list(gt)
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predicted videos but {len(gts)} ground-truth videos")
    errors = np.concatenate([pck_distances(p, g) for p, g in zip(preds, gts)], axis=0)
    scored = ~np.isnan(errors)
    result = {}
    with np.errstate(invalid="ignore"):
        for alpha in alphas:
            per_joint = ((errors <= alpha) & scored).sum(0) / scored.sum(0)
            result[f"PCK@{alpha:g}"] = float(np.nanmean(per_joint)) if scored.any() else float("nan")
    return result
