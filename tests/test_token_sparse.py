"""Token sparse attention ops: scores, compress/decompress (torch + Triton), composed attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close, backend_params, dev, host
from tokprune._backend import BackendUnavailable
from tokprune.ops import compress_qkv, decompress, select_tokens, token_sparse_attention, token_sparse_scores
from tokprune.ops.token_sparse import coverage_keep_count, resolve_keep
from tokprune.reference.token_sparse import (compress_qkv_reference, decompress_reference,
                                             token_sparse_attention_reference, token_sparse_scores_reference)


def _qkv(batch, heads, kv_heads, n, dim, dtype=torch.float32):
    return (torch.randn(batch, heads, n, dim).to(dtype), torch.randn(batch, kv_heads, n, dim).to(dtype),
            torch.randn(batch, kv_heads, n, dim).to(dtype))


def _sorted_indices(batch, heads, n, n_keep):
    return torch.stack([torch.randperm(n)[:n_keep].sort().values for _ in range(batch * heads)]).view(
        batch, heads, n_keep)


def _left_padding(batch, n, pads):
    mask = torch.ones(batch, n, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return mask


# ------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("batch,heads,kv_heads,n,window,kernel", [
    (1, 2, 2, 40, 8, 7), (2, 6, 2, 33, 5, 3), (1, 3, 1, 9, 16, 5), (2, 4, 2, 20, 20, 1)])
def test_scores_match_full_attention_oracle(batch, heads, kv_heads, n, window, kernel):
    q, k, _ = _qkv(batch, heads, kv_heads, n, 16)
    got = token_sparse_scores(q, k, window=window, kernel_size=kernel)
    expected = token_sparse_scores_reference(q, k, window=window, kernel_size=kernel, scale=16 ** -0.5)
    assert_close(got, expected, atol=1e-6)
    # without pooling, window rows sum to one over the keys (a probability mean)
    if kernel == 1:
        assert_close(got.sum(-1), torch.ones(batch, heads), atol=1e-5)


def test_scores_padding_and_scale_and_noncausal():
    q, k, _ = _qkv(2, 4, 2, 30, 8)
    pad = _left_padding(2, 30, [0, 9])
    got = token_sparse_scores(q, k, window=6, kernel_size=3, scale=0.3, key_padding_mask=pad)
    expected = token_sparse_scores_reference(q, k, window=6, kernel_size=3, scale=0.3, key_padding_mask=pad)
    assert torch.equal(torch.isinf(got), ~pad[:, None, :].expand_as(got))
    assert_close(got.nan_to_num(0, neginf=0), expected.nan_to_num(0, neginf=0), atol=1e-6)
    got_nc = token_sparse_scores(q, k, window=6, kernel_size=1, causal=False)
    assert_close(got_nc, token_sparse_scores_reference(q, k, window=6, kernel_size=1, scale=8 ** -0.5,
                                                       causal=False), atol=1e-6)
    assert not torch.allclose(got_nc, token_sparse_scores(q, k, window=6, kernel_size=1))


def test_scores_find_a_planted_key():
    q, k, _ = _qkv(1, 2, 1, 64, 16)
    k[0, 0, 10] = q[0, 0, -8:].mean(0) * 4  # key 10 matches head 0's recent queries
    scores = token_sparse_scores(q, k, window=8, kernel_size=1)
    assert int(scores[0, 0, :56].argmax()) == 10


# ------------------------------------------------------------------------------------------- compress / decompress
@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n,n_keep,dim", [
    (1, 1, 1, 11, 5, 16), (2, 6, 2, 111, 40, 80), (1, 9, 3, 64, 64, 64), (2, 4, 2, 300, 17, 8),
    (2, 2, 1, 17, 0, 8)])
def test_compress_matches_oracle(backend, dtype, batch, heads, kv_heads, n, n_keep, dim):
    q, k, v = _qkv(batch, heads, kv_heads, n, dim, dtype)
    idx = _sorted_indices(batch, heads, n, n_keep)
    got = host(*compress_qkv(*dev(q, k, v, idx), backend=backend))
    for name, g, e in zip("qkv", got, compress_qkv_reference(q, k, v, idx)):
        assert g.shape == (batch, heads, n_keep, dim) and g.dtype == dtype
        assert torch.equal(g, e), name
    if n_keep:  # spot check against the definition
        b, h, j = batch - 1, heads - 1, n_keep - 1
        assert torch.equal(got[1][b, h, j], k[b, h // (heads // kv_heads), idx[b, h, j]])


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
def test_compress_strided_hf_layout_and_int32(backend):
    q_bnhd, k_bnhd, v_bnhd = torch.randn(2, 50, 4, 16), torch.randn(2, 50, 2, 16), torch.randn(2, 50, 2, 16)
    q, k, v = q_bnhd.transpose(1, 2), k_bnhd.transpose(1, 2), v_bnhd.transpose(1, 2)  # HF's views
    idx = _sorted_indices(2, 4, 50, 12).int()
    for g, e in zip(host(*compress_qkv(*dev(q, k, v, idx), backend=backend)),
                    compress_qkv_reference(q.contiguous(), k.contiguous(), v.contiguous(), idx)):
        assert torch.equal(g, e)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decompress_matches_oracle_and_round_trips(backend, dtype):
    batch, heads, n, n_keep, dim = 2, 3, 70, 23, 24
    x = torch.randn(batch, heads, n, dim).to(dtype)
    idx = _sorted_indices(batch, heads, n, n_keep)
    comp = torch.gather(x, 2, idx[..., None].expand(-1, -1, -1, dim))
    out = host(decompress(*dev(comp, idx), n, backend=backend))
    assert out.shape == (batch, heads, n, dim) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # HF layout for free
    assert torch.equal(out, decompress_reference(comp, idx, n))
    selected = torch.zeros(batch, heads, n, dtype=torch.bool).scatter_(2, idx, True)
    assert torch.equal(out[selected], x[selected])  # round trip of the kept rows
    assert not out[~selected].any()  # the paper's rule: zeros elsewhere
    # compress -> decompress round trip through compress_qkv (x as q, k, v; no GQA)
    qc, kc, _ = compress_qkv(*dev(x, x, x, idx), backend=backend)
    assert torch.equal(host(decompress(qc, dev(idx), n, backend=backend)), out)
    # a tensor fill supplies the non-selected rows and is not modified
    fill = torch.randn(batch, heads, n, dim).to(dtype)
    before = fill.clone()
    got = host(decompress(*dev(comp, idx), n, fill=dev(fill), backend=backend))
    assert torch.equal(got, decompress_reference(comp, idx, n, fill=fill)) and torch.equal(fill, before)
    assert torch.equal(host(decompress(*dev(comp, idx), n, fill=2.5, backend=backend))[~selected],
                       torch.full_like(x[~selected], 2.5))


def test_compress_decompress_errors():
    q, k, v = _qkv(1, 4, 2, 10, 8)
    idx = _sorted_indices(1, 4, 10, 3)
    with pytest.raises(IndexError, match=r"indices values must lie in \[0, 10\)"):
        compress_qkv(q, k, v, idx + 8)
    with pytest.raises(ValueError, match=r"indices must be \(batch=1, heads=4, n_keep\)"):
        compress_qkv(q, k, v, idx[:, :2])
    with pytest.raises(ValueError, match="q heads \\(4\\) must be a multiple of k heads \\(3\\)"):
        compress_qkv(q, torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8), idx)
    with pytest.raises(TypeError, match="k must have dtype in \\(float32\\)"):
        compress_qkv(q, k.half(), v, idx)
    with pytest.raises(ValueError, match="v must be"):
        compress_qkv(q, k, v[:, :, :5], idx)
    with pytest.raises(ValueError, match=r"seq_len must be an int >= n_keep=3"):
        decompress(torch.randn(1, 4, 3, 8), idx, 2)
    with pytest.raises(ValueError, match="fill must be"):
        decompress(torch.randn(1, 4, 3, 8), idx, 10, fill=torch.zeros(1, 4, 9, 8))
    with pytest.raises(BackendUnavailable, match="not implemented"):
        token_sparse_scores(q, k, backend="triton")


# ------------------------------------------------------------------------------------------- attention
def test_keep_one_equals_dense_exactly():
    q, k, v = _qkv(2, 6, 2, 57, 32)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out, idx = token_sparse_attention(q, k, v, keep=1.0, return_indices=True)
    assert idx is None and torch.equal(out, dense)
    assert torch.equal(token_sparse_attention(q, k, v, keep=57), dense)
    # a budget that the window / min_tokens floor raises to the whole sequence is dense too
    assert torch.equal(token_sparse_attention(q, k, v, keep=0.1, window=64), dense)
    assert torch.equal(token_sparse_attention(q, k, v, keep=0.1, window=4, min_tokens=100), dense)


def test_compressed_path_with_every_token_equals_dense():
    """Identity index sets through compress -> SDPA(causal) -> decompress reproduce dense attention."""
    q, k, v = _qkv(2, 6, 3, 45, 16)
    idx = torch.arange(45).expand(2, 6, 45)
    qc, kc, vc = compress_qkv(q, k, v, idx)
    out = decompress(F.scaled_dot_product_attention(qc, kc, vc, is_causal=True), idx, 45)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("batch,heads,kv_heads,n,keep,window", [
    (1, 4, 4, 64, 0.25, 8), (2, 6, 2, 101, 0.5, 16), (1, 9, 3, 80, 20, 4)])
def test_sparse_attention_matches_oracle(backend, batch, heads, kv_heads, n, keep, window):
    q, k, v = _qkv(batch, heads, kv_heads, n, 16)
    out, idx = host(*token_sparse_attention(*dev(q, k, v), keep=keep, window=window, kernel_size=3,
                                            return_indices=True, backend=backend))
    n_keep = resolve_keep(keep, n)
    assert idx.shape == (batch, heads, n_keep)
    assert bool((idx[..., 1:] > idx[..., :-1]).all())  # sorted, distinct: causal order preserved
    assert bool((idx[..., -window:] == torch.arange(n - window, n)).all())  # window always kept
    # the selection is the top of the oracle's scores
    scores = token_sparse_scores_reference(q, k, window=window, kernel_size=3, scale=16 ** -0.5)
    forced = torch.zeros(batch, heads, n, dtype=torch.bool)
    forced[..., n - window:] = True
    assert torch.equal(idx, select_tokens(scores, n_keep, keep_mask=forced))
    assert_close(out, token_sparse_attention_reference(q, k, v, idx, scale=16 ** -0.5), atol=2e-5)
    # heads select different tokens (per-head selection, not one shared set)
    assert len({tuple(r.tolist()) for r in idx.reshape(-1, n_keep)}) > 1


def test_sparse_attention_padding_and_noncausal():
    q, k, v = _qkv(3, 4, 2, 60, 16)
    pad = _left_padding(3, 60, [0, 13, 40])
    out, idx = token_sparse_attention(q, k, v, keep=0.4, window=8, key_padding_mask=pad, return_indices=True)
    assert not torch.isnan(out).any()
    ref = token_sparse_attention_reference(q, k, v, idx, scale=0.25, key_padding_mask=pad)
    assert_close(out, ref, atol=2e-5)
    # padding is selected only when fewer real tokens than the budget exist (row 2 has 20 real < 24)
    chosen_pad = ~torch.gather(pad[:, None, :].expand(3, 4, 60), 2, idx)
    assert not chosen_pad[:2].any() and int(chosen_pad[2].sum(-1).max()) == 24 - 20
    assert not out[2, :, :40].any()  # padding rows are zero
    # dense path (keep=1.0) with padding equals SDPA on the real tokens
    dense = token_sparse_attention(q, k, v, keep=1.0, key_padding_mask=pad)
    mask = pad[:, None, None, :] & torch.ones(60, 60, dtype=torch.bool).tril()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(dense[1, :, 13:], sdpa[1, :, 13:])
    # non-causal
    out, idx = token_sparse_attention(q, k, v, keep=0.3, window=8, causal=False, return_indices=True)
    assert_close(out, token_sparse_attention_reference(q, k, v, idx, scale=0.25, causal=False), atol=2e-5)


def test_sparse_attention_bf16_close_to_fp64_oracle():
    q, k, v = (t.bfloat16() for t in _qkv(1, 4, 2, 96, 32))
    out, idx = token_sparse_attention(q, k, v, keep=0.5, window=16, return_indices=True)
    assert out.dtype == torch.bfloat16
    ref = token_sparse_attention_reference(q.double(), k.double(), v.double(), idx, scale=32 ** -0.5)
    assert_close(out.double(), ref.to(torch.bfloat16).double(), atol=3e-2, rtol=3e-2)


def test_empty_and_single_token():
    q, k, v = _qkv(1, 2, 1, 0, 8)
    assert token_sparse_attention(q, k, v).shape == (1, 2, 0, 8)
    assert token_sparse_scores(q, k).shape == (1, 2, 0)
    q, k, v = _qkv(1, 2, 1, 1, 8)
    assert_close(token_sparse_attention(q, k, v, keep=0.25), v.expand(1, 2, 1, 8))


def test_attention_errors():
    q, k, v = _qkv(1, 4, 2, 10, 8)
    for bad in (0.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match=r"keep must be a float in \(0, 1\]"):
            token_sparse_attention(q, k, v, keep=bad)
    with pytest.raises(ValueError, match=r"an int keep must lie in \[1, n_tokens=10\]"):
        token_sparse_attention(q, k, v, keep=11)
    with pytest.raises(ValueError, match="keep must be"):
        token_sparse_attention(q, k, v, keep=True)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        token_sparse_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must be \(batch=1, kv_heads, n_tokens=10, head_dim=8\)"):
        token_sparse_attention(q, k[:, :, :9], v)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(batch=1, n_tokens=10\)"):
        token_sparse_attention(q, k, v, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_tokens must be a non-negative int"):
        token_sparse_attention(q, k, v, min_tokens=-1)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        token_sparse_scores(q, k, kernel_size=4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        token_sparse_attention(q, k, v, window=0)


# ------------------------------------------------------------------------------------------- coverage rule (tau)
def _coverage_count_by_hand(scores, window, tau, min_tokens):
    """The paper's kept count written as plain loops over rows and sorted values."""
    batch, heads, n = scores.shape
    w = min(window, n)
    prefix = n - w
    counts = []
    for b in range(batch):
        g = [sum(max(float(scores[b, h, j]), 0.0) if math.isfinite(float(scores[b, h, j])) else 0.0
                 for h in range(heads)) / heads for j in range(prefix)]
        total = sum(g) + 1e-8
        acc, sparse = 0.0, 0
        for value in sorted(x / total for x in g):
            acc += value
            sparse += acc < tau
        counts.append(sparse)
    sparse = min(counts)
    if sparse == 0:
        return n
    return min(n, w + max(min_tokens - w, prefix - sparse - 1))


