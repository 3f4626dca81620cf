"""A trained run held in memory for queries (docs/serving.md): top-K for known users by raw id, for new
users from a history (fold-in), and embeddings of new items from their features.

Scoring is that of ``lgmrec recommend`` and ``lgmrec export`` (``export.recommend_users``: inner
product with the fused item embeddings, exclusions masked, item tiles); with an ANN index
(``lgmrec_dist.ann``) the candidates come from the index instead and the exclusions are filtered out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lgmrec_dist.dataset import TRAIN, DatasetError
from lgmrec_dist.evaluation import MASK_SCORE, _csr_from_pairs
from lgmrec_dist.export import cold_start_embeddings, load_trained, recommend_users


class UnknownIds(DatasetError):
    """Raw ids that the run's dataset does not hold."""


class Recommender:
    """Fused embeddings, training items and id maps of a run; ``fold``/``model`` absent for bare tables."""

    def __init__(self, user_emb: torch.Tensor, item_emb: torch.Tensor, train_csr, user_raw: list, item_raw: list,
                 model=None, fold=None, ann=None):
        self.user_emb, self.item_emb, self.train_csr = user_emb, item_emb, train_csr
        self.user_raw, self.item_raw = user_raw, item_raw
        # raw ids arrive as text (query strings) or JSON numbers: both are matched by their text, as
        # `lgmrec recommend --user` does
        self.user_index = {str(r): i for i, r in enumerate(user_raw)}
        self.item_index = {str(r): i for i, r in enumerate(item_raw)}
        self.model, self.fold, self.ann = model, fold, ann
        # an index may hold cold-start items after the run's catalogue (export --cold-items)
        if ann is not None and [str(r) for r in ann.item_raw[:len(item_raw)]] != [str(r) for r in item_raw]:
            raise DatasetError(f"{ann.path}: the index's item id map differs from the run's items")

    @classmethod
    def from_run(cls, run_dir: str | Path, ann_dir: str | Path | None = None) -> "Recommender":
        from lgmrec_dist.foldin import FoldIn
        model, ds = load_trained(run_dir)
        user_emb, item_emb = model.final_embeddings()
        tu, ti = ds.pairs(TRAIN)
        ann = None
        if ann_dir is not None:
            from lgmrec_dist.ann import AnnIndex
            ann = AnnIndex.load(ann_dir)
        return cls(user_emb, item_emb, _csr_from_pairs(ds.num_users, ds.num_items, tu, ti),
                   ds.raw_ids("user").to_pylist(), ds.raw_ids("item").to_pylist(), model, FoldIn(model), ann)

    @property
    def num_items(self) -> int:
        return self.item_emb.shape[0]

    def user_row(self, raw) -> int:
        row = self.user_index.get(str(raw))
        if row is None:
            raise UnknownIds(f"user {raw!r} is not in the run's dataset")
        return row

    def item_rows(self, raws: list) -> np.ndarray:
        rows = [self.item_index.get(str(r)) for r in raws]
        missing = [r for r, i in zip(raws, rows) if i is None]
        if missing:
            raise UnknownIds(f"{len(missing)} item id(s) not in the run's dataset, e.g. {missing[:5]}")
        return np.asarray(rows, np.int64)

    def _top(self, query: torch.Tensor, exclude_csr, k: int) -> list[tuple]:
        """[(rank, raw item, score)] for one query row with the items of CSR row 0 excluded."""
        if self.ann is None:
            scores, items = recommend_users(np.zeros(1, np.int64), query, self.item_emb, exclude_csr, k)
            pairs, raw = zip(items[0].tolist(), scores[0].tolist()), self.item_raw
        else:  # candidates from the index, then the exclusions filtered out
            excluded = set(exclude_csr[1][exclude_csr[0][0]:exclude_csr[0][1]].tolist())
            s, i = self.ann.search(query.numpy(), k + len(excluded))
            pairs = [(int(a), float(b)) for a, b in zip(i[0], s[0]) if a >= 0 and int(a) not in excluded][:k]
            raw = self.ann.item_raw
        return [(r + 1, raw[i], float(s)) for r, (i, s) in enumerate(pairs) if s > MASK_SCORE / 2]

    def recommend_user(self, raw, k: int) -> list[tuple]:
        """Top-k for a known user, training items excluded (= ``lgmrec recommend``)."""
        u = self.user_row(raw)
        indptr, indices = self.train_csr
        row = (np.array([0, indptr[u + 1] - indptr[u]]), indices[indptr[u]:indptr[u + 1]])
        return self._top(self.user_emb[u:u + 1], row, k)

    def fold_in(self, raw_items: list) -> tuple[torch.Tensor, np.ndarray]:
        """(e*_u as a 1 × d row, the history's dense item ids) for a new user (``foldin``)."""
        if self.fold is None:
            raise DatasetError("this service holds no model: fold-in needs a run (lgmrec serve --run)")
        items = np.unique(self.item_rows(raw_items))
        return self.fold.user_embeddings([items]), items

    def recommend_history(self, raw_items: list, k: int) -> list[tuple]:
        """Top-k for a new user from its history, the history's items excluded."""
        query, items = self.fold_in(raw_items)
        return self._top(query, _csr_from_pairs(1, self.num_items, np.zeros(len(items), np.int64), items), k)

    def embed_items(self, feats: dict[str, np.ndarray]) -> torch.Tensor:
        """Cold-start item embeddings (= ``lgmrec embed-items``)."""
        if self.model is None:
            raise DatasetError("this service holds no model: item embedding needs a run (lgmrec serve --run)")
        return cold_start_embeddings(self.model, feats)
