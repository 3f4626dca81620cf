"""The fixed training graph of LGMRec (docs/model.md §1.3) as torch sparse CSR matrices.

Node numbering: users 0..|U|-1, items |U|..|U|+|I|-1 (N = |U| + |I|). Interactions are a set: duplicate
(u, i) training pairs count once everywhere (§1.3, item 1).
"""
from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lgmrec_dist import native
from lgmrec_dist.keys import pair_keys

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def interaction_dgl_graph(num_users: int, num_items: int, users: np.ndarray, items: np.ndarray):
    """The training interactions as a DGL graph (users 0..U-1, items U..U+I-1): each distinct (user, item)
    pair once in each direction — the neighbourhoods Ĝ normalises, for DGL's samplers and blocks."""
    import dgl
    keys = pair_keys(users, items, num_items)
    u, i = keys // num_items, keys % num_items + num_users
    return dgl.graph((np.concatenate([u, i]), np.concatenate([i, u])), num_nodes=num_users + num_items)


def row_major_order(rows: np.ndarray, col_keys: np.ndarray) -> np.ndarray:
    """The permutation that sorts entries by row, then by ``col_keys`` (non-negative integers), as one
    argsort of a combined int64 key (several times faster than ``np.lexsort`` on two keys)."""
    span = int(col_keys.max()) + 1 if len(col_keys) else 1
    if len(rows) and int(rows.max()) >= np.iinfo(np.int64).max // span:
        raise OverflowError(f"row_major_order: {int(rows.max())} rows × {span} column keys overflow int64")
    key = np.asarray(rows, np.int64) * span
    key += col_keys                                      # in place: one key array, not two
    return np.argsort(key)


def csr(rows: np.ndarray, cols: np.ndarray, vals, shape, col_ids: np.ndarray | None = None):
    """A CSR matrix whose entries within a row are ordered by column, or by ``col_ids`` (the columns' node
    ids) where the columns are local indices: a row then sums its terms in node-id order wherever it is
    computed (whole graph, DGL block, a rank's local graph), so equal rows are equal bit for bit.
    ``vals`` a tuple of value arrays: a tuple of matrices, one each, sharing one pair of index arrays (R and
    P have the same nonzeros)."""
    order = row_major_order(rows, cols if col_ids is None else col_ids)
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])     # row counts: any order
    # gathered once each, in their final dtypes (the cast is per entry, so its place does not change a value)
    indptr, cols = torch.from_numpy(indptr), torch.from_numpy(cols[order].astype(np.int64, copy=False))
    mats = csr_sharing(indptr, cols, tuple(np.asarray(v, np.float32)[order]
                                           for v in (vals if isinstance(vals, tuple) else (vals,))), shape)
    return mats if isinstance(vals, tuple) else mats[0]


def csr_sharing(indptr: torch.Tensor, cols: torch.Tensor, vals: tuple, shape) -> tuple:
    """CSR matrices of the same nonzeros (``indptr``, ``cols``, already in row-major order), one per value
    array of ``vals`` (float32 on the indices' device): R and P hold one pair of index arrays."""
    return tuple(torch.sparse_csr_tensor(indptr, cols, torch.from_numpy(np.asarray(v, np.float32)).to(cols.device),
                                         size=shape, check_invariants=False) for v in vals)


def _kernel() -> ctypes.CDLL | None:
    P, I64 = native.PTR, native.I64
    return native.load(Path(__file__).with_name("csr_spmm.c"),
                       {"csr_spmm": ([P, P, P, I64, P, I64, P, native.I32], None)})


