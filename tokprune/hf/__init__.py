"""Hugging Face ``transformers`` integration: reversible patches, attention registration, generation.

``tokprune.hf.patch_attention`` (:func:`tokprune.hf.attention.patch_attention`), ``tokprune.hf.use_tokprune_cache``
/ ``tokprune.hf.TokpruneCache`` (:mod:`tokprune.hf.kv_cache`) and ``tokprune.hf.prune_visual_tokens``
(:mod:`tokprune.hf.vlm`) are resolved lazily: nothing is imported or patched at ``import tokprune.hf``.
"""

from __future__ import annotations

from tokprune._lazy import lazy_exports

# public name -> module under tokprune.hf that defines it
_EXPORTS = {
    "patch_attention": "attention",
    "attention_modules": "attention",
    "use_tokprune_cache": "kv_cache",
    "TokpruneCache": "kv_cache",
    "prune_visual_tokens": "vlm",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
