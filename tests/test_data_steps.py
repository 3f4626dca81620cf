"""The data jobs' pure pieces, without Ray: the one file resolver, the atomic file writer, the error
tunnel out of Ray tasks, and prep's numpy steps (dictionary unification, first-appearance ids)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import extract, prep
from data_prep.files import resolve_files
from data_prep.ray_session import fail_in_task, ray_errors
from data_prep.steps import first_appearance, unify_dictionaries
from lgmrec_dist.dataset import DatasetError, atomic_file


def _touch(path, rows=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(rows))}), path)
    return str(path)


def test_one_resolver_for_prep_and_extract():
    assert prep.resolve_files is extract.resolve_files is resolve_files


def test_directory_takes_every_parquet_suffix_and_skips_markers(tmp_path):
    want = [_touch(tmp_path / "d" / n) for n in ("a.parquet", "b.pq", "sub/c.parq")]
    for skipped in ("_SUCCESS.parquet", ".hidden.parquet", "_tmp/x.parquet", ".git/y.parquet"):
        _touch(tmp_path / "d" / skipped)
    (tmp_path / "d" / "notes.txt").write_text("not data")
    assert resolve_files(tmp_path / "d", "items") == sorted(want)


def test_globs_are_recursive_and_files_are_taken_as_given(tmp_path):
    a, b = _touch(tmp_path / "x" / "1.parquet"), _touch(tmp_path / "x" / "deep" / "2.parquet")
    assert resolve_files(str(tmp_path / "x" / "**" / "*.parquet"), "items") == [a, b]   # sorted by path
    assert resolve_files([b, a], "items") == [b, a]                      # a list keeps its order
    odd = _touch(tmp_path / "odd[1].parquet")                            # glob characters, but it exists
    assert resolve_files(odd, "items") == [odd]


@pytest.mark.parametrize("case, needle", [("missing", "items path does not exist"),
                                          ("empty dir", "directory holds no items Parquet files"),
                                          ("no match", "no items files match this pattern")])
def test_resolver_errors_name_the_path(tmp_path, case, needle):
    (tmp_path / "empty").mkdir()
    spec = {"missing": tmp_path / "nowhere.parquet", "empty dir": tmp_path / "empty",
            "no match": str(tmp_path / "*.pq")}[case]
    with pytest.raises(DatasetError, match=needle) as err:
        resolve_files(spec, "items")
    assert os.fspath(spec) in str(err.value)


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with atomic_file(path) as tmp:
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_task_error_message_survives_a_wrapper():
    with pytest.raises(DatasetError) as err:
        with ray_errors("reading"):
            try:
                fail_in_task("f.parquet: cannot read rows")
            except DatasetError as inner:  # what Ray does: a new exception whose text holds the task's
                raise RuntimeError(f"RayTaskError(DatasetError): traceback ...\n{inner}\nmore") from None
    assert str(err.value) == "f.parquet: cannot read rows"
    with pytest.raises(DatasetError, match=r"^reading: KeyError: 'x'$"):
        with ray_errors("reading"):
            raise KeyError("x")


def test_unify_dictionaries_keeps_first_appearance_across_blocks():
    blocks = [pa.array(["b", "a", "b"]).dictionary_encode(), pa.array(["c", "a", "d"]).dictionary_encode()]
    values, codes = unify_dictionaries(pa.chunked_array(blocks))
    assert values.to_pylist() == ["b", "a", "c", "d"]
    assert codes.tolist() == [0, 1, 0, 2, 1, 3]
    empty, none = unify_dictionaries(pa.chunked_array([], pa.dictionary(pa.int32(), pa.string())))
    assert len(empty) == 0 and len(none) == 0


def test_first_appearance_ids():
    dense, code_of = first_appearance(np.array([7, 3, 7, 9, 3]), 10)
    assert dense.tolist() == [0, 1, 0, 2, 1] and code_of.tolist() == [7, 3, 9]
