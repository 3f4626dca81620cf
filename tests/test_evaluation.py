"""Tests for lgmrec_dist.evaluation (docs/model.md §2)."""
import math

import numpy as np
import pytest
import torch

from lgmrec_dist import evaluation
from lgmrec_dist.evaluation import (EarlyStopping, Evaluator, finalize, metric_sums,
                                    streaming_topk)

L3, L5 = math.log2(3), math.log2(5)  # discounts 1/log2(r+1): r=1 -> 1, r=2 -> 1/L3, r=3 -> 1/2, r=4 -> 1/L5


def tiny_case():
    """6 items, item_emb = I so each user's raw scores are its embedding row.

    user 0: train {0} (raw score 10, the highest), ranking after masking 1,2,3,4,5,0; T={2,4,5}
    user 1: train {3} (raw 100),                    ranking 5,4,2,1,0,3;           T={4}
    user 2: train {5} (raw 50),                     ranking 0,3,1,4,2,5;           T={0,1,2}
    user 3: train only, never evaluated.
    """
    user_emb = torch.tensor([[10, 5, 4, 3, 2, 1],
                             [1, 2, 3, 100, 5, 6],
                             [9, 7, 5, 8, 6, 50],
                             [1, 2, 3, 4, 5, 6]], dtype=torch.float32)
    item_emb = torch.eye(6)
    train = np.array([[0, 0], [1, 3], [2, 5], [3, 1], [0, 0]])          # (0, 0) duplicated
    held = np.array([[0, 2], [0, 4], [0, 5], [1, 4], [2, 0], [2, 1], [2, 2], [2, 2]])
    return user_emb, item_emb, train, held


# Hand arithmetic, h = hit vector over ranks 1..6:
#   user 0: h = 0 1 0 1 1 0, |T| = 3    user 1: h = 0 1 0 0 0 0, |T| = 1    user 2: h = 1 0 1 0 1 0, |T| = 3
EXPECTED = {
    # K = 2  (users 0 and 2 have |T| > K, user 1 has |T| < K)
    "recall@2": [1 / 3, 1.0, 1 / 3],
    "precision@2": [1 / 2, 1 / 2, 1 / 2],
    "ndcg@2": [(1 / L3) / (1 + 1 / L3), 1 / L3, 1 / (1 + 1 / L3)],
    "map@2": [(1 / 2) / 2, (1 / 2) / 1, 1 / 2],
    # K = 4
    "recall@4": [2 / 3, 1.0, 2 / 3],
    "precision@4": [2 / 4, 1 / 4, 2 / 4],
    "ndcg@4": [(1 / L3 + 1 / L5) / (1 + 1 / L3 + 1 / 2), 1 / L3, (1 + 1 / 2) / (1 + 1 / L3 + 1 / 2)],
    "map@4": [(1 / 2 + 2 / 4) / 3, (1 / 2) / 1, (1 + 2 / 3) / 3],
}


def make_evaluator(train, held, num_users=4, num_items=6, **kw):
    return Evaluator(num_users, num_items, train[:, 0], train[:, 1], held[:, 0], held[:, 1], **kw)


def test_training_items_masked_to_bottom():
    user_emb, item_emb, _, _ = tiny_case()
    indptr = torch.tensor([0, 1, 2, 3])
    indices = torch.tensor([0, 3, 5])
    scores, items = streaming_topk(user_emb[:3], item_emb, (indptr, indices), k=6, item_tile=4)
    assert items.tolist() == [[1, 2, 3, 4, 5, 0], [5, 4, 2, 1, 0, 3], [0, 3, 1, 4, 2, 5]]
    assert (scores[:, -1] == -1e10).all()


def test_hand_computed_metrics():
    user_emb, item_emb, train, held = tiny_case()
    ev = make_evaluator(train, held, ks=(2, 4), item_tile=4)
    sums, count = ev.evaluate(user_emb, item_emb)
    assert count == 3
    assert set(sums) == set(EXPECTED)
    for key, per_user in EXPECTED.items():
        assert sums[key] == pytest.approx(sum(per_user), abs=1e-12), key
    metrics = ev.evaluate_metrics(user_emb, item_emb)
    for key, per_user in EXPECTED.items():
        assert metrics[key] == round(sum(per_user) / 3, 4), key


