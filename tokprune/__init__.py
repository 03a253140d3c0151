"""tokprune: Triton and CUDA kernels that make inference cheaper by pruning tokens.

Nothing is patched at import. See :mod:`tokprune.ops` for the functional API,
:mod:`tokprune.methods` for pruning policies and :mod:`tokprune.hf` for Hugging Face integration.
"""

__version__ = "0.1.0"

from tokprune._backend import BackendUnavailable  # noqa: E402

__all__ = ["BackendUnavailable", "__version__", "generate"]


def __getattr__(name: str):
    # ``tokprune.generate`` is speculative generation (tokprune.spec.generate), imported on first use.
    if name == "generate":
        from tokprune.spec import generate

        return generate
    raise AttributeError(f"module 'tokprune' has no attribute {name!r}")
