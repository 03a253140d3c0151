"""Route a Hugging Face model's attention through tokprune policies, reversibly.

One attention function, ``"tokprune"``, is registered with ``transformers.AttentionInterface`` (and the
sdpa mask builder with ``AttentionMaskInterface``, without which a custom name receives
``attention_mask=None`` and padding is silently ignored). It looks up the policies attached to the
calling attention module:

* **decode** (one query token per request): a :class:`tokprune.methods.base.KVPolicy` runs the shared
  path ``declines? -> dense : score -> select_sparse_indices -> sparse_decode_attention`` on a
  :class:`tokprune.methods.base.DecodeContext` (which carries the :class:`tokprune.hf.kv_cache.TokpruneLayer`
  of the call, if any, for side buffers). Dense means :func:`tokprune.hf.kv_cache.tokprune_decode_attention`
  on tokprune's cache (GQA without ``repeat_kv``), SDPA otherwise.
* **prefill** (several query tokens): a prefill policy ``attend(module, q, k, v, mask, scale, **kw)``
  returning ``(B, q_len, H, D)`` or ``None`` (SDPA). A decode policy with ``observes_prefill`` sees the call
  first (SnapKV and UNComp rank the prompt there).
* **ragged calls** (transformers' continuous batching, ``model.generate_batch``): requests arrive
  concatenated in one call with ``cu_seq_lens_q`` / ``cu_seq_lens_k``; the router splits them and decides
  decode vs prefill *per request* (a decode step of 3 requests has ``q_len == 3``). Continuous batching
  accepts only ``"sdpa"``, ``"paged|eager"`` and flash names, so while a model is patched tokprune wraps the
  global ``"paged|eager"`` entry (modules without policies pass straight through to transformers' function)
  and switches the patched model to it when continuous batching starts (``init_continuous_batching``,
  called by ``generate_batch`` and ``continuous_batching_context_manager``).

Any object with ``attend(module, query, key, value, attention_mask, scaling, **kwargs) -> Tensor | None`` is
also accepted as a decode policy (a raw hook: it gets the call as HF gives it).

Nothing is registered or patched at import; :func:`patch_attention` does both and returns a
:class:`tokprune.methods.base.PatchHandle` that undoes the patch (``with patch_attention(model, ...):``).
``tokprune.hf.patch_attention`` is the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

from tokprune.methods.base import DecodeContext, KVPolicy, PatchHandle, decode_valid_mask

ATTENTION_NAME = "tokprune"
PAGED_NAME = "paged|eager"  # the continuous-batching name tokprune wraps while a model is patched
_POLICY_ATTR = "_tokprune_attention_router"


@dataclass
class AttentionRouter:
    """Policies attached to one attention module."""

    prefill: Any = None
    decode: Any = None


def _cache_layer_for(key: torch.Tensor, layer_idx: int):
    """The :class:`TokpruneLayer` behind ``key`` (``None`` on another cache or without tokprune's cache)."""
    try:
        from tokprune.hf.kv_cache import cache_layer_for
    except ImportError:  # pragma: no cover - cache module absent
        return None
    return cache_layer_for(key, layer_idx)


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]


def _dense_decode(module, query, key, value, attention_mask, scaling, cache_layer, **kwargs) -> torch.Tensor:
    """Exact decode attention ``(B, 1, H, D)``: tokprune's dense decode op on tokprune's cache, else SDPA."""
    if cache_layer is not None:
        try:
            from tokprune.hf.kv_cache import tokprune_decode_attention
            import tokprune.ops.decode  # noqa: F401  (the op it calls)
        except ImportError:  # pragma: no cover - dense decode op not available
            pass
        else:
            return tokprune_decode_attention(module, query, key, value, attention_mask, scaling=scaling)[0]
    return _sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _is_kv(policy) -> bool:
    """A KV policy (``attend_decode(ctx)``: KVPolicy, UNComp) rather than a raw ``attend`` hook."""
    return isinstance(policy, KVPolicy) or callable(getattr(policy, "attend_decode", None))


