"""The clip objectives (VTHCL, CSTP) and their temporal head: the losses against independent
computations, the momentum copies and queues, the pretext heads' use of labels, learning on
synthetic clips, and a run through the training loop on a synthetic clip store."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cosettle.trainer import synthetic
from cosettle.trainer.config import TrainConfig
from cosettle.trainer.objective import get_objective
from cosettle.trainer.objectives.cstp import byol_loss, masked_ce, nt_xent
from cosettle.trainer.objectives.vthcl import VTHCLModel, info_nce, parse_level_weights
from cosettle.trainer.projection import ProjectionError
from cosettle.trainer.schedule import param_groups
from cosettle.trainer.temporal_head import (
    TemporalHead,
    momentum_update,
    parameter_count,
)

D, T, BLOCKS = 16, 6, [4, 8, 12]
L = len(BLOCKS)


pytestmark = pytest.mark.torch_threads(1)


def settings(plan):
    return {"dim": D, "frames": T, "levels": BLOCKS, "plan": plan}


def build(name, **options):
    spec = get_objective(name)
    opts = spec.defaults() | {"width": 16, "depth": 1} | options
    return spec.build_model(settings(name), opts, 0), spec.build_loss(opts), opts


def batch(b=5, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.stack([torch.randint(0, n, (b,), generator=g) for n in (5, 5, 4, 4, 4, 4)], dim=1)
    return {"tokens": torch.randn(b, 2, T, L, D, generator=g), "labels": labels}


def unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- the losses against independent computations ----------------------------------------------

def test_info_nce_positive_at_index_zero_queue_as_negatives():
    rng = np.random.default_rng(0)
    q, k, queue, tau = unit(rng, 4, 8), unit(rng, 4, 8), unit(rng, 7, 8), 0.07
    k[2] = q[2]  # one query whose positive clearly wins
    losses, wins = [], []
    for i in range(4):
        logits = [float(q[i] @ k[i]) / tau] + [float(q[i] @ n) / tau for n in queue]
        top = max(logits)
        losses.append(-(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits))))
        wins.append(logits[0] >= max(logits[1:]))
    loss, acc = info_nce(*(torch.tensor(a) for a in (q, k, queue)), tau)
    assert loss.item() == pytest.approx(np.mean(losses), rel=1e-9)
    assert acc.item() == pytest.approx(np.mean(wins)) and wins[2]


def test_byol_loss_is_two_minus_two_cosine():
    rng = np.random.default_rng(1)
    p, z = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    cos = (p * z).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1)
    got = byol_loss(torch.tensor(p), torch.tensor(z)).item()
    assert got == pytest.approx(np.mean(2 - 2 * cos), rel=1e-9)
    pn, zn = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (p, z))
    assert got == pytest.approx(np.mean(((pn - zn) ** 2).sum(1)), rel=1e-9)  # the normalised MSE


def test_nt_xent_matches_a_loop():
    rng = np.random.default_rng(2)
    z1, z2, tau = rng.standard_normal((4, 6)), rng.standard_normal((4, 6)), 0.1
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n, total = len(z1), 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [math.exp(z[i] @ z[m] / tau) for m in range(2 * n) if m != i]
        total += -math.log(math.exp(z[i] @ z[j] / tau) / sum(others))
    got = nt_xent(torch.tensor(z1), torch.tensor(z2), tau).item()
    assert got == pytest.approx(total / (2 * n), rel=1e-9)


def test_vthcl_loss_wiring_directions_queues_and_level_weights():
    """Slow queries fast keys against the fast-key queue, and the reverse; levels weighted and summed."""
    model, _, opts = build("vthcl", queue=9, level_weights="1,0.5,2", momentum=0.9)
    loss_fn = get_objective("vthcl").build_loss(opts)
    x = batch(4)
    queue = model.queue.clone()
    out = loss_fn(model, x)  # moves the momentum copies first, so keys come from the moved copies
    with torch.no_grad():
        q = torch.nn.functional.normalize(model(x["tokens"]), dim=-1).double()
        k = torch.nn.functional.normalize(model.keys(x["tokens"]), dim=-1).double()
    expected = 0.0
    for i, (block, w) in enumerate(zip(BLOCKS, (1, 0.5, 2))):
        a, _ = info_nce(q[:, 0, i], k[:, 1, i], queue[1, i].double(), 0.07)
        b, _ = info_nce(q[:, 1, i], k[:, 0, i], queue[0, i].double(), 0.07)
        assert out[f"nce_block{block}"].item() == pytest.approx(((a + b) / 2).item(), rel=1e-4)
        expected += w * (a + b).item() / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert {f"acc_block{b}" for b in BLOCKS} <= set(out)


# -- momentum copies and queues ----------------------------------------------------------------

def test_momentum_update_rule_and_its_place_in_the_loss():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in target.parameters()]
    momentum_update(online, target, 0.9)
    for pt, p0, po in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(pt, 0.9 * p0 + 0.1 * po)

    for name in ("vthcl", "cstp"):
        model, loss_fn, _ = build(name, momentum=0.75)
        online = model.head
        target = model.head_momentum if name == "vthcl" else model.head_target
        with torch.no_grad():
            for p in online.parameters():
                p.add_(0.1)  # as an optimizer step would
        old = [p.clone() for p in target.parameters()]
        loss_fn(model, batch())
        for pt, p0, po in zip(target.parameters(), old, online.parameters()):
            assert torch.allclose(pt, 0.75 * p0 + 0.25 * po)


def test_queue_enqueue_wraps_around():
    model = VTHCLModel(D, T, BLOCKS, width=8, depth=1, queue=5)
    keys = [torch.full((n, 2, L, 128), float(v)) for n, v in ((3, 1), (3, 2))]
    model.enqueue(keys[0])
    assert int(model.queue_ptr) == 3
    model.enqueue(keys[1])
    assert int(model.queue_ptr) == 1
    assert model.queue[0, 0, :, 0].tolist() == [2, 1, 1, 2, 2] and model.queue[1, 2, :, 0].tolist() == [2, 1, 1, 2, 2]
    many = torch.arange(7.0)[:, None, None, None].expand(7, 2, L, 128)
    model.enqueue(many)  # more keys than rows: the last 5, in order from the pointer
    assert int(model.queue_ptr) == (1 + 7) % 5
    assert model.queue[1, 1, :, 0].tolist() == [4, 5, 6, 2, 3]  # as writing all 7 in turn


def test_loss_enqueues_the_batch_keys_after_using_the_old_queue():
    model, loss_fn, _ = build("vthcl", queue=8)
    x = batch(3)
    loss_fn(model, x)
    assert int(model.queue_ptr) == 3
    with torch.no_grad():
        k = torch.nn.functional.normalize(model.keys(x["tokens"]), dim=-1)  # the momentum copies did not move since
    assert torch.allclose(model.queue[:, :, :3], k.permute(1, 2, 0, 3), atol=1e-6)


# -- the CSTP heads and their labels ------------------------------------------------------------

def test_cstp_heads_read_their_own_label_columns():
    model, loss_fn, _ = build("cstp")
    x = batch(8)
    base = {k: v.item() for k, v in loss_fn(model, x).items()}
    columns = {0: "ce_temporal", 1: "ce_spatial", 2: "ce_pace", 3: "ce_pace", 4: "ce_rotation", 5: "ce_rotation"}
    terms = set(columns.values())
    for col, term in columns.items():
        labels = x["labels"].clone()
        labels[:, col] = (labels[:, col] + 1) % (5 if col < 2 else 4)  # every row gets another class
        out = {k: v.item() for k, v in loss_fn(model, x | {"labels": labels}).items()}
        assert out[term] != pytest.approx(base[term]), term
        for other in terms - {term}:
            assert out[other] == pytest.approx(base[other], rel=1e-5), (col, other)


def test_undefined_labels_are_ignored():
    logits = torch.randn(4, 5)
    labels = torch.tensor([2, -1, 0, -1])
    ce, acc = masked_ce(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert ce.item() == pytest.approx(ref.item(), rel=1e-6)
    assert acc.item() == (logits[[0, 2]].argmax(1) == labels[[0, 2]]).float().mean().item()
    none, _ = masked_ce(logits, torch.full((4,), -1))
    assert none.item() == 0.0


# -- what trains and what does not --------------------------------------------------------------

@pytest.mark.parametrize("name,options", [("vthcl", {}), ("vthcl", {"symmetric": False}),
                                          ("cstp", {}), ("cstp", {"contrastive": "ntxent"})])
def test_gradients_reach_only_trainable_parameters(name, options):
    model, loss_fn, _ = build(name, **options)
    loss_fn(model, batch())["loss"].backward()
    frozen = {n for n, _ in model.named_parameters() if "momentum" in n or "target" in n}
    assert bool(frozen) == (options.get("contrastive", "byol") == "byol" or name == "vthcl")
    for n, p in model.named_parameters():
        if n in frozen:
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
    optimised = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert optimised == {id(p) for n, p in model.named_parameters() if n not in frozen}


@pytest.mark.parametrize("name", ["vthcl", "cstp"])
def test_embed_and_state_round_trip(name, tmp_path):
    model, loss_fn, opts = build(name)
    x = torch.randn(3, T, L, D)
    e = model.embed(x)
    assert e.shape == (3, L * 16)
    assert torch.equal(e, model.head(x).flatten(1))
    loss_fn(model, batch())  # moves momentum copies (and the queue) away from their initial values
    state = model.state_dict()
    assert any("momentum" in k or "target" in k for k in state)
    if name == "vthcl":
        assert state["queue"].shape == (2, L, 4096, 128) and state["queue_ptr"].tolist() == [5]
    save_file(state, str(tmp_path / "w.safetensors"))
    fresh = get_objective(name).build_model(settings(name), opts, 1)
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_head_size_seed_and_shape_checks():
    head = TemporalHead(768, 16, 3, width=256, depth=2)
    w, r = 256, 2
    layer = 4 * w * w + 4 * w + 2 * r * w * w + (r + 1) * w + 4 * w
    assert parameter_count(head) == 3 * (768 * w + w + 16 * w + 2 * layer + 2 * w) == 3_767_040
    assert parameter_count(TemporalHead(768, 16, 1, width=128)) < 400_000
    torch.manual_seed(0)
    a = TemporalHead(D, T, BLOCKS, width=16, seed=3)
    torch.manual_seed(1)
    b, c = TemporalHead(D, T, BLOCKS, width=16, seed=3), TemporalHead(D, T, BLOCKS, width=16, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.levels[0].proj.weight, c.levels[0].proj.weight)
    with pytest.raises(ValueError, match=r"expects tokens \[B, 6, 3, 16\]"):
        a(torch.randn(2, T + 1, L, D))


def test_level_weights_and_store_checks():
    assert parse_level_weights("") is None and parse_level_weights("1, 0.5,2") == [1, 0.5, 2]
    for bad in ("1,-1", "0,0", "a,b"):
        with pytest.raises(ValueError):
            parse_level_weights(bad)
    with pytest.raises(ValueError, match="--level-weights"):
        TrainConfig.from_flat(features=("x",), out="o", objective="vthcl", level_weights="1,x").validate()
    spec = get_objective("vthcl")
    with pytest.raises(ProjectionError, match="2 weights for the store's 3 levels"):
        spec.build_model(settings("vthcl"), spec.defaults() | {"level_weights": "1,1"}, 0)
    with pytest.raises(ProjectionError, match="'cstp' plan"):
        get_objective("cstp").build_model(settings("vthcl"), get_objective("cstp").defaults(), 0)
    with pytest.raises(ProjectionError, match="clip stores"):
        spec.build_model({"dim": 16}, spec.defaults(), 0)
    assert spec.layout == get_objective("cstp").layout == "clips" and get_objective("cosettle").layout == "views"


# -- learning --------------------------------------------------------------------------------

def synthetic_pairs(b, g):
    """Clip pairs whose labels are learnable: pace = temporal frequency of a (cos, sin) pair of
    channels (random phase), rotation / overlaps = one-hot channels, under unit noise."""
    labels = torch.stack([torch.randint(0, n, (b,), generator=g) for n in (5, 5, 4, 4, 4, 4)], dim=1)
    x = 0.5 * torch.randn(b, 2, T, L, D, generator=g)
    t = torch.arange(T)
    for c in range(2):
        cycles = (labels[:, 2 + c].float() + 1) / 2  # 0.5, 1, 1.5, 2 cycles over the clip
        phase = 2 * math.pi * torch.rand(b, 1, generator=g)
        angle = 2 * math.pi * cycles[:, None] * t / T + phase
        x[:, c, :, :, 0] += 2 * torch.cos(angle)[:, :, None]
        x[:, c, :, :, 1] += 2 * torch.sin(angle)[:, :, None]
        x[torch.arange(b), c, :, :, 2 + labels[:, 4 + c]] += 2.0  # rotation: channels 2..5
    x[torch.arange(b), 0, :, :, 6 + labels[:, 0] % 3] += 2.0  # temporal overlap: channels 6..8 of clip 1
    x[torch.arange(b), 1, :, :, 9 + labels[:, 0] // 3] += 2.0  # and 9..10 of clip 2: needs the pair
    x[torch.arange(b), :, :, :, 11 + labels[:, 1]] += 1.5  # spatial overlap: channels 11..15 of both
    return {"tokens": x, "labels": labels}


def test_cstp_training_drives_the_head_accuracies_up():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model, loss_fn, _ = build("cstp", width=32)
    held_out = synthetic_pairs(256, torch.Generator().manual_seed(99))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-3)

    def accuracies():
        with torch.no_grad():
            out = loss_fn(model, held_out)
        return {k: v.item() for k, v in out.items() if k.startswith("acc_")}

    before = accuracies()
    for _ in range(200):
        out = loss_fn(model, synthetic_pairs(64, g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = accuracies()
    assert max(before.values()) < 0.5, before
    # one-hot labels are learnt outright; pace, a frequency over frames, needs the temporal
    # attention and climbs slower (0.7 at 200 steps over three data seeds; chance 0.25)
    assert all(after[k] > 0.9 for k in ("acc_spatial", "acc_temporal", "acc_rotation")), after
    assert after["acc_pace"] > 0.55 and after["acc_pace"] > before["acc_pace"] + 0.25, (before, after)


# -- through the training loop ------------------------------------------------------------------

write_clip_store = getattr(synthetic, "write_synthetic_clip_store", None)


@pytest.mark.skipif(write_clip_store is None, reason="awaits trainer.synthetic.write_synthetic_clip_store")
@pytest.mark.parametrize("objective", ["vthcl", "cstp"])
def test_train_end_to_end_and_resume_exactly(objective, tmp_path):
    from cosettle.trainer.train import train
    from cosettle.trainer.trained import load_trained

    store = tmp_path / "clips.zarr"
    write_clip_store(store, num_videos=24, plan=objective)
    base = {"objective": objective, "features": (str(store),), "epochs": 2, "batch_size": 4, "blr": 1.0,
            "device": "cpu", "shuffle_chunks": 2, "io_threads": 2, "width": 16, "depth": 1}
    base |= {"queue": 16} if objective == "vthcl" else {}
    summary = train(TrainConfig.from_flat(out=str(tmp_path / "full"), **base))
    assert summary is not None and math.isfinite(summary["final_epoch"]["loss"])
    assert train(TrainConfig.from_flat(out=str(tmp_path / "cut"), max_steps=3, **base)) is None
    train(TrainConfig.from_flat(out=str(tmp_path / "cut"), resume=True, **base))
    full = load_file(str(tmp_path / "full" / "projection.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "projection.safetensors"))
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)  # momentum copies and queues included
    model, config = load_trained(tmp_path / "full")
    s = config["stores"][0]["settings"]
    x = torch.randn(2, s["frames"], len(s["levels"]), s["dim"])
    assert model.embed(x).shape == (2, len(s["levels"]) * 16)


@pytest.mark.parametrize("name", ["vthcl", "cstp"])
def test_losses_run_in_fp32_under_autocast(name):
    """Training autocasts (fp16 on CUDA); CPU bf16 stands in: the loss terms stay fp32 and finite."""
    model, loss_fn, _ = build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(model, batch())
    out["loss"].backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    assert all(v.dtype in (torch.float32, torch.int64) for v in model.state_dict().values())
