"""Consistency-versus-separability analysis of patch features (COSETTLE_METHOD.md section 7).

All functions take numpy arrays or torch tensors and compute in float64. Distances are plain
Euclidean distances between the features as given: nothing is L2-normalised except inside
:func:`cycle_accuracy`, which mirrors the training loss. Normalising a distance by a diameter
(``distance / diameter(...)``) is left to the caller, who chooses the pool of patches.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CYCLE_PAIRS = ((0.25, 0.4), (0.35, 0.5), (0.45, 0.6), (0.55, 0.7), (0.65, 0.8))


def _float64(x: np.ndarray | torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def diameter(feats: np.ndarray | torch.Tensor, percentile: float = 100.0) -> float:
    """2 x the ``percentile``-th percentile (linear interpolation; 100 = max) of the Euclidean
    distances of the rows of ``feats`` [M, D] to their mean (the global centre)."""
    f = _float64(feats, 2, "feats")
    radii = torch.linalg.vector_norm(f - f.mean(0), dim=1)
    return 2 * float(torch.quantile(radii, percentile / 100))


def inter_video_distance(mid_feats: np.ndarray | torch.Tensor, num_positions: int = 8, seed: int = 42) -> float:
    """Mean Euclidean distance between same-position patches of different videos.

    ``mid_feats`` [V, N, D] holds each video's middle-frame patches. ``num_positions`` distinct
    positions are drawn once with ``np.random.RandomState(seed).choice(N, num_positions,
    replace=False)``; for every unordered pair of videos the distances at those positions are
    averaged, then the pairs are averaged.
    """
    f = _float64(mid_feats, 3, "mid_feats")
    videos, patches, _ = f.shape
    if videos < 2:
        raise ValueError(f"inter_video_distance needs at least 2 videos, got {videos}")
    if num_positions > patches:
        raise ValueError(f"cannot sample {num_positions} positions of {patches} patches")
    positions = np.random.RandomState(seed).choice(patches, num_positions, replace=False)
    at = f[:, torch.from_numpy(positions)].transpose(0, 1)  # [P, V, D]
    first, second = torch.triu_indices(videos, videos, offset=1)
    return float(torch.cdist(at, at)[:, first, second].mean())


def intra_video_distance(frames_feats: np.ndarray | torch.Tensor) -> float:
    """Mean nearest-neighbour distance between adjacent frames of one video.

    ``frames_feats`` [T, N, D]; frames 3..T-4 (0-based, inclusive) are used. For each adjacent
    pair (t, t+1) every patch of t gets its Euclidean distance to the nearest patch of t+1; the
    smallest ceil(N / 2) of these are averaged; the result is the mean over pairs. Uses
    torch.cdist, whose matrix-product path leaves errors near 1e-7 on zero distances.
    """
    f = _float64(frames_feats, 3, "frames_feats")
    frames, patches, _ = f.shape
    if frames < 8:
        raise ValueError(f"intra_video_distance needs at least 8 frames (3..T-4), got {frames}")
    kept = f[3:frames - 3]
    nearest = torch.cdist(kept[:-1], kept[1:]).amin(dim=-1)  # [pairs, N]
    smallest = nearest.topk(math.ceil(patches / 2), dim=-1, largest=False).values
    return float(smallest.mean(-1).mean())


def effective_rank(feats: np.ndarray | torch.Tensor) -> float:
    """exp(entropy of s / sum(s)) / min(N, D) for the singular values s of ``feats`` [N, D].

    The features are used as given (not centred, not normalised); the entropy uses natural logs.
    """
    f = _float64(feats, 2, "feats")
    s = torch.linalg.svdvals(f)
    if float(s.sum()) == 0:
        raise ValueError("effective_rank of an all-zero matrix is undefined")
    return float(torch.exp(torch.special.entr(s / s.sum()).sum())) / min(f.shape)


def _pooled_nodes(feats: torch.Tensor) -> torch.Tensor:
    """[T, N, D] patches on a square grid -> [T, M, D] nodes: L2-normalise each patch, then
    2x2 average pooling with stride 2 (an odd last row/column is dropped), no re-normalisation."""
    frames, patches, dim = feats.shape
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"cycle_accuracy needs a square grid of patches, got N = {patches}")
    grid = F.normalize(feats, dim=-1).reshape(frames, side, side, dim).permute(0, 3, 1, 2)
    return F.avg_pool2d(grid, kernel_size=2, stride=2).flatten(2).transpose(1, 2)


def cycle_accuracy(feats: np.ndarray | torch.Tensor, tau: float = 0.03,
                   pairs: Sequence[tuple[float, float]] = CYCLE_PAIRS) -> float:
    """Fraction of nodes that walk a -> b -> a back to themselves, averaged over frame pairs.

    ``feats`` [T, N, D], N patches in row-major order on a square grid, pooled by
    :func:`_pooled_nodes` as the training loss does. For each (fa, fb) in ``pairs`` the frames are
    a = floor(fa * T), b = floor(fb * T); T1 = softmax(z_a z_b^T / tau), T2 = softmax(z_b z_a^T / tau)
    over the last dim, C = T1 T2, and a node is right when the argmax of its row of C is itself.
    """
    f = _float64(feats, 3, "feats")
    frames = f.shape[0]
    if not all(0 <= fa < 1 and 0 <= fb < 1 for fa, fb in pairs):
        raise ValueError(f"cycle pair fractions must lie in [0, 1), got {list(pairs)}")
    # the epsilon keeps e.g. 0.29 * 100 = 28.999... on frame 29
    a, b = (torch.tensor([math.floor(p[i] * frames + 1e-9) for p in pairs]) for i in (0, 1))
    nodes = _pooled_nodes(f)
    za, zb = nodes[a], nodes[b]
    forward = torch.softmax(za @ zb.transpose(1, 2) / tau, dim=-1)
    backward = torch.softmax(zb @ za.transpose(1, 2) / tau, dim=-1)
    walk = forward @ backward
    right = walk.argmax(dim=-1) == torch.arange(walk.shape[-1])
    return float(right.to(torch.float64).mean())
