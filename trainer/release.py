"""Co-Settle release files as cosettle runs: import (release -> run directory), export (run
directory -> release), and a release opened directly for evaluation.

How a run ties to the backbone it is evaluated with (``eval.trained_run.run_provenance``):

- ``weights_sha256``: the sha256 of the base checkpoint file (the backbone's official file, the
  one evaluations load with ``--weights``), recorded when ``import-release --weights BASE`` is
  given, after BASE, loaded strictly, was found to hold the same encoder tensors as the release;
- ``encoder_sha256``: always, the digest (:func:`~cosettle.trainer.release_format.state_digest`)
  of the release's encoder as cosettle loads it into the backbone. An evaluation whose weights
  file has another sha256 is accepted when its loaded encoder has this digest.

A release file given directly where a run is accepted is checked against the evaluated backbone
tensor by tensor (identical, or within ``TOLERANCE``) instead.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from cosettle.core.atomic import write_atomic, write_json
from cosettle.core.provenance import environment, now_utc, sha256_file
from cosettle.pipeline.backbones import Backbone, create_model, load_backbone
from cosettle.pipeline.checkpoints import CheckpointError

from .config import TrainConfig
from .projection import build_projection
from .release_args import args_from_config, check_base_model, settings_from_args
from .release_format import (
    ReleaseError,
    adapter_key_map,
    adapter_state,
    check_same_encoder,
    compare_states,
    encoder_state,
    projection_state,
    read_release,
    release_format,
    release_own_names,
    state_digest,
)
from .run_dir import CONFIG_FILE, RunDir
from .schedule import build_optimizer
from .trained import load_trained

RELEASE_STATE = "release_state.pt"  # the release's optimizer / scaler / epoch, kept for export
DEFAULT_SCALER = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                  "_growth_tracker": 0}  # GradScaler's initial state: what a disabled (CPU) run stands for


def _release_projection(release, backbone: str, dim: int) -> tuple[dict, str, dict, dict]:
    """(settings from args, fusion, projection state, TrainConfig options) of a release for ``backbone``."""
    path = release.path
    check_base_model(release.args, backbone, path)
    settings = settings_from_args(release.args, path)
    fusion, state = projection_state(release, settings["train"].get("fusion"))
    settings["train"]["fusion"] = fusion
    width = state["0.weight"].shape[-1]
    if width != dim:
        raise ReleaseError(f"{path}: its projection is {width}-d, but backbone '{backbone}' gives {dim}-d tokens")
    return settings, fusion, state, TrainConfig.from_flat(**settings["train"]).options


def import_release(path: Path, backbone: str, out: Path, weights: str | Path | None = None,
                   arch: dict | None = None, overwrite: bool = False) -> dict:
    """Write release ``path`` as a finished cosettle run in ``out``; returns the run's summary.

    The encoder in the release must load strictly into ``backbone``; with ``weights`` (the base
    checkpoint) it must also equal that file's encoder, whose sha256 the run then records.
    """
    path, out = Path(path), Path(out)
    release_format(backbone)  # refuses a backbone whose release names are unknown, before reading
    release = read_release(path)
    model = create_model(backbone, arch)
    settings, fusion, state, _ = _release_projection(release, backbone, model.embed_dim)
    encoder = encoder_state(release, backbone, model)
    model.load_state_dict(encoder, strict=True)
    own = model.state_dict()
    base = {"weights": None, "weights_sha256": None}
    match = None
    if weights is not None:
        loaded = load_backbone(backbone, weights, arch=arch)
        match = compare_states(own, loaded.model.state_dict())
        check_same_encoder(match, path, str(weights))
        base = {"weights": loaded.weights, "weights_sha256": loaded.weights_sha256}
        match = {k: v for k, v in match.items() if k != "beyond_tolerance"}

    run = RunDir(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ReleaseError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_flat(features=(), out=str(out), **settings["train"])
    dim = model.embed_dim
    config = {
        "identity": {"dim": dim, "source": "release", "release_sha256": release.sha256},
        "train": cfg.as_dict(), "dim": dim, "grid": model.patch_embed.grid_size[0], "backbone": backbone,
        **base, "encoder_sha256": state_digest(own), "arch": arch,
        "release": {"file": str(path.resolve()), "name": path.name, "sha256": release.sha256, "epoch": release.epoch,
                    "fusion": fusion, "adapter_keys": adapter_key_map(fusion), "encoder_tensors": len(own),
                    "args_mapped": settings["mapped"], "base_match": match},
        "release_args": settings["release_args"], "extract": settings["extract"], "lr": settings["lr"],
        "world_size": 1, "effective_batch": cfg.batch_size * cfg.accum_iter,
        "environment": environment(), "created": now_utc(),
    }
    write_json(run.file(CONFIG_FILE), config)
    if release.optimizer is not None or release.scaler is not None:
        kept = {"optimizer": release.optimizer, "scaler": release.scaler, "epoch": release.epoch}
        write_atomic(run.file(RELEASE_STATE), lambda tmp: torch.save(kept, tmp))
    meta = {"dim": str(dim), "objective": "cosettle", "source": "release", "release_sha256": release.sha256}
    final = run.save_final_weights(state, meta | {k: str(v) for k, v in cfg.options.items()})
    summary = {"run": str(out), "imported_from": str(path.resolve()), "release_sha256": release.sha256,
               "weights": final.name, "weights_sha256": sha256_file(final), "finished": now_utc()}
    run.write_summary(summary)
    return summary


def _state_for_export(run: RunDir, projection: nn.Module, config: dict) -> tuple[dict, dict]:
    """(optimizer, scaler) state dicts: the imported release's, the run's last checkpoint's, or fresh."""
    if run.file(RELEASE_STATE).is_file():
        kept = torch.load(run.file(RELEASE_STATE), map_location="cpu", weights_only=True)
        if kept.get("optimizer") is not None:
            return kept["optimizer"], kept.get("scaler") or dict(DEFAULT_SCALER)
    latest = run.latest_checkpoint()
    if latest is not None:
        _, state = run.load_checkpoint(latest)
        return state["optimizer"], state.get("scaler") or dict(DEFAULT_SCALER)
    lr = config.get("lr") or 0.0
    return build_optimizer(projection, lr, config["train"]["weight_decay"]).state_dict(), dict(DEFAULT_SCALER)


