"""FASA calibration: per-query-head ranking and its union per KV group, decode-time queries, per-budget k,
file format compatibility, and FASA's refusal to run without a calibration."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tokprune.methods import FASA
from tokprune.methods.fasa_calibration import (FORMAT, FCCalibration, find_calibration, model_fingerprint,
                                               per_kv_view, rank_fcs, record_queries, union_per_group)


def _random_head_cal(layers=2, heads=6, n_fc=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    agree = torch.rand(layers, heads, n_fc, generator=gen)
    order = torch.sort(agree, dim=-1, descending=True)
    return order.indices, order.values, agree


def test_union_per_group_matches_loop_oracle():
    ranking, agreement, raw = _random_head_cal()
    kv_heads, group = 2, 3
    got, got_agree = union_per_group(ranking, agreement, kv_heads)
    for layer in range(raw.shape[0]):
        for g in range(kv_heads):
            heads = range(g * group, (g + 1) * group)
            best = {fc: min(ranking[layer, h].tolist().index(fc) for h in heads) for fc in range(raw.shape[-1])}
            mean = {fc: sum(raw[layer, h, fc].item() for h in heads) / group for fc in range(raw.shape[-1])}
            expect = sorted(range(raw.shape[-1]), key=lambda fc: (best[fc], -mean[fc]))
            assert got[layer, g].tolist() == expect
            assert torch.allclose(got_agree[layer, g], torch.tensor([mean[fc] for fc in expect]))
            # every head's best FC comes before any FC that no head ranks first
            firsts = {ranking[layer, h, 0].item() for h in heads}
            assert set(got[layer, g, :len(firsts)].tolist()) == firsts


def test_per_kv_view_is_the_group_mean_ranking():
    ranking, agreement, raw = _random_head_cal(seed=1)
    kv_ranking, kv_agree = union_per_group(ranking, agreement, 2)
    cal = FCCalibration(kv_ranking, kv_agree, 16, 1, {}, ranking, agreement)
    view = per_kv_view(cal)
    mean = raw.view(2, 2, 3, -1).mean(2)
    assert torch.equal(view.ranking, torch.sort(mean, dim=-1, descending=True, stable=True).indices)
    assert view.head_ranking is None and not view.per_head


def _planted_record(heads=4, kv_heads=2, n_q=6, n_tokens=40, head_dim=16, planted=(1, 5, 2, 6), seed=0):
    """Queries/keys where query head h's logits are dominated by FC planted[h] (pairs fc and fc + D/2)."""
    gen = torch.Generator().manual_seed(seed)
    half = head_dim // 2
    q = 0.01 * torch.randn(heads, n_q, head_dim, generator=gen)
    k = 0.01 * torch.randn(kv_heads, n_tokens, head_dim, generator=gen)
    group = heads // kv_heads
    for h, fc in enumerate(planted):
        q[h, :, fc] = 3.0 + torch.rand(n_q, generator=gen)
        q[h, :, fc + half] = 3.0
    for g in range(kv_heads):
        for fc in planted[g * group:(g + 1) * group]:
            k[g, :, fc] = torch.randn(n_tokens, generator=gen)
            k[g, :, fc + half] = torch.randn(n_tokens, generator=gen)
    return dict(queries={0: q}, keys={0: k}, context=n_tokens - n_q, source="prefill", n_queries=n_q,
                fingerprint={}, model="synthetic")


def test_rank_fcs_per_head_finds_each_heads_planted_fc_and_the_union_serves_them():
    planted = (1, 5, 2, 6)
    cal = rank_fcs(_planted_record(planted=planted), topk=4, per_head=True)
    assert cal.per_head and cal.head_ranking.shape == (1, 4, 8) and cal.ranking.shape == (1, 2, 8)
    assert cal.head_ranking[0, :, 0].tolist() == list(planted)
    assert cal.head_fc_index(0, 1).view(-1).tolist() == list(planted)
    # union per group: the 2 FCs of KV head g are its two heads' planted FCs
    assert set(cal.ranking[0, 0, :2].tolist()) == {1, 5} and set(cal.ranking[0, 1, :2].tolist()) == {2, 6}
    assert cal.meta["topk"] == 4 and cal.meta["per_head"] is True
    kv = rank_fcs(_planted_record(planted=planted), topk=4)
    assert kv.head_ranking is None and set(kv.ranking[0, 0, :2].tolist()) == {1, 5}
    with pytest.raises(ValueError, match="no per-query-head ranking"):
        kv.head_fc_index(0, 1)


def test_rank_fcs_topk_is_the_agreement_k():
    rec = _planted_record()
    for k in (1, 4, 16):
        cal = rank_fcs(rec, topk=k, per_head=True)
        assert cal.meta["topk"] == k
    # at k = every visible key the agreement is 1 for every FC (top-k = all keys)
    n_tokens = rec["keys"][0].shape[1]
    everything = rank_fcs(dict(rec, queries={0: rec["queries"][0][:, -1:]}, n_queries=1), topk=n_tokens)
    assert torch.allclose(everything.agreement, torch.ones_like(everything.agreement))


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_save_load_round_trip_and_backward_compatible_format(tmp_path, suffix):
    cal = rank_fcs(_planted_record(), topk=4, per_head=True)
    path = tmp_path / f"fcs{suffix}"
    cal.save(path)
    back = FCCalibration.load(str(path))
    assert torch.equal(back.ranking, cal.ranking) and torch.equal(back.head_ranking, cal.head_ranking)
    assert torch.allclose(back.head_agreement, cal.head_agreement) and back.meta["source"] == "prefill"
    # a file of the first format (no per-head keys) still loads, with no per-head ranking
    old = dict(format=FORMAT, head_dim=16, chunk=1, meta={}, ranking=cal.ranking.tolist(),
               agreement=cal.agreement.tolist())
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = FCCalibration.load(str(tmp_path / "old.json"))
    assert legacy.head_ranking is None and torch.equal(legacy.ranking, cal.ranking)
    bad = dict(old, head_ranking=[[[0, 1]]], head_agreement=[[[1.0, 0.5]]])
    with pytest.raises(ValueError, match="head_ranking must be"):
        FCCalibration.load(bad)


