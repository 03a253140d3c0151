"""Private helpers shared by the generation loop and the model drafters: one forward of a Hugging Face
causal LM on a chunk of new tokens with an explicit boolean visibility matrix, and in-place edits of the
KV cache (crop, keep selected tail rows, select batch rows).

The cache is a ``DynamicCache`` whose layers are :class:`PreallocLayer`: keys/values live in a buffer
with spare capacity (grown geometrically), ``update`` writes the new slots in place and returns views,
so a step costs no whole-cache ``torch.cat``; the accepted-path compaction writes in place too.

Positions and masks are always given explicitly, so a cache may contain *holes* (slots that no later
token attends to): left padding of the prompt, padding nodes of a tree, and the slots of rows that
accepted fewer draft tokens than others in the same step.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch


def _prealloc_layer_class():
    global _PREALLOC
    if _PREALLOC is not None:
        return _PREALLOC
    from transformers.cache_utils import DynamicLayer

    class PreallocLayer(DynamicLayer):
        """A ``DynamicLayer`` with preallocated capacity: ``keys``/``values`` are views
        ``[B, H, length, D]`` of buffers ``[B, H, capacity, D]``; appends write in place."""

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self.k_buf = self.v_buf = None
            self.length = 0

        def _reserve(self, key_states, value_states, need: int) -> None:
            cap = 0 if self.k_buf is None else self.k_buf.shape[2]
            if need <= cap:
                return
            new_cap = max(need + 64, int(cap * 1.5))
            b, h, _, d = key_states.shape
            k = key_states.new_empty(b, h, new_cap, d)
            v = value_states.new_empty(b, h, new_cap, value_states.shape[-1])
            if self.length:
                k[:, :, :self.length] = self.k_buf[:, :, :self.length]
                v[:, :, :self.length] = self.v_buf[:, :, :self.length]
            self.k_buf, self.v_buf = k, v

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[2]
            self._reserve(key_states, value_states, self.length + n)
            self.k_buf[:, :, self.length:self.length + n] = key_states
            self.v_buf[:, :, self.length:self.length + n] = value_states
            self.set_length(self.length + n)
            return self.keys, self.values

        def set_length(self, length: int) -> None:
            self.length = length
            self.keys = self.k_buf[:, :, :length]
            self.values = self.v_buf[:, :, :length]

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            if tokens_to_remove and self.is_initialized:
                self.set_length(max(self.length + tokens_to_remove, 0))

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized and self.k_buf is not None:
                self.k_buf = self.k_buf.index_select(0, indices)
                self.v_buf = self.v_buf.index_select(0, indices)
                self.set_length(self.length)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized and self.k_buf is not None:
                self.k_buf = self.k_buf.repeat_interleave(repeats, dim=0)
                self.v_buf = self.v_buf.repeat_interleave(repeats, dim=0)
                self.set_length(self.length)

        def reset(self) -> None:
            self.k_buf = self.v_buf = None
            self.length = 0
            super().reset()

    _PREALLOC = PreallocLayer
    return _PREALLOC


_PREALLOC = None


def new_cache(model, preallocated: bool = True):
    """A ``DynamicCache`` for ``model``; with ``preallocated`` its layers append in place
    (:class:`PreallocLayer`), else transformers' own ``DynamicLayer`` (``torch.cat`` per step)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if preallocated:
        cache.layer_class_to_replicate = _prealloc_layer_class()
    return cache


def _is_prealloc(layer) -> bool:
    return _PREALLOC is not None and isinstance(layer, _PREALLOC)


