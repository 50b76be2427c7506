"""The lean cosettle_loss (hand-written backward passes) against the plain formulation it replaced:
equal values and gradients within 1e-5, on random tokens and on the edge cases the loss handles."""
import copy

import pytest
import torch
import torch.nn.functional as F

from cosettle.trainer.losses import cosettle_loss
from cosettle.trainer.projection import build_projection

pytestmark = pytest.mark.torch_threads(1)


def plain_loss(projection, a, b, a_asy, temp=0.03, lambda_reg=3.0, reg="kl", dtype=torch.float32):
    """COSETTLE_METHOD.md section 4 with stock torch ops and autograd (the formulation before the
    lean one), in ``dtype``."""
    x = torch.stack((a, b, a_asy), dim=1).to(dtype)
    z = F.normalize(projection(x), dim=-1)
    raw = F.normalize(x, dim=-1)
    bsz, _, tokens, dim = z.shape
    g = int(tokens ** 0.5)
    grid = z.reshape(-1, g, g, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, kernel_size=2, stride=2).flatten(2).transpose(1, 2).reshape(bsz, 3, -1, dim)
    t1 = torch.softmax(pooled[:, 0] @ pooled[:, 1].transpose(1, 2) / temp, dim=-1)
    t2 = torch.softmax(pooled[:, 1] @ pooled[:, 2].transpose(1, 2) / temp, dim=-1)
    c = t1 @ t2
    n = c.shape[-1]
    cycle = F.cross_entropy(torch.log(c + 1e-6).flatten(0, 1), torch.arange(n).repeat(bsz))
    if reg == "kl":
        reg_v = F.kl_div(F.log_softmax(z, dim=-1), F.softmax(raw, dim=-1), reduction="batchmean")
    else:
        reg_v = F.mse_loss(raw, z)
    return {"loss": cycle + lambda_reg * reg_v, "cycle": cycle, "reg": reg_v}


def values_and_grads(loss_fn, projection, tokens, **kw):
    projection.zero_grad(set_to_none=True)
    out = loss_fn(projection, *tokens, **kw)
    out["loss"].backward()
    return {k: out[k].detach().double() for k in ("loss", "cycle", "reg")}, \
        {name: p.grad.double() for name, p in projection.named_parameters()}


def assert_equal_within(got, expect, tol=1e-5):
    for k in expect:
        scale = max(1.0, float(expect[k].abs().max()))  # relative where a gradient is far above 1
        assert float((got[k] - expect[k]).abs().max()) <= tol * scale, (k, got[k], expect[k])


def tokens(bsz, grid, dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a, b, a_asy = (torch.randn(bsz, grid * grid, dim, generator=gen) for _ in range(3))
    b = 0.7 * a + 0.3 * b  # related frames: a walk far from uniform
    return [t.to(dtype) for t in (a, b, a_asy)]


CASES = {  # name: (batch, grid, dim, fusion, options, token dtype)
    "kl, 14x14 tokens": (2, 14, 48, "linear", {}, torch.float32),
    "mse": (3, 4, 16, "mlp2", {"reg": "mse"}, torch.float32),
    "fp16 tokens, mlp3": (2, 6, 32, "mlp3", {"temp": 0.1, "lambda_reg": 2.0}, torch.float16),
    "one sample, sharp walk": (1, 4, 24, "linear", {"temp": 0.005}, torch.float32),
}


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_the_plain_formulation(case):
    bsz, grid, dim, fusion, options, dtype = CASES[case]
    projection = build_projection(dim, fusion, seed=3)
    with torch.no_grad():  # away from the init (LN affine 1 / 0), so every parameter matters
        for p in projection.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = tokens(bsz, grid, dim, seed=bsz * grid, dtype=dtype)
    lean = values_and_grads(cosettle_loss, projection, x, **options)
    plain = values_and_grads(plain_loss, projection, x, **options)
    assert_equal_within(lean[0], plain[0])
    assert_equal_within(lean[1], plain[1])
    exact = values_and_grads(plain_loss, copy.deepcopy(projection).double(), x, dtype=torch.float64, **options)
    assert_equal_within(lean[0], exact[0])  # not only equal to the fp32 plain one: as close to fp64
    assert_equal_within(lean[1], exact[1])


@pytest.mark.parametrize("ln_bias", [0.0, 1e-14])
def test_tokens_under_the_normalisation_floor(ln_bias):
    """A zero token projects to the LayerNorm bias (zero linear bias: tanh(0) = 0, and LayerNorm of
    a constant row is its bias): exactly zero at init, or a vector of norm below F.normalize's
    1e-12 floor, where it divides by the floor. The gradient reaching the LayerNorm bias is then
    ~1e12 times larger; the lean backward must reproduce it."""
    projection = build_projection(16, "linear", seed=0)
    with torch.no_grad():
        projection[2].bias.copy_(ln_bias * torch.randn(16, generator=torch.Generator().manual_seed(7)))
    x = tokens(2, 4, 16, seed=5)
    for t in x:
        t[0, 3] = 0.0
    lean = values_and_grads(cosettle_loss, projection, x)
    plain = values_and_grads(plain_loss, projection, x)
    assert float(plain[1]["2.bias"].abs().max()) > 1e9  # the floor is really exercised
    assert_equal_within(lean[0], plain[0])
    assert_equal_within(lean[1], plain[1])
