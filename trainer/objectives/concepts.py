"""Language-tied concept spaces for CLIP video SSL (Ranasinghe et al., NeurIPS 2023), ported to cached
CLIP class tokens: a residual temporal head in CLIP's joint space, trained by self-distillation (an
EMA teacher, as DINO / SVT) over action concept vectors, plus concept alignment.

Store (plan ``vthcl``, checked at ``build_model``): ``clip_vitb`` frames pooled with ``--pooling cls``
at the last block only (``--levels 12``: the class token after ``ln_post``, D' = D), so
``x_t @ visual_proj`` is CLIP's image embedding. Clip 0 (slow: stride 8, long extent) is the GLOBAL view, clip 1 (fast: stride
2, short extent, same start) the LOCAL view. Any other backbone is refused: the concept vectors live
in CLIP's joint space, and BLIP's or image-only backbones' tokens have no map into it. The concepts
file must come from the store's checkpoint (same ``backbone`` and ``weights_sha256``) and from a
CLIP-family backbone, except files made for backbone ``synthetic`` (tests only), which pair with
synthetic stores (their pooling and family are then not checked).

Concepts file (``--concepts``, required; ``cosettle concepts``, read by
``cosettle.pipeline.concepts.load_concepts``): ``classes`` [K, E], ``attributes`` [A, E] (A may be
0), ``membership`` [K, A] (1/0), ``visual_proj`` [D, E]. Rows of classes and attributes are
L2-normalised again here (a no-op for a well-made file), so their products are cosines.

Model (:class:`ConceptsModel`; every tensor below is in ``state_dict``, so a run is self-contained):
- ``head``: a :class:`~cosettle.trainer.temporal_head.TemporalHead` over the frames [T, L=1, D] ->
  [width]; ``delta``: Linear(width -> E), weight and bias ZERO-initialised;
  f(x) = normalise(mean_t(x_t) @ visual_proj + delta(head(x))) (mean_t(x_t @ P) = mean_t(x_t) @ P),
  so the untrained model is frozen CLIP mean pooling: its zero-shot baseline at step 0. AdamW's weight
  decay on ``delta.weight`` pulls the model back towards that baseline.
- ``head_teacher``, ``delta_teacher``: EMA copies (requires_grad False), moved at every loss call,
  before the teacher runs, by theta_t <- m theta_t + (1 - m) theta_s.
- buffers ``visual_proj`` [D, E], ``classes`` [K, E], ``attributes`` [A, E], ``membership`` [K, A]
  (frozen, from the file), ``concepts_sha256`` [32] uint8 (``state_digest`` of those four as built,
  recorded with them), ``center`` [K] (DINO's center, zeros at start), ``step`` [1] int64 (loss
  calls so far). A finished run is self-contained: ``load_model`` rebuilds it from its own tensors,
  without the concepts file (which may since have moved, changed or gone), after checking that the
  four tensors still have their recorded digest; a copy altered after training is refused.
- ``embed(tokens [B, T, 1, D]) -> [B, E]``: the student's f, unit vectors in CLIP's joint space, so
  zero-shot with class-name text embeddings applies (``joint_space = True`` says so to evaluation).

Loss, with z = f @ classes^T (cosines) [B, K], per call:
    m = teacher_momentum(step): DINO's cosine from ``momentum`` (0.996) to 1 over ``schedule_steps``
        calls (0 = constant ``momentum``); EMA step of the teacher with m
    p_t = softmax((z_t(global) - center) / tau_t)                   (teacher, no gradient)
    distill = mean_b -sum_k p_t log softmax(z_s(local) / tau_s)
    align (A > 0) = mean over both student views v of mean_b KL(q_implied_v || q_direct_v),
        q_implied = normalise(softmax(z_s / tau_s) @ M_rownorm), q_direct = softmax(f_s @ attributes^T / tau_s)
    align (A = 0) = mean over v of mean_b KL(softmax(z_clip / tau_s) || softmax(z_s / tau_s)),
        z_clip the logits of frozen CLIP mean pooling of the same view (constant)
    loss = w_distill * distill + w_align * align     (a weight 0 leaves its term out; it is still logged)
    center <- m_c center + (1 - m_c) mean_b z_t(global) (all ranks); step <- step + 1
Logged: ``distill``, ``align``, ``teacher_entropy`` (of p_t, nats), ``acc_agree`` (argmax p_t ==
argmax z_s(local)), ``momentum`` (m of this call). All of it in fp32 (autocast off; the head itself
may run under autocast).

Choices (the facts leave them open):
- Views. DINO / SVT distil every student view from every teacher view except the same view. With one
  global clip that leaves one pair, teacher(global) -> student(local): the short fast clip must
  predict the concepts of the long slow one. The (global, global) pair is left out: its teacher is an
  EMA of the same student on the same input, so it mostly teaches the student to sharpen its own
  prediction, the collapse-prone part DINO avoids. The student still sees the global clip in ``align``.
- Alignment direction. KL(q_implied || q_direct) rather than the reverse or a symmetric sum:
  q_implied, a mixture over each probable class's attributes, is the broad side; the forward KL is
  mode-covering, so the directly read attributes must give mass to every attribute the class belief
  implies (the relations are kept), where the reverse KL would let q_direct settle on one of them.
  Gradient reaches f through both sides; both are the student's own readings of one vector.
- Alignment without attributes (not in the facts): the method's claim is that concept training keeps
  CLIP's generality, so the student's concept distribution is held to frozen CLIP's (at tau_s) on the
  same clip: 0, with zero gradient, at step 0; a constraint, not a teacher.
- Step counter. The loss gets no step, so the model keeps one (``step``, checkpointed: a resumed run
  continues the schedule exactly) and the loss advances it. With ``--accum-iter n`` it counts
  micro-batches, and the EMA and center move once per micro-batch: set ``--schedule-steps`` to the
  run's total optimizer steps (config.json ``total_steps``) x ``accum_iter`` for DINO's schedule.
- No teacher-temperature warm-up (DINO warms 0.04 -> 0.07): cosines are bounded, and at 0.04 the
  target is already moderate; ``--teacher-temp`` sets it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cosettle.core.errors import first_line

from ..concept_terms import (
    attribute_alignment,
    clip_alignment,
    distillation,
    entropy,
    row_normalised,
    teacher_momentum,
    teacher_probs,
    updated_center,
)
from ..objective import Loss, ObjectiveSpec, Option, register
from ..projection import ProjectionError
from ..release_format import state_digest
from ..temporal_head import TemporalHead, clip_settings, frozen_copy, momentum_update, split_pair, unwrap

NAME = "concepts"
TEST_BACKBONE = "synthetic"  # concepts files for synthetic stores (tests only)
GLOBAL, LOCAL = 0, 1  # clip index in a vthcl pair: slow / long extent, fast / short extent
CONCEPTS = ("visual_proj", "classes", "attributes", "membership")  # the concepts file's tensors, as trained with
FROZEN = (*CONCEPTS, "center")  # sized by the concepts file
DIGEST = "concepts_sha256"


class ConceptsModel(nn.Module):
    """Residual temporal head in CLIP's joint space, its EMA teacher, the concept vectors and the center."""

    joint_space = True  # embed() returns CLIP joint-space vectors: zero-shot with text embeddings applies

    def __init__(self, dim: int, frames: int, visual_proj: torch.Tensor, classes: torch.Tensor,
                 attributes: torch.Tensor, membership: torch.Tensor, width: int = 256, depth: int = 2,
                 seed: int = 0):
        super().__init__()
        e = visual_proj.shape[1]
        self.head = TemporalHead(dim, frames, 1, width, depth, seed=seed)
        self.delta = nn.Linear(width, e)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)
        self.head_teacher = frozen_copy(self.head)
        self.delta_teacher = frozen_copy(self.delta)
        self.register_buffer("visual_proj", visual_proj.float().contiguous())
        self.register_buffer("classes", F.normalize(classes.float(), dim=-1).contiguous())
        self.register_buffer("attributes", F.normalize(attributes.float(), dim=-1).contiguous())
        self.register_buffer("membership", membership.float().contiguous())
        self.register_buffer(DIGEST, concepts_digest(self.state_dict()))
        self.register_buffer("center", torch.zeros(classes.shape[0]))
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))

    def _features(self, head: nn.Module, delta: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, 1, D] -> f [N, E]: normalise(mean_t(x_t) @ visual_proj + delta(head(x)))."""
        h = head(tokens)[:, 0]
        with torch.autocast(tokens.device.type, enabled=False):
            base = tokens[:, :, 0].float().mean(dim=1) @ self.visual_proj
            return F.normalize(base + delta(h.float()), dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Student vectors [2, B, E] of both clips of every pair (index 0 global, 1 local), one pass."""
        f = self._features(self.head, self.delta, split_pair(tokens))
        return f.view(2, tokens.shape[0], -1)

    @torch.no_grad()
    def teacher(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher vectors [B, E] of clips [B, T, 1, D]."""
        return self._features(self.head_teacher, self.delta_teacher, tokens)

    @torch.no_grad()
    def frozen_clip(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP mean pooling [N, E] of clips [N, T, 1, D]: normalise(mean_t(x_t) @ visual_proj)."""
        with torch.autocast(tokens.device.type, enabled=False):
            return F.normalize(tokens[:, :, 0].float().mean(dim=1) @ self.visual_proj, dim=-1)

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        momentum_update(self.head, self.head_teacher, momentum)
        momentum_update(self.delta, self.delta_teacher, momentum)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, 1, D] -> [B, E]: the student's unit vectors in CLIP's joint space."""
        return self._features(self.head, self.delta, tokens)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a resumed run's own concept buffers win over the file's sizes (the file may have been re-made)
        for name in FROZEN:
            given = state_dict.get(prefix + name)
            if given is not None and given.shape != self._buffers[name].shape:
                self._buffers[name] = self._buffers[name].new_empty(given.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def concepts_digest(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 32 bytes of ``state_digest`` over the ``CONCEPTS`` tensors of a (model's) state dict."""
    return torch.tensor(list(bytes.fromhex(state_digest({k: state[k] for k in CONCEPTS}))), dtype=torch.uint8)


