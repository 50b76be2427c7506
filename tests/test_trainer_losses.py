"""cosettle_loss and the projection against direct computations of COSETTLE_METHOD.md sections 1 and 4."""
import math

import pytest
import torch

from cosettle.trainer.losses import cosettle_loss
from cosettle.trainer.projection import build_projection

EPS = 1e-6


def direct_loss(z: torch.Tensor, raw: torch.Tensor, temp: float, lambda_reg: float, reg: str) -> dict:
    """Section 4 written out with loops, in float64. z = projected tokens, raw = cached tokens,
    both [B, 3, g*g, D] (frames A, B, A_asy), neither normalised yet."""
    z, raw = z.double(), raw.double()
    bsz, _, n_tok, dim = z.shape
    g = math.isqrt(n_tok)
    zn = z / z.norm(dim=-1, keepdim=True)
    fn = raw / raw.norm(dim=-1, keepdim=True)
    ce_terms, hits, c_all = [], 0, []
    for i in range(bsz):
        pooled = []
        for f in range(3):
            grid = zn[i, f].reshape(g, g, dim)
            nodes = [grid[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, dim).mean(0)
                     for r in range(g // 2) for c in range(g // 2)]
            pooled.append(torch.stack(nodes))
        za, zb, zs = pooled
        t1 = torch.exp(za @ zb.T / temp)
        t1 = t1 / t1.sum(1, keepdim=True)
        t2 = torch.exp(zb @ zs.T / temp)
        t2 = t2 / t2.sum(1, keepdim=True)
        c = torch.einsum("ij,jk->ik", t1, t2)
        c_all.append(c)
        n = c.shape[0]
        for r in range(n):
            row = c[r] + EPS  # cross-entropy of logits log(C + eps) against target r
            ce_terms.append(-torch.log(row[r] / row.sum()))
            hits += int(torch.argmax(c[r]).item() == r)
    cycle = torch.stack(ce_terms).mean()
    acc = hits / len(ce_terms)
    c_flat = torch.cat([c.flatten() for c in c_all])
    eye = torch.cat([torch.eye(c_all[0].shape[0], dtype=torch.float64).flatten()] * bsz)
    sim = (c_flat @ eye) / (c_flat.norm() * eye.norm())
    if reg == "kl":  # KL(softmax(F) || softmax(Z)) over channels, summed, divided by the batch size
        p = torch.softmax(fn, dim=-1)
        q = torch.softmax(zn, dim=-1)
        reg_v = (p * (p.log() - q.log())).sum() / bsz
    else:
        reg_v = ((fn - zn) ** 2).mean()
    return {"loss": cycle + lambda_reg * reg_v, "cycle": cycle, "reg": reg_v, "acc": acc, "sim_identity": sim}


@pytest.mark.parametrize("reg", ["kl", "mse"])
@pytest.mark.parametrize("grid", [4, 6])
def test_cosettle_loss_matches_direct_computation(reg, grid):
    torch.manual_seed(0)
    bsz, dim = 3, 16
    proj = build_projection(dim, "mlp2", seed=1)
    a, b, a_asy = (torch.randn(bsz, grid * grid, dim) for _ in range(3))
    b = 0.7 * a + 0.3 * b  # related frames, so the walk is far from uniform
    out = cosettle_loss(proj, a, b, a_asy, temp=0.1, lambda_reg=2.0, reg=reg)
    raw = torch.stack((a, b, a_asy), 1)
    with torch.no_grad():
        expect = direct_loss(proj(raw), raw, temp=0.1, lambda_reg=2.0, reg=reg)
    assert set(out) == {"loss", "cycle", "reg", "acc", "sim_identity"}
    for k in expect:
        assert float(out[k].detach()) == pytest.approx(float(expect[k]), rel=1e-4, abs=1e-6), k


def test_default_temperature_and_fp16_tokens():
    torch.manual_seed(1)
    proj = build_projection(32, "linear")
    a, b, a_asy = (torch.randn(2, 16, 32).half() for _ in range(3))
    out = cosettle_loss(proj, a, b, a_asy)  # temp 0.03, lambda 3, kl
    raw = torch.stack((a, b, a_asy), 1).float()
    with torch.no_grad():
        expect = direct_loss(proj(raw), raw, temp=0.03, lambda_reg=3.0, reg="kl")
    assert out["loss"].item() == pytest.approx(float(expect["loss"]), rel=1e-4)


def graph_leaves(t: torch.Tensor) -> set[int]:
    """ids of the tensors autograd would accumulate gradients into from ``t``."""
    seen, leaves, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("fusion", ["linear", "mlp2", "mlp3"])
def test_gradients_reach_only_the_projection(fusion):
    torch.manual_seed(2)
    proj = build_projection(16, fusion)
    a, b, a_asy = (torch.randn(2, 16, 16) for _ in range(3))
    out = cosettle_loss(proj, a, b, a_asy)
    assert graph_leaves(out["loss"]) == {id(p) for p in proj.parameters()}
    out["loss"].backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for k in ("acc", "sim_identity"):
        assert not out[k].requires_grad


def test_odd_or_non_square_grid_is_refused():
    proj = build_projection(8)
    for tokens in (9, 12):
        x = torch.randn(1, tokens, 8)
        with pytest.raises(ValueError, match="even side"):
            cosettle_loss(proj, x, x, x)


@pytest.mark.parametrize("fusion", ["linear", "mlp2", "mlp3"])
def test_projection_variants_and_init(fusion):
    dim = 24
    proj = build_projection(dim, fusion, seed=3)
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    norm = proj[-1]
    assert len(linears) == {"linear": 1, "mlp2": 2, "mlp3": 3}[fusion]
    bound = math.sqrt(6 / (2 * dim))  # Xavier-uniform for a dim x dim matrix
    for lin in linears:
        assert lin.weight.abs().max() <= bound and lin.weight.std() > bound / 3
        assert torch.equal(lin.bias, torch.zeros(dim))
    assert torch.equal(norm.weight, torch.ones(dim)) and torch.equal(norm.bias, torch.zeros(dim))
    for p in proj.parameters():  # perturb so the check below sees biases and LN affine at work
        p.data += 0.1 * torch.randn_like(p)
    x = torch.randn(5, dim)
    h = x
    for i, lin in enumerate(linears):
        h = h @ lin.weight.T + lin.bias
        if i < len(linears) - 1 or fusion == "linear":
            h = torch.tanh(h)
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    expect = (h - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    assert torch.allclose(proj(x), expect, atol=1e-5)
    again = build_projection(dim, fusion, seed=3)
    other = build_projection(dim, fusion, seed=4)
    assert torch.equal(again[0].weight, build_projection(dim, fusion, seed=3)[0].weight)
    assert not torch.equal(again[0].weight, other[0].weight)
