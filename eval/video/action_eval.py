"""Action recognition on UCF101 / HMDB51 from clip features: retrieval, kNN, linear probe, zero-shot.

One run evaluates one task on one or all three official splits. Video vectors come from
:class:`ClipFeatureSource` (cached, so every task and split of a backbone computes each video
once). The headline numbers of a run are the means over the splits it covered (``top1``, ``R@1``,
...); with several splits, ``<metric>_std`` is their standard deviation (population, ddof 0) and
``splits`` holds each split's own numbers. Videos that cannot be decoded are left out of both
sides of a split and counted in its report.

Writes ``summary.json``, ``per_split.csv`` and ``run.json`` (provenance) into ``out``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cosettle.core.atomic import write_csv
from cosettle.core.devices import resolve_device
from cosettle.core.provenance import digest
from cosettle.eval.frame.run import write_json, write_record
from cosettle.eval.trained_run import open_run
from cosettle.eval.video import metrics
from cosettle.eval.video.clip_features import ClipFeatureSource, ClipProtocol
from cosettle.eval.video.datasets import ActionVideo, SplitReport, class_names, load_split
from cosettle.eval.video.text import zeroshot_scores
from cosettle.pipeline.backbones import load_backbone
from cosettle.pipeline.text_tower import ClipText, load_clip_text, require_text_tower

TASKS = ("retrieval", "knn", "linear", "zeroshot")
SPLITS = ("1", "2", "3", "all")


@dataclass
class ActionEvalConfig:
    """One video-level evaluation: a dataset, a task, the splits, the backbone (+ trained run) and protocol."""

    dataset: str
    root: Path
    out: Path
    backbone: str
    weights: str
    task: str = "knn"
    split: str = "1"
    projection: Path | None = None
    protocol: ClipProtocol = field(default_factory=ClipProtocol)
    lists: Path | None = None  # a folder of trainlistNN/testlistNN (default: the shipped official lists)
    strict: bool = False
    k: int = 20
    temperature: float = 0.07
    cache: Path | None = None
    device: str = "auto"
    batch_size: int = 64
    amp: str = "auto"  # the backbone's autocast (cosettle.core.precision): bf16 on CUDA, float32 elsewhere
    arch: dict | None = None  # tiny architectures for tests

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: unknown '{self.task}' (choose {', '.join(TASKS)})")
        if str(self.split) not in SPLITS:
            raise ValueError(f"split: unknown '{self.split}' (choose {', '.join(SPLITS)})")
        self.split = str(self.split)
        if self.task == "zeroshot" and self.protocol.pooling != "clip":
            raise ValueError(f"pooling: zero-shot compares CLIP embeddings; use pooling 'clip', not '{self.protocol.pooling}'")

    @property
    def splits(self) -> list[int]:
        return [1, 2, 3] if self.split == "all" else [int(self.split)]


def _vectors(source: ClipFeatureSource, dataset: str, videos: list[ActionVideo],
             report: SplitReport) -> tuple[np.ndarray, np.ndarray]:
    """Video vectors and labels of the readable videos; the unreadable ones are counted in ``report``."""
    vectors, unreadable = source.video_vectors(dataset, videos)
    report.unreadable = len(unreadable)
    if not len(vectors):
        raise ValueError(f"{report.root}: no readable video in {dataset} split {report.split} {report.subset}")
    skipped = set(unreadable)
    return vectors, np.array([v.label for v in videos if v.name not in skipped])


def score_split(cfg: ActionEvalConfig, source: ClipFeatureSource, split: int, names: list[str],
                clip_text: ClipText | None) -> tuple[dict[str, float], list[dict]]:
    """The task's numbers on one split, and the reports of the lists it read."""
    test, test_report = load_split(cfg.dataset, cfg.root, split, "test", strict=cfg.strict, lists=cfg.lists)
    x_test, y_test = _vectors(source, cfg.dataset, test, test_report)
    reports = [test_report]
    if cfg.task == "zeroshot":
        scores = zeroshot_scores(torch.from_numpy(x_test).float(), clip_text.class_embeddings(names).cpu())
        return metrics.topk_accuracy(scores, y_test), [r.summary() for r in reports]
    train, train_report = load_split(cfg.dataset, cfg.root, split, "train", strict=cfg.strict, lists=cfg.lists)
    x_train, y_train = _vectors(source, cfg.dataset, train, train_report)
    reports.insert(0, train_report)
    if cfg.task == "retrieval":
        result = metrics.recall_at_k(x_test, y_test, x_train, y_train)
    elif cfg.task == "knn":
        result = metrics.knn_classify(x_train, y_train, x_test, y_test, len(names), k=cfg.k,
                                      temperature=cfg.temperature)
    else:
        probe = metrics.linear_probe(x_train, y_train, x_test, y_test)
        result = {"top1": probe["top1"], "top5": probe["top5"], "C": probe["C"]}
    return result, [r.summary() for r in reports]