def _decode(module, policy, query, key, value, attention_mask, scale, dense_kwargs) -> torch.Tensor:
    """One decode call (``q_len == 1``) through ``policy``: ``(B, 1, H, D)``."""
    if not _is_kv(policy):
        out = policy.attend(module, query, key, value, attention_mask, scale, **dense_kwargs)
        if out is not None:
            return out
        return _sdpa(module, query, key, value, attention_mask, scaling=scale, **dense_kwargs)
    layer = _cache_layer_for(key, module.layer_idx)
    valid = decode_valid_mask(attention_mask, query.shape[0], key.shape[2], layer)
    ctx = DecodeContext(module, query, key, value, valid, float(scale), layer)
    out = policy.attend_decode(ctx)
    if out is None:
        return _dense_decode(module, query, key, value, attention_mask, scale, layer, **dense_kwargs)
    return out.transpose(1, 2)


def _prefill(module, router, query, key, value, attention_mask, scale, kwargs, fallback) -> torch.Tensor:
    """One multi-token call: the decode policy observes it (if it wants), the prefill policy computes it."""
    decode = router.decode
    if decode is not None and getattr(decode, "observes_prefill", False):
        decode.prefill(module, query, key, value, attention_mask, scale)
    if router.prefill is not None:
        out = router.prefill.attend(module, query, key, value, attention_mask, scale, **kwargs)
        if out is not None:
            return out
    return fallback(module, query, key, value, attention_mask, scale, kwargs)


def _sdpa_fallback(module, query, key, value, attention_mask, scale, kwargs):
    return _sdpa(module, query, key, value, attention_mask, scaling=scale, **kwargs)


_RAGGED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "read_index", "write_index",
                "block_table", "k_cache", "v_cache")


def _ragged(module, router, query, key, value, attention_mask, scale, kwargs, fallback) -> torch.Tensor:
    """A varlen call (continuous batching): requests ``r`` own query rows ``cu_q[r]:cu_q[r+1]`` and key rows
    ``cu_k[r]:cu_k[r+1]`` of a batch-1 call; each is routed on its own (decode if it has one query token).

    Reads the two ``cu_seq_lens`` vectors on the host (they are CPU tensors under transformers' continuous
    batching on CPU; on a GPU this is one synchronisation per layer call, not per request)."""
    if getattr(router.decode, "observes_prefill", False):
        raise NotImplementedError(f"{type(router.decode).__name__} keeps per-sequence prompt state (observed at "
                                  f"prefill) and cannot serve continuous batching; use model.generate")
    cu_q = kwargs["cu_seq_lens_q"].tolist()
    cu_k = kwargs["cu_seq_lens_k"].tolist()
    if query.shape[0] != 1 or len(cu_q) != len(cu_k):
        raise ValueError(f"ragged attention call: expected batch 1 and matching cu_seq_lens_q/k, got batch "
                         f"{query.shape[0]}, {len(cu_q)} and {len(cu_k)} offsets")
    rest = {k: v for k, v in kwargs.items() if k not in _RAGGED_KEYS}
    outs = []
    for r in range(len(cu_q) - 1):
        q = query[:, :, cu_q[r]:cu_q[r + 1]]
        k, v = key[:, :, cu_k[r]:cu_k[r + 1]], value[:, :, cu_k[r]:cu_k[r + 1]]
        mask = None
        if attention_mask is not None:
            mask = attention_mask[..., cu_q[r]:cu_q[r + 1], cu_k[r]:cu_k[r + 1]]
        if q.shape[2] == 0:
            continue
        if q.shape[2] == 1 and router.decode is not None and k.shape[2] > 1:
            if _is_kv(router.decode):
                ctx = DecodeContext(module, q, k, v, None, float(scale), None)
                out = router.decode.attend_decode(ctx)
                out = fallback(module, q, k, v, mask, scale, rest) if out is None else out.transpose(1, 2)
            else:
                out = router.decode.attend(module, q, k, v, mask, scale, **rest)
                out = fallback(module, q, k, v, mask, scale, rest) if out is None else out
        elif q.shape[2] == k.shape[2]:  # a whole prompt: causal, the prefill policy may take it
            out = _prefill(module, router, q, k, v, None, scale, rest, lambda *a: fallback(
                module, q, k, v, mask, scale, rest))
        else:  # a chunk of a prompt continuing earlier chunks: dense
            out = fallback(module, q, k, v, mask, scale, rest)
        outs.append(out.reshape(1, q.shape[2], query.shape[1], -1))
    return torch.cat(outs, dim=1)


