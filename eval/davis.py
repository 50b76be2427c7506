"""DAVIS-2017 semi-supervised video object segmentation by label propagation.

Predictions are written as ``<out>/predictions/<sequence>/<frame>.png`` (indexed, DAVIS palette;
frame 0 is the ground truth), then scored with the official J&F protocol into ``<out>``
(``summary.json``, ``per_sequence.csv``, ``per_object.csv``).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from cosettle.eval.datasets import Video, davis_videos
from cosettle.eval.davis_score import score_davis
from cosettle.eval.overlays import save_overlays
from cosettle.eval.palette import read_indexed_png, save_indexed_png
from cosettle.eval.propagation import PropagationSettings, segment_video
from cosettle.eval.run import EvalConfig, open_source, write_record


def predict_video(video: Video, features: Iterable[torch.Tensor], settings: PropagationSettings, patch: int,
                  out_dir: Path) -> None:
    """Write ``out_dir/<stem>.png`` for every frame: frame 0 is its ground truth, the others are
    propagated from it at the ground truth's size."""
    first = read_indexed_png(video.labels[0])
    save_indexed_png(out_dir / f"{video.frames[0].stem}.png", first)
    masks = segment_video(features, first, settings, patch)
    for frame, ids in zip(video.frames[1:], masks, strict=True):
        save_indexed_png(out_dir / f"{frame.stem}.png", ids)


def score(root: Path, predictions: Path, out: Path, split: str = "val", year: str = "2017",
          resolution: str = "480p", overlays: bool = False) -> dict:
    """Official J&F of ``predictions`` into ``out``; with ``overlays``, pictures of them in
    ``out/overlays/<sequence>/`` and contact sheets ``out/overlays/<sequence>_sheet.png``."""
    summary = score_davis(root, predictions, out, split, year, resolution)
    if overlays:
        for video in tqdm(davis_videos(root, split, year, resolution), desc="overlays", unit="seq", disable=None):
            preds = [Path(predictions) / video.name / f"{f.stem}.png" for f in video.frames]
            save_overlays(list(video.frames), preds, Path(out) / "overlays" / video.name,
                          Path(out) / "overlays" / f"{video.name}_sheet.png")
    return summary


def evaluate_davis(cfg: EvalConfig, split: str = "val", year: str = "2017", resolution: str = "480p",
                   overlays: bool = False) -> dict:
    """Propagate the first-frame masks of every sequence of the split, write and score them."""
    videos = davis_videos(cfg.root, split, year, resolution)
    source, record = open_source(cfg)
    predictions = Path(cfg.out) / "predictions"
    for video in tqdm(videos, desc="DAVIS", unit="seq", disable=None):
        features = source.features(f"davis/{resolution}", video)
        predict_video(video, features, cfg.settings, source.patch, predictions / video.name)
    summary = score(cfg.root, predictions, cfg.out, split, year, resolution, overlays)
    write_record(cfg.out, "davis", {**record, "split": f"{year}/{split}", "resolution": resolution}, summary)
    return summary
