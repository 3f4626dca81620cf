"""``lgmrec prep`` stages 3-6 as Ray tasks over blocks of the log: dedup, k-core, re-index, split
(docs/prep.md, "Pipeline").

A block is a dict of numpy columns ``u``, ``i`` (codes, later dense ids), ``t`` (timestamp), ``r`` (the
row's position in the input log, which carries the log order through every shuffle) and, after the
split, ``s`` (label). Blocks stay in the Ray object store as refs; the driver only ever holds per-node
arrays (counts, first rows, id remaps) and per-block scalars:

* **encode**  one task merges the read blocks' dictionaries (:class:`data_prep.steps.DictionaryMerger`);
              the driver receives the global dictionaries (the id maps), each block its code remap;
* **dedup**   a hash shuffle on (user, item): every block is split into ``B`` buckets, one task per
              bucket drops the exact duplicates (:func:`data_prep.steps.duplicate_rows`, first copy kept);
* **k-core**  per round, tasks count per block, a tree of tasks adds the counts (:func:`reduce`), the
              driver receives the per-node totals, tasks filter;
* **re-index** tasks find each node's first row, reduced the same way; the driver orders nodes by it;
* **split**   a hash shuffle on the user: one task labels all rows of its users
              (:func:`data_prep.steps.split_labels`).

Every step gives what :func:`data_prep.steps.reference_steps` gives on the whole arrays (tested).
"""
from __future__ import annotations

import functools

import numpy as np

from data_prep.steps import DictionaryMerger, duplicate_rows, mix64, split_labels, unify_dictionaries

BIG = np.iinfo(np.int64).max
MAX_BUCKETS = 64


@functools.cache
def _remote(fn, num_returns: int = 1):
    import ray
    # SPREAD: a step's tasks go to every node (and their outputs fill every node's object store), instead
    # of queueing on the driver's node while it has CPUs; on one node it changes nothing
    return ray.remote(num_returns=num_returns, scheduling_strategy="SPREAD")(fn)


def call(fn, *args, num_returns: int = 1):
    """``fn`` as a Ray task (one retained remote per function and output count); -> ref or refs."""
    out = _remote(fn, num_returns).remote(*args)
    return [out] if num_returns == 1 and not isinstance(out, list) else out


def _node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()


def concat(pieces) -> dict:
    pieces = [p for p in pieces if p is not None]
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def take(block: dict, mask) -> dict:
    return {k: v[mask] for k, v in block.items()}


def by_row(block: dict) -> dict:
    order = np.argsort(block["r"], kind="stable")
    return take(block, order)


