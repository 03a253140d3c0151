"""The KVPolicy protocol: one score() per method, the shared select/attend path, side buffers, state fields."""

from dataclasses import dataclass

import pytest
import torch

from tests.helpers import assert_close
from tokprune.methods import FASA, Quest, SnapKV, StreamingLLM
from tokprune.methods.base import DecodeContext, KVPolicy, decode_valid_mask
from tokprune.methods.kv_baselines import QuestPages, page_bounds
from tokprune.reference.fasa import sparse_decode_attention_reference


class _Module:
    layer_idx = 0


def _ctx(batch=2, heads=4, kv_heads=2, n_tokens=40, dim=16, valid=None, layer=None):
    q = torch.randn(batch, heads, 1, dim)
    k = torch.randn(batch, kv_heads, n_tokens, dim)
    v = torch.randn(batch, kv_heads, n_tokens, dim)
    return DecodeContext(_Module(), q, k, v, valid, dim ** -0.5, layer)


def test_streaming_llm_selects_sink_and_recent():
    ctx = _ctx()
    policy = StreamingLLM(budget=10, sink=3)
    idx = policy.select(policy.score(ctx), ctx)
    assert idx.shape == (2, 2, 10)
    assert idx[0, 0].tolist() == [0, 1, 2] + list(range(33, 40))
    # with left padding the sinks are the first real tokens and padding is never attended
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :6] = False
    ctx = _ctx(valid=valid)
    idx = policy.select(policy.score(ctx), ctx)
    assert idx[1, 0].tolist() == [6, 7, 8] + list(range(33, 40))


@pytest.mark.parametrize("budget,sink", [(10, 3), (10, 0), (40, 4), (64, 4), (5, 8)])
def test_streaming_llm_static_selection_equals_the_ranked_one(budget, sink):
    """Without padding StreamingLLM builds its indices from two aranges (no top-k): the same set as the shared
    ranked selection (sink + window + newest by score)."""
    ctx = _ctx()
    policy = StreamingLLM(budget=budget, sink=sink)
    fast = policy.select(policy.score(ctx), ctx)
    ranked = KVPolicy.select(policy, policy.score(ctx), ctx)
    assert torch.equal(fast.sort(-1).values, ranked.sort(-1).values)
    assert not policy.select_pads(ctx)


@pytest.mark.parametrize("padded_rows", [False, True])
def test_fasa_group_vote_on_packed_keys_equals_softmax_of_fc_scores(padded_rows):
    """The CPU vote from the dims-major packed FC keys equals fc_scores -> mask -> softmax(scale .) summed over
    the group (the definition), with and without left padding."""
    from tokprune.hf.kv_cache import TokpruneLayer
    from tokprune.ops.fasa import fc_scores

    torch.manual_seed(0)
    layer = TokpruneLayer(capacity=16, layer_idx=0)
    k, v = torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    layer.update(k[:, :, :-1], v[:, :, :-1])
    layer.update(k[:, :, -1:], v[:, :, -1:])
    valid = None
    if padded_rows:
        valid = torch.ones(2, 70, dtype=torch.bool)
        valid[1, :9] = False
    ctx = DecodeContext(_Module(), torch.randn(2, 4, 1, 16), layer.keys, layer.values, valid, 0.25, layer)
    policy = FASA(fcs="uncalibrated", budget=12, num_fcs=3, decline_ratio=0, score_dtype=torch.float32)
    vote = policy.score(ctx)
    assert len(layer.side) == 1  # read from the packed side buffer
    partial = fc_scores(ctx.query, ctx.key, policy.fc_index(0, 2, 16, "cpu"))
    if valid is not None:
        partial = partial.masked_fill(~valid[:, None, :], float("-inf"))
    expected = torch.softmax(partial.view(2, 2, 2, 70) * 16 ** -0.5, dim=-1).sum(2)
    assert_close(vote, expected, atol=1e-6, rtol=1e-5)
    if padded_rows:
        assert bool((vote[1, :, :9] == 0).all())