def test_coverage_count_hand_example():
    # prefix of 8 tokens, head-mean mass [1, 1, 1, 1, 96, 0, 0, 0] / 100 (window 2 after it).
    # sorted ascending: 0, 0, 0, .01, .01, .01, .01, .96 -> cumsum 0, 0, 0, .01, .02, .03, .04, 1
    # tau = 0.025: 5 values below -> 5 + 1 = 6 tokens dropped, 2 prefix tokens + the window kept.
    mass = torch.tensor([1.0, 1, 1, 1, 96, 0, 0, 0, 5, 5])
    scores = torch.stack([mass * 0.5, mass * 1.5])[None]  # two heads; the head mean is `mass`
    assert coverage_keep_count(scores, window=2, tau=0.025) == 2 + 2
    assert coverage_keep_count(scores, window=2, tau=0.025, min_tokens=7) == 7  # floor: 5 prefix + window
    assert coverage_keep_count(scores, window=2, tau=0.0) == 10  # nothing below tau: dense
    # a second row whose rule drops fewer tokens sets the one count of the batch
    flat = torch.ones(1, 2, 10)  # uniform: cumsum .125, .25, ... -> tau .2 drops 1 + 1
    both = torch.cat([scores, flat])
    assert coverage_keep_count(both, window=2, tau=0.2) == min(10, 2 + 8 - 1 - 1)
    with pytest.raises(ValueError, match=r"tau must be a float in \[0, 1\)"):
        coverage_keep_count(scores, window=2, tau=1.5)


