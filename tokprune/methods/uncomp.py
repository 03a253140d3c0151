"""UNComp: KV-cache budgets per layer and per head from the truncated matrix entropy of the prompt.

After prefill, each layer's post-RoPE queries give one truncated matrix entropy per head
(:func:`tokprune.ops.truncated_matrix_entropy`, UNComp's ``E_32``). Higher entropy = the head's
queries spread over more directions = it keeps more tokens:

1. **Layer budgets.** The total, ``round(ratio * prompt_length * kv_heads * layers)`` cache slots per
   batch row, is split between a high-entropy group of layers (the ``high_fraction`` of layers with the
   largest mean head entropy) and the rest, a high layer getting ``high_to_low`` times the slots of a
   low one (UNComp's two groups, e.g. ``[768, 384]`` around ``C = 512``).
2. **Head budgets.** Inside a layer the same two-group split is applied to its KV heads.
3. **Token selection** inside a head, SnapKV-style: attention of the last ``window`` queries over the
   prompt (summed over the window and over the query heads sharing the KV head), max-pooled with
   kernel ``pool``; the ``window`` most recent tokens are always kept; top-k by
   :func:`tokprune.ops.select_tokens`.

Budgets never exceed the prompt length of a head; the rounding is exact (largest remainder), so the
budgets of a row sum to the promised total (see :meth:`UNComp.budgets`).

**Storage.** A dense ``DynamicCache`` holds one length per layer. Each layer is compacted to its
largest head budget (over heads and batch rows); the unused slots of smaller heads are masked out in
decode by a ``tokprune.hf.attention`` decode policy that attends with a per-head validity mask. So
``kv_bytes()["allocated"]`` (what the tensors occupy, padding slots included) can exceed
``kv_bytes()["kept"]`` (slots actually holding selected tokens); both are reported.

Batches: left padding only (``attention_mask`` rows must be 0...0 1...1); every row gets its own
budgets from its own valid tokens and positions, so a padded row behaves as if it ran alone.

Example::

    method = UNComp(ratio=0.25)
    with method.patch(model) as run:
        new_tokens = run.generate(input_ids, attention_mask, max_new_tokens=32)
        print(run.kv_bytes())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from tokprune.hf.attention import patch_attention
from tokprune.ops import select_tokens, truncated_matrix_entropy


def split_budget(entropy: torch.Tensor, total: int, cap: int, high_fraction: float, high_to_low: float) -> torch.Tensor:
    """Split ``total`` integer slots between ``G`` items in two entropy groups, each item capped at ``cap``.

    The ``round(high_fraction * G)`` items with the largest ``entropy`` (ties: lower index) weigh
    ``high_to_low``, the others 1; shares are proportional to weight, capped items give their excess to
    the others (water filling), and the integer rounding is by largest remainder.

    Returns:
        ``(G,)`` int64 budgets in ``[0, cap]`` summing to ``min(total, G * cap)``.
    """
    g = entropy.numel()
    total = min(int(total), g * cap)
    order = torch.sort(entropy.double(), descending=True, stable=True).indices
    weight = torch.ones(g, dtype=torch.float64)
    n_high = int(round(high_fraction * g))
    weight[order[:n_high]] = float(high_to_low)
    share = torch.zeros(g, dtype=torch.float64)
    free = torch.ones(g, dtype=torch.bool)
    remaining = float(total)
    while bool(free.any()):
        ideal = remaining * weight / weight[free].sum()
        over = free & (ideal > cap)
        if not bool(over.any()):
            share[free] = ideal[free]
            break
        share[over] = cap
        free &= ~over
        remaining = total - float(share[~free].sum())
    base = share.floor().clamp(max=cap)
    left = total - int(base.sum())
    if left > 0:
        frac = torch.where(base < cap, share - base, torch.full_like(share, -1.0))
        extra = torch.sort(frac, descending=True, stable=True).indices[:left]
        base[extra] += 1
    return base.long()


@dataclass
class UNComp:
    """Entropy-driven per-layer / per-head KV budgets (UNComp), applied to the cache after prefill.

    Args:
        ratio: fraction of the prompt's KV cache kept, over all layers and heads, in ``(0, 1]``.
        window: observation window (last queries scoring the prompt) and number of most recent tokens
            always kept per head.
        pool: max-pool kernel over the window scores (odd).
        truncate: number of leading eigenvalues in the truncated matrix entropy (UNComp: 32).
        high_fraction: fraction of layers (and of heads in a layer) in the high-entropy group.
        high_to_low: budget of a high-entropy layer/head over a low one (UNComp: 768 / 384 = 2).
        layer_budgets: ``False`` gives every layer the same total and splits only across heads.
        source: ``"query"`` (post-RoPE queries, averaged over the query heads of a KV head; as the
            reference) or ``"key"`` (post-RoPE keys).
    """

    ratio: float = 0.5
    window: int = 8
    pool: int = 7
    truncate: int = 32
    high_fraction: float = 0.5
    high_to_low: float = 2.0
    layer_budgets: bool = True
    source: str = "query"

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if self.window < 1 or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"window must be >= 1 and pool an odd int >= 1, got window={self.window}, pool={self.pool}")
        if not 0 <= self.high_fraction <= 1 or self.high_to_low <= 0:
            raise ValueError("high_fraction must be in [0, 1] and high_to_low > 0")
        if self.source not in ("query", "key"):
            raise ValueError(f"source must be 'query' or 'key', got {self.source!r}")

    def budgets(self, head_entropy: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """Integer budgets ``(layers, batch, kv_heads)`` from ``head_entropy (layers, batch, kv_heads)``
        and the valid prompt length ``n_valid (batch,)`` of each row.

        Row ``b`` receives ``min(round(ratio * n_valid[b] * layers * kv_heads), layers * kv_heads * n)``
        slots in total, split over layers and then heads (see :func:`split_budget`); each head's budget
        is at most ``n_valid[b]``.
        """
        n_layers, batch, heads = head_entropy.shape
        out = torch.zeros(n_layers, batch, heads, dtype=torch.long)
        for b in range(batch):
            n = int(n_valid[b])
            total = int(round(self.ratio * n * n_layers * heads))
            if self.layer_budgets:
                per_layer = split_budget(head_entropy[:, b].mean(-1), total, heads * n,
                                         self.high_fraction, self.high_to_low)
            else:
                per_layer = split_budget(torch.zeros(n_layers), total, heads * n, 0.0, 1.0)
            for layer in range(n_layers):
                out[layer, b] = split_budget(head_entropy[layer, b], int(per_layer[layer]), n,
                                             self.high_fraction, self.high_to_low)
        return out

    def patch(self, model) -> "UNCompRun":
        """Attach UNComp to ``model`` (reversible: ``remove()`` or leave the ``with`` block)."""
        return UNCompRun(self, model)


class _Recorder:
    """Prefill policy: records per-head entropies and SnapKV scores of every layer, then lets SDPA run."""

    def __init__(self, run: "UNCompRun"):
        self.run = run

    def attend(self, module, query, key, value, attention_mask, scale, **kwargs):
        self.run._record(module.layer_idx, query, key, scale)
        return None


class _MaskedDecode:
    """Decode policy: attention over the compacted cache with a per-(row, KV head) slot validity mask."""

    def __init__(self, run: "UNCompRun"):
        self.run = run

    def attend(self, module, query, key, value, attention_mask, scale, **kwargs):
        slots = self.run._slot_valid.get(module.layer_idx)
        if slots is None:
            return None
        batch, heads, q_len, head_dim = query.shape
        kv_heads, total = key.shape[1], key.shape[2]
        extra = total - slots.shape[-1]
        valid = torch.cat([slots, slots.new_ones(batch, kv_heads, extra)], dim=-1)  # decode tokens: valid
        group = heads // kv_heads
        q = query.float().view(batch, kv_heads, group, q_len, head_dim)
        logits = torch.einsum("bhgqd,bhtd->bhgqt", q, key.float()) * scale
        logits = logits.masked_fill(~valid[:, :, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhgqt,bhtd->bhgqd", probs, value.float())
        return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).to(query.dtype)


class UNCompRun:
    """A model with UNComp attached: :meth:`prefill`, :meth:`decode`, :meth:`generate`, :meth:`kv_bytes`."""

    def __init__(self, method: UNComp, model):
        self.method = method
        self.model = model
        self._slot_valid: Dict[int, torch.Tensor] = {}
        self._stats: Dict[int, tuple] = {}
        self._valid: Optional[torch.Tensor] = None
        self.cache = None
        self.budget: Optional[torch.Tensor] = None  # (layers, batch, kv_heads)
        self.selected: List[torch.Tensor] = []  # per layer (batch, kv_heads, L_layer) int64, -1 = empty slot
        self._next_pos: Optional[torch.Tensor] = None
        self._full_len = 0
        self._patch = patch_attention(model, prefill=_Recorder(self), decode=_MaskedDecode(self))

    # -- lifecycle ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach UNComp and restore the model's attention implementation."""
        self._patch.remove()
        self._slot_valid.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # -- prefill statistics -------------------------------------------------------------------------
    def _record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        m = self.method
        valid = self._valid  # (batch, n) bool
        batch, heads, n, _ = query.shape
        if valid is None or tuple(valid.shape) != (batch, n):
            return  # a forward that did not come from prefill(): leave it alone
        kv_heads = key.shape[1]
        group = heads // kv_heads
        if m.source == "query":
            ent = truncated_matrix_entropy(query, m.truncate, mask=valid)
            ent = ent.view(batch, kv_heads, group).mean(-1)
        else:
            ent = truncated_matrix_entropy(key, m.truncate, mask=valid)
        w = min(m.window, n)
        q_win = query[:, :, n - w:].float().view(batch, kv_heads, group, w, -1)
        logits = torch.einsum("bhgqd,bhtd->bhgqt", q_win, key.float()) * scale
        q_pos = torch.arange(n - w, n, device=query.device)
        allowed = (torch.arange(n, device=query.device)[None, :] <= q_pos[:, None])[None] & valid[:, None, :]
        logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
        attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (fully masked rows: padding queries)
        score = attn.sum(dim=(2, 3))  # (batch, kv_heads, n)
        if m.pool > 1:
            score = F.max_pool1d(score, kernel_size=m.pool, stride=1, padding=m.pool // 2)
        score = score.masked_fill(~valid[:, None, :], float("-inf"))
        self._stats[layer] = (ent.float().cpu(), score)

    # -- compaction --------------------------------------------------------------------------------
    def _compress(self, cache) -> None:
        layers = sorted(self._stats)
        entropy = torch.stack([self._stats[i][0] for i in layers])  # (L, B, Hkv)
        n_valid = self._valid.sum(1).cpu()
        self.budget = self.method.budgets(entropy, n_valid)
        self.selected = []
        for li, layer in enumerate(layers):
            score = self._stats[layer][1]
            batch, kv_heads, n = score.shape
            budget = self.budget[li].to(score.device)  # (B, Hkv)
            width = int(budget.max())
            idx = torch.full((batch, kv_heads, width), -1, dtype=torch.long, device=score.device)
            for value in torch.unique(budget).tolist():
                rows = (budget == value).nonzero()
                if value == 0:
                    continue
                s = score[rows[:, 0], rows[:, 1]]  # (R, n)
                recent = torch.zeros_like(s, dtype=torch.bool)
                recent[:, n - min(self.method.window, value):] = True
                idx[rows[:, 0], rows[:, 1], :value] = select_tokens(s, value, keep_mask=recent)
            keep = idx >= 0
            gather = idx.clamp_min(0)[..., None]
            lay = cache.layers[layer]
            d_k, d_v = lay.keys.shape[-1], lay.values.shape[-1]
            lay.keys = torch.gather(lay.keys, 2, gather.expand(-1, -1, -1, d_k))
            lay.values = torch.gather(lay.values, 2, gather.expand(-1, -1, -1, d_v))
            self._slot_valid[layer] = keep
            self.selected.append(idx)
        self._stats.clear()

    # -- public run API ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the prompt, compress the cache, return the logits of the last prompt position ``(B, V)``.

        Args:
            input_ids: ``(batch, n)`` int64.
            attention_mask: optional ``(batch, n)`` 0/1, left padding only.
        """
        batch, n = input_ids.shape
        if n == 0:
            raise ValueError("input_ids must hold at least one prompt token")
        if attention_mask is None:
            valid = torch.ones(batch, n, dtype=torch.bool, device=input_ids.device)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            valid = attention_mask.bool()
            if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
                raise ValueError("UNComp needs left padding: each attention_mask row must be 0...0 1...1")
            if not bool(valid[:, -1].all()):
                raise ValueError("every row of attention_mask needs at least one valid token")
        self._valid = valid
        self._slot_valid.clear()
        self._stats.clear()
        position_ids = (valid.long().cumsum(1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=valid.long(), position_ids=position_ids, use_cache=True)
        self.cache = out.cache
        self._full_len = n
        self._compress(self.cache)
        self._valid = None
        self._next_pos = valid.long().sum(1)
        return out.logits[:, -1]

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step with the compressed cache: ``input_ids (batch, 1)`` -> logits ``(batch, V)``."""
        if self.cache is None:
            raise RuntimeError("call prefill() before decode()")
        out = self.model(input_ids=input_ids, position_ids=self._next_pos[:, None], cache=self.cache, use_cache=True)
        self._next_pos = self._next_pos + 1
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 16) -> torch.Tensor:
        """Greedy generation: ``(batch, max_new_tokens)`` int64 new tokens."""
        logits = self.prefill(input_ids, attention_mask)
        tokens = []
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self.decode(nxt[:, None])
        return torch.stack(tokens, 1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)

    def kv_bytes(self) -> Dict[str, int]:
        """Prompt KV-cache bytes after compression (decode tokens excluded).

        ``full``: what the uncompressed cache held; ``allocated``: the compacted tensors, padding
        slots included; ``kept``: the slots that hold selected tokens (sum of budgets).
        """
        if self.budget is None:
            raise RuntimeError("call prefill() first")
        full = allocated = kept = 0
        for layer, idx in zip(sorted(self._slot_valid), self.selected):
            lay = self.cache.layers[layer]
            per_slot = (lay.keys.shape[-1] * lay.keys.element_size() + lay.values.shape[-1] * lay.values.element_size())
            batch, kv_heads, width = idx.shape
            full += batch * kv_heads * self._full_len * per_slot
            allocated += batch * kv_heads * width * per_slot
            kept += int((idx >= 0).sum()) * per_slot
        return {"full": full, "allocated": allocated, "kept": kept}


__all__ = ["UNComp", "UNCompRun", "split_budget"]
