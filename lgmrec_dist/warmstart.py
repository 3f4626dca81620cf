"""Warm start (docs/serving.md "Warm-start retraining"): a run's best model mapped onto the initial state
of a training engine built for a newer prepared dataset whose id maps differ.

* ID embeddings (E_U, E_I, docs/model.md §1.2): the row of every user and item the old run knew is
  carried over by raw id; rows of new users and items keep their fresh initialisation (the same draw as a
  run from scratch);
* dense weights (W_m, V_m) are copied;
* the optimiser starts fresh (Adam moments zero). Carrying the old run's Adam state was measured
  (bench/bench_serve.py --part warmstart, docs/serving.md "Benchmarks"): both reached 98% of the
  from-scratch test Recall@20 after one epoch, so the simpler reset is kept — the best model, which is
  what a warm start reads, has no optimiser state of its own.

Refused with a ``CheckpointError`` naming the difference: another embedding size, other modalities or
feature dimensions, other dense parameters (use_mge / use_ghe / hyper_num).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn as nn

from lgmrec_dist.checkpoint import CheckpointError, dataset_digest, read_best_tables, read_meta, read_sharded
from lgmrec_dist.dataset import ITEM_MAP, USER_MAP, PreparedDataset, read_manifest


def _parameters(engine) -> dict[str, nn.Parameter]:
    """The engine's parameters by the names of a best-model payload (E_U, E_I, proj.m, hyper.m)."""
    return dict(engine.model.named_parameters())


def old_dataset_path(run_dir: Path, meta: dict) -> Path:
    path = meta.get("dataset_path")
    if not path and (run_dir / "metrics.json").is_file():
        path = json.loads((run_dir / "metrics.json").read_text()).get("dataset")
    if not path or not (Path(path) / "manifest.json").is_file():
        raise CheckpointError(f"--init-from {run_dir}: the dataset it trained on ({path or 'unknown'}) is needed "
                              f"for its id maps and is not there")
    return Path(path)


def carried_rows(old_raw: list, new_raw: list) -> tuple[np.ndarray, np.ndarray]:
    """(new dense ids, old dense ids) of the raw ids both maps hold; raw ids compared by their text."""
    old_index = {str(r): i for i, r in enumerate(old_raw)}
    pairs = [(j, old_index[str(r)]) for j, r in enumerate(new_raw) if str(r) in old_index]
    new, old = (np.array(a, np.int64) for a in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    return new, old


def _check_shapes(run_dir: Path, old_manifest: dict, ds, d_old: int, dense_old: dict, d_new: int,
                  dense_new: dict) -> None:
    where = f"--init-from {run_dir}"
    if old_manifest["modalities"] != ds.manifest["modalities"]:
        raise CheckpointError(f"{where}: modalities {old_manifest['modalities']} differ from those of "
                              f"{ds.path}: {ds.manifest['modalities']}")
    if d_old != d_new:
        raise CheckpointError(f"{where}: embedding_size {d_old}, this run has {d_new}")
    if dense_old != dense_new:
        raise CheckpointError(f"{where}: dense parameters {dense_old} differ from this run's {dense_new} "
                              f"(use_mge, use_ghe, hyper_num or feature dimensions changed)")


def check_warm_start(run_dir: str | Path, cfg, ds) -> None:
    """Every refusal of :func:`warm_start` that the config and the dataset decide, made before the run
    writes anything (docs/failures.md): RUN's best model exists and is whole, its dataset is there and
    unchanged, and its shapes fit this run's. Reads one rank file of RUN/best, no whole table."""
    run_dir = Path(run_dir)
    best = run_dir / "best"
    if not (best / "meta.json").is_file():
        raise CheckpointError(f"{run_dir}: no best model (RUNDIR/best/meta.json); has an epoch finished?")
    meta = read_meta(best)
    old_manifest = read_manifest(old_dataset_path(run_dir, meta))
    if meta.get("dataset_digest") != dataset_digest(old_manifest):
        raise CheckpointError(f"--init-from {run_dir}: {old_dataset_path(run_dir, meta)} is not the dataset it trained on")
    part = read_sharded(best, 0)
    dims = ds.manifest["modalities"]
    dense_new = {**({f"proj.{m}": (dm, cfg.embedding_size) for m, dm in dims.items()} if cfg.use_mge else {}),
                 **({f"hyper.{m}": (dm, cfg.hyper_num) for m, dm in dims.items()} if cfg.use_ghe else {})}
    _check_shapes(run_dir, old_manifest, ds, part["user_embedding"].shape[1],
                  {k: tuple(v.shape) for k, v in part["dense"].items()}, cfg.embedding_size, dense_new)


@torch.no_grad()
def warm_start(engine, ds: PreparedDataset, run_dir: str | Path) -> dict:
    """Load RUN's best model into ``engine`` (built for ``ds``) by raw id; returns counts for the log."""
    run_dir = Path(run_dir)
    meta, tables = read_best_tables(run_dir)
    old_ds = PreparedDataset.load(old_dataset_path(run_dir, meta), verify=False)
    if meta.get("dataset_digest") != dataset_digest(old_ds.manifest):
        raise CheckpointError(f"--init-from {run_dir}: {old_ds.path} is not the dataset it trained on")
    params = _parameters(engine)
    _check_shapes(run_dir, old_ds.manifest, ds, tables["user_embedding"].shape[1],
                  {k: tuple(v.shape) for k, v in tables["dense"].items()}, params["user_embedding"].shape[1],
                  {k: tuple(p.shape) for k, p in params.items() if k.startswith(("proj.", "hyper."))})
    payload = engine.model_payload()          # which global rows this rank holds, in its row order
    counts = {}
    for kind, id_map in (("user", USER_MAP), ("item", ITEM_MAP)):
        new_ids, old_ids = carried_rows(pq.read_table(old_ds.path / id_map)["raw_id"].to_pylist(),
                                        pq.read_table(ds.path / id_map)["raw_id"].to_pylist())
        table, target = tables[f"{kind}_embedding"], params[f"{kind}_embedding"]
        held = payload[f"{kind}_ids"].numpy()
        if len(target) != len(held):   # replicated full table (sampled mode, several ranks): every row
            held = np.arange(len(target))
        pos = np.full(ds.num_users if kind == "user" else ds.num_items, -1, np.int64)
        pos[held] = np.arange(len(held))
        local = pos[new_ids] >= 0
        target[torch.from_numpy(pos[new_ids][local])] = table[torch.from_numpy(old_ids[local])].to(target.device)
        counts[f"{kind}s_carried"], counts[f"{kind}s_new"] = int(len(new_ids)), int(len(pos) - len(new_ids))
    for name, value in tables["dense"].items():
        params[name].copy_(value.to(params[name].device))
    return counts
