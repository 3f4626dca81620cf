"""Neighbour sampling on a partitioned graph (lgmrec_dist.distributed.block_sampling, docs/sampled.md,
"Sampling on partitions"): 2 gloo ranks under torchrun, each holding only the edges incident to its nodes.

Full fanout: the blocks equal BlockSampler's on the whole graph (weighted edge sets per layer) and the CGE
on them gives the same E_c at the seeds. Partial fanout: the 2-rank blocks equal the same sampler in one
process holding the whole graph, bit for bit, with BlockSampler's deg/k rescaling; an empty slice on one
rank still answers the other's requests.
"""
import os
import subprocess
import sys
from pathlib import Path

import dgl
import numpy as np
import pytest
import torch

from lgmrec_dist.distributed.block_sampling import PartitionBlockSampler
from lgmrec_dist.distributed.exchange import CommStats, Ownership
from lgmrec_dist.graph import build_graph
from lgmrec_dist.model.cge import cge
from lgmrec_dist.sampled import cge_on_blocks
from lgmrec_dist.sampling import BlockSampler, rank_slice

ROOT = Path(__file__).resolve().parents[1]
NU, NI = 40, 30
SEED = 7
CONFIGS = {"full": ([-1], 2), "partial": ([3, 2], 2), "partial3": ([2], 3)}


def tiny_graph():
    """Skewed item degrees (many above the fanouts), repeated pairs, an item without edges; a random
    partition of the nodes into 2 parts."""
    r = np.random.default_rng(0)
    u = r.integers(0, NU, 260)
    i = np.minimum(r.zipf(1.5, 260) - 1, NI - 2)             # item NI-1 has no training edge
    return u, i, r.integers(0, 2, NU + NI)


def global_batches():
    """(config, step, users, pos, neg) of the global batches; the last one gives rank 0 an empty slice."""
    r = np.random.default_rng(1)
    out = []
    for name in CONFIGS:
        for step in range(2):
            users, pos, neg = r.integers(0, NU, 12), r.integers(0, NI, 12), r.integers(0, NI, 12)
            neg[0] = NI - 1
            out.append((name, step, users, pos, neg))
    out.append(("partial", 5, np.array([3]), np.array([0]), np.array([1])))
    return [(n, s, *(torch.from_numpy(a) for a in t)) for n, s, *t in out]


def local_edges(u, i, part, rank):
    mine = (part[u] == rank) | (part[NU + i] == rank)
    return u[mine], i[mine]


def rank_worker(out: str) -> None:
    """Run under torchrun: each rank samples its slices of the global batches; write rank<R>.pt."""
    from lgmrec_dist.distributed.group import close_process_group, init_process_group
    torch.set_num_threads(1)
    ctx = init_process_group("cpu")
    u, i, part = tiny_graph()
    own = Ownership(part, ctx.rank, ctx.world_size)
    lu, li = local_edges(u, i, part, ctx.rank)
    samplers = {name: PartitionBlockSampler(own, NU, NI, lu, li, f, n, SEED) for name, (f, n) in CONFIGS.items()}
    CommStats.take()
    batches = [samplers[name].sample(*(rank_slice(t, ctx.rank, ctx.world_size) for t in triples), step)
               for name, step, *triples in global_batches()]
    torch.save({"batches": batches, "deg": samplers["full"].deg, "local_edges": len(lu),
                "sent": samplers["partial"].sent_bytes, "counted": CommStats.take(),
                "sent_all": sum(sm.sent_bytes for sm in samplers.values())}, f"{out}/rank{ctx.rank}.pt")
    close_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("block-sampling")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def one_process(name: str) -> PartitionBlockSampler:
    """The sampler with P = 1: the owner of every node, holding every edge."""
    u, i, _ = tiny_graph()
    fanouts, n_layers = CONFIGS[name]
    return PartitionBlockSampler(Ownership(np.zeros(NU + NI, np.int64), 0, 1), NU, NI, u, i, fanouts, n_layers,
                                 SEED)


def each_rank_batch(two_ranks, wanted):
    for rank, res in enumerate(two_ranks):
        for (name, step, *triples), batch in zip(global_batches(), res["batches"]):
            if name in wanted:
                yield name, step, [rank_slice(t, rank, 2) for t in triples], batch


