"""The C kernels of the step's products (docs/model.md §7.2): the CSR product (rewrite 6) and the narrow
frozen-table product X·V (rewrite 7) equal torch's products in value (and, through ``graph.spmm``, in gradient),
are bit-identical with any thread count, and fall back to torch's form where they do not apply."""
import numpy as np
import pytest
import torch

from lgmrec_dist import graph
from lgmrec_dist.graph import csr, csr_mm, spmm
from lgmrec_dist.model.features import NARROW, _narrow_kernel, narrow_matmul


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
