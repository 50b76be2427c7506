"""Benchmark: does training from cached features read at disk speed, and how much faster is it
than the reference way of running the frozen backbone online?

In one run on one synthetic store of realistic shape (196 tokens x 768 channels, fp16):
1. epoch wall time / time to read the same bytes sequentially, whole chunks in store order
   (target <= 1.5), for the data pipeline alone and for a whole training epoch;
2. samples/s of training from the cache / samples/s of the reference way (decode two frames,
   the release's transforms, the backbone three times, the same projection step), timed
   alternately step by step (target >= 20x); plus the rate of the whole training epoch.

    .venv/bin/python bench/train_io.py [--videos 384] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.store import open_store
from cosettle.pipeline.store_settings import TOKEN_ARRAYS
from cosettle.pipeline.transforms import apply_view
from cosettle.pipeline.videos import open_video
from cosettle.pipeline.views import sample_views, video_rng
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.data import ChunkReader, chunk_table, epoch_plan
from cosettle.trainer.losses import cosettle_loss
from cosettle.trainer.projection import build_projection
from cosettle.trainer.schedule import build_optimizer
from cosettle.trainer.synthetic import write_synthetic_store
from cosettle.trainer.train import train

GRID, DIM = 14, 768


def sequential_read(store) -> tuple[float, int]:
    """Seconds and bytes to read view 0 of every token array, chunk by chunk in store order."""
    nbytes, start = 0, time.perf_counter()
    for block in range(store.num_blocks):
        lo, hi = store.block_rows(block)
        for name in TOKEN_ARRAYS:
            nbytes += store.array(name)[0, lo:hi].nbytes
    return time.perf_counter() - start, nbytes


def pipeline_epoch(store, cfg: TrainConfig) -> float:
    """Seconds for the trainer's reader to deliver one epoch's batches (no compute)."""
    chunks = chunk_table([store])
    plan = epoch_plan(chunks, 0, cfg.seed, 0, 1, cfg.batch_size, cfg.shuffle_chunks)
    reader = ChunkReader([store], chunks, io_threads=cfg.io_threads, window=cfg.shuffle_chunks)
    start = time.perf_counter()
    for _ in reader.batches(plan, 0):
        pass
    return time.perf_counter() - start


def make_frame_folders(root: Path, count: int, frames: int, size: tuple[int, int]) -> list[Path]:
    """Kinetics-like frame folders (JPEG, 340x256 by default) of smooth random images."""
    rng = np.random.default_rng(0)
    folders = []
    for v in range(count):
        folder = root / f"video{v:03d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        for f in range(frames):
            img = Image.fromarray(np.roll(base, f, axis=1)).resize(size, Image.BILINEAR)
            img.save(folder / f"{f:05d}.jpg", quality=90)
        folders.append(folder)
    return folders


def projection_step(projection, optimizer, a, b, a_asy) -> None:
    """One Co-Settle optimizer step on tokens, the same for both ways of getting them."""
    out = cosettle_loss(projection, a, b, a_asy)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()


class Reference:
    """The release's way: per sample decode two frames, transform them, run the frozen backbone
    three times (A, A_asy, B); then the projection step."""

    def __init__(self, folders: list[Path]):
        self.folders = folders
        self.backbone = load_backbone("mae_vitb", "random")

    def tokens(self, keys: list[int]) -> tuple[torch.Tensor, ...]:
        pairs, offsets = [], []
        for k in keys:
            folder = self.folders[k % len(self.folders)]
            video = open_video(folder)
            view = sample_views(len(video), 1, video_rng(k, folder.name), image_size=224, grid=GRID, asy_ratio=10.0)[0]
            pairs.append(apply_view(video.get([view.frame_a, view.frame_b]), view, 224))
            offsets.append((view.asy_oy, view.asy_ox))
        x = torch.stack(pairs)
        a = self.backbone.patch_features(x[:, 0])
        a_asy = self.backbone.patch_features(x[:, 0], asy_offset=torch.tensor(offsets), asy_ratio=10.0)
        return a, self.backbone.patch_features(x[:, 1]), a_asy


def interleaved_rates(store, cfg: TrainConfig, reference: Reference, rounds: int, ref_batch: int) -> tuple[float, float]:
    """Median samples/s of a cache step and of a reference step, measured alternately so both
    see the same machine load (this machine's CPUs are shared and its speed drifts)."""
    chunks = chunk_table([store])
    plan = epoch_plan(chunks, 0, cfg.seed, 0, 1, cfg.batch_size, cfg.shuffle_chunks)
    batches = ChunkReader([store], chunks, io_threads=cfg.io_threads, window=cfg.shuffle_chunks).batches(plan, 0)
    projection = build_projection(DIM)
    optimizer = build_optimizer(projection, 1e-4, 0.05)
    cache, ref = [], []
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        t = time.perf_counter()
        batch = next(batches)
        projection_step(projection, optimizer, batch["a"], batch["b"], batch["a_asy"])
        cache.append(cfg.batch_size / (time.perf_counter() - t))
        t = time.perf_counter()
        projection_step(projection, optimizer, *reference.tokens(list(range(r * ref_batch, (r + 1) * ref_batch))))
        ref.append(ref_batch / (time.perf_counter() - t))
    batches.close()
    return statistics.median(cache[1:]), statistics.median(ref[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=768)
    parser.add_argument("--chunk-videos", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="Read timings: median of this many.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compressor", default="none", choices=["none", "zstd", "lz4"])
    parser.add_argument("--rounds", type=int, default=4, help="Interleaved cache/reference step pairs timed.")
    parser.add_argument("--ref-batch-size", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the store here instead of a temp dir.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cosettle-bench-"))
    try:
        path = work / "bench.zarr"
        if not path.exists():
            t = time.perf_counter()
            write_synthetic_store(path, num_videos=args.videos, views=1, grid=GRID, dim=DIM,
                                  chunk_videos=args.chunk_videos, compressor=args.compressor)
            print(f"wrote {path} in {time.perf_counter() - t:.1f}s")
        store = open_store(path)
        cfg = TrainConfig(features=(str(path),), out=str(work / "run"), epochs=1, batch_size=args.batch_size,
                          device="cpu", overwrite=True)

        sequential_read(store)  # every timing below starts from the same (warm) page cache
        seq, pipe = [], []
        for _ in range(args.repeats):  # interleaved, medians: this machine's timings are noisy
            seq.append(sequential_read(store))
            pipe.append(pipeline_epoch(store, cfg))
        seq_s, nbytes = statistics.median(s for s, _ in seq), seq[0][1]
        pipe_s = statistics.median(pipe)
        summary = train(cfg)
        epoch_s = summary["session_wall_s"]
        cache_rate = summary["session_samples_per_s"]

        folders = make_frame_folders(work / "frames", count=4, frames=40, size=(340, 256))
        cache_step_rate, ref_rate = interleaved_rates(store, cfg, Reference(folders), args.rounds, args.ref_batch_size)

        figures = {
            "store": {"videos": args.videos, "tokens": GRID * GRID, "dim": DIM, "dtype": "float16",
                      "chunk_videos": args.chunk_videos, "compressor": args.compressor, "epoch_bytes": nbytes},
            "repeats": args.repeats, "sequential_read_s": seq_s, "sequential_read_GBps": nbytes / seq_s / 1e9,
            "pipeline_epoch_s": pipe_s, "pipeline_over_sequential": pipe_s / seq_s,
            "train_epoch_s": epoch_s, "train_epoch_over_sequential": epoch_s / seq_s,
            "train_epoch_samples_per_s": cache_rate, "cache_step_samples_per_s": cache_step_rate,
            "reference_step_samples_per_s": ref_rate, "cache_over_reference": cache_step_rate / ref_rate,
            "train_epoch_over_reference": cache_rate / ref_rate,
            "torch_threads": torch.get_num_threads(), "train_batch_size": args.batch_size,
            "reference_batch_size": args.ref_batch_size,
        }
        print(json.dumps(figures, indent=2))
        print(f"(1) epoch / sequential read: data pipeline {pipe_s / seq_s:.2f} (target <= 1.5), "
              f"whole training epoch {epoch_s / seq_s:.1f} ({seq_s:.2f}s to read {nbytes / 1e9:.2f} GB)")
        print(f"(2) training step from the cache {cache_step_rate:.1f} samples/s vs the reference way "
              f"{ref_rate:.2f} samples/s (interleaved medians): {cache_step_rate / ref_rate:.0f}x (target >= 20x); "
              f"the whole training epoch ran at {cache_rate:.1f} samples/s")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
