"""The C kernels of the step (docs/model.md §7.2): the CSR product (rewrite 6), the narrow frozen-table product
X·V (rewrite 7) and the hyperedge Gumbel-softmax with dropout (rewrite 10) equal their torch forms in value and
gradient, are bit-identical with any thread count, and fall back to the torch form where they do not apply."""
import numpy as np
import pytest
import torch

from lgmrec_dist import graph, rng
from lgmrec_dist.graph import csr, csr_mm, spmm
from lgmrec_dist.keys import distinct, distinct_counts, pair_keys
from lgmrec_dist.model import hypergraph
from lgmrec_dist.model.features import NARROW, _narrow_kernel, narrow_matmul
from lgmrec_dist.model.hypergraph import assign


def with_thread_counts(fn, counts=(1, 2, 1, 2)):
    """fn() run with each number of threads in turn."""
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in counts:
            torch.set_num_threads(n)
            outs.append(fn())
    finally:
        torch.set_num_threads(threads)
    return outs


def random_csr(rows, cols, nnz, seed=0):
    r = np.random.default_rng(seed)
    rr, cc = r.integers(0, rows, nnz), r.integers(0, cols, nnz)
    keys = np.unique(rr * cols + cc)  # distinct entries; some rows stay empty
    return csr(keys // cols, keys % cols, r.standard_normal(len(keys)), (rows, cols))


def dense_x(rows, d, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32))


# widths across the kernel's column tiles (64, 16, 4, 1) and their tails; more rows than the parallel grain
@pytest.mark.parametrize("d", [1, 3, 4, 17, 64, 70, 130])
def test_kernel_matches_torch_csr_product(d):
    assert graph._kernel() is not None  # the image has a C compiler: a silent fallback must not pass this test
    a = random_csr(3000, 900, 20_000)
    assert (a.crow_indices().diff() == 0).any()  # empty rows are written as zeros, not left unset
    x = dense_x(900, d)
    got, want = csr_mm(a, x), torch.sparse.mm(a, x)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item()), (got - want).abs().max()
    assert torch.equal(csr_mm(a, x, fused=False), want)


def test_kernel_writes_into_out():
    a, x = random_csr(300, 200, 2000), dense_x(200, 20)
    for fused in (True, False):
        out = torch.full((300, 20), float("nan"))
        assert csr_mm(a, x, fused=fused, out=out) is out
        assert torch.equal(out, csr_mm(a, x, fused=fused))
    with pytest.raises(ValueError, match="out"):
        csr_mm(a, x, out=torch.empty(300, 40)[:, :20])


def test_distinct_and_pair_keys_equal_np_unique():
    r = np.random.default_rng(4)
    for a in (np.zeros(0, np.int64), np.array([7]), r.integers(0, 50, 1000), r.integers(-5, 5, 99).astype(np.int32)):
        assert np.array_equal(distinct(a), np.unique(a)) and distinct(a).dtype == np.unique(a).dtype
    u, i = r.integers(0, 30, 500), r.integers(0, 20, 500)
    assert np.array_equal(pair_keys(u, i, 20), np.unique(u * 20 + i))
    for a in (np.zeros(0, np.int64), np.array([7]), r.integers(0, 50, 1000)):
        values, counts = distinct_counts(a)
        want_values, want_counts = np.unique(a, return_counts=True)
        assert np.array_equal(values, want_values) and np.array_equal(counts, want_counts)
        w = r.integers(1, 9, len(a))
        values, sums = distinct_counts(a, w)
        assert np.array_equal(sums, [w[a == v].sum() for v in want_values])


def test_kernel_is_bit_identical_across_runs_and_thread_counts():
    a, x = random_csr(5000, 5000, 60_000), dense_x(5000, 64)
    outs = with_thread_counts(lambda: csr_mm(a, x))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_spmm_gradient_is_the_transposed_product():
    a = random_csr(400, 300, 3000)
    a_t = a.to_dense().t().to_sparse_csr()
    x = dense_x(300, 64).requires_grad_()
    g = dense_x(400, 64, seed=2)
    spmm(a, a_t, x).backward(g)
    want = a.to_dense().t() @ g
    assert torch.allclose(x.grad, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_other_dtypes_and_layouts_take_the_torch_form():
    a = random_csr(50, 40, 300)
    x = dense_x(40, 8)
    assert torch.allclose(csr_mm(a.to(torch.float64), x.double()), torch.sparse.mm(a.to(torch.float64), x.double()))
    coo = a.to_sparse_coo()
    assert torch.allclose(csr_mm(coo, x), torch.sparse.mm(coo, x))
    with pytest.raises(ValueError, match="csr_mm"):
        csr_mm(a, dense_x(41, 8))


@pytest.mark.parametrize("n, d, a", [(1, 1, 1), (9, 37, 3), (130, 512, 4), (70, 200, 6), (50, 64, 16)])
def test_narrow_kernel_matches_torch_product(n, d, a):
    assert _narrow_kernel() is not None  # the image has a C compiler: a silent fallback must not pass this test
    gen = torch.Generator().manual_seed(n)
    x, w = torch.randn(n, d, generator=gen), torch.randn(d, a, generator=gen)
    want = x @ w
    got = narrow_matmul(x, w)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), (got - want).abs().max()
    assert torch.equal(narrow_matmul(x, w, fused=False), want)
    assert torch.equal(narrow_matmul(x.t().contiguous().t(), w), got)  # a column-major table: the same bits


