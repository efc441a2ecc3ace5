"""Index helpers for ragged lists (prompts, completions) packed into padded 2-D arrays without a loop per row."""

from __future__ import annotations

import numpy as np


def ragged_index(lengths: np.ndarray, starts: np.ndarray | int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of every element when row i's `lengths[i]` elements go to columns starts[i], starts[i] + 1, ...

    Assigning `out[rows, cols] = concatenated_values` scatters the rows' values in one step.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, within + np.repeat(np.broadcast_to(np.asarray(starts, dtype=np.int64), lengths.shape), lengths)
