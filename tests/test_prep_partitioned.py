"""``lgmrec prep`` as a Ray job over blocks, and the partitioned layout (docs/prep.md, "Pipeline" and
"Partitioned layout"): real Ray (the session's ``ray_cluster``), real Parquet.

* the Ray job equals :func:`data_prep.steps.reference_steps` (whole arrays in one process) on the same
  input: dropped rows, k-core rounds, id maps, rows, labels, for both split rules;
* every part holds every training edge its owned nodes need and no node beyond its halo;
* a reader of part k opens no file of another part (an audit hook records every opened path, and the
  other parts' directories are moved away);
* bad partitioned input is refused naming the partition and the file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_prep.files import resolve_files
from data_prep.prep import prep
from data_prep.steps import reference_steps
from data_prep.synth_parquet import make_parquet_synthetic
from lgmrec_dist.dataset import MANIFEST, TRAIN, DatasetError, PreparedDataset, atomic_write_json, sha256_file
from lgmrec_dist.dataset_parts import open_partition


@pytest.fixture(autouse=True)
def _ray(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """400 users, 150 items, 4,000 rows in 8 files (8 blocks) + duplicates, null ids, missing vectors."""
    out = tmp_path_factory.mktemp("braw") / "cat"
    make_parquet_synthetic(out, 400, 150, 4000, {"image": 8, "text": 4}, seed=21, duplicate_rate=0.02,
                           null_rate=0.005, missing_feature_rate=0.02, rows_per_file=500, num_clusters=6)
    return out


def feats(root):
    return {m: root / "features" / f"{m}.parquet" for m in ("image", "text")}


def reference(raw: Path, kcore: int, split: str, seed: int) -> dict:
    """The whole log in this process, the reference steps on it."""
    t = pa.concat_tables([pq.read_table(f, columns=["user_id", "item_id", "timestamp"])
                          for f in resolve_files(raw / "interactions", "interaction")])
    t = t.filter(pc.and_(pc.and_(pc.is_valid(t["user_id"]), pc.is_valid(t["item_id"])), pc.is_valid(t["timestamp"])))
    ue, ie = t["user_id"].combine_chunks().dictionary_encode(), t["item_id"].combine_chunks().dictionary_encode()
    ref = reference_steps(ue.indices.to_numpy().astype(np.int64), ie.indices.to_numpy().astype(np.int64),
                          t["timestamp"].to_numpy().astype(np.int64), len(ue.dictionary), len(ie.dictionary),
                          kcore, split, seed)
    ref["user_raw"] = ue.dictionary.take(pa.array(ref["user_codes"])).to_pylist()
    ref["item_raw"] = ie.dictionary.take(pa.array(ref["item_codes"])).to_pylist()
    ref["input_rows"] = sum(pq.ParquetFile(f).metadata.num_rows for f in resolve_files(raw / "interactions", "x"))
    ref["null"] = ref["input_rows"] - t.num_rows
    return ref


@pytest.mark.parametrize("split, kcore", [("mmrec", 8), ("temporal", 8), ("mmrec", 1)])
def test_ray_job_equals_the_reference_steps(raw, tmp_path, split, kcore):
    m = prep(raw / "interactions", feats(raw), tmp_path / "out", kcore=kcore, split=split, seed=4, progress=False)
    ref = reference(raw, kcore, split, 4)
    if kcore > 1:
        assert ref["rounds"] >= 2 and ref["dropped_kcore"] > 0          # the case exercises the k-core
    assert ref["duplicates"] > 0 and ref["null"] > 0
    assert m["dropped"] == {"null": ref["null"], "duplicate": ref["duplicates"], "kcore": ref["dropped_kcore"]}
    assert m["kcore_rounds"] == ref["rounds"] and m["input_rows"] == ref["input_rows"]
    ds = PreparedDataset.load(tmp_path / "out")
    assert ds.raw_ids("user").to_pylist() == ref["user_raw"]            # id maps: same dense ids
    assert ds.raw_ids("item").to_pylist() == ref["item_raw"]
    assert np.array_equal(ds.users, ref["users"]) and np.array_equal(ds.items, ref["items"])   # rows, in order
    assert np.array_equal(ds.split, ref["labels"])
    t = pq.read_table(tmp_path / "out" / "interactions.parquet")["timestamp"].to_numpy()
    assert np.array_equal(t, ref["times"])


def _pairs(u, i):
    return set(zip(np.asarray(u).tolist(), np.asarray(i).tolist()))


@pytest.mark.parametrize("method, parts", [("random", 3), ("metis", 2)])
def test_parts_hold_exactly_the_edges_their_nodes_need(raw, tmp_path, method, parts):
    m = prep(raw / "interactions", feats(raw), tmp_path / "out", kcore=3, partitions=parts, partition_method=method,
             seed=2, progress=False)
    ds = PreparedDataset.load(tmp_path / "out")       # the whole layout is still written and checksummed
    nu = ds.num_users
    tu, ti = ds.pairs(TRAIN)
    owned_users, owned_items = [], []
    for k in range(parts):
        p = open_partition(tmp_path / "out", k, parts)
        owned_users.append(p.owned_users)
        owned_items.append(p.owned_items)
        assert np.array_equal(p.owned_users, np.flatnonzero(p.node_part[:nu] == k))
        mine = (p.node_part[tu] == k) | (p.node_part[nu + ti] == k)
        # exactly the training rows with an owned end, in log order (duplicates kept, as in the whole file)
        assert np.array_equal(p.train_users, tu[mine]) and np.array_equal(p.train_items, ti[mine])
        ends_u, ends_i = np.unique(p.train_users), np.unique(p.train_items)
        assert np.array_equal(p.halo_users, np.setdiff1d(ends_u, p.owned_users))   # nothing beyond the halo
        assert np.array_equal(p.halo_items, np.setdiff1d(ends_i, p.owned_items))
        for label in (1, 2):                      # held-out pairs of owned users, all of them
            u, i = ds.pairs(label)
            own = p.node_part[u] == k
            assert _pairs(*p.pairs(label)) == _pairs(u[own], i[own]) and len(p.pairs(label)[0]) == own.sum()
        for name in ds.modalities:
            assert np.array_equal(p.features[name], ds.features[name][p.owned_items])
    assert np.array_equal(np.sort(np.concatenate(owned_users)), np.arange(nu))    # every node owned once
    assert np.array_equal(np.sort(np.concatenate(owned_items)), np.arange(ds.num_items))
    assert [c["train_edges"] for c in m["partition_dirs"]] == [
        len(open_partition(tmp_path / "out", k, parts).train_users) for k in range(parts)]


@pytest.fixture(scope="module")
def parted(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("parted") / "ds"
    prep(raw / "interactions", feats(raw), out, kcore=3, partitions=3, partition_method="random", progress=False)
    return out


def test_reader_of_part_k_opens_nothing_of_other_parts(parted, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(parted, ds)
    opened, recording = [], [True]

    def audit(event, args):
        if recording[0] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode()))
    sys.addaudithook(audit)              # audit hooks cannot be removed: it records during the read only
    try:
        p = open_partition(ds, 1, 3)
    finally:
        recording[0] = False
    seen = [Path(f).resolve() for f in opened]
    assert len(p.train_users) and seen
    assert any(f.is_relative_to((ds / "part-1").resolve()) for f in seen)       # the hook does see opens
    for k in (0, 2):
        assert not any(f.is_relative_to((ds / f"part-{k}").resolve()) for f in seen), k
    # pyarrow opens Parquet files natively (no audit event): the read must also work with the other parts gone

    for k in (0, 2):
        shutil.move(ds / f"part-{k}", tmp_path / f"away-{k}")
    q = open_partition(ds, 1, 3)
    assert np.array_equal(q.train_users, p.train_users)


def _copy(parted, tmp_path) -> Path:
    ds = tmp_path / "ds"
    shutil.copytree(parted, ds)
    return ds


def _rehash(ds: Path, rel: str) -> None:
    m = json.loads((ds / MANIFEST).read_text())
    m["files"][rel] = sha256_file(ds / rel)
    atomic_write_json(ds / MANIFEST, m)


def test_partitioned_for_another_p(parted):
    with pytest.raises(DatasetError, match=r"partitioned for P = 3 .* opened by 2 ranks"):
        open_partition(parted, 0, 2)
    with pytest.raises(DatasetError, match=r"partition 3 does not exist"):
        open_partition(parted, 3, 3)


def test_missing_partition_directory(parted, tmp_path):
    ds = _copy(parted, tmp_path)
    shutil.rmtree(ds / "part-2")
    with pytest.raises(DatasetError, match=r"partition 2: directory part-2/ is missing"):
        open_partition(ds, 2, 3)
    open_partition(ds, 0, 3)               # the other parts are unaffected


@pytest.mark.parametrize("rel", ["train_edges.parquet", "features/image.npy", "owned_items.npy"])
def test_truncated_or_missing_partition_file(parted, tmp_path, rel):
    ds = _copy(parted, tmp_path)
    f = ds / "part-1" / rel
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DatasetError, match=rf"partition 1: checksum mismatch for part-1/{rel}"):
        open_partition(ds, 1, 3)
    f.unlink()
    with pytest.raises(DatasetError, match=rf"partition 1: file part-1/{rel} is missing"):
        open_partition(ds, 1, 3)


def test_partition_book_that_disagrees_with_the_files(parted, tmp_path):
    ds = _copy(parted, tmp_path)
    book = ds / "partitions" / "node_part.npy"
    node_part = np.load(book)
    nu = json.loads((ds / MANIFEST).read_text())["num_users"]
    u0, u1 = (int(np.flatnonzero(node_part[:nu] == k)[0]) for k in (0, 1))
    node_part[u0], node_part[u1] = 1, 0                      # a valid book, not the one the parts were cut by
    np.save(book, node_part)
    with pytest.raises(DatasetError, match=r"checksum mismatch for partitions/node_part.npy"):
        open_partition(ds, 0, 3)
    _rehash(ds, "partitions/node_part.npy")                  # checksums fine, contents disagree
    with pytest.raises(DatasetError, match=r"partition 0: part-0/owned_users.npy disagrees with the partition "
                                           r"book partitions/node_part.npy"):
        open_partition(ds, 0, 3)


def test_unpartitioned_dataset_is_refused_by_the_partition_reader(raw, tmp_path):
    prep(raw / "interactions", feats(raw), tmp_path / "one", kcore=3, progress=False)
    with pytest.raises(DatasetError, match=r"partitioned for P = 1"):
        open_partition(tmp_path / "one", 0, 2)
    assert not (tmp_path / "one" / "part-0").exists()


def test_dictionary_merger_equals_one_encode_of_all_blocks():
    from data_prep.steps import merge_dictionaries
    blocks = [pa.array(["b", "a", "b", "c"]), pa.array(["d", "a"]), pa.array([], pa.string()), pa.array(["c", "e"])]
    values, remaps = merge_dictionaries([b.dictionary_encode().dictionary for b in blocks])
    whole = pa.concat_arrays(blocks).dictionary_encode()
    assert values.to_pylist() == whole.dictionary.to_pylist() == ["b", "a", "c", "d", "e"]
    codes = np.concatenate([r[b.dictionary_encode().indices.to_numpy()] for r, b in zip(remaps, blocks)])
    assert codes.tolist() == whole.indices.to_numpy().tolist()


def test_npy_features_are_partitioned_too(raw, tmp_path):
    """A .npy source (rows in another order) gives each part the same owned rows as the Parquet one."""
    t = pq.read_table(feats(raw)["text"])
    ids = t["item_id"].to_numpy(zero_copy_only=False)
    mat = np.stack(t["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    rev = np.arange(len(ids))[::-1]
    np.save(tmp_path / "text.npy", mat[rev])
    np.save(tmp_path / "text.ids.npy", ids[rev].astype(str))
    for name, src in (("a", feats(raw)["text"]), ("b", tmp_path / "text.npy")):
        prep(raw / "interactions", {"text": src}, tmp_path / name, kcore=3, partitions=2, partition_method="random",
             progress=False)
    for k in range(2):
        a, b = (open_partition(tmp_path / n, k, 2) for n in ("a", "b"))
        assert np.array_equal(a.owned_items, b.owned_items)
        assert np.array_equal(a.features["text"], b.features["text"]) and len(a.features["text"])


def test_prep_on_a_two_node_ray_cluster(tmp_path):
    """The multi-node launch check, run for real: a two-node Ray cluster on this machine (``ray start --head``,
    then ``ray start --address``, one CPU each), ``prep --partitions 2`` through it with tasks on both
    nodes, every part readable (``launch/check_ray_two_nodes.py``; it stops only its own cluster)."""
    script = Path(__file__).resolve().parents[1] / "launch" / "check_ray_two_nodes.py"
    res = subprocess.run([sys.executable, str(script), "--keep", str(tmp_path / "work")], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for check in ("two alive nodes", "tasks on both nodes", "every part opens"):
        assert f"[2node] ok   {check}" in res.stdout, res.stdout[-3000:]
