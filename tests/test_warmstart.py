"""Warm start (`lgmrec train --init-from RUN`): rows carried over by raw id across two prepared datasets
whose id maps differ, new rows as in a fresh run, dense weights copied; a shape mismatch refused."""
import numpy as np
import pytest
import torch

from data_prep.synthetic import generate_synthetic, write_subset
from lgmrec_dist.checkpoint import read_best_tables
from lgmrec_dist.cli import main as cli
from lgmrec_dist.config import load_config
from lgmrec_dist.dataset import PreparedDataset
from lgmrec_dist.local import LocalEngine
from lgmrec_dist.train import train
from lgmrec_dist.warmstart import warm_start

CFG = {"epochs": 1, "embedding_size": 16, "train_batch_size": 512}


@pytest.fixture(scope="module")
def preps(tmp_path_factory):
    """An old log (first 240 users, 160 items) and a grown one (all 300 users, 200 items), id maps shuffled."""
    root = tmp_path_factory.mktemp("warm")
    data = generate_synthetic(300, 200, 4000, {"image": 16, "text": 8}, seed=5)
    old = write_subset(root / "old", data, np.arange(240), np.arange(160), order_seed=1)
    new = write_subset(root / "new", data, np.arange(300), np.arange(200), order_seed=2)
    run = root / "run"
    train(old, load_config("configs/demo.yaml", CFG), run)
    return {"root": root, "data": data, "old": old, "new": new, "run": run}


def raw(ds, kind):
    return [str(r) for r in ds.raw_ids(kind).to_pylist()]


def test_rows_are_carried_over_by_raw_id(preps):
    old_ds, new_ds = PreparedDataset.load(preps["old"]), PreparedDataset.load(preps["new"])
    assert raw(old_ds, "user")[:5] != raw(new_ds, "user")[:5]      # the id maps really differ
    _, best = read_best_tables(preps["run"])
    cfg = load_config("configs/demo.yaml", CFG)
    fresh = LocalEngine(cfg, new_ds, torch.device("cpu"))
    engine = LocalEngine(cfg, new_ds, torch.device("cpu"))
    counts = warm_start(engine, new_ds, preps["run"])
    assert counts == {"users_carried": 240, "users_new": 60, "items_carried": 160, "items_new": 40}
    m = engine.model
    for kind, table in (("user", m.user_embedding), ("item", m.item_embedding)):
        old_pos = {r: i for i, r in enumerate(raw(old_ds, kind))}
        fresh_table = getattr(fresh.model, f"{kind}_embedding")
        for j, r in enumerate(raw(new_ds, kind)):
            if r in old_pos:
                assert torch.equal(table[j], best[f"{kind}_embedding"][old_pos[r]]), (kind, r)
            else:                                                  # as a run from scratch starts it
                assert torch.equal(table[j], fresh_table[j]), (kind, r)
    for name, value in best["dense"].items():
        assert torch.equal(dict(m.named_parameters())[name], value)


def test_train_init_from_runs_and_logs_the_warm_start(preps, tmp_path):
    out = tmp_path / "warm"
    assert cli(["train", "--data", str(preps["new"]), "--config", "configs/demo.yaml", "--out", str(out),
                "--init-from", str(preps["run"]), "--set", "epochs=1", "--set", "embedding_size=16"]) == 0
    log = (out / "train.log").read_text()
    assert "warm start from" in log and "'users_carried': 240" in log


@pytest.mark.parametrize("sets, dims, words", [
    (["embedding_size=32"], None, "embedding_size 16, this run has 32"),
    (["embedding_size=16", "hyper_num=8"], None, "dense parameters"),
    (["embedding_size=16", "use_mge=false"], None, "dense parameters"),
    (["embedding_size=16"], {"image": 12, "text": 8}, "modalities"),
])
def test_a_shape_or_modality_mismatch_is_refused(preps, tmp_path, capsys, sets, dims, words):
    data = preps["new"]
    if dims is not None:
        data = write_subset(tmp_path / "other", preps["data"], np.arange(300), np.arange(200), 2, dims)
    args = ["train", "--data", str(data), "--config", "configs/demo.yaml", "--out", str(tmp_path / "bad"),
            "--init-from", str(preps["run"]), "--set", "epochs=1"]
    assert cli(args + [x for kv in sets for x in ("--set", kv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]       # after the run's log lines
    assert err.startswith("error: --init-from") and words in err, err
    assert not (tmp_path / "bad").exists()       # refused before the run wrote anything


def test_init_from_a_run_without_a_best_model_is_refused(preps, tmp_path, capsys):
    assert cli(["train", "--data", str(preps["new"]), "--out", str(tmp_path / "x"), "--init-from", str(tmp_path)]) == 2
    assert "no best model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
