"""The estimators of the sampled mode (docs/sampled.md): CGE on sampled blocks, sampled contrastive
denominators (uniform draws with the log-q correction, in-batch with Horvitz-Thompson weights), and the
straight-through gradient of held hyperedge messages. Each is unbiased for the exact quantity it stands
for; tests/test_sampled.py checks each against its exact value and checks that a biased variant fails."""
from __future__ import annotations

import math

import torch

from lgmrec_dist.graph import csr_mm
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

    Layer l multiplies by block l's weighted adjacency; layer 0 reads ``h0`` where the seeds sit at
    ``batch.seed_rows``, and every later layer's destination nodes start with the seeds, so E^(l)[seeds] is
    the first ``num_seeds`` rows of each layer's output (§1.4)."""
    mats = [layer.matrices(device) for layer in batch.layers]
    return _BlockCGE.apply(h0, batch.seed_rows.to(device), mats)


class _BlockCGE(torch.autograd.Function):
    """The layer sum of :func:`cge_on_blocks` with its backward written out: each layer's gradient is one
    product with the block's transpose plus, in place, the seeds' share. Autograd's own backward of the same
    expression adds a zero-filled copy of every layer's gradient for the seeds' rows (a full pass over the
    E^(0) rows, the step's largest tensor); the values are the same (the same two terms a row, one order)."""

    @staticmethod
    def forward(ctx, h0, seed_rows, mats):
        ctx.mats, ctx.n_input = mats, h0.shape[0]
        ctx.save_for_backward(seed_rows)
        n = len(seed_rows)
        total, h = h0.index_select(0, seed_rows), h0
        for a, _ in mats:
            h = csr_mm(a, h)
            total += h[:n]
        return total / (len(mats) + 1) if mats else total

    @staticmethod
    def backward(ctx, grad):
        seed_rows, = ctx.saved_tensors
        mats, n = ctx.mats, len(seed_rows)
        share = grad / (len(mats) + 1) if mats else grad
        g = share                                  # the last layer's rows are the seeds
        for level in range(len(mats) - 1, -1, -1):
            g = csr_mm(mats[level][1], g)
            if level:
                g[:n] += share
        if not mats:
            g = share.new_zeros(ctx.n_input, share.shape[1])
        return g.index_add_(0, seed_rows, share), None, None


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
