"""Public functional API: tensors in, tensors out. Every op validates inputs and picks a backend."""

from tokprune.ops.selection import gather_tokens, select_tokens

__all__ = [
    "gather_tokens",
    "select_tokens",
]
