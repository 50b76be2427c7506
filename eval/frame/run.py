"""What every propagation evaluation shares: its settings, the feature source it opens, its record."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cosettle.core.atomic import write_json as atomic_json
from cosettle.core.devices import resolve_device
from cosettle.core.provenance import environment, now_utc
from cosettle.eval.frame.features import FeatureSource
from cosettle.eval.frame.propagation import PRESETS, PropagationSettings
from cosettle.eval.trained_run import open_run
from cosettle.pipeline.backbones import load_backbone


@dataclass
class EvalConfig:
    """One evaluation run. ``projection``: None (the frozen backbone), a cosettle-train run
    directory, a Co-Settle release file (``checkpoint-4.pth``, read by ``open_run``), or a module
    mapping [..., D] -> [..., D] (Python API)."""

    root: Path
    out: Path
    backbone: str
    weights: str
    projection: Path | torch.nn.Module | None = None
    settings: PropagationSettings = field(default_factory=lambda: PRESETS["dino"])
    device: str = "auto"
    cache: Path | None = None
    batch_size: int = 8
    amp: str = "none"  # the backbone's autocast (cosettle.core.precision); frame features default to float32
    arch: dict | None = None  # tiny architectures for tests


def open_source(cfg: EvalConfig) -> tuple[FeatureSource, dict]:
    """The feature source of a run and the provenance its results record."""
    device = resolve_device(cfg.device)
    backbone = load_backbone(cfg.backbone, cfg.weights, device=device, arch=cfg.arch)
    projection, proj_info = cfg.projection, None
    if isinstance(projection, (str, Path)):
        projection, proj_info = open_run(Path(projection), backbone, device)
    elif projection is not None:
        proj_info = {"module": type(projection).__name__}
    source = FeatureSource(backbone, cfg.settings, cfg.cache, projection, device, cfg.batch_size, cfg.amp)
    record = {
        "backbone": {"name": backbone.name, "weights": backbone.weights, "weights_sha256": backbone.weights_sha256,
                     "dim": backbone.dim, "patch_size": backbone.patch_size},
        "projection": proj_info, "settings": cfg.settings.as_dict(), "cache": str(source.cache.path.resolve()),
        "device": str(device), "autocast": source.amp, "root": str(Path(cfg.root).resolve()),
    }
    return source, record


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as indented JSON (atomically), creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(path, obj, sort_keys=False)  # keep the order tables are written in


def write_record(out: Path, task: str, record: dict, results: dict) -> None:
    """``out/run.json``: how the results were made (settings, backbone, projection, environment)."""
    write_json(Path(out) / "run.json", {"task": task, **record, "results": results, "environment": environment(),
                                        "finished": now_utc()})
