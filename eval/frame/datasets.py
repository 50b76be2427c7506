"""Readers of the three evaluation datasets in their published layouts (EVAL_PROTOCOLS.md).

Every reader checks up front that each listed video has its frames and ground truth, so a
missing file fails before any feature is computed, with a one-line error naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cosettle.core.listfiles import ListFileError, read_list_file
from cosettle.eval.frame.davis_score import read_split


class DatasetError(Exception):
    """A dataset file that is missing or unusable; the message names it."""


@dataclass(frozen=True)
class Video:
    """One evaluation video: its frames in order and the ground truth that goes with them.

    ``labels``: one id image per frame (DAVIS, VIP); ``joints``: a JHMDB joint_positions.mat.
    ``name`` is unique within its dataset and is the predictions' sub-folder.
    """

    name: str
    frames: tuple[Path, ...]
    labels: tuple[Path, ...] = ()
    joints: Path | None = None


def read_frame(path: Path) -> np.ndarray:
    """An RGB frame as uint8 [H, W, 3]."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing frame") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: unreadable frame ({e})") from None


def _frames(folder: Path, suffix: str, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing {what}")
    frames = sorted(folder.glob(f"*{suffix}"))
    if not frames:
        raise DatasetError(f"{folder}: no {suffix} frames in {what}")
    return frames


def _labels_for(frames: list[Path], folder: Path) -> tuple[Path, ...]:
    labels = tuple(folder / f"{f.stem}.png" for f in frames)
    for path in labels:
        if not path.is_file():
            raise DatasetError(f"{path}: missing annotation")
    return labels


def davis_videos(root: Path, split: str = "val", year: str = "2017", resolution: str = "480p") -> list[Video]:
    """DAVIS sequences of ``ImageSets/<year>/<split>.txt``: JPEGImages and Annotations at ``resolution``."""
    root = Path(root)
    try:
        names = read_split(root, split, year)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(str(e)) from None
    videos = []
    for name in names:
        frames = _frames(root / "JPEGImages" / resolution / name, ".jpg", f"sequence {name!r}")
        videos.append(Video(name, tuple(frames), _labels_for(frames, root / "Annotations" / resolution / name)))
    return videos


def vip_videos(root: Path, split: str = "val") -> list[Video]:
    """VIP videos of ``lists/<split>_videos.txt``: Images/<vid>/*.jpg with Annotations/Category_ids/<vid>/*.png."""
    root = Path(root)
    names = _list_lines(root / "lists" / f"{split}_videos.txt")
    videos = []
    for name in names:
        frames = _frames(root / "Images" / name, ".jpg", f"video {name!r}")
        videos.append(Video(name, tuple(frames), _labels_for(frames, root / "Annotations" / "Category_ids" / name)))
    return videos


def _list_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: video list not found")
    try:
        return read_list_file(path)
    except ListFileError as e:
        raise DatasetError(str(e)) from None


def _numeric_frames(folder: Path) -> list[Path]:
    """PNG frames sorted by their integer stem, as CRW's JHMDB reader orders them."""
    frames = _frames(folder, ".png", "frame folder")
    bad = [f for f in frames if not f.stem.isdigit()]
    if bad:
        raise DatasetError(f"{bad[0]}: JHMDB frame names must be integers")
    return sorted(frames, key=lambda f: int(f.stem))


def jhmdb_split(path: Path, number: int = 1) -> list[str]:
    """``class/video`` names of a JHMDB test split.

    ``path`` is either a list file (one ``class/video`` per line; a CRW/UVC-style line
    ``.../Rename_Images/class/video .../joint_positions.mat`` is read by its first field) or the
    dataset's official ``splits`` folder, whose ``<class>_test_split<number>.txt`` files mark test
    videos with 2.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"*_test_split{number}.txt"))
        if not files:
            raise DatasetError(f"{path}: no *_test_split{number}.txt files (the official JHMDB splits)")
        names = []
        for f in files:
            cls = f.name[: -len(f"_test_split{number}.txt")]
            for line in f.read_text().splitlines():
                fields = line.split()
                if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                    if line.strip():
                        raise DatasetError(f"{f}: unexpected line {line.strip()!r} (expected 'video.avi 1|2')")
                    continue
                if fields[1] == "2":
                    names.append(f"{cls}/{Path(fields[0]).stem}")
        return names
    names = []
    for line in _list_lines(path):
        first = line.split()[0].rstrip("/")
        parts = first.split("/")
        if len(parts) < 2:
            raise DatasetError(f"{path}: line {line!r} is not 'class/video'")
        names.append("/".join(parts[-2:]))
    return names


def jhmdb_videos(root: Path, split: Path, number: int = 1) -> list[Video]:
    """JHMDB videos of a split (see :func:`jhmdb_split`): Rename_Images/<cls>/<vid>/*.png and
    joint_positions/<cls>/<vid>/joint_positions.mat."""
    root = Path(root)
    videos = []
    for name in jhmdb_split(split, number):
        frames = _numeric_frames(root / "Rename_Images" / name)
        joints = root / "joint_positions" / name / "joint_positions.mat"
        if not joints.is_file():
            raise DatasetError(f"{joints}: missing joint positions")
        videos.append(Video(name, tuple(frames), joints=joints))
    return videos

