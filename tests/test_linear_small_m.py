"""tokprune.ops.linear.small_m_linear: the host kernel of tokprune._C against F.linear in float64."""

import pytest
import torch
import torch.nn.functional as F

from tokprune import _ext
from tokprune.ops.linear import small_m_linear

needs_ext = pytest.mark.skipif(_ext.load_error() is not None or not _ext.extension() or
                               not hasattr(_ext.extension(), "small_m_linear"),
                               reason="tokprune._C with small_m_linear is not available")


def _ref(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _tol(x, w):
    # fp32 accumulation over K terms: relative to the sum of |x_k w_k|
    return 1e-6 * 8 + 2e-6 * (x.double().abs() @ w.double().abs().T)


@needs_ext
@pytest.mark.parametrize("K,N", [(111, 989), (989, 111), (64, 48), (3, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_for_every_m(K, N, with_bias):
    g = torch.Generator().manual_seed(K * 7 + N)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if with_bias else None
    for M in range(1, 18):
        x = torch.randn(M, K, generator=g)
        y = small_m_linear(x, w, b, backend="cuda")
        assert y.shape == (M, N) and y.dtype == torch.float32
        assert ((y.double() - _ref(x, w, b)).abs() <= _tol(x, w)).all(), (M, K, N)


@needs_ext
def test_strided_and_batched_inputs():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(989, 111, generator=g), torch.randn(989, generator=g)
    big = torch.randn(12, 300, generator=g)
    x = big[::2, 5:116]                                  # row stride 600, last dim contiguous
    y = small_m_linear(x, w, b, backend="cuda")
    assert ((y.double() - _ref(x, w, b)).abs() <= _tol(x, w)).all()
    xt = torch.randn(111, 6, generator=g).T              # last dim not contiguous
    assert ((small_m_linear(xt, w, backend="cuda").double() - _ref(xt, w, None)).abs() <= _tol(xt, w)).all()
    x3 = torch.randn(2, 5, 111, generator=g)             # leading dims flattened to rows
    y3 = small_m_linear(x3, w, b, backend="cuda")
    assert y3.shape == (2, 5, 989)
    assert torch.equal(y3.reshape(10, 989), small_m_linear(x3.reshape(10, 111), w, b, backend="cuda"))
    wt = torch.randn(111, 989, generator=g).T            # weight with a non-contiguous last dim
    assert ((small_m_linear(x, wt, backend="cuda").double() - _ref(x, wt, None)).abs() <= _tol(x, wt)).all()


@needs_ext
def test_threads_and_row_count_do_not_change_results():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(989, 576, generator=g), torch.randn(989, generator=g)
    x = torch.randn(16, 576, generator=g)
    one = small_m_linear(x, w, b, num_threads=1, backend="cuda")
    assert torch.equal(one, small_m_linear(x, w, b, num_threads=2, backend="cuda"))
    for M in (1, 3, 8, 13):
        assert torch.equal(small_m_linear(x[:M], w, b, num_threads=1, backend="cuda"), one[:M])


@needs_ext
def test_auto_picks_kernel_for_fp32_and_torch_otherwise():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 24, generator=g)
    x = torch.randn(4, 24, generator=g)
    assert torch.equal(small_m_linear(x, w), small_m_linear(x, w, backend="cuda"))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(small_m_linear(xb, wb), F.linear(xb, wb))
    assert small_m_linear(torch.zeros(0, 24), w).shape == (0, 40)


@needs_ext
def test_custom_op_traces_under_compile():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(33, 17, generator=g), torch.randn(33, generator=g)
    x = torch.randn(5, 17, generator=g)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fw, fb = mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b)
        out = torch.ops.tokprune_ext.small_m_linear(fx, fw, fb, 1)
    assert out.shape == (5, 33)
    assert torch.equal(torch.ops.tokprune_ext.small_m_linear(x, w, b, 1), small_m_linear(x, w, b, backend="cuda"))


def test_input_checks_name_the_argument():
    w = torch.randn(8, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        small_m_linear([1.0], w)
    with pytest.raises(ValueError, match="weight must have shape"):
        small_m_linear(torch.randn(2, 5), w)
    with pytest.raises(TypeError, match="weight must have dtype"):
        small_m_linear(torch.randn(2, 4), w.double())
    with pytest.raises(ValueError, match="bias must have shape"):
        small_m_linear(torch.randn(2, 4), w, torch.randn(7))
    with pytest.raises(ValueError, match="num_threads"):
        small_m_linear(torch.randn(2, 4), w, num_threads=0)
