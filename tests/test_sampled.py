"""Large-catalogue mode (docs/sampled.md): the sampled engine with every approximation off equals
the exact engine, and each approximation switch behaves as documented.

Statistical tests are deterministic (every draw is keyed by a step number), and their tolerances follow
from the sample count: an estimator's mean over S draws is compared with the exact value in units of its
standard error sd/√S; |z| < 5 everywhere (a false alarm has probability ~6e-7 per entry for a normal
mean). Each test also checks that it has the power to see a bias (the un-rescaled or uncorrected
estimator fails the same bound), so a pass means something.
"""
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lgmrec_dist import graph as graph_module
from lgmrec_dist.batches import TripleSampler
from lgmrec_dist.config import ConfigError, load_config
from lgmrec_dist.dataset import TRAIN, PreparedDataset
from lgmrec_dist.graph import build_graph
from lgmrec_dist.model.cge import cge
from lgmrec_dist.sampled import (RowAdam, SampledEngine, cge_on_blocks, sampled_logsumexp, straight_through_message,
                                 uniform_negatives)
from lgmrec_dist.sampling import WORKER_NICENESS, BlockSampler, inclusion_probability
from lgmrec_dist.local import LocalEngine
from lgmrec_dist.train import make_evaluators

OVERRIDES = ["embedding_size=16", "train_batch_size=256", "learning_rate=0.005", "cl_weight=0.001",
             "n_hyper_layer=2", "seed=5"]
EXACT_SWITCHES = ["mode=sampled", "fanouts=[-1]", "hyper_refresh_steps=0", "hyper_refreshes_per_epoch=0",
                  "hyper_message_update=false", "hcl_negatives=all", "sparse_embeddings=false"]
APPROX = ["fanouts=[3,2]", "hyper_refresh_steps=2", "hcl_negatives=uniform", "hcl_num_negatives=32",
          "sparse_embeddings=true"]                     # every approximation on
Z_MAX = 5.0


@pytest.fixture(scope="module")
def tiny(tiny_dataset):
    ds = PreparedDataset.load(tiny_dataset)
    tu, ti = ds.pairs(TRAIN)
    return ds, TripleSampler(ds.num_items, tu, ti, 5).epoch(0)


def batch_of(triples, b, size=256):
    sl = slice(b * size, (b + 1) * size)
    return tuple(torch.from_numpy(a[sl]) for a in triples)


def engines(ds, extra=(), exact_extra=()):
    cpu = torch.device("cpu")
    exact = LocalEngine(load_config(None, OVERRIDES + list(exact_extra)), ds, cpu)
    sampled = SampledEngine(load_config(None, OVERRIDES + EXACT_SWITCHES + list(exact_extra) + list(extra)), ds, cpu)
    return exact, sampled


