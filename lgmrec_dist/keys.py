"""Sorted distinct integers, and the distinct (row, column) pairs of an interaction table as int64 keys
``row * num_cols + col``, by one sort.

numpy 2's ``np.unique`` hashes an integer array before sorting what it found; on millions of int64 keys
that measured about 100× slower than a sort here (7.4M random keys: 8.7 s against 0.09 s), and the
graph, the triple sampler and the evaluators each take the distinct pairs of every training interaction
at start-up. Same result as ``np.unique`` (sorted, each value once).
"""
from __future__ import annotations

import numpy as np


def run_starts(a_sorted: np.ndarray) -> np.ndarray:
    """Positions in a sorted array where each run of equal values starts."""
    if len(a_sorted) == 0:
        return np.zeros(0, np.int64)
    first = np.empty(len(a_sorted), dtype=bool)
    first[0] = True
    np.not_equal(a_sorted[1:], a_sorted[:-1], out=first[1:])
    return np.flatnonzero(first)


def distinct(a) -> np.ndarray:
    """``np.unique(a)`` for an integer array, by sort."""
    a = np.sort(np.asarray(a).ravel())
    return a[run_starts(a)]


def distinct_counts(a, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, return_counts=True)`` for an integer array, by sort; with ``weights``, each value's
    summed weights instead of its count."""
    a = np.asarray(a).ravel()
    order = np.argsort(a, kind="stable")
    a = a[order]
    starts = run_starts(a)
    if weights is None:
        return a[starts], np.diff(np.append(starts, len(a)))
    w = np.asarray(weights)[order]
    return a[starts], np.add.reduceat(w, starts) if len(a) else w


def pair_keys(rows, cols, num_cols: int) -> np.ndarray:
    """The sorted distinct keys ``row * num_cols + col`` (int64) of the pairs (rows[k], cols[k])."""
    return distinct(np.asarray(rows, np.int64) * num_cols + np.asarray(cols, np.int64))
