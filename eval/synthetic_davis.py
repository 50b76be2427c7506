"""A synthetic DAVIS-2017 tree in the real layout, for tests and the demo (no dataset download).

JPEGImages/480p/<seq>/00000.jpg, Annotations/480p/<seq>/00000.png (indexed, DAVIS palette) and
ImageSets/2017/<split>.txt, from ``cosettle.pipeline.synthetic.moving_scene``.
"""
from __future__ import annotations

from pathlib import Path

from cosettle.pipeline.synthetic import moving_scene, write_frame_folder

from .palette import save_indexed_png


def write_davis_tree(
    root: Path,
    sequences: int = 2,
    frames: int = 8,
    size: tuple[int, int] = (96, 160),
    objects: int = 2,
    seed: int = 0,
    split: str = "val",
) -> list[str]:
    """Write ``sequences`` moving-object sequences under ``root``; returns their names."""
    root = Path(root)
    names = [f"synthetic-{seed + i:03d}" for i in range(sequences)]
    for i, name in enumerate(names):
        video, masks = moving_scene(frames, size[0], size[1], objects, seed=seed + i)
        write_frame_folder(root / "JPEGImages" / "480p" / name, video)
        ann = root / "Annotations" / "480p" / name
        ann.mkdir(parents=True, exist_ok=True)
        for t, mask in enumerate(masks):
            save_indexed_png(ann / f"{t:05d}.png", mask)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return names
