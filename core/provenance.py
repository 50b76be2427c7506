"""Provenance records: what every store, checkpoint and result says about how it was made."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def package_version(name: str = "cosettle") -> str:
    """Installed version of ``name``, or "unknown" (recorded as such) when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def now_utc() -> str:
    """The current UTC time as ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    """Versions of cosettle and the libraries that shape its numbers."""
    return {
        "cosettle_version": package_version("cosettle"),
        "torch": package_version("torch"),
        "timm": package_version("timm"),
        "zarr": package_version("zarr"),
        "python": platform.python_version(),
    }


def mismatches(expected: dict, found: dict) -> list[str]:
    """'key: expected X, found Y' for every key of ``expected`` whose value differs in ``found``."""
    return [f"{k}: expected {expected[k]!r}, found {found.get(k)!r}" for k in expected if found.get(k) != expected[k]]


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``: equal provenance, equal digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def field_types(cls: type, exclude: set[str] = frozenset()) -> dict[str, tuple[type, ...]]:
    """Setting name -> accepted value types, read from the defaults of a config dataclass."""
    return {f.name: (type(f.default),) for f in fields(cls) if f.name not in exclude}
