"""FASA calibration: ranking the dominant frequency chunks (FCs) of a model, and the FASA-C key layout.

:func:`calibrate` records post-RoPE queries and keys of every layer (:func:`record_queries`) and compares,
for every query and head, each FC's partial logits ``q_c . k_c`` with the full logits ``q . k`` by *top-k
agreement* ``|top_k(partial) ∩ top_k(full)| / k`` over the causal keys (:func:`fc_agreement`,
:func:`rank_fcs`). Choices:

* ``source``: ``"prefill"`` (the last ``n_queries`` positions of the text) or ``"decode"`` (``n_queries``
  greedy decode steps after the text, as the FASA reference records them).
* ``topk``: ``k`` of the agreement; the reference measures it at ``k`` = the token budget.
* ``per_head``: keep a ranking per query head (``head_ranking (layers, heads, n_fc)``). FASA's packed key
  layout needs one FC set per KV head: it is served the union per KV group (:func:`union_per_group`);
  :meth:`FCCalibration.head_fc_index` gives the per-head sets for unpacked scoring. Without it the FCs are
  ranked per KV head by the mean agreement of the group's query heads.

``FASA(fcs=None)`` finds a shipped calibration (``tokprune/data/fasa_*.json`` with ``meta.auto``) by the
model's :func:`model_fingerprint`; otherwise it raises (:func:`missing_calibration_error`) unless
``fcs="uncalibrated"``. :class:`SplitKeys` is the FASA-C key layout (dominant / non-dominant dims, no
duplicated FC copy) and :func:`fasa_key_bytes` its resident vs read bytes.

``tokprune.methods.fasa`` re-exports the calibration API.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

FORMAT = "tokprune-fasa-fcs/1"
#: ``FASA(fcs=UNCALIBRATED)``: the lowest-frequency pairs, chosen explicitly (no calibration)
UNCALIBRATED = "uncalibrated"


@dataclass
class FCCalibration:
    """Dominant-FC ranking of a model.

    Attributes:
        ranking: ``(layers, kv_heads, n_fc)`` int64 FC ids per KV head, best first (what FASA's packed key
            layout uses: one FC set per KV head).
        agreement: ``(layers, kv_heads, n_fc)`` fp32 top-k agreement with full attention of those FCs, in
            [0, 1] (per-KV-head calibration: the mean over the group's query heads).
        head_dim, chunk: head dimension and rotation pairs per FC.
        meta: free-form provenance (``source``, ``topk``, ``fingerprint``, ...).
        head_ranking, head_agreement: optional ``(layers, heads, n_fc)`` per-query-head ranking (a
            ``per_head=True`` calibration). ``ranking`` is then derived from it by :func:`union_per_group`.
    """

    ranking: torch.Tensor
    agreement: torch.Tensor
    head_dim: int
    chunk: int = 1
    meta: Dict[str, Any] = field(default_factory=dict)
    head_ranking: Optional[torch.Tensor] = None
    head_agreement: Optional[torch.Tensor] = None

    @property
    def per_head(self) -> bool:
        """True when a per-query-head ranking is present."""
        return self.head_ranking is not None

    def fc_index(self, layer: int, num_fcs: int) -> torch.Tensor:
        """``(kv_heads, num_fcs)`` int64 dominant FCs of ``layer``."""
        if not 0 <= layer < self.ranking.shape[0]:
            raise IndexError(f"calibration has {self.ranking.shape[0]} layers, asked for layer {layer}")
        return self.ranking[layer, :, :num_fcs]

    def head_fc_index(self, layer: int, num_fcs: int) -> torch.Tensor:
        """``(heads, num_fcs)`` int64 per-query-head FCs of ``layer`` (for unpacked scoring:
        :func:`tokprune.ops.fasa.fc_scores` with ``packed=False`` accepts a per-head ``fc_index``)."""
        if self.head_ranking is None:
            raise ValueError("this FASA calibration has no per-query-head ranking (calibrate with --per-head)")
        if not 0 <= layer < self.head_ranking.shape[0]:
            raise IndexError(f"calibration has {self.head_ranking.shape[0]} layers, asked for layer {layer}")
        return self.head_ranking[layer, :, :num_fcs]

    def save(self, path) -> None:
        """Write ``.json`` (lists) or anything else as a ``torch.save`` dict.

        Format ``tokprune-fasa-fcs/1``: ``ranking``/``agreement`` per KV head (read by every version);
        per-head calibrations add the optional keys ``per_head``, ``head_ranking``, ``head_agreement``.
        """
        payload = dict(format=FORMAT, head_dim=self.head_dim, chunk=self.chunk, meta=self.meta,
                       ranking=self.ranking.long(), agreement=self.agreement.float())
        if self.head_ranking is not None:
            payload.update(per_head=True, head_ranking=self.head_ranking.long(),
                           head_agreement=self.head_agreement.float())
        if str(path).endswith(".json"):
            payload = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in payload.items()}
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
        head_ranking = head_agreement = None
        if source.get("head_ranking") is not None:
            head_ranking = torch.as_tensor(source["head_ranking"], dtype=torch.long)
            head_agreement = torch.as_tensor(source["head_agreement"], dtype=torch.float32)
            if (head_ranking.dim() != 3 or head_ranking.shape[0] != ranking.shape[0]
                    or head_ranking.shape[2] != ranking.shape[2] or head_ranking.shape[1] % ranking.shape[1]):
                raise ValueError(f"calibration head_ranking must be (layers, heads, n_fc) with heads a multiple of "
                                 f"kv_heads={ranking.shape[1]}, got {tuple(head_ranking.shape)}")
        return cls(ranking, torch.as_tensor(source["agreement"], dtype=torch.float32), int(source["head_dim"]),
                   int(source.get("chunk", 1)), dict(source.get("meta", {})), head_ranking, head_agreement)


def union_per_group(head_ranking: torch.Tensor, head_agreement: torch.Tensor, kv_heads: int):
    """Serve per-query-head FC sets on the packed (one set per KV head) layout.

    The FCs of a KV group are merged round-robin: an FC's key is the best rank any head of the group gives
    it (ties: the higher mean agreement over the group). The first ``F`` FCs of the merged ranking are
    therefore the union of every head's top ``ceil(F / group)`` (or more, where heads share FCs).

    Args:
        head_ranking: ``(layers, heads, n_fc)`` int64 per-head ranking, best first.
        head_agreement: ``(layers, heads, n_fc)`` fp32 agreement in ranking order.
        kv_heads: KV heads (``heads`` must be a multiple).

    Returns:
        ``(ranking, agreement)``, each ``(layers, kv_heads, n_fc)``: int64 FC ids and fp32 group-mean agreement.
    """
    layers, heads, n_fc = head_ranking.shape
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    group = heads // kv_heads
    pos = torch.empty_like(head_ranking)  # pos[l, h, fc] = rank of fc for head h
    pos.scatter_(-1, head_ranking, torch.arange(n_fc).expand_as(head_ranking).contiguous())
    by_fc = torch.empty_like(head_agreement)  # agreement indexed by FC id
    by_fc.scatter_(-1, head_ranking, head_agreement)
    best = pos.view(layers, kv_heads, group, n_fc).amin(2)  # (L, Hkv, n_fc)
    mean = by_fc.view(layers, kv_heads, group, n_fc).mean(2)
    # sort by mean (desc) then stably by best rank (asc): best rank first, ties by mean
    order = torch.sort(mean, dim=-1, descending=True, stable=True).indices
    order = torch.gather(order, -1, torch.sort(torch.gather(best, -1, order), dim=-1, stable=True).indices)
    return order, torch.gather(mean, -1, order)


def model_fingerprint(model_or_config) -> Dict[str, Any]:
    """What a calibration depends on: ``layers, heads, kv_heads, head_dim, rope_theta`` of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}).get("rope_theta")
    return dict(layers=int(config.num_hidden_layers), heads=int(heads),
                kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                rope_theta=None if theta is None else float(theta))


