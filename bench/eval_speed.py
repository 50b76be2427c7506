"""Propagation speed on a synthetic DAVIS-sized sequence, against the float32 matmul rate of the same run.

A 30 x 52 grid (480 x 832 input at stride 16) of D = 768 random features, 3 labels, 8 context
frames (frame 0 + the DINO preset's FIFO of 7). Per device: the float32 matmul rate of one
[hw, D] x [D, context * hw] product, then frames per second of the propagation alone and of
propagation plus the output stage (label_image: upsampling, min-max, argmax, to 480 x 832), each
also as a FLOP rate (2 * hw * context * hw * D per frame) divided by the matmul rate.

    python bench/eval_speed.py [--frames 24] [--dim 768] [--rounds 3] [--module PATH] [--compare PATH]

``--module`` times another copy of the propagation module instead of the package's; ``--compare``
times a second copy (e.g. the code before a change) in the same rounds. Frame times are medians
and the matmul rate a best-of per round, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch

H, W, OUT_HW, PATCH = 30, 52, (480, 832), 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_module(path: str | None):
    if path is None:
        from cosettle.eval.frame import propagation
        return propagation
    spec = importlib.util.spec_from_file_location("propagation_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def matmul_rate(device: torch.device, hw: int, context: int, dim: int, repeats: int = 5) -> float:
    """Best float32 FLOP/s of a [hw, D] x [D, context * hw] product."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(hw, dim, generator=gen).to(device)
    b = torch.randn(dim, context * hw, generator=gen).to(device)
    out = a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):  # best of: robust to other jobs sharing the machine
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * hw * dim * context * hw / best


def frames_per_second(module, device: torch.device, frames: int, dim: int, output: bool) -> float:
    settings = module.PRESETS["dino"]
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(frames + 1, H, W, dim, generator=gen).to(device)
    first = torch.softmax(torch.randn(3, H, W, generator=gen), dim=0).to(device)
    warm = settings.n_last_frames + 1  # time only frames whose context is full
    stream = module.propagate(iter(feats), first, settings)
    for _ in range(warm):
        next(stream)
    times = []
    while True:
        _sync(device)
        start = time.perf_counter()
        soft = next(stream, None)
        if soft is None:
            break
        if output:
            module.label_image(soft, PATCH, OUT_HW, settings)
        _sync(device)
        times.append(time.perf_counter() - start)
    # median frame time: robust to other jobs sharing the machine
    return 1.0 / float(torch.tensor(times).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=24, help="Propagated frames (8 warm-up frames not timed).")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of matmul + propagation timings; medians reported.")
    parser.add_argument("--module", default=None, help="Path of a propagation module to time instead of the package's.")
    parser.add_argument("--compare", default=None,
                        help="Path of another propagation module (e.g. the code before a change) timed in the same "
                             "rounds, interleaved, so both see the same machine load.")
    args = parser.parse_args()
    modules = {"under test": load_module(args.module)}
    if args.compare:
        modules = {"compared": load_module(args.compare), **modules}
    context = 1 + modules["under test"].PRESETS["dino"].n_last_frames
    hw = H * W
    flops = 2.0 * hw * context * hw * args.dim  # per frame
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"grid {H}x{W}, D={args.dim}, {context} context frames, output {OUT_HW[0]}x{OUT_HW[1]}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        mms, results = [], {(m, o): [] for m in modules for o in (False, True)}
        for _ in range(args.rounds):
            mm = matmul_rate(device, hw, context, args.dim)
            mms.append(mm)
            for label, module in modules.items():
                for output in (False, True):
                    fps = frames_per_second(module, device, args.frames, args.dim, output)
                    results[label, output].append((fps, fps * flops / mm))
        print(f"{name}: matmul {float(torch.tensor(mms).median()) / 1e9:.1f} GFLOP/s (median of {args.rounds} rounds)")
        for label, module in modules.items():
            for output in (False, True):
                fps = float(torch.tensor([r[0] for r in results[label, output]]).median())
                ratios = [r[1] for r in results[label, output]]
                what = "with label_image" if output else "propagation"
                print(f"  {label} ({module.__file__}) {what}: {fps:.2f} frames/s, {fps * flops / 1e9:.1f} GFLOP/s, "
                      f"ratio to matmul median {float(torch.tensor(ratios).median()):.3f} "
                      f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
