"""Every global reduction of the distributed engines, in one place: sums of partial tensors inside the
loss (autograd-aware), the gradient sum of replicated parameters, the step's loss terms and the
evaluation metrics (docs/distributed.md, "Where each thing happens").

With one process (``torch.distributed`` not initialised, or a group of one) each of them is the identity,
so a caller never needs a separate single-process branch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn

from lgmrec_dist.distributed.exchange import CommStats
from lgmrec_dist.evaluation import finalize

TERMS = ("loss", "bpr", "hcl", "reg")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _count_ring(t: torch.Tensor, mirrored: bool = False) -> None:
    """A ring all-reduce's payload of ``t``; twice with ``mirrored`` (an autograd all-reduce's backward)."""
    world = world_size()
    CommStats.add(2 * (world - 1) * t.numel() * t.element_size() // world, t if mirrored else None)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Autograd-aware sum over ranks (its gradient is the sum of the ranks' gradients); counted."""
    if world_size() == 1:
        return t
    _count_ring(t, mirrored=True)
    return dnn.all_reduce(t)


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """In-place, non-differentiable sum over ranks; counted."""
    if world_size() > 1:
        _count_ring(t)
        dist.all_reduce(t)
    return t


def sync_gradients(params) -> None:
    """Sum the gradients of replicated parameters over ranks (after backward, before the optimizer).

    Each rank's loss is its share of the global loss, so the global gradient is the sum of the ranks'
    gradients, not their mean. One flat all-reduce issued after the backward pass (docs/distributed.md,
    "Dense parameters"). Parameters without a gradient are skipped (the same on every rank)."""
    params = [p for p in params if p.grad is not None]
    if world_size() == 1 or not params:
        return
    flat = all_reduce_(torch.cat([p.grad.reshape(-1) for p in params]))
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def replicate(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s parameters held by every rank, their gradients summed during backward by DDP (bucketed,
    overlapped with the backward pass); call the returned module once per step, before the loss, to start
    the step's reduction. With one process, ``module`` itself.

    Each rank's loss is its share of the global loss, so the global gradient is the sum over ranks, while
    DDP's C++ reduction takes the mean: each rank's gradient is scaled by P on its way into DDP (a tensor
    hook on the backward thread). Not a Python communication hook: its future callbacks run on gloo's
    threads, and one waiting for the GIL while the reducer was destroyed at exit deadlocked a rank
    (docs/distributed.md, "Gradients")."""
    world = world_size()
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel(module, broadcast_buffers=False)

    def to_sum(grad: torch.Tensor) -> torch.Tensor:
        _count_ring(grad)
        return grad * world

    for p in module.parameters():
        p.register_hook(to_sum)
    return ddp


class DenseParams(torch.nn.Module):
    """The replicated parameters of a model (W_m, V_m), as one module for DDP."""

    def __init__(self, proj: torch.nn.ParameterDict, hyper: torch.nn.ParameterDict):
        super().__init__()
        self.proj, self.hyper = proj, hyper

    def forward(self):
        return self.proj, self.hyper


def replicate_dense(model) -> torch.nn.Module | None:
    """:func:`replicate` of ``model``'s W_m and V_m, or None when there are none or one process."""
    if world_size() == 1 or not model.dense_parameters():
        return None
    return replicate(DenseParams(model.proj, model.hyper))


def global_terms(terms: dict) -> dict[str, float]:
    """The step's loss terms summed over ranks (each rank holds its share), as floats."""
    values = torch.stack([terms[k].detach() for k in TERMS])
    if world_size() > 1:
        dist.all_reduce(values)
    return dict(zip(TERMS, values.tolist()))


def global_metrics(sums: dict, count: int, device) -> dict:
    """Metric sums and user counts of the ranks' users added, then the means (``evaluation.finalize``)."""
    if world_size() == 1:
        return finalize(sums, count)
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return finalize(dict(zip(keys, t[:-1].tolist())), int(t[-1]))
