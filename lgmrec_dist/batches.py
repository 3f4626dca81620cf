"""Training triples (u, i⁺, i⁻) per epoch (docs/model.md §1.10).

Each epoch shuffles the distinct training pairs with a generator keyed by (seed, epoch) and draws one
negative per positive, uniformly over the items that occur in the training split and re-drawn until it
is not one of the user's training items. The whole epoch is drawn at once, so the global batches do not
depend on how many processes later split them.
"""
from __future__ import annotations

import numpy as np


class TripleSampler:
    def __init__(self, num_items: int, train_users: np.ndarray, train_items: np.ndarray, seed: int):
        keys = np.unique(np.asarray(train_users, np.int64) * num_items + np.asarray(train_items, np.int64))
        self.num_items = num_items
        self.keys = keys                         # sorted (user, item) keys of distinct training pairs
        self.users, self.items = keys // num_items, keys % num_items
        self.item_pool = np.unique(self.items)   # items that appear in training
        self.seed = seed
        counts = np.bincount(self.users)
        if len(counts) and counts.max() >= len(self.item_pool):
            user = int(np.argmax(counts))
            raise ValueError(f"user {user} interacted with every training item: no negative can be drawn")

    def __len__(self) -> int:
        return len(self.keys)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.keys) // batch_size)

    def _is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users * self.num_items + items
        pos = np.searchsorted(self.keys, q)
        pos[pos == len(self.keys)] = 0
        return self.keys[pos] == q

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All triples of an epoch in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.keys))
        users, pos = self.users[order], self.items[order]
        neg = self.item_pool[rng.integers(0, len(self.item_pool), len(users))]
        bad = np.flatnonzero(self._is_positive(users, neg))
        while len(bad):
            neg[bad] = self.item_pool[rng.integers(0, len(self.item_pool), len(bad))]
            bad = bad[self._is_positive(users[bad], neg[bad])]
        return users, pos, neg
