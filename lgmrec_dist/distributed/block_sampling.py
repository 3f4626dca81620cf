"""Neighbour sampling of a batch on a partitioned dataset (docs/sampled.md, "Sampling on partitions").

Each rank holds only the training edges incident to the nodes it owns (a partition's ``train_edges``), so the
neighbourhood of an owned node is complete there and nowhere else. :class:`PartitionBlockSampler` produces
the same :class:`~lgmrec_dist.sampling.SampledBatch` as :class:`~lgmrec_dist.sampling.BlockSampler` (seeds
sorted, each layer's destination nodes a prefix of its source nodes, blocks from the last-sampled hop to the
seeds, Ĝ's weights with full-graph degrees times deg/k), with the neighbours of a node sampled by its owner:

* **Degrees.** An owner counts its nodes' distinct neighbours in its local edges; one all-reduce of the
  per-node degree array at construction (8·N bytes, N = users + items) gives every rank the full-graph
  degree of every node it may meet. No rank holds another partition's edges.
* **Per hop** (hop l uses ``fanouts[l]``; the hops run from the seeds outwards, l = L-1 … 0), the frontier
  (that hop's destination nodes) is split by owner. The ids owned elsewhere go to their owners (one
  ``all_to_all`` of counts, one of ids: 8 bytes per remote frontier node); each owner samples their
  neighbours from its local CSR and answers, per requested node, the number k(n) of neighbours it kept and
  then their ids (one ``all_to_all`` of counts, one of answers: 8·(1 + k(n)) bytes per remote frontier
  node). Owned frontier nodes are sampled in place. Every rank runs these four collectives at every hop,
  with an empty frontier too; with one rank there are none. The bytes a rank sends to others are added to
  ``sent_bytes``.
* **Keyed choice.** With fanout f, node n keeps the min(f, deg(n)) neighbours n' with the smallest
  ``keyed_hash64`` of n·N + n' under the key of (seed, step) and the hop l (fanout -1: every neighbour). The
  choice depends on nothing else, so the blocks are the same bit for bit whatever the number of ranks and
  whichever rank samples: P ranks give each rank the blocks one process holding the whole graph gives for
  that rank's triples. (It is not DGL's random stream: partial-fanout blocks differ from BlockSampler's,
  full-fanout blocks do not.)
* **Order.** A node's sampled neighbours are listed by global id; a block's source nodes are its
  destination nodes followed by the new nodes in ascending id order.

``sample`` is a collective: every rank calls it once per step with its own slice of the triples. It runs in
the training process (not in DataLoader workers, which are outside the process group).
"""
from __future__ import annotations

import numpy as np
import torch

from lgmrec_dist import rng
from lgmrec_dist.distributed.exchange import Ownership, _exchange_ids, comm_device
from lgmrec_dist.distributed.reduce import all_reduce_
from lgmrec_dist.graph import csr
from lgmrec_dist.keys import pair_keys
from lgmrec_dist.sampling import SampledBatch, batch_seeds, layer_fanouts, make_batch, weighted_layer

BLOCK_STREAM = (1 << 20) + 3   # rng stream of the keyed neighbour choice (after the sampled mode's streams)
_ID_BYTES = 8


