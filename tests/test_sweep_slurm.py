"""cosettle-sweep --slurm through dask-jobqueue, against fake sbatch/scancel commands on PATH: the job
script the [slurm] table (or the dask config) produces, then a tiny sweep whose worker is a job
script the fake sbatch starts in the background; the [slurm] table's errors name line and field."""
import json
import os
import re
import time
from pathlib import Path

import dask
import pytest
import torch
from click.testing import CliRunner
from test_sweep import ARCH, write_weights

from cosettle.app import sweep as sweep_mod
from cosettle.app.results import read_results
from cosettle.app.sweep import run_sweep
from cosettle.app.sweep_file import parse_sweep
from cosettle.app.sweep_slurm import slurm_cluster
from cosettle.app.sweep_toml import SweepFileError
from cosettle.eval.frame.analysis_report import analyse
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.synthetic import moving_scene, write_frame_folder

pytestmark = pytest.mark.torch_threads(1)

SLURM = """\
[slurm]
partition = "gpu-test"
account = "proj42"
walltime = "01:30:00"
cores = 1
memory = "2GB"
jobs = {jobs}
directives = ["--constraint=a100"]
prologue = ["echo prologue-ran"]
logs = "logs"
"""
SWEEP = """\
[sweep]
out = "out"
device = "cpu"

[datasets.train]
videos = "videos"
[datasets.clips]
videos = "videos"

[extract]
views = 1
chunk_videos = 2
workers = 1

[[backbones]]
name = "dino_vitb"
weights = "ckpt/dino_vitb.pth"
arch = { embed_dim = 32, depth = 1, num_heads = 2, img_size = 64 }

[train]
epochs = 1
batch_size = 2
warmup_epochs = 0.0

[evaluations.metrics]
dataset = "clips"

"""
SBATCH = """#!/bin/bash
# fake sbatch: keep the job script (dask-jobqueue deletes its file), start it when asked, print the id
set -e
id=$$
cp "$1" "{jobs}/$id.sh"
if [ -n "$FAKE_SLURM_RUN" ]; then
    setsid bash "{jobs}/$id.sh" > "{jobs}/$id.log" 2>&1 < /dev/null &
    echo $! > "{jobs}/$id.pid"
fi
echo "Submitted batch job $id"
"""
SCANCEL = """#!/bin/bash
# fake scancel: note the ids, stop the started job scripts (their whole process group)
for id in "$@"; do
    echo "$id" >> "{jobs}/cancelled"
    if [ -f "{jobs}/$id.pid" ]; then kill -TERM -- -"$(cat "{jobs}/$id.pid")" 2>/dev/null || true; fi
done
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch and scancel on PATH; returns the folder of the recorded job scripts."""
    jobs, bin_dir = tmp_path / "jobs", tmp_path / "bin"
    jobs.mkdir()
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text.format(jobs=jobs))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with dask.config.set({"jobqueue.slurm.scheduler-options": {"dashboard_address": ":0"}}):
        yield jobs
    for pid_file in jobs.glob("*.pid"):  # whatever a failed test left running
        try:
            os.killpg(int(pid_file.read_text()), 9)
        except ProcessLookupError:
            pass


def sweep_dir(tmp_path: Path, text: str) -> Path:
    write_weights(tmp_path / "ckpt" / "dino_vitb.pth", "dino_vitb", 0)
    for i in range(2):
        write_frame_folder(tmp_path / "videos" / f"clip{i}", moving_scene(8, 48, 64, 2, seed=i)[0])
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has finished; only its parent has not collected it


