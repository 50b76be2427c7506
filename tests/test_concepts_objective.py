"""The ``concepts`` objective (language-tied concept spaces for CLIP): each loss term's value and
gradient against independent computations, centering, the teacher's momentum schedule, the
zero-shot baseline at step 0, what trains, the store and concepts-file checks, and a run through the
training loop on a synthetic clip store that resumes exactly."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from cosettle.core.provenance import digest
from cosettle.trainer.concept_terms import (
    attribute_alignment,
    clip_alignment,
    distillation,
    implied_attributes,
    row_normalised,
    teacher_momentum,
    teacher_probs,
    updated_center,
)
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.objective import get_objective
from cosettle.trainer.projection import ProjectionError

D, T, E, K, A = 16, 4, 8, 5, 4
MEMBERSHIP = [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1], [0, 0, 0, 1]]
SYNTH = {"dim": D, "frames": T, "levels": [1], "depth": 1, "plan": "vthcl", "backbone": "synthetic",
         "weights_sha256": "random", "pooling": "mean"}


# -- concepts files in the format of cosettle.pipeline.concepts, written directly ----------------

pytestmark = pytest.mark.torch_threads(1)


def write_concepts(path, attributes=True, backbone="synthetic", weights="random", dim=D, k=K, seed=0):
    from cosettle.pipeline import concepts as c

    g = torch.Generator().manual_seed(seed)
    names = [f"action {i}" for i in range(k)]
    phrases = [f"attribute {j}" for j in range(A)]
    by_class = {n: [phrases[j] for j in range(A) if MEMBERSHIP[i][j]] if attributes else [] for i, n in enumerate(names)}
    vocab = c.vocabulary(names, by_class)
    a = len(vocab["attributes"])
    tensors = {
        "classes": torch.nn.functional.normalize(torch.randn(k, E, generator=g), dim=-1),
        "attributes": torch.nn.functional.normalize(torch.randn(a, E, generator=g), dim=-1),
        "membership": c.membership_matrix(vocab),
        "visual_proj": torch.randn(dim, E, generator=g) / math.sqrt(dim),
    }
    meta = {"format": c.FORMAT, "backbone": backbone, "weights": "w.pt", "weights_sha256": weights, **vocab,
            "vocabulary_sha256": digest(vocab)}
    save_file(tensors, str(path), metadata={c.METADATA_KEY: json.dumps(meta)})
    return path


def build(tmp_path, settings=SYNTH, attributes=True, **options):
    spec = get_objective("concepts")
    path = options.pop("concepts") if "concepts" in options else write_concepts(tmp_path / "concepts.safetensors", attributes)
    opts = spec.defaults() | {"width": 16, "depth": 1, "concepts": str(path)} | options
    return spec.build_model(settings, opts, 0), spec.build_loss(opts), opts


def pairs(b=6, seed=1):
    return {"tokens": torch.randn(b, 2, T, 1, D, generator=torch.Generator().manual_seed(seed))}


def unit_rows(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


# -- each term against a direct computation (value and gradient) --------------------------------

def test_distillation_value_and_gradient():
    z_s, z_t, center = unit_rows(3, K, seed=1).requires_grad_(), unit_rows(3, K, seed=2), unit_rows(K, seed=3) / 4
    tau_t, tau_s = 0.04, 0.1
    p_t = teacher_probs(z_t, center, tau_t)
    got = distillation(p_t, z_s, tau_s)
    want, grad = 0.0, torch.zeros(3, K, dtype=torch.float64)
    for b in range(3):
        t = [math.exp((z_t[b, k] - center[k]).item() / tau_t) for k in range(K)]
        s = [math.exp(z_s[b, k].item() / tau_s) for k in range(K)]
        pt, ps = [v / sum(t) for v in t], [v / sum(s) for v in s]
        want -= sum(pt[k] * math.log(ps[k]) for k in range(K)) / 3
        grad[b] = (torch.tensor(ps) - torch.tensor(pt)) / (tau_s * 3)  # d CE / d z_s, by hand
    assert got.item() == pytest.approx(want, rel=1e-10)
    (g,) = torch.autograd.grad(got, z_s)
    assert torch.allclose(g, grad, atol=1e-10)
    assert torch.allclose(p_t.sum(-1), torch.ones(3, dtype=torch.float64))


def _kl_by_hand(q, log_p):
    return sum(q[i] * (math.log(q[i]) - log_p[i]) for i in range(len(q)) if q[i] > 0)


def test_attribute_alignment_value_and_gradient():
    z_s, a_s = unit_rows(3, K, seed=4).requires_grad_(), unit_rows(3, A, seed=5).requires_grad_()
    m = torch.tensor(MEMBERSHIP, dtype=torch.float64)
    tau = 0.1
    got = attribute_alignment(z_s, a_s, row_normalised(m), tau)

    def direct(z, a):  # written out with exp / sum, independently of the module's functions
        total = 0.0
        for b in range(3):
            pc = torch.exp(z[b] / tau) / torch.exp(z[b] / tau).sum()
            implied = sum(pc[k] * m[k] / m[k].sum() for k in range(K))
            implied = implied / implied.sum()
            direct_q = torch.exp(a[b] / tau) / torch.exp(a[b] / tau).sum()
            total = total + (implied * (implied.log() - direct_q.log())).sum() / 3
        return total

    want = direct(z_s, a_s)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for mine, theirs in zip(torch.autograd.grad(got, (z_s, a_s)), torch.autograd.grad(want, (z_s, a_s))):
        assert torch.allclose(mine, theirs, atol=1e-10)
    # and the gradient is the true one (finite differences)
    assert torch.autograd.gradcheck(lambda z, a: attribute_alignment(z, a, row_normalised(m), tau), (z_s, a_s))
    # a class without attributes drops out of the implied distribution
    q = implied_attributes(torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.5]], dtype=torch.float64),
                           row_normalised(torch.tensor(MEMBERSHIP[:4] + [[0, 0, 0, 0]], dtype=torch.float64)))
    assert torch.allclose(q, torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64))


def test_clip_alignment_value_gradient_and_zero_at_clip():
    z_s, z_clip, tau = unit_rows(4, K, seed=6).requires_grad_(), unit_rows(4, K, seed=7), 0.1
    got = clip_alignment(z_s, z_clip, tau)
    want, grad = 0.0, torch.zeros(4, K, dtype=torch.float64)
    for b in range(4):
        pc = [math.exp(z_clip[b, k].item() / tau) for k in range(K)]
        ps = [math.exp(z_s[b, k].item() / tau) for k in range(K)]
        pc, ps = [v / sum(pc) for v in pc], [v / sum(ps) for v in ps]
        want += _kl_by_hand(pc, [math.log(v) for v in ps]) / 4
        grad[b] = (torch.tensor(ps) - torch.tensor(pc)) / (tau * 4)
    assert got.item() == pytest.approx(want, rel=1e-10)
    (g,) = torch.autograd.grad(got, z_s)
    assert torch.allclose(g, grad, atol=1e-10)
    same = z_clip.clone().requires_grad_()
    zero = clip_alignment(same, z_clip, tau)
    assert abs(zero.item()) < 1e-12 and torch.autograd.grad(zero, same)[0].abs().max() < 1e-12


def test_centering_update_and_momentum_schedule():
    center, z_t = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([[0.2, 0.4, 0.6], [0.0, 0.2, 0.4]])
    assert torch.allclose(updated_center(center, z_t, 0.9), torch.tensor([0.91, 0.03, -0.85]))
    # DINO's cosine from the base to 1 over S calls, held at 1; S = 0 is constant
    assert teacher_momentum(0, 0.996, 100) == pytest.approx(0.996)
    assert teacher_momentum(25, 0.996, 100) == pytest.approx(1 - 0.004 * (1 + math.sqrt(0.5)) / 2)
    assert teacher_momentum(50, 0.996, 100) == pytest.approx(0.998)
    assert teacher_momentum(100, 0.996, 100) == pytest.approx(1.0)
    assert teacher_momentum(250, 0.996, 100) == pytest.approx(1.0)
    assert teacher_momentum(250, 0.996, 0) == 0.996


# -- the model ----------------------------------------------------------------------------------

def test_step_zero_is_frozen_clip_mean_pooling(tmp_path):
    model, _, _ = build(tmp_path)
    assert model.joint_space is True
    x = torch.randn(3, T, 1, D)
    per_frame = torch.einsum("btd,de->bte", x[:, :, 0], model.visual_proj)  # x_t @ proj, then mean over t
    want = torch.nn.functional.normalize(per_frame.mean(dim=1), dim=-1)
    assert torch.allclose(model.embed(x), want, atol=1e-6)
    assert model.embed(x).shape == (3, E)


def test_loss_terms_of_the_model_at_step_zero(tmp_path):
    """Teacher = student = frozen CLIP at step 0: every logged term against a direct computation."""
    for attributes in (True, False):
        (tmp_path / str(attributes)).mkdir()
        model, loss_fn, opts = build(tmp_path / str(attributes), attributes=attributes)
        b = pairs()
        clip = torch.stack([model.embed(b["tokens"][:, v]) for v in (0, 1)]).detach()  # [2, B, E]
        z = clip @ model.classes.t()
        out = loss_fn(model, b)
        p_t = torch.softmax(z[0] / opts["teacher_temp"], dim=-1)
        log_s = torch.log_softmax(z[1] / opts["student_temp"], dim=-1)
        assert out["distill"].item() == pytest.approx(-(p_t * log_s).sum(-1).mean().item(), rel=1e-5)
        if attributes:
            m = torch.tensor(MEMBERSHIP, dtype=torch.float32)
            want = attribute_alignment(z[0], clip[0] @ model.attributes.t(), m / m.sum(1, keepdim=True), 0.1)
            want = (want + attribute_alignment(z[1], clip[1] @ model.attributes.t(), m / m.sum(1, keepdim=True), 0.1)) / 2
            assert out["align"].item() == pytest.approx(want.item(), rel=1e-5)
        else:
            assert abs(out["align"].item()) < 1e-6  # frozen CLIP is the student at step 0
        assert out["loss"].item() == pytest.approx(out["distill"].item() + out["align"].item(), rel=1e-6)
        assert out["teacher_entropy"].item() == pytest.approx(-(p_t * p_t.log()).sum(-1).mean().item(), rel=1e-5)
        assert out["acc_agree"].item() == pytest.approx((z[0].argmax(-1) == z[1].argmax(-1)).float().mean().item())
        assert torch.allclose(model.center, 0.1 * z[0].mean(0), atol=1e-6)
        assert int(model.step) == 1


def test_weights_switch_terms_off(tmp_path):
    model, loss_fn, _ = build(tmp_path, w_align=0.0)
    out = loss_fn(model, pairs())
    assert out["loss"].item() == pytest.approx(out["distill"].item()) and out["align"].item() > 0
    model, loss_fn, _ = build(tmp_path, w_distill=0.0, w_align=2.0)
    out = loss_fn(model, pairs())
    assert out["loss"].item() == pytest.approx(2 * out["align"].item())


def test_only_the_student_head_trains(tmp_path):
    model, loss_fn, _ = build(tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("head.", "delta.")) for n in trainable)
    assert {"visual_proj", "classes", "attributes", "membership", "center", "step"} <= set(dict(model.named_buffers()))
    loss_fn(model, pairs())["loss"].backward()
    assert model.delta.weight.grad.abs().sum() > 0  # the zero delta layer learns first ...
    with torch.no_grad():
        model.delta.weight.normal_(0, 0.1)
    model.zero_grad()
    loss_fn(model, pairs(seed=2))["loss"].backward()
    assert any(p.grad.abs().sum() > 0 for p in model.head.parameters())  # ... then the head too
    for name, p in model.named_parameters():
        if name.startswith(("head_teacher.", "delta_teacher.")):
            assert p.grad is None and not p.requires_grad


def test_teacher_moves_by_the_scheduled_momentum(tmp_path):
    model, loss_fn, opts = build(tmp_path, schedule_steps=10)
    with torch.no_grad():
        model.delta.weight.normal_(0, 0.1)
        model.step.fill_(5)
    before = model.delta_teacher.weight.clone()
    loss_fn(model, pairs())
    m = teacher_momentum(5, opts["momentum"], 10)
    assert torch.allclose(model.delta_teacher.weight, m * before + (1 - m) * model.delta.weight, atol=1e-7)
    assert int(model.step) == 6


def test_losses_run_in_fp32_under_autocast(tmp_path):
    model, loss_fn, _ = build(tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(model, pairs())
    out["loss"].backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_saved_concept_buffers_win_over_the_file(tmp_path):
    model, _, _ = build(tmp_path)
    small = write_concepts(tmp_path / "small.safetensors", k=3, seed=4)
    other, _, _ = build(tmp_path, concepts=small)
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(other.classes, model.classes) and other.center.shape == (K,)


# -- what the objective refuses -----------------------------------------------------------------

CLIP_STORE = SYNTH | {"backbone": "clip_vitb", "weights_sha256": "abc", "pooling": "cls", "levels": [12], "depth": 12}


@pytest.mark.parametrize("settings, file_kw, options, message", [
    (SYNTH, {}, {"concepts": ""}, "--concepts is required"),
    (SYNTH, {}, {"concepts": "nowhere.safetensors"}, "no such file"),
    (CLIP_STORE | {"backbone": "dino_vitb"}, {}, {}, "no concept space"),
    (CLIP_STORE | {"backbone": "blip_vitb"}, {}, {}, "BLIP"),
    (CLIP_STORE | {"pooling": "cls+mean"}, {}, {}, "--pooling cls"),
    (CLIP_STORE | {"levels": [4, 12]}, {}, {}, "last block only"),
    (CLIP_STORE, {"backbone": "clip_vitb", "weights": "other"}, {}, "one checkpoint"),
    (CLIP_STORE, {"backbone": "dino_vitb", "weights": "abc"}, {}, "not a CLIP model"),
    (CLIP_STORE, {"backbone": "clip_vitb", "weights": "abc", "dim": 12}, {}, "visual_proj"),
    (SYNTH | {"plan": "cstp"}, {}, {}, "'vthcl' plan"),
    (SYNTH, {}, {"w_distill": 0.0, "w_align": 0.0}, "nothing to train"),
])
def test_refusals(tmp_path, settings, file_kw, options, message):
    path = write_concepts(tmp_path / "c.safetensors", **file_kw)
    with pytest.raises(ProjectionError, match=message) as err:
        build(tmp_path, settings=settings, **({"concepts": str(path)} | options))
    assert "\n" not in str(err.value)


def test_clip_store_with_matching_concepts_builds(tmp_path):
    path = write_concepts(tmp_path / "c.safetensors", backbone="clip_vitb", weights="abc")
    model, _, _ = build(tmp_path, settings=CLIP_STORE, concepts=str(path))
    assert model.embed(torch.randn(2, T, 1, D)).shape == (2, E)


# -- through the training loop ------------------------------------------------------------------

@pytest.mark.parametrize("attributes", [True, False])
def test_train_end_to_end_and_resume_exactly(attributes, tmp_path):
    from cosettle.trainer.synthetic import write_synthetic_clip_store
    from cosettle.trainer.train import train
    from cosettle.trainer.trained import load_trained

    store = tmp_path / "clips.zarr"
    write_synthetic_clip_store(store, num_videos=16, plan="vthcl", dim=D, levels=1, frames=T)
    concepts = write_concepts(tmp_path / "concepts.safetensors", attributes)
    base = {"objective": "concepts", "concepts": str(concepts), "features": (str(store),), "epochs": 2,
            "batch_size": 4, "blr": 1.0, "device": "cpu", "shuffle_chunks": 2, "io_threads": 2, "width": 16,
            "depth": 1, "schedule_steps": 8}
    summary = train(TrainConfig.from_flat(out=str(tmp_path / "full"), **base))
    assert summary is not None and math.isfinite(summary["final_epoch"]["loss"])
    assert train(TrainConfig.from_flat(out=str(tmp_path / "cut"), max_steps=3, **base)) is None
    train(TrainConfig.from_flat(out=str(tmp_path / "cut"), resume=True, **base))
    full = load_file(str(tmp_path / "full" / "projection.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "projection.safetensors"))
    assert full.keys() == cut.keys() and {"center", "step", "classes", "delta_teacher.weight"} <= full.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)  # teacher, center and step included
    assert int(full["step"]) == summary["steps"] and full["delta.weight"].abs().sum() > 0
    model, _ = load_trained(tmp_path / "full")
    assert model.joint_space and model.embed(torch.randn(2, T, 1, D)).shape == (2, E)


def test_a_run_is_self_contained_and_refuses_altered_concepts(tmp_path):
    from cosettle.trainer.run_dir import WEIGHTS_FILE, save_weights
    from cosettle.trainer.synthetic import write_synthetic_clip_store
    from cosettle.trainer.train import train
    from cosettle.trainer.trained import load_trained

    store, run = tmp_path / "clips.zarr", tmp_path / "run"
    write_synthetic_clip_store(store, num_videos=8, plan="vthcl", dim=D, levels=1, frames=T)
    concepts = write_concepts(tmp_path / "concepts.safetensors")
    train(TrainConfig.from_flat(objective="concepts", concepts=str(concepts), features=(str(store),), out=str(run),
                                epochs=1, batch_size=4, blr=1.0, device="cpu", shuffle_chunks=2, io_threads=1,
                                width=16, depth=1))
    tokens = torch.randn(3, T, 1, D, generator=torch.Generator().manual_seed(5))
    with_file, _ = load_trained(run)
    # the vocabulary file deleted, or re-made with other vectors at its path: the run loads its own
    for change in (lambda: write_concepts(concepts, seed=9), concepts.unlink):
        change()
        loaded, _ = load_trained(run)
        state, want = loaded.state_dict(), with_file.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
        assert torch.equal(loaded.embed(tokens), with_file.embed(tokens))

    # one class vector altered inside the run (the file otherwise intact): refused in one line
    weights = load_file(str(run / WEIGHTS_FILE))
    weights["classes"][0] = weights["classes"][1]
    save_weights(run / WEIGHTS_FILE, weights, {"objective": "concepts"})
    with pytest.raises(ProjectionError, match="do not have the digest recorded") as err:
        load_trained(run)
    assert "\n" not in str(err.value) and str(run / WEIGHTS_FILE) in str(err.value)
