"""``lgmrec prep``: raw Parquet interaction logs + item feature files -> prepared dataset (issue 3).

A Ray Data job (docs/prep.md has the full description)::

    prep(interactions, {"text": "feats/text.parquet", "image": "img.npy"}, out, kcore=5, split="mmrec")

Stages
 1. **schema**   every input file's Parquet footer is read on the driver: the id / timestamp / vector
                 columns must exist with a usable type (ids: integers or strings, the same kind in every
                 file; timestamp: integer, timestamp or float; vectors: (fixed-size) list of floats).
 2. **read**     Ray Data reads the interaction files (one task per ~1M rows of row groups) and, in the
                 same tasks, normalises the columns (dictionary-decoded, ids to int64/string, timestamp
                 to int64 or float64) and drops rows with a null user id, item id or timestamp; feature
                 Parquet files are read the same way and checked per row (null / NaN / inf / vector length).
 3. **dedup**    exact duplicate (user, item, timestamp) rows are dropped (the first copy is kept).
 4. **k-core**   rows of users or items with fewer than ``kcore`` rows are removed, repeatedly, until no
                 row is removed (a fixed point; MMRec's 5-core, LGMRec_SPEC.md §3).
 5. **re-index** dense ids 0..U-1 / 0..I-1 in order of first appearance in the filtered rows (MMRec's
                 ``pd.unique``); the raw ids are kept in ``user_map.parquet`` / ``item_map.parquet``.
 6. **split**    ``mmrec``: per user, rows shuffled with ``seed``, n < 10 -> n-2/1/1, else h = ⌊0.2n⌋ held out,
                 h//2 valid, the rest test (§2, :func:`data_prep.synthetic.mmrec_split`); ``temporal``: the same
                 counts, the newest rows held out (valid before test; equal timestamps keep input order).
 7. **features** each modality is aligned to the item index (row i = item i); items without a vector get
                 the mean vector of the items that have one (counted in the manifest), or are refused with
                 ``require_features``.
 8. **partition** the training graph is split into ``partitions`` parts (METIS or random,
                 :mod:`data_prep.partition`); ``partitions/node_part.npy`` holds each node's part.
 9. **write**    :func:`lgmrec_dist.dataset.write_dataset` (atomic, sha256 per file in the manifest).

The file reading and per-row checks run as Ray tasks; the global steps (dedup, k-core, re-index, split,
alignment) are vectorised numpy/pyarrow on the driver over integer codes (a few bytes per row), which is
faster on one machine than shuffling through Ray and handles tens of millions of rows.

Why not ``ray.data.read_parquet``: with ``fsspec`` installed but ``aiohttp`` missing (as in our venv),
Ray 2.60's parallel path resolution races on ``import fsspec.implementations.http`` and either fails
with ``ImportError`` or silently *skips* input paths. We list the files ourselves and read row groups
with pyarrow inside Ray Data tasks (``from_items`` + ``map_batches``), which also lets every error name
its file.

Bad input raises :class:`~lgmrec_dist.dataset.DatasetError` naming the file and column; nothing is
written. ``register_cli`` adds the ``prep`` subcommand to an argparse parser.
"""
from __future__ import annotations

import argparse
import contextlib
import glob as globlib
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lgmrec_dist.dataset import MANIFEST, DatasetError, parse_named_paths, verify_files, write_dataset
from data_prep.mmrec import check_modality_name
from data_prep.partition import METHODS, partition_nodes, partition_stats, write_partitions
from data_prep.synthetic import group_by_user, labels_by_rank, mmrec_split

__all__ = ["prep", "register_cli", "temporal_split", "kcore_filter", "duplicate_rows", "unify_dictionaries",
           "resolve_files", "ray_session", "summary_table", "SPLITS"]

SPLITS = ("mmrec", "temporal")
PREP_VERSION = 1
ROWS_PER_TASK = 1 << 20                 # row groups are bundled into Ray tasks of about this many rows
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_ERR_START, _ERR_END = "<<prep-error>>", "<</prep-error>>"
_GLOB_CHARS = re.compile(r"[*?\[]")
# normalised column names inside the Ray blocks
_U, _I, _T = "u", "i", "t"


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()

    def __call__(self, stage: str, message: str) -> None:
        now = time.perf_counter()
        if self.enabled:
            print(f"[prep] {stage:<10} {message}  ({now - self.last:.2f}s)", flush=True)
        self.last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _fail_in_task(message: str):
    """Raise inside a Ray task so that the driver can recover the exact message (see _ray_errors)."""
    raise DatasetError(f"{_ERR_START}{message}{_ERR_END}")


@contextlib.contextmanager
def _ray_errors(what: str):
    """Turn a failure inside Ray Data back into a DatasetError with the task's own message."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 -- Ray wraps task errors in its own exception types
        text = str(exc)
        m = re.search(re.escape(_ERR_START) + r"(.*?)" + re.escape(_ERR_END), text, re.S)
        if m:
            raise DatasetError(m.group(1)) from None
        last = [ln for ln in text.strip().splitlines() if ln.strip()]
        raise DatasetError(f"{what}: {type(exc).__name__}: {last[-1] if last else exc}") from None


def _fmt(n) -> str:
    return f"{int(n):,}"


def _type_name(t: pa.DataType) -> str:
    return str(t)


def _id_kind(t: pa.DataType) -> str | None:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return "string"
    return None


def _time_kind(t: pa.DataType) -> str | None:
    if pa.types.is_integer(t) or pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_duration(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    return None


def _vector_type_ok(t: pa.DataType) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)))


def _norm_ids(col, kind: str):
    """Dictionary-decode and cast an id column to int64 (kind 'int') or string."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    target = pa.int64() if kind == "int" else pa.string()
    return col if col.type == target else col.cast(target)


