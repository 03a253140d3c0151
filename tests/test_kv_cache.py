"""TokpruneCache (tokprune/hf/kv_cache.py) and dense decode attention (tokprune/ops/decode.py).

Oracles: transformers' DynamicCache (generate outputs, torch.cat contents), SDPA with repeat_kv (attention),
per-row single-sequence attention (ragged rows), pack_fc_keys (packed key dims).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.models import tiny_llama, tiny_qwen2
from tokprune.hf.kv_cache import (CACHE_ATTENTION_NAME, PackedKeyDims, SideBuffer, TokpruneCache, TokpruneLayer,
                                  cache_layer_for, tokprune_decode_attention, use_tokprune_cache)
from tokprune.ops.decode import dense_decode_attention


def _ref_attention(q, k, v, scale, valid=None):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1).float()
    v = v.repeat_interleave(g, 1).float()
    mask = None if valid is None else valid[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale)


# ------------------------------------------------------------------------------------------ dense decode op
@pytest.mark.parametrize("batch,heads,kv_heads,n", [(1, 9, 3, 37), (3, 4, 2, 130), (2, 4, 4, 5), (2, 8, 1, 64)])
def test_dense_decode_matches_sdpa(batch, heads, kv_heads, n):
    q = torch.randn(batch, heads, 1, 16)
    kb, vb = torch.randn(batch, kv_heads, n + 20, 16), torch.randn(batch, kv_heads, n + 20, 16)
    k, v = kb[:, :, :n], vb[:, :, :n]  # strided views of a larger buffer, like the cache returns
    out = dense_decode_attention(q, k, v, 0.3)
    torch.testing.assert_close(out, _ref_attention(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


def test_dense_decode_masks_bool_and_additive():
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 20, 8), torch.randn(3, 2, 20, 8)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[0, :6] = False  # left padding
    valid[2, 15:] = False
    ref = _ref_attention(q, k, v, 0.5, valid)
    torch.testing.assert_close(dense_decode_attention(q, k, v, 0.5, valid=valid), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_decode_attention(q, k, v, 0.5, valid=valid[:, None, None, :]), ref,
                               atol=1e-5, rtol=1e-5)
    additive = torch.where(valid, 0.0, float("-inf"))[:, None, None, :]
    torch.testing.assert_close(dense_decode_attention(q, k, v, 0.5, valid=additive), ref, atol=1e-5, rtol=1e-5)
    # a masked slot holding garbage must not leak into the result
    k2 = k.clone()
    k2[0, :, :6] = 1e4
    torch.testing.assert_close(dense_decode_attention(q, k2, v, 0.5, valid=valid), ref, atol=1e-5, rtol=1e-5)


def test_dense_decode_bf16_close_to_fp32():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    out = dense_decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _ref_attention(q, k, v, 16 ** -0.5), atol=3e-2, rtol=3e-2)


def test_dense_decode_bad_input():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        dense_decode_attention(q, k, v)
    with pytest.raises(ValueError, match="one query token"):
        dense_decode_attention(torch.randn(1, 3, 2, 8), k, v)
    with pytest.raises(TypeError, match="k must have dtype"):
        dense_decode_attention(torch.randn(1, 3, 1, 8), k.double(), v)
    with pytest.raises(ValueError, match="valid"):
        dense_decode_attention(torch.randn(1, 3, 1, 8), k, v, valid=torch.ones(1, 9, dtype=torch.bool))


def test_dense_decode_compiles_without_graph_break():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    valid = torch.rand(2, 30) > 0.3
    valid[:, -1] = True
    torch._dynamo.reset()
    compiled = torch.compile(dense_decode_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, 0.3, valid=valid), dense_decode_attention(q, k, v, 0.3, valid=valid))


# ------------------------------------------------------------------------------------------ cache mechanics
def test_append_in_place_and_geometric_growth():
    cache = TokpruneCache(num_layers=2)
    ks, vs = [], []
    pointers, capacities = set(), []
    for step, n in enumerate([5, 1, 1, 70, 1, 1, 200, 1]):
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)
        ks.append(k)
        vs.append(v)
        keys, values = cache.update(k, v, 1)
        layer = cache.layers[1]
        # the returned views are the layer's views of its buffers, equal to the concatenation oracle
        assert keys is layer.keys and keys.data_ptr() == layer.key_buffer.data_ptr()
        torch.testing.assert_close(keys, torch.cat(ks, 2))
        torch.testing.assert_close(values, torch.cat(vs, 2))
        assert cache.get_seq_length(1) == layer.length == keys.shape[2]
        pointers.add(layer.key_buffer.data_ptr())
        capacities.append(layer.capacity)
    # grown only when full, at least doubling each time (amortised O(1) append)
    grows = [(a, b) for a, b in zip(capacities, capacities[1:]) if b != a]
    assert len(pointers) == len(grows) + 1
    assert all(b >= 2 * a for a, b in grows)
    assert cache.get_seq_length(0) == 0  # layers are independent
    assert cache.get_mask_sizes(1, 1) == (sum(k.shape[2] for k in ks) + 1, 0)


def test_crop_reset_and_reuse_with_new_batch():
    cache = TokpruneCache(num_layers=1)
    k = torch.randn(1, 2, 10, 4)
    cache.update(k, k, 0)
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    k2 = torch.randn(1, 2, 1, 4)
    keys, _ = cache.update(k2, k2, 0)
    torch.testing.assert_close(keys, torch.cat([k[:, :, :7], k2], 2))
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    cache.reset()
    assert cache.get_seq_length() == 0
    k3 = torch.randn(3, 2, 4, 4)  # a new batch size after reset: allowed, fresh buffers
    keys, _ = cache.update(k3, k3, 0)
    torch.testing.assert_close(keys, k3)


def test_batch_select_and_reorder():
    cache = TokpruneCache(num_layers=1)
    k = torch.randn(3, 2, 6, 4)
    cache.update(k, k, 0)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    torch.testing.assert_close(cache.layers[0].keys, k[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1, 2]))
    torch.testing.assert_close(cache.layers[0].keys, k[[0, 1]])
    k2 = torch.randn(2, 2, 1, 4)
    keys, _ = cache.update(k2, k2, 0)
    torch.testing.assert_close(keys, torch.cat([k[[0, 1]], k2], 2))


# ------------------------------------------------------------------------------------------ side buffers
class _Recorder(SideBuffer):
    def __init__(self):
        self.calls, self.resets, self.grows = [], 0, []

    def append(self, layer, start, end):
        self.calls.append((start, end))

    def reset(self):
        self.resets += 1

    def grow(self, capacity):
        self.grows.append(capacity)


def test_side_buffer_protocol_calls():
    cache = TokpruneCache(num_layers=1)
    rec = _Recorder()
    cache.layers[0].add_side("rec", rec)
    cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0)
    for _ in range(3):
        cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0)
    assert rec.calls == [(0, 5), (5, 6), (6, 7), (7, 8)]
    cap = cache.layers[0].capacity
    cache.update(torch.randn(1, 2, cap, 4), torch.randn(1, 2, cap, 4), 0)
    assert rec.grows and rec.grows[-1] >= cap + 8
    # a late add_side is filled with what is cached
    late = _Recorder()
    cache.layers[0].add_side("late", late)
    assert late.calls == [(0, cache.get_seq_length())] and late.resets == 1


def test_packed_key_dims_tracks_keys():
    from tokprune.ops.fasa import pack_fc_keys
    from tokprune.reference.fasa import fc_dims

    head_dim, kv_heads = 16, 2
    fc = torch.tensor([[0, 3, 5], [7, 1, 2]])
    dims = fc_dims(fc, head_dim, 1)
    cache = TokpruneCache(num_layers=1)
    packed = cache.layers[0].add_side("fc", PackedKeyDims(dims))
    for n in [9, 1, 1, 150, 1]:  # the 150 forces a growth
        k = torch.randn(2, kv_heads, n, head_dim)
        cache.update(k, torch.randn_like(k), 0)
        torch.testing.assert_close(packed.packed, pack_fc_keys(cache.layers[0].keys, fc))
        assert packed.packed_t.stride(-1) == 1  # dims-major: each packed dim contiguous along the tokens
        assert torch.equal(packed.packed_t, packed.packed.transpose(2, 3))
    cache.crop(-4)
    cache.update(torch.randn(2, kv_heads, 1, head_dim), torch.randn(2, kv_heads, 1, head_dim), 0)
    torch.testing.assert_close(packed.packed, pack_fc_keys(cache.layers[0].keys, fc))
    three_heads = TokpruneCache(num_layers=1)
    three_heads.layers[0].add_side("x", PackedKeyDims(torch.zeros(3, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="KV heads"):  # checked when the first tokens arrive
        three_heads.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0)
    bad = TokpruneCache(num_layers=1)
    bad.layers[0].add_side("x", PackedKeyDims(torch.tensor([0, 99])))
    with pytest.raises(IndexError, match="dims must lie"):
        bad.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0)


def test_cache_layer_for_finds_views_only():
    a, b = TokpruneCache(num_layers=2), TokpruneCache(num_layers=2)
    k = torch.randn(1, 2, 4, 8)
    ka, _ = a.update(k, k, 1)
    kb, _ = b.update(k, k, 0)
    assert cache_layer_for(ka, 1) is a.layers[1]
    assert cache_layer_for(kb, 0) is b.layers[0]
    assert cache_layer_for(ka, 0) is None
    assert cache_layer_for(ka.clone(), 1) is None
    assert cache_layer_for(a.layers[1].key_buffer[:, :, :4].clone(), 1) is None
    # a fresh view of the same memory and shape (what a reshape/slice round-trip gives) is recognised
    assert cache_layer_for(a.layers[1].key_buffer[:, :, :4], 1) is a.layers[1]


# ------------------------------------------------------------------------------------------ ragged rows
def test_compact_ragged_rows_then_decode_matches_per_row():
    torch.manual_seed(1)
    prefix, nodes = 6, 4
    cache = TokpruneCache(num_layers=1)
    k, v = torch.randn(2, 2, prefix + nodes, 8), torch.randn(2, 2, prefix + nodes, 8)
    cache.update(k, v, 0)
    keep = torch.tensor([[0, 2, 3], [0, 1, -1]])
    counts = [3, 2]
    cache.compact(prefix, keep, counts)
    layer = cache.layers[0]
    assert layer.ragged and layer.length == prefix + 3
    assert layer.row_lengths.tolist() == [prefix + 3, prefix + 2]
    k_new, v_new = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    keys, values = cache.update(k_new, v_new, 0)
    q = torch.randn(2, 4, 1, 8)

    class _Mod:
        layer_idx = 0
        training = False

    out, _ = tokprune_decode_attention(_Mod(), q, keys, values, None, scaling=0.4)
    for row in range(2):
        sel = prefix + keep[row, :counts[row]]
        rk = torch.cat([k[row:row + 1, :, :prefix], k[row:row + 1, :, sel], k_new[row:row + 1]], 2)
        rv = torch.cat([v[row:row + 1, :, :prefix], v[row:row + 1, :, sel], v_new[row:row + 1]], 2)
        torch.testing.assert_close(out[row:row + 1].transpose(1, 2), _ref_attention(q[row:row + 1], rk, rv, 0.4),
                                   atol=1e-5, rtol=1e-5)


def test_dynamic_cache_style_assignment_is_copied_and_side_rebuilt():
    """Code written for DynamicCache (``layer.keys = ...``, e.g. tokprune.hf.cache.compact_dynamic_cache)."""
    from transformers import DynamicCache

    from tokprune.hf.cache import compact_dynamic_cache

    k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    ours, ref = TokpruneCache(num_layers=1), DynamicCache()
    packed = ours.layers[0].add_side("p", PackedKeyDims(torch.tensor([1, 4])))
    ours.update(k, v, 0)
    ref.update(k, v, 0)
    accept = torch.tensor([[0, 2, -1], [0, 1, 3]])
    assert compact_dynamic_cache(ours, 8, accept) == compact_dynamic_cache(ref, 8, accept)
    torch.testing.assert_close(ours.layers[0].keys, ref.layers[0].keys)
    torch.testing.assert_close(ours.layers[0].values, ref.layers[0].values)
    k1 = torch.randn(2, 2, 1, 8)
    ours.update(k1, k1, 0)
    torch.testing.assert_close(packed.packed, ours.layers[0].keys[..., [1, 4]])


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_other_model_or_batch_or_dtype_or_device():
    cache = TokpruneCache(num_layers=2)
    cache.update(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), 0)
    with pytest.raises(IndexError, match="has 2 layers"):
        cache.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), 2)
    with pytest.raises(ValueError, match="kv_heads=3, head_dim=8"):
        cache.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8), 0)
    with pytest.raises(ValueError, match="head_dim=16"):
        cache.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 0)
    with pytest.raises(ValueError, match="batch 4 .*holds batch 2"):
        cache.update(torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8), 0)
    with pytest.raises(TypeError, match="dtype"):
        cache.update(torch.randn(2, 2, 1, 8).double(), torch.randn(2, 2, 1, 8).double(), 0)
    with pytest.raises(ValueError, match="lives on cpu"):
        cache.update(torch.empty(2, 2, 1, 8, device="meta"), torch.empty(2, 2, 1, 8, device="meta"), 0)
    # nothing was corrupted by the refused calls
    assert cache.get_seq_length(0) == 5 and cache.layers[0].capacity >= 5


def test_cache_refuses_sliding_window_configs():
    from transformers import MistralConfig

    with pytest.raises(ValueError, match="full-attention"):
        TokpruneCache(MistralConfig(num_hidden_layers=2, sliding_window=16))


def test_cache_reused_for_another_model_raises():
    small, wide = tiny_llama(), tiny_llama(num_key_value_heads=4)
    ids = torch.randint(0, 160, (1, 8))
    with use_tokprune_cache(small):
        cache = small(ids).cache
    with pytest.raises(ValueError, match="another model"):
        wide(ids[:, -1:], cache=cache)
    deeper = tiny_llama(num_hidden_layers=4)
    with pytest.raises(IndexError, match="another model"):
        deeper(ids[:, -1:], cache=cache)


# ------------------------------------------------------------------------------------------ model integration
def _spy(monkeypatch):
    calls = {"update": 0, "decode": 0}
    update, decode = TokpruneCache.update, dense_decode_attention

    def counting_update(self, *a, **kw):
        calls["update"] += 1
        return update(self, *a, **kw)

    def counting_decode(*a, **kw):
        calls["decode"] += 1
        return decode(*a, **kw)

    monkeypatch.setattr(TokpruneCache, "update", counting_update)
    monkeypatch.setattr("tokprune.ops.decode.dense_decode_attention", counting_decode)
    return calls


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_generate_matches_dynamic_cache_with_left_padding(build, monkeypatch):
    model = build()
    ids = torch.randint(1, 160, (3, 24))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    calls = _spy(monkeypatch)
    with use_tokprune_cache(model):
        assert model.config._attn_implementation == CACHE_ATTENTION_NAME
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)
    layers = model.config.num_hidden_layers
    assert calls["update"] == 12 * layers  # prefill + 11 decode steps, every layer on the TokpruneCache
    assert calls["decode"] == 11 * layers  # every decode step through the dense decode path
    assert model.config._attn_implementation == "sdpa"


def test_row_finishing_early_matches_dynamic_cache():
    model = tiny_llama()
    ids = torch.randint(1, 160, (2, 16))
    free = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(free[0, 16 + 2])  # row 0 stops after 3 new tokens
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
    ref = model.generate(ids, **kw)
    with use_tokprune_cache(model):
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)
    assert (out[0, 16 + 3:] == 0).all() or eos in free[1, 16:].tolist()


def test_forward_gets_cache_and_continues():
    model = tiny_llama()
    ids = torch.randint(0, 160, (2, 10))
    ref = model(ids).logits
    with use_tokprune_cache(model):
        out = model(ids[:, :7])
        assert isinstance(out.cache, TokpruneCache)
        step = model(ids[:, 7:], cache=out.cache)
    torch.testing.assert_close(step.logits, ref[:, 7:], atol=1e-5, rtol=1e-5)
    assert out.cache.get_seq_length() == 10


def test_handle_remove_restores_and_nests():
    model = tiny_llama()
    prepare = model._prepare_cache_for_generation
    outer = use_tokprune_cache(model)
    inner = use_tokprune_cache(model)
    inner.remove()
    assert model.config._attn_implementation == CACHE_ATTENTION_NAME  # the outer install still holds
    outer.remove()
    outer.remove()  # idempotent
    assert model.config._attn_implementation == "sdpa"
    assert "_prepare_cache_for_generation" not in model.__dict__
    assert model._prepare_cache_for_generation == prepare
    ids = torch.randint(0, 160, (1, 5))
    from transformers import DynamicCache

    assert type(model(ids).cache) is DynamicCache


def test_eager_model_keeps_eager_attention_but_uses_cache():
    model = tiny_llama(attn_implementation="eager")
    ids = torch.randint(0, 160, (1, 12))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with use_tokprune_cache(model):
        assert model.config._attn_implementation == "eager"
        assert isinstance(model(ids).cache, TokpruneCache)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), ref)


def test_generate_presizes_capacity():
    model = tiny_llama()
    ids = torch.randint(0, 160, (1, 30))
    seen = []
    original = TokpruneLayer._grow

    def spy(self, needed):
        seen.append(needed)
        return original(self, needed)

    TokpruneLayer._grow = spy
    try:
        with use_tokprune_cache(model):
            model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    finally:
        TokpruneLayer._grow = original
    assert seen == []  # sized from generate's max length: no regrowth during generation


def test_beam_search_and_sampling_match_dynamic_cache():
    model = tiny_llama()
    ids = torch.randint(1, 160, (2, 12))
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    with use_tokprune_cache(model):
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)  # reorder_cache / batch expansion on the preallocated buffers
    torch.manual_seed(3)
    ref = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(3)
    with use_tokprune_cache(model):
        out = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(out, ref)


def test_packed_key_dims_deferred_records_the_range_and_packs_on_read():
    """``PackedKeyDims.deferred``: appends record the first unpacked slot instead of copying (a writer such as the
    fused FASA kernel fills it, then ``mark_packed``); ``packed_t`` packs what is pending first, so every reader
    sees the keys' dims; growth and reset keep the bookkeeping right."""
    from tokprune.hf.kv_cache import PackedKeyDims, TokpruneLayer

    torch.manual_seed(0)
    dims = torch.tensor([[1, 5, 7], [0, 2, 3]])
    layer = TokpruneLayer(capacity=64, layer_idx=0)
    side = layer.add_side("fc", PackedKeyDims(dims, dtype=torch.bfloat16))
    k, v = torch.randn(2, 2, 200, 8), torch.randn(2, 2, 200, 8)

    def reference(n):
        return torch.gather(k[:, :, :n], 3, dims[None, :, None, :].expand(2, 2, n, 3)).transpose(2, 3).bfloat16()

    layer.update(k[:, :, :40], v[:, :, :40])
    assert side.pending_from is None and torch.equal(side.packed_t, reference(40))
    side.deferred = True
    for t in range(40, 45):  # decode appends within the capacity: ranges recorded only
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert side.pending_from == 40 and side.length == 45
    assert torch.equal(side.storage[..., :40], reference(40))
    assert torch.equal(side.packed_t, reference(45)) and side.pending_from is None  # packed on read
    layer.update(k[:, :, 45:46], v[:, :, 45:46])
    side.storage[..., 45] = reference(46)[..., 45]  # another writer filled slot 45
    side.mark_packed()
    assert side.pending_from is None and torch.equal(side.packed_t, reference(46))
    layer.update(k[:, :, 46:150], v[:, :, 46:150])  # past the capacity: buffers reallocated, the range kept pending
    assert side.pending_from == 46 and torch.equal(side.packed_t, reference(150))
    layer.update(k[:, :, 150:151], v[:, :, 150:151])
    side.reset()
    assert side.pending_from is None and side.length == 0


def test_huge_page_zeros_are_zero_aligned_and_writable(monkeypatch):
    """tokprune._memory.zeros: a zero tensor of the asked shape and dtype; large CPU buffers 2 MiB-aligned where
    transparent huge pages can be asked for (``TOKPRUNE_HUGE_PAGES=0``: the ordinary allocator)."""
    from tokprune import _memory

    small = _memory.zeros((3, 5), torch.bfloat16, "cpu")
    assert small.shape == (3, 5) and small.dtype == torch.bfloat16 and not small.any()
    big = _memory.zeros((2, 3, 1000, 200), torch.float32, "cpu")
    assert big.shape == (2, 3, 1000, 200) and big.is_contiguous() and not big.any()
    big += 1  # writable, and freed with the tensor
    assert float(big.sum()) == big.numel()
    if _memory.huge_pages_available():
        assert big.data_ptr() % _memory.HUGE_PAGE == 0
    monkeypatch.setenv("TOKPRUNE_HUGE_PAGES", "0")
    assert not _memory.huge_pages_available()
    plain = _memory.zeros((2, 3, 1000, 200), torch.float32, "cpu")
    assert not plain.any() and plain.untyped_storage().nbytes() == plain.numel() * 4
