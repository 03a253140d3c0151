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


@needs_ext
@pytest.mark.parametrize("K,N", [(576, 989), (1537, 50), (17, 7)])
def test_every_m_one_tile_or_split_matches_float64_and_row_count(K, N):
    # AVX-512 tiles hold 8 rows with 3 weight rows and 12 rows with 2 (M = 9..12): every M from 1 to 33
    # (one tile, equal split, N % 3 and N % 2 tails, K % 16 tails) against float64 and against M = 1
    g = torch.Generator().manual_seed(K + N)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    x = torch.randn(33, K, generator=g)
    full = small_m_linear(x, w, b, backend="cuda")
    assert ((full.double() - _ref(x, w, b)).abs() <= _tol(x, w)).all()
    for M in list(range(1, 17)) + [23, 33]:
        assert torch.equal(small_m_linear(x[:M], w, b, num_threads=1, backend="cuda"), full[:M]), M
    assert torch.equal(small_m_linear(x[:8], w, b, num_threads=3, backend="cuda"), full[:8])


_ISA_SCRIPT = """
import torch, torch.nn.functional as F
from tokprune import _ext
from tokprune.ops.linear import small_m_linear
print(_ext.extension().linear_small_m_isa())
g = torch.Generator().manual_seed(5)
for K, N in [(576, 101), (111, 989), (3, 5)]:
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    x = torch.randn(17, K, generator=g)
    full = small_m_linear(x, w, b, backend="cuda")
    ref = F.linear(x.double(), w.double(), b.double())
    tol = 1e-6 * 8 + 2e-6 * (x.double().abs() @ w.double().abs().T)
    assert ((full.double() - ref).abs() <= tol).all(), (K, N)
    for M in range(1, 18):
        assert torch.equal(small_m_linear(x[:M], w, b, num_threads=1, backend="cuda"), full[:M]), (K, N, M)
        assert torch.equal(small_m_linear(x[:M], w, b, num_threads=2, backend="cuda"), full[:M]), (K, N, M)
print("ok")
"""


@needs_ext
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_isa_variants_via_env(isa):
    # TOKPRUNE_LINEAR_ISA caps the instruction set (read once per process): the SSE2 / AVX2 variants run
    # here even on an AVX-512 machine, in a subprocess
    import os
    import subprocess
    import sys

    import tokprune

    if isa == "avx2" and _ext.extension().linear_small_m_isa() == "base":
        pytest.skip("no AVX2 on this CPU")
    root = os.path.dirname(os.path.dirname(os.path.abspath(tokprune.__file__)))
    env = dict(os.environ, TOKPRUNE_LINEAR_ISA=isa, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [isa, "ok"]


@needs_ext
def test_bound_weight_matches_host_call_and_checks_inputs():
    from tokprune.kernels.cuda import SmallMLinearBound, small_m_linear_host

    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(989, 111, generator=g), torch.randn(989, generator=g)
    for bias in (None, b):
        bound = SmallMLinearBound(w, bias)
        for M in (1, 2, 8, 12, 16):
            x = torch.randn(M, 111, generator=g)
            y = bound(x, 1)
            assert y.shape == (M, 989) and y.is_contiguous()
            assert torch.equal(y, small_m_linear_host(x, w, bias, 1))
            assert torch.equal(bound.run(x, 2), y)
        xs = torch.randn(6, 300, generator=g)[:, 7:118]       # row stride 300
        assert torch.equal(bound(xs, 1), small_m_linear_host(xs, w, bias, 1))
        xt = torch.randn(111, 4, generator=g).T                # last dim not contiguous
        assert torch.equal(bound(xt, 1), small_m_linear_host(xt.contiguous(), w, bias, 1))
    w.mul_(2.0)                                                # in-place weight updates are seen
    x = torch.randn(3, 111, generator=g)
    assert torch.equal(bound(x, 1), small_m_linear_host(x, w, b, 1))
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor of shape"):
        bound(torch.randn(3, 110), 1)
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor of shape"):
        bound(torch.randn(3, 111).double(), 1)
    with pytest.raises(ValueError, match="threads"):
        bound(x, 0)
    with pytest.raises(ValueError, match="weight must be a 2D float32 CPU tensor"):
        SmallMLinearBound(torch.randn(4, 3).half())
    with pytest.raises(ValueError, match="bias must be a float32 CPU tensor"):
        SmallMLinearBound(torch.randn(4, 3), torch.randn(5))
