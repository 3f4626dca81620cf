"""Where the model's embedding rows and feature products come from when this process holds every row.

:class:`FeatureTables` is the single-process feature source of :class:`~lgmrec_dist.model.LGMRec` and of
the sampled mode with replicated tables; ``distributed.tables.ShardedFeatureTables`` is the same
interface over row-sharded tables. The interface (all products are differentiable in the weight):

* what the model reads of the rows held in this process (local rows): ``held_ego(model)`` ([E_U ; E_I]),
  ``held_mge(m, w)`` and ``held_mge_rows(m, rows, w)`` (F^m = Y_m·W_m, MGE), ``held_item_logits(m, v)``
  (the hyperedge logits X_m·V_m, GHE);
* what the sampled step reads of any node (node ids): ``lookup(model, user_ids, item_ids, leaves)``, rows of
  E_U, E_I (with ``leaves`` a list, gathered into leaf tensors recorded there for a row optimizer);
  ``mge_rows(m, node_ids, w)``; ``item_logits(m, item_ids, v)``, ``user_logits(m, user_ids, v)``, the
  hyperedge logits X_m·V_m and (R·X_m)·V_m rows;
* ``x``, ``y``, ``rx`` (the tables held here, by modality) and ``nbytes()``.
"""
from __future__ import annotations

import torch

from lgmrec_dist.graph import Graph
from lgmrec_dist.model.features import const_rows_matmul, held_matmul, rows_matmul, user_feature_sums
from lgmrec_dist.model.mge import mge_direct, mge_inputs


class FeatureTables:
    """The frozen feature tables of every node held in this process: X_m (items), Y_m = Ĝ^K [P·X_m ; X_m]
    (``precompute_mge``; else F^m is computed as the spec writes it) and, for the sampled mode, R·X_m."""

    def __init__(self, graph: Graph, features: dict[str, torch.Tensor], n_mm_layers: int,
                 dtype: torch.dtype = torch.float32, precompute_mge: bool = True):
        self.graph, self.n_mm_layers = graph, n_mm_layers
        self.x = features
        self.y = {m: mge_inputs(graph, x, n_mm_layers, dtype=dtype) for m, x in features.items()} if precompute_mge else {}
        self.rx: dict[str, torch.Tensor] = {}

    def add_user_sums(self, dtype: torch.dtype = torch.float32) -> None:
        """Hold R·X_m too (the user hyperedge logits of the sampled mode, ``user_feature_table``)."""
        self.rx = {m: user_feature_sums(self.graph, x, dtype=dtype) for m, x in self.x.items()}

    def held_ego(self, model) -> torch.Tensor:
        return torch.cat([model.user_embedding, model.item_embedding])

    def lookup(self, model, user_ids: torch.Tensor, item_ids: torch.Tensor, leaves: list | None = None):
        """(E_U[user_ids], E_I[item_ids]): differentiable gathers (dense gradients) when ``leaves`` is None,
        else leaf copies appended to ``leaves`` as (table name, rows, leaf) for ``RowAdam``."""
        if leaves is None:
            return model.user_embedding.index_select(0, user_ids), model.item_embedding.index_select(0, item_ids)
        u = model.user_embedding.detach().index_select(0, user_ids).requires_grad_()
        i = model.item_embedding.detach().index_select(0, item_ids).requires_grad_()
        leaves += [("user_embedding", user_ids, u), ("item_embedding", item_ids, i)]
        return u, i

    def mge_rows(self, m: str, node_ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.y:
            return rows_matmul(self.y[m], node_ids, w)  # no gathered copy of the rows (docs/model.md)
        return mge_direct(self.graph, self.x[m], w, self.n_mm_layers)[node_ids]

    held_mge_rows = mge_rows     # every row is held here: local rows are node ids

    def held_mge(self, m: str, w: torch.Tensor) -> torch.Tensor:
        if self.y:
            return held_matmul(self.y[m], w)
        return mge_direct(self.graph, self.x[m], w, self.n_mm_layers)

    def item_logits(self, m: str, item_ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return rows_matmul(self.x[m], item_ids, v)       # no gathered copy of the rows, as mge_rows

    def user_logits(self, m: str, user_ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return rows_matmul(self.rx[m], user_ids, v)

    def held_item_logits(self, m: str, v: torch.Tensor) -> torch.Tensor:
        return const_rows_matmul(self.x[m], v)

    def nbytes(self) -> dict:
        nb = lambda ts: sum(t.numel() * t.element_size() for t in ts.values())  # noqa: E731
        return {"features_X": nb(self.x), "mge_inputs_Y": nb(self.y), "user_feature_sums_RX": nb(self.rx)}
