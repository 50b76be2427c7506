"""Running the command-line tools as separate OS processes that can be killed, and comparing what
they leave behind, for the fault tests (tests/test_faults_*.py).

Each run is a child process forked from a multiprocessing *forkserver* that imported cosettle,
torch and the CLIs once, so a run starts in a fraction of a second instead of five seconds of
imports; it runs the real click entry point (``main(args)``), with stdout and stderr in files,
optionally under a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored: writes past it fail with
EFBIG as on a full disk). The forkserver never runs torch code, so forking it is safe.
"""
from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import zarr
from safetensors.torch import load_file

CLIS = {"extract": "cosettle.pipeline.cli", "train": "cosettle.trainer.cli", "eval": "cosettle.eval.cli"}
PRELOAD = [*CLIS.values(), "cosettle.eval.tasks.davis", "cosettle.eval.frame.features", "timm", "matplotlib.pyplot"]
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(PRELOAD)


@dataclass
class Result:
    """How a child run ended: exit code (negative: killed by that signal), output, wall time."""

    code: int
    stdout: str
    stderr: str
    wall: float


def _child(tool: str, args: list[str], log: str, fsize: int | None) -> None:
    """In the child: output to files, one torch thread (the runner has 2 cores), then the CLI."""
    for fd, suffix in ((1, ".out"), (2, ".err")):
        handle = os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    torch.set_num_threads(1)
    importlib.import_module(CLIS[tool]).main(args, prog_name=f"cosettle-{tool}")


def _warm_up() -> None:
    """Start the forkserver and wait for its imports, once, so no run's wall time includes them."""
    if not _WARM:
        proc = _CTX.Process(target=int)
        proc.start()
        proc.join()
        _WARM.append(True)


_WARM: list[bool] = []


def start(tool: str, args: list, log: Path, fsize: int | None = None) -> multiprocessing.Process:
    """Start ``cosettle-<tool> args`` in a child process (its output in ``log``.out/.err)."""
    _warm_up()
    proc = _CTX.Process(target=_child, args=(tool, [str(a) for a in args], str(log), fsize))
    proc.start()
    return proc


def finish(proc: multiprocessing.Process, log: Path, started: float, timeout: float = 120) -> Result:
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"{log}: still running after {timeout} s")
    read = lambda suffix: Path(f"{log}{suffix}").read_text() if Path(f"{log}{suffix}").exists() else ""  # noqa: E731
    return Result(proc.exitcode, read(".out"), read(".err"), time.perf_counter() - started)


def run(tool: str, args: list, log: Path, fsize: int | None = None) -> Result:
    """Run ``cosettle-<tool> args`` to its end."""
    _warm_up()
    started = time.perf_counter()
    return finish(start(tool, args, log, fsize), log, started)


def run_killed(tool: str, args: list, log: Path, duration: float, seed: int, outputs: list[Path]) -> float:
    """Start a run and SIGKILL it at a time drawn (seeded) from the first 85 % of ``duration``
    (an uninterrupted run's wall time); returns the kill time. A run that ends before its kill
    (the machine got faster) is started again, ``outputs`` removed, with half the delay."""
    delay = random.Random(seed).uniform(0.05, 0.85) * duration
    _warm_up()
    for _ in range(4):
        started = time.perf_counter()
        proc = start(tool, args, log)
        proc.join(delay)
        proc.kill()
        result = finish(proc, log, started)
        if result.code == -signal.SIGKILL:
            return delay
        assert result.code == 0, result.stderr
        for path in outputs:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        delay /= 2
    raise AssertionError(f"{log}: every run ended before its kill")


# a tqdm progress bar as it lands in a file: "47%|####  | 28.0/60.0 [00:02<00:03, 9.25sample/s, ...]"
PROGRESS = re.compile(r"[^\r\n|]*\d+%\|[^|]*\|[^\[\r\n]*\[[^\]]*\]")