class PartitionBlockSampler:
    """Keyed neighbour sampling of a batch, each node's neighbours chosen by the rank that owns it."""

    def __init__(self, own: Ownership, num_users: int, num_items: int, local_users: np.ndarray,
                 local_items: np.ndarray, fanouts: list[int], n_layers: int, seed: int, rescale: bool = True):
        self.own = own
        self.num_users, self.num_items = num_users, num_items
        self.num_nodes = num_users + num_items
        # the local edges as a set, both directions, kept where the destination is owned: complete rows
        keys = pair_keys(local_users, local_items, num_items)
        u, i = keys // num_items, keys % num_items + num_users
        dst, src = np.concatenate([u, i]), np.concatenate([i, u])
        mine = own.part[dst] == own.rank
        adj = csr(own.local(dst[mine]), src[mine], np.ones(int(mine.sum())), (len(own.owned), self.num_nodes))
        self.indptr = adj.crow_indices().numpy()       # rows: owned nodes (local index)
        self.nbrs = adj.col_indices().numpy()          # global ids, ascending within a row
        deg = torch.zeros(self.num_nodes, dtype=torch.int64)
        deg[torch.from_numpy(own.owned)] = torch.from_numpy(np.diff(self.indptr))
        if own.world_size > 1:                          # owners' degrees to everyone
            deg = all_reduce_(deg.to(comm_device())).cpu()
        self.deg = deg.numpy().astype(np.float64)
        self.fanouts = layer_fanouts(fanouts, n_layers) if n_layers else []
        self.seed, self.rescale = seed, rescale
        self.sent_bytes = 0

    def graph_bytes(self) -> int:
        """Bytes of the local adjacency the sampler reads (the owned nodes' neighbour lists)."""
        return self.indptr.nbytes + self.nbrs.nbytes

    def sample(self, users, pos, neg, step: int) -> SampledBatch:
        """This rank's :class:`SampledBatch` of its triples (users, pos, neg); a collective."""
        users, pos, neg, seeds, inverse = batch_seeds(users, pos, neg, self.num_users)
        key = rng.stream_key(self.seed, step, BLOCK_STREAM)
        nodes = seeds.numpy()
        layers = []
        for hop in reversed(range(len(self.fanouts))):
            fanout = self.fanouts[hop]
            dst, src = self._neighbours(nodes, fanout, key, hop)
            ids = np.concatenate([nodes, np.setdiff1d(src, nodes)])    # destination nodes first
            order = np.argsort(ids, kind="stable")
            src_local = order[np.searchsorted(ids[order], src)]
            deg = self.deg[ids]
            layers.insert(0, weighted_layer(dst, src_local, ids, len(nodes), fanout, deg,
                                            1.0 / np.sqrt(deg + 1e-7), self.rescale))   # as build_graph
            nodes = ids
        return make_batch(step, users, pos, neg, seeds, inverse, torch.from_numpy(nodes), layers, self.num_users)

    def _neighbours(self, nodes: np.ndarray, fanout: int, key: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``nodes``, global id) of each sampled in-edge, by position then neighbour id; the
        neighbours of nodes owned elsewhere are sampled by their owners."""
        world, rank = self.own.world_size, self.own.rank
        if world == 1:
            counts, src = self._pick(nodes, fanout, key, hop)
            return np.repeat(np.arange(len(nodes)), counts), src
        positions = [np.flatnonzero(self.own.part[nodes] == q) for q in range(world)]
        empty = np.empty(0, np.int64)
        requests = [nodes[p] if q != rank else empty for q, p in enumerate(positions)]
        asked = _exchange_ids(requests)
        answers = [np.concatenate(self._pick(a.numpy(), fanout, key, hop)) for a in asked]
        replies = [r.numpy() for r in _exchange_ids(answers)]
        replies[rank] = np.concatenate(self._pick(nodes[positions[rank]], fanout, key, hop))
        self.sent_bytes += _ID_BYTES * sum(2 + len(requests[q]) + len(answers[q]) for q in range(world) if q != rank)
        dst, src = [], []
        for p, reply in zip(positions, replies):           # reply: k(n) of each requested n, then the ids
            dst.append(np.repeat(p, reply[:len(p)]))
            src.append(reply[len(p):])
        dst, src = np.concatenate(dst), np.concatenate(src)
        order = np.argsort(dst, kind="stable")             # canonical order, whatever the owners
        return dst[order], src[order]

    def _pick(self, ids: np.ndarray, fanout: int, key: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
        """For owned nodes ``ids``: the number of neighbours each keeps, and their global ids (grouped by
        node, ascending within a node): all of them for fanout -1 or deg ≤ fanout, else the ``fanout`` with
        the smallest keyed hash."""
        rows = self.own.local(ids)
        start = self.indptr[rows]
        counts = self.indptr[rows + 1] - start
        node = np.repeat(np.arange(len(ids)), counts)
        offset = np.arange(len(node)) - np.repeat(np.cumsum(counts) - counts, counts)
        src = self.nbrs[np.repeat(start, counts) + offset]
        if fanout == -1 or not (counts > fanout).any():
            return counts, src
        over = np.flatnonzero(counts[node] > fanout)       # edges of the nodes that keep only some
        pair = np.asarray(ids, np.uint64)[node[over]] * np.uint64(self.num_nodes) + src[over].astype(np.uint64)
        h = rng.keyed_hash64(key, pair, attempt=hop)
        by_hash = np.lexsort((h, node[over]))              # per node, smallest hash first
        grouped = node[over][by_hash]
        rank_in_node = np.arange(len(grouped)) - np.searchsorted(grouped, grouped)
        keep = counts[node] <= fanout
        keep[over[by_hash[rank_in_node < fanout]]] = True
        return np.minimum(counts, fanout), src[keep]
