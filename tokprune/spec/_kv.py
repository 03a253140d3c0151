"""Private helpers shared by the generation loop and the model drafters: one forward of a Hugging Face
causal LM on a chunk of new tokens with an explicit boolean visibility matrix, and in-place edits of a
``DynamicCache`` (crop, keep selected tail rows, select batch rows).

Positions and masks are always given explicitly, so a cache may contain *holes* (slots that no later
token attends to): left padding of the prompt, padding nodes of a tree, and the slots of rows that
accepted fewer draft tokens than others in the same step.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache()


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


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"tokprune.spec needs a transformers DynamicCache with .layers, got {type(cache).__name__}")
    return layers


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` slots of every layer (in place)."""
    for layer in _layers(cache):
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


def keep_tail_rows(cache, prefix_len: int, index: torch.Tensor) -> None:
    """Keep slots ``[0, prefix_len)`` and, per batch row, the tail slots ``prefix_len + index[b, j]``
    (in this order), in place. ``index [B, m]`` int64 in ``[0, n_tail)``."""
    m = index.shape[1]
    for layer in _layers(cache):
        keys, values = layer.keys, layer.values
        if keys is None or not keys.numel():
            continue
        bsz, heads, _, dim = keys.shape
        idx = index.view(bsz, 1, m, 1).expand(bsz, heads, m, dim)
        k_sel = keys[:, :, prefix_len:].gather(2, idx)
        v_sel = values[:, :, prefix_len:].gather(2, idx)
        keys[:, :, prefix_len:prefix_len + m] = k_sel
        values[:, :, prefix_len:prefix_len + m] = v_sel
        layer.keys = keys[:, :, :prefix_len + m]
        layer.values = values[:, :, :prefix_len + m]


def select_batch(cache, rows: torch.Tensor) -> None:
    """Keep batch rows ``rows`` (int64) of every layer, in place."""
    for layer in _layers(cache):
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)


def warp(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
         top_p: Optional[float]) -> torch.Tensor:
    """Distribution used for drafting: the sampling distribution when sampling, else ``softmax``."""
    if not do_sample:
        return torch.softmax(logits.float(), dim=-1)
    from tokprune.ops.spec import process_logits

    return process_logits(logits, temperature, top_k, top_p)
