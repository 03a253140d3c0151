"""Route a Hugging Face model's attention through tokprune policies, reversibly.

One attention function, ``"tokprune"``, is registered with ``transformers.AttentionInterface`` (and the
sdpa mask builder with ``AttentionMaskInterface``, without which a custom name receives
``attention_mask=None`` and padding is silently ignored). It looks up the policies attached to the
calling attention module and falls back to SDPA when a policy declines. Policies compose: a model can
use one policy in prefill (query length > 1) and another in decode (query length 1), e.g. token sparse
attention in prefill and FASA in decode.

A policy is any object with

    attend(module, query, key, value, attention_mask, scaling, **kwargs) -> Tensor | None

``query (batch, heads, q_len, head_dim)``, ``key``/``value (batch, kv_heads, kv_len, head_dim)`` (GQA not
expanded), ``attention_mask``: ``None`` (plain causal, or full attention when ``q_len == 1``), a bool
``(batch, 1, q_len, kv_len)`` mask (True = attend) or an additive float mask of that shape. It returns
``(batch, q_len, heads, head_dim)`` like HF attention functions, or ``None`` to let SDPA handle the call.

Nothing is registered or patched at import; :func:`patch_attention` does both, and its handle undoes
the patch (``with patch_attention(model, prefill=...):`` or ``handle.remove()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

ATTENTION_NAME = "tokprune"
_POLICY_ATTR = "_tokprune_attention_router"


@dataclass
class AttentionRouter:
    """Policies attached to one attention module."""

    prefill: Any = None
    decode: Any = None

    def policy_for(self, q_len: int):
        return self.decode if q_len == 1 else self.prefill


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def tokprune_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: Optional[float] = None, **kwargs):
    """The attention function registered as ``"tokprune"`` (HF attention-function signature)."""
    router: Optional[AttentionRouter] = getattr(module, _POLICY_ATTR, None)
    policy = router.policy_for(query.shape[2]) if router is not None else None
    if policy is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = policy.attend(module, query, key, value, attention_mask, scale, **kwargs)
        if out is not None:
            return out, None
    return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


_registered = False


def register() -> None:
    """Register the ``"tokprune"`` attention function and its mask builder (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, tokprune_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


def attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """Decoder self-attention modules of ``model`` (those with a ``layer_idx``), in layer order."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


def _text_config_owner(model):
    """The (sub)model whose config drives the language model's attention."""
    return model


class AttentionPatch:
    """Handle returned by :func:`patch_attention`; a context manager that undoes the patch on exit."""

    def __init__(self, model, modules: Sequence[torch.nn.Module], previous_impl):
        self.model = model
        self.modules = list(modules)
        self.previous_impl = previous_impl
        self.active = True

    def remove(self) -> None:
        """Detach the policies and restore the model's previous attention implementation."""
        if not self.active:
            return
        for m in self.modules:
            if hasattr(m, _POLICY_ATTR):
                delattr(m, _POLICY_ATTR)
        self.model.set_attn_implementation(self.previous_impl)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def patch_attention(model, *, prefill=None, decode=None, layers: Optional[Sequence[int]] = None) -> AttentionPatch:
    """Route ``model``'s decoder attention through tokprune policies.

    Args:
        model: a transformers model whose attention uses ``AttentionInterface`` (Llama, Qwen2, Mistral,
            Gemma, the language model of Llava / Qwen2-VL, ...).
        prefill: policy for calls with more than one query token, or ``None`` for SDPA.
        decode: policy for single-token decode calls, or ``None`` for SDPA.
        layers: layer indices to patch (default: all); other layers keep SDPA.

    Returns:
        An :class:`AttentionPatch`; ``remove()`` (or leaving its ``with`` block) restores the model.

    Raises:
        ValueError: the model has no attention modules with ``layer_idx`` or is already patched.
    """
    if prefill is None and decode is None:
        raise ValueError("patch_attention: give at least one of prefill= or decode=")
    for name, policy in (("prefill", prefill), ("decode", decode)):
        if policy is not None and not callable(getattr(policy, "attend", None)):
            raise TypeError(f"{name} must have an attend(module, q, k, v, mask, scale, **kw) method")
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
    previous = model.config._attn_implementation
    for m in modules:
        setattr(m, _POLICY_ATTR, AttentionRouter(prefill=prefill, decode=decode))
    model.set_attn_implementation(ATTENTION_NAME)
    return AttentionPatch(model, modules, previous)
