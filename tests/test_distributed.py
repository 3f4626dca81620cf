"""The exact distributed path against the single-process model, on real 2-process gloo groups
launched with torchrun: sharded full-fanout CGE == full-graph CGE, per-step loss and parameters of 2
ranks == 1 process, distributed evaluation == single-process evaluation, and clear launch errors."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.partition import partition_nodes
from lgmrec_dist.batches import TripleSampler
from lgmrec_dist.config import load_config
from lgmrec_dist.dataset import TRAIN, PreparedDataset
from lgmrec_dist.distributed.engine import ownership_for
from lgmrec_dist.distributed.group import LaunchError, init_process_group
from lgmrec_dist.local import LocalEngine
from lgmrec_dist.train import make_evaluators

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["embedding_size=16", "train_batch_size=256", "learning_rate=0.005", "cl_weight=0.001",
             "n_hyper_layer=2", "seed=5"]
STEPS = 4


def torchrun(nproc: int, *args, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module", params=["contiguous", "random", "metis"])
def two_ranks(request, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"dist-{request.param}")
    ownership = request.param
    if ownership != "contiguous":  # the partition is made once here: METIS is not deterministic across processes
        ds = PreparedDataset.load(tiny_dataset)
        if ownership == "random":
            part = np.random.default_rng(0).integers(0, 2, ds.num_users + ds.num_items)
        else:
            part = partition_nodes(ds.num_users, ds.num_items, *ds.pairs(TRAIN), 2, "metis")
        ownership = str(out / "node_part.npy")
        np.save(ownership, part)
    res = torchrun(2, str(ROOT / "tests" / "dist_worker.py"), str(tiny_dataset), str(out), ownership,
                   str(STEPS), *OVERRIDES)
    assert res.returncode == 0, res.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def single_process(data, steps):
    torch.set_num_threads(1)
    ds = PreparedDataset.load(data)
    cfg = load_config(None, OVERRIDES)
    eng = LocalEngine(cfg, ds, torch.device("cpu"))
    with torch.no_grad():
        cge0 = eng.model.cge().clone()
    tu, ti = ds.pairs(TRAIN)
    users, pos, neg = (torch.from_numpy(a) for a in TripleSampler(ds.num_items, tu, ti, cfg.seed).epoch(0))
    losses = []
    for b in range(steps):
        sl = slice(b * cfg.train_batch_size, (b + 1) * cfg.train_batch_size)
        terms = eng.model.batch_loss(users[sl], pos[sl], neg[sl], b)
        eng.optimizer.zero_grad()
        terms["loss"].backward()
        eng.optimizer.step()
        losses.append({k: v.item() for k, v in terms.items()})
    return eng, cge0, losses, ds, cfg


def test_two_ranks_match_one_process(two_ranks, tiny_dataset):
    eng, cge0, losses, ds, cfg = single_process(tiny_dataset, STEPS)
    # sharded full-fanout CGE == full-graph CGE, row by row
    for r in two_ranks:
        assert r["halo"] > 0  # the partition really cuts the graph
        assert r["same_graph_with_duplicates"]
        assert torch.allclose(r["cge0"], cge0[r["owned"]], atol=1e-6)
    assert sorted(torch.cat([r["owned"] for r in two_ranks]).tolist()) == list(range(ds.num_users + ds.num_items))
    # the same loss at every step (float reassociation across ranks only)
    for step, (mine, ref) in enumerate(zip(two_ranks[0]["losses"], losses)):
        for key in ("loss", "bpr", "hcl", "reg"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-5), (step, key)
    # the same parameters after the steps
    m = eng.model
    for r in two_ranks:
        assert torch.allclose(r["user_embedding"], m.user_embedding.detach()[r["user_ids"]], rtol=1e-4, atol=1e-6)
        assert torch.allclose(r["item_embedding"], m.item_embedding.detach()[r["item_ids"]], rtol=1e-4, atol=1e-6)
    for key, value in two_ranks[0]["dense"].items():
        ref = dict(m.named_parameters())[key]
        assert torch.allclose(value, ref.detach(), rtol=1e-4, atol=1e-6), key
    assert torch.equal(two_ranks[0]["dense"]["proj.image"], two_ranks[1]["dense"]["proj.image"])  # DDP in sync
    # the replicated gradients are the sum over ranks (the global gradient), not the mean: Adam's update is
    # nearly blind to that factor, so the gradients of the last step are compared directly
    for key, grad in two_ranks[0]["dense_grad"].items():
        ref = dict(m.named_parameters())[key].grad
        # relative to the whole gradient: single entries near zero carry the reassociation noise of the two
        # summation orders, while a mean instead of a sum would be off by half the norm
        assert float((grad - ref).norm()) <= 1e-3 * float(ref.norm()), key
        assert torch.equal(grad, two_ranks[1]["dense_grad"][key]), key


def test_distributed_evaluation_equals_single_process(two_ranks, tiny_dataset):
    """Load the 2-rank model's parameters into the single-process model and evaluate there."""
    eng, *_ , ds, cfg = single_process(tiny_dataset, 0)
    m = eng.model
    with torch.no_grad():
        for r in two_ranks:
            m.user_embedding[r["user_ids"]] = r["user_embedding"]
            m.item_embedding[r["item_ids"]] = r["item_embedding"]
        for key, value in two_ranks[0]["dense"].items():
            dict(m.named_parameters())[key].copy_(value)
    valid_eval, test_eval = make_evaluators(ds, cfg)
    emb = eng.embeddings()
    assert two_ranks[0]["valid"] == two_ranks[1]["valid"]
    for split, ev in (("valid", valid_eval), ("test", test_eval)):
        ref = ev.evaluate_metrics(*emb)
        got = two_ranks[0][split]
        assert set(got) == set(ref)
        for key in ref:
            assert got[key] == pytest.approx(ref[key], abs=1e-4), (split, key)


