"""Import and export of MMRec-format data (docs/model.md §3, splits §2, id counts §1.1).

An MMRec dataset folder ``data/<name>/`` holds

* ``<name>.inter`` -- tab-separated text with a header row and the columns ``userID``, ``itemID``,
  ``rating``, ``timestamp``, ``x_label`` (§3). Only ``userID``, ``itemID`` and ``x_label`` are required;
  ``rating`` and ``timestamp`` are kept as extra interaction columns when present. ``x_label`` is the
  per-user split label, 0 = train, 1 = valid, 2 = test (§2).
* ``image_feat.npy``, ``text_feat.npy`` -- one row per item, row i = itemID i (§3). The image matrix is
  stored as float64 by the MMRec notebook; like the MMRec loader, we cast to float32.

The ids are already dense (0-based, re-indexed, §3), so they are used as they are: dense id = MMRec id,
and the id maps of the prepared dataset record the MMRec ids themselves as raw ids.
``num_users = max userID + 1`` and ``num_items = max itemID + 1`` over the whole file (§1.1).

:func:`import_mmrec` validates everything before anything is written and writes the prepared dataset
directory (``lgmrec_dist.dataset``) atomically, so a bad input leaves nothing behind. Every error is a
:class:`~lgmrec_dist.dataset.DatasetError` whose message names the offending file (and column / row where
that applies). :func:`export_mmrec` is its inverse: ``import_mmrec(export_mmrec(D))`` reproduces D's
interactions (in order), splits, extra columns and features bit for bit.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lgmrec_dist.dataset import (INTERACTIONS, DatasetError, PreparedDataset, atomic_directory,
                                 check_features, write_dataset)

USER_COL, ITEM_COL, LABEL_COL = "userID", "itemID", "x_label"
RATING_COL, TIME_COL = "rating", "timestamp"
REQUIRED_COLUMNS = (USER_COL, ITEM_COL, LABEL_COL)
OPTIONAL_COLUMNS = (RATING_COL, TIME_COL)
INTER_HEADER = (USER_COL, ITEM_COL, RATING_COL, TIME_COL, LABEL_COL)
# Dense MMRec ids; a larger max id would make the id maps absurdly large (and is certainly not a
# re-indexed MMRec file).
MAX_ID = 2**31 - 1
# ids below the max id that no interaction uses (users/items without interactions) allowed on top of the
# distinct ids: the id space, and every array over it, stays within the input's size plus this many rows
MAX_ID_GAPS = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_INT_RE = r"^-?[0-9]+$"
_NUM_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$|^[+-]?(nan|NaN|inf|Inf|infinity)$"

__all__ = ["import_mmrec", "export_mmrec", "read_inter", "load_feature", "feature_filename",
           "INTER_HEADER", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS"]


def feature_filename(modality: str) -> str:
    """MMRec's file name for a modality matrix: ``image`` -> ``image_feat.npy`` (§3)."""
    return f"{modality}_feat.npy"


