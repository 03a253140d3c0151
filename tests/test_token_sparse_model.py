"""TokenSparseAttention through patch_attention: tiny Llama/Qwen2 and the real SmolLM2-135M."""

import json

import pytest
import torch

from tests.helpers import assert_close
from tokprune.hf.attention import patch_attention
from tokprune.methods.token_sparse import (TokenSparseAttention, calibrate_profile, key_padding_from_mask, layer_drift,
                                           load_profile, shipped_profiles, sparse_layers_from_drift)
from tokprune.ops import select_tokens, token_sparse_scores
from tokprune.ops.token_sparse import coverage_keep_count, resolve_keep
from tokprune.reference.token_sparse import token_sparse_attention_reference


class OraclePolicy:
    """Token sparse attention written with the masked-dense oracle (selection from the tested scores);
    ``keep=None``: the kept count from the coverage rule with ``tau``."""

    def __init__(self, keep, window, kernel_size=7, tau=None, min_tokens=0):
        self.keep, self.window, self.kernel_size, self.tau, self.min_tokens = keep, window, kernel_size, tau, min_tokens
        self.counts = []

    def attend(self, module, q, k, v, mask, scale, **kw):
        n = q.shape[2]
        pad = None if mask is None else mask[:, 0].any(1)
        scores = token_sparse_scores(q, k, window=self.window, kernel_size=self.kernel_size, scale=scale,
                                     key_padding_mask=pad)
        forced = torch.zeros_like(scores, dtype=torch.bool)
        forced[..., n - self.window:] = True
        if self.keep is None:
            count = max(coverage_keep_count(scores, self.window, self.tau, self.min_tokens), self.window)
        else:
            count = max(resolve_keep(self.keep, n), self.window)
        self.counts.append(count)
        idx = select_tokens(scores, count, keep_mask=forced)
        return token_sparse_attention_reference(q, k, v, idx, scale=scale, key_padding_mask=pad).transpose(1, 2)


class CountingDecode:
    def __init__(self):
        self.calls = 0

    def attend(self, module, q, k, v, mask, scale, **kw):
        assert q.shape[2] == 1
        self.calls += 1
        return None


@pytest.mark.slow
@pytest.mark.parametrize("build", ["tiny_llama", "tiny_qwen2"])
def test_keep_one_is_exactly_dense_forward_and_generate(build, request):
    model = request.getfixturevalue(build)
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


@pytest.mark.parametrize("build", ["tiny_llama", "tiny_qwen2"])
def test_sparse_forward_matches_oracle_policy(build, request):
    model = request.getfixturevalue(build)
    ids = torch.randint(0, 100, (2, 48))
    policy = TokenSparseAttention(keep=0.5, min_tokens=8, window=4, layers=None)
    with patch_attention(model, prefill=OraclePolicy(0.5, 4)):
        expected = model(ids).logits
    with patch_attention(model, prefill=policy):
        got = model(ids).logits
    assert policy.calls == model.config.num_hidden_layers
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, model(ids).logits, atol=1e-3)  # the sparse path changes the output


def test_sparse_forward_with_left_padding_matches_oracle(tiny_llama):
    model = tiny_llama
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


def test_layers_filter_and_composition_with_decode_policy(tiny_llama):
    model = tiny_llama
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
    # the default: the second half of the layers (layers 1 and 2 of 3)
    half = TokenSparseAttention(keep=0.25, min_tokens=8, window=4)
    with patch_attention(model, prefill=half):
        model(ids)
    assert half.calls == 2
    with pytest.raises(ValueError, match="layers must be None, 'second_half', 'profile'"):
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


def test_eval_protocol_on_tiny_model(tiny_llama):
    """The eval's prefill + continuation logits equal one dense forward; sparse prefill only."""
    from tokprune.evals.token_sparse import _run

    model = tiny_llama
    ids = torch.randint(0, 100, (1, 60))
    cont, win = _run(model, ids, 48, 4)
    full = model(ids).logits[0]
    assert_close(cont, full[47:59], atol=1e-5)
    assert_close(win, full[44:48], atol=1e-5)
    policy = TokenSparseAttention(keep=0.5, window=4, min_tokens=0, layers=None)
    sparse, _ = _run(model, ids, 48, 4, policy)
    assert policy.calls == model.config.num_hidden_layers  # the continuation chunk was left to SDPA
    assert not torch.allclose(sparse, cont, atol=1e-3)


def test_composes_with_fasa_decode(tiny_llama):
    fasa = pytest.importorskip("tokprune.methods.fasa")
    model = tiny_llama
    ids = torch.randint(0, 100, (1, 60))
    prefill = TokenSparseAttention(keep=0.25, window=4, min_tokens=8)
    with patch_attention(model, prefill=prefill, decode=fasa.FASA(fcs="uncalibrated", budget=16)):
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 65) and torch.equal(out[:, :60], ids)
    assert prefill.calls == 2  # prefill only, second half of 3 layers


