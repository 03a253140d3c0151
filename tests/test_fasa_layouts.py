"""FASA key layouts on tokprune's cache: ``"packed"`` (full K + packed FC copy), ``"split"`` (FASA-C: K stored once
as dominant + other dims) and ``"offload"`` (FASA-M spirit: other dims and V on a second tier). Same tokens and
logits as the packed layout, resident bytes per tier, and the cache operations on a split layer."""

import pytest
import torch

from tests.helpers import assert_close
from tokprune.hf.kv_cache import TokpruneCache, use_tokprune_cache
from tokprune.methods import FASA


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(seed=0, pad=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 150, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding in row 1
    return ids, mask


def _generate(model, policy, ids, mask, n=8):
    with policy.patch(model):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1), out.cache


def _fasa(layout, **kw):
    kw = {"fcs": "uncalibrated", "budget": 12, "sink": 2, "window": 4, "decline_ratio": 0, **kw}
    if layout == "packed":  # the split layouts score from exact dominant dims: compare with exact packed scores
        kw.setdefault("score_dtype", torch.float32)
    return FASA(layout=layout, **kw)


@pytest.mark.parametrize("settings", [{}, {"selection": "head"}, {"aggregate": "max"}, {"decline_ratio": 100.0},
                                      {"dense_layers": (0,)}],
                         ids=["group", "per_head", "max", "declined", "dense_layer0"])
@pytest.mark.parametrize("layout", ["split", "offload"])
def test_generate_same_tokens_and_logits_as_packed(layout, settings, tiny_llama):
    model = tiny_llama
    ids, mask = _batch()
    ref_seq, ref_logits, ref_cache = _generate(model, _fasa("packed", **settings), ids, mask)
    seq, logits, cache = _generate(model, _fasa(layout, **settings), ids, mask)
    assert torch.equal(seq, ref_seq)
    assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4, name=f"FASA layout={layout}")
    dense = set(settings.get("dense_layers", ()))
    for i, (layer, ref) in enumerate(zip(cache.layers, ref_cache.layers)):
        assert (layer.split is None) == (i in dense)  # FASA layers hold no full-K buffer
        if layer.split is not None:
            assert layer.key_buffer is None and layer.value_buffer is None and not layer.side
            assert layer.split.offloaded == (layout == "offload")
        # reassembled on read (the decode outputs differ from packed by rounding, hence the later K/V too)
        assert_close(layer.keys, ref.keys, atol=1e-5, rtol=1e-5, name="keys")
        assert_close(layer.values, ref.values, atol=1e-5, rtol=1e-5, name="values")
    assert model.config._attn_implementation == "sdpa"  # patch removed


def test_split_layer_parts_are_the_packed_dims_and_the_rest(tiny_llama):
    ids, mask = _batch(1)
    policy = _fasa("split")
    _, _, cache = _generate(tiny_llama, policy, ids, mask)
    layer = cache.layers[1]
    split = layer.split
    dims = policy.fc_index(1, 2, 16, "cpu")
    assert torch.equal(split.dims, policy._fc_cache[(1, 2, 16, "cpu", "dims")])
    assert sorted(torch.cat([split.dims, split.rest_dims], 1)[0].tolist()) == list(range(16))  # disjoint, all dims
    keys = layer.keys
    assert torch.equal(split.packed, keys[..., split.dims[0]])
    assert torch.equal(split.rest[:, :, :layer.length], keys[..., split.rest_dims[0]])
    assert dims.shape == (2, 2)


