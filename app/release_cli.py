"""``cosettle import-release`` and ``cosettle export-release``: the Co-Settle authors' checkpoint
files (``checkpoint-4.pth``) to cosettle runs and back (see :mod:`cosettle.trainer.release`)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from cosettle.eval.cli_options import one_line_message
from cosettle.pipeline.arch_option import arch_option
from cosettle.pipeline.backbones import BACKBONES
from cosettle.pipeline.checkpoints import CheckpointError
from cosettle.trainer.projection import ProjectionError
from cosettle.trainer.release import export_release, import_release
from cosettle.trainer.run_dir import RunError

ERRORS = (ProjectionError, CheckpointError, RunError, FileNotFoundError, KeyError, ValueError)


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(one_line_message(e))


@click.command("import-release", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("release", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backbone", required=True, type=click.Choice(list(BACKBONES)), help="The backbone it was trained on.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="The run directory to write.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The base checkpoint (official file): checked to hold the same encoder; its sha256 ties the run to it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@arch_option
def import_release_command(release: Path, backbone: str, out: Path, weights: Path | None, overwrite: bool,
                           arch: dict | None) -> None:
    """Read a Co-Settle release file (weights_only, argparse.Namespace allowed) into a cosettle run."""
    try:
        summary = import_release(release, backbone, out, weights=weights, arch=arch, overwrite=overwrite)
    except ERRORS as e:
        raise _fail(e) from None
    config = json.loads((out / "config.json").read_text())
    tie = f"base weights {config['weights']} (sha256 {config['weights_sha256'][:12]})" if config["weights"] else \
        f"no base file given: evaluations accept weights whose encoder has digest {config['encoder_sha256'][:12]}"
    click.echo(f"{out}: imported {release.name} (sha256 {summary['release_sha256'][:12]}, epoch "
               f"{config['release']['epoch']}), backbone {backbone}, fusion {config['train']['fusion']}, "
               f"{len(config['release_args'])} args kept verbatim; {tie}")


@click.command("export-release", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--weights", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The run's base checkpoint (official file): its encoder goes into the release's 'model'.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The release file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@arch_option
def export_release_command(run_dir: Path, weights: Path, out: Path, overwrite: bool, arch: dict | None) -> None:
    """Write a Co-Settle run as a release file in the authors' format (model/optimizer/epoch/scaler/args)."""
    try:
        info = export_release(run_dir, out, weights, arch=arch, overwrite=overwrite)
    except ERRORS as e:
        raise _fail(e) from None
    click.echo(f"{out}: {info['encoder_tensors']} encoder + {info['adapter_tensors']} adapter tensors "
               f"({info['backbone']}, fusion {info['fusion']}), epoch {info['epoch']}, sha256 {info['sha256'][:12]}")
