"""Large-catalogue mode (issue 6, docs/sampled.md): LGMRec steps whose cost follows the batch and the
fanouts, not |U| + |I|. ``mode: sampled`` in the config; the exact mode stays the default and the
reference.

A step of :class:`SampledLGMRec` reads only:

* **CGE** (LGMRec_SPEC.md §1.4) on the DGL neighbour-sampled blocks of the batch's nodes
  (:mod:`lgmrec_dist.sampling`): E^(0) rows of the sampled L-hop nodes, Ĝ's full-graph-degree weights
  rescaled by deg/k where only k of deg neighbours were sampled (unbiased per layer);
* **MGE** (§1.5): the batch rows of the precomputed Y_m = Ĝ^K [P·X_m ; X_m], times W_m (exact);
* **GHE** (§1.6): the batch rows' hyperedge dependencies, from X_m[items]·V_m and (R·X_m)[users]·V_m
  (R·X_m precomputed once: Z_U = R·X·V = (R·X)·V; or, with ``user_feature_table`` false, summed from the
  users' item rows X_m[i]·V_m each step, without the |U| × d_m table), with the keyed Gumbel noise and
  dropout masks of the exact model. The A × d hyperedge messages M^m need every item:
  ``hyper_refresh_steps`` r = 0 computes them with gradient at every step (exact), r ≥ 1 recomputes
  them from a full pass (no gradient) at steps where the cached ones are r steps old and holds their
  value in between; with ``hyper_message_grad`` their gradient is still estimated each step from the
  batch's negative items (straight-through, :func:`straight_through_message`);
* **HCL** (§1.8): ``hcl_negatives`` "all" (exact all-user / all-item denominators), "in_batch" (the batch's
  other anchors, Horvitz-Thompson weighted by their inclusion probability), "uniform"
  (``hcl_num_negatives`` uniform draws, weighted |U|/K resp. |I|/K: the log-q correction); the positive
  pair is always in the denominator with weight 1;
* **embedding tables**: ``sparse_embeddings`` true gathers the step's rows into leaf tensors and updates
  them with :class:`RowAdam` (lazy Adam: only touched rows and their moments change, O(rows · d) work);
  false keeps dense gradients and dense Adam over the whole tables, as the exact mode.

With fanouts [-1], r = 0, "all" and dense Adam the step equals the exact model's (tests/test_sampled.py),
in one process and on P ranks (:class:`SampledEngine`, data-parallel with replicated parameters; with
``shard_tables`` the tables are row-sharded instead, :mod:`lgmrec_dist.distributed.tables`).
Evaluation uses the exact full-graph inference (``LGMRec.final_embeddings``) with the trained parameters.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from lgmrec_dist import rng
from lgmrec_dist.batches import TripleSampler
from lgmrec_dist.config import Config
from lgmrec_dist.dataset import TRAIN, PreparedDataset
from lgmrec_dist.distributed.engine import ownership_for
from lgmrec_dist.distributed.exchange import CommStats, Ownership, all_gather_rows
from lgmrec_dist.distributed.tables import ShardedFeatureTables
from lgmrec_dist.evaluation import Evaluator
from lgmrec_dist.graph import build_graph, spmm
from lgmrec_dist.model.features import HELD_DTYPES, const_rows_matmul, user_feature_sums
from lgmrec_dist.model.hypergraph import hypergraph_propagate
from lgmrec_dist.model.lgmrec import GUMBEL_ITEM, GUMBEL_USER, KEEP_ITEM, KEEP_USER, TAU, LGMRec
from lgmrec_dist.model.losses import bpr_loss, hcl_loss, lowrank_logsumexp, reg_loss
from lgmrec_dist.sampling import BlockSampler, Prefetcher, SampledBatch, inclusion_probability

log = logging.getLogger("lgmrec")

NEG_USER_STREAM, NEG_ITEM_STREAM = (1 << 20) + 1, (1 << 20) + 2   # rng streams of the uniform negatives
FLOAT = 4                                                          # bytes per float32


def straight_through_message(message: torch.Tensor, coupling: torch.Tensor, h_sample: torch.Tensor,
                             q_sample: torch.Tensor, weight: float) -> torch.Tensor:
    """``message`` in value; in gradient, that of coupling·weight·Σ_s h_sample[s]ᵀ·q_sample[s].

    With the rows s drawn uniformly (with replacement) from n rows and weight = n / (number of draws), the
    gradient's expectation is that of the exact coupling·Hᵀ·Q (every row). (s − s.detach()) is exactly 0,
    so the forward value is ``message`` bit for bit."""
    s = (h_sample * weight).t() @ q_sample
    return message + coupling @ (s - s.detach())


def _key_scaled(h: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
    """Rows h / ‖h·M‖ (clamped as F.normalize): cos(a, h·M) = (a·Mᵀ)·key for a unit vector a."""
    sq = ((h @ (message @ message.t())) * h).sum(1)
    return h / sq.clamp_min(1e-24).sqrt().unsqueeze(1)


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


class RowAdam:
    """Adam on the rows of embedding tables that a step touched ("lazy" Adam, ``sparse_embeddings``).

    For each table: one step counter t (incremented at every update, as ``torch.optim.SparseAdam``) and
    full-size moments m, v of which only the touched rows are read and written. A touched row r with
    gradient g gets exactly the dense Adam update (m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²,
    p ← p − lr·(m/(1−β1^t)) / (√(v/(1−β2^t)) + ε)); rows not touched keep their value and moments.
    The rows of a step are distinct (the sampled blocks' input nodes), so no coalescing or sort is needed:
    the work is O(touched rows · d), not O(|U| + |I|).
    """

    def __init__(self, tables: dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.state = {name: {"step": 0, "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
                      for name, t in tables.items()}

    @torch.no_grad()
    def step(self, name: str, table: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        st = self.state[name]
        st["step"] += 1
        b1, b2 = self.betas
        m = st["exp_avg"].index_select(0, rows).mul_(b1).add_(grad, alpha=1 - b1)
        v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(grad, grad, value=1 - b2)
        st["exp_avg"].index_copy_(0, rows, m)
        st["exp_avg_sq"].index_copy_(0, rows, v)
        denom = (v / (1 - b2 ** st["step"])).sqrt_().add_(self.eps)
        table.index_copy_(0, rows, table.index_select(0, rows) - (self.lr / (1 - b1 ** st["step"])) * m / denom)

    def state_dict(self) -> dict:
        return {name: dict(st) for name, st in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, st in state.items():
            dev = self.state[name]["exp_avg"].device
            self.state[name] = {"step": int(st["step"]), "exp_avg": st["exp_avg"].to(dev).clone(),
                                "exp_avg_sq": st["exp_avg_sq"].to(dev).clone()}


class SampledLGMRec:
    """The parameters of :class:`~lgmrec_dist.model.LGMRec` (same initial values) trained with sampled steps."""

    def __init__(self, cfg: Config, num_users: int, num_items: int, feature_dims: dict[str, int],
                 train_users: np.ndarray, train_items: np.ndarray, features: dict, device: torch.device,
                 own: Ownership | None = None):
        self.cfg, self.device = cfg, device
        self.num_users, self.num_items = num_users, num_items
        self.model = LGMRec(cfg, num_users, num_items, feature_dims).to(device)
        graph = build_graph(num_users, num_items, train_users, train_items)
        n_layers = cfg.n_ui_layers if cfg.cf_model == "lightgcn" else 0
        self.n_layers = n_layers
        self.sampler = BlockSampler(num_users, num_items, graph.train_users, graph.train_items, cfg.fanouts,
                                    n_layers, cfg.seed)
        # the whole graph serves the start-up precomputation, the message refreshes and inference only
        self.tables = None               # row-sharded tables (``shard_tables``, P ranks)
        if own is not None:
            self.model.attach(graph, None)
            self.tables = ShardedFeatureTables(cfg, own, self.model.graph, features, device, train_users, train_items,
                                               dgl_graph=self.sampler.graph)
            self.tables.shard_embeddings(self.model)   # E_U, E_I now hold this rank's rows only
            self.rx = self.tables.rx
        else:
            self.model.attach(graph, features)
            self.rx = ({m: user_feature_sums(self.model.graph, x, dtype=HELD_DTYPES[cfg.feature_dtype])
                        for m, x in self.model.features.items()} if cfg.use_ghe and cfg.user_feature_table else {})
        self.modalities = self.model.modalities
        r = self.model.graph.R
        self.r_csr = (r.crow_indices(), r.col_indices(), r.values())   # users' item lists (user_feature_table false)
        deg = self.sampler.deg
        self.user_deg, self.item_deg = deg[:num_users], deg[num_users:]
        self.num_pairs = len(graph.train_users)
        self.num_pool_items = len(np.unique(graph.train_items))    # the negatives' pool (batches.TripleSampler)
        self.cache: dict | None = None   # {"step": s, "messages": [A × d per modality]} when r ≥ 1
        self._full = None                # this step's full-pass HyperEmbeddings (r = 0)
        self.leaves: list = []           # (table, rows, leaf) of this step's E^(0) rows (sparse_embeddings)
        self._hcache: dict = {}          # (modality index, is_user) -> (sorted ids, H̄ rows) of this step
        self._neg: dict = {}             # is_user -> (negative ids, log-weights) of this step
        self.counts: dict = {}
        self.world = 1                   # ranks sharing each global batch (set by SampledEngine)

    # ------------------------------------------------------------------ pieces
    def _lookup(self, batch: SampledBatch) -> torch.Tensor:
        """E^(0) rows of the batch's input nodes, in the blocks' order.

        With ``sparse_embeddings`` the rows are gathered into leaf tensors (``self.leaves``: table name,
        rows, leaf) whose gradients :class:`RowAdam` applies; otherwise they are differentiable gathers
        from the tables (dense gradients, as the exact mode)."""
        m, dev = self.model, self.device
        u_ids, i_ids = batch.input_users.to(dev), batch.input_items.to(dev)
        if self.tables is not None:       # rows from their owners; the leaves are the owner's rows
            self.leaves = []
            u_rows, i_rows = self.tables.lookup(m, u_ids, i_ids, self.leaves)
        elif self.cfg.sparse_embeddings:
            u_rows = m.user_embedding.detach().index_select(0, u_ids).requires_grad_()
            i_rows = m.item_embedding.detach().index_select(0, i_ids).requires_grad_()
            self.leaves = [("user_embedding", u_ids, u_rows), ("item_embedding", i_ids, i_rows)]
        else:
            u_rows, i_rows = m.user_embedding.index_select(0, u_ids), m.item_embedding.index_select(0, i_ids)
        return torch.cat([u_rows, i_rows]).index_select(0, batch.input_perm.to(dev))

    def cge_rows(self, batch: SampledBatch) -> torch.Tensor:
        """E_c at the batch's seeds from the sampled blocks (§1.4)."""
        return cge_on_blocks(batch, self._lookup(batch), self.device)

    def _assign(self, k: int, z: torch.Tensor, ids: torch.Tensor, step: int, user: bool) -> torch.Tensor:
        """Gumbel-softmax and dropout of logits z of users/items ``ids`` with the exact model's keyed draws."""
        cfg, a = self.cfg, self.cfg.hyper_num
        g_stream, k_stream = (GUMBEL_USER, KEEP_USER) if user else (GUMBEL_ITEM, KEEP_ITEM)
        z = z + rng.keyed_gumbel(rng.stream_key(cfg.seed, step, 4 * k + g_stream), ids, a)
        h = torch.softmax(z / TAU, dim=1)
        if cfg.keep_rate < 1.0:
            keep = rng.keyed_uniform(rng.stream_key(cfg.seed, step, 4 * k + k_stream), ids, a) < cfg.keep_rate
            h = h * keep / cfg.keep_rate
        return h

    def h_rows(self, k: int, user: bool, ids: torch.Tensor, step: int) -> torch.Tensor:
        """H̄^m rows (§1.6 items 1-3) of users or items ``ids`` at this step."""
        if self._full is not None:
            return (self._full[k].h_user if user else self._full[k].h_item)[ids]
        cached = self._hcache.get((k, user))
        if cached is not None:
            known, rows = cached
            pos = torch.searchsorted(known, ids).clamp_max(len(known) - 1)
            if torch.equal(known[pos], ids):
                return rows[pos]
        if self.tables is not None:      # one rank alone cannot start an exchange: every row is prepared
            raise RuntimeError("sharded tables: H̄ rows requested that the step did not prepare")
        return self._h_compute(k, user, ids, step)

    def _h_compute(self, k: int, user: bool, ids: torch.Tensor, step: int) -> torch.Tensor:
        m = self.modalities[k]
        if user and not self.rx:
            return self._assign(k, self._user_logits_from_items(m, ids), ids, step, user)
        v = self.model.hyper[m]
        src = self.rx[m] if user else (self.model.features if self.tables is None else self.tables.x)[m]
        self._count_reads(len(ids), src)
        if self.tables is not None:      # the rows' owners make the products
            z = self.tables.user_logits(m, ids, v) if user else self.tables.item_logits(m, ids, v)
        else:
            z = const_rows_matmul(src.index_select(0, ids).float(), v)
        return self._assign(k, z, ids, step, user)

    def _count_reads(self, rows: int, table: torch.Tensor) -> None:
        """Bytes of feature rows read behind this step's H̄ rows (``step_bytes``)."""
        self.counts["logit_bytes"] = self.counts.get("logit_bytes", 0) + rows * table.shape[1] * table.element_size()

    def _user_logits_from_items(self, m: str, ids: torch.Tensor) -> torch.Tensor:
        """Z_U rows R[ids]·(X_m·V_m), summed from the users' training items (``user_feature_table`` false).

        The same values as (R·X_m)[ids]·V_m up to the order of the float sums, without the |U| × d_m table;
        a step reads the X_m rows of every item of its users instead of one R·X_m row per user."""
        crow, col, val = self.r_csr
        start, count = crow[ids], crow[ids + 1] - crow[ids]
        seg = torch.repeat_interleave(torch.arange(len(ids), device=ids.device), count)
        offset = torch.cumsum(count, 0) - count                      # each user's first slot in the flat list
        flat = start[seg] + torch.arange(len(seg), device=ids.device) - offset[seg]
        items, inverse = torch.unique(col[flat], return_inverse=True)
        if self.tables is not None:
            z_items = self.tables.item_logits(m, items, self.model.hyper[m])
        else:
            x = self.model.features[m]
            self._count_reads(len(items), x)
            z_items = const_rows_matmul(x.index_select(0, items), self.model.hyper[m])
        z = z_items.index_select(0, inverse) * val[flat].unsqueeze(1)
        return z.new_zeros(len(ids), z.shape[1]).index_add(0, seg, z)

    def _fill_hcache(self, step: int, users: torch.Tensor, items: torch.Tensor) -> None:
        """H̄ rows of every user / item the step reads (its nodes and sampled negatives), computed once per
        modality: the X_m / R·X_m rows behind them are the largest reads of a step."""
        self._hcache = {}
        for k in range(len(self.modalities)):
            for user, ids in ((True, users), (False, items)):
                if len(ids) or self.tables is not None:      # sharded tables: a collective on every rank
                    self._hcache[(k, user)] = (ids, self._h_compute(k, user, ids, step))

    def _messages(self, step: int) -> list[torch.Tensor]:
        """M^m per modality: with gradient from a full pass (r = 0), else the cached full pass."""
        m, r = self.model, self.cfg.hyper_refresh_steps
        if r == 0:
            self._full = m.ghe(m.cge(), step, train=True)
            self.counts["full_pass"] = 1
            return [h.message for h in self._full]
        self._full = None
        if self.cache is None or not 0 <= step - self.cache["step"] < r:
            messages, coupling = self.full_messages(step, with_coupling=True)
            self.cache = {"step": step, "messages": messages, "coupling": coupling}
            self.counts["full_pass"] = 1
        return self.cache["messages"]

    @torch.no_grad()
    def full_messages(self, step: int, with_coupling: bool = False):
        """The exact model's hyperedge messages at ``step`` for the current parameters (no gradient).

        With ``with_coupling`` also C^(H−1) per modality, C = H̄_Iᵀ·H̄_I (A × A): M^(H) = C^(H−1)·H̄_Iᵀ·Q^(0),
        the linear map through which the straight-through message gradient reaches the CGE rows."""
        m = self.model
        if self.tables is not None:
            e_c = self.tables.owned_cge(m)                       # this rank's users, then its items
            return self._sharded_messages(e_c[len(self.tables.owned_users):], step, with_coupling)
        q0 = m.cge()[self.num_users:]
        ids = torch.arange(self.num_items, device=q0.device)
        messages, coupling = [], []
        for k, mod in enumerate(self.modalities):
            # the item side of the exact model's GHE only: the messages never read the users' assignments
            h_item = self._assign(k, m.features[mod] @ m.hyper[mod], ids, step, user=False)
            message = hypergraph_propagate(h_item, h_item[:0], q0, self.cfg.n_hyper_layer).message
            messages.append(message)
            coupling.append(torch.matrix_power(h_item.t() @ h_item, self.cfg.n_hyper_layer - 1))
        return (messages, coupling) if with_coupling else messages

    def _sharded_messages(self, q_own: torch.Tensor, step: int, with_coupling: bool):
        """:meth:`full_messages` with row-sharded tables, from Q^(0) = E_c of this rank's items (``q_own``):
        each rank assigns its own items and the partial sums H̄_Iᵀ·Q^(0) and C = H̄_Iᵀ·H̄_I are all-reduced;
        M^(H) = C^(H−1)·H̄_Iᵀ·Q^(0) (the value of H rounds of hypergraph_propagate, summed in another order)."""
        import torch.distributed as dist
        ids = self.tables.owned_item_ids
        messages, coupling = [], []
        for k, mod in enumerate(self.modalities):
            h_item = self._assign(k, self.tables.owned_item_logits(mod, self.model.hyper[mod]), ids, step, user=False)
            parts = torch.cat([h_item.t() @ q_own, h_item.t() @ h_item], dim=1)
            dist.all_reduce(parts)
            first, c = parts[:, :q_own.shape[1]], parts[:, q_own.shape[1]:]
            c_power = torch.matrix_power(c, self.cfg.n_hyper_layer - 1)
            messages.append(c_power @ first)
            coupling.append(c_power)
        return (messages, coupling) if with_coupling else messages

    @torch.no_grad()
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E* of every user and item at inference (``LGMRec.final_embeddings``; with sharded tables the
        feature products come from their owners)."""
        m = self.model
        if self.tables is None:
            return m.final_embeddings()
        mge = {mod: self.tables.all_mge(mod, m.proj[mod]) for mod in self.modalities} if self.cfg.use_mge else None
        logits = ({mod: self.tables.all_item_logits(mod, m.hyper[mod]) for mod in self.modalities}
                  if self.cfg.use_ghe else None)
        return m.final_embeddings(item_logits=logits, mge=mge, ego=self.full_ego())

    def full_ego(self) -> torch.Tensor | None:
        """[E_U ; E_I] gathered from the ranks with row-sharded tables; None = the model's own tables."""
        return None if self.tables is None else self.tables.full_embeddings(self.model)

    def _message_grad(self, messages, e_c: torch.Tensor, neg_rows: torch.Tensor, neg: torch.Tensor, step: int,
                      global_size: int):
        """Held messages with a straight-through gradient (``hyper_message_grad``, r ≥ 1).

        Value: the refreshed M^m, unchanged. Gradient: that of M̂ = C^(H−1)·w·Σ_{i∈S} H̄_I[i]ᵀ·E_c[i] over the
        batch's negative items S (B uniform draws from the n training items; w = n / B), whose expectation
        over S is the exact message C^(H−1)·H̄_Iᵀ·E_c: the CGE rows and V_m get an unbiased (up to the
        negatives' rejection of the user's positives and to V_m's effect on C) estimate of the gradient the
        exact model sends through the messages, at O(B·A·d) cost."""
        w = self.num_pool_items / global_size     # P ranks' slices together: B draws (gradients are summed)
        ec = e_c[neg_rows]
        return [straight_through_message(msg, c, self.h_rows(k, False, neg, step), ec, w)
                for k, (msg, c) in enumerate(zip(messages, self.cache["coupling"]))]

    def _negatives(self, user: bool, rows: torch.Tensor, step: int, batch_size: int):
        """(negative ids, log-weights) of the sampled contrastive denominators, or (None, None) for "all"."""
        cfg = self.cfg
        n_total = self.num_users if user else self.num_items
        if cfg.hcl_negatives == "all":
            return None, None
        if cfg.hcl_negatives == "uniform":
            key = rng.stream_key(cfg.seed, step, NEG_USER_STREAM if user else NEG_ITEM_STREAM)
            return uniform_negatives(n_total, cfg.hcl_num_negatives, key, self.device)
        # in_batch: the batch's distinct anchors, Horvitz-Thompson weights 1/π
        deg = (self.user_deg if user else self.item_deg)[rows.cpu().numpy()]
        pi = inclusion_probability(deg, batch_size, self.num_pairs)
        return rows, -torch.from_numpy(np.log(np.maximum(pi, 1e-30))).float().to(self.device)

    def hcl(self, messages, users: torch.Tensor, pos: torch.Tensor, step: int) -> torch.Tensor:
        """L_hcl of §1.8 with the configured denominators (exact when "all")."""
        if self._full is not None and self.cfg.hcl_negatives == "all":
            return hcl_loss(self._full, users, pos, TAU)
        total = users.new_zeros((), dtype=torch.float32)
        for user, anchors in ((True, users), (False, pos)):
            rows, counts = torch.unique(anchors, return_counts=True)
            neg_ids, log_w = self._neg.get(user) or self._negatives(user, rows, step, len(users))
            if neg_ids is not None:
                self.counts["negatives"] = self.counts.get("negatives", 0) + len(neg_ids)
            for k in range(len(self.modalities) - 1):
                m_a, m_p = messages[k], messages[k + 1]
                anchor = F.normalize(self.h_rows(k, user, rows, step) @ m_a, dim=1)
                positive = F.normalize(self.h_rows(k + 1, user, rows, step) @ m_p, dim=1)
                pos_logit = (anchor * positive).sum(1) / TAU
                q = (anchor @ m_p.t()) / TAU
                if neg_ids is None:
                    every = torch.arange(self.num_users if user else self.num_items, device=self.device)
                    lse = lowrank_logsumexp(q, _key_scaled(self.h_rows(k + 1, user, every, step), m_p))
                else:
                    keys = _key_scaled(self.h_rows(k + 1, user, neg_ids, step), m_p)
                    lse = sampled_logsumexp(pos_logit, q @ keys.t(), log_w, neg_ids, rows)
                total = total + (counts.float() * (lse - pos_logit)).sum()
        return total

    # ------------------------------------------------------------------ the step
    def batch_loss(self, users, pos, neg, step: int, batch: SampledBatch, global_size: int | None = None) -> dict:
        """Loss terms of the triples (users, pos, neg) (§1.8). With P ranks (``self.world`` > 1) these are
        this rank's slice of a global batch of ``global_size`` triples and the result is this rank's share:
        the shares of the ranks add up to the loss of the global batch (BPR sum / |B|, HCL sum over the
        slice's anchors, the regulariser's norms from all-reduced sums of squares, counted 1/P per rank)."""
        cfg, m = self.cfg, self.model
        global_size = global_size or len(users)
        self.counts = {}
        users, pos, neg = (t.to(self.device) for t in (users, pos, neg))
        seeds, inverse = batch.seeds.to(self.device), batch.inverse.to(self.device)
        e_c = self.cge_rows(batch)
        e = e_c
        messages = self._messages(step) if cfg.use_ghe else None
        if cfg.use_mge:
            for mod in self.modalities:
                if self.tables is not None:
                    y = self.tables.mge_products(mod, seeds, m.proj[mod])
                elif m.mge_y:
                    y = const_rows_matmul(m.mge_y[mod].index_select(0, seeds).float(), m.proj[mod])
                else:
                    y = m.mge_rows(mod, seeds)
                e = e + F.normalize(y, dim=1)
        n_su = int(torch.searchsorted(seeds, self.num_users))
        s_users, s_items = seeds[:n_su], seeds[n_su:] - self.num_users
        self._neg, self._hcache = {}, {}
        if cfg.use_ghe and cfg.hcl_negatives == "uniform" and cfg.cl_weight > 0 and len(self.modalities) > 1:
            self._neg = {user: self._negatives(user, None, step, len(users)) for user in (True, False)}
        if cfg.use_ghe and self._full is None:
            extra = {user: self._neg[user][0] for user in self._neg}
            self._fill_hcache(step, torch.unique(torch.cat([s_users, extra.get(True, s_users[:0])])),
                              torch.unique(torch.cat([s_items, extra.get(False, s_items[:0])])))
        if cfg.use_ghe and cfg.hyper_refresh_steps and cfg.hyper_message_grad:
            messages = self._message_grad(messages, e_c, inverse[2 * len(users):], neg, step, global_size)
        if cfg.use_ghe:
            g = sum(torch.cat([self.h_rows(k, True, s_users, step), self.h_rows(k, False, s_items, step)]) @ msg
                    for k, msg in enumerate(messages))
            e = e + cfg.alpha * F.normalize(g, dim=1)
        e_u, e_p, e_n = e[inverse].split(len(users))
        if self.world == 1:
            bpr = bpr_loss(e_u, e_p, e_n)
            reg = reg_loss(e_u, e_p, e_n, len(users))
        else:
            import torch.distributed.nn.functional as dnn
            bpr = -F.logsigmoid((e_u * e_p).sum(1) - (e_u * e_n).sum(1)).sum() / global_size
            sq = dnn.all_reduce(torch.stack([e_u.pow(2).sum(), e_p.pow(2).sum(), e_n.pow(2).sum()]))
            reg = sq.sqrt().sum() / global_size          # the same on every rank
        if cfg.use_ghe and cfg.cl_weight > 0 and len(self.modalities) > 1:
            hcl = self.hcl(messages, users, pos, step)
        else:
            hcl = bpr.new_zeros(())
        self._full, self._hcache, self._neg = None, {}, {}
        loss = bpr + cfg.cl_weight * hcl + cfg.reg_weight * reg / self.world
        return {"loss": loss, "bpr": bpr.detach(), "hcl": hcl.detach(), "reg": reg.detach() / self.world}

    def memory_bytes(self) -> dict:
        """Bytes held for the run (fp32): what a step reads rows of, and what only full passes read."""
        nb = lambda t: t.numel() * t.element_size()  # noqa: E731
        m, g = self.model, self.model.graph
        mats = (g.norm_adj, g.R, g.R_t, g.P, g.P_t)
        if self.tables is not None:          # this rank's rows only
            tables = self.tables.nbytes()
        else:
            tables = {"features_X": sum(nb(x) for x in m.features.values()),
                      "mge_inputs_Y": sum(nb(y) for y in m.mge_y.values()),
                      "user_feature_sums_RX": sum(nb(x) for x in self.rx.values())}
        return {"embeddings": nb(m.user_embedding) + nb(m.item_embedding), **tables,
                "full_graph": sum(nb(a.values()) + nb(a.col_indices()) + nb(a.crow_indices()) for a in mats),
                "dgl_graph": 16 * self.sampler.graph.num_edges()}

    def step_bytes(self, batch: SampledBatch) -> dict:
        """What a step reads and writes besides activations, in bytes (docs/sampled.md, "bytes per step").

        embeddings: the E^(0) rows the blocks read, their gradient rows, and the optimizer's read+write of
        parameter and two moments (3 tensors × 2) over the rows it updates (the touched rows with
        sparse_embeddings, every row with dense Adam); features: Y_m rows of the seeds and the X_m / R·X_m
        rows behind the H̄ rows computed this step; graph: the block index tensors; dense: W_m, V_m with
        their gradients and Adam work; full_pass: 1 when this step ran a full-graph pass."""
        cfg, d = self.cfg, self.cfg.embedding_size
        rows = len(batch.input_ids)
        opt_rows = rows if cfg.sparse_embeddings else self.num_users + self.num_items
        dense = sum(p.numel() for n, p in self.model.named_parameters() if n.startswith(("proj.", "hyper.")))
        ys = self.tables.y if self.tables is not None else self.model.mge_y
        y_row_bytes = sum(y.shape[1] * y.element_size() for y in ys.values())
        return {"embedding_rows": rows, "optimizer_rows": opt_rows,
                "embeddings": FLOAT * d * (2 * rows + 6 * opt_rows),
                "features": batch.num_seeds * y_row_bytes + self.counts.get("logit_bytes", 0),
                "graph": batch.stats()["index_bytes"], "dense": FLOAT * 8 * dense,
                "full_pass": self.counts.get("full_pass", 0)}


class SampledEngine:
    """The training engine of ``mode: sampled`` (the interface of train.py's LocalEngine).

    One process, or P ranks (``ctx``, a torchrun launch) in data-parallel form: every rank holds the whole
    model (parameters replicated, identical), takes its contiguous slice of each global batch, samples the
    blocks of its slice, and computes its share of the global loss. After backward the ranks sum the dense
    gradients (one all-reduce of W_m, V_m) and exchange the embedding-row gradients of the rows they
    touched (an all-gather of (row id, gradient) pairs: traffic proportional to the touched rows with
    ``sparse_embeddings``; a whole-table all-reduce without); every rank then applies the same update.
    Full passes (message refreshes, inference) run on every rank. Evaluation shards the users over ranks.
    With ``shard_tables`` the embedding and feature tables are row-sharded instead of replicated
    (:mod:`lgmrec_dist.distributed.tables`; ownership as the exact mode: prep's partitions for this many
    ranks, else contiguous ranges).
    """

    def __init__(self, cfg: Config, ds: PreparedDataset, device: torch.device, ctx=None):
        self.cfg, self.device, self.ctx = cfg, device, ctx
        self.rank, self.world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        tu, ti = ds.pairs(TRAIN)
        own = ownership_for(ds, cfg, self.rank, self.world) if cfg.shard_tables and self.world > 1 else None
        self.model = SampledLGMRec(cfg, ds.num_users, ds.num_items, ds.manifest["modalities"], tu, ti,
                                   ds.features, device, own)
        self.model.world = self.world
        params = self.model.model
        self.dense_params = [p for n, p in params.named_parameters() if n.startswith(("proj.", "hyper."))]
        self.row_adam = None
        if cfg.sparse_embeddings:
            self.row_adam = RowAdam({"user_embedding": params.user_embedding.data,
                                     "item_embedding": params.item_embedding.data}, cfg.learning_rate)
            self.optimizers = [torch.optim.Adam(self.dense_params, lr=cfg.learning_rate)] if self.dense_params else []
        else:
            self.optimizers = [torch.optim.Adam(params.parameters(), lr=cfg.learning_rate)]
        mem = self.model.memory_bytes()
        log.info("sampled mode: fanouts %s, hyper_refresh_steps %d, hcl_negatives %s, sparse_embeddings %s, "
                 "%d rank(s); held per rank: %s", self.model.sampler.fanouts, cfg.hyper_refresh_steps,
                 cfg.hcl_negatives, cfg.sparse_embeddings, self.world,
                 ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in mem.items()))
        triples = TripleSampler(ds.num_items, tu, ti, cfg.seed)
        self.prefetcher = Prefetcher(self.model.sampler, triples, cfg.train_batch_size, cfg.sampler_workers,
                                     rank=self.rank, world=self.world)
        self.last_stats: dict = {}
        self._logged = False

    def num_parameters(self) -> int:
        m = self.model.model
        if self.model.tables is None:
            return m.num_parameters()
        held = m.user_embedding.numel() + m.item_embedding.numel()      # this rank's rows of the tables
        return m.num_parameters() - held + (m.num_users + m.num_items) * self.cfg.embedding_size

    def train(self):
        self.model.model.train()

    def step(self, users, pos, neg, step: int) -> dict:
        from lgmrec_dist.sampling import rank_slice
        t0 = time.perf_counter()
        global_size = len(users)
        users, pos, neg = (rank_slice(t, self.rank, self.world) for t in (users, pos, neg))
        batch = self.prefetcher.get(users, pos, neg, step)
        t1 = time.perf_counter()
        terms = self.model.batch_loss(users, pos, neg, step, batch, global_size)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        sent = self._sync_gradients() if self.world > 1 else 0
        for opt in self.optimizers:
            opt.step()
        if self.row_adam is not None:
            tables = {"user_embedding": self.model.model.user_embedding, "item_embedding": self.model.model.item_embedding}
            for name, rows, grad in self._row_gradients():
                # sharded tables: every owner steps every table each step (the shared step counter t)
                if len(rows) or self.model.tables is not None:
                    self.row_adam.step(name, tables[name].data, rows, grad)
        self.model.leaves = []
        values = torch.stack([terms[k].detach() for k in ("loss", "bpr", "hcl", "reg")])
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(values)
        out = dict(zip(("loss", "bpr", "hcl", "reg"), values.tolist()))
        self.last_stats = {"sample_wait_s": t1 - t0, "compute_s": time.perf_counter() - t1, **batch.stats(),
                           "bytes": {**self.model.step_bytes(batch), "sent_to_other_ranks": sent}}
        if not self._logged:
            self._logged = True
            b = self.last_stats["bytes"]
            log.info("sampled step: %d seeds, %d input nodes, %d block edges; bytes: embeddings %.1f MB, "
                     "features %.1f MB, graph %.1f MB, dense %.1f MB, sent to other ranks %.1f MB", batch.num_seeds,
                     len(batch.input_ids), self.last_stats["edges"], b["embeddings"] / 1e6, b["features"] / 1e6,
                     b["graph"] / 1e6, b["dense"] / 1e6, sent / 1e6)
        return out

    # ------------------------------------------------------------------ P ranks
    def _sync_gradients(self) -> int:
        """Sum the ranks' gradients: dense parameters by all-reduce; embedding rows by all-gathering the
        (row, gradient) pairs each rank touched (``sparse_embeddings``) or all-reducing the whole tables.
        Returns the payload bytes this rank sent, with the feature-table exchanges of the step."""
        import torch.distributed as dist
        sent = 0
        dense = [p for p in self.dense_params if p.grad is not None]
        if not self.cfg.sparse_embeddings:
            m = self.model.model
            dense += [p for p in (m.user_embedding, m.item_embedding) if p.grad is not None]
        if dense:
            flat = torch.cat([p.grad.reshape(-1) for p in dense])
            dist.all_reduce(flat)
            sent += 2 * (self.world - 1) * flat.numel() * flat.element_size() // self.world  # ring all-reduce
            offset = 0
            for p in dense:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        if self.cfg.sparse_embeddings and self.model.tables is None:
            gathered = []
            for name, rows, leaf in self.model.leaves:
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                all_rows, all_grads = all_gather_rows(rows), all_gather_rows(grad)   # counted in CommStats
                union, inverse = torch.unique(torch.cat(all_rows), return_inverse=True)
                total = torch.zeros(len(union), grad.shape[1], dtype=grad.dtype, device=grad.device)
                total.index_add_(0, inverse, torch.cat(all_grads))
                gathered.append((name, union, total))
            self._synced_rows = gathered
        return sent + CommStats.take()

    def _row_gradients(self):
        if self.model.tables is not None:          # the owner's rows, gradients of every rank already summed
            return [(name, rows, leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
                    for name, rows, leaf in self.model.leaves]
        if self.world > 1:
            rows, self._synced_rows = self._synced_rows, []
            return rows
        return [(name, rows, leaf.grad) for name, rows, leaf in self.model.leaves if leaf.grad is not None]

    # ------------------------------------------------------------------ inference, state
    def embeddings(self):
        self.model.model.eval()
        return self.model.final_embeddings()

    def evaluate(self, evaluator: Evaluator, emb) -> dict:
        if self.world == 1:
            return evaluator.evaluate_metrics(*emb)
        import torch.distributed as dist
        from lgmrec_dist.evaluation import finalize
        mine = np.arange(self.rank, self.model.num_users, self.world)     # users sharded over ranks
        sums, count = evaluator.evaluate(*emb, user_subset=mine)
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return finalize(dict(zip(keys, t[:-1].tolist())), int(t[-1]))

    def state_dict(self) -> dict:
        m = self.model
        cache = None if m.cache is None else {"step": m.cache["step"], "messages": [t.cpu() for t in m.cache["messages"]],
                                              "coupling": [t.cpu() for t in m.cache["coupling"]]}
        return {"model": m.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "row_adam": self.row_adam.state_dict() if self.row_adam else None,
                "eval_calls": m.model.eval_calls, "message_cache": cache}

    def load_state_dict(self, state: dict) -> None:
        m = self.model
        m.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        if self.row_adam is not None:
            self.row_adam.load_state_dict(state["row_adam"])
        m.model.eval_calls = state["eval_calls"]
        cache = state.get("message_cache")
        m.cache = None if cache is None else {"step": cache["step"],
                                              "messages": [t.to(self.device) for t in cache["messages"]],
                                              "coupling": [t.to(self.device) for t in cache["coupling"]]}

    def model_payload(self) -> dict:
        """The trained parameters keyed for export; with P ranks each writes every P-th row (replicas)."""
        m, tables = self.model.model, self.model.tables
        if tables is not None:                      # this rank's rows
            users = torch.from_numpy(tables.owned_users)
            items = torch.from_numpy(tables.owned_items - tables.num_users)
            user_rows, item_rows = m.user_embedding.detach().cpu(), m.item_embedding.detach().cpu()
        else:
            users = torch.arange(self.rank, m.num_users, self.world)
            items = torch.arange(self.rank, m.num_items, self.world)
            user_rows, item_rows = m.user_embedding.detach().cpu()[users], m.item_embedding.detach().cpu()[items]
        return {"user_ids": users, "user_embedding": user_rows, "item_ids": items, "item_embedding": item_rows,
                "dense": {k: v.detach().cpu() for k, v in m.named_parameters() if k.startswith(("proj.", "hyper."))}}

    def close(self) -> None:
        self.prefetcher.close()

