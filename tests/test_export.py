"""Serving outputs: exported embeddings and recommendations match the model, never contain
training items, are the same when sharded over ranks; `recommend`; cold-start item embeddings."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from lgmrec_dist.cli import main as cli
from lgmrec_dist.dataset import TRAIN, DatasetError
from lgmrec_dist.export import cold_start_embeddings, export, load_trained

ROOT = Path(__file__).resolve().parents[1]


def read_recs(out: Path):
    return pq.read_table(out / "recommendations").to_pandas().sort_values(["user", "rank"]).reset_index(drop=True)


def test_export_matches_the_model_and_excludes_training_items(trained_run, tmp_path):
    out = export(trained_run, tmp_path / "out", top_k=10)
    model, ds = load_trained(trained_run)
    user_emb, item_emb = model.final_embeddings()
    users = pq.read_table(out / "users.parquet")
    assert users.num_rows == ds.num_users
    got = np.stack(users["embedding"].to_numpy(zero_copy_only=False))
    assert np.allclose(got, user_emb.numpy(), atol=1e-6)
    recs = read_recs(out)
    # raw ids of the MMRec-imported dataset are the dense ids themselves
    u, i = recs["user"].to_numpy(), recs["item"].to_numpy()
    assert np.allclose(recs["score"], (user_emb[u] * item_emb[i]).sum(1).numpy(), atol=1e-4)
    tu, ti = ds.pairs(TRAIN)
    assert not (set(zip(u.tolist(), i.tolist())) & set(zip(tu.tolist(), ti.tolist())))
    assert recs.groupby("user")["rank"].apply(lambda r: list(r) == list(range(1, len(r) + 1))).all()
    assert (recs.groupby("user")["score"].apply(lambda s: (np.diff(s) <= 1e-6).all())).all()
    # the best score among a user's non-training items is the exported rank 1
    user = 7
    scores = (user_emb[user] @ item_emb.T).numpy()
    scores[ti[tu == user]] = -np.inf
    assert recs[recs.user == user].iloc[0]["item"] == int(np.argmax(scores))
    with pytest.raises(DatasetError, match="already exists"):
        export(trained_run, out)


def test_sharded_export_equals_single_process(trained_run, tmp_path):
    export(trained_run, tmp_path / "one", top_k=10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lgmrec_dist",
           "export", "--run-dir", str(trained_run), "--out", str(tmp_path / "two"), "--top-k", "10"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two" / "recommendations").iterdir()) == ["part-0.parquet", "part-1.parquet"]
    a, b = read_recs(tmp_path / "one"), read_recs(tmp_path / "two")
    assert a[["user", "rank", "item"]].equals(b[["user", "rank", "item"]])
    assert np.allclose(a["score"], b["score"], atol=1e-5)


def test_recommend_prints_the_exported_top_k(trained_run, tmp_path, capsys):
    export(trained_run, tmp_path / "out", top_k=5)
    recs = read_recs(tmp_path / "out")
    assert cli(["recommend", "--run", str(trained_run), "--user", "3", "--k", "5"]) == 0
    printed = [int(line.split()[1]) for line in capsys.readouterr().out.splitlines()[1:]]
    assert printed == recs[recs.user == 3]["item"].tolist()
    assert cli(["recommend", "--run", str(trained_run), "--user", "no-such-user"]) == 2


def test_cold_start_embeddings_of_known_items(trained_run, tmp_path, capsys):
    """Items that were in training, embedded from their features alone, land near their trained embedding."""
    model, ds = load_trained(trained_run)
    feats = {m: np.asarray(x) for m, x in ds.features.items()}
    cold = cold_start_embeddings(model, feats)
    _, trained = model.final_embeddings()
    sim = F.cosine_similarity(cold, trained)
    other = F.cosine_similarity(cold, trained[torch.randperm(len(trained), generator=torch.Generator().manual_seed(0))])
    print(f"cold-start vs trained item embedding: mean cosine {sim.mean():.3f} (own item) vs {other.mean():.3f} (random item)")
    assert sim.mean() > other.mean() + 0.1
    # the CLI path: Parquet in, Parquet out, then ranked beside the catalogue by export
    for m, x in feats.items():
        pq.write_table(pa.table({"item_id": [f"new{i}" for i in range(20)],
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[:20].ravel()), x.shape[1])}),
                       tmp_path / f"{m}.parquet")
    args = ["embed-items", "--run", str(trained_run), "--out", str(tmp_path / "cold.parquet")]
    for m in feats:
        args += ["--item-features", f"{m}={tmp_path / f'{m}.parquet'}"]
    assert cli(args) == 0
    got = pq.read_table(tmp_path / "cold.parquet")
    assert got["raw_id"].to_pylist() == [f"new{i}" for i in range(20)]
    assert np.allclose(np.stack(got["embedding"].to_numpy(zero_copy_only=False)), cold[:20].numpy(), atol=1e-6)
    out = export(trained_run, tmp_path / "with-cold", top_k=10, cold_items=tmp_path / "cold.parquet")
    items = pq.read_table(out / "items.parquet")
    assert items.num_rows == ds.num_items + 20 and sum(items["cold"].to_pylist()) == 20


def test_id_map_rows_read_only_the_ids_asked_for(tmp_path):
    """A rank's lookup of raw ids, one row group at a time, equals taking them from the whole column, in the
    order asked (repeats included); an id outside the map is an error naming the file."""
    from lgmrec_dist.dataset import IdMapRows
    raw = pa.array([f"r{i * 7 % 1000}" for i in range(1000)])
    path = tmp_path / "map.parquet"
    pq.write_table(pa.table({"user": np.arange(1000), "raw_id": raw}), path, row_group_size=64)
    assert pq.ParquetFile(path).num_row_groups == 16
    ids = np.random.default_rng(0).integers(0, 1000, 300)
    rows = IdMapRows(path, ids[:200])
    assert rows.take(pa.array(ids[:200])).equals(raw.take(pa.array(ids[:200])))
    assert rows.take(ids[50:60][::-1]).equals(raw.take(pa.array(ids[50:60][::-1])))
    assert len(rows.raw) == len(np.unique(ids[:200]))
    assert len(IdMapRows(path, np.array([], np.int64)).raw) == 0
    with pytest.raises(DatasetError, match="map.parquet"):
        IdMapRows(path, np.array([3, 1000]))
