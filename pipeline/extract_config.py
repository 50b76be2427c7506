"""The settings of one extraction run, shared by both store layouts (views and clips)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .clips import FAST_STRIDE, PLANS, SLOW_STRIDE
from .pooling import POOLINGS
from .quant import DTYPE as INT8
from .store_settings import DTYPES
from .views import CLIP_GAP

LAYOUTS = ("views", "clips")


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one extraction run (one shard).

    ``layout="views"`` (Co-Settle's frame pairs) uses ``clip_gap`` and ``asy_ratio``;
    ``layout="clips"`` uses ``plan``, ``clip_frames``, ``levels`` (None: the last block),
    ``pooling`` and, for vthcl, the two strides; ``views`` is the number of pairs per video there.
    """

    videos: Path
    out: Path
    backbone: str
    weights: str
    root: Path | None = None
    views: int = 5
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    amp: str = "auto"  # cosettle.core.precision: bf16 on CUDA, float32 on CPU
    workers: int | None = None  # DataLoader decoding workers; None: decode_workers picks for the device
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    overwrite: bool = False
    chunk_videos: int = 16
    dtype: str = "float16"
    compressor: str = "none"
    asy_ratio: float = 10.0
    clip_gap: float = CLIP_GAP
    layout: str = "views"
    plan: str | None = None
    clip_frames: int = 8
    levels: tuple[int, ...] | None = None
    pooling: str = "cls+mean"
    slow_stride: int = SLOW_STRIDE
    fast_stride: int = FAST_STRIDE
    arch: dict | None = None  # tiny architectures for tests

    @property
    def array_dtype(self) -> str:
        """The dtype of a block's tokens in memory: float32 for an int8 store (the store quantises), else ``dtype``."""
        return "float32" if self.dtype == INT8 else self.dtype


CUDA_WORKERS = 2


def decode_workers(cfg: ExtractConfig, device_type: str) -> int:
    """DataLoader decoding workers of a run: ``cfg.workers``, or by default 2 on CUDA and none on the CPU.

    On the CPU the forward's threads already keep every core busy. A worker process decoding beside
    them holds up all of the forward's threads at every synchronisation point, and in a long-lived process (a
    sweep worker) its fork makes the parent copy each heap page it writes afterwards; decoding in turn
    with the forward costs only the decoding (``bench/extract_overhead.py`` compares the two)."""
    if cfg.workers is not None:
        return cfg.workers
    return CUDA_WORKERS if device_type == "cuda" else 0


def check_config(cfg: ExtractConfig) -> None:
    """Refuse inconsistent settings before anything is loaded (ValueError, one line)."""
    index, count = cfg.shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must lie in [0, {count})")
    if cfg.overwrite and count > 1:
        # each shard would delete the blocks the others have written
        raise ValueError(f"{cfg.out}: --overwrite cannot be combined with --shard; delete the store, then start the shards")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {cfg.layout!r}; choose one of {', '.join(LAYOUTS)}")
    if cfg.layout == "views":
        if cfg.plan is not None:
            raise ValueError(f"--plan {cfg.plan} needs --layout clips")
        return
    if cfg.plan not in PLANS:
        raise ValueError(f"--layout clips needs --plan {'|'.join(PLANS)}, got {cfg.plan!r}")
    if cfg.clip_frames < 1:
        raise ValueError(f"--clip-frames must be at least 1, got {cfg.clip_frames}")
    if cfg.pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {cfg.pooling!r}; choose one of {', '.join(POOLINGS)}")
