"""Stage one: run a frozen backbone over sampled views of every video and fill a feature store.

Decoding and the view transforms run in DataLoader workers (on CUDA; on the CPU, where the forward
uses every core, in turn with it: ``decode_workers``), the forward pass in the main process (batched,
under the ``--amp`` autocast, ``cosettle.core.precision``; a batch runs as soon as the videos decoded
so far fill it), and block writes in a background thread.
Work is split into blocks of ``chunk_videos`` videos; shard i of n owns blocks c with c % n == i.

What is sampled and stored is a *layout*: ``ViewsLayout`` here (Co-Settle's frame pairs, arrays
a, b, a_asy) or ``clip_extract.ClipsLayout`` (clip pairs for VTHCL and CSTP); both provide the
store settings, the per-video dataset, a block's arrays and its manifest, and share everything else.
"""
from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cosettle.core.devices import resolve_device
from cosettle.core.precision import autocast, recorded_amp, resolve_amp

from .backbones import Backbone, load_backbone
from .clip_extract import ClipsLayout
from .extract_config import ExtractConfig, check_config, decode_workers
from .store import FeatureStore, create_or_open
from .store_settings import TOKEN_ARRAYS, StoreSettings, videos_digest
from .transforms import apply_view
from .videos import VideoError, discover_videos, open_video
from .views import CROP_RATIO, CROP_SCALE, View, sample_views, video_rng

__all__ = ["BatchStream", "BlockForward", "ExtractConfig", "MANIFEST_SCHEMA", "VideoViews", "ViewsBlock",
           "ViewsLayout", "extract", "store_settings"]


class VideoViews(Dataset):
    """Item i: the K sampled views of one video, as pixels ready for the backbone, or the error."""

    def __init__(self, root: Path, videos: list[tuple[int, str]], cfg: ExtractConfig, image_size: int, grid: int):
        self.root, self.videos, self.cfg = root, videos, cfg
        self.image_size, self.grid = image_size, grid

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        index, rel = self.videos[i]
        item = {"video_index": index, "video": rel, "num_frames": None, "views": None, "images": None, "error": None}
        try:
            video = open_video(self.root / rel)
            item["num_frames"] = len(video)
            views = sample_views(
                len(video), self.cfg.views, video_rng(self.cfg.seed, rel), image_size=self.image_size,
                grid=self.grid, asy_ratio=self.cfg.asy_ratio, clip_gap=self.cfg.clip_gap,
            )
            wanted = sorted({f for v in views for f in (v.frame_a, v.frame_b)})
            frames = dict(zip(wanted, video.get(wanted)))
            item["images"] = torch.stack(
                [apply_view(np.stack([frames[v.frame_a], frames[v.frame_b]]), v, self.image_size) for v in views]
            )  # [K, 2, 3, S, S]
            item["views"] = views
        except VideoError as e:
            item["error"] = str(e)
        return item


def _manifest_rows(item: dict, k: int, status: str) -> list[dict]:
    views: list[View] | None = item["views"]
    rows = []
    for j in range(k):
        row = {"video_index": item["video_index"], "video": item["video"], "view": j,
               "num_frames": item["num_frames"], "status": status}
        row.update(views[j].as_row() if views else dict.fromkeys(View.__dataclass_fields__))
        rows.append(row)
    return rows


MANIFEST_SCHEMA = pa.schema([
    ("video_index", pa.int64()), ("video", pa.string()), ("view", pa.int32()), ("num_frames", pa.int64()),
    ("status", pa.string()), ("frame_a", pa.int64()), ("frame_b", pa.int64()), ("crop_top", pa.int32()),
    ("crop_left", pa.int32()), ("crop_h", pa.int32()), ("crop_w", pa.int32()), ("flip", pa.bool_()),
    ("asy_oy", pa.int32()), ("asy_ox", pa.int32()),
])


