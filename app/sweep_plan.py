"""The plan of a sweep: every task of every backbone x training setting x evaluation, its
provenance digest, its output, and whether a finished output with that provenance exists.

Tasks: ``extract-<backbone>`` (one feature store per backbone) -> ``train-<backbone>-<setting>``
(one run per grid point) -> ``eval-<backbone>-<setting>-<evaluation>``, plus
``eval-<backbone>-baseline-<evaluation>`` for the frozen backbone, which every projection
evaluation of that backbone waits for (they reuse its cached backbone features).

Every task has a provenance digest (the sha256 of all it depends on: weights digest,
architecture, video list digest, settings, upstream digests). A task is done when its output
exists with that provenance: a complete store with the expected settings and a matching record
in ``tasks/``; a finished run with a matching record; a results row carrying the digest.

Layout of ``[sweep] out`` (``D`` = the first hex digits of the output's provenance, so a
changed sweep file adds outputs instead of overwriting finished ones):
``stores/<backbone>-D.zarr``, ``runs/<backbone>/<setting>-D/``,
``evals/<backbone>/<setting|baseline>/<evaluation>-D/`` and ``evals/<backbone>/cache-<evaluation>-D.zarr``
(frame features), ``tasks/<task>.json`` (records of finished extractions and trainings: provenance,
wall time, worker), ``results.parquet/`` (see :mod:`cosettle.app.results`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cosettle.core.provenance import digest, mismatches, package_version, sha256_file
from cosettle.eval.task import TaskContext, discover
from cosettle.pipeline.extract import ExtractConfig
from cosettle.pipeline.store import FeatureStore, StoreError
from cosettle.pipeline.store_settings import videos_digest
from cosettle.pipeline.videos import discover_videos
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.objective import get_objective
from cosettle.trainer.run_dir import RunDir

from . import results as results_table
from .sweep_file import BackboneEntry, Evaluation, Setting, Sweep

# Store settings fixed by the sweep's [extract] table (the rest follow from the backbone); a clip
# store records the shared ones, and its own under other names (``frames`` for clip_frames, ...).
STORE_OPTIONS = ("views", "seed", "dtype", "clip_gap", "asy_ratio", "chunk_videos", "compressor")
SHARED_STORE_OPTIONS = ("views", "seed", "dtype", "chunk_videos", "compressor")
CLIP_OPTIONS = ("clip_frames", "levels", "pooling", "slow_stride", "fast_stride")


# -- jobs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractJob:
    id: str
    provenance: str
    record: Path
    config: ExtractConfig
    expected: dict  # the store settings the sweep determines

    inputs = ()  # no upstream task


@dataclass(frozen=True)
class TrainJob:
    id: str
    provenance: str
    record: Path
    config: TrainConfig
    extract: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.extract,)


@dataclass(frozen=True)
class EvalJob:
    id: str
    provenance: str
    results: Path
    evaluation: Evaluation
    context: TaskContext
    row: dict  # the fixed columns known before running
    settings: dict  # training settings of a projection row
    extract: str | None
    train: str | None
    baseline: str | None

    @property
    def inputs(self) -> tuple[str | None, ...]:
        """The tasks whose outputs ``run_eval`` takes, in its argument order (None: not used)."""
        return self.extract, self.train, self.baseline


Job = ExtractJob | TrainJob | EvalJob


@dataclass
class Plan:
    """Every job of a sweep in dependency order, and the recorded outputs of those already done."""

    sweep: Sweep
    jobs: dict[str, Job]
    done: dict[str, Any]

    @property
    def todo(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.id not in self.done]


def _read_record(path: Path, provenance: str) -> dict | None:
    """The task record at ``path`` if it carries ``provenance``."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("provenance") == provenance else None


def _extract_done(job: ExtractJob) -> dict | None:
    record = _read_record(job.record, job.provenance)
    if record is None or not job.config.out.exists():
        return None
    try:
        store = FeatureStore(job.config.out)
    except StoreError:
        return None
    return record if store.complete and not mismatches(job.expected, store.settings) else None


def _train_done(job: TrainJob) -> dict | None:
    record = _read_record(job.record, job.provenance)
    return record if record is not None and RunDir(job.config.out).finished else None


def output_of(job: Job) -> Path:
    """Where a job writes its result: a store, a run directory, or a results part."""
    if isinstance(job, EvalJob):
        return results_table.part_path(job.results, job.id, job.provenance)
    return Path(job.config.out)


def _status(job: Job) -> Any:
    """The recorded output of a finished job with the same provenance, else None."""
    if isinstance(job, ExtractJob):
        return _extract_done(job)
    if isinstance(job, TrainJob):
        return _train_done(job)
    path = output_of(job)
    return str(path) if path.is_file() else None


def backbone_key(entry: BackboneEntry) -> dict:
    sha = "random" if entry.weights == "random" else sha256_file(Path(entry.weights))
    return {"name": entry.name, "weights": Path(entry.weights).name, "weights_sha256": sha, "arch": entry.arch}


