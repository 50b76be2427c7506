"""Do the clip-level objectives (VTHCL, CSTP) beat frozen mean pooling on a world where only motion differs?

One seeded run, every stage through the public APIs, on CPU:

1. World: ``cosettle.eval.video.synthetic.write_action_world`` with all 7 ACTION_CLASSES (MoveRight/Left/
   Down/Up, OscillateFast/Slow, StayStill): one random textured ellipse over a random static background
   on a torus, uniform start, so no single frame tells the class; only motion does. UCF101 layout,
   split 1 (train/test lists written by the world). JPEG frame folders by default (``--formats``): the
   world's mp4 writer (libx264 through PyAV) gave two different encodings of the same frames in repeated
   calls here (decoded pixels up to 42 levels apart), which would make the numbers irreproducible.
2. Backbone: ``dino_vitb`` with ``--weights random`` and a small architecture (``--arch``). The frozen
   encoder is RANDOM (the library's fixed seed-0 init, whatever ``--seed``): it stands in for a pretrained
   one that cannot be downloaded here, so absolute numbers say nothing about real checkpoints.
3. Clip stores of the TRAIN videos only (``extract``, layout clips, plans vthcl and cstp; ``--views`` pairs
   per video, ``--clip-frames`` frames, ``--levels``, ``--pooling``).
4. Training (``train``) of each objective's temporal head on its store (``--width``, ``--depth``,
   ``--head-input``; VTHCL with a ``--queue`` of negatives per level); the per-epoch training accuracies are
   printed next to their chance levels. ``--head-input centred`` (default here; the objectives' own default
   is ``tokens``): each level reads its frame vectors minus their clip mean, so the static appearance every
   frame of a clip shares -- a video's random texture, which alone solves VTHCL's instance task -- cannot
   reach the representation; only change can.
5. Evaluation (``evaluate_action``, dataset ucf101 on the world's own lists): test videos query train
   videos; kNN (k 20, DINO weights) top-1, retrieval R@1/R@5, and a supervised linear probe (C chosen on
   the training split). Frozen mean pooling = mean of last-block patch tokens per frame, mean over frames
   and clips. A head run reads its store's frames/levels/pooling (``run_protocol``) and keeps the
   protocol's clips and stride. ``resize`` = the backbone's input size, so the centre crop is the whole
   (square) frame (the default 256 would keep only the middle quarter of a 64 px frame).
6. Control and reference rows (no training): the heads' common initial state (both objectives build the
   same seeded head), evaluated as it is -- what the head and its input give before any objective; and the
   frozen per-frame vectors reduced to the mean |v(t+1) - v(t)|: whether motion is in the frozen features.

How the settings were chosen. Batch 16, peak lr 1e-3, BYOL, 20 views: from a pilot on the default
world's training logs only (CSTP at lr 3e-4 / 1e-3 / 3e-3: 3e-3 collapsed; NT-Xent no better than BYOL;
fewer views let CSTP memorise the repeated pairs). With ``tokens`` input that run gave kNN top-1 frozen
0.131, VTHCL 0.119, CSTP 0.143 (R@1 0.119 / 0.083 / 0.155): VTHCL's instance accuracy was ~100% from epoch
1 (texture), CSTP's pretext heads stayed near chance. The head input and the epochs were then chosen on a
VALIDATION world (``--seed 1``: other videos, stores, head init) with an in-memory copy of the training
loop (same model, loss, AdamW, warm-up + cosine), 100 epochs, kNN top-1 / R@1 of its test split: frozen
0.119 / 0.119; untrained head tokens 0.167 / 0.143, centred 0.310 / 0.274, diff 0.381 / 0.393, tokens+diff
0.143 / 0.107; VTHCL tokens 0.143 / 0.179, centred 0.464 / 0.440, diff 0.393 / 0.369, tokens+diff 0.131 /
0.131; CSTP tokens 0.131 / 0.107, centred 0.488 / 0.476, diff 0.583 / 0.464; CSTP centred at 200 epochs
0.429 / 0.417. Hence centred for both and 100 epochs for both; the default ``--seed 0`` world's test
split was evaluated only after that, once, with these defaults.

    python bench/synthetic_actions.py [--out DIR] [--json PATH] [--seed 0] [--train-per-class 24] ...

Progress bars go to stderr; the report goes to stdout. ``--out`` must be empty or new.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cosettle.eval.video import metrics
from cosettle.eval.video.action_eval import ActionEvalConfig, evaluate_action
from cosettle.eval.video.clip_features import ClipFeatureSource, ClipProtocol, clip_indices
from cosettle.eval.video.datasets import load_split
from cosettle.eval.video.synthetic import ACTION_CLASSES, write_action_world
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.extract import ExtractConfig, extract
from cosettle.pipeline.videos import open_video
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.temporal_head import HEAD_INPUTS, TemporalHead
from cosettle.trainer.train import train

BACKBONE = "dino_vitb"
OBJECTIVES = ("vthcl", "cstp")
LABELS = {"frozen": "frozen mean pooling", "vthcl": "+ VTHCL head", "cstp": "+ CSTP head",
          "untrained": "control: the heads' common initial state (no training)",
          "motion": "reference: frozen mean abs frame difference (no training)"}
CSTP_CHANCE = {"acc_spatial": 1 / 5, "acc_temporal": 1 / 5, "acc_pace": 1 / 4, "acc_rotation": 1 / 4}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--out", type=Path, default=None, help="Keep world, stores, runs, evals here (default: a temp dir, deleted).")
    a("--json", type=Path, default=None, help="Write every number and setting here.")
    a("--seed", type=int, default=0, help="World, clip sampling and training seed (not the random backbone's).")
    a("--train-per-class", type=int, default=24)
    a("--test-per-class", type=int, default=12)
    a("--frames", type=int, default=32, help="Frames per video.")
    a("--size", type=int, default=64, help="Frame height = width.")
    a("--formats", default="frames", help="Video formats, comma-separated, alternating (frames, mp4). Default JPEG "
      "frame folders only: the mp4 writer (libx264 via PyAV) is not byte-reproducible from run to run.")
    a("--arch", default='{"embed_dim": 96, "depth": 4, "num_heads": 3, "img_size": 64}', help="ViT arch (JSON).")
    a("--views", type=int, default=20, help="Clip pairs per training video in each store.")
    a("--clip-frames", type=int, default=8)
    a("--levels", default="2,4", help="1-based ViT blocks pooled into the clip stores.")
    a("--pooling", default="mean", choices=["mean", "cls", "cls+mean"], help="Per-frame pooling of the clip stores.")
    a("--epochs-vthcl", type=int, default=100)
    a("--epochs-cstp", type=int, default=100)
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=1e-3, help="Peak learning rate; blr = lr * 256 / batch size.")
    a("--width", type=int, default=64, help="Temporal head width.")
    a("--depth", type=int, default=1, help="Temporal head layers per level.")
    a("--head-input", default="centred", choices=HEAD_INPUTS, help="What both heads read per frame (objective "
      "option head_input): 'centred' = frame vectors minus their clip mean, so a head cannot use static appearance.")
    a("--queue", type=int, default=128, help="VTHCL negatives per level.")
    a("--clips", type=int, default=4, help="Evaluation clips per video.")
    a("--stride", type=int, default=2, help="Evaluation frame stride inside a clip.")
    a("--workers", type=int, default=1, help="Extraction decode workers.")
    return p.parse_args()


def se(p: float, n: int) -> float:
    """Binomial standard error of a rate p measured on n test videos."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def make_world(args, folder: Path) -> dict:
    t0 = time.perf_counter()
    info = write_action_world(folder, classes=len(ACTION_CLASSES), train_per_class=args.train_per_class,
                              test_per_class=args.test_per_class, frames=args.frames, height=args.size,
                              width=args.size, seed=args.seed, formats=tuple(args.formats.split(",")))
    train_videos, _ = load_split("ucf101", info["videos"], 1, "train", lists=info["lists"])
    test_videos, _ = load_split("ucf101", info["videos"], 1, "test", lists=info["lists"])
    listing = folder / "train_videos.txt"  # the train split only, relative to the videos folder
    listing.write_text("".join(f"{v.path.relative_to(info['videos'])}\n" for v in train_videos))
    return {"info": info, "train": train_videos, "test": test_videos, "list": listing,
            "wall_s": time.perf_counter() - t0}


