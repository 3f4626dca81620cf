"""Row-sharded tables on P ranks: the feature source interface of ``model.feature_tables`` over rows held
by their owners. The model reads its owned rows (``held_*``: the exact distributed mode, and inference and
message refreshes of the sampled mode with ``shard_tables``); the sampled step reads rows of any node
(``mge_rows``, ``item_logits``, ``user_logits``, ``lookup``), served by their owners (docs/sampled.md).

Rank r holds the rows of E_U, E_I (trained, with owner-side RowAdam) of the users and items it owns, X_m
of its items, Y_m = Ĝ^K [P·X_m ; X_m] of its nodes and, with ``user_feature_table``, R·X_m of its users:
1/P of each table instead of all of it. Embedding rows are served to the ranks whose blocks read them,
and their gradients come back to the owner (:meth:`ShardedFeatureTables.lookup`). A step needs
products of rows with a weight (Y_m rows × W_m for MGE, X_m / R·X_m rows × V_m for the hyperedge logits)
for rows held anywhere: their owners compute them and send the d- or A-wide products
(:meth:`RowExchange.gather`), not the d_m-wide rows. In backward the products' gradients return to the
owners, whose copy of the weight gets them, and the dense all-reduce of the engine sums the weight's
gradient over ranks, as for any replicated parameter. Message refreshes run the exact mode's halo CGE
over the owned rows (the model's ``cge`` on :class:`~lgmrec_dist.distributed.sharded.LocalGraph`).

Every method that reads another rank's rows is a collective: all ranks call them in the same order and the same number of times.
"""
from __future__ import annotations

import numpy as np
import torch

from lgmrec_dist.distributed.exchange import Ownership, RowExchange, all_gather_rows
from lgmrec_dist.distributed.sharded import LocalGraph
from lgmrec_dist.model.features import HELD_DTYPES, const_rows_matmul, held_matmul
from lgmrec_dist.model.params import ModelParams


class ShardedFeatureTables:
    """This rank's rows of E_U, E_I, X_m, Y_m and R·X_m, and the exchanges that serve other ranks' rows."""

    def __init__(self, hp: ModelParams, own: Ownership, num_users: int, num_items: int, features: dict,
                 device: torch.device, train_users: np.ndarray, train_items: np.ndarray, user_sums: bool = False):
        """``features``: X_m rows of the owned items (tensors, in item id order); ``train_users/items``: the
        training edges incident to the owned nodes (a partition's, or all of them); ``user_sums``: hold
        R·X_m of the owned users too (the sampled step's user logits, ``user_feature_table``)."""
        self.own, self.num_users = own, num_users
        # the owned rows of Ĝ with their halo (the exact mode's sharded CGE): the precomputation of Y_m and
        # R·X_m from the owned X_m rows, and the model's propagation
        self.graph = LocalGraph(own, num_users, num_items, train_users, train_items, device)
        owned = own.owned                                        # sorted global node ids of this rank
        self.owned_users = owned[owned < self.num_users]
        self.owned_items = owned[owned >= self.num_users]       # node ids (items follow the users)
        dtype = HELD_DTYPES[hp.feature_dtype]
        self.x = dict(features)
        self.y = {m: self.graph.mge_inputs(x, hp.n_mm_layers, dtype) for m, x in self.x.items()} if hp.use_mge else {}
        self.rx = {m: self.graph.user_feature_sums(x, dtype) for m, x in self.x.items()} if user_sums else {}

    def _products(self, node_ids: torch.Tensor, source_ids: np.ndarray | None, table: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
        exchange = RowExchange(self.own, node_ids.cpu().numpy(), source_ids)
        return exchange.gather(lambda rows: held_matmul(table.index_select(0, rows.to(table.device)), w))

    def mge_rows(self, m: str, node_ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Y_m[node_ids]·W_m (§1.5)."""
        return self._products(node_ids, None, self.y[m], w)

    def item_logits(self, m: str, item_ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """X_m[item_ids]·V_m (§1.6 Z_I rows)."""
        return self._products(item_ids + self.num_users, self.owned_items, self.x[m], v)

    def user_logits(self, m: str, user_ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(R·X_m)[user_ids]·V_m (§1.6 Z_U rows; needs ``user_feature_table``)."""
        return self._products(user_ids, self.owned_users, self.rx[m], v)

    # ------------------------------------------------------------------ the owned rows (no exchange)
    def held_ego(self, model) -> torch.Tensor:
        """[E_U ; E_I] of this rank's nodes (``own.owned`` order: its users, then its items)."""
        return torch.cat([model.user_embedding, model.item_embedding])

    def held_mge(self, m: str, w: torch.Tensor) -> torch.Tensor:
        return held_matmul(self.y[m], w)

    def held_mge_rows(self, m: str, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return held_matmul(self.y[m].index_select(0, rows), w)

    def held_item_logits(self, m: str, v: torch.Tensor) -> torch.Tensor:
        """X_m·V_m of this rank's items (rows in item id order)."""
        return const_rows_matmul(self.x[m], v)

    def _assemble(self, local: torch.Tensor, ids: np.ndarray, total: int) -> torch.Tensor:
        """Every rank's rows put together in global order (inference)."""
        parts = all_gather_rows(local)
        where = all_gather_rows(torch.from_numpy(ids).to(local.device))
        out = local.new_empty((total, *local.shape[1:]))
        for rows, idx in zip(parts, where):
            out[idx] = rows
        return out

    # ------------------------------------------------------------------ embedding tables
    def lookup(self, model, user_ids: torch.Tensor, item_ids: torch.Tensor, leaves: list) -> tuple:
        """E^(0) rows of (global) users and items, fetched from their owners. The owner gathers each row it
        serves once into a leaf (appended to ``leaves`` as (table name, local rows, leaf)); the rows' gradients
        of every rank arrive summed in that leaf's grad, for the owner's RowAdam."""
        out = []
        for name, ids, source, table in (("user_embedding", user_ids, self.owned_users, model.user_embedding),
                                         ("item_embedding", item_ids + self.num_users, self.owned_items,
                                          model.item_embedding)):
            def rows_of(local, name=name, table=table):
                local = local.to(table.device)
                uniq, inverse = torch.unique(local, return_inverse=True)
                leaf = table.detach().index_select(0, uniq).requires_grad_()
                leaves.append((name, uniq, leaf))
                return leaf.index_select(0, inverse)
            out.append(RowExchange(self.own, ids.cpu().numpy(), source).gather(rows_of))
        return tuple(out)

    @torch.no_grad()
    def gather_ego(self, model) -> torch.Tensor:
        """[E_U ; E_I] of every node, gathered from the owners (inference)."""
        users = self._assemble(model.user_embedding, self.owned_users, self.num_users)
        n_items = self.own.part.size - self.num_users
        items = self._assemble(model.item_embedding, self.owned_items - self.num_users, n_items)
        return torch.cat([users, items])

    def nbytes(self) -> dict:
        nb = lambda ts: sum(t.numel() * t.element_size() for t in ts.values())  # noqa: E731
        return {"features_X": nb(self.x), "mge_inputs_Y": nb(self.y), "user_feature_sums_RX": nb(self.rx)}
