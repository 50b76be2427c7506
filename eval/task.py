"""The registry of evaluation tasks: ``cosettle-eval <task>`` and the sweep file discover them here.

A task is one module in :mod:`cosettle.eval.tasks` (or a third-party module named by a
``cosettle.tasks`` entry point) that calls :func:`register` with an :class:`EvalTask`: its
family (``frame``: label propagation on DAVIS, JHMDB, VIP and the analysis metrics; ``video``:
UCF101/HMDB51 clip-level tasks), its command-line command, and the runner that sweeps call with
the task's options. Adding a task is adding a module; nothing here names one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from cosettle.core.registry import Registry

FAMILIES = ("frame", "video")
REQUIRED = object()  # the default of an option a sweep file must give


@dataclass(frozen=True)
class TaskContext:
    """What a runner gets besides its options: the backbone (and trained run) to evaluate, the
    dataset, where to write and which features cache to share."""

    backbone: str
    weights: str
    out: Path  # this evaluation's own output folder
    arch: dict | None = None  # tiny architectures for tests
    projection: Path | None = None  # a finished training run, or None for the frozen backbone
    root: Path | None = None  # the dataset's folder
    videos: Path | None = None  # a directory of videos or a list file
    cache: Path | None = None  # backbone features, shared by the baseline and projection runs
    device: str = "auto"


@dataclass(frozen=True)
class EvalTask:
    """A named evaluation: its command, its runner ``run(context, options) -> summary`` (a dict
    of numbers, nested dicts allowed), and the options a sweep file may give it."""

    name: str
    family: str
    description: str
    command: click.Command
    run: Callable[[TaskContext, dict], dict]
    options: dict[str, Any] = field(default_factory=dict)  # name -> default (REQUIRED: must be given)
    data: str = "root"  # the dataset field it reads: "root" or "videos"
    paths: tuple[str, ...] = ()  # options naming files, relative to the sweep file
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)  # where the default does not tell
    check: Callable[[dict], None] | None = None  # raises ValueError naming the bad option


REGISTRY: Registry[EvalTask] = Registry("evaluation task", "cosettle.eval.tasks", "cosettle.tasks")
TASKS = REGISTRY.entries
discover = REGISTRY.discover


def register(task: EvalTask) -> EvalTask:
    """Add a task to the registry; a name registered twice or an unknown family is an error."""
    if task.family not in FAMILIES:
        raise ValueError(f"evaluation task '{task.name}': unknown family '{task.family}' (choose {', '.join(FAMILIES)})")
    return REGISTRY.register(task.name, task)


def option_types(default: Any) -> tuple[type, ...]:
    """Types a value may have where the default is ``default`` (any scalar or list for None/REQUIRED)."""
    if default is None or default is REQUIRED:
        return (str, int, float, bool, list)
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, tuple):
        return (list,)
    return (type(default),)
