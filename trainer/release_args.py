"""The release's ``args`` (its ``argparse.Namespace``, the authors' ``main_pretrain.py`` flags)
mapped onto cosettle's settings, and back.

Import direction (:func:`settings_from_args`):

- training settings (``TrainConfig`` names): ``epochs``, ``blr``, ``min_lr``, ``warmup_epochs``,
  ``weight_decay``, ``seed``, ``accum_iter`` keep their names; ``batch_size`` (per GPU in the
  release) becomes ``batch_size x world_size`` (cosettle's one process stands for the release's
  ``world_size`` GPUs, so blr x effective batch / 256 gives the same lr);
- the objective's options: ``temp``, ``lambda_reg`` (also read from ``reg_weight``),
  ``reg_loss``, ``fusion_net`` -> ``fusion``;
- view sampling (cosettle's extraction settings): ``clip_gap``, ``asy_pos_ratio`` -> ``asy_ratio``;
- ``lr`` (the absolute lr the release computed) is kept as the run's ``lr``;
- ``base_model`` (+ ``model_type``) must name the backbone imported as;
- every arg not mapped above (``base_model``, ``world_size``, paths, ...) is kept verbatim under
  the run's ``release_args``.

Export direction (:func:`args_from_config`) writes the same flags back, and the kept
``release_args`` with them, so a file round-trips to the same Namespace.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from .config import TrainConfig
from .objective import get_objective
from .release_format import ReleaseError

# release arg -> cosettle name (TrainConfig field or objective option)
TRAIN_ARGS = {"epochs": "epochs", "blr": "blr", "min_lr": "min_lr", "warmup_epochs": "warmup_epochs",
              "weight_decay": "weight_decay", "seed": "seed", "accum_iter": "accum_iter"}
OPTION_ARGS = {"temp": "temp", "lambda_reg": "lambda_reg", "reg_weight": "lambda_reg", "reg_loss": "reg_loss",
               "fusion_net": "fusion"}
VIEW_ARGS = {"clip_gap": "clip_gap", "asy_pos_ratio": "asy_ratio"}
# the release's --base_model choices (model_type vitb16) -> cosettle's backbone
BASE_MODELS = {"mae": "mae_vitb", "ijepa": "ijepa_vitb", "mocov3": "mocov3_vitb", "clip": "clip_vitb",
               "blip": "blip_vitb", "dino": "dino_vitb", "ibot": "ibot_vitb", "dinov2": "dinov2_vitb"}

def _typed(name: str, value, kind: type, path) -> object:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ReleaseError(f"{path}: args.{name} = {value!r} is not a {kind.__name__}")
    return value


def check_base_model(args: dict | None, backbone: str, path) -> None:
    """Refuse a release whose ``args.base_model`` names another backbone."""
    if not args or args.get("base_model") is None:
        return
    base, model_type = args["base_model"], args.get("model_type", "vitb16")
    ours = BASE_MODELS.get(base) if model_type == "vitb16" else None
    if ours != backbone:
        them = f"cosettle's {ours}" if ours else "no cosettle backbone"
        raise ReleaseError(f"{path}: trained on base_model {base!r} ({model_type}, {them}), not on '{backbone}'")


def settings_from_args(args: dict | None, path) -> dict:
    """{"train": TrainConfig values, "extract": view settings, "lr": float|None,
    "release_args": the args not mapped, "mapped": release arg -> cosettle name}."""
    args = dict(args or {})
    kinds = {f.name: type(f.default) for f in fields(TrainConfig) if f.name != "options"}
    spec = get_objective("cosettle")
    train, extract, mapped = {}, {}, {}
    for name, target in TRAIN_ARGS.items():
        if args.get(name) is not None:
            train[target] = _typed(name, args[name], kinds[target], path)
            mapped[name] = target
    for name, target in OPTION_ARGS.items():
        if args.get(name) is not None:
            value = _typed(name, args[name], type(spec.options[target].default), path)
            problem = spec.options[target].problem(value)
            if problem:
                raise ReleaseError(f"{path}: args.{name}: {problem}")
            if target in train and train[target] != value:
                raise ReleaseError(f"{path}: args give {target} twice with different values")
            train[target] = value
            mapped[name] = target
    if args.get("batch_size") is not None:
        world = _typed("world_size", args.get("world_size") or 1, int, path)
        train["batch_size"] = _typed("batch_size", args["batch_size"], int, path) * world
        mapped["batch_size"] = "batch_size (x world_size)"
    for name, target in VIEW_ARGS.items():
        if args.get(name) is not None:
            extract[target] = _typed(name, args[name], float, path)
            mapped[name] = f"extract.{target}"
    lr = args.get("lr")
    lr = _typed("lr", lr, float, path) if lr is not None else None
    if lr is not None:
        mapped["lr"] = "lr"
    kept = {k: v for k, v in args.items() if k not in mapped}  # world_size stays: export splits the batch by it
    return {"train": train, "extract": extract, "lr": lr, "release_args": kept, "mapped": mapped}


def _plain(value):
    """A value argparse could have produced and weights_only can read back (str, numbers, lists...)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def args_from_config(config: dict) -> argparse.Namespace:
    """The release ``args`` of a run's config.json: the kept ``release_args`` overlaid with the
    run's own settings under the release's flag names."""
    train = config["train"]
    kept = dict(config.get("release_args") or {})
    out = {k: _plain(v) for k, v in kept.items()}
    for name, target in TRAIN_ARGS.items():
        value = train[target]
        out[name] = int(value) if name == "warmup_epochs" and float(value).is_integer() else value
    for name, target in OPTION_ARGS.items():
        if name != "reg_weight":  # written under the authors' own flag, lambda_reg
            out[name] = train[target]
    world = int(kept.get("world_size") or 1)
    total = int(train["batch_size"]) * int(config.get("world_size") or 1)
    if total % world:
        world = 1
    out["batch_size"], out["world_size"] = total // world, world
    for name, target in VIEW_ARGS.items():
        value = (config.get("extract") or {}).get(target)
        if value is None:
            value = ((config.get("stores") or [{}])[0].get("settings") or {}).get(target)
        if value is not None:
            out[name] = value
    if config.get("lr") is not None:
        out["lr"] = config["lr"]
    backbone = config.get("backbone")
    base = next((k for k, v in BASE_MODELS.items() if v == backbone), None)
    if base is not None:
        out["base_model"], out["model_type"] = base, "vitb16"
    out.setdefault("use_adapter", True)
    out.setdefault("use_asy_pos_embedding", True)
    return argparse.Namespace(**out)
