"""VTHCL (Yang et al., 2020): visual tempo consistency with hierarchical contrastive learning,
ported to cached clip features (store plan ``vthcl``: clip 0 slow, clip 1 fast, same start).

Model (:class:`VTHCLModel`, every tensor in ``state_dict`` and so in checkpoints):
- ``head``: the online :class:`~cosettle.trainer.temporal_head.TemporalHead`, [B, T, L, D'] ->
  [B, L, width]; ``projectors.l``: per level an MLP width -> width -> 128 (GELU).
- ``head_momentum``, ``projectors_momentum``: their EMA copies (requires_grad False), moved
  inside every loss call under no_grad *before* the keys are computed, as MoCo does:
  theta_k <- m theta_k + (1 - m) theta_q.
- ``queue`` [2, L, K, 128]: per level the last K momentum keys of slow clips (index 0) and of
  fast clips (index 1), L2-normalised; ``queue_ptr`` [1] (int64): the next row to write.
  Initialised with random unit vectors from the seed (as MoCo). Both are buffers, so a resumed
  run continues with exactly the queue it stopped with.
- ``embed(tokens [B, T, L, D']) -> [B, L * width]``: the online head's per-level outputs,
  concatenated, *before* the projection heads (the representation evaluation reads).

Loss, per level l with q = normalise(projector_l(head(x))_l) and k the same through the
momentum copies (no gradient):
    NCE(q, k+, Q) = -log( exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{n in Q} exp(q.n / tau)) )
the positive at logit index 0, the queue Q of the *other* tempo as negatives. The slow clip
queries the fast clip's key against the fast-key queue; with ``symmetric`` (default) the fast
clip also queries the slow clip's key against the slow-key queue and the level loss is the mean
of the two. One queue per tempo keeps positive and negatives of one tempo, so the tempo itself
can never single out the positive (with a shared queue it could). Total: sum_l w_l L_l with
``level_weights`` (default all 1: the paper sums the levels). After the loss, the keys of both
clips (all-gathered over ranks when torch.distributed is initialised, so every rank keeps the
same queue) are written into the queues, wrapping around.

Calling the loss is a training step: it moves the momentum copies and the queues.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..objective import Loss, ObjectiveSpec, Option, register
from ..projection import ProjectionError
from ..temporal_head import (
    HEAD_INPUT_OPTION,
    TemporalHead,
    clip_settings,
    frozen_copy,
    mlp,
    momentum_update,
    seeded_init_,
    split_pair,
    unwrap,
)

PROJ_DIM = 128


def parse_level_weights(value) -> list[float] | None:
    """``""`` -> None (equal weights); ``"1,0.5,0.5"`` (or a list of numbers) -> floats >= 0, not all 0.
    Raises ValueError otherwise."""
    if isinstance(value, str):
        if not value.strip():
            return None
        parts = [float(v) for v in value.split(",")]
    else:
        parts = [float(v) for v in value]
    if not parts or any(not (w >= 0) for w in parts) or not any(parts):
        raise ValueError(f"level weights must be non-negative numbers, not all zero: {value!r}")
    return parts


def _weights_ok(value) -> bool:
    try:
        parse_level_weights(value)
    except (TypeError, ValueError):
        return False
    return True


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE: q, k [B, P] and queue [K, P], all unit vectors. Logits [B, 1 + K] are
    (q.k, q.queue) / temperature with the positive at index 0. Returns (mean loss, top-1
    instance accuracy: the share of queries whose positive beats every negative)."""
    pos = (q * k).sum(dim=-1, keepdim=True)
    logits = torch.cat([pos, q @ queue.t()], dim=1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), (logits.argmax(dim=1) == 0).float().mean()


