"""Training triples (u, i⁺, i⁻) per epoch (docs/model.md §1.10).

Each epoch visits the distinct training pairs in a random order and draws one negative per positive,
uniformly over the items that occur in the training split and re-drawn until it is not one of the
user's training items. Both are *keyed*, so no process needs the whole list of pairs:

* the pairs are numbered by their sorted (user, item) key (pair j of the N pairs); the epoch's order is a
  keyed permutation π of 0..N-1 (a 4-round Feistel network on the next power of four, cycle-walked into
  range): position p holds pair π(p). A process that holds some pairs (a partition: its users' pairs)
  finds their positions with π⁻¹, without the others;
* the negative at position p, attempt a, is item_pool[h(seed, epoch, p, a) mod |pool|] for a 64-bit hash h.

So the global batches (positions bB..(b+1)B-1) are the same whether one process draws them all or P
processes each draw their users' pairs and the batch is put together by position
(``distributed.partitioned.gathered_batch``).
"""
from __future__ import annotations

import numpy as np

from lgmrec_dist.keys import distinct, pair_keys
from lgmrec_dist.rng import keyed_hash64, mix32_np, stream_key

PERMUTATION_STREAM, NEGATIVE_STREAM = 101, 102
ROUNDS = 4


class KeyedPermutation:
    """A keyed bijection of 0..n-1: :meth:`forward` (position -> pair) and its inverse :meth:`inverse`."""

    def __init__(self, n: int, key: int):
        self.n = int(n)
        bits = max(2, int(np.ceil(np.log2(max(self.n, 2)))))
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = [np.uint64(stream_key(key, r, PERMUTATION_STREAM)) for r in range(ROUNDS)]

    def _rounds(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in (reversed(self.keys) if inverse else self.keys):
            if inverse:
                left, right = right ^ (mix32_np(left ^ k) & self.mask), left
            else:
                left, right = right, left ^ (mix32_np(right ^ k) & self.mask)
        return (left << self.half) | right

    def _walk(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        x = np.asarray(x, dtype=np.uint64).copy()
        todo = np.arange(len(x))
        while len(todo):   # cycle walking: the domain is < 4n, so a few passes on average
            x[todo] = self._rounds(x[todo], inverse)
            todo = todo[x[todo] >= self.n]
        return x.astype(np.int64)

    def forward(self, positions: np.ndarray) -> np.ndarray:
        return self._walk(positions, False)

    def inverse(self, pairs: np.ndarray) -> np.ndarray:
        return self._walk(pairs, True)


class ItemPool:
    """The items negatives are drawn from (those with a training pair), held as the sorted items left out —
    usually few — so that no process holds an array per item: ``pool[j]`` is the j-th item not left out."""

    def __init__(self, num_items: int, excluded: np.ndarray):
        self.num_items = num_items
        self.excluded = np.asarray(excluded, np.int64)                         # sorted
        self._before = self.excluded - np.arange(len(self.excluded))           # pool items before each one

    @classmethod
    def of(cls, num_items: int, items: np.ndarray) -> "ItemPool":
        """The pool of the given items (sorted, distinct)."""
        return cls(num_items, np.setdiff1d(np.arange(num_items), items, assume_unique=True))

    def __len__(self) -> int:
        return self.num_items - len(self.excluded)

    def __getitem__(self, j: np.ndarray) -> np.ndarray:
        # the j-th pool item is j plus the number of excluded items before it: those with ≤ j pool items before
        j = np.asarray(j, np.int64)
        return j + np.searchsorted(self._before, j, side="right")

    def items(self) -> np.ndarray:
        return self[np.arange(len(self))]


class TripleSampler:
    """The epoch triples of the pairs this process holds.

    One process: ``TripleSampler(num_items, train_users, train_items, seed)`` holds every pair. A partition
    passes, for its own users' pairs, their global pair numbers ``pair_index`` (the pair's place among all
    N = ``total`` pairs in (user, item) order) and the global :class:`ItemPool`; it must hold *every* pair of
    each user it holds (the negatives are checked against them).
    """

    def __init__(self, num_items: int, train_users: np.ndarray, train_items: np.ndarray, seed: int,
                 pair_index: np.ndarray | None = None, total: int | None = None, item_pool: ItemPool | None = None):
        keys = pair_keys(train_users, train_items, num_items)
        self.num_items = num_items
        self.keys = keys                         # sorted (user, item) keys of the distinct pairs held
        self.users, self.items = keys // num_items, keys % num_items
        self.item_pool = ItemPool.of(num_items, distinct(self.items)) if item_pool is None else item_pool
        self.pair_index = np.arange(len(keys)) if pair_index is None else np.asarray(pair_index, np.int64)
        self.total = len(keys) if total is None else int(total)
        self.seed = seed
        counts = np.bincount(self.users)
        if len(counts) and counts.max() >= len(self.item_pool):
            user = int(np.argmax(counts))
            raise ValueError(f"user {user} interacted with every training item: no negative can be drawn")

    def __len__(self) -> int:
        return self.total

    def num_batches(self, batch_size: int) -> int:
        return -(-self.total // batch_size)

    def _is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users * self.num_items + items
        pos = np.searchsorted(self.keys, q)
        pos[pos == len(self.keys)] = 0
        return self.keys[pos] == q

    def _negatives(self, epoch: int, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
        key = stream_key(self.seed, epoch, NEGATIVE_STREAM)
        pool = np.uint64(len(self.item_pool))
        neg = np.empty(len(users), np.int64)
        bad, attempt = np.arange(len(users)), 0
        while len(bad):
            neg[bad] = self.item_pool[(keyed_hash64(key, positions[bad], attempt) % pool).astype(np.int64)]
            bad = bad[self._is_positive(users[bad], neg[bad])]
            attempt += 1
        return neg

    def epoch_positions(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(positions, users, positives, negatives) of the held pairs, by increasing position in the epoch."""
        perm = KeyedPermutation(self.total, stream_key(self.seed, epoch, PERMUTATION_STREAM))
        if len(self.keys) == self.total:      # every pair: the order itself, no sort
            positions, held = np.arange(self.total), perm.forward(np.arange(self.total))
        else:
            at = perm.inverse(self.pair_index)
            order = np.argsort(at, kind="stable")
            positions, held = at[order], order
        users, pos = self.users[held], self.items[held]
        return positions, users, pos, self._negatives(epoch, users, positions)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All triples of an epoch in training order (a process that holds every pair)."""
        if len(self.keys) != self.total:
            raise ValueError("epoch(): this sampler holds a partition's pairs; use epoch_positions()")
        return self.epoch_positions(epoch)[1:]


class EpochBatches:
    """The global batches of one epoch: batch b is positions b·B .. (b+1)·B − 1. ``gather`` (a partition's
    launch, ``distributed.partitioned.gather_batch``) puts a batch together from every rank's triples."""

    def __init__(self, sampler: TripleSampler, epoch: int, device, gather=None):
        import torch
        self.positions, *triples = sampler.epoch_positions(epoch)
        self.triples = [torch.from_numpy(t).to(device) for t in triples]
        self.gather = gather

    def __call__(self, b: int, batch_size: int) -> list:
        """(users, positives, negatives) of batch ``b``."""
        lo, hi = np.searchsorted(self.positions, [b * batch_size, (b + 1) * batch_size])
        part = [t[lo:hi] for t in self.triples]
        return part if self.gather is None else self.gather(self.positions[lo:hi], part)
