"""Autograd-aware exchange of rows between ranks (halo rows of the graph, batch rows).

Every node has one owner rank and a local row there (:class:`Ownership`). A :class:`RowExchange` is
built once for a list of global node ids a rank needs; ``exchange(x_owned)`` returns those rows in that
order, fetched from their owners with one ``all_to_all_single``. Its backward sends the gradients back
to the owners and adds them into the owned rows (``torch.distributed.nn.functional``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn


class CommStats:
    """Bytes this rank sends to other ranks: every collective's payload, the id exchanges that plan them, and
    the backward pass's mirror of a differentiable one (its gradient goes back the way the rows came), so
    that what :meth:`take` returns after a step is everything the step sent."""
    sent = 0

    @classmethod
    def add(cls, nbytes: int, t: torch.Tensor | None = None) -> None:
        """``nbytes`` sent; twice when ``t`` (what was sent) will send its gradient back in backward."""
        mirrored = t is not None and t.requires_grad and torch.is_grad_enabled()
        cls.sent += int(nbytes) * (2 if mirrored else 1)

    @classmethod
    def take(cls) -> int:
        sent, cls.sent = cls.sent, 0
        return sent


class Ownership:
    """Owner rank of every node (users 0..U-1, then items U..U+I-1) and the local rows of this rank's nodes.

    The only per-node array is ``part``, the partition book itself (int32, not copied when it is one: 4 bytes
    a node on every rank); a node's local row at its owner is its position among that rank's sorted node
    ids, so this rank computes it for its own nodes only (:meth:`local`), which is all any caller asks."""

    def __init__(self, node_part: np.ndarray, rank: int, world_size: int):
        self.part = np.asarray(node_part, dtype=np.int32)
        if len(self.part) and (self.part.min() < 0 or self.part.max() >= world_size):
            raise ValueError(f"node partition has parts outside 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        self.owned = np.flatnonzero(self.part == rank)   # sorted global ids of this rank's nodes

    def local(self, ids) -> np.ndarray:
        """Local rows of nodes this rank owns (positions in ``owned``); other ids get meaningless rows."""
        return np.searchsorted(self.owned, np.asarray(ids, np.int64))

    @classmethod
    def contiguous(cls, num_users: int, num_items: int, rank: int, world_size: int) -> "Ownership":
        """Users and items each cut into P contiguous ranges (the default without prep partitions)."""
        part = np.concatenate([np.arange(num_users) * world_size // max(num_users, 1),
                               np.arange(num_items) * world_size // max(num_items, 1)])
        return cls(part, rank, world_size)


def comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_ids(send_lists: list[np.ndarray]) -> list[torch.Tensor]:
    """Send send_lists[q] to rank q; return what every rank sent to us (non-differentiable, CPU)."""
    dev = comm_device()
    counts = torch.tensor([len(a) for a in send_lists], dtype=torch.int64, device=dev)
    me = dist.get_rank()
    CommStats.add(8 * sum(len(a) + 1 for q, a in enumerate(send_lists) if q != me))   # the counts, then the ids
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts)
    send = torch.from_numpy(np.concatenate(send_lists).astype(np.int64)).to(dev)
    recv = torch.empty(int(recv_counts.sum()), dtype=torch.int64, device=dev)
    dist.all_to_all_single(recv, send, recv_counts.tolist(), counts.tolist())
    return [t.cpu() for t in torch.split(recv, recv_counts.tolist())]


class RowExchange:
    """Fetch the rows of global ids ``needed`` (order preserved) from the ranks that own them.

    On every rank, the tensor passed to the call holds the rows of ``source_ids`` (sorted global ids
    this rank owns; default: all its owned nodes). Building the plan costs one small id exchange.
    """

    def __init__(self, own: Ownership, needed: np.ndarray, source_ids: np.ndarray | None = None):
        needed = np.asarray(needed, dtype=np.int64)
        owners = own.part[needed]
        order = np.argsort(owners, kind="stable")
        self.recv_splits = np.bincount(owners, minlength=own.world_size).tolist()
        # rows arrive grouped by owner; `unsort` puts them back in the requested order
        self.unsort = torch.from_numpy(np.argsort(order, kind="stable"))
        requests = np.split(needed[order], np.cumsum(self.recv_splits)[:-1])
        asked_by = _exchange_ids(requests)                   # ids each rank needs from me
        self.send_splits = [len(a) for a in asked_by]
        asked = torch.cat(asked_by).numpy()
        rows = own.local(asked) if source_ids is None else np.searchsorted(source_ids, asked)
        if source_ids is not None and len(asked) and not np.array_equal(source_ids[np.minimum(rows, len(source_ids) - 1)], asked):
            raise ValueError("RowExchange: a rank asked for a row this rank does not hold")
        self.send_rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        self.num = len(needed)
        self.rank = own.rank
        # requests already grouped by owner (LocalGraph numbers its halo so) arrive in the requested order
        self.in_order = bool(np.array_equal(order, np.arange(len(order))))

    def __call__(self, x_src: torch.Tensor) -> torch.Tensor:
        return self.gather(lambda rows: x_src[rows.to(x_src.device)])

    def gather(self, rows_of) -> torch.Tensor:
        """The requested rows, each made by its owner as ``rows_of(local row indices)`` — e.g. a product of
        held rows with a weight, so that only the product travels; autograd returns its gradient to the
        owner's inputs."""
        send = rows_of(self.send_rows)
        CommStats.add(self._sent_bytes(send[0].numel() if len(send) else 0, send.element_size()), send)
        out = send.new_empty((self.num, *send.shape[1:]))
        recv = dnn.all_to_all_single(out, send, self.recv_splits, self.send_splits)
        return recv if self.in_order else recv[self.unsort.to(send.device)]

    def _sent_bytes(self, row_floats: int, element_size: int) -> int:
        return sum(s for q, s in enumerate(self.send_splits) if q != self.rank) * row_floats * element_size

    def extend(self, x_own: torch.Tensor) -> torch.Tensor:
        """[x_own ; the requested rows of x_own's owners], autograd-aware, for requests grouped by owner
        (``in_order``): the rows arrive straight into the result, and the backward sends each received
        row's gradient back to its owner — no received copy, no reordered copy, no concatenation (at P = 8
        the halo rows outnumber the owned ones, so these copies were most of a step's transient)."""
        if not self.in_order:
            return torch.cat([x_own, self(x_own)])
        CommStats.add(self._sent_bytes(x_own[0].numel() if len(x_own) else 0, x_own.element_size()), x_own)
        return _Extend.apply(x_own, self)

    @torch.no_grad()
    def fill(self, x_src: torch.Tensor, out: torch.Tensor, scratch: list[torch.Tensor]) -> None:
        """``out[:] = self(x_src)`` without autograd, the rows sent and received passing through ``scratch``
        (two flat buffers the caller keeps, of at least the sent and the received rows' floats): a chunked
        precomputation then exchanges every chunk in the same memory instead of four fresh copies."""
        w = x_src.shape[1]
        send = scratch[0][:len(self.send_rows) * w].view(-1, w)
        torch.index_select(x_src, 0, self.send_rows.to(x_src.device), out=send)
        CommStats.add(self._sent_bytes(w, send.element_size()))
        if self.in_order:
            dist.all_to_all_single(out, send, self.recv_splits, self.send_splits)
            return
        recv = scratch[1][:self.num * w].view(-1, w)
        dist.all_to_all_single(recv, send, self.recv_splits, self.send_splits)
        torch.index_select(recv, 0, self.unsort.to(recv.device), out=out)

    def scratch(self, width: int, device) -> list[torch.Tensor]:
        """The buffers :meth:`fill` needs for rows of up to ``width`` float32 columns."""
        recv = 0 if self.in_order else self.num * width
        return [torch.empty(len(self.send_rows) * width, device=device), torch.empty(recv, device=device)]


