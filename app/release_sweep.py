"""``cosettle release-sweep FILE.toml``: evaluate released checkpoints, base and '+Ours', with
no extraction or training (e.g. ``sweeps/paper.toml``, the paper's table).

```toml
[sweep]
out = "paper-out"                 # evals/, results.parquet/ (relative to this file)
device = "auto"
workers = 1

[datasets.davis]
root = "data/DAVIS"

[[backbones]]                     # one table per backbone; `id` defaults to `name`
name = "mae_vitb"
weights = "ckpt/mae_pretrain_vit_base.pth"       # the base encoder (official file)
release = "ckpt/mae_vitb16+ours/checkpoint-4.pth"  # the '+Ours' file (optional: baseline only)

[evaluations.davis]               # as in a cosettle-sweep file
preset = "cosettle"
```

Tasks: ``eval-<backbone>-baseline-<evaluation>`` (the base checkpoint, frozen) and
``eval-<backbone>-release-<evaluation>`` (the release file given as the projection; its embedded
encoder must equal the base's). Rows go to the same results table as a sweep's, the release rows
as ``variant = projection``, ``setting = release``, so ``cosettle report`` pairs them and adds
the published figures. Rerunning does only what is left (provenance: the weights' and the
release's sha256, the evaluation's data and options).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cosettle.core.provenance import digest, package_version, sha256_file
from cosettle.eval.task import TaskContext, discover

from . import results as results_table
from .published import RELEASE_SETTING
from .sweep import Outcome, run_plan, sweep_command
from .sweep_file import BackboneEntry, Evaluation, read_backbones, read_datasets, read_evaluations, sweep_table
from .sweep_plan import EvalJob, Plan, backbone_key, eval_job, output_of
from .sweep_slurm import SlurmSettings, read_slurm
from .sweep_toml import open_toml


@dataclass(frozen=True)
class ReleaseSweep:
    """A validated release-sweep file, every path absolute."""

    file: Path
    out: Path
    device: str
    workers: int
    backbones: tuple[BackboneEntry, ...]
    evaluations: tuple[Evaluation, ...]
    slurm: SlurmSettings | None = None  # the [slurm] table, for --slurm

    @property
    def results(self) -> Path:
        return self.out / "results.parquet"


def parse_release_sweep(path: Path) -> ReleaseSweep:
    """Read and validate a release-sweep file (errors name the line and field)."""
    path = Path(path).resolve()
    r = open_toml(path)
    r.table((), {"sweep", "datasets", "backbones", "evaluations", "slurm"})
    out, device, workers = sweep_table(r)
    datasets = read_datasets(r)
    entries = read_backbones(r, releases=True)
    evaluations = read_evaluations(r, datasets, discover())
    return ReleaseSweep(path, out, device, workers, entries, evaluations, read_slurm(r))


def _release_job(sweep: ReleaseSweep, entry: BackboneEntry, bkey: dict, ev: Evaluation, row: dict,
                 baseline: EvalJob) -> EvalJob:
    """The evaluation of one release file: the baseline's job with the release as projection."""
    release = Path(entry.release)
    rkey = {"file": release.name, "sha256": sha256_file(release)}
    spec = {"kind": ev.kind, "root": ev.dataset.root, "videos": ev.dataset.videos, "options": ev.options}
    prov = digest({"backbone": bkey, "release": rkey, "evaluation": spec})
    folder = sweep.out / "evals" / entry.id
    context = TaskContext(entry.name, entry.weights, folder / RELEASE_SETTING / f"{ev.name}-{prov[:8]}", entry.arch,
                          release, ev.dataset.root, ev.dataset.videos, baseline.context.cache, sweep.device)
    ident = f"eval-{entry.id}-{RELEASE_SETTING}-{ev.name}"
    row = baseline.row | {"task": ident, "provenance": prov, "variant": results_table.PROJECTION,
                          "setting": RELEASE_SETTING, "setting_label": f"+Ours ({release.name})",
                          "run_dir": str(release), "eval_out": str(context.out)}
    settings = {"source": "release", "release": release.name, "release_sha256": rkey["sha256"]}
    return EvalJob(ident, prov, sweep.results, ev, context, row, settings, None, None, baseline.id)


def plan_release_sweep(sweep: ReleaseSweep) -> Plan:
    """Every baseline and release evaluation, and which are already done."""
    jobs: dict[str, EvalJob] = {}
    base_row = {"sweep": str(sweep.file), "cosettle_version": package_version()}
    for entry in sweep.backbones:
        bkey = backbone_key(entry)
        row = base_row | {"backbone": entry.id, "backbone_name": entry.name, "weights": bkey["weights"],
                          "weights_sha256": bkey["weights_sha256"],
                          "arch": json.dumps(entry.arch, sort_keys=True) if entry.arch else None}
        for ev in sweep.evaluations:
            base = eval_job(sweep, entry, bkey, ev, None, None, None, row, None)
            jobs[base.id] = base
            if entry.release is not None:
                job = _release_job(sweep, entry, bkey, ev, base.row, base)
                jobs[job.id] = job
    done = {j.id: str(output_of(j)) for j in jobs.values() if output_of(j).is_file()}
    return Plan(sweep, jobs, done)  # type: ignore[arg-type]  # a Plan of evaluations only


def run_release_sweep(sweep: ReleaseSweep | Path, **options) -> Outcome:
    """Plan and run a release sweep on Dask, as ``cosettle-sweep`` runs a sweep (options of ``run_plan``)."""
    return run_plan(plan_release_sweep(sweep if isinstance(sweep, ReleaseSweep) else parse_release_sweep(sweep)),
                    **options)


release_sweep = sweep_command(parse_release_sweep, plan_release_sweep, "release-sweep",
                              "Evaluate the base and '+Ours' release checkpoints of SWEEP_FILE (e.g. sweeps/paper.toml).")
