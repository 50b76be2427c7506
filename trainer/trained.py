"""Loading the trained module of a finished run, whatever objective trained it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .objective import get_objective
from .projection import ProjectionError, load_weights, read_weights
from .run_dir import CONFIG_FILE, WEIGHTS_FILE


def run_options(config: dict) -> tuple[str, dict]:
    """(objective, its options) recorded in a run's config.json."""
    train = config["train"]
    spec = get_objective(train.get("objective", "cosettle"))
    return spec.name, {name: train[name] for name in spec.options}


def load_trained(run_dir: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained module of a finished run (eval mode, on ``device``) and the run's config.

    The config dict is the run's ``config.json``: training settings, the feature stores'
    provenance (backbone, weights digest, views...) and the environment. An objective with a
    ``load_model`` is rebuilt from the run's own tensors, needing nothing outside the run.
    """
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ProjectionError(f"{run_dir}: not a cosettle-train run directory (no {CONFIG_FILE})")
    if not weights.is_file():
        raise ProjectionError(f"{run_dir}: no {WEIGHTS_FILE}; the run has not finished (continue it with --resume)")
    try:
        config = json.loads(cfg_path.read_text())
        # build_model reads the training store's settings; a config without store provenance
        # (hand-written, as in tests) still names the dim, which is all a views objective needs
        settings = config["stores"][0]["settings"] if "stores" in config else {"dim": config["dim"]}
        objective, options = run_options(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ProjectionError(f"{cfg_path}: not a cosettle-train config ({type(e).__name__}: {e})") from None
    spec, state = get_objective(objective), read_weights(weights)
    if spec.load_model is None:
        model = spec.build_model(settings, options, 0)
    else:
        try:
            model = spec.load_model(settings, options, state)
        except ProjectionError as e:
            raise ProjectionError(f"{weights}: {e}") from None
    load_weights(model, weights, state)
    return model.to(device).eval(), config
