"""Benchmark: samples/s of one cached Co-Settle training step, and the share of its CPU time in matmuls.

One optimizer step = the objective's forward (projection + loss) + backward + AdamW, as the
trainer runs it, on random fp16 tokens of a realistic shape (default: batch 32 x 3 frames x 196
tokens x 768 channels, linear fusion). Variants, timed in the same rounds, interleaved, so all
see the same machine load (medians of rates and of per-round ratios reported):
- ``compared``: the ``cosettle_loss`` of another copy of trainer/losses.py (``--compare PATH``,
  e.g. the code before a change: ``git show REV:trainer/losses.py > /tmp/losses_old.py``);
- ``eager``: the package's objective;
- ``compiled``: the package's objective under torch.compile, as ``cosettle-train --compile``.
Each variant is also profiled for one step (torch.profiler, CPU): matmul share = self time of
aten::mm / bmm / addmm / baddbmm / matmul / linear over all self time.

    python bench/train_step.py [--batch-size 32] [--rounds 5] [--compare PATH] [--no-compile] [--threads N] [--json PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cosettle.trainer.compiled import check_compile, compile_loss
from cosettle.trainer.objective import get_objective
from cosettle.trainer.projection import build_projection
from cosettle.trainer.schedule import build_optimizer

MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def old_loss(path: str):
    """The Co-Settle objective of another copy of trainer/losses.py, called as the package's is."""
    spec = importlib.util.spec_from_file_location("losses_under_comparison", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return lambda projection, batch: module.cosettle_loss(projection, batch["a"], batch["b"], batch["a_asy"])


class Variant:
    """A loss with its own projection and optimizer, from the same initial weights as the others."""

    def __init__(self, loss, dim: int, fusion: str):
        self.loss = loss
        self.projection = build_projection(dim, fusion, seed=0)
        self.optimizer = build_optimizer(self.projection, 1e-4, 0.05)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        out = self.loss(self.projection, batch)
        out["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out["loss"].detach())


def matmul_share(variant: Variant, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Self CPU seconds of one step: in total and per matmul op (those that ran)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = {e.key: e.self_cpu_time_total / 1e6 for e in events if e.key in MATMULS}
    return {"total_s": total, "matmul_s": sum(mm.values()), "matmul_share": sum(mm.values()) / total} | mm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--fusion", default="linear")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds; each times --steps steps of every variant.")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--compare", default=None, help="Path of another trainer/losses.py to time as 'compared'.")
    parser.add_argument("--no-compile", action="store_true", help="Leave out the torch.compile variant.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.tokens, args.dim)
    batch = {k: torch.randn(shape, generator=gen).half() for k in ("a", "b", "a_asy")}
    batch["b"] = (0.7 * batch["a"].float() + 0.3 * batch["b"].float()).half()  # related frames, as real pairs
    loss = get_objective("cosettle").build_loss({"temp": 0.03, "lambda_reg": 3.0, "reg_loss": "kl"})
    variants = {"compared": old_loss(args.compare)} if args.compare else {}
    variants["eager"] = loss
    compile_s = None
    if not args.no_compile:
        check_compile(torch.device("cpu"))
        variants["compiled"] = compile_loss(loss)
    variants = {name: Variant(fn, args.dim, args.fusion) for name, fn in variants.items()}

    first = {}
    for name, v in variants.items():  # warm-up (and, for the compiled variant, compilation)
        start = time.perf_counter()
        first[name] = v.step(batch)
        if name == "compiled":
            compile_s = time.perf_counter() - start
        v.step(batch)
    rates = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                v.step(batch)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
    shares = {name: matmul_share(v, batch) for name, v in variants.items()}

    base = "compared" if args.compare else "eager"
    rate = {name: statistics.median(r) for name, r in rates.items()}
    # Per-round ratios: the machine's load drifts between rounds, far less within one.
    ratio = {name: statistics.median(a / b for a, b in zip(r, rates[base])) for name, r in rates.items()}
    figures = {
        "shape": {"batch": args.batch_size, "frames": 3, "tokens": args.tokens, "dim": args.dim, "fusion": args.fusion},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
        "steps_per_round": args.steps, "first_step_loss": first, "compile_first_step_s": compile_s,
        "samples_per_s": rate, "samples_per_s_rounds": rates, f"speedup_over_{base}": ratio,
        "profile": shares,
    }
    print(json.dumps(figures, indent=2))
    for name in variants:
        print(f"{name}: {rate[name]:.2f} samples/s, {ratio[name]:.2f}x {base} (median of per-round ratios), "
              f"matmuls {100 * shares[name]['matmul_share']:.0f}% of CPU time")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
