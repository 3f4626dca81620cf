"""Sorted distinct integers, and the distinct (row, column) pairs of an interaction table as int64 keys
``row * num_cols + col``, by one sort.

numpy 2's ``np.unique`` hashes an integer array before sorting what it found; on millions of int64 keys
that measured about 100× slower than a sort here (7.4M random keys: 8.7 s against 0.09 s), and the
graph, the triple sampler and the evaluators each take the distinct pairs of every training interaction
at start-up. Same result as ``np.unique`` (sorted, each value once).
"""
from __future__ import annotations

import numpy as np


def distinct(a) -> np.ndarray:
    """``np.unique(a)`` for an integer array, by sort."""
    a = np.sort(np.asarray(a).ravel())
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def pair_keys(rows, cols, num_cols: int) -> np.ndarray:
    """The sorted distinct keys ``row * num_cols + col`` (int64) of the pairs (rows[k], cols[k])."""
    return distinct(np.asarray(rows, np.int64) * num_cols + np.asarray(cols, np.int64))
