"""``lgmrec prep``: real Ray (the session's ``ray_cluster``) and real Parquet files.

Covers k-core to a fixed point, both split rules, id maps, feature alignment and the missing-vector rule,
the MMRec round trip, every bad input of the issue, the CLI, the synthetic raw catalogue and training
on a prepared dataset. Partitioning has its own file (test_partition.py).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.mmrec import export_mmrec, import_mmrec
from data_prep.prep import duplicate_rows, kcore_filter, prep, register_cli, temporal_split
from data_prep.synth_parquet import make_parquet_synthetic
from data_prep.synth_parquet import register_cli as register_synth_cli
from lgmrec_dist.dataset import DatasetError, PreparedDataset


@pytest.fixture(autouse=True)
def _ray(ray_cluster):
    """Every prep call reuses the session's Ray cluster (prep never starts a second one)."""
    return ray_cluster


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A small raw catalogue: 300 users, 120 items, 3,000 interactions + 30 duplicates + 15 null user ids;
    2 of the items have no feature vectors."""
    out = tmp_path_factory.mktemp("raw") / "cat"
    info = make_parquet_synthetic(out, 300, 120, 3000, {"image": 12, "text": 6}, seed=5, duplicate_rate=0.01,
                                  null_rate=0.005, missing_feature_rate=0.02, rows_per_file=1000)
    return out, info


def feats(root: Path) -> dict:
    return {"image": root / "features" / "image.parquet", "text": root / "features" / "text.parquet"}


def write(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def vectors(ids, mat, list_type=None):
    mat = np.asarray(mat, dtype=np.float32)
    typ = list_type or pa.list_(pa.float32(), mat.shape[1])
    return {"item_id": ids, "embedding": pa.array([list(r) for r in mat], type=typ)}


def grid(users, items, t0=0):
    """All (user, item) pairs of users x items, timestamps increasing."""
    rows = [(u, i) for u in users for i in items]
    return [u for u, _ in rows], [i for _, i in rows], list(range(t0, t0 + len(rows)))


def no_leftovers(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# --------------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------------

def test_kcore_needs_several_rounds(tmp_path):
    # k = 2: block a,b x x,y survives; chain c-y, c-z, d-z unravels one row per round: (d,z) then (c,z) then (c,y)
    u, i, t = grid(["a", "b"], ["x", "y"])
    u += ["c", "c", "d"]
    i += ["y", "z", "z"]
    t += [10, 11, 12]
    inter = write(tmp_path / "log.parquet", {"user_id": u, "item_id": i, "timestamp": t})
    fpath = write(tmp_path / "f.parquet", vectors(["x", "y", "z"], np.eye(3)))
    m = prep(inter, {"v": fpath}, tmp_path / "out", kcore=2, progress=False)
    assert m["kcore_rounds"] == 3 and m["dropped"]["kcore"] == 3
    ds = PreparedDataset.load(tmp_path / "out")
    ur, ir = ds.raw_ids("user").to_pylist(), ds.raw_ids("item").to_pylist()
    pairs = sorted((ur[a], ir[b]) for a, b in zip(ds.users, ds.items))
    assert pairs == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    # a single pass would have kept c: the result really is the fixed point
    users = np.array([0, 0, 1, 1, 2, 2, 3])
    items = np.array([0, 1, 0, 1, 1, 2, 2])
    idx, rounds = kcore_filter(users, items, 2, 4, 3)
    assert idx.tolist() == [0, 1, 2, 3] and rounds == 3


def test_kcore_matches_a_naive_fixed_point():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 60, 500), (rng.pareto(1.2, 500) * 5).astype(np.int64) % 80
    for k in (2, 3, 5):
        idx, _ = kcore_filter(users, items, k, 60, 80)
        keep = np.ones(len(users), bool)
        while True:                                   # naive: remove one offending node at a time
            du = np.bincount(users[keep], minlength=60)
            di = np.bincount(items[keep], minlength=80)
            bad = keep & ((du[users] < k) | (di[items] < k))
            if not bad.any():
                break
            keep[np.flatnonzero(bad)[0]] = False
        assert idx.tolist() == np.flatnonzero(keep).tolist()


def test_duplicate_rows_are_exact():
    users = np.array([0, 0, 0, 1, 0, 1, 0])
    items = np.array([1, 1, 1, 1, 2, 1, 1])
    times = np.array([5, 5, 6, 5, 5, 5, 5])
    # rows 1 and 6 repeat row 0; row 5 repeats row 3; row 2 differs in time, row 4 in item
    assert duplicate_rows(users, items, times, 3).tolist() == [1, 5, 6]
    assert duplicate_rows(users, items, times.astype(np.float64), 3).tolist() == [1, 5, 6]


def split_counts(n):
    if n < 10:
        return n - 2, 1, 1
    h = n // 5
    return n - h, h // 2, h - h // 2


@pytest.mark.parametrize("split", ["mmrec", "temporal"])
def test_split_rules_per_user(tmp_path, split):
    sizes = {"u5": 5, "u9": 9, "u10": 10, "u23": 23, "u41": 41}
    rng = np.random.default_rng(1)
    users, items, times = [], [], []
    for u, n in sizes.items():
        users += [u] * n
        items += [f"i{k}" for k in range(n)]
        times += rng.permutation(1000)[:n].tolist()            # the log is not in time order
    order = rng.permutation(len(users))
    cols = {"user_id": [users[k] for k in order], "item_id": [items[k] for k in order],
            "timestamp": [times[k] for k in order]}
    inter = write(tmp_path / "log.parquet", cols)
    fpath = write(tmp_path / "f.parquet", vectors([f"i{k}" for k in range(41)], rng.random((41, 4))))
    prep(inter, {"v": fpath}, tmp_path / "out", kcore=1, split=split, seed=7, progress=False)
    ds = PreparedDataset.load(tmp_path / "out")
    t = pq.read_table(tmp_path / "out" / "interactions.parquet")["timestamp"].to_numpy()
    raw_users = ds.raw_ids("user").to_pylist()
    for u, n in sizes.items():
        rows = ds.users == raw_users.index(u)
        assert tuple(np.bincount(ds.split[rows], minlength=3)) == split_counts(n), u
        if split == "temporal":                    # newest rows held out: train < valid < test in time
            tr, va, te = (t[rows & (ds.split == s)] for s in (0, 1, 2))
            assert tr.max() < va.min() and va.max() < te.min()
    if split == "mmrec":                           # seeded: same seed same labels, another seed differs
        prep(inter, {"v": fpath}, tmp_path / "again", kcore=1, seed=7, progress=False)
        prep(inter, {"v": fpath}, tmp_path / "other", kcore=1, seed=8, progress=False)
        assert (PreparedDataset.load(tmp_path / "again").split == ds.split).all()
        assert (PreparedDataset.load(tmp_path / "other").split != ds.split).any()


def test_temporal_ties_keep_input_order():
    users = np.zeros(5, dtype=np.int64)
    assert temporal_split(users, np.array([3, 1, 1, 1, 0]), 1).tolist() == [2, 0, 0, 1, 0]


def test_id_maps_and_first_appearance(tmp_path):
    """Integer ids (int32 in one file, int64 in another, extra columns ignored) round-trip to raw ids."""
    write(tmp_path / "log" / "a.parquet", {"uid": pa.array([70, 50, 70, 90, 50], pa.int32()),
                                          "iid": pa.array([3, 1, 1, 3, 3], pa.int32()),
                                          "ts": [1, 2, 3, 4, 5], "comment": ["x"] * 5})
    write(tmp_path / "log" / "b.parquet", {"uid": pa.array([90, 50, 70], pa.int64()),
                                          "iid": pa.array([1, 2, 2], pa.int64()),
                                          "ts": [6, 7, 8], "rating": [1.0, 2.0, 3.0]})
    cols = vectors(pa.array([2, 3, 1], pa.int64()), np.arange(12).reshape(3, 4))
    fpath = write(tmp_path / "f.parquet", {"iid": cols["item_id"], "embedding": cols["embedding"]})
    m = prep(tmp_path / "log", {"v": fpath}, tmp_path / "out", kcore=1, user_col="uid", item_col="iid",
             time_col="ts", progress=False)
    assert m["id_types"] == {"user": "int", "item": "int"}
    ds = PreparedDataset.load(tmp_path / "out")
    ur, ir = ds.raw_ids("user"), ds.raw_ids("item")
    assert ur.type == pa.int64() and ir.type == pa.int64()
    assert ur.to_pylist() == [70, 50, 90] and ir.to_pylist() == [3, 1, 2]     # order of first appearance
    rows = sorted(zip(ur.to_numpy()[ds.users], ir.to_numpy()[ds.items]))
    assert rows == sorted(zip([70, 50, 70, 90, 50, 90, 50, 70], [3, 1, 1, 3, 3, 1, 2, 2]))
    # feature rows follow the item index: item 0 is raw id 3, the second row of the feature file
    assert np.array_equal(ds.features["v"], np.arange(12, dtype=np.float32).reshape(3, 4)[[1, 2, 0]])


def test_time_column_variants(tmp_path):
    """No timestamp column (--time-col ''): duplicates are exact (user, item) rows, mmrec split only;
    a float timestamp column is kept as float64; a timestamp[ms] column as its int64 value."""
    u, i, _ = grid(["a", "b", "c"], ["x", "y", "z"])
    f = good_feats(tmp_path)
    write(tmp_path / "plain.parquet", {"user_id": u + ["a"], "item_id": i + ["x"]})
    m = prep(tmp_path / "plain.parquet", {"v": f}, tmp_path / "o1", kcore=1, time_col="", progress=False)
    assert m["dropped"]["duplicate"] == 1 and m["num_interactions"] == 9
    assert "timestamp" not in pq.read_schema(tmp_path / "o1" / "interactions.parquet").names
    with pytest.raises(DatasetError, match="temporal split needs a timestamp"):
        prep(tmp_path / "plain.parquet", {"v": f}, tmp_path / "o2", split="temporal", time_col="", progress=False)
    write(tmp_path / "float.parquet", {"user_id": u, "item_id": i, "timestamp": [t + 0.5 for t in range(9)]})
    prep(tmp_path / "float.parquet", {"v": f}, tmp_path / "o3", kcore=1, split="temporal", progress=False)
    ts = pq.read_table(tmp_path / "o3" / "interactions.parquet")["timestamp"]
    assert ts.type == pa.float64() and sorted(ts.to_pylist()) == [t + 0.5 for t in range(9)]
    write(tmp_path / "ms.parquet", {"user_id": u, "item_id": i,
                                    "timestamp": pa.array(range(9), pa.timestamp("ms"))})
    prep(tmp_path / "ms.parquet", {"v": f}, tmp_path / "o4", kcore=1, split="temporal", progress=False)
    assert sorted(pq.read_table(tmp_path / "o4" / "interactions.parquet")["timestamp"].to_pylist()) == list(range(9))


def test_synthetic_catalogue_through_prep(raw, tmp_path):
    root, info = raw
    m = prep(str(root / "interactions" / "*.parquet"), feats(root), tmp_path / "out", kcore=3, progress=False)
    assert len(info["interaction_files"]) == 4
    assert m["input_rows"] == info["log_rows"] == 3045
    assert m["dropped"]["null"] == info["null_user_ids"] == 15
    assert m["dropped"]["duplicate"] == info["duplicates"] == 30
    assert m["num_interactions"] == 3000 - m["dropped"]["kcore"]
    assert m["num_train"] + m["num_valid"] + m["num_test"] == m["num_interactions"]
    assert m["modalities"] == {"image": 12, "text": 6} and m["kcore"] == 3 and m["split"] == "mmrec"
    assert m["seed"] == 999 and m["partitions"] == 1
    assert set(m["files"]) >= {"interactions.parquet", "user_map.parquet", "item_map.parquet", "features/image.npy",
                               "features/text.npy", "partitions/node_part.npy", "partitions/partition.json"}
    ds = PreparedDataset.load(tmp_path / "out")       # verifies every checksum
    assert np.bincount(ds.users).min() >= 3 and np.bincount(ds.items).min() >= 3
    # the stored rows are exactly the de-duplicated, non-null, k-core input rows, with raw ids
    log = pq.read_table(root / "interactions").to_pandas().dropna().drop_duplicates(["user_id", "item_id", "timestamp"])
    ur, ir = np.array(ds.raw_ids("user").to_pylist()), np.array(ds.raw_ids("item").to_pylist())
    t = pq.read_table(tmp_path / "out" / "interactions.parquet")["timestamp"].to_numpy()
    got = set(zip(ur[ds.users], ir[ds.items], t))
    assert got <= set(zip(log.user_id, log.item_id, log.timestamp)) and len(got) == len(ds.users)


def test_feature_alignment_and_mean_fill(raw, tmp_path):
    root, info = raw
    m = prep(root / "interactions", feats(root), tmp_path / "out", kcore=3, progress=False)
    ds = PreparedDataset.load(tmp_path / "out")
    item_raw = ds.raw_ids("item").to_pylist()
    for name, dim in (("image", 12), ("text", 6)):
        t = pq.read_table(feats(root)[name])
        given = dict(zip(t["item_id"].to_pylist(), np.stack(t["embedding"].to_numpy(zero_copy_only=False))))
        have = np.array([r in given for r in item_raw])
        assert m["missing_features"][name] == m["features"][name]["missing"] == int((~have).sum()) > 0
        x = np.asarray(ds.features[name])
        assert x.shape == (ds.num_items, dim)
        for k in np.flatnonzero(have):
            assert np.array_equal(x[k], given[item_raw[k]])
        mean = x[have].astype(np.float64).mean(axis=0)
        assert np.allclose(x[~have], mean, atol=1e-6)
    # --require-features refuses the same input, naming the file and the count; nothing is written
    n = m["missing_features"]["image"]
    with pytest.raises(DatasetError, match=rf"image\.parquet: {n} of \d+ items have no vector in modality 'image'"):
        prep(root / "interactions", feats(root), tmp_path / "strict", kcore=3, require_features=True, progress=False)
    no_leftovers(tmp_path / "strict")


def test_npy_features_with_id_sidecar(raw, tmp_path):
    root, _ = raw
    t = pq.read_table(feats(root)["text"])
    ids = t["item_id"].to_numpy(zero_copy_only=False)
    mat = np.stack(t["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)   # float64 is cast
    rev = np.arange(len(ids))[::-1]
    np.save(tmp_path / "text.npy", mat[rev])
    pq.write_table(pa.table({"item_id": ids[rev]}), tmp_path / "text.ids.parquet")
    np.save(tmp_path / "img.npy", mat[:, :4])
    np.save(tmp_path / "img.ids.npy", ids.astype(str))
    prep(root / "interactions", {"text": feats(root)["text"]}, tmp_path / "a", kcore=3, progress=False)
    prep(root / "interactions", {"text": tmp_path / "text.npy", "img": tmp_path / "img.npy"}, tmp_path / "b",
         kcore=3, progress=False)
    a, b = PreparedDataset.load(tmp_path / "a"), PreparedDataset.load(tmp_path / "b")
    assert np.array_equal(a.features["text"], b.features["text"])
    assert np.allclose(b.features["img"], a.features["text"][:, :4])
    assert b.modalities == ["text", "img"]


def test_feature_directory_of_many_files(raw, tmp_path, monkeypatch):
    """Vectors spread over several files and row groups (list<double>, rows shuffled) align the same way;
    a duplicate id across two files names both files."""
    import data_prep.prep as prep_module

    monkeypatch.setattr(prep_module, "FEATURE_VALUES_PER_TASK", 12 * 10)     # 10 rows per Ray task
    root, _ = raw
    t = pq.read_table(feats(root)["image"])
    perm = np.random.default_rng(0).permutation(t.num_rows)
    t = t.take(pa.array(perm))
    t = pa.table({"item_id": t["item_id"], "embedding": t["embedding"].cast(pa.list_(pa.float64()))})
    (tmp_path / "img").mkdir()
    for k, (a, b) in enumerate([(0, 40), (40, 41), (41, t.num_rows)]):
        pq.write_table(t.slice(a, b - a), tmp_path / "img" / f"part-{k}.parquet", row_group_size=7)
    prep(root / "interactions", {"image": feats(root)["image"]}, tmp_path / "a", kcore=3, progress=False)
    prep(root / "interactions", {"image": tmp_path / "img"}, tmp_path / "b", kcore=3, progress=False)
    assert np.array_equal(PreparedDataset.load(tmp_path / "a").features["image"],
                          PreparedDataset.load(tmp_path / "b").features["image"])
    pq.write_table(t.slice(5, 1), tmp_path / "img" / "part-3.parquet")          # repeats a row of part-0
    with pytest.raises(DatasetError, match=r"part-0\.parquet, .*part-3\.parquet: duplicate item id"):
        prep(root / "interactions", {"image": tmp_path / "img"}, tmp_path / "c", kcore=3, progress=False)
    no_leftovers(tmp_path / "c")


def test_mmrec_round_trip(raw, tmp_path):
    root, _ = raw
    prep(root / "interactions", feats(root), tmp_path / "prepped", kcore=3, split="temporal", progress=False)
    export_mmrec(tmp_path / "prepped", tmp_path / "mm" / "cat")
    mm = tmp_path / "mm" / "cat"
    import_mmrec(mm / "cat.inter", {"image": mm / "image_feat.npy", "text": mm / "text_feat.npy"}, tmp_path / "back")
    a, b = PreparedDataset.load(tmp_path / "prepped"), PreparedDataset.load(tmp_path / "back")
    assert (a.num_users, a.num_items) == (b.num_users, b.num_items)
    for x, y in ((a.users, b.users), (a.items, b.items), (a.split, b.split)):
        assert np.array_equal(x, y)
    ta = pq.read_table(tmp_path / "prepped" / "interactions.parquet")["timestamp"]
    tb = pq.read_table(tmp_path / "back" / "interactions.parquet")["timestamp"]
    assert ta.to_pylist() == tb.to_pylist()
    for name in ("image", "text"):
        assert np.array_equal(a.features[name], b.features[name])


def test_rerun_is_a_no_op_and_overwrite_replaces(raw, tmp_path, capsys):
    root, _ = raw
    out = tmp_path / "out"
    m1 = prep(root / "interactions", feats(root), out, kcore=3)
    assert "train / valid / test" in capsys.readouterr().out          # the summary table
    m2 = prep(root / "interactions", feats(root), out, kcore=3)
    assert "nothing to do" in capsys.readouterr().out and m2 == m1
    with pytest.raises(DatasetError, match="holds a different dataset.*--overwrite"):
        prep(root / "interactions", feats(root), out, kcore=4, progress=False)
    m3 = prep(root / "interactions", feats(root), out, kcore=4, overwrite=True, progress=False)
    assert m3["kcore"] == 4 and json.loads((out / "manifest.json").read_text())["kcore"] == 4


# --------------------------------------------------------------------------------------------------
# bad input: DatasetError naming the file and column, nothing written
# --------------------------------------------------------------------------------------------------

def good_log(tmp_path, **over):
    u, i, t = grid(["a", "b", "c"], ["x", "y", "z"])
    cols = {"user_id": u, "item_id": i, "timestamp": t}
    cols.update(over)
    return write(tmp_path / "log.parquet", cols)


def good_feats(tmp_path, ids=("x", "y", "z"), mat=None, name="f.parquet", list_type=None):
    mat = np.arange(len(ids) * 3, dtype=np.float32).reshape(len(ids), 3) if mat is None else mat
    return write(tmp_path / name, vectors(list(ids), mat, list_type))


def _missing_column(p):
    write(p / "log.parquet", {"user": ["a"], "item_id": ["x"], "timestamp": [1]})


def _mixed_length(p):
    good_log(p)
    write(p / "f.parquet", {"item_id": ["x", "y", "z"],
                            "embedding": pa.array([[1, 2, 3], [1, 2, 3], [1, 2]], pa.list_(pa.float32()))})


def _inf_npy(p):
    good_log(p)
    np.save(p / "f.npy", np.array([[1.0], [np.inf], [2.0]]))
    np.save(p / "f.ids.npy", np.array(["x", "y", "z"]))


def _npy_without_ids(p):
    good_log(p)
    np.save(p / "f.npy", np.ones((3, 2)))


def _unreadable_log(p):
    (p / "log.parquet").write_bytes(b"not parquet at all")


def _unreadable_features(p):
    good_log(p)
    (p / "f.parquet").write_bytes(b"PAR1 garbage PAR1")


def _corrupt_pages(p):
    """A valid footer (the driver's schema check passes) over corrupt data pages: fails inside Ray."""
    good_log(p, user_id=[f"user-{k}" for k in range(9)])
    data = bytearray((p / "log.parquet").read_bytes())
    data[8:200] = b"Z" * 192
    (p / "log.parquet").write_bytes(bytes(data))


def _mixed_id_kinds(p):
    good_log(p)
    write(p / "log2" / "b.parquet", {"user_id": [1], "item_id": ["x"], "timestamp": [1]})


# case -> (make the inputs in tmp_path, prep options, regexes the message must contain)
BAD = {
    "missing column": (_missing_column, {}, [r"log\.parquet", "'user_id'", "missing column"]),
    "float ids": (lambda p: good_log(p, user_id=[1.0] * 9), {}, [r"log\.parquet", "'user_id'", "double"]),
    "wrong timestamp type": (lambda p: good_log(p, timestamp=["monday"] * 9), {},
                             [r"log\.parquet", "'timestamp'", "string"]),
    "all filtered by k-core": (good_log, {"kcore": 4}, [r"log\.parquet", "'user_id'", "4-core"]),
    "mixed vector length": (_mixed_length, {}, [r"f\.parquet", "'embedding'", "mixed length", "'z'"]),
    "NaN feature": (lambda p: good_log(p) and good_feats(p, mat=[[1, 2, 3], [1, np.nan, 3], [1, 2, 3]]), {},
                    [r"f\.parquet", "'embedding'", "NaN/inf", "'y'"]),
    "inf feature (npy)": (_inf_npy, {"npy": True}, [r"f\.npy", "NaN/inf", "'y'"]),
    "duplicate feature ids": (lambda p: good_log(p) and good_feats(p, ids=("x", "y", "x")), {},
                              [r"f\.parquet", "'item_id'", "duplicate item id 'x'"]),
    "npy without ids": (_npy_without_ids, {"npy": True}, [r"f\.npy", r"f\.ids\.parquet"]),
    "feature id kind mismatch": (lambda p: good_log(p) and write(p / "f.parquet",
                                                                 vectors(pa.array([1, 2, 3]), np.ones((3, 2)))),
                                 {}, [r"f\.parquet", "'item_id'", "int item ids", "strings"]),
    "feature column missing": (lambda p: good_log(p) and write(p / "f.parquet", {"item_id": ["x"], "vec": [[1.0]]}),
                               {}, [r"f\.parquet", "'embedding'", "--feature-col"]),
    "unreadable interactions": (_unreadable_log, {}, [r"log\.parquet", "unreadable"]),
    "unreadable features": (_unreadable_features, {}, [r"f\.parquet", "unreadable"]),
    "corrupt data pages": (_corrupt_pages, {}, [r"log\.parquet", "cannot read interaction rows"]),
    "mixed id kinds": (_mixed_id_kinds, {"log": ["log.parquet", "log2"]}, [r"b\.parquet", "'user_id'", "same id type"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_by_file_and_column(tmp_path, case):
    make, opts, needles = BAD[case]
    make(tmp_path)
    if not (tmp_path / "f.parquet").exists() and not opts.get("npy"):
        good_feats(tmp_path)
    opts = dict(opts)
    log = opts.pop("log", "log.parquet")
    log = [tmp_path / x for x in log] if isinstance(log, list) else tmp_path / log
    fpath = tmp_path / ("f.npy" if opts.pop("npy", False) else "f.parquet")
    kw = {"kcore": 1, **opts}
    with pytest.raises(DatasetError) as err:
        prep(log, {"v": fpath}, tmp_path / "out", progress=False, **kw)
    for needle in needles:
        assert re.search(needle, str(err.value)), (needle, str(err.value))
    no_leftovers(tmp_path / "out")


def test_existing_output_is_kept(tmp_path):
    log, f = good_log(tmp_path), good_feats(tmp_path)
    other = tmp_path / "out"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"out: output directory already exists.*--overwrite"):
        prep(log, {"v": f}, other, kcore=1, progress=False)
    assert (other / "keep.txt").read_text() == "mine"
    # a failing prep with --overwrite leaves the old directory untouched too
    with pytest.raises(DatasetError, match="4-core"):
        prep(log, {"v": f}, other, kcore=4, overwrite=True, progress=False)
    assert (other / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------
# command line and training
# --------------------------------------------------------------------------------------------------

def cli(argv):
    p = argparse.ArgumentParser(prog="lgmrec")
    sub = p.add_subparsers(dest="command", required=True)
    register_cli(sub)
    register_synth_cli(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_synth_prep_and_train(tmp_path, capsys):
    from lgmrec_dist.config import load_config
    from lgmrec_dist.train import train

    assert cli(["synth", "--users", "200", "--items", "80", "--interactions", "2000", "--out", str(tmp_path / "raw"),
                "--modalities", "image:8,text:4", "--seed", "3"]) == 0
    assert "--item-features image=" in capsys.readouterr().out
    argv = ["prep", "--interactions", str(tmp_path / "raw" / "interactions"),
            "--item-features", f"image={tmp_path / 'raw/features/image.parquet'}",
            "--item-features", f"text={tmp_path / 'raw/features/text.parquet'}",
            "--out", str(tmp_path / "data"), "--kcore", "3", "--split", "temporal", "--seed", "5",
            "--partitions", "2", "--partition-method", "random"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "[prep] k-core" in out and "train / valid / test" in out
    m = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert (m["split"], m["seed"], m["partitions"], m["partition_method"]) == ("temporal", 5, 2, "random")
    # bad input: exit code 2 and one error line naming the file
    assert cli(argv[:-6] + ["--out", str(tmp_path / "bad"), "--user-col", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'nope'" in err and "part-00000.parquet" in err
    assert not (tmp_path / "bad").exists()
    assert cli(["synth", "--users", "10", "--items", "10", "--interactions", "5", "--out", str(tmp_path / "s2")]) == 2
    # the prepared dataset trains
    metrics = train(tmp_path / "data", load_config("configs/demo.yaml", {"epochs": 1, "max_steps": 2,
                                                                          "embedding_size": 8}), tmp_path / "run")
    assert metrics["steps"] == 2 and np.isfinite(metrics["train_loss"][0])
    assert 0 <= metrics["test"]["recall@20"] <= 1
