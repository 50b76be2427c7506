"""cosettle-extract: frozen backbone features of sampled video views into a Zarr store."""
from __future__ import annotations

from pathlib import Path

import click

from .backbones import BACKBONES
from .checkpoints import CheckpointError
from .extract import AMP_DTYPES, ExtractConfig, extract
from .store import COMPRESSORS, StoreError
from .videos import VideoError


def parse_shard(ctx, param, value: str) -> tuple[int, int]:
    """Click callback: ``i/n`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not of the form i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"'{value}': need 0 <= i < n")
    return i, n


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--backbone", required=True, type=click.Choice(list(BACKBONES)), help="Registered backbone.")
@click.option("--weights", required=True, help="Official release checkpoint file, or 'random'.")
@click.option("--videos", "videos", required=True, type=click.Path(exists=True, path_type=Path),
              help="A directory to scan (video files and frame folders) or a list file, one path per line.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base of the relative paths in the list file (default: the list's folder).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Store to write, e.g. k400_mae.zarr.")
@click.option("--views", default=5, type=click.IntRange(min=1), help="Sampled views per video (one per epoch).")
@click.option("--seed", default=0, type=int)
@click.option("--batch-size", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", default="bf16", type=click.Choice(list(AMP_DTYPES)), help="Autocast dtype on CUDA.")
@click.option("--workers", default=2, type=click.IntRange(min=0), help="DataLoader decoding workers.")
@click.option("--shard", default="0/1", callback=parse_shard, help="Fill shard i of n (whole chunks, no locks).")
@click.option("--resume", is_flag=True, help="Continue an interrupted store, skipping finished blocks.")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out and rebuild it.")
@click.option("--chunk-videos", default=16, type=click.IntRange(min=1), help="Videos per chunk (the unit of work).")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]))
@click.option("--compressor", default="none", type=click.Choice(COMPRESSORS),
              help="Blosc codec; features compress by only ~8%.")
@click.option("--asy-ratio", default=10.0, type=float, help="Asymmetric positional embedding ratio r.")
@click.option("--clip-gap", default=0.15, type=float, help="Frame gap as a fraction of the video length.")
def main(**kw) -> None:
    """Extract A, B and A_asy patch tokens of --views sampled views per video into a Zarr v3 store.

    A Parquet manifest of every sampled view is written beside the store (NAME.manifest/).
    """
    try:
        extract(ExtractConfig(**kw))
    except (CheckpointError, StoreError, VideoError, KeyError, ValueError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
