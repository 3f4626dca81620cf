"""Synthetic MMRec-form catalogues with planted structure, and the MMRec per-user split rule.

* :func:`mmrec_split` -- the per-user split of docs/model.md §2 (MMRec ``preprocessing/1splitting``):
  each user's rows are shuffled; a user with n < 10 rows gets n-2 train, 1 valid, 1 test; otherwise
  h = floor(0.2 n) rows are held out, h // 2 valid and the rest test. Vectorised (no loop over users), so
  the Ray preparation job can reuse it on tens of millions of rows.
* :func:`make_mmrec_synthetic` -- writes an MMRec dataset folder (§3): ``<name>.inter`` (tab-separated,
  header ``userID itemID rating timestamp x_label``, ids dense and 0-based) and ``<modality>_feat.npy``
  (float32, row i = item i) for each modality.
* :func:`make_prepared_synthetic` -- the same, imported into a prepared dataset directory
  (:func:`data_prep.mmrec.import_mmrec`).

Planted structure, shared by interactions and features (so a model that reads the features can beat one
that does not):

* every item belongs to one of C latent clusters and has a latent vector z_i = centre[c_i] + noise;
* every user likes 1-3 random clusters, with Dirichlet(1) weights over them;
* user activity and item popularity are power laws (Zipf-like ranks, randomly permuted over ids;
  a user has at most 10x the mean number of interactions);
* each interaction: with probability 1 - eps the user draws a cluster from her preferences and an item
  of that cluster in proportion to its popularity, else an item from the global popularity (exploration);
* modality m's features = z @ W_m + Gaussian noise, with a different fixed random W_m per modality.

Guarantees: every user has >= 5 distinct items (so >= 1 valid and >= 1 test item under §2), no duplicate
(user, item) pair, every item id in [0, num_items) occurs at least once (so MMRec's ``max id + 1`` counts,
§1.1, give back num_users and num_items exactly), exactly ``num_interactions`` rows. Deterministic given
the seed; the interactions do not depend on ``modalities``.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from lgmrec_dist.dataset import DatasetError, atomic_directory, write_dataset
from lgmrec_dist.keys import distinct
from data_prep.mmrec import check_modality_name, feature_filename, import_mmrec, write_inter

__all__ = ["mmrec_split", "generate_synthetic", "make_mmrec_synthetic", "make_prepared_synthetic",
           "DEFAULT_MODALITIES", "MIN_USER_INTERACTIONS"]

DEFAULT_MODALITIES = {"image": 64, "text": 32}
MIN_USER_INTERACTIONS = 5          # the 5-core of the MMRec datasets (§3)
LATENT_DIM = 16
ITEM_LATENT_NOISE = 0.5            # spread of an item's latent vector around its cluster centre
FEATURE_NOISE = 0.5                # std of the noise added to each modality's features
PREF_MAX_CLUSTERS = 3              # a user likes 1..3 clusters
USER_ZIPF = 0.7                    # user activity ~ rank^-USER_ZIPF
ITEM_ZIPF = 0.8                    # item popularity ~ rank^-ITEM_ZIPF
USER_CAP = 10                      # no user has more than 10x the mean number of interactions
EXPLORE = 0.1                      # probability of an interaction outside the preferred clusters
_MAX_ROUNDS = 40


# --------------------------------------------------------------------------------------------------
# the split rule (§2)
# --------------------------------------------------------------------------------------------------

def mmrec_split(users: np.ndarray, n_users: int, rng) -> np.ndarray:
    """Per-user MMRec split labels (0 train, 1 valid, 2 test) for the rows ``users`` (§2).

    Each user's rows are put in a random order (from ``rng``, a ``np.random.Generator`` or a seed) and
    labelled train first, then valid, then test: n < 10 -> n-2 / 1 / 1; otherwise h = floor(0.2 n)
    held out, h // 2 valid, h - h // 2 test. As with the notebook's slicing, a user with 2 rows gets
    1 valid + 1 test and a user with 1 row gets 1 test. Returns int8 labels aligned with ``users``.
    O(n log n), no Python loop over users.
    """
    users = np.asarray(users)
    if users.ndim != 1:
        raise ValueError(f"users must be 1-D, got shape {users.shape}")
    users = users.astype(np.int64, copy=False)
    n = len(users)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    if users.min() < 0 or users.max() >= n_users:
        raise ValueError(f"user ids must lie in [0, {n_users}), got [{users.min()}, {users.max()}]")
    rng = np.random.default_rng(rng)
    return labels_by_rank(users, group_by_user(users, rng.permutation(n)), n_users)


def group_by_user(users: np.ndarray, pre: np.ndarray) -> np.ndarray:
    """Row indices grouped by user (ascending), keeping the order of ``pre`` within each user.

    The stable argsort of users[pre]; when user * n + position fits in int64 the same order comes from one
    plain sort of those (distinct) keys (~2x faster overall)."""
    n = len(users)
    if int(users.max()) < (2**62) // n:
        return pre[np.sort(users[pre] * n + np.arange(n, dtype=np.int64)) % n]
    return pre[np.argsort(users[pre], kind="stable")]


def labels_by_rank(users: np.ndarray, order: np.ndarray, n_users: int) -> np.ndarray:
    """MMRec split labels (0 train, 1 valid, 2 test) of rows ``users`` taken per user in the order ``order``
    (grouped by user, :func:`group_by_user`): the first rows train, then valid, then test (§2)."""
    n = len(users)
    counts = np.bincount(users, minlength=n_users)
    grouped = users[order]
    starts = np.cumsum(counts) - counts
    pos = np.arange(n, dtype=np.int64) - starts[grouped]     # rank of the row within its user
    cnt = counts[grouped]
    held = np.where(cnt < 10, 2, cnt // 5)                   # n // 5 == floor(0.2 n) for integers
    n_valid = np.where(cnt < 10, 1, held // 2)
    n_train = cnt - held
    lab = np.full(n, 2, dtype=np.int8)
    lab[pos < n_train + n_valid] = 1
    lab[pos < n_train] = 0
    labels = np.empty(n, dtype=np.int8)
    labels[order] = lab
    return labels


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------

def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Power-law weights rank^-exponent, ranks randomly permuted over the ids."""
    return (1.0 + rng.permutation(n)) ** -exponent


