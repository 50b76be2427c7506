"""Synthetic feature stores for tests and benchmarks: the real store format, made-up tokens.

Tokens carry a learnable temporal structure: every 2x2 node of a video has a content vector
that frame b repeats at a moved position, hidden under strong per-token noise in the other
channels. A projection that keeps the content channels and drops the noise makes the
A -> B -> A_asy walk return, so Co-Settle training visibly helps. Rows marked invalid hold NaN,
so a reader that ever used one would turn the loss non-finite.

``write_synthetic_clip_store`` does the same for clip stores (VTHCL, CSTP): its labels are
functions of its tokens (``synthetic_clip_tokens`` documents how).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from cosettle.pipeline.clips import LABELS, PACES, ROTATIONS, SPATIAL_OVERLAPS, TEMPORAL_OVERLAPS, plan_params
from cosettle.pipeline.store import FeatureStore, create_or_open
from cosettle.pipeline.store_settings import ClipStoreSettings, StoreSettings, videos_digest


def synthetic_settings(videos: list[str], *, views: int, grid: int, dim: int, chunk_videos: int,
                       dtype: str = "float16", compressor: str = "none", seed: int = 0) -> StoreSettings:
    """Store settings of a synthetic store (backbone 'synthetic', random weights)."""
    return StoreSettings(
        backbone="synthetic", weights="random", weights_sha256="random", image_size=16 * grid, grid=grid,
        dim=dim, dtype=dtype, views=views, clip_gap=0.15, crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3),
        asy_ratio=10.0, seed=seed, num_videos=len(videos), videos_sha256=videos_digest(videos),
        chunk_videos=chunk_videos, compressor=compressor,
    )


def synthetic_tokens(rng: np.random.Generator, views: int, rows: int, grid: int, dim: int,
                     signal_dims: int, noise: float) -> dict[str, np.ndarray]:
    """Tokens a, b, a_asy [views, rows, grid*grid, dim] (float32) with the structure described above."""
    half = grid // 2
    nodes = half * half
    content = rng.standard_normal((views, rows, nodes, signal_dims), dtype=np.float32)
    moved = np.stack([rng.permutation(nodes) for _ in range(views * rows)]).reshape(views, rows, nodes)
    node_of_token = ((np.arange(grid)[:, None] // 2) * half + np.arange(grid)[None, :] // 2).ravel()

    def frame(node_content: np.ndarray) -> np.ndarray:
        signal = node_content[:, :, node_of_token]
        clutter = noise * rng.standard_normal((views, rows, grid * grid, dim - signal_dims), dtype=np.float32)
        return np.concatenate([signal, clutter], axis=-1)

    return {
        "a": frame(content),
        "b": frame(np.take_along_axis(content, moved[..., None], axis=2)),
        "a_asy": frame(content),
    }


def write_synthetic_store(path: Path, *, num_videos: int, views: int = 2, grid: int = 4, dim: int = 32,
                          chunk_videos: int = 8, dtype: str = "float16", compressor: str = "none",
                          invalid: tuple[int, ...] = (), signal_dims: int | None = None, noise: float = 2.0,
                          name: str = "synthetic", seed: int = 0, complete: bool = True) -> FeatureStore:
    """Write a synthetic store at ``path``; ``complete=False`` leaves its last block unwritten."""
    videos = [f"{name}/video{i:06d}" for i in range(num_videos)]
    settings = synthetic_settings(videos, views=views, grid=grid, dim=dim, chunk_videos=chunk_videos,
                                  dtype=dtype, compressor=compressor, seed=seed)
    store = create_or_open(Path(path), settings, videos, resume=False, overwrite=False, join=False)
    rng = np.random.default_rng(seed)
    blocks = range(settings.num_blocks - (0 if complete else 1))
    for block in blocks:
        lo, hi = store.block_rows(block)
        tokens = synthetic_tokens(rng, views, hi - lo, grid, dim, signal_dims or dim // 4, noise)
        valid = ~np.isin(np.arange(lo, hi), invalid)
        for t in tokens.values():
            t[:, ~valid] = np.nan
        manifest = pa.table({"video_index": np.repeat(np.arange(lo, hi), views),
                             "view": np.tile(np.arange(views), hi - lo)})
        store.write_block(block, tokens, valid, manifest)  # float32: the store casts or quantises to its dtype
    store.mark_complete_if_done()
    return store


# ---------------------------------------------------------------- clip stores (VTHCL, CSTP)

CLIP_NOISE = 0.1


def synthetic_clip_tokens(rng: np.random.Generator, labels: np.ndarray, plan: str, frames: int, levels: int,
                          dim: int) -> np.ndarray:
    """Tokens [K, rows, 2, T, L, dim] (float32) of pairs with ``labels`` [K, rows, 6], learnable as follows.

    Channels of clip c (1, 2) at frame t, before the level scaling:

    - 0, 1 (pace): (cos, sin)(phi_c + omega_c t), phi_c random, omega_c = pi * rate_c / 8 radians per
      frame, rate_c = PACES[pace_c] (cstp) or the clip's stride (vthcl): the phase advance per frame
      gives the pace.
    - 2, 3 (rotation): a * (cos, sin)(rotation_c degrees), a uniform in [1, 2]: the channel pair
      turns (a signed permutation of the two channels) with the rotation.
    - 4 .. 4+m (temporal overlap, m = (dim - 4) // 2) and 4+m .. 4+2m (spatial overlap): per-frame
      content, normal, independent for each clip except the first round(overlap * m) channels
      (at least 1), which clip 2 shares with clip 1: overlap = the class centre (1.0 .. 0.2; 1 where
      the plan has no overlap label, so vthcl's slow and fast clips share all their content).
    - the rest: zero.

    Level l (0-based) holds that signal times (l + 1) / L, plus normal noise of std 0.1 everywhere.
    """
    k, rows = labels.shape[:2]
    m = (dim - 4) // 2
    t = np.arange(frames, dtype=np.float32)
    x = np.zeros((k, rows, 2, frames, dim), dtype=np.float32)
    for c in range(2):
        pace, rot = labels[..., 2 + c], labels[..., 4 + c]
        rate = np.array(PACES)[pace] if plan == "cstp" else pace
        angle = rng.uniform(0, 2 * np.pi, (k, rows, 1)) + np.pi * rate[..., None] / 8 * t
        x[:, :, c, :, 0], x[:, :, c, :, 1] = np.cos(angle), np.sin(angle)
        theta = np.deg2rad(np.array(ROTATIONS)[np.maximum(rot, 0)])
        amp = rng.uniform(1, 2, (k, rows))
        x[:, :, c, :, 2] = (amp * np.cos(theta))[..., None]
        x[:, :, c, :, 3] = (amp * np.sin(theta))[..., None]
    for g, (col, centres) in enumerate(((0, TEMPORAL_OVERLAPS), (1, SPATIAL_OVERLAPS))):
        lo = 4 + g * m
        content = rng.standard_normal((k, rows, 2, frames, m), dtype=np.float32)
        overlap = np.where(labels[..., col] >= 0, np.array(centres)[np.maximum(labels[..., col], 0)], 1.0)
        shared = np.maximum(1, np.round(overlap * m)).astype(int)  # [K, rows]
        mask = np.arange(m) < shared[..., None, None]  # [K, rows, 1, m]
        content[:, :, 1] = np.where(mask, content[:, :, 0], content[:, :, 1])
        x[..., lo : lo + m] = content
    scale = (np.arange(levels, dtype=np.float32) + 1) / levels
    out = x[:, :, :, :, None, :] * scale[:, None]
    return out + CLIP_NOISE * rng.standard_normal(out.shape, dtype=np.float32)


def synthetic_clip_labels(rng: np.random.Generator, plan: str, k: int, rows: int) -> np.ndarray:
    """Labels [K, rows, 6] int16: cstp draws every column uniformly; vthcl has paces (8, 2), others -1."""
    if plan == "vthcl":
        labels = np.full((k, rows, 6), -1, dtype=np.int16)
        labels[..., 2], labels[..., 3] = 8, 2
        return labels
    return np.stack([rng.integers(0, n, (k, rows)) for n in (5, 5, 4, 4, 4, 4)], axis=-1).astype(np.int16)


def write_synthetic_clip_store(path: Path, *, num_videos: int, views: int = 2, frames: int = 4, levels: int = 2,
                               dim: int = 16, chunk_videos: int = 8, plan: str = "cstp", seed: int = 0,
                               invalid: tuple[int, ...] = (), complete: bool = True,
                               dtype: str = "float16") -> FeatureStore:
    """Write a synthetic clips store (the real format, ``synthetic_clip_tokens``' structure) at ``path``.

    ``dim`` is D' (>= 14, so that the five overlap classes share 5 distinct channel counts);
    ``levels`` the number L of levels (blocks 1..L). Invalid rows hold NaN tokens and -1 labels;
    ``complete=False`` leaves the last block unwritten.
    """
    if dim < 14:
        raise ValueError(f"a synthetic clip store needs dim >= 14, got {dim}")
    videos = [f"synthetic/video{i:06d}" for i in range(num_videos)]
    settings = ClipStoreSettings(
        backbone="synthetic", weights="random", weights_sha256="random", image_size=224, depth=levels,
        backbone_dim=dim, plan=plan, plan_params=plan_params(plan), frames=frames, levels=tuple(range(1, levels + 1)),
        pooling="mean", dim=dim, dtype=dtype, views=views, crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3),
        seed=seed, num_videos=num_videos, videos_sha256=videos_digest(videos), chunk_videos=chunk_videos,
        compressor="none",
    )
    store = create_or_open(Path(path), settings, videos, resume=False, overwrite=False, join=False)
    rng = np.random.default_rng(seed)
    for block in range(settings.num_blocks - (0 if complete else 1)):
        lo, hi = store.block_rows(block)
        labels = synthetic_clip_labels(rng, plan, views, hi - lo)
        tokens = synthetic_clip_tokens(rng, labels, plan, frames, levels, dim)
        valid = ~np.isin(np.arange(lo, hi), invalid)
        tokens[:, ~valid], labels[:, ~valid] = np.nan, -1
        manifest = pa.table({"video_index": np.repeat(np.arange(lo, hi), views),
                             "view": np.tile(np.arange(views), hi - lo),
                             **{name: labels.swapaxes(0, 1).reshape(-1, 6)[:, j] for j, name in enumerate(LABELS)}})
        store.write_block(block, {"tokens": tokens, "labels": labels}, valid, manifest)  # the store casts or quantises
    store.mark_complete_if_done()
    return store
