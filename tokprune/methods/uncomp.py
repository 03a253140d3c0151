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

**Usage.** UNComp is a decode policy: ``patch(model)`` then plain ``model.generate``. It observes every
prefill (entropies and window scores of each layer), and a forward hook compresses the cache right after
the prefill forward; decode steps then attend densely over each head's kept slots::

    policy = UNComp(ratio=0.25)
    with policy.patch(model):
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
        print(policy.kv_bytes())

**Storage.** The cache (``DynamicCache`` or tokprune's ``TokpruneCache``) holds one length per layer, not
per head: each layer is compacted to its largest head budget (over heads and batch rows) and the unused
slots of smaller heads are masked out in decode (a per-(row, KV head) slot-validity mask). So
``kv_bytes()["allocated"]`` (what the tensors occupy, padding slots included) can exceed
``kv_bytes()["kept"]`` (slots actually holding selected tokens); both are reported.

Batches: left padding only (``attention_mask`` rows must be 0...0 1...1); every row gets its own
budgets from its own valid tokens, so a padded row behaves as if it ran alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from tokprune.methods.base import DecodeContext, PatchHandle, Policy, decode_valid_mask
from tokprune.ops import select_tokens, truncated_matrix_entropy
from tokprune.ops.window import window_attention_scores


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
class UNComp(Policy):
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
        layer_groups: ``"split"`` (tokprune: the two entropy groups above, ``high_to_low`` : 1) or
            ``"stages"`` (the authors' offline stage division, :mod:`tokprune.methods.uncomp_prefill`).
        stages: stage labels per layer, a ``tokprune calibrate uncomp`` JSON, or ``None`` (shipped file).
        prefill_compression: also drop low-attention tokens' hidden states during the prefill, stage by
            stage (the authors' prefill speed-up; batch 1 without padding; see
            :mod:`tokprune.methods.uncomp_prefill`).
        prefill_min_keep: fraction of the prompt the last stage runs on (prefill compression).

    Run-time results of the last compression: :attr:`budget` ``(layers, batch, kv_heads)`` int64,
    :attr:`selected` (per layer ``(batch, kv_heads, L)`` kept prompt positions, ``-1`` = empty slot) and
    :meth:`kv_bytes`.
    """

    ratio: float = 0.5
    window: int = 8
    pool: int = 7
    truncate: int = 32
    high_fraction: float = 0.5
    high_to_low: float = 2.0
    layer_budgets: bool = True
    source: str = "query"
    layer_groups: str = "split"
    stages: Any = None
    prefill_compression: bool = False
    prefill_min_keep: float = 0.375
    _state: Dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    role = "decode"
    observes_prefill = True

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if self.window < 1 or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"window must be >= 1 and pool an odd int >= 1, got window={self.window}, pool={self.pool}")
        if not 0 <= self.high_fraction <= 1 or self.high_to_low <= 0:
            raise ValueError("high_fraction must be in [0, 1] and high_to_low > 0")
        if self.source not in ("query", "key"):
            raise ValueError(f"source must be 'query' or 'key', got {self.source!r}")
        from tokprune.methods.uncomp_prefill import validate_options

        validate_options(self)

    def bind(self, model) -> None:
        """Resolve the stage division for ``model`` when ``layer_groups="stages"`` or prefill compression."""
        if self.layer_groups == "stages" or self.prefill_compression:
            from tokprune.methods.uncomp_prefill import resolve_stages

            self._state["stages"] = resolve_stages(model, self.stages)

    def budgets(self, head_entropy: torch.Tensor, n_valid: torch.Tensor,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Integer budgets ``(layers, batch, kv_heads)`` from ``head_entropy (layers, batch, kv_heads)``
        and the valid prompt length ``n_valid (batch,)`` of each row.

        Row ``b`` receives ``min(round(ratio * n_valid[b] * layers * kv_heads), layers * kv_heads * n)``
        slots in total, split over layers and then heads (see :func:`split_budget`); each head's budget
        is at most ``n_valid[b]``. ``lengths (layers, batch)``: tokens each layer holds when fewer than
        ``n_valid`` (prefill compression); caps layer and head budgets.
        """
        n_layers, batch, heads = head_entropy.shape
        out = torch.zeros(n_layers, batch, heads, dtype=torch.long)
        for b in range(batch):
            n = int(n_valid[b])
            total = int(round(self.ratio * n * n_layers * heads))
            caps = [n] * n_layers if lengths is None else [min(n, int(x)) for x in lengths[:, b]]
            if self.layer_groups == "stages" or lengths is not None:
                from tokprune.methods.uncomp_prefill import layer_budgets

                per_layer = layer_budgets(self, head_entropy[:, b].mean(-1), total, heads * torch.tensor(caps))
            elif self.layer_budgets:
                per_layer = split_budget(head_entropy[:, b].mean(-1), total, heads * n,
                                         self.high_fraction, self.high_to_low)
            else:
                per_layer = split_budget(torch.zeros(n_layers), total, heads * n, 0.0, 1.0)
            for layer in range(n_layers):
                out[layer, b] = split_budget(head_entropy[layer, b], int(per_layer[layer]), caps[layer],
                                             self.high_fraction, self.high_to_low)
        return out

    # -- run-time results -------------------------------------------------------------------------------
    @property
    def budget(self) -> Optional[torch.Tensor]:
        """``(layers, batch, kv_heads)`` budgets of the last compression (``None`` before one)."""
        return self._state.get("budget")

    @property
    def selected(self) -> List[torch.Tensor]:
        """Per patched layer ``(batch, kv_heads, L)`` kept prompt positions of the last compression."""
        return self._state.get("selected", [])

    def kv_bytes(self) -> Dict[str, int]:
        """Prompt KV-cache bytes after the last compression (decode tokens excluded).

        ``full``: what the uncompressed cache held; ``allocated``: the compacted tensors, padding
        slots included; ``kept``: the slots that hold selected tokens (sum of budgets).
        """
        if self.budget is None:
            raise RuntimeError("UNComp: no prompt was compressed yet (run a prefill / generate first)")
        return dict(self._state["bytes"])

    # -- policy hooks -----------------------------------------------------------------------------------
    def attach(self, model, handle: PatchHandle) -> None:
        """Compress the cache right after every forward whose prefill this policy observed."""
        def _after_forward(module, args, kwargs, output):
            if self._state.get("stats"):
                cache = getattr(output, "cache", None)
                cache = cache if cache is not None else getattr(output, "past_key_values", None)
                if cache is not None:
                    self._compress(cache)
                self._state["stats"] = {}
            return None

        hook = model.register_forward_hook(_after_forward, with_kwargs=True)
        handle.on_remove(hook.remove)
        handle.on_remove(lambda: [self._state.pop(k, None) for k in ("stats", "slots", "valid")])
        if self.prefill_compression:
            from tokprune.methods.uncomp_prefill import install_prefill_compression

            install_prefill_compression(model, self, handle)

    def prefill(self, module, query, key, value, attention_mask, scale) -> None:
        """Record the head entropies and window scores of one layer's prompt (a fresh prefill only)."""
        batch, heads, n, _ = query.shape
        if key.shape[2] != n:
            return  # a continuation of a cached sequence: not a prompt
        layer = module.layer_idx
        state = self._state
        stats = state.setdefault("stats", {})
        if layer in stats or not stats:  # first layer of a new prompt: forget the previous sequence
            stats.clear()
            state["slots"] = {}
            valid = decode_valid_mask(attention_mask, batch, n)
            if valid is None:
                valid = torch.ones(batch, n, dtype=torch.bool, device=query.device)
            elif bool((valid[:, :-1] & ~valid[:, 1:]).any()):
                raise ValueError("UNComp needs left padding: each attention_mask row must be 0...0 1...1")
            state["valid"] = valid
        valid = state["valid"]
        if valid.shape[1] != n:  # a layer after prefill compression (batch 1, no padding): all tokens valid
            valid = torch.ones(batch, n, dtype=torch.bool, device=query.device)
        kv_heads = key.shape[1]
        if self.source == "query":
            ent = truncated_matrix_entropy(query, self.truncate, mask=valid).view(batch, kv_heads, -1).mean(-1)
        else:
            ent = truncated_matrix_entropy(key, self.truncate, mask=valid)
        score = window_attention_scores(query, key, self.window, self.pool, scale, valid, "sum")
        stats[layer] = (ent.float().cpu(), score)

    def _compress(self, cache) -> None:
        stats, valid = self._state["stats"], self._state["valid"]
        layers = sorted(stats)
        entropy = torch.stack([stats[i][0] for i in layers])  # (L, B, Hkv)
        n_valid = valid.sum(1).cpu()
        lengths = torch.tensor([[stats[i][1].shape[-1]] * valid.shape[0] for i in layers])
        budget = self.budgets(entropy, n_valid, None if bool((lengths == valid.shape[1]).all()) else lengths)
        selected, slots = [], {}
        full = allocated = kept = 0
        for li, layer in enumerate(layers):
            score = stats[layer][1]
            batch, kv_heads, n = score.shape
            lb = budget[li].to(score.device)  # (B, Hkv)
            width = int(lb.max())
            idx = torch.full((batch, kv_heads, width), -1, dtype=torch.long, device=score.device)
            for value in torch.unique(budget[li]).tolist():  # heads sharing a budget are selected together
                if value == 0:
                    continue
                rows = (lb == value).nonzero()
                s = score[rows[:, 0], rows[:, 1]]  # (R, n)
                recent = torch.zeros_like(s, dtype=torch.bool)
                recent[:, n - min(self.window, value):] = True
                idx[rows[:, 0], rows[:, 1], :value] = select_tokens(s, value, keep_mask=recent)
            keep = idx >= 0
            lay = cache.layers[layer]
            keys, values = lay.keys, lay.values
            gather = idx.clamp_min(0)[..., None]
            lay.keys = torch.gather(keys, 2, gather.expand(-1, -1, -1, keys.shape[-1]))
            lay.values = torch.gather(values, 2, gather.expand(-1, -1, -1, values.shape[-1]))
            slots[layer] = keep
            selected.append(idx)
            per_slot = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
            full += batch * kv_heads * valid.shape[1] * per_slot
            allocated += batch * kv_heads * width * per_slot
            kept += int(keep.sum()) * per_slot
        self._state.update(budget=budget, selected=selected, slots=slots,
                           bytes=dict(full=full, allocated=allocated, kept=kept))

    def attend_decode(self, ctx: DecodeContext) -> Optional[torch.Tensor]:
        """Dense attention over the layer's kept slots (per-head validity mask) and every token decoded
        since; ``None`` (plain dense attention) when no compression applies to this layer."""
        slots = self._state.get("slots", {}).get(ctx.layer_idx)
        if slots is None or slots.shape[0] != ctx.batch or slots.shape[-1] > ctx.n_tokens:
            return None
        batch, heads, kv_heads, dim = ctx.batch, ctx.heads, ctx.kv_heads, ctx.head_dim
        extra = ctx.n_tokens - slots.shape[-1]
        valid = torch.cat([slots, slots.new_ones(batch, kv_heads, extra)], dim=-1)  # decoded tokens: valid
        q = ctx.query.float().view(batch, kv_heads, heads // kv_heads, dim)
        logits = torch.matmul(q, ctx.key.float().transpose(-1, -2)) * ctx.scale  # (B, Hkv, g, T)
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
        out = torch.matmul(torch.softmax(logits, dim=-1), ctx.value.float())
        return out.reshape(batch, heads, 1, dim).to(ctx.query.dtype)


__all__ = ["UNComp", "split_budget"]