#: calibrations shipped with tokprune (``tokprune/data/fasa_*.json``) found by :func:`find_calibration`
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def find_calibration(model, *, chunk: int = 1) -> Optional[Path]:
    """The shipped calibration whose ``meta.fingerprint`` matches ``model`` (:func:`model_fingerprint`) and
    whose ``meta.auto`` is true, or ``None``."""
    want = model_fingerprint(model)
    for path in sorted(DATA_DIR.glob("fasa_*.json")):
        try:
            head = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        meta = head.get("meta", {})
        if meta.get("auto") and meta.get("fingerprint") == want and int(head.get("chunk", 1)) == chunk:
            return path
    return None


def missing_calibration_error(model=None) -> ValueError:
    """The error ``FASA`` raises when no calibration is given or shipped for ``model``."""
    what = "" if model is None else f" for this model ({model_fingerprint(model)})"
    return ValueError(
        f"FASA needs a calibration of the dominant frequency chunks: none was given (fcs=None) and none is "
        f"shipped{what}. Pass fcs=<file from `tokprune calibrate fasa --out fcs.json`> (an FCCalibration or "
        f"its dict), or fcs='uncalibrated' to use the lowest-frequency pairs explicitly (not FASA's selection)")


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
              chunk: int = 1, source: str = "prefill", per_head: bool = False) -> FCCalibration:
    """Rank the frequency chunks of every layer / head of ``model`` by agreement with full attention.

    Args:
        model, tokenizer: a transformers causal LM (batch 1, patched through :mod:`tokprune.hf.attention`).
        text: calibration text; its first ``n_tokens`` tokens are the context.
        n_queries: queries per head scored (:func:`fc_agreement`).
        topk: ``k`` of the top-k agreement (the reference calibrates at ``k`` = the token budget).
        chunk: pairs per FC.
        source: ``"prefill"``: the queries of the last ``n_queries`` positions of the text (teacher-forced);
            ``"decode"`` (as the FASA reference): ``n_queries`` greedy decode steps after the ``n_tokens``
            context, each step's query scored against all keys before it. Under full attention a decode
            step's query and keys equal those of one forward over context + generated tokens, so the
            generated positions are recorded in one forward.
        per_head: also keep the per-query-head ranking (``head_ranking``); ``ranking`` is then the union per
            KV group (:func:`union_per_group`). Without it the FCs are ranked by the mean agreement of the
            group's query heads.

    Returns:
        An :class:`FCCalibration` with ``meta`` = source, topk, n_tokens, n_queries, model fingerprint.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"calibrate: topk must be a positive int, got {topk!r}")
    record = record_queries(model, tokenizer, text, n_tokens=n_tokens, n_queries=n_queries, source=source)
    if record["context"] < topk:
        raise ValueError(f"calibration context has {record['context']} tokens; need at least topk={topk}")
    return rank_fcs(record, topk=topk, chunk=chunk, per_head=per_head)


def record_queries(model, tokenizer, text: str, *, n_tokens: int = 1024, n_queries: int = 64,
                   source: str = "prefill") -> Dict[str, Any]:
    """Post-RoPE queries and keys for :func:`rank_fcs` (see :func:`calibrate` for ``source``).

    Returns:
        ``dict(queries={layer: (heads, n_queries, D) fp32}, keys={layer: (kv_heads, T, D) fp32},
        context=int, source=str, n_queries=int, fingerprint=dict, model=str)``.
    """
    from tokprune.hf.attention import patch_attention

    if source not in ("prefill", "decode"):
        raise ValueError(f"calibrate: source must be 'prefill' or 'decode', got {source!r}")
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
        raise ValueError(f"calibrate: n_queries must be a positive int, got {n_queries!r}")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    context = ids.shape[1] if source == "decode" else ids.shape[1] - n_queries
    if context < 1:
        raise ValueError(f"calibration text has {ids.shape[1]} tokens; prefill calibration needs more than "
                         f"n_queries={n_queries}")
    if source == "decode":
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            cache, token, generated = out.past_key_values, out.logits[:, -1:].argmax(-1), []
            for _ in range(n_queries):
                generated.append(token)
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        ids = torch.cat([ids] + generated, dim=1)
    recorder = _Recorder(n_queries)
    with patch_attention(model, prefill=recorder), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return dict(queries=recorder.queries, keys=recorder.keys, context=int(context), source=source,
                n_queries=n_queries, fingerprint=model_fingerprint(model),
                model=getattr(model.config, "_name_or_path", "") or type(model).__name__)


def rank_fcs(record: Dict[str, Any], *, topk: int = 32, chunk: int = 1, per_head: bool = False) -> FCCalibration:
    """Rank the FCs of every layer from :func:`record_queries` output by top-``topk`` agreement."""
    layers = sorted(record["keys"])
    kv_heads = record["keys"][layers[0]].shape[0]
    agree = torch.stack([fc_agreement(record["queries"][i], record["keys"][i], topk=topk, chunk=chunk).T
                         for i in layers])  # (L, H, n_fc)
    head_ranking = head_agreement = None
    if per_head:
        order = torch.sort(agree, dim=-1, descending=True, stable=True)
        head_ranking, head_agreement = order.indices, order.values
        ranking, agreement = union_per_group(head_ranking, head_agreement, kv_heads)
    else:
        per_kv = agree.view(agree.shape[0], kv_heads, -1, agree.shape[-1]).mean(2)
        order = torch.sort(per_kv, dim=-1, descending=True, stable=True)
        ranking, agreement = order.indices, order.values
    meta = dict(n_tokens=record["context"], n_queries=record["n_queries"], topk=topk, source=record["source"],
                per_head=per_head, fingerprint=record["fingerprint"], model=record["model"])
    head_dim = record["keys"][layers[0]].shape[-1]
    return FCCalibration(ranking, agreement, head_dim, chunk, meta, head_ranking, head_agreement)


def per_kv_view(cal: FCCalibration) -> FCCalibration:
    """The per-KV-head calibration (group-mean agreement ranking) of a per-head calibration."""
    if cal.head_ranking is None:
        return cal
    layers, heads, n_fc = cal.head_ranking.shape
    kv_heads = cal.ranking.shape[1]
    by_fc = torch.empty_like(cal.head_agreement).scatter_(-1, cal.head_ranking, cal.head_agreement)
    mean = by_fc.view(layers, kv_heads, heads // kv_heads, n_fc).mean(2)
    order = torch.sort(mean, dim=-1, descending=True, stable=True)
    return FCCalibration(order.indices, order.values, cal.head_dim, cal.chunk, dict(cal.meta, per_head=False))


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
    """``tokprune calibrate fasa --model smollm2 --text stdlib [--source decode] [--budget K] [--per-head] --out fcs.pt``."""
    parser = argparse.ArgumentParser(prog="tokprune calibrate fasa", description=calibrate.__doc__)
    parser.add_argument("--model", default="smollm2", choices=["smollm2"])
    parser.add_argument("--text", default="stdlib", help="text file, or 'stdlib' (default)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--topk", "--budget", dest="topk", type=int, default=32,
                        help="k of the top-k agreement; the reference uses k = the FASA token budget")
    parser.add_argument("--source", default="prefill", choices=["prefill", "decode"],
                        help="queries of the last prefill positions, or of greedy decode steps (the reference)")
    parser.add_argument("--per-head", action="store_true",
                        help="rank per query head too (the packed layout serves the union per KV group)")
    parser.add_argument("--auto", action="store_true",
                        help="mark the file as the one FASA picks for a model with this fingerprint")
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--out", default="fcs.pt", help="output file (.pt or .json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokprune.models import load_smollm2

    model, tokenizer = load_smollm2()
    cal = calibrate(model, tokenizer, calibration_text(args.text), n_tokens=args.tokens, n_queries=args.queries,
                    topk=args.topk, chunk=args.chunk, source=args.source, per_head=args.per_head)
    cal.meta["model"] = "SmolLM2-135M-Instruct"
    cal.meta["text"] = args.text
    if args.auto:
        cal.meta["auto"] = True
    cal.save(args.out)
    n_fc = cal.ranking.shape[-1]
    f = max(1, n_fc // 4)
    print(f"calibrated {cal.ranking.shape[0]} layers x {cal.ranking.shape[1]} KV heads, {n_fc} FCs each "
          f"(chunk={cal.chunk}) on {cal.meta['n_tokens']} tokens -> {args.out}")
    print(f"mean top-{args.topk} agreement of the best FC: {cal.agreement[..., 0].mean():.3f}, "
          f"of the {f}th best: {cal.agreement[..., f - 1].mean():.3f}, of the median FC: "
          f"{cal.agreement[..., n_fc // 2].mean():.3f}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# FASA-C layout: keys split into dominant and non-dominant dims (no duplicated FC copy)


class SplitKeys:
    """FASA-C key layout: the keys of one layer stored as two disjoint parts per KV head, the dominant FC
    dims ``dom (B, Hkv, T, nd)`` (contiguous, what scoring reads for every token) and the rest
    ``rest (B, Hkv, T, D - nd)`` (read only for the selected tokens). Together they hold exactly the bytes of
    the keys, unlike the packed copy (keys + ``2F/D`` of them).

    Args:
        keys: ``(B, Hkv, T, D)`` post-RoPE keys (fp32/fp16/bf16).
        fc_index: ``(Hkv, F)`` int64 FC ids per KV head.
        chunk: pairs per FC.
    """

    def __init__(self, keys: torch.Tensor, fc_index: torch.Tensor, chunk: int = 1):
        from tokprune.reference.fasa import fc_dims, other_dims

        if keys.dim() != 4:
            raise ValueError(f"SplitKeys: keys must be (batch, kv_heads, n_tokens, head_dim), got {tuple(keys.shape)}")
        if fc_index.dim() != 2 or fc_index.shape[0] != keys.shape[1]:
            raise ValueError(f"SplitKeys: fc_index must be ({keys.shape[1]}, F) per KV head, got {tuple(fc_index.shape)}")
        head_dim = keys.shape[3]
        self.fc_index, self.chunk, self.head_dim = fc_index.long(), chunk, head_dim
        self.dims = fc_dims(self.fc_index, head_dim, chunk).to(keys.device)  # (Hkv, nd)
        self.rest_dims = other_dims(self.dims, head_dim)
        self.dom = self._take(keys, self.dims)
        self.rest = self._take(keys, self.rest_dims)

    @staticmethod
    def _take(keys, dims):
        return torch.gather(keys, 3, dims[None, :, None, :].expand(keys.shape[0], -1, keys.shape[2], -1)).contiguous()

    def append(self, keys: torch.Tensor) -> None:
        """Append ``(B, Hkv, n, D)`` new keys (split on the way in)."""
        self.dom = torch.cat([self.dom, self._take(keys, self.dims)], dim=2)
        self.rest = torch.cat([self.rest, self._take(keys, self.rest_dims)], dim=2)

    def scores(self, q: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """``(B, H, T)`` fp32 partial logits of the ``(B, H, 1, D)`` query from the dominant dims only."""
        from tokprune.ops.fasa import fc_scores

        return fc_scores(q, self.dom, self.fc_index, chunk=self.chunk, packed=True, backend=backend,
                         dims=self.dims.to(q.device))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Full keys ``(B, Hkv, K, D)`` of the tokens ``index (B, Hkv, K)`` (both parts read for those only)."""
        batch, kv_heads, k = index.shape
        out = torch.empty(batch, kv_heads, k, self.head_dim, dtype=self.dom.dtype, device=self.dom.device)
        for part, dims in ((self.dom, self.dims), (self.rest, self.rest_dims)):
            rows = torch.gather(part, 2, index[..., None].expand(-1, -1, -1, part.shape[-1]))
            out.scatter_(3, dims[None, :, None, :].expand(batch, -1, k, -1), rows)
        return out

    def keys(self) -> torch.Tensor:
        """The full ``(B, Hkv, T, D)`` keys (reassembled)."""
        index = torch.arange(self.dom.shape[2], device=self.dom.device).expand(*self.dom.shape[:2], -1)
        return self.gather(index)

    def resident_bytes(self) -> int:
        """Bytes held: exactly the keys' bytes (``dom`` + ``rest``)."""
        return self.dom.numel() * self.dom.element_size() + self.rest.numel() * self.rest.element_size()


def fasa_key_bytes(n_tokens: int, budget: int, head_dim: int, n_dims: int, *, batch: int = 1, kv_heads: int = 1,
                   elem: int = 2) -> Dict[str, Dict[str, int]]:
    """Resident key bytes and key bytes read per decode step (one layer), per layout.

    ``packed``: full keys + a packed copy of the ``n_dims`` FC dims; ``fasa_c``: :class:`SplitKeys`;
    ``dense``: full keys read every step. Scoring reads ``n_dims`` per token, attention the ``head_dim``
    dims of ``min(budget, T)`` tokens (values not counted: the same in every sparse layout).
    """
    rows, k = batch * kv_heads, min(budget, n_tokens)
    full = rows * n_tokens * head_dim * elem
    score = rows * n_tokens * n_dims * elem
    attend = rows * k * head_dim * elem
    return dict(dense=dict(resident=full, read=full),
                packed=dict(resident=full + score, read=score + attend),
                fasa_c=dict(resident=full, read=score + attend))