def _norm_time(col, kind: str):
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if kind == "float":
        return col.cast(pa.float64())
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_duration(t):
        col = col.cast(pa.int64())
    elif pa.types.is_date32(t):
        col = col.cast(pa.int32())
    elif pa.types.is_date64(t):
        col = col.cast(pa.int64())
    return col.cast(pa.int64())


# --------------------------------------------------------------------------------------------------
# input files
# --------------------------------------------------------------------------------------------------

def resolve_files(spec, what: str) -> list[str]:
    """A Parquet file, a directory (all ``*.parquet|*.pq|*.parq`` below it) or a glob -> sorted file list."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    files: list[str] = []
    for s in specs:
        s = os.fspath(s)
        if _GLOB_CHARS.search(s) and not os.path.exists(s):
            found = sorted(p for p in globlib.glob(s, recursive=True) if os.path.isfile(p))
            if not found:
                raise DatasetError(f"{s}: no {what} files match this pattern")
            files += found
        elif os.path.isdir(s):
            found = []
            for root, dirs, names in os.walk(s):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                found += [os.path.join(root, n) for n in names
                          if n.endswith(PARQUET_SUFFIXES) and not n.startswith((".", "_"))]
            if not found:
                raise DatasetError(f"{s}: directory holds no {what} Parquet files ({', '.join(PARQUET_SUFFIXES)})")
            files += sorted(found)
        elif os.path.isfile(s):
            files.append(s)
        elif os.path.exists(s):
            raise DatasetError(f"{s}: {what} path is not a regular file or directory")
        else:
            raise DatasetError(f"{s}: {what} file not found")
    return [os.path.abspath(f) for f in files]


def _open_parquet(path: str, what: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise DatasetError(f"{path}: unreadable {what} file, not a Parquet file or corrupt ({reason})") from None


def _work_units(files: list[str], metas: list, rows_per_task: int = ROWS_PER_TASK, mod: int = 0) -> list[dict]:
    """Bundle row groups into Ray tasks of about ``rows_per_task`` rows (a task never spans files)."""
    units = []
    for f, (path, md) in enumerate(zip(files, metas)):
        group, rows = [], 0
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if group and rows + n > rows_per_task:
                units.append({"mod": mod, "file": f, "path": path, "row_groups": group})
                group, rows = [], 0
            group.append(rg)
            rows += n
        if group:
            units.append({"mod": mod, "file": f, "path": path, "row_groups": group})
    return units


def _check_interaction_schemas(files, user_col, item_col, time_col) -> dict:
    kinds = {user_col: None, item_col: None}
    first = {}
    time_kind = None
    rows, metas = 0, []
    for path in files:
        pf = _open_parquet(path, "interaction")
        schema, md = pf.schema_arrow, pf.metadata
        metas.append(md)
        rows += md.num_rows
        needed = [user_col, item_col] + ([time_col] if time_col else [])
        missing = [c for c in needed if c not in schema.names]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(map(repr, missing))} "
                               f"(found {schema.names}; set the names with --user-col / --item-col / --time-col)")
        for col in (user_col, item_col):
            t = schema.field(col).type
            kind = _id_kind(t)
            if kind is None:
                hint = (" (float ids usually come from pandas with missing values: cast the column to Int64"
                        " or string)") if pa.types.is_floating(t) else ""
                raise DatasetError(f"{path}: column {col!r} has type {_type_name(t)}; ids must be integers or "
                                   f"strings{hint}")
            if kinds[col] is None:
                kinds[col], first[col] = kind, path
            elif kinds[col] != kind:
                raise DatasetError(f"{path}: column {col!r} holds {kind} ids but {first[col]} holds "
                                   f"{kinds[col]} ids; every file must use the same id type")
        if time_col:
            t = schema.field(time_col).type
            k = _time_kind(t)
            if k is None:
                raise DatasetError(f"{path}: column {time_col!r} has type {_type_name(t)}; the timestamp must be an "
                                   f"integer, timestamp, date or float column")
            time_kind = "float" if "float" in (k, time_kind) else k
    return {"user_kind": kinds[user_col], "item_kind": kinds[item_col], "time_kind": time_kind or "int",
            "rows": rows, "metas": metas}


# --------------------------------------------------------------------------------------------------
# Ray tasks
# --------------------------------------------------------------------------------------------------

def _read_interaction_unit(batch: pa.Table, user_col, item_col, time_col, user_kind, item_kind, time_kind):
    """Ray task: read row groups of one file, normalise the columns, drop null rows."""
    out = []
    for path, groups in zip(batch["path"].to_pylist(), batch["row_groups"].to_pylist()):
        cols = [user_col, item_col] + ([time_col] if time_col else [])
        try:
            t = pq.ParquetFile(path).read_row_groups(groups, columns=cols)
        except (OSError, pa.ArrowException) as exc:
            _fail_in_task(f"{path}: cannot read interaction rows ({str(exc).splitlines()[0]})")
        try:
            u = _norm_ids(t[user_col], user_kind)
            i = _norm_ids(t[item_col], item_kind)
            ts = _norm_time(t[time_col], time_kind) if time_col else pa.chunked_array(
                [np.zeros(t.num_rows, dtype=np.int64)])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            _fail_in_task(f"{path}: cannot convert the id/timestamp columns ({str(exc).splitlines()[0]})")
        table = pa.table({_U: u, _I: i, _T: ts})
        if u.null_count or i.null_count or ts.null_count:
            valid = pc.and_(pc.and_(pc.is_valid(u), pc.is_valid(i)), pc.is_valid(ts))
            table = table.filter(valid)
        out.append(table)
    table = pa.concat_tables(out)
    # hash the raw ids here, in parallel: per-block dictionaries (first-appearance order) + int32 indices
    return pa.table({_U: table[_U].combine_chunks().dictionary_encode(),
                     _I: table[_I].combine_chunks().dictionary_encode(), _T: table[_T]})


def _read_feature_unit(batch: pa.Table, item_col, feature_col, item_kind):
    """Ray task: read one feature file's row groups; per row: id, list<float32> vector, length, flag.

    flag 0 = fine, 1 = null id or null vector, 2 = NaN/inf (or null) inside the vector.
    """
    out = []
    for mod, f, path, groups in zip(batch["mod"].to_pylist(), batch["file"].to_pylist(), batch["path"].to_pylist(),
                                    batch["row_groups"].to_pylist()):
        try:
            t = pq.ParquetFile(path).read_row_groups(groups, columns=[item_col, feature_col])
        except (OSError, pa.ArrowException) as exc:
            _fail_in_task(f"{path}: cannot read feature rows ({str(exc).splitlines()[0]})")
        n = t.num_rows
        try:
            ids = _norm_ids(t[item_col], item_kind).combine_chunks()
            vec = t[feature_col].combine_chunks()
            vec = pc.cast(vec, pa.list_(pa.float32()), safe=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            _fail_in_task(f"{path}: cannot convert column {feature_col!r} to list<float32> "
                          f"({str(exc).splitlines()[0]})")
        flag = np.zeros(n, dtype=np.int8)
        null = ~np.asarray(pc.and_(pc.is_valid(ids), pc.is_valid(vec)).to_numpy(zero_copy_only=False), dtype=bool)
        lengths = pc.fill_null(pc.list_value_length(vec), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        lengths[null] = 0
        values = pc.list_flatten(pc.if_else(pa.array(null), pa.scalar(None, vec.type), vec))
        vals = values.to_numpy(zero_copy_only=False)
        finite = np.isfinite(vals)
        if not finite.all():
            row_of = np.repeat(np.arange(n), lengths)
            flag[np.unique(row_of[~finite])] = 2
        flag[null] = 1
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        clean = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vals.astype(np.float32, copy=False)))
        out.append(pa.table({"id": ids, "vec": clean, "len": lengths.astype(np.int32), "flag": flag,
                             "mod": np.full(n, mod, dtype=np.int16), "file": np.full(n, f, dtype=np.int32)}))
    return pa.concat_tables(out)


@contextlib.contextmanager
def ray_session(address: str | None = None, say=None):
    """Reuse an initialised Ray, join ``address`` / ``RAY_ADDRESS``, or start a local cluster."""
    import ray

    started = False
    if ray.is_initialized():
        how = "using the running Ray session"
    else:
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                how = f"joined the Ray cluster at {address}"
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
                how = "started a local Ray cluster"
        except Exception as exc:  # noqa: BLE001 -- ConnectionError, RuntimeError, ValueError ...
            where = f"at {address}" if address else "locally"
            raise DatasetError(f"cannot start or join a Ray cluster {where}: {exc}") from None
        started = True
    import ray.data
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True      # first-appearance order needs the input order
    ctx.enable_progress_bars = False
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if say:
            say("ray", f"{how} ({cpus} CPUs)")
        yield ray
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()


def _run_units(ray, units: list[dict], fn, fn_kwargs: dict, what: str) -> list[pa.Table]:
    items = [{"mod": u["mod"], "file": u["file"], "path": u["path"], "row_groups": u["row_groups"]} for u in units]
    with _ray_errors(what):
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            fn, batch_format="pyarrow", batch_size=None, fn_kwargs=fn_kwargs)
        return [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]


# --------------------------------------------------------------------------------------------------
# global steps (driver, vectorised)
# --------------------------------------------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
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
        h = _mix64(key.view(np.uint64) ^ _mix64(tbits.view(np.uint64)))
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


def unify_dictionaries(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Chunks dictionary-encoded separately -> (distinct values in order of first appearance, int64 codes).

    Each chunk's dictionary lists its values in the order they first occur in that chunk, so the
    distinct values of the concatenated dictionaries, in order, are in order of first appearance overall.
    """
    chunks = [c for c in col.chunks if len(c)]
    if not chunks:
        return pa.array([], type=col.type.value_type), np.zeros(0, dtype=np.int64)
    # one hash pass over all block dictionaries: the global dictionary and each entry's global code
    encoded = pa.concat_arrays([c.dictionary for c in chunks]).dictionary_encode()
    values, remap_all = encoded.dictionary, encoded.indices.to_numpy().astype(np.int64)
    codes = np.empty(sum(len(c) for c in chunks), dtype=np.int64)
    start = offset = 0
    for c in chunks:
        remap = remap_all[offset:offset + len(c.dictionary)]
        codes[start:start + len(c)] = remap[c.indices.to_numpy()]
        start += len(c)
        offset += len(c.dictionary)
    return values, codes


