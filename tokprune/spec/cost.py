"""Cost model of a tree step: target-forward time as a function of tree size, measured once per
(device, model, dtype, threads) and cached, and the Token Recycling tree it implies.

A speculative step with an ``N``-node tree costs one target forward ``t(N)`` and yields
``E[accepted + 1 | tree]`` tokens, so the tree to use maximises ``(1 + E[accepted]) / t(N)``.
``E[accepted]`` of a Token Recycling template is :meth:`RecyclingTemplate.expected_accepted` under
per-rank acceptance probabilities (``rank_probs``). ``t(N)`` is measured by :func:`forward_cost` on
the real model (prefix of ``context`` tokens, tree forwards exactly as :func:`tokprune.spec.generate`
runs them, interleaved rounds, medians) and stored as a small JSON file in the user cache directory
(``$TOKPRUNE_CACHE``, default ``~/.cache/tokprune/spec_cost.json``); nothing is written inside the
package.

On a GPU a forward of ~100 tokens costs about as much as a forward of one (weights are read once either
way), so :func:`choose_recycling_template` returns the paper's 81-node template there without
measuring; on a CPU it measures (once) and picks the size that maximises expected tokens/s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from tokprune.spec.trees import RecyclingTemplate, paper_template, recycling_template

DEFAULT_SIZES = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 81)
# Assumed probability that the rank-r candidate of a node is the target's next token (ranks are
# exclusive events); ``tokprune bench spec`` prints the measured per-rank acceptance to check it.
DEFAULT_RANK_PROBS = tuple(0.45 * 0.5 ** r for r in range(8))


def cache_file() -> Path:
    """Where measured cost tables live: ``$TOKPRUNE_CACHE/spec_cost.json`` (default ``~/.cache/tokprune``)."""
    root = os.environ.get("TOKPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tokprune"))
    return Path(root) / "spec_cost.json"


def cost_key(model, device: Optional[torch.device] = None) -> str:
    """``device | model fingerprint | dtype | threads`` identifying one cost table."""
    p = next(model.parameters())
    device = device or p.device
    cfg = getattr(model, "config", None)
    text = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)
    n_params = sum(x.numel() for x in model.parameters())
    fp = hashlib.sha1(f"{text}|{n_params}".encode()).hexdigest()[:12]
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        import platform

        dev = f"cpu:{platform.processor() or platform.machine()}"
    return f"{dev}|{type(model).__name__}:{fp}|{str(p.dtype).replace('torch.', '')}|threads={torch.get_num_threads()}"


def measure_forward_cost(model, sizes: Sequence[int] = DEFAULT_SIZES, *, context: int = 256, rounds: int = 5,
                         packed_weights: Optional[bool] = None) -> Dict[int, float]:
    """Median wall time (ms) of one target forward on a chain of ``n`` new tokens after ``context``
    cached tokens, for every ``n`` in ``sizes``; rounds interleave the sizes; one warm-up round.

    The forward is the one :func:`tokprune.spec.generate` runs (explicit 4D mask, preallocated cache,
    packed weights on the CPU, folded-GQA tree attention on SDPA models); the cache is cropped back to ``context`` after every forward.

    Returns:
        ``{n: ms}``.
    """
    from tokprune.spec import _kv
    from tokprune.spec._attention import tree_attention
    from tokprune.spec._linear import packed_linears

    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be positive ints, got {sizes}")
    p = next(model.parameters())
    vocab = int(getattr(model.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(p.device)
    cache = _kv.new_cache(model)
    times: Dict[int, List[float]] = {n: [] for n in sizes}
    with torch.no_grad():
        _kv.forward_prompt(model, cache, prompt, torch.ones_like(prompt), logits_to_keep=1)
        with packed_linears(model, enabled=packed_weights is not False), tree_attention(model):
            for r in range(rounds + 1):
                for n in sizes:
                    toks = torch.randint(0, vocab, (1, n), generator=g).to(p.device)
                    pos = torch.arange(context, context + n, device=p.device).view(1, -1)
                    causal = torch.ones(n, n, dtype=torch.bool, device=p.device).tril()
                    vis = torch.cat([torch.ones(1, n, context, dtype=torch.bool, device=p.device),
                                     causal.unsqueeze(0)], 2)
                    if p.device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    logits = _kv.forward_chunk(model, cache, toks, pos, vis)
                    float(logits[0, -1, 0])  # wait for the result
                    dt = time.perf_counter() - t0
                    _kv.crop_cache(cache, context)
                    if r:
                        times[n].append(dt * 1e3)
    return {n: sorted(v)[len(v) // 2] for n, v in times.items()}


def _load() -> dict:
    path = cache_file()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def forward_cost(model, *, refresh: bool = False, sizes: Sequence[int] = DEFAULT_SIZES,
                 **measure_kwargs) -> Dict[int, float]:
    """The cost table ``{tree size: ms}`` of ``model`` on its device with the current thread count:
    read from :func:`cache_file`, or measured with :func:`measure_forward_cost` and stored there
    (``refresh=True`` re-measures)."""
    key = cost_key(model)
    table = _load()
    if not refresh and key in table:
        return {int(n): float(ms) for n, ms in table[key]["ms"].items()}
    cost = measure_forward_cost(model, sizes, **measure_kwargs)
    table = _load()
    table[key] = {"ms": {str(n): ms for n, ms in cost.items()}, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # read-only home: use the measurement without caching it
    return cost


def interpolate_cost(cost: Mapping[int, float], n: int) -> float:
    """``t(n)`` from a cost table: linear between measured sizes, linear extrapolation from the two
    largest (or smallest) sizes outside, never below the smallest measured time."""
    if not cost:
        raise ValueError("cost table is empty")
    xs = sorted(int(k) for k in cost)
    if n in cost:
        return float(cost[n])
    if len(xs) == 1:
        return float(cost[xs[0]])
    if n < xs[0]:
        a, b = xs[0], xs[1]
    elif n > xs[-1]:
        a, b = xs[-2], xs[-1]
    else:
        b = next(x for x in xs if x > n)
        a = max(x for x in xs if x < n)
    ta, tb = float(cost[a]), float(cost[b])
    t = ta + (tb - ta) * (n - a) / (b - a)
    return max(t, min(float(v) for v in cost.values()))


def expected_tokens_per_ms(template: RecyclingTemplate, cost: Mapping[int, float],
                           rank_probs: Sequence[float] = DEFAULT_RANK_PROBS) -> float:
    """``(1 + E[accepted]) / t(N)``: expected tokens per millisecond of target forward."""
    k = int(template.ranks.max()) + 1 if template.num_nodes > 1 else 1
    return (1.0 + template.expected_accepted(_extend(rank_probs, k))) / interpolate_cost(cost, template.num_nodes)


def _extend(rank_probs: Sequence[float], k: int) -> List[float]:
    probs = [float(p) for p in rank_probs]
    if not probs:
        raise ValueError("rank_probs is empty")
    while len(probs) < k:
        probs.append(probs[-1] * 0.5)
    return probs


def candidate_templates(k: int = 8, sizes: Iterable[int] = DEFAULT_SIZES,
                        rank_probs: Sequence[float] = DEFAULT_RANK_PROBS) -> List[RecyclingTemplate]:
    """Templates compared by :func:`choose_template`, one per size: with ``k >= 8`` the paper's template
    pruned to its ``n`` most likely nodes (:meth:`RecyclingTemplate.prune`; ``n >= 81`` is the paper's
    template itself), else :func:`recycling_template` grown by ``rank_probs``."""
    probs = _extend(rank_probs, k)
    sizes = sorted({int(n) for n in sizes if int(n) >= 1})
    if k >= 8:
        paper = paper_template()
        return [paper.prune(min(n, paper.num_nodes), probs) for n in sizes]
    return [recycling_template(n, k, rank_probs=probs[:k]) for n in sizes]


def choose_template(cost: Mapping[int, float], candidates: Sequence[RecyclingTemplate],
                    rank_probs: Sequence[float] = DEFAULT_RANK_PROBS) -> Tuple[RecyclingTemplate, float]:
    """The candidate maximising :func:`expected_tokens_per_ms` (the smaller tree on ties), and that value."""
    if not candidates:
        raise ValueError("candidates is empty")
    best, best_v = None, -math.inf
    for t in sorted(candidates, key=lambda t: t.num_nodes):  # stable: equal sizes keep their order
        v = expected_tokens_per_ms(t, cost, rank_probs)
        if v > best_v * (1 + 1e-9):
            best, best_v = t, v
    return best, best_v


def choose_recycling_template(model, k: int = 8, *, rank_probs: Sequence[float] = DEFAULT_RANK_PROBS,
                              refresh: bool = False) -> RecyclingTemplate:
    """Token Recycling's default tree for ``model`` on its device: the paper's template on a GPU
    (``k >= 8``); on a CPU the candidate of :func:`candidate_templates` with the highest expected
    tokens/s under the measured, cached :func:`forward_cost`."""
    dev = next(model.parameters()).device
    if dev.type == "cuda" and k >= 8:
        return paper_template()
    cost = forward_cost(model, refresh=refresh)
    sizes = [n for n in DEFAULT_SIZES if n <= max(cost)]
    best, _ = choose_template(cost, candidate_templates(k, sizes, rank_probs), rank_probs)
    return best
