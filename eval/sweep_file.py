"""The sweep file (TOML): schema, validation, and errors that name the line and field at fault.

```toml
[sweep]
out = "sweep-out"            # stores/, runs/, evals/, tasks/, results.parquet/ (relative to this file)
device = "auto"              # auto, cpu or cuda, for every task
workers = 2                  # LocalCluster workers without GPUs (with GPUs: one worker per GPU)

[datasets.train]             # the training videos: a directory to scan or a list file, and its root
videos = "k400/train_list.txt"
root = "k400/frames"
[datasets.davis]
root = "DAVIS"

[extract]                    # cosettle-extract options shared by every backbone
views = 5

[[backbones]]                # one table per backbone; `id` defaults to `name` and must be unique
name = "mae_vitb"
weights = "ckpt/mae_pretrain_vit_base.pth"   # or "random"
# arch = { embed_dim = 64, depth = 2, num_heads = 2 }   # tiny architectures for tests

[train]                      # cosettle-train options fixed for every setting
epochs = 5
[train.grid]                 # one list per varied option; the settings are their cartesian product
lambda_reg = [1.0, 3.0]

[evaluations.davis]          # `kind` defaults to the table name, `dataset` to the kind;
preset = "dino"              # every other key is an option of that evaluation
```
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from cosettle.pipeline.backbones import BACKBONES, RANDOM
from cosettle.pipeline.extract import ExtractConfig
from cosettle.trainer.config import TrainConfig

# Options the sweep sets itself (paths, resuming) and so never takes from the file.
EXTRACT_FIXED = {"videos", "out", "backbone", "weights", "root", "shard", "resume", "overwrite", "arch", "device"}
TRAIN_FIXED = {"features", "out", "device", "resume", "overwrite", "max_steps"}
DEVICES = ("auto", "cpu", "cuda")

Key = tuple[str | int, ...]


REQUIRED = object()  # the default of an evaluation option the sweep file must give


@dataclass(frozen=True)
class EvalKind:
    """An evaluation kind the sweep file may name: its runner, its options and what data it reads."""

    run: Callable[..., dict[str, float]]
    options: dict[str, Any]  # name -> default (REQUIRED: must be given; None: any value)
    data: str = "root"  # the dataset field it reads: "root" or "videos"
    paths: tuple[str, ...] = ()  # options naming files, relative to the sweep file
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)  # where the default does not tell
    check: Callable[[dict], None] | None = None  # raises ValueError naming the bad option


class SweepFileError(Exception):
    """A sweep file that cannot be used; the message is ``FILE:LINE: FIELD: problem``."""


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``: equal provenance, equal digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone of the sweep: a registered name, its weights, an optional tiny architecture."""

    id: str
    name: str
    weights: str  # an absolute path, or "random"
    arch: dict | None = None


@dataclass(frozen=True)
class Dataset:
    """A named dataset: a root folder and/or a video source (directory or list file)."""

    name: str
    root: Path | None = None
    videos: Path | None = None


@dataclass(frozen=True)
class Setting:
    """One point of the training grid: ``values`` are TrainConfig options (fixed and varied)."""

    id: str
    label: str
    values: dict

    def config(self, features: Path, out: Path, device: str) -> TrainConfig:
        """The run's config (a fresh run; the sweep turns ``resume`` on where the run exists)."""
        return TrainConfig(features=(str(features),), out=str(out), device=device, **self.values)

    def result_settings(self) -> dict:
        """The options that determine the trained weights (TrainConfig.result_settings)."""
        return TrainConfig(**self.values).result_settings()


