"""Heap policy: glibc's own malloc policy vs ``cosettle.core.heap.heap_reuse`` on three hot paths.

Each workload runs in a new interpreter (``new_process``), as a CLI run would, alternately with
glibc's policy and with ``heap_reuse()`` called first, as cosettle-extract, -train and -eval do;
``--rounds`` of each, the fastest counts (other load on a shared machine only inflates times).
After one untimed warm-up iteration, the timed iterations report their rate and page faults:
- ``forward``: the frozen ViT-B/16 (random weights) over batches of 16 images, as extraction runs it;
- ``train``: the cached Co-Settle training step (bench/train_step.py's shape: 32 x 3 x 196 x 768);
- ``propagation``: label propagation, preset dino, 30x52 grid, D 768, with ``label_image`` (bench/eval_speed.py).

    python bench/heap_policy.py [--rounds 3] [--iterations 4]
"""
from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import click
import torch

WORKLOADS = ("forward", "train", "propagation")


def make_step(workload: str, iterations: int):
    """One iteration of ``workload`` (a callable) and the units it does (images, samples, frames)."""
    if workload == "forward":
        from cosettle.pipeline.backbones import load_backbone

        backbone = load_backbone("mae_vitb", "random")
        images = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return lambda: backbone.patch_features(images), len(images)
    if workload == "train":
        from train_step import Variant

        from cosettle.trainer.objective import get_objective

        gen = torch.Generator().manual_seed(0)
        batch = {k: torch.randn(32, 196, 768, generator=gen).half() for k in ("a", "b", "a_asy")}
        loss = get_objective("cosettle").build_loss({"temp": 0.03, "lambda_reg": 3.0, "reg_loss": "kl"})
        variant = Variant(loss, 768, "linear")
        return lambda: variant.step(batch), 32
    from eval_speed import OUT_HW, PATCH, H, W

    from cosettle.eval.frame.propagation import PRESETS, label_image, propagate

    settings, gen = PRESETS["dino"], torch.Generator().manual_seed(0)
    frames = settings.n_last_frames + 4 * (iterations + 1)  # context full after the first step's frames
    first = torch.softmax(torch.randn(3, H, W, generator=gen), dim=0)
    stream = propagate(iter(torch.randn(frames + 1, H, W, 768, generator=gen)), first, settings)
    for _ in range(settings.n_last_frames):
        next(stream)

    def step():
        for _ in range(4):
            label_image(next(stream), PATCH, OUT_HW, settings)
    return step, 4


def measure(workload: str, reuse: bool, iterations: int) -> tuple[float, float]:
    """In this (new) process: units per second of ``workload`` and page faults per iteration."""
    from cosettle.core.heap import heap_reuse

    if reuse and not heap_reuse():
        raise click.ClickException("heap reuse needs glibc; this C library is another")
    step, units = make_step(workload, iterations)
    step()  # warm-up: kernels, and the heap grows to the working set
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    seconds = time.perf_counter() - start
    return units * iterations / seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / iterations


@click.command()
@click.option("--rounds", default=3, help="New-interpreter runs per policy and workload; the fastest counts.")
@click.option("--iterations", default=4, help="Timed iterations per run, after one warm-up.")
@click.option("--workload", "workloads", multiple=True, type=click.Choice(WORKLOADS), default=WORKLOADS)
def main(rounds: int, iterations: int, workloads: tuple[str, ...]) -> None:
    from new_process import in_new_interpreter

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {rounds} new interpreters "
          f"per policy, {iterations} timed iterations each")
    with tempfile.TemporaryDirectory() as tmp:
        for workload in workloads:
            runs = {False: [], True: []}
            for _ in range(rounds):
                for reuse in runs:  # alternating: both policies see the same drift of the machine's load
                    runs[reuse].append(in_new_interpreter("heap_policy", "measure", (workload, reuse, iterations), Path(tmp)))
            (glibc, glibc_faults), (reuse, reuse_faults) = max(runs[False]), max(runs[True])
            print(f"{workload:12s}: glibc {glibc:7.2f}/s ({glibc_faults:8.0f} page faults per iteration), "
                  f"heap reuse {reuse:7.2f}/s ({reuse_faults:6.0f}): speed ratio {reuse / glibc:.3f}")


if __name__ == "__main__":
    main()
