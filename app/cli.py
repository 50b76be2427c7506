"""``cosettle``: the umbrella command (demo, report)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .demo import DemoConfig, format_results, run_demo
from .report import report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cosettle: image-pretrained ViTs to video representations (Co-Settle, CVPR 2026)."""


@main.command()
@click.option("--out", default=Path("cosettle-demo"), type=click.Path(file_okay=False, path_type=Path),
              show_default=True, help="Where the synthetic world, store, run and results go (reused on rerun).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def demo(out: Path, device: str) -> None:
    """Extract -> train -> eval on synthetic videos with a RANDOM-weight ViT-B/16, before vs after."""
    click.echo("cosettle demo: synthetic videos and a randomly initialised ViT-B/16 (--weights random).\n"
               "The numbers show that the pipeline works end to end; they are NOT paper numbers.\n")
    start = time.perf_counter()
    cfg = DemoConfig(out=out, device=device)
    results = run_demo(cfg)
    click.echo("\n" + format_results(results))
    click.echo(f"\nfrozen = random-weight backbone; +Co-Settle = the projection trained for {cfg.epochs} epochs "
               f"(batch {cfg.batch_size}) on its cached tokens.\nwrote {out / 'demo_results.json'}, {out / 'demo.png'}, {out / 'runs/cosettle'}, "
               f"{out / 'results'} ({time.perf_counter() - start:.0f} s)")


main.add_command(report)
