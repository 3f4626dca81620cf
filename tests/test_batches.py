"""Keyed training triples and the keyed evaluation sample (docs/model.md §1.10, docs/distributed.md
"Initial values"): a process that holds only some users' pairs draws exactly its share of one process'
epoch, and the validation sample does not depend on who holds which users."""
import numpy as np
import pytest

from lgmrec_dist.batches import EpochBatches, ItemPool, KeyedPermutation, TripleSampler
from lgmrec_dist import rng
from lgmrec_dist.evaluation import SAMPLE_STREAM, keyed_user_sample


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_keyed_permutation_is_a_bijection_with_its_inverse(n):
    perm = KeyedPermutation(n, 12345)
    f = perm.forward(np.arange(n))
    assert np.array_equal(np.sort(f), np.arange(n))
    assert np.array_equal(perm.inverse(f), np.arange(n))
    if n > 100:   # a shuffle, not a near-identity
        assert np.mean(f == np.arange(n)) < 0.05 and not np.array_equal(f, KeyedPermutation(n, 54321).forward(np.arange(n)))


def _pairs(seed=0, users=300, items=120, n=3000):
    rng = np.random.default_rng(seed)
    return rng.integers(0, users, n), rng.integers(0, items, n), items


def test_partitions_draw_their_share_of_the_single_process_epoch():
    u, i, ni = _pairs()
    whole = TripleSampler(ni, u, i, seed=7)
    pos, users, items, neg = whole.epoch_positions(3)
    assert np.array_equal(pos, np.arange(len(whole)))
    assert not whole._is_positive(users, neg).any() and np.isin(neg, whole.item_pool.items()).all()
    owner = np.random.default_rng(1).integers(0, 3, 300)          # users dealt to 3 partitions
    got = []
    for k in range(3):
        mine = owner[whole.users] == k
        part = TripleSampler(ni, whole.users[mine], whole.items[mine], seed=7, pair_index=np.flatnonzero(mine),
                             total=len(whole), item_pool=whole.item_pool)
        got.append(part.epoch_positions(3))
    order = np.argsort(np.concatenate([g[0] for g in got]))
    for j, ref in enumerate((pos, users, items, neg)):
        assert np.array_equal(np.concatenate([g[j] for g in got])[order], ref)


def test_epochs_differ_and_batches_cover_the_epoch():
    u, i, ni = _pairs(2)
    s = TripleSampler(ni, u, i, seed=7)
    e0, e1 = s.epoch(0), s.epoch(1)
    assert not np.array_equal(e0[0], e1[0])
    batches = EpochBatches(s, 0, "cpu")
    got = [batches(b, 256) for b in range(s.num_batches(256))]
    assert [len(g[0]) for g in got[:-1]] == [256] * (len(got) - 1)
    for j in range(3):
        assert np.array_equal(np.concatenate([g[j].numpy() for g in got]), e0[j])


def test_keyed_user_sample_is_the_same_however_users_are_held():
    users = np.sort(np.random.default_rng(3).choice(10_000, 2_000, replace=False))
    whole = keyed_user_sample(users, 300, seed=4)
    assert len(whole) == 300 and np.isin(whole, users).all()
    owner = users % 3
    shards = [users[owner == k] for k in range(3)]
    key = rng.stream_key(4, 0, SAMPLE_STREAM)

    def gather(_):   # what the collective returns: every holder's 300 smallest hashes
        return np.concatenate([np.sort(rng.keyed_hash64(key, s))[:300] for s in shards])

    got = np.sort(np.concatenate([keyed_user_sample(s, 300, 4, gather) for s in shards]))
    assert np.array_equal(got, whole)
    assert np.array_equal(keyed_user_sample(users, 5_000, seed=4), users)   # more asked than there are


def test_item_pool_is_the_items_with_pairs():
    """The pool held as the items left out gives the same j-th item as the array of the pool's items."""
    r = np.random.default_rng(0)
    for n in (1, 7, 300):
        for _ in range(20):
            items = np.unique(r.integers(0, n, r.integers(1, 2 * n + 1)))
            pool = ItemPool.of(n, items)
            j = r.integers(0, len(items), 50)
            assert len(pool) == len(items) and np.array_equal(pool[j], items[j])
            assert len(pool.excluded) == n - len(items)
