"""Pruning policies as small dataclasses (EntropyPrune, UNComp, FASA, TokenSparseAttention, baselines).

Names are resolved lazily from the modules listed in :data:`_EXPORTS` (nothing is imported or patched
at ``import tokprune.methods``).
"""

from __future__ import annotations

import importlib

# public name -> module under tokprune.methods that defines it
_EXPORTS = {
    # FASA and decode-time KV selection baselines
    "FASA": "fasa",
    "FCCalibration": "fasa",
    "StreamingLLM": "kv_baselines",
    "Quest": "kv_baselines",
    "SnapKV": "kv_baselines",
    # visual-token pruning in VLMs (EntropyPrune and baselines; patch: tokprune.hf.vlm.prune_visual_tokens)
    "EntropyPrune": "entropy_prune",
    "find_collapse_layer": "entropy_prune",
    "flops_matched_keep": "entropy_prune",
    "FastV": "visual_baselines",
    "DivPrune": "visual_baselines",
    "RandomPrune": "visual_baselines",
    # entropy-driven KV budgets (UNComp; run API: UNComp(...).patch(model))
    "UNComp": "uncomp",
    # token sparse attention (prefill; patch: tokprune.hf.patch_attention(model, prefill=...))
    "TokenSparseAttention": "token_sparse",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokprune.methods' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tokprune.methods.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
