"""tokprune's own KV cache for Hugging Face models: O(1) amortised append, ragged rows, side buffers.

transformers' ``DynamicCache`` appends with ``torch.cat``, so every decode step copies the whole cache
(at 8K context on SmolLM2-135M about twice the bytes that attention itself reads). :class:`TokpruneCache`
implements transformers' ``Cache`` interface on preallocated buffers instead:

* per layer a :class:`TokpruneLayer` holding ``key_buffer`` / ``value_buffer``
  ``(batch, kv_heads, capacity, head_dim)``, grown geometrically (x2) when full, so an append writes only
  the new tokens (amortised O(1) per token, never a whole-cache copy per step);
* ``length`` is a host-side ``int`` (no device synchronisation to know the cache size), ``keys`` /
  ``values`` are views ``(batch, kv_heads, length, head_dim)`` of the buffers, returned by ``update``;
* per-row lengths for ragged batches (speculative decoding accepts a different number of tokens per
  row): :meth:`TokpruneLayer.valid_mask` tells which slots of the view each row may attend to;
* side buffers (:class:`SideBuffer`) that pruning methods keep in step with the keys at append time
  (FASA's packed frequency-chunk keys, Quest's page min/max, ...), written once per token;
* an optional split key layout per layer (:class:`SplitKeyStore`, :meth:`TokpruneLayer.split_keys`, used by
  ``FASA(layout="split" | "offload")``): the keys held once, as dominant dims (dims-major) + the other dims,
  no full-K buffer, the other dims and the values optionally on a second device. Readers that need full
  keys get them reassembled (``layer.keys``, multi-token appends); rewrites (``keys`` assignment, ragged
  rows, compaction) switch the layer back to full buffers; crop / reorder / batch selection work on the parts.

Layout note for paged serving stacks (vLLM, FlashInfer): the contiguous ``(B, Hkv, capacity, D)``
buffer *is* a paged KV cache with ``block_size = capacity`` and the block table ``[[0], [1], ..., [B-1]]``
(one block per sequence, physical block ``b`` = batch row ``b``), ``seq_lens = row_lengths``. An op
written for block tables therefore serves this cache with that trivial table; an op written for this
cache serves a paged one after its block-table indirection.

Usage::

    from tokprune.hf.kv_cache import use_tokprune_cache
    with use_tokprune_cache(model):          # model.generate builds a TokpruneCache by itself
        out = model.generate(ids, max_new_tokens=64)

Pruning policies (``policy.patch(model)``) install the same hook, so their documented two-line usage runs
on this cache. Alone, ``use_tokprune_cache`` is "full attention on the tokprune cache": decode steps use
:func:`tokprune.ops.decode.dense_decode_attention` (GQA without ``repeat_kv``), other calls SDPA.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tokprune._memory import zeros

__all__ = [
    "SideBuffer",
    "PackedKeyDims",
    "SplitKeyStore",
    "TokpruneLayer",
    "TokpruneCache",
    "cache_layer_for",
    "use_tokprune_cache",
    "tokprune_decode_attention",
    "CACHE_ATTENTION_NAME",
]

#: name under which :func:`use_tokprune_cache` registers :func:`tokprune_decode_attention`
CACHE_ATTENTION_NAME = "tokprune_cache"
_PAGE = 64  # capacities are rounded up to a multiple of this many tokens


def _round_up(n: int, multiple: int = _PAGE) -> int:
    return ((n + multiple - 1) // multiple) * multiple


# ---------------------------------------------------------------------------------------------------------
# side buffers
# ---------------------------------------------------------------------------------------------------------


class SideBuffer:
    """Per-layer state derived from the cached keys/values, maintained at append time.

    Protocol (what :class:`TokpruneLayer` calls):

    * ``append(layer, start, end)``: slots ``[start, end)`` of ``layer.key_buffer`` /
      ``layer.value_buffer`` (every row) were just written; update the own storage from them. Must be
      idempotent: the same range may be passed again after a rewrite (compaction, ragged append, an
      assignment to ``layer.keys``), and ``start`` may then be 0.
    * ``reset()``: forget everything (the cache was reset, re-batched or rewritten); the layer follows
      with ``append(layer, 0, layer.length)`` when it still holds tokens.
    * ``grow(capacity)`` (optional): the layer's buffers now hold ``capacity`` slots; called before the
      ``append`` that needed them.

    Implementations must not read tensor data on the host (no ``.item()``, ``int(t)``, ``bool(t)``).
    """

    def append(self, layer: "TokpruneLayer", start: int, end: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def grow(self, capacity: int) -> None:
        """Default: nothing to do (storage grown lazily in ``append``)."""


class PackedKeyDims(SideBuffer):
    """A contiguous copy of selected key dimensions per KV head (FASA's packed frequency-chunk keys).

    Args:
        dims: ``(kv_heads, n_dims)`` int64 head-dim indices per KV head (e.g.
            ``tokprune.reference.fasa.fc_dims(fc_index, head_dim, chunk)``), or ``(n_dims,)`` for all heads.
        dtype: dtype of the copy (``None``: the cache dtype; e.g. ``torch.bfloat16`` halves the bytes a scoring
            pass reads from an fp32 cache, values rounded to bf16; ``torch.int8``: quantised per token by
            :func:`tokprune.ops.paged.quantize_fc_keys`, with fp32 scales in ``scale``: 5/16 of fp32's bytes at 16
            dims).

    Attributes:
        storage: ``(batch, kv_heads, n_dims, capacity)`` in ``dtype`` (dims-major: each packed
            dimension is a contiguous row over the tokens), allocated on first append. With ``deferred``,
            slots ``pending_from <= t < length`` may be stale: read through ``packed`` / ``packed_t`` (which
            call :meth:`flush`) or hand ``pending_from`` to a writer that fills them (the fused FASA kernel:
            ``PagedFasaDecoder(..., pack_from=pending_from)``, then :meth:`mark_packed`).
        deferred: ``False`` (default): ``append`` copies the new tokens' dims at once. ``True``: ``append`` only
            records the range (set by FASA's fused step, whose kernel packs the new tokens as it scores them:
            one pass less per layer and step).
        pending_from: first slot not yet packed (``None``: all packed).
        scale: ``(batch, kv_heads, capacity)`` fp32 per-token scales of int8 keys (``None`` for float dtypes).
        dequantized_t: property, ``packed_t`` as fp32 keys (``packed_t * scale`` for int8).
        packed: property, the view ``(batch, kv_heads, length, n_dims)`` of the valid slots (token stride 1).
        packed_t: property, the same slots as ``(batch, kv_heads, n_dims, length)`` (unit stride along tokens).

    Why dims-major: scoring is ``q_fc (g, n_dims) @ K_fc^T (n_dims, T)``; with ``K_fc^T`` rows contiguous
    along the tokens the matmul streams them (measured on the project's CPU, 1 thread, 3 KV heads, 8K tokens,
    16 dims: 34 us vs 81 us for the token-major layout).
    """

    def __init__(self, dims: torch.Tensor, dtype: Optional[torch.dtype] = None):
        if dtype is not None and (not isinstance(dtype, torch.dtype) or
                                  not (dtype.is_floating_point or dtype == torch.int8)):
            raise TypeError(f"PackedKeyDims: dtype must be a floating torch.dtype, torch.int8 or None, got {dtype!r}")
        self.dtype = dtype
        if not isinstance(dims, torch.Tensor) or dims.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"dims must be an int32/int64 tensor of head-dim indices, got {type(dims).__name__}"
                            + (f" {dims.dtype}" if isinstance(dims, torch.Tensor) else ""))
        if dims.dim() not in (1, 2) or dims.shape[-1] == 0:
            raise ValueError(f"dims must have shape (kv_heads, n_dims) or (n_dims,) with n_dims > 0, "
                             f"got {tuple(dims.shape)}")
        self.dims = dims.long()
        self.storage: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None
        self.length = 0
        self.deferred = False
        self.pending_from: Optional[int] = None
        self._index: Optional[torch.Tensor] = None
        self._sized_for: Optional[torch.Tensor] = None  # the key buffer `storage` was allocated for

    def _check(self, layer: "TokpruneLayer") -> None:
        heads, head_dim = layer.key_buffer.shape[1], layer.key_buffer.shape[3]
        if self.dims.dim() == 2 and self.dims.shape[0] != heads:
            raise ValueError(f"PackedKeyDims: dims has {self.dims.shape[0]} rows but the layer has {heads} KV heads")
        # host-side range check once per (re)allocation (dims is a small host-built tensor)
        if self.dims.device.type == "cpu" and self.dims.numel() and (
                int(self.dims.min()) < 0 or int(self.dims.max()) >= head_dim):
            raise IndexError(f"PackedKeyDims: dims must lie in [0, {head_dim}), got "
                             f"[{int(self.dims.min())}, {int(self.dims.max())}]")

    def append(self, layer: "TokpruneLayer", start: int, end: int) -> None:
        kb = layer.key_buffer
        if self.deferred and kb is self._sized_for:  # decode fast path: record the range only
            if end > start and (self.pending_from is None or start < self.pending_from):
                self.pending_from = start
            self.length = end
            return
        batch, heads, capacity, _ = kb.shape
        n_dims = self.dims.shape[-1]
        dtype = self.dtype or kb.dtype
        if (self.storage is None or self.storage.shape[0] != batch or self.storage.shape[3] < capacity
                or self.storage.dtype != dtype or self.storage.device != kb.device):
            if self.storage is None or self.storage.shape[0] != batch or self.storage.dtype != dtype \
                    or self.storage.device != kb.device:
                self._check(layer)
                keep = 0
            else:
                keep = min(self.length, start)
            new = zeros((batch, heads, n_dims, capacity), dtype, kb.device)
            new_scale = zeros((batch, heads, capacity), torch.float32, kb.device) if dtype == torch.int8 else None
            if keep:
                new[..., :keep] = self.storage[..., :keep]
                if new_scale is not None:
                    new_scale[..., :keep] = self.scale[..., :keep]
            self.storage, self.scale = new, new_scale
            dims = self.dims.to(kb.device)
            self._index = (dims if dims.dim() == 2 else dims.expand(heads, -1))[None, :, None, :]
            if self.pending_from is not None and self.pending_from > keep:
                self.pending_from = keep
        self._sized_for = kb
        if self.deferred:
            if end > start and (self.pending_from is None or start < self.pending_from):
                self.pending_from = start
        elif end > start:
            self._pack(kb, start, end)
        self.length = end

    def _pack(self, kb: torch.Tensor, start: int, end: int) -> None:
        batch, heads = kb.shape[:2]
        index = self._index.expand(batch, heads, end - start, self._index.shape[-1])
        keys = torch.gather(kb[:, :, start:end], 3, index)  # (batch, heads, n, n_dims)
        if self.scale is not None:
            from tokprune.ops.paged import quantize_fc_keys

            keys, self.scale[..., start:end] = quantize_fc_keys(keys)
        self.storage[..., start:end] = keys.transpose(2, 3)

    def flush(self) -> None:
        """Pack the pending slots ``[pending_from, length)`` from the layer's key buffer (torch ops)."""
        if self.pending_from is not None:
            if self.pending_from < self.length:
                self._pack(self._sized_for, self.pending_from, self.length)
            self.pending_from = None

    def mark_packed(self) -> None:
        """The pending slots were written by another writer (the fused FASA kernel): none pending now."""
        self.pending_from = None

    def reset(self) -> None:
        self.length = 0
        self.pending_from = None

    def grow(self, capacity: int) -> None:
        """Nothing eager: the next ``append`` reallocates (keeping the valid prefix)."""

    @property
    def packed(self) -> torch.Tensor:
        """``(batch, kv_heads, length, n_dims)`` view of the packed keys."""
        if self.storage is None:
            raise RuntimeError("PackedKeyDims: nothing appended yet")
        return self.packed_t.transpose(2, 3)

    @property
    def packed_t(self) -> torch.Tensor:
        """``(batch, kv_heads, n_dims, length)`` view of the packed keys (contiguous along the tokens); packs the
        pending slots first (``deferred``)."""
        if self.storage is None:
            raise RuntimeError("PackedKeyDims: nothing appended yet")
        self.flush()
        return self.storage[..., : self.length]

    @property
    def dequantized_t(self) -> torch.Tensor:
        """``(batch, kv_heads, n_dims, length)`` fp32 keys: ``packed_t`` for float dtypes (as stored), the int8 keys
        times their scales otherwise (a new tensor)."""
        packed_t = self.packed_t
        if self.scale is None:
            return packed_t
        return packed_t.float() * self.scale[:, :, None, : self.length]


# ---------------------------------------------------------------------------------------------------------
# FASA-C / FASA-M key layouts: keys stored once, as dominant dims + the other dims
# ---------------------------------------------------------------------------------------------------------


def _nan_view(like: torch.Tensor, shape) -> torch.Tensor:
    """A zero-stride ``shape`` view of one NaN: what a split layer hands to the attention function in place of
    full keys (no bytes; any code that reads it by mistake gets NaN, never silently wrong numbers)."""
    return torch.full((1, 1, 1, 1), float("nan"), dtype=like.dtype, device=like.device).expand(*shape)


class SplitKeyStore:
    """The keys of one :class:`TokpruneLayer` held once, in two disjoint parts per KV head (FASA-C), with the
    values beside them; ``tier`` (FASA-M): the non-dominant dims and the values live on another device.

    Attributes:
        dims, rest_dims: ``(kv_heads, nd)`` / ``(kv_heads, D - nd)`` int64 head-dim indices (disjoint, together
            all of ``0..D-1``), on the compute device.
        storage: ``(batch, kv_heads, nd, capacity)`` dominant dims, dims-major (the buffer FASA scores from,
            same layout as :attr:`PackedKeyDims.storage`), on the compute device.
        rest: ``(batch, kv_heads, capacity, D - nd)`` the other key dims, on ``tier``.
        values: ``(batch, kv_heads, capacity, Dv)`` the values, on ``tier``.
        device: the compute device; ``tier``: where ``rest`` / ``values`` live (== ``device`` for FASA-C).
    """

    def __init__(self, dims: torch.Tensor, storage: torch.Tensor, rest: torch.Tensor, rest_dims: torch.Tensor,
                 values: torch.Tensor, device):
        self.dims, self.rest_dims = dims, rest_dims
        self.storage, self.rest, self.values = storage, rest, values
        self.device = torch.device(device)
        self.tier = rest.device
        self.offloaded = False  # True: rest / values form a second tier (FASA-M), even on the same device
        self.length = 0

    @classmethod
    def from_buffers(cls, key_buffer: torch.Tensor, value_buffer: torch.Tensor, dims: torch.Tensor, length: int,
                     tier=None) -> "SplitKeyStore":
        batch, heads, capacity, head_dim = key_buffer.shape
        dims = dims.long().to(key_buffer.device)
        dims = dims if dims.dim() == 2 else dims.expand(heads, -1)
        if dims.shape[0] != heads or int(dims.min()) < 0 or int(dims.max()) >= head_dim:
            raise ValueError(f"split keys: dims {tuple(dims.shape)} do not fit {heads} KV heads of head_dim {head_dim}")
        from tokprune.reference.fasa import other_dims

        rest_dims = other_dims(dims, head_dim)
        offloaded = tier is not None
        tier = key_buffer.device if tier is None else torch.device(tier)
        storage = key_buffer.new_zeros(batch, heads, dims.shape[1], capacity)
        rest = torch.zeros(batch, heads, capacity, rest_dims.shape[1], dtype=key_buffer.dtype, device=tier)
        values = value_buffer if value_buffer.device == tier else value_buffer.to(tier)
        store = cls(dims, storage, rest, rest_dims, values, key_buffer.device)
        store.offloaded = offloaded
        store.write(key_buffer[:, :, :length], 0)
        store.length = length
        return store

    # -- shapes -----------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.storage.shape[3]

    @property
    def head_dim(self) -> int:
        return self.dims.shape[1] + self.rest_dims.shape[1]

    @property
    def packed_t(self) -> torch.Tensor:
        """``(batch, kv_heads, nd, length)`` the dominant dims (as :attr:`PackedKeyDims.packed_t`)."""
        return self.storage[..., : self.length]

    @property
    def packed(self) -> torch.Tensor:
        """``(batch, kv_heads, length, nd)`` (as :attr:`PackedKeyDims.packed`)."""
        return self.packed_t.transpose(2, 3)

    def tensors(self) -> list:
        return [self.storage, self.rest, self.values]

    # -- writes -----------------------------------------------------------------------------------------------
    def write(self, keys: torch.Tensor, start: int, values: Optional[torch.Tensor] = None) -> None:
        """Store ``keys (B, Hkv, n, D)`` (and ``values``) at slots ``[start, start + n)`` of every row."""
        batch, heads, n, _ = keys.shape
        end = start + n
        self.storage[..., start:end] = torch.gather(
            keys, 3, self.dims[None, :, None, :].expand(batch, heads, n, -1)).transpose(2, 3)
        rest = torch.gather(keys, 3, self.rest_dims[None, :, None, :].expand(batch, heads, n, -1))
        # copy_ (blocking) into the tier: a non_blocking device-to-host copy may still be running when read
        self.rest[:, :, start:end].copy_(rest)
        if values is not None:
            self.values[:, :, start:end].copy_(values)

    def grow(self, capacity: int, length: int) -> None:
        def _grown(t, axis):
            shape = list(t.shape)
            shape[axis] = capacity
            new = t.new_zeros(shape)
            new.narrow(axis, 0, length).copy_(t.narrow(axis, 0, length))
            return new

        self.storage, self.rest, self.values = _grown(self.storage, 3), _grown(self.rest, 2), _grown(self.values, 2)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (reorder / batch selection / repeat), each part on its own device."""
        self.storage = self.storage.index_select(0, rows.to(self.device))
        tier_rows = rows.to(self.tier)
        self.rest = self.rest.index_select(0, tier_rows)
        self.values = self.values.index_select(0, tier_rows)

    # -- reads ------------------------------------------------------------------------------------------------
    def full_keys(self, length: Optional[int] = None) -> torch.Tensor:
        """Reassembled ``(batch, kv_heads, length, D)`` keys on the compute device (a new tensor)."""
        length = self.length if length is None else length
        batch, heads = self.storage.shape[:2]
        out = self.storage.new_empty(batch, heads, length, self.head_dim)
        out.scatter_(3, self.dims[None, :, None, :].expand(batch, heads, length, -1),
                     self.storage[..., :length].transpose(2, 3))
        out.scatter_(3, self.rest_dims[None, :, None, :].expand(batch, heads, length, -1),
                     self.rest[:, :, :length].to(self.device))
        return out

    def full_values(self, length: Optional[int] = None) -> torch.Tensor:
        length = self.length if length is None else length
        return self.values[:, :, :length].to(self.device)

    def _query_perm(self, query: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, g, D)`` fp32 query with its dims in the order (dominant dims, other dims) of its KV head."""
        batch, heads, _, head_dim = query.shape
        kv_heads = self.dims.shape[0]
        if getattr(self, "_perm", None) is None or self._perm.device != query.device:
            self._perm = torch.cat([self.dims, self.rest_dims], 1).to(query.device)
        q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim).float()
        return torch.gather(q, 3, self._perm[None, :, None, :].expand(batch, -1, q.shape[2], -1))

    def _query_parts(self, query: torch.Tensor):
        batch, heads, _, head_dim = query.shape
        kv_heads = self.dims.shape[0]
        q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim).float()
        g = q.shape[2]
        q_dom = torch.gather(q, 3, self.dims[None, :, None, :].expand(batch, -1, g, -1))
        q_rest = torch.gather(q, 3, self.rest_dims[None, :, None, :].expand(batch, -1, g, -1))
        return q_dom, q_rest  # (B, Hkv, g, nd) / (B, Hkv, g, D - nd)

    def dense_attention(self, query: torch.Tensor, scale: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact decode attention over all ``length`` tokens without reassembling the keys:
        ``logits = q_dom . k_dom + q_rest . k_rest``. ``query (B, H, 1, D)``, ``valid (B, T)`` bool or ``None``.
        On a second tier the rest dims and the values of all tokens are copied to the compute device.
        Returns ``(B, H, 1, Dv)`` in the query dtype."""
        batch, heads = query.shape[:2]
        length = self.length
        q_dom, q_rest = self._query_parts(query)
        rest = self.rest[:, :, :length].to(self.device, non_blocking=True)
        values = self.values[:, :, :length].to(self.device, non_blocking=True)
        logits = torch.matmul(q_dom, self.storage[..., :length].float())
        logits += torch.matmul(q_rest, rest.transpose(2, 3).float())
        logits *= scale
        if valid is not None:
            logits.masked_fill_(~valid[:, None, None, :length], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a row without valid keys: zeros
        out = torch.matmul(probs, values.float())  # (B, Hkv, g, Dv)
        return out.reshape(batch, heads, 1, -1).to(query.dtype)

    def sparse_attention(self, query: torch.Tensor, index: torch.Tensor, scale: float,
                         padded: bool = True) -> torch.Tensor:
        """Exact decode attention over the tokens of ``index`` ``(B, Hkv or H, K)`` (``-1`` = none): only the
        chosen rows of both key parts and of the values are gathered (from the second tier when there is one:
        only those rows are copied), ``logits = q_dom . k_dom + q_rest . k_rest``. ``padded=False`` promises no
        ``-1`` entries (skips the masking). Returns ``(B, H, 1, Dv)`` in the query dtype."""
        batch, heads = query.shape[:2]
        kv_heads = self.dims.shape[0]
        group = heads // kv_heads
        k = index.shape[2]
        gi = group if index.shape[1] != kv_heads else 1  # per-query-head selection: one token set per head
        tok = (index.clamp(min=0) if padded else index).view(batch, kv_heads, gi, k)
        n_dims, d_rest, d_v = self.storage.shape[2], self.rest.shape[3], self.values.shape[3]
        capacity = self.capacity
        dom = self.storage.unsqueeze(2).expand(batch, kv_heads, gi, n_dims, capacity)
        k_dom = torch.gather(dom, 4, tok[:, :, :, None, :].expand(-1, -1, -1, n_dims, -1))  # (B, Hkv, gi, nd, K)
        # rows of the token-major parts: one index_select over (B * Hkv * capacity) rows (measured 9 us vs 51 us
        # for torch.gather on 3 heads x 256 rows x 48 dims, 1 thread)
        rows = (torch.arange(batch * kv_heads, device=tok.device).view(batch, kv_heads, 1, 1) * capacity + tok).view(-1)
        if self.offloaded:  # the tier gathers with these indices: a blocking copy (one sync per layer and step
            rows = rows.to(self.tier)  # when the tiers are different devices)
        k_rest = self.rest.reshape(-1, d_rest).index_select(0, rows).view(batch, kv_heads, gi, k, d_rest)
        v = self.values.reshape(-1, d_v).index_select(0, rows).view(batch, kv_heads, gi, k, d_v)
        if self.offloaded:
            k_rest = k_rest.to(self.device, non_blocking=True)
            v = v.to(self.device, non_blocking=True)
        q_perm = self._query_perm(query).view(batch * kv_heads, gi, group // gi, -1)  # dims: dominant, then rest
        k_sel = torch.cat([k_dom.transpose(3, 4), k_rest], dim=-1).view(batch * kv_heads, gi, k, -1)
        v = v.view(batch * kv_heads, gi, k, d_v)
        if not padded:  # q.k over the permuted dims == q_dom.k_dom + q_rest.k_rest: one fused SDPA call
            out = torch.nn.functional.scaled_dot_product_attention(q_perm, k_sel.to(q_perm.dtype),
                                                                   v.to(q_perm.dtype), scale=scale)
            return out.reshape(batch, heads, 1, -1).to(query.dtype)
        logits = torch.matmul(q_perm, k_sel.float().transpose(2, 3)) * scale  # (B * Hkv, gi, g / gi, K)
        logits.masked_fill_((index < 0).view(batch * kv_heads, gi, 1, k), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a row without valid tokens: zeros
        out = torch.matmul(probs, v.float())  # (B * Hkv, gi, g / gi, Dv)
        return out.reshape(batch, heads, 1, -1).to(query.dtype)

    def nbytes(self) -> Dict[str, int]:
        """Resident bytes per tier, ``{"compute": ..., "offload": ...}`` (allocated buffers, capacity included;
        without a second tier everything is ``"compute"``)."""
        second = "offload" if self.offloaded else "compute"
        out = {"compute": self.storage.numel() * self.storage.element_size()}
        for t in (self.rest, self.values):
            out[second] = out.get(second, 0) + t.numel() * t.element_size()
        return out


# ---------------------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------------------


class TokpruneLayer(CacheLayerMixin):
    """One layer of a :class:`TokpruneCache`: preallocated K/V buffers grown x2, host-side length.

    Attributes:
        key_buffer, value_buffer: ``(batch, kv_heads, capacity, head_dim)``; slots ``>= length`` are free.
        length: ``int``, number of slots of the view (``max`` of the row lengths).
        keys, values: views ``(batch, kv_heads, length, head_dim)`` of the buffers. Assigning a tensor
            to them (as code written for ``DynamicCache`` does) copies it into the buffers.
        side: ``{name: SideBuffer}`` kept in step with the keys (see :meth:`add_side`).
        bound_calls: ``{name: object}`` kernel calls a policy prepared for this layer's buffers (e.g. FASA's
            :func:`tokprune.ops.paged.paged_fasa_decoder`); the owner checks they still match the buffers.
        ragged: ``True`` when rows hold different numbers of tokens (``row_lengths`` differ).
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, capacity: int = 0, layer_idx: Optional[int] = None):
        self.layer_idx = layer_idx
        self.key_buffer: Optional[torch.Tensor] = None
        self.value_buffer: Optional[torch.Tensor] = None
        self.length = 0
        self.reserve = int(capacity)  # first allocation size hint (tokens)
        self.side: Dict[str, SideBuffer] = {}
        self.bound_calls: Dict[str, Any] = {}
        self._row_lengths: Optional[torch.Tensor] = None  # None: every row holds `length` tokens
        self._ragged_min = 0
        self._k_view: Optional[torch.Tensor] = None
        self._v_view: Optional[torch.Tensor] = None
        self._side_dirty = False
        self.split: Optional[SplitKeyStore] = None  # FASA-C / FASA-M layout (see split_keys); None: full K
        super().__init__()  # sets keys/values to None through the setters (a no-op clear)

    # -- views --------------------------------------------------------------------------------------------
    @property
    def keys(self) -> Optional[torch.Tensor]:
        if self.split is not None:  # reassembled on demand (a new tensor; the layer holds no full K)
            return self.split.full_keys(self.length)
        return self._k_view

    @keys.setter
    def keys(self, tensor) -> None:
        self._assign(tensor, which="keys")

    @property
    def values(self) -> Optional[torch.Tensor]:
        if self.split is not None:  # on the compute device (a copy when the values live on a second tier)
            return self.split.full_values(self.length)
        return self._v_view

    @values.setter
    def values(self, tensor) -> None:
        self._assign(tensor, which="values")

    @property
    def capacity(self) -> int:
        if self.split is not None:
            return self.split.capacity
        return 0 if self.key_buffer is None else self.key_buffer.shape[2]

    @property
    def batch_size(self) -> int:
        if self.split is not None:
            return self.split.storage.shape[0]
        return self.key_buffer.shape[0] if self.key_buffer is not None else -1

    @property
    def ragged(self) -> bool:
        return self._row_lengths is not None

    @property
    def row_lengths(self) -> torch.Tensor:
        """``(batch,)`` int64 tokens held by each row (on the cache device)."""
        if self._row_lengths is not None:
            return self._row_lengths
        if self.split is not None:
            return torch.full((self.batch_size,), self.length, dtype=torch.long, device=self.split.device)
        if self.key_buffer is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.full((self.key_buffer.shape[0],), self.length, dtype=torch.long, device=self.key_buffer.device)

    def valid_mask(self) -> Optional[torch.Tensor]:
        """``(batch, length)`` bool, True where a row holds a token; ``None`` when no row is ragged."""
        if self._row_lengths is None:
            return None
        pos = torch.arange(self.length, device=self._row_lengths.device)
        return pos[None, :] < self._row_lengths[:, None]

    def _refresh_views(self) -> None:
        if self.split is not None:
            split = self.split
            split.length = self.length
            shape = (split.storage.shape[0], split.storage.shape[1], self.length, split.head_dim)
            self._k_view = _nan_view(split.storage, shape)
            self._v_view = (split.values[:, :, : self.length] if not split.offloaded else
                            _nan_view(split.storage, shape[:3] + (split.values.shape[3],)))
        elif self.key_buffer is None:
            self._k_view = self._v_view = None
        else:
            self._k_view = self.key_buffer[:, :, : self.length]
            self._v_view = self.value_buffer[:, :, : self.length]

    # -- allocation ---------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, n, head_dim = key_states.shape
        capacity = max(self.reserve, _round_up(n + max(_PAGE, n // 4)))
        capacity = _round_up(capacity)
        self.key_buffer = zeros((batch, heads, capacity, head_dim), key_states.dtype, key_states.device)
        self.value_buffer = zeros((batch, value_states.shape[1], capacity, value_states.shape[3]),
                                  value_states.dtype, value_states.device)
        self.device = key_states.device
        self.length = 0
        self._row_lengths = None
        self.is_initialized = True
        for buf in self.side.values():
            buf.reset()
        self._refresh_views()

    def _grow(self, needed: int) -> None:
        capacity = _round_up(max(needed, 2 * self.capacity))
        kb, vb = self.key_buffer, self.value_buffer
        new_k = zeros((kb.shape[0], kb.shape[1], capacity, kb.shape[3]), kb.dtype, kb.device)
        new_v = zeros((vb.shape[0], vb.shape[1], capacity, vb.shape[3]), vb.dtype, vb.device)
        new_k[:, :, : self.length] = kb[:, :, : self.length]
        new_v[:, :, : self.length] = vb[:, :, : self.length]
        self.key_buffer, self.value_buffer = new_k, new_v
        for buf in self.side.values():
            buf.grow(capacity)

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not isinstance(key_states, torch.Tensor) or key_states.dim() != 4:
            raise ValueError(f"key_states must be a (batch, kv_heads, n_tokens, head_dim) tensor, got "
                             f"{getattr(key_states, 'shape', type(key_states).__name__)}")
        if not isinstance(value_states, torch.Tensor) or value_states.dim() != 4 or \
                value_states.shape[:3] != key_states.shape[:3]:
            raise ValueError(f"value_states must match key_states in (batch, kv_heads, n_tokens), got "
                             f"{tuple(getattr(value_states, 'shape', ()))} vs {tuple(key_states.shape)}")
        kb, vb = self.key_buffer, self.value_buffer
        if self.split is not None:  # stand-ins with the shapes / dtype / device of the split buffers
            sp = self.split
            kb = _nan_view(sp.storage, (sp.storage.shape[0], sp.storage.shape[1], 1, sp.head_dim))
            vb = _nan_view(sp.storage, (sp.storage.shape[0], sp.storage.shape[1], 1, sp.values.shape[3]))
        where = f"layer {self.layer_idx} of the TokpruneCache" if self.layer_idx is not None else "TokpruneLayer"
        if key_states.shape[0] != kb.shape[0]:
            raise ValueError(f"key_states has batch {key_states.shape[0]} but {where} holds batch {kb.shape[0]}; "
                             f"a cache serves one batch: call cache.reset() or build a new cache")
        if key_states.shape[1] != kb.shape[1] or key_states.shape[3] != kb.shape[3] or \
                value_states.shape[3] != vb.shape[3]:
            raise ValueError(f"key_states has kv_heads={key_states.shape[1]}, head_dim={key_states.shape[3]} "
                             f"(value head_dim {value_states.shape[3]}) but {where} holds kv_heads={kb.shape[1]}, "
                             f"head_dim={kb.shape[3]} (value {vb.shape[3]}): was this cache built for another "
                             f"model? Build a new cache")
        if key_states.dtype != kb.dtype or value_states.dtype != vb.dtype:
            raise TypeError(f"key_states/value_states dtype {key_states.dtype}/{value_states.dtype} differs from "
                            f"the cache dtype {kb.dtype} of {where}; convert the model or build a new cache")
        if key_states.device != kb.device or value_states.device != kb.device:
            raise ValueError(f"key_states/value_states are on {key_states.device}/{value_states.device} but "
                             f"{where} lives on {kb.device}; move the model back or build a new cache")

    # -- append -------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``(batch, kv_heads, n, head_dim)`` new keys/values after each row's tokens, in place.

        Returns:
            ``(keys, values)``: views ``(batch, kv_heads, length, head_dim)`` of the buffers, the new
            tokens last (ragged rows: row ``b``'s new tokens sit at ``row_lengths[b] - n ..``, slots
            after them up to ``length`` are not valid for that row, see :meth:`valid_mask`).
        """
        if self.split is not None:
            return self._split_update(key_states, value_states)
        if self.key_buffer is None:
            self.lazy_initialization(key_states, value_states)
        else:
            if not self.is_initialized:  # after reset(): re-use the buffers when the shapes still fit
                self._reinit(key_states, value_states)
            self._check_states(key_states, value_states)
        if self._side_dirty:
            self._rebuild_side()
        n = key_states.shape[2]
        start = self.length
        end = start + n
        if end > self.capacity:
            self._grow(end)
        if self._row_lengths is None:
            self.key_buffer[:, :, start:end].copy_(key_states)
            self.value_buffer[:, :, start:end].copy_(value_states)
            side_start = start
        else:
            self._ragged_write(key_states, value_states)
            side_start = self._ragged_min
        self.length = end
        self._refresh_views()
        for buf in self.side.values():
            buf.append(self, side_start, end)
        if self._row_lengths is not None:
            self._ragged_min += n
        return self._k_view, self._v_view

    def _split_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Append to the split layout: the dominant dims to ``storage``, the rest (and the values) to their tier.
        A decode step (one token) returns a NaN placeholder for the keys (the FASA policy reads the parts);
        a multi-token call (a prompt chunk, speculative verification) returns reassembled keys and values."""
        self._check_states(key_states, value_states)
        n = key_states.shape[2]
        start, end = self.length, self.length + n
        if end > self.capacity:
            self.split.grow(_round_up(max(end, 2 * self.capacity)), start)
        self.split.write(key_states, start, value_states)
        self.length = end
        self._refresh_views()
        if n == 1:
            return self._k_view, self._v_view
        self._k_view = self.split.full_keys(end)
        return self._k_view, self.split.full_values(end)

    def split_keys(self, dims: torch.Tensor, tier=None, own_side: Optional[str] = None) -> bool:
        """Switch this layer to the FASA-C layout: keys kept once, as the dims ``dims`` ``(kv_heads, nd)``
        (dims-major, what FASA scores) + the other dims; no full-K buffer afterwards. ``tier`` (FASA-M): the
        device for the other dims and the values (``None``: the compute device). ``own_side``: the name of
        the caller's :class:`PackedKeyDims` side buffer, dropped (its storage is reused as the dominant part).

        Returns ``False`` (layout unchanged) on an empty or ragged layer; ``True`` when the layer is split.
        Raises ``ValueError`` when other side buffers are attached (they read ``key_buffer``)."""
        if self.split is not None:
            return True
        if self.key_buffer is None or self.length == 0 or self._row_lengths is not None:
            return False
        others = [name for name in self.side if name != own_side]
        if others:
            raise ValueError(f"split keys: layer {self.layer_idx} has side buffers {others} that read full keys; "
                             f"use FASA(layout='packed') with them")
        if self._side_dirty:
            self._rebuild_side()
        packed = self.side.pop(own_side, None) if own_side is not None else None
        if isinstance(packed, PackedKeyDims):
            packed.flush()  # a deferred copy: its pending slots first
        store = SplitKeyStore.from_buffers(self.key_buffer, self.value_buffer, dims, self.length, tier=tier)
        if isinstance(packed, PackedKeyDims) and packed.storage is not None and packed.length == self.length \
                and packed.storage.shape == store.storage.shape \
                and packed.storage.dtype == store.storage.dtype and torch.equal(packed.dims.to(store.dims.device).expand_as(store.dims), store.dims):
            store.storage = packed.storage  # the same numbers: keep one of them
        self.split = store
        self.key_buffer = self.value_buffer = None
        self._refresh_views()
        return True

    def unsplit(self) -> None:
        """Back to full K/V buffers (reassembled; used before rewrites that work on full keys)."""
        split = self.split
        if split is None:
            return
        capacity = split.capacity
        kb = split.storage.new_zeros(split.storage.shape[0], split.storage.shape[1], capacity, split.head_dim)
        kb[:, :, : self.length] = split.full_keys(self.length)
        self.key_buffer = kb
        self.value_buffer = split.values.to(split.device)
        self.split = None
        self._side_dirty = True
        self._refresh_views()

    def _reinit(self, key_states, value_states) -> None:
        kb, vb = self.key_buffer, self.value_buffer
        if (kb.shape[0] != key_states.shape[0] or kb.shape[1] != key_states.shape[1]
                or kb.shape[3] != key_states.shape[3] or vb.shape[3] != value_states.shape[3]
                or kb.dtype != key_states.dtype or kb.device != key_states.device):
            self.key_buffer = self.value_buffer = None
            self.lazy_initialization(key_states, value_states)
        else:
            self.is_initialized = True

    def _ragged_write(self, key_states, value_states) -> None:
        batch, heads, n, head_dim = key_states.shape
        pos = self._row_lengths[:, None] + torch.arange(n, device=self._row_lengths.device)[None, :]  # (B, n)
        index = pos[:, None, :, None].expand(batch, heads, n, head_dim)
        self.key_buffer.scatter_(2, index, key_states)
        self.value_buffer.scatter_(2, pos[:, None, :, None].expand(batch, value_states.shape[1], n,
                                                                    value_states.shape[3]), value_states)
        self._row_lengths = self._row_lengths + n

    # -- side buffers -------------------------------------------------------------------------------------
    def add_side(self, name: str, buf: SideBuffer) -> SideBuffer:
        """Attach a side buffer; it is filled with the tokens already cached and kept in step afterwards."""
        if not callable(getattr(buf, "append", None)) or not callable(getattr(buf, "reset", None)):
            raise TypeError(f"side buffer {name!r} must have append(layer, start, end) and reset() methods")
        self.side[name] = buf
        buf.reset()
        if self.key_buffer is not None and self.length:
            buf.append(self, 0, self.length)
        return buf

    def _rebuild_side(self) -> None:
        self._side_dirty = False
        for buf in self.side.values():
            buf.reset()
            if self.length:
                buf.append(self, 0, self.length)

    # -- rewrites -----------------------------------------------------------------------------------------
    def _assign(self, tensor, which: str) -> None:
        if tensor is None:
            return self._clear()
        self.unsplit()
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"layer.{which} must be assigned a (batch, kv_heads, n_tokens, head_dim) tensor")
        buffer = self.key_buffer if which == "keys" else self.value_buffer
        if buffer is None or buffer.shape[0] != tensor.shape[0] or buffer.shape[1] != tensor.shape[1] or \
                buffer.shape[3] != tensor.shape[3] or buffer.dtype != tensor.dtype or buffer.device != tensor.device:
            raise ValueError(f"layer.{which} assignment of shape {tuple(tensor.shape)} {tensor.dtype} "
                             f"{tensor.device} does not fit the cache buffers "
                             f"{None if buffer is None else (tuple(buffer.shape), buffer.dtype, buffer.device)}")
        n = tensor.shape[2]
        if n > self.capacity:
            self._grow(n)
            buffer = self.key_buffer if which == "keys" else self.value_buffer
        # the tensor may alias the buffer (a view of it): go through a copy when it does
        if tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
            tensor = tensor.clone()
        buffer[:, :, :n].copy_(tensor)
        self.length = n
        self._row_lengths = None
        self._side_dirty = True
        self._refresh_views()

    def set_row_lengths(self, row_lengths) -> None:
        """Declare how many tokens each row holds (ragged batch). ``row_lengths``: ``(batch,)`` ints
        (a list or an int64 tensor) each ``<= length``; rows equal to ``length`` everywhere -> not ragged."""
        self.unsplit()
        if self.key_buffer is None:
            raise RuntimeError("set_row_lengths on an empty layer")
        if isinstance(row_lengths, torch.Tensor):
            host = row_lengths.detach().to("cpu").long().tolist()
        else:
            host = [int(x) for x in row_lengths]
        if len(host) != self.key_buffer.shape[0]:
            raise ValueError(f"row_lengths has {len(host)} entries, the cache holds batch {self.key_buffer.shape[0]}")
        if min(host) < 0 or max(host) > self.length:
            raise ValueError(f"row_lengths must lie in [0, length={self.length}], got {host}")
        if all(h == self.length for h in host):
            self._row_lengths = None
        else:
            self._row_lengths = torch.tensor(host, dtype=torch.long, device=self.key_buffer.device)
            # zero the free slots so that they hold finite values (masked attention multiplies them by 0)
            pos = torch.arange(self.length, device=self.key_buffer.device)
            free = (pos[None, :] >= self._row_lengths[:, None])[:, None, :, None]
            self.key_buffer[:, :, : self.length].masked_fill_(free, 0)
            self.value_buffer[:, :, : self.length].masked_fill_(free, 0)
        self._ragged_min = min(host)
        self._side_dirty = True

    def _clear(self) -> None:
        self.length = 0
        self._row_lengths = None
        for buf in self.side.values():
            buf.reset()
        self._refresh_views()

    # -- Cache layer API ----------------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Empty the layer; the buffers are kept and re-used when the next batch has the same shape (a split
        layer drops its buffers: the next prompt fills full K/V again, FASA splits it at its first decode step)."""
        if self.split is not None:
            self.split = None
            self.key_buffer = self.value_buffer = None
        self._clear()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, like ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or (self.key_buffer is None and self.split is None):
            return
        self.length = max(0, self.length + tokens_to_remove)
        if self._row_lengths is not None:
            self._row_lengths = self._row_lengths.clamp(max=self.length)
            self._ragged_min = min(self._ragged_min, self.length)
        for buf in self.side.values():
            if hasattr(buf, "length"):
                buf.length = min(buf.length, self.length)
        self._refresh_views()

    def _rebatch(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, rows: Optional[torch.Tensor]) -> None:
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        if self._row_lengths is not None and rows is not None:
            self._row_lengths = self._row_lengths[rows]
        self._side_dirty = True
        self._refresh_views()

    def _split_rows(self, rows: torch.Tensor) -> None:
        self.split.select_rows(rows)
        if self._row_lengths is not None:
            self._row_lengths = self._row_lengths[rows.to(self._row_lengths.device)]
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.split is not None:
            return self._split_rows(beam_idx.to(self.split.device))
        if self.key_buffer is None:
            return
        idx = beam_idx.to(self.key_buffer.device)
        self._rebatch(self.key_buffer.index_select(0, idx), self.value_buffer.index_select(0, idx), idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.split is not None:
            rows = torch.arange(self.batch_size, device=self.split.device).repeat_interleave(repeats)
            return self._split_rows(rows)
        if self.key_buffer is None:
            return
        rows = torch.arange(self.key_buffer.shape[0], device=self.key_buffer.device).repeat_interleave(repeats)
        self._rebatch(self.key_buffer.repeat_interleave(repeats, 0), self.value_buffer.repeat_interleave(repeats, 0),
                      rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.split is not None:
            return self._split_rows(indices.to(self.split.device))
        if self.key_buffer is None:
            return
        idx = indices.to(self.key_buffer.device)
        self._rebatch(self.key_buffer[idx], self.value_buffer[idx], idx)

    def offload(self):  # buffers stay where they are
        return None

    def prefetch(self):
        return None

    def __repr__(self):
        return (f"TokpruneLayer(length={self.length}, capacity={self.capacity}, "
                f"batch={self.batch_size}, ragged={self.ragged}, side={list(self.side)}, "
                f"layout={'full' if self.split is None else ('offload' if self.split.offloaded else 'split')})")


# ---------------------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------------------

_LIVE: "weakref.WeakSet[TokpruneCache]" = weakref.WeakSet()
_LAST: Optional[weakref.ref] = None


class TokpruneCache(Cache):
    """transformers ``Cache`` on preallocated buffers (see the module docstring).

    Args:
        config: the model config (its text/decoder config gives the layer count); or ``None`` with
            ``num_layers``.
        num_layers: number of decoder layers (default from ``config``).
        capacity: tokens to preallocate per layer on the first append (``model.generate`` passes its
            maximum length, so a generation never regrows); 0 = sized from the first append.

    Raises:
        ValueError: the config has sliding-window / non-attention layers (not supported: use
            ``DynamicCache``), or neither ``config`` nor ``num_layers`` is given.
    """

    def __init__(self, config=None, *, num_layers: Optional[int] = None, capacity: int = 0):
        if num_layers is None:
            if config is None:
                raise ValueError("TokpruneCache needs config= or num_layers=")
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = int(text.num_hidden_layers)
            layer_types = getattr(text, "layer_types", None)
            if layer_types is not None and any(t != "full_attention" for t in layer_types[:num_layers]):
                raise ValueError(f"TokpruneCache supports full-attention layers only; this config has layer_types "
                                 f"{sorted(set(layer_types))}")
            if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True) \
                    and layer_types is None:
                raise ValueError("TokpruneCache supports full-attention layers only; this config sets "
                                 f"sliding_window={text.sliding_window}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        super().__init__(layers=[TokpruneLayer(capacity, layer_idx=i) for i in range(num_layers)])
        _LIVE.add(self)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append to layer ``layer_idx`` in place; returns the layer's ``(keys, values)`` views."""
        global _LAST
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"layer_idx={layer_idx} but this TokpruneCache has {len(self.layers)} layers: was it "
                             f"built for another model? Build a new cache")
        if layer_idx == 0:
            _LAST = weakref.ref(self)
        return self.layers[layer_idx].update(key_states, value_states)

    def add_side(self, name: str, factory) -> List[SideBuffer]:
        """Attach ``factory(layer_idx)`` as side buffer ``name`` to every layer; returns them in layer order."""
        return [layer.add_side(name, factory(i)) for i, layer in enumerate(self.layers)]

    def set_row_lengths(self, row_lengths) -> None:
        """:meth:`TokpruneLayer.set_row_lengths` on every layer."""
        for layer in self.layers:
            layer.set_row_lengths(row_lengths)

    def compact(self, prefix_len: int, keep: torch.Tensor, counts=None) -> None:
        """Keep, per row, the slots ``prefix_len + keep[b, :counts[b]]`` after the prefix, in order (in place).

        Accepted-path compaction after a speculative tree step: ``keep (batch, W)`` int64 node indices
        relative to ``prefix_len`` (e.g. ``accept_index`` of the verify ops, -1 padded), ``counts`` the
        number of valid entries per row (list of ints or a ``(batch,)`` tensor; default: all ``W``).
        Rows keeping fewer nodes than others become ragged (see :meth:`TokpruneLayer.valid_mask`).
        """
        keep = keep.long()
        if keep.dim() != 2:
            raise ValueError(f"keep must be (batch, W), got {tuple(keep.shape)}")
        width = keep.shape[1]
        host_counts = [width] * keep.shape[0] if counts is None else (
            counts.detach().to("cpu").long().tolist() if isinstance(counts, torch.Tensor) else [int(c) for c in counts])
        for layer in self.layers:
            layer.unsplit()  # compaction works on full K (a split layer is reassembled; FASA splits it again)
            if layer.key_buffer is None:
                continue
            if keep.shape[0] != layer.key_buffer.shape[0]:
                raise ValueError(f"keep has {keep.shape[0]} rows but the cache holds batch {layer.key_buffer.shape[0]}")
            if prefix_len + width > layer.length:
                raise ValueError(f"prefix_len={prefix_len} + W={width} exceeds the cached length {layer.length}")
            src = (prefix_len + keep.clamp(min=0)).to(layer.key_buffer.device)  # (B, W)
            for buffer in (layer.key_buffer, layer.value_buffer):
                b, h, _, d = buffer.shape
                idx = src[:, None, :, None].expand(b, h, width, d)
                buffer[:, :, prefix_len:prefix_len + width] = torch.gather(buffer, 2, idx)
            layer.length = prefix_len + max(host_counts)
            layer._refresh_views()
            layer.set_row_lengths([prefix_len + c for c in host_counts])

    @property
    def batch_size(self) -> int:
        sizes = {layer.batch_size for layer in self.layers if layer.batch_size != -1}
        if not sizes:
            return -1
        if len(sizes) > 1:
            raise ValueError(f"layers hold different batch sizes {sorted(sizes)}")
        return sizes.pop()

    def __repr__(self):
        return f"TokpruneCache(layers={len(self.layers)}, length={self.get_seq_length()})"


