"""Low-rank log-sum-exp of the contrastive denominators (docs/model.md, "Speed rewrites", item 3).

lse_r = log Σ_s exp(q_r · k_s) for q (R × A) and k (S × A), A = hyper_num: the InfoNCE denominators of
every anchor against every user or item (``losses.infonce_lowrank``). The R × S logits are the step's
largest object (Baby: 1,900 × 19,445 per view) but they have rank A, so they need not exist. Three forms of
one function, equal in value and in both gradients to float32 rounding (tests/test_lowrank_lse.py):

* ``fused`` (CPU, float32; the default there): the C kernel ``lowrank_lse.c``, compiled at first use
  (``lgmrec_dist.native``). Logits are recomputed from the factors one cache-sized tile at a time, with an
  online maximum; the backward recomputes them again. Its reduction order does not depend on the thread
  count, so results are bit-identical run to run and with any number of threads.
* ``compiled`` (CUDA; the default there): the same loops written as broadcast products and reductions,
  which ``torch.compile`` fuses into reduction kernels that never store the logits.
* ``direct``: a rank-A ``mm`` into a block of rows × S logits, then ``torch.logsumexp``; the backward
  rebuilds each block. Memory O(block · S). The fallback where the others are unavailable, and the
  yardstick the others are tested against.

``LGMREC_LSE=direct|fused|compiled`` (or :func:`use_form`) forces one form, e.g. to time it.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from lgmrec_dist import native

log = logging.getLogger("lgmrec")

FORMS = ("fused", "compiled", "direct")
SOURCE = Path(__file__).with_name("lowrank_lse.c")
_forced: list[str] = []


# ---------------------------------------------------------------------- direct form
class _Direct(torch.autograd.Function):
    """lse in blocks of rows: the block's logits by ``mm``, then ``torch.logsumexp``; backward rebuilds them."""

    @staticmethod
    def forward(ctx, q, k, chunk):
        lse = torch.empty(q.shape[0], dtype=q.dtype, device=q.device)
        for c in range(0, q.shape[0], chunk):
            lse[c:c + chunk] = torch.logsumexp(q[c:c + chunk] @ k.t(), dim=1)
        ctx.save_for_backward(q, k, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad):
        q, k, lse = ctx.saved_tensors
        return (*_direct_backward(q, k, lse, grad, ctx.chunk), None)


def _direct_backward(q, k, lse, grad, chunk):
    grad_q, grad_k = torch.empty_like(q), torch.zeros_like(k)
    for c in range(0, q.shape[0], chunk):
        p = q[c:c + chunk] @ k.t()
        p.sub_(lse[c:c + chunk, None]).exp_().mul_(grad[c:c + chunk, None])
        grad_q[c:c + chunk] = p @ k
        grad_k.addmm_(p.t(), q[c:c + chunk])
    return grad_q, grad_k


