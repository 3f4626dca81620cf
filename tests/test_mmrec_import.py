"""MMRec import / export (docs/model.md §3; ids and counts §1.1; x_label splits §2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep.mmrec import export_mmrec, import_mmrec
from data_prep.synthetic import make_mmrec_synthetic
from lgmrec_dist.dataset import DatasetError, PreparedDataset

HEADER = "userID\titemID\trating\ttimestamp\tx_label"
# user 3 is the largest id, item 5 the largest: num_users 4, num_items 6 (user 2 has no row)
ROWS = [
    (0, 0, 5.0, 100, 0), (0, 1, 4.0, 101, 0), (0, 2, 3.5, 102, 1), (0, 3, 1.0, 103, 2),
    (1, 1, 2.0, 200, 0), (1, 4, 5.0, 201, 0), (1, 5, 4.0, 202, 1), (1, 0, 3.0, 203, 2),
    (3, 2, 4.0, 300, 0), (3, 5, 4.0, 301, 1), (3, 4, 4.0, 302, 2),
]
NUM_USERS, NUM_ITEMS = 4, 6


def write_inter(path: Path, rows=ROWS, header=HEADER, newline="\n") -> Path:
    lines = [header] + ["\t".join(str(v) for v in r) for r in rows]
    path.write_text(newline.join(lines) + newline)
    return path


def make_inputs(tmp: Path, image=None, text=None, **inter_kw):
    rng = np.random.default_rng(0)
    inter = write_inter(tmp / "toy.inter", **inter_kw)
    image = rng.standard_normal((NUM_ITEMS, 8)) if image is None else image     # float64, as MMRec
    text = rng.standard_normal((NUM_ITEMS, 3)).astype(np.float32) if text is None else text
    np.save(tmp / "image_feat.npy", image)
    np.save(tmp / "text_feat.npy", text)
    return inter, {"image": tmp / "image_feat.npy", "text": tmp / "text_feat.npy"}


def load_all(path):
    ds = PreparedDataset.load(path)
    return ds, pq.read_table(Path(path) / "interactions.parquet")


def test_import_counts_and_roundtrip_load(tmp_path):
    inter, feats = make_inputs(tmp_path)
    out = tmp_path / "ds"
    m = import_mmrec(inter, feats, out)
    assert m["num_users"] == NUM_USERS and m["num_items"] == NUM_ITEMS
    assert m["num_interactions"] == len(ROWS)
    assert (m["num_train"], m["num_valid"], m["num_test"]) == (5, 3, 3)
    assert m["modalities"] == {"image": 8, "text": 3}
    assert list(m["modalities"]) == ["image", "text"]
    assert m["source"] == "mmrec" and m["inter_file"] == "toy.inter"

    ds, table = load_all(out)
    rows = np.array(ROWS)
    np.testing.assert_array_equal(ds.users, rows[:, 0].astype(np.int64))
    np.testing.assert_array_equal(ds.items, rows[:, 1].astype(np.int64))
    np.testing.assert_array_equal(ds.split, rows[:, 4].astype(np.int8))
    np.testing.assert_array_equal(table["rating"].to_numpy(), rows[:, 2])
    assert table["timestamp"].type == "int64"
    np.testing.assert_array_equal(table["timestamp"].to_numpy(), rows[:, 3].astype(np.int64))
    for name, path in feats.items():
        assert ds.features[name].dtype == np.float32
        np.testing.assert_array_equal(ds.features[name], np.load(path).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(ds.raw_ids("user")), np.arange(NUM_USERS))
    np.testing.assert_array_equal(np.asarray(ds.raw_ids("item")), np.arange(NUM_ITEMS))


def test_import_minimal_columns_and_crlf(tmp_path):
    rows = [(r[0], r[1], r[4]) for r in ROWS]
    inter, feats = make_inputs(tmp_path, rows=rows, header="userID\titemID\tx_label", newline="\r\n")
    m = import_mmrec(inter, {"text": feats["text"]}, tmp_path / "ds")
    assert m["num_interactions"] == len(rows) and m["modalities"] == {"text": 3}
    ds, table = load_all(tmp_path / "ds")
    assert table.column_names == ["user", "item", "split"]
    np.testing.assert_array_equal(ds.split, np.array([r[2] for r in rows], dtype=np.int8))


def assert_same_dataset(a, b, extras=True):
    da, ta = load_all(a)
    db, tb = load_all(b)
    for k in ("num_users", "num_items", "num_interactions", "num_train", "num_valid", "num_test", "modalities"):
        assert da.manifest[k] == db.manifest[k], k
    np.testing.assert_array_equal(da.users, db.users)
    np.testing.assert_array_equal(da.items, db.items)
    np.testing.assert_array_equal(da.split, db.split)
    assert da.modalities == db.modalities
    for name in da.features:
        assert da.features[name].tobytes() == db.features[name].tobytes()
    if extras:
        assert ta.equals(tb)


@pytest.mark.parametrize("ts_step", [7, 0.37])         # integer and fractional timestamps
def test_import_export_import_is_identity(tmp_path, ts_step):
    rows = [(u, i, r + 0.1 * k, 1_400_000_000 + ts_step * k, x) for k, (u, i, r, _, x) in enumerate(ROWS)]
    inter, feats = make_inputs(tmp_path, rows=rows)
    import_mmrec(inter, feats, tmp_path / "d1")
    exp = export_mmrec(tmp_path / "d1", tmp_path / "mm" / "toy")
    assert sorted(p.name for p in exp.iterdir()) == ["image_feat.npy", "text_feat.npy", "toy.inter"]
    assert (exp / "toy.inter").read_text().splitlines()[0] == HEADER
    import_mmrec(exp / "toy.inter", {"image": exp / "image_feat.npy", "text": exp / "text_feat.npy"},
                 tmp_path / "d2")
    assert_same_dataset(tmp_path / "d1", tmp_path / "d2")


def test_roundtrip_synthetic_and_without_extras(tmp_path):
    src = make_mmrec_synthetic(tmp_path / "syn", 60, 40, 700, seed=3)
    feats = {"image": src / "image_feat.npy", "text": src / "text_feat.npy"}
    import_mmrec(src / "synthetic.inter", feats, tmp_path / "d1")
    exp = export_mmrec(tmp_path / "d1", tmp_path / "out", name="syn")
    import_mmrec(exp / "syn.inter", {m: exp / f"{m}_feat.npy" for m in feats}, tmp_path / "d2")
    assert_same_dataset(tmp_path / "d1", tmp_path / "d2")

    # a file without rating/timestamp: the export writes 0s; ids, splits and features still round-trip
    rows = [(r[0], r[1], r[4]) for r in ROWS]
    (tmp_path / "min").mkdir()
    inter, feats = make_inputs(tmp_path / "min", rows=rows, header="userID\titemID\tx_label")
    import_mmrec(inter, feats, tmp_path / "m1")
    exp = export_mmrec(tmp_path / "m1", tmp_path / "mout")
    assert (exp / "mout.inter").read_text().splitlines()[1] == "0\t0\t0\t0\t0"
    import_mmrec(exp / "mout.inter", {m: exp / f"{m}_feat.npy" for m in feats}, tmp_path / "m2")
    assert_same_dataset(tmp_path / "m1", tmp_path / "m2", extras=False)


def _bad_rows(k, value, col):
    rows = [list(r) for r in ROWS]
    rows[k][col] = value
    return rows


# Each case: (id, how to build the inputs, which input file the message must name, extra text expected)
BAD_CASES = [
    ("feature_rows", dict(image=np.zeros((NUM_ITEMS - 1, 8))), "image", "rows"),
    ("feature_nan", dict(text=np.where(np.eye(NUM_ITEMS, 3) > 0, np.nan, 1.0).astype(np.float32)), "text", "NaN"),
    ("feature_inf", dict(image=np.full((NUM_ITEMS, 8), np.inf)), "image", "inf"),
    ("feature_1d", dict(image=np.zeros(NUM_ITEMS)), "image", "2-D"),
    ("missing_column", dict(header="userID\titemID\trating\ttimestamp\tlabel"), "inter", "x_label"),
    ("bad_x_label", dict(rows=_bad_rows(4, 3, 4)), "inter", "x_label"),
    ("negative_x_label", dict(rows=_bad_rows(4, -1, 4)), "inter", "x_label"),
    ("non_integer_item", dict(rows=_bad_rows(2, 1.5, 1)), "inter", "itemID"),
    ("non_integer_user", dict(rows=_bad_rows(6, "u7", 0)), "inter", "userID"),
    ("negative_id", dict(rows=_bad_rows(3, -2, 1)), "inter", "itemID"),
    ("empty_id", dict(rows=_bad_rows(3, "", 0)), "inter", "userID"),
    ("header_only", dict(rows=[]), "inter", "no interaction rows"),
    ("non_numeric_rating", dict(rows=_bad_rows(1, "good", 2)), "inter", "rating"),
    ("ragged_row", dict(rows=ROWS + [(4, 1)]), "inter", ""),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_malformed_input_names_file_and_writes_nothing(tmp_path, case):
    _, kw, which, text = case
    inter, feats = make_inputs(tmp_path, **kw)
    out = tmp_path / "out" / "ds"
    with pytest.raises(DatasetError) as exc:
        import_mmrec(inter, feats, out)
    path = inter if which == "inter" else feats[which]
    assert str(path) in str(exc.value)
    assert text in str(exc.value)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("what", ["empty_inter", "missing_inter", "missing_feature", "garbage_npy", "inter_is_dir"])
def test_missing_or_unreadable_files(tmp_path, what):
    inter, feats = make_inputs(tmp_path)
    bad = inter
    if what == "empty_inter":
        inter.write_bytes(b"")
    elif what == "missing_inter":
        bad = inter = tmp_path / "nope.inter"
    elif what == "missing_feature":
        bad = feats["text"] = tmp_path / "no_text_feat.npy"
    elif what == "garbage_npy":
        feats["image"].write_bytes(b"this is not a numpy file")
        bad = feats["image"]
    elif what == "inter_is_dir":
        bad = inter = tmp_path / "adir"
        inter.mkdir()
    out = tmp_path / "ds"
    with pytest.raises(DatasetError) as exc:
        import_mmrec(inter, feats, out)
    assert str(bad) in str(exc.value)
    assert not out.exists()


def test_existing_output_refused_unless_overwrite(tmp_path):
    inter, feats = make_inputs(tmp_path)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="exists"):
        import_mmrec(inter, feats, out)
    assert (out / "keep.txt").exists()
    m = import_mmrec(inter, feats, out, overwrite=True)
    assert not (out / "keep.txt").exists() and m["num_interactions"] == len(ROWS)
    PreparedDataset.load(out)

    # a failed import with overwrite leaves the existing dataset untouched
    np.save(feats["image"], np.zeros((2, 8)))
    with pytest.raises(DatasetError):
        import_mmrec(inter, feats, out, overwrite=True)
    assert PreparedDataset.load(out).manifest["num_interactions"] == len(ROWS)

    exp = tmp_path / "exp"
    export_mmrec(out, exp)
    with pytest.raises(DatasetError, match="exists"):
        export_mmrec(out, exp)
    export_mmrec(out, exp, name="again", overwrite=True)
    assert sorted(p.name for p in exp.iterdir()) == ["again.inter", "image_feat.npy", "text_feat.npy"]


def test_feature_order_is_modality_order(tmp_path):
    inter, feats = make_inputs(tmp_path)
    m = import_mmrec(inter, {"text": feats["text"], "image": feats["image"]}, tmp_path / "ds")
    assert list(m["modalities"]) == ["text", "image"]
    assert PreparedDataset.load(tmp_path / "ds").modalities == ["text", "image"]
