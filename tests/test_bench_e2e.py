"""`tokprune bench e2e --quick` on a tiny random Llama: the printed ratios follow from the printed times
and agree with the CSV rows (not the numbers themselves: no timing asserts)."""

import csv
import json
import re

import pytest
import torch

_ROW = re.compile(r"^  (\S+(?: keep=\S+)?)\s+([\d.]+)\s+([\d.]+)\s+x\s*([\d.]+)\s+x\s*([\d.]+)(?:\s+x\s*([\d.]+)\s+x\s*([\d.]+))?")


def _parse(text):
    """{case: {provider: [numbers...]}} from the printed tables."""
    cases, case = {}, None
    for line in text.splitlines():
        if line.startswith("[e2e] "):
            case = line.split("  (")[0][len("[e2e] "):]
            cases[case] = {}
            continue
        m = _ROW.match(line)
        if case is not None and m:
            cases[case][m.group(1)] = [float(g) if g is not None else None for g in m.groups()[1:]]
    return cases


def _assert_ratio_within_rounding(printed, num, den, half, where, *, num_half=None, out_half=0.005):
    """``printed`` (rounded to ``out_half``) equals ``num / den`` for some true values within ``half`` of the
    printed ``num`` (``num_half``, default ``half``) and ``den``: the check cannot fail from rounding alone."""
    num_half = half if num_half is None else num_half
    lo = (num - num_half) / (den + half)
    hi = (num + num_half) / (den - half) if den > half else float("inf")
    assert lo - out_half - 1e-9 <= printed <= hi + out_half + 1e-9, (where, printed, num, den)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import os

    from benchmarks import runner

    out_dir = tmp_path_factory.mktemp("bench")
    previous = runner.RESULTS_DIR
    runner.RESULTS_DIR = out_dir
    threads = torch.get_num_threads()
    import contextlib
    import io

    buf = io.StringIO()
    try:
        from benchmarks.bench_e2e import main

        with contextlib.redirect_stdout(buf):
            assert main(["--quick", "--contexts", "48,80", "--batches", "1,2", "--new-tokens", "3", "--rounds", "1",
                         "--prefill", "64", "--no-plot"]) == 0
    finally:
        runner.RESULTS_DIR = previous
        torch.set_num_threads(threads)
    with open(os.path.join(out_dir, "e2e.csv")) as f:
        rows = list(csv.DictReader(f))
    return buf.getvalue(), rows


def test_printed_ratios_follow_from_printed_times(quick_run):
    text, _ = quick_run
    cases = _parse(text)
    decode = {c: v for c, v in cases.items() if c.startswith("decode")}
    assert set(decode) == {f"decode ctx={c} batch={b}" for c in (48, 80) for b in (1, 2)}
    for case, providers in decode.items():
        assert {"unpatched", "cache", "fasa", "quest", "streaming"} <= set(providers), (case, providers)
        base, cache = providers["unpatched"][0], providers["cache"][0]
        batch = int(case.split("batch=")[1])
        for name, (ms, tok_s, vs_unp, bound_unp, vs_cache, bound_cache) in providers.items():
            # times printed to 2 decimals: the printed ratio must lie in the interval the rounding allows
            _assert_ratio_within_rounding(vs_unp, base, ms, 0.005, (case, name))
            _assert_ratio_within_rounding(vs_cache, cache, ms, 0.005, (case, name))
            _assert_ratio_within_rounding(tok_s, batch * 1e3, ms, 0.005, (case, name), num_half=0.0, out_half=0.05)
            assert bound_unp >= bound_cache > 0
        assert providers["unpatched"][2] == 1.0 and providers["cache"][4] == 1.0
    prefill = cases["prefill n=64"]
    assert set(prefill) == {"dense", "token_sparse keep=0.25"}
    dense = prefill["dense"][0]
    for name, numbers in prefill.items():
        _assert_ratio_within_rounding(numbers[2], dense, numbers[0], 0.05, name)  # prefill ms: 1 decimal


def test_csv_rows_match_printed(quick_run):
    text, rows = quick_run
    cases = _parse(text)
    assert rows and all(r["benchmark"] == "e2e" for r in rows)
    for r in rows:
        printed = cases[r["case"]][r["provider"]]
        metrics, params = json.loads(r["metrics"]), json.loads(r["params"])
        ms_digits = 0.006 if params["kind"] == "decode" else 0.051  # printed with 2 / 1 decimals
        assert float(r["median_ms"]) == pytest.approx(printed[0], abs=ms_digits)
        assert float(r["ratio_vs_baseline"]) == pytest.approx(printed[2], abs=0.006)
        if params["kind"] == "decode":
            assert r["baseline"] == "unpatched"
            assert metrics["ratio_vs_cache"] == pytest.approx(printed[4], abs=0.006)
            assert metrics["bound_vs_unpatched"] == pytest.approx(printed[3], abs=0.006)
            # the bound is the ratio of the bytes moved per step, stored beside it
            base = [x for x in rows if x["case"] == r["case"] and x["provider"] == "unpatched"][0]
            ratio = json.loads(base["metrics"])["bytes_per_step"] / metrics["bytes_per_step"]
            assert metrics["bound_vs_unpatched"] == pytest.approx(ratio, abs=1e-3)
        else:
            assert r["baseline"] == "dense"


def test_decode_bytes_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.bench_e2e import decode_bytes, model_bytes

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    kv_token = 2 * 2 * 8 * 4  # layers * kv_heads * head_dim * fp32 bytes, K only
    w = model_bytes(model)
    assert decode_bytes(model, "cache", 100, 3, 10) == w + 2 * kv_token * 100 * 3
    assert decode_bytes(model, "unpatched", 100, 3, 10) == w + 3 * 2 * kv_token * 100 * 3
    assert decode_bytes(model, "streaming", 100, 3, 10) == w + 2 * kv_token * 10 * 3
    # a budget larger than the context reads the whole context
    assert decode_bytes(model, "streaming", 8, 1, 10) == w + 2 * kv_token * 8
    # FASA: + the packed FC dims of every key (16 of head_dim 8 here), half the bytes where they are stored in bf16
    from benchmarks.bench_e2e import _fasa_scores_bf16

    scoring = decode_bytes(model, "fasa", 100, 3, 10) - decode_bytes(model, "streaming", 100, 3, 10)
    assert scoring == kv_token * 100 * 3 * 16 / 8 * (0.5 if _fasa_scores_bf16(model) else 1.0)
