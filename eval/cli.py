"""cosettle-eval: dense video evaluation by label propagation, and the consistency analysis."""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import click

from cosettle.eval import analysis_report, davis, jhmdb, vip
from cosettle.eval.datasets import DatasetError
from cosettle.eval.davis_score import format_table as davis_table
from cosettle.eval.features import CacheError, projection_provenance
from cosettle.eval.propagation import PRESETS, PropagationSettings, preset
from cosettle.eval.run import EvalConfig, write_json
from cosettle.pipeline.backbones import BACKBONES, load_backbone
from cosettle.pipeline.checkpoints import CheckpointError
from cosettle.pipeline.extract import resolve_device
from cosettle.pipeline.provenance import environment, now_utc
from cosettle.pipeline.videos import VideoError, discover_videos
from cosettle.trainer.projection import ProjectionError, load_projection

ERRORS = (DatasetError, CacheError, CheckpointError, ProjectionError, VideoError, FileNotFoundError, ValueError, KeyError)
CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}


def _one_line_errors(fn):
    """Turn the toolkit's errors (which name the file) into one-line click errors."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ERRORS as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # str() of a KeyError adds quotes
            raise click.ClickException(str(message).splitlines()[0]) from None
    return wrapper


def _parse_size(ctx, param, value):
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HxW, e.g. 480x880") from None
    return h, w


def _parse_arch(ctx, param, value):
    if value is None:
        return None
    try:
        arch = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e})") from None
    if not isinstance(arch, dict):
        raise click.BadParameter("must be a JSON object")
    return arch


def _setting_option(f):
    """A click option for one PropagationSettings field; unset options stay None (keep the preset)."""
    name = "--" + f.name.replace("_", "-")
    default = getattr(PRESETS["dino"], f.name)
    help_text = f.metadata["help"]
    if f.metadata.get("choices"):
        return click.option(name, type=click.Choice(f.metadata["choices"]), default=None, help=help_text)
    if isinstance(default, bool):
        return click.option(f"{name}/--no-{name[2:]}", default=None, help=help_text)
    if isinstance(default, (int, float)):
        return click.option(name, type=type(default), default=None, help=help_text)
    if isinstance(default, tuple):
        return click.option(name, type=float, nargs=len(default), default=None, help=help_text)
    return click.option(name, default=None, callback=_parse_size, help=help_text)


def settings_options(fn: Callable) -> Callable:
    """--preset and one override option per propagation setting."""
    for f in reversed(fields(PropagationSettings)):
        fn = _setting_option(f)(fn)
    return click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                        help="Propagation preset (default: the task's).")(fn)


def backbone_options(fn: Callable, required: bool = True) -> Callable:
    """--backbone, --weights, --projection, --device, --batch-size and the hidden --arch."""
    options = [
        click.option("--backbone", required=required, type=click.Choice(list(BACKBONES)), help="Registered backbone."),
        click.option("--weights", required=required, help="Official release checkpoint file, or 'random'."),
        click.option("--projection", default="none", help="'none' (frozen backbone) or a cosettle-train run directory."),
        click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", default=8, type=click.IntRange(min=1), help="Frames per backbone forward pass."),
        click.option("--arch", default=None, callback=_parse_arch, hidden=True,
                     help="JSON of timm architecture overrides (tiny test models)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def eval_options(fn: Callable, required: bool = True) -> Callable:
    """The backbone and propagation-settings options plus --cache and --out."""
    fn = settings_options(backbone_options(fn, required))
    fn = click.option("--cache", type=click.Path(path_type=Path), default=None,
                      help="Features cache (a Zarr store) to use or create [default: eval_cache/<backbone>_<weights>_<key>.zarr].")(fn)
    return click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                        help="Results folder.")(fn)


def _projection(value: str) -> Path | None:
    return None if value.lower() == "none" else Path(value)


def make_config(kw: dict, default_preset: str, task_defaults: dict | None = None) -> EvalConfig:
    """The run's config from the command-line options: preset, task defaults, then overrides."""
    names = [f.name for f in fields(PropagationSettings)]
    overrides = {n: kw.pop(n) for n in names}
    settings = preset(kw.pop("preset") or default_preset).with_overrides(**(task_defaults or {}))
    settings = settings.with_overrides(**overrides)
    return EvalConfig(root=kw["root"], out=kw["out"], backbone=kw["backbone"], weights=kw["weights"],
                      projection=_projection(kw["projection"]), settings=settings, device=kw["device"],
                      cache=kw["cache"], batch_size=kw["batch_size"], arch=kw["arch"])


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Evaluate frozen backbones and Co-Settle projections on dense video tasks."""


@main.command(context_settings=CONTEXT)
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="DAVIS folder (JPEGImages/, Annotations/, ImageSets/).")
@click.option("--score-only", is_flag=True, help="Only score existing predictions (--predictions).")
@click.option("--predictions", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With --score-only: folder of <sequence>/<frame>.png indexed predictions.")
@click.option("--save-overlays", is_flag=True, help="Also write overlay pictures and a contact sheet per sequence.")
@click.option("--split", default="val", help="Split list ImageSets/<year>/<split>.txt.")
@click.option("--year", default="2017")
@click.option("--resolution", default="480p")
@functools.partial(eval_options, required=False)
@_one_line_errors
def davis_cmd(**kw) -> None:
    """DAVIS-2017 semi-supervised VOS: propagate, write indexed PNGs, score J&F (official rules)."""
    score_only, predictions = kw.pop("score_only"), kw.pop("predictions")
    overlays, split, year, resolution = kw.pop("save_overlays"), kw.pop("split"), kw.pop("year"), kw.pop("resolution")
    if score_only:
        if predictions is None:
            raise click.UsageError("--score-only needs --predictions DIR")
        summary = davis.score(kw["root"], predictions, kw["out"], split, year, resolution, overlays)
    else:
        if predictions is not None:
            raise click.UsageError("--predictions is only read with --score-only")
        if not kw["backbone"] or not kw["weights"]:
            raise click.UsageError("--backbone and --weights are required (unless --score-only)")
        summary = davis.evaluate_davis(make_config(kw, "dino"), split, year, resolution, overlays)
    click.echo(davis_table(summary))


main.add_command(davis_cmd, name="davis")


@main.command(context_settings=CONTEXT)
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="JHMDB folder (Rename_Images/, joint_positions/).")
@click.option("--split", required=True, type=click.Path(exists=True, path_type=Path),
              help="Test list (class/video per line, e.g. data_manifests/jhmdb_split1_test.txt) or the official splits/ folder.")
@click.option("--split-number", default=1, type=click.IntRange(1, 3), help="With a splits/ folder: which split's test videos.")
@eval_options
@_one_line_errors
def jhmdb_cmd(**kw) -> None:
    """JHMDB pose propagation (CRW protocol, 320x320): PCK@0.1 and PCK@0.2 per joint and mean."""
    split, number = kw.pop("split"), kw.pop("split_number")
    summary = jhmdb.evaluate_jhmdb(make_config(kw, jhmdb.DEFAULT_PRESET, {"size": jhmdb.INPUT_SIZE}), split, number)
    click.echo(jhmdb.format_table(summary))


main.add_command(jhmdb_cmd, name="jhmdb")


@main.command(context_settings=CONTEXT)
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="VIP_Fine folder (Images/, Annotations/Category_ids/, lists/).")
@click.option("--split", default="val", help="Video list lists/<split>_videos.txt.")
@eval_options
@_one_line_errors
def vip_cmd(**kw) -> None:
    """VIP part propagation (560x560): per-class IoU and mIoU over all frames, frame 0 included."""
    split = kw.pop("split")
    summary = vip.evaluate_vip(make_config(kw, vip.DEFAULT_PRESET, {"size": vip.INPUT_SIZE}), split)
    click.echo(vip.format_table(summary))


main.add_command(vip_cmd, name="vip")


@main.command(context_settings=CONTEXT)
@click.option("--videos", required=True, type=click.Path(exists=True, path_type=Path),
              help="A directory to scan (video files and frame folders) or a list file, one path per line.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base of the relative paths in the list file (default: the list's folder).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Results folder.")
@backbone_options
@_one_line_errors
def metrics(videos, root, out, backbone, weights, projection, device, batch_size, arch) -> None:
    """Inter/intra-video distances, effective rank and cycle accuracy; baseline and projection side by side."""
    base, paths = discover_videos(videos, root)
    if len(paths) < 2:
        raise click.UsageError(f"{videos}: the analysis needs at least 2 videos, found {len(paths)}")
    dev = resolve_device(device)
    model = load_backbone(backbone, weights, device=dev, arch=arch)
    proj, proj_info = None, None
    if _projection(projection) is not None:
        proj, config = load_projection(Path(projection), dev)
        proj_info = projection_provenance(config, Path(projection), model)
    results = analysis_report.analyse([base / p for p in paths], model, proj, dev, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    analysis_report.write_table(results, out / "metrics.csv")
    write_json(out / "metrics.json", {
        "results": results, "videos": len(paths), "backbone": {"name": model.name, "weights": model.weights,
                                                                 "weights_sha256": model.weights_sha256},
        "projection": proj_info, "environment": environment(), "finished": now_utc()})
    click.echo(analysis_report.format_table(results))
