"""TokenSparseAttention through patch_attention: tiny Llama/Qwen2 and the real SmolLM2-135M."""

import pytest
import torch

from tests import models as tiny
from tests.helpers import assert_close
from tokprune.hf.attention import patch_attention
from tokprune.methods.token_sparse import TokenSparseAttention, key_padding_from_mask
from tokprune.ops import select_tokens, token_sparse_scores
from tokprune.ops.token_sparse import resolve_keep
from tokprune.reference.token_sparse import token_sparse_attention_reference


class OraclePolicy:
    """Token sparse attention written with the masked-dense oracle (selection from the tested scores)."""

    def __init__(self, keep, window, kernel_size=7):
        self.keep, self.window, self.kernel_size = keep, window, kernel_size

    def attend(self, module, q, k, v, mask, scale, **kw):
        n = q.shape[2]
        pad = None if mask is None else mask[:, 0].any(1)
        scores = token_sparse_scores(q, k, window=self.window, kernel_size=self.kernel_size, scale=scale,
                                     key_padding_mask=pad)
        forced = torch.zeros_like(scores, dtype=torch.bool)
        forced[..., n - self.window:] = True
        idx = select_tokens(scores, max(resolve_keep(self.keep, n), self.window), keep_mask=forced)
        return token_sparse_attention_reference(q, k, v, idx, scale=scale, key_padding_mask=pad).transpose(1, 2)


class CountingDecode:
    def __init__(self):
        self.calls = 0

    def attend(self, module, q, k, v, mask, scale, **kw):
        assert q.shape[2] == 1
        self.calls += 1
        return None


@pytest.mark.slow
@pytest.mark.parametrize("build", [tiny.tiny_llama, tiny.tiny_qwen2])
def test_keep_one_is_exactly_dense_forward_and_generate(build):
    model = build()
    ids = torch.randint(0, 100, (2, 40))
    expected = model(ids).logits
    expected_gen = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    policy = TokenSparseAttention(keep=1.0, min_tokens=8, window=4)
    with patch_attention(model, prefill=policy):
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), expected_gen)
    assert policy.calls == 0  # nothing to prune: every call went to SDPA
    # sequences shorter than min_tokens are declined as well
    short = TokenSparseAttention(keep=0.25, min_tokens=64, window=4)
    with patch_attention(model, prefill=short):
        assert torch.equal(model(ids).logits, expected)
    assert short.calls == 0


@pytest.mark.parametrize("build", [tiny.tiny_llama, tiny.tiny_qwen2])
def test_sparse_forward_matches_oracle_policy(build):
    model = build()
    ids = torch.randint(0, 100, (2, 48))
    policy = TokenSparseAttention(keep=0.5, min_tokens=8, window=4, layers=None)
    with patch_attention(model, prefill=OraclePolicy(0.5, 4)):
        expected = model(ids).logits
    with patch_attention(model, prefill=policy):
        got = model(ids).logits
    assert policy.calls == model.config.num_hidden_layers
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, model(ids).logits, atol=1e-3)  # the sparse path changes the output


def test_sparse_forward_with_left_padding_matches_oracle():
    model = tiny.tiny_llama()
    ids = torch.randint(0, 100, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :11] = 0
    with patch_attention(model, prefill=OraclePolicy(0.5, 4)):
        expected = model(ids, attention_mask=mask).logits
    policy = TokenSparseAttention(keep=0.5, min_tokens=8, window=4, layers=None)
    with patch_attention(model, prefill=policy):
        got = model(ids, attention_mask=mask).logits
    assert policy.calls == model.config.num_hidden_layers
    assert not torch.isnan(got).any()
    assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    assert_close(got[1, 11:], expected[1, 11:], atol=1e-4, rtol=1e-4)


def test_layers_filter_and_composition_with_decode_policy():
    model = tiny.tiny_llama()
    ids = torch.randint(0, 100, (1, 40))
    dense_logits = model(ids).logits
    policy = TokenSparseAttention(keep=0.25, layers=[2], min_tokens=8, window=4)
    decode = CountingDecode()
    with patch_attention(model, prefill=policy, decode=decode):
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        got_logits = model(ids).logits
    assert policy.calls == 2  # layer 2 only, prefill of generate() + the forward
    assert decode.calls == 4 * model.config.num_hidden_layers  # decode steps are left to the decode policy
    assert out.shape == (1, 45)
    # only the last layer was sparse: the outputs differ but stay close to dense
    assert not torch.equal(got_logits, dense_logits)
    assert model.config._attn_implementation == "sdpa"  # patch removed
    # the default is the paper's: the second half of the layers (layers 1 and 2 of 3)
    half = TokenSparseAttention(keep=0.25, min_tokens=8, window=4)
    with patch_attention(model, prefill=half):
        model(ids)
    assert half.calls == 2
    with pytest.raises(ValueError, match="layers must be None, 'second_half'"):
        TokenSparseAttention(layers="first")


