"""CSTP: spatio-temporal overlap-rate prediction (STOR) jointly with contrastive learning and
pace / rotation prediction, ported to cached clip features (store plan ``cstp``).

A batch holds two clips of each video, ``tokens`` [B, 2, T, L, D'], and ``labels`` [B, 6]:
temporal overlap (5 classes), spatial overlap (5), pace of clip 1 and clip 2 (4 classes of
PACE [1, 2, 4, 8]), rotation of clip 1 and clip 2 (4 classes of 0/90/180/270 degrees); -1 marks
a label the store does not define, which the cross-entropies ignore.

Model (:class:`CSTPModel`, every tensor in ``state_dict``):
- ``head``: the online temporal head; e = ``embed(tokens)`` = its per-level outputs concatenated,
  [B, L * width] (the representation evaluation reads, before every projection/pretext head).
- ``projector``: e -> 2 width -> 128 (LayerNorm + GELU); with BYOL ``predictor``: 128 -> 2 width
  -> 128, and ``head_target`` / ``projector_target``: EMA copies of head and projector
  (requires_grad False), moved inside every loss call under no_grad before the targets are
  computed: theta_t <- m theta_t + (1 - m) theta_o. No BatchNorm anywhere (DDP ranks would see
  different statistics); LayerNorm in the projector/predictor instead.
- pretext heads, each e-width MLP (in -> width -> classes, GELU): ``spatial`` and ``temporal``
  on the pair [e1, e2] (2 L width -> 5): an overlap rate is a relation between the two clips,
  which a linear map of the concatenation (W1 e1 + W2 e2) cannot express, hence the hidden layer;
  ``pace`` and ``rotation`` on each clip's e (L width -> 4), shared by both clips.

Loss (the release's weights w = 0.1, 1, 1, 1, 1 by default):
    total = w0 * C + w1 * CE(spatial) + w2 * CE(temporal) + w3 * (CE(pace_1) + CE(pace_2))
            + w4 * (CE(rot_1) + CE(rot_2))
with C, by ``contrastive``:
- ``byol``: C = mean_b [2 - 2 cos(p_1, sg(z'_2))] + mean_b [2 - 2 cos(p_2, sg(z'_1))]
  (p: online predictions, z': target projections; symmetrised by summing, as BYOL's L + L~);
- ``ntxent``: SimCLR's NT-Xent over the 2B projections of the local batch at ``temperature``:
  each projection's positive is the other clip of its video, the other 2B - 2 its negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..objective import Loss, ObjectiveSpec, Option, register
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
CONTRASTIVE = ("byol", "ntxent")
# label columns of a clip store's ``labels``
TEMPORAL, SPATIAL, PACE_1, PACE_2, ROT_1, ROT_2 = range(6)
OVERLAP_CLASSES, PACE_CLASSES, ROTATION_CLASSES = 5, 4, 4


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean normalised MSE ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z) over rows; no gradient reaches z."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: z1, z2 [B, P] the two clips' projections; mean over all 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = len(z1)
    sim = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))
    target = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(sim, target)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over the rows whose label is >= 0; 0 and 0 when there are none
    (the loss keeps the graph, so every head still gets a - zero - gradient under DDP)."""
    valid = labels >= 0
    count = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    acc = ((logits.argmax(dim=-1) == labels) & valid).sum() / count
    return (ce * valid).sum() / count, acc.float()


class CSTPModel(nn.Module):
    """Online head, projector (+ predictor and EMA target for BYOL) and the four pretext heads."""

    def __init__(self, dim: int, frames: int, blocks: list[int], width: int = 256, depth: int = 2,
                 contrastive: str = "byol", seed: int = 0, inputs: str = "tokens"):
        super().__init__()
        self.blocks, self.contrastive = list(blocks), contrastive
        self.head = TemporalHead(dim, frames, len(blocks), width, depth, seed=seed, inputs=inputs)
        e = self.head.out_dim
        gen = torch.Generator().manual_seed(seed + 1)
        self.projector = seeded_init_(mlp([e, 2 * width, PROJ_DIM], norm=True), gen)
        if contrastive == "byol":
            self.predictor = seeded_init_(mlp([PROJ_DIM, 2 * width, PROJ_DIM], norm=True), gen)
        self.spatial = seeded_init_(mlp([2 * e, width, OVERLAP_CLASSES]), gen)
        self.temporal = seeded_init_(mlp([2 * e, width, OVERLAP_CLASSES]), gen)
        self.pace = seeded_init_(mlp([e, width, PACE_CLASSES]), gen)
        self.rotation = seeded_init_(mlp([e, width, ROTATION_CLASSES]), gen)
        if contrastive == "byol":
            self.head_target = frozen_copy(self.head)
            self.projector_target = frozen_copy(self.projector)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything trainable in one pass (one DDP forward): ``z`` (and ``p``) [2, B, 128],
        ``spatial`` / ``temporal`` [B, 5], ``pace`` / ``rotation`` [2, B, 4]; index 0 = clip 1."""
        b = tokens.shape[0]
        e = self.head.embed(split_pair(tokens))  # [2B, E]: all first clips, then all second
        z = self.projector(e)
        pair = torch.cat([e[:b], e[b:]], dim=1)
        out = {"z": z.view(2, b, -1), "spatial": self.spatial(pair), "temporal": self.temporal(pair),
               "pace": self.pace(e).view(2, b, -1), "rotation": self.rotation(e).view(2, b, -1)}
        if self.contrastive == "byol":
            out["p"] = self.predictor(z).view(2, b, -1)
        return out

    @torch.no_grad()
    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """BYOL targets [2, B, 128]: both clips through the EMA head and projector."""
        z = self.projector_target(self.head_target.embed(split_pair(tokens)))
        return z.view(2, tokens.shape[0], -1)

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        momentum_update(self.head, self.head_target, momentum)
        momentum_update(self.projector, self.projector_target, momentum)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, L, D'] -> [B, L * width]: the online head's per-level outputs, concatenated."""
        return self.head.embed(tokens)