def test_decline_ratio_table_per_batch():
    """A {batch: ratio} table: a call uses the entry of the largest batch <= its own (the smallest below it)."""

    @dataclass
    class Tabled(KVPolicy):
        DECLINE_RATIO = {1: 10.0, 4: 3.0}

        def score(self, ctx):
            return ctx.zeros()

    policy = Tabled(budget=16)
    assert [policy.decline_ratio_for(b) for b in (1, 2, 3, 4, 9)] == [10.0, 10.0, 10.0, 3.0, 3.0]
    assert policy.declines(100) and not policy.declines(100, batch=4)
    assert policy.declines(100, _ctx(batch=2, n_tokens=100)) and not policy.declines(100, _ctx(batch=4, n_tokens=100))
    assert Tabled(budget=16, decline_ratio=0).decline_ratio_for(1) == 0


def test_fasa_fused_step_equals_torch_path():
    """fused=True (one C++ call: vote, selection, attention on the cache as one block per row) equals the torch
    path on tokprune's cache without padding; with padding, or fused=False, the torch path runs."""
    from tokprune.hf.kv_cache import TokpruneLayer
    from tokprune.methods.fasa import _fused_fasa_available

    if not _fused_fasa_available():
        pytest.skip("tokprune._C has no paged_fasa_decode")
    torch.manual_seed(0)
    layer = TokpruneLayer(capacity=16, layer_idx=0)
    k, v = torch.randn(2, 2, 90, 16), torch.randn(2, 2, 90, 16)
    layer.update(k[:, :, :-1], v[:, :, :-1])
    layer.update(k[:, :, -1:], v[:, :, -1:])
    ctx = DecodeContext(_Module(), torch.randn(2, 4, 1, 16), layer.keys, layer.values, None, 0.25, layer)
    fused = FASA(fcs="uncalibrated", budget=20, sink=2, window=5, num_fcs=3, decline_ratio=0, fused=True)
    plain = FASA(fcs="uncalibrated", budget=20, sink=2, window=5, num_fcs=3, decline_ratio=0, fused=False)
    assert fused._fused_step(ctx) and not plain._fused_step(ctx)
    assert_close(fused.attend_decode(ctx), plain.attend_decode(ctx), atol=1e-5, rtol=1e-5)
    index = plain.select(plain.score(ctx), ctx)
    assert_close(fused.attend_decode(ctx), sparse_decode_attention_reference(ctx.query, ctx.key, ctx.value, index,
                                                                              ctx.scale), atol=1e-5, rtol=1e-5)
    padded = DecodeContext(_Module(), ctx.query, ctx.key, ctx.value, torch.ones(2, 90, dtype=torch.bool), 0.25, layer)
    assert not fused._fused_step(padded)
    auto = FASA(fcs="uncalibrated", budget=20, sink=2, window=5, num_fcs=3, decline_ratio=0)  # fused=None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert auto._fused_step(ctx) == (FASA.FUSED_MIN_THREADS <= 1)
        auto.FUSED_MIN_THREADS = 2  # the threshold, per instance
        assert not auto._fused_step(ctx)
        torch.set_num_threads(2)
        assert auto._fused_step(ctx)
        assert_close(auto.attend_decode(ctx), plain.attend_decode(ctx), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_fasa_decline_rule_follows_the_path_that_runs():
    """The fused step has its own measured break-even (FUSED_DECLINE_RATIO); decline_ratio overrides both."""
    fasa = FASA(fcs="uncalibrated", budget=100)
    fused_ratio = FASA.FUSED_DECLINE_RATIO[1] if isinstance(FASA.FUSED_DECLINE_RATIO, dict) else FASA.FUSED_DECLINE_RATIO
    torch_ratio = FASA.DECLINE_RATIO[1] if isinstance(FASA.DECLINE_RATIO, dict) else FASA.DECLINE_RATIO
    assert fused_ratio < torch_ratio
    n = int((fused_ratio + torch_ratio) / 2 * 100)  # between the two break-evens
    assert not fasa.declines(n, batch=1, fused=True) and fasa.declines(n, batch=1, fused=False)
    assert fasa.declines(99, batch=1, fused=True)  # the budget covers the cache
    forced = FASA(fcs="uncalibrated", budget=100, decline_ratio=0)
    assert not forced.declines(n, batch=1, fused=False) and not forced.declines(101, batch=1, fused=True)


def test_fasa_fused_decoder_follows_cache_growth_and_bf16_scores():
    """The fused step's bound decoder (kept on the cache layer) is rebuilt when the layer's buffers are reallocated
    by growth and reused otherwise; with score_dtype=bf16 the packed FC copy is bf16 and the fused and torch paths
    (both voting from it) agree."""
    from tokprune.hf.kv_cache import TokpruneLayer
    from tokprune.methods.fasa import _fused_fasa_available

    if not _fused_fasa_available():
        pytest.skip("tokprune._C has no paged_fasa_decode")
    torch.manual_seed(1)
    for score_dtype in (torch.float32, torch.bfloat16, torch.int8):
        layer = TokpruneLayer(capacity=64, layer_idx=0)
        fused = FASA(fcs="uncalibrated", budget=20, sink=2, window=5, num_fcs=3, decline_ratio=0, fused=True,
                     score_dtype=score_dtype)
        plain = FASA(fcs="uncalibrated", budget=20, sink=2, window=5, num_fcs=3, decline_ratio=0, fused=False,
                     score_dtype=score_dtype)
        k, v = torch.randn(2, 2, 140, 16), torch.randn(2, 2, 140, 16)
        layer.update(k[:, :, :60], v[:, :, :60])  # 128 slots
        layer.update(k[:, :, 60:120], v[:, :, 60:120])
        decoders, buffers = [], []
        for t in range(120, 134):  # the buffers grow past 128 slots on the way
            layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
            ctx = DecodeContext(_Module(), torch.randn(2, 4, 1, 16), layer.keys, layer.values, None, 0.25, layer)
            got = fused.attend_decode(ctx)
            side = layer.side[fused._side_name]
            assert side.storage.dtype == score_dtype
            # the kernel packed the appended token's FC keys (deferred side buffer): as the torch packing does
            assert side.deferred and side.pending_from is None
            by_kernel = side.storage[..., :side.length].clone()
            scale_by_kernel = None if side.scale is None else side.scale[..., :side.length].clone()
            side.pending_from = 0
            side.flush()
            assert torch.equal(side.storage[..., :side.length], by_kernel), t
            if score_dtype == torch.int8:  # ... and the per-token scales
                assert torch.equal(side.scale[..., :side.length], scale_by_kernel), t
            assert_close(got, plain.attend_decode(ctx), atol=1e-5, rtol=1e-5, name=f"t={t} {score_dtype}")
            decoders.append(layer.bound_calls[fused._side_name].decoder)
            buffers.append(layer.key_buffer.data_ptr())
        assert len(set(buffers)) == 2  # one reallocation
        for i in range(1, len(buffers)):  # reused while the buffers stay, rebuilt when they move
            assert (decoders[i] is decoders[i - 1]) == (buffers[i] == buffers[i - 1]), i
    default = FASA(fcs="uncalibrated", budget=20, sink=2, window=5, num_fcs=3, decline_ratio=0, fused=True)
    default.attend_decode(ctx)  # score_dtype=None: bf16 FC keys for an fp32 cache when the fused step runs
    assert layer.side[default._side_name].storage.dtype == torch.bfloat16
    torch_path = FASA(fcs="uncalibrated", budget=20, sink=2, window=5, num_fcs=3, decline_ratio=0, fused=False)
    torch_path.attend_decode(ctx)  # ... and the cache dtype on the torch path
    assert layer.side[torch_path._side_name].storage.dtype == torch.float32
    with pytest.raises(ValueError, match="score_dtype"):
        FASA(fcs="uncalibrated", budget=20, score_dtype=torch.int16)
    with pytest.raises(ValueError, match="score_dtype"):
        FASA(fcs="uncalibrated", budget=20, score_dtype=torch.bfloat16, layout="split")


def test_new_method_is_one_dataclass_and_one_score(tiny_llama):
    """A method written against the protocol (5 lines) runs through generate; keeping only the newest tokens
    by a zero score and a full window gives the same tokens as StreamingLLM without sinks."""

    @dataclass
    class RecentOnly(KVPolicy):
        def score(self, ctx):
            return ctx.zeros()

    ids = torch.randint(3, 150, (1, 40))
    runs = []
    for policy in (RecentOnly(budget=12, sink=0, window=12, decline_ratio=0), StreamingLLM(budget=12, sink=0, decline_ratio=0)):
        with policy.patch(tiny_llama):
            runs.append(tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                            return_dict_in_generate=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits))