def check_modality_name(name: str, source: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DatasetError(f"{source}: invalid modality name {name!r} (use letters, digits, '_', '-', '.')")


# --------------------------------------------------------------------------------------------------
# reading and validating
# --------------------------------------------------------------------------------------------------

def _read_header(path: Path) -> list[str]:
    try:
        with open(path, "rb") as fh:
            first = fh.readline()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read interaction file ({exc.strerror or exc})") from None
    try:
        line = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: header row is not UTF-8 text (expected a tab-separated .inter file)") from None
    if not line.strip():
        raise DatasetError(f"{path}: empty interaction file (expected a header row with "
                           f"{', '.join(REQUIRED_COLUMNS)} and at least one interaction)")
    return line.split("\t")


def _first_index(mask) -> int:
    """Index of the first True in a pyarrow boolean array (nulls count as True)."""
    arr = pc.fill_null(mask, True).to_numpy(zero_copy_only=False)
    return int(np.flatnonzero(arr)[0])


def _diagnose_integer_column(path: Path, column: str, parse, read) -> DatasetError | None:
    """Slow path, only after the fast int64 parse failed: find the first row that is not an integer."""
    try:
        col = pacsv.read_csv(path, read_options=read, parse_options=parse,
                             convert_options=pacsv.ConvertOptions(
                                 include_columns=[column], column_types={column: pa.string()}))[column]
    except pa.ArrowInvalid:
        return None
    bad = pc.invert(pc.fill_null(pc.match_substring_regex(col, _INT_RE), True))
    if not pc.any(bad).as_py():
        return None
    row = _first_index(bad)
    return DatasetError(f"{path}: column {column!r}, data row {row + 1}: {col[row].as_py()!r} is not an integer")


def read_inter(path: str | Path) -> dict:
    """Read and validate an MMRec ``.inter`` file (§3).

    Returns ``{"users", "items", "split", "num_users", "num_items", "extra"}``; ``users``/``items`` are
    int64, ``split`` int8, ``extra`` holds ``rating`` (float64) and/or ``timestamp`` (int64 when all
    values are integral, else float64) when the file has those columns. Raises :class:`DatasetError`
    naming the file (and column / data row, 1-based, header excluded) on any problem.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: interaction file not found")
    if not path.is_file():
        raise DatasetError(f"{path}: interaction file is not a regular file")
    header = _read_header(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(map(repr, missing))} in the header "
                           f"(found {header}; an MMRec .inter file is tab-separated with columns "
                           f"{', '.join(INTER_HEADER)})")
    optional = [c for c in OPTIONAL_COLUMNS if c in header]
    parse = pacsv.ParseOptions(delimiter="\t")
    read = pacsv.ReadOptions(block_size=1 << 24)
    types = {c: pa.int64() for c in REQUIRED_COLUMNS} | {c: pa.string() for c in optional}
    convert = pacsv.ConvertOptions(include_columns=list(REQUIRED_COLUMNS) + optional, column_types=types)
    try:
        table = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        if "conversion error" in str(exc):
            for col in REQUIRED_COLUMNS:
                err = _diagnose_integer_column(path, col, parse, read)
                if err is not None:
                    raise err from None
        raise DatasetError(f"{path}: cannot parse interaction file: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read interaction file ({exc})") from None
    if table.num_rows == 0:
        raise DatasetError(f"{path}: interaction file has a header but no interaction rows")

    cols = {}
    for col in REQUIRED_COLUMNS:
        arr = table[col]
        if arr.null_count:
            row = _first_index(arr.is_null())
            raise DatasetError(f"{path}: column {col!r}, data row {row + 1}: empty value")
        cols[col] = arr.to_numpy().astype(np.int64, copy=False)
    for col in (USER_COL, ITEM_COL):
        neg = cols[col] < 0
        if neg.any():
            row = int(np.flatnonzero(neg)[0])
            raise DatasetError(f"{path}: column {col!r}, data row {row + 1}: negative id {cols[col][row]}")
        if cols[col].max() > MAX_ID:
            row = int(np.argmax(cols[col]))
            raise DatasetError(f"{path}: column {col!r}, data row {row + 1}: id {cols[col][row]} is too large "
                               f"(MMRec ids are dense, 0-based)")
        span = int(cols[col].max()) + 1
        if span > MAX_ID_GAPS:  # checked before anything of size ``span`` is allocated
            distinct = len(np.unique(cols[col]))
            if span > distinct + MAX_ID_GAPS:
                row = int(np.argmax(cols[col]))
                raise DatasetError(f"{path}: column {col!r}, data row {row + 1}: id {span - 1} makes an id space of "
                                   f"{span} for {distinct} distinct ids; MMRec ids are dense (0-based, re-indexed), "
                                   f"at most {MAX_ID_GAPS} ids may be unused")
    label = cols[LABEL_COL]
    bad = (label < 0) | (label > 2)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{path}: column {LABEL_COL!r}, data row {row + 1}: value {label[row]} is not a "
                           f"split label (0 train, 1 valid, 2 test)")

    extra = {}
    for col in optional:   # read as text: per-block type inference could reject valid files
        arr = table[col]
        try:
            if col == RATING_COL:
                values = pc.cast(arr, pa.float64()).to_numpy()
            else:
                try:
                    values = pc.cast(arr, pa.int64()).to_numpy()
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    values = pc.cast(arr, pa.float64()).to_numpy()
                    if (np.isfinite(values).all() and (values == np.round(values)).all()
                            and np.abs(values).max() < 2**62):
                        values = values.astype(np.int64)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            num = pc.match_substring_regex(arr, _NUM_RE)
            if pc.all(num).as_py():
                raise DatasetError(f"{path}: column {col!r}: {exc}") from None
            row = _first_index(pc.invert(num))
            value = arr[row].as_py()
            what = "empty value" if value == "" else f"{value!r} is not a number"
            raise DatasetError(f"{path}: column {col!r}, data row {row + 1}: {what}") from None
        extra[col] = values
    users, items = cols[USER_COL], cols[ITEM_COL]
    return {"users": users, "items": items, "split": label.astype(np.int8),
            "num_users": int(users.max()) + 1, "num_items": int(items.max()) + 1, "extra": extra}


def load_feature(name: str, path: str | Path, num_items: int, inter_name: str | None = None) -> np.ndarray:
    """Load one MMRec feature ``.npy`` and validate it (2-D, ``num_items`` rows, finite) -> float32.

    ``inter_name`` (the ``.inter`` file the item count came from) only makes the row-count message clearer.
    """
    path = Path(path)
    check_modality_name(name, str(path))
    if not path.exists():
        raise DatasetError(f"{path}: feature file for modality {name!r} not found")
    if not path.is_file():
        raise DatasetError(f"{path}: feature file for modality {name!r} is not a regular file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read feature file for modality {name!r} ({exc.strerror or exc})") from None
    if magic != b"\x93NUMPY":
        raise DatasetError(f"{path}: not a .npy file (no NUMPY header) for modality {name!r}")
    try:
        # mmap keeps a float64 4096-d matrix from being held twice while it is cast to float32
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 -- numpy raises ValueError, OSError, EOFError, ... here
        raise DatasetError(f"{path}: unreadable .npy file for modality {name!r} ({type(exc).__name__}: {exc})") from None
    if not isinstance(array, np.ndarray):
        raise DatasetError(f"{path}: expected a single array in a .npy file for modality {name!r}, "
                           f"got {type(array).__name__}")
    if array.ndim == 2 and array.shape[0] != num_items and inter_name:
        raise DatasetError(f"{path}: feature {name!r} has {array.shape[0]} rows, expected num_items = "
                           f"{num_items} (max itemID + 1 in {inter_name}); row i must be item i")
    return check_features(name, array, num_items, str(path))


# --------------------------------------------------------------------------------------------------
# import / export
# --------------------------------------------------------------------------------------------------

def import_mmrec(inter: str | Path, features: dict[str, str | Path], out: str | Path,
                 overwrite: bool = False, manifest_extra: dict | None = None) -> dict:
    """Import an MMRec dataset (§3) into a prepared dataset directory ``out``; return its manifest.

    ``features`` maps modality name -> ``.npy`` path; its insertion order is the modality order.
    Nothing is written unless every input is valid. ``manifest_extra`` is merged into the manifest
    after ``{"source": "mmrec", "inter_file": <basename>}``.
    """
    inter = Path(inter)
    out = Path(out)
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} already exists (pass --overwrite to replace it)")
    if not features:
        raise DatasetError(f"{inter}: at least one modality feature file is required "
                           f"(e.g. image=image_feat.npy text=text_feat.npy)")
    for name in features:
        check_modality_name(name, str(features[name]))
    data = read_inter(inter)
    feats = {name: load_feature(name, path, data["num_items"], inter.name) for name, path in features.items()}
    extra = {"source": "mmrec", "inter_file": inter.name, **(manifest_extra or {})}
    return write_dataset(out, users=data["users"], items=data["items"], split=data["split"],
                         num_users=data["num_users"], num_items=data["num_items"], features=feats,
                         user_raw_ids=np.arange(data["num_users"], dtype=np.int64),
                         item_raw_ids=np.arange(data["num_items"], dtype=np.int64),
                         extra_columns=data["extra"] or None, manifest_extra=extra, overwrite=overwrite)


def write_inter(path: str | Path, users: np.ndarray, items: np.ndarray, split: np.ndarray,
                rating: np.ndarray | None = None, timestamp: np.ndarray | None = None) -> None:
    """Write an MMRec ``.inter`` file (header ``userID itemID rating timestamp x_label``, tab-separated).

    Missing ``rating`` / ``timestamp`` are written as 0. Floats are written in their shortest
    round-trip form, so reading the file back gives the same values.
    """
    n = len(users)
    rating = np.zeros(n, dtype=np.float64) if rating is None else np.asarray(rating)
    timestamp = np.zeros(n, dtype=np.int64) if timestamp is None else np.asarray(timestamp)
    table = pa.table({USER_COL: np.asarray(users, dtype=np.int64), ITEM_COL: np.asarray(items, dtype=np.int64),
                      RATING_COL: rating, TIME_COL: timestamp, LABEL_COL: np.asarray(split, dtype=np.int8)})
    with open(path, "wb") as fh:
        fh.write(("\t".join(INTER_HEADER) + "\n").encode())
        pacsv.write_csv(table, fh, write_options=pacsv.WriteOptions(
            include_header=False, delimiter="\t", quoting_style="none"))


def export_mmrec(dataset_dir: str | Path, out_dir: str | Path, name: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write a prepared dataset as an MMRec folder: ``<name>.inter`` + ``<modality>_feat.npy`` (§3).

    ``name`` defaults to the folder name of ``out_dir`` (MMRec expects ``data/<name>/<name>.inter``).
    Dense ids are written as the MMRec ids; ``rating``/``timestamp`` come from the dataset's extra
    interaction columns when present, else 0. The folder is written atomically and an existing
    ``out_dir`` is refused unless ``overwrite``. Returns ``out_dir``.

    MMRec derives the counts from the largest ids (§1.1), so a dataset whose last user or item has no
    interaction cannot be represented and is refused.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DatasetError(f"{out_dir} already exists (pass --overwrite to replace it)")
    name = name or out_dir.resolve().name
    check_modality_name(name, str(out_dir))  # same rule keeps the file name sane
    ds = PreparedDataset.load(dataset_dir)
    if len(ds.users) == 0:
        raise DatasetError(f"{dataset_dir}: dataset has no interactions to export")
    if int(ds.users.max()) + 1 != ds.num_users or int(ds.items.max()) + 1 != ds.num_items:
        raise DatasetError(f"{dataset_dir}: the last user id ({ds.num_users - 1}) or item id ({ds.num_items - 1}) "
                           f"has no interaction; MMRec derives num_users/num_items from the largest ids, so "
                           f"this dataset cannot be exported to the MMRec format without changing its counts")
    schema = pq.read_schema(Path(dataset_dir) / INTERACTIONS)
    present = [c for c in OPTIONAL_COLUMNS if c in schema.names]
    extra = pq.read_table(Path(dataset_dir) / INTERACTIONS, columns=present) if present else None
    rating = extra[RATING_COL].to_numpy() if RATING_COL in present else None
    timestamp = extra[TIME_COL].to_numpy() if TIME_COL in present else None
    with atomic_directory(out_dir, overwrite) as tmp:
        write_inter(tmp / f"{name}.inter", ds.users, ds.items, ds.split, rating, timestamp)
        for modality, arr in ds.features.items():
            np.save(tmp / feature_filename(modality), np.asarray(arr, dtype=np.float32))
    return out_dir
