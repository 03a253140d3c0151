"""Bad input to the vLLM plugin: vLLM's start-up (``LLM(...)``) fails with a message naming the key and the
allowed values, before any engine process exists; models the method cannot serve are refused at start-up."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, LlamaConfig

from tokprune.integrations.vllm.config import (
    TokpruneConfigError,
    check_model,
    parse_settings,
    shipped_calibrations,
)


def _settings(**kw):
    return parse_settings({"tokprune": kw})


def test_absent_key_is_inert():
    assert parse_settings({}) is None and parse_settings(None) is None and parse_settings({"other": 1}) is None


@pytest.mark.parametrize("raw, words", [
    (dict(method="bogus", budget=128), ['["method"]', "fasa", "quest", "streaming"]),
    (dict(budget=128), ['["method"]', "required", "fasa"]),
    (dict(method="fasa"), ['["budget"]', "required"]),
    (dict(method="fasa", budget=0), ['["budget"]', "positive int"]),
    (dict(method="fasa", budget="128"), ['["budget"]', "must be an int"]),
    (dict(method="fasa", budget=True), ['["budget"]', "must be an int"]),
    (dict(method="streaming", budget=8, sink=8), ['["sink"]', "smaller than budget"]),
    (dict(method="fasa", budget=64, windw=8), ['["windw"]', "allowed keys", "window"]),
    (dict(method="quest", budget=8, page_size=16), ['["budget"]', "page_size"]),
    (dict(method="fasa", budget=64, min_context=-1), ['["min_context"]', "non-negative int"]),
    (dict(method="fasa", budget=64, score_dtype="fp8"), ['["score_dtype"]', "float32", "bfloat16", "float16"]),
])
def test_bad_settings_name_the_key_and_allowed_values(raw, words):
    with pytest.raises(TokpruneConfigError) as err:
        parse_settings({"tokprune": raw})
    for word in words:
        assert word in str(err.value)


def test_decline_rule_default_is_the_measured_ratio_and_min_context_overrides_it():
    from tokprune.integrations.vllm.config import DECLINE_RATIO

    assert _settings(method="fasa", budget=256, fcs="x").sparse_after == int(DECLINE_RATIO["fasa"] * 256) == 3840
    assert _settings(method="fasa", budget=256, fcs="x", min_context=0).sparse_after == 256  # the budget alone
    assert _settings(method="fasa", budget=256, fcs="x", min_context=100).sparse_after == 256  # never below budget
    assert _settings(method="fasa", budget=256, fcs="x", min_context=9000).sparse_after == 9000
    assert _settings(method="streaming", budget=64).sparse_after == 64  # not measured in vLLM: the budget


def test_models_the_method_cannot_serve():
    llama = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                        head_dim=64, intermediate_size=64, vocab_size=64)
    assert "smollm2_135m" in shipped_calibrations()
    assert check_model(_settings(method="fasa", budget=64, fcs="smollm2_135m"), llama)["head_dim"] == 64
    with pytest.raises(TokpruneConfigError, match="RoPE"):
        check_model(_settings(method="fasa", budget=64, fcs="smollm2_135m"), GPT2Config(n_layer=2, n_head=2, n_embd=64))
    with pytest.raises(TokpruneConfigError, match=r'\["fcs"\].*calibration'):
        check_model(_settings(method="fasa", budget=64), llama)
    with pytest.raises(TokpruneConfigError, match=r"layers=30, kv_heads=3, head_dim=64; the model has layers=2"):
        check_model(_settings(method="fasa", budget=64, fcs="smollm2_135m"),
                    LlamaConfig(num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                head_dim=64, intermediate_size=64, vocab_size=64))
    with pytest.raises(TokpruneConfigError, match="head size 64 is not a multiple of 2\\*chunk=6"):
        check_model(_settings(method="fasa", budget=64, fcs="smollm2_135m", chunk=3), llama)
    with pytest.raises(TokpruneConfigError, match=r'\["fcs"\].*neither a file nor a shipped'):
        check_model(_settings(method="fasa", budget=64, fcs="no-such-calibration"), llama)
    with pytest.raises(TokpruneConfigError, match=r'\["page_size"\].*block size 24'):
        check_model(_settings(method="quest", budget=64, page_size=16), llama, block_size=24)


@pytest.mark.parametrize("extra, words", [
    ({"tokprune": {"method": "bogus", "budget": 128}}, ['["method"]', "fasa, quest, streaming"]),
    ({"tokprune": {"method": "fasa", "budget": -1, "fcs": "smollm2_135m"}}, ['["budget"]', "positive int"]),
    ({"tokprune": {"method": "fasa", "budget": 128}}, ['["fcs"]', "calibration"]),
], ids=["method", "budget", "calibration"])
def test_vllm_startup_fails_before_any_engine(smollm2_dir, extra, words):
    from vllm import LLM

    with pytest.raises(Exception) as err:
        LLM(str(smollm2_dir), dtype="bfloat16", enforce_eager=True, max_model_len=512,
            kv_cache_memory_bytes=64 << 20, additional_config=extra)
    for word in words:
        assert word in str(err.value)
