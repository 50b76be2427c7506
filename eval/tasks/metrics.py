"""The consistency-versus-separability analysis (COSETTLE_METHOD.md section 7) as a task: the
frozen backbone's columns, and beside them a trained projection's, over a set of videos.

Writes ``metrics.csv`` (one row per metric, one column per variant) and ``metrics.json``.
"""
from __future__ import annotations

from pathlib import Path

import click
import torch

from cosettle.core.devices import resolve_device
from cosettle.core.provenance import environment, now_utc
from cosettle.eval.cli_options import CONTEXT, backbone_options, one_line_errors, projection_path
from cosettle.eval.frame import analysis_report
from cosettle.eval.frame.run import write_json
from cosettle.eval.task import EvalTask, TaskContext, register
from cosettle.eval.trained_run import open_run
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.videos import discover_videos

BATCH_SIZE = 64


def evaluate_metrics(videos: Path, root: Path | None, out: Path, backbone: str, weights: str,
                     projection: Path | None = None, device: str = "auto", batch_size: int = BATCH_SIZE,
                     arch: dict | None = None) -> dict[str, dict[str, float]]:
    """{"baseline": metrics, "projection": metrics (with a run)} over the videos; written into ``out``."""
    base, paths = discover_videos(videos, root)
    if len(paths) < 2:
        raise ValueError(f"{videos}: the analysis needs at least 2 videos, found {len(paths)}")
    dev = resolve_device(device)
    model = load_backbone(backbone, weights, device=dev, arch=arch)
    module, info = open_run(projection, model, dev) if projection is not None else (None, None)
    with torch.no_grad():
        results = analysis_report.analyse([base / p for p in paths], model, module, dev, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    analysis_report.write_table(results, out / "metrics.csv")
    write_json(out / "metrics.json", {
        "results": results, "videos": len(paths), "backbone": {"name": model.name, "weights": model.weights,
                                                                 "weights_sha256": model.weights_sha256},
        "projection": info, "environment": environment(), "finished": now_utc()})
    return results


@click.command(context_settings=CONTEXT)
@click.option("--videos", required=True, type=click.Path(exists=True, path_type=Path),
              help="A directory to scan (video files and frame folders) or a list file, one path per line.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base of the relative paths in the list file (default: the list's folder).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Results folder.")
@backbone_options
@one_line_errors
def command(videos, root, out, backbone, weights, projection, device, batch_size, arch) -> None:
    """Inter/intra-video distances, effective rank and cycle accuracy; baseline and projection side by side."""
    results = evaluate_metrics(videos, root, out, backbone, weights, projection_path(projection), device,
                               batch_size, arch)
    click.echo(analysis_report.format_table(results))


def run(ctx: TaskContext, options: dict) -> dict:
    """The column of the evaluated variant (the trained run's, or the frozen backbone's)."""
    results = evaluate_metrics(ctx.videos, ctx.root, ctx.out, ctx.backbone, ctx.weights, ctx.projection, ctx.device,
                               options["batch_size"], ctx.arch)
    return results["projection" if ctx.projection is not None else "baseline"]


register(EvalTask("metrics", "frame", "consistency and separability of frame features", command, run,
                  {"batch_size": BATCH_SIZE}, data="videos"))
