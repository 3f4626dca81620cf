"""The LGMRec model (LGMRec_SPEC.md §1), single process, full graph.

E* = E_c + Σ_m rownorm(F^m) + α·rownorm(Σ_m G^m)   (§1.7), trained with BPR + λ_c·HCL + λ_r·reg (§1.8).

Speed rewrites, each checked against the direct spec form in tests/test_model.py:
* MGE rows come from the precomputed Y_m = Ĝ^K [P X_m ; X_m] (``mge.mge_inputs``): a step pays
  |batch rows| × d_m × d instead of |I| × d_m × d plus 2K sparse products.
* Global embeddings are kept as rank-≤A factors (``hypergraph.HyperEmbedding``); the contrastive
  similarities against all users/items cost B·N·A, not B·N·d (``losses.infonce_lowrank``).
* The fused embedding is built only for the batch rows during training.

Random draws (Gumbel noise, dropout masks) are keyed by (seed, step, stream, node id) (``rng``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgmrec_dist import rng
from lgmrec_dist.config import Config
from lgmrec_dist.dataset import features_tensor
from lgmrec_dist.graph import Graph
from lgmrec_dist.model.cge import cge
from lgmrec_dist.model.features import HELD_DTYPES, const_rows_matmul, held_matmul, rows_matmul
from lgmrec_dist.model.hypergraph import HyperEmbedding, dependencies_from_logits, hypergraph_propagate
from lgmrec_dist.model.losses import bpr_loss, hcl_loss, reg_loss
from lgmrec_dist.model.mge import mge_direct, mge_inputs

TAU = 0.2  # hard-coded in the official code for both Gumbel-softmax and InfoNCE (§1.1, §6.2.2)

# random streams, per modality m: 4*m + kind
GUMBEL_ITEM, GUMBEL_USER, KEEP_ITEM, KEEP_USER = range(4)


def keyed_draws(cfg: Config, step: int, k: int, train: bool, user_ids: torch.Tensor, item_ids: torch.Tensor):
    """Gumbel noise and keep masks for modality index k at this step, for the given users and items.

    Returns (noise, masks) as used by ``hypergraph.assignments`` (None where not applied). Keyed by
    (seed, step, stream, id): the same node gets the same draw whichever process computes it.
    """
    a, seed = cfg.hyper_num, cfg.seed
    noise = masks = None
    if train or cfg.eval_gumbel_noise:
        noise = (rng.keyed_gumbel(rng.stream_key(seed, step, 4 * k + GUMBEL_ITEM), item_ids, a),
                 rng.keyed_gumbel(rng.stream_key(seed, step, 4 * k + GUMBEL_USER), user_ids, a))
    if train and cfg.keep_rate < 1.0:
        masks = (rng.keyed_uniform(rng.stream_key(seed, step, 4 * k + KEEP_ITEM), item_ids, a) < cfg.keep_rate,
                 rng.keyed_uniform(rng.stream_key(seed, step, 4 * k + KEEP_USER), user_ids, a) < cfg.keep_rate)
    return noise, masks


def _xavier(rows: int, cols: int, gen: torch.Generator) -> nn.Parameter:
    w = torch.empty(rows, cols)
    bound = (6.0 / (rows + cols)) ** 0.5
    with torch.no_grad():
        w.uniform_(-bound, bound, generator=gen)
    return nn.Parameter(w)


class LGMRec(nn.Module):
    """Parameters (§1.2): E_U, E_I (ID embeddings), W_m (d_m × d projections), V_m (d_m × A hyperedges).

    Frozen features X_m and the graph are attached with :meth:`attach`; they are not parameters.
    """

    def __init__(self, cfg: Config, num_users: int, num_items: int, feature_dims: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        self.num_users, self.num_items = num_users, num_items
        self.modalities = list(feature_dims)
        gen = torch.Generator().manual_seed(cfg.seed)
        d, a = cfg.embedding_size, cfg.hyper_num
        self.user_embedding = _xavier(num_users, d, gen)
        self.item_embedding = _xavier(num_items, d, gen)
        self.proj = nn.ParameterDict(
            {m: _xavier(dm, d, gen) for m, dm in feature_dims.items()} if cfg.use_mge else {})
        self.hyper = nn.ParameterDict(
            {m: _xavier(dm, a, gen) for m, dm in feature_dims.items()} if cfg.use_ghe else {})
        self.graph: Graph | None = None
        self.features: dict[str, torch.Tensor] = {}
        self.mge_y: dict[str, torch.Tensor] = {}
        self.eval_calls = 0

    # ------------------------------------------------------------------ set-up
    def attach(self, graph: Graph, features: dict[str, torch.Tensor] | None) -> "LGMRec":
        """The graph and the frozen features; ``features`` None = held elsewhere (row-sharded tables)."""
        device = self.user_embedding.device
        self.graph = graph.to(device)
        if features is None:
            return self
        # a copy: features arrive as read-only memory maps, and they must live on the training device
        self.features = {m: features_tensor(features[m], device=device) for m in self.modalities}
        if self.cfg.use_mge and self.cfg.mge_precompute:
            dtype = HELD_DTYPES[self.cfg.feature_dtype]
            self.mge_y = {m: mge_inputs(self.graph, x, self.cfg.n_mm_layers, dtype=dtype)
                          for m, x in self.features.items()}
        return self

    # ------------------------------------------------------------------ branches
    def cge(self, ego: torch.Tensor | None = None) -> torch.Tensor:
        """E_c of every node (§1.4); ``ego`` = [E_U ; E_I] when the tables are held elsewhere (row-sharded)."""
        if ego is None:
            ego = torch.cat([self.user_embedding, self.item_embedding])
        return cge(self.graph, ego, self.cfg.n_ui_layers, self.cfg.cf_model)

    def mge_rows(self, m: str, rows: torch.Tensor) -> torch.Tensor:
        """F^m at node rows (§1.5)."""
        if self.mge_y:
            return rows_matmul(self.mge_y[m], rows, self.proj[m])
        return mge_direct(self.graph, self.features[m], self.proj[m], self.cfg.n_mm_layers)[rows]

    def mge_all(self, m: str) -> torch.Tensor:
        if self.mge_y:
            return held_matmul(self.mge_y[m], self.proj[m])
        return mge_direct(self.graph, self.features[m], self.proj[m], self.cfg.n_mm_layers)

    def _draws(self, step: int, k: int, train: bool):
        dev = self.user_embedding.device
        return keyed_draws(self.cfg, step, k, train, torch.arange(self.num_users, device=dev),
                           torch.arange(self.num_items, device=dev))

    def ghe(self, e_c: torch.Tensor, step: int, train: bool, item_logits: dict | None = None) -> list[HyperEmbedding]:
        """Per-modality global embeddings (§1.6); ``item_logits`` = Z_I = X_m·V_m per modality when the
        features are held elsewhere (row-sharded tables of the sampled mode)."""
        out = []
        for k, m in enumerate(self.modalities):
            noise, masks = self._draws(step, k, train)
            z = const_rows_matmul(self.features[m], self.hyper[m]) if item_logits is None else item_logits[m]
            h_item, h_user = dependencies_from_logits(z, self.graph, TAU, noise, masks, self.cfg.keep_rate)
            out.append(hypergraph_propagate(h_item, h_user, e_c[self.num_users:], self.cfg.n_hyper_layer))
        return out

    def fuse(self, e_c: torch.Tensor, hyper, rows: torch.Tensor | None = None, mge: dict | None = None) -> torch.Tensor:
        """E* at node rows, or at every node when ``rows`` is None (§1.7); ``mge`` = F^m of every node per
        modality when computed elsewhere (row-sharded tables)."""
        e = e_c if rows is None else e_c[rows]
        if self.cfg.use_mge:
            for m in self.modalities:
                if mge is not None:
                    f = mge[m]
                else:
                    f = self.mge_all(m) if rows is None else self.mge_rows(m, rows)
                e = e + F.normalize(f, dim=1)
        if self.cfg.use_ghe:
            g = sum(h.nodes(rows) for h in hyper)
            e = e + self.cfg.alpha * F.normalize(g, dim=1)
        return e

    # ------------------------------------------------------------------ training / inference
    def batch_loss(self, users, pos, neg, step: int, batch_size: int | None = None) -> dict:
        """Loss terms for a batch of triples (§1.8). ``batch_size`` is the global |B| (defaults to len)."""
        batch_size = batch_size or len(users)
        e_c = self.cge()
        hyper = self.ghe(e_c, step, train=True) if self.cfg.use_ghe else None
        nodes = torch.cat([users, pos + self.num_users, neg + self.num_users])
        rows, inverse = torch.unique(nodes, return_inverse=True)
        # index_select, not e[inverse]: the backward of advanced indexing adds the repeated rows with
        # threaded atomics (a different sum each run); index_select's backward has a fixed order
        e_u, e_p, e_n = self.fuse(e_c, hyper, rows).index_select(0, inverse).split(len(users))
        bpr = bpr_loss(e_u, e_p, e_n)
        reg = reg_loss(e_u, e_p, e_n, batch_size)
        if hyper is not None and self.cfg.cl_weight > 0 and len(hyper) > 1:
            hcl = hcl_loss(hyper, users, pos, TAU)
        else:
            hcl = bpr.new_zeros(())
        loss = bpr + self.cfg.cl_weight * hcl + self.cfg.reg_weight * reg
        return {"loss": loss, "bpr": bpr.detach(), "hcl": hcl.detach(), "reg": reg.detach()}

    @torch.no_grad()
    def final_embeddings(self, item_logits: dict | None = None, mge: dict | None = None,
                         ego: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """E* for all users and items at inference: no dropout; Gumbel noise only if eval_gumbel_noise.
        ``item_logits``, ``mge``, ``ego``: as in :meth:`ghe`, :meth:`fuse`, :meth:`cge`, for tables held
        elsewhere."""
        e_c = self.cge(ego)
        hyper = None
        if self.cfg.use_ghe:
            self.eval_calls += 1
            hyper = self.ghe(e_c, -self.eval_calls, train=False, item_logits=item_logits)
        e = self.fuse(e_c, hyper, mge=mge)
        return e[:self.num_users], e[self.num_users:]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
