"""Clip-feature overhead: ``ClipFeatureSource.video_vectors`` time over pure backbone forward time.

Both are measured in one run on the same synthetic action videos (mp4 files and JPEG frame
folders alternating) and the same sampled frames: the end-to-end run decodes, resizes, runs the
backbone, pools and writes the cache; the pure run only runs the backbone on the already prepared
input tensors, in the same per-video batches, once before and once after the end-to-end run (the
faster counts: other load on the machine only inflates times). Target: ratio <= 1.15.

    python bench/clip_extract_overhead.py                  # ViT-B/16, CPU, about a minute on 2 cores
    python bench/clip_extract_overhead.py --device cuda --videos 64 --clips 10 --batch-size 80
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from cosettle.core.devices import resolve_device
from cosettle.eval.frame.analysis_report import clip_input
from cosettle.eval.video.clip_features import ClipFeatureSource, ClipProtocol, clip_indices
from cosettle.eval.video.datasets import ActionVideo, load_split
from cosettle.eval.video.synthetic import ACTION_CLASSES, write_action_world
from cosettle.pipeline.backbones import Backbone, load_backbone
from cosettle.pipeline.videos import open_video


def make_videos(root: Path, count: int, frames: int, height: int, width: int) -> list[ActionVideo]:
    """``count`` synthetic action videos of ``frames`` frames, UCF101 layout."""
    classes = min(count, len(ACTION_CLASSES))
    info = write_action_world(root, classes=classes, train_per_class=math.ceil(count / classes), test_per_class=0,
                              frames=frames, height=height, width=width)
    videos, _ = load_split(info["dataset"], info["videos"], 1, "train", lists=info["lists"])
    return videos[:count]


def prepared_inputs(videos: list[ActionVideo], protocol: ClipProtocol, crop: int) -> list[torch.Tensor]:
    """The normalised input tensors the source will forward: each video's distinct sampled frames."""
    out = []
    for video in videos:
        reader = open_video(video.path)
        frames = np.unique(clip_indices(len(reader), protocol)).tolist()
        out.append(clip_input(reader.get(frames), crop, protocol.resize))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device) -> torch.autocast:
    """The source's precision: bf16 autocast on CUDA, float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def pure_forward(bb: Backbone, inputs: list[torch.Tensor], batch_size: int, device: torch.device) -> float:
    """Seconds of the backbone forward alone, in the source's batches (per video, batch_size frames)."""
    sync(device)
    t0 = time.perf_counter()
    for x in inputs:
        for lo in range(0, len(x), batch_size):
            with autocast(device):
                bb.tokens(x[lo : lo + batch_size].to(device))
    sync(device)
    return time.perf_counter() - t0


@click.command()
@click.option("--backbone", default="dino_vitb", help="Random weights.")
@click.option("--videos", "count", default=3, help="Synthetic videos.")
@click.option("--clips", default=3)
@click.option("--frames", default=8, help="Frames per clip.")
@click.option("--stride", default=4)
@click.option("--video-frames", default=96, help="Frames per video.")
@click.option("--size", default=(240, 320), type=(int, int), help="Frame height and width (UCF101: 240 x 320).")
@click.option("--batch-size", default=32)
@click.option("--device", default="cpu")
def main(backbone, count, clips, frames, stride, video_frames, size, batch_size, device) -> None:
    device = resolve_device(device)
    protocol = ClipProtocol(clips=clips, frames=frames, stride=stride)
    bb = load_backbone(backbone, "random", device=device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        videos = make_videos(tmp / "world", count, video_frames, *size)
        t0 = time.perf_counter()
        inputs = prepared_inputs(videos, protocol, bb.image_size)
        decode = time.perf_counter() - t0
        with autocast(device):
            bb.tokens(inputs[0][:batch_size].to(device))  # warm-up (cuDNN, allocator)

        pure_before = pure_forward(bb, inputs, batch_size, device)
        source = ClipFeatureSource(bb, protocol, tmp / "clips.zarr", device=device, batch_size=batch_size)
        t0 = time.perf_counter()
        vectors, unreadable = source.video_vectors("ucf101", videos)
        sync(device)
        end_to_end = time.perf_counter() - t0
        pure_after = pure_forward(bb, inputs, batch_size, device)
    assert vectors.shape == (count, bb.dim) and not unreadable

    n_images = sum(len(x) for x in inputs)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), backbone {backbone}, {count} videos of {video_frames} frames "
          f"{size[0]}x{size[1]}, {clips} clips x {frames} frames (stride {stride}) = {n_images} forward images, "
          f"batch {batch_size}")
    pure = min(pure_before, pure_after)  # the faster pure run: other load only inflates times
    print(f"pure forward : {pure_before:8.2f} s before, {pure_after:8.2f} s after  "
          f"{n_images / pure:8.1f} images/s (the faster)")
    print(f"end to end   : {end_to_end:8.2f} s  {n_images / end_to_end:8.1f} images/s "
          f"(decode + resize + forward + pool + cache write)")
    print(f"decode+resize: {decode:8.2f} s  (alone, before the runs: the expected non-forward share)")
    print(f"overhead ratio (end to end / pure forward): {end_to_end / pure:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