# -- the store and the concepts file -----------------------------------------------------------

def clip_backbones() -> tuple[str, ...]:
    """Backbones whose class token a CLIP visual_proj maps into a joint space with a loadable text
    tower (``cosettle.pipeline.text_tower.TEXT_BACKBONES``: clip_vitb)."""
    from cosettle.pipeline.text_tower import TEXT_BACKBONES

    return tuple(sorted(TEXT_BACKBONES))


def check_store(settings: dict) -> tuple[int, int]:
    """(D', T) of a clip store the objective can train on; refuses others with a one-line reason."""
    dim, frames, blocks = clip_settings(settings, NAME, "vthcl")
    backbone = settings.get("backbone")
    if backbone == TEST_BACKBONE:
        return dim, frames
    if backbone not in clip_backbones():
        raise ProjectionError(f"objective '{NAME}': the store's backbone {backbone!r} has no concept space; the concept "
                              f"vectors live in CLIP's joint space, which only {', '.join(clip_backbones())} class tokens "
                              "reach (BLIP's and image-only backbones' have no map into it usable here)")
    if settings.get("pooling") != "cls":
        raise ProjectionError(f"objective '{NAME}': needs a store made with --pooling cls (CLIP's class token after "
                              f"ln_post, which visual_proj maps into the joint space); this one has "
                              f"{settings.get('pooling')!r}")
    depth = settings.get("depth", blocks[-1])
    if blocks != [depth]:
        raise ProjectionError(f"objective '{NAME}': needs a store of the last block only (--levels {depth}; only the "
                              f"final class token is in the joint space); this one has levels {blocks}")
    return dim, frames


