"""Optimizer groups and the learning-rate schedule of COSETTLE_METHOD.md section 5."""
import math

import pytest
import torch

from cosettle.trainer.projection import build_projection
from cosettle.trainer.schedule import build_optimizer, lr_at, scaled_lr


def test_weight_decay_only_on_weight_matrices():
    proj = build_projection(8, "mlp3")
    opt = build_optimizer(proj, lr=1e-3, weight_decay=0.05)
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    matrices = {id(m.weight) for m in proj if isinstance(m, torch.nn.Linear)}
    others = {id(p) for p in proj.parameters()} - matrices
    assert groups == {0.05: matrices, 0.0: others}
    assert len(matrices) == 3 and len(others) == 5  # three biases, LayerNorm weight and bias
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def test_schedule_formula():
    peak = scaled_lr(1e-4, 512)
    assert peak == pytest.approx(2e-4)
    assert lr_at(0.0, peak, 0.0, 1, 5) == 0.0
    assert lr_at(0.25, peak, 0.0, 1, 5) == pytest.approx(0.25 * peak)
    assert lr_at(1.0, peak, 0.0, 1, 5) == pytest.approx(peak)
    assert lr_at(3.0, peak, 1e-6, 1, 5) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(5.0, peak, 1e-6, 1, 5) == pytest.approx(1e-6)
    assert lr_at(0.0, peak, 0.0, 0, 5) == pytest.approx(peak)  # no warm-up: the cosine starts at the peak
