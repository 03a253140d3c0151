"""FASA calibration: ranking the dominant frequency chunks (FCs) of a model.

One prefill over a calibration text records post-RoPE queries and keys of every layer; for the last
``n_queries`` positions and every head, each FC's partial logits ``q_c . k_c`` are compared with the full
logits ``q . k`` by *top-k agreement* ``|top_k(partial) ∩ top_k(full)| / k`` over the causal keys. Agreement
is averaged over the query heads of a KV group (one FC set per KV head, which the packed key layout needs)
and the FCs are ranked per (layer, KV head). ``FASA(num_fcs=F)`` uses the first ``F`` of that ranking.

``tokprune.methods.fasa`` re-exports everything public here.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import torch

FORMAT = "tokprune-fasa-fcs/1"


@dataclass
class FCCalibration:
    """Dominant-FC ranking of a model: ``ranking (layers, kv_heads, n_fc)`` FC ids, best first, and the
    matching ``agreement`` (mean top-k agreement with full attention, in [0, 1])."""

    ranking: torch.Tensor
    agreement: torch.Tensor
    head_dim: int
    chunk: int = 1
    meta: Dict[str, Any] = field(default_factory=dict)

    def fc_index(self, layer: int, num_fcs: int) -> torch.Tensor:
        """``(kv_heads, num_fcs)`` int64 dominant FCs of ``layer``."""
        if not 0 <= layer < self.ranking.shape[0]:
            raise IndexError(f"calibration has {self.ranking.shape[0]} layers, asked for layer {layer}")
        return self.ranking[layer, :, :num_fcs]

    def save(self, path) -> None:
        """Write ``.json`` (lists) or anything else as a ``torch.save`` dict."""
        payload = dict(format=FORMAT, head_dim=self.head_dim, chunk=self.chunk, meta=self.meta,
                       ranking=self.ranking.long(), agreement=self.agreement.float())
        if str(path).endswith(".json"):
            payload = dict(payload, ranking=payload["ranking"].tolist(), agreement=payload["agreement"].tolist())
            Path(path).write_text(json.dumps(payload))
        else:
            torch.save(payload, path)

    @classmethod
    def load(cls, source) -> "FCCalibration":
        """From a path (``.json`` or ``.pt``), a dict in the saved format, or an ``FCCalibration``."""
        if isinstance(source, FCCalibration):
            return source
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"FASA calibration file {path} does not exist "
                                        f"(create it with: tokprune calibrate fasa --out {path})")
            source = json.loads(path.read_text()) if path.suffix == ".json" else torch.load(path, weights_only=True)
        if not isinstance(source, dict) or source.get("format") != FORMAT:
            raise ValueError(f"not a FASA calibration (expected a dict with format={FORMAT!r})")
        ranking = torch.as_tensor(source["ranking"], dtype=torch.long)
        if ranking.dim() != 3:
            raise ValueError(f"calibration ranking must be (layers, kv_heads, n_fc), got {tuple(ranking.shape)}")
        return cls(ranking, torch.as_tensor(source["agreement"], dtype=torch.float32), int(source["head_dim"]),
                   int(source.get("chunk", 1)), dict(source.get("meta", {})))


# ----------------------------------------------------------------------------------------------------------
# Calibration


class _Recorder:
    """Prefill policy that keeps post-RoPE queries (last ``n_queries``) and keys per layer; SDPA computes."""

    def __init__(self, n_queries: int):
        self.n_queries = n_queries
        self.queries: Dict[int, torch.Tensor] = {}
        self.keys: Dict[int, torch.Tensor] = {}

    def attend(self, module, query, key, value, attention_mask, scale, **kwargs):
        self.queries[module.layer_idx] = query[0, :, -self.n_queries:].detach().float().clone()
        self.keys[module.layer_idx] = key[0].detach().float().clone()
        return None


def fc_agreement(queries: torch.Tensor, keys: torch.Tensor, *, topk: int = 32, chunk: int = 1) -> torch.Tensor:
    """Top-k agreement of every FC's partial logits with the full logits, per query head.

    Args:
        queries: ``(heads, P, D)`` post-RoPE queries of the last ``P`` positions of the sequence.
        keys: ``(kv_heads, T, D)`` post-RoPE keys of the whole sequence (query ``i`` sits at ``T - P + i``
            and sees keys ``<= T - P + i``).
        topk: ``k`` of the agreement (clamped to the number of visible keys).
        chunk: pairs per FC.

    Returns:
        ``(n_fc, heads)`` fp32 mean of ``|top_k(partial) ∩ top_k(full)| / k`` over the queries.
    """
    heads, n_q, head_dim = queries.shape
    kv_heads, n_tokens, _ = keys.shape
    group = heads // kv_heads
    n_fc = head_dim // (2 * chunk)
    k = keys.repeat_interleave(group, 0)  # (H, T, D)
    pos = torch.arange(n_tokens - n_q, n_tokens)
    visible = torch.arange(n_tokens)[None, :] <= pos[:, None]  # (P, T)
    kk = max(1, min(topk, n_tokens - n_q + 1))
    # per-pair products summed within each FC: (n_fc, H, P, T)
    q2 = queries.view(heads, n_q, 2, n_fc, chunk)
    k2 = k.view(heads, n_tokens, 2, n_fc, chunk)
    partial = torch.einsum("hpsfc,htsfc->fhpt", q2, k2)
    full = partial.sum(0)
    neg = float("-inf")
    full = full.masked_fill(~visible, neg)
    partial = partial.masked_fill(~visible, neg)
    top_full = torch.zeros(heads, n_q, n_tokens, dtype=torch.bool)
    top_full.scatter_(-1, full.topk(kk, dim=-1).indices, True)
    hits = torch.gather(top_full.expand(n_fc, -1, -1, -1), -1, partial.topk(kk, dim=-1).indices)
    return hits.float().mean(-1).mean(-1)  # (n_fc, H)


def calibrate(model, tokenizer, text: str, *, n_tokens: int = 1024, n_queries: int = 64, topk: int = 32,
              chunk: int = 1) -> FCCalibration:
    """Rank the frequency chunks of every layer / KV head of ``model`` by agreement with full attention.

    One prefill over the first ``n_tokens`` tokens of ``text`` (batch 1); see :func:`fc_agreement`.
    """
    from tokprune.hf.attention import attention_modules, patch_attention

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_queries + topk:
        raise ValueError(f"calibration text has {ids.shape[1]} tokens; need at least n_queries+topk="
                         f"{n_queries + topk}")
    recorder = _Recorder(n_queries)
    with patch_attention(model, prefill=recorder), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    layers = [m.layer_idx for m in attention_modules(model)]
    rankings, agreements = [], []
    for layer in layers:
        q, k = recorder.queries[layer], recorder.keys[layer]
        per_head = fc_agreement(q, k, topk=topk, chunk=chunk)  # (n_fc, H)
        kv_heads = k.shape[0]
        per_kv = per_head.view(per_head.shape[0], kv_heads, -1).mean(-1).T  # (Hkv, n_fc)
        order = torch.sort(per_kv, dim=-1, descending=True, stable=True)
        rankings.append(order.indices)
        agreements.append(order.values)
    meta = dict(n_tokens=int(ids.shape[1]), n_queries=n_queries, topk=topk,
                model=getattr(model.config, "_name_or_path", "") or type(model).__name__)
    head_dim = recorder.keys[layers[0]].shape[-1]
    return FCCalibration(torch.stack(rankings), torch.stack(agreements), head_dim, chunk, meta)


def calibration_text(name: str) -> str:
    """``'stdlib'``: Python standard-library sources *different* from the evaluation text of
    :func:`tokprune.models.held_out_text`; otherwise a path to a text file."""
    if name == "stdlib":
        import inspect

        import calendar, fractions, shlex, string  # noqa: E401

        return "\n".join(inspect.getsource(m) for m in (shlex, calendar, fractions, string))
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"--text {name!r}: no such file (or use 'stdlib')")
    return path.read_text()


def calibrate_main(argv=None) -> int:
    """``tokprune calibrate fasa --model smollm2 --text stdlib --out fcs.pt``."""
    parser = argparse.ArgumentParser(prog="tokprune calibrate fasa", description=calibrate.__doc__)
    parser.add_argument("--model", default="smollm2", choices=["smollm2"])
    parser.add_argument("--text", default="stdlib", help="text file, or 'stdlib' (default)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--out", default="fcs.pt", help="output file (.pt or .json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokprune.models import load_smollm2

    model, tokenizer = load_smollm2()
    cal = calibrate(model, tokenizer, calibration_text(args.text), n_tokens=args.tokens, n_queries=args.queries,
                    topk=args.topk, chunk=args.chunk)
    cal.meta["model"] = "SmolLM2-135M-Instruct"
    cal.meta["text"] = args.text
    cal.save(args.out)
    n_fc = cal.ranking.shape[-1]
    f = max(1, n_fc // 4)
    print(f"calibrated {cal.ranking.shape[0]} layers x {cal.ranking.shape[1]} KV heads, {n_fc} FCs each "
          f"(chunk={cal.chunk}) on {cal.meta['n_tokens']} tokens -> {args.out}")
    print(f"mean top-{args.topk} agreement of the best FC: {cal.agreement[..., 0].mean():.3f}, "
          f"of the {f}th best: {cal.agreement[..., f - 1].mean():.3f}, of the median FC: "
          f"{cal.agreement[..., n_fc // 2].mean():.3f}")
    return 0