def read_concepts(path: str, settings: dict):
    """The concepts file at ``path`` (``cosettle.pipeline.concepts.load_concepts``), checked against
    the store's backbone and weights."""
    if not path:
        raise ProjectionError(f"objective '{NAME}': --concepts is required: the concepts file made by "
                              "`cosettle concepts` from the store's CLIP checkpoint")
    if not Path(path).is_file():
        raise ProjectionError(f"--concepts {path}: no such file (make it with `cosettle concepts`)")
    from cosettle.pipeline.concepts import load_concepts, require_concepts_for

    try:
        concepts = load_concepts(Path(path))
    except Exception as e:  # ConceptError: one line naming the file
        raise ProjectionError(f"--concepts: {first_line(e)}") from None
    made = (concepts.meta.get("backbone"), concepts.meta.get("weights_sha256"))
    store = (settings.get("backbone"), settings.get("weights_sha256"))
    if made[0] not in (*clip_backbones(), TEST_BACKBONE):
        raise ProjectionError(f"--concepts {path}: made from backbone {made[0]!r}, not a CLIP model "
                              f"({', '.join(clip_backbones())}): there is no joint space to tie concepts to")
    if made != store:
        raise ProjectionError(f"--concepts {path}: made from {made[0]} weights {str(made[1])[:12]}, but the store "
                              f"holds {store[0]} weights {str(store[1])[:12]}: concept and frame vectors must "
                              "come from one checkpoint")
    if made[0] != TEST_BACKBONE:  # the reader's own rule (text tower, weights), for real checkpoints
        try:
            require_concepts_for(concepts, store[0], store[1])
        except Exception as e:  # ConceptError / TextTowerError: one line
            raise ProjectionError(f"--concepts: {first_line(e)}") from None
    return concepts


