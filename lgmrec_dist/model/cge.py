"""Collaborative graph embedding, CGE (docs/model.md §1.4): LightGCN with mean pooling over layers."""
from __future__ import annotations

import torch

from lgmrec_dist.graph import Graph


def cge(graph: Graph, ego: torch.Tensor, n_layers: int, cf_model: str = "lightgcn") -> torch.Tensor:
    """E_c = (1/(L+1)) Σ_{l=0..L} Ĝ^l E^(0); ``cf_model='mf'`` skips propagation (E_c = E^(0))."""
    if cf_model == "mf" or n_layers == 0:
        return ego
    grad = torch.is_grad_enabled()
    x = graph.propagate(ego)
    total = ego + x
    del ego           # without autograd nothing else keeps E^(0): its N × d rows go before the next layer
    for _ in range(n_layers - 1):
        x = graph.propagate(x)
        total = total + x if grad else total.add_(x)   # in place at inference: the same sums, one buffer
    return total / (n_layers + 1) if grad else total.div_(n_layers + 1)
