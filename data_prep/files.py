"""Input files of the data jobs (``lgmrec prep`` and ``lgmrec extract``): one rule for what a path names.

A path is a Parquet file, a directory (every ``*.parquet`` / ``*.pq`` / ``*.parq`` file below it, sorted;
names starting with ``.`` or ``_`` are skipped, as Spark and Ray leave such markers and temporary files
beside their output) or a glob (``**`` recursive; a path that exists is taken literally even if it holds
glob characters). A list of such paths is resolved in order. Every problem is a
:class:`~lgmrec_dist.dataset.DatasetError` naming the path.
"""
from __future__ import annotations

import glob as globlib
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

from lgmrec_dist.dataset import DatasetError

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HIDDEN = (".", "_")


def _parquet_files_below(root: str) -> list[str]:
    found = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(_HIDDEN))
        found += [os.path.join(here, n) for n in names if n.endswith(PARQUET_SUFFIXES) and not n.startswith(_HIDDEN)]
    return sorted(found)


def resolve_files(spec, what: str) -> list[str]:
    """A Parquet file, a directory or a glob (or a list of them) -> absolute file paths (module docstring).

    ``what`` names the input in messages ("interaction", "feature (text)", "items").
    """
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    files: list[str] = []
    for s in specs:
        s = os.path.expanduser(os.fspath(s))
        if _GLOB_CHARS.search(s) and not os.path.exists(s):
            found = sorted(p for p in globlib.glob(s, recursive=True) if os.path.isfile(p))
            if not found:
                raise DatasetError(f"{s}: no {what} files match this pattern")
            files += found
        elif os.path.isdir(s):
            found = _parquet_files_below(s)
            if not found:
                raise DatasetError(f"{s}: directory holds no {what} Parquet files ({', '.join(PARQUET_SUFFIXES)})")
            files += found
        elif os.path.isfile(s):
            files.append(s)
        elif os.path.exists(s):
            raise DatasetError(f"{s}: {what} path is not a regular file or directory")
        else:
            raise DatasetError(f"{s}: {what} path does not exist")
    return [os.path.abspath(f) for f in files]


def open_parquet(path: str, what: str) -> pq.ParquetFile:
    """The file's footer, or an error naming the file when it is not Parquet or is corrupt."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise DatasetError(f"{path}: unreadable {what} file, not a Parquet file or corrupt ({reason})") from None


def file_stamp(path) -> list:
    """[path, size, mtime] of an input: a rerun with the same stamps reads the same bytes."""
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]
