"""Frozen feature tables (X_m, Y_m = Ĝ^K [P·X_m ; X_m], R·X_m): their products with trained weights, and
the chunked precomputation of R·X_m (Y_m's is ``mge.mge_inputs``).

The tables never get gradients, only the weights (W_m of MGE, §1.5; V_m of the hyperedge logits, §1.6).
Two things follow, used by the exact and the sampled mode alike:

* the tables may be held in 16 bits (``feature_dtype``, docs/sampled.md "Limits"): rows are turned into
  float32 as they are multiplied, a chunk at a time, never as a full float32 copy;
* the weight's gradient is computed as (gradᵀ·rows)ᵀ: on CPU, MKL runs the rowsᵀ·grad that autograd
  issues for a d_m × A weight (A = 4) 10-15× slower than this equal form (4096 × 4700 × 4: ~60-90 ms
  instead of ~6 ms);
* the gradient's subnormal entries are flushed to zero before that product (:func:`flush_subnormals`);
* a product with a narrow weight (V_m: A columns) runs in the C kernel ``narrow_matmul.c`` on CPU
  (:func:`narrow_matmul`), at the speed the table streams from memory;
* the other products (with W_m, and every weight gradient) go through oneDNN's float32 GEMM on CPU
  (:func:`linear`): on the AMD development machine (AVX-512) MKL's sgemm ran them 1.6-2.9× slower.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from lgmrec_dist import native
from lgmrec_dist.graph import Graph, csr_mm

HELD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def flush_subnormals(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its subnormal entries (below the smallest normal float) set to zero.

    The gradient of the hyperedge logits Z = X·V comes through a Gumbel-softmax at τ = 0.2 and holds
    subnormal entries; every multiply by one costs the CPU a microcode assist, which made MKL's Gᵀ·X
    (Baby, image: 4 × 7,050 × 4,096) 18 ms instead of 6-8 ms. A subnormal term (< 1.2e-38) changes no
    sum it is added to unless that sum is itself subnormal."""
    return t.masked_fill(t.abs() < torch.finfo(t.dtype).tiny, 0.0)


NARROW = 16  # the most columns of w that narrow_matmul.c takes


def _narrow_kernel() -> ctypes.CDLL | None:
    P, I64 = native.PTR, native.I64
    return native.load(Path(__file__).with_name("narrow_matmul.c"),
                       {"narrow_forward": ([P, I64, I64, P, I64, P, native.I32], None)})


