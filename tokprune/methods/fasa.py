"""FASA (Frequency-Aware Sparse Attention) as a decode policy, and its calibration.

FASA scores every cached key with the partial logit of a few *dominant* frequency chunks (FCs, RoPE
rotation pairs; layout in :mod:`tokprune.ops.fasa`), keeps the ``budget`` best tokens (the ``sink`` first
and ``window`` most recent always among them) and runs exact attention over those only. Prefill is full
attention; the KV cache stays complete (tokens are selected per step, never evicted). ``layout`` chooses how
tokprune's cache holds the keys: full K + a packed FC copy (default), split into FC dims + the rest (FASA-C),
or split with the rest and the values on a second device (FASA-M spirit); :meth:`FASA.memory_report`.

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

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from tokprune.methods.base import DecodeContext, KVPolicy, ratio_for_batch
from tokprune.ops.fasa import fc_scores
from tokprune.reference.fasa import fc_dims

from tokprune.methods.fasa_calibration import (  # noqa: E402,F401  (re-exported)
    FORMAT, UNCALIBRATED, FCCalibration, _Recorder, calibrate, calibrate_main, calibration_text, fc_agreement,
    find_calibration, missing_calibration_error)


#: the key layouts of ``FASA(layout=...)``
LAYOUTS = ("packed", "split", "offload")


@dataclass
class FASA(KVPolicy):
    """Frequency-chunk sparse attention in decode.

    Args:
        budget: tokens attended per KV head and step (sinks and window included).
        sink, window: first / most recent valid tokens always kept.
        fcs: calibration (path to a ``tokprune calibrate fasa`` file, :class:`FCCalibration` or its dict);
            ``None``: the calibration shipped for the patched model (found by config fingerprint, see
            :func:`tokprune.methods.fasa_calibration.find_calibration`), an error if there is none;
            ``"uncalibrated"``: explicitly the ``num_fcs`` lowest-frequency pairs (not FASA's selection).
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
        fused: on tokprune's KV cache without padding (CPU, ``selection="group"``, ``aggregate="softmax"``,
            ``packed``): run the whole step (vote, selection, attention) as one call of the C++ kernel, through
            the layer's :func:`tokprune.ops.paged.paged_fasa_decoder` (the cache is one block per row, block
            table ``[[0], [1], ...]``; threads: ``torch.get_num_threads()``) when the extension has it; elsewhere
            the torch path runs. ``None`` (default): from :attr:`FUSED_MIN_THREADS` torch threads on; ``True``:
            always; ``False``: never. Measured per layer at budget 256, 8K tokens, batch 1 / 4, 1 thread, caches
            read from memory: fused 0.41 / 1.35 ms vs torch 0.76 / 2.44 ms (2K: 0.18 / 0.68 vs 0.45 / 1.34)
            (``python -m benchmarks.bench_fasa_decline --methods fasa fasa_fused --budgets 256 --batches 1 4
            --ratios 2 3 4 6 8 12 16 32``, 2026-12-05, commit febda84).
        layout: how tokprune's KV cache holds the keys of the layers FASA serves (other caches: always the
            full keys). ``"packed"`` (default): full K plus the packed copy of the dominant dims (``2*chunk*F/D``
            of K more). ``"split"`` (FASA-C): from the layer's first decode step the keys are stored once, as
            the dominant dims (dims-major, what scoring reads) + the other dims, with no full-K buffer; the
            sparse step gathers both parts for the selected tokens only (``q.k = q_dom.k_dom + q_rest.k_rest``),
            declined/dense steps compute the same two-part product over all tokens. ``"offload"`` (in the spirit
            of FASA-M): as ``"split"``, with the other key dims and the values on ``offload_device``; a sparse
            step copies only the selected rows to the compute device (a dense step copies them all; on two
            devices the selected indices go to the second tier first: one synchronisation per layer and step). See
            :meth:`memory_report`. Needs ``packed=True`` and tokprune's cache; the fused C++ step runs only with
            ``"packed"``.
        offload_device: the second tier of ``layout="offload"`` (default ``"cpu"``: host memory on a GPU).
        score_dtype: dtype of the packed FC keys the vote reads (``layout="packed"``). ``None`` (default):
            ``torch.bfloat16`` for an fp32 cache on the CPU when the fused step runs (half the bytes the vote
            reads every step; FC keys rounded to bf16, as they are in the paper's bf16 models; attention still
            reads the exact keys), else the cache dtype. On SmolLM2-135M fp32 the quality table is unchanged
            by it (``tokprune eval fasa --methods fasa --cache tokprune``: top-1 agreement 0.844 / 0.906 /
            0.938 / 0.938 at budgets 64-512 with either dtype, Δppl +1.495 vs +1.490 at 64, pass keys 6/6) and
            the whole-model step at 8K is ~2% faster. ``torch.float32``: exact fp32 scores. ``torch.int8``: keys
            quantised per token (:func:`tokprune.ops.paged.quantize_fc_keys`, fp32 scale per token and KV head;
            20 bytes per token and head at 16 dims instead of 32 in bf16), voted from as ``int8 * scale``.
    """

    fcs: Any = None
    num_fcs: Optional[int] = None
    chunk: int = 1
    aggregate: str = "softmax"
    packed: bool = True
    selection: str = "group"
    dense_layers: Tuple[int, ...] = ()
    fused: Optional[bool] = None
    layout: str = "packed"
    offload_device: Any = "cpu"
    score_dtype: Optional[torch.dtype] = None
    _calibration: Optional[FCCalibration] = field(default=None, init=False, repr=False, compare=False)
    _fc_cache: Dict[tuple, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    #: torch path: dense attention while ``n_tokens < DECLINE_RATIO[batch] * budget``: the per-batch break-even
    #: T*/budget printed by ``python -m benchmarks.bench_fasa_decline --methods fasa fasa_fused --budgets 256
    #: --batches 1 4 --ratios 2 3 4 6 8 12 16 32`` (2026-12-05, commit febda84, 1 thread; each call reads its cache
    #: from memory, as inside a model: ``--cold-mib 0``, a cache kept in the CPU caches, favours dense attention)
    DECLINE_RATIO = {1: 7.0, 4: 4.7}
    #: the same rule for the fused C++ step (``fasa_fused`` in the same run)
    FUSED_DECLINE_RATIO = {1: 1.7, 4: 1.7}

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
        if self.layout not in LAYOUTS:
            raise ValueError(f"FASA: layout must be one of {', '.join(map(repr, LAYOUTS))}, got {self.layout!r}")
        if self.score_dtype is not None and (not isinstance(self.score_dtype, torch.dtype) or not (
                self.score_dtype.is_floating_point or self.score_dtype == torch.int8)):
            raise ValueError(f"FASA: score_dtype must be a floating torch.dtype, torch.int8 or None, got "
                             f"{self.score_dtype!r}")
        if self.score_dtype is not None and self.layout != "packed":
            raise ValueError(f"FASA: score_dtype applies to layout='packed' (layout={self.layout!r} attends with "
                             f"the stored dominant dims, which must stay exact)")
        if self.layout != "packed" and not self.packed:
            raise ValueError(f"FASA: layout={self.layout!r} stores the dominant dims packed; it needs packed=True")
        try:
            self.offload_device = torch.device(self.offload_device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"FASA: offload_device must name a torch device, got {self.offload_device!r}") from exc
        if self.num_fcs is not None and (isinstance(self.num_fcs, bool) or not isinstance(self.num_fcs, int)
                                         or self.num_fcs < 1):
            raise ValueError(f"FASA: num_fcs must be a positive int, got {self.num_fcs!r}")
        if self.fcs is not None and not (isinstance(self.fcs, str) and self.fcs == UNCALIBRATED):
            self._calibration = FCCalibration.load(self.fcs)
            if self._calibration.chunk != self.chunk:
                raise ValueError(f"FASA: chunk={self.chunk} but the calibration used chunk={self._calibration.chunk}")

    def bind(self, model) -> None:
        """Check the calibration against ``model`` (layers, KV heads, head dim) before anything is patched."""
        cal = self._calibration
        if cal is None:
            if self.fcs is not None:  # "uncalibrated"
                return
            path = find_calibration(model, chunk=self.chunk)
            if path is None:
                raise missing_calibration_error(model)
            self._calibration = cal = FCCalibration.load(path)
            self._fc_cache.clear()
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
        if (cal.ranking.shape[0], cal.ranking.shape[1], cal.head_dim) != (layers, kv_heads, head_dim):
            raise ValueError(f"FASA calibration is for layers={cal.ranking.shape[0]}, kv_heads={cal.ranking.shape[1]}, "
                             f"head_dim={cal.head_dim}; the model has layers={layers}, kv_heads={kv_heads}, "
                             f"head_dim={head_dim}")

    def declines(self, n_tokens: int, ctx=None, *, batch=None, fused: Optional[bool] = None) -> bool:
        """Dense attention wins below ``decline_ratio * budget`` cached tokens (and always at ``budget >= T``).

        The cost rule: a FASA step costs scoring (reads ``T`` packed FC keys) + top-k + attention over
        ``budget`` tokens; dense attention reads all ``T`` keys and values. The break-even ``T`` is about a
        constant multiple ``c`` of the budget, fitted from the per-step times printed by ``python -m
        benchmarks.bench_fasa_decline`` (single-layer decode step, 1 thread): :attr:`FUSED_DECLINE_RATIO` when
        the step runs as the fused C++ call (``fused``; ``None``: decided from ``ctx``, or from this policy's
        settings without one), :attr:`DECLINE_RATIO` for the torch path. ``decline_ratio`` overrides both.
        ``dense_layers`` always decline.
        """
        if ctx is not None and ctx.layer_idx in self.dense_layers:
            return True
        if batch is None:
            batch = ctx.batch if ctx is not None else 1
        if fused is None:
            fused = self._fused_step(ctx) if ctx is not None else self._fused_settings()
        return n_tokens < self.sparse_from(batch, fused)

    def sparse_from(self, batch: int = 1, fused: Optional[bool] = None) -> int:
        """The smallest number of cached tokens at which a step prunes (below it :meth:`declines`, dense layers
        aside): ``budget + 1`` and ``decline_ratio_for(batch, fused) * budget``, rounded up, whichever is larger."""
        return max(self.budget + 1, math.ceil(self.decline_ratio_for(batch, fused) * self.budget))

    def decline_ratio_for(self, batch: int = 1, fused: Optional[bool] = None) -> float:
        """The ratio :meth:`declines` uses: ``decline_ratio`` if given, else the entry for ``batch`` of
        :attr:`FUSED_DECLINE_RATIO` (``fused``; ``None``: from this policy's settings) or :attr:`DECLINE_RATIO`."""
        if self.decline_ratio is not None:
            return self.decline_ratio
        if fused is None:
            fused = self._fused_settings()
        return ratio_for_batch(self.FUSED_DECLINE_RATIO if fused else self.DECLINE_RATIO, batch)

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
            if self.fcs is None:
                raise missing_calibration_error()
            index = torch.arange(n_fc - num, n_fc).expand(kv_heads, -1)
        else:
            if cal.head_dim != head_dim or cal.ranking.shape[1] != kv_heads:
                raise ValueError(f"FASA calibration is for head_dim={cal.head_dim}, kv_heads={cal.ranking.shape[1]}; "
                                 f"the model has head_dim={head_dim}, kv_heads={kv_heads}")
            index = cal.fc_index(layer, num)
        index = index.contiguous().to(device)
        self._fc_cache[key] = index
        self._fc_cache[key + ("dims",)] = fc_dims(index, head_dim, self.chunk)
        return index

    def _fc_and_dims(self, ctx: DecodeContext, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(fc_index (Hkv, F), dims (Hkv, nd))`` int64 of ``ctx``'s layer on ``device`` (cached by
        :meth:`fc_index`)."""
        fc = self.fc_index(ctx.layer_idx, ctx.kv_heads, ctx.head_dim, device)
        return fc, self._fc_cache[(ctx.layer_idx, ctx.kv_heads, ctx.head_dim, str(device), "dims")]

    #: ``fused=None`` runs the C++ step from this many torch threads on (see ``fused``; it is faster from 1 on)
    FUSED_MIN_THREADS = 1

    @property
    def _side_name(self) -> str:
        """Name of this policy's packed FC keys among a cache layer's side buffers."""
        return f"fasa_fc_{id(self)}"

    def _side(self, ctx: DecodeContext, dims: torch.Tensor):
        """The packed FC keys of ``ctx.cache_layer`` (created on first use; kept in step at every append)."""
        layer = ctx.cache_layer
        name = self._side_name
        side = layer.side.get(name)
        if side is None:
            from tokprune.hf.kv_cache import PackedKeyDims

            side = layer.add_side(name, PackedKeyDims(dims, dtype=self.packed_dtype(ctx.key.dtype, ctx.key.device)))
        return side

    def packed_dtype(self, cache_dtype: torch.dtype, device) -> torch.dtype:
        """The dtype of the packed FC keys this policy keeps for a cache of ``cache_dtype`` on ``device``:
        ``score_dtype`` if given; else, when the fused C++ step runs (CPU), the kernel's default
        (:func:`tokprune.ops.paged.default_fc_dtype`: bf16 for fp32 caches); else ``cache_dtype``."""
        if self.score_dtype is not None:
            return self.score_dtype
        if torch.device(device).type == "cpu" and self._fused_settings():
            from tokprune.ops.paged import default_fc_dtype

            return default_fc_dtype(cache_dtype)
        return cache_dtype

    def _fused_settings(self) -> bool:
        """Whether this policy's settings let a step run as the fused C++ call (see ``fused``): the part of
        :meth:`_fused_step` that does not depend on the step."""
        if self.fused is False or not self.packed or self.layout != "packed":
            return False
        if self.selection != "group" or self.aggregate != "softmax" or self.backend not in (None, "auto", "cuda"):
            return False
        if self.fused is None and torch.get_num_threads() < self.FUSED_MIN_THREADS:
            return False
        return _fused_fasa_available()

    def _fused_step(self, ctx: DecodeContext) -> bool:
        """Whether this step runs as one call of the fused C++ kernel (see ``fused``): tokprune's cache without
        padding, CPU tensors, eager mode, and :meth:`_fused_settings`."""
        if ctx.cache_layer is None or ctx.valid is not None or ctx.query.device.type != "cpu":
            return False
        return not torch.compiler.is_compiling() and self._fused_settings()

    def _split(self, ctx: DecodeContext):
        """The layer's :class:`tokprune.hf.kv_cache.SplitKeyStore` with ``layout="split"``/``"offload"`` (the
        layer is split at its first decode step here), ``None`` with ``"packed"`` or while the layer cannot be
        split (ragged rows: the packed path serves the step)."""
        if self.layout == "packed":
            return None
        layer = ctx.cache_layer
        if layer is None:
            raise ValueError(f"FASA(layout={self.layout!r}) needs tokprune's KV cache (patch(model, cache=True)); "
                             f"this call came with another cache")
        if layer.split is None:
            _, dims = self._fc_and_dims(ctx, ctx.query.device)
            tier = self.offload_device if self.layout == "offload" else None
            if not layer.split_keys(dims, tier=tier, own_side=self._side_name):
                return None
        return layer.split

    def attend_decode(self, ctx: DecodeContext) -> Optional[torch.Tensor]:
        """The shared path (:meth:`KVPolicy.attend_decode`), or the fused C++ step (see ``fused``); with
        ``layout="split"``/``"offload"`` the two-part attention of the split keys (dense when declining).
        A decode step that the layer's bound fused step (:class:`_FusedStep`) still serves runs it directly."""
        layer = ctx.cache_layer
        if layer is not None:
            step = layer.bound_calls.get(self._side_name)
            if step is not None and step.serves(ctx, self):
                return step.run(ctx)
        if ctx.layer_idx in self.dense_layers:
            return None
        split = self._split(ctx)
        if split is not None:
            if self.declines(ctx.n_tokens, ctx):
                return split.dense_attention(ctx.query, ctx.scale, ctx.valid)
            index = self.select(self.score(ctx), ctx)
            return split.sparse_attention(ctx.query, index, ctx.scale, padded=self.select_pads(ctx))
        fused = self._fused_step(ctx)
        if self.declines(ctx.n_tokens, ctx, fused=fused):
            return None
        if not fused:
            return super().attend_decode(ctx)
        return self._fused_attention(ctx)

    def _fused_attention(self, ctx: DecodeContext) -> torch.Tensor:
        """This step as one call of the layer's :func:`tokprune.ops.paged.paged_fasa_decoder`, bound once per
        layer (:class:`_FusedStep`, rebuilt when the layer's buffers are reallocated, or the batch, thread count,
        query dtype or this policy's settings change)."""
        layer = ctx.cache_layer
        side = layer.side.get(self._side_name)
        if side is None:
            side = self._side(ctx, self._fc_and_dims(ctx, ctx.key.device)[1])
        step = layer.bound_calls.get(self._side_name)
        if step is None or not step.serves(ctx, self, declining_checked=True):
            step = layer.bound_calls[self._side_name] = _FusedStep(self, ctx, side)
        return step.run(ctx)

    def _step_settings(self) -> tuple:
        """The fields a bound fused step depends on (a change rebinds it)."""
        return (self.budget, self.sink, self.window, self.fused, self.decline_ratio, self.layout, self.score_dtype,
                self.selection, self.aggregate, self.packed, self.backend, id(self.fcs), self.num_fcs, self.chunk)

    def memory_report(self, cache, heads: Optional[int] = None) -> Dict[str, Any]:
        """Resident bytes and bytes read per decode step, per memory tier, from ``cache``'s buffers.

        ``cache``: a :class:`tokprune.hf.kv_cache.TokpruneCache` this policy served (e.g. ``model.generate(...,
        return_dict_in_generate=True).cache``). Resident: the allocated buffers of each layer (capacity
        included): full K + V + the packed FC copy (``"packed"``), the two key parts + V (``"split"``; the
        second part and V on ``offload_device`` with ``"offload"``). Read per step, at the layer's current length
        ``T`` and this policy's budget (``K = min(budget, T)``), ``e`` the element size: a sparse step reads
        ``T*nd`` dominant dims per KV head for scoring plus ``K`` selected rows of keys (both parts) and values
        per KV head (per query head with ``selection="head"``, then ``heads`` is needed); a declined or dense
        layer reads all ``T`` rows of K and V (the placement of the parts decides the device).

        Returns ``{"layout", "resident": {tier: bytes}, "read_per_step": {tier: bytes}, "layers": [...]}`` with
        tiers ``"compute"`` and (``"offload"`` layout) ``"offload"``; per layer: ``layout`` (``"packed"``,
        ``"split"``, ``"offload"``, or ``"full"`` before FASA's first step), ``sparse``, ``resident``,
        ``read_per_step``, ``devices`` (tier -> device).
        """
        if self.selection == "head" and heads is None:
            raise ValueError("memory_report: selection='head' selects per query head; give heads=")
        total_res: Dict[str, int] = {}
        total_read: Dict[str, int] = {}
        layers = []

        def _add(d, dev, n):
            d[str(dev)] = d.get(str(dev), 0) + int(n)

        for idx, layer in enumerate(cache.layers):
            res: Dict[str, int] = {}
            read: Dict[str, int] = {}
            split = getattr(layer, "split", None)
            if split is None and layer.key_buffer is None:
                continue
            if split is not None:
                batch, kv_heads, n_dims = split.storage.shape[:3]
                d_rest, d_v = split.rest.shape[3], split.values.shape[3]
                e = e_fc = split.storage.element_size()
                res.update(split.nbytes())
                dev, tier = "compute", ("offload" if split.offloaded else "compute")
                kind = "offload" if split.offloaded else "split"
                devices = {"compute": str(split.device), "offload": str(split.tier)} if split.offloaded else \
                    {"compute": str(split.device)}
            else:
                kb, vb = layer.key_buffer, layer.value_buffer
                batch, kv_heads, _, head_dim = kb.shape
                d_v, e = vb.shape[3], kb.element_size()
                for t in (kb, vb):
                    _add(res, "compute", t.numel() * t.element_size())
                packed = [b for b in layer.side.values() if getattr(b, "storage", None) is not None]
                for b in packed:
                    _add(res, "compute", b.storage.numel() * b.storage.element_size())
                    if getattr(b, "scale", None) is not None:  # int8 keys: their per-token fp32 scales
                        _add(res, "compute", b.scale.numel() * b.scale.element_size())
                n_dims = packed[0].storage.shape[2] if packed else 0
                e_fc = packed[0].storage.element_size() if packed else e
                if packed and getattr(packed[0], "scale", None) is not None:
                    e_fc += 4 / n_dims  # the token's scale, spread over its dims
                d_rest = head_dim - n_dims
                dev = tier = "compute"
                devices = {"compute": str(kb.device)}
                kind = "packed" if packed else "full"
            length = layer.length
            sel_heads = heads if self.selection == "head" else kv_heads
            sparse = not (idx in self.dense_layers or self.declines(length, batch=batch)) and n_dims > 0
            if sparse:
                k = min(self.budget, length)
                _add(read, dev, batch * kv_heads * length * n_dims * e_fc + batch * sel_heads * k * n_dims * e)
                _add(read, tier, batch * sel_heads * k * (d_rest + d_v) * e)
            else:
                _add(read, dev, batch * kv_heads * length * n_dims * e)
                _add(read, tier, batch * kv_heads * length * (d_rest + d_v) * e)
            for d, src in ((total_res, res), (total_read, read)):
                for key, val in src.items():
                    _add(d, key, val)
            layers.append(dict(layer=idx, layout=kind, sparse=sparse, resident=res, read_per_step=read,
                               devices=devices))
        return dict(layout=self.layout, resident=total_res, read_per_step=total_read, layers=layers)

    @property
    def per_head(self) -> bool:  # score() returns (B, H, T) with selection="head"
        return self.selection == "head"

    def score(self, ctx: DecodeContext) -> torch.Tensor:
        """``(B, Hkv, T)`` importance of each cached token for this decode step (``selection="head"``:
        ``(B, H, T)`` raw partial logits); padding never wins."""
        batch, heads, kv_heads, head_dim = ctx.batch, ctx.heads, ctx.kv_heads, ctx.head_dim
        fc, dims = self._fc_and_dims(ctx, ctx.key.device)
        layer = ctx.cache_layer
        if self.packed and layer is not None:
            side = layer.split if getattr(layer, "split", None) is not None else self._side(ctx, dims)
            if (self.selection == "group" and self.aggregate == "softmax" and ctx.query.device.type == "cpu"
                    and self.backend in (None, "auto", "torch")):
                keys_t = side.dequantized_t if getattr(side, "scale", None) is not None else side.packed_t
                return _group_softmax_vote(ctx.query, keys_t, dims, ctx.valid, head_dim ** -0.5)
            packed = side.dequantized_t.transpose(2, 3) if getattr(side, "scale", None) is not None else side.packed
            packed = packed if packed.dtype == ctx.query.dtype else packed.to(ctx.query.dtype)
            scores = fc_scores(ctx.query, packed, fc, chunk=self.chunk, packed=True, backend=self.backend, dims=dims)
        else:
            scores = fc_scores(ctx.query, ctx.key, fc, chunk=self.chunk, backend=self.backend, dims=dims)
        if ctx.valid is not None:
            scores = scores.masked_fill(~ctx.valid[:, None, :], float("-inf"))
        if self.selection == "head":
            return scores.nan_to_num(neginf=-1e30)
        scores = scores.view(batch, kv_heads, heads // kv_heads, -1)
        if self.aggregate == "softmax":
            return torch.softmax(scores * head_dim ** -0.5, dim=-1).sum(2)
        agg = scores.amax(2) if self.aggregate == "max" else scores.mean(2)
        return agg.nan_to_num(neginf=-1e30)


def _group_softmax_vote(query: torch.Tensor, packed_t: torch.Tensor, dims: torch.Tensor,
                        valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """FASA's group vote on the CPU in few passes: ``sum_g softmax_t(scale * q_fc[g] . k_fc[t])`` ``(B, Hkv, T)``.

    ``packed_t (B, Hkv, nd, T)`` (dims-major packed FC keys, contiguous along the tokens), ``dims (Hkv, nd)``.
    Equal to ``fc_scores`` -> mask -> ``softmax(.* scale).sum(group)`` up to rounding: the scale is folded into the
    query, the softmax is ``exp(s - max)`` in place and the group sum of the normalised rows is one small
    matmul ``(1/Z)^T exp(s - max)`` (torch's softmax + sum cost 1.3x that on this CPU)."""
    batch, heads, _, head_dim = query.shape
    kv_heads, n_dims = packed_t.shape[1], packed_t.shape[2]
    group = heads // kv_heads
    q_fc = torch.gather(query.view(batch, kv_heads, group, head_dim).float(), 3,
                        dims[None, :, None, :].expand(batch, -1, group, -1)) * scale  # (B, Hkv, g, nd)
    s = torch.matmul(q_fc, packed_t.float())  # (B, Hkv, g, T), fresh: updated in place below
    if valid is not None:
        s.masked_fill_(~valid[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_(min=torch.finfo(s.dtype).min)  # a row without valid keys: finite max
    e = s.sub_(m).exp_()
    inv_z = e.sum(-1, keepdim=True).clamp_(min=torch.finfo(s.dtype).tiny).reciprocal_()  # (B, Hkv, g, 1)
    return torch.matmul(inv_z.transpose(-1, -2), e).view(batch, kv_heads, -1)


class _FusedStep:
    """FASA's fused decode step bound to one cache layer: the decoder (:func:`tokprune.ops.paged.paged_fasa_decoder`
    over the layer's K/V buffers and packed FC keys), its block table and lengths, and the conditions under which
    it serves a step as is. :meth:`serves` is a handful of identity and integer comparisons; inside a 30-layer
    decode step the whole-path Python cost per layer this saves (the policy's decline and path checks, the
    decoder's argument checks) is tens of microseconds, run with caches the kernel has just flushed."""

    def __init__(self, policy: "FASA", ctx: DecodeContext, side):
        from tokprune.ops.paged import paged_fasa_decoder

        layer = ctx.cache_layer
        self.batch, self.heads, self.head_dim = ctx.batch, ctx.heads, ctx.head_dim
        self.dtype, self.scale, self.threads = ctx.query.dtype, ctx.scale, torch.get_num_threads()
        self.kb, self.vb, self.side, self.storage = layer.key_buffer, layer.value_buffer, side, side.storage
        self.layer_idx, self.settings = ctx.layer_idx, policy._step_settings()
        budget = policy.budget
        self.n_min = policy.sparse_from(self.batch, True)  # the first length declines() lets through
        _, dims = policy._fc_and_dims(ctx, ctx.key.device)
        self.decoder = paged_fasa_decoder(self.kb, self.vb, self.storage.transpose(2, 3), dims, budget, policy.sink,
                                          policy.window, ctx.scale, heads=self.heads, out_dtype=self.dtype,
                                          vote_scale=self.head_dim ** -0.5, num_threads=self.threads,
                                          fc_scale=side.scale)
        self.table = torch.arange(self.batch, dtype=torch.int32).view(self.batch, 1)
        self.lens = torch.empty(self.batch, dtype=torch.int32)
        self.lens_host = self.lens.numpy()  # written through numpy: ~1 us, Tensor.fill_ ~7 us inside a step
        self.launch = self.decoder.launcher(self.table, self.lens)
        side.deferred = True  # from now on the kernel packs the FC keys of appended tokens as it scores

    def serves(self, ctx: DecodeContext, policy: "FASA", declining_checked: bool = False) -> bool:
        """Whether this step can run ``ctx`` as bound: the same buffers, batch, heads, query dtype, scale and
        thread count, no padding, eager mode, the policy's settings unchanged, the layer not dense and (unless
        the caller already checked it) past the decline threshold."""
        if torch.compiler.is_compiling():  # first: nothing below may be traced
            return False
        layer = ctx.cache_layer
        key, query = ctx.key, ctx.query
        return (layer.key_buffer is self.kb and layer.value_buffer is self.vb and self.side.storage is self.storage
                and ctx.valid is None and key.shape[0] == self.batch and query.shape[1] == self.heads
                and query.dtype == self.dtype and ctx.scale == self.scale and (declining_checked or (
                    key.shape[2] >= self.n_min and self.layer_idx not in policy.dense_layers))
                and torch.get_num_threads() == self.threads and policy._step_settings() == self.settings)

    def run(self, ctx: DecodeContext) -> torch.Tensor:
        """``(B, H, 1, D)`` FASA attention of ``ctx``'s query (the layer's FC keys of new tokens packed first)."""
        q = ctx.query[:, :, 0]
        self.lens_host[:] = ctx.key.shape[2]
        out = torch.empty(q.shape, dtype=self.dtype)
        side = self.side
        if q.stride(2) == 1:
            self.launch(q, out, side.pending_from)
        else:
            self.decoder(q, self.table, self.lens, out=out, pack_from=side.pending_from)
        side.mark_packed()
        return out.view(self.batch, self.heads, 1, self.head_dim)


@functools.lru_cache(maxsize=1)
def _fused_fasa_available() -> bool:
    """Whether this install has the fused FASA host kernel (decided once: the decode step asks every layer)."""
    from tokprune.ops import paged

    return paged.fused_fasa_available(torch.device("cpu"))
