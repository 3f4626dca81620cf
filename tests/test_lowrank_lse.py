"""The low-rank log-sum-exp (docs/model.md, "Speed rewrites" 3): the fused kernel, the torch.compile form's
maths and the fallback all equal the direct form, in value and in both gradients."""
import pytest
import torch

from lgmrec_dist import native
from lgmrec_dist.model import lowrank_lse
from lgmrec_dist.model.lowrank_lse import (form_for, lowrank_logsumexp, lowrank_logsumexp_direct, pointwise_backward,
                                           pointwise_forward, use_form)


def inputs(b, n, a, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(b, a, generator=gen)).requires_grad_()
    k = torch.randn(n, a, generator=gen).requires_grad_()
    grad = torch.rand(b, generator=gen) + 0.5
    return q, k, grad


def value_and_grads(fn, q, k, grad):
    q.grad = k.grad = None
    lse = fn(q, k)
    lse.backward(grad)
    return lse.detach().clone(), q.grad.clone(), k.grad.clone()


def assert_close(got, want, rtol=2e-5):
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=rtol, atol=rtol * w.abs().max().item()), (g - w).abs().max()


# sizes off the kernel's tile (512), segment (8192) and row block (64) boundaries; small budgets force many
# row blocks and a single one
@pytest.mark.parametrize("b, n, a, max_elements", [(1, 1, 1, 1 << 24), (70, 513, 4, 1 << 24), (130, 8200, 3, 40_000),
                                                   (9, 700, 9, 10), (300, 2000, 4, 1 << 24)])
def test_fused_matches_direct(b, n, a, max_elements):
    q, k, grad = inputs(b, n, a, scale=3.0)
    assert form_for(q, k) == "fused"  # the image has a C compiler: a silent fallback must not pass this test
    fused = value_and_grads(lambda x, y: lowrank_logsumexp(x, y, max_elements), q, k, grad)
    direct = value_and_grads(lambda x, y: lowrank_logsumexp_direct(x, y, max_elements), q, k, grad)
    assert_close(fused, direct)


def test_fused_is_stable_for_large_logits_denormals_and_zero_weights():
    q, k, grad = inputs(50, 3000, 4, scale=40.0)       # logits of a few hundred: exp overflows without a shift
    grad[::3] = 0.0                                    # rows with no weight contribute nothing
    with torch.no_grad():
        k[::7, 1] = 3e-39                              # denormal assignments, as a Gumbel-softmax gives
    fused = value_and_grads(lowrank_logsumexp, q, k, grad)
    assert all(torch.isfinite(t).all() for t in fused)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    want = value_and_grads(lowrank_logsumexp_direct, q64, k64, grad.double())
    assert_close(fused, [t.float() for t in want], rtol=1e-5)
    assert (fused[1][::3] == 0).all()


def test_fused_is_bit_identical_across_runs_and_thread_counts():
    q, k, grad = inputs(300, 9000, 4, scale=3.0)
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2, 2, 1):
            torch.set_num_threads(t)
            runs.append(value_and_grads(lowrank_logsumexp, q, k, grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for run in runs[1:] for x, y in zip(run, runs[0]))


def test_without_a_compiler_the_direct_form_runs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LGMREC_KERNEL_CACHE", str(tmp_path / "cache"))
    q, k, grad = inputs(40, 600, 4)
    with caplog.at_level("WARNING", logger="lgmrec"):
        assert native.load(lowrank_lse.SOURCE) is None
        assert form_for(q, k) == "direct"
    assert "no-such-cc" in caplog.text
    fallback = value_and_grads(lowrank_logsumexp, q, k, grad)
    direct = value_and_grads(lowrank_logsumexp_direct, q, k, grad)
    assert all(torch.equal(x, y) for x, y in zip(fallback, direct))
    assert not list((tmp_path / "cache").glob("*.so"))


def test_a_fresh_cache_compiles_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("LGMREC_KERNEL_CACHE", str(tmp_path))
    assert native.load(lowrank_lse.SOURCE) is not None
    assert len(list(tmp_path.glob("lowrank_lse-*.so"))) == 1


def test_forced_forms_and_other_dtypes_fall_back():
    q, k, _ = inputs(5, 20, 4)
    with use_form("direct"):
        assert form_for(q, k) == "direct"
    assert form_for(q.double(), k.double()) == "direct"
    with pytest.raises(ValueError, match="form"):
        with use_form("fast"):
            pass


def test_pointwise_form_of_the_compiled_kernel_matches_direct():
    """The functions torch.compile fuses on CUDA, run eagerly here: same values and gradients."""
    q, k, grad = inputs(60, 700, 4, scale=3.0)
    direct = value_and_grads(lowrank_logsumexp_direct, q, k, grad)
    with torch.no_grad():
        lse = pointwise_forward(q, k)
        grad_q, grad_k = pointwise_backward(q, k, lse, grad)
    assert_close((lse, grad_q, grad_k), direct)
