"""The run directory: config, metrics, checkpoints and final outputs of one training run.

``runs/NAME/``:
- ``config.json``: training settings, the feature stores' provenance, environment (at start).
- ``metrics_steps.jsonl`` / ``metrics_epochs.jsonl``: one line per optimizer step / finished epoch.
- ``checkpoints/step-NNNNNNNN/`` (``projection.safetensors`` + ``state.pt``: optimizer, scaler and
  RNG state, tensors and plain containers only) and ``checkpoints/LATEST`` naming the newest.
- ``projection.safetensors``: the final weights; ``training.png``: loss and cycle accuracy.
- ``summary.json``: written last; its presence marks the run finished.

Beside it, ``runs/.NAME.lock``: held (``fcntl.flock``) by the one process writing the run, for its
whole life, and holding its pid; a second writer is refused with a RunError naming that pid. The
kernel drops the lock when its process dies, however it dies, so a killed run can be resumed at
once. It lives outside the run, so refusing bad stores creates no run directory, and
``--overwrite`` deletes the run but not its lock file (a new file would let a second writer lock
it while the first still holds the old one).

Every file is written aside and renamed into place, so an interrupted run never leaves half a file;
the metric logs are appended line by line, and a last line without its newline (an append cut
short) is dropped when read: it is always past the last checkpoint. Hidden entries (the aside
files of interrupted writes) do not count as content of the directory.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cosettle.core.atomic import aside, naming_failures, write_atomic, write_json
from cosettle.core.provenance import mismatches

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "projection.safetensors"  # the trained module, whatever the objective
SUMMARY_FILE = "summary.json"
PLOT_FILE = "training.png"
STEPS_FILE = "metrics_steps.jsonl"
EPOCHS_FILE = "metrics_epochs.jsonl"
STATE_FILE = "state.pt"


class RunError(Exception):
    """A run directory that cannot be used as asked; the message names it and the problem."""


METADATA_KEY = "cosettle"


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors state dict aside and rename it into place.

    The metadata goes in as ONE key holding sorted JSON: safetensors writes several keys in an
    order that changes from call to call, and equal weights must give equal files (and digests)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a damaged file is a RunError naming it."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: expected a JSON object")
    return obj


def _holder(fd: int) -> str:
    """The pid a lock holder wrote into the lock file (it writes it just after locking: wait a little)."""
    for _ in range(50):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.02)
    return "unknown"


class RunDir:
    """One run directory (see the module docstring for the layout)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return self.file(SUMMARY_FILE).is_file()

    @property
    def lock_file(self) -> Path:
        path = self.path.resolve()  # "." has no name to put beside it
        return path.with_name(f".{path.name}.lock")

    def content(self) -> list[Path]:
        """The entries of the directory apart from hidden ones (aside files of interrupted writes)."""
        return [p for p in self.path.iterdir() if not p.name.startswith(".")] if self.path.is_dir() else []

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the run's lock file while this process writes the run (see the module docstring)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(f"{self.path}: run dir is being written by pid {_holder(fd)}; "
                               "wait for it to end or use another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def check(self, identity: dict, *, resume: bool, overwrite: bool) -> None:
        """Refuse a directory this run must not use (read-only; every DDP rank runs it)."""
        if overwrite or not self.content():
            return
        if not self.file(CONFIG_FILE).is_file():
            raise RunError(f"{self.path}: exists and is not a cosettle-train run; choose another --out or pass --overwrite")
        if not resume:
            state = "a finished" if self.finished else "an unfinished"
            hint = "--overwrite to train again" if self.finished else "--resume to continue it or --overwrite"
            raise RunError(f"{self.path}: holds {state} run; pass {hint}")
        found = self.config().get("identity")
        if not isinstance(found, dict) or "dim" not in found:
            raise RunError(f"{self.file(CONFIG_FILE)}: no run identity recorded; not a cosettle-train config")
        if found["dim"] != identity["dim"]:
            raise RunError(f"{self.path}: cannot resume, its projection has dim {found['dim']} "
                           f"but the stores' tokens have dim {identity['dim']}")
        diff = mismatches(identity, found)
        if diff:
            raise RunError(f"{self.path}: cannot resume, the run was made with other settings ({'; '.join(diff)})")

    def start(self, config: dict, *, overwrite: bool) -> None:
        """Create (or, with ``overwrite``, recreate) the directory and write the config if new: the
        config first, so a directory with content always has one."""
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.file(CONFIG_FILE).is_file():
            write_json(self.file(CONFIG_FILE), config)
        self.checkpoints.mkdir(exist_ok=True)

    def config(self) -> dict:
        """The run's config.json."""
        return read_json(self.file(CONFIG_FILE))

    # -- metrics -------------------------------------------------------------------------------
    def append(self, name: str, record: dict) -> None:
        with naming_failures(self.file(name)), open(self.file(name), "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self, name: str) -> list[dict]:
        """The records of a metric log; a last line cut short by a crash is left out."""
        path = self.file(name)
        if not path.is_file():
            return []
        lines = path.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except ValueError as e:
            raise RunError(f"{path}: damaged metric log ({e})") from None

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines past ``step`` (written after the checkpoint a resumed run starts from)."""
        for name in (STEPS_FILE, EPOCHS_FILE):
            kept = [r for r in self.records(name) if r["step"] <= step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            write_atomic(self.file(name), lambda tmp: tmp.write_text(text))

    # -- checkpoints ---------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "LATEST"
        if not pointer.is_file():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        if not (path / WEIGHTS_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise RunError(f"{path}: checkpoint named by {pointer} is incomplete")
        return path

    def save_checkpoint(self, step: int, weights: dict[str, torch.Tensor], metadata: dict[str, str], state: dict) -> Path:
        """Write a checkpoint aside, point LATEST at it, then delete the older ones."""
        name = f"step-{step:08d}"
        final = self.checkpoints / name
        tmp = aside(final)
        tmp.mkdir()
        save_weights(tmp / WEIGHTS_FILE, weights, metadata)
        write_atomic(tmp / STATE_FILE, lambda path: torch.save(state, path))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = self.checkpoints / "LATEST"
        write_atomic(pointer, lambda tmp: tmp.write_text(name + "\n"))
        for old in self.checkpoints.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old)
        return final

    def load_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """(weights, state) of a checkpoint; state is loaded with ``weights_only=True``."""
        try:
            weights = load_file(str(path / WEIGHTS_FILE))
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RunError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
        return weights, state

    # -- final outputs -------------------------------------------------------------------------
    def save_final_weights(self, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        save_weights(self.file(WEIGHTS_FILE), weights, metadata)
        return self.file(WEIGHTS_FILE)

    def write_summary(self, summary: dict) -> None:
        """The last file a run writes: from here on it counts as finished."""
        write_json(self.file(SUMMARY_FILE), summary)

    def summary(self) -> dict:
        """The run's summary.json (present once the run finished)."""
        return read_json(self.file(SUMMARY_FILE))
