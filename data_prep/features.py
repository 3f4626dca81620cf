"""``lgmrec prep`` for item features: the sources of a modality (Parquet or ``.npy`` + ids), their checks,
the Ray Data read of the Parquet ones, and stage 7, the alignment to the item index (docs/prep.md).

The vectors stay where they were read (the Ray object store, or the .npy file); the driver holds the
feature rows' ids, lengths and flags, and Ray tasks write the aligned matrices.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lgmrec_dist.dataset import DatasetError
from data_prep.files import open_parquet, resolve_files
from data_prep.ray_session import fail_in_task
from data_prep.blocks import call
from data_prep.reading import id_kind, norm_ids, run_unit_refs, type_name, vector_type_ok, work_units


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


def feature_source(name: str, spec) -> dict:
    path = os.fspath(spec)
    if path.endswith(".npy"):
        p = Path(path)
        if not p.is_file():
            raise DatasetError(f"{p}: feature file for modality {name!r} not found")
        ids = _npy_ids_path(p)
        return {"kind": "npy", "files": [str(p.resolve()), str(ids.resolve())], "path": str(p)}
    return {"kind": "parquet", "files": resolve_files(path, f"feature ({name})"), "path": path}


def check_feature_schemas(name, src, item_col, feature_col, item_kind) -> list:
    metas = []
    for path in src["files"]:
        pf = open_parquet(path, f"feature ({name})")
        schema = pf.schema_arrow
        metas.append(pf.metadata)
        missing = [c for c in (item_col, feature_col) if c not in schema.names]
        if missing:
            lists = [f.name for f in schema if vector_type_ok(f.type)]
            hint = f"; list columns here: {lists} (choose one with --feature-col)" if lists else ""
            raise DatasetError(f"{path}: missing column(s) {', '.join(map(repr, missing))} for modality "
                               f"{name!r} (found {schema.names}{hint})")
        _check_feature_id_type(path, item_col, schema.field(item_col).type, item_kind)
        t = schema.field(feature_col).type
        if not vector_type_ok(t):
            raise DatasetError(f"{path}: column {feature_col!r} has type {type_name(t)}; a feature vector column "
                               f"must be a list or fixed-size list of floats")
    return metas


def _check_feature_id_type(path, col, t, item_kind):
    kind = id_kind(t)
    if kind is None:
        raise DatasetError(f"{path}: column {col!r} has type {type_name(t)}; item ids must be integers or strings")
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
            fail_in_task(f"{path}: cannot read feature rows ({str(exc).splitlines()[0]})")
        n = t.num_rows
        try:
            ids = norm_ids(t[item_col], item_kind).combine_chunks()
            vec = t[feature_col].combine_chunks()
            vec = pc.cast(vec, pa.list_(pa.float32()), safe=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            fail_in_task(f"{path}: cannot convert column {feature_col!r} to list<float32> "
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


def read_parquet_features(ray, sources: dict, metas: dict, item_col, feature_col, item_kind,
                          values_per_task: int) -> dict:
    """One Ray Data job reads every Parquet modality (tasks of about ``values_per_task`` vector values);
    -> {name: table}."""
    names = list(sources)
    units = []
    for m, name in enumerate(names):
        t = pq.ParquetFile(sources[name]["files"][0]).schema_arrow.field(feature_col).type
        dim = t.list_size if pa.types.is_fixed_size_list(t) else 512
        units += work_units(sources[name]["files"], metas[name], max(1024, values_per_task // max(dim, 1)), m)
    refs = run_unit_refs(ray, units, _read_feature_unit,
                         {"item_col": item_col, "feature_col": feature_col, "item_kind": item_kind},
                         f"{', '.join(sources[n]['path'] for n in names)}: reading features")
    metas_ = ray.get([call(_without_vectors, r)[0] for r in refs])   # ids, lengths, flags: no vectors
    out = {}
    for m, name in enumerate(names):
        parts = [t.filter(pc.equal(t["mod"], m)) for t in metas_]
        chunks = [{"ref": r, "mod": m, "n": t.num_rows} for r, t in zip(refs, parts) if t.num_rows]
        if not chunks:
            raise DatasetError(f"{sources[name]['path']}: feature files for modality {name!r} hold no rows")
        out[name] = (pa.concat_tables([t for t in parts if t.num_rows]), chunks)
    return out


def _without_vectors(table: pa.Table) -> pa.Table:
    return table.drop_columns(["vec"])


def finish_parquet_features(name, src, read: tuple, item_col, feature_col) -> tuple[pa.Array, dict]:
    """Per-row checks of one modality's vectors (flags, lengths, duplicate ids) -> (ids, vector source).

    ``read``: the rows' ids, lengths and flags (no vectors) and the chunks of vectors in the object store."""
    table, chunks = read
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
    return ids, {"dim": dim, "chunks": chunks}


