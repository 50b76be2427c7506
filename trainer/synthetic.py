"""Synthetic feature stores for tests and benchmarks: the real store format, made-up tokens.

Tokens carry a learnable temporal structure: every 2x2 node of a video has a content vector
that frame b repeats at a moved position, hidden under strong per-token noise in the other
channels. A projection that keeps the content channels and drops the noise makes the
A -> B -> A_asy walk return, so Co-Settle training visibly helps. Rows marked invalid hold NaN,
so a reader that ever used one would turn the loss non-finite.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from cosettle.pipeline.store import FeatureStore, StoreSettings, create_or_open, videos_digest


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
        store.write_block(block, {k: v.astype(dtype) for k, v in tokens.items()}, valid, manifest)
    store.mark_complete_if_done()
    return store
