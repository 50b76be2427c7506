"""The registry of training objectives on cached features.

An objective is one module in :mod:`cosettle.trainer.objectives` (or a third-party module named
by a ``cosettle.objectives`` entry point) that calls :func:`register` with an
:class:`ObjectiveSpec`: its own settings (each an :class:`Option`, exposed as ``cosettle-train
--NAME`` and as ``[train]`` keys of a sweep file), the trainable module it builds, and the loss.
Adding an objective is adding a module; nothing here names one.

The loss is built once per run and called per batch: ``loss(model, batch) -> dict`` of 0-d
tensors, always with a differentiable ``loss``; every other entry is logged as a metric.
``batch`` maps store array names to tensors: for the ``views`` layout ``a``, ``b``, ``a_asy``
(tokens [batch, T, D]); for the ``clips`` layout ``tokens`` [batch, 2, T, L, D'] and ``labels``
[batch, 6] (int64; -1 where the store's plan defines none).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from cosettle.core.registry import Registry

Loss = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Option:
    """One setting of an objective: its default, help, and the rule a value must follow."""

    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # what ``check`` demands, e.g. "must be positive"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed (without the option's name), or None."""
        if self.choices is not None and value not in self.choices:
            return f"unknown '{value}' (choose {', '.join(self.choices)})"
        if self.check is not None and not self.check(value):
            return f"{self.requirement}, got {value}"
        return None


@dataclass(frozen=True)
class ObjectiveSpec:
    """A named objective: its options, ``build_model(settings, options, seed)`` (the trainable
    module, seeded from its own generator; ``settings`` is the training store's settings dict, e.g.
    ``dim``, and for clip stores ``frames``, ``levels``, ``plan``), ``build_loss(options)`` (the
    per-batch loss), and the store ``layout`` it trains on: ``views`` (Co-Settle's A / B / A_asy
    token arrays) or ``clips`` (two clips per video, ``tokens`` [B, 2, T, L, D'] + ``labels``)."""

    name: str
    description: str
    build_model: Callable[[dict, dict, int], nn.Module]
    build_loss: Callable[[dict], Loss]
    options: dict[str, Option] = field(default_factory=dict)
    layout: str = "views"  # the store layout it trains on: views (frame pairs) or clips
    plan: str | None = None  # for a clips layout, the sampling plan its store must be made with
    # ``load_model(settings, options, state)``: the module of a finished run rebuilt from the run's
    # own saved tensors, for objectives whose ``build_model`` reads inputs from outside the run
    # (files that may since have moved); None: ``build_model`` with seed 0, then the state loaded
    load_model: Callable[[dict, dict, dict[str, torch.Tensor]], nn.Module] | None = None

    def defaults(self) -> dict:
        return {name: opt.default for name, opt in self.options.items()}


REGISTRY: Registry[ObjectiveSpec] = Registry("objective", "cosettle.trainer.objectives", "cosettle.objectives")
OBJECTIVES = REGISTRY.entries
discover = REGISTRY.discover
get_objective = REGISTRY.get


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add an objective to the registry; a name registered twice is an error."""
    return REGISTRY.register(spec.name, spec)


def all_options() -> dict[str, list[tuple[str, Option]]]:
    """Option name -> the (objective, option) pairs that declare it, over every objective."""
    out: dict[str, list[tuple[str, Option]]] = {}
    for spec in discover().values():
        for name, opt in spec.options.items():
            out.setdefault(name, []).append((spec.name, opt))
    return out