def tokprune_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: Optional[float] = None, **kwargs):
    """The attention function registered as ``"tokprune"`` (HF attention-function signature).

    ``query (B, H, q_len, D)``, ``key``/``value (B, Hkv, T, D)`` (GQA not expanded); returns
    ``(out (B, q_len, H, D), None)``."""
    router: Optional[AttentionRouter] = getattr(module, _POLICY_ATTR, None)
    if router is None or (dropout and module.training):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs), None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        return _ragged(module, router, query, key, value, attention_mask, scale, kwargs, _sdpa_fallback), None
    if query.shape[2] == 1:
        if router.decode is None:
            return _sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None
        return _decode(module, router.decode, query, key, value, attention_mask, scale, kwargs), None
    return _prefill(module, router, query, key, value, attention_mask, scale, kwargs, _sdpa_fallback), None


# ---------------------------------------------------------------------------------------------------------
# continuous batching: the wrapped "paged|eager" entry
# ---------------------------------------------------------------------------------------------------------
_paged_users = 0
_paged_original = None


def _paged_fallback(module, query, key, value, attention_mask, scale, kwargs):
    return _paged_original(module, query, key, value, attention_mask, scaling=scale, **kwargs)[0]


def tokprune_paged_attention_forward(module, query, key, value, attention_mask, scaling: Optional[float] = None,
                                     **kwargs):
    """transformers' ``"paged|eager"`` function, routed through the module's tokprune policies when it has
    some (continuous batching); modules without policies get transformers' own function unchanged."""
    router: Optional[AttentionRouter] = getattr(module, _POLICY_ATTR, None)
    if router is None:
        return _paged_original(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        return _ragged(module, router, query, key, value, attention_mask, scale, kwargs, _paged_fallback), None
    if query.shape[2] == 1 and router.decode is not None:
        return _decode(module, router.decode, query, key, value, attention_mask, scale, {}), None
    return _prefill(module, router, query, key, value, attention_mask, scale, kwargs, _paged_fallback), None


def _wrap_paged() -> None:
    global _paged_users, _paged_original
    from transformers import AttentionInterface

    if _paged_users == 0:
        mapping = AttentionInterface._global_mapping
        if mapping.get(PAGED_NAME) is None:  # an older transformers without continuous batching
            return
        _paged_original = mapping[PAGED_NAME]
        mapping[PAGED_NAME] = tokprune_paged_attention_forward
    _paged_users += 1


def _unwrap_paged() -> None:
    global _paged_users
    from transformers import AttentionInterface

    if _paged_users == 0:
        return
    _paged_users -= 1
    if _paged_users == 0:
        AttentionInterface._global_mapping[PAGED_NAME] = _paged_original


def register() -> None:
    """Register the ``"tokprune"`` attention function and its mask builder (idempotent)."""
    from tokprune.hf.kv_cache import register_attention_function

    register_attention_function(ATTENTION_NAME, tokprune_attention_forward)


def attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """Decoder self-attention modules of ``model`` (those with a ``layer_idx``), in layer order."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


def patch_attention(model, *, prefill=None, decode=None, layers: Optional[Sequence[int]] = None,
                    cache: bool = True) -> PatchHandle:
    """Route ``model``'s decoder attention through tokprune policies.

    Args:
        model: a transformers model whose attention uses ``AttentionInterface`` (Llama, Qwen2, Mistral,
            Gemma, the language model of Llava / Qwen2-VL, ...).
        prefill: policy for calls with more than one query token (``attend(...)``), or ``None`` for SDPA.
        decode: a :class:`tokprune.methods.base.KVPolicy` (or an object with ``attend(...)``) for
            single-token decode calls, or ``None`` for SDPA.
        layers: layer indices to patch (default: all); other layers keep SDPA.
        cache: with a decode policy, make ``model.generate`` use :class:`tokprune.hf.kv_cache.TokpruneCache`
            (preallocated, O(1) append, side buffers: the fast path); ``False`` keeps ``DynamicCache``.

    Returns:
        A :class:`tokprune.methods.base.PatchHandle`; ``remove()`` (or leaving its ``with`` block) restores
        the model (attention implementation, cache hook, continuous-batching hook).

    Raises:
        ValueError: the model has no attention modules with ``layer_idx``, is already patched, or
            ``layers`` names a layer that does not exist.
        TypeError: a policy has neither ``score`` (KVPolicy) nor ``attend``.
    """
    if prefill is None and decode is None:
        raise ValueError("patch_attention: give at least one of prefill= or decode=")
    if prefill is not None and not callable(getattr(prefill, "attend", None)):
        raise TypeError("prefill must have an attend(module, q, k, v, mask, scale, **kw) method")
    if decode is not None and not _is_kv(decode) and not callable(getattr(decode, "attend", None)):
        raise TypeError("decode must be a tokprune.methods.base.KVPolicy or have an attend(module, q, k, v, mask, "
                        "scale, **kw) method")
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx to patch")
    if any(hasattr(m, _POLICY_ATTR) for m in modules):
        raise ValueError("model is already patched by tokprune.hf.patch_attention; remove() that patch first")
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - {m.layer_idx for m in modules}
        if unknown:
            raise ValueError(f"layers={sorted(unknown)} do not exist; the model has {len(modules)} layers")
        modules = [m for m in modules if m.layer_idx in wanted]
    register()
    handle = PatchHandle(model, [p for p in (prefill, decode) if p is not None])
    previous = model.config._attn_implementation
    for m in modules:
        setattr(m, _POLICY_ATTR, AttentionRouter(prefill=prefill, decode=decode))

    @handle.on_remove
    def _detach():
        for m in modules:
            if hasattr(m, _POLICY_ATTR):
                delattr(m, _POLICY_ATTR)
        model.set_attn_implementation(previous)

    model.set_attn_implementation(ATTENTION_NAME)
    _wrap_paged()
    handle.on_remove(_unwrap_paged)
    _hook_continuous_batching(model, handle)
    if cache and decode is not None:
        try:
            from tokprune.hf.kv_cache import use_tokprune_cache
        except ImportError:  # pragma: no cover - cache module absent
            pass
        else:
            cache_handle = use_tokprune_cache(model, decode_attention=False)
            handle.on_remove(cache_handle.remove)
    return handle


def _hook_continuous_batching(model, handle: PatchHandle) -> None:
    """Make ``model.init_continuous_batching`` (used by ``generate_batch``) switch the patched model to the
    wrapped ``"paged|eager"`` entry first (continuous batching refuses custom names), and ``generate_batch``
    switch it back afterwards."""
    if not callable(getattr(model, "init_continuous_batching", None)):
        return
    own = {name: model.__dict__.get(name) for name in ("init_continuous_batching", "generate_batch")}
    init_cb, generate_batch = model.init_continuous_batching, model.generate_batch

    def _init_continuous_batching(*args, **kwargs):
        if model.config._attn_implementation == ATTENTION_NAME:
            model.set_attn_implementation(PAGED_NAME)
        return init_cb(*args, **kwargs)

    def _generate_batch(*args, **kwargs):
        try:
            return generate_batch(*args, **kwargs)
        finally:
            if model.config._attn_implementation == PAGED_NAME and handle.active:
                model.set_attn_implementation(ATTENTION_NAME)

    model.init_continuous_batching = _init_continuous_batching
    model.generate_batch = _generate_batch

    @handle.on_remove
    def _restore():
        for name, value in own.items():
            if value is None:
                model.__dict__.pop(name, None)
            else:
                setattr(model, name, value)
