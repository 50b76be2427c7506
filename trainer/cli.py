"""``cosettle-train``: train an objective's trainable module from cached feature stores."""
from __future__ import annotations

import json
import sys
from typing import Callable

import click

from cosettle.core.atomic import WriteError
from cosettle.core.heap import heap_reuse
from cosettle.pipeline.store import StoreError

from .compiled import CompileError
from .config import TrainConfig, flag
from .objective import all_options, discover
from .projection import ProjectionError
from .run_dir import RunError
from .train import TrainingError, train

D = TrainConfig()


def objective_options(fn: Callable) -> Callable:
    """One option per objective setting, unset by default (the chosen objective's default applies)."""
    for name, declared in sorted(all_options().items(), reverse=True):
        _, opt = declared[0]
        defaults = "; ".join(f"{objective}: {o.default}" for objective, o in declared)
        kind = click.Choice(opt.choices) if opt.choices else type(opt.default)
        helps = " | ".join(dict.fromkeys(f"{objective}: {o.help}" if len(declared) > 1 else o.help
                                         for objective, o in declared))
        fn = click.option(flag(name), name, default=None, type=kind, show_default=False,
                          help=f"{helps} [default {defaults}]")(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--features", multiple=True, required=True, type=click.Path(),
              help="Feature store (NAME.zarr) from cosettle-extract; repeat to combine stores of the same settings.")
@click.option("--out", required=True, type=click.Path(), help="Run directory (runs/NAME).")
@click.option("--objective", default=D.objective, type=click.Choice(sorted(discover())))
@click.option("--epochs", default=D.epochs, type=int)
@click.option("--batch-size", default=D.batch_size, type=int, help="Per process; effective = batch x accum x processes.")
@click.option("--accum-iter", default=D.accum_iter, type=int, help="Gradient accumulation steps.")
@click.option("--blr", default=D.blr, type=float, help="Base lr; lr = blr x effective batch / 256.")
@click.option("--min-lr", default=D.min_lr, type=float)
@click.option("--warmup-epochs", default=D.warmup_epochs, type=float)
@click.option("--weight-decay", default=D.weight_decay, type=float, help="On weight matrices only.")
@objective_options
@click.option("--seed", default=D.seed, type=int)
@click.option("--device", default=D.device, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--shuffle-chunks", default=D.shuffle_chunks, type=int, help="Chunks shuffled together in memory.")
@click.option("--io-threads", default=D.io_threads, type=int, help="Threads reading chunks ahead.")
@click.option("--checkpoint-every", default=D.checkpoint_every, type=int, help="Optimizer steps between checkpoints.")
@click.option("--max-steps", default=None, type=int, help="Stop (resumable) after this many optimizer steps.")
@click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete an existing run directory first.")
@click.option("--compile", is_flag=True, help="Run the objective's forward and backward under torch.compile "
              "(compiles at the first step; results equal within float tolerance).")
def main(**options) -> None:
    """Train an objective (default: Co-Settle's projection) on cached backbone tokens (no backbone is run)."""
    options["features"] = tuple(options["features"])
    cfg = TrainConfig.from_flat(**{k: v for k, v in options.items() if v is not None or k == "max_steps"})
    try:
        cfg.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    heap_reuse()  # steps of one shape: reuse freed activations instead of page-faulting them in again
    try:
        summary = train(cfg)
    except (StoreError, RunError, TrainingError, ProjectionError, WriteError, CompileError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if summary is not None:
        click.echo(json.dumps(summary["final_epoch"], indent=2))


if __name__ == "__main__":
    main()
