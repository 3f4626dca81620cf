"""MMRec full-ranking evaluation and early stopping (docs/model.md §2, "Evaluation protocol").

* Every distinct user of the held-out split (validation or test) is ranked against **all** items; the
  user's **training** items get score -1e10 first (they stay rankable, at the bottom), nothing else is
  masked. One top-max(K) list is taken and every K uses a prefix of it.
* Per-user metrics with binary gains (h_r = 1 iff the item at rank r is in the held-out set T_u)::

      Recall@K    = sum_{r<=K} h_r / |T_u|
      Precision@K = sum_{r<=K} h_r / K
      NDCG@K      = [sum_{r<=K} h_r / log2(r+1)] / [sum_{r=1..min(|T_u|,K)} 1 / log2(r+1)]
      MAP@K       = [sum_{r<=K} h_r * Precision@r] / min(|T_u|, K)

  then a plain mean over evaluated users, rounded to 4 decimals. :func:`metric_sums` returns *sums* so a
  distributed caller can all-reduce the sums and the user count before :func:`finalize`.
* Model selection (:class:`EarlyStopping`): new best iff the rounded value is strictly greater than the
  best so far; stop once more than ``patience`` consecutive epochs fail to improve.

Scoring streams over item tiles keeping a running top-k, so memory is O(n * k + one score tile), never
O(n * num_items). Ties between equal scores may be broken differently from a single ``torch.topk``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lgmrec_dist import native, rng
from lgmrec_dist.keys import distinct, pair_keys

MASK_SCORE = -1e10
SAMPLE_STREAM = 103
METRICS = ("recall", "ndcg", "precision", "map")
ITEM_TILE = 8192          # items scored at a time
TILE_FLOATS = 1 << 23     # a CPU score tile's size (32 MiB of float32): it stays in cache between write and read


def _csr_from_pairs(num_rows: int, num_cols: int, rows: np.ndarray, cols: np.ndarray):
    """Deduplicated CSR (indptr, indices) as int64 numpy arrays, columns sorted within each row."""
    keys = pair_keys(rows, cols, num_cols)
    r, c = np.divmod(keys, num_cols)
    indptr = np.zeros(num_rows + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=num_rows), out=indptr[1:])
    return indptr, c


def _csr_over(row_ids: np.ndarray, num_cols: int, rows: np.ndarray, cols: np.ndarray):
    """:func:`_csr_from_pairs` over the sorted ``row_ids`` only (row p holds the pairs of row_ids[p]; pairs
    of other rows are dropped): its size follows the rows kept, not the id range."""
    rows = np.asarray(rows, np.int64)
    if not len(row_ids):
        return _csr_from_pairs(0, num_cols, rows[:0], np.asarray(cols)[:0])
    pos = np.minimum(np.searchsorted(row_ids, rows), len(row_ids) - 1)
    keep = row_ids[pos] == rows
    return _csr_from_pairs(len(row_ids), num_cols, pos[keep], np.asarray(cols)[keep])


def _csr_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray):
    """Sub-CSR of the given rows (in that order), renumbered 0..len(rows)-1."""
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]
    sub_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=sub_ptr[1:])
    gather = np.repeat(starts - sub_ptr[:-1], lens) + np.arange(sub_ptr[-1], dtype=np.int64)
    return sub_ptr, indices[gather]


def _merge_topk(best_s, best_i, rows, vals, items, k: int):
    """Merge candidates into each row's current top-k (best_s, best_i: [n, k], best first). ``rows``
    must be non-decreasing (row-major candidates); they are laid out in a -inf padded [n, C] block."""
    n = best_s.shape[0]
    counts = torch.bincount(rows, minlength=n)
    col = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    width = int(counts.max()) if len(rows) else 0
    pad_s = best_s.new_full((n, width), float("-inf"))
    pad_i = best_i.new_zeros((n, width))
    pad_s[rows, col], pad_i[rows, col] = vals, items
    best_s, pos = torch.topk(torch.cat([best_s, pad_s], 1), k, dim=1)
    return best_s, torch.gather(torch.cat([best_i, pad_i], 1), 1, pos)


def _heap_kernel():
    P, I64 = native.PTR, native.I64
    return native.load(Path(__file__).with_name("topk_heap.c"),
                       {"topk_update": ([P, I64, I64, I64, I64, P, P, P, I64, native.I32], None),
                        "topk_finish": ([P, P, P, I64, I64, native.I32], None)})


def _score_tiles(user_emb: torch.Tensor, item_emb: torch.Tensor, mask, bounds, buf: torch.Tensor):
    """Yield ``(lo, scores)`` for each item range ``(lo, hi)`` of ``bounds``: the users' inner products
    with items lo..hi-1, written into ``buf`` (reused, so no tile pays fresh pages), training items of the
    ``mask`` CSR set to MASK_SCORE."""
    device, n = user_emb.device, user_emb.shape[0]
    if mask is not None:
        indptr, indices = mask
        rows = torch.repeat_interleave(torch.arange(n, device=device), indptr[1:] - indptr[:-1])
        order = torch.argsort(indices)  # sort by item once: each tile is then a contiguous slice
        mask_rows, mask_cols = rows[order], indices[order]
    for lo, hi in bounds:
        scores = buf[:n * (hi - lo)].view(n, hi - lo)
        torch.mm(user_emb, item_emb[lo:hi].to(device=device, dtype=user_emb.dtype).T, out=scores)
        if mask is not None:
            a, b = torch.searchsorted(mask_cols, torch.tensor([lo, hi], device=device)).tolist()
            scores[mask_rows[a:b], mask_cols[a:b] - lo] = MASK_SCORE
        yield lo, scores


def _topk_heap(lib, user_emb, item_emb, mask, k: int, item_tile: int, buf):
    """One chunk of users through the C heap kernel (topk_heap.c): one pass over each tile."""
    n, m = user_emb.shape[0], item_emb.shape[0]
    heap_s = user_emb.new_empty((n, k))
    heap_i = torch.empty((n, k), dtype=torch.long)
    heap_len = torch.zeros(n, dtype=torch.long)
    threads = torch.get_num_threads()
    bounds = [(lo, min(lo + item_tile, m)) for lo in range(0, m, item_tile)]
    for lo, scores in _score_tiles(user_emb, item_emb, mask, bounds, buf):
        lib.topk_update(scores.data_ptr(), n, scores.shape[1], scores.shape[1], lo, heap_s.data_ptr(),
                        heap_i.data_ptr(), heap_len.data_ptr(), k, threads)
    lib.topk_finish(heap_s.data_ptr(), heap_i.data_ptr(), heap_len.data_ptr(), n, k, threads)
    return heap_s, heap_i


def _topk_pruned(user_emb, item_emb, mask, k: int, item_tile: int, buf, prune_block: int):
    """One chunk of users in tensor operations (any device): tile top-k with block pruning."""
    device = user_emb.device
    n, m = user_emb.shape[0], item_emb.shape[0]
    best_s = user_emb.new_empty((n, 0))
    best_i = torch.empty((n, 0), dtype=torch.long, device=device)
    first = max(k, item_tile // 8)
    bounds = [(lo, min(lo + (first if lo == 0 else item_tile), m)) for lo in [0, *range(first, m, item_tile)]]
    for lo, scores in _score_tiles(user_emb, item_emb, mask, bounds, buf):
        w = scores.shape[1]
        if best_s.shape[1] == k and k > 0:
            # a ragged last tile is padded with -inf, which never beats a k-th best (>= MASK_SCORE)
            ragged = -w % prune_block
            blocks = (F.pad(scores, (0, ragged), value=float("-inf")) if ragged else scores).view(n, -1, prune_block)
            kth = best_s[:, -1]
            r, blk = (blocks.amax(2) > kth[:, None]).nonzero(as_tuple=True)
            if len(r) * prune_block * 8 <= scores.numel():  # else most blocks qualify: plain top-k
                vals = blocks[r, blk]
                keep = vals > kth[r, None]
                items = lo + blk[:, None] * prune_block + torch.arange(prune_block, device=device)
                best_s, best_i = _merge_topk(best_s, best_i, r[:, None].expand_as(vals)[keep], vals[keep],
                                             items[keep], k)
                continue
        s, i = torch.topk(scores, min(k, w), dim=1)
        best_s, pos = torch.topk(torch.cat([best_s, s], 1), min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.gather(torch.cat([best_i, i + lo], 1), 1, pos)
    return best_s, best_i


@torch.no_grad()
def streaming_topk(user_emb: torch.Tensor, item_emb: torch.Tensor, train_mask_rows, k: int,
                   item_tile: int = ITEM_TILE, prune_block: int = 64, kernel: bool | None = None):
    """Top-k items by inner product for each of n users, training items masked to -1e10.

    ``train_mask_rows`` is the training items of these n users as a CSR pair ``(indptr, indices)`` of
    int64 tensors (indptr has n+1 entries, row j = user j of ``user_emb``), or None for no masking.
    Items are scored ``item_tile`` columns at a time into one reused buffer; on the CPU the users go
    through in chunks of ``TILE_FLOATS // item_tile`` rows, so that the tile the matmul has just written is
    still in cache when it is read. Runs on ``user_emb.device``.
    Returns ``(scores [n, k'], items [n, k'])`` with k' = min(k, num_items), best first.

    On the CPU in float32, each row's running top-k is a heap in C (``topk_heap.c``; ``kernel=False``
    turns it off, ``kernel=None`` uses it where it builds): one pass over each tile, which looks at a
    block of 16 scores only if one of them beats the row's k-th best; ties go to the lower item id.
    Elsewhere (another device or dtype, or no C compiler), tensor operations with block pruning: once every
    row holds k items, the maxima of each tile's blocks of ``prune_block`` items are compared with each
    row's k-th best score so far, and only the blocks that beat it are merged (exact: an item above the k-th
    best lies in a block whose maximum is); a tile with too many candidate blocks takes the plain top-k.
    The first tile, which only seeds the k-th best scores, is an eighth of ``item_tile``.
    """
    device = user_emb.device
    n, m = user_emb.shape[0], item_emb.shape[0]
    k = min(k, m)
    lib = _heap_kernel() if kernel is not False and device.type == "cpu" and user_emb.dtype == torch.float32 else None
    if kernel and lib is None:
        raise RuntimeError("streaming_topk: the C top-k kernel is not available here (see the log)")
    chunk = max(1, n) if device.type != "cpu" else max(1, TILE_FLOATS // item_tile)
    buf = user_emb.new_empty(max(1, min(n, chunk) * min(max(item_tile, k), m)))   # the widest tile
    if train_mask_rows is not None:
        indptr, indices = (t.to(device=device, dtype=torch.long) for t in train_mask_rows)
    scores, items = [], []
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        mask = None
        if train_mask_rows is not None:
            a, b = int(indptr[c0]), int(indptr[c1])
            mask = (indptr[c0:c1 + 1] - a, indices[a:b])
        s, i = (_topk_heap(lib, user_emb[c0:c1], item_emb, mask, k, item_tile, buf) if lib is not None else
                _topk_pruned(user_emb[c0:c1], item_emb, mask, k, item_tile, buf, prune_block))
        scores.append(s)
        items.append(i)
    if not scores:
        return user_emb.new_empty((0, k)), torch.empty((0, k), dtype=torch.long, device=device)
    return torch.cat(scores), torch.cat(items)


@torch.no_grad()
def metric_sums(top_items: torch.Tensor, heldout_indptr, heldout_indices, ks) -> dict[str, float]:
    """Sums over the n users of Recall/NDCG/Precision/MAP @ each K in ``ks`` (docs/model.md §2 formulas).

    ``top_items`` [n, k'] is the ranking (best first); held-out sets are a CSR ``(indptr, indices)``
    local to these n users. Every user must have a non-empty held-out set (asserted). If k' < K the
    missing ranks count as misses.
    """
    device = top_items.device
    n, kp = top_items.shape
    indptr = torch.as_tensor(heldout_indptr, dtype=torch.long, device=device)
    indices = torch.as_tensor(heldout_indices, dtype=torch.long, device=device)
    t_len = indptr[1:] - indptr[:-1]
    assert bool((t_len > 0).all()), "metric_sums: every user needs at least one held-out item"
    if n == 0:
        return {f"{name}@{K}": 0.0 for K in ks for name in METRICS}
    kmax = max(ks)
    # membership of (user, item) in T_u via sorted keys user * M + item
    M = int(max(int(indices.max()), int(top_items.max()) if top_items.numel() else 0)) + 1
    users = torch.arange(n, device=device)
    held_keys = torch.sort(torch.repeat_interleave(users, t_len) * M + indices).values
    query = users[:, None] * M + top_items
    pos = torch.searchsorted(held_keys, query).clamp_(max=held_keys.numel() - 1)
    hits = torch.zeros(n, kmax, dtype=torch.float64, device=device)
    hits[:, :min(kp, kmax)] = (held_keys[pos] == query)[:, :kmax].double()

    ranks = torch.arange(1, kmax + 1, dtype=torch.float64, device=device)
    disc = 1.0 / torch.log2(ranks + 1)
    n_hits = hits.cumsum(1)                        # sum_{r<=K} h_r
    dcg = (hits * disc).cumsum(1)
    ap = (hits * n_hits / ranks).cumsum(1)         # sum_{r<=K} h_r * Precision@r
    cdisc = disc.cumsum(0)
    t = t_len.double()
    out = {}
    for K in ks:
        denom = t.clamp(max=K)
        idcg = cdisc[denom.long() - 1]
        per_user = {"recall": n_hits[:, K - 1] / t, "ndcg": dcg[:, K - 1] / idcg,
                    "precision": n_hits[:, K - 1] / K, "map": ap[:, K - 1] / denom}
        for name in METRICS:
            out[f"{name}@{K}"] = float(per_user[name].sum())
    return out


def finalize(sums: dict, count: int) -> dict:
    """Means over ``count`` users, rounded to 4 decimals (docs/model.md §2)."""
    return {key: round(value / count, 4) for key, value in sums.items()}


def keyed_user_sample(users: np.ndarray, m: int, seed: int, gather=None) -> np.ndarray:
    """The ``m`` users (sorted) with the smallest keyed 64-bit hash of (seed, user id): a uniform sample
    without replacement that does not depend on which process holds which users. ``gather`` (P processes,
    each with some of the users) returns every process' candidate hashes put together, so each keeps its
    users below the global m-th smallest."""
    h = rng.keyed_hash64(rng.stream_key(seed, 0, SAMPLE_STREAM), users)
    candidates = np.sort(h)[:m]
    if gather is not None:
        candidates = np.sort(gather(candidates))[:m]
    if len(candidates) < m:
        return users
    return users[h <= candidates[-1]]


class Evaluator:
    """Full-ranking evaluation of one held-out split (validation or test), built once from numpy pairs.

    Duplicate (user, item) pairs count once. Evaluated users: every distinct user of the held-out pairs,
    in ascending id order, processed ``batch_size`` users at a time — or, with ``max_users`` > 0, a fixed
    uniform sample of that many of them (:func:`keyed_user_sample`; every item is still ranked for each).
    A process that holds only some users (a partition) passes ``gather`` (see :func:`keyed_user_sample`)
    and gets its share of the same sample.
    """

    def __init__(self, num_users: int, num_items: int, train_users, train_items, heldout_users,
                 heldout_items, ks=(5, 10, 20, 50), batch_size: int = 4096, item_tile: int = ITEM_TILE,
                 max_users: int = 0, seed: int = 0, gather=None):
        self.num_users, self.num_items = num_users, num_items
        self.ks, self.batch_size, self.item_tile = tuple(ks), batch_size, item_tile
        self.users = distinct(np.asarray(heldout_users, np.int64))
        if max_users > 0:
            self.users = keyed_user_sample(self.users, max_users, seed, gather)
        # CSRs over the evaluated users only (row p: users[p]), nothing per user of the whole catalogue
        self.train_csr = _csr_over(self.users, num_items, train_users, train_items)
        self.heldout_csr = _csr_over(self.users, num_items, heldout_users, heldout_items)

    def _zero_sums(self) -> dict:
        return {f"{name}@{K}": 0.0 for K in self.ks for name in METRICS}

    def _users(self, user_subset, user_rows) -> np.ndarray:
        users = self.users if user_subset is None else np.intersect1d(self.users, user_subset)
        return users if user_rows is None else np.intersect1d(users, user_rows)

    @torch.no_grad()
    def evaluate(self, user_emb: torch.Tensor, item_emb: torch.Tensor, user_subset=None, user_rows=None):
        """Return ``(sums, count)`` over the evaluated users, or only those in ``user_subset``.

        ``user_subset`` (numpy array of user ids) is intersected with the evaluated users: ids without
        held-out items are ignored, so any partition of the user ids shards the evaluation exactly.
        ``user_rows`` (sorted user ids) says which user each row of ``user_emb`` holds when it is not the
        whole table (a rank's own users); it also restricts the evaluation to those users.
        """
        users = self._users(user_subset, user_rows)
        blocks = [(np.arange(item_emb.shape[0]), item_emb.to(user_emb.device))]   # moved once, not per batch
        sums = self._zero_sums()
        for start in range(0, len(users), self.batch_size):   # one user batch at a time: O(batch) memory
            part = self._ranked_sums(user_emb, [users[start:start + self.batch_size]], user_rows, blocks)
            sums = {key: sums[key] + value for key, value in part.items()}
        return sums, len(users)

    @torch.no_grad()
    def evaluate_blocks(self, user_emb: torch.Tensor, blocks, user_subset=None, user_rows=None):
        """:meth:`evaluate` with the items arriving in ``blocks``, an iterable of (sorted item ids, their E*
        rows) that together hold every item once (each rank's items passed round a ring,
        ``distributed.ring_topk``): each user's running top-K is merged block by block, so no process holds
        every item's row."""
        users = self._users(user_subset, user_rows)
        batches = [users[s:s + self.batch_size] for s in range(0, len(users), self.batch_size)]
        return self._ranked_sums(user_emb, batches, user_rows, blocks), len(users)

    def _ranked_sums(self, user_emb: torch.Tensor, batches: list, user_rows, blocks) -> dict:
        """Metric sums of the user ``batches`` ranked against every item of ``blocks`` (consumed once)."""
        rows = [b if user_rows is None else np.searchsorted(user_rows, b) for b in batches]
        at = [np.searchsorted(self.users, b) for b in batches]       # the batches' rows of the CSRs
        tops = topk_over_blocks(user_emb, at, rows, blocks, self.train_csr, max(self.ks), self.item_tile)
        sums = self._zero_sums()
        for batch, (_, top) in zip(at, tops):
            held = [torch.from_numpy(a).to(user_emb.device) for a in _csr_rows(*self.heldout_csr, batch)]
            for key, value in metric_sums(top, *held, self.ks).items():
                sums[key] += value
        return sums

    def evaluate_metrics(self, user_emb: torch.Tensor, item_emb: torch.Tensor) -> dict:
        return finalize(*self.evaluate(user_emb, item_emb))


def _block_mask(train_csr, batch: np.ndarray, ids: np.ndarray, device):
    """The users' training items that lie in the block ``ids``, as a CSR over block positions."""
    indptr, items = _csr_rows(*train_csr, batch)
    at = np.minimum(np.searchsorted(ids, items), len(ids) - 1)
    hit = ids[at] == items
    row = np.repeat(np.arange(len(batch)), np.diff(indptr))
    sub = np.zeros(len(batch) + 1, np.int64)
    np.cumsum(np.bincount(row[hit], minlength=len(batch)), out=sub[1:])
    return torch.from_numpy(sub).to(device), torch.from_numpy(at[hit]).to(device)


@torch.no_grad()
def topk_over_blocks(user_emb: torch.Tensor, batches: list, rows: list, blocks, train_csr, k: int,
                     item_tile: int) -> list:
    """Each user batch's top-k (scores, global item ids), training items masked, against every item of
    ``blocks`` — an iterable of (sorted item ids, E* rows) that together hold every item once, consumed once
    (a ring of ranks' blocks, ``distributed.ring_topk``, or a single block). ``batches[j]``: batch j's rows
    of ``train_csr`` (whose columns are item ids); ``rows[j]``: the rows of ``user_emb`` that hold them."""
    device = user_emb.device
    rows = [torch.from_numpy(np.asarray(r, np.int64)).to(device) for r in rows]
    best = [(user_emb.new_empty((len(b), 0)), torch.empty((len(b), 0), dtype=torch.long, device=device))
            for b in batches]
    for ids, emb in blocks:
        if not len(ids):
            continue
        ids_t, emb = torch.from_numpy(ids).to(device), emb.to(device)
        for j, batch in enumerate(batches):
            s, i = streaming_topk(user_emb[rows[j]], emb, _block_mask(train_csr, batch, ids, device), k, item_tile)
            scores, top = torch.cat([best[j][0], s], 1), torch.cat([best[j][1], ids_t[i]], 1)
            scores, pos = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            best[j] = (scores, torch.gather(top, 1, pos))
    return best


class EarlyStopping:
    """docs/model.md §2 model selection: a new best iff round(value, 4) is strictly greater than the best so far;
    ``should_stop`` once ``bad_epochs > patience`` (the 21st consecutive non-improving epoch for 20)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, value: float) -> bool:
        value = round(float(value), 4)
        if self.best_value is None or value > self.best_value:
            self.best_epoch, self.best_value, self.bad_epochs = epoch, value, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > self.patience

    def state_dict(self) -> dict:
        return {"patience": self.patience, "best_epoch": self.best_epoch,
                "best_value": self.best_value, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict) -> None:
        self.patience = int(d["patience"])
        self.best_epoch, self.best_value = d["best_epoch"], d["best_value"]
        self.bad_epochs = int(d["bad_epochs"])