class _Tok:
    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[3 + (ord(c) % 90) for c in text]]))


def test_decode_source_records_the_queries_of_the_greedy_decode_steps(tiny_llama):
    """Oracle: the queries that tiny Llama's attention actually receives during greedy decode steps."""
    from tokprune.hf.attention import patch_attention

    model, text, n_q = tiny_llama, "the quick brown fox jumps over the lazy dog " * 2, 5
    rec = record_queries(model, _Tok(), text, n_tokens=48, n_queries=n_q, source="decode")
    assert rec["context"] == 48 and rec["queries"][0].shape[1] == n_q

    class Spy:
        def __init__(self):
            self.q = {}

        def attend(self, module, query, key, value, mask, scale, **kw):
            self.q.setdefault(module.layer_idx, []).append(query[0, :, -1].float().clone())
            return None

    spy = Spy()
    ids = _Tok()(text).input_ids[:, :48]
    with patch_attention(model, decode=spy, cache=False), torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_q + 1, do_sample=False)
    for layer, got in rec["queries"].items():
        steps = torch.stack(spy.q[layer][:n_q], 1)  # (H, n_q, D): decode steps 1..n_q
        assert torch.allclose(got, steps, atol=1e-4, rtol=1e-4), layer
    prefill = record_queries(model, _Tok(), text, n_tokens=48, n_queries=n_q, source="prefill")
    assert prefill["context"] == 48 - n_q and not torch.allclose(prefill["queries"][0], rec["queries"][0])
    with pytest.raises(ValueError, match="source must be 'prefill' or 'decode'"):
        record_queries(model, _Tok(), text, source="train")


def test_fasa_without_calibration_raises_naming_fcs(tiny_llama):
    with pytest.raises(ValueError, match=r"fcs=None.*tokprune calibrate fasa.*fcs='uncalibrated'"):
        FASA(budget=8).patch(tiny_llama)
    with pytest.raises(ValueError, match="fcs="):
        FASA(budget=8).fc_index(0, 2, 16, "cpu")
    policy = FASA(budget=8, fcs="uncalibrated", num_fcs=2)
    with policy.patch(tiny_llama):
        pass
    head_dim = tiny_llama.config.hidden_size // tiny_llama.config.num_attention_heads
    n_fc = head_dim // 2
    assert policy.fc_index(0, 2, head_dim, "cpu").tolist() == [[n_fc - 2, n_fc - 1]] * 2


def _smollm2_like(**overrides):
    from transformers import LlamaConfig

    kw = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
              rope_theta=100000.0)
    kw.update(overrides)
    return SimpleNamespace(config=LlamaConfig(**kw))


def test_shipped_calibration_is_found_by_fingerprint():
    model = _smollm2_like()
    path = find_calibration(model)
    assert path is not None and path.name.startswith("fasa_") and path.suffix == ".json"
    meta = json.loads(path.read_text())["meta"]
    assert meta["fingerprint"] == model_fingerprint(model) and meta["auto"] is True
    policy = FASA(budget=8)
    policy.bind(model)
    assert torch.equal(policy._calibration.ranking, FCCalibration.load(path).ranking)
    # another RoPE base (or shape) is a different model: no calibration, a clear error
    other = _smollm2_like(rope_theta=10000.0)
    assert find_calibration(other) is None
    with pytest.raises(ValueError, match="rope_theta"):
        FASA(budget=8).bind(other)
    assert math.isclose(model_fingerprint(model)["rope_theta"], 100000.0)


def test_split_keys_fasa_c_layout_scores_gathers_and_holds_exactly_the_keys():
    from tokprune.methods.fasa_calibration import SplitKeys, fasa_key_bytes
    from tokprune.reference.fasa import fc_scores_reference

    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, 20, 16, generator=gen)
    fc = torch.tensor([[1, 6], [3, 0]])
    split = SplitKeys(keys[:, :, :15], fc)
    split.append(keys[:, :, 15:])
    assert torch.equal(split.keys(), keys)
    assert split.resident_bytes() == keys.numel() * keys.element_size()  # no duplicated FC dims
    assert split.dom.shape[-1] + split.rest.shape[-1] == 16
    q = torch.randn(2, 4, 1, 16, generator=gen)
    assert torch.allclose(split.scores(q, backend="torch"), fc_scores_reference(q, keys, fc), atol=1e-5)
    index = torch.randint(0, 20, (2, 2, 5), generator=gen)
    assert torch.equal(split.gather(index), torch.gather(keys, 2, index[..., None].expand(-1, -1, -1, 16)))
    b = fasa_key_bytes(1000, 100, 64, 16)
    assert b["fasa_c"]["resident"] == b["dense"]["resident"] < b["packed"]["resident"]
    assert b["fasa_c"]["read"] == b["packed"]["read"] < b["dense"]["read"]
    with pytest.raises(ValueError, match="fc_index must be"):
        SplitKeys(keys, torch.tensor([[1, 2]]))
