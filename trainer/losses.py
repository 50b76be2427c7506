"""The Co-Settle objective (COSETTLE_METHOD.md section 4) on cached backbone tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6
REG_LOSSES = ("kl", "mse")


def token_grid(tokens: int) -> int:
    """Side of the square token grid; it must be even for the 2x2 pooling."""
    side = math.isqrt(tokens)
    if side * side != tokens or side % 2:
        raise ValueError(f"{tokens} tokens are not a square grid with an even side")
    return side


def pool_nodes(z: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling (stride 2) of tokens [..., g*g, D] on their grid -> [..., (g/2)^2, D]."""
    *lead, n, d = z.shape
    g = token_grid(n)
    grid = z.reshape(-1, g, g, d).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, kernel_size=2, stride=2)
    return pooled.flatten(2).transpose(1, 2).reshape(*lead, -1, d)


def cycle_walk(z: torch.Tensor, temp: float) -> torch.Tensor:
    """Cycle matrix C = softmax(zA zB^T / t) @ softmax(zB zAasy^T / t) of pooled nodes z [B, 3, N, D]."""
    t1 = torch.softmax(z[:, 0] @ z[:, 1].transpose(1, 2) / temp, dim=-1)
    t2 = torch.softmax(z[:, 1] @ z[:, 2].transpose(1, 2) / temp, dim=-1)
    return t1 @ t2


def separability(raw: torch.Tensor, z: torch.Tensor, reg: str) -> torch.Tensor:
    """The "reg" term between L2-normalised raw tokens and projected tokens, both [B, 3, T, D]."""
    if reg == "kl":
        # kl_div(input=log q, target=p) is KL(p || q); batchmean divides the total by B only.
        return F.kl_div(F.log_softmax(z, dim=-1), F.softmax(raw, dim=-1), reduction="batchmean")
    if reg == "mse":
        return F.mse_loss(raw, z)
    raise ValueError(f"unknown reg loss '{reg}'; choose one of {', '.join(REG_LOSSES)}")


def cosettle_loss(
    projection: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    a_asy: torch.Tensor,
    temp: float = 0.03,
    lambda_reg: float = 3.0,
    reg: str = "kl",
) -> dict[str, torch.Tensor]:
    """Co-Settle loss of cached tokens a, b, a_asy [B, g*g, D] (g even) through ``projection``.

    Returns 0-d tensors: ``loss`` = cycle + lambda_reg * reg (differentiable), ``cycle``,
    ``reg``, and the detached diagnostics ``acc`` (cycle accuracy) and ``sim_identity``.
    """
    if not (a.shape == b.shape == a_asy.shape) or a.dim() != 3:
        raise ValueError(f"a, b, a_asy must share one [batch, tokens, dim] shape, got {[tuple(x.shape) for x in (a, b, a_asy)]}")
    x = torch.stack((a, b, a_asy), dim=1).float()
    z = F.normalize(projection(x), dim=-1)
    # The walk and the losses run in fp32 even under autocast: log(C + 1e-6) is meaningless in fp16.
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        raw = F.normalize(x, dim=-1)
        c = cycle_walk(pool_nodes(z), temp)
        n = c.shape[-1]
        logits = torch.log(c + EPS).flatten(0, 1)
        target = torch.arange(n, device=c.device).repeat(c.shape[0])
        cycle = F.cross_entropy(logits, target)
        reg_term = separability(raw, z, reg)
        with torch.no_grad():
            acc = (logits.argmax(dim=-1) == target).float().mean()
            eye = torch.eye(n, device=c.device).expand_as(c)
            sim_identity = F.cosine_similarity(c.flatten(), eye.flatten(), dim=0)
    return {
        "loss": cycle + lambda_reg * reg_term,
        "cycle": cycle,
        "reg": reg_term,
        "acc": acc,
        "sim_identity": sim_identity,
    }
