"""tokprune's vLLM CPU backend without an engine: vLLM's own metadata builder, impl and cache-write op on a
shuffled paged cache, a ragged batch (prefill, chunked prefill, short and long decodes), compared with vLLM's
stock impl (dense rows, bit for bit) and with tokprune's contiguous ops (sparse rows)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends import cpu_attn
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder

from tokprune.integrations.vllm import backend as tb
from tokprune.integrations.vllm.config import VllmSettings, load_fc_index
from tokprune.ops import fc_scores, select_sparse_indices, sparse_decode_attention

HQ, HKV, D, BS, NUM_BLOCKS = 9, 3, 64, 32, 48
# On a CPU with AMX tiles vLLM stores bf16 K/V in its AMX layout, which tokprune does not read (start-up
# refuses: backend.check_cpu_layout); fp32 keeps vLLM's vector-ISA layout there.
DTYPE = torch.float32 if torch.cpu._is_amx_tile_supported() else torch.bfloat16
SCALE = D ** -0.5
LAYER = 3
# SmolLM2-135M's attention geometry (the shipped FASA calibration is for it); no weights needed.
LLAMA = LlamaConfig(num_hidden_layers=30, num_attention_heads=HQ, num_key_value_heads=HKV, hidden_size=HQ * D,
                    head_dim=D, intermediate_size=64, vocab_size=64)
# (query tokens this step, context after this step): prefill, short decode, long decodes, chunked prefill
ROWS = [(7, 7), (1, 20), (1, 150), (1, 97), (5, 200)]


def _config(settings: dict):
    extra = {"tokprune": settings} if settings else {}
    return SimpleNamespace(additional_config=extra, model_config=SimpleNamespace(dtype=DTYPE, hf_config=LLAMA))


def _builder(cls, settings):
    """vLLM's CPU metadata builder (or tokprune's) without a running engine: the attributes ``build`` reads."""
    b = object.__new__(cls)
    b.is_cross_attention = b.is_encoder_only_attention = False
    b.block_size, b.num_heads, b.num_kv_heads, b.head_dim, b.dtype = BS, HQ, HKV, D, DTYPE
    b.window_size, b.kv_cache_dtype = -1, "auto"
    b.isa = cpu_attn._get_attn_isa(DTYPE, BS, D, "auto")
    if cls is tb.TokpruneCPUMetadataBuilder:
        b.settings = tb.parse_settings(_config(settings).additional_config)
        b.active = True
        tb.check_cpu_layout(b.isa, DTYPE, D, BS)
    return b


class Case:
    """A random paged batch: logical K/V per request, a shuffled block table, this step's tokens."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(NUM_BLOCKS, generator=gen)
        self.tables, used = [], 0
        for _, ctx in ROWS:
            n = -(-ctx // BS)
            self.tables.append(perm[used:used + n])
            used += n
        width = max(len(t) for t in self.tables)
        self.block_table = torch.zeros(len(ROWS), width, dtype=torch.int32)
        for r, t in enumerate(self.tables):
            self.block_table[r, :len(t)] = t.int()
        self.k = [torch.randn(ctx, HKV, D, generator=gen).to(DTYPE) for _, ctx in ROWS]
        self.v = [torch.randn(ctx, HKV, D, generator=gen).to(DTYPE) for _, ctx in ROWS]
        q_lens = [q for q, _ in ROWS]
        self.query = torch.randn(sum(q_lens), HQ, D, generator=gen).to(DTYPE)
        self.loc = torch.tensor([0] + q_lens).cumsum(0).int()

    def slots(self, r, positions):
        pos = torch.tensor(list(positions), dtype=torch.long)
        return self.tables[r][pos // BS].long() * BS + pos % BS

    def history(self):
        """The prefill step that wrote every request's tokens before this step (requests with a history)."""
        rows = [r for r, (q, ctx) in enumerate(ROWS) if ctx > q]
        ks, vs, ss, lens = [], [], [], []
        for r in rows:
            q, ctx = ROWS[r]
            ks.append(self.k[r][: ctx - q]); vs.append(self.v[r][: ctx - q])
            ss.append(self.slots(r, range(ctx - q)))
            lens.append(ctx - q)
        gen = torch.Generator().manual_seed(99)
        query = torch.randn(sum(lens), HQ, D, generator=gen).to(DTYPE)
        loc = torch.tensor([0] + lens).cumsum(0).int()
        slots = torch.cat(ss)
        common = CommonAttentionMetadata(
            query_start_loc=loc, query_start_loc_cpu=loc, seq_lens=torch.tensor(lens).int(), num_reqs=len(rows),
            num_actual_tokens=int(loc[-1]), max_query_len=max(lens), max_seq_len=max(lens),
            block_table_tensor=self.block_table[rows], slot_mapping=slots)
        return query, torch.cat(ks), torch.cat(vs), slots, common

    def step(self):
        ks, vs, ss = [], [], []
        for r, (q, ctx) in enumerate(ROWS):
            ks.append(self.k[r][ctx - q:]); vs.append(self.v[r][ctx - q:])
            ss.append(self.slots(r, range(ctx - q, ctx)))
        return torch.cat(ks), torch.cat(vs), torch.cat(ss)

    def common(self, slot_mapping):
        return CommonAttentionMetadata(
            query_start_loc=self.loc, query_start_loc_cpu=self.loc, seq_lens=torch.tensor([c for _, c in ROWS]).int(),
            num_reqs=len(ROWS), num_actual_tokens=int(self.loc[-1]), max_query_len=max(q for q, _ in ROWS),
            max_seq_len=max(c for _, c in ROWS), block_table_tensor=self.block_table, slot_mapping=slot_mapping)


def _run(impl, builder, case):
    """Run the prefill of the history, then this step: K/V written by the impl's cache update, then forward."""
    layer = SimpleNamespace(isa=builder.isa, _k_scale_float=1.0, _v_scale_float=1.0,
                            layer_name=f"model.layers.{LAYER}.self_attn.attn")
    kv_cache = torch.zeros(NUM_BLOCKS, HKV, BS, 2 * D, dtype=DTYPE)
    query, k, v, s, common = case.history()  # a prefill step (all rows dense) ...
    impl.do_kv_cache_update(layer, k, v, kv_cache, s)
    impl.forward(layer, query, k, v, kv_cache, builder.build(0, common), torch.empty_like(query))
    k, v, s = case.step()  # ... then the step under test
    impl.do_kv_cache_update(layer, k, v, kv_cache, s)
    meta = builder.build(0, case.common(s))
    out = torch.full_like(case.query, float("nan"))
    impl.forward(layer, case.query, k, v, kv_cache, meta, out)
    return out, kv_cache, meta


def _pair(monkeypatch, settings):
    config = _config(settings)
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: config)
    monkeypatch.setattr(tb, "get_current_vllm_config_or_none", lambda: config)
    args = (HQ, D, SCALE, HKV, None, None, "auto")
    stock = CPUAttentionBackendImpl(*args), _builder(CPUAttentionMetadataBuilder, None)
    ours = tb.TokpruneCPUAttentionImpl(*args), _builder(tb.TokpruneCPUMetadataBuilder, settings)
    assert ours[0].active
    return stock, ours


def _oracle(method, settings: VllmSettings, q, k, v):
    """tokprune's contiguous ops on one request: ``q (Hq, D)``, ``k/v (L, Hkv, D)`` -> ``(Hq, D)``."""
    q4 = q[None, :, None, :]
    k4, v4 = k.permute(1, 0, 2)[None].contiguous(), v.permute(1, 0, 2)[None].contiguous()
    length = k.shape[0]
    if method == "fasa":
        fc = load_fc_index(settings, 30, HKV, D)[LAYER]
        scored = k4 if settings.score_dtype in (None, "float32") else k4.to(getattr(torch, settings.score_dtype))
        scores = fc_scores(q4, scored.float(), fc, backend="torch")  # from the side cache's rounded FC keys
        votes = torch.softmax(scores.view(1, HKV, HQ // HKV, -1) * SCALE, -1).sum(2)
        index = select_sparse_indices(votes, settings.budget, sink=settings.sink, window=settings.window)
    elif method == "streaming":
        keep = list(range(settings.sink)) + list(range(length - (settings.budget - settings.sink), length))
        index = torch.tensor(keep)[None, None].expand(1, HKV, -1)
    else:  # quest: per query head, page bounds from the keys' min/max, newest page always kept
        ps = settings.page_size
        pages = -(-length // ps)
        kf = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pages * ps - length), value=float("nan"))
        kf = kf.view(pages, ps, HKV, D)
        kmin = torch.where(kf.isnan(), torch.inf, kf).amin(1).repeat_interleave(HQ // HKV, 1)  # (P, Hq, D)
        kmax = torch.where(kf.isnan(), -torch.inf, kf).amax(1).repeat_interleave(HQ // HKV, 1)
        bound = torch.maximum(q.float() * kmin, q.float() * kmax).sum(-1).T[None]  # (1, Hq, P)
        chosen = select_sparse_indices(bound, settings.budget // ps, sink=0, window=1)
        tokens = chosen[..., None] * ps + torch.arange(ps)
        index = torch.where(tokens < length, tokens, torch.full_like(tokens, -1)).flatten(2)
    return sparse_decode_attention(q4, k4, v4, index, SCALE, backend="torch")[0, :, 0]


@pytest.mark.parametrize("settings", [
    dict(method="fasa", budget=48, sink=4, window=8, fcs="smollm2_135m", min_context=0, score_dtype="float32"),
    dict(method="fasa", budget=48, sink=4, window=8, fcs="smollm2_135m", min_context=0, score_dtype="bfloat16"),
    dict(method="streaming", budget=40, sink=4),
    dict(method="quest", budget=48, page_size=16),
    dict(method="fasa", budget=48, sink=4, window=8, fcs="smollm2_135m", min_context=0, fused=False),
], ids=lambda s: s["method"] + ("-torch" if s.get("fused") is False else "") + (
    "-" + s["score_dtype"] if "score_dtype" in s else ""))
def test_sparse_rows_match_contiguous_oracle_dense_rows_match_stock(monkeypatch, settings):
    """FASA runs the fused kernel of tokprune._C when it is built; ``fused=False`` forces the torch fallback."""
    settings = dict(settings)
    if settings.pop("fused", True) is False:
        monkeypatch.setattr(tb, "fused_fasa_available", lambda device: False)
    elif settings["method"] == "fasa":
        assert tb.fused_fasa_available(torch.device("cpu")), "tokprune._C is not built (make test-vllm builds it)"
    case = Case()
    (stock_impl, stock_builder), (impl, builder) = _pair(monkeypatch, settings)
    ref, ref_cache, _ = _run(stock_impl, stock_builder, case)
    out, kv_cache, meta = _run(impl, builder, case)
    # vLLM's own write op wrote the K/V cache, once: identical caches
    assert torch.equal(kv_cache, ref_cache)
    sparse_rows = [r for r, (q, ctx) in enumerate(ROWS) if q == 1 and ctx > settings["budget"]]
    assert meta.sparse is not None and meta.sparse.rows.tolist() == sparse_rows == [2, 3]
    assert meta.seq_lens[sparse_rows].tolist() == [1, 1]  # the dense kernel reads one token there
    parsed = tb.parse_settings({"tokprune": settings})
    for r, (q_len, ctx) in enumerate(ROWS):
        rows = slice(int(case.loc[r]), int(case.loc[r + 1]))
        if r in sparse_rows:
            want = _oracle(settings["method"], parsed, case.query[rows][0], case.k[r], case.v[r])
            torch.testing.assert_close(out[rows][0].float(), want.float(), atol=1e-2, rtol=1e-2)
            assert not torch.allclose(out[rows].float(), ref[rows].float(), atol=1e-2), \
                "a sparse row equals full attention: the sparse path did not run"
        else:  # prefill, chunked prefill (context 200 > budget) and short decodes: vLLM's result, bit for bit
            assert torch.equal(out[rows], ref[rows]), f"dense row {r} differs from stock vLLM"


@pytest.mark.parametrize("settings", [dict(method="fasa", budget=200, fcs="smollm2_135m"),
                                      dict(method="fasa", budget=48, min_context=200, fcs="smollm2_135m"),
                                      dict(method="fasa", budget=48, fcs="smollm2_135m")],
                         ids=["budget", "min_context", "default_decline_rule"])
def test_budget_at_least_context_is_exactly_stock(monkeypatch, settings):
    """A context within the budget, or within min_context (the decline rule), takes vLLM's own path."""
    case = Case(seed=1)
    (stock_impl, stock_builder), (impl, builder) = _pair(monkeypatch, settings)
    ref, ref_cache, _ = _run(stock_impl, stock_builder, case)
    out, kv_cache, meta = _run(impl, builder, case)
    assert meta.sparse is None
    assert torch.equal(out, ref) and torch.equal(kv_cache, ref_cache)


def test_fasa_side_cache_holds_the_fc_dims_of_every_written_key(monkeypatch):
    case = Case(seed=2)
    settings = dict(method="fasa", budget=48, fcs="smollm2_135m", min_context=0)
    _, (impl, builder) = _pair(monkeypatch, settings)
    _run(impl, builder, case)
    from tokprune.reference.fasa import fc_dims

    dims = fc_dims(impl._fc_index, D, 1)  # (Hkv, nd)
    for r, (_, ctx) in enumerate(ROWS):
        slots = case.slots(r, range(ctx))
        got = impl._side[slots // BS, :, slots % BS]  # (ctx, Hkv, nd)
        want = torch.gather(case.k[r], 2, dims[None].expand(ctx, -1, -1))
        assert got.dtype == torch.bfloat16  # the default with the fused kernel: half the bytes per vote
        assert torch.equal(got, want.to(got.dtype))
