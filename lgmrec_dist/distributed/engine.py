"""The exact engine on P ranks (a torchrun launch): one rank's share of LGMRec (``parallelize.shard_model``),
and the ownership of the nodes (which rank holds which rows) that the sharded engines share."""
from __future__ import annotations

import numpy as np
import torch

from lgmrec_dist.config import Config
from lgmrec_dist.dataset import TRAIN, PreparedDataset, features_tensor
from lgmrec_dist.dataset_parts import PartitionData
from lgmrec_dist.distributed.exchange import Ownership
from lgmrec_dist.distributed.group import Context, LaunchError
from lgmrec_dist.distributed.parallelize import shard_model
from lgmrec_dist.distributed.reduce import all_reduce_, global_metrics, replicate_dense
from lgmrec_dist.distributed.ring_topk import ring_blocks
from lgmrec_dist.engine import EngineState
from lgmrec_dist.evaluation import Evaluator
from lgmrec_dist.model import model_params


def ownership_for(ds: PreparedDataset, cfg: Config, rank: int, world: int,
                  partition: np.ndarray | None = None) -> Ownership:
    """``partition`` (a node -> rank array) when given; a partition's book when ``ds`` is one partition
    (``dataset_parts.PartitionData``); else prep's partitions (partitions/node_part.npy) when they were made
    for this many ranks, else contiguous ranges of users and items (``partitioning``)."""
    if partition is not None:
        return Ownership(partition, rank, world)
    if isinstance(ds, PartitionData):
        return Ownership(ds.node_part, rank, world)
    parts = int(ds.manifest.get("partitions", 1) or 1)
    path = ds.path / "partitions" / "node_part.npy"
    have = path.exists() and parts > 1
    if cfg.partitioning == "contiguous" or (cfg.partitioning == "auto" and not have):
        return Ownership.contiguous(ds.num_users, ds.num_items, rank, world)
    if not have:
        raise LaunchError(f"{ds.path}: partitioning 'dataset' requested but the dataset has no partitions "
                          f"(run lgmrec prep --partitions {world})")
    if parts != world:
        raise LaunchError(f"{ds.path} is partitioned for {parts} ranks but this launch has {world}: re-run "
                          f"lgmrec prep --partitions {world}, or pass --set partitioning=contiguous")
    return Ownership(np.load(path), rank, world)


class ShardedEngine(EngineState):
    """Exact LGMRec with its rows sharded over the ranks (``parallelize.shard_model``); ``partition``
    overrides the ownership of :func:`ownership_for`."""

    def __init__(self, cfg: Config, ds: PreparedDataset, device: torch.device, ctx: Context,
                 partition: np.ndarray | None = None):
        self.ctx = ctx
        self.own = ownership_for(ds, cfg, ctx.rank, ctx.world_size, partition)
        modalities = ds.manifest["modalities"]
        if isinstance(ds, PartitionData):   # its own edges and feature rows only (docs/distributed.md)
            edges, rows = (ds.train_users, ds.train_items), None
        else:
            owned = self.own.owned
            edges, rows = ds.pairs(TRAIN), owned[owned >= ds.num_users] - ds.num_users
        features = {m: features_tensor(ds.features[m], rows, device) for m in modalities}
        self.model = shard_model(model_params(cfg), ds.num_users, ds.num_items, modalities, self.own, *edges,
                                 features, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate)
        self.module, self.optimizers = self.model, [self.optimizer]
        # W_m, V_m are replicated: DDP sums their gradients during backward; rows are updated by their owner
        self.dense = replicate_dense(self.model)

    def num_parameters(self) -> int:
        m = self.model
        local = torch.tensor([m.user_embedding.numel() + m.item_embedding.numel()], device=self.ctx.device)
        return int(all_reduce_(local)) + sum(p.numel() for p in m.dense_parameters().values())

    def train(self):
        self.model.train()

    def embeddings(self):
        """This rank's users and items: (user ids, their E*, item ids, their E*)."""
        m = self.model
        m.eval()
        user_emb, item_emb = m.final_embeddings()
        return m.user_ids.cpu().numpy(), user_emb, m.item_ids.cpu().numpy(), item_emb

    def evaluate(self, evaluator: Evaluator, emb) -> dict:
        """Each rank ranks its own users against the item blocks passed round the ring (``ring_topk``); sums
        and counts reduced: equal to one process, and no rank holds every item's row."""
        user_ids, user_emb, item_ids, item_emb = emb
        sums = evaluator.evaluate_blocks(user_emb, ring_blocks(item_ids, item_emb), user_rows=user_ids)
        return global_metrics(*sums, self.ctx.device)
