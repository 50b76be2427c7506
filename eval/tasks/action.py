"""Video-level tasks: ``cosettle-eval ucf101|hmdb51 --task retrieval|knn|linear|zeroshot --split 1|2|3|all``."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click

from cosettle.eval.cli_options import CONTEXT, backbone_options, one_line_errors, projection_path
from cosettle.eval.task import EvalTask, TaskContext, register
from cosettle.eval.video.action_eval import SPLITS, TASKS, ActionEvalConfig, evaluate_action, format_table
from cosettle.eval.video.clip_features import POOLINGS, ClipProtocol

PROTOCOL = ClipProtocol()
PROTOCOL_FIELDS = tuple(f.name for f in fields(ClipProtocol))


def protocol_for(task: str, options: dict) -> ClipProtocol:
    """The clip protocol from the options; pooling defaults to 'clip' for zero-shot, else 'cls'."""
    values = {k: options[k] for k in PROTOCOL_FIELDS if options.get(k) is not None}
    values.setdefault("pooling", "clip" if task == "zeroshot" else PROTOCOL.pooling)
    return ClipProtocol(**values)


def make_config(dataset: str, root: Path, out: Path, backbone: str, weights: str, options: dict,
                projection: Path | None = None, cache: Path | None = None, device: str = "auto",
                arch: dict | None = None, amp: str = "auto") -> ActionEvalConfig:
    """The run's config from a command's or a sweep's options (the same names in both); ``amp`` is a
    command-line option only (sweeps keep the default, so their provenance digests stay as they were)."""
    lists = options.get("lists")
    return ActionEvalConfig(
        dataset=dataset, root=root, out=out, backbone=backbone, weights=weights, task=options["task"],
        split=str(options["split"]), projection=projection, protocol=protocol_for(options["task"], options),
        lists=Path(lists) if lists else None, strict=options["strict"], k=options["k"],
        temperature=options["temperature"], cache=cache, device=device, batch_size=options["batch_size"],
        amp=amp, arch=arch)


def _command(dataset: str, title: str) -> click.Command:
    @click.command(name=dataset, context_settings=CONTEXT, help=f"{title} action recognition from clip features: "
                   "retrieval (Recall@k), weighted kNN, linear probe or CLIP zero-shot, on one or all three official splits.")
    @click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="Folder of <Class>/<video>.avi|.mp4 files or frame folders, named as in the split lists.")
    @click.option("--task", "task", default="knn", type=click.Choice(TASKS))
    @click.option("--split", default="1", type=click.Choice(SPLITS), help="An official split, or all three (mean and std).")
    @click.option("--lists", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                  help="Folder of trainlistNN.txt/testlistNN.txt (and classInd.txt) [default: the shipped official lists].")
    @click.option("--strict", is_flag=True, help="A listed video missing under --root is an error, not a warning.")
    @click.option("--clips", default=PROTOCOL.clips, type=click.IntRange(min=1), help="Clips per video, uniformly spaced.")
    @click.option("--frames", default=PROTOCOL.frames, type=click.IntRange(min=1), help="Frames per clip.")
    @click.option("--stride", default=PROTOCOL.stride, type=click.IntRange(min=1), help="Frame stride inside a clip.")
    @click.option("--pooling", default=None, type=click.Choice(POOLINGS),
                  help="Per-frame vector: class token, mean patch token, both, or CLIP's image embedding [default: clip for zeroshot, else cls].")
    @click.option("--k", default=20, type=click.IntRange(min=1), help="kNN neighbours.")
    @click.option("--temperature", default=0.07, type=float, help="kNN vote weights exp(cos / temperature).")
    @click.option("--cache", type=click.Path(path_type=Path), default=None,
                  help="Clip-features cache (a Zarr store) [default: eval_cache/<backbone>_<weights>_clips_<key>.zarr].")
    @click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Results folder.")
    @_backbone_options
    @one_line_errors
    def command(root, out, backbone, weights, projection, device, cache, arch, amp, **options) -> None:
        cfg = make_config(dataset, root, out, backbone, weights, options, projection_path(projection), cache, device,
                          arch, amp)
        click.echo(format_table(evaluate_action(cfg)))
    return command


def _backbone_options(fn):
    """The backbone options, 64 frames per forward pass by default (clips fill batches)."""
    return backbone_options(fn, batch_size=64, amp="auto")


def _task(dataset: str, title: str) -> EvalTask:
    def run(ctx: TaskContext, options: dict) -> dict:
        return evaluate_action(make_config(dataset, ctx.root, ctx.out, ctx.backbone, ctx.weights, options,
                                           ctx.projection, ctx.cache, ctx.device, ctx.arch))

    def check(options: dict) -> None:
        make_config(dataset, Path("."), Path("."), "x", "x", options)

    options = {"task": "knn", "split": "1", "lists": None, "strict": False, "k": 20, "temperature": 0.07,
               "batch_size": 64} | {k: getattr(PROTOCOL, k) for k in PROTOCOL_FIELDS} | {"pooling": None}
    types = {"split": (str, int), "lists": (str,), "pooling": (str,)}
    return EvalTask(dataset, "video", f"{title} action recognition", _command(dataset, title), run, options,
                    "root", ("lists",), types, check)


register(_task("ucf101", "UCF101"))
register(_task("hmdb51", "HMDB51"))