def make_store(args, world: dict, plan: str, out: Path, arch: dict, levels: tuple[int, ...]) -> dict:
    cfg = ExtractConfig(videos=world["list"], root=world["info"]["videos"], out=out, backbone=BACKBONE,
                        weights="random", views=args.views, seed=args.seed, device="cpu", layout="clips",
                        plan=plan, clip_frames=args.clip_frames, levels=levels, pooling=args.pooling, arch=arch,
                        workers=args.workers, batch_size=64, chunk_videos=16)
    t0 = time.perf_counter()
    store = extract(cfg)
    return {"path": str(out), "wall_s": time.perf_counter() - t0, "settings": dict(store.settings)}


def train_head(args, objective: str, store: Path, run: Path) -> dict:
    extra = {"head_input": args.head_input} | ({"queue": args.queue} if objective == "vthcl" else {})
    epochs = getattr(args, f"epochs_{objective}")
    cfg = TrainConfig.from_flat(objective=objective, features=(str(store),), out=str(run), epochs=epochs,
                                batch_size=args.batch_size, blr=args.lr * 256 / args.batch_size, width=args.width,
                                depth=args.depth, device="cpu", seed=args.seed, **extra)
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    def records(name: str) -> list[dict]:
        return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]

    # Seconds spent in the optimizer steps themselves (batch / logged rate); the rest of the wall time is the
    # trainer's per-epoch work (training.png redrawn, step log re-read, checkpoint written) and start-up.
    step_s = sum(args.batch_size / r["samples_per_s"] for r in records("metrics_steps.jsonl"))
    return {"config": cfg.as_dict(), "wall_s": wall, "step_s": step_s, "summary": summary,
            "epochs": records("metrics_epochs.jsonl"), "run": str(run)}


