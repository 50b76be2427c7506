"""``cosettle-sweep SWEEP.toml``: the plan of a sweep (:mod:`cosettle.app.sweep_plan`) run as one
graph of Dask futures, on a local cluster, an existing one, or SLURM jobs (:mod:`cosettle.app.sweep_slurm`);
a failed task stops only what depends on it, and rerunning the same file does only what is left."""
from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import dask
import torch
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, as_completed

from cosettle.core.listfiles import ListFileError
from cosettle.pipeline.videos import VideoError

from .sweep_file import Sweep, parse_sweep
from .sweep_plan import Plan, output_of, plan_sweep
from .sweep_slurm import SlurmSettings, job_script, slurm_cluster
from .sweep_tasks import RUN, HeapReuse, SweepError
from .sweep_toml import SweepFileError


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


def execute(plan: Plan, client, echo: Callable[[str], None] = print, gpu: bool | None = None) -> Outcome:
    """Submit the jobs not done yet, dependencies as futures, and wait for all of them; ``gpu``:
    whether every task asks for one GPU (None: when the cluster's workers advertise GPUs)."""
    resources = _gpu_resources(client) if gpu is None else {"GPU": 1} if gpu else None
    client.register_plugin(HeapReuse())
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


def run_plan(plan: Plan, scheduler: str | None = None, workers: int | None = None, processes: bool = True,
             echo: Callable[[str], None] = print, scheduler_file: Path | None = None, slurm: bool = False) -> Outcome:
    """Run the jobs of ``plan`` not done yet on a Dask cluster (``scheduler`` address or
    ``scheduler_file``, with ``slurm`` SLURM jobs as the sweep's [slurm] table or the dask config
    say, else a new local one with ``workers`` or the sweep's workers).

    Raises SweepError naming the failed tasks once every runnable task has finished.
    """
    sweep = plan.sweep
    echo(f"{sweep.file}: {len(plan.jobs)} tasks, {len(plan.done)} already done, {len(plan.todo)} to run")
    outcome = Outcome([], sorted(plan.done), {}, {})
    if plan.todo:
        if scheduler or scheduler_file:
            with Client(scheduler, scheduler_file=str(scheduler_file) if scheduler_file else None) as client:
                outcome = execute(plan, client, echo)
        elif slurm:
            # tasks are submitted before any job has started: whether they ask for a GPU follows the settings
            settings = sweep.slurm or SlurmSettings()
            with slurm_cluster(settings, sweep.file, echo) as cluster, Client(cluster) as client:
                outcome = execute(plan, client, echo, gpu=bool(settings.gpus))
        else:
            with local_cluster(workers or sweep.workers, processes) as cluster, Client(cluster) as client:
                outcome = execute(plan, client, echo)
    if outcome.failed:
        lines = [f"{k}: {v}" for k, v in sorted(outcome.failed.items())]
        raise SweepError(f"{sweep.file}: {len(outcome.failed)} task(s) failed, {len(outcome.blocked)} not run; "
                         f"rerun the sweep to retry them\n  " + "\n  ".join(lines))
    echo(f"results: {sweep.results} (render with: cosettle report {sweep.results})")
    return outcome


def run_sweep(sweep: Sweep | Path, **options) -> Outcome:
    """Plan and run a sweep file (see :func:`run_plan` for the options)."""
    return run_plan(plan_sweep(sweep if isinstance(sweep, Sweep) else parse_sweep(sweep)), **options)


def sweep_command(parse: Callable[[Path], object], plan: Callable[[object], Plan], name: str | None,
                  summary: str) -> click.Command:
    """The command of one kind of sweep file: run (or ``--dry-run``: list) what is left to do."""
    @click.command(name, help=summary, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
    @click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--scheduler", default=None, help="Address of a running Dask scheduler (default: a local cluster).")
    @click.option("--scheduler-file", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="The scheduler file of a running Dask scheduler (dask scheduler --scheduler-file).")
    @click.option("--workers", default=None, type=click.IntRange(min=1),
                  help="Local CPU workers (default: [sweep] workers); with GPUs, one worker per GPU.")
    @click.option("--slurm", is_flag=True, help="Run the workers as SLURM jobs, as the file's [slurm] table "
                  "(else dask's jobqueue.slurm config) says.")
    @click.option("--dry-run", is_flag=True, help="Print every task, whether it is done, and its output "
                  "(with --slurm, also the job script); run nothing.")
    def command(sweep_file: Path, scheduler: str | None, scheduler_file: Path | None, workers: int | None,
                slurm: bool, dry_run: bool) -> None:
        try:
            jobs = plan(parse(sweep_file))
            if dry_run:
                for job in jobs.jobs.values():
                    click.echo(f"{'done' if job.id in jobs.done else 'todo'}  {job.id}  {output_of(job)}")
                if slurm:
                    script = job_script(jobs.sweep.slurm or SlurmSettings(), jobs.sweep.file)
                    click.echo("job script:\n" + script.rstrip("\n"))
                return
            if scheduler and scheduler_file:
                raise click.UsageError("give --scheduler or --scheduler-file, not both")
            if slurm and (scheduler or scheduler_file or workers):
                raise click.UsageError("--slurm starts its own workers: "
                                       "give no --scheduler, --scheduler-file or --workers")
            run_plan(jobs, scheduler=scheduler, workers=workers, scheduler_file=scheduler_file, slurm=slurm)
        except (SweepFileError, SweepError, VideoError, ListFileError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
    return command


main = sweep_command(parse_sweep, plan_sweep, None,
                     "Run every backbone x training setting x evaluation of SWEEP_FILE; rerunning finishes what is left.")
