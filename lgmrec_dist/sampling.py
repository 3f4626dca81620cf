"""Neighbour sampling for the large-catalogue mode (docs/sampled.md): DGL blocks on the CPU,
turned into plain index tensors, produced ahead of the training step by DataLoader workers.

* :class:`BlockSampler` holds the training graph as a DGL graph (both edge directions, interactions as a
  set) and the **full-graph** degrees. ``sample(users, pos, neg, step)`` takes a batch of triples, makes
  its distinct nodes the seeds of a ``dgl.dataloading.NeighborSampler`` with the per-layer fanouts
  (``fanouts[l]`` is used by CGE layer l+1; layer 1 reads E^(0)), and turns every block into two CSR
  matrices (the block's normalised adjacency and its transpose, for a deterministic backward).
* **Weights.** An edge (dst n ← src n') of a block gets Ĝ's weight 1/sqrt(deg(n)·deg(n')) with the
  full-graph degrees (+1e-7, as :func:`lgmrec_dist.graph.build_graph`), times deg(n)/k(n) where k(n) is
  the number of neighbours sampled for n (k = min(f, deg)). Sampling k of deg neighbours uniformly without
  replacement includes each with probability k/deg, so the rescaled sum is an unbiased estimate of the
  full-neighbourhood row Ĝ[n]·x. With fanout -1 (or f ≥ deg) the factor is exactly 1 and the block rows
  are Ĝ's rows: the sampled CGE equals the full-graph CGE up to float summation order.
* **Randomness** is keyed: DGL's generator is re-seeded with a hash of (seed, step) before a batch is
  sampled, on one OpenMP thread (DGL's multi-threaded sampler is not reproducible). A batch's blocks are
  the same whichever process (main or DataLoader worker) samples them.
* :class:`Prefetcher` runs the sampling of the coming steps in ``sampler_workers`` DataLoader worker
  processes (prefetch factor 2) while the current step computes. It predicts the batches from the same
  :class:`~lgmrec_dist.batches.TripleSampler` the training loop uses; a batch that does not match the
  prediction (another caller, a resumed run) is sampled in-process instead, so prefetching never changes
  results.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import dgl
import numpy as np
import torch
from dgl.dataloading import NeighborSampler

from lgmrec_dist import rng
from lgmrec_dist.batches import TripleSampler
from lgmrec_dist.graph import interaction_dgl_graph, row_major_order

log = logging.getLogger("lgmrec")

SAMPLE_STREAM = 1 << 20        # rng stream of the neighbour sampler (the model's streams are < 4·M)


@contextmanager
def one_omp_thread():
    """Run DGL's sampler on one OpenMP thread (reproducible), then restore torch's thread count.

    DGL and torch share libgomp: DGL's set_num_threads also changes torch's count in this thread."""
    n = torch.get_num_threads()
    dgl.utils.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class Layer:
    """One CGE layer on a block: rows = the block's destination nodes, columns = its source nodes."""
    n_dst: int
    n_src: int
    adj: tuple          # (crow, col, val) of the n_dst × n_src weighted adjacency
    adj_t: tuple        # the same for its transpose (n_src × n_dst)

    def matrices(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.sparse_csr_tensor(*(t.to(device) for t in self.adj), size=(self.n_dst, self.n_src),
                                    check_invariants=False)
        a_t = torch.sparse_csr_tensor(*(t.to(device) for t in self.adj_t), size=(self.n_src, self.n_dst),
                                      check_invariants=False)
        return a, a_t

    @property
    def num_edges(self) -> int:
        return len(self.adj[1])

    def relabel_sources(self, position: torch.Tensor, order: torch.Tensor) -> Layer:
        """The same layer with source node j renamed ``position[j]`` (``order`` its inverse permutation).

        Entries keep their order within each row (they are ordered by node id, which does not change), so
        products sum the same terms in the same order: bit for bit the same results."""
        crow, col, val = self.adj
        crow_t, col_t, val_t = self.adj_t
        counts = crow_t.diff()[order]                 # new row k is old row order[k]
        new_crow = torch.zeros_like(crow_t)
        torch.cumsum(counts, 0, out=new_crow[1:])
        start_shift = crow_t[:-1][order] - new_crow[:-1]
        entries = torch.arange(len(col_t)) + torch.repeat_interleave(start_shift, counts)
        return Layer(self.n_dst, self.n_src, (crow, position[col], val), (new_crow, col_t[entries], val_t[entries]))


@dataclass
class SampledBatch:
    """Everything a step needs from the graph, as CPU tensors (moved to the device by the model).

    Node ids: users 0..U-1, items U..U+I-1. ``seeds`` are the batch's distinct nodes, sorted (users
    first); ``inverse`` maps the 3B triple positions (users, pos, neg) to rows of ``seeds``. ``input_ids``
    are the nodes whose E^(0) rows the CGE reads, sorted (users first): the order the rows are gathered from
    the tables in, and the order of layer 0's columns. ``dst_rows`` are the positions in ``input_ids`` of
    layer 0's destination nodes, seeds first; from there on DGL's block convention holds (layer l's
    destination nodes are a prefix of its source nodes), so the seeds are a prefix of every later layer.
    Layer 0's columns are relabelled to the sorted order when the batch is made (:func:`make_batch`), so the
    step reads the rows where they were gathered, without a permuted copy of every E^(0) row.
    """
    step: int
    users: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    seeds: torch.Tensor
    inverse: torch.Tensor
    input_ids: torch.Tensor
    layers: list = field(default_factory=list)
    input_users: torch.Tensor | None = None   # input_ids[:len(input_users)]: the user ids, sorted
    input_items: torch.Tensor | None = None   # the item ids (0-based) of the rest of input_ids, sorted
    dst_rows: torch.Tensor | None = None      # input_ids[dst_rows]: layer 0's destination nodes, seeds first

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    @property
    def seed_rows(self) -> torch.Tensor:
        """The seeds' positions in ``input_ids`` (the seeds' E^(0) rows)."""
        return self.dst_rows[:self.num_seeds]

    def layer_ids(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(destination ids, source ids) of layer ``l``: the node ids of its rows and of its columns."""
        inner = self.input_ids[self.dst_rows]
        layer = self.layers[l]
        return inner[:layer.n_dst], (self.input_ids if l == 0 else inner[:layer.n_src])

    def matches(self, users, pos, neg) -> bool:
        return (len(users) == len(self.users) and torch.equal(users.cpu(), self.users)
                and torch.equal(pos.cpu(), self.pos) and torch.equal(neg.cpu(), self.neg))

    def stats(self) -> dict:
        return {"seeds": self.num_seeds, "input_nodes": len(self.input_ids),
                "edges": sum(layer.num_edges for layer in self.layers),
                "index_bytes": sum(sum(t.numel() * t.element_size() for t in (*layer.adj, *layer.adj_t))
                                   for layer in self.layers)}


class BlockSampler:
    """DGL neighbour sampling of a batch's nodes (picklable: DataLoader workers get a copy by fork)."""

    def __init__(self, num_users: int, num_items: int, train_users: np.ndarray, train_items: np.ndarray,
                 fanouts: list[int], n_layers: int, seed: int, rescale: bool = True):
        self.num_users, self.num_items = num_users, num_items
        self.num_nodes = num_users + num_items
        self.graph = interaction_dgl_graph(num_users, num_items, train_users, train_items)
        self.deg = self.graph.in_degrees().numpy().astype(np.float64)   # distinct neighbours, full graph
        self.d_inv_sqrt = 1.0 / np.sqrt(self.deg + 1e-7)                # as build_graph
        self.fanouts = layer_fanouts(fanouts, n_layers)
        self.n_layers = n_layers
        self.seed = seed
        self.rescale = rescale      # False: plain Ĝ weights on the sampled edges (biased; for tests)
        self.sampler = NeighborSampler(self.fanouts, fused=False) if n_layers else None

    def graph_bytes(self) -> int:
        """Bytes of the DGL graph the sampler reads (both directions of every pair, two int64 ids an edge)."""
        return 16 * self.graph.num_edges()

    def sample(self, users, pos, neg, step: int) -> SampledBatch:
        users, pos, neg, seeds, inverse = batch_seeds(users, pos, neg, self.num_users)
        layers = []
        input_ids = seeds
        if self.n_layers:
            with one_omp_thread():
                dgl.seed(rng.stream_key(self.seed, step, SAMPLE_STREAM) & 0x7FFFFFFF)  # DGL takes an int32
                input_ids, _, blocks = self.sampler.sample_blocks(self.graph, seeds)
            layers = [self._layer(b, f) for b, f in zip(blocks, self.fanouts)]
        return make_batch(step, users, pos, neg, seeds, inverse, input_ids, layers, self.num_users)

    def _layer(self, block, fanout: int) -> Layer:
        src, dst = (t.numpy() for t in block.edges())
        ids = block.srcdata[dgl.NID].numpy()
        return weighted_layer(dst, src, ids, block.num_dst_nodes(), fanout, self.deg[ids], self.d_inv_sqrt[ids],
                              self.rescale)


def layer_fanouts(fanouts: list[int], n_layers: int) -> list[int]:
    """The fanout of each CGE layer (``fanouts[l]`` for layer l+1); a single value applies to every layer."""
    return list(fanouts) * n_layers if len(fanouts) == 1 else list(fanouts)


def batch_seeds(users, pos, neg, num_users: int):
    """The triples as CPU tensors, the batch's distinct nodes (sorted, users first) and the triple positions'
    rows among them."""
    users, pos, neg = (torch.as_tensor(t).cpu() for t in (users, pos, neg))
    nodes = torch.cat([users, pos + num_users, neg + num_users])
    seeds, inverse = torch.unique(nodes, return_inverse=True)
    return users, pos, neg, seeds, inverse


def weighted_layer(dst: np.ndarray, src: np.ndarray, ids: np.ndarray, n_dst: int, fanout: int, deg: np.ndarray,
                   d_inv_sqrt: np.ndarray, rescale: bool) -> Layer:
    """The :class:`Layer` of a block's edges (dst ← src, block-local indices) with Ĝ's weights, times deg/k
    for a partial fanout; ``ids`` are the node ids of the block's source nodes (its destination nodes first),
    ``deg`` and ``d_inv_sqrt`` their full-graph values."""
    w = d_inv_sqrt[dst] * d_inv_sqrt[src]
    if fanout != -1 and rescale:
        k = np.bincount(dst, minlength=n_dst).astype(np.float64)
        scale = deg[:n_dst] / np.maximum(k, 1.0)                        # deg/k; exactly 1 when k = deg
        w = w * scale[dst]
    n_src = len(ids)
    return Layer(n_dst, n_src, _csr_parts(dst, src, w, n_dst, ids), _csr_parts(src, dst, w, n_src, ids))


def make_batch(step: int, users, pos, neg, seeds, inverse, input_ids: torch.Tensor, layers: list,
               num_users: int) -> SampledBatch:
    """The :class:`SampledBatch` of blocks whose layers index ``input_ids`` in DGL's order (destination nodes
    first): the input ids sorted, and layer 0's columns relabelled to that order."""
    # rows are gathered from the tables in sorted order (memory touched in order: several times faster on
    # big tables); relabelling layer 0's columns (O(edges) integers, here in the sampler) replaces permuting
    # the gathered rows (O(rows · d) floats in the step, forward and backward)
    order = torch.argsort(input_ids)
    sorted_ids = input_ids[order]
    n_users = int(torch.searchsorted(sorted_ids, num_users))
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    if layers:
        layers = [layers[0].relabel_sources(position, order), *layers[1:]]
        dst_rows = position[:layers[0].n_dst]
    else:
        dst_rows = position
    return SampledBatch(step, users, pos, neg, seeds, inverse, sorted_ids, layers,
                        sorted_ids[:n_users], sorted_ids[n_users:] - num_users, dst_rows)


def _csr_parts(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int, col_ids: np.ndarray) -> tuple:
    """(crow, col, val) tensors of a CSR matrix whose entries within a row are ordered by the columns' node
    ids ``col_ids[cols]``, as in the full graph's Ĝ (:func:`lgmrec_dist.graph.csr`): a full-fanout block
    row then sums the same terms in the same order as Ĝ's row, so the two products agree bit for bit."""
    order = row_major_order(rows, col_ids[cols])
    crow = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=crow[1:])
    return (torch.from_numpy(crow), torch.from_numpy(cols[order].astype(np.int64)),
            torch.from_numpy(vals[order].astype(np.float32)))


class _StepStream(torch.utils.data.IterableDataset):
    """The sampled batches of steps start, start+1, ...: worker w of W produces steps start+w, start+w+W, …
    (the DataLoader returns them round-robin, i.e. in step order)."""

    def __init__(self, sampler: BlockSampler, triples: TripleSampler, batch_size: int, start: int,
                 rank: int = 0, world: int = 1):
        self.sampler, self.triples, self.batch_size, self.start = sampler, triples, batch_size, start
        self.rank, self.world = rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info else (0, 1)
        n_batches = self.triples.num_batches(self.batch_size)
        epoch_cache = (None, None)
        for step in itertools.count(self.start + w, n_workers):
            epoch, b = divmod(step, n_batches)
            if epoch_cache[0] != epoch:
                epoch_cache = (epoch, [torch.from_numpy(a) for a in self.triples.epoch(epoch)])
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            users, pos, neg = (rank_slice(a[sl], self.rank, self.world) for a in epoch_cache[1])
            yield self.sampler.sample(users, pos, neg, step)


def rank_slice(t, rank: int, world: int):
    """Rank r's share of a global batch: the r-th of P contiguous slices (as the exact distributed mode)."""
    n = len(t)
    return t[rank * n // world:(rank + 1) * n // world]


def _identity(x):
    return x


WORKER_NICENESS = 19    # added to a sampler worker's niceness (the lowest CPU priority Linux has)


def _lower_priority(_worker_id: int) -> None:
    """A sampler worker runs at the lowest CPU priority. Sharing the cores with the step's OpenMP threads,
    it used to preempt one of them and stall every parallel region (the other thread waits at the
    barrier); at the lowest priority it samples in the cores' idle time (the step's serial stretches, or
    while the step waits for its batch). Paired 1×/10× Baby runs measured the step 6-12 % faster."""
    os.nice(WORKER_NICENESS)


class Prefetcher:
    """Sampled batches for the training loop's steps, produced ahead by DataLoader worker processes.

    The loop's step s is batch s mod n_batches of epoch s // n_batches (train.py runs whole epochs); with P
    ranks, each prefetches its slice of the global batch (:func:`rank_slice`).
    ``get`` returns the prefetched batch when it is the one asked for, else samples it in-process and
    restarts the stream after it; after two misses in a row it stops prefetching (a caller that is not the
    training loop). With ``workers == 0`` every batch is sampled in-process, synchronously.
    """

    def __init__(self, sampler: BlockSampler, triples: TripleSampler | None, batch_size: int, workers: int,
                 prefetch_factor: int = 2, rank: int = 0, world: int = 1):
        self.sampler, self.triples, self.batch_size = sampler, triples, batch_size
        self.rank, self.world = rank, world
        self.workers, self.prefetch_factor = workers, prefetch_factor
        self.it, self.next_step, self.misses = None, None, 0
        self.hits = 0

    def _start(self, step: int) -> None:
        self.close()
        stream = _StepStream(self.sampler, self.triples, self.batch_size, step, self.rank, self.world)
        loader = torch.utils.data.DataLoader(stream,
                                             batch_size=None, num_workers=self.workers,
                                             prefetch_factor=self.prefetch_factor, collate_fn=_identity,
                                             multiprocessing_context="fork", worker_init_fn=_lower_priority)
        self.it, self.next_step = iter(loader), step

    def get(self, users, pos, neg, step: int) -> SampledBatch:
        if self.workers > 0 and self.triples is not None and self.misses < 2:
            if self.it is None:
                self._start(step)
            if self.next_step == step:
                batch = next(self.it)
                self.next_step += 1
                if batch.step == step and batch.matches(users, pos, neg):
                    self.misses, self.hits = 0, self.hits + 1
                    return batch
            self.misses += 1
            if self.misses < 2:
                self._start(step + 1)
            else:
                log.warning("sampled mode: batches do not follow the training order; prefetching is off")
                self.close()
        return self.sampler.sample(users, pos, neg, step)

    def close(self) -> None:
        if self.it is not None:
            it, self.it = self.it, None
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def inclusion_probability(deg: np.ndarray, batch_size: int, num_pairs: int) -> np.ndarray:
    """P(a node with ``deg`` training pairs appears in a batch of ``batch_size`` distinct pairs drawn
    uniformly without replacement from ``num_pairs``): 1 − C(E−deg, B) / C(E, B).

    The training loop's batches are consecutive slices of a uniform permutation of the distinct pairs
    (``TripleSampler``), i.e. exactly such draws. Used by the Horvitz-Thompson weights of the in-batch
    contrastive negatives (docs/sampled.md)."""
    deg = torch.as_tensor(np.asarray(deg, dtype=np.float64))
    e, b = float(num_pairs), float(batch_size)
    rest = e - deg
    log_miss = (torch.lgamma(rest + 1) - torch.lgamma((rest - b + 1).clamp_min(1.0))
                - math.lgamma(e + 1) + math.lgamma(e - b + 1))
    log_miss = torch.where(rest >= b, log_miss, torch.full_like(log_miss, -math.inf))
    return (-torch.expm1(log_miss)).clamp(0.0, 1.0).numpy()