def test_attend_decode_equals_reference_over_selected_tokens():
    ctx = _ctx(n_tokens=64)
    policy = FASA(fcs="uncalibrated", budget=16, sink=2, window=4, decline_ratio=0)
    index = policy.select(policy.score(ctx), ctx)
    out = policy.attend_decode(ctx)
    assert_close(out, sparse_decode_attention_reference(ctx.query, ctx.key, ctx.value, index, ctx.scale))
    assert FASA(budget=64).attend_decode(ctx) is None  # budget covers the cache: dense
    assert FASA(budget=16, decline_ratio=4.5).attend_decode(ctx) is None  # 64 < 4.5 * 16: dense wins
    assert FASA(fcs="uncalibrated", budget=16, decline_ratio=3.5).attend_decode(ctx) is not None


def test_quest_bounds_and_selection():
    valid = torch.ones(1, 70, dtype=torch.bool)
    valid[0, :3] = False
    ctx = _ctx(batch=1, n_tokens=70, valid=valid)
    ctx.key[0, 0, 21] = ctx.query[0, 0, 0] * 10  # a key that head 0 (KV head 0) strongly attends, in page 1
    policy = Quest(budget=32, page_size=16)
    scores = policy.score(ctx)
    assert scores.shape == (1, 4, 5)  # per query head, 5 pages
    idx = policy.select(scores, ctx)
    assert idx.shape == (1, 4, 32)
    head0 = set(idx[0, 0].tolist())
    assert 21 in head0 and 69 in head0  # best page and newest page
    assert not (head0 & {0, 1, 2})  # padding never attended
    assert all(i < 70 for i in idx.flatten().tolist())
    # bound >= true logit of every token of the page (the Quest guarantee)
    logits = torch.einsum("hd,htd->ht", ctx.query[0, :, 0], ctx.key[0].repeat_interleave(2, 0))
    for page in range(5):
        toks = range(max(3, page * 16), min(70, page * 16 + 16))
        assert bool((scores[0, :, page, None] >= logits[:, list(toks)] - 1e-4).all())


