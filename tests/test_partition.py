"""Graph partitions of a prepared dataset (format in data_prep/partition.py and docs/prep.md).

node_part.npy: int32, one part per node, users first then items; a training edge (u, i) belongs to the
part of its user, so the parts' edge sets cover every training edge exactly once.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.partition import edge_parts, load_partitions, partition_nodes, partition_stats
from data_prep.prep import prep
from data_prep.synth_parquet import make_parquet_synthetic
from lgmrec_dist.dataset import TRAIN, DatasetError, PreparedDataset


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("praw") / "cat"
    make_parquet_synthetic(out, 400, 150, 4000, {"image": 8, "text": 4}, seed=11, num_clusters=6)
    return out


def feats(root):
    return {m: root / "features" / f"{m}.parquet" for m in ("image", "text")}


def check_cover(node_part, users, items, num_users, num_parts):
    """Every training edge is owned by exactly one part, and the parts' edge lists partition the edges."""
    owner = edge_parts(node_part, users)
    assert owner.shape == users.shape and owner.min() >= 0 and owner.max() < num_parts
    per_part = [np.flatnonzero(owner == p) for p in range(num_parts)]
    every = np.sort(np.concatenate(per_part))
    assert np.array_equal(every, np.arange(len(users)))              # each edge exactly once
    for p, rows in enumerate(per_part):
        assert (node_part[users[rows]] == p).all()                   # ... in the part of its user
    return owner


@pytest.mark.parametrize("method, parts", [("metis", 3), ("random", 4), ("metis", 1)])
def test_prep_writes_partitions_covering_every_training_edge(raw, tmp_path, ray_cluster, method, parts):
    m = prep(raw / "interactions", feats(raw), tmp_path / "out", kcore=3, partitions=parts,
             partition_method=method, progress=False)
    assert m["partitions"] == parts and m["partition_method"] == (method if parts > 1 else "single")
    assert {"partitions/node_part.npy", "partitions/partition.json"} <= set(m["files"])     # checksummed
    ds = PreparedDataset.load(tmp_path / "out")
    node_part, meta = load_partitions(tmp_path / "out")
    n = ds.num_users + ds.num_items
    assert node_part.dtype == np.int32 and node_part.shape == (n,)
    assert node_part.min() >= 0 and node_part.max() < parts                 # a valid part for every node
    assert meta["num_parts"] == parts and meta["edge_rule"] == "user" and meta["num_nodes"] == n
    tu, ti = ds.pairs(TRAIN)
    owner = check_cover(node_part, tu, ti, ds.num_users, parts)
    assert meta["train_edges"] == np.bincount(owner, minlength=parts).tolist()
    assert sum(meta["num_users"]) == ds.num_users and sum(meta["num_items"]) == ds.num_items
    if parts > 1:
        assert min(meta["num_users"]) > 0 and min(meta["num_items"]) > 0
    if method == "random" and parts > 1:                                    # dealt round-robin
        assert max(meta["num_users"]) - min(meta["num_users"]) <= 1
        assert max(meta["num_items"]) - min(meta["num_items"]) <= 1


def test_metis_cuts_fewer_edges_than_random():
    # 4 planted communities, 95 % of the edges inside them
    rng = np.random.default_rng(0)
    U, I, E = 400, 200, 6000
    uc, ic = np.arange(U) % 4, np.arange(I) % 4
    users = rng.integers(0, U, E)
    inside = rng.random(E) < 0.95
    items = np.where(inside, rng.integers(0, I // 4, E) * 4 + uc[users], rng.integers(0, I, E))
    cut = {}
    for method in ("metis", "random"):
        part = partition_nodes(U, I, users, items, 4, method, seed=1)
        check_cover(part, users, items, U, 4)
        cut[method] = partition_stats(part, U, users, items, 4)["edge_cut_fraction"]
    assert cut["metis"] < 0.2 < 0.6 < cut["random"]


def test_partition_is_deterministic_and_validated():
    users, items = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    a = partition_nodes(3, 3, users, items, 2, "random", seed=4)
    assert np.array_equal(a, partition_nodes(3, 3, users, items, 2, "random", seed=4))
    assert partition_nodes(3, 3, users, items, 1).tolist() == [0] * 6
    with pytest.raises(DatasetError, match="cannot split 6 nodes"):
        partition_nodes(3, 3, users, items, 7, "random")
    with pytest.raises(DatasetError, match="one of metis, random"):
        partition_nodes(3, 3, users, items, 2, "spectral")
    # duplicate training pairs count once in the statistics
    s = partition_stats(np.zeros(6, np.int32), 3, np.r_[users, users], np.r_[items, items], 1)
    assert s["train_edges"] == [5] and s["edge_cut_fraction"] == 0.0


def test_load_partitions_rejects_a_tampered_file(raw, tmp_path, ray_cluster):
    prep(raw / "interactions", feats(raw), tmp_path / "out", kcore=3, partitions=2, partition_method="random",
         progress=False)
    path = tmp_path / "out" / "partitions" / "node_part.npy"
    part = np.load(path)
    np.save(path, part.astype(np.int64))
    with pytest.raises(DatasetError, match="expected int32"):
        load_partitions(tmp_path / "out")
    with pytest.raises(DatasetError, match="checksum mismatch for partitions/node_part.npy"):
        PreparedDataset.load(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "partitions" / "partition.json").read_text())["num_parts"] == 2
