"""Which engine trains a run: one table from (mode, several ranks, shard_tables) to the engine class
(docs/distributed.md, "Engines"). Modules are imported when picked, so a single-process run never loads
the distributed or sampled code."""
from __future__ import annotations

import importlib

import numpy as np
import torch

from lgmrec_dist.config import Config, ConfigError
from lgmrec_dist.dataset import PreparedDataset
from lgmrec_dist.engine import Engine

# (mode, more than one rank, shard_tables) -> "module:class". The exact mode shards its rows on P ranks
# whatever shard_tables says; with one rank every engine holds every row.
ENGINES = {
    ("exact", False, False): "lgmrec_dist.local:LocalEngine",                 # one process, the whole graph
    ("exact", False, True): "lgmrec_dist.local:LocalEngine",
    ("exact", True, False): "lgmrec_dist.distributed.engine:ShardedEngine",   # rows sharded, halo exchange
    ("exact", True, True): "lgmrec_dist.distributed.engine:ShardedEngine",
    ("sampled", False, False): "lgmrec_dist.sampled.engine:SampledEngine",    # DGL blocks, one process
    ("sampled", False, True): "lgmrec_dist.sampled.engine:SampledEngine",
    ("sampled", True, False): "lgmrec_dist.sampled.engine:SampledEngine",     # P ranks, replicated tables
    ("sampled", True, True): "lgmrec_dist.sampled.engine:SampledEngine",      # P ranks, row-sharded tables
}


def device_for(cfg: Config, ctx=None) -> torch.device:
    """The training device: the rank's (``ctx``) in a launch, else the ``device`` config key's."""
    if ctx is not None:
        return ctx.device
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def engine_class(cfg: Config, world_size: int) -> type:
    module, name = ENGINES[(cfg.mode, world_size > 1, bool(cfg.shard_tables))].split(":")
    return getattr(importlib.import_module(module), name)


def build_engine(cfg: Config, ds: PreparedDataset, ctx=None, partition: np.ndarray | None = None) -> Engine:
    """The engine of this process: ``ctx`` is the process group's context (None = one process);
    ``partition`` (node -> rank) overrides the ownership of the sharded engines."""
    cls = engine_class(cfg, ctx.world_size if ctx is not None else 1)
    return cls(cfg, ds, device_for(cfg, ctx), ctx, partition)
