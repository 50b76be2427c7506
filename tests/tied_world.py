"""A synthetic action world whose classes are tied to their CLIP class prompts by a tiny CLIP itself.

For each class prompt, the class's look is the texture of a candidate pool whose frozen image
embedding prefers that prompt most: the largest margin of its cosine with the class's text
embedding over its best cosine with another class's (the classifier zero-shot evaluation builds,
``ClipText.class_embeddings``). Every video of the class shows that texture as its background,
blended with a random texture of its own (``MIX`` of the random one), under the class's moving
object (``cosettle.eval.video.synthetic``). So frozen zero-shot reads the class from the look,
weakly and noisily: above chance, not perfect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fake_clip import GRID, PATCH

from cosettle.eval.frame.analysis_report import clip_input
from cosettle.eval.video.synthetic import ACTION_CLASSES, write_action_world
from cosettle.pipeline.synthetic import texture
from cosettle.pipeline.text_tower import load_clip_text

SIZE = 64  # frame side of the world
POOL = 96  # candidate textures
MIX = 0.7  # weight of a video's own random texture in its background


def candidates(count: int, seed: int) -> np.ndarray:
    """[count, SIZE, SIZE, 3] uint8 smooth textures, from 1x1 (a plain colour) to 4x4 cells."""
    rng = np.random.default_rng(seed)
    return np.stack([texture(rng, SIZE, SIZE, cells=int(c)) for c in rng.integers(1, 5, size=count)])


@torch.no_grad()
def image_embeddings(release: Path, images: np.ndarray) -> torch.Tensor:
    """Unit frozen image embeddings [N, E] of uint8 images [N, H, W, 3], by the archive's own encode_image."""
    archive = torch.jit.load(str(release), map_location="cpu").eval()
    return F.normalize(archive.encode_image(clip_input(images, PATCH * GRID)).float(), dim=-1)


def tied_looks(release: Path, class_names: Sequence[str], pool: int = POOL, seed: int = 0) -> dict[str, np.ndarray]:
    """Per class, the candidate whose frozen embedding's margin for the class's prompt is largest
    (greedy in class order, each candidate used once)."""
    looks = candidates(pool, seed)
    scores = image_embeddings(release, looks) @ load_clip_text(release).class_embeddings(class_names).T  # [P, C]
    chosen: dict[str, np.ndarray] = {}
    used: set[int] = set()
    for k, name in enumerate(class_names):
        others = torch.cat([scores[:, :k], scores[:, k + 1:]], dim=1).max(dim=1).values
        best = next(p for p in (scores[:, k] - others).argsort(descending=True).tolist() if p not in used)
        used.add(best)
        chosen[name] = looks[best]
    return chosen


def write_tied_world(root: Path, release: Path, *, classes: int, train_per_class: int, test_per_class: int,
                     frames: int = 16, mix: float = MIX, seed: int = 0) -> dict:
    """``write_action_world`` with each class's background tied to its prompt (module docstring);
    the world's info gains ``looks`` (class -> its texture)."""
    looks = tied_looks(release, ACTION_CLASSES[:classes], seed=seed)

    def backdrop(name: str, rng: np.random.Generator) -> np.ndarray:
        own = texture(rng, SIZE, SIZE, cells=12)
        return np.round((1 - mix) * looks[name] + mix * own).astype(np.uint8)

    world = write_action_world(root, classes=classes, train_per_class=train_per_class, test_per_class=test_per_class,
                               frames=frames, height=SIZE, width=SIZE, seed=seed, backdrop=backdrop)
    return world | {"looks": looks}