def test_job_script_has_the_tables_directives_and_a_gpu_worker(tmp_path, fake_slurm):
    path = sweep_dir(tmp_path, SWEEP + SLURM.format(jobs=2))
    sweep = parse_sweep(path)
    lines = []
    with slurm_cluster(sweep.slurm, path, lines.append):
        wait_for(lambda: len(list(fake_slurm.glob("*.sh"))) == 2, 30, "two sbatch calls")
    scripts = sorted(fake_slurm.glob("*.sh"))
    ids = sorted(p.stem for p in scripts)
    assert sorted((fake_slurm / "cancelled").read_text().split()) == ids  # closing cancels every job
    script = scripts[0].read_text()
    head = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for directive in ("-p gpu-test", "-A proj42", "-t 01:30:00", "--gres=gpu:1", "--constraint=a100",
                      "--cpus-per-task=1", "--mem=2G", f"-o {tmp_path / 'logs'}/dask-worker-%J.out"):
        assert f"#SBATCH {directive}" in head, (directive, head)
    worker = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    assert len(worker) == 1 and worker[0].endswith(" --resources GPU=1")
    assert " --nthreads 1 " in worker[0] and "--nworkers" not in worker[0]  # one single-threaded worker process
    prologue = script.index("export DASK_DISTRIBUTED__WORKER__DAEMON=False")
    assert prologue < script.index("echo prologue-ran") < script.index(worker[0])
    assert lines[0].startswith("SLURM: 2 job(s) of one worker (1 GPU), scheduler tcp://")


def test_without_a_table_the_dask_config_is_used(tmp_path, fake_slurm):
    path = sweep_dir(tmp_path, SWEEP)
    sweep = parse_sweep(path)
    assert sweep.slurm is None
    config = {"jobqueue.slurm.queue": "cfg-queue", "jobqueue.slurm.cores": 4, "jobqueue.slurm.memory": "8GB",
              "jobqueue.slurm.walltime": "02:00:00", "jobqueue.slurm.job-extra-directives": ["--gres=gpu:v100:1"]}
    with dask.config.set(config):
        with sweep_mod.slurm_cluster(sweep_mod.SlurmSettings(), path, lambda line: None):
            wait_for(lambda: len(list(fake_slurm.glob("*.sh"))) == 1, 30, "one sbatch call")
    script = next(fake_slurm.glob("*.sh")).read_text()
    head = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert {"#SBATCH -p cfg-queue", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8G",
            "#SBATCH --gres=gpu:v100:1"} <= set(head)
    assert not any("--gres=gpu:1" in line for line in head)  # the config's own GPU request is kept, not doubled
    assert "export OMP_NUM_THREADS=4" in script and "--nthreads 1" in script and "--resources GPU=1" in script

    with pytest.raises(SweepFileError, match=rf"^{re.escape(str(path))}: --slurm needs memory: set it in \[slurm\]"):
        with dask.config.set({"jobqueue.slurm.cores": 4}):
            sweep_mod.slurm_cluster(sweep_mod.SlurmSettings(), path)


def test_tiny_sweep_runs_end_to_end_on_a_started_job(tmp_path, fake_slurm, monkeypatch):
    """The fake sbatch starts the job script: a real dask worker (GPU=1 advertised, CPU device, one
    DataLoader worker) connects and runs extract, train and both evaluations; closing the cluster
    cancels the job, and its processes are gone."""
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    path = sweep_dir(tmp_path, SWEEP + SLURM.format(jobs=1))
    lines = []
    outcome = run_sweep(path, slurm=True, echo=lines.append)
    sweep = parse_sweep(path)
    setting = sweep.settings[0].id
    assert sorted(outcome.ran) == ["eval-dino_vitb-baseline-metrics", f"eval-dino_vitb-{setting}-metrics",
                                   "extract-dino_vitb", f"train-dino_vitb-{setting}"]
    assert not outcome.failed and not outcome.blocked
    (pid_file,) = fake_slurm.glob("*.pid")
    assert (fake_slurm / "cancelled").read_text().split() == [pid_file.stem]
    wait_for(lambda: not alive(int(pid_file.read_text())), 30, "the cancelled job to stop")
    log = (fake_slurm / f"{pid_file.stem}.log").read_text()
    assert "prologue-ran" in log
    name = re.search(r"--name (\S+)", (fake_slurm / f"{pid_file.stem}.sh").read_text()).group(1)
    records = [json.loads(p.read_text()) for p in (sweep.out / "tasks").glob("*.json")]
    rows = {r["task"]: r for r in read_results(sweep.results).to_pylist()}
    assert len(records) == 2 and len(rows) == 2
    assert {r["worker"] for r in records} | {r["worker"] for r in rows.values()} == {name}  # the SLURM job's worker
    model = load_backbone("dino_vitb", tmp_path / "ckpt" / "dino_vitb.pth", arch=ARCH["dino_vitb"])
    with torch.no_grad():
        expected = analyse(sorted((tmp_path / "videos").iterdir()), model, None, torch.device("cpu"))["baseline"]
    for metric, value in expected.items():
        assert rows["eval-dino_vitb-baseline-metrics"][f"metric.{metric}"] == pytest.approx(value)


