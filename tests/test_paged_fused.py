"""tokprune.ops.paged.paged_fasa_decode: the fused FASA decode step (vote, selection, attention) on a paged
cache. Every backend against a plain per-request oracle written here (gather the request's tokens in logical
order, FASA's group vote, sink + window + top-budget, dense softmax attention over the choice)."""

import pytest
import torch

from tests.helpers import assert_close
from tests.test_paged import random_table, vllm_style_cache
from tokprune import _ext
from tokprune.ops.paged import paged_fasa_decode, vllm_cpu_kv_views

HAS_HOST = _ext.load_error() is None and _ext.has_op("paged_fasa_decode")
BACKENDS = ["torch", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_HOST, reason=f"tokprune._C without paged_fasa_decode: {_ext.load_error()}"))]


def logical(cache, table_row, length, block_size):
    """``(Hkv, length, last)`` rows of one request in logical order."""
    t = torch.arange(length)
    return cache[table_row.long()[t // block_size], :, t % block_size].transpose(0, 1)


def oracle(q, k, v, fc, dims, table, lens, budget, sink, window, scale, vote_scale):
    """Per request and KV head: ``(out (R, Hq, D) fp32, votes [list of (Hkv, L)], chosen [list of sets])``."""
    rows, heads, head_dim = q.shape
    kv_heads, bs = k.shape[1], k.shape[2]
    g = heads // kv_heads
    out = torch.zeros(rows, heads, head_dim)
    votes, chosen = [], []
    for r in range(rows):
        L = int(lens[r])
        K, V, F = (logical(x, table[r], L, bs).float() for x in (k, v, fc))
        vr, cr = torch.zeros(kv_heads, L), []
        for h in range(kv_heads):
            qh = q[r, h * g:(h + 1) * g].float()  # (g, D)
            if L <= budget:
                pick = list(range(L))
            else:
                logits = qh[:, dims[h].long()] @ F[h].T * vote_scale  # (g, L)
                vote = torch.softmax(logits, dim=-1).sum(0)
                vr[h] = vote
                s = min(sink, budget)
                w = min(window, budget - s)
                forced = set(range(s)) | set(range(L - w, L))
                rest = sorted((t for t in range(L) if t not in forced), key=lambda t: (-float(vote[t]), t))
                pick = sorted(forced | set(rest[:budget - len(forced)]))
            cr.append(set(pick))
            if pick:
                idx = torch.tensor(pick)
                p = torch.softmax(qh @ K[h, idx].T * scale, dim=-1)
                out[r, h * g:(h + 1) * g] = p @ V[h, idx]
        votes.append(vr)
        chosen.append(cr)
    return out, votes, chosen


def check_choice(selected, votes, chosen, lens, budget, sink, window, tol):
    """``selected (R, Hkv, budget)`` is a top-``budget`` choice of the oracle's votes up to ``tol`` (near-ties may
    differ), and equals the oracle's choice exactly where the votes around the boundary are apart."""
    for r, L in enumerate(lens.tolist()):
        for h, want in enumerate(chosen[r]):
            got = [t for t in selected[r, h].tolist() if t >= 0]
            assert got == sorted(got) and len(got) == min(L, budget), (r, h, got)
            if L <= budget:
                assert set(got) == want
                continue
            s = min(sink, budget)
            w = min(window, budget - s)
            forced = set(range(s)) | set(range(L - w, L))
            assert forced <= set(got)
            vote = votes[r][h]
            free_in = [float(vote[t]) for t in got if t not in forced]
            free_out = [float(vote[t]) for t in range(L) if t not in set(got)]
            if free_in and free_out:
                assert min(free_in) >= max(free_out) - tol, (r, h, min(free_in), max(free_out))
                ordered = sorted((float(vote[t]) for t in range(L) if t not in forced), reverse=True)
                k = len(free_in)
                if ordered[k - 1] - ordered[k] > 2 * tol:
                    assert set(got) == want, (r, h)


def make_case(lens, bs, heads, kv_heads, head_dim, nd, dtype, fc_dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    table, num_blocks = random_table(lens, bs, gen=gen, garbage=0)
    if layout == "vllm":
        _, k, v = vllm_style_cache(num_blocks, kv_heads, bs, head_dim, dtype)
    else:  # contiguous (num_blocks, Hkv, bs, D)
        k = torch.randn(num_blocks, kv_heads, bs, head_dim).to(dtype)
        v = torch.randn(num_blocks, kv_heads, bs, head_dim).to(dtype)
    dims = torch.stack([torch.randperm(head_dim)[:nd] for _ in range(kv_heads)])
    fc = torch.gather(k, 3, dims[None, :, None, :].expand(num_blocks, -1, bs, -1)).to(fc_dtype)
    if layout == "vllm":  # the backend's side cache: [nd, block_size] per block and head (token axis unit stride)
        fc = fc.permute(1, 0, 3, 2).contiguous().permute(1, 0, 3, 2)
    q = (torch.randn(len(lens), heads, head_dim) * 2).to(dtype)
    return q, k, v, fc, dims, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,fc_dtype,layout", [
    (torch.float32, torch.float32, "vllm"),
    (torch.bfloat16, torch.float32, "vllm"),
    (torch.bfloat16, torch.bfloat16, "contiguous"),
    (torch.float16, torch.float16, "vllm"),
    (torch.float32, torch.float32, "contiguous"),
])
def test_fused_fasa_matches_oracle(backend, dtype, fc_dtype, layout):
    # ragged lengths: one within the budget (dense), partial last blocks, one exactly at a block boundary
    lens, bs, budget, sink, window = [37, 300, 257, 128, 411], 16, 48, 4, 8
    q, k, v, fc, dims, table, seq = make_case(lens, bs, 6, 2, 32, 8, dtype, fc_dtype, layout, seed=0)
    scale, vote_scale = 0.2, 32 ** -0.5
    out, sel = paged_fasa_decode(q, k, v, fc, dims, table, seq, budget, sink, window, scale, return_selected=True,
                                 backend=backend)
    assert out.dtype == dtype and sel.shape == (5, 2, budget) and sel.dtype == torch.int64
    want, votes, chosen = oracle(q, k, v, fc, dims, table, seq, budget, sink, window, scale, vote_scale)
    check_choice(sel, votes, chosen, seq, budget, sink, window, tol=1e-5)
    # the attention over the op's own choice, to the dtype's tolerance (fp32 oracle)
    assert_close(out, attend_over(q, k, v, table, sel, scale), name=f"out[{backend}]",
                 **({"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {}))
    if same_choice(sel, chosen):
        assert_close(out, want, name=f"out[{backend}] vs oracle",
                     **({"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {}))


def attend_over(q, k, v, table, selected, scale):
    """fp32 softmax attention of each request's group of query heads over the listed logical tokens."""
    rows, heads, head_dim = q.shape
    kv_heads, bs = k.shape[1], k.shape[2]
    g = heads // kv_heads
    out = torch.zeros(rows, heads, head_dim)
    for r in range(rows):
        for h in range(kv_heads):
            idx = selected[r, h][selected[r, h] >= 0].long()
            if idx.numel() == 0:
                continue
            blk, off = table[r].long()[idx // bs], idx % bs
            kk, vv = k[blk, h, off].float(), v[blk, h, off].float()
            qh = q[r, h * g:(h + 1) * g].float()
            out[r, h * g:(h + 1) * g] = torch.softmax(qh @ kk.T * scale, dim=-1) @ vv
    return out


def same_choice(sel, chosen):
    return all({t for t in sel[r, h].tolist() if t >= 0} == c for r, cs in enumerate(chosen) for h, c in enumerate(cs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_hf_cache_is_the_one_block_case(backend):
    """tokprune's own ``(batch, Hkv, capacity, D)`` cache with a ``(batch, Hkv, capacity, nd)`` side buffer in the
    cache dtype: ``block_size = capacity``, ``block_table = [[0], [1], ...]``, ragged lengths."""
    B, Hkv, cap, D, nd, heads = 3, 2, 160, 32, 8, 4
    torch.manual_seed(1)
    k, v = torch.randn(B, Hkv, cap, D).bfloat16(), torch.randn(B, Hkv, cap, D).bfloat16()
    dims = torch.stack([torch.randperm(D)[:nd] for _ in range(Hkv)])
    fc = torch.gather(k, 3, dims[None, :, None, :].expand(B, -1, cap, -1))  # (B, Hkv, cap, nd) bf16
    q = torch.randn(B, heads, D).bfloat16() * 2
    table = torch.arange(B, dtype=torch.int32)[:, None]
    lens = torch.tensor([160, 23, 97], dtype=torch.int32)
    out, sel = paged_fasa_decode(q, k, v, fc, dims, table, lens, 40, 2, 6, 0.3, return_selected=True,
                                 backend=backend)
    want, votes, chosen = oracle(q, k, v, fc, dims, table, lens, 40, 2, 6, 0.3, D ** -0.5)
    check_choice(sel, votes, chosen, lens, 40, 2, 6, tol=1e-5)
    assert_close(out, attend_over(q, k, v, table, sel, 0.3), name=f"out[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_covering_every_context_is_dense_attention(backend):
    from tokprune.ops.paged import paged_decode_attention

    lens = [33, 70, 5]
    q, k, v, fc, dims, table, seq = make_case(lens, 16, 4, 2, 32, 8, torch.float32, torch.float32, "vllm", seed=2)
    out, sel = paged_fasa_decode(q, k, v, fc, dims, table, seq, 70, 4, 8, 0.25, return_selected=True,
                                 backend=backend)
    dense = paged_decode_attention(q, k, v, table, seq, 0.25, backend="torch")
    assert_close(out, dense, atol=2e-5, rtol=1e-4, name="budget >= length vs dense")
    for r, n in enumerate(lens):
        assert sel[r, :, :n].tolist() == [list(range(n))] * 2 and bool((sel[r, :, n:] == -1).all())


@pytest.mark.skipif(not HAS_HOST, reason="tokprune._C without paged_fasa_decode")
def test_threads_do_not_change_the_result_and_out_rows_are_written_in_place():
    lens = [700, 1024, 513, 40, 900]
    q, k, v, fc, dims, table, seq = make_case(lens, 32, 9, 3, 64, 16, torch.bfloat16, torch.float32, "vllm", seed=3)
    one = paged_fasa_decode(q, k, v, fc, dims, table, seq, 128, 4, 16, 0.125, num_threads=1, backend="cuda")
    for threads in (2, 3):
        many = paged_fasa_decode(q, k, v, fc, dims, table, seq, 128, 4, 16, 0.125, num_threads=threads,
                                 backend="cuda")
        assert torch.equal(one, many), threads
    # out=: rows of a bigger (T, Hq, D) buffer (vLLM's output), and a fp32 output of bf16 inputs
    big = torch.full((9, 9, 64), 7.0, dtype=torch.bfloat16)
    res = paged_fasa_decode(q, k, v, fc, dims, table, seq, 128, 4, 16, 0.125, out=big[2:7], backend="cuda")
    assert res.data_ptr() == big[2:7].data_ptr() and torch.equal(big[2:7], one)
    assert bool((big[:2] == 7).all()) and bool((big[7:] == 7).all())
    out32 = torch.empty(5, 9, 64)
    paged_fasa_decode(q, k, v, fc, dims, table, seq, 128, 4, 16, 0.125, out=out32, backend="cuda")
    assert torch.equal(out32.bfloat16(), one)  # the same fp32 result, rounded once


def test_auto_backend_and_custom_op():
    lens = [50, 20]
    q, k, v, fc, dims, table, seq = make_case(lens, 16, 4, 2, 32, 8, torch.float32, torch.float32, "vllm", seed=4)
    auto = paged_fasa_decode(q, k, v, fc, dims, table, seq, 24, 2, 4, 0.2)
    want = paged_fasa_decode(q, k, v, fc, dims, table, seq, 24, 2, 4, 0.2, backend="cuda" if HAS_HOST else "torch")
    assert torch.equal(auto, want)
    if HAS_HOST:  # the torch.library op (fake impl for torch.compile) agrees with the eager call
        res, sel = torch.ops.tokprune_ext.paged_fasa_decode(q, k, v, fc, dims, table, seq, 24, 2, 4, 0.2,
                                                            32 ** -0.5, 1)
        assert torch.equal(res, want) and sel.shape == (2, 2, 24)
        torch.library.opcheck(torch.ops.tokprune_ext.paged_fasa_decode.default,
                              (q, k, v, fc, dims, table, seq, 24, 2, 4, 0.2, 32 ** -0.5, 1),
                              test_utils=("test_schema", "test_faketensor"))


def test_rejects_bad_input():
    q, k, v, fc, dims, table, seq = make_case([40], 16, 4, 2, 32, 8, torch.float32, torch.float32, "vllm", seed=5)
    args = dict(q=q, k_cache=k, v_cache=v, fc_cache=fc, fc_dims=dims, block_table=table, seq_lens=seq, budget=8,
                sink=1, window=2, scale=0.1)
    for name, bad, match in (("fc_cache", fc[..., :4], "fc_dims"), ("fc_dims", dims[:1], "fc_dims"),
                             ("fc_cache", fc[:, :1], "fc_cache"), ("budget", -1, "budget"),
                             ("v_cache", v.double(), "v_cache"), ("seq_lens", seq[None], "seq_lens"),
                             ("scale", "x", "scale")):
        with pytest.raises((ValueError, TypeError), match=match):
            paged_fasa_decode(**{**args, name: bad})
    with pytest.raises(ValueError, match="out"):
        paged_fasa_decode(**args, out=torch.empty(2, 4, 32))
    with pytest.raises(ValueError, match="num_threads"):
        paged_fasa_decode(**args, num_threads=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_votes_take_the_lowest_tokens_and_forced_only_budgets(backend):
    """Ties: with a zero query every vote is equal, so the free places go to the lowest middle tokens; a budget
    filled by sink + window chooses exactly those (no radix pass)."""
    lens = [300, 129]
    q, k, v, fc, dims, table, seq = make_case(lens, 16, 6, 2, 32, 8, torch.float32, torch.float32, "contiguous",
                                              seed=6)
    q = torch.zeros_like(q)
    _, sel = paged_fasa_decode(q, k, v, fc, dims, table, seq, 40, 3, 7, 0.2, return_selected=True, backend=backend)
    for r, L in enumerate(lens):
        want = list(range(3)) + list(range(3, 3 + 30)) + list(range(L - 7, L))
        assert sel[r].tolist() == [want, want], r
    _, sel = paged_fasa_decode(q, k, v, fc, dims, table, seq, 10, 4, 6, 0.2, return_selected=True, backend=backend)
    for r, L in enumerate(lens):
        assert sel[r].tolist() == [list(range(4)) + list(range(L - 6, L))] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_bound_to_the_caches_equals_the_op(backend):
    """paged_fasa_decoder: the same results as paged_fasa_decode call after call (rows, tables and lengths change
    between calls), out= written in place, int64 tables converted; wrong shapes or dtypes are refused."""
    from tokprune.ops.paged import paged_fasa_decoder

    lens = [300, 129, 77, 410]
    q, k, v, fc, dims, table, seq = make_case(lens, 16, 6, 2, 32, 8, torch.bfloat16, torch.float32, "vllm", seed=7)
    decoder = paged_fasa_decoder(k, v, fc, dims, 48, 4, 8, 0.2, heads=6, backend=backend)
    for rows in ([0, 1, 2, 3], [3, 1], [2]):
        pick = torch.tensor(rows)
        for step in range(2):
            lens_now = (seq[pick] - step).int()
            want = paged_fasa_decode(q[pick], k, v, fc, dims, table[pick], lens_now, 48, 4, 8, 0.2, backend=backend)
            assert torch.equal(decoder(q[pick], table[pick], lens_now), want), (rows, step)
    out = torch.empty(4, 6, 32, dtype=torch.bfloat16)
    res = decoder(q, table.long(), seq.long(), out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, paged_fasa_decode(q, k, v, fc, dims, table, seq, 48, 4, 8, 0.2, backend=backend))
    with pytest.raises(ValueError, match="q must be"):
        decoder(q.float(), table, seq)
    with pytest.raises(ValueError, match="q must be"):
        decoder(q[:, :4], table, seq)
    with pytest.raises(ValueError, match="seq_lens"):
        decoder(q, table, seq[:2])
    with pytest.raises(ValueError, match="out must be"):
        decoder(q, table, seq, out=torch.empty(4, 6, 32))
    with pytest.raises(ValueError, match="heads"):
        paged_fasa_decoder(k, v, fc, dims, 48, 4, 8, 0.2, heads=0)
    with pytest.raises(ValueError, match="multiple"):
        paged_fasa_decoder(k, v, fc, dims, 48, 4, 8, 0.2, heads=3)
    with pytest.raises(ValueError, match="fc_dims"):
        paged_fasa_decoder(k, v, fc, dims[:1], 48, 4, 8, 0.2, heads=6)


@pytest.mark.skipif(not HAS_HOST, reason="tokprune._C without paged_fasa_decode")
def test_decoder_called_from_two_threads_at_once_gives_each_its_own_result():
    """The kernel runs without the GIL: every calling thread has its own argument struct, so two threads
    decoding different rows through one decoder at the same time each get what a lone call gives."""
    import threading

    from tokprune.ops.paged import paged_fasa_decoder

    lens = [700, 513, 900, 640]
    q, k, v, fc, dims, table, seq = make_case(lens, 32, 6, 2, 32, 8, torch.float32, torch.float32, "vllm", seed=8)
    decoder = paged_fasa_decoder(k, v, fc, dims, 64, 4, 8, 0.2, heads=6, num_threads=1, backend="cuda")
    rows = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    want = [decoder(q[r], table[r], seq[r]) for r in rows]
    got = [[], []]

    def worker(i):
        for _ in range(60):
            got[i].append(decoder(q[rows[i]], table[rows[i]], seq[rows[i]]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(torch.equal(g, want[i]) for g in got[i]), i


def hf_style_case(lens, capacity, heads, kv_heads, head_dim, nd, fc_dtype, seed):
    """tokprune's contiguous cache as a paged one: one block per row (``block_size = capacity``), the FC side
    cache dims-major ``(rows, Hkv, nd, capacity)`` handed over as its token-unit-stride transpose."""
    torch.manual_seed(seed)
    rows = len(lens)
    k, v = torch.randn(rows, kv_heads, capacity, head_dim), torch.randn(rows, kv_heads, capacity, head_dim)
    dims = torch.stack([torch.randperm(head_dim)[:nd] for _ in range(kv_heads)])
    storage = torch.gather(k, 3, dims[None, :, None, :].expand(rows, -1, capacity, -1)).to(fc_dtype)
    storage = storage.transpose(2, 3).contiguous()  # (rows, Hkv, nd, capacity)
    q = torch.randn(rows, heads, head_dim) * 2
    table = torch.arange(rows, dtype=torch.int32).view(rows, 1)
    return q, k, v, storage, dims, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clustered", [False, True])
def test_one_dims_major_block_over_many_vote_chunks(backend, clustered):
    """tokprune's KV cache layout (the fused kernel takes each 512-token chunk's softmax right behind its FC
    logits): long ragged rows over several chunks choose what the oracle chooses. ``clustered``: the largest
    votes sit in one run of neighbouring tokens (the selection's group-maximum bound is loosest there)."""
    lens, cap, budget, sink, window = [1500, 2100, 700], 2176, 64, 4, 16
    q, k, v, storage, dims, table, seq = hf_style_case(lens, cap, 6, 2, 32, 8, torch.float32, seed=11)
    if clustered:  # tokens 1000..1099 of every row and head: FC keys along the group's queries
        for h in range(2):
            direction = q[:, 3 * h:3 * h + 3][:, :, dims[h]].sum(1)  # (rows, nd)
            storage[:, h, :, 1000:1100] = 20 * direction[:, :, None] / direction.norm(dim=1)[:, None, None]
            k[:, h, 1000:1100, dims[h]] = storage[:, h, :, 1000:1100].transpose(1, 2)
    fc = storage.transpose(2, 3)
    out, sel = paged_fasa_decode(q, k, v, fc, dims, table, seq, budget, sink, window, 0.2, return_selected=True,
                                 backend=backend)
    want, votes, chosen = oracle(q, k, v, fc, dims, table, seq, budget, sink, window, 0.2, 32 ** -0.5)
    check_choice(sel, votes, chosen, seq, budget, sink, window, tol=1e-5)
    if clustered:
        for r, L in enumerate(lens):
            if L > 1100:  # every free place goes to the cluster
                assert all(1000 <= t < 1100 or t < sink or t >= L - window for t in sel[r, 0].tolist()), r
    assert_close(out, attend_over(q, k, v, table, sel, 0.2), atol=2e-5, rtol=1e-4, name=f"out[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fc_dtype", [torch.float32, torch.bfloat16])
def test_decoder_packs_the_fc_keys_of_new_tokens(backend, fc_dtype):
    """``pack_from``: the call first writes ``fc[t] = k[t, fc_dims]`` (rounded to the FC dtype) for every row's
    tokens ``pack_from <= t < seq_len``, then scores: the same output as a call on a correctly packed side cache,
    the side cache then equal to it there and untouched past each row's length; a bad value is refused."""
    from tokprune.ops.paged import paged_fasa_decoder

    lens, cap = [900, 1200, 650], 1280
    q, k, v, storage, dims, table, seq = hf_style_case(lens, cap, 6, 2, 32, 8, fc_dtype, seed=12)
    reference = storage.clone()
    want = paged_fasa_decoder(k, v, reference.transpose(2, 3), dims, 48, 4, 8, 0.2, heads=6,
                              backend=backend)(q, table, seq)
    storage[..., 600:] = 1e4  # stale: the keys of tokens 600.. were appended but not packed
    decoder = paged_fasa_decoder(k, v, storage.transpose(2, 3), dims, 48, 4, 8, 0.2, heads=6, backend=backend)
    assert torch.equal(decoder(q, table, seq, pack_from=600), want)
    for r, L in enumerate(lens):
        assert torch.equal(storage[r, :, :, :L], reference[r, :, :, :L]), r
        assert bool((storage[r, :, :, L:] == 1e4).all()), r
    with pytest.raises(ValueError, match="pack_from"):
        decoder(q, table, seq, pack_from=-1)
    with pytest.raises(ValueError, match="pack_from"):
        decoder(q, table, seq, pack_from=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_fc_keys_vote_as_their_dequantised_values(backend):
    """int8 FC keys with per-token scales (quantize_fc_keys): the op chooses what the oracle chooses from the
    dequantised keys, on the contiguous one-block layout (chunked vote) and on vLLM's paged one; ``pack_from``
    quantises new tokens to the same bytes and scales as quantize_fc_keys; missing or stray scales are refused."""
    from tokprune.ops.paged import dequantize_fc_keys, paged_fasa_decoder, quantize_fc_keys

    lens, cap = [1300, 700, 1030], 1344
    q, k, v, storage, dims, table, seq = hf_style_case(lens, cap, 6, 2, 32, 8, torch.float32, seed=13)
    fc_q, fc_s = quantize_fc_keys(storage.transpose(2, 3))  # (rows, Hkv, cap, nd) int8, (rows, Hkv, cap)
    store = fc_q.transpose(2, 3).contiguous()  # dims-major int8 storage
    fc = store.transpose(2, 3)
    err = (dequantize_fc_keys(fc, fc_s) - storage.transpose(2, 3)).abs()
    assert bool((err <= fc_s[..., None] / 2 + 1e-6).all())
    out, sel = paged_fasa_decode(q, k, v, fc, dims, table, seq, 64, 4, 16, 0.2, return_selected=True,
                                 backend=backend, fc_scale=fc_s)
    deq = dequantize_fc_keys(fc, fc_s)
    _, votes, chosen = oracle(q, k, v, deq, dims, table, seq, 64, 4, 16, 0.2, 32 ** -0.5)
    check_choice(sel, votes, chosen, seq, 64, 4, 16, tol=1e-5)
    assert_close(out, attend_over(q, k, v, table, sel, 0.2), atol=2e-5, rtol=1e-4, name=f"out[{backend}]")
    # pack_from: stale slots rewritten with the same bytes and scales
    ref_store, ref_s = store.clone(), fc_s.clone()
    store[..., 500:] = 99
    fc_s[..., 500:] = -1.0
    decoder = paged_fasa_decoder(k, v, store.transpose(2, 3), dims, 64, 4, 16, 0.2, heads=6, backend=backend,
                                 fc_scale=fc_s)
    assert torch.equal(decoder(q, table, seq, pack_from=500), out)
    for r, L in enumerate(lens):
        assert torch.equal(store[r, :, :, :L], ref_store[r, :, :, :L]), r
        assert torch.equal(fc_s[r, :, :L], ref_s[r, :, :L]), r
    # paged vLLM-style layout with int8 keys
    pq, pk, pv, pfc, pdims, ptable, pseq = make_case([300, 129, 411], 16, 6, 2, 32, 8, torch.float32, torch.float32,
                                                     "vllm", seed=14)
    q8, s8 = quantize_fc_keys(pfc)
    out8, sel8 = paged_fasa_decode(pq, pk, pv, q8, pdims, ptable, pseq, 48, 4, 8, 0.2, return_selected=True,
                                   backend=backend, fc_scale=s8)
    _, votes, chosen = oracle(pq, pk, pv, dequantize_fc_keys(q8, s8), pdims, ptable, pseq, 48, 4, 8, 0.2, 32 ** -0.5)
    check_choice(sel8, votes, chosen, pseq, 48, 4, 8, tol=1e-5)
    with pytest.raises(ValueError, match="fc_scale is required"):
        paged_fasa_decode(pq, pk, pv, q8, pdims, ptable, pseq, 48, 4, 8, 0.2, backend=backend)
    with pytest.raises(ValueError, match="only for int8"):
        paged_fasa_decode(pq, pk, pv, pfc, pdims, ptable, pseq, 48, 4, 8, 0.2, backend=backend, fc_scale=s8)
    with pytest.raises(ValueError, match="fc_scale must be"):
        paged_fasa_decode(pq, pk, pv, q8, pdims, ptable, pseq, 48, 4, 8, 0.2, backend=backend, fc_scale=s8[:, :1])
