"""The temporal head's input modes (``head_input``): the transforms against hand computations, what
each one can and cannot see, and the objectives' option reaching their heads."""
import numpy as np
import pytest
import torch

from cosettle.trainer.objective import get_objective
from cosettle.trainer.projection import ProjectionError
from cosettle.trainer.temporal_head import HEAD_INPUTS, TemporalHead, head_input

D, T, BLOCKS = 8, 5, [2, 4]
L = len(BLOCKS)

pytestmark = pytest.mark.torch_threads(1)


def by_hand(x: np.ndarray, mode: str) -> np.ndarray:
    """[B, T, D] -> the mode's input, frame by frame with loops."""
    b, t, d = x.shape
    out = np.zeros((b, t, 2 * d if mode == "tokens+diff" else d))
    for i in range(b):
        for s in range(t):
            mean = sum(x[i, u] for u in range(t)) / t
            diff = x[i, s] - x[i, s - 1] if s else np.zeros(d)
            out[i, s] = {"tokens": x[i, s], "centred": x[i, s] - mean, "diff": diff,
                         "tokens+diff": np.concatenate([x[i, s], diff])}[mode]
    return out


@pytest.mark.parametrize("mode", HEAD_INPUTS)
def test_head_input_matches_a_loop(mode):
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.testing.assert_allclose(head_input(x, mode).numpy(), by_hand(x.numpy(), mode), atol=1e-12)


@pytest.mark.parametrize("mode", ["centred", "diff"])
def test_a_head_on_changes_is_the_tokens_head_on_the_changes(mode):
    x = torch.randn(4, T, L, D, generator=torch.Generator().manual_seed(1))
    head, plain = TemporalHead(D, T, BLOCKS, width=16, seed=2, inputs=mode), TemporalHead(D, T, BLOCKS, width=16, seed=2)
    changes = torch.stack([head_input(x[:, :, i], mode) for i in range(L)], dim=2)
    torch.testing.assert_close(head(x), plain(changes))


def test_only_tokens_heads_see_what_every_frame_shares():
    g = torch.Generator().manual_seed(3)
    x, static = torch.randn(4, T, L, D, generator=g), 5 * torch.randn(4, 1, L, D, generator=g)
    for mode in HEAD_INPUTS:
        head = TemporalHead(D, T, BLOCKS, width=16, seed=0, inputs=mode)
        moved = (head(x + static) - head(x)).abs().max()
        assert (moved < 1e-5) == (mode in ("centred", "diff")), (mode, moved)
    # and the change itself still reaches a centred head: a frame moved alone moves its output
    head, y = TemporalHead(D, T, BLOCKS, width=16, seed=0, inputs="centred"), x.clone()
    y[:, 2] += 1.0
    assert (head(y) - head(x)).abs().max() > 1e-3


def test_tokens_and_diff_doubles_the_input_projection_and_bad_modes_are_refused():
    assert TemporalHead(D, T, BLOCKS, width=16, inputs="tokens+diff").levels[0].proj.in_features == 2 * D
    assert TemporalHead(D, T, BLOCKS, width=16).levels[0].proj.in_features == D
    with pytest.raises(ProjectionError, match="unknown input 'frames'"):
        TemporalHead(D, T, BLOCKS, width=16, inputs="frames")


@pytest.mark.parametrize("name", ["vthcl", "cstp"])
def test_objectives_build_their_head_with_head_input(name):
    spec = get_objective(name)
    assert spec.defaults()["head_input"] == "tokens" and spec.options["head_input"].problem("frames")
    settings = {"dim": D, "frames": T, "levels": BLOCKS, "plan": name}
    model = spec.build_model(settings, spec.defaults() | {"width": 16, "depth": 1, "head_input": "centred"}, 7)
    alone = TemporalHead(D, T, BLOCKS, width=16, depth=1, seed=7, inputs="centred")
    assert all(lv.inputs == "centred" for lv in model.head.levels)
    # the head both objectives start from is the seeded head alone (bench/synthetic_actions.py's control row)
    for k, v in alone.state_dict().items():
        assert torch.equal(model.head.state_dict()[k], v), k
