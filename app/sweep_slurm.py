"""``cosettle-sweep --slurm``: the sweep's Dask workers as SLURM jobs, through dask-jobqueue.

```toml
[slurm]                      # every key optional: a missing one comes from dask's jobqueue.slurm config
partition = "gpu"
account = "my-project"
gpus = 1                     # per job: 1 (--gres=gpu:1, worker --resources GPU=1) or 0 (CPU jobs)
cores = 8                    # --cpus-per-task; the worker runs one task at a time on them
memory = "64GB"
walltime = "24:00:00"
jobs = 8                     # a fixed number of jobs, or adaptive between these two:
# minimum_jobs = 0
# maximum_jobs = 16
directives = ["--constraint=a100"]        # more #SBATCH lines
prologue = ["module load cuda", "source ~/venvs/cosettle/bin/activate"]
python = "~/venvs/cosettle/bin/python"    # the workers' interpreter (default: this one)
logs = "slurm-logs"          # the jobs' stdout and stderr (relative to the sweep file)
```

Each job runs one worker process with one thread, so a worker runs one task at a time; with a GPU
it advertises ``GPU=1`` and every task asks for one, as on a local cluster (``sweep.execute``).
Worker processes are not daemons, so extraction can start its DataLoader workers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import dask
from dask.utils import parse_bytes
from dask_jobqueue import SLURMCluster
from dask_jobqueue.slurm import SLURMJob

from .sweep_toml import Reader, SweepFileError

KEYS = {"partition", "account", "gpus", "cores", "memory", "walltime", "jobs", "minimum_jobs", "maximum_jobs",
        "directives", "prologue", "python", "logs"}
WALLTIME = re.compile(r"\d+(-\d+)?(:\d{1,2}){0,2}")  # SLURM's minutes, [days-]hours[:minutes[:seconds]] forms
CONFIG = "jobqueue.slurm"


@dataclass(frozen=True)
class SlurmSettings:
    """The ``[slurm]`` table; None: the dask config's value (``jobqueue.slurm``)."""

    partition: str | None = None
    account: str | None = None
    gpus: int = 1
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    jobs: int | None = None
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    directives: tuple[str, ...] | None = None
    prologue: tuple[str, ...] | None = None
    python: str | None = None
    logs: Path | None = None


def _strings(r: Reader, key: tuple, check=None) -> tuple[str, ...] | None:
    values = r.get(key, list, None)
    if values is None:
        return None
    for v in values:
        r.typed(key, v, str)
        if check and (problem := check(v)):
            raise r.error(key, f"{v!r}: {problem}")
    return tuple(values)


def _count(r: Reader, key: tuple, least: int) -> int | None:
    value = r.get(key, int, None)
    if value is not None and value < least:
        raise r.error(key, f"must be at least {least}, got {value}")
    return value


def read_slurm(r: Reader) -> SlurmSettings | None:
    """The optional ``[slurm]`` table, every key checked (errors name the line and field)."""
    t = ("slurm",)
    if not r.table(t, KEYS, required=False):
        return None
    gpus = r.get(t + ("gpus",), int, 1)
    if gpus not in (0, 1):
        raise r.error(t + ("gpus",), f"0 or 1, got {gpus}: a job runs one worker, which runs one task at a time "
                                     "on one GPU; ask for more jobs instead")
    memory = r.get(t + ("memory",), str, None)
    if memory is not None:
        try:
            parse_bytes(memory)
        except ValueError:
            raise r.error(t + ("memory",), f"{memory!r} is not an amount of memory, e.g. '64GB'") from None
    walltime = r.get(t + ("walltime",), str, None)
    if walltime is not None and not WALLTIME.fullmatch(walltime):
        raise r.error(t + ("walltime",), f"{walltime!r} is not a SLURM time, e.g. '24:00:00' or '2-00:00:00'")
    jobs, low, high = _count(r, t + ("jobs",), 1), _count(r, t + ("minimum_jobs",), 0), \
        _count(r, t + ("maximum_jobs",), 1)
    if jobs is not None and (low is not None or high is not None):
        raise r.error(t + ("jobs",), "give either jobs (a fixed number) or minimum_jobs/maximum_jobs (adaptive)")
    if (low is None) != (high is None):
        raise r.error(t + (("maximum_jobs",) if high is None else ("minimum_jobs",)),
                      "missing: adaptive scaling needs minimum_jobs and maximum_jobs")
    if low is not None and low > high:
        raise r.error(t + ("minimum_jobs",), f"{low} is more than maximum_jobs = {high}")
    directives = _strings(r, t + ("directives",),
                          lambda d: None if d.startswith("-") else "an sbatch option, e.g. '--constraint=a100'")
    return SlurmSettings(
        partition=r.get(t + ("partition",), str, None), account=r.get(t + ("account",), str, None), gpus=gpus,
        cores=_count(r, t + ("cores",), 1), memory=memory, walltime=walltime, jobs=jobs, minimum_jobs=low,
        maximum_jobs=high, directives=directives, prologue=_strings(r, t + ("prologue",)),
        python=r.get(t + ("python",), str, None), logs=r.path(t + ("logs",), must_exist=False, default=None),
    )