class BlockForward:
    """Runs the backbone in fixed-size batches (under the autocast), in the store dtype."""

    def __init__(self, backbone: Backbone, cfg: ExtractConfig, device: torch.device):
        self.backbone, self.cfg, self.device = backbone, cfg, device
        self.amp = resolve_amp(cfg.amp, device)  # effective: "none", "bf16" or "fp16"

    def __call__(self, images: torch.Tensor, offsets: torch.Tensor | None) -> np.ndarray:
        """Patch tokens [N, T, D] of images [N, 3, S, S], asymmetric offsets [N, 2] or None."""
        return self.map_batches(self.patch_tokens, images, offsets)

    def patch_tokens(self, images: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """One batch's patch tokens (asymmetric where ``offsets`` are given)."""
        return self.backbone.patch_features(images, asy_offset=offsets, asy_ratio=self.cfg.asy_ratio)

    def map_batches(self, fn, images: torch.Tensor, extra: torch.Tensor | None = None) -> np.ndarray:
        """``fn(batch, extra rows or None)`` over batches of all ``images`` at once."""
        stream = self.stream(fn)
        stream.push(images, extra)
        return stream.finish()

    def stream(self, fn) -> BatchStream:
        """A ``BatchStream`` running ``fn`` on this device."""
        return BatchStream(self, fn)

    def run(self, fn, images: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """``fn`` on one batch, under the autocast, back on the CPU in the store dtype."""
        with autocast(self.amp, self.device):
            out = fn(images.to(self.device, non_blocking=True), extra)
        return out.to(getattr(torch, self.cfg.array_dtype)).cpu()


class BatchStream:
    """``fn`` over batches of images pushed a few at a time, each batch run as soon as it is full.

    The batches are those of the concatenation of everything pushed, cut every ``batch_size`` rows,
    so outputs do not depend on how the images arrived; videos are pushed as they are decoded, so the
    forward starts on the first full batch instead of after a whole block.
    """

    def __init__(self, forward: BlockForward, fn):
        self.forward, self.fn = forward, fn
        self.images: list[torch.Tensor] = []
        self.extra: list[torch.Tensor] = []  # rows pushed with the images, or none at all
        self.out: list[torch.Tensor] = []

    @property
    def queued(self) -> int:
        """Images pushed and not yet run."""
        return sum(len(part) for part in self.images)

    def push(self, images: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        """Queue images (and their ``extra`` rows); run every batch that is now full."""
        self.images.append(images)
        if extra is not None:
            self.extra.append(extra)
        while self.queued >= self.forward.cfg.batch_size:
            self._run(self.forward.cfg.batch_size)

    def finish(self) -> np.ndarray:
        """Run what is left; every output in push order."""
        if self.queued:
            self._run(self.queued)
        return torch.cat(self.out).numpy() if self.out else np.zeros((0,))

    def _run(self, n: int) -> None:
        images, self.images = _take(self.images, n)
        extra, self.extra = _take(self.extra, n) if self.extra else (None, [])
        self.out.append(self.forward.run(self.fn, images, extra))


def _take(parts: list[torch.Tensor], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first ``n`` rows of the parts' concatenation, and the parts after them (views: only the
    rows of a batch that spans several parts are copied, so one large push costs no copies)."""
    taken, cut = [], 0
    while cut < len(parts) and n >= len(parts[cut]):
        n -= len(parts[cut])
        taken.append(parts[cut])
        cut += 1
    rest = parts[cut:]
    if n:
        taken.append(rest[0][:n])
        rest[0] = rest[0][n:]
    return (taken[0] if len(taken) == 1 else torch.cat(taken)), rest


class ViewsBlock:
    """A block's A, B and A_asy tokens [K, rows, T, D], filled video by video (zeros for skipped ones)."""

    def __init__(self, layout: ViewsLayout, forward: BlockForward, rows: int, lo: int):
        self.layout, self.rows, self.lo = layout, rows, lo
        self.ab = forward.stream(forward.patch_tokens)  # frames a and b of every view
        self.asy = forward.stream(forward.patch_tokens)  # frame a with its asymmetric offset
        self.cols: list[int] = []

    def add(self, item: dict) -> None:
        if item["error"] is not None:
            return
        self.cols.append(item["video_index"] - self.lo)
        self.ab.push(item["images"].flatten(0, 1))  # [K*2, 3, S, S]
        self.asy.push(item["images"][:, 0], torch.tensor([[v.asy_oy, v.asy_ox] for v in item["views"]]))

    def arrays(self) -> dict[str, np.ndarray]:
        bb, k = self.layout.backbone, self.layout.cfg.views
        shape = (bb.grid * bb.grid, bb.dim)
        tokens = {name: np.zeros((k, self.rows) + shape, dtype=self.layout.cfg.array_dtype) for name in TOKEN_ARRAYS}
        if not self.cols:
            return tokens
        g = len(self.cols)
        ab = self.ab.finish().reshape((g, k, 2) + shape)
        asy = self.asy.finish().reshape((g, k) + shape)
        tokens["a"][:, self.cols] = ab[:, :, 0].swapaxes(0, 1)
        tokens["b"][:, self.cols] = ab[:, :, 1].swapaxes(0, 1)
        tokens["a_asy"][:, self.cols] = asy.swapaxes(0, 1)
        return tokens


def store_settings(cfg: ExtractConfig, backbone: Backbone, videos: list[str],
                   autocast: str | None = None) -> StoreSettings:
    """The settings a store of this run must have (every shard computes the same); ``autocast`` as
    ``recorded_amp`` gives it (None: the device's default)."""
    return StoreSettings(
        backbone=backbone.name, weights=backbone.weights, weights_sha256=backbone.weights_sha256,
        image_size=backbone.image_size, grid=backbone.grid, dim=backbone.dim, dtype=cfg.dtype, views=cfg.views,
        clip_gap=cfg.clip_gap, crop_scale=CROP_SCALE, crop_ratio=CROP_RATIO, asy_ratio=cfg.asy_ratio,
        seed=cfg.seed, num_videos=len(videos), videos_sha256=videos_digest(videos),
        chunk_videos=cfg.chunk_videos, compressor=cfg.compressor, final_norm=backbone.final_norm, autocast=autocast,
    )


class ViewsLayout:
    """Store settings, dataset, block arrays and manifest of a views store (Co-Settle's A, B, A_asy)."""

    name = "views"
    prefetch = 4  # items per DataLoader worker

    def __init__(self, cfg: ExtractConfig, backbone: Backbone, autocast: str | None = None):
        self.cfg, self.backbone, self.autocast = cfg, backbone, autocast

    def settings(self, videos: list[str]) -> StoreSettings:
        return store_settings(self.cfg, self.backbone, videos, self.autocast)

    def dataset(self, root: Path, todo: list[tuple[int, str]]) -> Dataset:
        return VideoViews(root, todo, self.cfg, self.backbone.image_size, self.backbone.grid)

    def block(self, forward: BlockForward, rows: int, lo: int) -> ViewsBlock:
        """An empty block of ``rows`` videos from ``lo`` on, to ``add`` decoded videos to."""
        return ViewsBlock(self, forward, rows, lo)

    def manifest(self, items: list[dict], statuses: list[str]) -> pa.Table:
        rows = [r for it, status in zip(items, statuses) for r in _manifest_rows(it, self.cfg.views, status)]
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def make_layout(cfg: ExtractConfig, backbone: Backbone, autocast: str | None = None) -> ViewsLayout | ClipsLayout:
    """The layout ``cfg`` asks for (``autocast``: what its settings record, ``recorded_amp``); refuses
    settings the backbone cannot do (e.g. cls without a class token)."""
    return (ClipsLayout if cfg.layout == "clips" else ViewsLayout)(cfg, backbone, autocast)


def extract(cfg: ExtractConfig) -> FeatureStore:
    """Fill (this shard's part of) the store at ``cfg.out``; returns the open store."""
    check_config(cfg)
    index, count = cfg.shard
    root, videos = discover_videos(cfg.videos, cfg.root)
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)  # refused before anything is loaded
    backbone = load_backbone(cfg.backbone, cfg.weights, device=device, arch=cfg.arch)
    layout = make_layout(cfg, backbone, recorded_amp(amp, device))
    store = create_or_open(cfg.out, layout.settings(videos), videos, resume=cfg.resume, overwrite=cfg.overwrite,
                           join=count > 1, default_autocast=resolve_amp("auto", device))
    done = store.finished_blocks()
    blocks = [c for c in range(store.num_blocks) if c % count == index and not done[c]]
    todo = [(i, videos[i]) for c in blocks for i in range(*store.block_rows(c))]
    if not todo:
        tqdm.write(f"{cfg.out}: shard {index}/{count} has nothing left to do")
        store.mark_complete_if_done()
        return store

    workers = decode_workers(cfg, device.type)
    loader = DataLoader(
        layout.dataset(root, todo), batch_size=None, shuffle=False,
        num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=layout.prefetch if workers else None,
    )
    forward = BlockForward(backbone, cfg, device)
    skipped = 0
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as writer, tqdm(total=len(todo), unit="video", desc=backbone.name,
                                                           file=sys.stderr) as bar:
        stream = iter(loader)
        for c in blocks:
            lo, hi = store.block_rows(c)
            block, items = layout.block(forward, hi - lo, lo), []
            for _ in range(hi - lo):
                item = next(stream)
                if item["error"] is not None:
                    skipped += 1
                    bar.write(f"warning: skipped {item['error']}")
                block.add(item)  # runs every batch this video completes
                items.append(dict(item, images=None))  # pixels are queued in the block now
            arrays = block.arrays()
            bar.update(hi - lo)  # after the forward pass, so videos/s and the ETA count finished work
            valid = np.array([it["error"] is None for it in items])
            manifest = layout.manifest(items, ["ok" if it["error"] is None else f"skipped: {it['error']}"
                                               for it in items])
            while pending and (pending[0].done() or len(pending) >= 2):  # surface errors, bound memory
                pending.pop(0).result()
            pending.append(writer.submit(store.write_block, c, arrays, valid, manifest))
        for f in pending:
            f.result()
    if store.mark_complete_if_done():
        tqdm.write(f"{cfg.out}: complete ({len(videos)} videos, {skipped} skipped by this run)")
    else:
        tqdm.write(f"{cfg.out}: shard {index}/{count} done ({skipped} skipped); other shards still running")
    return store
