"""One partition of a partitioned prepared dataset: what rank k of P reads (docs/prep.md, "Partitioned
layout").

A dataset prepared with ``--partitions P`` (P > 1) holds, beside the whole-dataset files, one directory
per part and the partition book::

    DIR/partitions/node_part.npy    the partition book: int32 (num_users + num_items,), part of each node,
                                    users first, then items (partition.json beside it)
    DIR/part-k/owned_users.npy      int64, sorted: users u with node_part[u] == k
    DIR/part-k/owned_items.npy      int64, sorted: items i with node_part[num_users + i] == k
    DIR/part-k/train_edges.parquet  user, item (dense ids): every training row (split 0) whose user or item
                                    part k owns, in log order
    DIR/part-k/halo_users.npy       int64, sorted: users of those edges owned by another part
    DIR/part-k/halo_items.npy       int64, sorted: items of those edges owned by another part
    DIR/part-k/eval.parquet         user, item, split (1 valid, 2 test): the held-out rows of owned users
    DIR/part-k/features/<m>.npy     float32 (len(owned_items), dim): row j = item owned_items[j]
    DIR/part-k/part.json            part, num_parts and the counts of the files above

:func:`open_partition` reads the manifest, the partition book and partition k's files only; every file
it reads is checked against the manifest's sha256 first, and the files must agree with the book.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lgmrec_dist.dataset import DatasetError, read_manifest, sha256_file

BOOK = "partitions/node_part.npy"
BOOK_META = "partitions/partition.json"
NODE_FILES = ("owned_users.npy", "owned_items.npy", "halo_users.npy", "halo_items.npy")
TRAIN_EDGES = "train_edges.parquet"
EVAL = "eval.parquet"
PART_META = "part.json"


def part_dir(k: int) -> str:
    return f"part-{k}"


def part_files(modalities) -> list[str]:
    """The files every part directory holds (relative to it)."""
    return [*NODE_FILES, TRAIN_EDGES, EVAL, PART_META, *(f"features/{m}.npy" for m in modalities)]


@dataclass
class PartitionData:
    """Partition ``part`` of ``num_parts``: owned and halo node ids (global dense ids), the training edges
    incident to owned nodes, owned feature rows (memory-mapped) and the owned users' valid/test pairs."""
    path: Path
    manifest: dict
    part: int
    num_parts: int
    node_part: np.ndarray
    owned_users: np.ndarray
    owned_items: np.ndarray
    halo_users: np.ndarray
    halo_items: np.ndarray
    train_users: np.ndarray
    train_items: np.ndarray
    eval_users: np.ndarray
    eval_items: np.ndarray
    eval_split: np.ndarray
    features: dict
    num_users: int
    num_items: int

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    def pairs(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of the owned users' training (0), valid (1) or test (2) rows (as
        ``PreparedDataset.pairs`` restricted to them); every local training edge: ``train_users/items``."""
        if label == 0:
            mask = self.node_part[self.train_users] == self.part
            return self.train_users[mask], self.train_items[mask]
        mask = self.eval_split == label
        return self.eval_users[mask], self.eval_items[mask]


def _verify(path: Path, manifest: dict, rel: str, part: int | None) -> Path:
    """The file's path once it exists and matches its manifest sha256 (error naming part and file)."""
    who = f"partition {part}: " if part is not None else ""
    digest = manifest.get("files", {}).get(rel)
    if digest is None:
        raise DatasetError(f"{path}: {who}file {rel} is not listed in the manifest")
    fpath = path / rel
    if not fpath.is_file():
        raise DatasetError(f"{path}: {who}file {rel} is missing")
    if sha256_file(fpath) != digest:
        raise DatasetError(f"{path}: {who}checksum mismatch for {rel} (the file was modified or truncated)")
    return fpath


def _load_ids(fpath: Path, path: Path, rel: str, k: int) -> np.ndarray:
    arr = np.load(fpath, allow_pickle=False)
    if arr.ndim != 1 or arr.dtype != np.int64:
        raise DatasetError(f"{path}: partition {k}: {rel} must be 1-D int64, got {arr.dtype} {arr.shape}")
    return arr


