"""A rank's share of the exact distributed path (docs/distributed.md): the graph of its owned rows
(:class:`LocalGraph`) and the placement of those rows (:class:`ShardedRows`), which ``distributed.parallelize``
applies to the one :class:`~lgmrec_dist.model.LGMRec`.

Each rank owns a set of nodes (:class:`~lgmrec_dist.distributed.exchange.Ownership`) and holds only
their rows of the ID embeddings, of the precomputed MGE inputs Y_m and of the item features X_m.

* **CGE** (docs/model.md) runs on the owned rows of Ĝ over [owned ; halo] columns (:class:`LocalGraph`);
  each layer fetches the halo rows from their owners (autograd-aware all-to-all). Ĝ's weights use
  full-graph degrees.
* **MGE**: Y_m = Ĝ^K [P·X_m ; X_m] is precomputed for the owned rows the same way (no grad).
* **GHE**: each rank computes logits, Gumbel-softmax and dropout for its items and users (draws
  keyed by global node id); user logits sum item logits fetched through the same halo exchange; the
  partial messages H̄_Iᵀ·Q of the ranks are summed by an autograd-aware all-reduce.
* **Loss** of a global batch: rank r takes the r-th slice of the triples for BPR (sum / |B|),
  owners compute the fused rows E* of the batch nodes and send them where needed; the regulariser's
  Frobenius norms are combined from per-rank sums of squares; the contrastive loss is computed for the
  anchors a rank owns, with all-user/all-item denominators combined from per-rank partial log-sum-exps.
  The ranks' losses add up to the single-process loss, so their gradients add up to its gradient.
* Dense parameters W_m, V_m are replicated; DDP sums their gradients over ranks during backward
  (``distributed.reduce.replicate_dense``); embedding rows are updated by their owner.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from lgmrec_dist.distributed.exchange import Ownership, RowExchange, all_gather, all_gather_rows
from lgmrec_dist.distributed.reduce import all_reduce
from lgmrec_dist.graph import csr_mm, csr_sharing, spmm
from lgmrec_dist.keys import distinct_counts, pair_keys, run_starts
from lgmrec_dist.model.features import column_chunk
from lgmrec_dist.model.hypergraph import HyperEmbedding
from lgmrec_dist.model.losses import key_rows, lowrank_logsumexp


SHARDED_CHUNK_BYTES = 32 << 20   # one float32 column chunk of the start-up precomputation (LocalGraph)
BUILD_BLOCK = 1 << 20            # edges per block of the LocalGraph build


class _RowFill:
    """A CSR matrix filled in blocks of entries whose rows are known in advance (``counts``): each entry goes
    after the entries its row already has, so within a row the entries keep their arrival order."""

    def __init__(self, counts: np.ndarray):
        self.indptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.indptr[1:])
        self.cursor = self.indptr[:-1].copy()
        self.cols = np.empty(int(self.indptr[-1]), dtype=np.int64)
        self.vals = np.empty(int(self.indptr[-1]), dtype=np.float32)

    def place(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        order = np.argsort(rows, kind="stable")             # arrival order kept within a row
        r = rows[order]
        starts = run_starts(r)
        runs = np.diff(np.append(starts, len(r)))
        pos = self.cursor[r] + (np.arange(len(r)) - np.repeat(starts, runs))
        self.cols[pos] = cols[order]
        self.vals[pos] = vals[order]                        # float64 weights cast per entry, as csr()
        self.cursor[r[starts]] += runs

    def matrix(self, shape) -> torch.Tensor:
        return csr_sharing(torch.from_numpy(self.indptr), torch.from_numpy(self.cols), (self.vals,), shape)[0]


class LocalGraph:
    """The owned rows of Ĝ (and of R, P for owned users) as CSR blocks over [owned ; halo] columns.

    Built from the training edges incident to the owned nodes (a partition's ``train_edges``; any superset,
    such as every edge, gives the same graph), with no graph of the whole catalogue: the neighbourhood of an
    owned node is complete in them, so its degree is exact, and the degrees of the halo nodes (Ĝ's weights
    use full-graph degrees, never local ones) are fetched from their owners."""

    def __init__(self, own: Ownership, num_users: int, num_items: int, users: np.ndarray, items: np.ndarray,
                 device: torch.device, block: int = BUILD_BLOCK):
        # interactions are a set (docs/model.md §1.3): a pair logged twice is one edge
        keys = pair_keys(users, items, num_items)
        self._own, self._num_users, self._num_items = own, num_users, num_items
        # the CSR blocks are filled ``block`` edges at a time, in two passes over the sorted keys (row counts
        # and halo; the entries), so the build holds the finished arrays and one block's temporaries, not
        # whole-edge arrays of both directions, keys and sort orders (docs/distributed.md, "Memory per rank":
        # the start-up peak of a rank)
        n_own = len(own.owned)
        deg_own = np.zeros(n_own, dtype=np.int64)        # Ĝ's row counts: the owned nodes' degrees
        count_own = np.zeros(n_own, dtype=np.int64)      # Ĝᵀ's row counts of the owned nodes
        halo_parts = []                                  # (distinct halo ids, their counts) of each block
        for dst, src, src_owned, halo in self._entries(keys, block):
            deg_own += np.bincount(dst, minlength=n_own)
            count_own += np.bincount(src[src_owned], minlength=n_own)
            halo_parts.append(distinct_counts(halo))
        halo_ids, count_halo = (distinct_counts(*(np.concatenate(a) for a in zip(*halo_parts))) if halo_parts
                                else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        del halo_parts
        # halo rows numbered by (owner, id): they arrive from their owners in that order, straight into the
        # [owned ; halo] rows (RowExchange.extend). A row's entries stay in node-id order, so the numbering
        # does not change a sum
        by_owner = np.argsort(own.part[halo_ids], kind="stable")
        halo_row = np.empty_like(by_owner)
        halo_row[by_owner] = np.arange(len(by_owner))
        self.halo = RowExchange(own, halo_ids[by_owner])
        deg = np.concatenate([deg_own, self.halo(torch.from_numpy(deg_own).to(device)).cpu().numpy()])
        d = 1.0 / np.sqrt(deg.astype(np.float64) + 1e-7)
        n_src = n_own + len(halo_ids)
        count_t = np.concatenate([count_own, count_halo[by_owner]])
        # Ĝ (owned rows) and Ĝᵀ ([owned ; halo] rows). The keys are sorted by (user, item), so every row's
        # entries arrive in the node-id order of their columns (a user's items ascending; an item's users
        # ascending): placing them in arrival order gives each row the order of the whole graph's Ĝ
        adj, adj_t = _RowFill(deg_own), _RowFill(count_t)
        for local_dst, local_src, src_owned, halo in self._entries(keys, block):
            local_src[~src_owned] = n_own + halo_row[np.searchsorted(halo_ids, halo)]
            w = d[local_dst]
            w *= d[local_src]
            adj.place(local_dst, local_src, w)
            adj_t.place(local_src, local_dst, w)
        del keys, halo_row
        norm_adj, norm_adj_t = adj.matrix((n_own, n_src)), adj_t.matrix((n_src, n_own))
        deg_own = deg_own.astype(np.float64)
        self.num_own_users = n_u = int((own.owned < num_users).sum())
        # R, P are Ĝ's user rows and R_t, P_t its transpose's entries towards users, in the same order (the
        # owned users come first, and a row's entries run in node-id order): no more sorting, and R and P
        # (R_t and P_t) share one index structure
        crow, col = norm_adj.crow_indices(), norm_adj.col_indices()
        nnz_u = int(crow[n_u])
        crow_r = torch.cat([crow[:n_u + 1], crow.new_full((n_own - n_u,), nnz_u)]).to(device)
        col_r = col[:nnz_u].to(device)                          # on the CPU a view of Ĝ's columns
        mean_r = np.repeat(1.0 / (deg_own[:n_u] + 1e-7), np.diff(crow[:n_u + 1].numpy()))
        crow, col = norm_adj_t.crow_indices(), norm_adj_t.col_indices()
        to_user = col < n_u
        crow_rt = torch.cat([crow.new_zeros(1), torch.cumsum(to_user, 0)])[crow].to(device)
        col_rt = col[to_user].to(device)
        mean_rt = 1.0 / (deg_own[col_rt.cpu().numpy()] + 1e-7)
        del to_user, crow, col
        self.norm_adj, self.norm_adj_t = norm_adj.to(device), norm_adj_t.to(device)
        self.R, self.P = csr_sharing(crow_r, col_r, (np.ones(nnz_u), mean_r), (n_own, n_src))
        self.R_t, self.P_t = csr_sharing(crow_rt, col_rt, (np.ones(len(col_rt)), mean_rt), (n_src, n_own))
        self.num_halo = len(halo_ids)
        # every rank must take the same number of column chunks (each one is a halo exchange): size them by the
        # widest rank's [owned ; halo] rows. A chunk's buffers (``_column_chunks``) are a start-up peak on
        # every rank that does not shrink with P, so the budget is small; more chunks cost more, smaller
        # exchanges, not more arithmetic
        widest = torch.tensor([n_src], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(widest, op=dist.ReduceOp.MAX)
        self.chunk = column_chunk(int(widest), budget=SHARDED_CHUNK_BYTES, least=1)

    def _entries(self, keys: np.ndarray, block: int):
        """Both directions of the edges, kept where the destination is owned (users' rows, then items' rows),
        ``block`` keys at a time: (local rows of the destinations, local rows of the sources where
        ``src_owned``, that mask, the node ids of the other sources: the halo). Each node's local row is looked
        up once a block (the users of sorted keys are sorted: the cheap look-up)."""
        own, ni, nu = self._own, self._num_items, self._num_users
        for lo in range(0, len(keys), block):
            k = keys[lo:lo + block]
            u, i = k // ni, k % ni + nu
            mine_u, mine_i = own.part[u] == own.rank, own.part[i] == own.rank
            lu, li = np.full(len(k), -1, np.int64), np.full(len(k), -1, np.int64)
            lu[mine_u], li[mine_i] = own.local(u[mine_u]), own.local(i[mine_i])
            dst = np.concatenate([lu[mine_u], li[mine_i]])
            src = np.concatenate([li[mine_u], lu[mine_i]])
            src_owned = np.concatenate([mine_i[mine_u], mine_u[mine_i]])
            halo = np.concatenate([i[mine_u & ~mine_i], u[mine_i & ~mine_u]])
            yield dst, src, src_owned, halo

    def extend(self, x_owned: torch.Tensor) -> torch.Tensor:
        return self.halo.extend(x_owned)

    def propagate(self, x_owned: torch.Tensor) -> torch.Tensor:
        """Owned rows of Ĝ·x, with the halo rows fetched from their owners."""
        return spmm(self.norm_adj, self.norm_adj_t, self.extend(x_owned))

    def _node_rows(self, x_items: torch.Tensor) -> torch.Tensor:
        """Owned-node rows: zero for the users, ``x_items`` for the items."""
        return torch.cat([x_items.new_zeros((self.num_own_users, *x_items.shape[1:])), x_items])

    def user_sums(self, x_items: torch.Tensor) -> torch.Tensor:
        """Owned users' rows of R·x from the owned items' rows ``x_items`` (halo items fetched)."""
        return spmm(self.R, self.R_t, self.extend(self._node_rows(x_items)))[:self.num_own_users]

    def _column_chunks(self, x_items: torch.Tensor):
        """For each column chunk of ``x_items``: (first column, [owned ; halo] rows of the chunk's node rows,
        an owned-rows buffer, the refill of the halo rows from the owned ones). The buffers are made once and
        reused by every chunk (the last one a prefix view of each), so the start-up precomputation's
        transient is these few chunk-sized buffers, not fresh copies for every product and exchange."""
        n_own, n_src, n_u, d = self.norm_adj.shape[0], self.norm_adj.shape[1], self.num_own_users, x_items.shape[1]
        chunk = max(1, min(self.chunk, d))
        ext_buf, own_buf = (torch.empty(rows * chunk, device=x_items.device) for rows in (n_src, n_own))
        scratch = self.halo.scratch(chunk, x_items.device)
        for c in range(0, d, chunk):
            w = min(chunk, d - c)
            ext, y = ext_buf[:n_src * w].view(n_src, w), own_buf[:n_own * w].view(n_own, w)
            ext[:n_u] = 0                                       # users' node rows: zero (§1.3 [P·X ; X])
            ext[n_u:n_own] = x_items[:, c:c + w]
            refill = lambda e=ext: self.halo.fill(e[:n_own], e[n_own:], scratch)  # noqa: E731
            refill()
            yield c, ext, y, refill

    @torch.no_grad()
    def mge_inputs(self, x_items: torch.Tensor, n_layers: int, dtype: torch.dtype) -> torch.Tensor:
        """Owned rows of Y = Ĝ^K [P·X ; X] (as ``mge.mge_inputs``, with halo exchange), held in ``dtype``."""
        n_own = self.norm_adj.shape[0]
        out = torch.empty(n_own, x_items.shape[1], device=x_items.device, dtype=dtype)
        for c, ext, y, refill in self._column_chunks(x_items):
            csr_mm(self.P, ext, out=y)
            y += ext[:n_own]
            for _ in range(n_layers):
                ext[:n_own] = y
                refill()
                csr_mm(self.norm_adj, ext, out=y)
            out[:, c:c + y.shape[1]] = y
        return out

    @torch.no_grad()
    def user_feature_sums(self, x_items: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Owned users' rows of R·X (as ``features.user_feature_sums``), in column chunks, held in ``dtype``."""
        out = torch.empty(self.num_own_users, x_items.shape[1], device=x_items.device, dtype=dtype)
        for c, ext, y, _ in self._column_chunks(x_items):
            csr_mm(self.R, ext, out=y)
            out[:, c:c + y.shape[1]] = y[:self.num_own_users]
        return out


