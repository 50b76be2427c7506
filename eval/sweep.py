"""``cosettle-sweep SWEEP.toml``: every backbone x training setting x evaluation, as a Dask graph.

Tasks: ``extract-<backbone>`` (one feature store per backbone) -> ``train-<backbone>-<setting>``
(one run per grid point) -> ``eval-<backbone>-<setting>-<evaluation>``, plus
``eval-<backbone>-baseline-<evaluation>`` for the frozen backbone, which every projection
evaluation of that backbone waits for (they reuse its cached backbone features).

Every task has a provenance digest (the sha256 of all it depends on: weights digest,
architecture, video list digest, settings, upstream digests). A task is skipped when its
output exists with that provenance: a complete store with the expected settings and a
matching record in ``tasks/``; a finished run with a matching record; a results row carrying
the digest. Stores and runs are written with resume on, so a killed task restarts from its
finished blocks or last checkpoint; a killed sweep loses only the tasks in flight.

Layout of ``[sweep] out`` (``D`` = the first hex digits of the output's provenance, so a
changed sweep file adds outputs instead of overwriting finished ones):
``stores/<backbone>-D.zarr``, ``runs/<backbone>/<setting>-D/``,
``evals/<backbone>/<setting|baseline>/<evaluation>-D/`` and ``evals/<backbone>/cache-<evaluation>-D.zarr``
(frame features), ``tasks/<task>.json`` (records of finished extractions and trainings: provenance,
wall time, worker), ``results.parquet/`` (see :mod:`cosettle.eval.results`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import click
import dask
import torch
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, as_completed, get_worker

from cosettle.pipeline import extract as extract_stage
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.checkpoints import sha256_file
from cosettle.pipeline.extract import ExtractConfig, resolve_device
from cosettle.pipeline.provenance import mismatches, now_utc, package_version
from cosettle.pipeline.store import FeatureStore, StoreError, videos_digest
from cosettle.pipeline.videos import VideoError, discover_videos
from cosettle.trainer import train as train_stage
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.projection import load_projection
from cosettle.trainer.run_dir import RunDir

from . import davis, jhmdb, vip
from . import results as results_table
from .analysis_report import analyse, write_table
from .features import projection_provenance
from .propagation import PRESETS, PropagationSettings, preset
from .run import EvalConfig
from .sweep_file import (REQUIRED, BackboneEntry, Dataset, EvalKind, Evaluation, Setting, Sweep, SweepFileError,
                         option_types, digest, parse_sweep)

# Store settings fixed by the sweep's [extract] table (the rest follow from the backbone).
STORE_OPTIONS = ("views", "seed", "dtype", "clip_gap", "asy_ratio", "chunk_videos", "compressor")


class SweepError(Exception):
    """A sweep that could not finish; the message lists the failed tasks."""


# -- evaluations: kind -> runner(context, options) -> {metric: value} ----------------------------

@dataclass(frozen=True)
class EvalContext:
    """What an evaluation runner gets besides its options."""

    backbone: BackboneEntry
    projection: Path | None  # a finished training run, or None for the frozen baseline
    dataset: Dataset
    out: Path  # this evaluation's own output folder
    cache: Path  # backbone features, shared by the baseline and projection runs of one evaluation
    device: str


def flat_metrics(summary: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a summary, nested keys joined with '/' (missing values left out)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out |= flat_metrics(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _propagation(options: dict, default_preset: str, task_defaults: dict) -> PropagationSettings:
    """The preset (the task's own when not named), the task's defaults, then the sweep's overrides."""
    overrides = {k: options[k] for k in PROPAGATION_FIELDS}
    return preset(options["preset"] or default_preset).with_overrides(**task_defaults).with_overrides(**overrides)


def _eval_config(ctx: EvalContext, settings: PropagationSettings, batch_size: int) -> EvalConfig:
    return EvalConfig(root=ctx.dataset.root, out=ctx.out, backbone=ctx.backbone.name, weights=ctx.backbone.weights,
                      projection=ctx.projection, settings=settings, device=ctx.device, cache=ctx.cache,
                      batch_size=batch_size, arch=ctx.backbone.arch)


def _propagation_kind(default_preset: str, task_defaults: dict, run: Callable, extra: dict,
                      paths: tuple[str, ...] = ()) -> EvalKind:
    """A label-propagation evaluation: preset, every propagation setting, batch size, ``extra``."""
    def runner(ctx: EvalContext, options: dict) -> dict[str, float]:
        cfg = _eval_config(ctx, _propagation(options, default_preset, task_defaults), options["batch_size"])
        return flat_metrics(run(cfg, **{k: options[k] for k in extra}))

    def check(options: dict) -> None:
        _propagation(options, default_preset, task_defaults)

    options = {"preset": None, "batch_size": 8} | dict.fromkeys(PROPAGATION_FIELDS) | extra
    types = {"preset": (str,)} | {k: option_types(getattr(PRESETS["dino"], k)) for k in PROPAGATION_FIELDS}
    types["size"] = (list,)
    return EvalKind(runner, options, "root", paths, types, check)


def _run_metrics(ctx: EvalContext, options: dict) -> dict[str, float]:
    """The consistency-separability analysis of the dataset's videos (baseline or projection column)."""
    base, paths = discover_videos(ctx.dataset.videos, ctx.dataset.root)
    if len(paths) < 2:
        raise ValueError(f"{ctx.dataset.videos}: the analysis needs at least 2 videos, found {len(paths)}")
    device = torch.device(ctx.device)
    model = load_backbone(ctx.backbone.name, ctx.backbone.weights, device=device, arch=ctx.backbone.arch)
    projection = None
    if ctx.projection is not None:
        projection, config = load_projection(ctx.projection, device)
        projection_provenance(config, ctx.projection, model)
    with torch.no_grad():
        results = analyse([base / p for p in paths], model, projection, device, options["batch_size"])
    write_table(results, ctx.out / "metrics.csv")
    return results["projection" if projection is not None else "baseline"]


PROPAGATION_FIELDS = tuple(f.name for f in fields(PropagationSettings))
EVAL_KINDS: dict[str, EvalKind] = {
    "davis": _propagation_kind("dino", {}, davis.evaluate_davis,
                               {"split": "val", "year": "2017", "resolution": "480p"}),
    "jhmdb": _propagation_kind(jhmdb.DEFAULT_PRESET, {"size": jhmdb.INPUT_SIZE}, jhmdb.evaluate_jhmdb,
                               {"split": REQUIRED}, ("split",)),
    "vip": _propagation_kind(vip.DEFAULT_PRESET, {"size": vip.INPUT_SIZE}, vip.evaluate_vip, {"split": "val"}),
    "metrics": EvalKind(_run_metrics, {"batch_size": 64}, "videos"),
}


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
    context: EvalContext
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


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


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


def _backbone_key(entry: BackboneEntry) -> dict:
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
        bkey = _backbone_key(entry)
        ekey = {"backbone": bkey, "videos_sha256": videos_digest(videos), "num_videos": len(videos),
                "store": store_options}
        eprov = digest(ekey)
        # Outputs carry their provenance in their names: a changed sweep never clobbers finished work.
        store = out / "stores" / f"{entry.id}-{eprov[:8]}.zarr"
        ex = ExtractJob(
            id=f"extract-{entry.id}", provenance=eprov, record=out / "tasks" / f"extract-{entry.id}.json",
            config=ExtractConfig(videos=data.videos, root=data.root, out=store, backbone=entry.name,
                                 weights=entry.weights, arch=entry.arch, device=sweep.device, resume=True,
                                 **sweep.extract),
            expected={"backbone": entry.name, "weights_sha256": bkey["weights_sha256"],
                      "videos_sha256": ekey["videos_sha256"], "num_videos": len(videos)} | store_options,
        )
        jobs[ex.id] = ex
        row = base_row | {"backbone": entry.id, "backbone_name": entry.name, "weights": bkey["weights"],
                          "weights_sha256": bkey["weights_sha256"],
                          "arch": json.dumps(entry.arch, sort_keys=True) if entry.arch else None}
        baselines = {}
        for ev in sweep.evaluations:
            job = _eval_job(sweep, entry, bkey, ev, None, None, ex, row, None)
            jobs[job.id] = baselines[ev.name] = job
        for setting in sweep.settings:
            tprov = digest({"store": ex.provenance, "train": setting.result_settings()})
            cfg = setting.config(store, out / "runs" / entry.id / f"{setting.id}-{tprov[:8]}", sweep.device)
            tr = TrainJob(id=f"train-{entry.id}-{setting.id}", provenance=tprov,
                          record=out / "tasks" / f"train-{entry.id}-{setting.id}.json",
                          config=cfg, extract=ex.id)
            jobs[tr.id] = tr
            for ev in sweep.evaluations:
                job = _eval_job(sweep, entry, bkey, ev, setting, tr, ex, row, baselines[ev.name])
                jobs[job.id] = job
    done = {}
    for job in jobs.values():
        status = _status(job)
        if status is not None:
            done[job.id] = status
    return Plan(sweep, jobs, done)


def _eval_job(sweep: Sweep, entry: BackboneEntry, bkey: dict, ev: Evaluation, setting: Setting | None,
              train: TrainJob | None, extract: ExtractJob, row: dict, baseline: EvalJob | None) -> EvalJob:
    variant = setting.id if setting else "baseline"
    spec = {"kind": ev.kind, "root": ev.dataset.root, "videos": ev.dataset.videos, "options": ev.options}
    prov = digest({"backbone": bkey, "train": train.provenance if train else None, "evaluation": spec})
    folder = sweep.out / "evals" / entry.id
    # One features cache per backbone and evaluation: the baseline fills it, the projections read it.
    cache = folder / f"cache-{ev.name}-{digest({'backbone': bkey, 'evaluation': spec})[:8]}.zarr"
    context = EvalContext(entry, Path(train.config.out) if train else None, ev.dataset,
                          folder / variant / f"{ev.name}-{prov[:8]}", cache, sweep.device)
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


# -- what runs on a worker ---------------------------------------------------------------------

def _where() -> dict:
    """The machine and the Dask worker running this task."""
    return {"host": socket.gethostname(), "worker": str(get_worker().name)}


def _record(job: ExtractJob | TrainJob, started: str, wall: float, output: Path) -> dict:
    record = {"task": job.id, "provenance": job.provenance, "output": str(output), "started": started,
              "finished": now_utc(), "wall_s": wall, **_where(),
              "cosettle_version": package_version()}
    _write_record(job.record, record)
    return record


def run_extract(job: ExtractJob) -> dict:
    """Fill (or finish) the backbone's store; returns the task record."""
    started, t0 = now_utc(), time.perf_counter()
    store = extract_stage.extract(job.config)
    diff = mismatches(job.expected, store.settings)
    if not store.complete or diff:  # only another process writing the same store can cause this
        raise SweepError(f"{store.path}: not complete with the sweep's settings after extraction ({'; '.join(diff)})")
    return _record(job, started, time.perf_counter() - t0, store.path)


def run_train(job: TrainJob, extract_record: dict) -> dict:
    """Train (or finish) one projection; returns the task record."""
    started, t0 = now_utc(), time.perf_counter()
    # Continue a run an earlier, killed sweep left; resume=True on a fresh run only adds a notice.
    summary = train_stage.train(replace(job.config, resume=Path(job.config.out).exists()))
    if summary is None or not RunDir(job.config.out).finished:
        raise SweepError(f"{job.config.out}: training stopped before the end")
    return _record(job, started, time.perf_counter() - t0, Path(job.config.out))


def run_eval(job: EvalJob, extract_record: dict | None, train_record: dict | None, baseline: str | None) -> str:
    """Run one evaluation and add its row to the results table; returns the row's part file."""
    started, t0 = now_utc(), time.perf_counter()
    context = replace(job.context, device=str(resolve_device(job.context.device)))
    context.out.mkdir(parents=True, exist_ok=True)
    metrics = EVAL_KINDS[job.evaluation.kind].run(context, job.evaluation.options)
    row = job.row | {
        "wall_extract_s": extract_record["wall_s"] if extract_record else None,
        "wall_train_s": train_record["wall_s"] if train_record else None,
        "wall_eval_s": time.perf_counter() - t0, "started": started, "finished": now_utc(),
        **_where(),
    }
    return str(results_table.write_row(job.results, row, job.settings, metrics))


RUN = {ExtractJob: run_extract, TrainJob: run_train, EvalJob: run_eval}


# -- the graph on a Dask cluster ---------------------------------------------------------------

@dataclass
class Outcome:
    """What a sweep did: jobs it ran, found done, saw fail, or could not start (upstream failed)."""

    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    blocked: dict[str, str]


def _gpu_resources(client) -> dict | None:
    """One GPU per task when the cluster's workers advertise GPUs."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None


def execute(plan: Plan, client, echo: Callable[[str], None] = print) -> Outcome:
    """Submit the jobs not done yet, dependencies as futures, and wait for all of them."""
    resources = _gpu_resources(client)
    token = uuid.uuid4().hex[:8]
    futures, owner = {}, {}
    for job in plan.todo:
        args = [futures.get(d, plan.done.get(d)) if d else None for d in job.inputs]
        fut = client.submit(RUN[type(job)], job, *args, key=f"{job.id}-{token}", resources=resources, pure=False)
        futures[job.id] = fut
        owner[fut.key] = job.id
    outcome = Outcome([], sorted(plan.done), {}, {})
    for i, fut in enumerate(as_completed(list(futures.values())), start=1):
        ident = owner[fut.key]
        job = plan.jobs[ident]
        if fut.status == "finished":
            outcome.ran.append(ident)
            echo(f"[{i}/{len(futures)}] {ident}: done")
            continue
        upstream = [d for d in job.inputs if d in futures and futures[d].status == "error"]
        if upstream:
            outcome.blocked[ident] = upstream[0]
            echo(f"[{i}/{len(futures)}] {ident}: not run, {upstream[0]} failed")
        else:
            error = fut.exception()
            outcome.failed[ident] = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
            echo(f"[{i}/{len(futures)}] {ident}: FAILED ({outcome.failed[ident]})")
    return outcome


def local_cluster(workers: int, processes: bool = True):
    """One worker per GPU (pinned with CUDA_VISIBLE_DEVICES, resource GPU=1), else ``workers``
    CPU workers sharing the cores; worker processes may start DataLoader workers."""
    gpus = torch.cuda.device_count()
    per_worker = max(1, (os.cpu_count() or 1) // (gpus or workers))
    env = {"OMP_NUM_THREADS": str(per_worker)}
    # Dask's worker processes are daemons by default, and daemons may not start DataLoader workers.
    with dask.config.set({"distributed.worker.daemon": False}):
        if gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",")[:gpus] if visible else [str(i) for i in range(gpus)]
            spec = {f"gpu{g}": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                                           "silence_logs": logging.WARN,
                                                           "env": env | {"CUDA_VISIBLE_DEVICES": g}}} for g in ids}
            return SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
                               silence_logs=logging.WARN)  # as LocalCluster
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=":0",
                            **({"env": env} if processes else {}))


def run_sweep(sweep: Sweep | Path, scheduler: str | None = None, workers: int | None = None,
              processes: bool = True, echo: Callable[[str], None] = print, scheduler_file: Path | None = None) -> Outcome:
    """Plan and run a sweep on a Dask cluster (``scheduler`` address or ``scheduler_file``, else a
    new local one).

    Raises SweepError naming the failed tasks once every runnable task has finished.
    """
    sweep = sweep if isinstance(sweep, Sweep) else parse_sweep(sweep, EVAL_KINDS)
    plan = plan_sweep(sweep)
    echo(f"{sweep.file}: {len(plan.jobs)} tasks, {len(plan.done)} already done, {len(plan.todo)} to run")
    if plan.todo:
        if scheduler or scheduler_file:
            with Client(scheduler, scheduler_file=str(scheduler_file) if scheduler_file else None) as client:
                outcome = execute(plan, client, echo)
        else:
            with local_cluster(workers or sweep.workers, processes) as cluster, Client(cluster) as client:
                outcome = execute(plan, client, echo)
    else:
        outcome = Outcome([], sorted(plan.done), {}, {})
    if outcome.failed:
        lines = [f"{k}: {v}" for k, v in sorted(outcome.failed.items())]
        raise SweepError(f"{sweep.file}: {len(outcome.failed)} task(s) failed, {len(outcome.blocked)} not run; "
                         f"rerun the sweep to retry them\n  " + "\n  ".join(lines))
    echo(f"results: {sweep.results} (render with: cosettle report {sweep.results})")
    return outcome


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler (default: a local cluster).")
@click.option("--scheduler-file", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The scheduler file of a running Dask scheduler (dask scheduler --scheduler-file).")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Local CPU workers (default: [sweep] workers); with GPUs, one worker per GPU.")
@click.option("--dry-run", is_flag=True, help="Print every task, whether it is done, and its output; run nothing.")
def main(sweep_file: Path, scheduler: str | None, scheduler_file: Path | None, workers: int | None,
         dry_run: bool) -> None:
    """Run every backbone x training setting x evaluation of SWEEP_FILE; rerunning finishes what is left."""
    try:
        sweep = parse_sweep(sweep_file, EVAL_KINDS)
        if dry_run:
            plan = plan_sweep(sweep)
            for job in plan.jobs.values():
                click.echo(f"{'done' if job.id in plan.done else 'todo'}  {job.id}  {output_of(job)}")
            return
        if scheduler and scheduler_file:
            raise click.UsageError("give --scheduler or --scheduler-file, not both")
        run_sweep(sweep, scheduler=scheduler, workers=workers, scheduler_file=scheduler_file)
    except (SweepFileError, SweepError, VideoError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
