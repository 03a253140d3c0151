"""Paged, ragged decode ops against the gather-then-contiguous oracle (tokprune.reference.paged)."""

import pytest
import torch

from tests.helpers import assert_close, backend_params, dev, host
from tokprune._debug import set_debug
from tokprune.ops import fc_scores, pack_fc_keys, select_sparse_indices, sparse_decode_attention
from tokprune.ops.paged import (
    paged_decode_attention,
    paged_fc_scores,
    paged_quest_scores,
    paged_select,
    paged_select_pages,
    paged_sparse_decode_attention,
    split_decode_rows,
    update_paged_page_bounds,
    vllm_cpu_kv_views,
    write_paged_fc_keys,
)
from tokprune.reference.fasa import fc_dims
from tokprune.reference.paged import (
    gather_request,
    paged_decode_attention_reference,
    paged_fc_scores_reference,
    paged_quest_scores_reference,
    paged_select_pages_reference,
    paged_select_reference,
    paged_sparse_decode_attention_reference,
    write_paged_fc_keys_reference,
)

BACKENDS = backend_params("torch", "triton")  # kernels on TOKPRUNE_TEST_DEVICE, oracles on the CPU


def random_table(lens, block_size, extra_blocks=3, garbage=-1, gen=None):
    """Block table with shuffled physical blocks; entries past each row's last used block hold ``garbage``."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(need + [1]) + 1
    table = torch.full((len(lens), max_blocks), garbage, dtype=torch.int32)
    at = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[at:at + n].int()
        at += n
    return table, num_blocks


def vllm_style_cache(num_blocks, kv_heads, block_size, head_dim, dtype=torch.float32):
    """A vLLM CPU cache ``[num_blocks, Hkv, bs, 2D]`` (K transposed, then V) and its K/V views."""
    layers = torch.randn(2, num_blocks, kv_heads, block_size, 2 * head_dim).to(dtype)
    kv = layers[1]  # a layer of a stacked cache: the views start at a storage offset
    k, v = vllm_cpu_kv_views(kv, head_dim)
    return kv, k, v


def device_kv_views(kv, head_dim):
    """The K/V views of :func:`vllm_cpu_kv_views` over a copy of ``kv`` on TEST_DEVICE (the same strided
    layout there; ``kv`` itself on the CPU)."""
    return vllm_cpu_kv_views(dev(kv), head_dim)


def fc_setup(kv_heads, head_dim, n_fc, chunk=1, heads=None):
    n_all = head_dim // (2 * chunk)
    rows = kv_heads if heads is None else heads
    return torch.stack([torch.randperm(n_all)[:n_fc] for _ in range(rows)])


# ----------------------------------------------------------------------------------------------------
# layout helpers
# ----------------------------------------------------------------------------------------------------

def test_vllm_cpu_kv_views_address_the_documented_layout():
    nb, hkv, bs, d = 3, 2, 8, 4
    big = torch.zeros(2, nb, hkv, bs, 2 * d)  # a stacked cache: the view must honour the storage offset
    kv = big[1]
    k, v = vllm_cpu_kv_views(kv, d)
    assert k.shape == v.shape == (nb, hkv, bs, d)
    k.copy_(torch.randn(nb, hkv, bs, d))
    v.copy_(torch.randn(nb, hkv, bs, d))
    flat = kv.reshape(nb, hkv, bs * 2 * d)
    for b, h, t, i in [(0, 0, 0, 0), (2, 1, 7, 3), (1, 0, 5, 2), (1, 1, 3, 1)]:
        assert flat[b, h, i * bs + t] == k[b, h, t, i]  # K transposed [D, bs]
        assert flat[b, h, d * bs + t * d + i] == v[b, h, t, i]  # then V [bs, D]
    assert big[0].abs().sum() == 0  # nothing written outside the layer's cache


def test_vllm_cpu_kv_views_rejects_bad_input():
    with pytest.raises(ValueError, match="2\\*head_dim=8"):
        vllm_cpu_kv_views(torch.zeros(2, 1, 4, 6), 4)
    with pytest.raises(ValueError, match="contiguous in its last two"):
        vllm_cpu_kv_views(torch.zeros(2, 1, 8, 4).transpose(2, 3), 4)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        vllm_cpu_kv_views(torch.zeros(2, 1, 4, 8), 0)


def test_split_decode_rows_matches_a_loop():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        rows = int(torch.randint(0, 9, (1,), generator=gen))
        q_len = torch.randint(0, 4, (rows,), generator=gen)
        seq_lens = q_len + torch.randint(0, 50, (rows,), generator=gen)
        loc = torch.zeros(rows + 1, dtype=torch.int32)
        loc[1:] = q_len.cumsum(0)
        split = split_decode_rows(loc, seq_lens.int())
        want_dec = [r for r in range(rows) if q_len[r] == 1]
        want_pre = [r for r in range(rows) if q_len[r] > 1]
        assert split.decode_rows.tolist() == want_dec
        assert split.prefill_rows.tolist() == want_pre
        assert split.decode_tokens.tolist() == [int(loc[r]) for r in want_dec]
        # the token of each decode row is the one that row owns in the flattened query
        owner = torch.repeat_interleave(torch.arange(rows), q_len)
        assert owner[split.decode_tokens].tolist() == want_dec


def test_split_decode_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="R \\+ 1 = 3"):
        split_decode_rows(torch.tensor([0, 1]), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        split_decode_rows(torch.tensor([0, 2, 1]), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="query_start_loc\\[0\\] must be 0"):
        split_decode_rows(torch.tensor([1, 2]), torch.tensor([4]))
    with pytest.raises(ValueError, match="seq_lens\\[1\\] = 2 is smaller"):
        split_decode_rows(torch.tensor([0, 1, 4]), torch.tensor([4, 2]))
    with pytest.raises(TypeError, match="query_start_loc must have dtype"):
        split_decode_rows(torch.tensor([0.0, 1.0]), torch.tensor([4]))


# ----------------------------------------------------------------------------------------------------
# FC side cache
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_paged_fc_keys_matches_reference(backend, dtype):
    nb, hkv, bs, d, n_fc, chunk = 5, 2, 8, 16, 3, 2
    fc_index = fc_setup(hkv, d, n_fc, chunk)
    nd = 2 * chunk * n_fc
    storage = dev(torch.randn(nb, hkv, bs, nd + 3).to(dtype))
    fc_cache = storage[..., 1:1 + nd]  # strided view
    expected = host(fc_cache).clone()
    key = torch.randn(9, hkv, d).to(dtype)
    slots = torch.randperm(nb * bs)[:9]
    slots[[2, 6]] = -1  # padding tokens are skipped
    write_paged_fc_keys_reference(expected, key, slots, fc_index, chunk)
    out = write_paged_fc_keys(fc_cache, *dev(key, slots.int(), fc_index), chunk, backend=backend)
    assert out is fc_cache
    assert torch.equal(host(fc_cache), expected)
    assert torch.equal(storage[..., 0], storage[..., 0].clone())  # untouched neighbours keep their values
    # the packed entries equal pack_fc_keys on the keys
    dims = fc_dims(fc_index, d, chunk)
    t = 0
    s = int(slots[t])
    assert torch.equal(host(fc_cache[s // bs, 1, s % bs]), key[t, 1, dims[1]])


def test_write_paged_fc_keys_rejects_bad_input():
    fc_index = torch.tensor([[0, 1], [2, 3]])
    fc_cache = torch.zeros(2, 2, 4, 4)
    key = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="2\\*chunk\\*F = 4"):
        write_paged_fc_keys(torch.zeros(2, 2, 4, 5), key, torch.tensor([0, 1, 2]), fc_index)
    with pytest.raises(ValueError, match="slot_mapping must be \\(T=3,\\)"):
        write_paged_fc_keys(fc_cache, key, torch.tensor([0, 1]), fc_index)
    with pytest.raises(IndexError, match="slot_mapping values must be -1 or lie in \\[0, .* = 8\\)"):
        write_paged_fc_keys(fc_cache, key, torch.tensor([0, 1, 8]), fc_index)
    with pytest.raises(ValueError, match="must not repeat a slot"):
        write_paged_fc_keys(fc_cache, key, torch.tensor([0, 1, 1]), fc_index)
    with pytest.raises(ValueError, match="key must be \\(T, kv_heads=2"):
        write_paged_fc_keys(fc_cache, torch.randn(3, 3, 16), torch.tensor([0, 1, 2]), fc_index)
    with pytest.raises(IndexError, match="fc_index values must lie in \\[0, 8\\)"):
        write_paged_fc_keys(fc_cache, key, torch.tensor([0, 1, 2]), torch.tensor([[0, 8], [1, 2]]))
    with pytest.raises(ValueError, match="fc_index must be \\(kv_heads=2, F\\)"):
        write_paged_fc_keys(fc_cache, key, torch.tensor([0, 1, 2]), torch.tensor([[0, 1]]))


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed,per_query_head", [(True, False), (False, False), (False, True)])
def test_paged_fc_scores_matches_reference(backend, packed, per_query_head):
    gen = torch.Generator().manual_seed(1)
    hkv, heads, d, bs, n_fc = 2, 4, 16, 4, 3
    lens = [13, 1, 8, 0, 6]
    table, nb = random_table(lens, bs, gen=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    fc_index = fc_setup(hkv, d, n_fc, heads=heads if per_query_head else None)
    q = torch.randn(len(lens), heads, d)
    kv, k, _ = vllm_style_cache(nb, hkv, bs, d)
    if packed:
        cache = torch.randn(nb, hkv, bs, 2 * n_fc)
        cache[:, :, 0] = float("nan")  # never-written slot 0 of every block: must not leak into the scores
        for r, n in enumerate(lens):  # write every used slot through the op
            slots = torch.tensor([int(table[r, t // bs]) * bs + t % bs for t in range(n)], dtype=torch.long)
            keys = gather_request(k, table, n, r)[0].transpose(0, 1)  # (n, Hkv, D)
            write_paged_fc_keys(cache, keys, slots, fc_index)
    else:
        cache = k
    expected = paged_fc_scores_reference(q, cache, table, seq_lens, fc_index, 1, packed=packed, max_len=15)
    cache = dev(cache) if packed else device_kv_views(kv, d)[0]
    q, table, seq_lens, fc_index = dev(q, table, seq_lens, fc_index)
    out = paged_fc_scores(q, cache, table, seq_lens, fc_index, packed=packed, max_len=15, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (len(lens), heads, 15)
    assert_close(out, expected, name="paged_fc_scores")
    if not per_query_head:
        grouped = expected.view(len(lens), hkv, heads // hkv, 15)
        red = paged_fc_scores(q, cache, table, seq_lens, fc_index, packed=packed, reduce="max", backend=backend)
        assert_close(red, grouped.amax(2)[..., :13], name="reduce=max")
        red = paged_fc_scores(q, cache, table, seq_lens, fc_index, packed=packed, reduce="mean", max_len=15,
                              backend=backend)
        assert_close(red, grouped.mean(2), name="reduce=mean")


def test_paged_fc_scores_rejects_bad_input():
    q = torch.randn(2, 4, 16)
    cache = torch.randn(4, 2, 4, 4)
    fc_index = torch.tensor([[0, 1], [2, 3]])
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([5, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        paged_fc_scores(q[:, :, None], cache, table, lens, fc_index)
    with pytest.raises(ValueError, match="2\\*chunk\\*F = 4"):
        paged_fc_scores(q, torch.randn(4, 2, 4, 6), table, lens, fc_index)
    with pytest.raises(ValueError, match="fc_index must be \\(kv_heads=2, F\\)"):
        paged_fc_scores(q, cache, table, lens, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="block_table must be \\(R=2"):
        paged_fc_scores(q, cache, table[:1], lens, fc_index)
    with pytest.raises(ValueError, match="seq_lens values must lie in \\[0, .* = 8\\]"):
        paged_fc_scores(q, cache, table, torch.tensor([5, 9], dtype=torch.int32), fc_index)
    with pytest.raises(ValueError, match="max_len=6 is smaller than seq_lens.max\\(\\) = 8"):
        paged_fc_scores(q, cache, table, lens, fc_index, max_len=6)
    with pytest.raises(ValueError, match="max_len=9 exceeds the block table capacity"):
        paged_fc_scores(q, cache, table, lens, fc_index, max_len=9)
    with pytest.raises(IndexError, match="block_table entries of used blocks must lie in \\[0, num_blocks=4\\)"):
        paged_fc_scores(q, cache, torch.tensor([[0, 1], [2, 4]], dtype=torch.int32), lens, fc_index)
    with pytest.raises(ValueError, match="reduce must be"):
        paged_fc_scores(q, cache, table, lens, fc_index, reduce="sum")
    with pytest.raises(TypeError, match="seq_lens must have dtype"):
        paged_fc_scores(q, cache, table, lens.float(), fc_index)


# ----------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget,sink,window", [(6, 1, 2), (20, 2, 3), (4, 4, 4), (0, 0, 0), (5, 0, 0)])
def test_paged_select_matches_reference(backend, budget, sink, window):
    gen = torch.Generator().manual_seed(2)
    bs = 4
    lens = [17, 3, 0, 9, 1, 12]
    table, _ = random_table(lens, bs, gen=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    scores = torch.randn(len(lens), 3, 18, generator=gen)
    scores[:, :, 17] = float("nan")  # past every length: ignored
    expected = paged_select_reference(scores, budget, sink, window, seq_lens, table, bs)
    out = paged_select(dev(scores), budget, sink, window, *dev(seq_lens, table), bs, backend=backend)
    assert out.dtype == torch.int64 and out.shape == (len(lens), 3, budget)
    assert torch.equal(host(out), expected), (out, expected)


def test_paged_select_rejects_bad_input():
    scores = torch.randn(2, 1, 8)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([5, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="budget must be an int >= 0"):
        paged_select(scores, -1, 0, 0, lens, table, 4)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        paged_select(scores, 4, 0, 0, lens, table, 0)
    with pytest.raises(ValueError, match="scores has 8 positions but seq_lens.max\\(\\) = 9"):
        paged_select(scores, 4, 0, 0, torch.tensor([5, 9], dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32), 4)
    bad = scores.clone()
    bad[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="scores contains NaN inside a row's length"):
        paged_select(bad, 4, 0, 0, lens, table, 4)
    with pytest.raises(IndexError, match="block_table entries of used blocks"):
        paged_select(scores, 4, 0, 0, lens, torch.tensor([[0, -1], [2, 3]], dtype=torch.int32), 4)


# ----------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_query_head", [False, True])
def test_paged_sparse_decode_matches_reference(backend, dtype, per_query_head):
    gen = torch.Generator().manual_seed(4)
    hkv, heads, d, bs = 2, 6, 32, 8
    lens = [30, 5, 17]
    table, nb = random_table(lens, bs, gen=gen)
    kv, k, v = vllm_style_cache(nb, hkv, bs, d, dtype)
    q = torch.randn(len(lens), heads, d).to(dtype)
    n_idx = heads if per_query_head else hkv
    scores = torch.randn(len(lens), n_idx, 30)
    slots = paged_select(scores, 12, 1, 2, torch.tensor(lens), table, bs)
    slots[2, 0] = -1  # a row with no valid slot gives zeros
    scale = d ** -0.5
    expected = paged_sparse_decode_attention_reference(q, k, v, slots, scale)
    out = paged_sparse_decode_attention(dev(q), *device_kv_views(kv, d), dev(slots), scale, backend=backend)
    assert out.dtype == dtype and out.shape == (len(lens), heads, d)
    assert_close(out, expected, name="paged_sparse_decode_attention")
    group_rows = slice(0, 1) if per_query_head else slice(0, heads // hkv)
    out = host(out)
    assert torch.equal(out[2, group_rows], torch.zeros_like(out[2, group_rows]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_covering_the_context_is_exact_dense(backend):
    gen = torch.Generator().manual_seed(5)
    hkv, heads, d, bs, n_fc = 1, 3, 16, 4, 2
    lens = [11, 2, 7]
    table, nb = random_table(lens, bs, gen=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kv, k, v = vllm_style_cache(nb, hkv, bs, d)
    q = torch.randn(len(lens), heads, d)
    fc_index = fc_setup(hkv, d, n_fc)
    kd, vd = device_kv_views(kv, d)
    qd, table_d, lens_d = dev(q, table, seq_lens)
    scores = paged_fc_scores(qd, kd, table_d, lens_d, dev(fc_index), packed=False, reduce="max", backend=backend)
    slots = paged_select(scores, 16, 2, 2, lens_d, table_d, bs, backend=backend)
    sparse = paged_sparse_decode_attention(qd, kd, vd, slots, 0.25, backend=backend)
    dense = paged_decode_attention(qd, kd, vd, table_d, lens_d, 0.25, backend=backend)
    assert_close(dense, paged_decode_attention_reference(q, k, v, table, seq_lens, 0.25), name="dense vs oracle")
    assert_close(sparse, dense, name="budget >= length vs dense")
    assert (slots >= 0).sum(-1).tolist() == [[n] for n in lens]


def test_attention_rejects_bad_input():
    q = torch.randn(2, 4, 8)
    k = torch.randn(3, 2, 4, 8)
    with pytest.raises(TypeError, match="share a dtype"):
        paged_sparse_decode_attention(q, k.half(), k.half(), torch.zeros(2, 2, 1, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="slots must be \\(R=2, kv_heads=2 or heads=4, K\\)"):
        paged_sparse_decode_attention(q, k, k, torch.zeros(2, 3, 1, dtype=torch.long), 1.0)
    with pytest.raises(IndexError, match="slots values must be -1 or lie in \\[0, .* = 12\\)"):
        paged_sparse_decode_attention(q, k, k, torch.full((2, 2, 1), 12), 1.0)
    with pytest.raises(IndexError, match="slots values must be -1"):
        paged_sparse_decode_attention(q, k, k, torch.full((2, 2, 1), -2), 1.0)
    with pytest.raises(ValueError, match="multiple of k_cache kv_heads \\(3\\)"):
        paged_sparse_decode_attention(q, torch.randn(3, 3, 4, 8), torch.randn(3, 3, 4, 8),
                                      torch.zeros(2, 3, 1, dtype=torch.long), 1.0)
    with pytest.raises(TypeError, match="scale must be a float"):
        paged_decode_attention(q, k, k, torch.zeros(2, 1, dtype=torch.int32), torch.tensor([1, 2]), None)


def test_empty_batch_and_empty_rows():
    k = torch.randn(3, 1, 4, 8)
    q = torch.randn(0, 2, 8)
    table = torch.zeros(0, 2, dtype=torch.int32)
    lens = torch.zeros(0, dtype=torch.int32)
    assert paged_fc_scores(q, k, table, lens, torch.tensor([[0]]), packed=False).shape == (0, 2, 0)
    assert paged_decode_attention(q, k, k, table, lens, 1.0).shape == (0, 2, 8)
    assert paged_select(torch.zeros(0, 1, 0), 4, 1, 1, lens, table, 4).shape == (0, 1, 4)
    q1 = torch.randn(1, 2, 8)
    zero = paged_decode_attention(q1, k, k, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0]), 1.0, max_len=4)
    assert torch.equal(zero, torch.zeros_like(zero))


# ----------------------------------------------------------------------------------------------------
# whole decode step vs the contiguous ops
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_fasa_step_on_mixed_ragged_batch_equals_contiguous_ops(backend):
    """A mixed prefill + decode batch: the decode rows (split by split_decode_rows) run the paged FASA
    step; each must equal the contiguous ops on that request's gathered cache."""
    gen = torch.Generator().manual_seed(6)
    hkv, heads, d, bs, n_fc, budget = 2, 4, 16, 4, 2, 7
    seq_lens = torch.tensor([19, 6, 12, 3, 9], dtype=torch.int32)
    q_len = torch.tensor([1, 6, 1, 1, 4])  # rows 1 and 4 are (chunked) prefill
    loc = torch.zeros(6, dtype=torch.int32)
    loc[1:] = q_len.cumsum(0)
    table, nb = random_table(seq_lens.tolist(), bs, gen=gen)
    kv, k, v = vllm_style_cache(nb, hkv, bs, d)
    fc_index = fc_setup(hkv, d, n_fc)
    fc_cache = dev(torch.zeros(nb, hkv, bs, 2 * n_fc))
    for r in range(5):  # the FC side cache is written with the same slots as K/V
        n = int(seq_lens[r])
        slots = torch.tensor([int(table[r, t // bs]) * bs + t % bs for t in range(n)])
        write_paged_fc_keys(fc_cache, *dev(gather_request(k, table, n, r)[0].transpose(0, 1), slots, fc_index),
                            backend=backend)
    query = torch.randn(int(loc[-1]), heads, d)
    split = split_decode_rows(loc, seq_lens)
    assert split.decode_rows.tolist() == [0, 2, 3]
    q = query[split.decode_tokens]
    rows = split.decode_rows
    sub_table, sub_lens = table[rows], seq_lens[rows]
    scores = paged_fc_scores(dev(q), fc_cache, *dev(sub_table, sub_lens, fc_index), reduce="max", backend=backend)
    slots = paged_select(scores, budget, 1, 2, *dev(sub_lens, sub_table), bs, backend=backend)
    out = paged_sparse_decode_attention(dev(q), *device_kv_views(kv, d), slots, d ** -0.5, backend=backend)
    for i, r in enumerate(rows.tolist()):
        n = int(seq_lens[r])
        kc, vc = gather_request(k, table, n, r), gather_request(v, table, n, r)
        cs = fc_scores(q[i:i + 1, :, None], pack_fc_keys(kc, fc_index), fc_index, packed=True, reduce="max")
        assert_close(scores[i:i + 1, :, :n], cs, name=f"scores row {r}")
        idx = select_sparse_indices(cs, budget, sink=1, window=2)
        co = sparse_decode_attention(q[i:i + 1, :, None], kc, vc, idx, d ** -0.5)
        assert_close(out[i:i + 1], co[:, :, 0], name=f"attention row {r}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_cache_is_the_one_block_special_case(backend):
    """tokprune's contiguous (B, Hkv, capacity, D) cache = paged with block_size=capacity, table [[0],[1],..]."""
    batch, hkv, heads, cap, d, n_fc, budget = 3, 2, 4, 20, 16, 2, 6
    k = torch.randn(batch, hkv, cap, d)
    v = torch.randn(batch, hkv, cap, d)
    q = torch.randn(batch, heads, 1, d)
    fc_index = fc_setup(hkv, d, n_fc)
    table = torch.arange(batch, dtype=torch.int32)[:, None]
    lens = torch.tensor([20, 13, 7], dtype=torch.int32)
    packed = pack_fc_keys(k, fc_index)
    scores = paged_fc_scores(*dev(q[:, :, 0], packed, table, lens, fc_index), reduce="max", backend=backend)
    valid = torch.arange(cap)[None, :] < lens[:, None].long()
    cs = fc_scores(q, packed, fc_index, packed=True, reduce="max")
    assert_close(scores, cs.masked_fill(~valid[:, None], float("-inf")), name="scores")
    slots = paged_select(scores, budget, 1, 2, *dev(lens, table), cap, backend=backend)
    idx = select_sparse_indices(cs, budget, sink=1, window=2, valid=valid)
    base = (torch.arange(batch) * cap)[:, None, None]
    assert torch.equal(host(slots), torch.where(idx >= 0, idx + base, -1))
    out = paged_sparse_decode_attention(*dev(q[:, :, 0], k, v), slots, 0.3, backend=backend)
    assert_close(out, sparse_decode_attention(q, k, v, idx, 0.3)[:, :, 0], name="attention")


def test_data_checks_are_skipped_outside_debug_mode():
    """Out of debug mode the ops do not read tensor values to validate (no host sync on the hot path)."""
    q = torch.randn(1, 2, 8)
    k = torch.randn(2, 1, 4, 8)
    bad_slots = torch.full((1, 1, 2), 99)
    previous = set_debug(False)
    try:
        with pytest.raises(IndexError, match="out of (bounds|range)"):  # torch's own indexing error, not ours
            paged_sparse_decode_attention(q, k, k, bad_slots, 1.0)
    finally:
        set_debug(previous)
    with pytest.raises(IndexError, match="slots values must be -1 or lie in"):
        paged_sparse_decode_attention(q, k, k, bad_slots, 1.0)


# ----------------------------------------------------------------------------------------------------
# Quest page bounds
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_quest_bounds_updated_incrementally_equal_bounds_from_scratch(backend):
    """Keys appended in chunks that straddle page and block boundaries (prefill, chunked prefill, then
    decode steps); bounds start as garbage (reused blocks). Scores and page selection vs the oracle."""
    gen = torch.Generator().manual_seed(7)
    hkv, heads, d, bs, ps = 2, 4, 8, 16, 4
    lens = [23, 5, 16, 1]
    table, nb = random_table(lens, bs, gen=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    k = torch.randn(nb, hkv, bs, d, generator=gen)
    kmin = dev(torch.randn(nb, hkv, bs // ps, d, generator=gen))  # stale values of a reused block
    kmax = kmin + 5
    done = [0] * len(lens)
    while any(done[r] < lens[r] for r in range(len(lens))):
        keys, slots = [], []
        for r, n in enumerate(lens):  # one "step": each request appends a chunk of 1..7 tokens
            step = min(n - done[r], int(torch.randint(1, 8, (1,), generator=gen)))
            for t in range(done[r], done[r] + step):
                s = int(table[r, t // bs]) * bs + t % bs
                keys.append(k[s // bs, :, s % bs])
                slots.append(s)
            done[r] += step
        keys.append(torch.randn(hkv, d))  # a padding token (slot -1) must be ignored
        slots.append(-1)
        update_paged_page_bounds(kmin, kmax, *dev(torch.stack(keys), torch.tensor(slots)), ps, backend=backend)
    q = torch.randn(len(lens), heads, d, generator=gen)
    scores = paged_quest_scores(dev(q), kmin, kmax, *dev(table, seq_lens), ps, backend=backend)
    assert_close(scores, paged_quest_scores_reference(q, k, table, seq_lens, ps), name="quest scores")
    for n_pages in (0, 2, 9):
        slots = paged_select_pages(scores, n_pages, *dev(seq_lens, table), bs, ps, backend=backend)
        expected = paged_select_pages_reference(host(scores), n_pages, seq_lens, table, bs, ps)
        assert torch.equal(host(slots), expected), n_pages


def test_quest_rejects_bad_input():
    kmin = torch.zeros(2, 1, 4, 8)
    key = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="kmin and kmax must share shape"):
        update_paged_page_bounds(kmin, torch.zeros(2, 1, 4, 4), key, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="kmin and kmax must be contiguous"):
        update_paged_page_bounds(kmin.transpose(2, 3).contiguous().transpose(2, 3), kmin, key, torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="slot_mapping values must be -1 or lie in \\[0, .* = 128\\)"):
        update_paged_page_bounds(kmin, kmin.clone(), key, torch.tensor([0, 128]), 16)
    with pytest.raises(ValueError, match="key must be \\(T, kv_heads=1, head_dim=8\\)"):
        update_paged_page_bounds(kmin, kmin.clone(), torch.randn(2, 2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="page_size=3 must divide block_size=8"):
        paged_select_pages(torch.zeros(1, 1, 2), 1, torch.tensor([5]), torch.zeros(1, 1, dtype=torch.int32), 8, 3)
    with pytest.raises(ValueError, match="q heads \\(3\\) must be a multiple of kmin kv_heads \\(2\\)"):
        paged_quest_scores(torch.randn(1, 3, 8), torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8),
                           torch.zeros(1, 1, dtype=torch.int32), torch.tensor([3]))


def test_fasa_decode_step_traces_without_graph_breaks():
    """Out of debug mode and with ``max_len`` given, the paged FASA decode step (scores, selection,
    attention) never reads a tensor on the host: ``torch.compile(fullgraph=True)`` traces it whole (a
    host sync would be a graph break, the CPU-side proof of a CUDA-graph-capturable step) and the traced
    step equals eager."""
    gen = torch.Generator().manual_seed(8)
    hkv, heads, d, bs, n_fc, budget = 2, 4, 16, 4, 2, 6
    lens = [13, 6, 9]
    table, nb = random_table(lens, bs, gen=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    _, k, v = vllm_style_cache(nb, hkv, bs, d)
    fc_index = fc_setup(hkv, d, n_fc)
    q = torch.randn(len(lens), heads, d)

    def step(q, k, v, table, seq_lens):
        scores = paged_fc_scores(q, k, table, seq_lens, fc_index, packed=False, reduce="max", max_len=16,
                                 backend="torch")
        slots = paged_select(scores, budget, 1, 2, seq_lens, table, bs, backend="torch")
        return paged_sparse_decode_attention(q, k, v, slots, 0.25, backend="torch")

    previous = set_debug(False)
    try:
        eager = step(q, k, v, table, seq_lens)
        torch._dynamo.reset()
        traced = torch.compile(step, fullgraph=True, backend="eager")(q, k, v, table, seq_lens)
    finally:
        set_debug(previous)
    assert_close(traced, eager, name="traced step")