def _user_preferences(num_users: int, num_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """(U, C) preference rows: each user likes 1..PREF_MAX_CLUSTERS random clusters, Dirichlet(1) weights."""
    k_max = min(PREF_MAX_CLUSTERS, num_clusters)
    k = rng.integers(1, k_max + 1, num_users)
    liked = np.argsort(rng.random((num_users, num_clusters)), axis=1)[:, :k_max]   # distinct clusters
    w = rng.standard_exponential((num_users, k_max))                              # Dirichlet(1) ...
    w[np.arange(k_max)[None, :] >= k[:, None]] = 0.0                               # ... over the first k
    w /= w.sum(axis=1, keepdims=True)
    pref = np.zeros((num_users, num_clusters))
    np.put_along_axis(pref, liked, w, axis=1)
    return pref


def _allocate_counts(total: int, weights: np.ndarray, lo: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Integer counts in [lo, cap] summing to ``total``, the part above ``lo`` drawn in proportion to weights."""
    n = len(weights)
    counts = np.full(n, lo, dtype=np.int64)
    rest = total - lo * n
    if rest > 0:
        counts += rng.multinomial(rest, weights / weights.sum())
    for _ in range(20):
        over = int(np.maximum(counts - cap, 0).sum())
        if over == 0:
            break
        counts = np.minimum(counts, cap)
        w = weights * (counts < cap)
        counts += rng.multinomial(over, w / w.sum())
    over = int(np.maximum(counts - cap, 0).sum())
    if over:                                       # exact fill of the remaining room, in random order
        counts = np.minimum(counts, cap)
        order = rng.permutation(n)
        room = cap - counts[order]
        before = np.cumsum(room) - room
        counts[order] += np.clip(over - before, 0, room)
    return counts


def _grouped_cdf(groups: np.ndarray, weights: np.ndarray, n_groups: int):
    """For inverse-CDF sampling within groups: (order, flat) with ``flat`` = group + normalised cumsum.

    ``order`` sorts the members by group; ``searchsorted(flat, g + r, 'right')`` for r in [0, 1) gives the
    position in ``order`` of a member of group g drawn in proportion to its weight.
    """
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    w = weights[order].astype(np.float64)
    sizes = np.bincount(g, minlength=n_groups)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    cs = np.cumsum(w)
    base = np.concatenate([[0.0], cs])[starts]
    totals = cs[ends - 1] - base
    flat = (cs - base[g]) / totals[g]
    flat[ends - 1] = 1.0                           # exact 1 at the end of every group
    return order, flat + g


def _draw(flat: np.ndarray, group: np.ndarray, r: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(flat, group + r, side="right")
    return np.clip(pos, lo, hi)


def _sample_interactions(counts, pref, item_cluster, pop, rng):
    """Distinct (user, item) pairs, ``counts[u]`` for user u, following preferences and popularity."""
    U, C = pref.shape
    I = len(item_cluster)
    # users' cluster CDFs, flattened: row u holds u + cumsum(pref[u])
    cum = np.cumsum(pref, axis=1)
    cum /= cum[:, -1:]
    cum[:, -1] = 1.0
    flat_users = (cum + np.arange(U, dtype=np.float64)[:, None]).ravel()
    del cum
    item_order, flat_items = _grouped_cdf(item_cluster, pop, C)
    csize = np.bincount(item_cluster, minlength=C)
    cstart = np.cumsum(csize) - csize
    gcdf = np.cumsum(pop) / pop.sum()
    gcdf[-1] = 1.0

    keys = np.zeros(0, dtype=np.int64)
    need = counts.astype(np.int64).copy()
    for rnd in range(_MAX_ROUNDS):
        if not need.any():
            break
        su = np.repeat(np.arange(U, dtype=np.int64), need)
        s = len(su)
        # exploration grows in later rounds so that heavy users of small clusters fill up; the last
        # rounds draw uniformly
        eps = min(1.0, EXPLORE + (1.0 - EXPLORE) * rnd / 10)
        explore = rng.random(s) < eps
        items = np.empty(s, dtype=np.int64)
        pref_rows = ~explore
        if pref_rows.any():
            u = su[pref_rows]
            c = _draw(flat_users, u, rng.random(len(u)), u * C, u * C + C - 1) - u * C
            p = _draw(flat_items, c, rng.random(len(u)), cstart[c], cstart[c] + csize[c] - 1)
            items[pref_rows] = item_order[p]
        if explore.any():
            k = int(explore.sum())
            if rnd < 20:
                items[explore] = np.minimum(np.searchsorted(gcdf, rng.random(k), side="right"), I - 1)
            else:
                items[explore] = rng.integers(0, I, k)
        keys = distinct(np.concatenate([keys, su * I + items]))
        need = counts - np.bincount(keys // I, minlength=U)
    if need.any():                                 # stragglers (rare): uniform over the items they lack
        have = keys // I
        extra = []
        for u in np.flatnonzero(need):
            owned = keys[have == u] % I
            free = np.setdiff1d(np.arange(I, dtype=np.int64), owned, assume_unique=True)
            extra.append(u * I + rng.choice(free, size=need[u], replace=False))
        keys = distinct(np.concatenate([keys, *extra]))
    return keys // I, keys % I


def _cover_items(users, items, item_cluster, num_items, rng):
    """Make every item occur: a missing item takes over a row of a more popular item of its own cluster.

    The row's user keeps an item of the same cluster, so the preference structure is preserved; the
    donor item keeps >= 1 row; the (user, new item) pair cannot be a duplicate since the item had no row.
    """
    items = items.copy()
    count = np.bincount(items, minlength=num_items)
    row_cluster = item_cluster[items]
    rows_by_cluster = np.argsort(row_cluster, kind="stable")   # swaps keep a row's cluster: stays valid
    C = int(item_cluster.max()) + 1
    rsize = np.bincount(row_cluster, minlength=C)
    rstart = np.cumsum(rsize) - rsize
    for _ in range(100):
        missing = np.flatnonzero(count == 0)
        if len(missing) == 0:
            return items
        c = item_cluster[missing]
        ok = rsize[c] > 0
        missing, c = missing[ok], c[ok]
        if len(missing) == 0:
            break
        rows = rows_by_cluster[rstart[c] + (rng.random(len(c)) * rsize[c]).astype(np.int64)]
        donor = items[rows]
        accept = count[donor] >= 2
        _, first_row = np.unique(rows, return_index=True)
        _, first_donor = np.unique(donor, return_index=True)
        keep = np.zeros(len(rows), dtype=bool)
        keep[np.intersect1d(first_row, first_donor)] = True
        accept &= keep
        rows, donor, missing = rows[accept], donor[accept], missing[accept]
        items[rows] = missing
        np.subtract.at(count, donor, 1)
        count[missing] += 1
    # last resort (a cluster whose items are all used once): take a row of the most used item
    for j in np.flatnonzero(count == 0):
        d = int(np.argmax(count))
        row = int(np.flatnonzero(items == d)[0])
        items[row] = j
        count[d] -= 1
        count[j] += 1
    return items


def generate_synthetic(num_users: int = 1000, num_items: int = 500, num_interactions: int = 20000,
                       modalities: dict[str, int] = DEFAULT_MODALITIES, seed: int = 0,
                       num_clusters: int | None = None) -> dict:
    """Generate a synthetic catalogue in memory (see the module docstring for the model).

    Returns a dict with ``users``, ``items`` (int64, grouped by user), ``split`` (int8, §2), ``rating``
    (float64), ``timestamp`` (int64), ``features`` ({name: float32 (num_items, dim)}) and the planted
    truth: ``item_cluster`` (int64), ``item_latent`` (float64 (num_items, 16)), ``user_pref``
    (float64 (num_users, C)).
    """
    U, I, N = int(num_users), int(num_items), int(num_interactions)
    lo = MIN_USER_INTERACTIONS
    if U < 1:
        raise ValueError("num_users must be >= 1")
    if I < lo:
        raise ValueError(f"num_items must be >= {lo} (every user needs {lo} distinct items)")
    if N < lo * U:
        raise ValueError(f"num_interactions must be >= {lo} * num_users = {lo * U}")
    if N < I:
        raise ValueError(f"num_interactions ({N}) must be >= num_items ({I}) so that every item occurs")
    if N > U * I:
        raise ValueError(f"num_interactions ({N}) exceeds num_users * num_items ({U * I})")
    modalities = dict(modalities)
    if not modalities:
        raise ValueError("at least one modality is required")
    for name, dim in modalities.items():
        check_modality_name(name, "modalities")
        if int(dim) != dim or dim < 1:
            raise ValueError(f"modality {name!r}: dimension must be a positive integer, got {dim!r}")
    C = int(num_clusters) if num_clusters else int(np.clip(round(math.sqrt(I) / 2), 2, 64))
    C = max(1, min(C, I))

    s_struct, s_inter, s_split, s_meta, s_feat = np.random.SeedSequence(seed).spawn(5)
    rng = np.random.default_rng(s_struct)
    centres = rng.standard_normal((C, LATENT_DIM))
    item_cluster = rng.permutation(np.arange(I, dtype=np.int64) % C)       # balanced clusters
    item_latent = centres[item_cluster] + ITEM_LATENT_NOISE * rng.standard_normal((I, LATENT_DIM))
    pop = _zipf_weights(I, ITEM_ZIPF, rng)
    pref = _user_preferences(U, C, rng)
    activity = _zipf_weights(U, USER_ZIPF, rng)

    rng = np.random.default_rng(s_inter)
    cap = min(I, max(lo, math.ceil(USER_CAP * N / U)))        # heaviest user: USER_CAP x the mean
    counts = _allocate_counts(N, activity, lo, cap, rng)
    users, items = _sample_interactions(counts, pref, item_cluster, pop, rng)
    items = _cover_items(users, items, item_cluster, I, rng)

    split = mmrec_split(users, U, np.random.default_rng(s_split))
    order = np.lexsort((split, users))            # grouped by user, train then valid then test
    users, items, split = users[order], items[order], split[order]

    rng = np.random.default_rng(s_meta)
    rating = rng.integers(1, 6, len(users)).astype(np.float64)
    timestamp = 1_400_000_000 + rng.integers(0, 100_000_000, len(users))

    features = {}
    for (name, dim), ss in zip(modalities.items(), s_feat.spawn(len(modalities))):
        frng = np.random.default_rng(ss)
        W = frng.standard_normal((LATENT_DIM, int(dim))) / math.sqrt(LATENT_DIM)
        x = item_latent @ W + FEATURE_NOISE * frng.standard_normal((I, int(dim)))
        features[name] = x.astype(np.float32)
    return {"users": users, "items": items, "split": split, "rating": rating, "timestamp": timestamp,
            "features": features, "item_cluster": item_cluster, "item_latent": item_latent, "user_pref": pref,
            "num_users": U, "num_items": I}


def make_mmrec_synthetic(out_dir: str | Path, num_users: int = 1000, num_items: int = 500,
                         num_interactions: int = 20000, modalities: dict[str, int] = DEFAULT_MODALITIES,
                         seed: int = 0, name: str = "synthetic", overwrite: bool = False,
                         num_clusters: int | None = None) -> Path:
    """Write a synthetic MMRec folder (§3): ``<name>.inter`` and ``<modality>_feat.npy`` per modality.

    ``out_dir`` must not exist (unless ``overwrite``); it is written atomically. Returns ``out_dir``.
    """
    check_modality_name(name, "name")
    data = generate_synthetic(num_users, num_items, num_interactions, modalities, seed, num_clusters)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite) as tmp:
        write_inter(tmp / f"{name}.inter", data["users"], data["items"], data["split"],
                    data["rating"], data["timestamp"])
        for modality, x in data["features"].items():
            np.save(tmp / feature_filename(modality), x)
    return out_dir


def make_prepared_synthetic(out_dir: str | Path, num_users: int = 1000, num_items: int = 500,
                            num_interactions: int = 20000, modalities: dict[str, int] = DEFAULT_MODALITIES,
                            seed: int = 0, name: str = "synthetic", overwrite: bool = False,
                            num_clusters: int | None = None) -> Path:
    """Make a synthetic MMRec folder in a temporary directory and import it into ``out_dir``.

    The manifest records ``source: "synthetic"`` and the generation parameters. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DatasetError(f"{out_dir} already exists (pass --overwrite to replace it)")
    modalities = dict(modalities)
    params = {"num_users": int(num_users), "num_items": int(num_items),
              "num_interactions": int(num_interactions), "modalities": {k: int(v) for k, v in modalities.items()},
              "seed": int(seed), "name": name, "num_clusters": num_clusters}
    with tempfile.TemporaryDirectory(prefix="lgmrec-synth-") as tmp:
        src = make_mmrec_synthetic(Path(tmp) / name, num_users, num_items, num_interactions, modalities,
                                   seed, name, num_clusters=num_clusters)
        import_mmrec(src / f"{name}.inter", {m: src / feature_filename(m) for m in modalities}, out_dir,
                     overwrite=overwrite, manifest_extra={"source": "synthetic", "synthetic": params})
    return out_dir


def write_subset(out_dir: str | Path, data: dict, users: np.ndarray, items: np.ndarray, order_seed: int,
                 dims: dict[str, int] | None = None) -> Path:
    """A prepared dataset of the interactions of some original users and items of ``generate_synthetic``
    output, renumbered in a shuffled order, with raw ids ``u<orig>`` / ``i<orig>``: two calls give two id
    maps over the same raw ids (an older and a grown log, as warm-start retraining meets them).
    ``dims`` keeps the first columns of each modality's features."""
    rng = np.random.default_rng(order_seed)
    users, items = rng.permutation(users), rng.permutation(items)
    upos = np.full(int(data["users"].max()) + 1, -1)
    upos[users] = np.arange(len(users))
    ipos = np.full(int(data["items"].max()) + 1, -1)
    ipos[items] = np.arange(len(items))
    keep = (upos[data["users"]] >= 0) & (ipos[data["items"]] >= 0)
    feats = {m: x[items] if dims is None else x[items][:, :dims[m]] for m, x in data["features"].items()}
    write_dataset(out_dir, users=upos[data["users"][keep]], items=ipos[data["items"][keep]],
                  split=data["split"][keep], num_users=len(users), num_items=len(items), features=feats,
                  user_raw_ids=np.array([f"u{u}" for u in users]), item_raw_ids=np.array([f"i{i}" for i in items]))
    return Path(out_dir)
