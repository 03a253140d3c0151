"""UNComp on the real SmolLM2-135M: KV bytes kept and next-token agreement with the full cache.

    tokprune eval uncomp [--prompt-len 512] [--steps 24] [--samples 2] [--ratios 0.5 0.25 0.1]
    tokprune eval uncomp --configs split stages split+prefill stages+prefill [--timing-rounds 5] [--threads 1]

``--configs`` compares layer groupings (``split``: tokprune's 2:1 entropy split; ``stages``: the offline
stage division) with and without prefill hidden-state compression (``+prefill``); ``--timing-rounds``
adds prefill time (median over interleaved rounds, after one warm-up round, of the prompt forward incl.
UNComp's cache compression) and its ratio to the unpatched full prefill timed in the same rounds.

Held-out real text (Python standard-library sources, :func:`tokprune.models.held_out_text`) is cut
into ``samples`` windows of ``prompt_len + steps`` tokens. Each window's prompt is prefilled, the
cache compressed by UNComp, and the next ``steps`` real tokens are teacher-forced through decode.
Agreement = fraction of decode positions where the compressed model's argmax equals the full-cache
model's argmax; accuracy = argmax equals the real next token.
"""

from __future__ import annotations

import argparse
import time
import statistics
from contextlib import nullcontext
from typing import Dict, List, Tuple

import torch

from tokprune.methods.uncomp import UNComp


