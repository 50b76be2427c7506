"""Stage one: run a frozen backbone over sampled views of every video and fill a feature store.

Decoding and the view transforms run in DataLoader workers, the forward pass in the main process
(batched, under the ``--amp`` autocast, ``cosettle.core.precision``), and block writes in a background
thread, so the three overlap.
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
from .extract_config import ExtractConfig, check_config
from .store import FeatureStore, create_or_open
from .store_settings import TOKEN_ARRAYS, StoreSettings, videos_digest
from .transforms import apply_view
from .videos import VideoError, discover_videos, open_video
from .views import CROP_RATIO, CROP_SCALE, View, sample_views, video_rng

__all__ = ["BlockForward", "ExtractConfig", "MANIFEST_SCHEMA", "VideoViews", "ViewsLayout",
           "extract", "store_settings"]


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
    """Runs the backbone over a block's images in fixed-size batches."""

    def __init__(self, backbone: Backbone, cfg: ExtractConfig, device: torch.device):
        self.backbone, self.cfg, self.device = backbone, cfg, device
        self.amp = resolve_amp(cfg.amp, device)  # effective: "none", "bf16" or "fp16"

    def __call__(self, images: torch.Tensor, offsets: torch.Tensor | None) -> np.ndarray:
        """Patch tokens [N, T, D] of images [N, 3, S, S], asymmetric offsets [N, 2] or None."""
        return self.map_batches(
            lambda x, off: self.backbone.patch_features(x, asy_offset=off, asy_ratio=self.cfg.asy_ratio), images, offsets
        )

    def map_batches(self, fn, images: torch.Tensor, extra: torch.Tensor | None = None) -> np.ndarray:
        """``fn(batch, extra rows or None)`` over batches of images (under the autocast), in the store dtype."""
        out = []
        for s in range(0, len(images), self.cfg.batch_size):
            x = images[s : s + self.cfg.batch_size].to(self.device, non_blocking=True)
            e = None if extra is None else extra[s : s + self.cfg.batch_size]
            with autocast(self.amp, self.device):
                f = fn(x, e)
            out.append(f.to(getattr(torch, self.cfg.array_dtype)).cpu())
        return torch.cat(out).numpy()


def _block_tokens(items: list[dict], forward: BlockForward, k: int, rows: int, lo: int, shape: tuple, dtype: str):
    """Tokens [K, rows, T, D] for A, B and A_asy of the good videos of a block."""
    tokens = {name: np.zeros((k, rows) + shape, dtype=dtype) for name in TOKEN_ARRAYS}
    good = [it for it in items if it["error"] is None]
    if not good:
        return tokens
    images = torch.cat([it["images"] for it in good])  # [G*K, 2, 3, S, S]
    offsets = torch.tensor([[v.asy_oy, v.asy_ox] for it in good for v in it["views"]])
    ab = forward(images.flatten(0, 1), None).reshape((len(good), k, 2) + shape)
    asy = forward(images[:, 0], offsets).reshape((len(good), k) + shape)
    cols = [it["video_index"] - lo for it in good]
    tokens["a"][:, cols] = ab[:, :, 0].swapaxes(0, 1)
    tokens["b"][:, cols] = ab[:, :, 1].swapaxes(0, 1)
    tokens["a_asy"][:, cols] = asy.swapaxes(0, 1)
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

    def block_arrays(self, items: list[dict], forward: BlockForward, rows: int, lo: int) -> dict[str, np.ndarray]:
        shape = (self.backbone.grid * self.backbone.grid, self.backbone.dim)
        return _block_tokens(items, forward, self.cfg.views, rows, lo, shape, self.cfg.array_dtype)

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

    loader = DataLoader(
        layout.dataset(root, todo), batch_size=None, shuffle=False,
        num_workers=cfg.workers, pin_memory=device.type == "cuda", prefetch_factor=layout.prefetch if cfg.workers else None,
    )
    forward = BlockForward(backbone, cfg, device)
    skipped = 0
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as writer, tqdm(total=len(todo), unit="video", desc=backbone.name,
                                                           file=sys.stderr) as bar:
        stream = iter(loader)
        for c in blocks:
            lo, hi = store.block_rows(c)
            items = []
            for _ in range(hi - lo):
                item = next(stream)
                if item["error"] is not None:
                    skipped += 1
                    bar.write(f"warning: skipped {item['error']}")
                items.append(item)
            arrays = layout.block_arrays(items, forward, hi - lo, lo)
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
