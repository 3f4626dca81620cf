"""The estimators of the sampled mode (docs/sampled.md): CGE on sampled blocks, sampled contrastive
denominators (uniform draws with the log-q correction, in-batch with Horvitz-Thompson weights), and the
straight-through gradient of held hyperedge messages. Each is unbiased for the exact quantity it stands
for; tests/test_sampled.py checks each against its exact value and checks that a biased variant fails."""
from __future__ import annotations

import math

import torch

from lgmrec_dist.graph import spmm
from lgmrec_dist.sampling import SampledBatch

NEG_USER_STREAM, NEG_ITEM_STREAM = (1 << 20) + 1, (1 << 20) + 2   # rng streams of the uniform negatives


def straight_through_message(message: torch.Tensor, coupling: torch.Tensor, h_sample: torch.Tensor,
                             q_sample: torch.Tensor, weight: float) -> torch.Tensor:
    """``message`` in value; in gradient, that of coupling·weight·Σ_s h_sample[s]ᵀ·q_sample[s].

    With the rows s drawn uniformly (with replacement) from n rows and weight = n / (number of draws), the
    gradient's expectation is that of the exact coupling·Hᵀ·Q (every row). (s − s.detach()) is exactly 0,
    so the forward value is ``message`` bit for bit."""
    s = (h_sample * weight).t() @ q_sample
    return message + coupling @ (s - s.detach())


def cge_on_blocks(batch: SampledBatch, h0: torch.Tensor, device) -> torch.Tensor:
    """E_c at the batch's seeds, (1/(L+1)) Σ_l E^(l)[seeds], from E^(0) rows ``h0`` of ``batch.input_ids``.

    Layer l multiplies by block l's weighted adjacency; every layer's destination nodes start with the
    seeds, so E^(l)[seeds] is the first ``num_seeds`` rows of each layer's output (§1.4)."""
    n = batch.num_seeds
    total, h = h0[:n], h0
    for layer in batch.layers:
        a, a_t = layer.matrices(device)
        h = spmm(a, a_t, h)
        total = total + h[:n]
    return total / (len(batch.layers) + 1) if batch.layers else total


def uniform_negatives(n_total: int, k: int, key: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """K ids drawn uniformly with replacement from n_total, and their log-q correction log(n_total / K)."""
    gen = torch.Generator().manual_seed(key)
    ids = torch.randint(n_total, (k,), generator=gen).to(device)
    return ids, torch.full((k,), math.log(n_total / k), device=device)


def sampled_logsumexp(pos_logit: torch.Tensor, logits: torch.Tensor, log_w: torch.Tensor,
                      neg_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log D̂ with D̂_r = exp(pos_r) + Σ_k [neg_k ≠ row_r] w_k · exp(logit_rk) (log w = the log-q correction).

    When Σ_k w_k·exp(·) is an unbiased estimate of the sum over the non-positive rows (uniform draws with
    w = N/K, Horvitz-Thompson weights 1/π), D̂ is an unbiased estimate of the exact denominator; the
    positive is always counted once, exactly (it is in the denominator with probability 1)."""
    logits = (logits + log_w).masked_fill(neg_ids.unsqueeze(0) == rows.unsqueeze(1), -math.inf)
    return torch.logsumexp(torch.cat([pos_logit.unsqueeze(1), logits], dim=1), dim=1)
