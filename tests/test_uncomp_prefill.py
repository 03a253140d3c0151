"""UNComp's stage division (hand-computed oracle) and prefill hidden-state compression (exactness when
nothing is dropped, cache lengths, a gathered-layer oracle, errors, reversibility)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.helpers import assert_close
from tokprune.methods.uncomp import UNComp, split_budget
from tokprune.methods.uncomp_prefill import (STAGES_FORMAT, calibrate_stages, layer_entropy_profile,
                                             prefill_keep_counts, resolve_stages, split_weighted, stage_division,
                                             stage_weights)


def _generate(model, ids, n=5):
    out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


# ----------------------------------------------------------------------------------------------------------
# Stage division
# ----------------------------------------------------------------------------------------------------------
def _hand_entropy(x: np.ndarray) -> float:
    """Von Neumann entropy of the trace-normalised covariance of centred, row-normalised tokens / log D."""
    z = x - x.mean(0, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    cov = z.T @ z / z.shape[0]
    p = np.linalg.eigvalsh(cov / np.trace(cov))
    p = p[p > 1e-12]
    return float(-(p * np.log(p)).sum() / math.log(x.shape[1]))


def test_profile_equals_hand_computation(tiny_llama):
    model = tiny_llama
    ids = torch.randint(3, 150, (1, 48))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # inputs of layers 0..L-1, then final
        n_layers = len(model.model.layers)
        expected = [n_layers * _hand_entropy(model.model.layers[i].input_layernorm(hidden[i])[0].double().numpy())
                    for i in range(n_layers)]
    got = layer_entropy_profile(model, ids)
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_stage_division_by_hand():
    profile = [5.0, 4.5, 3.0, 3.5, 2.0, 2.2, 2.1]  # drops: -0.5, -1.5 (new), +0.5, -1.5 (new), +0.2, -0.1
    assert stage_division(profile, 1.0) == [0, 0, 1, 1, 2, 2, 2]
    assert stage_division(profile, 0.4) == [0, 1, 2, 2, 3, 3, 3]
    assert stage_division(profile, 2.0) == [0] * 7
    with pytest.raises(ValueError, match="threshold"):
        stage_division(profile, 0)


def test_calibration_file_round_trip_and_mismatch(tiny_llama, tiny_qwen2, tmp_path):
    ids = torch.randint(3, 150, (1, 40))
    data = calibrate_stages(tiny_llama, ids, threshold=0.05)
    assert data["format"] == STAGES_FORMAT
    assert data["stages"] == stage_division(data["profile"], 0.05)
    path = tmp_path / "stages.json"
    path.write_text(json.dumps(data))
    assert resolve_stages(tiny_llama, str(path)) == data["stages"]
    with pytest.raises(ValueError, match="was made for"):
        resolve_stages(tiny_qwen2, str(path))
    with pytest.raises(ValueError, match="no shipped stage division"):
        resolve_stages(tiny_llama)
    with pytest.raises(ValueError, match="stages must be 3 ints"):
        resolve_stages(tiny_llama, [0, 2, 2])


# ----------------------------------------------------------------------------------------------------------
# Layer budgets by stage
# ----------------------------------------------------------------------------------------------------------
def test_split_weighted_matches_split_budget_and_caps():
    ent = torch.rand(9)
    for total in (0, 7, 40, 200):
        weight = torch.ones(9, dtype=torch.float64)
        weight[torch.sort(ent.double(), descending=True, stable=True).indices[:4]] = 2.0
        assert torch.equal(split_weighted(weight, total, torch.full((9,), 12)),
                           split_budget(ent, total, 12, 4 / 9, 2.0))
    caps = torch.tensor([3, 50, 50, 1])
    got = split_weighted(torch.tensor([4.0, 1.0, 1.0, 4.0]), 60, caps)
    assert int(got.sum()) == 60 and bool((got <= caps).all())
    assert got[0] == 3 and got[3] == 1 and abs(int(got[1]) - int(got[2])) <= 1


def test_stage_layer_budgets(tiny_llama):
    method = UNComp(ratio=0.5, layer_groups="stages", stages=[0, 1, 2], high_to_low=3.0)
    method.bind(tiny_llama)
    assert stage_weights([0, 1, 2], 3.0).tolist() == [3.0, 2.0, 1.0]
    budget = method.budgets(torch.rand(3, 1, 2), torch.tensor([60]))
    per_layer = budget[:, 0].sum(-1)
    assert int(per_layer.sum()) == round(0.5 * 60 * 3 * 2)
    assert per_layer.tolist() == [90, 60, 30]  # 180 slots in proportion 3 : 2 : 1


def test_keep_counts():
    assert prefill_keep_counts([0, 0, 1, 1, 2], 100, 0.4, 8) == [100, 100, 70, 70, 40]
    assert prefill_keep_counts([0, 1], 10, 0.05, 4) == [10, 4]  # never below the window
    assert prefill_keep_counts([0, 0, 0], 10, 0.1, 4) == [10, 10, 10]


# ----------------------------------------------------------------------------------------------------------
# Prefill compression
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages,min_keep", [([0, 0, 0], 0.3), ([0, 1, 2], 1.0)], ids=["one_stage", "keep_all"])
def test_keep_all_equals_unpatched(tiny_llama, stages, min_keep):
    model = tiny_llama
    ids = torch.randint(3, 150, (1, 33))
    expected_tokens, expected_logits = _generate(model, ids)
    method = UNComp(ratio=1.0, prefill_compression=True, stages=stages, prefill_min_keep=min_keep)
    with method.patch(model) as handle:
        tokens, logits = _generate(model, ids)
        assert handle.info["prefill"]["lengths"] == [33, 33, 33]
    assert torch.equal(tokens, expected_tokens)
    assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", [True, False], ids=["tokprune_cache", "dynamic_cache"])
@pytest.mark.parametrize("ratio", [1.0, 0.4])
def test_later_layers_cache_holds_the_kept_tokens(tiny_llama, cache, ratio):
    model = tiny_llama
    n = 50
    ids = torch.randint(3, 150, (1, n))
    method = UNComp(ratio=ratio, window=4, prefill_compression=True, stages=[0, 1, 2], prefill_min_keep=0.4)
    with method.patch(model, cache=cache) as handle, torch.no_grad():
        kv = model(ids, use_cache=True).cache
        info = handle.info["prefill"]
        tokens, _ = _generate(model, ids, n=3)  # decoding on the compressed caches runs
    expected = prefill_keep_counts([0, 1, 2], n, 0.4, 4)
    assert info["lengths"] == expected and expected[2] < expected[1] < n
    lengths = [layer.keys.shape[2] for layer in kv.layers]
    if ratio == 1.0:
        assert lengths == expected  # KV compression keeps everything: cache length = kept hidden states
    budget = method.budget[:, 0]
    assert bool((budget <= torch.tensor(expected)[:, None]).all())
    assert int(budget.sum()) == min(round(ratio * n * 3 * 2), 2 * sum(expected))
    for slots, m in zip(info["slots"], expected):
        assert slots.numel() == m and bool((slots[1:] > slots[:-1]).all())
        assert set(range(n - 4, n)) <= set(slots.tolist())  # the observation window survives
    assert tokens.shape == (1, 3)


def test_compressed_layer_equals_gathered_oracle(tiny_llama):
    """Layer 2 on the kept tokens == running layer 2 by hand on the gathered layer-2 input at the
    original positions (causal among kept tokens)."""
    model = tiny_llama
    n = 40
    ids = torch.randint(3, 150, (1, n))
    method = UNComp(ratio=1.0, window=4, prefill_compression=True, stages=[0, 0, 1], prefill_min_keep=0.5)
    with method.patch(model) as handle, torch.no_grad():
        got = model(ids, use_cache=False).logits[:, -1]
        slots = handle.info["prefill"]["slots"][2]
    assert slots.numel() == 20
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[2]
        x = hidden[:, slots]
        pos = slots[None]
        cos_sin = model.model.rotary_emb(x, position_ids=pos)
        mask = torch.ones(20, 20, dtype=torch.bool).tril()[None, None]
        y = model.model.layers[2](x, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
        y = y[0] if isinstance(y, tuple) else y
        expected = model.lm_head(model.model.norm(y))[:, -1]
    assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_bad_input_errors(tiny_llama):
    model = tiny_llama
    method = UNComp(prefill_compression=True, stages=[0, 1, 1])
    with method.patch(model), pytest.raises(ValueError, match="input_ids has batch 2"):
        model(torch.randint(3, 150, (2, 12)))
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, :3] = 0
    with method.patch(model), pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(3, 150, (1, 12)), attention_mask=mask)
    with pytest.raises(ValueError, match="layer_groups"):
        UNComp(layer_groups="pyramid")
    with pytest.raises(ValueError, match="prefill_min_keep"):
        UNComp(prefill_min_keep=0)
    with pytest.raises(ValueError, match="stages must be 3 ints"):
        UNComp(prefill_compression=True, stages=[0, 1]).patch(model)


def test_patch_is_reversible(tiny_llama):
    model = tiny_llama
    ids = torch.randint(3, 150, (1, 30))
    with torch.no_grad():
        before = model(ids).logits
    method = UNComp(ratio=0.5, prefill_compression=True, stages=[0, 1, 2])
    with method.patch(model), torch.no_grad():
        during = model(ids).logits
    with torch.no_grad():
        after = model(ids).logits
    assert during.shape[1] < 30  # the logits cover the kept tokens only
    assert torch.equal(before, after)
