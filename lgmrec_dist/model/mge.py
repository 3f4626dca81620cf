"""Modality graph embedding, MGE (docs/model.md §1.5), and its precomputed form.

Spec form: F_I = X·W, F_U = P·F_I (P = row-normalised R: mean of the user's items), F = Ĝ^K [F_U ; F_I]
(last layer only). Everything is linear in W, so F = (Ĝ^K [P·X ; X])·W. ``mge_inputs`` computes the
N × d_m matrix Y = Ĝ^K [P·X ; X] once per run; a training step then needs only its batch rows Y[rows]·W,
whose cost does not grow with the graph (docs/model.md, "speed rewrites").
"""
from __future__ import annotations

import torch

from lgmrec_dist.graph import Graph, csr_mm, spmm
from lgmrec_dist.model.features import column_chunk, const_rows_matmul


def mge_direct(graph: Graph, x: torch.Tensor, w: torch.Tensor, n_layers: int) -> torch.Tensor:
    """F^m for all N nodes, computed as the spec writes it."""
    f_i = const_rows_matmul(x, w)
    f = torch.cat([spmm(graph.P, graph.P_t, f_i), f_i])
    for _ in range(n_layers):
        f = graph.propagate(f)
    return f


@torch.no_grad()
def mge_inputs(graph: Graph, x: torch.Tensor, n_layers: int, chunk: int | None = None,
               dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Y = Ĝ^K [P·X ; X] (N × d_m), or its ``rows``, built in column chunks (computed in float32, held in
    ``dtype``) so the peak stays near the size of the result. The chunks are at least 64 columns wide (one
    pass of ``csr_spmm.c`` over each row's entries) and go back and forth between two reused buffers."""
    n, n_users = graph.num_nodes, graph.num_users
    out = torch.empty(n if rows is None else len(rows), x.shape[1], dtype=dtype, device=x.device)
    chunk = max(1, min(chunk or column_chunk(n, least=64), x.shape[1]))
    bufs = [torch.empty(n * chunk, device=x.device) for _ in range(2)]
    for c in range(0, x.shape[1], chunk):
        w = min(chunk, x.shape[1] - c)
        y, spare = (b[:n * w].view(n, w) for b in bufs)
        y[n_users:] = x[:, c:c + w]
        csr_mm(graph.P, y[n_users:], out=y[:n_users])
        for _ in range(n_layers):
            y, spare = csr_mm(graph.norm_adj, y, out=spare), y
        out[:, c:c + w] = y if rows is None else y[rows]
    return out