def z_scores(samples: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(mean − exact) / (sd/√S) per entry; entries without spread must be exact (z = 0 or inf)."""
    mean, sd = samples.mean(0), samples.std(0)
    se = sd / math.sqrt(samples.shape[0])
    diff = (mean - exact).abs()
    return torch.where(se > 0, diff / se.clamp_min(1e-30), torch.where(diff < 1e-5, 0.0, math.inf))


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("variant", [[], ["n_ui_layers=3"], ["use_ghe=false"]], ids=["default", "L3", "no_ghe"])
def test_full_fanout_sampled_equals_exact(tiny, one_thread, variant):
    ds, triples = tiny
    exact, sampled = engines(ds, exact_extra=variant)
    users, pos, neg = batch_of(triples, 0)
    with torch.no_grad():  # the sampled CGE rows at the batch's nodes == the full-graph CGE rows
        batch = sampled.sampled.sampler.sample(users, pos, neg, 0)
        assert torch.allclose(sampled.sampled.cge_rows(batch), exact.model.cge()[batch.seeds], atol=1e-6)
    for step in range(4):
        users, pos, neg = batch_of(triples, step)
        ref = exact.step(users, pos, neg, step)
        got = sampled.step(users, pos, neg, step)
        for key in ("loss", "bpr", "hcl", "reg"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (step, key)
    params = dict(sampled.model.named_parameters())
    for name, ref in exact.model.named_parameters():
        assert torch.allclose(params[name], ref, rtol=1e-4, atol=1e-6), name
        if variant == ["use_ghe=false"] and graph_module._kernel() is not None:
            # a full-fanout block row lists its terms in node-id order, as Ĝ's row, and the C kernel sums a
            # row in its stored order: without the hypergraph every product is the same, bit for bit
            assert torch.equal(params[name], ref), name
    emb, ref_emb = sampled.embeddings(), exact.embeddings()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(emb, ref_emb))


# ------------------------------------------------------------------ fanout: unbiased aggregation
def small_graph(seed=0, num_users=60, num_items=40, pairs=500):
    r = np.random.default_rng(seed)
    u = r.integers(0, num_users, pairs)
    i = np.minimum(r.zipf(1.6, pairs) - 1, num_items - 1)  # skewed item degrees: many above the fanout
    return num_users, num_items, u, i


def test_fanout_rescaled_cge_is_unbiased(one_thread):
    """E[sampled E_c] = E_c: each layer's deg/k rescaling is unbiased and the layers' draws independent."""
    nu, ni, u, i = small_graph()
    graph = build_graph(nu, ni, u, i)
    e0 = torch.randn(nu + ni, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = cge(graph, e0.float(), 2).double()
    users, pos, neg = torch.arange(0, 20), torch.arange(0, 20), torch.arange(20, 40)
    draws = 1000

    def estimates(rescale):
        sampler = BlockSampler(nu, ni, u, i, [3, 2], 2, seed=1, rescale=rescale)
        out = []
        for s in range(draws):
            batch = sampler.sample(users, pos, neg, s)
            out.append(cge_on_blocks(batch, e0[batch.input_ids].float(), "cpu").double())
        return batch.seeds, torch.stack(out)

    seeds, samples = estimates(True)
    assert (samples.std(0) > 0).any()                      # the fanouts really sample
    assert z_scores(samples, exact[seeds]).max() < Z_MAX
    _, naive = estimates(False)                            # without deg/k the estimate is biased: seen
    assert z_scores(naive, exact[seeds]).max() > 3 * Z_MAX


def test_full_fanout_blocks_are_the_graph_rows():
    nu, ni, u, i = small_graph(1)
    graph = build_graph(nu, ni, u, i)
    sampler = BlockSampler(nu, ni, u, i, [-1], 1, seed=0)
    batch = sampler.sample(torch.arange(nu), torch.arange(ni), torch.arange(ni), 0)
    a, _ = batch.layers[0].matrices("cpu")
    ids = batch.input_ids
    dense = torch.zeros(nu + ni, nu + ni)
    dense[batch.seeds.unsqueeze(1), ids.unsqueeze(0)] = a.to_dense()
    assert torch.equal(dense, graph.norm_adj.to_dense())    # same weights, bit for bit


def test_block_cge_backward_is_autograds_bit_for_bit(dst_first):
    """cge_on_blocks writes its backward out; it must give autograd's values for the same expression: the
    rows in the blocks' order, each layer a CSR product, the seeds' rows summed."""
    nu, ni, u, i = small_graph(3)
    sampler = BlockSampler(nu, ni, u, i, [3, 2], 2, seed=4)
    batch = sampler.sample(torch.arange(0, 30), torch.arange(0, 15), torch.arange(15, 30), 0)
    assert not torch.equal(batch.seed_rows, torch.arange(batch.num_seeds))   # the relabelling is not trivial
    gen = torch.Generator().manual_seed(5)
    h0 = torch.randn(len(batch.input_ids), 8, generator=gen)
    weight = torch.randn(batch.num_seeds, 8, generator=gen)
    mine = h0.clone().requires_grad_()
    out = cge_on_blocks(batch, mine, "cpu")
    (out * weight).sum().backward()
    ref = h0.clone().requires_grad_()
    first, _, position = dst_first(batch)
    h = torch.empty_like(ref).index_copy(0, position, ref)     # the rows in layer 0's source order
    total = h[:batch.num_seeds]
    for layer in [first, *batch.layers[1:]]:
        h = graph_module.spmm(*layer.matrices("cpu"), h)
        total = total + h[:batch.num_seeds]
    expect = total / (len(batch.layers) + 1)
    (expect * weight).sum().backward()
    assert torch.equal(out, expect) and torch.equal(mine.grad, ref.grad)
    assert (mine.grad != 0).sum() > batch.num_seeds   # the gradient reaches non-seed rows


def test_sampling_is_keyed_by_step():
    nu, ni, u, i = small_graph(2)
    sampler = BlockSampler(nu, ni, u, i, [2], 2, seed=0)
    args = (torch.arange(10), torch.arange(10), torch.arange(10, 20))
    a, b, c = sampler.sample(*args, 7), sampler.sample(*args, 7), sampler.sample(*args, 8)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.layers[0].adj[1], b.layers[0].adj[1])
    assert not torch.equal(a.layers[0].adj[1], c.layers[0].adj[1])


# ------------------------------------------------------------------ contrastive denominators
def test_uniform_negatives_logq_estimate_is_unbiased():
    """D̂ = exp(pos) + (N/K)·Σ_k [neg_k ≠ anchor] exp(logit_k) has mean Σ_all exp(logit); log D̂ is biased low."""
    g = torch.Generator().manual_seed(0)
    n, k, draws = 500, 16, 3000
    keys = torch.randn(n, 4, generator=g, dtype=torch.float64)
    rows = torch.tensor([0, 7, 123])
    q = torch.randn(len(rows), 4, generator=g, dtype=torch.float64)
    exact = torch.logsumexp(q @ keys.t(), dim=1).exp()
    pos_logit = (q * keys[rows]).sum(1)
    est, naive = [], []
    for s in range(draws):
        neg, log_w = uniform_negatives(n, k, s)
        est.append(sampled_logsumexp(pos_logit, q @ keys[neg].t(), log_w.double(), neg, rows).exp())
        naive.append(sampled_logsumexp(pos_logit, q @ keys[neg].t(), torch.zeros(k, dtype=torch.float64), neg, rows).exp())
    est, naive = torch.stack(est), torch.stack(naive)
    assert z_scores(est, exact).max() < Z_MAX
    assert z_scores(naive, exact).min() > 3 * Z_MAX         # without the log-q correction: far off
    assert (est.log().mean(0) < exact.log()).all()          # Jensen: the loss term itself is biased low


def test_inclusion_probability_matches_combinatorics():
    got = inclusion_probability(np.array([0, 1, 3, 10, 95]), 10, 100)
    want = [1 - math.comb(100 - d, 10) / math.comb(100, 10) for d in (0, 1, 3, 10, 95)]
    assert np.allclose(got, want, atol=1e-12)


def test_in_batch_horvitz_thompson_sum_is_unbiased():
    """Over the training loop's batches, Σ_{u in batch, distinct} f(u)/π(u) has mean Σ_{u with pairs} f(u)."""
    nu, ni, u, i = small_graph(3, pairs=800)
    triples = TripleSampler(ni, u, i, seed=0)
    deg = np.bincount(triples.users, minlength=nu)
    f = torch.rand(nu, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = f[torch.from_numpy(deg > 0)].sum()
    batch_size = 50
    est, naive = [], []
    for epoch in range(150):
        users = triples.epoch(epoch)[0]
        for b in range(triples.num_batches(batch_size)):
            ids = np.unique(users[b * batch_size:(b + 1) * batch_size])
            pi = inclusion_probability(deg[ids], len(users[b * batch_size:(b + 1) * batch_size]), len(users))
            est.append((f[ids] / torch.from_numpy(pi)).sum())
            # the count-based log-q weight 1/(B·deg/E) (expected occurrences instead of the probability of
            # at least one): biased as soon as a node can occur twice in a batch
            naive.append((f[ids] / torch.from_numpy(deg[ids] * batch_size / len(users))).sum())
    est, naive = torch.stack(est), torch.stack(naive)
    assert z_scores(est.unsqueeze(1), exact.view(1)).item() < Z_MAX
    assert z_scores(naive.unsqueeze(1), exact.view(1)).item() > Z_MAX


@pytest.mark.parametrize("negatives", ["in_batch", "uniform"])
def test_sampled_hcl_modes_train(tiny, one_thread, negatives):
    ds, triples = tiny
    _, eng = engines(ds, ["fanouts=[4,2]", "hyper_refresh_steps=2", f"hcl_negatives={negatives}",
                          "hcl_num_negatives=32"])
    exact_hcl = None
    for step in range(3):
        terms = eng.step(*batch_of(triples, step), step)
        assert all(math.isfinite(v) for v in terms.values())
        if step == 0:
            exact_hcl = terms["hcl"]
    # the approximate denominators estimate the same loss: same order of magnitude as the exact one
    _, ref = engines(ds)
    want = ref.step(*batch_of(triples, 0), 0)["hcl"]
    assert 0.5 * want < exact_hcl < 1.5 * want


# ------------------------------------------------------------------ stale hyperedge messages
def test_refresh_every_r_steps_uses_messages_from_the_last_refresh(tiny, one_thread):
    """r = 3: steps 3j..3j+2 use the messages of a full pass at step 3j with the parameters of that moment."""
    ds, triples = tiny
    r = 3
    _, eng = engines(ds, [f"hyper_refresh_steps={r}", "fanouts=[5]"])
    m = eng.sampled
    expected = None
    for step in range(8):
        if step % r == 0:
            expected = m.full_messages(step)              # parameters as they are before this step
            with torch.no_grad():                         # == the exact model's GHE messages (all nodes)
                ghe = m.model.ghe(m.model.cge(), step, train=True)
            assert all(torch.allclose(a, h.message, rtol=1e-6, atol=1e-7) for a, h in zip(expected, ghe))
        else:
            fresh = m.full_messages(step)
            assert not all(torch.allclose(a, b) for a, b in zip(fresh, expected))  # params moved: stale != fresh
        eng.step(*batch_of(triples, step), step)
        assert m.cache["step"] == step - step % r
        assert all(torch.equal(a, b) for a, b in zip(m.cache["messages"], expected))
        assert not any(t.requires_grad for t in m.cache["messages"])


def test_carried_messages_equal_a_fresh_pass_when_the_seeds_cover_every_item(tiny, one_thread):
    """hyper_message_update: a step replaces its seed items' contributions with the ones it computes. With
    full fanouts and a batch whose seeds hold every item, the held messages after the step are a full pass at
    that step's parameters and draws (H = 2, so the coupling C is carried too); without the update they are
    the older pass's."""
    ds, triples = tiny
    common = ["hyper_refresh_steps=50", "hyper_refreshes_per_epoch=0", "fanouts=[-1]", "train_batch_size=1024",
              "hcl_negatives=uniform", "hcl_num_negatives=32"]
    held = {}
    for flag in ("true", "false"):
        _, eng = engines(ds, common + [f"hyper_message_update={flag}"])
        m = eng.sampled
        eng.step(*batch_of(triples, 0, 1024), 0)                   # step 0: a full pass
        expected = m.full_messages(1, with_coupling=True)          # the parameters before step 1
        users, pos, neg = batch_of(triples, 1, 1024)
        assert len(torch.unique(torch.cat([pos, neg]))) == ds.num_items   # the premise: every item is a seed
        eng.step(users, pos, neg, 1)
        assert m.cache["step"] == 0
        held[flag] = m.cache
    for key in ("messages", "coupling"):
        for got, want, old in zip(held["true"][key], expected[key], held["false"][key]):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), key
            assert not torch.allclose(old, want, rtol=1e-3, atol=1e-4), key   # without the update: stale


def test_carried_sums_stay_the_sums_of_the_held_rows(tiny, one_thread):
    """After steps that each cover part of the items (sampled fanouts), the held sums are still Σ_i H̄[i]ᵀ·Q[i]
    and Σ_i H̄[i]ᵀ·H̄[i] over the held rows, and the step's seed items hold the E_c rows the step computed."""
    ds, triples = tiny
    _, eng = engines(ds, ["hyper_refresh_steps=50", "hyper_refreshes_per_epoch=0", "fanouts=[3,2]",
                          "train_batch_size=64", "hyper_message_update=true", "hcl_negatives=uniform",
                          "hcl_num_negatives=32", "sparse_embeddings=true"])
    m = eng.sampled
    for step in range(5):
        users, pos, neg = batch_of(triples, step, 64)
        if step == 4:
            batch = m.sampler.sample(users, pos, neg, step)
            with torch.no_grad():
                e_c = m.cge_rows(batch)
        eng.step(users, pos, neg, step)
    n_su = int(torch.searchsorted(batch.seeds, ds.num_users))
    assert torch.allclose(m.cache["q"][batch.seeds[n_su:] - ds.num_users], e_c[n_su:])
    assert len(batch.seeds) - n_su < ds.num_items                  # the premise: a part of the items
    for k, h in enumerate(m.cache["h"]):
        q = m.cache["q"]
        assert torch.allclose(m.cache["first"][k], (h.t() @ q).double(), rtol=1e-5, atol=1e-5)
        assert torch.allclose(m.cache["c"][k], (h.t() @ h).double(), rtol=1e-5, atol=1e-5)
        c = m.cache["c"][k].float()
        assert torch.allclose(m.cache["messages"][k], c @ h.t() @ q, rtol=1e-4, atol=1e-5)   # H = 2


def test_message_gradient_switch_changes_gradients_not_values(tiny, one_thread):
    ds, triples = tiny
    args = batch_of(triples, 0)
    base = ["hyper_refresh_steps=3", "fanouts=[5]", "hcl_negatives=uniform", "hcl_num_negatives=32"]
    grads = {}
    for flag in (True, False):
        _, eng = engines(ds, base + [f"hyper_message_grad={str(flag).lower()}"])
        m = eng.sampled
        batch = m.sampler.sample(*args, 0)
        terms = m.batch_loss(*args, 0, batch)
        terms["loss"].backward()
        grads[flag] = (terms["loss"].item(), m.model.item_embedding.grad.clone())
    assert grads[True][0] == grads[False][0]                  # the same forward value: the held messages
    assert not torch.equal(grads[True][1], grads[False][1])   # the global branch now reaches the CGE rows


def test_straight_through_message_gradient_is_unbiased():
    """Held message in value; gradient (to Q and H) of coupling·Hᵀ·Q estimated from uniform rows, unbiased."""
    g = torch.Generator().manual_seed(0)
    n, a, d, draws, per_draw = 40, 3, 2, 4000, 6
    h, q = torch.rand(n, a, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    c, upstream = torch.randn(a, a, generator=g, dtype=torch.float64), torch.randn(a, d, generator=g, dtype=torch.float64)
    held = torch.randn(a, d, generator=g, dtype=torch.float64)

    def grads(rows=None):
        hh, qq = h.clone().requires_grad_(), q.clone().requires_grad_()
        if rows is None:
            out = c @ hh.t() @ qq
        else:
            out = straight_through_message(held, c, hh[rows], qq[rows], n / len(rows))
            assert torch.equal(out.detach(), held)
        (out * upstream).sum().backward()
        return torch.cat([hh.grad.flatten(), qq.grad.flatten()])

    exact = grads()
    samples = torch.stack([grads(torch.randint(n, (per_draw,), generator=g)) for _ in range(draws)])
    assert z_scores(samples, exact).max() < Z_MAX
    biased = torch.stack([grads(torch.randint(n // 2, (per_draw,), generator=g)) for _ in range(200)])
    assert z_scores(biased, exact).max() > Z_MAX          # a non-uniform sample is seen as biased


@pytest.mark.parametrize("carry", ["false", "true"], ids=["held", "carried"])
def test_state_dict_round_trip_keeps_the_message_cache(tiny, one_thread, carry):
    ds, triples = tiny
    extra = ["hyper_refresh_steps=4", "fanouts=[3]", "hcl_negatives=uniform", "hcl_num_negatives=16",
             "sparse_embeddings=true", f"hyper_message_update={carry}"]
    _, a = engines(ds, extra)
    for step in range(2):
        a.step(*batch_of(triples, step), step)
    buffer = io.BytesIO()               # as a checkpoint: saved, then loaded (no tensor shared with `a`)
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    _, b = engines(ds, extra)
    b.load_state_dict(state)
    assert b.sampled.cache["step"] == 0
    for step in (2, 3):
        ta, tb = a.step(*batch_of(triples, step), step), b.step(*batch_of(triples, step), step)
        assert ta == tb


# ------------------------------------------------------------------ memory switches


def test_user_logits_from_items_equal_the_table(tiny, one_thread):
    """user_feature_table false sums the users' item rows each step: the same values as R·X_m's rows."""
    ds, triples = tiny
    _, table = engines(ds, APPROX)
    _, summed = engines(ds, APPROX + ["user_feature_table=false"])
    assert table.sampled.rx and not summed.sampled.rx
    ids = torch.tensor([0, 3, 7, 8, 40])
    for m in table.model.modalities:
        ref = table.sampled.rx[m].index_select(0, ids) @ table.model.hyper[m]
        assert torch.allclose(summed.sampled._user_logits_from_items(m, ids), ref, rtol=1e-5, atol=1e-6)
    for step in range(4):
        ta, tb = table.step(*batch_of(triples, step), step), summed.step(*batch_of(triples, step), step)
        for key in ta:
            assert tb[key] == pytest.approx(ta[key], rel=1e-5, abs=1e-7), (step, key)
    for name, p in table.model.named_parameters():
        assert torch.allclose(dict(summed.model.named_parameters())[name], p, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_feature_tables(tiny, one_thread, dtype):
    """feature_dtype holds Y_m and R·X_m in 16 bits (half the bytes); a step stays close to float32's."""
    ds, triples = tiny
    exact32, ref = engines(ds, APPROX)
    exact16, low = engines(ds, APPROX + [f"feature_dtype={dtype}"], exact_extra=[f"feature_dtype={dtype}"])
    assert all(y.dtype == getattr(torch, dtype) for y in low.model.mge_y.values())
    assert all(x.dtype == getattr(torch, dtype) for x in low.sampled.rx.values())
    mem32, mem16 = ref.sampled.memory_bytes(), low.sampled.memory_bytes()
    assert mem16["mge_inputs_Y"] * 2 == mem32["mge_inputs_Y"]
    assert mem16["user_feature_sums_RX"] * 2 == mem32["user_feature_sums_RX"]
    tol = 2e-2 if dtype == "bfloat16" else 2e-3
    for step in range(3):
        for a, b in ((ref, low), (exact32, exact16)):
            ta, tb = a.step(*batch_of(triples, step), step), b.step(*batch_of(triples, step), step)
            assert tb["loss"] == pytest.approx(ta["loss"], rel=tol), (step, dtype)
            assert tb["loss"] != ta["loss"]               # really a different precision
    e32, e16 = exact32.embeddings(), exact16.embeddings()
    assert all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(e32, e16))


def test_feature_dtype_is_checked():
    with pytest.raises(ConfigError, match="feature_dtype"):
        load_config(None, ["feature_dtype=int8"])


# ------------------------------------------------------------------ sparse embeddings
def test_sparse_embeddings_move_only_touched_rows(tiny, one_thread):
    ds, triples = tiny
    _, eng = engines(ds, ["sparse_embeddings=true", "hyper_refresh_steps=1", "fanouts=[2]",
                          "hcl_negatives=uniform", "hcl_num_negatives=8", "train_batch_size=16"])
    model = eng.model
    nu = model.num_users
    for step in range(3):
        users, pos, neg = batch_of(triples, step, size=16)
        batch = eng.sampled.sampler.sample(users, pos, neg, step)
        touched = torch.zeros(nu + model.num_items, dtype=torch.bool)
        touched[batch.input_ids] = True
        before = torch.cat([model.user_embedding, model.item_embedding]).detach().clone()
        eng.step(users, pos, neg, step)
        after = torch.cat([model.user_embedding, model.item_embedding]).detach()
        assert torch.equal(after[~touched], before[~touched])       # untouched rows: bit for bit
        # touched rows move, except those whose E^(0) no sampled edge reads (zero gradient on a first touch)
        assert (after[touched] != before[touched]).any(1).float().mean() > 0.5
        assert eng.last_stats["bytes"]["optimizer_rows"] == int(touched.sum())
    # dense Adam moves rows a step does not touch (momentum of earlier steps): equality with exact mode
    # therefore needs sparse_embeddings false
    _, dense = engines(ds, ["hyper_refresh_steps=1", "fanouts=[2]", "train_batch_size=16"])
    dm = dense.model
    dense.step(*batch_of(triples, 0, size=16), 0)
    users, pos, neg = batch_of(triples, 1, size=16)
    batch = dense.sampled.sampler.sample(users, pos, neg, 1)
    before = torch.cat([dm.user_embedding, dm.item_embedding]).detach().clone()
    dense.step(users, pos, neg, 1)
    after = torch.cat([dm.user_embedding, dm.item_embedding]).detach()
    untouched = torch.ones(len(after), dtype=torch.bool)
    untouched[batch.input_ids] = False
    assert (after[untouched] != before[untouched]).any()


def test_row_adam_is_adam_on_the_touched_rows():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 4, generator=g)
    ref = torch.nn.Parameter(table.clone())
    adam = torch.optim.Adam([ref], lr=0.01)
    row = RowAdam({"t": table}, lr=0.01)
    for _ in range(5):                               # every row touched: identical to dense Adam
        grad = torch.randn(50, 4, generator=g)
        ref.grad = grad.clone()
        adam.step()
        row.step("t", table, torch.arange(50), grad)
    assert torch.allclose(table, ref.detach(), atol=1e-7)
    before = table.clone()
    rows = torch.tensor([3, 17, 40])
    row.step("t", table, rows, torch.randn(3, 4, generator=g))
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(table[untouched], before[untouched]) and (table[rows] != before[rows]).all()


# ------------------------------------------------------------------ prefetching, config, loop
def test_prefetch_workers_give_the_same_batches(tiny, one_thread):
    ds, _ = tiny
    extra = ["fanouts=[3,2]", "hyper_refresh_steps=2", "hcl_negatives=uniform", "hcl_num_negatives=16"]
    cfg = load_config(None, OVERRIDES + EXACT_SWITCHES + extra)
    tu, ti = ds.pairs(TRAIN)
    triples = TripleSampler(ds.num_items, tu, ti, cfg.seed).epoch(0)   # what train.py feeds the engine
    _, sync = engines(ds, extra)
    _, pre = engines(ds, extra + ["sampler_workers=1"])
    try:
        for step in range(3):
            args = batch_of(triples, step)
            assert sync.step(*args, step) == pre.step(*args, step)
        assert pre.prefetcher.hits == 3                                     # all three came from the worker
        workers = pre.prefetcher.it._workers                                # the sampler runs below the step
        assert workers and all(os.getpriority(os.PRIO_PROCESS, w.pid)
                               == min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICENESS) for w in workers)
        other = batch_of(triples, 5)                                        # not the predicted batch
        assert sync.step(*other, 3) == pre.step(*other, 3)
    finally:
        pre.close()


def test_config_checks():
    with pytest.raises(ConfigError, match="hyper_refresh_steps"):
        load_config(None, ["mode=sampled", "sparse_embeddings=true", "hyper_refresh_steps=0"])
    load_config(None, ["mode=sampled", "sparse_embeddings=true", "hyper_refresh_steps=0", "use_ghe=false"])
    for bad in ("hyper_refresh_steps=-1", "hcl_num_negatives=0", "sampler_workers=-2", "hcl_negatives=some",
                "fanouts=[0]"):
        with pytest.raises(ConfigError):
            load_config(None, ["mode=sampled", bad])


def test_train_loop_runs_sampled_mode(tiny_dataset, tmp_path, one_thread):
    from lgmrec_dist.train import train
    cfg = load_config(None, OVERRIDES + ["mode=sampled", "fanouts=[4,3]", "hyper_refresh_steps=5",
                                         "hcl_negatives=uniform", "hcl_num_negatives=64", "sparse_embeddings=true",
                                         "epochs=2", "max_steps=14", "checkpoint_every_steps=4", "num_threads=1"])
    metrics = train(tiny_dataset, cfg, tmp_path / "run")
    assert metrics["steps"] == 14 and "recall@20" in metrics["test"]


# ------------------------------------------------------------------ 2 ranks (gloo, torchrun)
ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_worker(data: str, out: str, steps: int, extra: list[str]) -> None:
    """Run under torchrun: sampled engine on 2 ranks, global batches of epoch 0; write rank<R>.pt."""
    from lgmrec_dist.distributed.group import close_process_group, init_process_group
    from lgmrec_dist.train import make_evaluators
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ctx = init_process_group("cpu")
    ds = PreparedDataset.load(data)
    cfg = load_config(None, OVERRIDES + EXACT_SWITCHES + extra)
    eng = SampledEngine(cfg, ds, torch.device("cpu"), ctx)
    tu, ti = ds.pairs(TRAIN)
    triples = TripleSampler(ds.num_items, tu, ti, cfg.seed).epoch(0)
    losses = [eng.step(*batch_of(triples, b), b) for b in range(steps)]
    valid_eval, _ = make_evaluators(ds, cfg)
    m = eng.model
    torch.save({"losses": losses, "params": {k: v.detach() for k, v in m.named_parameters()},
                "valid": eng.evaluate(valid_eval, eng.embeddings()), "sent": eng.last_stats["bytes"]["sent_to_other_ranks"]},
               f"{out}/rank{ctx.rank}.pt")
    eng.close()
    close_process_group()


@pytest.fixture(scope="module", params=["exact_switches", "approximations"])
def two_rank_run(request, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"sampled-{request.param}")
    extra = [] if request.param == "exact_switches" else APPROX
    res = torchrun(2, str(Path(__file__).resolve()), str(tiny_dataset), str(out), "4", *extra)
    assert res.returncode == 0, res.stderr[-4000:]
    return request.param, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_sampled(two_rank_run, tiny, one_thread):
    kind, ranks = two_rank_run
    a, b = ranks
    assert a["losses"] == b["losses"] and a["valid"] == b["valid"]
    for key, value in a["params"].items():                     # the replicas stay identical
        assert torch.equal(value, b["params"][key]), key
    assert a["sent"] > 0
    ds, triples = tiny
    if kind == "exact_switches":                               # 2 ranks == the exact single-process engine
        exact = LocalEngine(load_config(None, OVERRIDES), ds, torch.device("cpu"))
        for step, got in enumerate(a["losses"]):
            ref = exact.step(*batch_of(triples, step), step)
            for key in ("loss", "bpr", "hcl", "reg"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (step, key)
        for name, ref in exact.model.named_parameters():
            assert torch.allclose(a["params"][name], ref.detach(), rtol=1e-4, atol=1e-6), name
        valid_eval, _ = make_evaluators(ds, load_config(None, OVERRIDES))
        ref = valid_eval.evaluate_metrics(*exact.embeddings())
        assert all(a["valid"][k] == pytest.approx(ref[k], abs=1e-4) for k in ref)
    else:
        assert all(math.isfinite(v) for step in a["losses"] for v in step.values())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.mode == ("sampled" if path.name == "large.yaml" else "exact")


def test_large_catalogue_config_trains(tiny_dataset, tmp_path):
    res = subprocess.run([sys.executable, "-m", "lgmrec_dist.cli", "train", "--data", str(tiny_dataset), "--config",
                          "configs/large.yaml", "--out", str(tmp_path / "run"), "--set", "epochs=1",
                          "--set", "max_steps=2", "--set", "train_batch_size=256", "--set", "hcl_num_negatives=64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "recall@20" in metrics["test"]
    assert "mode: sampled" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard_tables"])
def test_torchrun_train_sampled_mode(tiny_dataset, tmp_path, shard):
    """The training entry point end to end on 2 ranks (checkpoints, best model, test metrics); with sharded
    tables the best model's rows come from their owners, and `lgmrec export` reads them."""
    res = torchrun(2, "-m", "lgmrec_dist.train", "--data", str(tiny_dataset), "--config", "configs/demo.yaml",
                   "--out", str(tmp_path / "run"), "--set", "epochs=1", "--set", "max_steps=3",
                   "--set", "embedding_size=8", "--set", "mode=sampled", "--set", "fanouts=[4,4]",
                   "--set", "hyper_refresh_steps=2", "--set", "hcl_negatives=in_batch",
                   "--set", "sparse_embeddings=true", "--set", f"shard_tables={str(shard).lower()}")
    assert res.returncode == 0, res.stderr[-4000:]
    if shard:
        res = subprocess.run([sys.executable, "-m", "lgmrec_dist.cli", "export", "--run", str(tmp_path / "run"),
                              "--data", str(tiny_dataset), "--out", str(tmp_path / "export")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
        users = pq.read_table(tmp_path / "export" / "users.parquet")
        assert users.num_rows == PreparedDataset.load(tiny_dataset).num_users
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3 and "recall@20" in metrics["test"]


def tables_worker(data: str, out: str, steps: int) -> None:
    """Run under torchrun: replicated vs row-sharded feature tables (with and without the R·X table), the
    same global batches, every approximation on; write tables<R>.pt."""
    from lgmrec_dist.distributed.group import close_process_group, init_process_group
    from lgmrec_dist.train import make_evaluators
    torch.set_num_threads(1)
    ctx = init_process_group("cpu")
    ds = PreparedDataset.load(data)
    tu, ti = ds.pairs(TRAIN)
    variants = {"replicated": [], "sharded": ["shard_tables=true"],
                "sharded_no_rx": ["shard_tables=true", "user_feature_table=false"],
                "sharded_partitions": ["shard_tables=true", "partitioning=dataset"],
                "replicated_carry": ["hyper_message_update=true"],
                "sharded_carry": ["shard_tables=true", "hyper_message_update=true"]}
    # "sharded_partitions": ownership from a node partition (random, interleaved users and items) as prep
    # writes it, instead of contiguous ranges
    parts = Path(out) / "partitions"
    parts.mkdir(exist_ok=True)
    np.save(parts / "node_part.npy", np.random.default_rng(0).integers(0, 2, ds.num_users + ds.num_items))
    result = {}
    for name, extra in variants.items():
        if name == "sharded_partitions":
            ds.path, ds.manifest = Path(out), {**ds.manifest, "partitions": 2}
        cfg = load_config(None, OVERRIDES + EXACT_SWITCHES + APPROX + extra)
        eng = SampledEngine(cfg, ds, torch.device("cpu"), ctx)
        if name == "sharded_partitions":
            assert np.array_equal(eng.sampled.tables.own.part, np.load(parts / "node_part.npy"))
        triples = TripleSampler(ds.num_items, tu, ti, cfg.seed).epoch(0)
        losses = [eng.step(*batch_of(triples, b), b) for b in range(steps)]
        valid_eval, _ = make_evaluators(ds, cfg)
        params = {k: v.detach().clone() for k, v in eng.model.named_parameters()}
        if eng.sampled.tables is not None:        # this rank holds its rows of E_U, E_I: gather them
            params["user_embedding"], params["item_embedding"] = eng.sampled.full_ego().split(
                [ds.num_users, ds.num_items])
        result[name] = {"losses": losses, "memory": eng.sampled.memory_bytes(), "params": params,
                        "messages": eng.sampled.cache["messages"],
                        "num_parameters": eng.num_parameters(),
                        "valid": eng.evaluate(valid_eval, eng.embeddings()),
                        "sent": eng.last_stats["bytes"]["sent_to_other_ranks"]}
        eng.close()
    torch.save(result, f"{out}/tables{ctx.rank}.pt")
    close_process_group()


def test_row_sharded_tables_equal_replicated(tiny_dataset, tmp_path):
    """shard_tables: each rank holds 1/P of E_U, E_I, X_m, Y_m, R·X_m; losses, parameters and evaluation equal
    the replicated tables' (rows and products are served by their owners; only float sums' order differs)."""
    res = torchrun(2, str(Path(__file__).resolve()), "--tables", str(tiny_dataset), str(tmp_path), "4")
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"tables{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        ref = got["replicated"]
        for name, base in (("sharded", ref), ("sharded_no_rx", ref), ("sharded_partitions", ref),
                           ("sharded_carry", got["replicated_carry"])):   # carried messages: owners vs every rank
            run = got[name]
            for step, (a, b) in enumerate(zip(base["losses"], run["losses"])):
                for key in ("loss", "bpr", "hcl", "reg"):
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, step, key)
            for key, value in base["params"].items():
                assert torch.allclose(run["params"][key], value, rtol=1e-4, atol=1e-6), (name, key)
            assert all(run["valid"][k] == pytest.approx(v, abs=1e-4) for k, v in base["valid"].items()), name
        assert got["sharded"]["num_parameters"] == ref["num_parameters"]
        for key in ("embeddings", "features_X", "mge_inputs_Y", "user_feature_sums_RX"):   # about half of each
            assert 0.3 < got["sharded"]["memory"][key] / ref["memory"][key] < 0.7, key
        assert got["sharded_no_rx"]["memory"]["user_feature_sums_RX"] == 0
        for carried, plain in zip(got["replicated_carry"]["messages"], ref["messages"]):   # the update did act
            assert not torch.allclose(carried, plain, rtol=1e-3, atol=1e-4)
        assert got["sharded"]["sent"] > ref["sent"]       # the products travel too
    assert ranks[0]["sharded"]["params"].keys() == ranks[1]["sharded"]["params"].keys()
    for key, value in ranks[0]["sharded"]["params"].items():            # the replicas stay identical
        assert torch.equal(value, ranks[1]["sharded"]["params"][key]), key


def test_sampled_mode_defaults_and_exact_switches(tiny_dataset, one_thread):
    """``mode: sampled`` alone gets the large-catalogue settings; a given key wins; SAMPLED_EXACT turns every
    approximation off; the exact mode is untouched; the defaults train."""
    from lgmrec_dist.config import SAMPLED_DEFAULTS, SAMPLED_EXACT
    cfg = load_config(None, ["mode=sampled"])
    assert all(getattr(cfg, k) == v for k, v in SAMPLED_DEFAULTS.items())
    assert load_config(None, ["mode=sampled", "fanouts=[3]"]).fanouts == [3]
    assert SAMPLED_EXACT == EXACT_SWITCHES      # the documented switches are the ones the exactness tests use
    exact = load_config(None, SAMPLED_EXACT)
    assert (exact.fanouts, exact.hyper_refresh_steps, exact.hcl_negatives, exact.sparse_embeddings) == \
        ([-1], 0, "all", False)
    assert load_config(None).fanouts == [-1] and load_config(None).hyper_refresh_steps == 0
    with pytest.raises(ConfigError, match="hyper_refreshes_per_epoch"):
        load_config(None, ["mode=sampled", "hyper_refreshes_per_epoch=-1"])
    ds = PreparedDataset.load(tiny_dataset)
    eng = SampledEngine(load_config(None, OVERRIDES + ["mode=sampled", "hcl_num_negatives=32"]), ds,
                        torch.device("cpu"))
    try:
        users, pos, neg = (torch.from_numpy(a) for a in TripleSampler(ds.num_items, *ds.pairs(TRAIN), 5).epoch(0))
        for b in range(3):
            sl = slice(b * 256, (b + 1) * 256)
            assert math.isfinite(float(eng.step(users[sl], pos[sl], neg[sl], b)["loss"]))
    finally:
        eng.close()


def test_refreshes_scheduled_by_catalogue_size():
    """The refresh interval is max(r, ceil(steps per epoch / R)): at most R + 1 full passes in any epoch,
    whatever the number of training pairs, and r itself when R = 0 or the epoch is short."""
    from lgmrec_dist.sampled.step import refresh_interval
    for pairs in (1_000, 50_000, 1_234_567, 100_000_000):
        for per_epoch in (1, 2, 5):
            cfg = load_config(None, ["mode=sampled", "train_batch_size=2048", "hyper_refresh_steps=20",
                                     f"hyper_refreshes_per_epoch={per_epoch}"])
            r = refresh_interval(cfg, pairs)
            steps = -(-pairs // 2048)
            assert r >= 20
            for start in range(0, 3 * steps, max(1, steps // 3)):      # any epoch, wherever it starts
                passes = sum(1 for s in range(start, start + steps) if s % r == 0)
                assert passes <= per_epoch + 1, (pairs, per_epoch, passes)
            if steps <= 20 * per_epoch:
                assert r == 20
    assert refresh_interval(load_config(None, ["mode=sampled", "hyper_refreshes_per_epoch=0"]), 10**9) == 20
    assert refresh_interval(load_config(None, EXACT_SWITCHES), 10**9) == 0


def test_shard_tables_needs_the_sampled_global_terms():
    with pytest.raises(ConfigError, match="shard_tables"):
        load_config(None, ["mode=sampled", "shard_tables=true", "hyper_refresh_steps=0", "sparse_embeddings=false"])


if __name__ == "__main__":   # the torchrun workers of test_two_ranks_sampled and test_row_sharded_tables_*
    if sys.argv[1] == "--tables":
        tables_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        rank_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
