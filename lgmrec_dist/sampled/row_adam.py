"""Lazy Adam on the touched rows of the embedding tables (``sparse_embeddings``, docs/sampled.md)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from lgmrec_dist import native


def _kernel():
    P, I64, F32 = native.PTR, native.I64, native.F32
    return native.load(Path(__file__).with_name("row_adam.c"),
                       {"row_adam": ([P, P, P, P, P, I64, I64, F32, F32, F32, F32, F32, F32, native.I32], None)})


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
        step_size, bias2_sqrt = self.lr / (1 - b1 ** st["step"]), math.sqrt(1 - b2 ** st["step"])
        m_all, v_all = st["exp_avg"], st["exp_avg_sq"]
        lib = None
        if (table.device.type == "cpu" and table.dtype == grad.dtype == torch.float32 and rows.dtype == torch.int64
                and table.is_contiguous()):
            lib = _kernel()
        if lib is not None:          # one pass over each row (row_adam.c)
            grad, rows = grad.contiguous(), rows.contiguous()
            lib.row_adam(table.data_ptr(), m_all.data_ptr(), v_all.data_ptr(), rows.data_ptr(), grad.data_ptr(),
                         len(rows), table.shape[1], 1 - b1, b2, 1 - b2, step_size, bias2_sqrt, self.eps,
                         torch.get_num_threads())
            return
        m = m_all.index_select(0, rows).mul_(b1).add_(grad, alpha=1 - b1)
        v = v_all.index_select(0, rows).mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_all.index_copy_(0, rows, m)
        v_all.index_copy_(0, rows, v)
        denom = v.sqrt().div_(bias2_sqrt).add_(self.eps)
        table.index_copy_(0, rows, table.index_select(0, rows) - step_size * m / denom)

    def state_dict(self) -> dict:
        return {name: dict(st) for name, st in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, st in state.items():
            dev = self.state[name]["exp_avg"].device
            self.state[name] = {"step": int(st["step"]), "exp_avg": st["exp_avg"].to(dev).clone(),
                                "exp_avg_sq": st["exp_avg_sq"].to(dev).clone()}
