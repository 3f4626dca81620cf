"""Large-catalogue mode (docs/sampled.md): LGMRec steps whose cost follows the batch and the
fanouts, not |U| + |I|. ``mode: sampled`` in the config; the exact mode stays the default and the
reference.

A step of :class:`SampledStep` (applied to the one ``LGMRec``) reads only:

* **CGE** (docs/model.md) on the DGL neighbour-sampled blocks of the batch's nodes
  (:mod:`lgmrec_dist.sampling`): E^(0) rows of the sampled L-hop nodes, Ĝ's full-graph-degree weights
  rescaled by deg/k where only k of deg neighbours were sampled (unbiased per layer);
* **MGE**: the batch rows of the precomputed Y_m = Ĝ^K [P·X_m ; X_m], times W_m (exact);
* **GHE**: the batch rows' hyperedge dependencies, from X_m[items]·V_m and (R·X_m)[users]·V_m
  (R·X_m precomputed once: Z_U = R·X·V = (R·X)·V; or, with ``user_feature_table`` false, summed from the
  users' item rows X_m[i]·V_m each step, without the |U| × d_m table), with the keyed Gumbel noise and
  dropout masks of the exact model. The A × d hyperedge messages M^m need every item:
  ``hyper_refresh_steps`` r = 0 computes them with gradient at every step (exact), r ≥ 1 recomputes
  them from a full pass (no gradient) at steps where the cached ones are r' steps old and holds their
  value in between (r' = max(r, ⌈steps per epoch / ``hyper_refreshes_per_epoch``⌉): a bounded number of
  full passes per epoch, docs/sampled.md "Refreshes scheduled by catalogue size"); with
  ``hyper_message_update`` each step replaces its own items' contributions to the held sums
  (:mod:`lgmrec_dist.sampled.held_messages`), with ``hyper_message_grad`` their gradient is still
  estimated each step from the batch's negative items (straight-through, :func:`straight_through_message`);
* **HCL**: ``hcl_negatives`` "all" (exact all-user / all-item denominators), "in_batch" (the batch's
  other anchors, Horvitz-Thompson weighted by their inclusion probability), "uniform"
  (``hcl_num_negatives`` uniform draws, weighted |U|/K resp. |I|/K: the log-q correction); the positive
  pair is always in the denominator with weight 1;
* **embedding tables**: ``sparse_embeddings`` true gathers the step's rows into leaf tensors and updates
  them with :class:`RowAdam` (lazy Adam: only touched rows and their moments change, O(rows · d) work);
  false keeps dense gradients and dense Adam over the whole tables, as the exact mode.

With fanouts [-1], r = 0, "all" and dense Adam the step equals the exact model's (tests/test_sampled.py),
in one process and on P ranks (:class:`SampledEngine`, data-parallel with replicated parameters; with
``shard_tables`` the tables are row-sharded instead, :mod:`lgmrec_dist.distributed.tables`).
Evaluation uses the exact inference of the same model: full-graph (``LGMRec.final_embeddings``), or with
sharded tables the model as the exact distributed mode builds it (``distributed.parallelize``), of each
rank's own rows.

Modules: ``step`` (the step, :class:`SampledStep`), ``estimators`` (sampled CGE, contrastive
denominators, straight-through message gradient), ``held_messages`` (messages carried across steps),
``row_adam`` (lazy Adam), ``accounting`` (bytes held and per step), ``engine`` (:class:`SampledEngine`).
"""
from lgmrec_dist.sampled.engine import SampledEngine
from lgmrec_dist.sampled.estimators import (cge_on_blocks, sampled_logsumexp, straight_through_message,
                                            uniform_negatives)
from lgmrec_dist.sampled.step import SampledStep
from lgmrec_dist.sampled.row_adam import RowAdam

__all__ = ["RowAdam", "SampledEngine", "SampledStep", "cge_on_blocks", "sampled_logsumexp",
           "straight_through_message", "uniform_negatives"]