def _first_appearance(codes: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------

def _npy_ids_path(npy: Path) -> Path:
    base = str(npy)[: -len(".npy")]
    cands = [Path(base + ".ids.parquet"), Path(base + ".ids.npy")]
    found = [c for c in cands if c.is_file()]
    if not found:
        raise DatasetError(f"{npy}: a .npy feature matrix needs its item ids: put them in {cands[0].name} "
                           f"(Parquet, the item id column) or {cands[1].name} (1-D .npy), row r = id of row r")
    if len(found) == 2:
        raise DatasetError(f"{npy}: both {cands[0].name} and {cands[1].name} exist; keep only one id file")
    return found[0]


def _feature_source(name: str, spec) -> dict:
    path = os.fspath(spec)
    if path.endswith(".npy"):
        p = Path(path)
        if not p.is_file():
            raise DatasetError(f"{p}: feature file for modality {name!r} not found")
        ids = _npy_ids_path(p)
        return {"kind": "npy", "files": [str(p.resolve()), str(ids.resolve())], "path": str(p)}
    return {"kind": "parquet", "files": resolve_files(path, f"feature ({name})"), "path": path}


def _check_feature_schemas(name, src, item_col, feature_col, item_kind) -> list:
    metas = []
    for path in src["files"]:
        pf = _open_parquet(path, f"feature ({name})")
        schema = pf.schema_arrow
        metas.append(pf.metadata)
        missing = [c for c in (item_col, feature_col) if c not in schema.names]
        if missing:
            lists = [f.name for f in schema if _vector_type_ok(f.type)]
            hint = f"; list columns here: {lists} (choose one with --feature-col)" if lists else ""
            raise DatasetError(f"{path}: missing column(s) {', '.join(map(repr, missing))} for modality "
                               f"{name!r} (found {schema.names}{hint})")
        _check_feature_id_type(path, item_col, schema.field(item_col).type, item_kind)
        t = schema.field(feature_col).type
        if not _vector_type_ok(t):
            raise DatasetError(f"{path}: column {feature_col!r} has type {_type_name(t)}; a feature vector column "
                               f"must be a list or fixed-size list of floats")
    return metas


def _check_feature_id_type(path, col, t, item_kind):
    kind = _id_kind(t)
    if kind is None:
        raise DatasetError(f"{path}: column {col!r} has type {_type_name(t)}; item ids must be integers or strings")
    if kind != item_kind:
        raise DatasetError(f"{path}: column {col!r} holds {kind} item ids but the interaction item ids are "
                           f"{item_kind}s; they must be the same kind to be matched")


def _duplicate_error(ids: pa.Array, where) -> None:
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    vc = pc.value_counts(ids)
    counts = vc.field("counts").to_numpy()
    dup = vc.field("values")[int(np.argmax(counts > 1))]
    n_dup = int((counts > 1).sum())
    rows = np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))
    raise DatasetError(where(dup.as_py(), rows, n_dup))