def assert_one_line_error(result: Result, *needles: str) -> str:
    """A non-zero exit with exactly one line on stderr (progress bars apart), containing every
    needle; returns it."""
    lines = [line for line in re.split(r"[\r\n]", PROGRESS.sub("", result.stderr)) if line.strip()]
    assert result.code not in (0, -signal.SIGKILL) and len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- comparing what runs leave behind ----------------------------------------------------------
def copy_store(src: Path, dst: Path) -> None:
    """A copy of the store ``src`` and its manifest folder at ``dst``."""
    shutil.copytree(src, dst)
    shutil.copytree(src.with_suffix(".manifest"), dst.with_suffix(".manifest"))


def arrays(path: Path) -> dict[str, zarr.Array]:
    """Every array of a Zarr group, nested ones too, by path."""
    members = zarr.open_group(str(path), mode="r").members(max_depth=None)
    return {name: node for name, node in members if isinstance(node, zarr.Array)}


def assert_same_arrays(got: Path, want: Path) -> None:
    """Two Zarr groups hold the same arrays, with equal content and attributes."""
    g, w = arrays(got), arrays(want)
    assert sorted(g) == sorted(w)
    for name in w:
        np.testing.assert_array_equal(g[name][:], w[name][:], err_msg=f"{got}/{name}")
        assert g[name].attrs.asdict() == w[name].attrs.asdict(), f"{got}/{name}"


def assert_same_manifest(got: Path, want: Path) -> None:
    """The manifest parts beside two stores hold equal tables, part by part."""
    parts = sorted(p.name for p in want.with_suffix(".manifest").glob("part-*.parquet"))
    assert sorted(p.name for p in got.with_suffix(".manifest").glob("part-*.parquet")) == parts
    for name in parts:
        assert pq.read_table(got.with_suffix(".manifest") / name).equals(pq.read_table(want.with_suffix(".manifest") / name))


def assert_same_tensors(got: dict, want: dict, where: str) -> None:
    """Nested containers of tensors and plain values are equal, tensors bit for bit."""
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_same_tensors(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_tensors(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


# Run files that legitimately differ between an interrupted and an uninterrupted run: the plot
# (it draws samples/s), and these keys of the step log, config and summary (wall-clock facts).
TIMING_KEYS = {"samples_per_s", "created", "finished", "session_wall_s", "session_samples_per_s", "environment"}


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(got: Path, want: Path, aliases: dict[Path, Path] | None = None) -> None:
    """Two finished training runs are equal: final and checkpoint weights and optimizer state bit
    for bit, and the metric logs, config and summary apart from ``TIMING_KEYS`` and the paths
    they name (``got``'s folder and each key of ``aliases`` read as ``want``'s and its value)."""
    assert (got / "summary.json").is_file(), f"{got}: not finished"
    assert (got / "projection.safetensors").read_bytes() == (want / "projection.safetensors").read_bytes()
    latest = (want / "checkpoints" / "LATEST").read_text()
    assert (got / "checkpoints" / "LATEST").read_text() == latest
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == sorted(p.name for p in (want / "checkpoints").iterdir())
    ckpt = latest.strip()
    assert_same_tensors(load_file(got / "checkpoints" / ckpt / "projection.safetensors"),
                        load_file(want / "checkpoints" / ckpt / "projection.safetensors"), "weights")
    load = lambda run: torch.load(run / "checkpoints" / ckpt / "state.pt", weights_only=True)  # noqa: E731
    assert_same_tensors(load(got), load(want), "state")
    for name in ("metrics_steps.jsonl", "metrics_epochs.jsonl"):
        assert _without_timing(read_jsonl(got / name)) == _without_timing(read_jsonl(want / name)), name
    for name in ("config.json", "summary.json"):
        text = (got / name).read_text()
        for old, new in {got: want, **(aliases or {})}.items():
            text = text.replace(str(old), str(new))
        g = json.loads(text)
        assert _without_timing(g) == _without_timing(json.loads((want / name).read_text())), name
