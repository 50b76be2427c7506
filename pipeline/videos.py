"""Finding and reading videos: frame folders (sorted image files) and video files (decord)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cosettle.core.errors import first_line
from cosettle.core.listfiles import read_list_file

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoError(Exception):
    """A video that cannot be used; the message is one line naming the file and the problem."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTS)


def discover_videos(source: Path, root: Path | None = None) -> tuple[Path, list[str]]:
    """Return (root, sorted relative video paths) from a directory scan or a list file.

    A directory holding image files is one frame-folder video; files with a video extension are
    videos. A list file has one path per line, relative to ``root`` (default: the list's folder).
    """
    source = Path(source)
    if source.is_dir():
        base = Path(root) if root is not None else source
        found = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            if any(_is_image(f) for f in filenames):
                found.append(os.path.relpath(dirpath, base))
                dirnames.clear()  # a frame folder is a leaf
                continue
            found.extend(os.path.relpath(os.path.join(dirpath, f), base) for f in filenames if _is_video(f))
        if not found:
            raise VideoError(f"{source}: no videos found (looked for {', '.join(VIDEO_EXTS)} files and image folders)")
        return base, sorted(found)
    if source.is_file():
        base = Path(root) if root is not None else source.parent
        return base, sorted(read_list_file(source))
    raise VideoError(f"{source}: no such file or directory")


class FrameFolder:
    """A video stored as a folder of image files, frames in sorted file-name order."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files = sorted(f for f in os.listdir(self.path) if _is_image(f))

    def __len__(self) -> int:
        return len(self.files)

    def get(self, indices: list[int]) -> np.ndarray:
        frames = []
        for i in indices:
            f = self.path / self.files[i]
            try:
                with Image.open(f) as im:
                    frames.append(np.asarray(im.convert("RGB")))
            except (OSError, ValueError) as e:
                raise VideoError(f"{f}: unreadable frame ({e})") from None
        if len({fr.shape for fr in frames}) > 1:
            raise VideoError(f"{self.path}: frames of different sizes")
        return np.stack(frames)


class VideoFile:
    """A video file decoded with decord."""

    def __init__(self, path: Path):
        import decord  # imported here: its import is slow and only video files need it

        decord.logging.set_level(decord.logging.QUIET)  # our VideoError already names the file
        self.path = Path(path)
        try:
            self.reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises its own DECORDError and RuntimeError
            raise VideoError(f"{self.path}: cannot open video ({first_line(e)})") from None

    def __len__(self) -> int:
        return len(self.reader)

    def get(self, indices: list[int]) -> np.ndarray:
        try:
            return self.reader.get_batch(list(indices)).asnumpy()
        except Exception as e:
            raise VideoError(f"{self.path}: cannot decode frames {list(indices)} ({first_line(e)})") from None


def open_video(path: Path) -> FrameFolder | VideoFile:
    """Open a frame folder or a video file; raises VideoError if it is neither or unreadable."""
    path = Path(path)
    if path.is_dir():
        video = FrameFolder(path)
    elif path.is_file() and _is_video(path.name):
        video = VideoFile(path)
    elif not path.exists():
        raise VideoError(f"{path}: no such video")
    else:
        raise VideoError(f"{path}: not a frame folder or a video file ({', '.join(VIDEO_EXTS)})")
    if len(video) < 2:
        raise VideoError(f"{path}: {len(video)} frame(s); a view needs at least 2")
    return video
