"""The prepared dataset directory: the contract between preparation and training.

Layout (format version 1)::

    DIR/manifest.json            counts, modalities {name: dim} in anchor order, split rule, sha256 per file
    DIR/interactions.parquet     user int64, item int64 (dense ids), split int8 (0 train, 1 valid, 2 test)
    DIR/user_map.parquet         user int64, raw_id (raw ids in dense-id order)
    DIR/item_map.parquet         item int64, raw_id
    DIR/features/<name>.npy      float32 (num_items, dim), row i = item i (memory-mappable)
    DIR/partitions/node_part.npy   (written by lgmrec prep) int32 (num_users + num_items,): part of each node,
                                 users first, then items; partition.json beside it (data_prep/partition.py)

A dataset prepared with P > 1 partitions also holds ``part-k/`` directories and a partition book; rank k
reads them with :func:`lgmrec_dist.dataset_parts.open_partition` (layout there).

Directories are written atomically: built in a temporary sibling and renamed into place, so a failed
write leaves nothing behind and an existing dataset is never half-overwritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lgmrec_dist.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INTERACTIONS = "interactions.parquet"
USER_MAP = "user_map.parquet"
ITEM_MAP = "item_map.parquet"
TRAIN, VALID, TEST = 0, 1, 2


class DatasetError(UserError, ValueError):
    pass


def parse_named_paths(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["image=a.npy", "text=b.npy"]`` -> ``{"image": "a.npy", "text": "b.npy"}``, order kept (the first
    modality is the contrastive anchor); a malformed or repeated name is a DatasetError naming ``flag``."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DatasetError(f"{flag} expects NAME=PATH, got {item!r}")
        if name in out:
            raise DatasetError(f"{flag}: modality {name!r} given twice")
        out[name] = path
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` (also an existing
    file), on error it is removed: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno:  # a full disk: say which file
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from None
        raise


def atomic_write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False)  # strict JSON: NaN is no number
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _directory_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error it is removed.

    An existing ``out`` is refused unless ``overwrite``; it is only removed after the new directory is
    complete.
    """
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        os.chmod(tmp, _directory_mode())  # mkdtemp makes 0700; a dataset is read by Ray workers and others
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.filename is None and exc.errno:  # pyarrow's write errors name no file: say which output failed
            raise OSError(exc.errno, os.strerror(exc.errno), str(out)) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_siblings(out: Path) -> None:
    """Remove the temporaries that a killed writer of ``out`` left beside it (``.NAME.tmp-PID-*``,
    ``.NAME.old-*``): a temporary is stale when the process whose id it carries is gone."""
    for p in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = p.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
    if out.exists():  # else a ``.old-*/old`` may be the only copy left (killed between the two renames)
        for p in out.parent.glob(f".{out.name}.old-*"):
            if (p / "old").exists():  # the replaced dataset, renamed away but not yet deleted
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def features_tensor(arr: np.ndarray, rows: np.ndarray | None = None, device=None):
    """A float32 tensor copy of a feature array (of its ``rows`` when given).

    Features arrive as read-only memory maps; once copied, the mapped file pages are dropped from this
    process' resident set (``MADV_DONTNEED``: clean file pages, read again from disk if ever touched), so
    the features are not counted twice in its memory (1.5 GB of the peak at 10M interactions, docs/sampled.md)."""
    import torch
    src = np.asarray(arr) if rows is None else np.asarray(arr)[rows]
    out = torch.tensor(src, dtype=torch.float32, device=device)
    mapping = getattr(arr, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)
    return out


