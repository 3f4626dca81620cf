"""Approximate nearest-neighbour item index over the fused item embeddings E*_I (docs/serving.md "ANN").

Scores are inner products u·E*_i, as in exact scoring (docs/model.md: ŷ(u, i) = e*_u · e*_i), so both
indexes use faiss's inner-product metric and store the full vectors (the returned scores are exact; only
the candidate set is approximate):

* ``faiss``: IVF-Flat — k-means into nlist = 4·√|I| lists, ``nprobe`` lists scanned per query;
* ``hnsw``: HNSW-Flat (M = 32), ``efSearch`` candidates kept per query.

The search parameter is not assumed: :func:`build` raises it until recall@20 against the exact top-20
reaches ``target`` on held-out queries (or the largest value is reached), and stores what it measured.

    DIR/index.faiss   the faiss index            DIR/items.parquet  raw_id, row i = index id i
    DIR/ann.json      kind, parameters, num_items, dim, recall@20 per search setting, the chosen one
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lgmrec_dist.dataset import DatasetError, atomic_directory, atomic_write_json

KINDS = ("faiss", "hnsw")
RECALL_K = 20
SEARCH_SETTINGS = {"faiss": [1, 2, 4, 8, 16, 32, 64, 128, 256], "hnsw": [16, 32, 64, 128, 256, 512, 1024]}


def _faiss():
    try:
        import faiss
    except ImportError:
        raise DatasetError("the ANN index needs faiss (pip install 'lgmrec_dist[ann]')") from None
    return faiss


def exact_top(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k item rows by inner product (the scoring of ``evaluation.streaming_topk``)."""
    import torch
    from lgmrec_dist.evaluation import streaming_topk
    _, top = streaming_topk(torch.from_numpy(queries), torch.from_numpy(items), None, k)
    return top.numpy()


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / |exact| (rows of item ids; -1 = no result)."""
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


class AnnIndex:
    def __init__(self, index, kind: str, item_raw: list, info: dict, path: Path | None = None):
        self.index, self.kind, self.item_raw, self.info, self.path = index, kind, item_raw, info, path

    def search(self, queries: np.ndarray, k: int, setting: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item rows) of the approximate top-k, best first (-1 pads when fewer are found).

        The search setting travels with the call (faiss SearchParameters), not in the shared index, so
        concurrent requests never change each other's setting."""
        faiss = _faiss()
        setting = int(self.info["search"] if setting is None else setting)
        if self.kind == "faiss":
            params = faiss.SearchParametersIVF(nprobe=setting)
        else:  # HNSW keeps efSearch candidates: a k above it would be cut off there
            params = faiss.SearchParametersHNSW(efSearch=max(setting, k))
        return self.index.search(np.ascontiguousarray(queries, np.float32), k, params=params)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        faiss = _faiss()
        out = Path(out)
        with atomic_directory(out, overwrite) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            pq.write_table(pa.table({"raw_id": pa.array(self.item_raw)}), tmp / "items.parquet")
            atomic_write_json(tmp / "ann.json", self.info)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "AnnIndex":
        faiss, path = _faiss(), Path(path)
        if not (path / "ann.json").is_file():
            raise DatasetError(f"{path}: not an item index (no ann.json); build one with `lgmrec export --ann`")
        info = json.loads((path / "ann.json").read_text())
        index = faiss.read_index(str(path / "index.faiss"))
        item_raw = pq.read_table(path / "items.parquet")["raw_id"].to_pylist()
        if index.ntotal != len(item_raw) or index.ntotal != info["num_items"]:
            raise DatasetError(f"{path}: index holds {index.ntotal} items, items.parquet {len(item_raw)}")
        return cls(index, info["kind"], item_raw, info, path)


def build(item_emb: np.ndarray, item_raw: list, kind: str, queries: np.ndarray, target: float = 0.95,
          seed: int = 0, threads: int = 0) -> AnnIndex:
    """Build a ``kind`` index over ``item_emb`` and choose its search setting on ``queries`` (module doc)."""
    faiss = _faiss()
    if kind not in KINDS:
        raise DatasetError(f"--ann: unknown index kind {kind!r}; one of {list(KINDS)}")
    if threads:
        faiss.omp_set_num_threads(threads)
    x = np.ascontiguousarray(item_emb, np.float32)
    n, d = x.shape
    if kind == "faiss":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants ≥ 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        # k-means on a sample: 64 points per list place the centroids as well as all |I| at a fraction of the cost
        sample = np.random.default_rng(seed).permutation(n)[:64 * nlist]
        index.train(x[np.sort(sample)])
        params = {"nlist": nlist}
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        params = {"M": 32, "efConstruction": 80}
    index.add(x)
    # the setting is chosen on half the queries and its recall reported on the other half
    q = np.ascontiguousarray(queries, np.float32)
    tune, check = (q[::2], q[1::2]) if len(q) > 1 else (q, q)
    k = min(RECALL_K, n)
    exact_tune, exact_check = exact_top(tune, x, k), exact_top(check, x, k)
    ann = AnnIndex(index, kind, item_raw, {"search": 1})
    settings = [s for s in SEARCH_SETTINGS[kind] if kind == "hnsw" or s <= params["nlist"]] or [1]
    tuned = {}
    for s in settings:
        tuned[s] = recall_at(ann.search(tune, k, s)[1], exact_tune)
        if tuned[s] >= target:
            break
    chosen = next((s for s, r in tuned.items() if r >= target), max(tuned, key=tuned.get))
    ann.info = {"kind": kind, **params, "num_items": n, "dim": d, "metric": "inner_product",
                "search_param": "nprobe" if kind == "faiss" else "efSearch", "search": chosen,
                f"recall@{RECALL_K}": recall_at(ann.search(check, k, chosen)[1], exact_check),
                "recall_target": target, "num_queries": len(check),
                f"recall@{RECALL_K}_tuning": {str(s): r for s, r in tuned.items()}}
    return ann