class ShardedRows:
    """The placement (``model.placement``) of a rank's owned rows: its users and items, the batch rows it
    owns and the triples of its slice of the batch, the anchors it owns, denominators over every rank's rows,
    and sums all-reduced. The ranks' losses then add up to the single-process loss (docs/distributed.md)."""

    reduce = staticmethod(all_reduce)

    def __init__(self, own: Ownership, num_users: int, device: torch.device):
        owned = torch.from_numpy(own.owned)
        self.own, self.num_users, self.world = own, num_users, own.world_size
        self.user_ids = owned[owned < num_users].to(device)
        self.item_ids = (owned[owned >= num_users] - num_users).to(device)

    def batch_rows(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
        """(local rows of the batch nodes this rank owns, pick): BPR's triples are cut into P contiguous
        slices, and ``pick`` fetches the fused rows of this rank's slice from their owners."""
        own, n_u = self.own, self.num_users
        users, pos, neg = (t.cpu().numpy() for t in (users, pos, neg))
        nodes = np.concatenate([users, pos + n_u, neg + n_u])
        mine = np.unique(nodes[own.part[nodes] == own.rank])           # batch nodes I own
        lo, hi = own.rank * len(users) // self.world, (own.rank + 1) * len(users) // self.world
        part = np.concatenate([users[lo:hi], pos[lo:hi] + n_u, neg[lo:hi] + n_u])
        exchange = RowExchange(own, part, source_ids=mine)
        rows = torch.from_numpy(own.local(mine)).to(self.user_ids.device)
        return rows, lambda fused: exchange(fused).split(hi - lo)

    def anchors(self, users: torch.Tensor, pos: torch.Tensor) -> list:
        """The batch's distinct anchors this rank owns: (is_user, local rows, multiplicities)."""
        out = []
        n_own_users = len(self.user_ids)
        for ids, offset, is_user in ((users, 0, True), (pos, self.num_users, False)):
            rows, counts = np.unique(ids.cpu().numpy(), return_counts=True)
            mine = self.own.part[rows + offset] == self.own.rank
            local = self.own.local(rows[mine] + offset) - (0 if is_user else n_own_users)
            out.append((is_user, torch.from_numpy(local).to(self.user_ids.device),
                        torch.from_numpy(counts[mine]).float()))
        return out

    def denominator(self, hyper: list[HyperEmbedding]):
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
