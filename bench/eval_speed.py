"""Propagated frames per second on a synthetic DAVIS-sized sequence, on CPU and on CUDA if present.

A 30 x 52 grid (480 x 832 input at stride 16) of D = 768 random features, 3 labels, 8 context
frames (frame 0 + the DINO preset's FIFO of 7). Two numbers per device: the propagation alone,
and propagation plus the output stage (upsampling, min-max, argmax, resize to 480 x 854).

    python bench/eval_speed.py [--frames 24] [--dim 768]
"""
from __future__ import annotations

import argparse
import time

import torch

from cosettle.eval.frame.propagation import PRESETS, label_image, propagate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frames_per_second(device: torch.device, frames: int, dim: int, output: bool) -> float:
    settings = PRESETS["dino"]
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(frames + 1, 30, 52, dim, generator=gen).to(device)
    first = torch.softmax(torch.randn(3, 30, 52, generator=gen), dim=0).to(device)
    warm = settings.n_last_frames + 1  # time only frames whose context is full
    stream = propagate(iter(feats), first, settings)
    for _ in range(warm):
        next(stream)
    _sync(device)
    start = time.perf_counter()
    for soft in stream:
        if output:
            label_image(soft, 16, (480, 854), settings)
    _sync(device)
    return (frames - warm) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=24, help="Propagated frames (8 warm-up frames not timed).")
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"grid 30x52, D={args.dim}, 8 context frames, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        prop = frames_per_second(device, args.frames, args.dim, output=False)
        full = frames_per_second(device, args.frames, args.dim, output=True)
        print(f"{name}: {prop:.1f} frames/s propagation, {full:.1f} frames/s with the output stage")


if __name__ == "__main__":
    main()
