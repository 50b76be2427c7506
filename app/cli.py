"""``cosettle``: the umbrella command (demo, report, concepts)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from cosettle.core.heap import heap_reuse
from cosettle.pipeline.concepts import ConceptError, build_concepts
from cosettle.pipeline.text_tower import TextTowerError

from .demo import DemoConfig, format_results, run_demo
from .release_cli import export_release_command, import_release_command
from .release_sweep import release_sweep
from .report import report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cosettle: image-pretrained ViTs to video representations (Co-Settle, CVPR 2026)."""
    heap_reuse()  # the demo and sweeps run every stage here: see cosettle.core.heap


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


@main.command()
@click.option("--weights", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The local OpenAI CLIP file (ViT-B-16.pt) the image side uses; never downloaded.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Class names, one a line. [default: the shipped Kinetics-400 names]")
@click.option("--attributes", "attributes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="'class name: phrase; phrase; ...' lines (e.g. data_manifests/concept_attributes_example.txt).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .safetensors file.")
@click.option("--overwrite", is_flag=True, help="Rebuild --out even when it was made for another vocabulary/weights.")
@click.option("--device", default="cpu", show_default=True, help="Where the text tower runs (cpu, cuda).")
def concepts(weights: Path, classes_file: Path | None, attributes_file: Path | None, out: Path, overwrite: bool,
             device: str) -> None:
    """Embed the concept vocabulary (class names, attribute phrases) with CLIP's text tower, cached in --out."""
    try:
        c = build_concepts(weights, out, classes_file, attributes_file, device=device, overwrite=overwrite)
    except (ConceptError, TextTowerError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{c.path}: {c.classes.shape[0]} classes, {c.attributes.shape[0]} attributes, "
               f"embedding width {c.embed_dim} (weights {c.meta['weights']}, sha256 {c.meta['weights_sha256'][:12]})")


main.add_command(report)
main.add_command(import_release_command)
main.add_command(export_release_command)
main.add_command(release_sweep)