BAD = [
    # (line of the [slurm] table, its replacement, the line to blame, field, words of the message)
    ('partition = "gpu-test"', 'partitions = "gpu-test"', 'partitions = "gpu-test"', "slurm.partitions", "unknown key"),
    ("cores = 1", "cores = 0", "cores = 0", "slurm.cores", "must be at least 1"),
    ("cores = 1", "cores = 1\ngpus = 2", "gpus = 2", "slurm.gpus", "0 or 1, got 2"),
    ('memory = "2GB"', 'memory = "lots"', 'memory = "lots"', "slurm.memory", "not an amount of memory"),
    ('walltime = "01:30:00"', 'walltime = "1 day"', 'walltime = "1 day"', "slurm.walltime", "not a SLURM time"),
    ("jobs = 2", "jobs = 2\nmaximum_jobs = 4", "jobs = 2", "slurm.jobs", "give either jobs"),
    ("jobs = 2", "minimum_jobs = 1", "[slurm]", "slurm.maximum_jobs", "needs minimum_jobs and maximum_jobs"),
    ("jobs = 2", "minimum_jobs = 5\nmaximum_jobs = 4", "minimum_jobs = 5", "slurm.minimum_jobs",
     "more than maximum_jobs"),
    ('directives = ["--constraint=a100"]', 'directives = ["constraint=a100"]', 'directives = ["constraint=a100"]',
     "slurm.directives", "an sbatch option"),
    ('prologue = ["echo prologue-ran"]', "prologue = [1]", "prologue = [1]", "slurm.prologue", "must be str"),
]


@pytest.mark.parametrize("old,new,blamed,field,words", BAD, ids=[f"{b[3]}-{b[4].split()[0]}" for b in BAD])
def test_bad_slurm_table_names_line_and_field(tmp_path, old, new, blamed, field, words):
    good = SWEEP + SLURM.format(jobs=2)
    text = good.replace(old, new)
    assert text != good
    path = sweep_dir(tmp_path, text)
    with pytest.raises(SweepFileError) as info:
        parse_sweep(path)
    line = text.splitlines().index(blamed) + 1
    assert str(info.value).startswith(f"{path}:{line}: {field}: "), str(info.value)
    assert words in str(info.value)


def test_cli_dry_run_prints_the_job_script_and_submits_nothing(tmp_path, fake_slurm):
    path = sweep_dir(tmp_path, SWEEP + SLURM.format(jobs=1))
    result = CliRunner().invoke(sweep_mod.main, [str(path), "--slurm", "--dry-run"])
    assert result.exit_code == 0, result.output
    tasks, script = result.output.split("job script:\n")
    assert len(tasks.splitlines()) == 4 and all(line.startswith("todo  ") for line in tasks.splitlines())
    assert {"#SBATCH -p gpu-test", "#SBATCH -t 01:30:00", "#SBATCH --gres=gpu:1"} <= set(script.splitlines())
    assert "tcp://SCHEDULER:PORT --name WORKER --nthreads 1 " in script and script.count("--resources GPU=1") == 1
    note = f"# and #SBATCH -o/-e lines into {tmp_path / 'logs'}/ (created when the jobs are submitted)\n"
    assert script.endswith(note)
    assert not list(fake_slurm.iterdir()) and not (tmp_path / "logs").exists() and not (tmp_path / "out").exists()


def test_cli_slurm_refuses_other_worker_options(tmp_path):
    path = sweep_dir(tmp_path, SWEEP + SLURM.format(jobs=1))
    result = CliRunner().invoke(sweep_mod.main, [str(path), "--slurm", "--workers", "2"])
    assert result.exit_code == 2 and "--slurm starts its own workers" in result.output
