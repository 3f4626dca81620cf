"""Products of the frozen feature tables (X_m, Y_m = Ĝ^K [P·X_m ; X_m], R·X_m) with trained weights.

The tables never get gradients, only the weights (W_m of MGE, §1.5; V_m of the hyperedge logits, §1.6).
Two things follow, used by the exact and the sampled mode alike:

* the tables may be held in 16 bits (``feature_dtype``, docs/sampled.md "Limits"): rows are turned into
  float32 as they are multiplied, a chunk at a time, never as a full float32 copy;
* the weight's gradient is computed as (gradᵀ·rows)ᵀ: on CPU, MKL runs the rowsᵀ·grad that autograd
  issues for a d_m × A weight (A = 4) 10-15× slower than this equal form (4096 × 4700 × 4: ~60-90 ms
  instead of ~6 ms).
"""
from __future__ import annotations

import torch

HELD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _ConstRowsMatmul(torch.autograd.Function):
    """``rows @ w`` for constant rows, gradient for w only."""

    @staticmethod
    def forward(ctx, rows, w):
        ctx.save_for_backward(rows)
        return rows @ w

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return None, (grad.t() @ rows).t()


def const_rows_matmul(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows @ w for float32 rows of a frozen table, with the fast weight gradient."""
    return _ConstRowsMatmul.apply(rows, w)


def held_matmul(y: torch.Tensor, w: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """y @ w for a frozen table (or rows of it) held in any float dtype."""
    if y.dtype == torch.float32:
        return const_rows_matmul(y, w)
    return torch.cat([const_rows_matmul(y[i:i + chunk].float(), w) for i in range(0, len(y), chunk)])
