"""Reading a TOML file whose every complaint names the file, the line and the field at fault."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import tomllib

Key = tuple[str | int, ...]


class SweepFileError(Exception):
    """A sweep file that cannot be used; the message is ``FILE:LINE: FIELD: problem``."""


# -- where each key is written ------------------------------------------------------------------

_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED})\s*\]\]?")
_ASSIGN = re.compile(rf"^\s*({_DOTTED})\s*=")


def _parts(dotted: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(_PART, dotted)]


def key_lines(text: str) -> dict[Key, int]:
    """1-based line of every table header and key of a (syntactically valid) TOML text.

    Arrays of tables get their index (``("backbones", 1, "weights")``); keys inside inline
    tables and multi-line values map to the line their outer key starts on.
    """
    lines: dict[Key, int] = {}
    counts: dict[Key, int] = {}
    table: Key = ()
    depth = 0  # open brackets/braces of a multi-line value
    quote = None  # the delimiter of an open multi-line string
    for n, line in enumerate(text.splitlines(), start=1):
        if quote is not None:
            if quote in line:
                quote = None
            continue
        if depth == 0 and (m := _HEADER.match(line)):
            path = tuple(_parts(m.group(2)))
            if m.group(1) == "[[":
                counts[path] = counts.get(path, -1) + 1
                table = path + (counts[path],)
            else:
                table = path
            lines.setdefault(table, n)
            continue
        if depth == 0 and (m := _ASSIGN.match(line)):
            lines.setdefault(table + tuple(_parts(m.group(1))), n)
            rest = line[m.end():]
        else:
            rest = line
        for delim in ('"""', "'''"):
            if rest.count(delim) % 2:
                quote = delim
        body = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', "", rest).split("#")[0]
        depth = max(0, depth + body.count("[") + body.count("{") - body.count("]") - body.count("}"))
    return lines


def _field_name(key: Key) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class Reader:
    """Typed access to the parsed document; every complaint names the file, line and field."""

    def __init__(self, path: Path, text: str, doc: dict):
        self.file, self.doc, self.lines = path, doc, key_lines(text)

    def error(self, key: Key, message: str) -> SweepFileError:
        probe = key
        while probe and probe not in self.lines:  # a missing key: point at its table
            probe = probe[:-1]
        where = f"{self.file}:{self.lines[probe]}" if probe in self.lines else str(self.file)
        return SweepFileError(f"{where}: {_field_name(key) or '(top level)'}: {message}")

    def value(self, key: Key) -> Any:
        node: Any = self.doc
        for part in key:
            node = node[part]
        return node

    def table(self, key: Key, allowed: set[str] | None, required: bool = True) -> dict:
        if not self._exists(key):
            if required:
                raise self.error(key, "missing table")
            return {}
        node = self.value(key)
        if not isinstance(node, dict):
            raise self.error(key, f"must be a table, got {type(node).__name__}")
        if allowed is not None:
            for name in node:
                if name not in allowed:
                    raise self.error(key + (name,), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return node

    def _exists(self, key: Key) -> bool:
        try:
            self.value(key)
        except (KeyError, IndexError, TypeError):
            return False
        return True

    def get(self, key: Key, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if not self._exists(key):
            if default is ...:
                raise self.error(key, "missing")
            return default
        return self.typed(key, self.value(key), kind)

    def typed(self, key: Key, value: Any, kind: type | tuple[type, ...]) -> Any:
        """``value`` checked against ``kind`` (an int is accepted, and converted, as a float)."""
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"must be {names}, got {type(value).__name__} {value!r}")
        return value

    def path(self, key: Key, must_exist: bool = True, default: Any = ...) -> Path | None:
        raw = self.get(key, str, default)
        if raw is None:
            return None
        p = (self.file.parent / raw).resolve()
        if must_exist and not p.exists():
            raise self.error(key, f"no such file or directory: {p}")
        return p


def open_toml(path: Path) -> Reader:
    """Read and parse a TOML file; unreadable or invalid TOML is a SweepFileError with the line."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SweepFileError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        at = f"{where.group(1)}: column {where.group(2)}" if where else str(len(text.splitlines()))
        raise SweepFileError(f"{path}:{at}: not valid TOML ({str(e).split(' (at')[0]})") from None
    return Reader(path, text, doc)