def test_policy_declines_decode_chunked_and_unsupported_masks():
    policy = TokenSparseAttention(keep=0.5, min_tokens=4, window=2)
    assert not policy.applies(0, 1, 50)  # decode
    assert not policy.applies(0, 10, 50)  # prefill chunk on top of a cache
    assert not policy.applies(0, 3, 3)  # shorter than min_tokens
    assert policy.applies(0, 50, 50)
    assert not TokenSparseAttention(keep=0.5, layers=[1]).applies(0, 500, 500)
    assert not TokenSparseAttention(keep=600).applies(0, 500, 500)
    n = 12
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert key_padding_from_mask(None, 2, n) is None
    assert key_padding_from_mask(causal[None, None].expand(2, 1, n, n), 2, n) is None
    padded = causal[None, None].repeat(2, 1, 1, 1)
    padded[1, :, :, :3] = False
    assert torch.equal(key_padding_from_mask(padded, 2, n)[1], torch.arange(n) >= 3)
    additive = torch.zeros(2, 1, n, n).masked_fill(~padded, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_from_mask(additive, 2, n), key_padding_from_mask(padded, 2, n))
    sliding = causal & ~torch.ones(n, n, dtype=torch.bool).tril(-4)
    assert key_padding_from_mask(sliding[None, None], 1, n) is False
    q = torch.randn(1, 2, n, 8)
    assert policy.attend(None, q, q, q, sliding[None, None], 1.0) is None
    for bad in (0.0, 1.5, -3, True):
        with pytest.raises(ValueError, match="keep must be"):
            TokenSparseAttention(keep=bad)
    with pytest.raises(ValueError, match="min_tokens must be"):
        TokenSparseAttention(min_tokens=-1)


# Measured on SmolLM2-135M-Instruct (tokprune.evals.token_sparse, 2 segments of 448 prompt + 64 real
# continuation tokens, keep=0.5 in the second half of the layers, window 64): top-1 agreement 0.875,
# KL 0.0525 nats, perplexity 8.075 -> 8.939 (+10.7%). Deterministic inputs; the thresholds leave room
# for other CPUs / BLAS builds.
@pytest.mark.real_weights
@pytest.mark.slow
def test_smollm2_keep_half_continuation_agreement(smollm2):
    from tokprune.evals.token_sparse import evaluate

    model, tokenizer = smollm2
    rows = evaluate(model, tokenizer, context=448, continuation=64, segments=2, keeps=[0.5], window=64,
                    layer_modes=["second_half"])
    row = rows[0]
    assert row["sparse_calls"] == 2 * (model.config.num_hidden_layers // 2)
    assert row["top1"] > TOP1_THRESHOLD and row["kl"] < KL_THRESHOLD, row
    assert abs(row["ppl_change"]) < PPL_CHANGE_THRESHOLD, row


TOP1_THRESHOLD = 0.8
KL_THRESHOLD = 0.1
PPL_CHANGE_THRESHOLD = 0.25


def test_eval_protocol_on_tiny_model():
    """The eval's prefill + continuation logits equal one dense forward; sparse prefill only."""
    from tokprune.evals.token_sparse import _run

    model = tiny.tiny_llama()
    ids = torch.randint(0, 100, (1, 60))
    cont, win = _run(model, ids, 48, 4)
    full = model(ids).logits[0]
    assert_close(cont, full[47:59], atol=1e-5)
    assert_close(win, full[44:48], atol=1e-5)
    policy = TokenSparseAttention(keep=0.5, window=4, min_tokens=0, layers=None)
    sparse, _ = _run(model, ids, 48, 4, policy)
    assert policy.calls == model.config.num_hidden_layers  # the continuation chunk was left to SDPA
    assert not torch.allclose(sparse, cont, atol=1e-3)


def test_composes_with_fasa_decode():
    fasa = pytest.importorskip("tokprune.methods.fasa")
    model = tiny.tiny_llama()
    ids = torch.randint(0, 100, (1, 60))
    prefill = TokenSparseAttention(keep=0.25, window=4, min_tokens=8)
    with patch_attention(model, prefill=prefill, decode=fasa.FASA(budget=16)):
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 65) and torch.equal(out[:, :60], ids)
    assert prefill.calls == 2  # prefill only, second half of 3 layers
