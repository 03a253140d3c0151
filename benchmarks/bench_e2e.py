"""Whole-model speed where users feel it: decode tokens/s and prefill time of a real model, patched vs not.

    tokprune bench e2e                      (or: python -m benchmarks.bench_e2e)
    tokprune bench e2e --quick              (tiny random Llama, seconds: CI smoke of the harness)

Model: SmolLM2-135M-Instruct, real weights offline (:func:`tokprune.models.load_smollm2`), fp32, 1 torch
thread by default. Every provider of a case is measured in the same run, in interleaved rounds (the order
rotates each round), after a warm-up; the reported number is the median over rounds.

**Decode** (contexts ``--contexts``, batches ``--batches``): the prompt (held-out real text) is prefilled
once, untimed (stored under ``benchmarks/results/prefill_kv/`` and re-used; ``--prepare`` only does this,
so that it can run outside the timing lock), and its keys/values are copied into a fresh cache for every
run; ``model.generate`` then continues from that cache for ``--new-tokens`` tokens, exactly as a user's
``model.generate`` after a prefill. A logits processor stamps the clock after every forward; the step
time of a run is the median interval between stamps (the first forward, which may build per-sequence
state, is excluded). Each case starts with a 2-token warm-up run of every provider. Providers:

* ``unpatched``: the model as loaded, on transformers' ``DynamicCache`` (appends with ``torch.cat``);
* ``cache``: full attention on the tokprune cache (:func:`tokprune.hf.kv_cache.use_tokprune_cache`);
* ``fasa`` / ``quest`` / ``streaming``: ``with policy.patch(model):`` (the README's usage; the policies
  run on the tokprune cache), budget ``--budget``; FASA with the shipped SmolLM2 calibration.

**Prefill** (``--prefill``): ``model(ids, use_cache=False, logits_to_keep=1)``, dense vs
``TokenSparseAttention(keep=0.25)`` (the paper's profiled layers where the installed version has them).

Printed next to every ratio: the bound from bytes moved per decode step (weights + KV read + the cache
copy of ``torch.cat``; see :func:`decode_bytes`) or from FLOPs for prefill. **Peak memory**: the resident
set high-water mark of the run above the resident set before it (Linux ``/proc/self/clear_refs`` resets
the mark before each run; glibc is told to return large blocks to the system so that freed memory is not
silently reused); ``nan`` where that is not available. Rows go to ``benchmarks/results/e2e.csv``, the plot
(tokens/s against context) to ``benchmarks/results/e2e.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.runner import append_rows, device_name

BENCH = "e2e"
DECODE_PROVIDERS = ("unpatched", "cache", "fasa", "quest", "streaming")


# ------------------------------------------------------------------------------------------------ memory
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed: large blocks are unmapped when freed
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
        return libc
    except OSError:
        return None


_LIBC = None


def _status_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_mark() -> Optional[int]:
    """Reset the RSS high-water mark to the current RSS; returns the current RSS in KiB (or None)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def memory_peak_mb(mark: Optional[int]) -> float:
    """MiB of RSS high-water mark above ``mark`` (``nan`` without /proc)."""
    hwm = _status_kb("VmHWM")
    if mark is None or hwm is None:
        return float("nan")
    return max(0, hwm - mark) / 1024


# ------------------------------------------------------------------------------------------------ models
def load_model(quick: bool):
    """``(model, tokenizer_or_None, name)``: SmolLM2-135M real weights, or a tiny random Llama (quick)."""
    if not quick:
        from tokprune.models import load_smollm2

        model, tokenizer = load_smollm2()
        return model.eval(), tokenizer, "SmolLM2-135M-Instruct fp32"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval(), None, "tiny random Llama (quick)"


