"""The sampled LGMRec step (docs/sampled.md): applied to the one :class:`~lgmrec_dist.model.LGMRec`, with
the model's own composition (``model.lgmrec.fuse``, ``objective``, ``losses.contrastive_sum``) applied to
rows read through the sampled interfaces: E^(0) rows of DGL blocks, feature products of a feature source
(``model.feature_tables.FeatureTables``, or the row-sharded ``distributed.tables.ShardedFeatureTables``),
H̄ rows of the batch, sampled contrastive denominators (``sampled.estimators``)."""
from __future__ import annotations

import numpy as np
import torch

from lgmrec_dist import rng
from lgmrec_dist.config import Config, ConfigError
from lgmrec_dist.dataset import features_tensor
from lgmrec_dist.distributed.exchange import Ownership, all_gather_rows
from lgmrec_dist.distributed.reduce import all_reduce, all_reduce_
from lgmrec_dist.distributed.parallelize import shard_model
from lgmrec_dist.graph import build_graph
from lgmrec_dist.model.features import HELD_DTYPES, const_rows_matmul
from lgmrec_dist.model.hypergraph import assign, hypergraph_propagate
from lgmrec_dist.model.lgmrec import TAU, LGMRec, fuse, keyed_gumbel, keyed_keep, objective
from lgmrec_dist.model.losses import contrastive_sum, distinct_anchors, key_rows, lowrank_logsumexp
from lgmrec_dist.model.params import model_params
from lgmrec_dist.sampled.accounting import memory_bytes, step_bytes
from lgmrec_dist.sampled.held_messages import average_duplicates, carry, held_sums
from lgmrec_dist.sampled.estimators import (NEG_ITEM_STREAM, NEG_USER_STREAM, cge_on_blocks, sampled_logsumexp,
                                            straight_through_message, uniform_negatives)
from lgmrec_dist.sampling import BlockSampler, SampledBatch, inclusion_probability


