"""Command-line pieces every evaluation task's command shares: backbone options, one-line errors."""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from cosettle.core.atomic import WriteError
from cosettle.core.errors import first_line
from cosettle.core.listfiles import ListFileError
from cosettle.core.precision import AMP_CHOICES
from cosettle.eval.frame.datasets import DatasetError
from cosettle.eval.frame.features import CacheError
from cosettle.eval.video.datasets import ActionDataError
from cosettle.pipeline.arch_option import arch_option
from cosettle.pipeline.backbones import BACKBONES
from cosettle.pipeline.checkpoints import CheckpointError
from cosettle.pipeline.text_tower import TextTowerError
from cosettle.pipeline.videos import VideoError
from cosettle.trainer.projection import ProjectionError

ERRORS = (DatasetError, ActionDataError, TextTowerError, CacheError, CheckpointError, ProjectionError, VideoError,
          ListFileError, WriteError, FileNotFoundError, ValueError, KeyError)
CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}


def one_line_errors(fn: Callable) -> Callable:
    """Turn the toolkit's errors (which name the file) into one-line click errors."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ERRORS as e:
            raise click.ClickException(one_line_message(e)) from None
    return wrapper


def one_line_message(error: Exception) -> str:
    """The first line of an error's message (a KeyError's own text: its str() adds quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return first_line(ValueError(str(message)))


def backbone_options(fn: Callable, required: bool = True, batch_size: int = 8, amp: str | None = None) -> Callable:
    """--backbone, --weights, --projection, --device, --batch-size, the hidden --arch and, where ``amp``
    (its default) is given, --amp."""
    options = [
        click.option("--backbone", required=required, type=click.Choice(list(BACKBONES)), help="Registered backbone."),
        click.option("--weights", required=required, help="Official release checkpoint file, or 'random'."),
        click.option("--projection", default="none", help="'none' (frozen backbone), a cosettle-train run directory, or a Co-Settle release file (checkpoint-4.pth)."),
        click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", default=batch_size, type=click.IntRange(min=1), help="Frames per backbone forward pass."),
        arch_option,
    ]
    if amp is not None:
        options.insert(4, click.option("--amp", default=amp, type=click.Choice(AMP_CHOICES),
                                       help="Backbone autocast: auto = bf16 on CUDA, none (float32) elsewhere; "
                                            "bf16 on CPU needs AVX512-BF16 or AMX."))
    for option in reversed(options):
        fn = option(fn)
    return fn


def projection_path(value: str) -> Path | None:
    """The --projection value: None for 'none' (the frozen backbone), else the run directory."""
    return None if value.lower() == "none" else Path(value)
