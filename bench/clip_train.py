"""Benchmark: training the clip-level objectives (VTHCL, CSTP) from a clip store.

In one run, on synthetic clip stores of a realistic shape (T frames x L levels x D' channels per
clip, fp16; the backbone never runs): for each objective, one training epoch through the real
loop (``cosettle.trainer.train``), its samples/s, the bytes read from the store per sample, and
the read rate that implies; beside it the bytes per sample of a Co-Settle views store of ViT-B/16
(3 token sets x 196 x 768 fp16) for scale.

    .venv/bin/python bench/clip_train.py [--videos 512] [--frames 8] [--levels 3] [--dim 1536] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from cosettle.pipeline.store import open_store
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.synthetic import write_synthetic_clip_store
from cosettle.trainer.train import train

VIEWS_STORE_BYTES = 3 * 196 * 768 * 2  # Co-Settle's a, b, a_asy of one ViT-B/16 sample, fp16


def sample_bytes(store) -> int:
    """Bytes one training sample reads: every array of the batch, one row of one view."""
    total = 0
    for name in store.batch_arrays:
        array = store.array(name)
        total += int(np.prod(array.shape[2:])) * array.dtype.itemsize
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=512)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--dim", type=int, default=1536, help="D' per level (cls+mean of ViT-B: 1536).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=256, help="Temporal head width.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    figures = {"device": args.device, "torch_threads": torch.get_num_threads(), "videos": args.videos,
               "frames": args.frames, "levels": args.levels, "dim": args.dim, "batch_size": args.batch_size,
               "views_store_bytes_per_sample": VIEWS_STORE_BYTES}
    keep = nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(prefix="cosettle-bench-")
    with keep as work:
        figures["objectives"] = {name: measure(Path(work), name, args) for name in ("vthcl", "cstp")}
    print(json.dumps(figures, indent=2))
    for name, f in figures["objectives"].items():
        print(f"{name}: {f['samples_per_s']:.0f} samples/s, {f['bytes_per_sample'] / 1e3:.0f} kB/sample "
              f"({f['bytes_vs_views_store_sample']:.3f} of a Co-Settle views sample), "
              f"{f['read_MBps_at_that_rate']:.0f} MB/s read")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def measure(work: Path, objective: str, args: argparse.Namespace) -> dict:
    """One epoch of ``objective`` on its own synthetic clip store (written once into ``work``)."""
    path = work / f"{objective}.zarr"
    if not path.exists():
        write_synthetic_clip_store(path, num_videos=args.videos, views=1, frames=args.frames, levels=args.levels,
                                   dim=args.dim, chunk_videos=16, plan=objective)
    extra = {"queue": 1024} if objective == "vthcl" else {}
    cfg = TrainConfig.from_flat(features=(str(path),), out=str(work / f"run-{objective}"), objective=objective,
                                epochs=1, warmup_epochs=0.0, batch_size=args.batch_size, device=args.device,
                                overwrite=True, width=args.width, **extra)
    summary = train(cfg)
    per_sample = sample_bytes(open_store(path))
    rate = summary["session_samples_per_s"]
    return {"samples_per_s": rate, "epoch_s": summary["session_wall_s"], "bytes_per_sample": per_sample,
            "read_MBps_at_that_rate": rate * per_sample / 1e6,
            "bytes_vs_views_store_sample": per_sample / VIEWS_STORE_BYTES}


if __name__ == "__main__":
    main()