def _cache_kwarg(model) -> str:
    name = getattr(model, "_tokprune_cache_kwarg", None)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        try:
            model._tokprune_cache_kwarg = name
        except AttributeError:
            pass
    return name


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def forward_chunk(model, cache, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
                  logits_to_keep: Optional[int] = None) -> torch.Tensor:
    """Run ``model`` on ``tokens [B, n]`` appended after the ``T`` cached slots.

    Args:
        cache: the model's ``DynamicCache`` (grows by ``n`` slots).
        tokens: ``[B, n]`` int64.
        positions: ``[B, n]`` int64 position ids.
        visible: ``[B, n, T + n]`` bool, True where query ``i`` may attend to slot ``j``.
        logits_to_keep: only compute logits of the last ``logits_to_keep`` tokens.

    Returns:
        ``[B, n or logits_to_keep, V]`` logits (fp32 view of the model output).
    """
    dtype = model_dtype(model)
    mask = torch.zeros(visible.shape, dtype=dtype, device=tokens.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    kwargs = {_cache_kwarg(model): cache, "use_cache": True}
    if logits_to_keep is not None:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(input_ids=tokens, attention_mask=mask.unsqueeze(1), position_ids=positions, **kwargs)
    return out.logits


def forward_prompt(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   logits_to_keep: Optional[int] = None) -> torch.Tensor:
    """Prefill with the model's own causal + padding mask (what ``model.generate`` does)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    kwargs = {_cache_kwarg(model): cache, "use_cache": True}
    if logits_to_keep is not None:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)
    return out.logits


def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"tokprune.spec needs a transformers DynamicCache with .layers, got {type(cache).__name__}")
    return layers


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` slots of every layer (in place)."""
    for layer in _layers(cache):
        if _is_prealloc(layer):
            if layer.is_initialized and layer.k_buf is not None:
                layer.set_length(min(length, layer.length))
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


def keep_tail_rows(cache, prefix_len: int, index: torch.Tensor) -> None:
    """Keep slots ``[0, prefix_len)`` and, per batch row, the tail slots ``prefix_len + index[b, j]``
    (in this order), in place. ``index [B, m]`` int64 in ``[0, n_tail)``."""
    m = index.shape[1]
    same_path = index.shape[0] == 1 or bool((index == index[:1]).all())
    # the kept slots already sit in place (e.g. only the root accepted): nothing to copy
    in_place = same_path and bool((index[0] == torch.arange(m, device=index.device)).all())
    for layer in _layers(cache):
        keys, values = layer.keys, layer.values
        if keys is None or not keys.numel():
            continue
        if in_place:
            if _is_prealloc(layer):
                layer.set_length(prefix_len + m)
            else:
                layer.keys = keys[:, :, :prefix_len + m]
                layer.values = values[:, :, :prefix_len + m]
            continue
        bsz, heads, _, dim = keys.shape
        if same_path:  # one path for the whole batch: index_select on the slot dim
            k_sel = keys[:, :, prefix_len:].index_select(2, index[0])
            v_sel = values[:, :, prefix_len:].index_select(2, index[0])
        else:
            idx = index.view(bsz, 1, m, 1).expand(bsz, heads, m, dim)
            k_sel = keys[:, :, prefix_len:].gather(2, idx)
            v_sel = values[:, :, prefix_len:].gather(2, idx)
        keys[:, :, prefix_len:prefix_len + m] = k_sel
        values[:, :, prefix_len:prefix_len + m] = v_sel
        if _is_prealloc(layer):
            layer.set_length(prefix_len + m)
        else:
            layer.keys = keys[:, :, :prefix_len + m]
            layer.values = values[:, :, :prefix_len + m]


def select_batch(cache, rows: torch.Tensor) -> None:
    """Keep batch rows ``rows`` (int64) of every layer, in place."""
    for layer in _layers(cache):
        if _is_prealloc(layer):
            layer.batch_select_indices(rows)
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)


def warp(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
         top_p: Optional[float]) -> torch.Tensor:
    """Distribution used for drafting: the sampling distribution when sampling, else ``softmax``."""
    if not do_sample:
        return torch.softmax(logits.float(), dim=-1)
    from tokprune.ops.spec import process_logits

    return process_logits(logits, temperature, top_k, top_p)