def test_quest_page_side_buffer_follows_appends_like_a_rebuild():
    """QuestPages updated incrementally (prefill, single tokens, a regrowth, a rewrite) == page_bounds()."""
    from tokprune.hf.kv_cache import TokpruneLayer

    layer = TokpruneLayer(capacity=64)
    pages = layer.add_side("q", QuestPages(8))
    k = torch.randn(2, 3, 150, 16)
    layer.update(k[:, :, :37], k[:, :, :37])
    for t in range(37, 150):  # crosses the capacity: buffers regrow
        layer.update(k[:, :, t:t + 1], k[:, :, t:t + 1])
        if t in (37, 63, 64, 100, 149):
            kmin, kmax = pages.bounds(t + 1)
            rmin, rmax = page_bounds(k[:, :, :t + 1], 8)
            assert torch.equal(kmin, rmin) and torch.equal(kmax, rmax), t
    layer.keys = k[:, :, :20].flip(2)  # a rewrite (compaction) rebuilds the side buffer
    layer.values = k[:, :, :20]
    layer.update(k[:, :, 20:21], k[:, :, 20:21])
    kmin, kmax = pages.bounds(21)
    rmin, rmax = page_bounds(torch.cat([k[:, :, :20].flip(2), k[:, :, 20:21]], 2), 8)
    assert torch.equal(kmin, rmin) and torch.equal(kmax, rmax)


