"""tokprune.spec._linear.packed_linears: which kernel a tree forward's linears run on."""

import pytest
import torch
import torch.nn.functional as F

from tokprune import _ext
from tokprune.spec._linear import SMALL_M_MAX, packed_linears, packing_available, release_packed

needs_kernel = pytest.mark.skipif(_ext.load_error() is not None or not _ext.extension() or
                                  not hasattr(_ext.extension(), "small_m_linear"),
                                  reason="tokprune._C with small_m_linear is not available")


def _model():
    g = torch.Generator().manual_seed(0)
    # a wide output layer (like an LM head, more than 16384 outputs) after a small one, odd K
    model = torch.nn.Sequential(torch.nn.Linear(37, 19), torch.nn.Linear(19, 20001, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@needs_kernel
@pytest.mark.skipif(not packing_available(_model()), reason="oneDNN packing unavailable")
def test_small_m_rows_run_the_host_kernel_on_every_layer_and_never_pack():
    from tokprune.kernels.cuda import small_m_linear_host

    model = _model()
    release_packed(model)
    x = torch.randn(2, 4, 37, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with packed_linears(model) as active:
            assert active
            got = model(x)
            assert release_packed(model) == 0          # 8 rows: nothing packed
            h = small_m_linear_host(x.reshape(8, 37), model[0].weight, model[0].bias, torch.get_num_threads())
            ref = small_m_linear_host(h, model[1].weight, None, torch.get_num_threads())
            assert torch.equal(got.reshape(8, 20001), ref)
            one = model(x[:1, :1])                     # one row: F.linear, the numbers of the plain model
            assert torch.equal(one, F.linear(F.linear(x[:1, :1], model[0].weight, model[0].bias), model[1].weight))
            many = model(torch.randn(SMALL_M_MAX + 1, 37, generator=torch.Generator().manual_seed(2)))
            assert many.shape == (SMALL_M_MAX + 1, 20001)
        assert release_packed(model) == 2              # more rows packed both layers, on first use
        torch.testing.assert_close(many, model(torch.randn(SMALL_M_MAX + 1, 37,
                                                            generator=torch.Generator().manual_seed(2))),
                                   atol=1e-3, rtol=1e-4)
