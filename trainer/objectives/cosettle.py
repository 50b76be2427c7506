"""Co-Settle (COSETTLE_METHOD.md section 4): the A -> B -> A_asy cycle walk of a token projection,
plus the separability constraint that keeps the projected tokens close to the frozen ones."""
from __future__ import annotations

import torch
from torch import nn

from ..losses import REG_LOSSES, cosettle_loss
from ..objective import Loss, ObjectiveSpec, Option, register
from ..projection import FUSIONS, build_projection


def _model(settings: dict, options: dict, seed: int) -> nn.Module:
    return build_projection(settings["dim"], options["fusion"], seed)


def _loss(options: dict) -> Loss:
    def loss(projection: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return cosettle_loss(projection, batch["a"], batch["b"], batch["a_asy"],
                             temp=options["temp"], lambda_reg=options["lambda_reg"], reg=options["reg_loss"])
    return loss


register(ObjectiveSpec(
    name="cosettle",
    description="A -> B -> A_asy cycle walk plus the separability constraint",
    build_model=_model,
    build_loss=_loss,
    options={
        "temp": Option(0.03, "Softmax temperature of the walk.", check=lambda v: v > 0, requirement="must be positive"),
        "lambda_reg": Option(3.0, "Weight of the separability term."),
        "reg_loss": Option("kl", "Separability term: KL of the softmaxed tokens, or MSE.", choices=REG_LOSSES),
        "fusion": Option("linear", "Projection: linear = LN(tanh(Wx+b)), or 2-3 layer MLPs.", choices=tuple(FUSIONS)),
    },
))
