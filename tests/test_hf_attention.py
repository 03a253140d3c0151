import pytest
import torch

from tests import models as tiny
from tests.helpers import assert_close
from tokprune.hf.attention import patch_attention


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


def test_declining_policy_falls_back_and_generation_matches():
    model = tiny.tiny_llama()
    ids = torch.randint(0, 100, (1, 6))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    Declining.calls = 0
    handle = patch_attention(model, decode=Declining())
    got = model.generate(ids, max_new_tokens=5, do_sample=False)
    handle.remove()
    assert torch.equal(got, expected)
    assert Declining.calls == 4 * model.config.num_hidden_layers  # 4 decode steps after prefill


def test_patch_errors():
    model = tiny.tiny_llama()
    with pytest.raises(ValueError, match="at least one of prefill= or decode="):
        patch_attention(model)
    with pytest.raises(ValueError, match=r"layers=\[7\] do not exist"):
        patch_attention(model, prefill=Declining(), layers=[7])
    with patch_attention(model, prefill=Declining()):
        with pytest.raises(ValueError, match="already patched"):
            patch_attention(model, prefill=Declining())
