"""A Zarr v3 cache that many processes may fill at once: entries are written privately and
published by renaming a directory, so a reader sees every entry whole or not at all.

Layout (``path = cache.zarr``)::

    cache.zarr/                  the published group; its attribute ``attr`` records the key
    cache.zarr/<a>/<b>/<name>/   published entries (arrays) under their parent groups
    cache.zarr.partial/          private work, never a member of the group:
        <token>.lock             held (flock) by the live writer of <token>/
        <token>/                 an array, or a group, being built

The group itself, each parent group and each entry is built in ``<token>/`` and moved into
place with one ``os.rename`` (same filesystem, so atomic). Renaming a directory onto a
non-empty one fails, so the first writer wins and later writers keep its node and drop
theirs. Published nodes are never rewritten.

Debris: a writer killed mid-fill leaves ``<token>/`` and ``<token>.lock`` in the private
folder. Its lock died with it, so whoever opens the cache next removes them; a live writer
still holds its lock and is left alone. Readers never look in the private folder.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from cosettle.core.atomic import naming_failures
from cosettle.core.errors import first_line
from cosettle.core.provenance import environment, mismatches, now_utc
from cosettle.pipeline.chunk_reads import DamagedChunk, read_rows


class CacheError(Exception):
    """A cache that cannot be used as asked; the message names the store."""


def _parts(name: str) -> list[str]:
    """The path components of an entry name; refuses names that would leave the group."""
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad cache entry name {name!r}")
    return parts


def _publish(tmp: Path, target: Path) -> bool:
    """Rename ``tmp`` to ``target``; False (``tmp`` left as is) when ``target`` already exists."""
    try:
        os.rename(tmp, target)
        return True
    except OSError as e:
        # rename(2) onto a non-empty directory fails: another writer published first
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (a sweeper may unlink it before we lock it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class ZarrCache:
    """A Zarr v3 group of immutable entries, created and filled safely by concurrent processes."""

    def __init__(self, path: Path, key: dict, attr: str):
        self.path = Path(path)
        self.key = key
        self.attr = attr
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._sweep()
        if not self.path.exists():
            self._create()
        try:
            # read-only: published nodes are never rewritten; writes go through the private folder
            self.group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        except Exception as e:  # zarr reports a foreign tree as several unrelated error types
            raise CacheError(f"{self.path}: not a Zarr v3 group ({type(e).__name__}: {first_line(e)})") from None
        meta = self.group.attrs.get(attr)
        if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
            raise CacheError(f"{self.path}: not a cosettle cache (group attribute {attr} missing)")
        # compare as stored: JSON turns tuples into lists
        diff = mismatches(json.loads(json.dumps(key)), meta["key"])
        if diff:
            raise CacheError(f"{self.path}: features cache made with other settings ({'; '.join(diff)}); "
                             "use another --cache")

    def _create(self) -> None:
        """Build the group aside and rename it into place; if another process won, theirs stands."""
        record = {"key": self.key, "environment": environment(), "created": now_utc()}
        with self._private("group") as tmp, naming_failures(self.path):
            zarr.open_group(store=LocalStore(tmp), mode="w-", zarr_format=3, attributes={self.attr: record})
            _publish(tmp, self.path)  # lost the race: open the winner's below (its key is checked there)

    def get(self, name: str) -> zarr.Array | None:
        """The published entry ``name`` (may contain '/'), or None."""
        _parts(name)
        node = self.group.get(name)
        if node is not None and not isinstance(node, zarr.Array):
            raise CacheError(f"{self.path}: {name} is a group, not a cache entry")
        return node

    def read(self, array: zarr.Array, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows [lo, hi) of a published entry; a damaged chunk file is a CacheError naming it."""
        try:
            return read_rows(array, (), lo, hi)
        except DamagedChunk as d:
            if d.key is None:
                raise CacheError(f"{self.path / array.path}: unreadable cache entry ({first_line(d.error)})") from None
            raise CacheError(f"{self.path / array.path / d.key}: damaged cache chunk ({first_line(d.error)}); "
                             f"delete {self.path / array.path} to compute it again") from None

    def put(self, name: str, shape: tuple, dtype: str, fill: Callable[[zarr.Array], None], attrs: dict,
            chunks: tuple | None = None) -> zarr.Array:
        """Fill a private array, set ``attrs``, publish it as ``name``; an entry published first by
        another writer is kept and returned instead."""
        parts = _parts(name)
        found = self.get(name)
        if found is not None:
            return found
        with self._private("array") as tmp, naming_failures(self.path.joinpath(*parts)):
            array = zarr.create_array(store=LocalStore(tmp), shape=shape, dtype=dtype,
                                      chunks=chunks if chunks is not None else "auto", fill_value=0,
                                      compressors=None)
            fill(array)
            array.attrs.update(attrs)
            for i in range(1, len(parts)):
                self._parent(parts[:i])
            _publish(tmp, self.path.joinpath(*parts))  # False: theirs stands, ours is dropped below
        published = self.get(name)
        if published is None:
            raise CacheError(f"{self.path}: {name} could not be published")
        return published

    def _parent(self, parts: list[str]) -> None:
        """Make sure the parent group ``parts`` exists; concurrent creators race by rename."""
        target = self.path.joinpath(*parts)
        meta = target / "zarr.json"
        if not meta.is_file():
            with self._private("group") as tmp:
                zarr.open_group(store=LocalStore(tmp), mode="w-", zarr_format=3)
                _publish(tmp, target)  # lost the race: an identical group is already there
        try:
            node_type = json.loads(meta.read_text()).get("node_type")
        except (OSError, ValueError):
            node_type = None
        if node_type != "group":
            raise CacheError(f"{self.path}: {'/'.join(parts)} is not a group, cannot hold entries")

    @contextmanager
    def _private(self, kind: str) -> Iterator[Path]:
        """A fresh directory in the private folder, locked by this process until the block ends
        (then removed if it was not published)."""
        self.partial.mkdir(parents=True, exist_ok=True)
        while True:
            lock = self.partial / f"{kind}-{os.getpid()}-{uuid.uuid4().hex}.lock"
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock):
                break
            os.close(fd)  # a sweeper took the unlocked file for debris: take another name
        tmp = lock.with_suffix("")
        try:
            tmp.mkdir()
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # already gone when published
            lock.unlink(missing_ok=True)
            os.close(fd)

    def _sweep(self) -> None:
        """Remove the private work of dead writers: their locks can be taken."""
        if not self.partial.is_dir():
            return
        for lock in self.partial.glob("*.lock"):
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:  # gone meanwhile, or a folder we may not write: leave it
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its writer is alive
                os.close(fd)
                continue
            try:
                if _same_file(fd, lock):
                    shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                    lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
