"""Evaluation with the items sharded over ranks (docs/distributed.md, "Evaluation"): each rank ranks its
own users against every item without any rank holding every item's row.

The ranks' item blocks (the E* rows of the items each owns) travel round a ring: at hop h rank r holds
the block of rank r − h and merges it into its users' running top-K (``Evaluator.evaluate_blocks``), then
sends it on to r + 1 and receives the next from r − 1. After P hops every user has met every item; a
rank holds at most two blocks (|I|/P rows each) at a time, and what each sends per evaluation is the
items' rows once around the ring.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from lgmrec_dist.distributed.exchange import CommStats, comm_device


def _send_on(ids: np.ndarray, rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Send (ids, rows) to the next rank, return the previous rank's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dst, src = (rank + 1) % world, (rank - 1) % world
    dev = comm_device()
    n_send = torch.tensor([len(ids)], dtype=torch.int64, device=dev)
    n_recv = torch.empty_like(n_send)
    for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, n_send, dst), dist.P2POp(dist.irecv, n_recv, src)]):
        req.wait()
    n = int(n_recv)
    send_ids = torch.from_numpy(np.ascontiguousarray(ids, np.int64)).to(dev)
    send_rows = rows.contiguous().to(dev)
    recv_ids = torch.empty(n, dtype=torch.int64, device=dev)
    recv_rows = torch.empty((n, rows.shape[1]), dtype=rows.dtype, device=dev)
    CommStats.add(send_ids.numel() * 8 + send_rows.numel() * send_rows.element_size())
    ops = [dist.P2POp(dist.isend, send_ids, dst), dist.P2POp(dist.irecv, recv_ids, src),
           dist.P2POp(dist.isend, send_rows, dst), dist.P2POp(dist.irecv, recv_rows, src)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv_ids.cpu().numpy(), recv_rows.to(rows.device)


def ring_blocks(item_ids: np.ndarray, item_rows: torch.Tensor):
    """This rank's item block, then each other rank's in ring order (a collective: every rank must
    iterate to the end)."""
    yield item_ids, item_rows
    for _ in range(dist.get_world_size() - 1):
        item_ids, item_rows = _send_on(item_ids, item_rows)
        yield item_ids, item_rows