def weighted_edges(batch, l: int) -> list:
    """Sorted (dst id, src id, weight) of layer l, by global node ids; and the same read from its transpose."""
    layer = batch.layers[l]
    dst_ids, src_ids = batch.layer_ids(l)
    crow, col, val = layer.adj
    rows = torch.repeat_interleave(torch.arange(layer.n_dst), crow.diff())
    edges = sorted(zip(dst_ids[rows].tolist(), src_ids[col].tolist(), val.tolist()))
    crow_t, col_t, val_t = layer.adj_t
    rows_t = torch.repeat_interleave(torch.arange(layer.n_src), crow_t.diff())
    assert edges == sorted(zip(dst_ids[col_t].tolist(), src_ids[rows_t].tolist(), val_t.tolist()))
    return edges


def check_structure(batch, triples):
    users, pos, neg = triples
    nodes = torch.cat([users, pos + NU, neg + NU])
    assert torch.equal(batch.seeds, torch.unique(nodes)) and torch.equal(batch.seeds[batch.inverse], nodes)
    assert torch.equal(batch.input_ids[batch.seed_rows], batch.seeds)
    assert torch.equal(batch.input_ids, torch.unique(batch.input_ids))     # distinct, sorted
    assert batch.layers[-1].n_dst == batch.num_seeds and batch.layers[0].n_src == len(batch.input_ids)
    for l, (inner, outer) in enumerate(zip(batch.layers[1:], batch.layers[:-1])):
        assert inner.n_src == outer.n_dst                     # each layer's source nodes: the next one's input
        assert torch.equal(batch.layer_ids(l + 1)[0][:batch.num_seeds], batch.seeds)   # seeds first
    e0 = torch.randn(NU + NI, 2)
    rows = torch.cat([e0[:NU][batch.input_users], e0[NU:][batch.input_items]])
    assert torch.equal(rows, e0[batch.input_ids])


def test_degrees_are_the_full_graph_degrees(two_ranks):
    u, i, _ = tiny_graph()
    whole = BlockSampler(NU, NI, u, i, [-1], 1, SEED).deg
    for res in two_ranks:
        assert res["local_edges"] < len(u)                    # the partition really cuts the graph
        assert np.array_equal(res["deg"], whole)
    assert np.array_equal(one_process("full").deg, whole)


def test_full_fanout_equals_block_sampler_on_the_whole_graph(two_ranks):
    u, i, _ = tiny_graph()
    e0 = torch.randn(NU + NI, 8, generator=torch.Generator().manual_seed(2))
    exact = cge(build_graph(NU, NI, u, i), e0, 2)
    whole = BlockSampler(NU, NI, u, i, [-1], 2, SEED)
    seen = 0
    for _, step, triples, batch in each_rank_batch(two_ranks, {"full"}):
        check_structure(batch, triples)
        ref = whole.sample(*triples, step)
        assert torch.equal(batch.seeds, ref.seeds) and torch.equal(batch.inverse, ref.inverse)
        assert set(batch.input_ids.tolist()) == set(ref.input_ids.tolist())
        assert len(batch.layers) == len(ref.layers) == 2
        for l, (mine, theirs) in enumerate(zip(batch.layers, ref.layers)):
            assert (mine.n_dst, mine.n_src) == (theirs.n_dst, theirs.n_src)
            assert weighted_edges(batch, l) == weighted_edges(ref, l)   # weights bit for bit
        e_c = cge_on_blocks(batch, e0[batch.input_ids], "cpu")
        assert torch.allclose(e_c, cge_on_blocks(ref, e0[ref.input_ids], "cpu"), atol=1e-6)
        assert torch.allclose(e_c, exact[batch.seeds], atol=1e-6)
        seen += 1
    assert seen == 4


