"""KV-cache compaction after speculative tree verification, for transformers' ``DynamicCache``.

After a tree forward pass, every layer of the cache holds ``prefix_len`` verified tokens followed by
the ``N`` tree nodes. :func:`compact_dynamic_cache` keeps the prefix and the nodes of the accepted path
(in path order) and drops the other nodes, in every layer, so that the next forward continues from the
accepted path.

Batch rows with different accepted lengths: a ``DynamicCache`` has one length for the whole batch, so
every row keeps the same number of path entries, ``length`` (default: the shortest accepted path of the
batch, i.e. ``min(accept_len) + 1``). Rows with a longer accepted path are truncated to their first
``length`` path nodes; the caller must then emit only those tokens for that row (any prefix of an
accepted path is itself a valid verification result) — or pass ``length`` explicitly after padding.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokprune.ops._checks import check_tensor
from tokprune.ops.spec import INT_DTYPES


def compact_dynamic_cache(cache, prefix_len: int, accept_index: torch.Tensor, *, length: Optional[int] = None) -> int:
    """Keep only the prefix and the accepted path of a token tree in every layer of ``cache``, in place.

    Args:
        cache: ``transformers.DynamicCache`` whose layers hold ``[B, H, prefix_len + N, D]`` keys/values
            (the tree's N nodes after the prefix, in node order). Layers with preallocated storage
            (``tokprune.spec``'s cache) are compacted in place; plain layers are rebuilt with ``torch.cat``.
        prefix_len: int, number of cached tokens before the tree's root.
        accept_index: ``[B, W]`` int32/int64 accepted path per row (root first, -1 padded), as returned by
            :func:`tokprune.ops.verify_tree_greedy` / :func:`tokprune.ops.verify_tree_stochastic`.
        length: path entries kept per row (the same for the whole batch). Default: the shortest valid
            path of the batch. Every row must have at least ``length`` valid entries.

    Returns:
        The new cache length ``prefix_len + length``.

    Raises:
        ValueError: a row has fewer than ``length`` accepted entries, or a layer is not a plain
            full-attention layer (sliding-window layers are not supported).
    """
    check_tensor("accept_index", accept_index, ndim=2, dtypes=INT_DTYPES)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be a non-negative int, got {prefix_len!r}")
    ai = accept_index.long()
    n_valid = (ai >= 0).sum(1)
    if ai.shape[0] == 0:
        raise ValueError("accept_index must have at least one row")
    if bool((ai[:, 0] != 0).any()):
        raise ValueError("accept_index[:, 0] must be 0 (the root is always on the accepted path)")
    if length is None:
        length = int(n_valid.min())
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if int(n_valid.min()) < length:
        raise ValueError(f"length={length} but a row of accept_index has only {int(n_valid.min())} valid "
                         f"entries; pass a length <= min(accept_len) + 1")
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"cache must be a transformers DynamicCache with .layers, got {type(cache).__name__}")
    keep_path = ai[:, :length]
    for i, layer in enumerate(layers):
        if getattr(layer, "is_sliding", False) or hasattr(layer, "cumulative_length"):
            raise ValueError(f"layer {i} of the cache is a sliding-window layer; compaction supports full "
                             f"attention layers only")
        keys, values = layer.keys, layer.values
        if keys is None or keys.numel() == 0:
            continue
        bsz, heads, t, dim = keys.shape
        if bsz != ai.shape[0]:
            raise ValueError(f"accept_index has {ai.shape[0]} rows but layer {i} of the cache has batch {bsz}")
        if prefix_len + int(keep_path.max()) >= t:
            raise IndexError(f"layer {i} holds {t} tokens, fewer than prefix_len={prefix_len} + accepted node "
                             f"{int(keep_path.max())} + 1")
        src = (prefix_len + keep_path).to(keys.device)
        if hasattr(layer, "set_length") and getattr(layer, "k_buf", None) is not None:
            # tokprune.spec's preallocated layer: write the path in place, then shrink the view
            k_sel, v_sel = _gather_rows(keys, src), _gather_rows(values, src)
            keys[:, :, prefix_len:prefix_len + length] = k_sel
            values[:, :, prefix_len:prefix_len + length] = v_sel
            layer.set_length(prefix_len + length)
            continue
        layer.keys = torch.cat([keys[:, :, :prefix_len], _gather_rows(keys, src)], dim=2)
        layer.values = torch.cat([values[:, :, :prefix_len], _gather_rows(values, src)], dim=2)
    return prefix_len + length


def _gather_rows(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    bsz, heads, _, dim = x.shape
    if bool((src == src[:1]).all()):  # same path in every row: a plain index_select
        return x.index_select(2, src[0])
    return x.gather(2, src.view(bsz, 1, -1, 1).expand(bsz, heads, src.shape[1], dim))
