"""LGMRec with users, items and their rows sharded over ranks: the exact distributed path (docs/distributed.md).

Each rank owns a set of nodes (:class:`~lgmrec_dist.distributed.exchange.Ownership`) and holds only
their rows of the ID embeddings, of the precomputed MGE inputs Y_m and of the item features X_m.

* **CGE** (docs/model.md) runs on the DGL block of the owned nodes with full neighbourhoods
  (``dgl.sampling.sample_neighbors`` with fanout -1, then ``dgl.to_block``); each layer fetches the
  block's halo rows from their owners (autograd-aware all-to-all). Ĝ's weights use full-graph degrees.
* **MGE**: Y_m = Ĝ^K [P·X_m ; X_m] is precomputed for the owned rows the same way (no grad).
* **GHE**: each rank computes logits, Gumbel-softmax and dropout for its items and users (draws
  keyed by global node id); user logits sum item logits fetched through the same halo exchange; the
  partial messages H̄_Iᵀ·Q of the ranks are summed by an autograd-aware all-reduce.
* **Loss** of a global batch: rank r takes the r-th slice of the triples for BPR (sum / |B|),
  owners compute the fused rows E* of the batch nodes and send them where needed; the regulariser's
  Frobenius norms are combined from per-rank sums of squares; the contrastive loss is computed for the
  anchors a rank owns, with all-user/all-item denominators combined from per-rank partial log-sum-exps.
  The ranks' losses add up to the single-process loss, so their gradients add up to its gradient.
* Dense parameters W_m, V_m are replicated; their gradients are summed over ranks after backward
  (``distributed.reduce.sync_gradients``); embedding rows are updated by their owner.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from lgmrec_dist.config import Config
from lgmrec_dist.distributed.exchange import Ownership, RowExchange, all_gather, all_gather_rows
from lgmrec_dist.distributed.reduce import all_reduce
from lgmrec_dist.graph import csr, spmm
from lgmrec_dist.model.cge import cge
from lgmrec_dist.model.features import HELD_DTYPES, column_chunk, const_rows_matmul, held_matmul
from lgmrec_dist.model.hypergraph import HyperEmbedding
from lgmrec_dist.model.lgmrec import TAU, fuse, global_embeddings, inference, initial_parameters, objective
from lgmrec_dist.model.losses import contrastive_sum, held_rows, key_rows, lowrank_logsumexp
from lgmrec_dist.model.params import model_params


SHARDED_CHUNK_BYTES = 32 << 20   # one float32 column chunk of the start-up precomputation (LocalGraph)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LocalGraph:
    """The owned rows of Ĝ (and of R, P for owned users) as CSR blocks over [owned ; halo] columns.

    Built from the training edges incident to the owned nodes (a partition's ``train_edges``; any superset,
    such as every edge, gives the same graph), with no graph of the whole catalogue: the neighbourhood of an
    owned node is complete in them, so its degree is exact, and the degrees of the halo nodes (Ĝ's weights
    use full-graph degrees, never local ones) are fetched from their owners."""

    def __init__(self, own: Ownership, num_users: int, num_items: int, users: np.ndarray, items: np.ndarray,
                 device: torch.device):
        # interactions are a set (docs/model.md §1.3): a pair logged twice is one edge
        keys = np.unique(np.asarray(users, np.int64) * num_items + np.asarray(items, np.int64))
        users, items = keys // num_items, keys % num_items + num_users
        # both directions of each edge, kept where the destination is owned
        dst, src = np.concatenate([users, items]), np.concatenate([items, users])
        mine = own.part[dst] == own.rank
        dst, src = dst[mine], src[mine]
        n_own = len(own.owned)
        halo_ids = np.unique(src[own.part[src] != own.rank])  # sorted: sums run in the same order every run
        local_dst = own.local(dst)
        is_halo = own.part[src] != own.rank
        local_src = np.where(is_halo, n_own + np.searchsorted(halo_ids, src), own.local(src))
        self.halo = RowExchange(own, halo_ids)
        deg_own = np.bincount(local_dst, minlength=n_own).astype(np.float64)
        deg = np.concatenate([deg_own, self.halo(torch.from_numpy(deg_own).to(device)).cpu().numpy()])
        d = 1.0 / np.sqrt(deg + 1e-7)
        w = d[local_dst] * d[local_src]
        n_src = n_own + len(halo_ids)
        # rows ordered by global node id (the columns are local indices): the same sums as the whole graph's
        self.norm_adj = csr(local_dst, local_src, w, (n_own, n_src), col_ids=src).to(device)
        self.norm_adj_t = csr(local_src, local_dst, w, (n_src, n_own), col_ids=dst).to(device)
        is_user = dst < num_users                                # user rows: edges to items
        dst_u, src_u, gsrc_u, gdst_u = local_dst[is_user], local_src[is_user], src[is_user], dst[is_user]
        ones, mean = np.ones(len(dst_u)), 1.0 / (deg_own[dst_u] + 1e-7)
        self.R = csr(dst_u, src_u, ones, (n_own, n_src), col_ids=gsrc_u).to(device)
        self.R_t = csr(src_u, dst_u, ones, (n_src, n_own), col_ids=gdst_u).to(device)
        self.P = csr(dst_u, src_u, mean, (n_own, n_src), col_ids=gsrc_u).to(device)
        self.P_t = csr(src_u, dst_u, mean, (n_src, n_own), col_ids=gdst_u).to(device)
        self.num_own_users = int((own.owned < num_users).sum())
        self.num_halo = len(halo_ids)
        # every rank must take the same number of column chunks (each one is a halo exchange): size them by the
        # widest rank's [owned ; halo] rows. A chunk's temporaries (the chunk, the halo rows sent and received,
        # the products: ~3.5 chunks) are a start-up peak on every rank that does not shrink with P, so the
        # budget is small; more chunks cost more, smaller exchanges, not more arithmetic
        widest = torch.tensor([n_src], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(widest, op=dist.ReduceOp.MAX)
        self.chunk = column_chunk(int(widest), budget=SHARDED_CHUNK_BYTES, least=1)

    def extend(self, x_owned: torch.Tensor) -> torch.Tensor:
        return torch.cat([x_owned, self.halo(x_owned)])

    def propagate(self, x_owned: torch.Tensor) -> torch.Tensor:
        """Owned rows of Ĝ·x, with the halo rows fetched from their owners."""
        return spmm(self.norm_adj, self.norm_adj_t, self.extend(x_owned))

    def _node_rows(self, x_items: torch.Tensor) -> torch.Tensor:
        """Owned-node rows: zero for the users, ``x_items`` for the items."""
        return torch.cat([x_items.new_zeros((self.num_own_users, *x_items.shape[1:])), x_items])

    def user_sums(self, x_items: torch.Tensor) -> torch.Tensor:
        """Owned users' rows of R·x from the owned items' rows ``x_items`` (halo items fetched)."""
        return spmm(self.R, self.R_t, self.extend(self._node_rows(x_items)))[:self.num_own_users]

    @torch.no_grad()
    def mge_inputs(self, x_items: torch.Tensor, n_layers: int, dtype: torch.dtype) -> torch.Tensor:
        """Owned rows of Y = Ĝ^K [P·X ; X] (as ``mge.mge_inputs``, with halo exchange), held in ``dtype``."""
        out = torch.empty(self.norm_adj.shape[0], x_items.shape[1], device=x_items.device, dtype=dtype)
        for c in range(0, x_items.shape[1], self.chunk):
            x = self._node_rows(x_items[:, c:c + self.chunk].contiguous())
            y = torch.sparse.mm(self.P, self.extend(x)) + x
            for _ in range(n_layers):
                y = torch.sparse.mm(self.norm_adj, self.extend(y))
            out[:, c:c + self.chunk] = y
        return out

    @torch.no_grad()
    def user_feature_sums(self, x_items: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Owned users' rows of R·X (as ``features.user_feature_sums``), in column chunks, held in ``dtype``."""
        out = torch.empty(self.num_own_users, x_items.shape[1], device=x_items.device, dtype=dtype)
        for c in range(0, x_items.shape[1], self.chunk):
            out[:, c:c + self.chunk] = self.user_sums(x_items[:, c:c + self.chunk].contiguous())
        return out