def test_resident_bytes_split_equals_full_k_less_than_packed(tiny_llama):
    ids, mask = _batch(2)
    reports = {}
    caches = {}
    for layout in ("packed", "split", "offload"):
        policy = _fasa(layout)
        _, _, cache = _generate(tiny_llama, policy, ids, mask)
        reports[layout], caches[layout] = policy.memory_report(cache), cache
    full_kv = sum(l.key_buffer.numel() * l.key_buffer.element_size() + l.value_buffer.numel() * 4
                  for l in caches["packed"].layers)
    side = sum(b.storage.numel() * b.storage.element_size() for l in caches["packed"].layers for b in l.side.values())
    packed, split, offload = reports["packed"], reports["split"], reports["offload"]
    assert side > 0
    assert packed["resident"] == {"compute": full_kv + side}
    assert split["resident"] == {"compute": full_kv}  # keys once: no duplication
    assert split["resident"]["compute"] < packed["resident"]["compute"]
    assert sum(offload["resident"].values()) == full_kv
    # compute tier of "offload": the dominant dims only (nd of D key dims); the rest of K and all of V offloaded
    dom = sum(l.split.storage.numel() * 4 for l in caches["offload"].layers)
    assert offload["resident"] == {"compute": dom, "offload": full_kv - dom}
    assert all(layer["devices"] == {"compute": "cpu", "offload": "cpu"} for layer in offload["layers"])
    # bytes read per sparse step are the same for packed and split; offload reads only selected rows off-tier
    assert packed["read_per_step"] == split["read_per_step"]
    assert sum(offload["read_per_step"].values()) == split["read_per_step"]["compute"]
    batch, kv_heads, length, e = 2, 2, caches["split"].layers[0].length, 4
    k = 12
    nd = caches["split"].layers[0].split.dims.shape[1]
    per_layer_host = batch * kv_heads * k * ((16 - nd) + 16) * e
    assert offload["read_per_step"]["offload"] == 3 * per_layer_host
    assert offload["read_per_step"]["compute"] == 3 * batch * kv_heads * (length * nd + k * nd) * e


def test_cache_ops_on_split_layers_match_packed(tiny_llama):
    """crop, reorder, batch_select, a decode step and a multi-token step after them (patched), then a dense step
    with only tokprune's cache installed: the split cache gives what the packed cache gives."""
    model = tiny_llama
    ids, mask = _batch(3, pad=0)
    mask = None
    outs = {}
    for layout in ("packed", "split", "offload"):
        policy = _fasa(layout)
        _, _, cache = _generate(model, policy, ids, torch.ones_like(ids))
        cache.crop(-2)
        cache.reorder_cache(torch.tensor([1, 0]))
        step = torch.tensor([[5], [9]])
        with policy.patch(model):
            a = model(input_ids=step, past_key_values=cache, use_cache=True).logits
            b = model(input_ids=torch.tensor([[5, 6, 7], [9, 10, 11]]), past_key_values=cache, use_cache=True).logits
            c = model(input_ids=step, past_key_values=cache, use_cache=True).logits
        cache.batch_select_indices(torch.tensor([1]))
        cache.batch_repeat_interleave(2)
        with use_tokprune_cache(model):  # no policy: the dense decode function of the cache
            d = model(input_ids=torch.tensor([[3], [3]]), past_key_values=cache, use_cache=True).logits
        outs[layout] = (a, b, c, d, cache)
    ref = outs["packed"]
    for layout in ("split", "offload"):
        got = outs[layout]
        for x, y, name in zip(got[:4], ref[:4], "abcd"):
            assert_close(x, y, atol=1e-4, rtol=1e-4, name=f"{layout} step {name}")
        for layer, ref_layer in zip(got[4].layers, ref[4].layers):
            assert layer.split is not None and layer.length == ref_layer.length
            assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5, name="keys")
            assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-5, name="values")
    assert mask is None


def test_rewrites_reassemble_and_reset_reuses(tiny_llama):
    ids, mask = _batch(4)
    policy = _fasa("split")
    _, _, cache = _generate(tiny_llama, policy, ids, mask)
    layer = cache.layers[0]
    keys, values = layer.keys, layer.values
    layer.keys = keys[:, :, :20]  # assignment (code written for DynamicCache): back to full buffers
    assert layer.split is None and torch.equal(layer.keys, keys[:, :, :20])
    layer2 = cache.layers[1]
    full = layer2.keys
    layer2.set_row_lengths([layer2.length, layer2.length - 3])  # ragged rows: full buffers again
    assert layer2.split is None and torch.equal(layer2.keys[0], full[0])
    assert torch.equal(cache.layers[2].values, cache.layers[2].split.values[:, :, :cache.layers[2].length])
    del values
    # the same policy and model serve a new batch (reset cache built by generate each time)
    ids2, mask2 = _batch(5)
    seq_p, _, _ = _generate(tiny_llama, _fasa("packed"), ids2[:, :40], mask2[:, :40])
    seq_s, _, _ = _generate(tiny_llama, policy, ids2[:, :40], mask2[:, :40])
    assert torch.equal(seq_p, seq_s)


