"""What runs on a Dask worker for each kind of sweep task: extract, train, evaluate.

Each returns what its dependants take (the task record, or the results part it wrote) and
leaves a record of provenance, wall time and worker beside its output.
"""
from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path

from distributed import WorkerPlugin, get_worker

from cosettle.core.atomic import write_json
from cosettle.core.devices import resolve_device
from cosettle.core.heap import heap_reuse
from cosettle.core.provenance import mismatches, now_utc, package_version
from cosettle.eval.task import discover
from cosettle.pipeline import extract as extract_stage
from cosettle.trainer import train as train_stage
from cosettle.trainer.run_dir import RunDir

from . import results as results_table
from .sweep_plan import EvalJob, ExtractJob, TrainJob


class SweepError(Exception):
    """A sweep that could not finish; the message lists the failed tasks."""


class HeapReuse(WorkerPlugin):
    """Every worker, including those that join later, reuses freed memory (``cosettle.core.heap``)."""

    def setup(self, worker) -> None:
        heap_reuse()


def _where() -> dict:
    """The machine and the Dask worker running this task."""
    return {"host": socket.gethostname(), "worker": str(get_worker().name)}


def _record(job: ExtractJob | TrainJob, started: str, wall: float, output: Path) -> dict:
    record = {"task": job.id, "provenance": job.provenance, "output": str(output), "started": started,
              "finished": now_utc(), "wall_s": wall, **_where(),
              "cosettle_version": package_version()}
    job.record.parent.mkdir(parents=True, exist_ok=True)
    write_json(job.record, record)
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
    summary = discover()[job.evaluation.kind].run(context, job.evaluation.options)
    row = job.row | {
        "wall_extract_s": extract_record["wall_s"] if extract_record else None,
        "wall_train_s": train_record["wall_s"] if train_record else None,
        "wall_eval_s": time.perf_counter() - t0, "started": started, "finished": now_utc(),
        **_where(),
    }
    return str(results_table.write_row(job.results, row, job.settings, results_table.flat_metrics(summary)))


RUN = {ExtractJob: run_extract, TrainJob: run_train, EvalJob: run_eval}
