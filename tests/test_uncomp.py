"""UNComp: budgets, exactness at ratio 1, oracle for the compressed decode, padding, reversibility."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close
from tokprune.hf.attention import patch_attention
from tokprune.methods.uncomp import UNComp, split_budget


# ---------------------------------------------------------------------------------------------------
def test_split_budget_sums_caps_and_groups():
    ent = torch.tensor([0.2, 0.9, 0.5, 0.1])
    b = split_budget(ent, 60, 100, 0.5, 2.0)
    assert int(b.sum()) == 60
    assert b.tolist() == [10, 20, 20, 10]  # the two highest-entropy items get twice the slots
    capped = split_budget(ent, 60, 18, 0.5, 2.0)
    assert int(capped.sum()) == 60 and int(capped.max()) <= 18
    assert split_budget(ent, 1000, 18, 0.5, 2.0).tolist() == [18] * 4  # total clamps to G * cap
    odd = split_budget(torch.rand(7), 23, 10, 0.5, 3.0)
    assert int(odd.sum()) == 23 and int(odd.min()) >= 0


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1])
def test_budgets_sum_as_promised(ratio):
    method = UNComp(ratio=ratio)
    entropy = torch.rand(5, 3, 4)
    n_valid = torch.tensor([40, 17, 3])
    budget = method.budgets(entropy, n_valid)
    for b in range(3):
        n = int(n_valid[b])
        assert int(budget[:, b].sum()) == min(round(ratio * n * 5 * 4), 5 * 4 * n)
        assert int(budget[:, b].max()) <= n
    # the highest-entropy layer never gets fewer slots than the lowest one
    layer_entropy = entropy[:, 0].mean(-1)
    per_layer = budget[:, 0].sum(-1)
    assert per_layer[layer_entropy.argmax()] >= per_layer[layer_entropy.argmin()]


def _generate(model, ids, mask=None, n=6):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def _compressed_decode(model, method, ids, steps):
    """Prompt forward (compressed by the patch's hook) then teacher-forced decode at explicit positions."""
    n = ids.shape[1]
    with method.patch(model), torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache
        logits = [model(steps[:, i:i + 1], cache=cache, use_cache=True,
                        position_ids=torch.full((ids.shape[0], 1), n + i)).logits[:, -1] for i in range(steps.shape[1])]
    return out, cache, torch.stack(logits, 1)


@pytest.mark.parametrize("build", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("cache", [True, False], ids=["tokprune_cache", "dynamic_cache"])
def test_ratio_one_reproduces_full_cache_generation(build, cache, request):
    model = request.getfixturevalue(build)
    ids = torch.randint(3, 150, (2, 37))
    expected_tokens, expected_logits = _generate(model, ids)
    method = UNComp(ratio=1.0)
    with method.patch(model, cache=cache):
        tokens, logits = _generate(model, ids)
    sizes = method.kv_bytes()
    assert torch.equal(tokens, expected_tokens)
    assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    assert sizes["kept"] == sizes["allocated"] == sizes["full"]


@pytest.mark.parametrize("cache", [True, False], ids=["tokprune_cache", "dynamic_cache"])
def test_cache_really_shrinks_and_bytes_are_honest(cache, tiny_llama):
    model = tiny_llama
    ids = torch.randint(3, 150, (1, 64))
    method = UNComp(ratio=0.25)
    with method.patch(model, cache=cache), torch.no_grad():
        kv = model(ids, use_cache=True).cache  # compressed by the hook right after the prefill forward
    lengths = [layer.keys.shape[2] for layer in kv.layers]
    sizes = method.kv_bytes()
    budget = method.budget
    assert type(kv).__name__ == ("TokpruneCache" if cache else "DynamicCache")
    assert max(lengths) < 64
    assert lengths == [int(budget[i].max()) for i in range(len(lengths))]
    per_slot = 2 * 16 * 4  # keys + values, head_dim 16, fp32
    assert sizes["kept"] == int(budget.sum()) * per_slot
    assert sizes["kept"] == round(0.25 * 64 * 3 * 2) * per_slot
    assert sizes["kept"] <= sizes["allocated"] < sizes["full"] == 64 * 3 * 2 * per_slot


class _OracleMask:
    """Decode hook over the FULL cache: each KV head sees only its selected prompt tokens + decode tokens."""

    def __init__(self, selected, prompt_len):
        self.selected = selected
        self.prompt_len = prompt_len

    def attend(self, module, query, key, value, attention_mask, scale, **kwargs):
        idx = self.selected[module.layer_idx]  # (B, Hkv, L), -1 = empty
        batch, kv_heads, total = key.shape[0], key.shape[1], key.shape[2]
        allowed = torch.zeros(batch, kv_heads, total + 1, dtype=torch.bool)
        allowed.scatter_(2, torch.where(idx >= 0, idx, torch.full_like(idx, total)), True)
        allowed = allowed[..., :total]
        allowed[..., self.prompt_len:] = True
        group = query.shape[1] // kv_heads
        k = key.repeat_interleave(group, 1)
        v = value.repeat_interleave(group, 1)
        mask = allowed.repeat_interleave(group, 1)[:, :, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2)


@pytest.mark.parametrize("cache", [True, False], ids=["tokprune_cache", "dynamic_cache"])
def test_compressed_decode_equals_masked_full_cache_oracle(cache, tiny_llama):
    """Compaction + per-head masks == attending over the full cache restricted to the selected tokens."""
    model = tiny_llama
    ids = torch.randint(3, 150, (2, 45))
    steps = torch.randint(3, 150, (2, 3))
    method = UNComp(ratio=0.3, window=4)
    n = ids.shape[1]
    with method.patch(model, cache=cache), torch.no_grad():
        kv = model(ids, use_cache=True).cache
        got = [model(steps[:, i:i + 1], cache=kv, use_cache=True,
                     position_ids=torch.full((2, 1), n + i)).logits[:, -1] for i in range(3)]
    selected = [s.clone() for s in method.selected]
    for s in selected:  # recent window always kept, selections sorted and unique
        valid = s[s >= 0]
        assert valid.numel() > 0
        assert bool((s[..., :-1] < s[..., 1:]).logical_or(s[..., 1:] < 0).all())
    assert all(bool((s[..., :1] >= 0).all()) for s in selected)
    with torch.no_grad():
        full = model(ids, use_cache=True).cache
        with patch_attention(model, decode=_OracleMask(selected, n), cache=False):
            expected = [model(steps[:, i:i + 1], cache=full, use_cache=True,
                              position_ids=torch.full((2, 1), n + i)).logits[:, -1] for i in range(3)]
    assert_close(torch.stack(got, 1), torch.stack(expected, 1), atol=1e-5, rtol=1e-4)


def test_generate_after_compression_equals_oracle(tiny_llama):
    """Plain model.generate with UNComp: the greedy continuation equals the masked full-cache oracle's."""
    model = tiny_llama
    ids = torch.randint(3, 150, (1, 40))
    method = UNComp(ratio=0.3, window=4)
    with method.patch(model):
        tokens, logits = _generate(model, ids, n=4)
    selected = [s.clone() for s in method.selected]
    with patch_attention(model, decode=_OracleMask(selected, 40), cache=False):
        ref_tokens, ref_logits = _generate(model, ids, n=4)
    assert torch.equal(tokens, ref_tokens)
    assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)


def test_selection_keeps_recent_window_and_high_attention_tokens(tiny_llama):
    model = tiny_llama
    ids = torch.randint(3, 150, (1, 50))
    method = UNComp(ratio=0.4, window=6)
    with method.patch(model), torch.no_grad():
        model(ids, use_cache=True)
    for layer, idx in enumerate(method.selected):
        for h in range(idx.shape[1]):
            chosen = idx[0, h][idx[0, h] >= 0]
            assert chosen.numel() == int(method.budget[layer, 0, h])
            recent = set(range(50 - min(6, chosen.numel()), 50))
            assert recent <= set(chosen.tolist())


def test_left_padded_batch_matches_rows_run_alone(tiny_llama):
    model = tiny_llama
    long = torch.randint(3, 150, (1, 40))
    short = torch.randint(3, 150, (1, 29))
    pad = 40 - 29
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :pad] = 0
    method = UNComp(ratio=0.3)
    with method.patch(model):
        batched_tokens, batched = _generate(model, ids, mask, n=3)
    batched_budget = method.budget.clone()
    batched_kept = method.kv_bytes()["kept"]
    kept_alone = 0
    for row, x in enumerate((long, short)):
        with method.patch(model):
            tokens, logits = _generate(model, x, n=3)
        assert torch.equal(method.budget[:, 0], batched_budget[:, row])
        kept_alone += method.kv_bytes()["kept"]
        assert torch.equal(tokens[0], batched_tokens[row])
        assert_close(logits[0], batched[row], atol=1e-4, rtol=1e-4)
    assert batched_kept == kept_alone


