"""tokprune's attention backend for vLLM on CUDA GPUs: vLLM's Triton backend with token-sparse decode.

NOT RUN ON A GPU YET: written against the same paged ops and the same plan as the CPU backend (which is
tested inside vLLM's CPU build), but no GPU was available to run it. Differences from the CPU backend:

* the base is vLLM's ``TRITON_ATTN`` backend (its ``kv_cache`` is ``(num_blocks, kv_heads, block_size,
  2*head_dim)`` with K in the first ``head_dim`` channels and V in the last, so K/V views are plain
  slices); the plugin selects ``TRITON_ATTN`` when the engine has the ``"tokprune"`` key and no backend
  was asked for;
* planning reads ``seq_lens`` on the host once per step (one synchronisation per step, not per layer);
* the per-step plan changes shapes, so this backend declares no full-CUDA-graph support (piecewise
  graphs keep attention outside the graph and still work);
* the paged ops pick their own backend (``auto``: Triton kernels on CUDA tensors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from tokprune.integrations.vllm.backend import (
    SideWrite,
    SparseDecodeMixin,
    SparsePlan,
    _settings_from_config,
    dense_rows_only,
    plan_side_write,
    plan_sparse_rows,
)
from tokprune.integrations.vllm.config import TokpruneConfigError, check_model

logger = init_logger("vllm.tokprune")  # a child of vLLM's logger, so vLLM's handlers print it


@dataclass
class TokpruneTritonMetadata(TritonAttentionMetadata):
    """vLLM's Triton metadata (sparse rows' ``seq_lens`` set to 1) plus the step's :class:`SparsePlan`."""

    sparse: Optional[SparsePlan] = None
    side_write: Optional[SideWrite] = None


class TokpruneTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    """vLLM's Triton metadata builder that also plans the sparse decode rows of each step."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.settings = _settings_from_config(vllm_config)
        self.kv_cache_spec = kv_cache_spec
        self.block_size = kv_cache_spec.block_size
        self.active = self.settings is not None and getattr(kv_cache_spec, "sliding_window", None) is None
        if self.active:
            check_model(self.settings, vllm_config.model_config.hf_config,
                        dtype=vllm_config.model_config.dtype, block_size=self.block_size)
            logger.info("tokprune: %s budget=%d serves %d attention layers (CUDA, untested)",
                        self.settings.method, self.settings.budget, len(layer_names))

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        plan = side_write = None
        if self.active:
            plan = plan_sparse_rows(common_attn_metadata, self.settings, self.block_size,
                                    self.kv_cache_spec.num_kv_heads)
            if self.settings.method == "fasa":
                side_write = plan_side_write(common_attn_metadata.slot_mapping[:common_attn_metadata.num_actual_tokens],
                                             self.block_size)
        if plan is not None:
            common_attn_metadata = dense_rows_only(common_attn_metadata, plan)
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(TritonAttentionMetadata)}
        return TokpruneTritonMetadata(**fields, sparse=plan, side_write=side_write)


class TokpruneTritonAttentionImpl(SparseDecodeMixin, TritonAttentionImpl):
    """vLLM's Triton attention impl plus tokprune's side caches and sparse decode rows."""

    _ops_backend = None  # auto: Triton on CUDA tensors

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attn_type = kwargs.get("attn_type", args[8] if len(args) > 8 else AttentionType.DECODER)
        self._init_sparse(attn_type == AttentionType.DECODER and self.alibi_slopes is None
                          and getattr(self, "sinks", None) is None
                          and self.kv_cache_dtype == "auto" and self.sliding_window in (None, (-1, -1), -1))

    def _kv_views(self, kv_cache):
        if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * self.head_size:
            raise TokpruneConfigError(f"tokprune: unexpected vLLM Triton KV-cache shape {tuple(kv_cache.shape)}")
        return kv_cache[..., : self.head_size], kv_cache[..., self.head_size:]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        self._sparse_step(layer, query, key, kv_cache, attn_metadata, output)
        return output


class TokpruneTritonAttentionBackend(TritonAttentionBackend):
    """vLLM's ``TRITON_ATTN`` backend with tokprune's metadata builder and impl (untested on a GPU)."""

    @staticmethod
    def get_impl_cls():
        return TokpruneTritonAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TokpruneTritonMetadataBuilder
