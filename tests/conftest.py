"""Fixtures shared by several test modules: the synthetic UCF-style world of the video-level tests."""
from __future__ import annotations

import numpy as np
import pytest
from action_world import make_world, video_vectors


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def vectors(world, tmp_path_factory) -> dict[str, np.ndarray]:
    """Video vectors (cls pooling) of every video of the world, by name."""
    return video_vectors(world, tmp_path_factory.mktemp("indep"))
