"""The training engine of a torchrun launch: one rank's share of the exact distributed LGMRec."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from lgmrec_dist.checkpoint import EngineState
from lgmrec_dist.config import Config
from lgmrec_dist.dataset import TRAIN, PreparedDataset
from lgmrec_dist.distributed.exchange import Ownership, all_gather_rows
from lgmrec_dist.distributed.group import Context, LaunchError
from lgmrec_dist.distributed.sharded import ShardedLGMRec
from lgmrec_dist.evaluation import Evaluator, finalize


def ownership_for(ds: PreparedDataset, cfg: Config, rank: int, world: int) -> Ownership:
    """Prep's partitions (partitions/node_part.npy) when they were made for this many ranks, else
    contiguous ranges of users and items (``partitioning`` config key)."""
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
    def __init__(self, cfg: Config, ds: PreparedDataset, ctx: Context):
        self.ctx = ctx
        self.own = ownership_for(ds, cfg, ctx.rank, ctx.world_size)
        tu, ti = ds.pairs(TRAIN)
        self.model = ShardedLGMRec(cfg, ds.num_users, ds.num_items, ds.manifest["modalities"], self.own).to(ctx.device)
        self.model.attach(tu, ti, ds.features)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate)

    def num_parameters(self) -> int:
        m = self.model
        local = m.user_embedding.numel() + m.item_embedding.numel()
        total = torch.tensor([local], device=self.ctx.device)
        dist.all_reduce(total)
        return int(total) + sum(p.numel() for p in m.dense.parameters())

    def train(self):
        self.model.train()

    def step(self, users, pos, neg, step: int) -> dict:
        terms = self.model.batch_loss(users, pos, neg, step)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.model.sync_dense_gradients()
        self.optimizer.step()
        return terms["global"]

    def model_payload(self) -> dict:
        """This rank's rows and the dense parameters, keyed for export."""
        m = self.model
        return {"user_ids": m.user_ids.cpu(), "user_embedding": m.user_embedding.detach().cpu(),
                "item_ids": m.item_ids.cpu(), "item_embedding": m.item_embedding.detach().cpu(),
                "dense": {k.removeprefix("dense."): v.detach().cpu() for k, v in m.named_parameters()
                          if k.startswith("dense.")}}

    def embeddings(self):
        """This rank's users (ids, E*) and every item's E* (gathered from the owners)."""
        self.model.eval()
        user_ids, user_emb, item_ids, item_emb = self.model.final_embeddings()
        ids = torch.cat(all_gather_rows(item_ids.unsqueeze(1))).squeeze(1)
        rows = torch.cat(all_gather_rows(item_emb))
        items = torch.empty_like(rows)
        items[ids] = rows
        return user_ids.cpu().numpy(), user_emb, items

    def evaluate(self, evaluator: Evaluator, emb) -> dict:
        """Users sharded over ranks (each its own), sums and counts reduced: equal to one process."""
        user_ids, user_emb, items = emb
        sums, count = evaluator.evaluate(user_emb, items, user_rows=user_ids)
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(t)
        return finalize(dict(zip(keys, t[:-1].tolist())), int(t[-1]))