def split_by(block: dict, bucket: np.ndarray, n: int) -> list[dict]:
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(n + 1))
    return [take(block, order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _bucket_of(key: np.ndarray, n: int) -> np.ndarray:
    return (mix64(key.astype(np.int64).view(np.uint64)) % np.uint64(n)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# the tasks
# --------------------------------------------------------------------------------------------------

def _block_codes(col) -> tuple:
    """A block's id column -> (its dictionary, int64 index per row); Ray may hand over several chunks."""
    if col.num_chunks == 1:
        return col.chunk(0).dictionary, col.chunk(0).indices.to_numpy().astype(np.int64)
    return unify_dictionaries(col)


def _dictionaries(table):
    """A read block's per-column dictionaries and row count (the encode step's driver input)."""
    from data_prep.reading import I, U
    return _block_codes(table[U])[0], _block_codes(table[I])[0], table.num_rows, _node_id()


def _encode(table, u_remap, i_remap, row0: int) -> dict:
    from data_prep.reading import I, T, U
    n = table.num_rows
    return {"u": u_remap[_block_codes(table[U])[1]], "i": i_remap[_block_codes(table[I])[1]],
            "t": np.array(table[T].to_numpy(), copy=True), "r": np.arange(row0, row0 + n, dtype=np.int64)}


def _hash_split(block: dict, n: int, num_items: int, by: str) -> list[dict]:
    key = block["u"] * np.int64(num_items) + block["i"] if by == "pair" else block["u"]
    parts = split_by(block, _bucket_of(key, n), n)
    return parts if n > 1 else parts[0]


def _dedup_bucket(num_items: int, *pieces):
    block = by_row(concat(pieces))
    dup = duplicate_rows(block["u"], block["i"], block["t"], num_items)
    keep = np.ones(len(block["r"]), dtype=bool)
    keep[dup] = False
    return take(block, keep), len(dup)


def _counts(block: dict, num_users: int, num_items: int):
    return np.bincount(block["u"], minlength=num_users), np.bincount(block["i"], minlength=num_items)


def _kcore_filter(block: dict, du, di, k: int):
    ok = (du[block["u"]] >= k) & (di[block["i"]] >= k)
    out = take(block, ok)
    return (out, *_counts(out, len(du), len(di)))


def _first_rows(block: dict, num_users: int, num_items: int):
    """Each node's first row in this block (``BIG`` where absent); the block is in row order."""
    out = []
    for col, n in (("u", num_users), ("i", num_items)):
        first = np.full(n, BIG, dtype=np.int64)
        codes, at = np.unique(block[col], return_index=True)
        first[codes] = block["r"][at]
        out.append(first)
    return tuple(out)


def _relabel_split(block: dict, u_remap, i_remap, n: int):
    block = dict(block, u=u_remap[block["u"]], i=i_remap[block["i"]])
    return _hash_split(block, n, 0, "user")


def _label_bucket(split: str, seed: int, *pieces):
    """All rows of this bucket's users, in log order, labelled by the split rule."""
    block = by_row(concat(pieces))
    local, inverse = np.unique(block["u"], return_inverse=True)
    block["s"] = split_labels(split, inverse, block["r"], block["t"], len(local), seed)
    return block, np.bincount(block["s"], minlength=3), _node_id()


# --------------------------------------------------------------------------------------------------
# the driver's side
# --------------------------------------------------------------------------------------------------

def _shuffle(ray, blocks: list, split_fn, split_args: tuple, bucket_fn, bucket_args: tuple, n: int,
             outputs: int) -> list:
    """Split every block into ``n`` buckets, then one task per bucket: -> per bucket its output refs."""
    pieces = [call(split_fn, b, *split_args, num_returns=n) for b in blocks]
    return [call(bucket_fn, *bucket_args, *[p[j] for p in pieces], num_returns=outputs) for j in range(n)]


def _merge_dictionaries(*infos):
    """Ray task: every block's (user dictionary, item dictionary, rows, node), in block order -> the two
    global dictionaries, the row counts and nodes, then one (user, item) code remap per block."""
    users, items = DictionaryMerger(), DictionaryMerger()
    remaps = [(users.add(u), items.add(i)) for u, i, n, _ in infos]
    head = (users.values, items.values, [n for _, _, n, _ in infos], {x[3] for x in infos})
    return (head, *remaps) if remaps else head


def encode(ray, tables: list) -> dict:
    """Read blocks (dictionary-encoded U/I) -> code blocks, the id dictionaries, nodes that ran tasks.

    One task merges the block dictionaries; the driver receives the global dictionaries (the id maps)
    and the row counts, while each block's code remap goes from that task's output to the block's task."""
    out = call(_merge_dictionaries, *[call(_dictionaries, t)[0] for t in tables], num_returns=1 + len(tables))
    user_dict, item_dict, rows, nodes = ray.get(out[0])
    blocks, row0 = [], 0
    for table, remap, n in zip(tables, out[1:], rows):
        if n:
            blocks.append(call(_encode_remap, table, remap, row0)[0])
            row0 += n
    return {"blocks": blocks, "user_dict": user_dict, "item_dict": item_dict, "rows": row0, "nodes": nodes}


def _encode_remap(table, remap, row0: int) -> dict:
    return _encode(table, remap[0], remap[1], row0)


def dedup(ray, blocks: list, num_items: int) -> tuple[list, int]:
    n = min(MAX_BUCKETS, max(1, len(blocks)))
    out = _shuffle(ray, blocks, _hash_split, (n, num_items, "pair"), _dedup_bucket, (num_items,), n, 2)
    return [o[0] for o in out], int(sum(ray.get([o[1] for o in out])))


FAN_IN = 16


def _reduce_task(op: str, *arrays):
    return functools.reduce(np.add if op == "sum" else np.minimum, arrays)


def reduce(ray, refs: list, op: str) -> np.ndarray:
    """Per-block per-node arrays added (``sum``) or minimised (``min``) in a tree of Ray tasks; the driver
    receives the one result."""
    while len(refs) > 1:
        refs = [call(_reduce_task, op, *refs[a:a + FAN_IN])[0] for a in range(0, len(refs), FAN_IN)]
    return np.array(ray.get(refs[0]))


def kcore(ray, blocks: list, k: int, num_users: int, num_items: int, rows: int) -> tuple[list, int, int]:
    """Rounds of (sum counts on the driver, filter in tasks) to the fixed point: -> blocks, rounds, rows."""
    if k <= 1:
        return blocks, 0, rows
    counted = [call(_counts, b, num_users, num_items, num_returns=2) for b in blocks]
    rounds = 0
    while True:
        du = reduce(ray, [c[0] for c in counted], "sum")
        di = reduce(ray, [c[1] for c in counted], "sum")
        # a round removes rows iff some node that still has rows has fewer than k
        if not (((du > 0) & (du < k)).any() or ((di > 0) & (di < k)).any()):
            return blocks, rounds, int(du.sum())
        du_ref, di_ref = ray.put(du), ray.put(di)
        out = [call(_kcore_filter, b, du_ref, di_ref, k, num_returns=3) for b in blocks]
        blocks, counted = [o[0] for o in out], [o[1:] for o in out]
        rounds += 1


def _dense_ids(firsts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First row per code -> (code -> dense id remap, code of each dense id), dense ids by first row."""
    codes = np.flatnonzero(firsts < BIG)
    codes = codes[np.argsort(firsts[codes], kind="stable")]
    remap = np.full(len(firsts), -1, dtype=np.int64)
    remap[codes] = np.arange(len(codes), dtype=np.int64)
    return remap, codes


def reindex_and_split(ray, blocks: list, num_users: int, num_items: int, split: str, seed: int) -> dict:
    """Dense ids in order of first appearance, then the per-user split in user-hash buckets."""
    firsts = [call(_first_rows, b, num_users, num_items, num_returns=2) for b in blocks]
    u_remap, user_codes = _dense_ids(reduce(ray, [f[0] for f in firsts], "min"))
    i_remap, item_codes = _dense_ids(reduce(ray, [f[1] for f in firsts], "min"))
    n = min(MAX_BUCKETS, max(1, len(blocks)))
    out = _shuffle(ray, blocks, _relabel_split, (ray.put(u_remap), ray.put(i_remap), n), _label_bucket,
                   (split, seed), n, 3)
    counts = np.sum(ray.get([o[1] for o in out]), axis=0)
    return {"blocks": [o[0] for o in out], "user_codes": user_codes, "item_codes": item_codes,
            "split_counts": counts, "nodes": set(ray.get([o[2] for o in out]))}


def gather(ray, blocks: list) -> dict:
    """All blocks in log order in this process (tests, METIS): per-interaction arrays, so not in prep's
    data path except where the whole graph must be in one process anyway."""
    return by_row(concat(ray.get(blocks)))