def refresh_interval(cfg: Config, num_pairs: int) -> int:
    """Steps between two full message refreshes (docs/sampled.md, "Refreshes scheduled by catalogue size"):
    ``hyper_refresh_steps`` r, stretched to ceil(steps per epoch / ``hyper_refreshes_per_epoch``) when that is
    longer, so that a full O(|U| + |I|) pass happens a bounded number of times per epoch and its cost per
    step stays flat as the catalogue (and with it the epoch) grows. 0 = every step, with gradient (exact)."""
    r, per_epoch = cfg.hyper_refresh_steps, cfg.hyper_refreshes_per_epoch
    if r == 0 or per_epoch == 0:
        return r
    steps_per_epoch = -(-num_pairs // cfg.train_batch_size)
    return max(r, -(-steps_per_epoch // per_epoch))


class SampledStep:
    """Sampled training steps applied to the one :class:`~lgmrec_dist.model.LGMRec` (``self.model``; same
    initial values as the exact mode's)."""

    def __init__(self, cfg: Config, num_users: int, num_items: int, feature_dims: dict[str, int],
                 train_users: np.ndarray, train_items: np.ndarray, features: dict, device: torch.device,
                 own: Ownership | None = None, partitioned: bool = False):
        """``own``: row-sharded tables on P ranks (this rank's book; ``shard_tables``), else every row here.
        ``partitioned``: this rank holds one partition: ``train_users/items`` are the training edges incident
        to its nodes and ``features`` its items' rows; no whole graph is built and the blocks are sampled
        across partitions (``distributed.block_sampling``)."""
        self.cfg, self.hp, self.device = cfg, model_params(cfg), device
        self.num_users, self.num_items = num_users, num_items
        n_layers = cfg.n_ui_layers if cfg.cf_model == "lightgcn" else 0
        self.n_layers = n_layers
        if partitioned:
            if own is None or (cfg.use_ghe and not cfg.user_feature_table):
                raise ConfigError("a partitioned dataset in mode sampled needs shard_tables: true and "
                                  "user_feature_table: true (a rank holds only its users' item lists)")
            from lgmrec_dist.distributed.block_sampling import PartitionBlockSampler
            graph = None
            self.sampler = PartitionBlockSampler(own, num_users, num_items, train_users, train_items, cfg.fanouts,
                                                 n_layers, cfg.seed)
        else:
            graph = build_graph(num_users, num_items, train_users, train_items).to(device)
            self.sampler = BlockSampler(num_users, num_items, graph.train_users, graph.train_items, cfg.fanouts,
                                        n_layers, cfg.seed)
        # the whole graph serves the start-up precomputation, the message refreshes and inference only
        self.tables = None               # row-sharded tables (``shard_tables``, P ranks)
        if own is not None:              # E_U, E_I, X_m, Y_m, R·X_m: this rank's rows only
            items = None if partitioned else own.owned[own.owned >= num_users] - num_users
            owned_x = {m: features_tensor(features[m], items, device) for m in feature_dims}
            # the exact distributed model on this rank's rows: its inference and refreshes are the exact mode's
            self.model = shard_model(self.hp, num_users, num_items, feature_dims, own, train_users, train_items,
                                     owned_x, device, user_sums=cfg.use_ghe and cfg.user_feature_table)
            self.tables = self.model.source
        else:
            self.model = LGMRec(self.hp, num_users, num_items, feature_dims).to(device)
            self.model.attach(graph, {m: features_tensor(features[m], device=device) for m in feature_dims})
            if cfg.use_ghe and cfg.user_feature_table:
                self.model.source.add_user_sums(HELD_DTYPES[cfg.feature_dtype])
        self.source = self.model.source  # where the step's feature products come from
        self.rx = self.source.rx
        self.modalities = self.model.modalities
        self.r_csr = None               # users' item lists (user_feature_table false; not on partitions)
        if graph is not None:
            r = graph.R
            self.r_csr = (r.crow_indices(), r.col_indices(), r.values())
        deg = self.sampler.deg          # full-graph degrees (distinct neighbours) of every node
        self.user_deg, self.item_deg = deg[:num_users], deg[num_users:]
        self.num_pairs = int(self.user_deg.sum())                  # distinct training pairs
        self.num_pool_items = int((self.item_deg > 0).sum())       # the negatives' pool (batches.TripleSampler)
        self.refresh_interval = refresh_interval(cfg, self.num_pairs)
        self.cache: dict | None = None   # {"step": s, "messages": [A × d per modality], "coupling", ...} when r ≥ 1
        self._full = None                # this step's full-pass HyperEmbeddings (r = 0)
        self.leaves: list = []           # (table, rows, leaf) of this step's E^(0) rows (sparse_embeddings)
        self._hcache: dict = {}          # (modality index, is_user) -> (sorted ids, H̄ rows) of this step
        self._neg: dict = {}             # is_user -> (negative ids, log-weights) of this step
        self.counts: dict = {}
        self.world = 1                   # ranks sharing each global batch (set by SampledEngine)

    # ------------------------------------------------------------------ pieces
    def _lookup(self, batch: SampledBatch) -> torch.Tensor:
        """E^(0) rows of the batch's input nodes (sorted: users, then items).

        With ``sparse_embeddings`` the rows are gathered into leaf tensors (``self.leaves``: table name,
        rows, leaf) whose gradients :class:`RowAdam` applies; otherwise they are differentiable gathers
        from the tables (dense gradients, as the exact mode)."""
        dev = self.device
        self.leaves = []
        u_rows, i_rows = self.source.lookup(self.model, batch.input_users.to(dev), batch.input_items.to(dev),
                                            self.leaves if self.cfg.sparse_embeddings else None)
        return torch.cat([u_rows, i_rows])

    def cge_rows(self, batch: SampledBatch) -> torch.Tensor:
        """E_c at the batch's seeds from the sampled blocks (§1.4)."""
        return cge_on_blocks(batch, self._lookup(batch), self.device)

    def _assign(self, k: int, z: torch.Tensor, ids: torch.Tensor, step: int, user: bool) -> torch.Tensor:
        """Gumbel-softmax and dropout of logits z of users/items ``ids`` with the exact model's keyed draws."""
        hp = self.hp
        mask = keyed_keep(hp, step, k, user, ids) if hp.keep_rate < 1.0 else None
        return assign(z, TAU, keyed_gumbel(hp, step, k, user, ids), mask, hp.keep_rate)

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
        m, v = self.modalities[k], self.model.hyper[self.modalities[k]]
        if user and not self.rx:
            return self._assign(k, self._user_logits_from_items(m, ids), ids, step, user)
        self._count_reads(len(ids), self.rx[m] if user else self.source.x[m])
        z = self.source.user_logits(m, ids, v) if user else self.source.item_logits(m, ids, v)
        return self._assign(k, z, ids, step, user)

    def _count_reads(self, rows: int, table: torch.Tensor) -> None:
        """Bytes of feature rows read behind this step's H̄ rows (``step_bytes``)."""
        self.counts["logit_bytes"] = self.counts.get("logit_bytes", 0) + rows * table.shape[1] * table.element_size()

    def _user_logits_from_items(self, m: str, ids: torch.Tensor) -> torch.Tensor:
        """Z_U rows (R[ids]·X_m)·V_m, summed from the users' training items (``user_feature_table`` false).

        The same values as (R·X_m)[ids]·V_m up to the order of the float sums, without the |U| × d_m table;
        a step reads the X_m rows of every item of its users instead of one R·X_m row per user. Every X_m row
        is read once, straight into the users' sums (``embedding_bag``): no gathered copy of the rows, and the
        gradient of V_m needs only the B × d_m sums. With row-sharded tables the owners compute the items'
        A-wide logits X_m[i]·V_m instead, and those travel."""
        crow, col, val = self.r_csr
        start, count = crow[ids], crow[ids + 1] - crow[ids]
        seg = torch.repeat_interleave(torch.arange(len(ids), device=ids.device), count)
        offset = torch.cumsum(count, 0) - count                      # each user's first slot in the flat list
        flat = start[seg] + torch.arange(len(seg), device=ids.device) - offset[seg]
        x = self.source.x[m]
        if self.tables is None:
            self._count_reads(len(flat), x)
            sums = torch.nn.functional.embedding_bag(col[flat], x, offset, mode="sum", per_sample_weights=val[flat])
            return const_rows_matmul(sums, self.model.hyper[m])
        items, inverse = torch.unique(col[flat], return_inverse=True)
        self._count_reads(len(items), x)
        z_items = self.source.item_logits(m, items, self.model.hyper[m])
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
        """M^m per modality: with gradient from a full pass (r = 0), else the held full pass."""
        m, r = self.model, self.refresh_interval
        if r == 0:
            self._full = m.ghe(m.cge(), step, train=True)
            self.counts["full_pass"] = 1
            return [h.message for h in self._full]
        self._full = None
        if self.cache is None or not 0 <= step - self.cache["step"] < r:
            self.cache = self.full_messages(step, with_coupling=True, keep_rows=self.cfg.hyper_message_update)
            self.cache["step"] = step
            self.counts["full_pass"] = 1
        return self.cache["messages"]

    @torch.no_grad()
    def full_messages(self, step: int, with_coupling: bool = False, keep_rows: bool = False):
        """The exact model's hyperedge messages at ``step`` for the current parameters (no gradient).

        With ``with_coupling`` a dict: "messages", and "coupling" = C^(H−1) per modality, C = H̄_Iᵀ·H̄_I (A × A):
        M^(H) = C^(H−1)·H̄_Iᵀ·Q^(0), the linear map through which the straight-through message gradient reaches
        the CGE rows; with ``keep_rows`` also this process' item rows and sums that
        :func:`~lgmrec_dist.sampled.held_messages.carry` updates (``hyper_message_update``)."""
        m = self.model
        if self.tables is not None:
            e_c = m.cge()                                        # this rank's users, then its items
            return self._sharded_messages(e_c[len(m.user_ids):], step, with_coupling, keep_rows)
        q0 = m.cge()[self.num_users:]
        ids = torch.arange(self.num_items, device=q0.device)
        messages, coupling, h_items, sums = [], [], [], []
        for k, mod in enumerate(self.modalities):
            # the item side of the exact model's GHE only: the messages never read the users' assignments
            h_item = self._assign(k, m.source.held_item_logits(mod, m.hyper[mod]), ids, step, user=False)
            message = hypergraph_propagate(h_item, h_item[:0], q0, self.cfg.n_hyper_layer).message
            messages.append(message)
            c = h_item.t() @ h_item
            coupling.append(torch.matrix_power(c, self.cfg.n_hyper_layer - 1))
            if keep_rows:
                h_items.append(h_item)
                sums.append((h_item.t() @ q0, c))
        if not with_coupling:
            return messages
        held = held_sums(q0, h_items, sums) if keep_rows else {}
        return {"messages": messages, "coupling": coupling, **held}

    def _sharded_messages(self, q_own: torch.Tensor, step: int, with_coupling: bool, keep_rows: bool):
        """:meth:`full_messages` with row-sharded tables, from Q^(0) = E_c of this rank's items (``q_own``):
        each rank assigns its own items and the partial sums H̄_Iᵀ·Q^(0) and C = H̄_Iᵀ·H̄_I are all-reduced;
        M^(H) = C^(H−1)·H̄_Iᵀ·Q^(0) (the value of H rounds of hypergraph_propagate, summed in another order).
        With ``keep_rows`` the rows kept are this rank's items' and the sums the all-reduced ones."""
        ids = self.model.item_ids
        messages, coupling, h_items, sums = [], [], [], []
        for k, mod in enumerate(self.modalities):
            h_item = self._assign(k, self.tables.held_item_logits(mod, self.model.hyper[mod]), ids, step, user=False)
            parts = torch.cat([h_item.t() @ q_own, h_item.t() @ h_item], dim=1)
            all_reduce_(parts)
            first, c = parts[:, :q_own.shape[1]], parts[:, q_own.shape[1]:]
            c_power = torch.matrix_power(c, self.cfg.n_hyper_layer - 1)
            messages.append(c_power @ first)
            coupling.append(c_power)
            h_items.append(h_item)
            sums.append((first, c))
        if not with_coupling:
            return messages
        held = held_sums(q_own, h_items, sums) if keep_rows else {}
        return {"messages": messages, "coupling": coupling, **held}

    def _carry_messages(self, step: int, s_items: torch.Tensor, q_items: torch.Tensor) -> list[torch.Tensor]:
        """The held messages with this step's seed items' contributions replaced by the ones it computed
        (``hyper_message_update``, docs/sampled.md "Carrying the messages across steps"): E_c rows from the
        sampled blocks, H̄ rows with this step's draws. On P ranks every rank's rows are all-gathered (an item
        in several ranks' seeds gets the mean of their estimates), so replicated held messages stay equal on
        every rank; with row-sharded tables each owner updates its own items and the changes are summed."""
        cache = self.cache
        if cache["step"] == step:        # refreshed at this step: every contribution is already current
            return cache["messages"]
        rows = torch.cat([q_items.detach()] + [self.h_rows(k, False, s_items, step).detach()
                                                 for k in range(len(self.modalities))], dim=1)
        ids = s_items
        if self.world > 1:
            ids, rows = torch.cat(all_gather_rows(ids)), torch.cat(all_gather_rows(rows))
        ids, rows = average_duplicates(ids, rows)
        slots, reduce = ids, None
        if self.tables is not None:      # keep this rank's items; their slots are positions among its items
            held = self.model.item_ids
            pos = torch.searchsorted(held, ids).clamp_max(max(len(held) - 1, 0))
            mine = held[pos] == ids if len(held) else torch.zeros_like(ids, dtype=torch.bool)
            slots, rows, reduce = pos[mine], rows[mine], all_reduce_
        d, a = q_items.shape[1], self.hp.hyper_num
        h_new = [rows[:, d + k * a:d + (k + 1) * a] for k in range(len(self.modalities))]
        carry(cache, slots, rows[:, :d], h_new, self.cfg.n_hyper_layer, reduce)
        return cache["messages"]

    def full_ego(self) -> torch.Tensor | None:
        """[E_U ; E_I] gathered from the ranks with row-sharded tables; None = the model's own tables."""
        return None if self.tables is None else self.tables.gather_ego(self.model)

    def _message_grad(self, messages, e_c: torch.Tensor, neg_rows: torch.Tensor, neg: torch.Tensor, step: int):
        """Held messages with a straight-through gradient (``hyper_message_grad``, r ≥ 1).

        Value: the refreshed M^m, unchanged. Gradient: that of M̂ = C^(H−1)·w·Σ_{i∈S} H̄_I[i]ᵀ·E_c[i] over the
        batch's negative items S (B uniform draws from the n training items; w = n / B), whose expectation
        over S is the exact message C^(H−1)·H̄_Iᵀ·E_c: the CGE rows and V_m get an unbiased (up to the
        negatives' rejection of the user's positives and to V_m's effect on C) estimate of the gradient the
        exact model sends through the messages, at O(B·A·d) cost."""
        # w = n / (this process' draws): on P ranks each rank's share of the loss takes its gradient through its
        # own estimate, so each estimate must be unbiased alone (n / B would give the ranks' summed gradient
        # 1/P of its expectation)
        w = self.num_pool_items / max(len(neg), 1)
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
        """L_hcl (``losses.contrastive_sum``) over the step's H̄ rows with the configured denominators
        (exact when "all")."""
        anchors = distinct_anchors(users, pos)
        negatives = {}
        for user, rows, _ in anchors:
            negatives[user] = self._neg.get(user) or self._negatives(user, rows, step, len(users))
            if negatives[user][0] is not None:
                self.counts["negatives"] = self.counts.get("negatives", 0) + len(negatives[user][0])

        def denominator(k, user, rows, q, pos_logit):
            neg_ids, log_w = negatives[user]
            if neg_ids is None:
                every = torch.arange(self.num_users if user else self.num_items, device=self.device)
                return lowrank_logsumexp(q, key_rows(self.h_rows(k, user, every, step), messages[k]))
            keys = key_rows(self.h_rows(k, user, neg_ids, step), messages[k])
            return sampled_logsumexp(pos_logit, q @ keys.t(), log_w, neg_ids, rows)

        return contrastive_sum(messages, anchors, lambda k, user, rows: self.h_rows(k, user, rows, step),
                               denominator, TAU)

    # ------------------------------------------------------------------ the step
    def batch_loss(self, users, pos, neg, step: int, batch: SampledBatch, global_size: int | None = None) -> dict:
        """Loss terms of the triples (users, pos, neg) (§1.8). With P ranks (``self.world`` > 1) these are
        this rank's slice of a global batch of ``global_size`` triples and the result is this rank's share:
        the shares of the ranks add up to the loss of the global batch (BPR sum / |B|, HCL sum over the
        slice's anchors, the regulariser's norms from all-reduced sums of squares, counted 1/P per rank)."""
        cfg, m, hp = self.cfg, self.model, self.hp
        global_size = global_size or len(users)
        self.counts = {}
        users, pos, neg = (t.to(self.device) for t in (users, pos, neg))
        seeds, inverse = batch.seeds.to(self.device), batch.inverse.to(self.device)
        e_c = self.cge_rows(batch)
        messages = self._messages(step) if cfg.use_ghe else None
        mge = [self.source.mge_rows(mod, seeds, m.proj[mod]) for mod in self.modalities] if cfg.use_mge else []
        n_su = int(torch.searchsorted(seeds, self.num_users))
        s_users, s_items = seeds[:n_su], seeds[n_su:] - self.num_users
        self._neg, self._hcache = {}, {}
        if cfg.use_ghe and cfg.hcl_negatives == "uniform" and cfg.cl_weight > 0 and len(self.modalities) > 1:
            self._neg = {user: self._negatives(user, None, step, len(users)) for user in (True, False)}
        if cfg.use_ghe and self._full is None:
            extra = {user: self._neg[user][0] for user in self._neg}
            self._fill_hcache(step, torch.unique(torch.cat([s_users, extra.get(True, s_users[:0])])),
                              torch.unique(torch.cat([s_items, extra.get(False, s_items[:0])])))
        if cfg.use_ghe and self.refresh_interval and cfg.hyper_message_update:
            messages = self._carry_messages(step, s_items, e_c[n_su:])
        if cfg.use_ghe and cfg.hyper_refresh_steps and cfg.hyper_message_grad:
            messages = self._message_grad(messages, e_c, inverse[2 * len(users):], neg, step)
        g = None
        if cfg.use_ghe:
            g = sum(torch.cat([self.h_rows(k, True, s_users, step), self.h_rows(k, False, s_items, step)]) @ msg
                    for k, msg in enumerate(messages))
        e_u, e_p, e_n = fuse(e_c, mge, g, cfg.alpha)[inverse].split(len(users))
        if cfg.use_ghe and cfg.cl_weight > 0 and len(self.modalities) > 1:
            hcl = self.hcl(messages, users, pos, step)
        else:
            hcl = e_u.new_zeros(())
        self._full, self._hcache, self._neg = None, {}, {}
        return objective(e_u, e_p, e_n, hcl, global_size, hp, reduce=all_reduce if self.world > 1 else None,
                         world=self.world)

    def memory_bytes(self) -> dict:
        return memory_bytes(self)

    def step_bytes(self, batch: SampledBatch) -> dict:
        return step_bytes(self, batch)