def summarise(per_split: dict[int, dict[str, float]]) -> dict:
    """Means over the splits as the headline, ``<metric>_std`` with several splits, and each split."""
    keys = list(next(iter(per_split.values())))
    values = {k: np.array([s[k] for s in per_split.values()], dtype=float) for k in keys}
    summary: dict = {k: float(v.mean()) for k, v in values.items()}
    if len(per_split) > 1:
        summary |= {f"{k}_std": float(v.std()) for k, v in values.items()}
    summary["splits"] = {str(s): r for s, r in per_split.items()}
    return summary


def run_protocol(cfg: ActionEvalConfig, run_info: dict | None, module: torch.nn.Module | None = None) -> ClipProtocol:
    """The clip protocol, with a clip-level run's frames per clip, levels and pooling (its clip store's).
    Zero-shot takes a clip-level head only when its vectors live in CLIP's joint space (``concepts``)."""
    store = (run_info or {}).get("clip_store")
    if store is None:
        return cfg.protocol
    if cfg.task == "zeroshot" and not getattr(module, "joint_space", False):
        raise ValueError(f"{cfg.projection}: a clip-level head's vectors are not in CLIP's joint space; "
                         "zero-shot takes the frozen backbone or a token-wise projection")
    return replace(cfg.protocol, frames=store["frames"], levels=tuple(store["levels"]), pooling=store["pooling"])


def protocol_cache(cache: Path | None, asked: ClipProtocol, protocol: ClipProtocol) -> Path | None:
    """The cache to use: the given one, or beside it when a clip-level run changed the protocol (a
    cache holds one protocol; the frozen backbone's and token-wise runs' vectors stay in the given one)."""
    if cache is None or protocol == asked:
        return cache
    cache = Path(cache)
    return cache.with_name(f"{cache.stem}-{digest(protocol.as_dict())[:8]}{cache.suffix}")


def evaluate_action(cfg: ActionEvalConfig) -> dict:
    """Run the task on every requested split; write the summary, the per-split table and the record."""
    names = class_names(cfg.dataset, lists=cfg.lists)
    device = resolve_device(cfg.device)
    clip_text = None
    if cfg.protocol.pooling == "clip":
        require_text_tower(cfg.backbone)
        clip_text = load_clip_text(cfg.weights, device)
    backbone = load_backbone(cfg.backbone, cfg.weights, device=device, arch=cfg.arch)
    module, run_info = open_run(cfg.projection, backbone, device) if cfg.projection is not None else (None, None)
    protocol = run_protocol(cfg, run_info, module)
    source = ClipFeatureSource(backbone, protocol, protocol_cache(cfg.cache, cfg.protocol, protocol), module, run_info,
                               device, cfg.batch_size, clip_text, cfg.amp)
    per_split, reports = {}, []
    for split in cfg.splits:
        per_split[split], split_reports = score_split(cfg, source, split, names, clip_text)
        reports += split_reports
    summary = summarise(per_split)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    keys = list(next(iter(per_split.values())))
    write_csv(out / "per_split.csv", [["split", *keys], *([s, *(r[k] for k in keys)] for s, r in per_split.items())])
    record = {"dataset": cfg.dataset, "task": cfg.task, "split": cfg.split, "classes": len(names),
              "lists": str(Path(cfg.lists).resolve()) if cfg.lists else "shipped official lists", "lists_read": reports,
              "knn": {"k": cfg.k, "temperature": cfg.temperature} if cfg.task == "knn" else None,
              "features": source.record()}
    write_record(out, f"{cfg.dataset}-{cfg.task}", record, summary)
    return summary


def _cell(key: str, value: float) -> str:
    """A table cell: fractions in %, the probe's regularisation C as is."""
    return f"{value:10.4g}" if key == "C" else f"{100 * value:10.2f}"


def format_table(summary: dict) -> str:
    """One line per split and one for the mean, one column per metric (in %, C as is)."""
    splits = summary["splits"]
    keys = list(next(iter(splits.values())))
    lines = ["split " + "".join(k.rjust(10) for k in keys)]
    lines += [f"{s:<6}" + "".join(_cell(k, r[k]) for k in keys) for s, r in splits.items()]
    if len(splits) > 1:
        lines.append("mean  " + "".join(_cell(k, summary[k]) for k in keys))
        lines.append("std   " + "".join(_cell(k, summary[f"{k}_std"]) for k in keys))
    return "\n".join(lines)
