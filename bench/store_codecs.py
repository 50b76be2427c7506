"""Benchmark: which Zarr codec for float16 and int8 token stores? Compression ratio and read rate.

In one run: a small views store is extracted in float32 with a random-weight ViT-B/16 (``--backbone``,
196 tokens x 768 channels) from synthetic videos, as the demo does; its a, b, a_asy tokens are then
written as float16 and as int8 (codes + float32 per-token scales, ``cosettle.pipeline.quant``) with
each candidate codec, in the store's chunking ([1, chunk_videos, 196, 768]). Per candidate:

- ratio: raw bytes / bytes on disk (codes and scales together for int8);
- disk bytes per sample (one video-view: a, b and a_asy);
- read rates: reading every chunk back into memory, decoded (int8: dequantised to float32, as the
  trainer gets it), from the page cache, so they measure decoding, not the disk: samples per wall
  second and per CPU second (all threads), medians of ``--repeats`` rounds over every candidate;
  and the CPU rate over the uncompressed one of the same dtype.

The machine's CPUs are shared with other jobs: compare figures within this run only; the CPU-time
rate is the one a busy machine disturbs least.

    python bench/store_codecs.py [--videos 12] [--repeats 9] [--json out.json] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.quant import dequantize, quantize
from cosettle.pipeline.store_settings import TOKEN_ARRAYS
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder, write_video_file


def candidates() -> dict[str, object]:
    """Codec name -> zarr v3 codec (numcodecs inside); None stores raw chunks."""
    out: dict[str, object] = {"none": None}
    for cname in ("lz4", "zstd"):
        for shuffle in ("noshuffle", "shuffle", "bitshuffle"):
            for level in (1, 3, 5):
                out[f"blosc-{cname}-{shuffle}-{level}"] = BloscCodec(cname=cname, clevel=level, shuffle=shuffle)
    for level in (1, 3, 9):
        out[f"zstd-{level}"] = ZstdCodec(level=level)
    return out


def realistic_tokens(work: Path, args) -> dict[str, np.ndarray]:
    """a, b, a_asy [views * videos, 196, 768] float32 of a random-weight ViT on synthetic videos."""
    videos = work / "videos"
    if not (videos / ".complete").exists():  # a kept --workdir reuses its videos and store
        for i in range(args.videos):
            clip, _ = moving_scene(16, 144, 192, 1 + i % 3, seed=1000 + i)
            (write_video_file(videos / f"clip{i:03d}.mp4", clip) if i % 2 else
             write_frame_folder(videos / f"clip{i:03d}", clip))
        (videos / ".complete").touch()
    store = extract(ExtractConfig(videos=videos, out=work / "f32.zarr", backbone=args.backbone, weights="random",
                                  views=args.views, chunk_videos=args.chunk_videos, dtype="float32", workers=1,
                                  batch_size=16, device="cpu", resume=True))
    return {name: store.array(name)[:].reshape((-1,) + store.array(name).shape[2:]) for name in TOKEN_ARRAYS}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def write_arrays(path: Path, arrays: dict[str, np.ndarray], codec, chunk: int) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, values in arrays.items():
        a = group.create_array(name, shape=values.shape, chunks=(chunk,) + values.shape[1:], dtype=values.dtype,
                               compressors=codec)
        a[:] = values


def read_seconds(path: Path, int8: bool) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) to read every token array back, decoded as the trainer gets it."""
    wall, cpu = time.perf_counter(), time.process_time()
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    for name in TOKEN_ARRAYS:
        values = group[name][:]
        if int8:
            dequantize(values, group[f"{name}_scale"][:])
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(work: Path, tokens: dict[str, np.ndarray], args) -> dict:
    """Every candidate for float16 and int8: ratio, disk bytes per sample, read rates."""
    samples = len(tokens["a"])
    layouts = {"float16": {k: v.astype(np.float16) for k, v in tokens.items()}, "int8": {}}
    for name, values in tokens.items():
        layouts["int8"][name], layouts["int8"][f"{name}_scale"] = quantize(values)
    figures = {dtype: {"raw_bytes_per_sample": sum(v.nbytes for v in arrays.values()) / samples, "codecs": {}}
               for dtype, arrays in layouts.items()}
    paths = {}
    for dtype, arrays in layouts.items():
        for codec_name, codec in candidates().items():
            paths[dtype, codec_name] = path = work / f"{dtype}-{codec_name}.zarr"
            write_arrays(path, arrays, codec, args.chunk_videos)
            stored = disk_bytes(path)
            figures[dtype]["codecs"][codec_name] = {"ratio": figures[dtype]["raw_bytes_per_sample"] * samples / stored,
                                                    "disk_bytes_per_sample": stored / samples}
            read_seconds(path, dtype == "int8")  # warm the page cache
    # Rounds over every candidate, so a change of the machine's load hits all of them alike.
    times: dict = {key: [] for key in paths}
    for _ in range(args.repeats):
        for key, path in paths.items():
            times[key].append(read_seconds(path, key[0] == "int8"))
    for (dtype, codec_name), runs in times.items():
        row = figures[dtype]["codecs"][codec_name]
        row["read_samples_per_s"] = samples / statistics.median(w for w, _ in runs)
        row["read_samples_per_cpu_s"] = samples / statistics.median(c for _, c in runs)
    for dtype in layouts:
        rows = figures[dtype]["codecs"]
        base = rows["none"]["read_samples_per_cpu_s"]
        for row in rows.values():
            row["cpu_rate_over_uncompressed"] = row["read_samples_per_cpu_s"] / base
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dino_vitb")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--chunk-videos", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the extracted store here (reused).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    keep = nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(prefix="cosettle-codecs-")
    with keep as tmp:
        work = Path(tmp)
        tokens = realistic_tokens(work, args)
        figures = {"backbone": args.backbone, "weights": "random", "samples": len(tokens["a"]),
                   "chunk_samples": args.chunk_videos, **measure(work, tokens, args)}
    f16 = figures["float16"]["raw_bytes_per_sample"]
    print(f"{'dtype':8} {'codec':26} {'ratio':>6} {'kB/sample':>9} {'vs fp16 raw':>11} {'samples/s':>9} "
          f"{'samples/cpu-s':>13} {'vs none':>7}")
    for dtype in ("float16", "int8"):
        for name, row in figures[dtype]["codecs"].items():
            print(f"{dtype:8} {name:26} {row['ratio']:6.3f} {row['disk_bytes_per_sample'] / 1e3:9.1f} "
                  f"{row['disk_bytes_per_sample'] / f16:11.3f} {row['read_samples_per_s']:9.0f} "
                  f"{row['read_samples_per_cpu_s']:13.0f} {row['cpu_rate_over_uncompressed']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