def cache_layer_for(key: torch.Tensor, layer_idx: int) -> Optional[TokpruneLayer]:
    """The :class:`TokpruneLayer` whose ``keys`` view is ``key`` (as received by an attention function), or
    ``None`` when ``key`` does not come from a TokpruneCache. Reads no tensor data (identity, then data
    pointer and shape of the view): no device synchronisation."""
    last = _LAST() if _LAST is not None else None
    if last is not None and 0 <= layer_idx < len(last.layers) and last.layers[layer_idx]._k_view is key:
        return last.layers[layer_idx]  # the decode step's common case: the newest cache, the view it handed out
    candidates = [] if last is None else [last]
    candidates.extend(c for c in list(_LIVE) if c is not last)
    for cache in candidates:
        if not 0 <= layer_idx < len(cache.layers):
            continue
        layer = cache.layers[layer_idx]
        view = layer._k_view
        if view is None:
            continue
        if view is key:
            return layer
        if (not torch.compiler.is_compiling() and view.shape == key.shape and view.data_ptr() == key.data_ptr()
                and view.stride() == key.stride()):
            return layer
    return None


# ---------------------------------------------------------------------------------------------------------
# attention function and install hook
# ---------------------------------------------------------------------------------------------------------


def tokprune_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: Optional[float] = None, **kwargs):
    """HF attention function: decode steps (``q_len == 1``) through
    :func:`tokprune.ops.decode.dense_decode_attention` (GQA without ``repeat_kv``, padding mask and ragged
    rows honoured), everything else through SDPA.

    Args: ``query (B, H, q, D)``, ``key``/``value (B, Hkv, T, D)``, ``attention_mask`` ``None`` or a bool
    ``(B, 1, q, T)`` (True = attend) / additive float mask. Returns ``(out (B, q, H, D), None)``.
    """
    if query.shape[2] == 1 and not (dropout and module.training) and not kwargs.get("output_attentions"):
        from tokprune.ops.decode import dense_decode_attention

        valid = attention_mask
        layer = cache_layer_for(key, getattr(module, "layer_idx", -1))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if layer is not None and layer.split is not None:  # FASA-C/M layout: two-part dot product, no reassembly
            from tokprune.methods.base import decode_valid_mask

            rows = decode_valid_mask(attention_mask, query.shape[0], key.shape[2], layer)
            return layer.split.dense_attention(query, scale, rows).transpose(1, 2), None
        if layer is not None and layer.ragged:
            rows = layer.valid_mask()[:, None, None, :]
            if valid is None:
                valid = rows
            elif valid.dtype == torch.bool:
                valid = valid[..., : key.shape[2]] & rows
            else:
                valid = valid[..., : key.shape[2]].masked_fill(~rows, float("-inf"))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = dense_decode_attention(query, key, value, scale, valid=valid)
        return out.transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


