"""``cosettle-eval <task>``: one command per registered evaluation task (see :mod:`cosettle.eval.task`)."""
from __future__ import annotations

import click

from cosettle.core.heap import heap_reuse
from cosettle.eval.cli_options import CONTEXT
from cosettle.eval.task import discover


class TaskGroup(click.Group):
    """A command group whose commands are the registered tasks, listed by family."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        tasks = discover()
        return sorted(tasks, key=lambda name: (tasks[name].family, name))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        task = discover().get(name)
        return task.command if task is not None else None


@click.group(cls=TaskGroup, context_settings=CONTEXT)
def main() -> None:
    """Evaluate frozen backbones and trained runs: frame-level (label propagation, analysis) and
    video-level (action recognition) tasks."""
    heap_reuse()  # frames of one size: reuse freed affinities instead of page-faulting them in again
