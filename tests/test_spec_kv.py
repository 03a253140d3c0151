"""tokprune.spec private cache and linear paths: the preallocated in-place cache layers behave like
transformers' DynamicLayer (append, accepted-path compaction, crop, batch selection) without
reallocating per step, and packed-weight linears match F.linear and are restored after the block."""

from __future__ import annotations

import pytest
import torch

from tests import models as tiny
from tokprune.spec import _kv
from tokprune.spec._linear import packed_linears, packing_available, release_packed


def _pair(bsz=3, heads=2, dim=4, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre, ref = _kv.new_cache(None, preallocated=True), _kv.new_cache(None, preallocated=False)

    def append(n):
        for i in range(layers):
            k = torch.randn(bsz, heads, n, dim, generator=g)
            v = torch.randn(bsz, heads, n, dim, generator=g)
            a = pre.update(k, v, i)
            b = ref.update(k.clone(), v.clone(), i)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    return pre, ref, append


def _same(pre, ref):
    assert pre.get_seq_length() == ref.get_seq_length()
    for a, b in zip(pre.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_prealloc_layer_appends_in_place_like_dynamic_layer():
    pre, ref, append = _pair()
    append(10)
    ptr = pre.layers[0].k_buf.data_ptr()
    for _ in range(5):
        append(3)
        _same(pre, ref)
    assert pre.layers[0].k_buf.data_ptr() == ptr, "small appends must not reallocate"
    assert pre.layers[0].k_buf.shape[2] >= 25
    append(200)  # beyond the capacity: grows, content kept
    _same(pre, ref)


@pytest.mark.parametrize("same_path", [True, False])
def test_keep_tail_rows_crop_and_select_match_dynamic_cache(same_path):
    pre, ref, append = _pair()
    append(7)
    append(6)  # a 6-node "tree" after a 7-slot prefix
    if same_path:
        index = torch.tensor([[0, 2, 5]]).expand(3, 3)
    else:
        index = torch.tensor([[0, 1, 4], [0, 3, 5], [0, 2, 2]])
    _kv.keep_tail_rows(pre, 7, index)
    _kv.keep_tail_rows(ref, 7, index)
    _same(pre, ref)
    assert pre.get_seq_length() == 10
    append(4)
    _same(pre, ref)
    _kv.crop_cache(pre, 9)
    _kv.crop_cache(ref, 9)
    _same(pre, ref)
    rows = torch.tensor([2, 0])
    _kv.select_batch(pre, rows)
    _kv.select_batch(ref, rows)
    _same(pre, ref)
    append_b = torch.randn(2, 2, 3, 4)
    for i in range(2):
        pre.update(append_b, append_b, i)
        ref.update(append_b, append_b, i)
    _same(pre, ref)


@pytest.mark.parametrize("preallocated", [True, False])
def test_keep_tail_rows_path_already_in_place(preallocated):
    """Kept slots that already sit right after the prefix (only the root, or a chain of first nodes):
    the cache keeps exactly those slots, whichever branch does it."""
    cache = _kv.new_cache(None, preallocated=preallocated)
    g = torch.Generator().manual_seed(1)
    kv = [(torch.randn(2, 2, 13, 4, generator=g), torch.randn(2, 2, 13, 4, generator=g)) for _ in range(2)]
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    _kv.keep_tail_rows(cache, 7, torch.tensor([[0, 1, 2]]).expand(2, 3))
    assert cache.get_seq_length() == 10
    for layer, (k, v) in zip(cache.layers, kv):
        assert torch.equal(layer.keys, k[:, :, :10]) and torch.equal(layer.values, v[:, :, :10])


@pytest.mark.skipif(not packing_available(tiny.tiny_llama()), reason="oneDNN packing unavailable")
def test_packed_linears_match_and_restore():
    model = tiny.tiny_llama()
    ids = torch.randint(3, 150, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with packed_linears(model) as active:
            assert active
            assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))
            got = model(ids).logits
        assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        # one row (a 1-token step) keeps F.linear: the same numbers as the model outside the block
        with packed_linears(model):
            got1 = model(ids[:1, :1]).logits
        assert torch.equal(got1, model(ids[:1, :1]).logits)
        # a weight change invalidates the packed copy
        lin = model.lm_head
        lin.weight.mul_(2.0)
        with packed_linears(model):
            got2 = model(ids).logits
        torch.testing.assert_close(got2, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert release_packed(model) > 0 and release_packed(model) == 0
    with packed_linears(model, enabled=False) as active:
        assert not active


def test_compact_dynamic_cache_on_preallocated_layers_is_in_place():
    from tokprune.hf.cache import compact_dynamic_cache

    pre, ref, append = _pair(bsz=2)
    append(8)
    append(5)
    ptr = pre.layers[0].k_buf.data_ptr()
    accept = torch.tensor([[0, 2, -1], [0, 1, 3]])
    assert compact_dynamic_cache(pre, 8, accept) == compact_dynamic_cache(ref, 8, accept) == 10
    _same(pre, ref)
    assert pre.layers[0].k_buf.data_ptr() == ptr
    append(2)
    _same(pre, ref)
