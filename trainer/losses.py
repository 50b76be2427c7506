"""The Co-Settle objective (COSETTLE_METHOD.md section 4) on cached backbone tokens.

On CPU a training step is bound by full-size ([batch, 3, tokens, dim]) element-wise passes, and
every fresh full-size tensor costs page faults on top of its pass. The formulation below gives
the values and gradients of the plain one (``F.normalize``, ``avg_pool2d``, ``kl_div``) while
allocating as few such tensors as it can: the L2 normalisation, the 2x2 pooling and the KL term
have hand-written backward passes of one allocation each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6
NORM_EPS = 1e-12  # F.normalize's floor on the norm
REG_LOSSES = ("kl", "mse")


def token_grid(tokens: int) -> int:
    """Side of the square token grid; it must be even for the 2x2 pooling."""
    side = math.isqrt(tokens)
    if side * side != tokens or side % 2:
        raise ValueError(f"{tokens} tokens are not a square grid with an even side")
    return side


class _Pool(torch.autograd.Function):
    """2x2 average pooling (stride 2) of tokens [N, g*g, D] on their g x g grid -> [N, (g/2)^2, D].

    The forward is ``avg_pool2d``; the backward spreads each node's gradient / 4 over its 2x2
    tokens in one copy, where avg_pool2d's backward zero-fills a full-size tensor and scatters."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, g: int) -> torch.Tensor:
        n, _, d = z.shape
        ctx.grid = g
        grid = z.reshape(n, g, g, d).permute(0, 3, 1, 2)  # channels-last view: no copy
        return F.avg_pool2d(grid, kernel_size=2, stride=2).flatten(2).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        n, _, d = grad.shape
        h = ctx.grid // 2
        spread = (grad * 0.25).reshape(n, h, 1, h, 1, d).expand(n, h, 2, h, 2, d)
        return spread.reshape(n, 4 * h * h, d), None


def pool_nodes(z: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling (stride 2) of tokens [..., g*g, D] on their grid -> [..., (g/2)^2, D]."""
    *lead, n, d = z.shape
    pooled = _Pool.apply(z.reshape(-1, n, d), token_grid(n))
    return pooled.reshape(*lead, -1, d)


class _Unit(torch.autograd.Function):
    """``F.normalize(y, dim=-1)`` (norm floored at 1e-12) with a backward of one allocation."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        z = y / norm.clamp_min(NORM_EPS)
        ctx.save_for_backward(z, norm)
        return z

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        z, norm = ctx.saved_tensors
        # d(y/|y|) = (g - z (g.z)) / |y|; where the floor holds, y/1e-12 is linear: g / 1e-12.
        out = torch.mul(grad, z)
        along = out.sum(-1, keepdim=True) * (norm >= NORM_EPS)
        return torch.addcmul(grad, z, along, value=-1, out=out).div_(norm.clamp_min(NORM_EPS))


def unit(y: torch.Tensor) -> torch.Tensor:
    """Rows of ``y`` scaled to unit L2 norm over the last dim (as ``F.normalize``)."""
    return _Unit.apply(y)


class _SoftmaxKL(torch.autograd.Function):
    """sum over tokens of KL(softmax(f) || softmax(z)) over the last dim; f is a constant.

    Both inputs are unit rows (every entry in [-1, 1]), so exp needs no max shift. Per token,
    KL = p.(f - z) + log(sum e^z / sum e^f) with p = softmax(f): one log per token instead of
    ``kl_div``'s xlogy and log_softmax over every entry. The gradient, softmax(z) - p, is kept
    from the forward pass."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        p = torch.exp(f)
        sum_f = p.sum(-1, keepdim=True)
        p.div_(sum_f)
        work = torch.sub(f, z)
        gap = work.mul_(p).sum(-1, keepdim=True)
        q = torch.exp(z, out=work)  # the same buffer, now free: one full-size allocation fewer
        sum_z = q.sum(-1, keepdim=True)
        ctx.save_for_backward(q.div_(sum_z).sub_(p))
        return (gap + torch.log(sum_z / sum_f)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (q_minus_p,) = ctx.saved_tensors
        return q_minus_p * grad, None


def cycle_walk(z: torch.Tensor, temp: float) -> torch.Tensor:
    """Cycle matrix C = softmax(zA zB^T / t) @ softmax(zB zAasy^T / t) of pooled nodes z [B, 3, N, D]."""
    za, zb, zs = z.unbind(1)  # one stacked gradient, where indexing zero-fills one per use
    t1 = torch.softmax(za @ zb.transpose(1, 2) / temp, dim=-1)
    t2 = torch.softmax(zb @ zs.transpose(1, 2) / temp, dim=-1)
    return t1 @ t2


def separability(raw: torch.Tensor, z: torch.Tensor, reg: str) -> torch.Tensor:
    """The "reg" term between L2-normalised raw tokens and projected tokens, both [B, 3, T, D]."""
    if reg == "kl":
        # kl_div(log q, p, reduction="batchmean") is KL(p || q) summed and divided by B only.
        return _SoftmaxKL.apply(z, raw) / z.shape[0]
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
    x = a.new_empty((a.shape[0], 3, *a.shape[1:]), dtype=torch.float32)
    for i, frame in enumerate((a, b, a_asy)):  # cast while stacking: one full-size copy, not two
        x[:, i] = frame
    y = projection(x)
    # The walk and the losses run in fp32 even under autocast: log(C + 1e-6) is meaningless in fp16.
    with torch.autocast(device_type=y.device.type, enabled=False):
        z = unit(y.float())
        with torch.no_grad():
            raw = unit(x)
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