def test_reused_cache_with_another_batch_or_model_raises_as_packed(tiny_llama):
    ids, mask = _batch(6)
    for layout in ("packed", "split", "offload"):
        _, _, cache = _generate(tiny_llama, _fasa(layout), ids, mask)
        with pytest.raises(ValueError, match="batch 3 .*holds batch 2"):
            cache.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16), 0)
        with pytest.raises(ValueError, match="kv_heads=3, head_dim=8"):
            cache.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8), 0)
        with pytest.raises(TypeError, match="dtype"):
            cache.update(torch.randn(2, 2, 1, 16, dtype=torch.float64), torch.randn(2, 2, 1, 16, dtype=torch.float64), 0)
        with pytest.raises(IndexError, match="another model"):
            cache.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 7)


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="layout must be one of 'packed', 'split', 'offload', got 'fasa-c'"):
        FASA(fcs="uncalibrated", layout="fasa-c")
    with pytest.raises(ValueError, match="layout='split' .*packed=True"):
        FASA(fcs="uncalibrated", layout="split", packed=False)
    with pytest.raises(ValueError, match="offload_device must name a torch device"):
        FASA(fcs="uncalibrated", layout="offload", offload_device="nowhere")
    with pytest.raises(ValueError, match="selection='head'.*heads="):
        FASA(fcs="uncalibrated", selection="head").memory_report(TokpruneCache(num_layers=1))


def test_split_needs_tokprune_cache_and_refuses_foreign_side_buffers(tiny_llama):
    ids, mask = _batch(7)
    with _fasa("split").patch(tiny_llama, cache=False):
        with pytest.raises(ValueError, match="needs tokprune's KV cache"):
            tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    from tokprune.methods.kv_baselines import QuestPages

    cache = TokpruneCache(num_layers=1)
    cache.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), 0)
    cache.layers[0].add_side("q", QuestPages(4))
    with pytest.raises(ValueError, match=r"side buffers \['q'\]"):
        cache.layers[0].split_keys(torch.tensor([[0, 8], [1, 9]]))


@pytest.mark.parametrize("layout", ["split", "offload"])
@pytest.mark.parametrize("padding", [True, False], ids=["left_padding", "no_mask"])
@pytest.mark.parametrize("decline_ratio", [0, 100.0], ids=["sparse", "declined"])
def test_split_decode_compiles_fullgraph_and_equals_packed(layout, padding, decline_ratio):
    """A decode step on a split layer reads no tensor data on the host (traces with fullgraph=True) and equals
    the packed layout's step on the same keys (the split happens at the first, eager, step)."""
    from tokprune import _debug
    from tokprune.hf.kv_cache import TokpruneLayer
    from tokprune.methods.base import DecodeContext, decode_valid_mask

    class _Module:
        layer_idx = 0

    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 150, 16), torch.randn(2, 2, 150, 16)
    layers = {}
    for name in ("packed", layout):
        layers[name] = TokpruneLayer(capacity=64, layer_idx=0)
        layers[name].update(k[:, :, :-1], v[:, :, :-1])
        layers[name].update(k[:, :, -1:], v[:, :, -1:])
    policies = {name: _fasa(name, budget=24, sink=2, window=8, decline_ratio=decline_ratio) for name in layers}

    def fn_for(name):
        layer, policy = layers[name], policies[name]

        def fn(query, mask):
            valid = decode_valid_mask(mask, query.shape[0], layer.length, layer)
            ctx = DecodeContext(_Module(), query, layer._k_view, layer._v_view, valid, 0.25, layer)
            out = policy.attend_decode(ctx)
            return out

        return fn

    mask = torch.ones(2, 1, 1, 150, dtype=torch.bool)
    mask[1, ..., :5] = False
    mask = mask if padding else None
    query = torch.randn(2, 4, 1, 16)
    previous = _debug.set_debug(False)
    torch._dynamo.reset()
    try:
        ref = fn_for("packed")(query, mask)
        if ref is None:  # packed declines to the router's dense path: the same exact attention
            from tokprune.ops.decode import dense_decode_attention

            ref = dense_decode_attention(query, k, v, 0.25, valid=None if mask is None else mask)
        eager = fn_for(layout)(query, mask)
        assert layers[layout].split is not None and layers[layout].key_buffer is None
        assert_close(eager, ref, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(fn_for(layout), fullgraph=True, backend="aot_eager")
        assert_close(compiled(query, mask), eager, atol=1e-5, rtol=1e-5)
    finally:
        _debug.set_debug(previous)
        torch._dynamo.reset()
