import pytest
import torch

from tests.helpers import assert_close, backend_params, dev
from tokprune.ops import gather_tokens, select_tokens
from tokprune.reference.selection import gather_tokens_naive


def _naive_select(scores, keep, keep_mask=None):
    """Row by row: forced tokens first, then highest score, ties to the lower index."""
    out = []
    for r, row in enumerate(scores.reshape(-1, scores.shape[-1]).tolist()):
        forced = [] if keep_mask is None else [i for i, f in enumerate(keep_mask.reshape(-1, scores.shape[-1])[r]) if f]
        rest = sorted((i for i in range(len(row)) if i not in forced), key=lambda i: (-row[i], i))
        out.append(sorted(forced + rest[: min(keep, len(row)) - len(forced)]))
    return torch.tensor(out).reshape(*scores.shape[:-1], -1)


@pytest.mark.parametrize("shape,keep", [((3, 37), 5), ((2, 3, 64), 64), ((1, 10), 25), ((4, 1), 1), ((2, 7), 0)])
def test_select_tokens_matches_naive(shape, keep):
    scores = torch.randn(shape)
    scores[..., ::3] = 0.5  # ties
    assert torch.equal(select_tokens(scores, keep), _naive_select(scores, keep))


def test_select_tokens_keep_mask_and_padding():
    scores = torch.randn(2, 20)
    keep_mask = torch.zeros(2, 20, dtype=torch.bool)
    keep_mask[:, -3:] = True
    scores[1, :15] = float("-inf")  # padding: chosen only when nothing else is left
    idx = select_tokens(scores, 6, keep_mask=keep_mask)
    assert torch.equal(idx, _naive_select(scores, 6, keep_mask))
    assert set([17, 18, 19]) <= set(idx[0].tolist())
    assert idx[1].tolist()[1:] == [15, 16, 17, 18, 19]


def test_select_tokens_errors():
    with pytest.raises(ValueError, match="scores contains NaN"):
        select_tokens(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="keep must be a non-negative int"):
        select_tokens(torch.randn(1, 4), -1)
    with pytest.raises(ValueError, match="keep_mask forces 3 tokens in a row but keep=2"):
        select_tokens(torch.randn(1, 4), 2, keep_mask=torch.tensor([[True, True, True, False]]))
    with pytest.raises(TypeError, match="scores must have dtype"):
        select_tokens(torch.arange(4), 2)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,kv_heads,heads,n_tokens,n_keep,head_dim", [
    (1, 1, 1, 11, 5, 16), (2, 2, 6, 111, 40, 80), (1, 3, 9, 64, 64, 64), (2, 1, 2, 17, 0, 8)])
def test_gather_matches_oracle(backend, dtype, batch, kv_heads, heads, n_tokens, n_keep, head_dim):
    x = torch.randn(batch, kv_heads, n_tokens, head_dim).to(dtype)
    index = torch.randint(0, n_tokens, (batch, heads, n_keep))
    expected = gather_tokens_naive(x, index)  # not the torch backend: an independent oracle
    if n_keep:  # the oracle itself against the definition
        b, h, k = batch - 1, heads - 1, n_keep - 1
        assert torch.equal(expected[b, h, k], x[b, h // (heads // kv_heads), index[b, h, k]])
    got = gather_tokens(*dev(x, index), backend=backend)
    assert got.dtype == dtype and torch.equal(got.cpu(), expected)  # a gather is exact


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
def test_gather_strided_input_and_int32_index(backend):
    base = torch.randn(2, 40, 3, 32)  # (B, N, Hkv, D) layout, viewed as (B, Hkv, N, D)
    x = base.transpose(1, 2)
    index = torch.randint(0, 40, (2, 6, 9), dtype=torch.int32)
    assert_close(gather_tokens(*dev(x, index), backend=backend), gather_tokens_naive(x.contiguous(), index))


def test_gather_errors():
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(IndexError, match=r"index values must lie in \[0, 8\)"):
        gather_tokens(x, torch.tensor([[[0, 8]] * 2]))
    with pytest.raises(ValueError, match="heads multiple of kv_heads=2"):
        gather_tokens(x, torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        gather_tokens(x[0], torch.zeros(1, 2, 2, dtype=torch.long))
