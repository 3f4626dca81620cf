"""Byte accounting of the sampled mode (docs/sampled.md, "bytes per step"): what a run holds and what a
step reads and writes besides activations."""
from __future__ import annotations

from lgmrec_dist.graph import graph_bytes

FLOAT = 4                                                          # bytes per float32


def _nb(t) -> int:
    return t.numel() * t.element_size()


def memory_bytes(sm) -> dict:
    """Bytes a :class:`~lgmrec_dist.sampled.step.SampledStep` holds for the run (fp32): what a step reads
    rows of, and what only full passes read."""
    m = sm.model
    return {"embeddings": _nb(m.user_embedding) + _nb(m.item_embedding), **sm.source.nbytes(),
            "full_graph": graph_bytes(m.graph),     # a rank's rows of it with sharded tables
            "sampler_graph": sm.sampler.graph_bytes()}


def step_bytes(sm, batch) -> dict:
    """What a step reads and writes besides activations, in bytes.

    embeddings: the E^(0) rows the blocks read, their gradient rows, and the optimizer's read+write of
    parameter and two moments (3 tensors × 2) over the rows it updates (the touched rows with
    sparse_embeddings, every row with dense Adam); features: Y_m rows of the seeds and the X_m / R·X_m
    rows behind the H̄ rows computed this step; graph: the block index tensors; dense: W_m, V_m with
    their gradients and Adam work; full_pass: 1 when this step ran a full-graph pass."""
    cfg, d = sm.cfg, sm.cfg.embedding_size
    rows = len(batch.input_ids)
    opt_rows = rows if cfg.sparse_embeddings else sm.num_users + sm.num_items
    dense = sum(p.numel() for p in sm.model.dense_parameters().values())
    y_row_bytes = sum(y.shape[1] * y.element_size() for y in sm.source.y.values())
    return {"embedding_rows": rows, "optimizer_rows": opt_rows,
            "embeddings": FLOAT * d * (2 * rows + 6 * opt_rows),
            "features": batch.num_seeds * y_row_bytes + sm.counts.get("logit_bytes", 0),
            "graph": batch.stats()["index_bytes"], "dense": FLOAT * 8 * dense,
            "full_pass": sm.counts.get("full_pass", 0)}
