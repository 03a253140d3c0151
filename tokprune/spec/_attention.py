"""Tree-forward attention without ``repeat_kv`` (private to :mod:`tokprune.spec`).

A tree forward passes ``N > 1`` queries and an explicit 4D mask. transformers' SDPA path then cannot use
``enable_gqa`` on the CPU and copies the whole cache of every layer into ``num_key_value_groups``
repeated heads (``repeat_kv``), for keys and values, on every step: in a profile of SmolLM2-135M (9 query
heads, 3 KV heads) with a 12-node tree over a 256-token prefix that copy was ~20% of the tree forward, and
it grows with the context. :func:`tree_sdpa_attention` instead folds the ``groups`` query heads of each KV
head into the query-length dimension (``[B, Hkv, groups * N, D]``, the mask repeated ``groups`` times)
and runs one SDPA on the cache as it is. Same math as SDPA over repeated heads; everything else (the
prefill, 1-token calls, no mask, dropout, soft-capping, position bias) goes to transformers' own
``sdpa_attention_forward``.

:func:`tree_attention` switches a model whose attention is plain ``"sdpa"`` to it for a ``with`` block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

TREE_ATTENTION_NAME = "tokprune_spec_tree"


def tree_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                        dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """HF attention-function signature: ``query [B, H, N, D]``, ``key``/``value [B, Hkv, T, D]``,
    ``attention_mask`` ``[B or 1, 1, N, >= T]`` (additive float or bool) or ``None``.
    Returns ``(out [B, N, H, D], None)``."""
    groups = getattr(module, "num_key_value_groups", 1)
    n = query.shape[2]
    plain = (groups == 1 or n == 1 or attention_mask is None or attention_mask.dim() != 4
             or attention_mask.shape[1] != 1 or (dropout and module.training) or kwargs.get("softcap") is not None
             or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")
             or key.shape[-1] != value.shape[-1])
    if plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bsz, heads, _, dim = query.shape
    kv_heads, t_len = key.shape[1], key.shape[2]
    q = query.reshape(bsz, kv_heads, groups * n, dim)  # head kv * groups + g -> rows g * n .. g * n + n - 1
    mask = _folded_mask(attention_mask, n, t_len, groups)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.view(bsz, heads, n, value.shape[-1]).transpose(1, 2).contiguous(), None


# The folded mask of the last call: every layer of one forward receives the same mask tensor, so it is
# repeated once per forward instead of once per layer (~1.2 ms of a ~85 ms 8-node SmolLM2 forward).
_LAST_FOLD: list = [None, None]  # [(mask object, its _version, n, t_len, groups), folded mask]


def _folded_mask(attention_mask: torch.Tensor, n: int, t_len: int, groups: int) -> torch.Tensor:
    """``attention_mask[..., :t_len]`` broadcast to ``[B or 1, 1, n, t_len]`` and repeated ``groups``
    times along the query dim; reused while the same (unmodified) mask tensor comes back."""
    key, hit = _LAST_FOLD
    if key is not None and key[0] is attention_mask and key[1:] == (attention_mask._version, n, t_len, groups):
        return hit
    mask = attention_mask[..., :t_len]
    mask = mask.expand(mask.shape[0], 1, n, t_len).repeat(1, 1, groups, 1)
    _LAST_FOLD[0], _LAST_FOLD[1] = (attention_mask, attention_mask._version, n, t_len, groups), mask
    return mask


def _clear_fold_cache() -> None:
    _LAST_FOLD[0] = _LAST_FOLD[1] = None


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TREE_ATTENTION_NAME, tree_sdpa_attention)
    AttentionMaskInterface.register(TREE_ATTENTION_NAME, sdpa_mask)  # else a custom name gets no mask
    _registered = True


@contextlib.contextmanager
def tree_attention(model, enabled: bool = True) -> Iterator[bool]:
    """Inside the block, a model whose attention is ``"sdpa"`` runs :func:`tree_sdpa_attention` instead
    (any other implementation, e.g. eager or a tokprune policy router, is left alone). Yields whether it
    switched."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if not enabled or current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield False
        return
    _register()
    model.set_attn_implementation(TREE_ATTENTION_NAME)
    try:
        yield True
    finally:
        _clear_fold_cache()
        if model.config._attn_implementation == TREE_ATTENTION_NAME:
            model.set_attn_implementation(current)
