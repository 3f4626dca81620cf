"""Training objective (LGMRec_SPEC.md §1.8): BPR, hypergraph contrastive loss (HCL), regulariser."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lgmrec_dist.model.lowrank_lse import lowrank_logsumexp


def bpr_loss(e_user: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -log σ(ŷ(u,i⁺) - ŷ(u,i⁻))."""
    return -F.logsigmoid((e_user * e_pos).sum(1) - (e_user * e_neg).sum(1)).mean()


def reg_loss(e_user, e_pos, e_neg, batch_size: int) -> torch.Tensor:
    """(‖E*_U[B]‖_F + ‖E*_I[B⁺]‖_F + ‖E*_I[B⁻]‖_F) / |B| — plain, not squared, norms (§1.8, §6.2.9)."""
    return (e_user.norm() + e_pos.norm() + e_neg.norm()) / batch_size


def infonce_lowrank(h_anchor, m_anchor, h_pos, m_pos, rows, weights, tau: float) -> torch.Tensor:
    """Σ_r w_r · ℓ_r with ℓ_r = -log softmax over all s of cos(g^a_r, g^p_s)/τ, evaluated at s = r.

    g^a = h_anchor·m_anchor and g^p = h_pos·m_pos have rank ≤ A, so the similarities with every row of
    the positive view cost |rows|·S·A instead of |rows|·S·d: cos(g^a_r, g^p_s) =
    (ĝ^a_r · m_posᵀ) · h_pos[s] / ‖g^p_s‖, with ‖g^p_s‖² = h_pos[s]·(m_pos m_posᵀ)·h_pos[s]ᵀ.
    """
    anchor = F.normalize(h_anchor[rows] @ m_anchor, dim=1)
    positive = F.normalize(h_pos[rows] @ m_pos, dim=1)
    pos_logit = (anchor * positive).sum(1) / tau
    sq_norms = ((h_pos @ (m_pos @ m_pos.t())) * h_pos).sum(1)
    scaled = h_pos / sq_norms.clamp_min(1e-24).sqrt().unsqueeze(1)  # = max(‖g‖, 1e-12), as F.normalize
    lse = lowrank_logsumexp((anchor @ m_pos.t()) / tau, scaled)  # logits (anchor·m_posᵀ/τ)·scaledᵀ
    return (weights * (lse - pos_logit)).sum()


def infonce_direct(g_anchor, g_pos, rows, tau: float) -> torch.Tensor:
    """The same loss as the official code writes it, on materialised embeddings (for tests)."""
    a = F.normalize(g_anchor[rows], dim=1)
    p = F.normalize(g_pos[rows], dim=1)
    pos_score = torch.exp((a * p).sum(1) / tau)
    ttl_score = torch.exp(a @ F.normalize(g_pos, dim=1).t() / tau).sum(1)
    return -torch.log(pos_score / ttl_score).sum()


def hcl_loss(hyper: list, users: torch.Tensor, pos_items: torch.Tensor, tau: float) -> torch.Tensor:
    """L_hcl = Σ_B ℓ_u + Σ_B ℓ_{i⁺} over modality pairs (m_k → m_{k+1}) in modality order.

    With the two official modalities (image, text) this is the one direction v → t (§1.8). With M > 2
    modalities the pairs form a chain (1→2, 2→3, …); with M = 1 there is no pair and the loss is 0.
    Each distinct anchor is computed once and weighted by its multiplicity in the batch (duplicates count
    separately in the spec's sum).
    """
    total = users.new_zeros((), dtype=torch.float32)
    u_rows, u_counts = torch.unique(users, return_counts=True)
    i_rows, i_counts = torch.unique(pos_items, return_counts=True)
    for a, p in zip(hyper[:-1], hyper[1:]):
        total = total + infonce_lowrank(a.h_user, a.message, p.h_user, p.message, u_rows, u_counts.float(), tau)
        total = total + infonce_lowrank(a.h_item, a.message, p.h_item, p.message, i_rows, i_counts.float(), tau)
    return total