def check_shapes(path: str, dim: int, concepts) -> None:
    """The four tensors fit each other and the store's D'."""
    proj, classes, attrs, member = concepts.visual_proj, concepts.classes, concepts.attributes, concepts.membership
    e = proj.shape[-1]
    problems = [
        (proj.ndim == 2 and proj.shape[0] == dim, f"visual_proj {list(proj.shape)} does not map the store's D' = {dim}"),
        (classes.ndim == 2 and classes.shape[0] >= 2 and classes.shape[1] == e,
         f"classes {list(classes.shape)}: need [K >= 2, E = {e}]"),
        (attrs.ndim == 2 and attrs.shape[1] == e, f"attributes {list(attrs.shape)}: need [A, E = {e}]"),
        (tuple(member.shape) == (classes.shape[0], attrs.shape[0]),
         f"membership {list(member.shape)}: need [K, A] = {[classes.shape[0], attrs.shape[0]]}"),
        (attrs.shape[0] == 0 or bool(member.sum() > 0), "membership is all zero: no class has an attribute"),
    ]
    for ok, message in problems:
        if not ok:
            raise ProjectionError(f"--concepts {path}: {message}")


def _model(settings: dict, options: dict, seed: int) -> nn.Module:
    dim, frames = check_store(settings)
    if options["w_distill"] == 0 and options["w_align"] == 0:
        raise ProjectionError(f"objective '{NAME}': --w-distill and --w-align are both 0; nothing to train")
    concepts = read_concepts(options["concepts"], settings)
    check_shapes(options["concepts"], dim, concepts)
    return ConceptsModel(dim, frames, concepts.visual_proj, concepts.classes, concepts.attributes,
                         concepts.membership, options["width"], options["depth"], seed)


