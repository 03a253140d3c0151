"""Pruning policies as small dataclasses (EntropyPrune, UNComp, FASA, TokenSparseAttention, baselines).

Names are resolved lazily from the modules listed in :data:`_EXPORTS` (nothing is imported or patched
at ``import tokprune.methods``).
"""

from __future__ import annotations

from tokprune._lazy import lazy_exports

# public name -> module under tokprune.methods that defines it
_EXPORTS = {
    # FASA and decode-time KV selection baselines (KVPolicy: one score(); with policy.patch(model): generate)
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
    # entropy-driven KV budgets (UNComp: a decode policy; with UNComp(...).patch(model): model.generate(...))
    "UNComp": "uncomp",
    # token sparse attention (prefill; patch: tokprune.hf.patch_attention(model, prefill=...))
    "TokenSparseAttention": "token_sparse",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