def test_narrow_kernel_is_bit_identical_across_thread_counts_and_falls_back_for_wide_weights():
    x, w = torch.randn(3001, 300), torch.randn(300, 4)
    outs = with_thread_counts(lambda: narrow_matmul(x, w))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    wide = torch.randn(300, NARROW + 1)
    assert torch.equal(narrow_matmul(x, wide), x @ wide)
    assert torch.equal(narrow_matmul(x.double(), w.double()), x.double() @ w.double())


def assign_value_and_grad(z, noise, mask, fused):
    z = z.clone().requires_grad_()
    h = assign(z, 0.2, noise, mask, 0.5 if mask is not None else 1.0, fused=fused)
    h.backward(torch.linspace(-1, 1, h.numel()).reshape(h.shape))
    return h.detach(), z.grad


# rows off the kernel's block (256); with and without noise and dropout; logits spread enough that some
# assignments fall below the smallest normal float (the kernel writes them as 0)
@pytest.mark.parametrize("n, a", [(1, 1), (300, 4), (1000, 3), (257, 7)])
@pytest.mark.parametrize("with_noise, with_mask", [(True, True), (False, False), (True, False), (False, True)])
def test_assign_kernel_matches_torch_form(n, a, with_noise, with_mask):
    assert hypergraph._kernel() is not None  # the image has a C compiler: a silent fallback must not pass this test
    gen = torch.Generator().manual_seed(n + a)
    z = 4.0 * torch.randn(n, a, generator=gen)
    noise = rng.keyed_gumbel(3, torch.arange(n), a) if with_noise else None
    mask = rng.keyed_uniform(4, torch.arange(n), a) < 0.5 if with_mask else None
    got, want = assign_value_and_grad(z, noise, mask, True), assign_value_and_grad(z, noise, mask, False)
    # the gradient p·(g - Σ p·g)/τ cancels where p ≈ 1: its rounding is that of the incoming gradient (|g| ≤ 1)/τ
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6), (got[0] - want[0]).abs().max()
    assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-6 / 0.2), (got[1] - want[1]).abs().max()
    tiny = torch.finfo(torch.float32).tiny
    assert not ((got[0] != 0) & (got[0].abs() < tiny)).any()  # no subnormal assignment is written
    # zeros: the dropped entries, and softmax values (h·keep_rate) that are subnormal or below exp(-87)
    p = (want[0] * (0.5 if with_mask else 1.0)).abs()
    assert (got[0][p < tiny] == 0).all() and (p[got[0] == 0] < 1.7e-38).all()


def test_assign_kernel_is_bit_identical_across_thread_counts():
    z = 3.0 * torch.randn(20_000, 4)
    noise = rng.keyed_gumbel(1, torch.arange(20_000), 4)
    mask = rng.keyed_uniform(2, torch.arange(20_000), 4) < 0.5
    outs = with_thread_counts(lambda: assign_value_and_grad(z, noise, mask, True))
    assert all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs[1:])


def test_kernel_cache_key_covers_the_local_headers(tmp_path):
    from lgmrec_dist import native
    (tmp_path / "k.h").write_text("#define K 1\n")
    (tmp_path / "k.c").write_text('#include <stdint.h>\n#include "k.h"\nint k(void) { return K; }\n')
    before = native._source_text(tmp_path / "k.c")
    (tmp_path / "k.h").write_text("#define K 2\n")
    assert native._source_text(tmp_path / "k.c") != before  # a changed header is a new library, not a stale one


def test_without_a_compiler_the_torch_forms_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LGMREC_KERNEL_CACHE", str(tmp_path / "cache"))
    a, x = random_csr(300, 200, 2000), dense_x(200, 64)
    w = torch.randn(64, 4)
    z = 3.0 * torch.randn(300, 4)
    noise, mask = rng.keyed_gumbel(1, torch.arange(300), 4), rng.keyed_uniform(2, torch.arange(300), 4) < 0.5
    with caplog.at_level("WARNING", logger="lgmrec"):
        assert graph._kernel() is None and _narrow_kernel() is None and hypergraph._kernel() is None
        got = csr_mm(a, x), narrow_matmul(x, w), assign_value_and_grad(z, noise, mask, True)
    assert "no-such-cc" in caplog.text
    assert torch.equal(got[0], csr_mm(a, x, fused=False)) and torch.equal(got[1], narrow_matmul(x, w, fused=False))
    want = assign_value_and_grad(z, noise, mask, False)
    assert torch.equal(got[2][0], want[0]) and torch.equal(got[2][1], want[1])
    assert not list((tmp_path / "cache").glob("*.so"))
