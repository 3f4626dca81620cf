"""Training objective (docs/model.md §1.8): BPR, hypergraph contrastive loss (HCL), regulariser."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lgmrec_dist.model.lowrank_lse import lowrank_logsumexp


def bpr_sum(e_user: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """Σ over the triples of -log σ(ŷ(u,i⁺) - ŷ(u,i⁻)) (the BPR loss is this sum over |B|)."""
    return -F.logsigmoid((e_user * e_pos).sum(1) - (e_user * e_neg).sum(1)).sum()


def bpr_loss(e_user: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -log σ(ŷ(u,i⁺) - ŷ(u,i⁻))."""
    return bpr_sum(e_user, e_pos, e_neg) / len(e_user)


def squared_norms(e_user, e_pos, e_neg) -> torch.Tensor:
    """(‖E*_U[B]‖², ‖E*_I[B⁺]‖², ‖E*_I[B⁻]‖²): sums of squares, which add over slices of a batch."""
    return torch.stack([e_user.pow(2).sum(), e_pos.pow(2).sum(), e_neg.pow(2).sum()])


def reg_from_squares(sq: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The regulariser from the (summed) squared norms of :func:`squared_norms`."""
    return sq.sqrt().sum() / batch_size


def reg_loss(e_user, e_pos, e_neg, batch_size: int) -> torch.Tensor:
    """(‖E*_U[B]‖_F + ‖E*_I[B⁺]‖_F + ‖E*_I[B⁻]‖_F) / |B| — plain, not squared, norms (§1.8, §6.2.9)."""
    return reg_from_squares(squared_norms(e_user, e_pos, e_neg), batch_size)


def key_rows(h: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
    """Rows h / ‖h·M‖ (clamped as F.normalize): cos(a, h·M) = (a·Mᵀ)·key for a unit vector a.

    ‖h·M‖² = h·(M Mᵀ)·hᵀ costs A² per row instead of A·d; the clamp 1e-24 on the square is F.normalize's
    max(‖g‖, 1e-12)."""
    sq = ((h @ (message @ message.t())) * h).sum(1)
    return h / sq.clamp_min(1e-24).sqrt().unsqueeze(1)


def infonce_logits(h_anchor_rows, m_anchor, h_pos_rows, m_pos, tau: float):
    """(positive logits cos(g^a_r, g^p_r)/τ, queries q_r = ĝ^a_r·m_posᵀ/τ) of the anchors r whose H̄ rows
    are given: q_r · key_rows(h_pos, m_pos)[s] = cos(g^a_r, g^p_s)/τ for any row s of the positive view."""
    anchor = F.normalize(h_anchor_rows @ m_anchor, dim=1)
    positive = F.normalize(h_pos_rows @ m_pos, dim=1)
    return (anchor * positive).sum(1) / tau, (anchor @ m_pos.t()) / tau


def infonce_lowrank(h_anchor, m_anchor, h_pos, m_pos, rows, weights, tau: float) -> torch.Tensor:
    """Σ_r w_r · ℓ_r with ℓ_r = -log softmax over all s of cos(g^a_r, g^p_s)/τ, evaluated at s = r.

    g^a = h_anchor·m_anchor and g^p = h_pos·m_pos have rank ≤ A, so the similarities with every row of
    the positive view cost |rows|·S·A instead of |rows|·S·d (:func:`infonce_logits`, :func:`key_rows`).
    """
    pos_logit, q = infonce_logits(h_anchor[rows], m_anchor, h_pos[rows], m_pos, tau)
    lse = lowrank_logsumexp(q, key_rows(h_pos, m_pos))
    return (weights * (lse - pos_logit)).sum()


def contrastive_sum(messages: list, anchors, h_rows, denominator, tau: float) -> torch.Tensor:
    """L_hcl = Σ over modality pairs (m_k → m_{k+1}) and anchor sides of Σ_r w_r·(log D_r − pos_r) (§1.8).

    The one composition of the contrastive loss; what differs between the modes comes in as arguments:

    * ``anchors``: (is_user, rows, weights) per side, the distinct anchors and their multiplicities;
    * ``h_rows(k, is_user, rows)``: H̄^k rows of those anchors (held, computed or fetched);
    * ``denominator(k, is_user, rows, q, pos_logit)``: log D_r over the positive view k — every row in one
      process (:func:`all_rows_denominator`), every rank's rows (``distributed.sharded``), or a sampled
      estimate (``sampled.estimators``).
    """
    total = torch.zeros((), dtype=torch.float32, device=messages[0].device if messages else None)
    for is_user, rows, weights in anchors:
        for k in range(len(messages) - 1):
            pos_logit, q = infonce_logits(h_rows(k, is_user, rows), messages[k], h_rows(k + 1, is_user, rows),
                                          messages[k + 1], tau)
            lse = denominator(k + 1, is_user, rows, q, pos_logit)
            total = total + (weights.to(lse.device) * (lse - pos_logit)).sum()
    return total


def held_rows(hyper: list):
    """``h_rows`` of :func:`contrastive_sum` for HyperEmbeddings held whole (or by a rank's rows)."""
    return lambda k, is_user, rows: (hyper[k].h_user if is_user else hyper[k].h_item)[rows]


def all_rows_denominator(hyper: list):
    """Exact denominators over every user / item of the positive view, all in this process."""
    def lse(k, is_user, rows, q, pos_logit):
        h = hyper[k].h_user if is_user else hyper[k].h_item
        return lowrank_logsumexp(q, key_rows(h, hyper[k].message))
    return lse


def distinct_anchors(users: torch.Tensor, pos_items: torch.Tensor) -> list:
    """(is_user, distinct rows, multiplicities) of the batch's anchors: duplicates count separately in the
    spec's sum, so each distinct anchor is computed once and weighted by its count."""
    u_rows, u_counts = torch.unique(users, return_counts=True)
    i_rows, i_counts = torch.unique(pos_items, return_counts=True)
    return [(True, u_rows, u_counts.float()), (False, i_rows, i_counts.float())]


def infonce_direct(g_anchor, g_pos, rows, tau: float) -> torch.Tensor:
    """The same loss as the official code writes it, on materialised embeddings (for tests)."""
    a = F.normalize(g_anchor[rows], dim=1)
    p = F.normalize(g_pos[rows], dim=1)
    pos_score = torch.exp((a * p).sum(1) / tau)
    ttl_score = torch.exp(a @ F.normalize(g_pos, dim=1).t() / tau).sum(1)
    return -torch.log(pos_score / ttl_score).sum()


def hcl_loss(hyper: list, users: torch.Tensor, pos_items: torch.Tensor, tau: float) -> torch.Tensor:
    """L_hcl = Σ_B ℓ_u + Σ_B ℓ_{i⁺} over modality pairs (m_k → m_{k+1}) in modality order, in one process.

    With the two official modalities (image, text) this is the one direction v → t (§1.8). With M > 2
    modalities the pairs form a chain (1→2, 2→3, …); with M = 1 there is no pair and the loss is 0.
    """
    return contrastive_sum([h.message for h in hyper], distinct_anchors(users, pos_items), held_rows(hyper),
                           all_rows_denominator(hyper), tau)
