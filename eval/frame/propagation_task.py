"""The template of a label-propagation task (DAVIS, JHMDB, VIP): its command-line options, the
settings they resolve to, and its runner for sweeps.

Settings resolve in one order everywhere: the preset (the task's own unless named), then the
task's fixed defaults (e.g. JHMDB's 320x320 input), then every setting given alone.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import click

from cosettle.eval.cli_options import backbone_options, projection_path
from cosettle.eval.frame.propagation import PRESETS, PropagationSettings, preset
from cosettle.eval.frame.run import EvalConfig
from cosettle.eval.task import EvalTask, TaskContext, option_types

FIELDS = tuple(f.name for f in fields(PropagationSettings))


def propagation_settings(options: dict, default_preset: str, task_defaults: dict | None = None) -> PropagationSettings:
    """The preset (the task's own when ``options['preset']`` is None), the task's defaults, then
    the options' settings (None leaves a setting as it is)."""
    overrides = {k: options.get(k) for k in FIELDS}
    settings = preset(options.get("preset") or default_preset).with_overrides(**(task_defaults or {}))
    return settings.with_overrides(**overrides)


def _parse_size(ctx, param, value):
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HxW, e.g. 480x880") from None
    return h, w


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


def propagation_options(fn: Callable, required: bool = True) -> Callable:
    """--preset, one option per propagation setting, the backbone options, --cache and --out."""
    for f in reversed(fields(PropagationSettings)):
        fn = _setting_option(f)(fn)
    fn = click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                      help="Propagation preset (default: the task's).")(fn)
    fn = backbone_options(fn, required, amp="none")  # frame features: float32 unless asked
    fn = click.option("--cache", type=click.Path(path_type=Path), default=None,
                      help="Features cache (a Zarr store) to use or create [default: eval_cache/<backbone>_<weights>_<key>.zarr].")(fn)
    return click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                        help="Results folder.")(fn)


def config_from_cli(kw: dict, default_preset: str, task_defaults: dict | None = None) -> EvalConfig:
    """The run's config from a command's options (its propagation settings are popped from ``kw``)."""
    settings = propagation_settings({k: kw.pop(k) for k in (*FIELDS, "preset")}, default_preset, task_defaults)
    return EvalConfig(root=kw["root"], out=kw["out"], backbone=kw["backbone"], weights=kw["weights"],
                      projection=projection_path(kw["projection"]), settings=settings, device=kw["device"],
                      cache=kw["cache"], batch_size=kw["batch_size"], amp=kw["amp"], arch=kw["arch"])


def propagation_task(name: str, description: str, command: click.Command, evaluate: Callable[..., dict],
                     default_preset: str, task_defaults: dict, extra: dict, paths: tuple[str, ...] = ()) -> EvalTask:
    """A frame-family task: ``evaluate(config, **extra options) -> summary`` run on a dataset root,
    with the preset, every propagation setting, ``batch_size`` and ``extra`` as sweep options."""
    def run(ctx: TaskContext, options: dict) -> dict:
        cfg = EvalConfig(root=ctx.root, out=ctx.out, backbone=ctx.backbone, weights=ctx.weights,
                         projection=ctx.projection, settings=propagation_settings(options, default_preset, task_defaults),
                         device=ctx.device, cache=ctx.cache, batch_size=options["batch_size"], arch=ctx.arch)
        return evaluate(cfg, **{k: options[k] for k in extra})

    def check(options: dict) -> None:
        propagation_settings(options, default_preset, task_defaults)

    # --amp is a command-line option only: a new sweep option would change every sweep's provenance digests
    options = {"preset": None, "batch_size": 8} | dict.fromkeys(FIELDS) | extra
    types = {"preset": (str,)} | {k: option_types(getattr(PRESETS["dino"], k)) for k in FIELDS} | {"size": (list,)}
    return EvalTask(name, "frame", description, command, run, options, "root", paths, types, check)
