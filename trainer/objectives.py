"""The registry of training objectives on cached tokens.

An objective is built once from the run's config and then called per batch:
``objective(projection, batch) -> dict`` of 0-d tensors, always with a differentiable ``loss``;
every other entry is logged as a metric. ``batch`` maps store array names (``a``, ``b``,
``a_asy``) to tokens [batch, T, D]. Co-Settle is one entry; other methods on the same cached
features are added with ``register``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .losses import cosettle_loss

if TYPE_CHECKING:
    from .config import TrainConfig

Objective = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ObjectiveSpec:
    """A named objective: ``build(config)`` returns the per-batch callable."""

    name: str
    build: Callable[["TrainConfig"], Objective]
    description: str = ""


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add an objective to ``OBJECTIVES``; a name registered twice is an error."""
    if spec.name in OBJECTIVES:
        raise ValueError(f"objective '{spec.name}' is registered twice")
    OBJECTIVES[spec.name] = spec
    return spec


def build_objective(config: "TrainConfig") -> Objective:
    """The per-batch objective named by ``config.objective``."""
    if config.objective not in OBJECTIVES:
        raise KeyError(f"unknown objective '{config.objective}'; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[config.objective].build(config)


def _cosettle(config: "TrainConfig") -> Objective:
    def objective(projection: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return cosettle_loss(projection, batch["a"], batch["b"], batch["a_asy"],
                             temp=config.temp, lambda_reg=config.lambda_reg, reg=config.reg_loss)
    return objective


register(ObjectiveSpec("cosettle", _cosettle, "A -> B -> A_asy cycle walk plus the separability constraint"))
