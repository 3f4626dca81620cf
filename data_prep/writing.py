"""``lgmrec prep`` stages 8-9 on the labelled blocks: partition statistics and the writes, in Ray tasks
(docs/prep.md, "Partitioned layout").

* ``interactions.parquet`` is written by one Ray task that streams the blocks re-bucketed by log row
  ranges (one range in memory at a time), so the file holds the rows in log order as before;
* with P > 1 parts, each block is split by owner (a row goes to the part of its user and, for a training
  row, also to the part of its item), and one task per part writes ``part-k/`` (the file layout is in
  :mod:`lgmrec_dist.dataset_parts`) and returns the sha256 of its files for the manifest.

The driver holds only per-node arrays (the partition book, id maps) and per-part counts. The tasks write
into the temporary output directory, which must be on a filesystem every Ray node sees.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.blocks import by_row, concat, split_by, take, call, gather
from data_prep.partition import partition_stats
from lgmrec_dist.dataset import INTERACTIONS, sha256_file
from lgmrec_dist.dataset_parts import EVAL, NODE_FILES, PART_META, TRAIN_EDGES, part_dir
from lgmrec_dist.keys import distinct

ROWS_PER_RANGE = 1 << 20


def _interaction_table(block: dict, time_dtype) -> pa.Table:
    cols = {"user": block["u"], "item": block["i"], "split": block["s"].astype(np.int8)}
    if time_dtype is not None:
        cols["timestamp"] = block["t"].astype(time_dtype, copy=False)
    return pa.table(cols)


def _range_split(block: dict, bounds: np.ndarray):
    n = len(bounds) - 1
    parts = split_by(block, np.searchsorted(bounds, block["r"], side="right") - 1, n)
    return parts if n > 1 else parts[0]


def _write_interactions(path: str, time_dtype, ranges: list) -> str:
    """Ray task: the row ranges (lists of refs) in order -> one Parquet file; returns its sha256."""
    import ray
    writer = None
    for refs in ranges:
        table = _interaction_table(by_row(concat(ray.get(refs))), time_dtype)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return sha256_file(path)


def write_interactions(ray, blocks: list, num_rows: int, out: Path, time_dtype) -> str:
    n = max(1, -(-num_rows // ROWS_PER_RANGE))
    bounds = np.linspace(0, num_rows, n + 1).astype(np.int64)
    bounds[-1] = np.iinfo(np.int64).max
    pieces = [call(_range_split, b, bounds, num_returns=n) for b in blocks]
    ranges = [[p[j] for p in pieces] for j in range(n)]
    return ray.get(call(_write_interactions, str(out / INTERACTIONS), time_dtype, ranges)[0])


# --------------------------------------------------------------------------------------------------
# partitions
# --------------------------------------------------------------------------------------------------

def _block_stats(block: dict, node_part, num_users: int, num_parts: int) -> dict:
    train = block["s"] == 0     # a block holds every row of its users: its distinct pairs are global ones
    return partition_stats(node_part, num_users, block["u"][train], block["i"][train], num_parts)


def stats(ray, blocks: list, node_part_ref, num_users: int, num_parts: int) -> dict:
    """:func:`data_prep.partition.partition_stats` summed over the blocks."""
    per_block = ray.get([call(_block_stats, b, node_part_ref, num_users, num_parts)[0] for b in blocks])
    total = {k: np.sum([s[k] for s in per_block], axis=0).astype(int).tolist()
             for k in ("num_users", "num_items", "train_edges", "cut_edges")}
    total["num_users"] = per_block[0]["num_users"]      # node counts come from the book, not the edges
    total["num_items"] = per_block[0]["num_items"]
    edges = sum(total["train_edges"])
    total["edge_cut_fraction"] = float(sum(total["cut_edges"]) / edges) if edges else 0.0
    return total


def train_pairs(ray, blocks: list) -> tuple[np.ndarray, np.ndarray]:
    """Every training pair in this process: only for METIS, which needs the whole graph in one place."""
    b = gather(ray, blocks)
    train = b["s"] == 0
    return b["u"][train], b["i"][train]


def _owner_split(block: dict, node_part, num_users: int, num_parts: int):
    owner_u = node_part[block["u"]]
    owner_i = node_part[num_users + block["i"]]
    train = block["s"] == 0
    parts = [take(block, (owner_u == k) | (train & (owner_i == k))) for k in range(num_parts)]
    return parts if num_parts > 1 else parts[0]


def _save(d: Path, rel: str, arr: np.ndarray, sums: dict, prefix: str) -> None:
    np.save(d / rel, arr)
    sums[f"{prefix}/{rel}"] = sha256_file(d / rel)


def _write_part(out: str, k: int, num_parts: int, num_users: int, node_part, *pieces):
    """Ray task: write ``part-k/`` from the rows routed to part k; -> ({file: sha256}, counts)."""
    prefix = part_dir(k)
    d = Path(out) / prefix
    d.mkdir()
    block = by_row(concat(pieces))
    train = block["s"] == 0
    tu, ti = block["u"][train], block["i"][train]
    owned_users = np.flatnonzero(node_part[:num_users] == k).astype(np.int64)
    owned_items = np.flatnonzero(node_part[num_users:] == k).astype(np.int64)
    halo_users = distinct(tu[node_part[tu] != k])
    halo_items = distinct(ti[node_part[num_users + ti] != k])
    held = ~train                          # only owned users' held-out rows are routed here
    sums = {}
    for rel, arr in zip(NODE_FILES, (owned_users, owned_items, halo_users, halo_items)):
        _save(d, rel, arr, sums, prefix)
    pq.write_table(pa.table({"user": tu, "item": ti}), d / TRAIN_EDGES)
    pq.write_table(pa.table({"user": block["u"][held], "item": block["i"][held],
                             "split": block["s"][held].astype(np.int8)}), d / EVAL)
    for rel in (TRAIN_EDGES, EVAL):
        sums[f"{prefix}/{rel}"] = sha256_file(d / rel)
    counts = {"owned_users": len(owned_users), "owned_items": len(owned_items), "train_edges": len(tu),
              "halo_users": len(halo_users), "halo_items": len(halo_items), "eval_rows": int(held.sum())}
    (d / PART_META).write_text(json.dumps({"part": k, "num_parts": num_parts, **counts}, indent=2) + "\n")
    sums[f"{prefix}/{PART_META}"] = sha256_file(d / PART_META)
    return sums, counts


def write_parts(ray, blocks: list, out: Path, node_part_ref, num_users: int, num_parts: int) -> tuple[dict, list]:
    """One task per part writes ``part-k/`` (all but the features, :func:`data_prep.features.write_matrices`):
    -> ({file: sha256} of all parts, per-part counts)."""
    pieces = [call(_owner_split, b, node_part_ref, num_users, num_parts, num_returns=num_parts) for b in blocks]
    done = ray.get([call(_write_part, str(out), k, num_parts, num_users, node_part_ref,
                         *[p[k] for p in pieces])[0] for k in range(num_parts)])
    sums = {}
    for s, _ in done:
        sums.update(s)
    return sums, [c for _, c in done]
