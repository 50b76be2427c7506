"""``cosettle-train``: train the Co-Settle projection from cached feature stores."""
from __future__ import annotations

import json
import sys

import click

from cosettle.pipeline.store import StoreError

from .config import TrainConfig
from .losses import REG_LOSSES
from .objectives import OBJECTIVES
from .projection import FUSIONS, ProjectionError
from .run_dir import RunError
from .train import TrainingError, train

D = TrainConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--features", multiple=True, required=True, type=click.Path(),
              help="Feature store (NAME.zarr) from cosettle-extract; repeat to combine stores of the same settings.")
@click.option("--out", required=True, type=click.Path(), help="Run directory (runs/NAME).")
@click.option("--objective", default=D.objective, type=click.Choice(sorted(OBJECTIVES)))
@click.option("--epochs", default=D.epochs, type=int)
@click.option("--batch-size", default=D.batch_size, type=int, help="Per process; effective = batch x accum x processes.")
@click.option("--accum-iter", default=D.accum_iter, type=int, help="Gradient accumulation steps.")
@click.option("--blr", default=D.blr, type=float, help="Base lr; lr = blr x effective batch / 256.")
@click.option("--min-lr", default=D.min_lr, type=float)
@click.option("--warmup-epochs", default=D.warmup_epochs, type=float)
@click.option("--weight-decay", default=D.weight_decay, type=float, help="On weight matrices only.")
@click.option("--temp", default=D.temp, type=float, help="Softmax temperature of the walk.")
@click.option("--lambda-reg", default=D.lambda_reg, type=float, help="Weight of the separability term.")
@click.option("--reg-loss", default=D.reg_loss, type=click.Choice(REG_LOSSES))
@click.option("--fusion", default=D.fusion, type=click.Choice(list(FUSIONS)))
@click.option("--seed", default=D.seed, type=int)
@click.option("--device", default=D.device, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--shuffle-chunks", default=D.shuffle_chunks, type=int, help="Chunks shuffled together in memory.")
@click.option("--io-threads", default=D.io_threads, type=int, help="Threads reading chunks ahead.")
@click.option("--checkpoint-every", default=D.checkpoint_every, type=int, help="Optimizer steps between checkpoints.")
@click.option("--max-steps", default=None, type=int, help="Stop (resumable) after this many optimizer steps.")
@click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete an existing run directory first.")
def main(**options) -> None:
    """Train the Co-Settle projection on cached backbone tokens (no backbone is run)."""
    options["features"] = tuple(options["features"])
    cfg = TrainConfig(**options)
    try:
        cfg.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        summary = train(cfg)
    except (StoreError, RunError, TrainingError, ProjectionError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if summary is not None:
        click.echo(json.dumps(summary["final_epoch"], indent=2))


if __name__ == "__main__":
    main()
