"""Global hypergraph embedding, GHE (docs/model.md §1.6).

Per modality m: item logits Z_I = X·V, user logits Z_U = R·Z_I (sum over the user's items, before any
softmax); Gumbel-softmax with τ = 0.2; one keep-rate dropout mask per dependency matrix per forward;
H layers of M = H̄_Iᵀ·Q, Q = H̄_I·M starting from the CGE item output; users get P = H̄_U·M of the last
layer. Every global embedding is (dependency row)·M with M of size A × d, so it has rank ≤ A: we keep
the factors (:class:`HyperEmbedding`) instead of the |U|×d and |I|×d products.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from lgmrec_dist import native
from lgmrec_dist.graph import Graph
from lgmrec_dist.model.features import const_rows_matmul


@dataclass
class HyperEmbedding:
    """G_U = h_user·message, G_I = h_item·message, without materialising them."""
    h_user: torch.Tensor    # H̄_U, |U| × A
    h_item: torch.Tensor    # H̄_I, |I| × A
    message: torch.Tensor   # M^(H), A × d

    def users(self, rows=None) -> torch.Tensor:
        return (self.h_user if rows is None else self.h_user[rows]) @ self.message

    def items(self, rows=None) -> torch.Tensor:
        return (self.h_item if rows is None else self.h_item[rows]) @ self.message

    def nodes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows in node numbering (users first, then items); all nodes when ``rows`` is None."""
        h = torch.cat([self.h_user, self.h_item])
        return (h if rows is None else h.index_select(0, rows)) @ self.message  # backward: see LGMRec.fuse


def dependencies(x: torch.Tensor, v: torch.Tensor, graph: Graph, tau: float, noise=None, masks=None,
                 keep_rate: float = 1.0):
    """Soft hyperedge assignments (H̄_I, H̄_U) of §1.6 items 1-3 on the whole graph."""
    return dependencies_from_logits(const_rows_matmul(x, v), graph, tau, noise, masks, keep_rate)


def dependencies_from_logits(z_item: torch.Tensor, graph: Graph, tau: float, noise=None, masks=None,
                             keep_rate: float = 1.0):
    """:func:`dependencies` from the item logits Z_I = X·V (user logits Z_U = R·Z_I)."""
    return assignments(z_item, graph.user_sums(z_item), tau, noise, masks, keep_rate)


def _kernel() -> ctypes.CDLL | None:
    P, I64, F32, I32 = native.PTR, native.I64, native.F32, native.I32
    return native.load(Path(__file__).with_name("assign.c"),
                       {"assign_forward": ([P, P, P, I64, I64, F32, F32, P, P, I32], None),
                        "assign_backward": ([P, P, P, I64, I64, F32, F32, P, I32], None)})


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Assign(torch.autograd.Function):
    """:func:`assign` in the C kernel ``assign.c``: one pass forward, one backward (gradient for z only)."""

    @staticmethod
    def forward(ctx, z, tau, noise, mask, keep_rate):
        z = z.contiguous()
        noise = None if noise is None else noise.contiguous()
        keep = None if mask is None else mask.contiguous().view(torch.uint8)
        p, h = torch.empty_like(z), torch.empty_like(z)
        _kernel().assign_forward(z.data_ptr(), _ptr(noise), _ptr(keep), z.shape[0], z.shape[1], tau, keep_rate,
                                 p.data_ptr(), h.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(p, keep)
        ctx.tau, ctx.keep_rate = tau, keep_rate
        return h

    @staticmethod
    def backward(ctx, grad):
        p, keep = ctx.saved_tensors
        grad, gz = grad.contiguous(), torch.empty_like(p)
        _kernel().assign_backward(p.data_ptr(), _ptr(keep), grad.data_ptr(), p.shape[0], p.shape[1], ctx.tau,
                                  ctx.keep_rate, gz.data_ptr(), torch.get_num_threads())
        return gz, None, None, None, None


def assign(z: torch.Tensor, tau: float, noise=None, mask=None, keep_rate: float = 1.0,
           fused: bool = True) -> torch.Tensor:
    """Gumbel-softmax and dropout of one side's logits (§1.6 items 2-3): ``noise`` the Gumbel noise or None
    for a deterministic softmax, ``mask`` the boolean keep mask or None for no dropout.

    On CPU in float32 the C kernel ``assign.c`` (one pass each way, subnormal assignments written as 0);
    elsewhere, or with ``fused=False`` or no C compiler, the torch form below."""
    if (fused and z.device.type == "cpu" and z.dtype == torch.float32 and z.dim() == 2 and z.shape[1] > 0
            and (noise is None or noise.dtype == torch.float32) and (mask is None or mask.dtype == torch.bool)
            and _kernel() is not None):
        return _Assign.apply(z, tau, noise, mask, keep_rate)
    if noise is not None:
        z = z + noise
    h = torch.softmax(z / tau, dim=1)
    return h if mask is None else h * mask / keep_rate


def assignments(z_item: torch.Tensor, z_user: torch.Tensor, tau: float, noise=None, masks=None,
                keep_rate: float = 1.0):
    """:func:`assign` of the item and the user logits.

    ``noise`` = (Gumbel noise for items, for users) or None for a deterministic softmax;
    ``masks`` = (keep masks for items, for users) as booleans, or None for no dropout.
    """
    noise, masks = noise or (None, None), masks or (None, None)
    return (assign(z_item, tau, noise[0], masks[0], keep_rate), assign(z_user, tau, noise[1], masks[1], keep_rate))


def hypergraph_propagate(h_item: torch.Tensor, h_user: torch.Tensor, q0: torch.Tensor,
                         n_layers: int, reduce=None) -> HyperEmbedding:
    """H hypergraph layers from Q^(0) = CGE item output (§1.6 item 4). No weights, no normalisation.

    With items sharded over ranks, ``reduce`` sums the partial messages H̄_Iᵀ·Q of the ranks' item rows
    (an autograd-aware all-reduce); every rank then holds the same A × d message.
    """
    q = q0
    for _ in range(n_layers):
        message = h_item.t() @ q
        if reduce is not None:
            message = reduce(message)
        q = h_item @ message
    return HyperEmbedding(h_user, h_item, message)
