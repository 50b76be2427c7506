"""Reading a trained projection's frame features: projected on every read (before) vs cached once.

One DAVIS-sized video (``--frames`` frames, a 30 x 52 grid of D = 768 float16 backbone features,
random, written straight into a features cache) and Co-Settle's linear projection. Measured in one
run, in alternating rounds, each a median: "on read" applies the projection to the backbone entry at
every read (the code before the change, reproduced here); "cached" is ``FeatureSource.features``,
whose first read projects every frame once into an entry of its own and whose later reads only
read that entry.

    python bench/projected_reads.py [--frames 40] [--rounds 3] [--device cpu]
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from cosettle.core.devices import resolve_device
from cosettle.eval.frame.datasets import Video
from cosettle.eval.frame.features import FeatureSource
from cosettle.eval.frame.propagation import preset
from cosettle.pipeline.backbones import load_backbone
from cosettle.trainer.projection import build_projection

H, W, DIM, BATCH = 30, 52, 768, 8


def on_read(source: FeatureSource, video: Video, projection: torch.nn.Module) -> None:
    """Every frame of the backbone entry, projected while reading (the old ``features``)."""
    array = source.backbone_features("davis", video)
    for lo in range(0, array.shape[0], BATCH):
        block = torch.from_numpy(array[lo : lo + BATCH]).to(source.device).float()
        with torch.no_grad():
            for _ in projection(block):
                pass


def cached(source: FeatureSource, video: Video) -> None:
    for _ in source.features("davis", video):
        pass


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@click.command()
@click.option("--frames", default=40, help="Frames of the video.")
@click.option("--rounds", default=3, help="Reads of each kind after the first.")
@click.option("--device", default="cpu")
def main(frames: int, rounds: int, device: str) -> None:
    device = resolve_device(device)
    backbone = load_backbone("dino_vitb", "random", device=device)
    projection = build_projection(DIM, "linear", seed=0).to(device).eval()
    settings = preset("dino")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "frames"
        folder.mkdir()
        for t in range(frames):  # the cache fingerprints frame files by name and size
            (folder / f"{t:05d}.jpg").write_bytes(b"x")
        video = Video("seq", tuple(sorted(folder.iterdir())))
        source = FeatureSource(backbone, settings, Path(tmp) / "c.zarr", projection, device, BATCH)
        rng = np.random.default_rng(0)

        def fill(array) -> None:
            for t in range(frames):
                array[t] = rng.standard_normal((H, W, DIM)).astype(np.float16)

        source.cache.put("davis/seq", video, (frames, H, W, DIM), (480, 832), (480, 832), fill)
        first = seconds(lambda: cached(source, video))  # projects every frame once, writes the entry
        old, new = [], []
        for _ in range(rounds):
            old.append(seconds(lambda: on_read(source, video, projection)))
            new.append(seconds(lambda: cached(source, video)))
    o, n = statistics.median(old), statistics.median(new)
    print(f"device {device}, {frames} frames of {H}x{W}x{DIM}, linear projection, {rounds} rounds (medians)")
    print(f"projected on every read : {o:7.3f} s per read")
    print(f"cached, first read      : {first:7.3f} s (projects each frame once and writes the float32 entry)")
    print(f"cached, later reads     : {n:7.3f} s per read")
    print(f"read time ratio, on read / cached: {o / n:.2f}")


if __name__ == "__main__":
    main()
