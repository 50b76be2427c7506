"""Benchmark: the trainer's per-epoch overhead, on a run of many tiny epochs (where it shows most).

A small synthetic views store (32 videos, 4x4 tokens, D 16, 4 views) trained for ``--epochs``
epochs of 8 steps on CPU, one thread; the figure is the session wall time (``summary.json``),
which holds the steps and everything the trainer does around them (metric log, epoch means,
plot, checkpoints). With ``--compare ROOT`` the same run is timed alternately with another copy of
the package, e.g. the code before a change::

    mkdir -p /tmp/old/cosettle && touch /tmp/old/cosettle/__init__.py
    git archive REV core pipeline trainer eval app | tar -x -C /tmp/old/cosettle
    python bench/train_epochs.py --compare /tmp/old

Each run is a fresh process (``PYTHONPATH=ROOT`` puts the other copy first).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

RUN = """
import json, sys, torch
torch.set_num_threads(1)
import cosettle.trainer.train as T
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.synthetic import write_synthetic_store
store, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
write_synthetic_store(store, num_videos=32, views=4, grid=4, dim=16, chunk_videos=8)
s = T.train(TrainConfig(features=(store,), out=out, epochs=epochs, batch_size=4, device="cpu", io_threads=2))
print(json.dumps({"code": T.__file__, "steps": s["steps"], "session_wall_s": s["session_wall_s"]}))
"""


def session(root: str | None, work: str, tag: str, epochs: int) -> dict:
    env = dict(os.environ) | ({"PYTHONPATH": root} if root else {})
    args = [sys.executable, "-c", RUN, f"{work}/{tag}.zarr", f"{work}/{tag}", str(epochs)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", default=None, help="Root of another copy of the package (holding cosettle/).")
    args = parser.parse_args()
    roots = ({"compared": args.compare} if args.compare else {}) | {"this": None}
    walls = {name: [] for name in roots}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):  # alternately, so all see the same machine load
            for name, root in roots.items():
                result = session(root, work, f"{name}{r}", args.epochs)
                walls[name].append(result["session_wall_s"])
                print(f"round {r} {name}: {result['session_wall_s']:.2f} s for {result['steps']} steps ({result['code']})")
    for name, w in walls.items():
        line = f"{name}: median session {statistics.median(w):.2f} s over {args.epochs} epochs"
        if args.compare and name == "this":
            line += f", {statistics.median(a / b for a, b in zip(walls['compared'], w)):.1f}x faster than compared"
        print(line)


if __name__ == "__main__":
    main()