def plan_sweep(sweep: Sweep) -> Plan:
    """All jobs of ``sweep`` with their provenance, and which of them are already done."""
    out, data = sweep.out, sweep.train_data
    _, videos = discover_videos(data.videos, data.root)
    extract_defaults = {f.name: f.default for f in fields(ExtractConfig) if f.name in STORE_OPTIONS}
    store_options = extract_defaults | {k: v for k, v in sweep.extract.items() if k in STORE_OPTIONS}
    jobs: dict[str, Job] = {}
    base_row = {"sweep": str(sweep.file), "cosettle_version": package_version()}
    for entry in sweep.backbones:
        bkey = backbone_key(entry)
        extracts: dict[str | None, ExtractJob] = {}
        row = base_row | {"backbone": entry.id, "backbone_name": entry.name, "weights": bkey["weights"],
                          "weights_sha256": bkey["weights_sha256"],
                          "arch": json.dumps(entry.arch, sort_keys=True) if entry.arch else None}
        baselines = {}
        for ev in sweep.evaluations:
            job = eval_job(sweep, entry, bkey, ev, None, None, None, row, None)
            jobs[job.id] = baselines[ev.name] = job
        for setting in sweep.settings:
            plan = get_objective(setting.values.get("objective", "cosettle")).plan
            if plan not in extracts:
                extracts[plan] = _extract_job(sweep, entry, bkey, videos, store_options, plan)
                jobs[extracts[plan].id] = extracts[plan]
            ex = extracts[plan]
            tprov = digest({"store": ex.provenance, "train": setting.result_settings()})
            cfg = setting.config(ex.config.out, out / "runs" / entry.id / f"{setting.id}-{tprov[:8]}", sweep.device)
            tr = TrainJob(id=f"train-{entry.id}-{setting.id}", provenance=tprov,
                          record=out / "tasks" / f"train-{entry.id}-{setting.id}.json",
                          config=cfg, extract=ex.id)
            jobs[tr.id] = tr
            for ev in sweep.evaluations:
                # A clip-level head maps whole clips: only video-level tasks can evaluate it.
                if plan is None or discover()[ev.kind].family == "video":
                    job = eval_job(sweep, entry, bkey, ev, setting, tr, ex, row, baselines[ev.name])
                    jobs[job.id] = job
    done = {}
    for job in jobs.values():
        status = _status(job)
        if status is not None:
            done[job.id] = status
    return Plan(sweep, jobs, done)


def _extract_job(sweep: Sweep, entry: BackboneEntry, bkey: dict, videos: list[str], store_options: dict,
                 plan: str | None) -> ExtractJob:
    """The store of one backbone: a views store (``plan`` None), or a clip store of ``plan``."""
    layout = {} if plan is None else {"layout": "clips", "plan": plan}
    ekey = {"backbone": bkey, "videos_sha256": videos_digest(videos), "num_videos": len(videos),
            "store": store_options | layout}
    if plan is not None:  # the clip options shape a clip store only; a views store's key stays as it was
        ekey["clips"] = {k: v for k, v in sweep.extract.items() if k in CLIP_OPTIONS}
    eprov = digest(ekey)
    ident = f"extract-{entry.id}" + (f"-{plan}" if plan else "")
    # Outputs carry their provenance in their names: a changed sweep never clobbers finished work.
    store = sweep.out / "stores" / f"{entry.id}{'-' + plan if plan else ''}-{eprov[:8]}.zarr"
    data = sweep.train_data
    return ExtractJob(
        id=ident, provenance=eprov, record=sweep.out / "tasks" / f"{ident}.json",
        config=ExtractConfig(videos=data.videos, root=data.root, out=store, backbone=entry.name,
                             weights=entry.weights, arch=entry.arch, device=sweep.device, resume=True,
                             **sweep.extract, **layout),
        expected={"backbone": entry.name, "weights_sha256": bkey["weights_sha256"],
                  "videos_sha256": ekey["videos_sha256"], "num_videos": len(videos)}
        | {k: v for k, v in store_options.items() if plan is None or k in SHARED_STORE_OPTIONS} | layout,
    )


def eval_job(sweep: Sweep, entry: BackboneEntry, bkey: dict, ev: Evaluation, setting: Setting | None,
              train: TrainJob | None, extract: ExtractJob | None, row: dict, baseline: EvalJob | None) -> EvalJob:
    variant = setting.id if setting else "baseline"
    spec = {"kind": ev.kind, "root": ev.dataset.root, "videos": ev.dataset.videos, "options": ev.options}
    prov = digest({"backbone": bkey, "train": train.provenance if train else None, "evaluation": spec})
    folder = sweep.out / "evals" / entry.id
    # One features cache per backbone and evaluation: the baseline fills it, the projections read it.
    cache = folder / f"cache-{ev.name}-{digest({'backbone': bkey, 'evaluation': spec})[:8]}.zarr"
    context = TaskContext(entry.name, entry.weights, folder / variant / f"{ev.name}-{prov[:8]}", entry.arch,
                          Path(train.config.out) if train else None, ev.dataset.root, ev.dataset.videos, cache,
                          sweep.device)
    ident = f"eval-{entry.id}-{variant}-{ev.name}"
    row = row | {
        "task": ident, "provenance": prov,
        "variant": results_table.PROJECTION if setting else results_table.BASELINE,
        "setting": setting.id if setting else None, "setting_label": setting.label if setting else None,
        "evaluation": ev.name, "eval_kind": ev.kind, "dataset": str(ev.dataset.root or ev.dataset.videos),
        "run_dir": str(train.config.out) if train else None, "eval_out": str(context.out),
    }
    return EvalJob(ident, row["provenance"], sweep.results, ev, context, row,
                   train.config.result_settings() if train else {},
                   extract.id if train else None, train.id if train else None, baseline.id if baseline else None)
