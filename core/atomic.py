"""Files written aside and renamed into place, so a reader never sees half a file and a killed
writer never leaves one; a write that fails (a full disk, a quota) is a ``WriteError`` naming the
file, and the file it would have replaced stays as it was."""
from __future__ import annotations

import csv
import errno
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import first_line


class WriteError(Exception):
    """A file could not be written (disk full, quota, permissions); the message names it."""


# OSErrors that mean "could not write": anything else (a missing input file) is not a write failure
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


@contextmanager
def naming_failures(path: Path, kinds: tuple[type[BaseException], ...] = (OSError,)) -> Iterator[None]:
    """Turn a failure of ``kinds`` while writing ``path`` (an OSError only with a ``WRITE_ERRNOS``
    errno) into a one-line ``WriteError`` naming it: an OSError of a write call does not name its file."""
    try:
        yield
    except WriteError:
        raise
    except kinds as e:
        if isinstance(e, OSError) and e.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(f"{path}: cannot write ({type(e).__name__}: {first_line(e)})") from None


def aside(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a name beside ``path``, then rename it into place. Whatever ``write``
    raises means the file was not written (torch and safetensors raise their own types for a
    failed write), so any failure is a WriteError naming ``path``."""
    path = Path(path)
    tmp = aside(path)
    try:
        with naming_failures(path, (Exception,)):
            write(tmp)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_csv(path: Path, rows: Iterable[Sequence]) -> Path:
    """Rows (the header first) as CSV, written atomically."""
    rows = list(rows)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)

    return write_atomic(path, write)


def write_json(path: Path, obj: object, sort_keys: bool = True) -> Path:
    """``obj`` as indented JSON, written atomically (the parent folder must exist)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text))
