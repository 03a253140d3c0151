"""window_attention_scores against its loop oracle, and against the scorers it replaces."""

import pytest
import torch

from tests.helpers import assert_close
from tokprune.ops import token_sparse_scores, window_attention_scores
from tokprune.reference.window import window_attention_scores_reference


def _inputs(batch=2, heads=4, kv_heads=2, n_q=23, n_tokens=23, dim=16, dtype=torch.float32):
    q = torch.randn(batch, heads, n_q, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, n_tokens, dim, dtype=dtype)
    return q, k


@pytest.mark.parametrize("group_reduce", ["sum", "mean", None])
@pytest.mark.parametrize("window_reduce,pool_mode,prefix", [("sum", "max", False), ("mean", "avg", True),
                                                           ("sum", "avg", False), ("mean", "max", True)])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_oracle(group_reduce, window_reduce, pool_mode, prefix, padded):
    q, k = _inputs()
    valid = None
    if padded:
        valid = torch.ones(2, 23, dtype=torch.bool)
        valid[1, :6] = False  # left padding of row 1
    kw = dict(window_reduce=window_reduce, pool_mode=pool_mode, pool_prefix_only=prefix)
    got = window_attention_scores(q, k, 5, 7, 0.3, valid, group_reduce, **kw)
    ref = window_attention_scores_reference(q, k, 5, 7, 0.3, valid, group_reduce, **kw)
    assert got.dtype == torch.float32
    assert got.shape == (2, 4 if group_reduce is None else 2, 23)
    assert_close(got, ref, name="window scores")
    if padded:
        assert bool(torch.isneginf(got[1, :, :6]).all()) and bool(torch.isfinite(got[1, :, 6:]).all())


def test_queries_at_end_of_longer_key_bf16_and_no_causal():
    q, k = _inputs(n_q=6, n_tokens=31)
    got = window_attention_scores(q, k, 4, 3)
    assert_close(got, window_attention_scores_reference(q, k, 4, 3))
    got = window_attention_scores(q, k, 50, 1, causal=False, group_reduce=None)  # window clamps to n_q
    assert_close(got, window_attention_scores_reference(q, k, 50, 1, causal=False, group_reduce=None))
    # every window query's probabilities sum to one: the summed scores total heads * w
    assert_close(got.sum(-1), torch.full((2, 4), 6.0))
    qb, kb = q.bfloat16(), k.bfloat16()
    assert_close(window_attention_scores(qb, kb, 4, 3), window_attention_scores_reference(qb, kb, 4, 3),
                 atol=1e-5, rtol=1e-4)


def test_token_sparse_scoring_is_this_op():
    q, k = _inputs(n_q=40, n_tokens=40)
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[0, :9] = False
    expected = token_sparse_scores(q, k, window=8, kernel_size=7, key_padding_mask=pad)
    got = window_attention_scores(q, k, 8, 7, None, pad, None, window_reduce="mean", pool_mode="avg",
                                  pool_prefix_only=True)
    assert_close(got, expected)


def test_errors_name_the_argument():
    q, k = _inputs()
    with pytest.raises(ValueError, match="pool must be a positive odd int"):
        window_attention_scores(q, k, 4, 4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        window_attention_scores(q, k, 0)
    with pytest.raises(ValueError, match="group_reduce"):
        window_attention_scores(q, k, 4, group_reduce="max")
    with pytest.raises(ValueError, match=r"valid must be \(batch=2, T=23\)"):
        window_attention_scores(q, k, 4, valid=torch.ones(2, 22, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of key kv_heads"):
        window_attention_scores(q[:, :3], k, 4)
    with pytest.raises(ValueError, match="n_q <= T"):
        window_attention_scores(q, k[:, :, :5], 4)