# ------------------------------------------------------------------------------------------- paper fidelity
def test_tau_policy_matches_coverage_oracle(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 100, (1, 64))
    oracle = OraclePolicy(None, 4, tau=0.2, min_tokens=8)
    with patch_attention(model, prefill=oracle):
        expected = model(ids).logits
    assert all(4 < c < 64 for c in oracle.counts) and len(oracle.counts) == model.config.num_hidden_layers
    policy = TokenSparseAttention(keep=None, tau=0.2, min_tokens=8, window=4, layers=None)
    with patch_attention(model, prefill=policy):
        got = model(ids).logits
    assert policy.calls == model.config.num_hidden_layers
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, model(ids).logits, atol=1e-3)
    assert TokenSparseAttention(keep=None).tau == 0.005  # the paper's threshold by default
    with pytest.raises(ValueError, match="both given"):
        TokenSparseAttention(keep=0.5, tau=0.01)
    with pytest.raises(ValueError, match="tau must be a float"):
        TokenSparseAttention(keep=None, tau=2.0)


def test_layer_drift_matches_hidden_states_by_hand(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 100, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    drift = layer_drift(model, ids, mask)
    norm, model.model.norm = model.model.norm, torch.nn.Identity()  # raw output of the last layer
    try:
        with torch.no_grad():
            hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        model.model.norm = norm
    assert len(drift) == len(hs) - 1 == model.config.num_hidden_layers
    for layer in range(len(drift)):
        ratios = []
        for b in range(2):
            for t in range(24):
                if mask[b, t]:
                    h_in, h_out = hs[layer][b, t].double(), hs[layer + 1][b, t].double()
                    ratios.append(float((h_out - h_in).norm() / (h_in.norm() + 1e-8)))
        assert abs(drift[layer] - sum(ratios) / len(ratios)) < 1e-4 * max(1.0, drift[layer])


def test_sparse_layers_quantile_rule_by_hand():
    # [4, 1, 2, 3] / 10: sorted .1 .2 .3 .4, the 0.5 quantile lies halfway between .2 and .3 = .25
    assert sparse_layers_from_drift([4.0, 1.0, 2.0, 3.0], 0.5) == [1, 2]
    # odd count: the median itself is kept (<=)
    assert sparse_layers_from_drift([5.0, 1.0, 3.0], 0.5) == [1, 2]
    assert sparse_layers_from_drift([5.0, 1.0, 3.0], 0.0) == [1]
    assert sparse_layers_from_drift([5.0, 1.0, 3.0], 1.0) == [0, 1, 2]
    with pytest.raises(ValueError, match="delta must lie in"):
        sparse_layers_from_drift([1.0], 1.5)


def test_profile_layers_from_file(tiny_llama, tiny_qwen2, tmp_path):
    model = tiny_llama
    calib = torch.randint(0, 100, (1, 48))
    profile = calibrate_profile(model, calib, name="tiny")
    assert profile["sparse_layers"] == sparse_layers_from_drift(layer_drift(model, calib), 0.5)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(profile))
    ids = torch.randint(0, 100, (1, 40))
    policy = TokenSparseAttention(keep=0.5, layers="profile", profile=str(path), min_tokens=8, window=4)
    explicit = TokenSparseAttention(keep=0.5, layers=profile["sparse_layers"], min_tokens=8, window=4)
    with patch_attention(model, prefill=policy):
        got = model(ids).logits
    with patch_attention(model, prefill=explicit):
        want = model(ids).logits
    assert policy.calls == len(profile["sparse_layers"]) and torch.equal(got, want)
    with pytest.raises(ValueError, match="was made for"):
        TokenSparseAttention(layers="profile", profile=str(path)).bind(tiny_qwen2)
    with pytest.raises(ValueError, match="no shipped token-sparse profile matches"):
        TokenSparseAttention(layers="profile").bind(model)
    with pytest.raises(ValueError, match="used by layers='profile' only"):
        TokenSparseAttention(profile=str(path))
    with pytest.raises(FileNotFoundError, match="tokprune calibrate token-sparse"):
        TokenSparseAttention(layers="profile", profile=str(tmp_path / "missing.json")).bind(model)


def test_shipped_profiles_follow_the_delta_rule():
    paths = shipped_profiles()
    assert any("smollm2" in p.name for p in paths)
    for path in paths:
        data = load_profile(path)
        assert len(data["drift"]) == data["num_hidden_layers"]
        assert data["sparse_layers"] == sparse_layers_from_drift(data["drift"], data["delta"])


def test_default_policy_declines_below_measured_min_tokens(tiny_llama):
    from tokprune.methods.token_sparse import MIN_TOKENS

    policy = TokenSparseAttention()
    assert policy.min_tokens == MIN_TOKENS > 256
    q = torch.randn(1, 4, MIN_TOKENS - 1, 16)
    k = torch.randn(1, 2, MIN_TOKENS - 1, 16)
    assert not policy.applies(None, MIN_TOKENS - 1, MIN_TOKENS - 1)
    assert policy.attend(None, q, k, k, None, 0.25) is None  # SDPA runs: exactly dense
    assert policy.applies(None, MIN_TOKENS, MIN_TOKENS)
    ids = torch.randint(0, 100, (1, 48))
    with patch_attention(tiny_llama, prefill=policy):
        got = tiny_llama(ids).logits
    assert policy.calls == 0 and torch.equal(got, tiny_llama(ids).logits)
