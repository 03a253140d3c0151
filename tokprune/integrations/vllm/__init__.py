"""tokprune inside vLLM: token-sparse decode attention (FASA, Quest, StreamingLLM) on vLLM's paged KV cache.

Install ``pip install "tokprune[vllm]"`` next to vLLM; the plugin is found through the entry point
``vllm.general_plugins: tokprune = tokprune.integrations.vllm:register`` and does nothing unless the
engine is configured with::

    LLM(model, additional_config={"tokprune": {"method": "fasa", "budget": 256, "fcs": "smollm2_135m"}})
    # or: python -m vllm.entrypoints.openai.api_server --model DIR \\
    #        --additional-config '{"tokprune": {"method": "fasa", "budget": 256, "fcs": "smollm2_135m"}}'

Settings (:class:`tokprune.integrations.vllm.config.VllmSettings`): ``method`` (``fasa | quest |
streaming``), ``budget`` (tokens attended per head in a decode step), ``sink`` (4), ``window`` (64),
``fcs`` (FASA calibration: a file from ``tokprune calibrate fasa`` or a name shipped in ``tokprune/data``),
``num_fcs``, ``chunk``, ``page_size`` (Quest, 16).

What :func:`register` does (in every vLLM process: API server, engine core, workers): it wraps two class
methods of vLLM's current platform, calling the originals first. ``check_and_update_config`` (run when
the engine configuration is built, in the API process) validates the settings and the model, so a bad
configuration fails vLLM's start-up. ``get_attn_backend_cls`` (run while the worker builds the model)
points ``CPU_ATTN`` at :class:`tokprune.integrations.vllm.backend.TokpruneCPUAttentionBackend` through
``register_backend`` when the engine has the ``"tokprune"`` key, and clears that override otherwise, so
an engine without the key gets vLLM's own backend class. On CUDA the same hook selects
:class:`tokprune.integrations.vllm.cuda.TokpruneTritonAttentionBackend` (written against the same paged
ops; not run on a GPU yet).
"""

from __future__ import annotations

from tokprune.integrations.vllm.config import (
    CONFIG_KEY,
    METHODS,
    TokpruneConfigError,
    VllmSettings,
    check_model,
    parse_settings,
)

CPU_BACKEND = "tokprune.integrations.vllm.backend.TokpruneCPUAttentionBackend"
CUDA_BACKEND = "tokprune.integrations.vllm.cuda.TokpruneTritonAttentionBackend"
_HOOKED = "_tokprune_hooked"

__all__ = ["CONFIG_KEY", "METHODS", "TokpruneConfigError", "VllmSettings", "parse_settings", "register",
           "validate_vllm_config"]


def validate_vllm_config(vllm_config) -> "VllmSettings | None":
    """Parse and check ``vllm_config.additional_config["tokprune"]`` against the model; ``None`` without the key.

    Raises:
        TokpruneConfigError: invalid settings, or a model the method cannot serve.
    """
    settings = parse_settings(getattr(vllm_config, "additional_config", None))
    model_config = getattr(vllm_config, "model_config", None)
    if settings is not None and model_config is not None:
        cache_config = getattr(vllm_config, "cache_config", None)
        block_size = getattr(cache_config, "block_size", None) if cache_config is not None else None
        check_model(settings, model_config.hf_config, dtype=getattr(model_config, "dtype", None),
                    block_size=block_size if isinstance(block_size, int) else None)
    return settings


def _select_override(settings, platform) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if platform.is_cpu():
        member, ours = AttentionBackendEnum.CPU_ATTN, CPU_BACKEND
    elif platform.is_cuda():
        member, ours = AttentionBackendEnum.TRITON_ATTN, CUDA_BACKEND
    else:
        return
    if settings is not None:
        register_backend(member, ours)
    elif member.get_path() == ours:
        member.clear_override()


def register() -> None:
    """vLLM general-plugin entry point (idempotent; see the module docstring). Inert without the key."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls, _HOOKED, False):
        return
    check_orig = platform_cls.check_and_update_config
    select_orig = platform_cls.get_attn_backend_cls

    def check_and_update_config(cls, vllm_config) -> None:
        check_orig(vllm_config)
        settings = validate_vllm_config(vllm_config)
        if settings is not None and current_platform.is_cuda():
            # the tokprune CUDA backend is built on vLLM's Triton backend
            attention_config = getattr(vllm_config, "attention_config", None)
            if attention_config is not None and getattr(attention_config, "backend", None) is None:
                from vllm.v1.attention.backends.registry import AttentionBackendEnum

                attention_config.backend = AttentionBackendEnum.TRITON_ATTN
        try:  # an engine built in this process after another one must select its backend afresh
            from vllm.v1.attention.selector import _cached_get_attn_backend

            _cached_get_attn_backend.cache_clear()
        except ImportError:
            pass

    def get_attn_backend_cls(cls, *args, **kwargs):
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        settings = parse_settings(getattr(vllm_config, "additional_config", None))
        _select_override(settings, current_platform)
        return select_orig(*args, **kwargs)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    setattr(platform_cls, _HOOKED, True)
