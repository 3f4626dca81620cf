"""Training on a partitioned dataset (docs/distributed.md, "Training on partitions"): rank k of P opens only
``part-k/`` and the global metadata (manifest, partition book), and builds from them what the loop needs
with small collectives instead of whole-catalogue arrays:

* :func:`uses_partitions`: whether a launch reads partitions (an exact-mode or ``shard_tables`` sampled-mode
  launch on P ranks of a dataset prepared with ``--partitions P``, unless ``partitioning: contiguous``);
* :func:`partition_triples`: the rank's :class:`~lgmrec_dist.batches.TripleSampler` over its users' pairs,
  with their global pair numbers (per-user pair counts summed over ranks block by block, :func:`summed_counts`)
  and the global negative pool;
* :func:`gather_batch`: a global batch put together from the ranks' triples by epoch position, so P ranks
  train on the batches of one process;
* :func:`gather_hashes`: the candidates of the evaluation's keyed user sample, from every rank.

Per-node arrays here: the book only (counts are summed in blocks); per-interaction arrays and feature rows are
the rank's own.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from lgmrec_dist.batches import ItemPool, TripleSampler
from lgmrec_dist.config import Config
from lgmrec_dist.dataset import TRAIN, DatasetError, read_manifest
from lgmrec_dist.dataset_parts import PartitionData, open_partition
from lgmrec_dist.distributed.exchange import all_gather_rows, comm_device
from lgmrec_dist.distributed.group import LaunchError
from lgmrec_dist.keys import pair_keys


def uses_partitions(data, cfg: Config, world_size: int) -> bool:
    """A launch on P > 1 ranks of a dataset prepared for P partitions reads only its partition (the exact
    mode, and the sampled mode with ``shard_tables``); ``partitioning: contiguous`` (or any other P) reads
    the whole dataset as before."""
    if world_size < 2 or cfg.partitioning == "contiguous" or (cfg.mode == "sampled" and not cfg.shard_tables):
        return False
    return int(read_manifest(data).get("partitions", 1) or 1) == world_size


def open_rank_partition(data, ctx) -> PartitionData:
    """Rank k's partition (``dataset_parts.open_partition``: checked against the manifest and the book).
    The ranks agree before anything else: if any rank cannot open its partition, that rank raises its
    error (naming the partition and the file) and every other rank a LaunchError naming it, instead of
    waiting for it at the first collective."""
    error = None
    try:
        ds = open_partition(data, ctx.rank, ctx.world_size)
    except (DatasetError, OSError) as exc:
        error = exc
    failed = torch.tensor([ctx.rank if error is not None else -1], device=comm_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed) >= 0:
        raise LaunchError(f"{data}: rank {int(failed)} could not open its partition (part-{int(failed)}, "
                          f"its error names the file); no rank starts")
    return ds


def _all_sum(a: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(comm_device())
    dist.all_reduce(t)
    return t.cpu().numpy()


COUNT_BLOCK = 1 << 22   # nodes per all-reduced block of per-node counts (32 MB of int64 a block)


def summed_counts(ids: np.ndarray, n: int, block: int = COUNT_BLOCK, reduce=None):
    """(lo, counts of ids lo..lo+len-1 summed over ranks), block by block over 0..n-1, from this rank's sorted
    ``ids``: the per-node counts of every rank without a whole |U|- or |I|-long array on any rank (54.5M
    users at Amazon-2023 scale: 2.1 GB of start-up arrays before). ``reduce`` sums an array over ranks
    (``_all_sum``; one process: the array itself). Every rank takes the same blocks (n is global)."""
    reduce = reduce or _all_sum
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        a, b = np.searchsorted(ids, [lo, hi])
        yield lo, reduce(np.bincount(ids[a:b] - lo, minlength=hi - lo))


def pair_numbers(users: np.ndarray, num_users: int, block: int = COUNT_BLOCK, reduce=None) -> tuple[np.ndarray, int]:
    """(global number of each of this rank's distinct pairs, total pairs): pairs numbered in (user, item)
    order as in one process, ``users`` the users of this rank's pairs in that order (each user's pairs all
    on its owner). User u's pairs start at the number of pairs of users < u, summed over ranks."""
    numbers = np.empty(len(users), np.int64)
    total = 0
    for lo, counts in summed_counts(users, num_users, block, reduce):
        a, b = np.searchsorted(users, [lo, lo + len(counts)])
        start = total + np.cumsum(counts) - counts               # first number of each user of the block
        mine = users[a:b]
        first = np.searchsorted(users, mine)                      # index of the user's first local pair
        numbers[a:b] = start[mine - lo] + np.arange(a, b) - first
        total += int(counts.sum())
    return numbers, total


def unused_items(items: np.ndarray, num_items: int, block: int = COUNT_BLOCK, reduce=None) -> np.ndarray:
    """The sorted items no rank has a training pair of, from this rank's sorted ``items`` (the negatives'
    pool leaves them out, ``batches.ItemPool``)."""
    unused = [lo + np.flatnonzero(c == 0) for lo, c in summed_counts(items, num_items, block, reduce)]
    return np.concatenate(unused) if unused else np.zeros(0, np.int64)


def partition_triples(ds: PartitionData, seed: int) -> TripleSampler:
    """The sampler of rank k's users' training pairs, numbered as in one process (:func:`pair_numbers`), and
    the negatives' pool: the items with a training pair on some rank."""
    users, items = ds.pairs(TRAIN)
    keys = pair_keys(users, items, ds.num_items)
    u, i = keys // ds.num_items, keys % ds.num_items
    pair_index, total = pair_numbers(u, ds.num_users)
    pool = ItemPool(ds.num_items, unused_items(np.sort(i), ds.num_items))
    return TripleSampler(ds.num_items, u, i, seed, pair_index=pair_index, total=total, item_pool=pool)


def gather_batch(positions: np.ndarray, triples: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's triples of one batch (this rank's: ``triples`` at ``positions``), in position order."""
    dev = triples[0].device
    rows = torch.stack([torch.from_numpy(positions).to(dev), *triples], 1).to(comm_device())
    every = torch.cat(all_gather_rows(rows))
    every = every[torch.argsort(every[:, 0])].to(dev)
    return [every[:, c] for c in range(1, every.shape[1])]


def gather_hashes(candidates: np.ndarray) -> np.ndarray:
    """uint64 hashes of every rank put together (the evaluation's keyed sample, ``evaluation.keyed_user_sample``)."""
    t = torch.from_numpy(np.ascontiguousarray(candidates, np.uint64).view(np.int64)).to(comm_device())
    return torch.cat(all_gather_rows(t.unsqueeze(1))).squeeze(1).cpu().numpy().view(np.uint64)