def _rows_per_chunk(k: torch.Tensor, max_elements: int) -> int:
    return max(1, max_elements // max(1, k.shape[0]))


def lowrank_logsumexp_direct(q: torch.Tensor, k: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    return _Direct.apply(q, k, _rows_per_chunk(k, max_elements))


# ---------------------------------------------------------------------- fused CPU kernel
def _saved(ctx, q, k, lse, max_elements):
    """Keep what a backward that recomputes the logits needs: the factors and lse."""
    ctx.save_for_backward(q, k, lse)
    ctx.max_elements = max_elements
    return lse


def _kernel() -> ctypes.CDLL | None:
    P, I64, I32 = native.PTR, native.I64, native.I32
    return native.load(SOURCE, {"lse_forward": ([P, P, I64, I64, I64, P, I32], None),
                                "lse_backward": ([P, P, P, P, I64, I64, I64, I64, P, P, P, P, I32], None),
                                "lse_segment": (None, I64)})


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, max_elements):
        lib = _kernel()
        q, kt = q.contiguous(), k.t().contiguous()  # kt: A × S, so a tile of columns is contiguous per a
        (b, a), n = q.shape, k.shape[0]
        lse = q.new_empty(b)
        lib.lse_forward(q.data_ptr(), kt.data_ptr(), b, n, a, lse.data_ptr(), torch.get_num_threads())
        return _saved(ctx, q, kt, lse, max_elements)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        lib = _kernel()
        q, kt, lse = ctx.saved_tensors
        (b, a), n = q.shape, kt.shape[1]
        # row blocks: as few as keep the partial gradients of k (blocks × A × S) within max_elements;
        # the block size depends on the sizes only, never on the thread count (fixed reduction order)
        blocks = max(1, min(math.ceil(b / 64), ctx.max_elements // max(1, a * n)))
        row_block = math.ceil(b / blocks)
        blocks = math.ceil(b / row_block)
        segments = math.ceil(n / lib.lse_segment())
        grad = grad.contiguous()
        gq, gkt = torch.empty_like(q), torch.empty_like(kt)
        gq_part, gk_part = q.new_empty(segments, b, a), q.new_empty(blocks, a, n)
        lib.lse_backward(q.data_ptr(), kt.data_ptr(), lse.data_ptr(), grad.data_ptr(), b, n, a, row_block,
                         gq.data_ptr(), gkt.data_ptr(), gq_part.data_ptr(), gk_part.data_ptr(),
                         torch.get_num_threads())
        return gq, gkt.t(), None


# ---------------------------------------------------------------------- torch.compile form (CUDA)
def _logits(q, k):
    """q·kᵀ as A broadcast products: pointwise, so inductor fuses it into the reduction that reads it."""
    out = q[:, :1] * k[:, 0]
    for a in range(1, q.shape[1]):
        out = out + q[:, a:a + 1] * k[:, a]
    return out


def pointwise_forward(q, k):
    return torch.logsumexp(_logits(q, k), dim=1)


def pointwise_backward(q, k, lse, grad):
    p = torch.exp(_logits(q, k) - lse[:, None]) * grad[:, None]
    grad_q = torch.stack([(p * k[:, a]).sum(1) for a in range(q.shape[1])], dim=1)
    grad_k = torch.stack([(p * q[:, a:a + 1]).sum(0) for a in range(q.shape[1])], dim=1)
    return grad_q, grad_k


_compiled: dict[str, object] = {}


def _compiled_fns():
    if not _compiled:
        _compiled["forward"] = torch.compile(pointwise_forward, dynamic=True)
        _compiled["backward"] = torch.compile(pointwise_backward, dynamic=True)
    return _compiled["forward"], _compiled["backward"]


class _Compiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, max_elements):
        forward, _ = _compiled_fns()
        return _saved(ctx, q, k, forward(q, k), max_elements)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, lse = ctx.saved_tensors
        if "compiled-backward" not in _unavailable:
            try:
                _, backward = _compiled_fns()
                return (*backward(q, k, lse, grad.contiguous()), None)
            except Exception as e:  # noqa: BLE001 - as in lowrank_logsumexp
                log.warning("torch.compile backward of the low-rank log-sum-exp unavailable, using the direct "
                            "form: %s", e)
                _unavailable.add("compiled-backward")
        return (*_direct_backward(q, k, lse, grad, _rows_per_chunk(k, ctx.max_elements)), None)


# ---------------------------------------------------------------------- dispatch
_unavailable: set[str] = set()


@contextlib.contextmanager
def use_form(form: str):
    """Force one form inside the block (benchmarks, tests)."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    _forced.append(form)
    try:
        yield
    finally:
        _forced.pop()


def form_for(q: torch.Tensor, k: torch.Tensor) -> str:
    """The form :func:`lowrank_logsumexp` runs for these inputs."""
    want = _forced[-1] if _forced else os.environ.get("LGMREC_LSE", "auto")
    if want not in FORMS and want != "auto":
        raise ValueError(f"LGMREC_LSE: expected auto, {', '.join(FORMS)}; got {want!r}")
    if want == "direct" or q.shape[0] == 0 or k.shape[0] == 0:
        return "direct"
    if want == "auto":
        want = "compiled" if q.is_cuda else "fused"
    if want == "fused" and not (q.device.type == k.device.type == "cpu" and q.dtype == k.dtype == torch.float32):
        return "direct"
    if want in _unavailable or (want == "fused" and _kernel() is None):
        return "direct"
    return want


def lowrank_logsumexp(q: torch.Tensor, k: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """lse_r = log Σ_s exp(q_r · k_s), shape (R,); temporaries stay within ~``max_elements`` floats."""
    form = form_for(q, k)
    if form == "fused":
        return _Fused.apply(q, k, max_elements)
    if form == "compiled":
        try:
            return _Compiled.apply(q, k, max_elements)
        except Exception as e:  # noqa: BLE001 - no Triton / no C++ toolchain for inductor: fall back for good
            log.warning("torch.compile form of the low-rank log-sum-exp unavailable, using the direct form: %s", e)
            _unavailable.add("compiled")
    return lowrank_logsumexp_direct(q, k, max_elements)
