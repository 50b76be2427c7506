"""VIP semantic part propagation: predictions of every annotated frame and mean IoU over 20 classes.

One confusion matrix gathers every frame of every video, frame 0 included (its prediction is its
ground truth), at ground-truth resolution. Writes ``<out>/predictions/<video>/<frame>.png``,
``per_class.csv`` and ``summary.json`` (``mIoU`` and per-class IoU, 0-1 scale).
"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from cosettle.core.atomic import write_atomic, write_csv
from cosettle.eval.cli_options import CONTEXT, one_line_errors
from cosettle.eval.frame.datasets import vip_videos
from cosettle.eval.frame.palette import read_indexed_png, save_indexed_png
from cosettle.eval.frame.propagation import segment_video
from cosettle.eval.frame.propagation_task import config_from_cli, propagation_options, propagation_task
from cosettle.eval.frame.run import EvalConfig, open_source, write_json, write_record
from cosettle.eval.frame.segmentation_metrics import VIP_CLASSES, confusion_matrix, miou
from cosettle.eval.task import register

# The task's defaults (560x560, a 35x35 grid at stride 16).
DEFAULT_PRESET = "dino"
INPUT_SIZE = (560, 560)

NUM_CLASSES = len(VIP_CLASSES)


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def evaluate_vip(cfg: EvalConfig, split: str = "val") -> dict:
    """Propagate every video's frame-0 parts, write the predictions and score mIoU."""
    videos = vip_videos(cfg.root, split)
    source, record = open_source(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for video in tqdm(videos, desc="VIP", unit="video", disable=None):
        out_dir = Path(cfg.out) / "predictions" / video.name
        first = read_indexed_png(video.labels[0])
        save_indexed_png(out_dir / f"{video.frames[0].stem}.png", first)
        conf += confusion_matrix(first, first, NUM_CLASSES)
        sizes = [_size(p) for p in video.labels[1:]]
        masks = segment_video(source.features("vip", video), first, cfg.settings, source.patch, sizes)
        for frame, label, ids in zip(video.frames[1:], video.labels[1:], masks, strict=True):
            save_indexed_png(out_dir / f"{frame.stem}.png", ids)
            conf += confusion_matrix(read_indexed_png(label), ids, NUM_CLASSES)
    per_class, mean = miou(conf)
    # a class absent from both ground truth and predictions has no IoU (null in the JSON)
    summary = {"mIoU": mean, "IoU": {name: (float(v) if np.isfinite(v) else None) for name, v in zip(VIP_CLASSES, per_class)}}
    write_csv(Path(cfg.out) / "per_class.csv", [["class", "IoU"], *zip(VIP_CLASSES, per_class.tolist())])
    write_atomic(Path(cfg.out) / "confusion.csv", lambda tmp: np.savetxt(tmp, conf, fmt="%d", delimiter=","))
    write_json(Path(cfg.out) / "summary.json", summary)
    write_record(cfg.out, "vip", {**record, "split": split}, summary)
    return summary


def format_table(summary: dict) -> str:
    """Per-class IoU then mIoU, one per line, 3 decimals."""
    width = max(len(name) for name in summary["IoU"])
    lines = [f"{name.ljust(width)}  {'n/a' if value is None else f'{value:.3f}'}" for name, value in summary["IoU"].items()]
    return "\n".join(lines + [f"{'mIoU'.ljust(width)}  {summary['mIoU']:.3f}"])


@click.command(context_settings=CONTEXT)
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="VIP_Fine folder (Images/, Annotations/Category_ids/, lists/).")
@click.option("--split", default="val", help="Video list lists/<split>_videos.txt.")
@propagation_options
@one_line_errors
def command(**kw) -> None:
    """VIP part propagation (560x560): per-class IoU and mIoU over all frames, frame 0 included."""
    split = kw.pop("split")
    summary = evaluate_vip(config_from_cli(kw, DEFAULT_PRESET, {"size": INPUT_SIZE}), split)
    click.echo(format_table(summary))


register(propagation_task("vip", "VIP human part propagation (mIoU)", command, evaluate_vip, DEFAULT_PRESET,
                          {"size": INPUT_SIZE}, {"split": "val"}))