@pytest.mark.parametrize("tau", [0.005, 0.05, 0.3])
def test_coverage_count_matches_loop_oracle(tau):
    q, k, _ = _qkv(2, 4, 2, 70, 16)
    pad = _left_padding(2, 70, [0, 9])
    scores = token_sparse_scores(q, k, window=8, kernel_size=3, key_padding_mask=pad)
    got = coverage_keep_count(scores, window=8, tau=tau, min_tokens=12)
    assert got == _coverage_count_by_hand(scores, 8, tau, 12)
    assert 12 <= got <= 70


def test_tau_attention_equals_explicit_count():
    q, k, v = _qkv(1, 6, 2, 90, 16)
    scores = token_sparse_scores(q, k, window=8, kernel_size=7)
    n_keep = _coverage_count_by_hand(scores, 8, 0.2, 0)
    assert 8 < n_keep < 90
    out, idx = token_sparse_attention(q, k, v, keep=None, tau=0.2, window=8, return_indices=True)
    ref, ref_idx = token_sparse_attention(q, k, v, keep=n_keep, window=8, return_indices=True)
    assert idx.shape[-1] == n_keep and torch.equal(idx, ref_idx) and torch.equal(out, ref)
    # tau = 0 drops nothing: exactly dense
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(token_sparse_attention(q, k, v, keep=None, tau=0.0, window=8), dense)
    with pytest.raises(ValueError, match="give keep"):
        token_sparse_attention(q, k, v, keep=None)
    with pytest.raises(ValueError, match="both given"):
        token_sparse_attention(q, k, v, keep=0.5, tau=0.005)