def cluster_options(s: SlurmSettings, source: Path) -> dict:
    """SLURMCluster arguments: the table's values over the dask config's, and what the sweep needs
    (one single-threaded, non-daemon worker per job; the GPU requested and advertised)."""
    cores = s.cores or dask.config.get(f"{CONFIG}.job-cpu") or dask.config.get(f"{CONFIG}.cores")
    memory = s.memory or dask.config.get(f"{CONFIG}.memory")
    for name, value in (("cores", cores), ("memory", memory)):
        if value is None:
            raise SweepFileError(f"{source}: --slurm needs {name}: set it in [slurm] or as {CONFIG}.{name} "
                             "in the dask config")
    directives = list(dask.config.get(f"{CONFIG}.job-extra-directives") or [] if s.directives is None else s.directives)
    args = list(dask.config.get(f"{CONFIG}.worker-extra-args") or [])
    if s.gpus:
        if not any(d.startswith("--gres") for d in directives):  # the user's own --gres (a GPU type) wins
            directives.append(f"--gres=gpu:{s.gpus}")
        if "--resources" not in args:
            args += ["--resources", "GPU=1"]
    prologue = list(dask.config.get(f"{CONFIG}.job-script-prologue") or [] if s.prologue is None else s.prologue)
    # DataLoader workers cannot start inside a daemon process; torch gets the job's cores
    prologue = ["export DASK_DISTRIBUTED__WORKER__DAEMON=False", f"export OMP_NUM_THREADS={cores}"] + prologue
    options = dict(cores=1, processes=1, job_cpu=cores, memory=memory, job_extra_directives=directives,
                   worker_extra_args=args, job_script_prologue=prologue)
    given = dict(queue=s.partition, account=s.account, walltime=s.walltime, python=s.python,
                 log_directory=str(s.logs) if s.logs else None)
    return options | {k: v for k, v in given.items() if v is not None}


def job_script(s: SlurmSettings, source: Path) -> str:
    """The script each job would be submitted with (placeholders for the scheduler and worker name).
    Nothing is created: with ``logs``, the log lines are left out (dask-jobqueue makes the folder)."""
    script = SLURMJob(scheduler="tcp://SCHEDULER:PORT", name="WORKER",
                      **cluster_options(replace(s, logs=None), source)).job_script()
    note = f"# and #SBATCH -o/-e lines into {s.logs}/ (created when the jobs are submitted)\n"
    return script + (note if s.logs else "")


def slurm_cluster(s: SlurmSettings, source: Path, echo=print) -> SLURMCluster:
    """A SLURMCluster for the sweep of file ``source``, scaled as ``s`` says (default: one job);
    closing it cancels its jobs."""
    cluster = SLURMCluster(**cluster_options(s, source))
    if s.jobs is None and s.minimum_jobs is not None:
        cluster.adapt(minimum_jobs=s.minimum_jobs, maximum_jobs=s.maximum_jobs)
        scale = f"adaptive, {s.minimum_jobs} to {s.maximum_jobs} jobs"
    else:
        cluster.scale(jobs=s.jobs or 1)
        scale = f"{s.jobs or 1} job(s)"
    echo(f"SLURM: {scale} of one worker ({'1 GPU' if s.gpus else 'no GPU'}), scheduler {cluster.scheduler_address}, "
         f"dashboard {cluster.dashboard_link}")
    return cluster
