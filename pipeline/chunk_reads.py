"""Rows of a Zarr array whose chunk files may be damaged: zarr reports the decode step that failed,
not the file, so the chunk that fails is found and named (stores and evaluation caches alike)."""
from __future__ import annotations

import numpy as np
import zarr

READ_ERRORS = (ValueError, RuntimeError, OSError)  # what zarr raises for a truncated or garbled chunk


class DamagedChunk(Exception):
    """A read failed; ``key`` is the chunk file's key within the array (None if no single chunk fails alone)."""

    def __init__(self, key: str | None, error: Exception):
        super().__init__(key)
        self.key, self.error = key, error


def read_rows(array: zarr.Array, lead: tuple[int, ...], lo: int, hi: int | None) -> np.ndarray:
    """``array[*lead, lo:hi]``; a chunk that cannot be read raises DamagedChunk naming it."""
    try:
        return array[(*lead, slice(lo, hi))]
    except READ_ERRORS as e:
        error = e
    axis, step = len(lead), array.chunks[len(lead)]
    for first in range(lo - lo % step, array.shape[axis] if hi is None else hi, step):  # find the chunk
        try:
            array[(*lead, slice(first, first + step))]
        except READ_ERRORS as e:
            coords = tuple(i // c for i, c in zip(lead, array.chunks)) + (first // step,) + (0,) * (array.ndim - axis - 1)
            raise DamagedChunk(array.metadata.encode_chunk_key(coords), e) from None
    raise DamagedChunk(None, error)
