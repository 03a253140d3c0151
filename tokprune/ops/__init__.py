"""Public functional API: tensors in, tensors out. Every op validates inputs and picks a backend.

Names are resolved lazily from the family modules listed in :data:`_EXPORTS`, so importing
``tokprune.ops`` stays cheap and one family never imports another.
"""

from __future__ import annotations

from tokprune._lazy import lazy_exports

# public name -> module under tokprune.ops that defines it
_EXPORTS = {
    # shared selection
    "select_tokens": "selection",
    "gather_tokens": "selection",
    # matrix entropy (EntropyPrune, UNComp)
    "matrix_entropy": "entropy",
    "token_information_scores": "entropy",
    "truncated_matrix_entropy": "entropy",
    # frequency-chunk sparse attention (FASA)
    "fc_scores": "fasa",
    "sparse_decode_attention": "fasa",
    "pack_fc_keys": "fasa",
    "select_sparse_indices": "fasa",
    "fasa_bytes_per_step": "fasa",
    # paged, ragged decode ops (vLLM block tables)
    "vllm_cpu_kv_views": "paged",
    "split_decode_rows": "paged",
    "write_paged_fc_keys": "paged",
    "paged_fc_scores": "paged",
    "paged_select": "paged",
    "paged_sparse_decode_attention": "paged",
    "paged_decode_attention": "paged",
    "update_paged_page_bounds": "paged",
    "paged_quest_scores": "paged",
    "paged_select_pages": "paged",
    "paged_fasa_decode": "paged",
    "paged_fasa_decoder": "paged",
    # linear layers for a few rows (speculative tree forwards on the CPU)
    "small_m_linear": "linear",
    # window-attention token scores (SnapKV, UNComp, token sparse)
    "window_attention_scores": "window",
    # token sparse attention
    "token_sparse_scores": "token_sparse",
    "compress_qkv": "token_sparse",
    "decompress": "token_sparse",
    "token_sparse_attention": "token_sparse",
    # speculative token-tree verification
    "tree_positions": "spec",
    "tree_attention_mask": "spec",
    "verify_tree_greedy": "spec",
    "verify_tree_stochastic": "spec",
    "tree_depths": "spec",
    "tree_to_links": "spec",
    "links_to_tree": "spec",
    "tree_to_paths": "spec",
    "paths_to_tree": "spec",
    "tree_mask_packed": "spec",
    "unpack_tree_mask": "spec",
    "compact_accepted_kv": "spec",
    # dense decode attention on a KV cache (GQA without repeat_kv)
    "dense_decode_attention": "decode",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
