"""Partitioning of the training graph for distributed training.

The graph
    Nodes are numbered users first, then items: node ``u`` is user u, node ``num_users + i`` is item i
    (N = num_users + num_items). Edges are the *distinct* training pairs (u, i) (split label 0), used in
    both directions, as in docs/model.md §1.3. Users or items without a training edge (items that only
    occur in valid/test, docs/model.md §1.3 item 4) are isolated nodes; they are still assigned a part.

Methods
    ``metis``  -- DGL's METIS k-way partitioning (``dgl.metis_partition_assignment``) minimising the edge
                  cut with balanced node counts;
    ``random`` -- users and items are each dealt round-robin over the parts in a seeded random order,
                  so every part owns ⌊U/P⌋ or ⌈U/P⌉ users and ⌊I/P⌋ or ⌈I/P⌉ items.
    With P = 1 every node is in part 0 (no METIS call).

Format (inside the prepared dataset directory, covered by the manifest checksums)
    ``partitions/node_part.npy``   int32, shape (num_users + num_items,): the part owning each node;
    ``partitions/partition.json``  method, num_parts, the edge rule and per-part counts (users, items,
                                   training edges owned, edges whose item lives in another part).

Edge ownership rule
    A training edge (u, i) belongs to the part that owns its **user**: ``node_part[u]``. Every
    training edge therefore belongs to exactly one part; :func:`edge_parts` computes it. The edge is *cut*
    when ``node_part[num_users + i] != node_part[u]`` (the item's row lives elsewhere).

We do not write DGL's DistGraph partition format (``dgl.distributed.partition_graph``): the trainer
shards nodes with ``node_part`` and builds its own blocks, and the DistGraph format would duplicate the
graph on disk and require DGL's graph servers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lgmrec_dist.dataset import DatasetError
from lgmrec_dist.keys import pair_keys

__all__ = ["partition_nodes", "edge_parts", "partition_stats", "write_partitions", "load_partitions",
           "PARTITION_DIR", "NODE_PART", "PARTITION_META", "METHODS"]

PARTITION_DIR = "partitions"
NODE_PART = f"{PARTITION_DIR}/node_part.npy"
PARTITION_META = f"{PARTITION_DIR}/partition.json"
METHODS = ("metis", "random")
EDGE_RULE = "user"          # a training edge (u, i) belongs to node_part[u]


def _distinct_pairs(users: np.ndarray, items: np.ndarray, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    key = pair_keys(users, items, num_items)
    return key // num_items, key % num_items


def _random_parts(n: int, num_parts: int, rng: np.random.Generator) -> np.ndarray:
    part = np.empty(n, dtype=np.int32)
    part[rng.permutation(n)] = np.arange(n, dtype=np.int64) % num_parts
    return part


def partition_nodes(num_users: int, num_items: int, train_users: np.ndarray, train_items: np.ndarray,
                    num_parts: int, method: str = "metis", seed: int = 0) -> np.ndarray:
    """Assign every node (users first, then items) of the training graph to one of ``num_parts`` parts.

    Returns ``node_part`` (int32, length num_users + num_items, values in [0, num_parts)).
    """
    if method not in METHODS:
        raise DatasetError(f"partition method must be one of {', '.join(METHODS)}, got {method!r}")
    num_parts = int(num_parts)
    n = int(num_users) + int(num_items)
    if num_parts < 1:
        raise DatasetError(f"the number of partitions must be >= 1, got {num_parts}")
    if num_parts > n:
        raise DatasetError(f"cannot split {n} nodes ({num_users} users + {num_items} items) into {num_parts} parts")
    if num_parts == 1:
        return np.zeros(n, dtype=np.int32)
    if method == "random":
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9A27]))
        return np.concatenate([_random_parts(num_users, num_parts, rng), _random_parts(num_items, num_parts, rng)])

    import lgmrec_dist._dgl_shim  # noqa: F401  (import dgl with a torch newer than its graphbolt build)
    import dgl
    import torch

    u, i = _distinct_pairs(train_users, train_items, num_items)
    if len(u) == 0:
        raise DatasetError("the training graph has no edges; METIS cannot partition it (use random)")
    g = dgl.graph((torch.from_numpy(u), torch.from_numpy(i + num_users)), num_nodes=n)
    part = dgl.metis_partition_assignment(g, num_parts)   # symmetrises the graph itself
    part = part.numpy().astype(np.int32, copy=False)
    if part.shape != (n,) or part.min() < 0 or part.max() >= num_parts:
        raise DatasetError(f"METIS returned an invalid assignment (shape {part.shape}, "
                           f"range [{part.min()}, {part.max()}])")
    return part


def edge_parts(node_part: np.ndarray, users: np.ndarray) -> np.ndarray:
    """The part owning each training edge (u, i): the part of its user (the edge rule above)."""
    return np.asarray(node_part)[np.asarray(users, dtype=np.int64)]


def partition_stats(node_part: np.ndarray, num_users: int, train_users: np.ndarray, train_items: np.ndarray,
                    num_parts: int) -> dict:
    """Per-part counts over the distinct training edges (the content of ``partition.json``)."""
    num_items = len(node_part) - int(num_users)
    u, i = _distinct_pairs(train_users, train_items, num_items)
    owner = node_part[u]
    cut = owner != node_part[num_users + i]
    return {
        "num_users": np.bincount(node_part[:num_users], minlength=num_parts).tolist(),
        "num_items": np.bincount(node_part[num_users:], minlength=num_parts).tolist(),
        "train_edges": np.bincount(owner, minlength=num_parts).tolist(),
        "cut_edges": np.bincount(owner[cut], minlength=num_parts).tolist(),
        "edge_cut_fraction": float(cut.mean()) if len(cut) else 0.0,
    }


def write_partitions(dataset_dir: str | Path, node_part: np.ndarray, *, method: str, num_users: int,
                     num_items: int, stats: dict) -> None:
    """Write ``partitions/node_part.npy`` and ``partitions/partition.json`` into ``dataset_dir``."""
    d = Path(dataset_dir) / PARTITION_DIR
    d.mkdir(exist_ok=True)
    np.save(d / "node_part.npy", np.ascontiguousarray(node_part, dtype=np.int32))
    num_parts = len(stats["num_users"])
    meta = {"method": method, "num_parts": num_parts, "node_order": "users first, then items",
            "num_nodes": int(num_users) + int(num_items), "num_users": int(num_users), "num_items": int(num_items),
            "edge_rule": EDGE_RULE, "edges": "distinct training pairs (split 0)", **stats}
    (d / "partition.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_partitions(dataset_dir: str | Path) -> tuple[np.ndarray, dict]:
    """Read ``(node_part, partition.json)`` of a prepared dataset, checking the node count and part range."""
    dataset_dir = Path(dataset_dir)
    ppath, mpath = dataset_dir / NODE_PART, dataset_dir / PARTITION_META
    if not ppath.is_file() or not mpath.is_file():
        raise DatasetError(f"{dataset_dir}: no graph partitions ({NODE_PART}); prepare it with `lgmrec prep`")
    meta = json.loads(mpath.read_text())
    node_part = np.load(ppath, allow_pickle=False)
    if node_part.dtype != np.int32 or node_part.shape != (meta["num_nodes"],):
        raise DatasetError(f"{ppath}: expected int32 of shape ({meta['num_nodes']},), "
                           f"got {node_part.dtype} {node_part.shape}")
    if len(node_part) and (node_part.min() < 0 or node_part.max() >= meta["num_parts"]):
        raise DatasetError(f"{ppath}: part ids outside [0, {meta['num_parts']})")
    return node_part, meta