def prompt_ids(tokenizer, vocab: int, n: int) -> torch.Tensor:
    """``(1, n)`` token ids of real text (held-out stdlib source, repeated if short) or random ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(1, vocab, (1, n), generator=g)
    from tokprune.models import held_out_text

    ids = tokenizer(held_out_text(6 * n), return_tensors="pt").input_ids
    while ids.shape[1] < n:
        ids = torch.cat([ids, ids], 1)
    return ids[:, :n]


def _policies(model, budget: int, quick: bool) -> Dict[str, Callable[[], object]]:
    """Provider name -> zero-arg factory of its patch handle (a context manager)."""
    from tokprune.hf.kv_cache import use_tokprune_cache
    from tokprune.methods import FASA, Quest, StreamingLLM

    fcs = "uncalibrated"  # quick: tiny random model (no calibration)
    if not quick:
        from tokprune.demo import SMOLLM2_FCS

        fcs = SMOLLM2_FCS
    return {
        "unpatched": None,
        "cache": lambda: use_tokprune_cache(model),
        "fasa": lambda: FASA(budget=budget, fcs=fcs).patch(model),
        "quest": lambda: Quest(budget=budget).patch(model),
        "streaming": lambda: StreamingLLM(budget=budget).patch(model),
    }


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ bounds
def model_bytes(model) -> int:
    """Bytes of the parameters read per decode step (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def decode_bytes(model, provider: str, context: int, batch: int, budget: int) -> float:
    """Bytes moved per decode step by ``provider`` (lower bound of its step time under a memory-bound model).

    weights + KV read: full attention reads ``context`` tokens of K and V per layer and row; the budget
    methods read ``budget`` tokens of K and V plus what their scoring reads (FASA: the packed FC dims of
    every key, 16 of 64 dims by default, in bf16 where FASA stores them so; Quest: page min/max, 2 vectors per 16-token page); ``unpatched``
    additionally copies the whole cache in ``torch.cat`` (read + write).
    """
    cfg = model.config.get_text_config(decoder=True)
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    token_kv = layers * kv_heads * head_dim * elem  # bytes of K (or V) of one token over all layers
    full = 2 * token_kv * context * batch
    weights = model_bytes(model)
    if provider == "unpatched":
        return weights + full + 2 * full
    if provider == "cache":
        return weights + full
    kept = min(budget, context)
    sparse = 2 * token_kv * kept * batch
    if provider == "fasa":  # FASA's default packed FC keys are bf16 for an fp32 CPU model on the fused path
        fc_elem = 2 if elem == 4 and _fasa_scores_bf16(model) else elem
        return weights + sparse + token_kv * context * batch * 16 / head_dim * fc_elem / elem
    if provider == "quest":
        return weights + sparse + token_kv * (context / 16) * 2 * batch
    return weights + sparse


def _fasa_scores_bf16(model) -> bool:
    """Whether ``FASA()``'s default ``score_dtype`` stores bf16 FC keys for ``model`` (:meth:`FASA.packed_dtype`)."""
    from tokprune.methods import FASA

    p = next(model.parameters())
    return FASA(fcs="uncalibrated").packed_dtype(p.dtype, p.device) == torch.bfloat16


def prefill_flops(model, n: int, keep: Optional[float], sparse_layers: int) -> float:
    """FLOPs of a prefill of ``n`` tokens: projections/MLP ``2 * params * n`` + causal attention; sparse
    layers attend ``keep * n`` tokens to ``keep * n`` tokens (their projections stay dense)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dense_layer_attn = 2 * heads * head_dim * n * n  # QK^T and PV, causal half
    linear = 2 * (sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()) * n
    layers = cfg.num_hidden_layers
    if keep is None:
        return linear + layers * dense_layer_attn
    m = keep * n
    return linear + (layers - sparse_layers) * dense_layer_attn + sparse_layers * 2 * heads * head_dim * m * m


# ------------------------------------------------------------------------------------------------ decode
class _Stamps:
    """A logits processor that records the clock after each forward of ``generate``."""

    def __init__(self):
        self.times: List[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def prefill_kv(model, ids: torch.Tensor):
    """Keys/values per layer ``[(k, v)]`` each ``(1, Hkv, T, D)`` of a dense prefill of ``ids``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def cached_prefill_kv(model, ids: torch.Tensor, name: str, use_file: bool):
    """:func:`prefill_kv`, stored under ``benchmarks/results/prefill_kv/`` and re-used by later runs (keyed
    by model and prompt), so that the untimed prefill can be done once, outside the timing lock
    (``--prepare``)."""
    import hashlib

    from benchmarks.runner import RESULTS_DIR

    if not use_file:
        return prefill_kv(model, ids)
    digest = hashlib.sha1(f"{name}|{ids.shape}|{ids.tolist()}".encode()).hexdigest()[:16]
    path = RESULTS_DIR / "prefill_kv" / f"{digest}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file is recomputed
            print(f"(re-computing the prefill: {path.name} unreadable: {exc})")
    kv = prefill_kv(model, ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save([(k.contiguous(), v.contiguous()) for k, v in kv], tmp)
    tmp.replace(path)
    return kv


def build_cache(model, provider: str, kv, context: int, batch: int, new_tokens: int):
    """A cache holding the first ``context - 1`` prompt tokens of ``kv`` for ``batch`` identical rows."""
    from transformers import DynamicCache

    from tokprune.hf.kv_cache import TokpruneCache

    if provider == "unpatched":
        cache = DynamicCache(config=model.config)
    else:
        cache = TokpruneCache(model.config, capacity=context + new_tokens + 8)
    for i, (k, v) in enumerate(kv):
        # both caches copy what they are given (torch.cat / a write into the buffer): no clone needed
        cache.update(k[:, :, : context - 1].expand(batch, -1, -1, -1),
                     v[:, :, : context - 1].expand(batch, -1, -1, -1), i)
    return cache


def decode_once(model, provider: str, patch_factory, kv, ids, context: int, batch: int, new_tokens: int,
                measure_memory: bool = False):
    """``(median step seconds, peak MiB or nan, tokens generated)`` of one run."""
    mark = memory_mark() if measure_memory else None
    cache = build_cache(model, provider, kv, context, batch, new_tokens)
    stamps = _Stamps()
    prompt = ids[:, :context].expand(batch, -1)
    with (patch_factory() if patch_factory is not None else _Null()), torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=[stamps], pad_token_id=0)
    peak = memory_peak_mb(mark)
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
    if not steps:
        raise RuntimeError("generate produced fewer than 2 tokens; raise --new-tokens")
    del cache
    return statistics.median(steps), peak, out.shape[1] - context


def bench_decode(model, ids, args, kv) -> Dict[tuple, dict]:
    """Time every decode case; returns ``{(context, batch): {"times", "errors"}}``."""
    factories = _policies(model, args.budget, args.quick)
    providers = [p for p in args.providers if p in factories]
    results = {}
    for context in args.contexts:
        for batch in args.batches:
            times: Dict[str, List[float]] = {p: [] for p in providers}
            errors: Dict[str, str] = {}
            for r in range(args.rounds + 1):  # round 0 is the warm-up (2 new tokens)
                order = providers[r % len(providers):] + providers[: r % len(providers)]
                for p in order:
                    if p in errors:
                        continue
                    n_new = args.new_tokens if r > 0 else 2
                    try:
                        step, _, made = decode_once(model, p, factories[p], kv, ids, context, batch, n_new)
                    except Exception as exc:  # a method that cannot run here is reported, not hidden
                        errors[p] = f"{type(exc).__name__}: {exc}"
                        continue
                    if made != n_new:
                        raise RuntimeError(f"{p}: generated {made} tokens, expected {n_new}")
                    if r > 0:
                        times[p].append(step)
            results[(context, batch)] = dict(times=times, errors=errors, providers=providers)
    return results


def decode_memory(model, ids, args, kv, results) -> None:
    """One short run per decode case and provider, after all timing, with glibc returning freed blocks
    (so that the RSS high-water mark sees every allocation); adds ``peaks`` to ``results``."""
    global _LIBC
    _LIBC = _libc()
    factories = _policies(model, args.budget, args.quick)
    for (context, batch), res in results.items():
        res["peaks"] = {}
        for p in res["providers"]:
            if p in res["errors"]:
                continue
            _, peak, _ = decode_once(model, p, factories[p], kv, ids, context, batch, 3, measure_memory=True)
            res["peaks"][p] = peak


def _fmt_ratio(r: float) -> str:
    return f"x{r:5.2f}" if math.isfinite(r) else "   n/a"


def report_decode(model, args, results, rows, stamp) -> None:
    for (context, batch), res in results.items():
        _report_decode(model, args, context, batch, res["providers"], res["times"], res.get("peaks", {}),
                       res["errors"], rows, stamp)


def _report_decode(model, args, context, batch, providers, times, peaks, errors, rows, stamp) -> None:
    med = {p: statistics.median(v) * 1e3 for p, v in times.items() if v}
    case = f"decode ctx={context} batch={batch}"
    print(f"\n[{BENCH}] {case}  ({args.model_name}, {device_name(torch.device('cpu'))}, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds)")
    print(f"  {'provider':<10} {'ms/step':>9} {'tok/s':>8}   {'vs unpatched':>12} {'(bound)':>8}"
          f"   {'vs cache':>8} {'(bound)':>8}   {'peak MiB':>8}")
    base_bytes = {b: decode_bytes(model, b, context, batch, args.budget) for b in ("unpatched", "cache")}
    for p in providers:
        if p not in med:
            print(f"  {p:<10} skipped: {errors.get(p, 'no measurement')}")
            continue
        ms = med[p]
        vs_unp = med["unpatched"] / ms if "unpatched" in med else float("nan")
        vs_cache = med["cache"] / ms if "cache" in med else float("nan")
        nbytes = decode_bytes(model, p, context, batch, args.budget)
        bound_unp = base_bytes["unpatched"] / nbytes
        bound_cache = base_bytes["cache"] / nbytes
        peak = peaks.get(p, float("nan"))
        tok_s = batch * 1e3 / ms
        iqr = _iqr(times[p]) * 1e3
        print(f"  {p:<10} {ms:9.2f} {tok_s:8.1f}   {_fmt_ratio(vs_unp):>12} {_fmt_ratio(bound_unp):>8}"
              f"   {_fmt_ratio(vs_cache):>8} {_fmt_ratio(bound_cache):>8}   {peak:8.1f}")
        rows.append(_row(stamp, case, p, ms, iqr, vs_unp, "unpatched",
                         params=dict(kind="decode", context=context, batch=batch, new_tokens=args.new_tokens,
                                     rounds=args.rounds, threads=torch.get_num_threads(), budget=args.budget,
                                     model=args.model_name),
                         metrics=dict(tokens_per_s=round(tok_s, 3), ratio_vs_cache=round(vs_cache, 4),
                                      bound_vs_unpatched=round(bound_unp, 4), bound_vs_cache=round(bound_cache, 4),
                                      bytes_per_step=int(nbytes), peak_mib=round(peak, 1))))


def _iqr(values: List[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _row(stamp, case, provider, ms, iqr, ratio, baseline, params, metrics) -> dict:
    import tokprune

    return dict(date=stamp, device=device_name(torch.device("cpu")), tokprune_version=tokprune.__version__,
                torch_version=torch.__version__, backend="torch", benchmark=BENCH, case=case,
                params=json.dumps(params, sort_keys=True), provider=provider, median_ms=f"{ms:.6f}",
                iqr_ms=f"{iqr:.6f}", ratio_vs_baseline=f"{ratio:.4f}", baseline=baseline,
                metrics=json.dumps(metrics, sort_keys=True))


# ------------------------------------------------------------------------------------------------ prefill
def _token_sparse(keep: float, model):
    """``(policy, layer setting, sparse layer count)``: the paper's profiled layers where this version of
    TokenSparseAttention has them and a profile matches the model, else the second half, else its default."""
    from tokprune.methods import TokenSparseAttention

    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    for layers in ("profile", "second_half", None):
        try:
            policy = TokenSparseAttention(keep=keep, **({} if layers is None else dict(layers=layers)))
            chosen = policy.sparse_layers(model) if hasattr(policy, "sparse_layers") else None
        except (TypeError, ValueError, FileNotFoundError):
            continue
        if chosen is None:
            chosen = range(n_layers // 2, n_layers) if layers == "second_half" else range(n_layers)
        return policy, layers or "default", len(list(chosen))
    raise RuntimeError("TokenSparseAttention cannot be built for this model")


def bench_prefill(model, ids, args) -> dict:
    """Time dense vs token sparse prefill at every length (warm-up on 512 tokens, then interleaved rounds);
    the RSS high-water mark above the pre-run RSS is recorded in the timed runs (default allocator)."""
    policy, layers_desc, n_sparse = _token_sparse(args.keep, model)
    providers = {"dense": None, f"token_sparse keep={args.keep}": policy}
    names = list(providers)

    def run(p, x):
        pol = providers[p]
        with (pol.patch(model) if pol is not None else _Null()), torch.no_grad():
            start = time.perf_counter()
            model(x, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - start

    for p in names:  # warm-up
        run(p, ids[:, : min(512, ids.shape[1])])
    cases = {}
    for n in args.prefill:
        x = ids[:, :n]
        times: Dict[str, List[float]] = {p: [] for p in providers}
        peaks: Dict[str, List[float]] = {p: [] for p in providers}
        for r in range(args.prefill_rounds):
            for p in names[r % 2:] + names[: r % 2]:
                mark = memory_mark()
                times[p].append(run(p, x))
                peaks[p].append(memory_peak_mb(mark))
        cases[n] = dict(times=times, peaks=peaks)
    return dict(cases=cases, providers=providers, layers=layers_desc, n_sparse=n_sparse)


def report_prefill(model, args, res, rows: List[dict], stamp: str) -> None:
    providers, layers_desc, n_sparse = res["providers"], res["layers"], res["n_sparse"]
    for n, case_res in res["cases"].items():
        times, peaks = case_res["times"], case_res["peaks"]
        med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
        case = f"prefill n={n}"
        print(f"\n[{BENCH}] {case}  ({args.model_name}, token sparse layers={layers_desc} "
              f"({n_sparse} sparse), {args.prefill_rounds} rounds)")
        print(f"  {'provider':<24} {'ms':>10} {'tok/s':>8}   {'vs dense':>8} {'(bound)':>8}   {'peak MiB':>8}")
        dense_flops = prefill_flops(model, n, None, 0)
        for p in providers:
            flops = dense_flops if providers[p] is None else prefill_flops(model, n, args.keep, n_sparse)
            ratio = med["dense"] / med[p]
            bound = dense_flops / flops
            peak = statistics.median(peaks[p])
            print(f"  {p:<24} {med[p]:10.1f} {n * 1e3 / med[p]:8.1f}   {_fmt_ratio(ratio):>8} "
                  f"{_fmt_ratio(bound):>8}   {peak:8.1f}")
            rows.append(_row(stamp, case, p, med[p], _iqr(times[p]) * 1e3, ratio, "dense",
                             params=dict(kind="prefill", tokens=n, keep=args.keep, layers=str(layers_desc),
                                         rounds=args.prefill_rounds, threads=torch.get_num_threads(),
                                         model=args.model_name),
                             metrics=dict(tokens_per_s=round(n * 1e3 / med[p], 3), bound_vs_dense=round(bound, 4),
                                          flops=int(flops), peak_mib=round(peak, 1))))


# ------------------------------------------------------------------------------------------------ main
def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune bench e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, small sizes (CI smoke)")
    parser.add_argument("--contexts", type=_ints, default=None, help="decode contexts (default 2048,4096,8192)")
    parser.add_argument("--batches", type=_ints, default=None, help="decode batch sizes (default 1,4)")
    parser.add_argument("--providers", type=lambda s: s.split(","), default=list(DECODE_PROVIDERS),
                        help=f"decode providers, comma separated (default {','.join(DECODE_PROVIDERS)})")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per timed run (default 8)")
    parser.add_argument("--budget", type=int, default=None, help="KV budget of FASA/Quest/StreamingLLM (256)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved decode rounds after a warm-up (2)")
    parser.add_argument("--prefill", type=_ints, default=None, help="prefill lengths (default 4096,8192,16384)")
    parser.add_argument("--prefill-rounds", type=int, default=None,
                        help="interleaved prefill rounds after a 512-token warm-up (2)")
    parser.add_argument("--keep", type=float, default=0.25, help="token sparse keep fraction")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--prepare", action="store_true",
                        help="only compute and store the untimed prefill of the decode cases, then exit (run this "
                             "outside the timing lock)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(contexts=[64, 160] if quick else [2048, 4096, 8192], batches=[1, 2] if quick else [1, 4],
                    new_tokens=5 if quick else 8, budget=32 if quick else 256, rounds=2 if quick else 2,
                    prefill=[96] if quick else [4096, 8192, 16384], prefill_rounds=1 if quick else 2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)

    model, tokenizer, args.model_name = load_model(quick)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    longest = max(args.contexts + args.prefill)
    ids = prompt_ids(tokenizer, vocab, longest)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    rows: List[dict] = []
    print(f"tokprune bench e2e: {args.model_name}, {torch.get_num_threads()} thread(s), "
          f"weights {model_bytes(model) / 1e6:.0f} MB")
    decode = prefill = None
    kv = None
    if args.contexts and args.providers:
        t0 = time.perf_counter()
        kv = cached_prefill_kv(model, ids[:, : max(args.contexts)], args.model_name, not args.quick)
        print(f"(prefill of {max(args.contexts)} tokens for the decode cases: {time.perf_counter() - t0:.1f} s, "
              f"untimed, stored for re-use)")
        if args.prepare:
            return 0
        decode = bench_decode(model, ids, args, kv)
    if args.prefill:
        prefill = bench_prefill(model, ids, args)
    if decode is not None:
        if not args.no_memory:  # after all timing: it changes the allocator's settings
            decode_memory(model, ids, args, kv, decode)
        report_decode(model, args, decode, rows, stamp)
    del kv
    if prefill is not None:
        report_prefill(model, args, prefill, rows, stamp)
    if rows:
        path = append_rows(BENCH, rows)
        print(f"\nrows appended to {path}")
        if not args.no_plot:
            try:
                from benchmarks.plot import plot_e2e

                print(f"plot: {plot_e2e(path, stamp)}")
            except ImportError as exc:
                print(f"plot skipped: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
