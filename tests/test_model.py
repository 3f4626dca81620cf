"""LGMRec equations (docs/model.md §1) on tiny graphs, checked against dense numpy arithmetic, and the
speed rewrites checked against the direct form (same loss and gradients)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lgmrec_dist import rng
from lgmrec_dist.config import load_config
from lgmrec_dist.graph import build_graph
from lgmrec_dist.model import TAU, LGMRec, model_params
from lgmrec_dist.model.cge import cge
from lgmrec_dist.model.hypergraph import dependencies, hypergraph_propagate
from lgmrec_dist.model.losses import hcl_loss, infonce_direct, infonce_lowrank, reg_loss
from lgmrec_dist.model.mge import mge_direct, mge_inputs
from lgmrec_dist.model.reference import reference_forward, reference_loss

# 3 users, 4 items; item 3 is isolated (only in valid/test in a real split); (0, 1) given twice.
U, I = 3, 4
TRAIN_U = np.array([0, 0, 0, 1, 1, 2])
TRAIN_I = np.array([0, 1, 1, 1, 2, 2])


def dense_graph():
    """Ĝ, R, P by hand: deg counts distinct neighbours, D = diag(deg + 1e-7)."""
    R = np.zeros((U, I))
    R[TRAIN_U, TRAIN_I] = 1.0
    G = np.block([[np.zeros((U, U)), R], [R.T, np.zeros((I, I))]])
    deg = G.sum(1)
    d = 1 / np.sqrt(deg + 1e-7)
    return G * d[:, None] * d[None, :], R, R / (R.sum(1, keepdims=True) + 1e-7), deg


def test_graph_matches_hand_construction():
    g = build_graph(U, I, TRAIN_U, TRAIN_I)
    norm, R, P, deg = dense_graph()
    assert np.allclose(g.deg.numpy(), [2, 2, 1, 1, 2, 2, 0])
    # user 0 has 2 distinct items, item 1 has 2 distinct users: Ĝ[0, U+1] = 1/sqrt(2*2)
    assert g.norm_adj.to_dense()[0, U + 1].item() == pytest.approx(0.5, rel=1e-6)
    assert np.allclose(g.norm_adj.to_dense().numpy(), norm, atol=1e-7)
    assert np.allclose(g.R.to_dense().numpy(), R)  # duplicates count once
    assert np.allclose(g.P.to_dense().numpy(), P, atol=1e-6)
    assert np.allclose(g.norm_adj.to_dense().numpy(), g.norm_adj.to_dense().numpy().T)


def test_cge_is_layer_mean_of_powers():
    g = build_graph(U, I, TRAIN_U, TRAIN_I)
    norm, *_ = dense_graph()
    e0 = np.random.default_rng(0).standard_normal((U + I, 5))
    out = cge(g, torch.tensor(e0, dtype=torch.float32), 3).numpy()
    want = (e0 + norm @ e0 + norm @ norm @ e0 + norm @ norm @ norm @ e0) / 4
    assert np.allclose(out, want, atol=1e-5)
    assert np.array_equal(cge(g, torch.tensor(e0), 3, "mf").numpy(), e0)  # mf ablation: no propagation


def test_mge_mean_of_items_last_layer_and_precompute():
    g = build_graph(U, I, TRAIN_U, TRAIN_I)
    norm, R, P, _ = dense_graph()
    r = np.random.default_rng(1)
    x, w = r.standard_normal((I, 6)), r.standard_normal((6, 3))
    f_i = x @ w
    f_u = np.stack([f_i[[0, 1]].mean(0), f_i[[1, 2]].mean(0), f_i[2]])  # mean of the user's items
    want = norm @ norm @ np.concatenate([f_u, f_i])                        # K = 2, last layer only
    xt, wt = torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32)
    assert np.allclose(mge_direct(g, xt, wt, 2).numpy(), want, atol=1e-5)
    assert np.allclose((mge_inputs(g, xt, 2, chunk=4) @ wt).numpy(), want, atol=1e-5)
    assert np.allclose(mge_direct(g, xt, wt, 0).numpy(), np.concatenate([f_u, f_i]), atol=1e-5)
    # chunked (a ragged last chunk, buffers reused), one chunk, rows only, no layers: the same Y
    whole = mge_inputs(g, xt, 2)
    assert torch.equal(mge_inputs(g, xt, 2, chunk=4), whole)
    assert torch.equal(mge_inputs(g, xt, 2, chunk=4, rows=torch.tensor([4, 0])), whole[[4, 0]])
    assert np.allclose((mge_inputs(g, xt, 0, chunk=5) @ wt).numpy(), np.concatenate([f_u, f_i]), atol=1e-5)


def test_hypergraph_layers_by_hand():
    g = build_graph(U, I, TRAIN_U, TRAIN_I)
    _, R, _, _ = dense_graph()
    r = np.random.default_rng(2)
    x, v = r.standard_normal((I, 5)), r.standard_normal((5, 2))
    gi, gu = r.gumbel(size=(I, 2)), r.gumbel(size=(U, 2))
    keep_i, keep_u = r.random((I, 2)) < 0.5, r.random((U, 2)) < 0.5
    z_i = x @ v
    z_u = R @ z_i                                         # sum (not mean) of item logits, before softmax
    softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    h_i = softmax((z_i + gi) / TAU) * keep_i / 0.5        # inverted dropout scaling 1/ρ
    h_u = softmax((z_u + gu) / TAU) * keep_u / 0.5
    q0 = r.standard_normal((I, 3))
    m1 = h_i.T @ q0
    q1 = h_i @ m1
    m2 = h_i.T @ q1                                       # H = 2: same masked H̄_I in both layers
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    hi, hu = dependencies(t(x), t(v), g, TAU, noise=(t(gi), t(gu)), masks=(torch.tensor(keep_i), torch.tensor(keep_u)),
                          keep_rate=0.5)
    assert np.allclose(hi.numpy(), h_i, atol=1e-5) and np.allclose(hu.numpy(), h_u, atol=1e-5)
    out = hypergraph_propagate(hi, hu, t(q0), 2)
    assert np.allclose(out.items().numpy(), h_i @ m2, atol=1e-4)
    assert np.allclose(out.users().numpy(), h_u @ m2, atol=1e-4)  # users: last layer's messages only


def test_infonce_by_hand_and_lowrank():
    r = np.random.default_rng(3)
    gv, gt = r.standard_normal((5, 4)), r.standard_normal((5, 4))
    rows = np.array([0, 2, 2])                            # duplicates count separately
    nv = gv / np.linalg.norm(gv, axis=1, keepdims=True)
    nt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
    want = sum(-math.log(math.exp(nv[u] @ nt[u] / TAU) / np.exp(nt @ nv[u] / TAU).sum()) for u in rows)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    assert infonce_direct(t(gv), t(gt), torch.tensor(rows), TAU).item() == pytest.approx(want, rel=1e-10)
    # rank-≤A form: g = h·M
    hv, mv, ht, mt = r.random((5, 3)), r.standard_normal((3, 4)), r.random((5, 3)), r.standard_normal((3, 4))
    direct = infonce_direct(t(hv @ mv), t(ht @ mt), torch.tensor(rows), TAU)
    lowrank = infonce_lowrank(t(hv), t(mv), t(ht), t(mt), torch.tensor([0, 2]), t(np.array([1.0, 2.0])), TAU)
    assert lowrank.item() == pytest.approx(direct.item(), rel=1e-10)


def test_reg_is_plain_frobenius_over_batch():
    u, p, n = torch.ones(4, 2), 2 * torch.ones(4, 2), torch.zeros(4, 2)
    assert reg_loss(u, p, n, 4).item() == pytest.approx((math.sqrt(8) + math.sqrt(32) + 0) / 4)


def tiny_model(overrides=None, dims=None, seed=0):
    r = np.random.default_rng(seed)
    nu, ni, ne = 40, 30, 300
    cfg = load_config(None, {"embedding_size": 8, "hyper_num": 4, "seed": seed, **(overrides or {})})
    g = build_graph(nu, ni, r.integers(0, nu, ne), r.integers(0, ni, ne))
    dims = dims or {"image": 16, "text": 8}
    feats = {k: torch.from_numpy(r.standard_normal((ni, d)).astype(np.float32)) for k, d in dims.items()}
    model = LGMRec(model_params(cfg), nu, ni, dims).attach(g, feats)
    batch = tuple(torch.tensor(r.integers(0, n, 64)) for n in (nu, ni, ni))
    return model, batch


def test_parameter_count_formula():
    model, _ = tiny_model({"hyper_num": 5}, {"image": 16, "text": 8})
    assert model.num_parameters() == (40 + 30) * 8 + 16 * (8 + 5) + 8 * (8 + 5)
    # the official datasets: Baby 2,000,320 (docs/model.md §1.2)
    assert (19445 + 7050) * 64 + (4096 + 384) * (64 + 4) == 2_000_320


def test_fusion_by_hand():
    model, _ = tiny_model({"alpha": 0.7})
    e, globals_ = reference_forward(model, step=5, train=False)
    model.eval()
    users, items = model.final_embeddings()
    assert torch.allclose(torch.cat([users, items]), e, atol=1e-5)
    e_c = model.cge()
    f = [F.normalize(model.mge_held(m), dim=1) for m in model.modalities]
    g = sum(torch.cat([gu, gi]) for gu, gi in globals_)
    assert torch.allclose(e, e_c + f[0] + f[1] + 0.7 * F.normalize(g, dim=1), atol=1e-5)


CASES = [
    {},
    {"cf_model": "mf"},
    {"use_mge": False},
    {"use_ghe": False},
    {"cl_weight": 0.0},
    {"mge_precompute": False},
    {"n_hyper_layer": 3, "n_ui_layers": 3, "n_mm_layers": 1, "keep_rate": 0.3, "cl_weight": 0.01},
    {"keep_rate": 1.0},
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_rewrites_match_direct_form(overrides):
    model, (u, p, n) = tiny_model(overrides)
    fast = model.batch_loss(u, p, n, step=7)
    fast["loss"].backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    model.zero_grad()
    ref = reference_loss(model, u, p, n, step=7)
    ref["loss"].backward()
    for key in ("loss", "bpr", "hcl", "reg"):
        assert fast[key].item() == pytest.approx(ref[key].item(), rel=2e-5, abs=1e-6), key
    for name, param in model.named_parameters():  # float32 reassociation: compare at the gradient's scale
        scale = param.grad.abs().max().item()
        assert (grads[name] - param.grad).abs().max().item() <= 1e-4 * scale, name


def test_three_modalities_chain_pairs():
    model, (u, p, n) = tiny_model({"cl_weight": 0.01}, {"image": 16, "text": 8, "audio": 4})
    fast = model.batch_loss(u, p, n, step=1)
    ref = reference_loss(model, u, p, n, step=1)
    assert float(fast["hcl"]) == pytest.approx(float(ref["hcl"]), rel=2e-5)
    hyper = model.ghe(model.cge(), 1, train=True)
    one_pair = hcl_loss(hyper[:2], u, p, TAU) + hcl_loss(hyper[1:], u, p, TAU)
    assert float(fast["hcl"]) == pytest.approx(float(one_pair), rel=1e-6)  # image→text + text→audio


def test_single_modality_has_no_contrastive_term():
    model, (u, p, n) = tiny_model({}, {"image": 16})
    assert float(model.batch_loss(u, p, n, step=0)["hcl"]) == 0.0


def test_inference_is_deterministic_unless_gumbel_noise_requested():
    model, _ = tiny_model()
    model.eval()
    a, b = model.final_embeddings(), model.final_embeddings()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    model.cfg.eval_gumbel_noise = True
    c, d = model.final_embeddings(), model.final_embeddings()
    assert not torch.equal(c[0], d[0])  # official behaviour: fresh noise at every inference


def test_keyed_draws_do_not_depend_on_which_ids_are_drawn_together():
    key = rng.stream_key(999, 12, 3)
    full = rng.keyed_uniform(key, torch.arange(1000), 4)
    part = rng.keyed_uniform(key, torch.tensor([7, 500, 999]), 4)
    assert torch.equal(full[[7, 500, 999]], part)
    assert 0 < full.min() and full.max() < 1
    assert abs(full.mean().item() - 0.5) < 0.02 and abs(full.std().item() - (1 / 12) ** 0.5) < 0.01
    assert not torch.equal(full, rng.keyed_uniform(rng.stream_key(999, 13, 3), torch.arange(1000), 4))
    extremes = rng.to_unit(torch.tensor([0, 2**32 - 1]))
    assert 0 < extremes[0] and extremes[1] < 1 and torch.isfinite(-torch.log(-torch.log(extremes))).all()
    g = rng.keyed_gumbel(key, torch.arange(20000), 1)
    assert abs(g.mean().item() - 0.5772) < 0.03  # Euler–Mascheroni constant


def test_step_gradients_have_a_fixed_reduction_order_with_threads():
    """Without torch's deterministic mode, 2 threads: the same step gives bit-identical gradients every time
    (repeated batch rows are gathered with index_select, the log-sum-exp kernel sums in a fixed order)."""
    r = np.random.default_rng(0)
    nu, ni = 300, 200
    cfg = load_config(None, {"embedding_size": 64, "seed": 0})
    g = build_graph(nu, ni, r.integers(0, nu, 3000), r.integers(0, ni, 3000))
    feats = {"image": torch.from_numpy(r.standard_normal((ni, 32)).astype(np.float32)),
             "text": torch.from_numpy(r.standard_normal((ni, 16)).astype(np.float32))}
    model = LGMRec(model_params(cfg), nu, ni, {"image": 32, "text": 16}).attach(g, feats)
    batch = tuple(torch.tensor(r.integers(0, n, 1024)) for n in (nu, ni, ni))  # 3 × 1024 rows × 64 > the grain
    threads, mode = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    try:
        grads = []
        for _ in range(6):
            model.zero_grad()
            model.batch_loss(*batch, step=1)["loss"].backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(mode)
    assert all(torch.equal(x, y) for run in grads[1:] for x, y in zip(run, grads[0]))


def test_keyed_draws_kernel_gives_the_torch_forms_bits():
    from lgmrec_dist import rng
    assert rng._kernel() is not None  # the image has a C compiler: a silent fallback must not pass this test
    ids = torch.cat([torch.arange(50_000), torch.tensor([2**33 + 7, 2**40])])  # above 32 bits: the high lane
    for key in (rng.stream_key(999, 5, 3), rng.stream_key(1, -2, 7), 0xFFFFFFFF):
        for width in (1, 4):
            assert torch.equal(rng.keyed_uniform(key, ids, width), rng.keyed_uniform(key, ids, width, fused=False))


def test_weight_gradients_flush_subnormal_entries_only():
    from lgmrec_dist.model.features import const_rows_matmul, flush_subnormals
    g = torch.tensor([[1e-39, -3e-40, 1.2e-38, -5.0], [0.0, 2.0, -1e-45, 7e-30]])
    assert torch.equal(flush_subnormals(g), torch.tensor([[0.0, 0.0, 1.2e-38, -5.0], [0.0, 2.0, 0.0, 7e-30]]))
    x = torch.randn(2, 3)
    w = torch.randn(3, 4, requires_grad=True)
    const_rows_matmul(x, w).backward(g)
    assert torch.equal(w.grad, x.t() @ flush_subnormals(g))

