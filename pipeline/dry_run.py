"""``cosettle-extract --dry-run``: what a run would write and how long it would take, before it runs.

The size comes from the arrays the store layer declares (``store.declared_arrays``, built in
memory), so every array of every layout and dtype is counted the way the store writes it; the time
from one decoded video and timed forward passes of the configured backbone, batch and device.
Nothing is written.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import zarr

from cosettle.core.devices import resolve_device

from .backbones import load_backbone
from .extract import BlockForward, make_layout
from .extract_config import ExtractConfig, check_config, decode_workers
from .store import declared_arrays
from .videos import discover_videos

PROBES = 5  # videos tried, in list order, for one that decodes


@dataclass(frozen=True)
class ArraySize:
    """One declared array: its shape, dtype, chunk files and bytes on disk, uncompressed."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: int
    nbytes: int


def array_size(name: str, array: zarr.Array) -> ArraySize | None:
    """Full chunks (Zarr writes edge chunks whole) x itemsize; None for a variable-length dtype
    (the video list), whose bytes are written at creation and counted as written."""
    itemsize = getattr(array.metadata.data_type, "item_size", None)
    if itemsize is None:
        return None
    return ArraySize(name, array.shape, str(array.dtype), array.nchunks,
                     array.nchunks * math.prod(array.chunks) * itemsize)


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent: where the store's bytes will land."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def space_warning(path: Path, needed: int) -> str | None:
    """A one-line warning when the filesystem that will hold ``path`` has fewer free bytes than ``needed``."""
    where = nearest_existing(path)
    free = shutil.disk_usage(where).free
    if free >= needed:
        return None
    return f"warning: {path} needs {needed:,} bytes ({gib(needed)}), {where} has only {free:,} bytes free ({gib(free)})"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def shard_videos(num_videos: int, chunk_videos: int, shard: tuple[int, int]) -> int:
    """Videos in the blocks shard i of n owns (blocks c with c % n == i)."""
    index, count = shard
    blocks = range(index, -(-num_videos // chunk_videos), count)
    return sum(min(chunk_videos, num_videos - c * chunk_videos) for c in blocks)


def _probe(layout, root: Path, videos: list[str]) -> tuple[dict | None, float, str]:
    """The first of the first PROBES videos that decodes (as the extraction's dataset item), the
    seconds its decoding and view transforms took, and the last error when none decodes."""
    data = layout.dataset(root, list(enumerate(videos[:PROBES])))
    error = ""
    for i in range(len(data)):
        t0 = time.perf_counter()
        item = data[i]
        if item["error"] is None:
            return item, time.perf_counter() - t0, ""
        error = item["error"]
    return None, 0.0, error


def _block_of(layout, forward: BlockForward, item: dict, copies: int) -> dict:
    """The arrays of a one-row block that ``item`` was added to ``copies`` times (a batch's worth)."""
    block = layout.block(forward, 1, item["video_index"])
    for _ in range(copies):
        block.add(item)
    return block.arrays()


def _forward_seconds(layout, forward: BlockForward, item: dict, cfg: ExtractConfig) -> tuple[float, int]:
    """Seconds of backbone work per video: copies of ``item`` enough to fill a batch (at most a block,
    the unit extraction batches within), run through the layout's own block computation after one
    warm-up (CUDA context, kernel selection)."""
    per_video = math.prod(item["images"].shape[:-3])
    copies = min(cfg.chunk_videos, -(-cfg.batch_size // per_video))
    _block_of(layout, forward, item, 1)
    t0 = time.perf_counter()
    _block_of(layout, forward, item, copies)  # returns numpy: the device has finished
    return (time.perf_counter() - t0) / copies, copies


def time_lines(cfg: ExtractConfig, layout, forward: BlockForward, root: Path, videos: list[str],
               todo: int) -> list[str]:
    """The time estimate for ``todo`` videos, and how it was made."""
    item, decode, error = _probe(layout, root, videos)
    if item is None:
        return [f"time      not estimated: none of the first {min(PROBES, len(videos))} videos decodes ({error})"]
    fwd, copies = _forward_seconds(layout, forward, item, cfg)
    workers = decode_workers(cfg, forward.device.type)
    computing, decoding = todo * fwd, todo * decode / max(1, workers)
    # decoding runs in DataLoader workers beside the forward passes; without workers it runs in turn
    total = max(computing, decoding) if workers else computing + decoding
    rule = f"max of the two (decoding in {workers} worker(s) overlaps the forward)" if workers else \
        "their sum (no decoding workers: decoding and forward alternate)"
    return [
        f"time      about {duration(total)} for {todo:,} videos on {forward.device}; start-up and writing not counted",
        f"          forward {fwd:.3f} s/video x {todo:,} = {duration(computing)} (timed: {copies} cop"
        f"{'y' if copies == 1 else 'ies'} of {item['video']}, batch {cfg.batch_size}, after a warm-up)",
        f"          decode  {decode:.3f} s/video x {todo:,} / {max(1, workers)} = {duration(decoding)} "
        f"(timed on {item['video']}); estimate: {rule}",
    ]


def dry_run_report(cfg: ExtractConfig) -> tuple[list[str], str | None]:
    """What ``extract(cfg)`` would write and about how long it would take: report lines, and a
    warning when the target filesystem lacks the space. Nothing is written."""
    check_config(cfg)
    root, videos = discover_videos(cfg.videos, cfg.root)
    device = resolve_device(cfg.device)
    backbone = load_backbone(cfg.backbone, cfg.weights, device=device, arch=cfg.arch)
    layout = make_layout(cfg, backbone)
    settings = layout.settings(videos)
    arrays, written = declared_arrays(settings, videos)
    sizes = [s for name in sorted(arrays) if (s := array_size(name, arrays[name])) is not None]
    total = sum(s.nbytes for s in sizes) + written
    chunks = sum(a.nchunks for a in arrays.values())
    todo = shard_videos(len(videos), cfg.chunk_videos, cfg.shard)
    lines = [
        "dry run: nothing extracted, nothing written",
        f"store     {cfg.out} ({cfg.layout} layout, {len(videos):,} videos, {cfg.views} views, "
        f"{settings.num_blocks:,} blocks of {cfg.chunk_videos})",
        *([f"note      {cfg.out} exists: size and time count the whole store; --resume skips finished blocks"]
          if cfg.out.exists() else []),
        *(f"array     {s.name} {list(s.shape)} {s.dtype}: {s.nbytes:,} bytes in {s.chunks:,} chunks" for s in sizes),
        f"written   {written:,} bytes at creation (metadata, attributes, video list)",
        f"size      {total:,} bytes ({gib(total)}) in {chunks:,} chunk files "
        "(uncompressed, edge chunks whole; the manifest beside the store not counted)",
        f"shard     {cfg.shard[0]}/{cfg.shard[1]}: {todo:,} of {len(videos):,} videos",
    ]
    lines += time_lines(cfg, layout, BlockForward(backbone, cfg, device), root, videos, todo)
    return lines, space_warning(cfg.out, total)