def test_torchrun_cli_writes_metrics(tiny_dataset, tmp_path):
    res = torchrun(2, "-m", "lgmrec_dist.train", "--data", str(tiny_dataset), "--config", "configs/demo.yaml",
                   "--out", str(tmp_path / "run"), "--set", "epochs=1", "--set", "max_steps=2",
                   "--set", "embedding_size=8")
    assert res.returncode == 0, res.stderr[-4000:]
    import json
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2 and "recall@20" in metrics["test"]


def test_launch_errors(tiny_dataset, monkeypatch, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LaunchError, match="rendezvous"):
        init_process_group("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29599")
    if not torch.cuda.is_available():
        with pytest.raises(LaunchError, match="nccl"):
            init_process_group("cpu", backend="nccl")
    ds = PreparedDataset.load(tiny_dataset)  # as if prepared for 4 ranks: node_part.npy is all that is read
    ds.manifest, ds.path = {**ds.manifest, "partitions": 4}, tmp_path
    (tmp_path / "partitions").mkdir()
    np.save(tmp_path / "partitions" / "node_part.npy", np.arange(ds.num_users + ds.num_items) % 4)
    with pytest.raises(LaunchError, match="partitioned for 4 ranks"):
        ownership_for(ds, load_config(None), 0, 2)
    assert ownership_for(ds, load_config(None, {"partitioning": "contiguous"}), 0, 2).world_size == 2


def test_sent_bytes_count_the_backward_mirror_of_differentiable_payloads():
    """CommStats: a payload whose gradient will travel back in backward counts twice; a constant one, or one
    sent under no_grad (inference, refreshes), once."""
    from lgmrec_dist.distributed.exchange import CommStats
    CommStats.take()
    x = torch.ones(3, requires_grad=True)
    CommStats.add(12, x)
    CommStats.add(5, x.detach())
    with torch.no_grad():
        CommStats.add(7, x)
    CommStats.add(2)
    assert CommStats.take() == 2 * 12 + 5 + 7 + 2 and CommStats.take() == 0


def test_engine_table_covers_every_mode():
    """One engine per (mode, ranks, shard_tables), each implementing the whole engine interface."""
    import inspect

    from lgmrec_dist.distributed.engine import ShardedEngine
    from lgmrec_dist.engine import Engine
    from lgmrec_dist.engines import engine_class
    from lgmrec_dist.sampled import SampledEngine
    want = {("exact", 1): LocalEngine, ("exact", 2): ShardedEngine, ("sampled", 1): SampledEngine,
            ("sampled", 2): SampledEngine}
    for (mode, world), cls in want.items():
        for shard in (False, True):
            extra = ["sparse_embeddings=true", "hyper_refresh_steps=1", "hcl_negatives=uniform"] if shard else []
            got = engine_class(load_config(None, [f"mode={mode}", f"shard_tables={str(shard).lower()}", *extra]), world)
            assert got is cls, (mode, world, shard)
            assert issubclass(got, Engine) and not inspect.isabstract(got)
