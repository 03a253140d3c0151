"""Token sparse attention as a prefill policy for :func:`tokprune.hf.patch_attention`.

    from tokprune.hf.attention import patch_attention
    from tokprune.methods.token_sparse import TokenSparseAttention

    with patch_attention(model, prefill=TokenSparseAttention(keep=0.25)):
        logits = model(input_ids).logits

Each patched layer and head re-scores and re-selects its tokens on every call (interleaved
selection): a token skipped by one layer is seen again by the next, nothing is evicted from the KV
cache (the cache keeps every token's keys and values, so decoding is unaffected). It composes with a
decode policy, e.g. ``patch_attention(model, prefill=TokenSparseAttention(), decode=FASA(...))``.

The policy declines (returns ``None`` so SDPA runs, exactly dense) when

* the call is a decode step (``q_len == 1``) or a prefill chunk on top of a cache (``q_len != kv_len``);
* the layer is not in ``layers``;
* the sequence is shorter than ``min_tokens``, or the budget keeps every token (``keep=1.0``);
* the attention mask is not "causal + key padding" (e.g. sliding window or packed sequences), or the
  model uses attention sinks (``s_aux``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from tokprune.ops.token_sparse import resolve_keep, token_sparse_attention


@dataclass
class TokenSparseAttention:
    """Prefill policy: per-head token selection -> compressed dense attention -> scatter back.

    Attributes:
        keep: fraction of tokens kept per head in ``(0, 1]`` or a count.
        layers: layer indices the policy applies to; ``"second_half"`` (default, the paper's
            setting delta=0.5: layers ``L // 2 .. L - 1`` of an ``L``-layer model) or ``None`` for every
            patched layer. Early layers are the most sensitive (measured on SmolLM2, see README).
        min_tokens: sequences shorter than this are left to SDPA; also a floor on the kept count
            (paper: 1024 at 128K contexts; the default here suits short contexts too).
        window: observation window of the scoring rule and always-kept recent tokens (paper: 128).
        kernel_size: pooling width of the scores (paper: 7).
        backend: gather/scatter backend (``None``: automatic).
    """

    keep: Union[float, int] = 0.25
    layers: Union[None, str, Sequence[int]] = "second_half"
    min_tokens: int = 256
    window: int = 128
    kernel_size: int = 7
    backend: Optional[str] = None
    calls: int = field(default=0, init=False, repr=False, compare=False)  # sparse calls made (not declined)

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or \
                (isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0) or \
                (isinstance(self.keep, int) and self.keep < 1):
            raise ValueError(f"keep must be a float in (0, 1] or a positive int, got {self.keep!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative int, got {self.min_tokens!r}")
        if isinstance(self.layers, str):
            if self.layers != "second_half":
                raise ValueError(f"layers must be None, 'second_half' or a list of layer indices, got {self.layers!r}")
        elif self.layers is not None:
            self.layers = frozenset(int(i) for i in self.layers)

    def applies(self, layer_idx: Optional[int], q_len: int, kv_len: int, n_layers: Optional[int] = None) -> bool:
        """Whether a call with these lengths in this layer is handled (not left to SDPA)."""
        if q_len <= 1 or q_len != kv_len or q_len < max(self.min_tokens, 2):
            return False
        if self.layers == "second_half":
            if n_layers is not None and (layer_idx is None or layer_idx < n_layers // 2):
                return False
        elif self.layers is not None and layer_idx not in self.layers:
            return False
        if isinstance(self.keep, int) and not isinstance(self.keep, bool):
            return self.keep < q_len
        return resolve_keep(self.keep, q_len) < q_len

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """HF attention call -> ``(batch, q_len, heads, head_dim)``, or ``None`` to decline."""
        if kwargs.get("s_aux") is not None or kwargs.get("sliding_window"):
            return None
        n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        if not self.applies(getattr(module, "layer_idx", None), query.shape[2], key.shape[2], n_layers):
            return None
        padding = key_padding_from_mask(attention_mask, query.shape[0], key.shape[2])
        if padding is False:
            return None
        out = token_sparse_attention(query, key, value, keep=self.keep, causal=True, min_tokens=self.min_tokens,
                                     window=self.window, kernel_size=self.kernel_size, scale=scaling,
                                     key_padding_mask=padding, backend=self.backend)
        self.calls += 1
        return out.transpose(1, 2)


def key_padding_from_mask(mask: Optional[torch.Tensor], batch: int, n: int):
    """``(batch, n)`` bool key validity from an HF prefill mask, ``None`` if there is no padding, or
    ``False`` if the mask is not "causal + key padding" (then the caller declines).

    ``mask`` is ``None`` (plain causal), a bool ``(batch|1, 1, n, n)`` mask (True = attend) or an
    additive float mask of that shape. Rows of padding queries are not checked (their output is
    discarded by the model).
    """
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (n, n) or mask.shape[0] not in (1, batch):
        return False
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed[:, 0].expand(batch, n, n)
    valid = allowed.any(dim=1)  # a key is real iff some query attends to it
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    expected = causal & valid[:, None, :]
    if not bool(((allowed == expected) | ~valid[:, :, None]).all()):
        return False
    return None if bool(valid.all()) else valid


__all__ = ["TokenSparseAttention", "key_padding_from_mask"]