def test_metric_sums_direct_and_empty_heldout_rejected():
    top = torch.tensor([[1, 2, 3, 4, 5, 0], [5, 4, 2, 1, 0, 3], [0, 3, 1, 4, 2, 5]])
    sums = metric_sums(top, torch.tensor([0, 3, 4, 7]), torch.tensor([2, 4, 5, 4, 0, 1, 2]), [2, 4])
    for key, per_user in EXPECTED.items():
        assert sums[key] == pytest.approx(sum(per_user), abs=1e-12), key
    with pytest.raises(AssertionError):
        metric_sums(top[:2], torch.tensor([0, 3, 3]), torch.tensor([2, 4, 5]), [2])


def test_catalogue_smaller_than_k():
    # 6 items but K up to 50: ranks 7..50 are misses.
    user_emb, item_emb, train, held = tiny_case()
    ev = make_evaluator(train, held)            # default ks (5, 10, 20, 50)
    sums, count = ev.evaluate(user_emb, item_emb)
    assert count == 3
    # every held-out item is inside the 6 ranked items
    assert sums["recall@50"] == pytest.approx(3.0)
    assert sums["recall@10"] == pytest.approx(3.0)
    assert sums["precision@50"] == pytest.approx((3 + 1 + 3) / 50)
    assert sums["precision@10"] == pytest.approx((3 + 1 + 3) / 10)
    # K >= 6: idcg over min(|T|, K) = |T| ranks, dcg over all hits
    ndcg = [(1 / L3 + 1 / L5 + 1 / math.log2(6)) / (1 + 1 / L3 + 1 / 2), 1 / L3,
            (1 + 1 / 2 + 1 / math.log2(6)) / (1 + 1 / L3 + 1 / 2)]
    mapk = [(1 / 2 + 2 / 4 + 3 / 5) / 3, 1 / 2, (1 + 2 / 3 + 3 / 5) / 3]
    for K in (10, 20, 50):
        assert sums[f"ndcg@{K}"] == pytest.approx(sum(ndcg), abs=1e-12)
        assert sums[f"map@{K}"] == pytest.approx(sum(mapk), abs=1e-12)
    # K = 5: user 0's third hit (rank 5) counts, user 2's third hit (rank 5) counts too
    assert sums["recall@5"] == pytest.approx(3.0)
    scores, items = streaming_topk(user_emb, item_emb, None, k=50, item_tile=4)
    assert items.shape == scores.shape == (4, 6)


def random_csr(rng, n, m, p=0.2):
    dense = rng.random((n, m)) < p
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1))])
    return dense, torch.from_numpy(indptr), torch.from_numpy(np.nonzero(dense)[1])


@pytest.mark.parametrize("k", [5, 30])
def test_streaming_topk_matches_single_tile_and_numpy(k):
    rng = np.random.default_rng(0)
    n, m, d = 7, 23, 5
    U, I = rng.standard_normal((n, d)), rng.standard_normal((m, d))   # float64: no ties
    dense, indptr, indices = random_csr(rng, n, m)
    ref = U @ I.T
    ref[dense] = -1e10
    ref_items = np.argsort(-ref, axis=1, kind="stable")[:, :min(k, m)]
    ref_scores = np.take_along_axis(ref, ref_items, 1)
    Ut, It = torch.from_numpy(U), torch.from_numpy(I)
    s3, i3 = streaming_topk(Ut, It, (indptr, indices), k, item_tile=3)
    s1, i1 = streaming_topk(Ut, It, (indptr, indices), k, item_tile=m)
    assert i3.shape == s3.shape == (n, min(k, m))
    # masked items all score -1e10 (their mutual order is arbitrary); the rest must match exactly.
    # Scores may differ in the last bits (tile vs whole matmul), hence allclose.
    real = ref_scores > -1e9
    for s, i in ((s3, i3), (s1, i1)):
        np.testing.assert_array_equal(i.numpy()[real], ref_items[real])
        np.testing.assert_allclose(s.numpy(), ref_scores, rtol=1e-9, atol=1e-12)
    assert dense.any() and (k < m or (~real).any())   # with k >= m the masked tail is in the list


