"""Benchmark: what int8 tokens change against float16, on the demo's synthetic world, in one run.

The demo's world (``cosettle.app.demo.make_world``, reduced: ``--videos`` training videos) is
extracted twice with the same random-weight ViT-B/16 and seed, as ``--dtype float16`` and as
``--dtype int8``; a Co-Settle projection is trained on each with the same seed and schedule; both
are evaluated beside the frozen backbone. Reported:

- the training loss curves: per-epoch mean loss of both runs, max |difference| and max relative
  difference over the epochs;
- DAVIS J&F (the demo's DAVIS-layout world) and cycle accuracy (``eval.frame.analysis_report``) of
  the frozen backbone, the float16 head and the int8 head;
- bytes per sample on disk (token arrays, scales included, per video-view) and their ratio;
- epoch time from the store: the trainer's reader (``ChunkReader``) delivering every view of the
  store, int8 and float16 passes interleaved, medians, and their ratio. The store files sit in the
  page cache, so this measures the reading and decoding work, not a disk; on a node bound by disk
  reads the bytes ratio is the one that counts.

The machine's CPUs are shared with other jobs: compare figures within this run only.

    python bench/int8_quality.py [--videos 12] [--epochs 12] [--json out.json] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from cosettle.app.demo import DemoConfig, make_world
from cosettle.eval.frame.analysis_report import analyse
from cosettle.eval.frame.propagation import preset
from cosettle.eval.frame.run import EvalConfig
from cosettle.eval.tasks.davis import evaluate_davis
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.quant import scale_name
from cosettle.pipeline.store import open_store
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.data import ChunkReader, chunk_table, epoch_plan
from cosettle.trainer.train import train
from cosettle.trainer.trained import load_trained

DTYPES = ("float16", "int8")


def store_bytes_per_sample(path: Path) -> float:
    """Bytes on disk of every chunk of the batch arrays (and their scales), per video-view."""
    store = open_store(path)
    names = [m for n in store.batch_arrays for m in (n, scale_name(n)) if m in store.group]
    total = sum(f.stat().st_size for n in names for f in (path / n).rglob("*") if f.is_file() and f.name != "zarr.json")
    return total / (store.settings["num_videos"] * store.settings["views"])


def epoch_read_seconds(path: Path, batch_size: int) -> float:
    """Seconds for the trainer's reader to deliver every view of the store, batch by batch."""
    store = open_store(path)
    chunks = chunk_table([store])
    start = time.perf_counter()
    for view in range(store.settings["views"]):
        plan = epoch_plan(chunks, view, 0, 0, 1, batch_size, shuffle_chunks=4)
        for _ in ChunkReader([store], chunks, window=4).batches(plan, view):
            pass
    return time.perf_counter() - start


def quality(world: DemoConfig, runs: dict[str, Path], davis: Path, videos: Path, work: Path) -> dict:
    """DAVIS J&F and cycle accuracy of the frozen backbone and of each trained head."""
    device = torch.device("cpu")
    base = EvalConfig(root=davis, out=work / "results" / "frozen", backbone=world.backbone, weights="random",
                      settings=preset("dino", short_side=world.eval_short_side, multiple=16), device="cpu",
                      cache=work / "eval_cache.zarr")
    out = {"frozen": {"davis_JF": evaluate_davis(base)["J&F-Mean"]}}
    for dtype, run in runs.items():
        out[dtype] = {"davis_JF": evaluate_davis(replace(base, out=work / "results" / dtype, projection=run))["J&F-Mean"]}
    backbone = load_backbone(world.backbone, "random", device=device)
    clips = sorted(p for p in videos.iterdir() if not p.name.startswith("."))[: world.analysis_videos]
    for dtype, run in runs.items():  # each call also scores the frozen backbone: the same clips, kept from the first
        result = analyse(clips, backbone, load_trained(run, device)[0], device)
        out[dtype]["cycle_accuracy"] = result["projection"]["cycle_accuracy"]
        out["frozen"].setdefault("cycle_accuracy", result["baseline"]["cycle_accuracy"])
    return {k: {m: float(v) for m, v in d.items()} for k, d in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=12, help="Training videos of the world (the demo: 32).")
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--read-repeats", type=int, default=7, help="Interleaved epoch reads per dtype.")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    world = DemoConfig(train_videos=args.videos, views=args.views, eval_sequences=3, eval_frames=12,
                       analysis_videos=3, epochs=args.epochs, batch_size=args.batch_size, device="cpu")
    keep = nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(prefix="cosettle-int8-")
    with keep as tmp:
        work = Path(tmp)
        world = replace(world, out=work)
        videos, davis, _ = make_world(world)
        stores, runs, figures = {}, {}, {"world": {"videos": args.videos, "views": args.views, "epochs": args.epochs,
                                                    "batch_size": args.batch_size, "backbone": world.backbone}}
        for dtype in DTYPES:
            stores[dtype] = work / f"{dtype}.zarr"
            extract(ExtractConfig(videos=videos, out=stores[dtype], backbone=world.backbone, weights="random",
                                  views=args.views, seed=world.seed, device="cpu", resume=True, chunk_videos=4,
                                  batch_size=16, workers=1, dtype=dtype))
            runs[dtype] = work / "runs" / dtype
            train(TrainConfig(features=(str(stores[dtype]),), out=str(runs[dtype]), epochs=args.epochs,
                              batch_size=args.batch_size, blr=world.blr, seed=world.seed, device="cpu", resume=True))
        curves = {d: [json.loads(line)["loss"] for line in (runs[d] / "metrics_epochs.jsonl").read_text().splitlines()]
                  for d in DTYPES}
        diffs = [abs(q - f) for f, q in zip(curves["float16"], curves["int8"])]
        figures["loss"] = {"float16": curves["float16"], "int8": curves["int8"], "max_abs_diff": max(diffs),
                           "max_rel_diff": max(d / abs(f) for d, f in zip(diffs, curves["float16"]))}
        sizes = {d: store_bytes_per_sample(stores[d]) for d in DTYPES}
        figures["bytes_per_sample"] = sizes | {"int8_over_float16": sizes["int8"] / sizes["float16"]}
        reads = {d: [] for d in DTYPES}
        for _ in range(args.read_repeats):
            for d in DTYPES:
                reads[d].append(epoch_read_seconds(stores[d], args.batch_size))
        epoch = {d: statistics.median(reads[d]) for d in DTYPES}
        figures["epoch_read_s"] = epoch | {"int8_over_float16": epoch["int8"] / epoch["float16"]}
        figures["quality"] = quality(world, runs, davis, videos, work)
    print(json.dumps(figures, indent=2))
    q = figures["quality"]
    print(f"loss curves: max |int8 - fp16| {figures['loss']['max_abs_diff']:.2e} "
          f"(relative {figures['loss']['max_rel_diff']:.2e}) over {args.epochs} epochs")
    for name in ("frozen", *DTYPES):
        print(f"{name:8} DAVIS J&F {q[name]['davis_JF']:.4f}  cycle accuracy {q[name]['cycle_accuracy']:.4f}")
    print(f"bytes/sample int8/fp16 {figures['bytes_per_sample']['int8_over_float16']:.3f}; "
          f"epoch read time int8/fp16 {figures['epoch_read_s']['int8_over_float16']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