def _model(settings: dict, options: dict, seed: int) -> nn.Module:
    dim, frames, blocks = clip_settings(settings, "cstp", "cstp")
    return CSTPModel(dim, frames, blocks, options["width"], options["depth"], options["contrastive"], seed,
                     options["head_input"])


def _loss(options: dict) -> Loss:
    byol = options["contrastive"] == "byol"
    w = [options[k] for k in ("w_contrastive", "w_spatial", "w_temporal", "w_pace", "w_rotation")]

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inner = unwrap(model)
        tokens, labels = batch["tokens"], batch["labels"].long()  # a store may keep them narrower
        if byol:
            inner.momentum_update(options["momentum"])  # before the targets
        out = model(tokens)
        target = inner.targets(tokens) if byol else None
        with torch.autocast(tokens.device.type, enabled=False):  # the losses in fp32
            if byol:
                p, zt = out["p"].float(), target.float()
                contrastive = byol_loss(p[0], zt[1]) + byol_loss(p[1], zt[0])
            else:
                z = out["z"].float()
                contrastive = nt_xent(z[0], z[1], options["temperature"])
            ce_s, acc_s = masked_ce(out["spatial"], labels[:, SPATIAL])
            ce_t, acc_t = masked_ce(out["temporal"], labels[:, TEMPORAL])
            pace = [masked_ce(out["pace"][i], labels[:, c]) for i, c in enumerate((PACE_1, PACE_2))]
            rot = [masked_ce(out["rotation"][i], labels[:, c]) for i, c in enumerate((ROT_1, ROT_2))]
            ce_p, ce_r = pace[0][0] + pace[1][0], rot[0][0] + rot[1][0]
            total = w[0] * contrastive + w[1] * ce_s + w[2] * ce_t + w[3] * ce_p + w[4] * ce_r
        terms = {"contrastive": contrastive, "ce_spatial": ce_s, "ce_temporal": ce_t, "ce_pace": ce_p, "ce_rotation": ce_r}
        accs = {"acc_spatial": acc_s, "acc_temporal": acc_t, "acc_pace": (pace[0][1] + pace[1][1]) / 2,
                "acc_rotation": (rot[0][1] + rot[1][1]) / 2}
        return {"loss": total} | {k: v.detach() for k, v in terms.items()} | accs

    return loss


def _weight(what: str, default: float) -> Option:
    return Option(default, f"Weight of {what} in the total loss (the release's Kinetics script: {default:g}).",
                  check=lambda v: v >= 0, requirement="must be non-negative")


register(ObjectiveSpec(
    name="cstp",
    description="CSTP: spatial/temporal overlap, pace and rotation prediction plus BYOL (or NT-Xent) between two clips",
    build_model=_model,
    build_loss=_loss,
    layout="clips",
    plan="cstp",
    options={
        "contrastive": Option("byol", "Contrastive term between the two clips: BYOL (as the release) or NT-Xent.",
                              choices=CONTRASTIVE),
        "momentum": Option(0.99, "EMA momentum of BYOL's target head and projector (constant; BYOL's 0.996 "
                                 "schedule is for hundreds of epochs, a run here is 5).",
                           check=lambda v: 0 <= v <= 1, requirement="must lie in [0, 1]"),
        "temperature": Option(0.1, "NT-Xent softmax temperature (SimCLR's 0.1; only with --contrastive ntxent).",
                              check=lambda v: v > 0, requirement="must be positive"),
        "width": Option(256, "Temporal head width.", check=lambda v: v >= 4 and v % 4 == 0,
                        requirement="must be a positive multiple of 4 (the attention heads)"),
        "depth": Option(2, "Transformer layers per level in the temporal head.",
                        check=lambda v: v >= 1, requirement="must be at least 1"),
        "head_input": HEAD_INPUT_OPTION,
        "w_contrastive": _weight("the contrastive term", 0.1),
        "w_spatial": _weight("the spatial-overlap cross-entropy", 1.0),
        "w_temporal": _weight("the temporal-overlap cross-entropy", 1.0),
        "w_pace": _weight("the pace cross-entropies (both clips)", 1.0),
        "w_rotation": _weight("the rotation cross-entropies (both clips)", 1.0),
    },
))