def check_features(name: str, array: np.ndarray, num_items: int, source: str) -> np.ndarray:
    """A modality matrix must be 2-D, have one row per item and hold only finite values."""
    if array.ndim != 2:
        raise DatasetError(f"{source}: feature {name!r} must be a 2-D array, got shape {array.shape}")
    if array.shape[0] != num_items:
        raise DatasetError(f"{source}: feature {name!r} has {array.shape[0]} rows, expected num_items = {num_items}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{source}: feature {name!r} has non-numeric dtype {array.dtype}")
    array = np.asarray(array, dtype=np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DatasetError(f"{source}: feature {name!r} holds {int(bad.sum())} NaN/inf values (first in row {row})")
    return array


def write_maps_and_features(tmp: Path, num_users: int, num_items: int, user_raw_ids, item_raw_ids,
                            feats: dict) -> None:
    """The id maps and ``features/<name>.npy`` of a dataset being built in ``tmp`` (checked matrices)."""
    pq.write_table(pa.table({"user": np.arange(num_users, dtype=np.int64), "raw_id": user_raw_ids}), tmp / USER_MAP)
    pq.write_table(pa.table({"item": np.arange(num_items, dtype=np.int64), "raw_id": item_raw_ids}), tmp / ITEM_MAP)
    (tmp / "features").mkdir()
    for name, arr in feats.items():
        np.save(tmp / "features" / f"{name}.npy", arr)


def write_dataset(out: str | Path, *, users: np.ndarray, items: np.ndarray, split: np.ndarray,
                  num_users: int, num_items: int, features: dict[str, np.ndarray],
                  user_raw_ids=None, item_raw_ids=None, extra_columns: dict | None = None,
                  manifest_extra: dict | None = None, overwrite: bool = False,
                  write_extra=None) -> dict:
    """Validate and write a prepared dataset directory atomically; return its manifest.

    ``write_extra``, if given, is called with the temporary directory after the standard files are
    written and before the checksums are taken, so that the files it adds (e.g. ``partitions/``) are
    part of the atomic write and listed with their sha256 in the manifest.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    split = np.asarray(split, dtype=np.int8)
    if not (len(users) == len(items) == len(split)):
        raise DatasetError("users, items and split must have the same length")
    if len(users) and (users.min() < 0 or users.max() >= num_users or items.min() < 0 or items.max() >= num_items):
        raise DatasetError("user/item ids out of range")
    if not np.isin(split, (TRAIN, VALID, TEST)).all():
        raise DatasetError("split labels must be 0 (train), 1 (valid) or 2 (test)")
    if not features:
        raise DatasetError("at least one modality feature matrix is required")
    feats = {name: check_features(name, arr, num_items, name) for name, arr in features.items()}
    user_raw_ids = np.arange(num_users) if user_raw_ids is None else user_raw_ids
    item_raw_ids = np.arange(num_items) if item_raw_ids is None else item_raw_ids
    with atomic_directory(out, overwrite) as tmp:
        table = {"user": users, "item": items, "split": split}
        table.update(extra_columns or {})
        pq.write_table(pa.table(table), tmp / INTERACTIONS)
        write_maps_and_features(tmp, num_users, num_items, user_raw_ids, item_raw_ids, feats)
        if write_extra is not None:
            write_extra(tmp)
        manifest = finish_manifest(tmp, num_users=num_users, num_items=num_items,
                                   split_counts=np.bincount(split, minlength=3),
                                   modalities={name: int(arr.shape[1]) for name, arr in feats.items()},
                                   manifest_extra=manifest_extra)
    return manifest


def finish_manifest(tmp: Path, *, num_users: int, num_items: int, split_counts, modalities: dict,
                    manifest_extra: dict | None = None, known: dict | None = None) -> dict:
    """Write the manifest of the dataset being built in ``tmp``: counts, modalities, ``manifest_extra``
    and the sha256 of every file in it (``known``: {file: sha256} already taken by the writer)."""
    known = known or {}
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    train, valid, test = (int(c) for c in split_counts)
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_users": int(num_users),
        "num_items": int(num_items),
        "num_interactions": train + valid + test,
        "num_train": train,
        "num_valid": valid,
        "num_test": test,
        "modalities": dict(modalities),
        **(manifest_extra or {}),
        "files": {f: known[f] if f in known else sha256_file(tmp / f) for f in files},
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def verify_files(path: Path, manifest: dict, checksums: bool = True) -> None:
    """Every file the manifest lists is there (and, with ``checksums``, has its sha256), else a DatasetError."""
    for rel, digest in manifest.get("files", {}).items():
        fpath = Path(path) / rel
        if not fpath.is_file():
            raise DatasetError(f"{path}: file {rel} listed in the manifest is missing")
        if checksums and sha256_file(fpath) != digest:
            raise DatasetError(f"{path}: checksum mismatch for {rel} (the dataset was modified or truncated)")


def read_manifest(path: str | Path) -> dict:
    """The manifest of a prepared dataset (checked: present, JSON, this format version), nothing else read."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise DatasetError(f"{path}: not a prepared dataset (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{mpath}: unreadable manifest ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{mpath}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


@dataclass
class PreparedDataset:
    """A loaded, verified prepared dataset. Features are memory-mapped float32 arrays."""
    path: Path
    manifest: dict
    users: np.ndarray
    items: np.ndarray
    split: np.ndarray
    features: dict

    @property
    def num_users(self) -> int:
        return self.manifest["num_users"]

    @property
    def num_items(self) -> int:
        return self.manifest["num_items"]

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    def pairs(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split == label
        return self.users[mask], self.items[mask]

    def raw_ids(self, kind: str) -> pa.Array:
        return pq.read_table(self.path / (USER_MAP if kind == "user" else ITEM_MAP))["raw_id"]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "PreparedDataset":
        path = Path(path)
        manifest = read_manifest(path)
        verify_files(path, manifest, checksums=verify)
        table = pq.read_table(path / INTERACTIONS, columns=["user", "item", "split"])
        features = {}
        for name, dim in manifest["modalities"].items():
            arr = np.load(path / "features" / f"{name}.npy", mmap_mode="r")
            if arr.shape != (manifest["num_items"], dim) or arr.dtype != np.float32:
                raise DatasetError(f"{path}: features/{name}.npy has shape {arr.shape} {arr.dtype}, "
                                   f"manifest says ({manifest['num_items']}, {dim}) float32")
            features[name] = arr
        return cls(path, manifest,
                   table["user"].to_numpy().astype(np.int64, copy=False),
                   table["item"].to_numpy().astype(np.int64, copy=False),
                   table["split"].to_numpy().astype(np.int8, copy=False), features)


class IdMapRows:
    """The raw ids of some dense ids (``ids``) of an id map (row i = dense id i), read one row group at a
    time: memory follows the ids asked for, not the map (a rank of a partitioned run, docs/serving.md).
    ``take(dense ids)`` looks them up like ``pa.Array.take`` on the whole column."""

    def __init__(self, path: str | Path, ids: np.ndarray):
        self.ids = np.unique(np.asarray(ids, np.int64))
        f = pq.ParquetFile(path)
        starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
        if len(self.ids) and (self.ids[0] < 0 or self.ids[-1] >= starts[-1]):
            raise DatasetError(f"{path}: ids up to {int(self.ids[-1])} asked of a map of {int(starts[-1])} rows")
        parts = []
        for g in range(f.num_row_groups):
            lo, hi = np.searchsorted(self.ids, starts[g:g + 2])
            if hi > lo:
                column = f.read_row_group(g, columns=["raw_id"])["raw_id"]
                parts.append(column.take(pa.array(self.ids[lo:hi] - starts[g])).combine_chunks())
        self.raw = pa.concat_arrays(parts) if parts else pa.array([], f.schema_arrow.field("raw_id").type)

    def take(self, dense) -> pa.Array:
        dense = dense.to_numpy(zero_copy_only=False) if isinstance(dense, pa.Array) else np.asarray(dense)
        return self.raw.take(pa.array(np.searchsorted(self.ids, dense)))