def csr_mm(a: torch.Tensor, x: torch.Tensor, fused: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ x`` for a CSR matrix ``a`` and a dense ``x`` (docs/model.md §7.2, rewrite 6).

    On CPU in float32 with int64 indices (how :func:`csr` builds them) the C kernel ``csr_spmm.c``
    writes each output row once, summing the row's entries in their stored order (bit-identical with any
    thread count); elsewhere, or with ``fused=False`` or no C compiler, ``torch.sparse.mm``. ``out`` (a
    contiguous tensor of the result's shape) receives the result instead of a new tensor: a chunked
    precomputation then reuses its buffers rather than paying fresh pages for each product."""
    lib = None
    if (fused and a.layout == torch.sparse_csr and a.device.type == x.device.type == "cpu"
            and a.dtype == x.dtype == torch.float32 and x.dim() == 2 and a.crow_indices().dtype == torch.int64):
        lib = _kernel()
    if lib is None:
        return torch.sparse.mm(a, x) if out is None else out.copy_(torch.sparse.mm(a, x))
    if x.shape[0] != a.shape[1]:
        raise ValueError(f"csr_mm: a is {tuple(a.shape)} but x has {x.shape[0]} rows")
    x = x.contiguous()
    indptr, indices, values = a.crow_indices(), a.col_indices(), a.values()
    if out is None:
        out = x.new_empty(a.shape[0], x.shape[1])
    elif out.shape != (a.shape[0], x.shape[1]) or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"csr_mm: out must be a contiguous {x.dtype} tensor of shape {(a.shape[0], x.shape[1])}")
    lib.csr_spmm(indptr.data_ptr(), indices.data_ptr(), values.data_ptr(), a.shape[0], x.data_ptr(), x.shape[1],
                 out.data_ptr(), torch.get_num_threads())
    return out


class _SpMM(torch.autograd.Function):
    """``A @ X`` for a constant sparse A whose transpose is given, so backward is one more CSR product
    (deterministic, unlike the scatter-add backward of COO products)."""

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        return csr_mm(a, x)

    @staticmethod
    def backward(ctx, grad):
        return None, None, csr_mm(ctx.a_t, grad)


def spmm(a: torch.Tensor, a_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _SpMM.apply(a, a_t, x)


@dataclass
class Graph:
    num_users: int
    num_items: int
    train_users: np.ndarray   # unique training pairs, sorted by (user, item)
    train_items: np.ndarray
    deg: torch.Tensor         # distinct neighbours per node, shape (N,)
    norm_adj: torch.Tensor    # Ĝ = D^-1/2 G D^-1/2, symmetric, (N, N)
    R: torch.Tensor           # binary |U| x |I|
    R_t: torch.Tensor         # its transpose
    P: torch.Tensor           # row-normalised R (mean of a user's items), |U| x |I|
    P_t: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        """Ĝ · x (Ĝ is symmetric, so it is its own transpose in backward)."""
        return spmm(self.norm_adj, self.norm_adj, x)

    def user_sums(self, x_items: torch.Tensor) -> torch.Tensor:
        """R · x: per user, the sum of its training items' rows."""
        return spmm(self.R, self.R_t, x_items)

    def to(self, device) -> "Graph":
        move = lambda t: t.to(device)  # noqa: E731
        return Graph(self.num_users, self.num_items, self.train_users, self.train_items, move(self.deg),
                     move(self.norm_adj), move(self.R), move(self.R_t), move(self.P), move(self.P_t))


def graph_bytes(graph) -> int:
    """Bytes of the CSR matrices of a graph (whole, or a rank's ``distributed.sharded.LocalGraph``)."""
    mats = [getattr(graph, k) for k in ("norm_adj", "norm_adj_t", "R", "R_t", "P", "P_t") if hasattr(graph, k)]
    # each storage once: R and P share their index arrays, and R's columns are a part of Ĝ's
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for a in mats for t in (a.values(), a.col_indices(), a.crow_indices())}
    return sum(storages.values())


def build_graph(num_users: int, num_items: int, users: np.ndarray, items: np.ndarray) -> Graph:
    """Build Ĝ, R and P from the training pairs (§1.3): deg = distinct neighbours, D = diag(deg + 1e-7)."""
    keys = pair_keys(users, items, num_items)
    u, i = keys // num_items, keys % num_items
    n = num_users + num_items
    deg_u = np.bincount(u, minlength=num_users).astype(np.float64)
    deg_i = np.bincount(i, minlength=num_items).astype(np.float64)
    deg = np.concatenate([deg_u, deg_i])
    d_inv_sqrt = 1.0 / np.sqrt(deg + 1e-7)
    w = d_inv_sqrt[u] * d_inv_sqrt[num_users + i]
    rows = np.concatenate([u, num_users + i])
    cols = np.concatenate([num_users + i, u])
    norm_adj = csr(rows, cols, np.concatenate([w, w]), (n, n))
    ones = np.ones(len(u), np.float64)
    mean_w = 1.0 / (deg_u[u] + 1e-7)  # users with no training item keep a zero row
    r, p = csr(u, i, (ones, mean_w), (num_users, num_items))
    r_t, p_t = csr(i, u, (ones, mean_w), (num_items, num_users))
    return Graph(num_users, num_items, u, i, torch.from_numpy(deg.astype(np.float32)), norm_adj, r, r_t, p, p_t)
