"""Held hyperedge messages carried across steps (docs/sampled.md, "Carrying the messages across steps").

M^m = C^(H−1)·Σ_i H̄_I[i]ᵀ·Q[i] and C = Σ_i H̄_I[i]ᵀ·H̄_I[i] are sums over items, so a held value can trade
one item's contribution for a newer one at O(A·d) cost. A full pass stores every item's H̄ row and E_c row
(Q^(0)) next to the two sums; each later step replaces the contributions of the items it computed anyway
(its seed items: E_c from the sampled blocks, H̄ with the step's own draws). The held sum is then
Σ_i H̄_I[i]ᵀ·Q[i] taken at each item's own last step instead of at the last full pass.
"""
from __future__ import annotations

import torch


def held_sums(q: torch.Tensor, h_items: list[torch.Tensor], sums: list[tuple]) -> dict:
    """What a full pass leaves for :func:`carry`: the rows held here (Q^(0) and H̄_I per modality, detached
    copies) and the pass's two sums (H̄_Iᵀ·Q^(0), C) per modality, in float64: they absorb many small updates
    between two full passes."""
    return {"q": q.detach().clone(), "h": [h.detach().clone() for h in h_items],
            "first": [first.double() for first, _ in sums], "c": [c.double() for _, c in sums]}


def carry(cache: dict, slots: torch.Tensor, q_new: torch.Tensor, h_new: list[torch.Tensor], n_layers: int,
          reduce=None) -> None:
    """Replace the contributions of the rows ``slots`` (distinct) by (``q_new``, ``h_new``) and recompute
    ``cache["messages"]`` and ``cache["coupling"]`` = C^(H−1) from the updated sums, in place.

    ``reduce`` sums the per-modality changes over ranks that each hold a disjoint share of the rows
    (row-sharded tables; every rank calls it, with or without rows of its own)."""
    q_old = cache["q"][slots]
    d = q_new.shape[1]
    deltas = []
    for k, h in enumerate(h_new):
        h_old = cache["h"][k][slots]
        deltas.append(torch.cat([h.t() @ q_new - h_old.t() @ q_old, h.t() @ h - h_old.t() @ h_old], dim=1))
    delta = torch.stack(deltas)
    if reduce is not None:
        reduce(delta)
    cache["q"][slots] = q_new
    delta = delta.double()
    for k, h in enumerate(h_new):
        cache["h"][k][slots] = h
        cache["first"][k] += delta[k, :, :d]
        cache["c"][k] += delta[k, :, d:]
    powers = [torch.matrix_power(c, n_layers - 1) for c in cache["c"]]
    cache["messages"] = [(p @ first).to(q_new.dtype) for p, first in zip(powers, cache["first"])]
    cache["coupling"] = [p.to(q_new.dtype) for p in powers]


def average_duplicates(ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``ids`` (sorted) and the mean of their ``rows``: P ranks' seeds can share an item, and the mean of
    their independent estimates of its E_c row is one estimate with less variance."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    if len(distinct) == len(ids):
        return distinct, rows[torch.argsort(ids)]
    total = rows.new_zeros((len(distinct), rows.shape[1])).index_add_(0, inverse, rows)
    count = torch.bincount(inverse, minlength=len(distinct)).to(rows.dtype)
    return distinct, total / count.unsqueeze(1)