FEATURE_VALUES_PER_TASK = 1 << 24        # ~64 MB of float32 per feature-reading task


def _read_parquet_features(ray, sources: dict, metas: dict, item_col, feature_col, item_kind) -> dict:
    """One Ray Data job reads every Parquet modality (tasks of ~64 MB of vectors); -> {name: table}."""
    names = list(sources)
    units = []
    for m, name in enumerate(names):
        t = pq.ParquetFile(sources[name]["files"][0]).schema_arrow.field(feature_col).type
        dim = t.list_size if pa.types.is_fixed_size_list(t) else 512
        units += _work_units(sources[name]["files"], metas[name], max(1024, FEATURE_VALUES_PER_TASK // max(dim, 1)), m)
    tables = _run_units(ray, units, _read_feature_unit,
                        {"item_col": item_col, "feature_col": feature_col, "item_kind": item_kind},
                        f"{', '.join(sources[n]['path'] for n in names)}: reading features")
    table = pa.concat_tables(tables) if tables else None
    out = {}
    for m, name in enumerate(names):
        t = table.filter(pc.equal(table["mod"], m)) if table is not None and len(names) > 1 else table
        if t is None or t.num_rows == 0:
            raise DatasetError(f"{sources[name]['path']}: feature files for modality {name!r} hold no rows")
        out[name] = t
    return out


def _finish_parquet_features(name, src, table: pa.Table, item_col, feature_col) -> tuple[pa.Array, np.ndarray]:
    """Per-row checks of one modality's vectors (flags, lengths, duplicate ids) -> (ids, matrix)."""
    files = src["files"]
    flag = table["flag"].to_numpy()
    lengths = table["len"].to_numpy()

    def locate(row):
        return files[int(table["file"][row].as_py())], row

    if flag.any():
        r = int(np.flatnonzero(flag)[0])
        path, _ = locate(r)
        n_bad = int((flag > 0).sum())
        if flag[r] == 1:
            raise DatasetError(f"{path}: null item id or null vector in column {item_col!r} / {feature_col!r} "
                               f"(item {table['id'][r].as_py()!r}; {n_bad} bad row(s) in modality {name!r})")
        raise DatasetError(f"{path}: column {feature_col!r} holds NaN/inf values (item {table['id'][r].as_py()!r}; "
                           f"{n_bad} vector(s) with NaN/inf in modality {name!r})")
    dims = np.unique(lengths)
    if len(dims) > 1 or dims[0] == 0:
        a = int(np.flatnonzero(lengths == dims[0])[0])
        b = int(np.flatnonzero(lengths != dims[0])[0])
        (pa_, _), (pb, _) = locate(a), locate(b)
        raise DatasetError(f"{pb}: column {feature_col!r} holds vectors of mixed length in modality {name!r}: "
                           f"{lengths[b]} (item {table['id'][b].as_py()!r}) vs {lengths[a]} "
                           f"(item {table['id'][a].as_py()!r} in {pa_})")
    dim = int(dims[0])
    ids = table["id"].combine_chunks()

    def dup_message(value, rows, n_dup):
        places = sorted({locate(int(r))[0] for r in rows[:10]})
        return (f"{', '.join(places)}: duplicate item id {value!r} in column {item_col!r} of modality {name!r} "
                f"({len(rows)} rows; {n_dup} duplicated ids in all)")
    _duplicate_error(ids, dup_message)
    # (rows, dim) views of the blocks, without copying them into one matrix
    blocks = [pc.list_flatten(c).to_numpy().reshape(len(c), dim) for c in table["vec"].chunks if len(c)]
    return ids, blocks


def _load_npy_features(name, src, item_col, item_kind) -> tuple[pa.Array, np.ndarray]:
    path, ids_path = src["files"]
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic != b"\x93NUMPY":
            raise DatasetError(f"{path}: not a .npy file (no NUMPY header) for modality {name!r}")
        mat = np.load(path, mmap_mode="r", allow_pickle=False)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 -- numpy raises ValueError, OSError, EOFError ...
        raise DatasetError(f"{path}: unreadable .npy file for modality {name!r} "
                           f"({type(exc).__name__}: {exc})") from None
    if mat.ndim != 2 or mat.shape[1] == 0:
        raise DatasetError(f"{path}: feature matrix for modality {name!r} must be 2-D (rows, dim), got {mat.shape}")
    if not (np.issubdtype(mat.dtype, np.floating) or np.issubdtype(mat.dtype, np.integer)):
        raise DatasetError(f"{path}: feature matrix for modality {name!r} has non-numeric dtype {mat.dtype}")
    if ids_path.endswith(".parquet"):
        pf = _open_parquet(ids_path, f"feature id ({name})")
        names = pf.schema_arrow.names
        col = item_col if item_col in names else (names[0] if len(names) == 1 else None)
        if col is None:
            raise DatasetError(f"{ids_path}: missing column {item_col!r} (found {names}) for modality {name!r}")
        _check_feature_id_type(ids_path, col, pf.schema_arrow.field(col).type, item_kind)
        ids = _norm_ids(pf.read(columns=[col])[col], item_kind).combine_chunks()
        id_col = col
    else:
        try:
            raw = np.load(ids_path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"{ids_path}: unreadable id .npy for modality {name!r} "
                               f"({type(exc).__name__}: {exc}; ids must be integers or fixed-width strings)") from None
        if raw.ndim != 1:
            raise DatasetError(f"{ids_path}: item ids must be a 1-D array, got shape {raw.shape}")
        kind = "int" if np.issubdtype(raw.dtype, np.integer) else (
            "string" if raw.dtype.kind in "US" else None)
        if kind is None:
            raise DatasetError(f"{ids_path}: item ids have dtype {raw.dtype}; use integers or strings")
        if kind != item_kind:
            raise DatasetError(f"{ids_path}: holds {kind} item ids but the interaction item ids are {item_kind}s; "
                               f"they must be the same kind to be matched")
        ids = pa.array(raw.astype(np.int64) if kind == "int" else raw.astype(str))
        id_col = "ids"
    if ids.null_count:
        raise DatasetError(f"{ids_path}: null item id in column {id_col!r} (modality {name!r})")
    if len(ids) != mat.shape[0]:
        raise DatasetError(f"{ids_path}: {len(ids)} item ids for the {mat.shape[0]} rows of {path} (modality {name!r})")
    _duplicate_error(ids, lambda value, rows, n_dup: (
        f"{ids_path}: duplicate item id {value!r} in column {id_col!r} of modality {name!r} "
        f"(rows {rows[:5].tolist()}; {n_dup} duplicated ids in all)"))
    step = max(1, (1 << 26) // max(1, mat.shape[1]))
    for s in range(0, mat.shape[0], step):
        block = np.asarray(mat[s:s + step])
        bad = ~np.isfinite(block) if np.issubdtype(block.dtype, np.floating) else None
        if bad is not None and bad.any():
            r = s + int(np.argwhere(bad)[0][0])
            raise DatasetError(f"{path}: NaN/inf values in the feature matrix of modality {name!r} "
                               f"(row {r}, item {ids[r].as_py()!r})")
        if block.dtype != np.float32 and np.issubdtype(block.dtype, np.floating):
            with np.errstate(over="ignore"):
                if not np.isfinite(block.astype(np.float32)).all():
                    raise DatasetError(f"{path}: values of modality {name!r} overflow float32 near row {s}")
    return ids, mat


def _dim(mat) -> int:
    return (mat[0] if isinstance(mat, list) else mat).shape[1]


def _align(name, src_path, ids: pa.Array, mat, item_raw: pa.Array, require: bool, item_col) -> tuple:
    """Matrix with row i = item i's vector; missing items get the mean vector (or are refused).

    ``mat``: the vectors in the order of ``ids``, one (rows, dim) array or a list of consecutive blocks.
    """
    pos = pc.index_in(item_raw, value_set=ids)
    present = pos.is_valid().to_numpy(zero_copy_only=False)
    n_missing = int((~present).sum())
    n_items = len(item_raw)
    if n_missing == n_items:
        raise DatasetError(f"{src_path}: none of the {n_items} items has a vector in modality {name!r} "
                           f"(column {item_col!r} matches no interaction item id)")
    if n_missing and require:
        examples = item_raw.filter(pa.array(~present))[:5].to_pylist()
        raise DatasetError(f"{src_path}: {n_missing} of {n_items} items have no vector in modality {name!r} "
                           f"(e.g. {examples}); --require-features refuses them")
    blocks = mat if isinstance(mat, list) else [mat]
    out = np.zeros((n_items, blocks[0].shape[1]), dtype=np.float32)
    # scatter each block's rows to their items (feature row -> item via a hash lookup of the ids)
    item_of = pc.fill_null(pc.index_in(ids, value_set=item_raw), -1).to_numpy().astype(np.int64)
    start, step = 0, 1 << 16
    for block in blocks:
        for s in range(0, len(block), step):
            dest = item_of[start + s:start + s + step][:len(block) - s]
            ok = dest >= 0
            out[dest[ok]] = np.asarray(block[s:s + step][ok], dtype=np.float32)
        start += len(block)
    if n_missing:
        mean = out.sum(axis=0, dtype=np.float64) / (n_items - n_missing)
        out[~present] = mean.astype(np.float32)
    unused = len(ids) - (n_items - n_missing)
    return out, n_missing, unused


# --------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------

def _file_stamp(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _existing_dataset(out: Path, fingerprint: str, overwrite: bool):
    """None: write (out missing, empty, or overwrite); a manifest: out already holds this very dataset."""
    if not out.exists() or overwrite:
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None
    mpath = out / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        manifest = None
    if manifest and manifest.get("prep", {}).get("fingerprint") == fingerprint:
        try:
            verify_files(out, manifest)  # "nothing to do" only for an intact copy
        except DatasetError as exc:
            raise DatasetError(f"{exc}; pass --overwrite to prepare it again") from None
        return manifest
    what = "a different dataset" if manifest else "something that is not a prepared dataset"
    raise DatasetError(f"{out}: output directory already exists and holds {what}; pass --overwrite to replace it")


def prep(interactions, item_features: dict, out, kcore: int = 5, split: str = "mmrec", seed: int = 999,
         partitions: int = 1, partition_method: str = "metis", user_col: str = "user_id",
         item_col: str = "item_id", time_col: str | None = "timestamp", feature_col: str = "embedding",
         require_features: bool = False, overwrite: bool = False, ray_address: str | None = None,
         progress: bool = True) -> dict:
    """Prepare a dataset from raw Parquet logs and item features (module docstring); return its manifest.

    ``interactions``: a Parquet file, directory or glob (or a list of them). ``item_features``: modality
    name -> Parquet file/directory/glob (``item_col`` + list ``feature_col``) or ``.npy`` matrix with the
    ids in a sibling ``<stem>.ids.parquet`` / ``<stem>.ids.npy``; insertion order = modality order.
    ``time_col=None`` (or "") means the log has no timestamp: duplicates are exact (user, item) rows and
    only the ``mmrec`` split is possible. If ``out`` already holds the dataset these very inputs and
    options produce (same fingerprint), nothing is done and its manifest is returned.
    """
    say = _Progress(progress)
    out = Path(out)
    time_col = time_col or None
    if split not in SPLITS:
        raise DatasetError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "temporal" and not time_col:
        raise DatasetError("the temporal split needs a timestamp column (--time-col)")
    if partition_method not in METHODS:
        raise DatasetError(f"--partition-method must be one of {', '.join(METHODS)}, got {partition_method!r}")
    if int(kcore) != kcore or kcore < 0:
        raise DatasetError(f"--kcore must be a non-negative integer, got {kcore!r}")
    if int(partitions) != partitions or partitions < 1:
        raise DatasetError(f"--partitions must be a positive integer, got {partitions!r}")
    if not item_features:
        raise DatasetError("at least one --item-features NAME=PATH is required")
    if len({user_col, item_col, time_col} - {None}) != (3 if time_col else 2):
        raise DatasetError("--user-col, --item-col and --time-col must name different columns")

    inter_files = resolve_files(interactions, "interaction")
    sources = {}
    for name, spec in item_features.items():
        check_modality_name(name, os.fspath(spec))
        sources[name] = _feature_source(name, spec)
    options = {"kcore": int(kcore), "split": split, "seed": int(seed), "partitions": int(partitions),
               "partition_method": partition_method, "user_col": user_col, "item_col": item_col,
               "time_col": time_col, "feature_col": feature_col, "require_features": bool(require_features)}
    stamps = {"interactions": [_file_stamp(f) for f in inter_files],
              "features": {n: [_file_stamp(f) for f in s["files"]] for n, s in sources.items()}}
    fingerprint = hashlib.sha256(json.dumps({"version": PREP_VERSION, "options": options, "inputs": stamps},
                                            sort_keys=True).encode()).hexdigest()
    existing = _existing_dataset(out, fingerprint, overwrite)
    if existing is not None:
        say("done", f"{out} already holds this dataset (same inputs and options); nothing to do")
        return existing
    replace = out.exists()

    # 1. schemas (driver: Parquet footers only)
    info = _check_interaction_schemas(inter_files, user_col, item_col, time_col)
    item_kind = info["item_kind"]
    feature_metas = {n: (_check_feature_schemas(n, s, item_col, feature_col, item_kind)
                         if s["kind"] == "parquet" else None) for n, s in sources.items()}
    n_input = info["rows"]
    say("schema", f"{len(inter_files)} interaction file(s), {_fmt(n_input)} rows; ids: user {info['user_kind']}, "
                  f"item {item_kind}; modalities {', '.join(sources)}")
    if n_input == 0:
        raise DatasetError(f"{inter_files[0]}: the interaction files hold no rows")

    t_enter = time.perf_counter()
    with ray_session(ray_address, say) as ray:
        ray_seconds = time.perf_counter() - t_enter
        # 2. read (Ray Data)
        units = _work_units(inter_files, info["metas"])
        tables = _run_units(ray, units, _read_interaction_unit,
                            {"user_col": user_col, "item_col": item_col, "time_col": time_col,
                             "user_kind": info["user_kind"], "item_kind": item_kind, "time_kind": info["time_kind"]},
                            f"{interactions}: reading interactions")
        table = pa.concat_tables(tables) if tables else None
        n_valid = table.num_rows if table is not None else 0
        dropped_null = n_input - n_valid
        say("read", f"{_fmt(n_valid)} rows in {len(units)} Ray task(s); {_fmt(dropped_null)} with a null "
                    f"user id, item id or timestamp dropped")
        if n_valid == 0:
            raise DatasetError(f"{inter_files[0]}: every row has a null {user_col!r}, {item_col!r} or "
                               f"{time_col!r} value")
        raw_feats = {}
        parquet_sources = {n: s for n, s in sources.items() if s["kind"] == "parquet"}
        parquet_tables = _read_parquet_features(ray, parquet_sources, feature_metas, item_col, feature_col,
                                                item_kind) if parquet_sources else {}
        for name, src in sources.items():
            if src["kind"] == "parquet":
                raw_feats[name] = _finish_parquet_features(name, src, parquet_tables.pop(name), item_col,
                                                           feature_col)
            else:
                raw_feats[name] = _load_npy_features(name, src, item_col, item_kind)
            say("read", f"modality {name!r}: {_fmt(len(raw_feats[name][0]))} vectors of dim "
                        f"{_dim(raw_feats[name][1])}")

        # raw ids -> codes in order of first appearance (the tasks dictionary-encoded each block)
        user_dict, u_code = unify_dictionaries(table[_U])
        item_dict, i_code = unify_dictionaries(table[_I])
        times = np.array(table[_T].to_numpy(), copy=True)
        del table, tables
        say("encode", f"{_fmt(len(user_dict))} distinct users, {_fmt(len(item_dict))} distinct items")

        # 3. exact duplicates
        dup = duplicate_rows(u_code, i_code, times, len(item_dict))
        if len(dup):
            keep = np.ones(len(u_code), dtype=bool)
            keep[dup] = False
            u_code, i_code, times = u_code[keep], i_code[keep], times[keep]
            del keep
        key_cols = f"({user_col}, {item_col}, {time_col})" if time_col else f"({user_col}, {item_col})"
        say("dedup", f"{_fmt(len(dup))} exact duplicate {key_cols} rows dropped; {_fmt(len(u_code))} left")

        # 4. k-core
        n_before = len(u_code)
        idx, rounds = kcore_filter(u_code, i_code, int(kcore), len(user_dict), len(item_dict))
        if len(idx) != n_before:
            u_code, i_code, times = u_code[idx], i_code[idx], times[idx]
        del idx
        dropped_kcore = n_before - len(u_code)
        if len(u_code) == 0:
            raise DatasetError(f"{interactions}: all {_fmt(n_before)} interactions were removed by the "
                               f"{kcore}-core filter on columns {user_col!r} and {item_col!r} (no set of users "
                               f"and items has >= {kcore} interactions each); lower --kcore")
        say("k-core", f"{kcore}-core reached after {rounds} filtering round(s): {_fmt(dropped_kcore)} rows "
                      f"dropped; {_fmt(len(u_code))} left")

        # 5. dense re-indexing in order of first appearance
        users, u_first = _first_appearance(u_code, len(user_dict))
        items, i_first = _first_appearance(i_code, len(item_dict))
        del u_code, i_code
        num_users, num_items = len(u_first), len(i_first)
        user_raw = user_dict.take(pa.array(u_first))
        item_raw = item_dict.take(pa.array(i_first))
        del user_dict, item_dict
        say("re-index", f"{_fmt(num_users)} users, {_fmt(num_items)} items")

        # 6. split
        if split == "mmrec":
            labels = mmrec_split(users, num_users, np.random.default_rng(int(seed)))
        else:
            labels = temporal_split(users, times, num_users)
        counts = np.bincount(labels, minlength=3)
        say("split", f"{split}: train {_fmt(counts[0])}, valid {_fmt(counts[1])}, test {_fmt(counts[2])}")

        # 7. features
        features, feature_info = {}, {}
        for name, (ids, mat) in raw_feats.items():
            src = sources[name]
            aligned, n_missing, unused = _align(name, src["path"], ids, mat, item_raw, require_features, item_col)
            features[name] = aligned
            feature_info[name] = {"source": src["path"], "dim": int(aligned.shape[1]), "vectors": int(len(ids)),
                                  "missing": n_missing, "unused": int(unused),
                                  "fill": "mean" if n_missing else None}
            say("features", f"{name}: {aligned.shape[1]}-d, {_fmt(n_missing)} items without a vector"
                            f"{' (mean vector)' if n_missing else ''}, {_fmt(unused)} vectors of unknown items "
                            f"ignored")
        del raw_feats

        # 8. partitions
        train = labels == 0
        tu, ti = users[train], items[train]
        node_part = partition_nodes(num_users, num_items, tu, ti, int(partitions), partition_method, int(seed))
        pstats = partition_stats(node_part, num_users, tu, ti, int(partitions))
        del tu, ti, train
        method = partition_method if partitions > 1 else "single"
        say("partition", f"{partitions} part(s) ({method}): train edges per part {pstats['train_edges']}, "
                         f"edge cut {100 * pstats['edge_cut_fraction']:.1f}%")

        # 9. write
        manifest_extra = {
            "source": "prep",
            "kcore": int(kcore), "split": split, "seed": int(seed),
            "partitions": int(partitions), "partition_method": method,
            "input_rows": int(n_input),
            "dropped": {"null": int(dropped_null), "duplicate": int(len(dup)), "kcore": int(dropped_kcore)},
            "kcore_rounds": int(rounds),
            "missing_features": {n: v["missing"] for n, v in feature_info.items()},
            "features": feature_info,
            "id_types": {"user": info["user_kind"], "item": item_kind},
            "prep": {"version": PREP_VERSION, "fingerprint": fingerprint, "options": options,
                     "interactions": inter_files},
        }
        time_arr = times.astype(np.float64 if info["time_kind"] == "float" else np.int64, copy=False)
        extra = {"timestamp": time_arr} if time_col else None
        manifest = write_dataset(
            out, users=users, items=items, split=labels, num_users=num_users, num_items=num_items,
            features=features, user_raw_ids=user_raw, item_raw_ids=item_raw, extra_columns=extra,
            manifest_extra=manifest_extra, overwrite=overwrite or replace,
            write_extra=lambda tmp: write_partitions(tmp, node_part, method=method, num_users=num_users,
                                                     num_items=num_items, stats=pstats))
        say("write", f"{out} ({len(manifest['files'])} files)")
    if progress:
        print(summary_table(manifest, pstats, say.elapsed(), ray_seconds), flush=True)
    return manifest


def summary_table(manifest: dict, pstats: dict | None = None, seconds: float | None = None,
                  ray_seconds: float = 0.0) -> str:
    """The end-of-job table: rows left and dropped after each step, split, features, partitions, time."""
    d = manifest["dropped"]
    n0 = manifest["input_rows"]
    n1 = n0 - d["null"]
    n2 = n1 - d["duplicate"]
    n3 = n2 - d["kcore"]
    rows = [("input rows", n0, ""), ("null ids / timestamps", n1, d["null"]),
            ("exact duplicates", n2, d["duplicate"]),
            (f"{manifest['kcore']}-core ({manifest['kcore_rounds']} rounds)", n3, d["kcore"])]
    lines = ["", f"{'step':<28}{'rows':>14}{'dropped':>12}"]
    lines += [f"{name:<28}{_fmt(n):>14}{(_fmt(x) if x != '' else ''):>12}" for name, n, x in rows]
    lines.append(f"{'users / items':<28}{_fmt(manifest['num_users']) + ' / ' + _fmt(manifest['num_items']):>14}")
    lines.append(f"{'train / valid / test':<28}"
                 f"{' / '.join(_fmt(manifest[k]) for k in ('num_train', 'num_valid', 'num_test')):>14}"
                 f"  ({manifest['split']} split, seed {manifest['seed']})")
    for name, f in manifest.get("features", {}).items():
        lines.append(f"{'features ' + name:<28}{str(f['dim']) + '-d':>14}{_fmt(f['missing']):>12} missing"
                     f"{' -> mean' if f['missing'] else ''}")
    if pstats is not None:
        lines.append(f"{'partitions':<28}{manifest['partitions']:>14}  ({manifest['partition_method']}; "
                     f"edge cut {100 * pstats['edge_cut_fraction']:.1f}%)")
    if seconds is not None:
        work = max(seconds - ray_seconds, 1e-9)
        lines.append(f"{'time':<28}{seconds:>13.1f}s  (Ray start-up {ray_seconds:.1f}s; "
                     f"{n0 / work:,.0f} input rows/s without it)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

def cmd_prep(args) -> int:
    try:
        prep(args.interactions, parse_named_paths(args.item_features, "--item-features"), args.out, kcore=args.kcore, split=args.split,
             seed=args.seed, partitions=args.partitions, partition_method=args.partition_method,
             user_col=args.user_col, item_col=args.item_col, time_col=args.time_col,
             feature_col=args.feature_col, require_features=args.require_features, overwrite=args.overwrite,
             ray_address=args.ray_address)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``prep`` subcommand to an ``argparse`` subparsers object; returns the sub-parser."""
    p = subparsers.add_parser("prep", help="Ray job: raw Parquet logs + item features -> prepared dataset",
                              description=__doc__.splitlines()[0])
    p.add_argument("--interactions", required=True, metavar="PATH",
                   help="interaction log: Parquet file, directory or glob")
    p.add_argument("--item-features", action="append", required=True, metavar="NAME=PATH",
                   help="modality vectors: Parquet (item id + list column) or .npy with a <stem>.ids.parquet/.npy "
                        "sibling; repeat per modality (first = contrastive anchor)")
    p.add_argument("--out", required=True, metavar="DIR", help="prepared dataset directory to write")
    p.add_argument("--kcore", type=int, default=5, help="iterative k-core on users and items (default 5)")
    p.add_argument("--split", choices=SPLITS, default="mmrec", help="per-user split rule (default mmrec)")
    p.add_argument("--seed", type=int, default=999, help="seed of the mmrec split and random partitioning")
    p.add_argument("--partitions", type=int, default=1, metavar="P", help="graph partitions (default 1)")
    p.add_argument("--partition-method", choices=METHODS, default="metis")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp", help="timestamp column ('' if the log has none)")
    p.add_argument("--feature-col", default="embedding", help="vector column of the feature Parquet files")
    p.add_argument("--require-features", action="store_true",
                   help="refuse items without a feature vector instead of giving them the mean vector")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    p.set_defaults(func=cmd_prep)
    return p


def main(argv=None) -> int:
    from lgmrec_dist.cli import run_subcommand
    return run_subcommand(register_cli, "prep", argv)


if __name__ == "__main__":
    sys.exit(main())