def narrow_matmul(rows: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``rows @ w`` (no autograd). For float32 CPU tensors and a w of at most ``NARROW`` columns, the C
    kernel: each entry a dot product in an order fixed by the sizes (bit-identical with any thread count);
    otherwise, or with ``fused=False`` or no C compiler, ``torch.mm``."""
    lib = None
    if (fused and rows.device.type == w.device.type == "cpu" and rows.dtype == w.dtype == torch.float32
            and rows.dim() == 2 and 0 < w.shape[1] <= NARROW):
        lib = _narrow_kernel()
    if lib is None:
        return rows @ w
    if rows.shape[1] != w.shape[0]:
        raise ValueError(f"narrow_matmul: rows are {tuple(rows.shape)} but w is {tuple(w.shape)}")
    rows, a = rows.contiguous(), w.shape[1]
    a_pad = -(-a // 4) * 4  # the kernel's column group (GROUP): padded with zero columns
    wt = w.new_zeros(a_pad, w.shape[0])
    wt[:a] = w.t()
    z = rows.new_empty(rows.shape[0], a_pad)
    lib.narrow_forward(rows.data_ptr(), rows.shape[0], rows.shape[1], wt.data_ptr(), a_pad, z.data_ptr(),
                       torch.get_num_threads())
    return z if a_pad == a else z[:, :a].contiguous()


# oneDNN's fused linear op (what inductor's CPU code calls); None in a torch built without oneDNN
_ONEDNN_LINEAR = (getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available()
                  else None)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ (no autograd; ``torch.nn.functional.linear``'s layout). For float32 CPU tensors through
    oneDNN's GEMM rather than MKL's (``torch.mm``): on the development machine (AMD EPYC with AVX-512,
    2 threads; MKL's sgemm reached ~130 GFLOP/s there, oneDNN's ~280) 1,024 × 4,096 rows times a
    4,096 × 64 weight took 2.0× less time, the weight's gradient (64 × 1,024 times 1,024 × 4,096) 1.6× less,
    a whole 70,500-row table 2.9× less. Elsewhere (GPU, other dtypes, a torch without oneDNN) ``torch.mm``.
    Both are float32 GEMMs: the values agree to rounding (sums in another order), and each is
    deterministic for a given shape and thread count."""
    if (_ONEDNN_LINEAR is not None and x.device.type == weight.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and x.shape[0] and weight.shape[0] and x.shape[1]):
        return _ONEDNN_LINEAR(x, weight, None, "none", [], "")
    return x @ weight.t()


def weight_product(w: torch.Tensor):
    """rows -> rows @ w (no autograd) for a trained weight: the narrow kernel for V_m (at most ``NARROW``
    columns), else :func:`linear` with wᵀ made once (a caller multiplying many blocks reuses it)."""
    if w.shape[1] <= NARROW:
        return lambda rows: narrow_matmul(rows, w)
    w_t = w.t().contiguous()
    return lambda rows: linear(rows, w_t)


def weight_gradient(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """gradᵀ·rows (A or d × d_m): the weight's gradient, transposed, for the fast form (module docstring);
    subnormal entries of ``grad`` flushed first."""
    return linear(flush_subnormals(grad).t(), rows.t())


class _ConstRowsMatmul(torch.autograd.Function):
    """``rows @ w`` for constant rows, gradient for w only."""

    @staticmethod
    def forward(ctx, rows, w):
        ctx.save_for_backward(rows)
        return weight_product(w)(rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return None, weight_gradient(grad, rows).t()


def const_rows_matmul(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows @ w for float32 rows of a frozen table, with the fast weight gradient."""
    return _ConstRowsMatmul.apply(rows, w)


def held_matmul(y: torch.Tensor, w: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """y @ w for a frozen table (or rows of it) held in any float dtype."""
    if y.dtype == torch.float32:
        return const_rows_matmul(y, w)
    return torch.cat([const_rows_matmul(y[i:i + chunk].float(), w) for i in range(0, len(y), chunk)])


class _RowsMatmul(torch.autograd.Function):
    """``table[rows] @ w`` for a frozen table, gradient for w only, gathering ``chunk`` rows at a time into
    one reused buffer: the gathered rows (Baby, image: ~4,700 × 4096 floats, 77 MB) are never stored whole.
    Above 32 MB glibc maps every such temporary afresh, and touching its pages cost more than the copy
    itself; a 16 MB block is reused from the heap and is still in cache when the product reads it. The
    backward gathers again rather than keeping the rows. Chunks are summed in order (deterministic)."""

    @staticmethod
    def forward(ctx, table, rows, w, chunk):
        out = w.new_empty(len(rows), w.shape[1])
        product = weight_product(w)      # the same values as const_rows_matmul's
        for c, block in _gathered(table, rows, chunk):
            out[c:c + len(block)] = product(block)
        ctx.save_for_backward(table, rows)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        table, rows = ctx.saved_tensors
        grad_wt = grad.new_zeros(grad.shape[1], table.shape[1])
        for c, block in _gathered(table, rows, ctx.chunk):
            grad_wt += weight_gradient(grad[c:c + len(block)], block)  # (gradᵀ·rows)ᵀ, as _ConstRowsMatmul
        return None, None, grad_wt.t(), None


def _gathered(table: torch.Tensor, rows: torch.Tensor, chunk: int):
    """(offset, float32 rows table[rows[offset:offset + chunk]]) blocks, in one reused buffer."""
    buf = torch.empty(min(chunk, len(rows)), table.shape[1], dtype=table.dtype, device=table.device)
    for c in range(0, len(rows), chunk):
        block = buf[:len(rows[c:c + chunk])]
        torch.index_select(table, 0, rows[c:c + chunk], out=block)
        yield c, block if block.dtype == torch.float32 else block.float()


def rows_matmul(table: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """table[rows] @ w for a frozen table held in any float dtype (``feature_dtype``), without the gathered
    copy of the rows."""
    return _RowsMatmul.apply(table, rows, w, chunk)


def column_chunk(rows: int, budget: int = 256 << 20, least: int = 16) -> int:
    """Columns per chunk so that one float32 chunk of ``rows`` rows stays near ``budget`` bytes (and at least
    ``least`` columns): the temporaries of a chunked precomputation then stay small next to the table
    being built."""
    return max(least, min(512, budget // (4 * max(rows, 1))))


@torch.no_grad()
def user_feature_sums(graph: Graph, x: torch.Tensor, chunk: int | None = None,
                      dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
    """R·X (|U| × d_m), or its ``rows``: the sum of each user's training items' features, built in column
    chunks (held in ``dtype``, ``feature_dtype``)."""
    out = torch.empty(graph.num_users if rows is None else len(rows), x.shape[1], dtype=dtype, device=x.device)
    chunk = chunk or column_chunk(graph.num_users)
    for c in range(0, x.shape[1], chunk):
        sums = csr_mm(graph.R, x[:, c:c + chunk].contiguous())
        out[:, c:c + chunk] = sums if rows is None else sums[rows]
    return out

