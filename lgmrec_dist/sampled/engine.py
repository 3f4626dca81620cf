"""The engine of ``mode: sampled`` (docs/sampled.md): one process, or P ranks with replicated or row-sharded
tables; the model is the one :class:`~lgmrec_dist.model.LGMRec`, its steps :class:`~lgmrec_dist.sampled.step.SampledStep`."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from lgmrec_dist.batches import TripleSampler
from lgmrec_dist.config import Config
from lgmrec_dist.dataset import TRAIN, PreparedDataset
from lgmrec_dist.dataset_parts import PartitionData
from lgmrec_dist.distributed.engine import ownership_for
from lgmrec_dist.distributed.exchange import CommStats, all_gather_rows
from lgmrec_dist.distributed.payload import model_payload
from lgmrec_dist.distributed.reduce import global_metrics, global_terms, replicate_dense, sync_gradients
from lgmrec_dist.distributed.ring_topk import ring_blocks
from lgmrec_dist.engine import EngineState
from lgmrec_dist.evaluation import Evaluator
from lgmrec_dist.sampled.step import SampledStep
from lgmrec_dist.sampled.row_adam import RowAdam
from lgmrec_dist.sampling import Prefetcher, rank_slice

log = logging.getLogger("lgmrec")


class SampledEngine(EngineState):
    """The training engine of ``mode: sampled`` (the interface of ``lgmrec_dist.engine``).

    One process, or P ranks (``ctx``, a torchrun launch) in data-parallel form: every rank holds the whole
    model (parameters replicated, identical), takes its contiguous slice of each global batch, samples the
    blocks of its slice, and computes its share of the global loss. After backward the ranks sum the dense
    gradients (one all-reduce of W_m, V_m) and exchange the embedding-row gradients of the rows they
    touched (an all-gather of (row id, gradient) pairs: traffic proportional to the touched rows with
    ``sparse_embeddings``; a whole-table all-reduce without); every rank then applies the same update.
    Full passes (message refreshes, inference) run on every rank. Evaluation shards the users over ranks.
    With ``shard_tables`` the embedding and feature tables are row-sharded instead of replicated
    (:mod:`lgmrec_dist.distributed.tables`; ownership as the exact mode: prep's partitions for this many
    ranks, else contiguous ranges).
    """

    def __init__(self, cfg: Config, ds: PreparedDataset, device: torch.device, ctx=None,
                 partition: np.ndarray | None = None):
        self.cfg, self.device, self.ctx = cfg, device, ctx
        self.rank, self.world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        # a partition's rank (``PartitionData``): its edges and feature rows only, blocks sampled across ranks
        partitioned = isinstance(ds, PartitionData)
        tu, ti = (ds.train_users, ds.train_items) if partitioned else ds.pairs(TRAIN)
        own = (ownership_for(ds, cfg, self.rank, self.world, partition) if cfg.shard_tables and self.world > 1
               else None)
        self.sampled = SampledStep(cfg, ds.num_users, ds.num_items, ds.manifest["modalities"], tu, ti,
                                   ds.features, device, own, partitioned)
        self.sampled.world = self.world
        params = self.module = self.model = self.sampled.model
        self.dense_params = list(params.dense_parameters().values())
        # W_m, V_m are replicated on every rank: DDP sums their gradients during backward (bucketed, overlapped)
        self.dense = replicate_dense(params)
        self.row_adam = None
        if cfg.sparse_embeddings:
            self.row_adam = RowAdam({"user_embedding": params.user_embedding.data,
                                     "item_embedding": params.item_embedding.data}, cfg.learning_rate)
            self.optimizers = [torch.optim.Adam(self.dense_params, lr=cfg.learning_rate)] if self.dense_params else []
        else:
            self.optimizers = [torch.optim.Adam(params.parameters(), lr=cfg.learning_rate)]
        mem = self.sampled.memory_bytes()
        log.info("sampled mode: fanouts %s, message refresh every %d steps, hcl_negatives %s, sparse_embeddings %s, "
                 "%d rank(s); held per rank: %s", self.sampled.sampler.fanouts, self.sampled.refresh_interval,
                 cfg.hcl_negatives, cfg.sparse_embeddings, self.world,
                 ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in mem.items()))
        # a partition's sampler is a collective: it samples in the training process, not in workers
        triples = None if partitioned else TripleSampler(ds.num_items, tu, ti, cfg.seed)
        self.prefetcher = Prefetcher(self.sampled.sampler, triples, cfg.train_batch_size,
                                     0 if partitioned else cfg.sampler_workers, rank=self.rank, world=self.world)
        self.last_stats: dict = {}
        self._logged = False

    def num_parameters(self) -> int:
        m = self.model
        if self.sampled.tables is None:
            return m.num_parameters()
        held = m.user_embedding.numel() + m.item_embedding.numel()      # this rank's rows of the tables
        return m.num_parameters() - held + (m.num_users + m.num_items) * self.cfg.embedding_size

    def train(self):
        self.model.train()

    def step(self, users, pos, neg, step: int) -> dict:
        t0 = time.perf_counter()
        global_size = len(users)
        users, pos, neg = (rank_slice(t, self.rank, self.world) for t in (users, pos, neg))
        batch = self.prefetcher.get(users, pos, neg, step)
        t1 = time.perf_counter()
        self.start_dense_reduction()
        terms = self.sampled.batch_loss(users, pos, neg, step, batch, global_size)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        sent = self._sync_gradients() if self.world > 1 else 0
        for opt in self.optimizers:
            opt.step()
        if self.row_adam is not None:
            tables = {"user_embedding": self.model.user_embedding, "item_embedding": self.model.item_embedding}
            for name, rows, grad in self._row_gradients():
                # sharded tables: every owner steps every table each step (the shared step counter t)
                if len(rows) or self.sampled.tables is not None:
                    self.row_adam.step(name, tables[name].data, rows, grad)
        self.sampled.leaves = []
        out = global_terms(terms)
        self.last_stats = {"sample_wait_s": t1 - t0, "compute_s": time.perf_counter() - t1, **batch.stats(),
                           "bytes": {**self.sampled.step_bytes(batch), "sent_to_other_ranks": sent}}
        if not self._logged:
            self._logged = True
            b = self.last_stats["bytes"]
            log.info("sampled step: %d seeds, %d input nodes, %d block edges; bytes: embeddings %.1f MB, "
                     "features %.1f MB, graph %.1f MB, dense %.1f MB, sent to other ranks %.1f MB", batch.num_seeds,
                     len(batch.input_ids), self.last_stats["edges"], b["embeddings"] / 1e6, b["features"] / 1e6,
                     b["graph"] / 1e6, b["dense"] / 1e6, sent / 1e6)
        return out

    # ------------------------------------------------------------------ P ranks
    def _sync_gradients(self) -> int:
        """Sum the ranks' embedding gradients (the dense ones were summed by DDP during backward): by
        all-gathering the (row, gradient) pairs each rank touched (``sparse_embeddings``) or all-reducing the
        whole tables. Returns the payload bytes this rank sent, with the feature-table exchanges of the step."""
        m = self.model
        if not self.cfg.sparse_embeddings:
            sync_gradients([m.user_embedding, m.item_embedding])
        if self.cfg.sparse_embeddings and self.sampled.tables is None:
            gathered = []
            for name, rows, leaf in self.sampled.leaves:
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                all_rows, all_grads = all_gather_rows(rows), all_gather_rows(grad)   # counted in CommStats
                union, inverse = torch.unique(torch.cat(all_rows), return_inverse=True)
                total = torch.zeros(len(union), grad.shape[1], dtype=grad.dtype, device=grad.device)
                total.index_add_(0, inverse, torch.cat(all_grads))
                gathered.append((name, union, total))
            self._synced_rows = gathered
        return CommStats.take()

    def _row_gradients(self):
        if self.sampled.tables is not None:          # the owner's rows, gradients of every rank already summed
            return [(name, rows, leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
                    for name, rows, leaf in self.sampled.leaves]
        if self.world > 1:
            rows, self._synced_rows = self._synced_rows, []
            return rows
        return [(name, rows, leaf.grad) for name, rows, leaf in self.sampled.leaves if leaf.grad is not None]

    # ------------------------------------------------------------------ inference, state
    def embeddings(self):
        m = self.model
        m.eval()
        emb = m.final_embeddings()
        if self.sampled.tables is not None:       # this rank's rows: (user ids, E*, item ids, E*)
            return m.user_ids.cpu().numpy(), emb[0], m.item_ids.cpu().numpy(), emb[1]
        return emb

    def evaluate(self, evaluator: Evaluator, emb) -> dict:
        """Users sharded over ranks (every P-th; with sharded tables each rank's own, items round the ring),
        sums and counts reduced: equal to one process."""
        if self.world == 1:
            return evaluator.evaluate_metrics(*emb)
        if self.sampled.tables is not None:
            user_ids, user_emb, item_ids, item_emb = emb
            sums = evaluator.evaluate_blocks(user_emb, ring_blocks(item_ids, item_emb), user_rows=user_ids)
            return global_metrics(*sums, self.device)
        mine = np.arange(self.rank, self.sampled.num_users, self.world)
        return global_metrics(*evaluator.evaluate(*emb, user_subset=mine), self.device)

    def extra_state(self) -> dict:
        return {"row_adam": self.row_adam.state_dict() if self.row_adam else None,
                "message_cache": _moved(self.sampled.cache, torch.device("cpu"))}

    def load_extra_state(self, state: dict) -> None:
        if self.row_adam is not None:
            self.row_adam.load_state_dict(state["row_adam"])
        self.sampled.cache = _moved(state.get("message_cache"), self.device)

    def model_payload(self) -> dict:
        """This rank's rows with sharded tables; with replicated ones each rank writes every P-th row."""
        m = self.model
        if self.sampled.tables is not None or self.world == 1:
            return super().model_payload()
        users = torch.arange(self.rank, m.num_users, self.world)
        items = torch.arange(self.rank, m.num_items, self.world)
        return model_payload(users, m.user_embedding.detach().cpu()[users], items,
                             m.item_embedding.detach().cpu()[items], m.dense_parameters())

    def close(self) -> None:
        self.prefetcher.close()
        super().close()


def _moved(cache, device):
    """The held messages (tensors, lists of tensors, the step) on ``device``; None stays None."""
    if cache is None:
        return None
    return {k: v.to(device) if torch.is_tensor(v) else [t.to(device) for t in v] if isinstance(v, list) else v
            for k, v in cache.items()}
