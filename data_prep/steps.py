"""The global steps of ``lgmrec prep`` on integer codes: exact duplicates, k-core, first-appearance
re-indexing and the temporal split (docs/prep.md).

Plain numpy / pyarrow on the driver, a few bytes per row, no Ray: each step is a function of arrays and
can be tested on its own.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.synthetic import group_by_user, labels_by_rank

__all__ = ["duplicate_rows", "kcore_filter", "unify_dictionaries", "merge_dictionaries", "DictionaryMerger", "first_appearance",
           "temporal_split", "keyed_mmrec_split", "split_labels", "reference_steps", "mix64"]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 in, uint64 out)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def duplicate_rows(users: np.ndarray, items: np.ndarray, times: np.ndarray, num_items: int) -> np.ndarray:
    """Indices of rows that repeat an earlier row's exact (user, item, time); the first copy is kept.

    A 64-bit hash of each row is sorted to find candidate groups (O(n) extra memory, one sort); only the
    candidates are compared exactly, so hash collisions cannot drop a row.
    """
    n = len(users)
    if n < 2:
        return np.zeros(0, dtype=np.int64)
    key = users.astype(np.int64) * np.int64(num_items) + items.astype(np.int64)
    tbits = times.view(np.int64) if times.dtype == np.float64 else times.astype(np.int64, copy=False)
    with np.errstate(over="ignore"):
        h = mix64(key.view(np.uint64) ^ mix64(tbits.view(np.uint64)))
    hs = np.sort(h)
    rep = hs[1:][hs[1:] == hs[:-1]]                   # sorted hashes seen more than once
    del hs
    if len(rep) == 0:
        return np.zeros(0, dtype=np.int64)
    rep = rep[np.r_[True, rep[1:] != rep[:-1]]]
    # rows whose hash is in rep: a bit table on the low 24 bits prefilters, then an exact search
    bits = np.uint64((1 << 24) - 1)
    table = np.zeros(1 << 24, dtype=bool)
    table[(rep & bits).astype(np.int64)] = True
    cand = np.flatnonzero(table[(h & bits).astype(np.int64)])
    hc = h[cand]
    pos = np.minimum(np.searchsorted(rep, hc), len(rep) - 1)
    cand = cand[rep[pos] == hc]
    del h, hc, pos, table
    k, t = key[cand], tbits[cand]
    order = np.lexsort((cand, t, k))                  # by key, time, then row: first copy first
    k, t, c = k[order], t[order], cand[order]
    same = np.zeros(len(c), dtype=bool)
    same[1:] = (k[1:] == k[:-1]) & (t[1:] == t[:-1])
    return np.sort(c[same])


def kcore_filter(users: np.ndarray, items: np.ndarray, k: int, num_users: int, num_items: int):
    """Row indices surviving the iterative k-core (every user and item keeps >= k rows), and the rounds.

    Degrees count rows (as MMRec's ``value_counts``); a round removes every row whose user or item has
    fewer than k rows; rounds repeat until one removes nothing (the unique maximal k-core). ``rounds`` is
    the number of rounds that removed rows.
    """
    idx = np.arange(len(users), dtype=np.int64)
    rounds = 0
    if k <= 1:
        return idx, rounds
    u, i = users, items
    while len(idx):
        du = np.bincount(u, minlength=num_users)
        di = np.bincount(i, minlength=num_items)
        ok = (du[u] >= k) & (di[i] >= k)
        if ok.all():
            break
        idx, u, i = idx[ok], u[ok], i[ok]
        rounds += 1
    return idx, rounds


class DictionaryMerger:
    """Block dictionaries added in block order -> the distinct values in order of first appearance overall
    (``values``), and per block the global code of each of its entries. Holds one copy of the distinct
    values (plus the block being added), whatever the number of blocks."""

    def __init__(self):
        self.values = None

    def add(self, dictionary: pa.Array) -> np.ndarray:
        if self.values is None:
            self.values = pc.unique(dictionary)            # unique keeps the order of first appearance
        else:
            new = dictionary.filter(pc.is_null(pc.index_in(dictionary, value_set=self.values)))
            if len(new):
                self.values = pa.concat_arrays([self.values, pc.unique(new)])
        return pc.index_in(dictionary, value_set=self.values).to_numpy().astype(np.int64)


def merge_dictionaries(dictionaries: list[pa.Array]) -> tuple[pa.Array, list[np.ndarray]]:
    """Block dictionaries (each in its block's order of first appearance), in block order -> (distinct
    values in order of first appearance overall, per block: global code of each dictionary entry)."""
    merger = DictionaryMerger()
    remaps = [merger.add(d) for d in dictionaries]
    return (merger.values if merger.values is not None else pa.array([])), remaps


def unify_dictionaries(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Chunks dictionary-encoded separately -> (distinct values in order of first appearance, int64 codes).

    Each chunk's dictionary lists its values in the order they first occur in that chunk, so the
    distinct values of the concatenated dictionaries, in order, are in order of first appearance overall.
    """
    chunks = [c for c in col.chunks if len(c)]
    if not chunks:
        return pa.array([], type=col.type.value_type), np.zeros(0, dtype=np.int64)
    # one hash pass over all block dictionaries: the global dictionary and each entry's global code
    values, remaps = merge_dictionaries([c.dictionary for c in chunks])
    codes = np.concatenate([remap[c.indices.to_numpy()] for remap, c in zip(remaps, chunks)])
    return values, codes


def first_appearance(codes: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids in order of first appearance: (dense id per row, code of each dense id)."""
    uniq = pc.unique(pa.array(codes)).to_numpy()
    remap = np.full(num_codes, -1, dtype=np.int64)
    remap[uniq] = np.arange(len(uniq), dtype=np.int64)
    return remap[codes], uniq


def temporal_split(users: np.ndarray, times: np.ndarray, num_users: int) -> np.ndarray:
    """Per-user split by time with the MMRec counts (§2): oldest rows train, then valid, newest test.

    n < 10 -> n-2 / 1 / 1; otherwise h = ⌊0.2 n⌋ held out, h // 2 valid, the rest test. Equal
    timestamps keep the input order (the later row counts as newer).
    """
    users = np.asarray(users, dtype=np.int64)
    if len(users) == 0:
        return np.zeros(0, dtype=np.int8)
    # rows by (user, time, row): stable sort by time, then grouped by user keeping that order
    order = group_by_user(users, np.argsort(times, kind="stable"))
    return labels_by_rank(users, order, num_users)



def _row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random 64-bit key per input row (a function of the row's position in the log only)."""
    salt = mix64(np.array([int(seed) & (2**63 - 1)], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return mix64(np.asarray(rows, dtype=np.int64).view(np.uint64) ^ salt)


def keyed_mmrec_split(users: np.ndarray, rows: np.ndarray, num_users: int, seed: int) -> np.ndarray:
    """The MMRec per-user split (§2 counts, :func:`data_prep.synthetic.labels_by_rank`) with each user's
    rows in a seeded random order given by a key of the row's position ``rows`` in the input log.

    Unlike one ``permutation`` of all rows, a row's key needs nothing but its own position, so any subset
    of users (a Ray task's bucket) gets the labels it would get in the whole log. Ties (never in practice)
    keep the ``rows`` order.
    """
    users = np.asarray(users, dtype=np.int64)
    if len(users) == 0:
        return np.zeros(0, dtype=np.int8)
    order = group_by_user(users, np.argsort(_row_keys(rows, seed), kind="stable"))
    return labels_by_rank(users, order, num_users)


def split_labels(split: str, users: np.ndarray, rows: np.ndarray, times: np.ndarray, num_users: int,
                 seed: int) -> np.ndarray:
    """Per-user split labels (0 train, 1 valid, 2 test) of rows given in input-log order."""
    if split == "mmrec":
        return keyed_mmrec_split(users, rows, num_users, seed)
    return temporal_split(users, times, num_users)


def reference_steps(u_code: np.ndarray, i_code: np.ndarray, times: np.ndarray, num_user_codes: int,
                    num_item_codes: int, kcore: int, split: str, seed: int) -> dict:
    """Dedup, k-core, re-index and split over whole arrays in one process (rows in input-log order).

    The reference the Ray job of :mod:`data_prep.blocks` is tested against: same dropped rows, rounds,
    dense ids (``user_codes`` / ``item_codes``: the code of each dense id) and labels.
    """
    rows = np.arange(len(u_code), dtype=np.int64)
    dup = duplicate_rows(u_code, i_code, times, num_item_codes)
    keep = np.ones(len(u_code), dtype=bool)
    keep[dup] = False
    u_code, i_code, times, rows = u_code[keep], i_code[keep], times[keep], rows[keep]
    idx, rounds = kcore_filter(u_code, i_code, kcore, num_user_codes, num_item_codes)
    dropped_kcore = len(u_code) - len(idx)
    u_code, i_code, times, rows = u_code[idx], i_code[idx], times[idx], rows[idx]
    users, user_codes = first_appearance(u_code, num_user_codes)
    items, item_codes = first_appearance(i_code, num_item_codes)
    labels = split_labels(split, users, rows, times, len(user_codes), seed)
    return {"users": users, "items": items, "times": times, "rows": rows, "labels": labels,
            "user_codes": user_codes, "item_codes": item_codes, "duplicates": len(dup),
            "dropped_kcore": dropped_kcore, "rounds": rounds}
