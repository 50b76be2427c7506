"""A small synthetic action world in the UCF101 layout, whose classes differ by motion only (by default).

Every video shows one random textured ellipse over a random static textured background; the class
decides only its trajectory (a direction, an oscillation speed, or none). The world is a torus --
the object leaves one border and comes back through the opposite one -- and the start position
is uniform, so the object's position in any single frame is uniform whatever the class: no single
frame carries class information, and only a temporal model can tell the classes apart.

A ``backdrop`` (class name, the video's generator -> its background) replaces the random background,
e.g. to give each class a look of its own that single frames then carry; without one, every
class's look is random.

Textures and the writers come from ``cosettle.pipeline.synthetic``; its ``moving_scene`` is not
used because its velocities are random by design and its background pans, while here the class
must decide the motion and nothing else may move.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cosettle.pipeline.synthetic import texture, write_frame_folder, write_video_file

ACTION_CLASSES = ("MoveRight", "MoveLeft", "MoveDown", "MoveUp", "OscillateFast", "OscillateSlow", "StayStill")
FORMATS = ("mp4", "frames")
FAST_PERIOD = 4  # frames per oscillation of OscillateFast (a slow one takes the whole clip)
Backdrop = Callable[[str, np.random.Generator], np.ndarray]  # (class name, video's rng) -> [H, W, 3] uint8


def trajectory(class_name: str, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Object centres [frames, 2] (y, x) of a class, before wrapping onto the torus."""
    start = rng.uniform(0, 1, size=2) * (height, width)
    t = np.arange(frames, dtype=float)[:, None]
    size = np.array([height, width], float)
    if class_name.startswith("Move"):
        # The whole clip travels 30-45% of the frame: fast enough to see, never ambiguous on the torus.
        step = rng.uniform(0.30, 0.45) * size / max(frames - 1, 1)
        direction = {"MoveRight": (0, 1), "MoveLeft": (0, -1), "MoveDown": (1, 0), "MoveUp": (-1, 0)}[class_name]
        return start + t * step * np.array(direction)
    if class_name.startswith("Oscillate"):
        period = FAST_PERIOD if class_name == "OscillateFast" else max(2 * FAST_PERIOD, frames)
        amplitude = rng.uniform(0.10, 0.18) * width
        phase = rng.uniform(0, 2 * np.pi)
        x = amplitude * np.sin(2 * np.pi * t[:, 0] / period + phase)
        return start + np.stack([np.zeros(frames), x], axis=1)
    if class_name == "StayStill":
        return np.repeat(start[None], frames, axis=0)
    raise ValueError(f"unknown action class {class_name!r}; expected one of {', '.join(ACTION_CLASSES)}")


def action_clip(class_name: str, frames: int, height: int, width: int, seed: int,
                backdrop: Backdrop | None = None) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of one video of a class: a textured ellipse on a static background
    (``backdrop(class_name, rng)``, or a random texture)."""
    rng = np.random.default_rng(seed)
    background = texture(rng, height, width, cells=12) if backdrop is None else backdrop(class_name, rng)
    if background.shape != (height, width, 3) or background.dtype != np.uint8:
        raise ValueError(f"a backdrop must be [{height}, {width}, 3] uint8, got {background.shape} {background.dtype}")
    tex = texture(rng, height, width, cells=4)
    radius = rng.uniform(0.10, 0.16, size=2) * (height, width)
    centres = trajectory(class_name, frames, height, width, rng)
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.repeat(background[None], frames, axis=0)
    for i, (cy, cx) in enumerate(centres):
        # Distances on the torus, so an object crossing a border shows on both sides.
        dy = (yy - cy + height / 2) % height - height / 2
        dx = (xx - cx + width / 2) % width - width / 2
        inside = (dy / radius[0]) ** 2 + (dx / radius[1]) ** 2 <= 1.0
        # The texture travels with the object, as a real object's appearance does.
        shifted = np.roll(tex, (int(round(cy)), int(round(cx))), axis=(0, 1))
        out[i][inside] = shifted[inside]
    return out


def _video_seed(seed: int, label: int, index: int) -> int:
    """An independent seed per video, stable under changes of the world's size."""
    return int(np.random.SeedSequence([seed, label, index]).generate_state(1)[0])


def _check_world(classes: int, frames: int, height: int, width: int, formats: tuple[str, ...]) -> None:
    if not 1 <= classes <= len(ACTION_CLASSES):
        raise ValueError(f"classes must be 1..{len(ACTION_CLASSES)}, got {classes}")
    if frames < 2:
        raise ValueError(f"a video needs at least 2 frames, got {frames}")
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"formats must be drawn from {FORMATS}, got {formats}")
    if "mp4" in formats and (height % 2 or width % 2):
        raise ValueError(f"mp4 needs even frame sizes (yuv420p), got {height}x{width}")


def _write_video(path_stem: Path, frames: np.ndarray, fmt: str) -> Path:
    if fmt == "mp4":
        return write_video_file(path_stem.with_name(path_stem.name + ".mp4"), frames)
    return write_frame_folder(path_stem, frames)


def write_action_world(
    root: Path,
    *,
    classes: int = 4,
    train_per_class: int = 4,
    test_per_class: int = 2,
    frames: int = 16,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    formats: tuple[str, ...] = FORMATS,
    backdrop: Backdrop | None = None,
) -> dict:
    """Write videos to ``root/videos/<Class>/v_<Class>_gNN_c01{.mp4,/}`` and UCF-style split lists.

    ``root/splits`` gets ``classInd.txt`` (1-based), ``trainlist01.txt`` and ``testlist01.txt``
    (``<Class>/<video>.mp4 <label>``, 0-based, ``.mp4`` even for frame folders as the official
    lists do). Formats alternate from video to video; ``backdrop`` as in ``action_clip``. Read it back with
    ``load_split(info["dataset"], info["videos"], 1, subset, lists=info["lists"])``.
    """
    formats = tuple(formats)
    _check_world(classes, frames, height, width, formats)
    root = Path(root)
    videos, lists = root / "videos", root / "splits"
    lists.mkdir(parents=True, exist_ok=True)
    names = list(ACTION_CLASSES[:classes])
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for label, name in enumerate(names):
        for i in range(train_per_class + test_per_class):
            subset = "train" if i < train_per_class else "test"
            # UCF names videos v_<Class>_g<group>_c<clip>; one clip per group here.
            video = f"v_{name}_g{i + 1:02d}_c01"
            clip = action_clip(name, frames, height, width, _video_seed(seed, label, i), backdrop)
            _write_video(videos / name / video, clip, formats[i % len(formats)])
            rows[subset].append(f"{name}/{video}.mp4 {label}")
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    for subset, lines in rows.items():
        (lists / f"{subset}list01.txt").write_text("".join(f"{ln}\n" for ln in lines))
    return {"dataset": "ucf101", "videos": videos, "lists": lists, "classes": names, "frames": frames,
            "train": len(rows["train"]), "test": len(rows["test"]), "seed": seed}
