"""Synthetic videos in the real formats: textured objects moving over a panning textured background.

Used by the tests and the demo, which have no datasets: frames come with exact object masks, and
are written as JPEG frame folders or H.264 mp4 files that the real readers decode.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def texture(rng: np.random.Generator, h: int, w: int, cells: int = 8) -> np.ndarray:
    """A smooth random colour texture [h, w, 3] uint8 (bilinear upsampling of random cells)."""
    small = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def moving_scene(
    num_frames: int, height: int, width: int, num_objects: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames [T, H, W, 3] uint8 and object ids [T, H, W] uint8 (0 = background, 1..num_objects).

    The background is a crop of a larger texture that pans; each object is a textured ellipse that
    moves at constant velocity, bouncing off the borders, later ids drawn on top.
    """
    rng = np.random.default_rng(seed)
    pan = rng.uniform(-2.0, 2.0, size=2)
    margin = int(2 * num_frames + 2)
    bg = texture(rng, height + 2 * margin, width + 2 * margin, cells=12)
    yy, xx = np.mgrid[0:height, 0:width]
    objects = []
    for _ in range(num_objects):
        ry, rx = rng.uniform(0.12, 0.22) * height, rng.uniform(0.12, 0.22) * width
        pos = np.array([rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)])
        vel = rng.uniform(-0.03, 0.03, size=2) * np.array([height, width])
        objects.append((ry, rx, pos, vel, texture(rng, height, width, cells=4)))
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    masks = np.zeros((num_frames, height, width), np.uint8)
    for t in range(num_frames):
        oy, ox = (margin + pan * t).astype(int)
        frames[t] = bg[oy : oy + height, ox : ox + width]
        for k, (ry, rx, pos, vel, tex) in enumerate(objects, start=1):
            cy, cx = pos + vel * t
            cy = _bounce(cy, ry, height - ry)
            cx = _bounce(cx, rx, width - rx)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            # The texture moves with the object, as a real object's appearance does.
            shifted = np.roll(tex, (int(cy), int(cx)), axis=(0, 1))
            frames[t][inside] = shifted[inside]
            masks[t][inside] = k
    return frames, masks


def _bounce(x: float, lo: float, hi: float) -> float:
    """Reflect a coordinate moving freely back into [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return lo
    r = (x - lo) % (2 * span)
    return lo + (r if r <= span else 2 * span - r)


def write_frame_folder(folder: Path, frames: np.ndarray, ext: str = "jpg") -> Path:
    """Frames as 00000.jpg, 00001.jpg, ... (the Kinetics/DAVIS frame-folder layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.{ext}", quality=95)
    return folder


def write_video_file(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """Frames as an H.264 mp4 (even sizes required by yuv420p)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path