def test_snapkv_requires_prefill_and_keeps_window():
    ctx = _ctx(batch=1, n_tokens=40)
    with pytest.raises(RuntimeError, match="no prefill"):
        SnapKV(budget=8).score(ctx)
    policy = SnapKV(budget=8, window=3, obs_window=4, pool=1)
    qp = torch.randn(1, 4, 30, 16)
    qp[0, :, -4:] = ctx.key[0, 0, 5] * 5  # the observation queries all look at token 5
    policy.prefill(_Module(), qp, ctx.key[:, :, :30], None, None, 0.25)
    idx = policy.select(policy.score(ctx), ctx)[0, 0].tolist()
    assert 5 in idx and idx[-3:] == [37, 38, 39] and len(idx) == 8


def test_run_time_state_is_not_an_init_repr_or_compare_field():
    a, b = SnapKV(budget=8), SnapKV(budget=8)
    a.prefill(_Module(), torch.randn(1, 4, 12, 16), torch.randn(1, 2, 12, 16), None, None, 0.25)
    assert a.prompt_scores and not b.prompt_scores
    assert a == b and "prompt_scores" not in repr(a)
    with pytest.raises(TypeError):
        SnapKV(budget=8, prompt_scores={})
    assert b.set_prompt_scores(a.prompt_scores).prompt_scores.keys() == a.prompt_scores.keys()
    f = FASA(fcs="uncalibrated", budget=8)
    f.fc_index(0, 2, 16, "cpu")
    assert f == FASA(fcs="uncalibrated", budget=8) and "_fc_cache" not in repr(f)


def test_decode_valid_mask_bool_float_ragged():
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., :2] = False
    assert decode_valid_mask(None, 2, 6) is None
    assert decode_valid_mask(mask, 2, 6).tolist() == [[True] * 6, [False, False] + [True] * 4]
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(decode_valid_mask(additive, 2, 6), decode_valid_mask(mask, 2, 6))

    class _Ragged:
        ragged = True

        def valid_mask(self):
            return torch.tensor([[True] * 5 + [False], [True] * 6])

    assert decode_valid_mask(mask, 2, 6, _Ragged()).tolist() == [[True] * 5 + [False], [False, False] + [True] * 4]


def test_fasa_checks_calibration_against_the_model_at_bind(tiny_llama):
    from tokprune.methods import FCCalibration

    cal = FCCalibration(torch.zeros(5, 2, 8, dtype=torch.long), torch.zeros(5, 2, 8), head_dim=16)
    with pytest.raises(ValueError, match="calibration is for layers=5"):
        FASA(fcs=cal).patch(tiny_llama)
    assert tiny_llama.config._attn_implementation == "sdpa"  # nothing was patched


def test_fasa_head_selection_takes_each_heads_top_partial_logits():
    """selection="head" (the FASA reference): query head h keeps its own top tokens by its raw FC logits."""
    from tokprune.reference.fasa import fc_scores_reference

    ctx = _ctx(batch=1, n_tokens=80)
    policy = FASA(fcs="uncalibrated", budget=10, sink=0, window=0, num_fcs=2, selection="head", decline_ratio=0)
    index = policy.select(policy.score(ctx), ctx)
    assert index.shape == (1, 4, 10)
    partial = fc_scores_reference(ctx.query, ctx.key, policy.fc_index(0, 2, 16, "cpu"))
    for h in range(4):
        assert sorted(index[0, h].tolist()) == sorted(partial[0, h].topk(10).indices.tolist())
    assert len({tuple(index[0, h].tolist()) for h in range(4)}) > 1  # heads of a group differ
    out = policy.attend_decode(ctx)
    assert_close(out, sparse_decode_attention_reference(ctx.query, ctx.key, ctx.value, index, ctx.scale))
    with pytest.raises(ValueError, match="selection"):
        FASA(selection="token")


def test_fasa_dense_layers_decline(tiny_llama):
    class _Layer1:
        layer_idx = 1

    ctx = _ctx(n_tokens=80)
    policy = FASA(fcs="uncalibrated", budget=10, dense_layers=[1], decline_ratio=0)
    assert policy.dense_layers == (1,)
    assert policy.attend_decode(ctx) is not None  # layer 0: sparse
    ctx.module = _Layer1()
    assert policy.attend_decode(ctx) is None  # layer 1: dense
    with pytest.raises(ValueError, match="dense_layers"):
        FASA(dense_layers=0)
    # through generate: every layer dense == the unpatched model
    ids = torch.randint(3, 150, (1, 40))
    ref = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False)
    with FASA(fcs="uncalibrated", budget=4, decline_ratio=0, dense_layers=(0, 1, 2)).patch(tiny_llama):
        assert torch.equal(tiny_llama.generate(ids, max_new_tokens=4, do_sample=False), ref)