def open_partition(path: str | Path, k: int, world_size: int) -> PartitionData:
    """Partition ``k`` of a dataset prepared for ``world_size`` parts, reading nothing of other parts."""
    path = Path(path)
    manifest = read_manifest(path)
    num_parts = int(manifest.get("partitions", 1))
    if num_parts != world_size:
        raise DatasetError(f"{path}: partitioned for P = {num_parts} (manifest 'partitions'), but opened by "
                           f"{world_size} ranks; prepare it again with --partitions {world_size}")
    if num_parts < 2:
        raise DatasetError(f"{path}: not a partitioned dataset (prepared with --partitions 1); "
                           f"read it whole with PreparedDataset.load")
    if not 0 <= k < num_parts:
        raise DatasetError(f"{path}: partition {k} does not exist (parts 0..{num_parts - 1})")
    d = part_dir(k)
    if not (path / d).is_dir():
        raise DatasetError(f"{path}: partition {k}: directory {d}/ is missing")
    files = {rel: _verify(path, manifest, rel, None) for rel in (BOOK, BOOK_META)}
    files.update({rel: _verify(path, manifest, f"{d}/{rel}", k) for rel in part_files(manifest["modalities"])})
    nu, ni = manifest["num_users"], manifest["num_items"]
    node_part = np.load(files[BOOK], allow_pickle=False)
    if node_part.dtype != np.int32 or node_part.shape != (nu + ni,):
        raise DatasetError(f"{path}: {BOOK} must be int32 of shape ({nu + ni},), got {node_part.dtype} "
                           f"{node_part.shape}")
    ids = {rel: _load_ids(files[rel], path, f"{d}/{rel}", k) for rel in NODE_FILES}
    meta = json.loads(files[PART_META].read_text())
    # the files must agree with the book: owned = the book's part k, halo = owned elsewhere
    expect = {"owned_users.npy": np.flatnonzero(node_part[:nu] == k),
              "owned_items.npy": np.flatnonzero(node_part[nu:] == k)}
    for rel, want in expect.items():
        if not np.array_equal(ids[rel], want):
            raise DatasetError(f"{path}: partition {k}: {d}/{rel} disagrees with the partition book {BOOK} "
                               f"({len(ids[rel])} ids in the file, {len(want)} nodes of part {k} in the book)")
    for rel, offset in (("halo_users.npy", 0), ("halo_items.npy", nu)):
        if (node_part[offset + ids[rel]] == k).any():
            raise DatasetError(f"{path}: partition {k}: {d}/{rel} lists nodes the partition book {BOOK} gives "
                               f"to part {k} itself")
    if meta.get("part") != k or meta.get("num_parts") != num_parts:
        raise DatasetError(f"{path}: partition {k}: {d}/{PART_META} describes part {meta.get('part')!r} of "
                           f"{meta.get('num_parts')!r}")
    train = pq.read_table(files[TRAIN_EDGES], columns=["user", "item"])
    tu, ti = (train[c].to_numpy().astype(np.int64, copy=False) for c in ("user", "item"))
    if len(tu) and not ((node_part[tu] == k) | (node_part[nu + ti] == k)).all():
        raise DatasetError(f"{path}: partition {k}: {d}/{TRAIN_EDGES} holds edges with neither end in part {k} "
                           f"of the partition book {BOOK}")
    ev = pq.read_table(files[EVAL], columns=["user", "item", "split"])
    eu, ei, es = (ev[c].to_numpy() for c in ("user", "item", "split"))
    if len(eu) and (node_part[eu] != k).any():
        raise DatasetError(f"{path}: partition {k}: {d}/{EVAL} holds users the partition book {BOOK} gives to "
                           f"another part")
    features = {}
    for name, dim in manifest["modalities"].items():
        rel = f"features/{name}.npy"
        arr = np.load(files[rel], mmap_mode="r")
        if arr.shape != (len(ids["owned_items.npy"]), dim) or arr.dtype != np.float32:
            raise DatasetError(f"{path}: partition {k}: {d}/{rel} has shape {arr.shape} {arr.dtype}, expected "
                               f"({len(ids['owned_items.npy'])}, {dim}) float32")
        features[name] = arr
    return PartitionData(path, manifest, k, num_parts, node_part, ids["owned_users.npy"], ids["owned_items.npy"],
                         ids["halo_users.npy"], ids["halo_items.npy"], tu, ti,
                         eu.astype(np.int64, copy=False), ei.astype(np.int64, copy=False),
                         es.astype(np.int8, copy=False), features, nu, ni)


__all__ = ["PartitionData", "open_partition", "part_dir", "part_files", "BOOK"]
