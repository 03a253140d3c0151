import subprocess
import sys

import pytest
import torch

from tests import models as tiny
from tokprune.cli import info_lines, main


def test_info_is_truthful_here():
    text = "\n".join(info_lines())
    assert f"torch {torch.__version__}" in text
    if not torch.cuda.is_available():
        assert "CUDA devices visible: 0" in text
        assert "backends for cuda tensors" not in text
    from tokprune import _ext

    if _ext.load_error():
        assert "extension tokprune._C: unavailable" in text
    else:
        assert "extension tokprune._C: loaded" in text


def test_cli_rejects_unknown_family(capsys):
    assert main(["eval", "no-such-family"]) == 2
    assert "unknown eval family 'no-such-family'" in capsys.readouterr().err


def test_console_script_info_runs_in_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "tokprune.cli", "info"], capture_output=True, text=True)
    assert proc.returncode == 0
    # a fresh process without TRITON_INTERPRET must say why triton cannot run on CPU tensors
    env_interp = "TRITON_INTERPRET" in __import__("os").environ
    if not env_interp or __import__("os").environ["TRITON_INTERPRET"] != "1":
        assert "TRITON_INTERPRET=1" in proc.stdout


@pytest.mark.parametrize("build", [tiny.tiny_llama, tiny.tiny_qwen2])
def test_tiny_text_models_are_deterministic(build):
    ids = torch.randint(0, 100, (2, 12))
    a, b = build()(ids).logits, build()(ids).logits
    assert a.shape == (2, 12, 160)
    assert torch.equal(a, b)


def test_tiny_llava_runs_with_image():
    model = tiny.tiny_llava()
    ids, pixels = tiny.llava_inputs(batch=2)
    logits = model(input_ids=ids, pixel_values=pixels).logits
    assert logits.shape == (2, ids.shape[1], 160) and torch.isfinite(logits).all()


@pytest.mark.real_weights
def test_smollm2_real_weights_answer_a_fact(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
