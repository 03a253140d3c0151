"""tokprune inside real vLLM engines (CPU build, SmolLM2-135M weights, bf16, eager), one engine per child process.

Engines (each started once for the module): ``stock`` (no plugin loaded), ``inert`` (plugin installed, no
``"tokprune"`` key), ``full`` (FASA with a budget above every context), ``fasa`` and ``streaming`` (budget 128).
All run the same batch: two ~2K-token pass-key prompts (different keys and positions) and three short
prompts whose context stays within the budget; ``ignore_eos`` keeps the batch shape identical across
engines so that dense rows can be compared token for token.
"""

from __future__ import annotations

import pytest

from tests_vllm.engine import run_engine
from tokprune.demo import FILLER

STOCK_CLASSES = ["vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend|"
                 "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl"]
OURS_CLASSES = ["tokprune.integrations.vllm.backend.TokpruneCPUAttentionBackend|"
                "tokprune.integrations.vllm.backend.TokpruneCPUAttentionImpl"]
KEYS = ["68142", "30917"]
BUDGET = 128
NEW_TOKENS = 16
SHORT = ["The capital of France is", "def fibonacci(n):\n",
         "Here is a short story about a robot who learns to paint. Once upon a time, in a small town by the sea, "
         "there lived a robot named"]
ENGINES = {
    "stock": (None, {"VLLM_PLUGINS": ""}),
    "inert": (None, {}),
    "full": ({"tokprune": {"method": "fasa", "budget": 4096, "fcs": "smollm2_135m"}}, {}),
    "fasa": ({"tokprune": {"method": "fasa", "budget": BUDGET, "fcs": "smollm2_135m", "min_context": 0}}, {}),
    "streaming": ({"tokprune": {"method": "streaming", "budget": BUDGET}}, {}),
}


def pass_key_text(key: str, before: int, after: int) -> str:
    return (FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * after
            + "What is the pass key? The pass key is")


@pytest.fixture(scope="module")
def batch(tokenizer):
    texts = [pass_key_text(KEYS[0], 42, 42), pass_key_text(KEYS[1], 24, 60)] + SHORT
    ids = [tokenizer(t).input_ids for t in texts]
    assert all(1900 <= len(i) <= 2300 for i in ids[:2]), [len(i) for i in ids]
    assert all(len(i) + NEW_TOKENS <= BUDGET for i in ids[2:])
    return ids


@pytest.fixture(scope="module")
def runs(smollm2_dir, batch, tmp_path_factory):
    """``name -> {"tokens", "texts", "classes"}``, each engine started on first use."""
    logs = tmp_path_factory.mktemp("engine_logs")
    cache = {}

    def get(name):
        if name not in cache:
            extra, env = ENGINES[name]
            spec = dict(model=str(smollm2_dir), prompts=batch, max_tokens=NEW_TOKENS, ignore_eos=True,
                        max_model_len=2560, additional_config=extra)
            cache[name] = run_engine(spec, logs / f"{name}.log", env=env)
        return cache[name]

    return get


def test_budget_at_least_context_is_token_identical_to_stock(runs):
    full, stock = runs("full"), runs("stock")
    assert full["classes"] == OURS_CLASSES  # the plugin served this engine
    assert stock["classes"] == STOCK_CLASSES
    assert full["tokens"] == stock["tokens"]


def test_without_the_key_the_plugin_changes_nothing(runs):
    inert, stock = runs("inert"), runs("stock")
    assert inert["classes"] == STOCK_CLASSES
    assert inert["tokens"] == stock["tokens"]


def test_pass_key_at_2k_budget_128_fasa_retrieves_streaming_fails(runs):
    stock, fasa, streaming = runs("stock"), runs("fasa"), runs("streaming")
    assert fasa["classes"] == streaming["classes"] == OURS_CLASSES
    for row, key in enumerate(KEYS):
        assert key in stock["texts"][row], f"full attention should retrieve {key}: {stock['texts'][row]!r}"
        assert key in fasa["texts"][row], f"FASA (budget {BUDGET}) lost pass key {key}: {fasa['texts'][row]!r}"
        assert key not in streaming["texts"][row], \
            f"StreamingLLM (budget {BUDGET}) cannot see the key, got {streaming['texts'][row]!r}"
    # the short requests (context <= budget) took vLLM's dense path in the same batches: identical tokens
    assert fasa["tokens"][2:] == stock["tokens"][2:]
    assert streaming["tokens"][2:] == stock["tokens"][2:]
