"""Policies of different roles on one model through ``tokprune.methods.base.patch``: one handle, each policy
does its part, ``remove()`` restores the model exactly."""

from __future__ import annotations

import pytest
import torch

from tests import models as tiny
from tests.helpers import assert_close
from tokprune.methods.base import PatchHandle, patch
from tokprune.methods.entropy_prune import EntropyPrune
from tokprune.methods.kv_baselines import StreamingLLM
from tokprune.methods.token_sparse import TokenSparseAttention


class CountingStreamingLLM(StreamingLLM):
    """StreamingLLM that counts the decode calls it scored (calls it did not decline)."""

    def __post_init__(self):
        super().__post_init__()
        self.scored = 0

    def score(self, ctx):
        self.scored += 1
        return super().score(ctx)


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _generate(model, ids, n_new=6, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, **kwargs)


def test_prefill_and_decode_policies_compose_and_remove(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense_gen = _generate(model, ids)
    impl, hooks = model.config._attn_implementation, _hooks(model)

    def prefill_policy():
        return TokenSparseAttention(keep=0.5, min_tokens=8, window=4, layers=None)

    def decode_policy():
        return CountingStreamingLLM(budget=12, sink=2, window=4, decline_ratio=0.0)

    # each policy alone
    alone_prefill = prefill_policy()
    with patch(model, alone_prefill):
        with torch.no_grad():
            sparse_logits = model(ids).logits
        gen_prefill_only = _generate(model, ids)
    alone_decode = decode_policy()
    with patch(model, alone_decode):
        gen_decode_only = _generate(model, ids)
        with torch.no_grad():
            decode_only_logits = model(ids).logits
    assert alone_decode.scored == 5 * model.config.num_hidden_layers  # 5 decode steps, every layer
    assert_close(decode_only_logits, dense_logits, atol=1e-5, name="a decode policy leaves prefill dense")
    assert not torch.allclose(sparse_logits, dense_logits, atol=1e-3)

    # both on one model, one handle
    prefill, decode = prefill_policy(), decode_policy()
    handle = patch(model, prefill, decode)
    try:
        assert isinstance(handle, PatchHandle) and handle.active
        assert set(map(id, handle.policies)) >= {id(prefill), id(decode)}
        with torch.no_grad():
            both_logits = model(ids).logits
        both_gen = _generate(model, ids)
    finally:
        handle.remove()
    assert_close(both_logits, sparse_logits, atol=1e-5, name="prefill = the prefill policy's alone")
    assert prefill.calls == 2 * model.config.num_hidden_layers  # the forward + generate's prefill
    assert decode.scored == 5 * model.config.num_hidden_layers  # every decode step went to the decode policy
    # the first new token comes from the (sparse) prefill logits, as with the prefill policy alone
    assert torch.equal(both_gen[:, :41], gen_prefill_only[:, :41])
    assert both_gen.shape == dense_gen.shape == gen_decode_only.shape

    # remove() restored everything: same outputs as before, no hooks, the previous attention implementation
    assert not handle.active
    handle.remove()  # idempotent
    assert model.config._attn_implementation == impl and _hooks(model) == hooks
    assert not any(hasattr(m, "_tokprune_attention_router") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_logits)
    assert torch.equal(_generate(model, ids), dense_gen)


def test_two_policies_of_one_role_are_rejected(tiny_llama):
    with pytest.raises(ValueError, match="two prefill policies"):
        patch(tiny_llama, TokenSparseAttention(), TokenSparseAttention(keep=0.5))
    assert tiny_llama.config._attn_implementation == "sdpa"


def _llava_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 100, (2,), generator=g), torch.full((tiny.LLAVA_TOKENS_PER_IMAGE,),
                     tiny.LLAVA_IMAGE_TOKEN), torch.randint(3, 100, (3,), generator=g)])[None]
    pv = torch.randn(1, 3, tiny.LLAVA_IMAGE_SIZE, tiny.LLAVA_IMAGE_SIZE, generator=g)
    return dict(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids))


def test_visual_and_decode_policies_compose_and_remove(tiny_llava):
    model = tiny_llava
    inputs = _llava_inputs()
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        dense_logits = model(**inputs).logits
    dense_gen = _generate(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                          attention_mask=inputs["attention_mask"])
    # (after a first forward: transformers installs its own output-capturing hooks lazily)
    impl, hooks = model.config._attn_implementation, _hooks(model)

    visual_alone = EntropyPrune(keep=3, layer=1)
    with patch(model, visual_alone) as handle:
        gen_visual_only = _generate(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                    attention_mask=inputs["attention_mask"])
    assert handle.info["last"]["visual_kept"] == [3]

    visual, decode = EntropyPrune(keep=3, layer=1), CountingStreamingLLM(budget=8, sink=2, window=4, decline_ratio=0.0)
    with patch(model, visual, decode) as handle:
        assert isinstance(handle, PatchHandle)
        both_gen = _generate(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                             attention_mask=inputs["attention_mask"])
        assert handle.info["last"]["visual_kept"] == [3] and handle.info["layer"] == 1
        kept = handle.info["last"]["tokens_after"]
    # the pruned prefill is the visual policy's alone: same first token
    assert torch.equal(both_gen[:, :n + 1], gen_visual_only[:, :n + 1])
    # decode steps of layers >= 1 see the pruned cache (kept + new tokens), layer 0 the full one; StreamingLLM
    # scores whenever its budget is below the cache length
    assert kept < n and decode.scored > 0
    assert not handle.active and _hooks(model) == hooks and model.config._attn_implementation == impl
    assert not hasattr(model, "_tokprune_vlm_patch")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, dense_logits)
    assert torch.equal(_generate(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                 attention_mask=inputs["attention_mask"]), dense_gen)
