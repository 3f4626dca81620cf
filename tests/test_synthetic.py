"""Synthetic MMRec catalogues and the MMRec per-user split rule (docs/model.md §2, §3)."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.mmrec import read_inter
from data_prep.synthetic import (generate_synthetic, make_mmrec_synthetic, make_prepared_synthetic,
                                 mmrec_split)
from lgmrec_dist.dataset import DatasetError, PreparedDataset


def per_user_counts(users, labels, n_users):
    return np.stack([np.bincount(users[labels == k], minlength=n_users) for k in (0, 1, 2)], axis=1)


def expected_counts(n):
    """§2, written per user the slow way."""
    if n < 10:
        return n - 2, 1, 1
    h = int(0.2 * n)
    return n - h, h // 2, h - h // 2


def test_split_rule_hand_made_case():
    sizes = {0: 5, 1: 9, 2: 10, 3: 23}
    users = np.concatenate([np.full(n, u) for u, n in sizes.items()])
    users = np.random.default_rng(7).permutation(users)        # rows of a user need not be contiguous
    labels = mmrec_split(users, 4, np.random.default_rng(0))
    assert labels.dtype == np.int8 and labels.shape == users.shape
    counts = per_user_counts(users, labels, 4)
    assert counts.tolist() == [[3, 1, 1], [7, 1, 1], [8, 1, 1], [19, 2, 2]]


def test_split_rule_matches_reference_and_is_seeded():
    rng = np.random.default_rng(1)
    n_users = 300
    sizes = rng.integers(1, 60, n_users)
    users = rng.permutation(np.repeat(np.arange(n_users), sizes))
    labels = mmrec_split(users, n_users + 5, 42)                 # users without rows are fine
    counts = per_user_counts(users, labels, n_users)
    for u, n in enumerate(sizes):
        if n >= 2:
            assert tuple(counts[u]) == expected_counts(n), (u, n)
    assert tuple(counts[sizes == 1][0]) == (0, 0, 1)            # the notebook's slicing for n = 1
    assert np.array_equal(labels, mmrec_split(users, n_users + 5, np.random.default_rng(42)))
    assert not np.array_equal(labels, mmrec_split(users, n_users + 5, 43))   # the shuffle depends on the seed
    assert mmrec_split(np.zeros(0, np.int64), 3, 0).shape == (0,)
    with pytest.raises(ValueError):
        mmrec_split(np.array([0, 5]), 3, 0)


def test_split_rule_is_vectorised_fast():
    import time
    rng = np.random.default_rng(0)
    users = rng.integers(0, 100_000, 2_000_000)
    t = time.perf_counter()
    labels = mmrec_split(users, 100_000, rng)
    assert time.perf_counter() - t < 10
    assert np.isin(labels, (0, 1, 2)).all()


@pytest.fixture(scope="module")
def synth():
    return generate_synthetic(1000, 500, 20000, seed=0)


def test_synthetic_validity(synth):
    d = synth
    U, I = 1000, 500
    users, items, split = d["users"], d["items"], d["split"]
    assert len(users) == 20000 and users.dtype == np.int64 and items.dtype == np.int64
    counts = per_user_counts(users, split, U)
    assert (counts.sum(1) >= 5).all()
    assert (counts[:, 1] >= 1).all() and (counts[:, 2] >= 1).all()
    for n, row in zip(counts.sum(1), counts):
        assert tuple(row) == expected_counts(n)
    assert len(np.unique(users * I + items)) == len(users)               # no duplicate pairs
    assert (np.bincount(items, minlength=I) > 0).all() and items.max() < I  # every item occurs
    # power-law-ish activity and popularity: heavy heads
    assert counts.sum(1).max() >= 5 * np.median(counts.sum(1))
    assert np.bincount(items).max() >= 5 * np.median(np.bincount(items))
    for name, dim in {"image": 64, "text": 32}.items():
        x = d["features"][name]
        assert x.shape == (I, dim) and x.dtype == np.float32 and np.isfinite(x).all()


def test_synthetic_is_deterministic(tmp_path):
    a = make_mmrec_synthetic(tmp_path / "a", 80, 40, 900, seed=5)
    b = make_mmrec_synthetic(tmp_path / "b", 80, 40, 900, seed=5)
    c = make_mmrec_synthetic(tmp_path / "c", 80, 40, 900, seed=6)
    for f in ("synthetic.inter", "image_feat.npy", "text_feat.npy"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert (a / f).read_bytes() != (c / f).read_bytes()
    # the interactions do not depend on the modalities requested
    d1 = generate_synthetic(80, 40, 900, modalities={"image": 8}, seed=5)
    d2 = generate_synthetic(80, 40, 900, modalities={"text": 4, "audio": 3}, seed=5)
    assert np.array_equal(d1["items"], d2["items"]) and np.array_equal(d1["split"], d2["split"])


def test_mmrec_files(tmp_path):
    out = make_mmrec_synthetic(tmp_path / "syn", 50, 30, 600, modalities={"image": 16, "text": 8}, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["image_feat.npy", "synthetic.inter", "text_feat.npy"]
    assert (out / "synthetic.inter").read_text().split("\n", 1)[0] == "userID\titemID\trating\ttimestamp\tx_label"
    data = read_inter(out / "synthetic.inter")
    assert data["num_users"] == 50 and data["num_items"] == 30 and len(data["users"]) == 600
    for name, dim in {"image": 16, "text": 8}.items():
        x = np.load(out / f"{name}_feat.npy")
        assert x.shape == (30, dim) and x.dtype == np.float32
    with pytest.raises(DatasetError, match="exists"):
        make_mmrec_synthetic(out, 50, 30, 600)


def test_planted_structure(synth):
    """Items a user interacted with are more alike (in both modalities) than random pairs of items."""
    users, items = synth["users"], synth["items"]
    rng = np.random.default_rng(0)
    for name in ("image", "text"):
        x = synth["features"][name].astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        same = users[1:] == users[:-1]                       # consecutive rows of one user
        co = np.einsum("ij,ij->i", x[items[:-1][same]], x[items[1:][same]]).mean()
        a, b = rng.integers(0, len(x), (2, 20000))
        rand = np.einsum("ij,ij->i", x[a], x[b]).mean()
        assert co > rand + 0.1, (name, co, rand)
    # and the interactions follow the users' preferred clusters far more often than chance
    top = synth["user_pref"].argmax(1)
    hit = (synth["item_cluster"][items] == top[users]).mean()
    assert hit > 3 / synth["user_pref"].shape[1]


def test_make_prepared_synthetic(tmp_path):
    out = make_prepared_synthetic(tmp_path / "ds", num_users=50, num_items=30, num_interactions=600, seed=2)
    ds = PreparedDataset.load(out)
    m = ds.manifest
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (50, 30, 600)
    assert m["num_train"] + m["num_valid"] + m["num_test"] == 600
    assert m["modalities"] == {"image": 64, "text": 32}
    assert m["source"] == "synthetic" and m["synthetic"]["seed"] == 2
    d = generate_synthetic(50, 30, 600, seed=2)
    assert np.array_equal(ds.users, d["users"]) and np.array_equal(ds.items, d["items"])
    assert np.array_equal(ds.split, d["split"])
    assert np.array_equal(ds.features["image"], d["features"]["image"])
    with pytest.raises(DatasetError, match="exists"):
        make_prepared_synthetic(out, num_users=50, num_items=30, num_interactions=600)
    make_prepared_synthetic(out, num_users=50, num_items=30, num_interactions=600, seed=3, overwrite=True)
    assert PreparedDataset.load(out).manifest["synthetic"]["seed"] == 3


@pytest.mark.parametrize("args", [(10, 4, 50), (10, 20, 49), (10, 100, 60), (3, 5, 16), (0, 10, 0)])
def test_infeasible_sizes_rejected(args):
    with pytest.raises(ValueError):
        generate_synthetic(*args)


@pytest.mark.parametrize("args", [(10, 5, 50), (7, 12, 84), (40, 200, 200)])
def test_edge_sizes(args):
    U, I, N = args
    d = generate_synthetic(U, I, N, modalities={"image": 4}, seed=1)
    assert len(d["users"]) == N and len(np.unique(d["users"] * I + d["items"])) == N
    assert (np.bincount(d["users"], minlength=U) >= 5).all()
    assert (np.bincount(d["items"], minlength=I) > 0).all()
