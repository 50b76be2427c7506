"""A trained run applied at evaluation: loaded for one backbone, and what results record of it.

Wherever a run directory is accepted, a Co-Settle release file (``checkpoint-4.pth``) is too: its
projection is read directly (``cosettle.trainer.release``), after its embedded encoder was found
equal to the evaluated backbone's."""
from __future__ import annotations

from pathlib import Path

import torch

from cosettle.core.provenance import sha256_file
from cosettle.pipeline.backbones import FINAL_NORM_KEY, Backbone
from cosettle.trainer.projection import ProjectionError
from cosettle.trainer.release import is_release_file, load_release
from cosettle.trainer.release_format import state_digest
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
        if recorded[key] != ours and not (key == "weights_sha256" and _same_encoder(config, backbone)):
            also = (" (nor the encoder of the imported release, encoder_sha256 "
                    f"{config['encoder_sha256'][:12]}...)" if key == "weights_sha256" and config.get("encoder_sha256") else "")
            raise ProjectionError(f"{run_dir}: projection trained on {key} {recorded[key]!r}, "
                                  f"but the evaluated backbone has {ours!r}{also}")
    rule = store.get(FINAL_NORM_KEY, "all")
    if rule != backbone.spec.final_norm:
        raise ProjectionError(f"{run_dir}: projection trained on tokens of final-norm rule {rule!r}, but "
                              f"{backbone.name} gives {backbone.spec.final_norm!r} tokens; train it again on a new store")
    objective, options = run_options(config)
    clip_store = {k: store[k] for k in ("plan", "frames", "levels", "pooling")} if clips else None
    return {"clip_store": clip_store, "run_dir": str(Path(run_dir).resolve()),
            "run_weights_sha256": sha256_file(Path(run_dir) / WEIGHTS_FILE), "objective": objective, **options,
            "created": config.get("created"), "backbone": config["backbone"],
            "weights_sha256": config["weights_sha256"] or backbone.weights_sha256}


def _same_encoder(config: dict, backbone: Backbone) -> bool:
    """An imported release records the digest of its encoder as loaded (``encoder_sha256``): any
    weights file giving the same encoder tensors is its backbone."""
    recorded = config.get("encoder_sha256")
    return recorded is not None and recorded == state_digest(backbone.model.state_dict())


def open_run(run_dir: Path, backbone: Backbone, device: torch.device | str) -> tuple[torch.nn.Module, dict]:
    """The trained module of ``run_dir`` (eval mode, on ``device``) checked against ``backbone``,
    and its provenance record. ``run_dir`` may also be a release file."""
    if is_release_file(run_dir):
        return load_release(Path(run_dir), backbone, device)
    module, config = load_trained(Path(run_dir), device)
    return module, run_provenance(config, run_dir, backbone)