class _Extend(torch.autograd.Function):
    """``RowExchange.extend`` for requests in owner order. The gradient of an owned row is its own plus the
    gradients of its copies on other ranks: the copies accumulated into zeros in ``send_rows`` order, then
    added to the row's own, as autograd does for ``cat([x, x[rows]])``. With one copy a row (P = 2) that is
    the same value; with several, autograd's index backward may associate them in another order (a
    last-bit difference: at P = 8 one of three losses moved by 1e-6)."""

    @staticmethod
    def forward(ctx, x_own, ex):
        ctx.ex = ex
        n = x_own.shape[0]
        out = x_own.new_empty((n + ex.num, *x_own.shape[1:]))
        out[:n] = x_own
        send = x_own.index_select(0, ex.send_rows.to(x_own.device))
        dist.all_to_all_single(out[n:], send, ex.recv_splits, ex.send_splits)
        return out

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.ex
        n = grad.shape[0] - ex.num
        back = grad.new_empty((len(ex.send_rows), *grad.shape[1:]))
        dist.all_to_all_single(back, grad[n:].contiguous(), ex.send_splits, ex.recv_splits)
        copies = grad.new_zeros((n, *grad.shape[1:])).index_add_(0, ex.send_rows.to(grad.device), back)
        return grad[:n] + copies, None



def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Autograd-aware all-gather (counted in :class:`CommStats`)."""
    CommStats.add((dist.get_world_size() - 1) * t.numel() * t.element_size(), t)
    return list(dnn.all_gather(t))


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Autograd-aware all-gather of tensors whose first dimension differs between ranks (padded to the
    largest, then cut)."""
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([t, t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))])
    return [g[:s] for g, s in zip(all_gather(padded.contiguous()), sizes)]
