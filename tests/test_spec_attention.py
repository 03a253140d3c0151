"""Tree-forward attention without repeat_kv (tokprune/spec/_attention.py) against SDPA over repeated heads."""

import types

import pytest
import torch

from tokprune.spec import TokenRecyclingDrafter, generate
from tokprune.spec._attention import TREE_ATTENTION_NAME, tree_attention, tree_sdpa_attention


def _oracle(query, key, value, mask, scale):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask[..., :key.shape[2]],
                                                           scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("batch,heads,kv_heads,n,t_prefix,mask_batch,boolean", [
    (1, 9, 3, 12, 40, 1, False), (2, 4, 2, 5, 17, 2, False), (2, 8, 2, 3, 9, 1, True), (1, 6, 3, 1, 10, 1, False),
    (3, 4, 4, 6, 11, 3, False)])
def test_tree_sdpa_attention_matches_repeated_heads(batch, heads, kv_heads, n, t_prefix, mask_batch, boolean):
    torch.manual_seed(n + t_prefix)
    d, t_len = 16, t_prefix + n
    cap = t_len + 7  # the cache is a view of a longer buffer, as in the preallocated cache
    kb, vb = torch.randn(batch, kv_heads, cap, d), torch.randn(batch, kv_heads, cap, d)
    key, value = kb[:, :, :t_len], vb[:, :, :t_len]
    query = torch.randn(batch, n, heads, d).transpose(1, 2)  # non-contiguous, as after the projection
    visible = torch.rand(mask_batch, 1, n, t_len) > 0.4
    visible[..., 0] = True  # every query sees at least one slot
    mask = visible if boolean else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, is_causal=True)
    out, weights = tree_sdpa_attention(module, query, key, value, mask, scaling=d ** -0.5)
    assert weights is None and out.shape == (batch, n, heads, d)
    torch.testing.assert_close(out, _oracle(query, key, value, mask, d ** -0.5), atol=1e-5, rtol=1e-5)


def test_tree_attention_switches_only_sdpa_and_restores(tiny_llama):
    from tests.models import tiny_llama as build

    with tree_attention(tiny_llama) as on:
        assert on and tiny_llama.config._attn_implementation == TREE_ATTENTION_NAME
    assert tiny_llama.config._attn_implementation == "sdpa"
    eager = build("eager")
    with tree_attention(eager) as on:
        assert not on and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_generate_folded_gqa_equals_repeat_kv_and_model_generate(fixture, request):
    model = request.getfixturevalue(fixture)
    torch.manual_seed(1)
    ids = torch.randint(3, 150, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0,
                         eos_token_id=None)
    outs = {}
    for fold in (True, False):
        drafter = TokenRecyclingDrafter(k=4, budget=8)
        outs[fold], stats = generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=20,
                                     pad_token_id=0, eos_token_id=None, fold_gqa=fold, return_stats=True)
        assert stats.target_forwards > 0
    assert torch.equal(outs[True], outs[False])
    assert torch.equal(outs[True], ref)
    assert model.config._attn_implementation == "sdpa"


def test_folded_mask_reused_only_for_the_same_unchanged_mask():
    """Layers of one forward share the folded mask; a new mask, or the same one edited in place, is
    folded again (outputs always equal the oracle)."""
    torch.manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=3, training=False, is_causal=True)
    key, value = torch.randn(1, 2, 14, 8), torch.randn(1, 2, 14, 8)
    query = torch.randn(1, 6, 4, 8)
    mask = torch.zeros(1, 1, 4, 14).masked_fill(torch.rand(1, 1, 4, 14) > 0.5, torch.finfo(torch.float32).min)
    mask[..., 0] = 0.0
    for _ in range(2):  # second call: the cached fold
        out, _ = tree_sdpa_attention(module, query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(out, _oracle(query, key, value, mask, 0.3), atol=1e-5, rtol=1e-5)
    mask[..., 1:] = 0.0  # in place: must not reuse the stale fold
    out, _ = tree_sdpa_attention(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(out, _oracle(query, key, value, mask, 0.3), atol=1e-5, rtol=1e-5)
    other = torch.zeros(1, 1, 4, 14)
    out, _ = tree_sdpa_attention(module, query, key, value, other, scaling=0.3)
    torch.testing.assert_close(out, _oracle(query, key, value, other, 0.3), atol=1e-5, rtol=1e-5)
