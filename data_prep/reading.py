"""``lgmrec prep`` stages 1 and 2 for the interaction log: Parquet footers checked on the driver, then
the row groups read and normalised in Ray Data tasks (docs/prep.md).

Why not ``ray.data.read_parquet``: with ``fsspec`` installed but ``aiohttp`` missing, Ray's parallel
path resolution races on ``import fsspec.implementations.http`` and either fails with ``ImportError`` or
silently *skips* input paths. The files are listed by :mod:`data_prep.files` and their row groups read
with pyarrow inside Ray Data tasks (``from_items`` + ``map_batches``), which also lets every error name
its file. The column helpers here (id kinds, normalisation) are shared with :mod:`data_prep.features`.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lgmrec_dist.dataset import DatasetError
from data_prep.files import open_parquet
from data_prep.ray_session import fail_in_task, ray_errors

ROWS_PER_TASK = 1 << 20                 # row groups are bundled into Ray tasks of about this many rows
# normalised column names inside the Ray blocks
U, I, T = "u", "i", "t"


def type_name(t: pa.DataType) -> str:
    return str(t)


def id_kind(t: pa.DataType) -> str | None:
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


def vector_type_ok(t: pa.DataType) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)))


def norm_ids(col, kind: str):
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


def work_units(files: list[str], metas: list, rows_per_task: int = ROWS_PER_TASK, mod: int = 0) -> list[dict]:
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


def check_interaction_schemas(files, user_col, item_col, time_col) -> dict:
    kinds = {user_col: None, item_col: None}
    first = {}
    time_kind = None
    rows, metas = 0, []
    for path in files:
        pf = open_parquet(path, "interaction")
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
            kind = id_kind(t)
            if kind is None:
                hint = (" (float ids usually come from pandas with missing values: cast the column to Int64"
                        " or string)") if pa.types.is_floating(t) else ""
                raise DatasetError(f"{path}: column {col!r} has type {type_name(t)}; ids must be integers or "
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
                raise DatasetError(f"{path}: column {time_col!r} has type {type_name(t)}; the timestamp must be an "
                                   f"integer, timestamp, date or float column")
            time_kind = "float" if "float" in (k, time_kind) else k
    return {"user_kind": kinds[user_col], "item_kind": kinds[item_col], "time_kind": time_kind or "int",
            "rows": rows, "metas": metas}


def read_interaction_unit(batch: pa.Table, user_col, item_col, time_col, user_kind, item_kind, time_kind):
    """Ray task: read row groups of one file, normalise the columns, drop null rows."""
    out = []
    for path, groups in zip(batch["path"].to_pylist(), batch["row_groups"].to_pylist()):
        cols = [user_col, item_col] + ([time_col] if time_col else [])
        try:
            t = pq.ParquetFile(path).read_row_groups(groups, columns=cols)
        except (OSError, pa.ArrowException) as exc:
            fail_in_task(f"{path}: cannot read interaction rows ({str(exc).splitlines()[0]})")
        try:
            u = norm_ids(t[user_col], user_kind)
            i = norm_ids(t[item_col], item_kind)
            ts = _norm_time(t[time_col], time_kind) if time_col else pa.chunked_array(
                [np.zeros(t.num_rows, dtype=np.int64)])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            fail_in_task(f"{path}: cannot convert the id/timestamp columns ({str(exc).splitlines()[0]})")
        table = pa.table({U: u, I: i, T: ts})
        if u.null_count or i.null_count or ts.null_count:
            valid = pc.and_(pc.and_(pc.is_valid(u), pc.is_valid(i)), pc.is_valid(ts))
            table = table.filter(valid)
        out.append(table)
    table = pa.concat_tables(out)
    # hash the raw ids here, in parallel: per-block dictionaries (first-appearance order) + int32 indices
    return pa.table({U: table[U].combine_chunks().dictionary_encode(),
                     I: table[I].combine_chunks().dictionary_encode(), T: table[T]})


def run_unit_refs(ray, units: list[dict], fn, fn_kwargs: dict, what: str) -> list:
    """The units through ``fn`` in Ray Data tasks: -> refs of the output blocks (left in the object store)."""
    items = [{"mod": u["mod"], "file": u["file"], "path": u["path"], "row_groups": u["row_groups"]} for u in units]
    with ray_errors(what):
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            fn, batch_format="pyarrow", batch_size=None, fn_kwargs=fn_kwargs)
        return list(ds.to_arrow_refs())


def run_units(ray, units: list[dict], fn, fn_kwargs: dict, what: str) -> list[pa.Table]:
    refs = run_unit_refs(ray, units, fn, fn_kwargs, what)
    with ray_errors(what):
        return [t for t in ray.get(refs) if t.num_rows]


def read_interactions(ray, files: list[str], metas: list, info: dict, user_col, item_col, time_col,
                      what: str) -> tuple[list, int]:
    """Stage 2 for the log: one Ray task per ~``ROWS_PER_TASK`` rows -> (refs of U/I/T blocks, tasks)."""
    units = work_units(files, metas)
    refs = run_unit_refs(ray, units, read_interaction_unit,
                         {"user_col": user_col, "item_col": item_col, "time_col": time_col,
                          "user_kind": info["user_kind"], "item_kind": info["item_kind"],
                          "time_kind": info["time_kind"]}, what)
    return refs, len(units)
