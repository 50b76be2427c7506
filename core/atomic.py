"""Files written aside and renamed into place, so a reader never sees half a file and a killed
writer never leaves one."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable


def aside(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a name beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = aside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: Path, obj: object, sort_keys: bool = True) -> Path:
    """``obj`` as indented JSON, written atomically (the parent folder must exist)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text))
