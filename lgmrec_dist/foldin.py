"""Fold-in: the fused embedding e*_u of a user the model has never seen, from a list of items
(docs/serving.md "Fold-in"; the branches are those of docs/model.md: CGE, MGE, GHE and their fusion).

A new user u with history S (n = |S| distinct items) is one more row of Ĝ, R and P: Ĝ_ui =
1/√((n+ε)(d_i+ε)), R_ui = 1, P_ui = 1/(n+ε) for i ∈ S (ε = 1e-7 as in ``graph.build_graph``). Every
branch's user row is a product of that row with item rows of the training graph:

    E_c,u  = (ê⁰_u + Σ_{l=1..L} Σ_{i∈S} Ĝ_ui (Ĝ^{l-1} E⁰)_i) / (L+1)
    F^m_u  = Σ_{i∈S} Ĝ_ui (Ĝ^{K-1} [P X_m ; X_m])_i · W_m          (K ≥ 1; K = 0: Σ_i P_ui X_m,i W_m)
    G^m_u  = softmax(Σ_{i∈S} X_m,i V_m / τ) · M^m
    e*_u   = E_c,u + Σ_m rownorm(F^m_u) + α·rownorm(Σ_m G^m_u)

Two approximations, nothing else: (1) the item rows are those of the training graph — adding u would
also change the item side (d_i + 1 and u's own contribution to the items' layers ≥ 2); (2) u has no ID
embedding, so ê⁰_u is estimated by a ridge regression, fitted on the trained users, of E⁰_u on their
first propagated layer (Ĝ E⁰)_u. Given the true E⁰_u (``ego=``), a trained user's history reproduces
its trained embedding exactly (tests/test_serve.py).
"""
from __future__ import annotations

import numpy as np
import torch

from lgmrec_dist.model import TAU, LGMRec
from lgmrec_dist.model.lgmrec import fuse
from lgmrec_dist.model.mge import mge_inputs

EPS = 1e-7      # the degree offset of graph.build_graph
RIDGE = 1e-3    # relative ridge of the ê⁰ regression: keeps it stable when d exceeds the trained users


def history_matrix(histories: list[np.ndarray], num_items: int, deg_item: torch.Tensor) -> tuple:
    """(R_S, Ĝ_S, P_S): the new users' rows of R, Ĝ and P as sparse CSR (B × |I|), duplicates once."""
    rows, cols = [], []
    for b, items in enumerate(histories):
        items = np.unique(np.asarray(items, np.int64))
        rows.append(np.full(len(items), b, np.int64))
        cols.append(items)
    r, c = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (rows, cols))
    n = np.bincount(r, minlength=len(histories)).astype(np.float64)
    indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(n)]).astype(np.int64))
    c_t = torch.from_numpy(c)
    shape = (len(histories), num_items)

    def make(vals) -> torch.Tensor:
        return torch.sparse_csr_tensor(indptr, c_t, torch.as_tensor(vals, dtype=torch.float32), size=shape,
                                       check_invariants=False)

    g_w = 1.0 / np.sqrt((n[r] + EPS) * (deg_item.double().numpy()[c] + EPS))
    return make(np.ones(len(c))), make(g_w), make(1.0 / (n[r] + EPS))


class FoldIn:
    """The item-side tables of the fold-in formula (module docstring), computed once from a trained model."""

    @torch.no_grad()
    def __init__(self, model: LGMRec):
        cfg, g, n_u = model.cfg, model.graph, model.num_users
        self.model, self.num_items = model, model.num_items
        self.deg_item = g.deg[n_u:].cpu()
        self.propagates = cfg.cf_model != "mf" and cfg.n_ui_layers > 0
        # CGE: item rows of Ĝ^l E⁰ for l = 0..L-1
        x = torch.cat([model.user_embedding, model.item_embedding])
        self.cge_items = [x[n_u:]]
        for _ in range(max(cfg.n_ui_layers - 1, 0)):
            x = g.propagate(x)
            self.cge_items.append(x[n_u:])
        # ê⁰ regression: E⁰_U ≈ [(Ĝ E⁰)_U, 1]·B over the users with training items
        users = g.deg[:n_u] > 0
        a = g.propagate(torch.cat([model.user_embedding, model.item_embedding]))[:n_u][users]
        a = torch.cat([a, torch.ones(len(a), 1)], 1).double()
        gram = a.t() @ a
        gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        self.ego_map = torch.linalg.solve(gram, a.t() @ model.user_embedding[users].double()).float()
        # MGE: item rows of Ĝ^{K-1} [P X_m ; X_m] · W_m (K ≥ 1), or X_m · W_m (K = 0)
        self.mge_items = {}
        if cfg.use_mge:
            k = cfg.n_mm_layers
            item_rows = torch.arange(n_u, n_u + model.num_items)
            for m in model.modalities:
                y = model.features[m] if k == 0 else mge_inputs(g, model.features[m], k - 1, rows=item_rows)
                self.mge_items[m] = y.float() @ model.proj[m]
        # GHE: item logits X_m·V_m and the trained hyperedge messages M^m (inference: no noise, no dropout)
        self.logits, self.messages = {}, {}
        if cfg.use_ghe:
            hyper = model.ghe(model.cge(), step=-1, train=False)
            for m, h in zip(model.modalities, hyper):
                self.logits[m] = model.features[m] @ model.hyper[m]
                self.messages[m] = h.message

    @torch.no_grad()
    def user_embeddings(self, histories: list[np.ndarray], ego: torch.Tensor | None = None) -> torch.Tensor:
        """e*_u (B × d) for B histories of dense item ids; ``ego`` = the users' E⁰ when known."""
        cfg, model = self.model.cfg, self.model
        r_s, g_s, p_s = history_matrix(histories, self.num_items, self.deg_item)
        layer1 = g_s @ self.cge_items[0]
        if ego is None:
            ego = torch.cat([layer1, torch.ones(len(layer1), 1)], 1) @ self.ego_map
        e_c = ego
        if self.propagates:
            e_c = (ego + sum(g_s @ x for x in self.cge_items)) / (cfg.n_ui_layers + 1)
        mge = [(g_s if cfg.n_mm_layers > 0 else p_s) @ self.mge_items[m] for m in model.modalities
               if m in self.mge_items]
        g = None
        if cfg.use_ghe:
            g = sum(torch.softmax((r_s @ self.logits[m]) / TAU, dim=1) @ self.messages[m] for m in model.modalities)
        return fuse(e_c, mge, g, cfg.alpha)