def gather(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank, concatenated along dim 0 in rank order (``x`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class VTHCLModel(nn.Module):
    """Online head + per-level projectors, their momentum copies, and the per-level key queues."""

    def __init__(self, dim: int, frames: int, blocks: list[int], width: int = 256, depth: int = 2,
                 queue: int = 4096, seed: int = 0, inputs: str = "tokens"):
        super().__init__()
        self.blocks = list(blocks)
        levels = len(self.blocks)
        self.head = TemporalHead(dim, frames, levels, width, depth, seed=seed, inputs=inputs)
        gen = torch.Generator().manual_seed(seed + 1)
        self.projectors = nn.ModuleList(seeded_init_(mlp([width, width, PROJ_DIM]), gen) for _ in range(levels))
        self.head_momentum = frozen_copy(self.head)
        self.projectors_momentum = frozen_copy(self.projectors)
        self.register_buffer("queue", F.normalize(torch.randn(2, levels, queue, PROJ_DIM, generator=gen), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def _project(head: nn.Module, projectors: nn.ModuleList, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 2, T, L, D'] -> un-normalised per-level projections [B, 2, L, 128]."""
        b = tokens.shape[0]
        h = head(split_pair(tokens))  # [2B, L, width]
        z = torch.stack([p(h[:, i]) for i, p in enumerate(projectors)], dim=1)
        return z.view(2, b, *z.shape[1:]).transpose(0, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Queries: both clips of every pair through the online head and projectors (one pass)."""
        return self._project(self.head, self.projectors, tokens)

    @torch.no_grad()
    def keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keys [B, 2, L, 128]: both clips through the momentum copies."""
        return self._project(self.head_momentum, self.projectors_momentum, tokens)

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        momentum_update(self.head, self.head_momentum, momentum)
        momentum_update(self.projectors, self.projectors_momentum, momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write unit keys [N, 2, L, 128] at ``queue_ptr``, wrapping around (only the last K if N > K)."""
        size, n = self.queue.shape[2], keys.shape[0]
        start = int(self.queue_ptr)
        if n > size:
            keys, start = keys[n - size:], start + n - size
        rows = (start + torch.arange(len(keys), device=self.queue.device)) % size
        self.queue[:, :, rows] = keys.permute(1, 2, 0, 3).to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, L, D'] -> [B, L * width]: the online head's per-level outputs, before the projectors."""
        return self.head.embed(tokens)


def _model(settings: dict, options: dict, seed: int) -> nn.Module:
    dim, frames, blocks = clip_settings(settings, "vthcl", "vthcl")
    weights = parse_level_weights(options["level_weights"])
    if weights is not None and len(weights) != len(blocks):
        raise ProjectionError(f"--level-weights: {len(weights)} weights for the store's {len(blocks)} levels "
                              f"(blocks {', '.join(map(str, blocks))})")
    return VTHCLModel(dim, frames, blocks, options["width"], options["depth"], options["queue"], seed,
                      options["head_input"])


def _loss(options: dict) -> Loss:
    temperature, momentum, symmetric = options["temperature"], options["momentum"], options["symmetric"]
    given = parse_level_weights(options["level_weights"])

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inner = unwrap(model)
        tokens = batch["tokens"]
        inner.momentum_update(momentum)  # before the keys, as MoCo
        q = model(tokens)
        k = inner.keys(tokens)
        weights = given or [1.0] * len(inner.blocks)
        out: dict[str, torch.Tensor] = {}
        with torch.autocast(tokens.device.type, enabled=False):  # logits / temperature in fp32
            q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
            queue = inner.queue.clone()  # enqueued below, in place; the logits keep this copy
            total = q.new_zeros(())
            for i, block in enumerate(inner.blocks):
                nce, acc = info_nce(q[:, 0, i], k[:, 1, i], queue[1, i], temperature)  # slow queries fast
                if symmetric:
                    nce_b, acc_b = info_nce(q[:, 1, i], k[:, 0, i], queue[0, i], temperature)  # fast queries slow
                    nce, acc = (nce + nce_b) / 2, (acc + acc_b) / 2
                total = total + weights[i] * nce
                out[f"nce_block{block}"], out[f"acc_block{block}"] = nce.detach(), acc
        inner.enqueue(gather(k))
        return {"loss": total} | out

    return loss


register(ObjectiveSpec(
    name="vthcl",
    description="VTHCL: slow/fast clips of one video as positives, MoCo InfoNCE per level, summed",
    build_model=_model,
    build_loss=_loss,
    layout="clips",
    plan="vthcl",
    options={
        "temperature": Option(0.07, "InfoNCE softmax temperature (MoCo's 0.07).",
                              check=lambda v: v > 0, requirement="must be positive"),
        "momentum": Option(0.99, "EMA momentum of the key head and projectors. Not MoCo's 0.999: a run is 5 "
                                 "short epochs (~2300 steps on Kinetics at batch 512), and 0.999 averages the "
                                 "keys over ~1000 steps, 0.99 over ~100.",
                           check=lambda v: 0 <= v <= 1, requirement="must lie in [0, 1]"),
        "queue": Option(4096, "Negatives per level (queue length). Not MoCo's 65536: the queue must stay "
                              "below the number of training clips, or a video's own older keys become its "
                              "negatives (UCF101 train split 1 has 9537 videos).",
                        check=lambda v: v >= 1, requirement="must be at least 1"),
        "width": Option(256, "Temporal head width.", check=lambda v: v >= 4 and v % 4 == 0,
                        requirement="must be a positive multiple of 4 (the attention heads)"),
        "depth": Option(2, "Transformer layers per level in the temporal head.",
                        check=lambda v: v >= 1, requirement="must be at least 1"),
        "level_weights": Option("", "Per-level loss weights as a comma list, one per store level "
                                    "(e.g. '1,1,2'); empty = all 1 (summed).",
                                check=_weights_ok, requirement="must be non-negative numbers, not all zero"),
        "head_input": HEAD_INPUT_OPTION,
        "symmetric": Option(True, "Also let the fast clip query the slow clip (mean of both directions)."),
    },
))