def _load_official(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({str(e).strip().splitlines()[0]})") from None


def export_release(run_dir: Path, out: Path, weights: str | Path, arch: dict | None = None,
                   overwrite: bool = False) -> dict:
    """Write a finished Co-Settle run as a release file: ``model`` = the encoder of ``weights`` (the
    run's base checkpoint) under the backbone's own names + the projection under the release's
    adapter names, ``optimizer``, ``epoch`` (epochs - 1), ``scaler`` and ``args``."""
    run_dir, out, weights = Path(run_dir), Path(out), Path(weights)
    projection, config = load_trained(run_dir)
    train = config["train"]
    if train.get("objective", "cosettle") != "cosettle":
        raise ReleaseError(f"{run_dir}: objective {train['objective']!r}; only Co-Settle projections have a release format")
    backbone = config["backbone"]
    release_format(backbone)
    if out.exists() and not overwrite:
        raise ReleaseError(f"{out}: exists; pass --overwrite to replace it")
    loaded = load_backbone(backbone, weights, arch=arch)
    recorded, digest = config.get("weights_sha256"), config.get("encoder_sha256")
    if recorded != loaded.weights_sha256 and (digest is None or digest != state_digest(loaded.model.state_dict())):
        raise ReleaseError(f"{weights}: not the base checkpoint of {run_dir} (the run was made with weights sha256 "
                           f"{recorded}, this file has {loaded.weights_sha256})")
    encoder = release_own_names(_load_official(weights), backbone, weights)
    adapter = adapter_state(projection.state_dict(), train["fusion"])
    clash = sorted(set(encoder) & set(adapter))
    if clash:
        raise ReleaseError(f"{weights}: encoder keys clash with the adapter's ({', '.join(clash)})")
    optimizer, scaler = _state_for_export(RunDir(run_dir), projection, config)
    obj = {"model": {**{k: v.contiguous() for k, v in encoder.items()}, **adapter}, "optimizer": optimizer,
           "epoch": int(train["epochs"]) - 1, "scaler": scaler, "args": args_from_config(config)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: torch.save(obj, tmp))
    return {"release": str(out), "sha256": sha256_file(out), "epoch": obj["epoch"], "fusion": train["fusion"],
            "encoder_tensors": len(encoder), "adapter_tensors": len(adapter), "backbone": backbone,
            "weights": loaded.weights}


def load_release(path: Path, backbone: Backbone, device: torch.device | str) -> tuple[nn.Module, dict]:
    """The projection of release ``path`` (eval mode, on ``device``), checked against the evaluated
    ``backbone``: base model, dim, and the embedded encoder tensor by tensor; and its provenance."""
    path = Path(path)
    release_format(backbone.name)
    release = read_release(path)
    settings, fusion, state, options = _release_projection(release, backbone.name, backbone.dim)
    encoder = encoder_state(release, backbone.name, backbone.model)
    match = compare_states(encoder, backbone.model.state_dict())
    check_same_encoder(match, path, backbone.weights)
    module = build_projection(backbone.dim, fusion)
    module.load_state_dict(state, strict=True)
    info = {"clip_store": None, "run_dir": str(path.resolve()), "run_weights_sha256": release.sha256,
            "objective": "cosettle", **options, "created": None, "backbone": backbone.name,
            "weights_sha256": backbone.weights_sha256,
            "release": {"file": str(path.resolve()), "sha256": release.sha256, "epoch": release.epoch,
                        "encoder_identical": match["identical"], "encoder_tensors": match["tensors"],
                        "encoder_max_abs_diff": match["max_abs_diff"], "release_args": settings["release_args"]}}
    return module.to(device).eval(), info


def is_release_file(path: Path) -> bool:
    """Whether ``path`` names a file (a release) rather than a run directory."""
    return Path(path).is_file()

