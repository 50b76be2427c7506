"""The terms of the ``concepts`` objective (:mod:`cosettle.trainer.objectives.concepts`) as plain
functions of logits over concept vectors, so that each can be tested against a direct computation.

Notation: ``z`` [B, K] are cosines between unit clip vectors and the K unit class vectors, ``a``
[B, A] the cosines with the A unit attribute vectors, ``tau_t`` / ``tau_s`` the teacher / student
temperatures. Everything here expects fp32 tensors; the objective calls it with autocast off.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

TINY = 1e-12  # floor inside logarithms of probabilities that may be exactly 0


def teacher_momentum(step: int, base: float, schedule_steps: int) -> float:
    """EMA momentum of the teacher at (0-based) loss call ``step``.

    ``schedule_steps`` 0: the constant ``base``. Otherwise DINO's cosine schedule from ``base`` to 1
    over ``schedule_steps`` calls, held at 1 after them:
    m(k) = 1 - (1 - base) (cos(pi min(k, S) / S) + 1) / 2.
    """
    if schedule_steps <= 0:
        return base
    progress = min(step, schedule_steps) / schedule_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def teacher_probs(z_t: torch.Tensor, center: torch.Tensor, tau_t: float) -> torch.Tensor:
    """DINO's teacher target: softmax((z_t - center) / tau_t), detached. [B, K]."""
    return F.softmax((z_t.detach() - center) / tau_t, dim=-1)


def distillation(p_t: torch.Tensor, z_s: torch.Tensor, tau_s: float) -> torch.Tensor:
    """Concept distillation: mean over rows of -sum_k p_t log softmax(z_s / tau_s)."""
    return -(p_t * F.log_softmax(z_s / tau_s, dim=-1)).sum(dim=-1).mean()


def row_normalised(membership: torch.Tensor) -> torch.Tensor:
    """Membership [K, A] (1/0) with each row divided by its sum; rows without attributes stay 0."""
    return membership / membership.sum(dim=1, keepdim=True).clamp(min=1.0)


def implied_attributes(p_c: torch.Tensor, membership_rn: torch.Tensor) -> torch.Tensor:
    """The attribute distribution a class distribution implies: normalise(p_c @ M_rownorm). [B, A].

    A class without attributes contributes nothing, and the rest is renormalised."""
    q = p_c @ membership_rn
    return q / q.sum(dim=-1, keepdim=True).clamp(min=TINY)


def attribute_alignment(z_s: torch.Tensor, a_s: torch.Tensor, membership_rn: torch.Tensor,
                        tau_s: float) -> torch.Tensor:
    """Concept alignment with attributes: mean over rows of KL(q_implied || q_direct), with
    q_implied = implied_attributes(softmax(z_s / tau_s)) and q_direct = softmax(a_s / tau_s).
    Both sides are the student's, so the gradient reaches the clip vector through both."""
    q_implied = implied_attributes(F.softmax(z_s / tau_s, dim=-1), membership_rn)
    log_direct = F.log_softmax(a_s / tau_s, dim=-1)
    return (q_implied * (torch.log(q_implied.clamp(min=TINY)) - log_direct)).sum(dim=-1).mean()


def clip_alignment(z_s: torch.Tensor, z_clip: torch.Tensor, tau_s: float) -> torch.Tensor:
    """The fallback without attributes: mean over rows of KL(p_clip || p_s), p_clip =
    softmax(z_clip / tau_s) of the frozen CLIP clip vector (a constant), p_s = softmax(z_s / tau_s)."""
    log_clip = F.log_softmax(z_clip.detach() / tau_s, dim=-1)
    return (log_clip.exp() * (log_clip - F.log_softmax(z_s / tau_s, dim=-1))).sum(dim=-1).mean()


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum p log p (nats)."""
    return -(p * torch.log(p.clamp(min=TINY))).sum(dim=-1).mean()


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [B, ...] over the batch of every rank (the local batch without a process group).
    Every rank holds the same number of rows (the loop's batches are equal), so the mean of the
    per-rank means is the global mean."""
    mean = x.mean(dim=0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(mean)
        mean = mean / dist.get_world_size()
    return mean


def updated_center(center: torch.Tensor, z_t: torch.Tensor, center_momentum: float) -> torch.Tensor:
    """DINO's centering update: m_c center + (1 - m_c) mean_b(z_t) (the raw teacher logits)."""
    return center * center_momentum + batch_mean(z_t.detach()) * (1.0 - center_momentum)
