"""Fixtures shared by several test modules: the synthetic UCF-style world of the video-level tests."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from action_world import make_world, video_vectors


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def vectors(world, tmp_path_factory) -> dict[str, np.ndarray]:
    """Video vectors (cls pooling) of every video of the world, by name."""
    return video_vectors(world, tmp_path_factory.mktemp("indep"))


@pytest.fixture(autouse=True)
def torch_threads(request):
    """``pytestmark = pytest.mark.torch_threads(n)``: the module's tests run with n intra-op threads
    (tiny tensors: more threads only add synchronisation cost on a 2-core runner)."""
    marker = request.node.get_closest_marker("torch_threads")
    if marker is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(marker.args[0])
    yield
    torch.set_num_threads(threads)