def _load(settings: dict, options: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A finished run's model from its own concept tensors (the concepts file is not read), refused
    when they are missing or no longer have the digest recorded with them."""
    dim, frames = check_store(settings)
    missing = [k for k in (*CONCEPTS, DIGEST) if k not in state]
    if missing:
        raise ProjectionError(f"no {', '.join(missing)}: not a concepts run, or one made before runs kept their "
                              "concept vectors; train it again")
    if not torch.equal(concepts_digest(state), state[DIGEST]):
        raise ProjectionError(f"its concept vectors ({', '.join(CONCEPTS)}) do not have the digest recorded with "
                              "them: altered after training; refusing them")
    return ConceptsModel(dim, frames, *(state[k] for k in CONCEPTS), options["width"], options["depth"])


def _loss(options: dict) -> Loss:
    tau_t, tau_s = options["teacher_temp"], options["student_temp"]
    w_distill, w_align = options["w_distill"], options["w_align"]

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inner = unwrap(model)
        tokens = batch["tokens"]
        momentum = teacher_momentum(int(inner.step), options["momentum"], options["schedule_steps"])
        inner.momentum_update(momentum)  # before the teacher runs
        f_s = model(tokens)  # [2, B, E]
        f_t = inner.teacher(tokens[:, GLOBAL])
        with torch.autocast(tokens.device.type, enabled=False):  # logits / temperatures in fp32
            f_s, f_t = f_s.float(), f_t.float()
            z_s, z_t = f_s @ inner.classes.t(), f_t @ inner.classes.t()  # [2, B, K], [B, K]
            p_t = teacher_probs(z_t, inner.center, tau_t)
            distill = distillation(p_t, z_s[LOCAL], tau_s)
            if inner.attributes.shape[0]:
                m_rn = row_normalised(inner.membership)
                align = sum(attribute_alignment(z_s[v], f_s[v] @ inner.attributes.t(), m_rn, tau_s)
                            for v in (GLOBAL, LOCAL)) / 2
            else:
                z_clip = (inner.frozen_clip(split_pair(tokens)) @ inner.classes.t()).view_as(z_s)
                align = sum(clip_alignment(z_s[v], z_clip[v], tau_s) for v in (GLOBAL, LOCAL)) / 2
            total = sum(w * term for w, term in ((w_distill, distill), (w_align, align)) if w)
            agree = (p_t.argmax(dim=-1) == z_s[LOCAL].argmax(dim=-1)).float().mean()
            out = {"loss": total, "distill": distill.detach(), "align": align.detach(),
                   "teacher_entropy": entropy(p_t), "acc_agree": agree, "momentum": z_t.new_tensor(momentum)}
        with torch.no_grad():
            inner.center.copy_(updated_center(inner.center, z_t, options["center_momentum"]))
            inner.step += 1
        return out

    return loss


def _positive(default: float, help: str) -> Option:
    return Option(default, help, check=lambda v: v > 0, requirement="must be positive")


def _weight(what: str) -> Option:
    return Option(1.0, f"Weight of {what} in the total loss (0 leaves it out; it is still logged).",
                  check=lambda v: v >= 0, requirement="must be non-negative")


register(ObjectiveSpec(
    name=NAME,
    description="Language-tied concepts: EMA self-distillation over CLIP text concept vectors (global -> local "
                "clip) plus concept alignment, a residual temporal head in CLIP's joint space",
    build_model=_model,
    build_loss=_loss,
    layout="clips",
    plan="vthcl",
    load_model=_load,
    options={
        "concepts": Option("", "Concepts file (safetensors) from `cosettle concepts` for the store's CLIP checkpoint "
                               "(required)."),
        "momentum": Option(0.996, "Teacher EMA momentum (DINO's 0.996); the start of the cosine schedule to 1 "
                                  "with --schedule-steps.",
                           check=lambda v: 0 <= v <= 1, requirement="must lie in [0, 1]"),
        "schedule_steps": Option(0, "Loss calls (optimizer steps x accum-iter) over which the teacher momentum "
                                    "rises to 1 on DINO's cosine; 0 keeps it constant.",
                                 check=lambda v: v >= 0, requirement="must be non-negative"),
        "teacher_temp": _positive(0.04, "Teacher softmax temperature over concept cosines (DINO's 0.04)."),
        "student_temp": _positive(0.1, "Student softmax temperature over concept cosines (DINO's 0.1); also "
                                       "the alignment's."),
        "center_momentum": Option(0.9, "Momentum of the teacher's center over concept logits (DINO's 0.9).",
                                  check=lambda v: 0 <= v < 1, requirement="must lie in [0, 1)"),
        "w_distill": _weight("concept distillation"),
        "w_align": _weight("concept alignment"),
        "width": Option(256, "Temporal head width.", check=lambda v: v >= 4 and v % 4 == 0,
                        requirement="must be a positive multiple of 4 (the attention heads)"),
        "depth": Option(2, "Transformer layers in the temporal head.",
                        check=lambda v: v >= 1, requirement="must be at least 1"),
    },
))
