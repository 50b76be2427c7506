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

[slurm]                      # optional: the SLURM jobs of `cosettle-sweep --slurm` (sweep_slurm)
partition = "gpu"
```
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cosettle.core.provenance import digest, field_types
from cosettle.eval.task import REQUIRED, EvalTask, discover
from cosettle.eval.task import option_types as default_types
from cosettle.pipeline.backbones import BACKBONES, RANDOM
from cosettle.pipeline.extract import ExtractConfig
from cosettle.trainer.config import TrainConfig, option_types

from .sweep_slurm import SlurmSettings, read_slurm
from .sweep_toml import Key, Reader, open_toml

# Options the sweep sets itself (paths, resuming) and so never takes from the file.
EXTRACT_FIXED = {"videos", "out", "backbone", "weights", "root", "shard", "resume", "overwrite", "arch", "device",
                 "layout", "plan"}  # layout and plan follow from each setting's objective
EXTRACT_TYPES = {"levels": (list,), "workers": (int,)}  # where the default (None) does not tell
TRAIN_FIXED = {"features", "out", "device", "resume", "overwrite", "max_steps"}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone of the sweep: a registered name, its weights, an optional tiny architecture."""

    id: str
    name: str
    weights: str  # an absolute path, or "random"
    arch: dict | None = None
    release: str | None = None  # a '+Ours' release file (release sweeps only)


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
        return TrainConfig.from_flat(features=(str(features),), out=str(out), device=device, **self.values)

    def result_settings(self) -> dict:
        """The options that determine the trained weights (TrainConfig.result_settings)."""
        return TrainConfig.from_flat(**self.values).result_settings()


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
    slurm: SlurmSettings | None = None  # the [slurm] table, for --slurm

    @property
    def results(self) -> Path:
        return self.out / "results.parquet"


def parse_sweep(path: Path, evaluations: Mapping[str, EvalTask] | None = None) -> Sweep:
    """Read and validate a sweep file; ``evaluations``: the tasks it may name (default: every registered one)."""
    path = Path(path).resolve()
    r = open_toml(path)
    r.table((), {"sweep", "datasets", "extract", "backbones", "train", "evaluations", "slurm"})

    out, device, workers = sweep_table(r)
    datasets = read_datasets(r)
    if "train" not in datasets or datasets["train"].videos is None:
        raise r.error(("datasets", "train", "videos"), "missing: the training videos (a directory or a list file)")
    extract = _config_table(r, ("extract",), ExtractConfig, EXTRACT_FIXED, EXTRACT_TYPES)
    backbones = read_backbones(r)
    settings = _settings(r)
    evals = read_evaluations(r, datasets, discover() if evaluations is None else evaluations)
    return Sweep(path, out, device, workers, datasets["train"], extract, backbones, settings, evals, read_slurm(r))


def sweep_table(r: Reader) -> tuple[Path, str, int]:
    """The ``[sweep]`` table: output folder, device, local workers."""
    r.table(("sweep",), {"out", "device", "workers"})
    out = r.path(("sweep", "out"), must_exist=False)
    device = r.get(("sweep", "device"), str, "auto")
    if device not in DEVICES:
        raise r.error(("sweep", "device"), f"choose one of {', '.join(DEVICES)}, got {device!r}")
    workers = r.get(("sweep", "workers"), int, 1)
    if workers < 1:
        raise r.error(("sweep", "workers"), f"must be at least 1, got {workers}")
    return out, device, workers


def read_datasets(r: Reader) -> dict[str, Dataset]:
    """The ``[datasets.NAME]`` tables."""
    out = {}
    for name in r.table(("datasets",), None):
        key = ("datasets", name)
        r.table(key, {"root", "videos"})
        ds = Dataset(name, r.path(key + ("root",), default=None), r.path(key + ("videos",), default=None))
        if ds.root is None and ds.videos is None:
            raise r.error(key, "give a root and/or videos")
        out[name] = ds
    return out


def _config_table(r: Reader, key: Key, cls: type, exclude: set[str], types: dict | None = None) -> dict:
    """A table of options of a config dataclass, each type-checked against its default (or ``types``)."""
    kinds = field_types(cls, exclude) | (types or {})
    table = r.table(key, set(kinds), required=False)
    return {name: r.typed(key + (name,), value, kinds[name]) for name, value in table.items()}


def check_name(r: Reader, key: Key, name: str) -> None:
    """Names that become task ids and folder names."""
    if not re.fullmatch(r"[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*", name):
        raise r.error(key, f"{name!r}: use letters, digits, '_', '.' and single inner '-' only (it names folders)")


def read_backbones(r: Reader, releases: bool = False) -> tuple[BackboneEntry, ...]:
    """The ``[[backbones]]`` tables; with ``releases``, each may name a '+Ours' ``release`` file."""
    entries = r.get(("backbones",), list)
    if not entries:
        raise r.error(("backbones",), "give at least one [[backbones]] table")
    out: list[BackboneEntry] = []
    for i in range(len(entries)):
        key: Key = ("backbones", i)
        r.table(key, {"id", "name", "weights", "arch"} | ({"release"} if releases else set()))
        name = r.get(key + ("name",), str)
        if name not in BACKBONES:
            raise r.error(key + ("name",), f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
        ident = r.get(key + ("id",), str, name)
        check_name(r, key + ("id",), ident)
        if any(b.id == ident for b in out):
            raise r.error(key + ("id",) if "id" in entries[i] else key + ("name",),
                          f"backbone id {ident!r} is used twice; give each entry its own `id`")
        weights = r.get(key + ("weights",), str)
        if weights != RANDOM:
            weights = str(r.path(key + ("weights",)))
        arch = r.get(key + ("arch",), dict, None)
        release = r.path(key + ("release",), default=None)
        if release is not None and not release.is_file():
            raise r.error(key + ("release",), f"not a file: {release}")
        out.append(BackboneEntry(ident, name, weights, arch, str(release) if release else None))
    return tuple(out)


def _settings(r: Reader) -> tuple[Setting, ...]:
    kinds = option_types(TRAIN_FIXED)
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
            TrainConfig.from_flat(features=("x",), out="x", **values).validate()
        except ValueError as e:
            option = re.match(r"--([a-z-]+)", str(e))
            name = option.group(1).replace("-", "_") if option else ""
            key = grid_key + (name,) if name in axes else ("train", name) if name in fixed else ("train",)
            raise r.error(key, str(e).split(": ", 1)[-1]) from None
        label = ", ".join(f"{k}={v}" for k, v in varied.items()) or "default"
        settings.append(Setting("s-" + digest(TrainConfig.from_flat(**values).result_settings())[:10], label, values))
    return tuple(settings)


def read_evaluations(r: Reader, datasets: dict[str, Dataset], kinds: Mapping[str, EvalTask]) -> tuple[Evaluation, ...]:
    out = []
    for name in r.table(("evaluations",), None):
        key = ("evaluations", name)
        check_name(r, key, name)
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
                r.typed(key + (opt,), value, kind.types.get(opt) or default_types(kind.options[opt]))
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
