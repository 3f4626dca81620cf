"""The single-process exact engine: one process, the whole graph; the reference path of every mode
(:class:`lgmrec_dist.model.LGMRec` with its full-graph tables, docs/model.md)."""
from __future__ import annotations

import torch

from lgmrec_dist.config import Config
from lgmrec_dist.dataset import TRAIN, PreparedDataset, features_tensor
from lgmrec_dist.engine import EngineState
from lgmrec_dist.evaluation import Evaluator
from lgmrec_dist.graph import build_graph
from lgmrec_dist.model import LGMRec, model_params


class LocalEngine(EngineState):
    """One process, the whole graph: the reference path (lgmrec_dist.model.LGMRec)."""

    def __init__(self, cfg: Config, ds: PreparedDataset, device: torch.device, ctx=None, partition=None):
        tu, ti = ds.pairs(TRAIN)
        self.model = LGMRec(model_params(cfg), ds.num_users, ds.num_items, ds.manifest["modalities"]).to(device)
        # a copy: features arrive as read-only memory maps, and they must live on the training device
        features = {m: features_tensor(x, device=device) for m, x in ds.features.items()}
        self.model.attach(build_graph(ds.num_users, ds.num_items, tu, ti), features)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate)
        self.module, self.optimizers = self.model, [self.optimizer]

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def train(self):
        self.model.train()

    def embeddings(self):
        self.model.eval()
        return self.model.final_embeddings()

    def evaluate(self, evaluator: Evaluator, emb) -> dict:
        return evaluator.evaluate_metrics(*emb)
