"""Seconds per video-level score on a synthetic UCF101-sized split: retrieval, kNN, linear probe.

Clustered features stand in for cached video vectors: one random mean per class, plus Gaussian
noise large enough that the scores are far from 1 (train and test drawn alike). Each task runs
once; queries/s counts test rows (the linear probe's time is almost all fitting: one fit per C
of the grid plus the refit).

    python bench/video_eval_speed.py [--train 9537] [--test 3783] [--classes 101] [--dim 768] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cosettle.eval.video.metrics import DEFAULT_CS, knn_classify, linear_probe, recall_at_k


def clustered(rng: np.random.Generator, means: np.ndarray, rows: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(means), rows)
    feats = means[labels] + spread * rng.standard_normal((rows, means.shape[1]))
    return feats.astype(np.float32), labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=9537, help="Train videos (UCF101 split 1: 9537).")
    parser.add_argument("--test", type=int, default=3783, help="Test videos (UCF101 split 1: 3783).")
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--spread", type=float, default=6.0, help="Noise std over unit-variance class means.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="Retrieval and kNN device; the probe is scikit-learn on CPU.")
    args = parser.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    means = rng.standard_normal((args.classes, args.dim))
    train, train_labels = clustered(rng, means, args.train, args.spread)
    test, test_labels = clustered(rng, means, args.test, args.spread)
    # torch tensors up front, so the timings do not include the numpy -> torch copy
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    trl, tel = torch.from_numpy(train_labels), torch.from_numpy(test_labels)

    tasks = {
        "retrieval R@1/5/10/20/50": lambda: recall_at_k(te, tel, tr, trl, device=device),
        "kNN k=20 T=0.07": lambda: knn_classify(tr, trl, te, tel, args.classes, device=device),
        f"linear probe ({len(DEFAULT_CS)} C + refit)": lambda: linear_probe(train, train_labels, test, test_labels,
                                                                          seed=args.seed),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"train {args.train}, test {args.test}, {args.classes} classes, D={args.dim}, spread {args.spread}, "
          f"{name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'task':<32} {'seconds':>8} {'queries/s':>10}  scores")
    for task, run in tasks.items():
        sync(device)
        start = time.perf_counter()
        result = run()
        sync(device)
        seconds = time.perf_counter() - start
        scores = ", ".join(f"{k} {v:.3g}" if k == "C" else f"{k} {v:.3f}"
                           for k, v in result.items() if isinstance(v, float))
        print(f"{task:<32} {seconds:>8.2f} {args.test / seconds:>10.0f}  {scores}")


if __name__ == "__main__":
    main()
