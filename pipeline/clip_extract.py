"""The clips layout of stage one: K sampled clip pairs per video, pooled per frame at several depths.

Plugged into ``extract.extract`` (store creation and joining, blocks, shards, resume, DataLoader
workers, background writer) as ``ClipsLayout``; the sampling rules are in ``clips``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from .backbones import Backbone
from .clips import LABELS, ClipPair, plan_params, sample_pairs
from .extract_config import ExtractConfig
from .pooling import pooled_dim
from .store_settings import ClipStoreSettings, videos_digest
from .transforms import apply_clip, squash
from .videos import VideoError, open_video
from .views import CROP_RATIO, CROP_SCALE, video_rng

_BOX = ("top", "left", "h", "w")
CLIP_MANIFEST_SCHEMA = pa.schema(
    [("video_index", pa.int64()), ("video", pa.string()), ("view", pa.int32()), ("num_frames", pa.int64()),
     ("status", pa.string()), ("frames_1", pa.list_(pa.int64())), ("frames_2", pa.list_(pa.int64())),
     ("rate_1", pa.int32()), ("rate_2", pa.int32())]
    + [(f"range_{i}_{k}", pa.int64()) for i in (1, 2) for k in ("start", "stop")]
    + [(f"box_{i}_{k}", pa.int32()) for i in (1, 2) for k in _BOX]
    + [("rotation_deg_1", pa.int32()), ("rotation_deg_2", pa.int32())]
    + [(name, pa.int16()) for name in LABELS]
)


class VideoClips(Dataset):
    """Item i: the K sampled pairs of one video as pixels [K, 2, T, 3, S, S] ready for the backbone."""

    def __init__(self, root: Path, videos: list[tuple[int, str]], cfg: ExtractConfig, image_size: int, params: dict):
        self.root, self.videos, self.cfg = root, videos, cfg
        self.image_size, self.params = image_size, params

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        index, rel = self.videos[i]
        item = {"video_index": index, "video": rel, "num_frames": None, "pairs": None, "images": None, "error": None}
        try:
            video = open_video(self.root / rel)
            item["num_frames"] = len(video)
            cfg, size = self.cfg, self.image_size
            pairs = sample_pairs(cfg.plan, len(video), cfg.views, video_rng(cfg.seed, rel), frames=cfg.clip_frames,
                                 image_size=size, params=self.params, crop_scale=CROP_SCALE, crop_ratio=CROP_RATIO)
            wanted = sorted({f for p in pairs for f in p.frames_1 + p.frames_2})
            squashed = squash(video.get(wanted), size)  # each decoded frame resized once
            at = {f: j for j, f in enumerate(wanted)}

            def clip(frames, box, rotation):
                return apply_clip(squashed[[at[f] for f in frames]], box, rotation, size)

            item["images"] = torch.stack([
                torch.stack([clip(p.frames_1, p.box_1, p.rotation_deg_1), clip(p.frames_2, p.box_2, p.rotation_deg_2)])
                for p in pairs
            ])  # [K, 2, T, 3, S, S]
            item["pairs"] = pairs
        except VideoError as e:
            item["error"] = str(e)
        return item


class ClipsLayout:
    """Store settings, dataset, block arrays and manifest of a clips store."""

    name = "clips"
    prefetch = 2  # items per DataLoader worker (an item holds K * 2 * T images)

    def __init__(self, cfg: ExtractConfig, backbone: Backbone, autocast: str | None = None):
        self.cfg, self.backbone, self.autocast = cfg, backbone, autocast  # recorded_amp's: None for the default
        backbone.check_pooling(cfg.pooling)
        self.levels = backbone.check_levels(cfg.levels if cfg.levels is not None else (backbone.depth,))
        self.params = plan_params(cfg.plan, cfg.slow_stride, cfg.fast_stride)
        self.dim = pooled_dim(backbone.dim, cfg.pooling)

    def settings(self, videos: list[str]) -> ClipStoreSettings:
        cfg, bb = self.cfg, self.backbone
        return ClipStoreSettings(
            backbone=bb.name, weights=bb.weights, weights_sha256=bb.weights_sha256, image_size=bb.image_size,
            depth=bb.depth, backbone_dim=bb.dim, plan=cfg.plan, plan_params=self.params, frames=cfg.clip_frames,
            levels=self.levels, pooling=cfg.pooling, dim=self.dim, dtype=cfg.dtype, views=cfg.views,
            crop_scale=CROP_SCALE, crop_ratio=CROP_RATIO, seed=cfg.seed, num_videos=len(videos),
            videos_sha256=videos_digest(videos), chunk_videos=cfg.chunk_videos, compressor=cfg.compressor,
            final_norm=bb.final_norm, autocast=self.autocast,
        )

    def dataset(self, root: Path, todo: list[tuple[int, str]]) -> Dataset:
        return VideoClips(root, todo, self.cfg, self.backbone.image_size, self.params)

    def block(self, forward, rows: int, lo: int) -> ClipsBlock:
        """An empty block of ``rows`` videos from ``lo`` on, to ``add`` decoded videos to."""
        return ClipsBlock(self, forward, rows, lo)

    def manifest(self, items: list[dict], statuses: list[str]) -> pa.Table:
        rows = []
        for it, status in zip(items, statuses):
            pairs: list[ClipPair] | None = it["pairs"]
            for j in range(self.cfg.views):
                row = {"video_index": it["video_index"], "video": it["video"], "view": j,
                       "num_frames": it["num_frames"], "status": status}
                row.update(pairs[j].as_row() if pairs else dict.fromkeys(CLIP_MANIFEST_SCHEMA.names[5:]))
                rows.append(row)
        return pa.Table.from_pylist(rows, schema=CLIP_MANIFEST_SCHEMA)


class ClipsBlock:
    """A block's ``tokens`` [K, rows, 2, T, L, D'] and ``labels`` [K, rows, 6], filled video by video
    (zeros and -1 for skipped videos); batches run as the videos arrive (``extract.BatchStream``)."""

    def __init__(self, layout: ClipsLayout, forward, rows: int, lo: int):
        self.layout, self.rows, self.lo = layout, rows, lo
        self.vectors = forward.stream(lambda x, _: layout.backbone.level_vectors(x, layout.levels, layout.cfg.pooling))
        self.cols: list[int] = []
        self.labels: list[list[tuple]] = []

    def add(self, item: dict) -> None:
        if item["error"] is not None:
            return
        self.cols.append(item["video_index"] - self.lo)
        self.labels.append([p.labels for p in item["pairs"]])
        self.vectors.push(item["images"].flatten(0, 2))  # [K*2*T, 3, S, S]

    def arrays(self) -> dict[str, np.ndarray]:
        cfg, k = self.layout.cfg, self.layout.cfg.views
        shape = (2, cfg.clip_frames, len(self.layout.levels), self.layout.dim)
        out = {"tokens": np.zeros((k, self.rows) + shape, dtype=cfg.array_dtype),
               "labels": np.full((k, self.rows, len(LABELS)), -1, dtype=np.int16)}
        if not self.cols:
            return out
        vectors = self.vectors.finish().reshape((len(self.cols), k) + shape)
        out["tokens"][:, self.cols] = vectors.swapaxes(0, 1)
        out["labels"][:, self.cols] = np.array(self.labels, dtype=np.int16).swapaxes(0, 1)
        return out
