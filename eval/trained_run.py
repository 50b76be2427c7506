"""A trained run applied at evaluation: loaded for one backbone, and what results record of it."""
from __future__ import annotations

from pathlib import Path

import torch

from cosettle.core.provenance import sha256_file
from cosettle.pipeline.backbones import Backbone
from cosettle.trainer.projection import ProjectionError
from cosettle.trainer.run_dir import WEIGHTS_FILE
from cosettle.trainer.trained import load_trained, run_options


def run_provenance(config: dict, run_dir: Path, backbone: Backbone) -> dict:
    """Check that a trained run belongs to ``backbone``; return what results should record of it."""
    store = config.get("stores", [{}])[0].get("settings", {})
    clips = store.get("layout") == "clips"
    # a clip store's dim is the pooled width D' (2D for cls+mean); the backbone's own is its backbone_dim
    recorded = {"backbone": config.get("backbone"), "weights_sha256": config.get("weights_sha256"),
                "dim": store.get("backbone_dim") if clips else config.get("dim")}
    for key, ours in (("backbone", backbone.name), ("weights_sha256", backbone.weights_sha256), ("dim", backbone.dim)):
        if recorded[key] != ours:
            raise ProjectionError(f"{run_dir}: projection trained on {key} {recorded[key]!r}, "
                                  f"but the evaluated backbone has {ours!r}")
    objective, options = run_options(config)
    clip_store = {k: store[k] for k in ("plan", "frames", "levels", "pooling")} if clips else None
    return {"clip_store": clip_store, "run_dir": str(Path(run_dir).resolve()), "run_weights_sha256": sha256_file(Path(run_dir) / WEIGHTS_FILE),
            "objective": objective, **options,
            "created": config.get("created"), "backbone": config["backbone"], "weights_sha256": config["weights_sha256"]}


def open_run(run_dir: Path, backbone: Backbone, device: torch.device | str) -> tuple[torch.nn.Module, dict]:
    """The trained module of ``run_dir`` (eval mode, on ``device``) checked against ``backbone``,
    and its provenance record."""
    module, config = load_trained(Path(run_dir), device)
    return module, run_provenance(config, run_dir, backbone)