_registered_names: set = set()


def register_attention_function(name: str, forward) -> None:
    """Register ``forward`` (HF attention-function signature) under ``name`` with transformers'
    ``AttentionInterface``, with the sdpa mask builder (without which a custom name receives
    ``attention_mask=None``); idempotent per name."""
    if name in _registered_names:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    _registered_names.add(name)


def _register() -> None:
    register_attention_function(CACHE_ATTENTION_NAME, tokprune_decode_attention)


_STATE_ATTR = "_tokprune_cache_state"


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _supported(model) -> Optional[str]:
    """``None`` when a TokpruneCache can serve ``model``, else the reason."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    try:
        TokpruneCache(_text_config(model))
    except (ValueError, AttributeError) as exc:
        return str(exc)
    return None


class CacheHandle:
    """Returned by :func:`use_tokprune_cache`: ``remove()`` (or leaving the ``with`` block) undoes it.

    Nested installs on one model share the hook; the last ``remove()`` restores the model."""

    def __init__(self, model):
        self.model = model
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        state = getattr(self.model, _STATE_ATTR, None)
        if state is None:
            return
        state["count"] -= 1
        if state["count"] > 0:
            return
        if state["prepare"] is None:
            self.model.__dict__.pop("_prepare_cache_for_generation", None)
        else:
            self.model._prepare_cache_for_generation = state["prepare"]
        state["hook"].remove()
        if state["attn"] is not None and self.model.config._attn_implementation == CACHE_ATTENTION_NAME:
            self.model.set_attn_implementation(state["attn"])
        delattr(self.model, _STATE_ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def use_tokprune_cache(model, *, decode_attention: bool = True, forward: bool = True) -> CacheHandle:
    """Make ``model.generate`` (and ``model(..., use_cache=True)`` without a cache) use a
    :class:`TokpruneCache` instead of ``DynamicCache``, reversibly.

    Args:
        model: a transformers causal LM with full-attention layers (Llama, Qwen2, Mistral, ... or the
            language model of a VLM).
        decode_attention: when the model runs plain SDPA/eager attention, switch it to
            :func:`tokprune_decode_attention` (registered as ``"tokprune_cache"``): decode steps read the
            cache without ``repeat_kv``. A model already routed through tokprune policies keeps its router.
        forward: also give a TokpruneCache to direct forward calls with ``use_cache`` and no cache.

    Returns:
        A :class:`CacheHandle` (context manager); ``remove()`` restores the model.

    Raises:
        ValueError: the model cannot use the cache (sliding-window or non-attention layers,
            encoder-decoder), with the reason.
    """
    reason = _supported(model)
    if reason is not None:
        raise ValueError(f"use_tokprune_cache: {type(model).__name__} cannot use a TokpruneCache: {reason}")
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        state["count"] += 1
        return CacheHandle(model)

    from transformers.cache_utils import DynamicCache

    own = model.__dict__.get("_prepare_cache_for_generation")
    original = model._prepare_cache_for_generation

    def _prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        result = original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length,
                          *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) \
                and cache.get_seq_length() == 0:
            model_kwargs["cache"] = TokpruneCache(_text_config(model), capacity=int(max_cache_length) + 1)
        return result

    def _pre_hook(module, args, kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(_text_config(model), "use_cache", False)
        if not use_cache or module.training:
            return None
        kwargs = dict(kwargs)
        kwargs["cache"] = TokpruneCache(_text_config(model))
        return args, kwargs

    model._prepare_cache_for_generation = _prepare_cache_for_generation
    hook = model.register_forward_pre_hook(_pre_hook, with_kwargs=True) if forward else _NoHook()
    previous = None
    if decode_attention and model.config._attn_implementation in (None, "sdpa"):
        _register()
        previous = model.config._attn_implementation or "sdpa"
        model.set_attn_implementation(CACHE_ATTENTION_NAME)
    setattr(model, _STATE_ATTR, dict(count=1, prepare=own, hook=hook, attn=previous))
    return CacheHandle(model)


class _NoHook:
    def remove(self):
        return None