def load_npy_features(name, src, item_col, item_kind) -> tuple[pa.Array, np.ndarray]:
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
        pf = open_parquet(ids_path, f"feature id ({name})")
        names = pf.schema_arrow.names
        col = item_col if item_col in names else (names[0] if len(names) == 1 else None)
        if col is None:
            raise DatasetError(f"{ids_path}: missing column {item_col!r} (found {names}) for modality {name!r}")
        _check_feature_id_type(ids_path, col, pf.schema_arrow.field(col).type, item_kind)
        ids = norm_ids(pf.read(columns=[col])[col], item_kind).combine_chunks()
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
    chunks = [{"npy": path, "start": a, "n": min(step, mat.shape[0] - a)} for a in range(0, mat.shape[0], step)]
    return ids, {"dim": int(mat.shape[1]), "chunks": chunks}


def align(name, src_path, ids: pa.Array, source: dict, item_raw: pa.Array, require: bool, item_col) -> tuple:
    """The item of each vector (-1: unknown item), per chunk of ``source``; missing items get the mean
    vector (or are refused). -> (source with ``item_of`` per chunk, items without a vector, unused vectors)."""
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
    # feature row -> item via a hash lookup of the ids (a per-item array, no vectors)
    item_of = pc.fill_null(pc.index_in(ids, value_set=item_raw), -1).to_numpy().astype(np.int64)
    bounds = np.cumsum([0] + [c["n"] for c in source["chunks"]])
    chunks = [dict(c, item_of=item_of[a:b]) for c, a, b in zip(source["chunks"], bounds[:-1], bounds[1:])]
    unused = len(ids) - (n_items - n_missing)
    return dict(source, chunks=chunks, missing=n_missing), n_missing, unused


# --------------------------------------------------------------------------------------------------
# the aligned matrices, written by Ray tasks (the driver never holds a vector)
# --------------------------------------------------------------------------------------------------

def _chunk_vectors(chunk: dict, dim: int) -> np.ndarray:
    if "npy" in chunk:
        return np.asarray(np.load(chunk["npy"], mmap_mode="r")[chunk["start"]:chunk["start"] + chunk["n"]],
                          dtype=np.float32)
    import ray
    table = ray.get(chunk["ref"])
    vec = table["vec"].filter(pc.equal(table["mod"], chunk["mod"])).combine_chunks()
    return pc.list_flatten(vec).to_numpy().reshape(len(vec), dim)


def _chunk_sum(chunk: dict, dim: int) -> np.ndarray:
    known = chunk["item_of"] >= 0
    return _chunk_vectors(chunk, dim)[known].sum(axis=0, dtype=np.float64)


def mean_vector(ray, source: dict, n_present: int) -> np.ndarray:
    """The mean of the vectors of known items (sums per chunk in tasks, added here)."""
    sums = ray.get([call(_chunk_sum, c, source["dim"])[0] for c in source["chunks"]])
    return (np.sum(sums, axis=0) / n_present).astype(np.float32)


def _write_matrix(path: str, dest_of_item: np.ndarray, rows: int, source: dict, mean) -> str:
    """Ray task: the matrix whose row dest_of_item[i] is item i's vector (``mean`` where an item has none),
    streamed chunk by chunk into a memory-mapped .npy; -> its sha256."""
    from lgmrec_dist.dataset import sha256_file
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, source["dim"]))
    written = np.zeros(rows, dtype=bool)
    for chunk in source["chunks"]:
        item_of = chunk["item_of"]
        known = item_of >= 0
        dest = np.full(len(item_of), -1, dtype=np.int64)
        dest[known] = dest_of_item[item_of[known]]
        ok = dest >= 0
        if ok.any():
            out[dest[ok]] = _chunk_vectors(chunk, source["dim"])[ok]
            written[dest[ok]] = True
    if not written.all():
        out[~written] = mean
    out.flush()
    del out
    return sha256_file(path)


def write_matrices(ray, jobs: list[tuple[str, np.ndarray, int]], source_ref, mean) -> list:
    """One Ray task per (path, dest_of_item, rows) -> refs of the files' sha256."""
    return [call(_write_matrix, path, dest, rows, source_ref, mean)[0] for path, dest, rows in jobs]
