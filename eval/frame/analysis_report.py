"""The release's consistency-versus-separability analysis over a set of videos (COSETTLE_METHOD.md
section 7), for the frozen backbone and, beside it, a projection of the same features.

Frames are resized (short side 256, bilinear with antialiasing, as torchvision's Resize) and
centre-cropped to the backbone's training size, normalised with the ImageNet statistics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cosettle.core.atomic import write_csv
from cosettle.eval.frame.analysis import (
    cycle_accuracy,
    diameter,
    effective_rank,
    inter_video_distance,
    intra_video_distance,
)
from cosettle.pipeline.backbones import Backbone
from cosettle.pipeline.transforms import normalize, to_float
from cosettle.pipeline.videos import open_video

RESIZE = 256
PERCENTILES = (90, 95, 100)


def clip_input(frames: np.ndarray, crop: int, resize: int = RESIZE) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalised [T, 3, crop, crop]: torchvision's Resize(resize) (long
    side int(resize * long / short)) then CenterCrop(crop) (offset round((side - crop) / 2))."""
    x = to_float(frames)
    h, w = x.shape[-2:]
    size = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    return normalize(x[:, :, top : top + crop, left : left + crop])


def video_features(path: Path, backbone: Backbone, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Backbone patch features [T, N, D] (float32, on ``device``) of every frame of a video."""
    video = open_video(path)
    frames = video.get(list(range(len(video))))
    x = clip_input(frames, backbone.image_size)
    return torch.cat([backbone.patch_features(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)])


class _Columns:
    """Running per-video statistics of one feature variant, reduced to the table's metrics at the end."""

    def __init__(self):
        self.mids: list[torch.Tensor] = []
        self.per_video: dict[str, list[float]] = {}

    def add(self, feats: torch.Tensor) -> None:
        feats = feats.double().cpu()
        mid = feats[feats.shape[0] // 2]
        self.mids.append(mid)
        intra = intra_video_distance(feats)
        patches = feats.reshape(-1, feats.shape[-1])
        values = {"intra_video_distance": intra, "effective_rank": effective_rank(mid),
                  "cycle_accuracy": cycle_accuracy(feats)}
        for p in PERCENTILES:
            values[f"intra_video_distance/diameter@{p}"] = intra / diameter(patches, p)
        for k, v in values.items():
            self.per_video.setdefault(k, []).append(v)

    def result(self) -> dict[str, float]:
        mids = torch.stack(self.mids)
        inter = inter_video_distance(mids)
        out = {"inter_video_distance": inter}
        pooled = mids.reshape(-1, mids.shape[-1])
        for p in PERCENTILES:
            out[f"inter_video_distance/diameter@{p}"] = inter / diameter(pooled, p)
        out |= {k: float(np.mean(v)) for k, v in self.per_video.items()}
        return out


def analyse(videos: list[Path], backbone: Backbone, projection: torch.nn.Module | None, device: torch.device,
            batch_size: int = 64) -> dict[str, dict[str, float]]:
    """{"baseline": metrics, "projection": metrics (when given)} over ``videos`` (at least 2)."""
    columns = {"baseline": _Columns()} | ({"projection": _Columns()} if projection is not None else {})
    for path in tqdm(videos, desc="metrics", unit="video", disable=None):
        feats = video_features(path, backbone, device, batch_size)
        columns["baseline"].add(feats)
        if projection is not None:
            with torch.no_grad():
                columns["projection"].add(projection(feats))
    return {name: col.result() for name, col in columns.items()}


def write_table(results: dict[str, dict[str, float]], path: Path) -> None:
    """CSV with one row per metric and one column per variant."""
    names = list(results)
    write_csv(path, [["metric", *names], *([metric, *(results[n][metric] for n in names)] for metric in results[names[0]])])


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One line per metric, one column per results set, 4 decimals."""
    names = list(results)
    width = max(len(m) for m in results[names[0]])
    lines = [" " * width + "".join(n.rjust(12) for n in names)]
    for metric in results[names[0]]:
        lines.append(metric.ljust(width) + "".join(f"{results[n][metric]:12.4f}" for n in names))
    return "\n".join(lines)
