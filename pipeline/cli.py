"""cosettle-extract: frozen backbone features of sampled video views into a Zarr store."""
from __future__ import annotations

from pathlib import Path

import click

from cosettle.core.atomic import WriteError
from cosettle.core.heap import heap_reuse
from cosettle.core.precision import AMP_CHOICES

from .arch_option import arch_option
from .backbones import BACKBONES
from .checkpoints import CheckpointError
from .clips import FAST_STRIDE, PLANS, SLOW_STRIDE
from .dry_run import dry_run_report
from .extract import ExtractConfig, extract
from .extract_config import LAYOUTS
from .pooling import POOLINGS
from .store import StoreError
from .store_settings import COMPRESSORS, DTYPES
from .videos import VideoError

CLIPS_ONLY = ("plan", "clip_frames", "levels", "pooling", "slow_stride", "fast_stride")
VIEWS_ONLY = ("asy_ratio", "clip_gap")


def parse_shard(ctx, param, value: str) -> tuple[int, int]:
    """Click callback: ``i/n`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not of the form i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"'{value}': need 0 <= i < n")
    return i, n


def parse_levels(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """Click callback: ``4,8,12`` -> (4, 8, 12); None (the last block) when not given."""
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of block indices, e.g. 4,8,12") from None


def check_layout_options(ctx: click.Context, kw: dict) -> None:
    """Refuse options of the other layout given on the command line."""
    given = {k for k in kw if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    other = VIEWS_ONLY if kw["layout"] == "clips" else CLIPS_ONLY
    wrong = sorted("--" + k.replace("_", "-") for k in given & set(other))
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)}: not an option of --layout {kw['layout']}")
    if kw["layout"] == "clips" and kw["plan"] is None:
        raise click.UsageError(f"--layout clips needs --plan {'|'.join(PLANS)}")


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--backbone", required=True, type=click.Choice(list(BACKBONES)), help="Registered backbone.")
@click.option("--weights", required=True, help="Official release checkpoint file, or 'random'.")
@click.option("--videos", "videos", required=True, type=click.Path(exists=True, path_type=Path),
              help="A directory to scan (video files and frame folders) or a list file, one path per line.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base of the relative paths in the list file (default: the list's folder).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Store to write, e.g. k400_mae.zarr.")
@click.option("--views", default=5, type=click.IntRange(min=1),
              help="Sampled views (clip pairs with --layout clips) per video, one per epoch.")
@click.option("--seed", default=0, type=int)
@click.option("--batch-size", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", default="auto", type=click.Choice(AMP_CHOICES),
              help="Backbone autocast: auto = bf16 on CUDA, none (float32) on CPU; bf16 on CPU needs AVX512-BF16/AMX.")
@click.option("--workers", type=click.IntRange(min=0),
              help="DataLoader decoding workers [default: 2 on CUDA; 0 on the CPU, where the forward uses every "
                   "core and decoding runs in turn with it].")
@click.option("--shard", default="0/1", callback=parse_shard, help="Fill shard i of n (whole chunks, no locks).")
@click.option("--resume", is_flag=True, help="Continue an interrupted store, skipping finished blocks.")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out and rebuild it.")
@click.option("--chunk-videos", default=16, type=click.IntRange(min=1), help="Videos per chunk (the unit of work).")
@click.option("--dtype", default="float16", type=click.Choice(DTYPES),
              help="Token dtype on disk; int8: per-token scaled codes, decoded to float32 on read.")
@click.option("--compressor", default="none", type=click.Choice(COMPRESSORS),
              help="Blosc codec; tokens compress by 8-17% (zstd-shuffle best, bench/store_codecs.py) "
                   "at 0.4-0.65x the read rate per CPU.")
@click.option("--asy-ratio", default=10.0, type=float, help="Asymmetric positional embedding ratio r.")
@click.option("--clip-gap", default=0.15, type=float, help="Frame gap as a fraction of the video length.")
@click.option("--layout", default="views", type=click.Choice(LAYOUTS),
              help="views: Co-Settle frame pairs (A, B, A_asy patch tokens); clips: clip pairs of pooled vectors.")
@click.option("--plan", type=click.Choice(PLANS), help="Clip-pair plan (--layout clips): vthcl slow/fast, cstp overlaps.")
@click.option("--clip-frames", default=8, type=click.IntRange(min=1), help="Frames T per clip (--layout clips).")
@click.option("--levels", callback=parse_levels,
              help="1-based blocks whose outputs are pooled (normalised as the backbone's token rule says), "
                   "e.g. 4,8,12 (--layout clips; default: the last block).")
@click.option("--pooling", default="cls+mean", type=click.Choice(POOLINGS),
              help="Per-frame pooling (--layout clips); cls needs a class token.")
@click.option("--slow-stride", default=SLOW_STRIDE, type=click.IntRange(min=1), help="vthcl: frame stride of clip 1.")
@click.option("--fast-stride", default=FAST_STRIDE, type=click.IntRange(min=1), help="vthcl: frame stride of clip 2.")
@click.option("--dry-run", is_flag=True,
              help="Print the store's size, chunk count and an estimated time (one timed video); write nothing.")
@arch_option
@click.pass_context
def main(ctx: click.Context, dry_run: bool, **kw) -> None:
    """Extract A, B and A_asy patch tokens of --views sampled views per video into a Zarr v3 store,
    or, with --layout clips, --views sampled clip pairs per video as pooled per-frame vectors.

    A Parquet manifest of every sampled view or pair is written beside the store (NAME.manifest/).
    """
    check_layout_options(ctx, kw)
    heap_reuse()  # batches of one size: reuse freed activations instead of page-faulting them in again
    try:
        if dry_run:
            lines, warning = dry_run_report(ExtractConfig(**kw))
            click.echo("\n".join(lines))
            if warning:
                click.echo(warning, err=True)
            return
        extract(ExtractConfig(**kw))
    except (CheckpointError, StoreError, VideoError, WriteError, KeyError, ValueError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
