"""FASA (Frequency-Aware Sparse Attention) as a decode policy, and its calibration.

FASA scores every cached key with the partial logit of a few *dominant* frequency chunks (FCs, RoPE
rotation pairs; layout in :mod:`tokprune.ops.fasa`), keeps the ``budget`` best tokens (the ``sink`` first
and ``window`` most recent always among them) and runs exact attention over those only. Prefill is full
attention; the KV cache stays complete (tokens are selected per step, never evicted).

Calibration (:func:`calibrate`, ``tokprune calibrate fasa``): one prefill over a calibration text records
post-RoPE queries and keys of every layer; for the last ``n_queries`` positions and every head, each FC's
partial logits ``q_c . k_c`` are compared with the full logits ``q . k`` by *top-k agreement*
``|top_k(partial) ∩ top_k(full)| / k`` over the causal keys. Agreement is averaged over the query heads of a
KV group (so one FC set per KV head, which the packed key layout needs) and the FCs are ranked per
(layer, KV head). ``FASA(num_fcs=F)`` uses the first ``F`` of that ranking.

Usage::

    from tokprune.methods import FASA
    policy = FASA(budget=256, sink=4, window=64, fcs="fcs.pt")   # from `tokprune calibrate fasa`
    with policy.patch(model):
        model.generate(**inputs, max_new_tokens=64)
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from tokprune.methods.base import DecodeContext, KVPolicy
from tokprune.ops.fasa import fc_scores
from tokprune.reference.fasa import fc_dims

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


@dataclass
class FASA(KVPolicy):
    """Frequency-chunk sparse attention in decode.

    Args:
        budget: tokens attended per KV head and step (sinks and window included).
        sink, window: first / most recent valid tokens always kept.
        fcs: calibration (path to a ``tokprune calibrate fasa`` file, :class:`FCCalibration` or its dict),
            or ``None`` for an uncalibrated fallback: the ``num_fcs`` lowest-frequency pairs.
        num_fcs: FCs per KV head (default: a quarter of the head's FCs).
        chunk: pairs per FC (must match the calibration).
        aggregate: how the query heads of a KV group vote: ``"softmax"`` (sum of each head's softmax over
            its partial logits), ``"max"`` or ``"mean"`` of the partial logits.
        packed: on tokprune's KV cache, score from a packed copy of the FC dimensions of the keys (a side
            buffer of the cache, written once per appended token: ``2*chunk*num_fcs`` contiguous values per
            token); ``False`` (or another cache) reads the FC dims of the keys in place (strided).
        decline_ratio: dense attention while ``n_tokens < decline_ratio * budget`` (``None``:
            :attr:`DECLINE_RATIO`, fitted from measured step times; see :meth:`declines`). ``budget >=
            n_tokens`` always declines.
        selection: ``"group"`` (one token set per KV head from the group's aggregated scores, ``aggregate``)
            or ``"head"`` (as the FASA reference: every query head selects its own ``budget`` tokens from its
            raw partial logits; ``aggregate`` is not used).
        dense_layers: layers that always attend densely (the reference keeps layer 0 dense: ``(0,)``).
        backend: op backend (``None`` = auto).
    """

    fcs: Any = None
    num_fcs: Optional[int] = None
    chunk: int = 1
    aggregate: str = "softmax"
    packed: bool = True
    selection: str = "group"
    dense_layers: Tuple[int, ...] = ()
    _calibration: Optional[FCCalibration] = field(default=None, init=False, repr=False, compare=False)
    _fc_cache: Dict[tuple, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    #: dense attention while ``n_tokens < DECLINE_RATIO * budget``, fitted from measured step times
    DECLINE_RATIO = 4.0

    def __post_init__(self):
        super().__post_init__()
        if self.aggregate not in ("softmax", "max", "mean"):
            raise ValueError(f"FASA: aggregate must be 'softmax', 'max' or 'mean', got {self.aggregate!r}")
        if self.selection not in ("group", "head"):
            raise ValueError(f"FASA: selection must be 'group' or 'head', got {self.selection!r}")
        if isinstance(self.dense_layers, int) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.dense_layers):
            raise ValueError(f"FASA: dense_layers must be a sequence of layer indices >= 0, got {self.dense_layers!r}")
        self.dense_layers = tuple(self.dense_layers)
        if self.num_fcs is not None and (isinstance(self.num_fcs, bool) or not isinstance(self.num_fcs, int)
                                         or self.num_fcs < 1):
            raise ValueError(f"FASA: num_fcs must be a positive int, got {self.num_fcs!r}")
        if self.fcs is not None:
            self._calibration = FCCalibration.load(self.fcs)
            if self._calibration.chunk != self.chunk:
                raise ValueError(f"FASA: chunk={self.chunk} but the calibration used chunk={self._calibration.chunk}")

    def bind(self, model) -> None:
        """Check the calibration against ``model`` (layers, KV heads, head dim) before anything is patched."""
        cal = self._calibration
        if cal is None:
            return
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
        if (cal.ranking.shape[0], cal.ranking.shape[1], cal.head_dim) != (layers, kv_heads, head_dim):
            raise ValueError(f"FASA calibration is for layers={cal.ranking.shape[0]}, kv_heads={cal.ranking.shape[1]}, "
                             f"head_dim={cal.head_dim}; the model has layers={layers}, kv_heads={kv_heads}, "
                             f"head_dim={head_dim}")

    def declines(self, n_tokens: int, ctx=None) -> bool:
        """Dense attention wins below ``decline_ratio * budget`` cached tokens (and always at ``budget >= T``).

        The cost rule: a FASA step costs scoring (reads ``T`` packed FC keys) + top-k + attention over
        ``budget`` tokens; dense attention reads all ``T`` keys and values. The break-even ``T`` is about a
        constant multiple ``c`` of the budget; ``c`` (:attr:`DECLINE_RATIO`) was fitted from the per-step
        times printed by ``python -m benchmarks.bench_fasa_decline`` (single-layer decode step, 1 thread).
        ``dense_layers`` always decline.
        """
        if ctx is not None and ctx.layer_idx in self.dense_layers:
            return True
        return super().declines(n_tokens, ctx)

    def fc_index(self, layer: int, kv_heads: int, head_dim: int, device) -> torch.Tensor:
        """``(kv_heads, num_fcs)`` int64 FC ids of ``layer`` on ``device`` (cached per layer and device)."""
        key = (layer, kv_heads, head_dim, str(device))
        index = self._fc_cache.get(key)
        if index is not None:
            return index
        n_fc = head_dim // (2 * self.chunk)
        num = min(self.num_fcs or max(1, n_fc // 4), n_fc)
        cal = self._calibration
        if cal is None:
            index = torch.arange(n_fc - num, n_fc).expand(kv_heads, -1)
        else:
            if cal.head_dim != head_dim or cal.ranking.shape[1] != kv_heads:
                raise ValueError(f"FASA calibration is for head_dim={cal.head_dim}, kv_heads={cal.ranking.shape[1]}; "
                                 f"the model has head_dim={head_dim}, kv_heads={kv_heads}")
            index = cal.fc_index(layer, num)
        index = index.contiguous().to(device)
        self._fc_cache[key] = index
        return index

    @property
    def per_head(self) -> bool:  # score() returns (B, H, T) with selection="head"
        return self.selection == "head"

    def score(self, ctx: DecodeContext) -> torch.Tensor:
        """``(B, Hkv, T)`` importance of each cached token for this decode step (``selection="head"``:
        ``(B, H, T)`` raw partial logits); padding never wins."""
        batch, heads, kv_heads, head_dim = ctx.batch, ctx.heads, ctx.kv_heads, ctx.head_dim
        fc = self.fc_index(ctx.layer_idx, kv_heads, head_dim, ctx.key.device)
        layer = ctx.cache_layer
        if self.packed and layer is not None:
            name = f"fasa_fc_{id(self)}"
            side = layer.side.get(name)
            if side is None:
                from tokprune.hf.kv_cache import PackedKeyDims

                side = layer.add_side(name, PackedKeyDims(fc_dims(fc, head_dim, self.chunk)))
            scores = fc_scores(ctx.query, side.packed, fc, chunk=self.chunk, packed=True, backend=self.backend)
        else:
            scores = fc_scores(ctx.query, ctx.key, fc, chunk=self.chunk, backend=self.backend)
        if ctx.valid is not None:
            scores = scores.masked_fill(~ctx.valid[:, None, :], float("-inf"))
        if self.selection == "head":
            return scores.nan_to_num(neginf=-1e30)
        scores = scores.view(batch, kv_heads, heads // kv_heads, -1)
        if self.aggregate == "softmax":
            return torch.softmax(scores * head_dim ** -0.5, dim=-1).sum(2)
        agg = scores.amax(2) if self.aggregate == "max" else scores.mean(2)
        return agg.nan_to_num(neginf=-1e30)


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
