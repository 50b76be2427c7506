"""List files: one name per line, the format of video lists and dataset split lists."""
from __future__ import annotations

from pathlib import Path


class ListFileError(ValueError):
    """A list file that cannot be used; the message names it."""


def read_list_file(path: Path) -> list[str]:
    """The names of a list file: one per line, blank lines and '#' comments skipped.

    An empty list or a name given twice is a ListFileError naming the file.
    """
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    names = [ln for ln in lines if ln and not ln.startswith("#")]
    if not names:
        raise ListFileError(f"{path}: the video list is empty")
    if len(set(names)) != len(names):
        raise ListFileError(f"{path}: the video list names some videos twice")
    return names
