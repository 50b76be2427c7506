"""Run a function of a bench module in a new Python interpreter, as a fresh CLI run does its work.

Nothing is shared with the caller: not its heap (so not its malloc history), threads or warmed-up
kernels. Arguments travel pickled in a scratch file; the function's result comes back as JSON on
the last line of the child's stdout (progress bars write to stderr).
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = ("import json, pickle, sys; sys.path.insert(0, sys.argv[1]); module = __import__(sys.argv[2]); "
         "args = pickle.loads(open(sys.argv[4], 'rb').read()); print(json.dumps(getattr(module, sys.argv[3])(*args)))")


def in_new_interpreter(module: str, function: str, args: tuple, scratch: Path):
    """``bench/<module>.py``'s ``function(*args)``, run in a new interpreter; its JSON result."""
    path = Path(scratch) / f"{module}.{function}.args.pkl"
    path.write_bytes(pickle.dumps(args))
    run = subprocess.run([sys.executable, "-c", CHILD, str(HERE), module, function, str(path)],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{module}.{function} failed in a new interpreter:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])
