"""Pictures of predictions for a person to look at: masks blended over frames, and contact sheets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cosettle.core.atomic import write_atomic
from cosettle.eval.frame.datasets import read_frame
from cosettle.eval.frame.palette import davis_palette, read_indexed_png


def overlay(frame: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3]: each object pixel (id > 0) blended with its palette colour, and each
    object's outline (object pixels with a 4-neighbour of another id) in full colour."""
    if frame.shape[:2] != ids.shape:
        raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]} but the mask {ids.shape[1]}x{ids.shape[0]}")
    colours = davis_palette()[ids].astype(np.float32)
    out = frame.astype(np.float32)
    inside = ids > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[inside]
    edge = np.zeros_like(inside)
    across, down = ids[:, :-1] != ids[:, 1:], ids[:-1] != ids[1:]
    edge[:, :-1] |= across
    edge[:, 1:] |= across
    edge[:-1] |= down
    edge[1:] |= down
    edge &= inside
    out[edge] = colours[edge]
    return np.round(out).astype(np.uint8)


def contact_sheet(images: list[np.ndarray], titles: list[str], columns: int = 5, width: int = 320) -> Image.Image:
    """A grid of thumbnails ``width`` px wide (aspect kept), each titled in its corner."""
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    height = round(width * images[0].shape[0] / images[0].shape[1])
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, title) in enumerate(zip(images, titles)):
        x, y = (i % columns) * width, (i // columns) * height
        sheet.paste(Image.fromarray(image).resize((width, height), Image.BILINEAR), (x, y))
        draw.text((x + 4, y + 2), title, fill="white", stroke_width=2, stroke_fill="black")
    return sheet


def save_overlays(frames: list[Path], predictions: list[Path], out_dir: Path, sheet: Path,
                  sheet_frames: int = 20) -> None:
    """Write ``out_dir/<stem>.png`` overlays of every predicted frame and a contact sheet of
    ``sheet_frames`` evenly spaced ones at ``sheet``."""
    if len(frames) != len(predictions):
        raise ValueError(f"{len(frames)} frames but {len(predictions)} predictions")
    out_dir.mkdir(parents=True, exist_ok=True)
    picked = set(np.linspace(0, len(frames) - 1, min(sheet_frames, len(frames))).round().astype(int).tolist())
    thumbs, titles = [], []
    for i, (frame_path, pred_path) in enumerate(zip(frames, predictions)):
        image = overlay(read_frame(frame_path), read_indexed_png(pred_path))
        write_atomic(out_dir / f"{frame_path.stem}.png", lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
        if i in picked:
            thumbs.append(image)
            titles.append(frame_path.stem)
    sheet.parent.mkdir(parents=True, exist_ok=True)
    picture = contact_sheet(thumbs, titles)
    write_atomic(sheet, lambda tmp: picture.save(tmp, format="PNG"))
