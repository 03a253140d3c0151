"""The tokprune attention router: policies per role, one PatchHandle, the ragged (continuous batching) path."""

from dataclasses import dataclass

import pytest
import torch

from tests import models as tiny
from tests.helpers import assert_close
from tokprune.hf.attention import patch_attention, tokprune_attention_forward
from tokprune.methods import StreamingLLM
from tokprune.methods.base import PatchHandle


class Declining:
    calls = 0

    def attend(self, module, q, k, v, mask, scale, **kw):
        Declining.calls += 1
        return None


class EagerReference:
    """Plain softmax attention honouring the mask; must reproduce SDPA."""

    def attend(self, module, q, k, v, mask, scale, **kw):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        logits = (q @ k.transpose(-1, -2)).float() * scale
        q_len, kv_len = q.shape[2], k.shape[2]
        if mask is None:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
            logits = logits.masked_fill(~causal, float("-inf"))
        elif mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask
        # rows with no key to attend (left padding) must give zeros, not NaN, like SDPA
        weights = logits.softmax(-1).nan_to_num(0.0)
        return (weights.to(v.dtype) @ v).transpose(1, 2)


@pytest.mark.parametrize("build", [tiny.tiny_llama, tiny.tiny_qwen2])
def test_policy_routing_equals_sdpa_with_padding(build):
    model = build()
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    expected = model(ids, attention_mask=mask).logits
    with patch_attention(model, prefill=EagerReference(), decode=EagerReference()):
        assert model.config._attn_implementation == "tokprune"
        got = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    assert_close(got[0], expected[0], atol=1e-5)
    assert_close(got[1, 3:], expected[1, 3:], atol=1e-5)


def test_declining_policy_falls_back_and_generation_matches(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 100, (1, 6))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    Declining.calls = 0
    handle = patch_attention(model, decode=Declining())
    assert isinstance(handle, PatchHandle)
    got = model.generate(ids, max_new_tokens=5, do_sample=False)
    handle.remove()
    assert torch.equal(got, expected)
    assert Declining.calls == 4 * model.config.num_hidden_layers  # 4 decode steps after prefill


def test_patch_errors(tiny_llama):
    model = tiny_llama
    with pytest.raises(ValueError, match="at least one of prefill= or decode="):
        patch_attention(model)
    with pytest.raises(TypeError, match="decode must be a tokprune.methods.base.KVPolicy"):
        patch_attention(model, decode=object())
    with pytest.raises(ValueError, match=r"layers=\[7\] do not exist"):
        patch_attention(model, prefill=Declining(), layers=[7])
    with patch_attention(model, prefill=Declining()):
        with pytest.raises(ValueError, match="already patched"):
            patch_attention(model, prefill=Declining())
    assert model.config._attn_implementation == "sdpa"
    import tokprune.hf

    assert tokprune.hf.patch_attention is patch_attention  # the name the docstrings use


@dataclass
class _Spy(StreamingLLM):
    """StreamingLLM recording the shapes of the decode calls it scores."""

    calls: list = None

    def score(self, ctx):
        self.calls.append((ctx.batch, ctx.n_tokens))
        return super().score(ctx)


def test_ragged_call_routes_each_request(tiny_llama):
    """One varlen call with two decode requests and one prompt: decode rows go through the policy, the prompt
    through SDPA, each exactly as if it were alone."""
    module = tiny_llama.model.layers[0].self_attn
    policy = _Spy(budget=6, sink=1, decline_ratio=0, calls=[])
    q_lens, k_lens = [1, 7, 1], [20, 7, 13]
    q = torch.randn(1, 4, sum(q_lens), 16)
    k = torch.randn(1, 2, sum(k_lens), 16)
    v = torch.randn(1, 2, sum(k_lens), 16)
    cu_q = torch.tensor([0, 1, 8, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 27, 40], dtype=torch.int32)
    with patch_attention(tiny_llama, decode=policy, cache=False):
        out, _ = tokprune_attention_forward(module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k,
                                            max_length_q=7, max_length_k=20)
        alone = [tokprune_attention_forward(module, q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], None, scaling=0.25)[0]
                 for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())]
    assert out.shape == (1, 9, 4, 16)
    assert_close(out, torch.cat(alone, 1))
    assert policy.calls[:2] == [(1, 20), (1, 13)]  # both decode requests were scored, the prompt was not
    causal = torch.nn.functional.scaled_dot_product_attention(q[:, :, 1:8], k[:, :, 20:27].repeat_interleave(2, 1),
                                                              v[:, :, 20:27].repeat_interleave(2, 1), is_causal=True,
                                                              scale=0.25)
    assert_close(out[:, 1:8], causal.transpose(1, 2))
    from tokprune.methods import SnapKV

    with patch_attention(tiny_llama, decode=SnapKV(budget=6), cache=False):
        with pytest.raises(NotImplementedError, match="SnapKV keeps per-sequence prompt state"):
            tokprune_attention_forward(module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k)


@pytest.mark.slow
def test_generate_batch_routes_decode_steps_per_request(tiny_llama):
    """transformers' continuous batching (one varlen call per step, q_len = number of requests) runs the
    decode policy per request: each request's tokens equal a plain generate of that prompt alone with the
    same policy; the patch survives the call and is undone by remove()."""
    from transformers import AttentionInterface, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = tiny_llama
    prompts = [torch.randint(3, 150, (n,)).tolist() for n in (20, 33, 27)]
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=8, max_batch_tokens=256, use_async_batching=False)
    original = AttentionInterface._global_mapping["paged|eager"]
    policy = _Spy(budget=8, sink=2, decline_ratio=0, calls=[])
    with patch_attention(model, decode=policy, cache=False) as handle:
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb,
                                   progress_bar=False, warmup=False)
        assert model.config._attn_implementation == "tokprune"
        assert handle.active
        alone = [model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist() for p in prompts]
    batched = [out[name].generated_tokens for name in sorted(out, key=lambda n: int(n.split("_")[-1]))]
    assert batched == alone
    assert any(batch == 1 and n > 8 for batch, n in policy.calls)  # sparse decode calls happened
    assert model.config._attn_implementation == "sdpa"
    assert AttentionInterface._global_mapping["paged|eager"] is original
    assert "generate_batch" not in model.__dict__ and "init_continuous_batching" not in model.__dict__