class DenseParams(nn.Module):
    """The replicated parameters (W_m, V_m)."""

    def __init__(self, proj: nn.ParameterDict, hyper: nn.ParameterDict):
        super().__init__()
        self.proj, self.hyper = proj, hyper

    def forward(self):
        return self.proj, self.hyper


class ShardedLGMRec(nn.Module):
    def __init__(self, cfg: Config, num_users: int, num_items: int, feature_dims: dict[str, int], own: Ownership,
                 params: tuple | None = None):
        """``params`` = (E_U rows, E_I rows, W_m dict, V_m dict) to share another model's parameters (the
        sampled mode's sharded tables run their inference through this model), else the initial values."""
        super().__init__()
        self.cfg, self.hp, self.own = cfg, model_params(cfg), own
        self.num_users, self.num_items = num_users, num_items
        self.modalities = list(feature_dims)
        owned = torch.from_numpy(own.owned)
        self.user_ids = owned[owned < num_users]
        self.item_ids = owned[owned >= num_users] - num_users
        self.n_own_users = len(self.user_ids)
        # the single-process model's initial values, this rank's rows of E_U and E_I
        self.user_embedding, self.item_embedding, proj, hyper = params or initial_parameters(
            self.hp, num_users, num_items, feature_dims, (self.user_ids, self.item_ids))
        self.dense = DenseParams(proj, hyper)
        self.eval_calls = 0

    # ------------------------------------------------------------------ set-up
    def attach(self, train_users: np.ndarray, train_items: np.ndarray, features: dict[str, torch.Tensor]):
        """The training edges incident to the owned nodes (or all of them) and the owned items' feature
        rows X_m (tensors, in ``item_ids`` order)."""
        device = self.user_embedding.device
        self.user_ids, self.item_ids = self.user_ids.to(device), self.item_ids.to(device)
        self.graph = LocalGraph(self.own, self.num_users, self.num_items, train_users, train_items, device)
        self.features = features
        self.mge_y = {}
        if self.cfg.use_mge:
            dtype = HELD_DTYPES[self.cfg.feature_dtype]
            self.mge_y = {m: self.graph.mge_inputs(x, self.cfg.n_mm_layers, dtype) for m, x in self.features.items()}
        return self

    def use(self, graph: LocalGraph, features: dict[str, torch.Tensor], mge_y: dict[str, torch.Tensor]):
        """:meth:`attach` with the pieces already built elsewhere (the sampled mode's sharded tables)."""
        device = self.user_embedding.device
        self.user_ids, self.item_ids = self.user_ids.to(device), self.item_ids.to(device)
        self.graph, self.features, self.mge_y = graph, features, mge_y
        return self

    def state_bytes(self) -> dict:
        """Bytes this rank holds for graph, embeddings (with Adam's two moments) and features."""
        g = self.graph
        mats = (g.norm_adj, g.norm_adj_t, g.R, g.R_t, g.P, g.P_t)
        graph = sum(_nbytes(m.values()) + _nbytes(m.col_indices()) + _nbytes(m.crow_indices()) for m in mats)
        emb = 3 * (_nbytes(self.user_embedding) + _nbytes(self.item_embedding))
        return {"graph": graph, "embeddings+adam": emb,
                "features": sum(_nbytes(x) for x in self.features.values()),
                "mge_inputs": sum(_nbytes(y) for y in self.mge_y.values()),
                "halo_rows": g.num_halo, "owned_nodes": len(self.own.owned)}

    # ------------------------------------------------------------------ branches
    def cge(self) -> torch.Tensor:
        ego = torch.cat([self.user_embedding, self.item_embedding])
        return cge(self.graph, ego, self.cfg.n_ui_layers, self.cfg.cf_model)

    def ghe(self, e_c: torch.Tensor, step: int, train: bool) -> list[HyperEmbedding]:
        """``model.lgmrec.global_embeddings`` of the owned rows; the partial messages summed over ranks."""
        z = [const_rows_matmul(self.features[m], self.dense.hyper[m]) for m in self.modalities]
        return global_embeddings(self.hp, z, self.graph, e_c[self.n_own_users:], step, train, self.user_ids,
                                 self.item_ids, reduce=all_reduce)

    def fuse(self, e_c, hyper, rows: torch.Tensor | None = None) -> torch.Tensor:
        """E* at owned local rows (all owned nodes when ``rows`` is None), ``model.lgmrec.fuse``."""
        proj = self.dense.proj
        mge = []
        if self.cfg.use_mge:
            mge = [held_matmul(self.mge_y[m] if rows is None else self.mge_y[m][rows], proj[m]) for m in self.modalities]
        g = sum(h.nodes(rows) for h in hyper) if self.cfg.use_ghe else None
        return fuse(e_c if rows is None else e_c[rows], mge, g, self.cfg.alpha)

    def dense_parameters(self) -> dict[str, nn.Parameter]:
        """The replicated parameters W_m (``proj.m``), V_m (``hyper.m``), by the single-process model's names."""
        return {k.removeprefix("dense."): v for k, v in self.named_parameters() if k.startswith("dense.")}

    # ------------------------------------------------------------------ training
    def batch_loss(self, users, pos, neg, step: int) -> dict:
        """This rank's share of the loss of the global batch (users, pos, neg); shares add up to §1.8."""
        world, rank = dist.get_world_size(), dist.get_rank()
        batch_size, n_u = len(users), self.num_users
        e_c = self.cge()
        hyper = self.ghe(e_c, step, True) if self.cfg.use_ghe else None

        nodes = torch.cat([users, pos + n_u, neg + n_u]).cpu().numpy()
        mine = np.unique(nodes[self.own.part[nodes] == rank])           # batch nodes I own
        fused = self.fuse(e_c, hyper, torch.from_numpy(self.own.local(mine)).to(e_c.device))
        lo, hi = rank * batch_size // world, (rank + 1) * batch_size // world
        part = np.concatenate([users[lo:hi].cpu().numpy(), pos[lo:hi].cpu().numpy() + n_u,
                               neg[lo:hi].cpu().numpy() + n_u])
        e_u, e_p, e_n = RowExchange(self.own, part, source_ids=mine)(fused).split(hi - lo)

        hcl = e_c.new_zeros(())
        if hyper is not None and self.cfg.cl_weight > 0 and len(hyper) > 1:
            hcl = contrastive_sum([h.message for h in hyper], self._anchors(users.cpu().numpy(), pos.cpu().numpy()),
                                  held_rows(hyper), self._denominator(hyper), TAU)
        return objective(e_u, e_p, e_n, hcl, batch_size, self.hp, reduce=all_reduce, world=world)

    def _anchors(self, users: np.ndarray, pos: np.ndarray) -> list:
        """The batch's distinct anchors this rank owns: (is_user, local rows, multiplicities)."""
        out = []
        for ids, offset, is_user in ((users, 0, True), (pos, self.num_users, False)):
            rows, counts = np.unique(ids, return_counts=True)
            mine = self.own.part[rows + offset] == self.own.rank
            local = self.own.local(rows[mine] + offset) - (0 if is_user else self.n_own_users)
            out.append((is_user, torch.from_numpy(local).to(self.user_embedding.device),
                        torch.from_numpy(counts[mine]).float()))
        return out

    def _denominator(self, hyper: list[HyperEmbedding]):
        """Exact denominators over every rank's users / items: each rank's log-sum-exp over its own rows for
        the queries of all ranks, combined by a log-sum-exp of the gathered partials."""
        def lse(k, is_user, rows, q, pos_logit):
            h = hyper[k].h_user if is_user else hyper[k].h_item
            gathered = all_gather_rows(q)
            partial = lowrank_logsumexp(torch.cat(gathered), key_rows(h, hyper[k].message))   # over my rows
            lse_all = torch.logsumexp(torch.stack(all_gather(partial)), dim=0)
            offset = sum(g.shape[0] for g in gathered[:self.own.rank])
            return lse_all[offset:offset + len(rows)]
        return lse

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def final_embeddings(self):
        """E* of the owned users and items (global ids, rows), inference mode (§1.7, docs/model.md)."""
        e = inference(self)
        return self.user_ids, e[:self.n_own_users], self.item_ids, e[self.n_own_users:]
