"""Optimiser parameter groups and the per-iteration learning-rate schedule (section 5)."""
from __future__ import annotations

import math

import torch
from torch import nn

BETAS = (0.9, 0.95)


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Peak learning rate: blr x effective batch / 256."""
    return blr * effective_batch / 256


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; biases and 1-D parameters (LayerNorm) get none."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (weight decay on weight matrices only), the release's betas."""
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=BETAS)


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Learning rate at fractional epoch ``epoch``: linear warm-up from 0, then half-cosine to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