def test_patch_is_reversible(tiny_llama):
    model = tiny_llama
    ids = torch.randint(3, 150, (1, 20))
    with torch.no_grad():
        before = model(ids).logits
    method = UNComp(ratio=0.5)
    handle = method.patch(model)
    _generate(model, ids, n=2)
    handle.remove()
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_hooks and not model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with UNComp(ratio=0.5).patch(model):
        pass  # can be attached again after removal


def test_errors(tiny_llama):
    with pytest.raises(ValueError, match="ratio"):
        UNComp(ratio=0)
    with pytest.raises(ValueError, match="pool"):
        UNComp(pool=4)
    with pytest.raises(ValueError, match="source"):
        UNComp(source="value")
    method = UNComp()
    with pytest.raises(RuntimeError, match="no prompt was compressed"):
        method.kv_bytes()
    model = tiny_llama
    with method.patch(model), torch.no_grad():
        ids = torch.randint(3, 150, (1, 8))
        with pytest.raises(ValueError, match="left padding"):
            model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]]), use_cache=True)
    assert "UNComp" not in repr(method._state) and "_state" not in repr(method)
    assert UNComp(ratio=0.5) == method.__class__(ratio=0.5)  # run-time state is not compared


def test_key_source_and_uniform_layers(tiny_qwen2):
    model = tiny_qwen2
    ids = torch.randint(3, 150, (1, 30))
    method = UNComp(ratio=0.5, source="key", layer_budgets=False)
    with method.patch(model):
        _generate(model, ids, n=2)
    per_layer = method.budget[:, 0].sum(-1)
    assert per_layer.tolist() == [30, 30, 30]  # 0.5 * 30 tokens * 2 heads per layer


# ---------------------------------------------------------------------------------------------------
@pytest.mark.real_weights
@pytest.mark.slow
def test_smollm2_half_cache_next_token_agreement(smollm2):
    from tokprune.evals.uncomp import next_token_agreement, prompt_ids

    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer, 300 + 12)
    result = next_token_agreement(model, ids, prompt_len=300, steps=12, ratio=0.5)
    print(result)
    # measured 2026-11-24: 1.0 (12/12) here; 0.875 over 2x24 positions of 512-token prompts (eval uncomp)
    assert result["agreement"] >= 0.75, result
    assert result["kept_bytes"] <= 0.5 * result["full_bytes"] + 1


def test_plain_forward_while_attached_is_untouched(tiny_llama):
    model = tiny_llama
    ids = torch.randint(3, 150, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        with UNComp(ratio=0.5).patch(model):
            during = model(ids).logits  # not through prefill(): nothing recorded, plain SDPA
    assert_close(during, before, atol=1e-6, rtol=0)
