"""Which rows of the model this process holds, and what follows from it for a training step (docs/model.md,
"One model, interfaces chosen from outside").

A placement answers four questions for :class:`~lgmrec_dist.model.LGMRec`, which otherwise knows nothing of
processes:

* ``user_ids``, ``item_ids``: the global ids of the rows held here (their keyed random draws, their GHE rows);
* ``batch_rows(users, pos, neg)``: the held rows whose fused embedding the step builds, and ``pick``, which
  turns those rows into this process' (E*_u, E*_i⁺, E*_i⁻) triples;
* ``anchors(users, pos)`` and ``denominator(hyper)``: the contrastive anchors this process sums, and the
  log-sum-exp over every row of the positive view (``losses.contrastive_sum``);
* ``reduce`` and ``world``: how a global sum is taken (None in one process) and how many processes share
  each batch (``lgmrec.objective``).

:class:`AllRows` is the single-process placement; ``distributed.sharded.ShardedRows`` is a rank's owned rows.
"""
from __future__ import annotations

import torch

from lgmrec_dist.model.losses import all_rows_denominator, distinct_anchors


class AllRows:
    """Every user and item in this process: local rows are node ids, sums are local."""

    reduce = None
    world = 1

    def __init__(self, num_users: int, num_items: int, device: torch.device | str = "cpu"):
        self.num_users = num_users
        self.user_ids = torch.arange(num_users, device=device)
        self.item_ids = torch.arange(num_items, device=device)

    def batch_rows(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
        """(distinct batch nodes, pick): pick(E* at those rows) -> (E*_u, E*_i⁺, E*_i⁻) of every triple."""
        nodes = torch.cat([users, pos + self.num_users, neg + self.num_users])
        rows, inverse = torch.unique(nodes, return_inverse=True)
        # index_select, not e[inverse]: the backward of advanced indexing adds the repeated rows with
        # threaded atomics (a different sum each run); index_select's backward has a fixed order
        return rows, lambda fused: fused.index_select(0, inverse).split(len(users))

    def anchors(self, users: torch.Tensor, pos: torch.Tensor) -> list:
        return distinct_anchors(users, pos)

    def denominator(self, hyper: list):
        return all_rows_denominator(hyper)