def prompt_ids(tokenizer, n_tokens: int, *, samples: int = 1) -> torch.Tensor:
    """``(samples, n_tokens)`` consecutive non-overlapping windows of the held-out text's tokens."""
    from tokprune.models import held_out_text

    chars = 4 * n_tokens * samples + 2000
    ids = tokenizer(held_out_text(min_chars=chars), return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens * samples:
        raise ValueError(f"held-out text has {ids.numel()} tokens, need {n_tokens * samples}")
    return ids[: n_tokens * samples].view(samples, n_tokens)


@torch.no_grad()
def _full_cache_logits(model, ids: torch.Tensor, prompt_len: int, steps: int) -> torch.Tensor:
    out = model(ids[:, :prompt_len], use_cache=True)
    cache, logits = out.cache, [out.logits[:, -1]]
    for i in range(steps - 1):
        logits.append(model(ids[:, prompt_len + i:prompt_len + i + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


@torch.no_grad()
def _uncomp_logits(model, ids: torch.Tensor, prompt_len: int, steps: int, method: UNComp):
    """Teacher-forced decode on the cache UNComp compressed after the prompt's forward (positions given
    explicitly: the compacted cache is shorter than the sequence)."""
    with method.patch(model):
        out = model(ids[:, :prompt_len], use_cache=True)
        cache, logits = out.cache, [out.logits[:, -1]]
        for i in range(steps - 1):
            pos = torch.full((ids.shape[0], 1), prompt_len + i, dtype=torch.long)
            logits.append(model(ids[:, prompt_len + i:prompt_len + i + 1], cache=cache, use_cache=True,
                                position_ids=pos).logits[:, -1])
        return torch.stack(logits, 1), method.kv_bytes()


def next_token_agreement(model, ids: torch.Tensor, *, prompt_len: int, steps: int, ratio: float,
                         reference: torch.Tensor = None, **uncomp_kwargs) -> Dict[str, float]:
    """Compare UNComp(ratio) with the full cache on ``ids (batch, prompt_len + steps)``.

    Returns ``agreement`` (argmax equal to the full cache's), ``accuracy`` / ``accuracy_full``
    (argmax equal to the real next token), ``kept_bytes``, ``allocated_bytes``, ``full_bytes``.
    ``reference`` may pass precomputed full-cache logits ``(batch, steps, vocab)``.
    """
    if ids.shape[1] < prompt_len + steps:
        raise ValueError(f"ids needs prompt_len + steps = {prompt_len + steps} tokens, has {ids.shape[1]}")
    full = _full_cache_logits(model, ids, prompt_len, steps) if reference is None else reference
    if uncomp_kwargs.get("prefill_compression"):  # batch 1 only: one row at a time
        rows = [_uncomp_logits(model, ids[i:i + 1], prompt_len, steps, UNComp(ratio=ratio, **uncomp_kwargs))
                for i in range(ids.shape[0])]
        comp = torch.cat([r[0] for r in rows])
        sizes = {k: sum(r[1][k] for r in rows) for k in ("kept", "allocated", "full")}
    else:
        comp, sizes = _uncomp_logits(model, ids, prompt_len, steps, UNComp(ratio=ratio, **uncomp_kwargs))
    target = ids[:, prompt_len:prompt_len + steps]
    return dict(agreement=float((comp.argmax(-1) == full.argmax(-1)).float().mean()),
                accuracy=float((comp.argmax(-1) == target).float().mean()),
                accuracy_full=float((full.argmax(-1) == target).float().mean()),
                kept_bytes=sizes["kept"], allocated_bytes=sizes["allocated"], full_bytes=sizes["full"])


CONFIGS = {
    "split": dict(layer_groups="split"),
    "stages": dict(layer_groups="stages"),
    "split+prefill": dict(layer_groups="split", prefill_compression=True),
    "stages+prefill": dict(layer_groups="stages", prefill_compression=True),
}


@torch.no_grad()
def prefill_times(model, prompt: torch.Tensor, configs: Dict[str, dict], *, ratio: float,
                  rounds: int) -> Dict[str, float]:
    """Median seconds of one prompt forward ``prompt (1, n)`` per config (``"full"``: unpatched), the
    configs interleaved in every round (order rotated), one warm-up round discarded."""
    names = ["full"] + list(configs)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            policy = None if name == "full" else UNComp(ratio=ratio, **configs[name])
            with (policy.patch(model) if policy is not None else nullcontext()):
                t0 = time.perf_counter()
                model(prompt, use_cache=True)
                elapsed = time.perf_counter() - t0
            if r:
                times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def _prefill_lengths(model, prompt: torch.Tensor, config: dict, ratio: float) -> Tuple[int, float]:
    """(layers running on fewer tokens, mean fraction of tokens per layer) of one compressed prefill."""
    policy = UNComp(ratio=ratio, **config)
    with policy.patch(model) as handle, torch.no_grad():
        model(prompt, use_cache=True)
        info = handle.info.get("prefill")
    if not info:
        return 0, 1.0
    n = info["tokens"]
    return sum(m < n for m in info["lengths"]), sum(info["lengths"]) / (n * len(info["lengths"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune eval uncomp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--source", choices=("query", "key"), default="query")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                        help="layer groupings x prefill compression to compare (default: tokprune's split only)")
    parser.add_argument("--prefill-min-keep", type=float, default=0.375)
    parser.add_argument("--timing-rounds", type=int, default=0, help="prefill timing rounds (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--timing-only", action="store_true", help="with --configs: prefill timing only")
    args = parser.parse_args(argv)
    from tokprune.models import load_smollm2_for_command

    loaded = load_smollm2_for_command(args.threads)
    if loaded is None:
        return 2
    torch.manual_seed(0)
    model, tokenizer = loaded
    ids = prompt_ids(tokenizer, args.prompt_len + args.steps, samples=args.samples)
    t0 = time.perf_counter()
    reference = _full_cache_logits(model, ids, args.prompt_len, args.steps)
    print(f"SmolLM2-135M, {args.samples} windows x ({args.prompt_len} prompt + {args.steps} teacher-forced) "
          f"tokens of held-out stdlib source; full cache {time.perf_counter() - t0:.1f} s")
    if args.configs:
        return _compare_configs(model, ids, reference, args)
    print(f"{'ratio':>6} {'KV kept':>10} {'KV alloc':>10} {'KV full':>10} {'kept %':>7} "
          f"{'agree':>6} {'acc':>6} {'acc full':>8} {'time s':>7}")
    for ratio in args.ratios:
        t0 = time.perf_counter()
        r = next_token_agreement(model, ids, prompt_len=args.prompt_len, steps=args.steps, ratio=ratio,
                                 reference=reference, source=args.source)
        mib = 1 / 2 ** 20
        print(f"{ratio:6.2f} {r['kept_bytes'] * mib:8.2f}Mi {r['allocated_bytes'] * mib:8.2f}Mi "
              f"{r['full_bytes'] * mib:8.2f}Mi {100 * r['kept_bytes'] / r['full_bytes']:6.1f}% "
              f"{r['agreement']:6.3f} {r['accuracy']:6.3f} {r['accuracy_full']:8.3f} {time.perf_counter() - t0:7.1f}")
    return 0



def _compare_configs(model, ids, reference, args) -> int:
    configs = {name: dict(CONFIGS[name], source=args.source,
                          **({"prefill_min_keep": args.prefill_min_keep} if "prefill" in name else {}))
               for name in args.configs}
    prompt = ids[:1, :args.prompt_len]
    for name, config in configs.items():
        if args.timing_only:
            break
        cut, frac = _prefill_lengths(model, prompt, config, args.ratios[0])
        print(f"{name}: {cut} layers run on fewer tokens; mean tokens per layer {100 * frac:.1f}% of the prompt")
    if not args.timing_only:
        print(f"{'config':>15} {'ratio':>6} {'kept %':>7} {'agree':>6} {'acc':>6} {'acc full':>8}")
    for name, config in configs.items():
        for ratio in args.ratios if not args.timing_only else ():
            r = next_token_agreement(model, ids, prompt_len=args.prompt_len, steps=args.steps, ratio=ratio,
                                     reference=reference, **config)
            print(f"{name:>15} {ratio:6.2f} {100 * r['kept_bytes'] / r['full_bytes']:6.1f}% {r['agreement']:6.3f} "
                  f"{r['accuracy']:6.3f} {r['accuracy_full']:8.3f}")
    if args.timing_rounds:
        times = prefill_times(model, prompt, configs, ratio=args.ratios[0], rounds=args.timing_rounds)
        print(f"prefill of {args.prompt_len} tokens, ratio {args.ratios[0]}, median of {args.timing_rounds} "
              f"interleaved rounds, {torch.get_num_threads()} thread(s):")
        for name, t in times.items():
            print(f"{name:>15} {1000 * t:9.1f} ms  speed-up vs full {times['full'] / t:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