def chance_of(objective: str, key: str, queue: int) -> float:
    return 1 / (1 + queue) if objective == "vthcl" else CSTP_CHANCE.get(key, float("nan"))


def print_training(objective: str, result: dict, queue: int) -> None:
    epochs = result["epochs"]
    keys = [k for k in epochs[0] if k.startswith("acc")]
    step = max(len(epochs) // 10, 1)
    shown = sorted({0, len(epochs) - 1, *range(step - 1, len(epochs), step)})
    print(f"\n{objective.upper()} training ({result['summary']['steps']} steps, {result['wall_s']:.0f} s wall, of which "
          f"{result['step_s']:.0f} s in optimizer steps): per-epoch means over training pairs")
    print("| epoch | loss | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for e in shown:
        r = epochs[e]
        print(f"| {r['epoch'] + 1} | {r['loss']:.3f} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    tail = epochs[-max(len(epochs) // 10, 1):]
    print(f"| last {len(tail)} mean | {np.mean([r['loss'] for r in tail]):.3f} | "
          + " | ".join(f"{np.mean([r[k] for r in tail]):.3f}" for k in keys) + " |")
    print("| chance | | " + " | ".join(f"{chance_of(objective, k, queue):.3f}" for k in keys) + " |")


def evaluate(args, world: dict, row: str, projection: Path | None, out: Path, arch: dict, protocol) -> dict:
    info, results = world["info"], {}
    t0 = time.perf_counter()
    for task in ("knn", "retrieval", "linear"):
        cfg = ActionEvalConfig(dataset="ucf101", root=info["videos"], lists=info["lists"], out=out / f"{row}-{task}",
                               backbone=BACKBONE, weights="random", arch=arch, task=task, projection=projection,
                               protocol=protocol, device="cpu", cache=out / f"cache-{row}.zarr")
        summary = evaluate_action(cfg)
        results[task] = {k: v for k, v in summary.items() if k != "splits"}
        record = json.loads((out / f"{row}-{task}" / "run.json").read_text())
        results["protocol"] = record["features"]["protocol"]
    results["wall_s"] = time.perf_counter() - t0
    return results


def motion_reference(world: dict, arch: dict, protocol: ClipProtocol, cache: Path) -> dict:
    """kNN / retrieval / linear probe on the mean |v(t+1) - v(t)| of the frozen per-frame vectors."""
    t0 = time.perf_counter()
    source = ClipFeatureSource(load_backbone(BACKBONE, "random", arch=arch), protocol, cache)

    def descriptor(video) -> np.ndarray:
        reader = open_video(video.path)
        idx = clip_indices(len(reader), protocol)
        unique, inverse = np.unique(idx, return_inverse=True)
        per_frame = source.frame_vectors(reader.get(unique.tolist())).cpu().numpy()[inverse.reshape(idx.shape)]
        return np.abs(np.diff(per_frame, axis=1)).mean(axis=(0, 1))  # [D]: over clips and frame pairs

    xtr = np.stack([descriptor(v) for v in world["train"]])
    xte = np.stack([descriptor(v) for v in world["test"]])
    return score(world, xtr, xte) | {"protocol": protocol.as_dict(), "wall_s": time.perf_counter() - t0}


def score(world: dict, xtr: np.ndarray, xte: np.ndarray) -> dict:
    """The three tasks' numbers from the metric functions, on train / test video vectors."""
    ytr = np.array([v.label for v in world["train"]])
    yte = np.array([v.label for v in world["test"]])
    probe = metrics.linear_probe(xtr, ytr, xte, yte)
    return {"knn": metrics.knn_classify(xtr, ytr, xte, yte, len(ACTION_CLASSES), k=20, temperature=0.07),
            "retrieval": metrics.recall_at_k(xte, yte, xtr, ytr),
            "linear": {"top1": probe["top1"], "top5": probe["top5"], "C": probe["C"]}}


def untrained_control(args, world: dict, arch: dict, protocol: ClipProtocol, levels: tuple[int, ...],
                      settings: dict, cache: Path) -> dict:
    """The temporal head both objectives start from (seeded by ``--seed`` alone), evaluated untrained: what
    the head's architecture and input give without any objective."""
    t0 = time.perf_counter()
    head = TemporalHead(int(settings["dim"]), int(settings["frames"]), len(levels), args.width, args.depth,
                        seed=args.seed, inputs=args.head_input)
    protocol = dataclasses.replace(protocol, levels=levels, pooling=args.pooling)
    info = {"untrained_head": {"seed": args.seed, "width": args.width, "depth": args.depth, "inputs": args.head_input}}
    source = ClipFeatureSource(load_backbone(BACKBONE, "random", arch=arch), protocol, cache, head, info)
    xtr, _ = source.video_vectors("ucf101", world["train"])
    xte, _ = source.video_vectors("ucf101", world["test"])
    return score(world, xtr, xte) | {"protocol": protocol.as_dict(), "wall_s": time.perf_counter() - t0}


def print_results(rows: dict, trained: dict, n_test: int) -> list[str]:
    chance = 1 / len(ACTION_CLASSES)
    print(f"\nResults on the test split ({n_test} videos; chance top-1 = {chance:.3f}; one video = "
          f"{1 / n_test:.3f}; +- = binomial standard error)")
    print("| | kNN top-1 | retrieval R@1 | retrieval R@5 | linear probe top-1 (supervised) | training wall time |")
    print("|---|---|---|---|---|---|")
    for row, r in rows.items():
        k1, r1, r5, lin = r["knn"]["top1"], r["retrieval"]["R@1"], r["retrieval"]["R@5"], r["linear"]["top1"]
        wall = f"{trained[row]['wall_s']:.0f} s ({trained[row]['step_s']:.0f} s in steps)" if row in trained else "-"
        print(f"| {LABELS[row]} | {k1:.3f} +- {se(k1, n_test):.3f} | {r1:.3f} +- {se(r1, n_test):.3f} | "
              f"{r5:.3f} | {lin:.3f} | {wall} |")
    verdicts = []
    # Against frozen mean pooling (the criterion) and against the untrained head (what training itself adds).
    for obj, (base, name) in itertools.product(OBJECTIVES, (("frozen", "frozen mean pooling"),
                                                            ("untrained", "the untrained head"))):
        for metric, get in (("kNN top-1", lambda r: r["knn"]["top1"]), ("retrieval R@1", lambda r: r["retrieval"]["R@1"])):
            a, b = get(rows[obj]), get(rows[base])
            noise = 2 * math.sqrt(se(a, n_test) ** 2 + se(b, n_test) ** 2)
            if a <= b:
                word = "does NOT beat it" + (f" (lower by more than 2 standard errors, {noise:.3f})" if b - a > noise else "")
            elif a - b > noise:
                word = f"beats it by more than 2 standard errors ({noise:.3f})"
            else:
                word = f"is higher, but within 2 standard errors ({noise:.3f}): not a resolved gain"
            verdicts.append(f"{obj.upper()} vs {name}, {metric}: {a:.3f} vs {b:.3f} ({a - b:+.3f}): {word}")
    print("\n" + "\n".join(verdicts))
    return verdicts


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    arch, levels = json.loads(args.arch), tuple(int(b) for b in args.levels.split(","))
    temp = args.out is None
    out = Path(tempfile.mkdtemp(prefix="cosettle-actions-")) if temp else args.out
    if not temp and out.exists() and any(out.iterdir()):
        sys.exit(f"{out}: not empty; give a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    crop = int(arch.get("img_size", 224))
    protocol = ClipProtocol(clips=args.clips, frames=args.clip_frames, stride=args.stride, pooling="mean", resize=crop)
    try:
        world = make_world(args, out / "world")
        n_train, n_test = len(world["train"]), len(world["test"])
        print("Synthetic action world (classes differ by motion only), split 1")
        print(f"- {len(ACTION_CLASSES)} classes ({', '.join(ACTION_CLASSES)}); {args.train_per_class} train + "
              f"{args.test_per_class} test videos per class = {n_train} train, {n_test} test; {args.frames} frames "
              f"of {args.size}x{args.size} px; formats {args.formats}; seed {args.seed}")
        print(f"- frozen encoder: {BACKBONE} with RANDOM weights (library seed-0 init), arch {arch}: a stand-in "
              "for a pretrained encoder that cannot be downloaded here")
        print(f"- clip stores (train videos only): {args.views} pairs per video, {args.clip_frames} frames per clip, "
              f"levels {list(levels)}, pooling {args.pooling}")
        print(f"- heads: width {args.width}, depth {args.depth}, input {args.head_input}; {args.epochs_vthcl} epochs VTHCL, {args.epochs_cstp} "
              f"epochs CSTP, batch {args.batch_size}, "
              f"peak lr {args.lr:g} (blr {args.lr * 256 / args.batch_size:g}), AdamW wd 0.05, 1 warm-up epoch, "
              f"cosine; VTHCL queue {args.queue}; objective options otherwise at their defaults")
        print(f"- evaluation: {args.clips} clips x {args.clip_frames} frames, stride {args.stride}, resize {crop} "
              "(whole frame); test queries train; kNN k=20, T=0.07")
        if args.queue >= n_train:
            print(f"  note: VTHCL queue {args.queue} >= {n_train} train videos: a video's own older keys are negatives")
        print(f"- torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
              f"{platform.platform()}", flush=True)

        stores = {plan: make_store(args, world, plan, out / "stores" / f"{plan}.zarr", arch, levels)
                  for plan in OBJECTIVES}
        trained = {}
        for obj in OBJECTIVES:
            trained[obj] = train_head(args, obj, Path(stores[obj]["path"]), out / "runs" / obj)
            print_training(obj, trained[obj], args.queue)
        evals = out / "evals"
        rows = {"frozen": evaluate(args, world, "frozen", None, evals, arch, protocol)}
        for obj in OBJECTIVES:
            rows[obj] = evaluate(args, world, obj, out / "runs" / obj, evals, arch, protocol)
        rows["untrained"] = untrained_control(args, world, arch, protocol, levels, stores["vthcl"]["settings"],
                                              evals / "cache-untrained.zarr")
        rows["motion"] = motion_reference(world, arch, protocol, evals / "cache-frozen.zarr")
        verdicts = print_results(rows, trained, n_test)
        wall = time.perf_counter() - started
        stages = {"world": world["wall_s"], **{f"extract_{p}": s["wall_s"] for p, s in stores.items()},
                  **{f"train_{o}": t["wall_s"] for o, t in trained.items()},
                  **{f"eval_{r}": v["wall_s"] for r, v in rows.items()}}
        print("\nWall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + f"; total {wall:.0f}")
        print("Trained head rows use each run's clip-store frames/levels/pooling: "
              + "; ".join(f"{o}: {rows[o]['protocol']}" for o in OBJECTIVES))
        if args.json:
            record = {"command": sys.argv, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                      "arch": arch, "levels": list(levels), "backbone": BACKBONE, "weights": "random",
                      "world": {k: str(v) if isinstance(v, Path) else v for k, v in world["info"].items()} |
                      {"train_videos": n_train, "test_videos": n_test},
                      "protocol": protocol.as_dict(), "stores": stores, "training": trained,
                      "results": rows, "labels": LABELS, "verdicts": verdicts, "wall_s": stages | {"total": wall},
                      "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                      "cpus": os.cpu_count(), "platform": platform.platform(),
                                      "python": sys.version.split()[0]},
                      "out": None if temp else str(out)}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
            print(f"JSON: {args.json}")
    finally:
        if temp:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
