"""Tiny synthetic datasets in the DAVIS, JHMDB and VIP layouts, for tests and demos.

Frames are moving textured objects (``cosettle.pipeline.synthetic.moving_scene``) with exact
masks, so every reader, writer and scorer of the evaluation runs on real file formats.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from cosettle.eval.frame.palette import save_indexed_png
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder


def write_davis(root: Path, names: list[str], frames: int = 6, height: int = 64, width: int = 96,
                objects: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A DAVIS-2017 tree (480p folders, ImageSets/2017/val.txt); returns each sequence's masks [T, H, W]."""
    root = Path(root)
    masks = {}
    for i, name in enumerate(names):
        video, ids = moving_scene(frames, height, width, objects, seed=seed + i)
        write_frame_folder(root / "JPEGImages" / "480p" / name, video)
        for t, m in enumerate(ids):
            save_indexed_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", m)
        masks[name] = ids
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    return masks


def write_vip(root: Path, names: list[str], frames: int = 4, height: int = 64, width: int = 48,
              seed: int = 0) -> None:
    """A VIP_Fine tree: Images/, Annotations/Category_ids/ (parts = object ids 0..3), lists/val_videos.txt."""
    root = Path(root)
    for i, name in enumerate(names):
        video, ids = moving_scene(frames, height, width, 3, seed=seed + i)
        write_frame_folder(root / "Images" / name, video)
        for t, m in enumerate(ids):
            save_indexed_png(root / "Annotations" / "Category_ids" / name / f"{t:05d}.png", m)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    (root / "lists" / "val_videos.txt").write_text("".join(f"{n}\n" for n in names))


def write_jhmdb(root: Path, names: list[str], frames: int = 5, height: int = 48, width: int = 64,
                seed: int = 0) -> Path:
    """A JHMDB tree (Rename_Images/<cls>/<vid>/00001.png..., joint_positions/.../joint_positions.mat
    with 15 joints on a drifting grid, 1-based) and a split list; returns the list's path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        video, _ = moving_scene(frames, height, width, 1, seed=seed + i)
        folder = root / "Rename_Images" / name
        folder.mkdir(parents=True, exist_ok=True)
        write_frame_folder(folder, video, ext="png")
        for f in sorted(folder.glob("*.png"), reverse=True):  # JHMDB numbers frames from 1
            f.rename(folder / f"{int(f.stem) + 1:05d}.png")
        base = np.stack([rng.uniform(0.2, 0.8, 15) * width, rng.uniform(0.2, 0.8, 15) * height])  # [2, 15]
        drift = np.arange(frames)[None, None, :] * np.array([1.0, 0.5])[:, None, None]
        pos = base[:, :, None] + drift + 1  # MATLAB 1-based pixels
        (root / "joint_positions" / name).mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "joint_positions" / name / "joint_positions.mat", {"pos_img": pos})
    split = root / "test_split1.txt"
    split.write_text("".join(f"{n}\n" for n in names))
    return split