def assert_same_batch(a, b):
    for key in ("seeds", "inverse", "input_ids", "input_users", "input_items", "dst_rows"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert (la.n_dst, la.n_src) == (lb.n_dst, lb.n_src)
        for ta, tb in zip((*la.adj, *la.adj_t), (*lb.adj, *lb.adj_t)):
            assert torch.equal(ta, tb)


def test_partial_fanout_two_ranks_equal_one_process(two_ranks):
    single = {name: one_process(name) for name in ("partial", "partial3")}
    seen = set()
    for name, step, triples, batch in each_rank_batch(two_ranks, {"partial", "partial3"}):
        check_structure(batch, triples)
        assert_same_batch(batch, single[name].sample(*triples, step))
        seen.add((name, step, len(triples[0]) > 0))
    assert ("partial", 5, False) in seen and len(seen) == 6   # an empty slice on one rank, and both ranks' others
    assert all(res["sent"] > 0 for res in two_ranks)
    # the id exchanges are in the bytes a step reports as sent (CommStats), as the sampler counts them
    assert all(res["counted"] == res["sent_all"] for res in two_ranks)
    # the keyed choice changes with the step, and really drops neighbours
    _, _, triples, batch = next(each_rank_batch(two_ranks, {"partial"}))
    other = single["partial"].sample(*triples, 1)
    assert weighted_edges(batch, 0) != weighted_edges(other, 0)


def test_partial_fanout_weights_rescaled_as_block_sampler(two_ranks, dst_first):
    u, i, _ = tiny_graph()
    whole = BlockSampler(NU, NI, u, i, [-1], 1, SEED)
    neighbours = [set(whole.graph.predecessors(n).tolist()) for n in range(NU + NI)]
    deg = whole.deg
    rescaled = 0
    for name, _, _, batch in each_rank_batch(two_ranks, {"partial", "partial3"}):
        fanouts, n_layers = CONFIGS[name]
        for l, (layer, f) in enumerate(zip(batch.layers, fanouts * n_layers if len(fanouts) == 1 else fanouts)):
            if l == 0:                                       # its destination nodes first, as sampled
                layer, ids, _ = dst_first(batch)
                ids = ids.numpy()
            else:
                ids = batch.layer_ids(l)[1].numpy()
            crow, col, val = (t.numpy() for t in layer.adj)
            k = np.diff(crow)
            assert np.array_equal(k, np.minimum(f, deg[ids[:layer.n_dst]]))
            dst = np.repeat(np.arange(layer.n_dst), k)
            assert all(int(ids[c]) in neighbours[int(ids[r])] for r, c in zip(dst, col))   # real edges only
            g_dst, g_src = ids[dst], ids[col]
            want = (1.0 / np.sqrt(deg[g_dst] + 1e-7)) * (1.0 / np.sqrt(deg[g_src] + 1e-7)) * (deg[g_dst] / k[dst])
            assert np.array_equal(val, want.astype(np.float32))
            rescaled += int((k[dst] < deg[g_dst]).sum())
            # BlockSampler's own layer of the same block: the same matrices
            block = dgl.create_block((torch.from_numpy(col), torch.from_numpy(dst)),
                                     num_src_nodes=layer.n_src, num_dst_nodes=layer.n_dst)
            block.srcdata[dgl.NID] = torch.from_numpy(ids)
            theirs = whole._layer(block, f)
            for ta, tb in zip((*layer.adj, *layer.adj_t), (*theirs.adj, *theirs.adj_t)):
                assert torch.equal(ta, tb)
    assert rescaled > 0                                      # some rows really were cut to the fanout


def test_keyed_fanout_cge_is_unbiased(one_thread):
    """E[E_c on keyed blocks] = E_c: the smallest-hash choice is a uniform k-subset, so deg/k is unbiased
    (mean of 1000 steps within 5 standard errors; without deg/k the same bound fails)."""
    u, i, _ = tiny_graph()
    e0 = torch.randn(NU + NI, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = cge(build_graph(NU, NI, u, i), e0.float(), 2).double()
    users, pos, neg = torch.arange(0, 20), torch.arange(0, 20), torch.arange(10, 30)

    def worst_z(rescale):
        sampler = one_process("partial")
        sampler.rescale = rescale
        draws = []
        for s in range(1000):
            batch = sampler.sample(users, pos, neg, s)
            draws.append(cge_on_blocks(batch, e0[batch.input_ids].float(), "cpu").double())
        draws = torch.stack(draws)
        se = draws.std(0) / np.sqrt(len(draws))
        diff = (draws.mean(0) - exact[batch.seeds]).abs()
        assert bool((diff[se == 0] < 1e-5).all())             # rows without spread are exact
        return float((diff / se.clamp_min(1e-30))[se > 0].max())

    assert worst_z(True) < 5.0
    assert worst_z(False) > 15.0


if __name__ == "__main__":   # the torchrun worker of the two_ranks fixture
    rank_worker(sys.argv[1])
