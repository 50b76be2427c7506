"""The DAVIS annotation palette and indexed-PNG reading and writing (label indices, not colours)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cosettle.core.atomic import write_atomic


def davis_palette() -> np.ndarray:
    """The 256 x 3 uint8 PASCAL VOC colour map used by DAVIS annotations.

    Index i spreads its bits over the channels: bit 3j goes to red, 3j+1 to green, 3j+2 to blue,
    each at bit position 7 - j, so 1 -> (128, 0, 0), 2 -> (0, 128, 0), 3 -> (128, 128, 0), ...
    """
    ids = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * j + channel)) & 1) << (7 - j)
    return colours.astype(np.uint8)


def save_indexed_png(path: Path, labels: np.ndarray) -> None:
    """Write a uint8 [H, W] label map as a palette ("P") PNG with the DAVIS palette."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"{path}: labels must be a uint8 [H, W] array, got {labels.dtype} {labels.shape}")
    image = Image.fromarray(labels)
    image.putpalette(davis_palette().tobytes())  # turns the "L" image into a "P" one
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))  # concurrent scorers read whole files


def read_indexed_png(path: Path) -> np.ndarray:
    """Read the label indices (uint8 [H, W]) of a "P" (palette) or "L" (grey) PNG."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(f"{path}: expected an indexed ('P') or grey ('L') PNG, found mode {image.mode!r}")
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