@pytest.mark.parametrize("cls", [StreamingLLM, Quest, SnapKV, FASA])
def test_decline_rule_from_shapes(cls):
    policy = cls(budget=16, decline_ratio=3)
    assert policy.declines(47) and not policy.declines(48)  # dense below 3 x budget
    assert cls(budget=16, decline_ratio=0).declines(16) and not cls(budget=16, decline_ratio=0).declines(17)
    default = cls(budget=16)
    for batch in (1, 2, 4, 8):
        ratio = default.decline_ratio_for(batch)
        assert default.declines(int(ratio * 16) - 1, batch=batch) and not default.declines(int(ratio * 16) + 17,
                                                                                           batch=batch)
    assert policy.decline_ratio_for(4) == 3  # an explicit ratio holds for every batch
    with pytest.raises(ValueError, match="decline_ratio must be a float >= 0"):
        cls(budget=16, decline_ratio=-1)


def test_fasa_bound_step_serves_only_what_it_was_bound_for():
    """FASA's bound fused step (kept on the cache layer) runs a step directly only while nothing it depends on
    changed: below the decline threshold the layer declines (None), past it the result equals the torch path;
    a new budget, thread count or a dense layer list takes the full path (rebinding where needed); a padded
    step goes to the torch path."""
    from tokprune.hf.kv_cache import TokpruneLayer
    from tokprune.methods.fasa import _fused_fasa_available

    if not _fused_fasa_available():
        pytest.skip("tokprune._C has no paged_fasa_decode")
    torch.manual_seed(3)
    layer = TokpruneLayer(capacity=64, layer_idx=0)
    fused = FASA(fcs="uncalibrated", budget=20, sink=2, window=5, num_fcs=3, decline_ratio=3.0, fused=True,
                 score_dtype=torch.float32)  # the torch path below votes from fp32 keys too
    k, v = torch.randn(2, 2, 90, 16), torch.randn(2, 2, 90, 16)
    layer.update(k[:, :, :50], v[:, :, :50])

    def step(t, policy=fused, valid=None):
        ctx = DecodeContext(_Module(), torch.randn(2, 4, 1, 16), layer.keys, layer.values, valid, 0.25, layer)
        plain = FASA(fcs="uncalibrated", budget=policy.budget, sink=2, window=5, num_fcs=3,
                     decline_ratio=policy.decline_ratio, fused=False, dense_layers=policy.dense_layers)
        return policy.attend_decode(ctx), plain.attend_decode(ctx), ctx

    steps = []
    for t in range(50, 70):  # n_min = max(budget + 1, 3 * budget) = 60
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        got, want, _ = step(t)
        if t + 1 < 60:
            assert got is None and want is None, t
        else:
            assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"t={t}")
            steps.append(layer.bound_calls[fused._side_name])
    assert all(s is steps[0] for s in steps)  # bound once, served directly after
    fused.budget = 22  # a settings change: rebound, and the new budget is used (n_min 66)
    layer.update(k[:, :, 70:71], v[:, :, 70:71])
    got, want, _ = step(70)
    assert layer.bound_calls[fused._side_name] is not steps[0]
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="budget 22")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads != 2 else 1)
        bound = layer.bound_calls[fused._side_name]
        layer.update(k[:, :, 71:72], v[:, :, 71:72])
        got, want, _ = step(71)
        assert layer.bound_calls[fused._side_name] is not bound
        assert_close(got, want, atol=1e-5, rtol=1e-5, name="threads")
    finally:
        torch.set_num_threads(threads)
    valid = torch.ones(2, 72, dtype=torch.bool)
    valid[1, :3] = False  # padding: the torch path, which masks it
    got, want, _ = step(72, valid=valid)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="padded")
    fused.dense_layers = (0,)
    got, _, _ = step(72)
    assert got is None