@pytest.mark.parametrize("order", ["random", "ascending"])
def test_pruned_streaming_topk_matches_numpy(order):
    """The block-pruned merge (tiles a multiple of prune_block) returns the exact top-k; with items in
    ascending score order every tile beats the k-th best, which takes the plain top-k fallback."""
    rng = np.random.default_rng(1)
    n, m, d, k = 40, 64 * 24, 6, 10
    U, I = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    if order == "ascending":  # every user's scores grow with the item id
        U = np.abs(U)
        I = np.linspace(0, 1, m)[:, None] + rng.standard_normal((m, d)) * 1e-3
    dense, indptr, indices = random_csr(rng, n, m)
    ref = U @ I.T
    ref[dense] = -1e10
    ref_items = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    for tile, block in ((128, 8), (256, 64), (m, 8)):
        s, i = streaming_topk(torch.from_numpy(U), torch.from_numpy(I), (indptr, indices), k, item_tile=tile,
                              prune_block=block)
        np.testing.assert_array_equal(i.numpy(), ref_items)
        np.testing.assert_allclose(s.numpy(), np.take_along_axis(ref, ref_items, 1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel", [True, False])
def test_float32_topk_ties_and_row_chunks(kernel, monkeypatch):
    """float32 on the CPU: the C heap kernel (and the tensor path) against numpy. Integer-valued embeddings
    make exact ties: the kernel breaks them by the lower item id (a stable argsort of -score), masked items
    included; the tensor path's tie order is arbitrary, so its items are checked to be distinct and to have
    the listed scores.
    TILE_FLOATS is made small so the users go through in chunks of rows (2 or 3 per chunk)."""
    rng = np.random.default_rng(2)
    n, m, d = 9, 70, 3
    U = rng.integers(-2, 3, (n, d)).astype(np.float32)
    I = rng.integers(-2, 3, (m, d)).astype(np.float32)
    dense, indptr, indices = random_csr(rng, n, m, p=0.1)
    ref = U.astype(np.float64) @ I.T.astype(np.float64)
    ref[dense] = -1e10
    for k in (5, m + 4):
        ref_items = np.argsort(-ref, axis=1, kind="stable")[:, :min(k, m)]
        ref_scores = np.take_along_axis(ref, ref_items, 1).astype(np.float32)
        for tile, tile_floats in ((7, 16), (16, 1 << 23), (m, 3 * m)):
            monkeypatch.setattr(evaluation, "TILE_FLOATS", tile_floats)
            s, i = streaming_topk(torch.from_numpy(U), torch.from_numpy(I), (indptr, indices), k, item_tile=tile,
                                  prune_block=4, kernel=kernel)
            np.testing.assert_array_equal(s.numpy(), ref_scores)
            if kernel:
                np.testing.assert_array_equal(i.numpy(), ref_items)
            np.testing.assert_array_equal(np.take_along_axis(ref, i.numpy(), 1).astype(np.float32), ref_scores)
            assert all(len(set(row)) == len(row) for row in i.tolist())
    assert (np.sum(ref[:, :, None] == ref[:, None, :], (1, 2)) > m).all()     # every row has ties


def test_kernel_and_tensor_topk_agree_on_random_float32():
    """The two float32 paths on continuous scores (no ties): the same items and scores."""
    gen = torch.Generator().manual_seed(3)
    U, I = torch.randn(300, 16, generator=gen), torch.randn(5000, 16, generator=gen)
    indptr = torch.arange(0, 301 * 4, 4)
    indices = torch.randint(0, 5000, (300 * 4,), generator=gen)
    indices = torch.sort(indices.view(300, 4), 1).values.reshape(-1)
    s1, i1 = streaming_topk(U, I, (indptr, indices), 50, item_tile=1024, kernel=True)
    s0, i0 = streaming_topk(U, I, (indptr, indices), 50, item_tile=1024, kernel=False)
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-6)
    assert torch.equal(i1, i0)
    masked = torch.zeros(300, 5000, dtype=torch.bool)
    masked[torch.arange(300).repeat_interleave(4), indices] = True
    assert not masked.gather(1, i1).any()


def random_split(rng, num_users, num_items, n_train, n_held):
    """Random (user, item) pairs with duplicates; held-out pairs disjoint from train, as in real splits
    (a held-out item that is also a training item would sit among the -1e10 ties, in arbitrary order)."""
    train = np.stack([rng.integers(0, num_users, n_train), rng.integers(0, num_items, n_train)], 1)
    held = np.stack([rng.integers(0, num_users, n_held), rng.integers(0, num_items, n_held)], 1)
    in_train = np.isin(held[:, 0] * num_items + held[:, 1], train[:, 0] * num_items + train[:, 1])
    return train, held[~in_train]


def test_user_subset_halves_add_up():
    rng = np.random.default_rng(1)
    nu, ni = 50, 40
    train, held = random_split(rng, nu, ni, 400, 80)          # some users have no held-out items
    ev = make_evaluator(train, held, nu, ni, ks=(5, 10, 20, 50), batch_size=7, item_tile=9)
    U = torch.from_numpy(rng.standard_normal((nu, 8)))
    I = torch.from_numpy(rng.standard_normal((ni, 8)))
    all_sums, all_count = ev.evaluate(U, I)
    assert all_count == len(np.unique(held[:, 0]))
    perm = rng.permutation(nu)
    (s1, c1), (s2, c2) = ev.evaluate(U, I, perm[:25]), ev.evaluate(U, I, perm[25:])
    assert c1 + c2 == all_count
    for key in all_sums:
        assert s1[key] + s2[key] == pytest.approx(all_sums[key], abs=1e-9)
    # the same users in one big batch and one big tile give the same sums
    ev_big = make_evaluator(train, held, nu, ni, batch_size=4096, item_tile=65536)
    big_sums, _ = ev_big.evaluate(U, I)
    for key in all_sums:
        assert big_sums[key] == pytest.approx(all_sums[key], abs=1e-9)
    assert finalize(all_sums, all_count) == ev.evaluate_metrics(U, I)


def test_sampled_validation_users_equal_the_subset_of_full_evaluation():
    """max_users (config valid_users): a fixed uniform sample of the evaluated users, each ranked against
    every item — its sums equal the full evaluator's restricted to the same users."""
    rng = np.random.default_rng(3)
    nu, ni = 60, 40
    train, held = random_split(rng, nu, ni, 500, 120)
    full = make_evaluator(train, held, nu, ni, batch_size=7, item_tile=9)
    sample = make_evaluator(train, held, nu, ni, batch_size=7, item_tile=9, max_users=15, seed=4)
    again = make_evaluator(train, held, nu, ni, batch_size=7, item_tile=9, max_users=15, seed=4)
    assert len(sample.users) == 15 and set(sample.users) < set(full.users)
    assert np.array_equal(sample.users, again.users)                          # fixed by the seed
    other = make_evaluator(train, held, nu, ni, max_users=15, seed=5)
    assert not np.array_equal(sample.users, other.users)
    U = torch.from_numpy(rng.standard_normal((nu, 8)))
    I = torch.from_numpy(rng.standard_normal((ni, 8)))
    assert sample.evaluate(U, I) == full.evaluate(U, I, sample.users)
    everyone = make_evaluator(train, held, nu, ni, max_users=10_000)          # more than there are: all
    assert np.array_equal(everyone.users, full.users)


def test_duplicate_pairs_count_once():
    rng = np.random.default_rng(2)
    nu, ni = 20, 15
    train, held = random_split(rng, nu, ni, 100, 40)
    U = torch.from_numpy(rng.standard_normal((nu, 4)))
    I = torch.from_numpy(rng.standard_normal((ni, 4)))
    a = make_evaluator(np.unique(train, axis=0), np.unique(held, axis=0), nu, ni).evaluate(U, I)
    b = make_evaluator(np.concatenate([train, train]), np.concatenate([held, held[::-1]]), nu, ni
                       ).evaluate(U, I)
    assert a[1] == b[1]
    for key in a[0]:
        assert a[0][key] == pytest.approx(b[0][key], abs=1e-12)


def test_early_stopping_rounding_and_strictness():
    es = EarlyStopping(patience=20)
    assert es.update(0, 0.12341) is True and es.best_value == 0.1234
    assert es.update(1, 0.12344) is False          # rounds to 0.1234: not an improvement
    assert es.update(2, 0.1234) is False           # tie: does not reset patience
    assert es.bad_epochs == 2 and es.best_epoch == 0
    assert es.update(3, 0.12345) is True           # rounds to 0.1235 (> 0.1234)
    assert (es.best_epoch, es.best_value, es.bad_epochs) == (3, 0.1235, 0)


def test_early_stopping_stops_after_patience_plus_one():
    es = EarlyStopping(patience=20)
    es.update(0, 0.5)
    for epoch in range(1, 21):                     # 20 non-improving epochs: keep going
        assert es.update(epoch, 0.4) is False
        assert not es.should_stop
    assert es.update(21, 0.5) is False             # the 21st: stop
    assert es.should_stop and es.best_epoch == 0


def test_early_stopping_state_round_trip():
    es = EarlyStopping(patience=3)
    for epoch, v in enumerate([0.1, 0.2, 0.15, 0.19]):
        es.update(epoch, v)
    state = es.state_dict()
    assert all(isinstance(v, (int, float, type(None))) for v in state.values())
    es2 = EarlyStopping(patience=99)
    es2.load_state_dict(state)
    assert es2.state_dict() == state
    assert (es2.best_epoch, es2.best_value, es2.bad_epochs, es2.patience) == (1, 0.2, 2, 3)
    es2.update(4, 0.1)
    es2.update(5, 0.1)
    assert es2.should_stop