@dataclass(frozen=True)
class Evaluation:
    """One evaluation run for every backbone, baseline and trained: a kind, its data, its options."""

    name: str
    kind: str
    dataset: Dataset
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file, every path absolute."""

    file: Path
    out: Path
    device: str
    workers: int
    train_data: Dataset
    extract: dict
    backbones: tuple[BackboneEntry, ...]
    settings: tuple[Setting, ...]
    evaluations: tuple[Evaluation, ...]

    @property
    def results(self) -> Path:
        return self.out / "results.parquet"


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


class _Reader:
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


def _options_of(cls: type, exclude: set[str]) -> dict[str, type]:
    """Option name -> type of a config dataclass, taken from its defaults."""
    out = {}
    for f in fields(cls):
        if f.name in exclude:
            continue
        default = f.default
        if isinstance(default, bool):
            out[f.name] = bool
        elif isinstance(default, (int, float)):
            out[f.name] = float if isinstance(default, float) else int
        else:
            out[f.name] = type(default)
    return out


def option_types(default: Any) -> tuple[type, ...]:
    """Types a value may have where the default is ``default`` (any scalar or list for None/REQUIRED)."""
    if default is None or default is REQUIRED:
        return (str, int, float, bool, list)
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, tuple):
        return (list,)
    return (type(default),)


def parse_sweep(path: Path, evaluations: Mapping[str, EvalKind]) -> Sweep:
    """Read and validate a sweep file; ``evaluations`` are the evaluation kinds it may name."""
    path = Path(path).resolve()
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
    r = _Reader(path, text, doc)
    r.table((), {"sweep", "datasets", "extract", "backbones", "train", "evaluations"})

    r.table(("sweep",), {"out", "device", "workers"})
    out = r.path(("sweep", "out"), must_exist=False)
    device = r.get(("sweep", "device"), str, "auto")
    if device not in DEVICES:
        raise r.error(("sweep", "device"), f"choose one of {', '.join(DEVICES)}, got {device!r}")
    workers = r.get(("sweep", "workers"), int, 1)
    if workers < 1:
        raise r.error(("sweep", "workers"), f"must be at least 1, got {workers}")

    datasets = _datasets(r)
    if "train" not in datasets or datasets["train"].videos is None:
        raise r.error(("datasets", "train", "videos"), "missing: the training videos (a directory or a list file)")
    extract = _config_table(r, ("extract",), ExtractConfig, EXTRACT_FIXED)
    backbones = _backbones(r)
    settings = _settings(r)
    evals = _evaluations(r, datasets, evaluations)
    return Sweep(path, out, device, workers, datasets["train"], extract, backbones, settings, evals)


def _datasets(r: _Reader) -> dict[str, Dataset]:
    out = {}
    for name in r.table(("datasets",), None):
        key = ("datasets", name)
        r.table(key, {"root", "videos"})
        ds = Dataset(name, r.path(key + ("root",), default=None), r.path(key + ("videos",), default=None))
        if ds.root is None and ds.videos is None:
            raise r.error(key, "give a root and/or videos")
        out[name] = ds
    return out


def _config_table(r: _Reader, key: Key, cls: type, exclude: set[str]) -> dict:
    """A table of options of a config dataclass, each type-checked against its default."""
    kinds = _options_of(cls, exclude)
    table = r.table(key, set(kinds), required=False)
    return {name: r.typed(key + (name,), value, kinds[name]) for name, value in table.items()}


def _check_name(r: _Reader, key: Key, name: str) -> None:
    """Names that become task ids and folder names."""
    if not re.fullmatch(r"[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*", name):
        raise r.error(key, f"{name!r}: use letters, digits, '_', '.' and single inner '-' only (it names folders)")


def _backbones(r: _Reader) -> tuple[BackboneEntry, ...]:
    entries = r.get(("backbones",), list)
    if not entries:
        raise r.error(("backbones",), "give at least one [[backbones]] table")
    out: list[BackboneEntry] = []
    for i in range(len(entries)):
        key: Key = ("backbones", i)
        r.table(key, {"id", "name", "weights", "arch"})
        name = r.get(key + ("name",), str)
        if name not in BACKBONES:
            raise r.error(key + ("name",), f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
        ident = r.get(key + ("id",), str, name)
        _check_name(r, key + ("id",), ident)
        if any(b.id == ident for b in out):
            raise r.error(key + ("id",) if "id" in entries[i] else key + ("name",),
                          f"backbone id {ident!r} is used twice; give each entry its own `id`")
        weights = r.get(key + ("weights",), str)
        if weights != RANDOM:
            weights = str(r.path(key + ("weights",)))
        arch = r.get(key + ("arch",), dict, None)
        out.append(BackboneEntry(ident, name, weights, arch))
    return tuple(out)


def _settings(r: _Reader) -> tuple[Setting, ...]:
    kinds = _options_of(TrainConfig, TRAIN_FIXED)
    table = r.table(("train",), set(kinds) | {"grid"}, required=False)
    fixed = {name: r.typed(("train", name), v, kinds[name]) for name, v in table.items() if name != "grid"}
    grid_key: Key = ("train", "grid")
    grid = r.table(grid_key, set(kinds), required=False)
    axes = {}
    for name, values in grid.items():
        key = grid_key + (name,)
        if not isinstance(values, list) or not values:
            raise r.error(key, f"must be a non-empty list of values, got {values!r}")
        if name in fixed:
            raise r.error(key, f"also set in [train] (line {r.lines[('train', name)]}); set it in one place")
        axes[name] = [r.typed(key, v, kinds[name]) for v in values]
    settings = []
    for point in itertools.product(*axes.values()):
        varied = dict(zip(axes, point))
        values = fixed | varied
        try:
            TrainConfig(features=("x",), out="x", **values).validate()
        except ValueError as e:
            option = re.match(r"--([a-z-]+)", str(e))
            name = option.group(1).replace("-", "_") if option else ""
            key = grid_key + (name,) if name in axes else ("train", name) if name in fixed else ("train",)
            raise r.error(key, str(e).split(": ", 1)[-1]) from None
        label = ", ".join(f"{k}={v}" for k, v in varied.items()) or "default"
        settings.append(Setting("s-" + digest(TrainConfig(**values).result_settings())[:10], label, values))
    return tuple(settings)


def _evaluations(r: _Reader, datasets: dict[str, Dataset], kinds: Mapping[str, EvalKind]) -> tuple[Evaluation, ...]:
    out = []
    for name in r.table(("evaluations",), None):
        key = ("evaluations", name)
        _check_name(r, key, name)
        table = r.table(key, None)
        kind_name = r.get(key + ("kind",), str, name)
        if kind_name not in kinds:
            raise r.error(key + ("kind",) if "kind" in table else key,
                          f"unknown evaluation kind {kind_name!r} (known: {', '.join(kinds)})")
        kind = kinds[kind_name]
        ds_name = r.get(key + ("dataset",), str, kind_name)
        ds_key = key + ("dataset",) if "dataset" in table else key
        if ds_name not in datasets:
            raise r.error(ds_key, f"no [datasets.{ds_name}] table for this evaluation")
        dataset = datasets[ds_name]
        if getattr(dataset, kind.data) is None:
            raise r.error(("datasets", ds_name), f"a {kind_name} evaluation reads `{kind.data}`, which is not given")
        options = {}
        for opt, value in table.items():
            if opt in ("kind", "dataset"):
                continue
            if opt not in kind.options:
                raise r.error(key + (opt,), f"unknown option of a {kind_name} evaluation (known: {', '.join(kind.options)})")
            options[opt] = str(r.path(key + (opt,))) if opt in kind.paths else \
                r.typed(key + (opt,), value, kind.types.get(opt) or option_types(kind.options[opt]))
        for opt, default in kind.options.items():
            if default is REQUIRED and opt not in options:
                raise r.error(key + (opt,), f"missing (a {kind_name} evaluation needs it)")
        options = {k: v for k, v in kind.options.items() if v is not REQUIRED} | options
        if kind.check is not None:
            try:
                kind.check(options)
            except ValueError as e:
                bad = [o for o in table if re.search(rf"\b{re.escape(o)}\b", str(e))]
                raise r.error(key + (bad[0],) if bad else key, str(e)) from None
        out.append(Evaluation(name, kind_name, dataset, options))
    if not out:
        raise r.error(("evaluations",), "give at least one [evaluations.NAME] table")
    return tuple(out)
