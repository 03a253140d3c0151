"""Visual-token pruning inside the language model of a Hugging Face VLM, reversibly.

:func:`prune_visual_tokens` attaches forward hooks to ``LlavaForConditionalGeneration``,
``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration`` (any model whose inner
``model.language_model.layers`` is a Llama-style decoder stack). At language-model layer ``K``:

* the policy scores every visual token (``policy.score(ctx) -> (batch, n_tokens)``) from what was
  captured at layer ``K-1`` (post-RoPE queries/keys) or from the hidden states / projector outputs;
* the top ``policy.keep`` visual tokens of each row are kept by :func:`tokprune.ops.select_tokens`
  (text and padding tokens are always kept through ``keep_mask``);
* the hidden states, the RoPE ``(cos, sin)`` (Qwen's multimodal 3-row positions are already folded into
  them), ``position_ids`` and the attention mask are gathered to the kept tokens, so layers ``>= K`` run
  on the shorter sequence and write a shorter KV cache. Kept tokens keep their ORIGINAL positions.

Decoding continues with ``model.generate``: layers ``< K`` keep the full cache (so the positions HF
derives from ``cache.get_seq_length()`` stay in original coordinates), layers ``>= K`` get a mask built
for their compressed cache (kept prefill slots + every decoded token).

Batches: rows may hold different numbers of images and padding. The pruned sequence is rectangular:
its length is the longest row after pruning. A row that drops more tokens than the longest row fills
the difference with some of its dropped visual tokens kept as *masked slots*: present in the tensors
and in the cache, but invisible as keys to every token (and never the last position), so every real
token sees exactly the keys it would see if its row were pruned alone. ``handle.info["last"]["kept"]``
reports how many real tokens each row kept.

Masks for layers ``>= K`` are built here: a bool ``(batch, 1, q, kv)`` mask for SDPA and tokprune's
routed attention, an additive float mask for ``eager``.

Not supported (a clear error where it can be detected): flash/flex attention, static caches, prompts
given as ``inputs_embeds`` without ``input_ids``, ``K = 0`` (layer 0 keeps the full cache that HF reads
to place decoded tokens), beam search (it reorders cache rows between steps), sliding-window layers
(the window is not applied to the pruned layers' masks), ``labels`` (logits cover the kept tokens only).

Nothing is patched at import. The handle (a :class:`tokprune.methods.base.PatchHandle`, the one every
tokprune patch returns) is a context manager that removes every hook in ``finally``:

    with prune_visual_tokens(model, EntropyPrune(keep=64, layer=2)) as handle:   # or EntropyPrune(...)(model)
        out = model.generate(input_ids=ids, pixel_values=pv, attention_mask=am, max_new_tokens=8)
    print(handle.info["last"]["tokens_before"], "->", handle.info["last"]["tokens_after"])

This module never imports :mod:`tokprune.methods`: a policy resolves its own layer
(``policy.resolve_layer(model, calibration)``, e.g. EntropyPrune's ``layer="auto"`` calibration pass).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

_PATCH_ATTR = "_tokprune_vlm_patch"
_SUPPORTED_ATTN = ("sdpa", "eager", "tokprune")


# --------------------------------------------------------------------------------------------------------------
# What a policy sees
# --------------------------------------------------------------------------------------------------------------
@dataclass
class VisualScoreContext:
    """Everything a visual-token policy may score from, captured during one prefill.

    Shapes: ``B`` batch, ``N`` prompt length (padding included), ``D`` hidden size, ``H``/``Hkv`` query/key
    heads, ``d`` head dim. Tensors are views of the model's own activations (model dtype); do not modify.

    Attributes:
        layer: the pruning layer ``K`` (the policy scores before layer ``K`` runs).
        hidden_states: ``(B, N, D)`` input of layer ``K``.
        inputs_embeds: ``(B, N, D)`` input of layer 0 (projector outputs at visual positions).
        visual_mask: ``(B, N)`` bool, True at visual (image/video) tokens.
        valid_mask: ``(B, N)`` bool, False at padding.
        num_heads, num_kv_heads, head_dim: attention geometry of the language model.
    """

    layer: int
    hidden_states: torch.Tensor
    inputs_embeds: torch.Tensor
    visual_mask: torch.Tensor
    valid_mask: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    _raw_q: Optional[torch.Tensor] = None
    _raw_k: Optional[torch.Tensor] = None
    _cos: Optional[torch.Tensor] = None
    _sin: Optional[torch.Tensor] = None
    _rope: Optional[Callable] = None

    def _rotate(self, raw: torch.Tensor, heads: int, rows: Optional[torch.Tensor]) -> torch.Tensor:
        if raw is None:
            raise RuntimeError("this policy did not ask for layer K-1 queries/keys (set needs_query/needs_key)")
        batch, n = raw.shape[:2]
        x = raw.view(batch, n, heads, self.head_dim)
        cos, sin = self._cos.expand(batch, -1, -1), self._sin.expand(batch, -1, -1)
        if rows is not None:  # one row per batch element, e.g. the last real token
            pick = rows.view(batch, 1)
            x = x.gather(1, pick[..., None, None].expand(-1, -1, heads, self.head_dim))
            cos = cos.gather(1, pick[..., None].expand(-1, -1, cos.shape[-1]))
            sin = sin.gather(1, pick[..., None].expand(-1, -1, sin.shape[-1]))
        rotated, _ = self._rope(x, x, cos, sin, unsqueeze_dim=2)
        return rotated

    def query(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Post-RoPE queries of layer ``K-1``: ``(B, N, H, d)``, or ``(B, 1, H, d)`` at ``rows (B,)``."""
        return self._rotate(self._raw_q, self.num_heads, rows)

    def key(self) -> torch.Tensor:
        """Post-RoPE keys of layer ``K-1``: ``(B, N, Hkv, d)``."""
        return self._rotate(self._raw_k, self.num_kv_heads, None)

    def last_valid_index(self) -> torch.Tensor:
        """``(B,)`` index of the last non-padding token of each row."""
        n = self.valid_mask.shape[1]
        pos = torch.arange(n, device=self.valid_mask.device).expand_as(self.valid_mask)
        return pos.masked_fill(~self.valid_mask, -1).amax(dim=1).clamp_min(0)


# --------------------------------------------------------------------------------------------------------------
# Selection shared by every policy
# --------------------------------------------------------------------------------------------------------------
def select_visual_slots(scores: torch.Tensor, visual_mask: torch.Tensor, keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rectangular kept-token layout for a batch.

    Args:
        scores: ``(B, N)`` float, larger = keep; only visual positions matter.
        visual_mask: ``(B, N)`` bool.
        keep: visual tokens to keep per row (rows with fewer keep them all).

    Returns:
        ``(slots, real)``: ``slots (B, L)`` int64 sorted original indices of the tokens that stay, and
        ``real (B, L)`` bool, False for masked filler slots (dropped visual tokens that only pad a row to
        the common length ``L = max_b (N - dropped_b)``).
    """
    from tokprune.ops import select_tokens

    batch, n = scores.shape
    vis_scores = scores.float().masked_fill(~visual_mask, float("-inf"))
    top = select_tokens(vis_scores, keep)  # -inf (non-visual) only where a row has < keep visual tokens
    kept = torch.zeros_like(visual_mask).scatter_(1, top, True) & visual_mask
    stay = kept | ~visual_mask
    length = int(stay.sum(1).max())
    # Fill shorter rows with their earliest dropped tokens (flat priority -> stable lowest index).
    slots = select_tokens(torch.zeros(batch, n, device=scores.device), length, keep_mask=stay)
    return slots, stay.gather(1, slots)


# --------------------------------------------------------------------------------------------------------------
# The patch
# --------------------------------------------------------------------------------------------------------------
def language_model(model) -> Tuple[Any, Any]:
    """``(inner, language_model)`` of a supported VLM: ``model.model`` and ``model.model.language_model``
    (whose ``.layers`` is the decoder stack). Raises ``ValueError`` for any other model."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise ValueError(f"{type(model).__name__} is not a supported vision-language model: expected "
                         "model.model.language_model.layers (Llava, Qwen2-VL, Qwen2.5-VL)")
    return inner, lm


def visual_token_ids(model) -> List[int]:
    """Placeholder token ids of images/videos in ``model``'s prompts (empty for text-only models)."""
    config = model.config
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0 and value not in ids:
            ids.append(value)
    return ids


@dataclass
class _CallState:
    phase: Optional[str] = None  # None | "prefill" | "decode"
    pending_visual: Optional[torch.Tensor] = None
    inputs_embeds: Optional[torch.Tensor] = None
    am2d: Optional[torch.Tensor] = None
    raw_q: Optional[torch.Tensor] = None
    raw_k: Optional[torch.Tensor] = None
    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None
    # persistent across decode steps
    cache: Any = None
    n_full: int = 0
    slots: Optional[torch.Tensor] = None
    key_ok: Optional[torch.Tensor] = None
    # per call substitutes for layers >= K
    subs: Dict[str, Any] = field(default_factory=dict)
    past: int = 0
    q_len: int = 0


class _VisualPruner:
    """The hooks and per-call state machine behind :func:`prune_visual_tokens` (internal; the user holds a
    :class:`~tokprune.methods.base.PatchHandle` whose removal calls :meth:`remove`).

    ``last`` (also ``handle.info["last"]``, the same dict, updated in place) holds what the latest prefill
    did: ``layer``, ``tokens_before``/``tokens_after`` (sequence lengths), ``kept`` (per-row real tokens
    kept, list), ``visual_before``/``visual_kept`` (per row), ``slots`` ``(B, L)`` kept original indices,
    ``real`` ``(B, L)`` bool, ``scoring_seconds``.
    """

    def __init__(self, model, policy, layer: int):
        self.model = model
        self.policy = policy
        self.layer = layer
        self.inner, self.lm = language_model(model)
        self.visual_ids = visual_token_ids(model)
        self.hooks: List[Any] = []
        self.state = _CallState()
        self.last: Dict[str, Any] = {}
        cfg = self.lm.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.active = False

    # ----------------------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        layers = self.lm.layers
        add = self.hooks.append
        add(self.inner.register_forward_pre_hook(self._on_vlm, with_kwargs=True))
        add(self.lm.register_forward_pre_hook(self._on_lm, with_kwargs=True))
        add(self.lm.register_forward_hook(self._after_lm))
        needs_q = getattr(self.policy, "needs_query", False)
        needs_k = getattr(self.policy, "needs_key", False)
        if needs_q or needs_k:
            attn = layers[self.layer - 1].self_attn
            module = sys.modules[type(attn).__module__]
            self.rope = getattr(module, "apply_rotary_pos_emb", None)
            if self.rope is None:
                raise ValueError(f"{type(attn).__name__}'s module has no apply_rotary_pos_emb; cannot rebuild "
                                 "post-RoPE queries for this model")
            add(attn.register_forward_pre_hook(self._on_prev_attn, with_kwargs=True))
            if needs_q:
                add(attn.q_proj.register_forward_hook(self._capture("raw_q")))
            if needs_k:
                add(attn.k_proj.register_forward_hook(self._capture("raw_k")))
        for i in range(self.layer, len(layers)):
            add(layers[i].register_forward_pre_hook(self._make_layer_hook(i == self.layer), with_kwargs=True))
        setattr(self.model, _PATCH_ATTR, self)
        self.active = True

    def remove(self) -> None:
        """Remove every hook and forget any pruning state (idempotent)."""
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.state = _CallState()
        if getattr(self.model, _PATCH_ATTR, None) is self:
            delattr(self.model, _PATCH_ATTR)
        self.active = False

    def _on_vlm(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            self.state.pending_visual = None
            return None
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.visual_ids:
            mask |= input_ids == token
        self.state.pending_visual = mask
        return None

    def _on_lm(self, module, args, kwargs):
        st = self.state
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            st.phase = None
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        am = kwargs.get("attention_mask")
        st.subs, st.q_len = {}, embeds.shape[1]
        if past == 0:
            visual = st.pending_visual
            st.cache, st.slots, st.key_ok, st.n_full = None, None, None, 0
            if visual is None or visual.shape != embeds.shape[:2]:
                raise ValueError("prune_visual_tokens: the prefill needs input_ids (to find the visual tokens) "
                                 "matching inputs_embeds")
            if cache is not None:
                from transformers import DynamicCache

                from tokprune.hf.kv_cache import TokpruneCache

                if not isinstance(cache, (DynamicCache, TokpruneCache)):
                    raise NotImplementedError(f"prune_visual_tokens needs a DynamicCache or a TokpruneCache (per-layer "
                                              f"lengths), got {type(cache).__name__}")
            st.phase = "prefill" if bool(visual.any()) else None
            st.inputs_embeds, st.cache, st.n_full = embeds, cache, embeds.shape[1]
            st.pending_visual = visual
        elif st.slots is not None and cache is st.cache:
            st.phase, st.past = "decode", past
        else:
            st.phase = None
        if st.phase is not None:
            st.am2d = self._check_call(am)
        return None

    def _check_call(self, am) -> Optional[torch.Tensor]:
        """The 2D padding mask of a call that will be pruned/decoded (errors for what is unsupported)."""
        if am is not None and not (torch.is_tensor(am) and am.dim() == 2):
            raise NotImplementedError("prune_visual_tokens needs the 2D (batch, length) attention mask; got "
                                      f"{type(am).__name__} {getattr(am, 'shape', '')}")
        impl = self.lm.config._attn_implementation
        if impl not in _SUPPORTED_ATTN:
            raise NotImplementedError(f"prune_visual_tokens supports attn_implementation in {_SUPPORTED_ATTN}, "
                                      f"got {impl!r}")
        return None if am is None else am.bool()

    def _after_lm(self, module, args, output):
        st = self.state
        st.phase, st.raw_q, st.raw_k, st.cos, st.sin, st.inputs_embeds, st.subs = None, None, None, None, None, None, {}
        st.pending_visual = None
        if st.slots is not None and st.cache is None:  # the model created its cache inside this call
            st.cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if st.cache is None:  # no cache: nothing to decode against
            st.slots = st.key_ok = None
        return None

    def _on_prev_attn(self, module, args, kwargs):
        if self.state.phase == "prefill":
            self.state.cos, self.state.sin = kwargs["position_embeddings"]
        return None

    def _capture(self, name):
        def hook(module, args, output):
            if self.state.phase == "prefill":
                setattr(self.state, name, output)
            return None
        return hook

    def _make_layer_hook(self, first: bool):
        def hook(module, args, kwargs):
            st = self.state
            if st.phase is None:
                return None
            if first and not st.subs:
                if st.phase == "prefill":
                    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                    self._prefill_substitutes(hidden, kwargs)
                else:
                    self._decode_substitutes(kwargs)
            new_args, new_kwargs = args, dict(kwargs)
            if first and "hidden" in st.subs:
                if "hidden_states" in kwargs:
                    new_kwargs["hidden_states"] = st.subs["hidden"]
                else:
                    new_args = (st.subs["hidden"],) + tuple(args[1:])
            for name in ("attention_mask", "position_embeddings", "position_ids", "cache_position"):
                if name in st.subs and name in kwargs:
                    new_kwargs[name] = st.subs[name]
            return new_args, new_kwargs
        return hook

    # ----------------------------------------------------------------------------------------------- substitutes
    def _mask_like(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.lm.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def _prefill_substitutes(self, hidden: torch.Tensor, kwargs) -> None:
        st = self.state
        batch, n, _ = hidden.shape
        device = hidden.device
        visual = st.pending_visual.to(device)
        valid = st.am2d.to(device) if st.am2d is not None else torch.ones(batch, n, dtype=torch.bool, device=device)
        ctx = VisualScoreContext(layer=self.layer, hidden_states=hidden, inputs_embeds=st.inputs_embeds,
                                 visual_mask=visual, valid_mask=valid, num_heads=self.num_heads,
                                 num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, _raw_q=st.raw_q,
                                 _raw_k=st.raw_k, _cos=st.cos, _sin=st.sin, _rope=getattr(self, "rope", None))
        t0 = time.perf_counter()
        scores = self.policy.score(ctx)
        if scores.shape != (batch, n):
            raise ValueError(f"{type(self.policy).__name__}.score returned shape {tuple(scores.shape)}, "
                             f"expected {(batch, n)}")
        slots, real = select_visual_slots(scores, visual, self.policy.keep)
        scoring = time.perf_counter() - t0
        key_ok = real & valid.gather(1, slots)
        length = slots.shape[1]
        st.slots, st.key_ok = slots, key_ok
        subs = {"hidden": hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))}
        cos, sin = kwargs["position_embeddings"]
        subs["position_embeddings"] = tuple(
            t.expand(batch, -1, -1).gather(1, slots[..., None].expand(-1, -1, t.shape[-1])) for t in (cos, sin))
        pos = kwargs.get("position_ids")
        if torch.is_tensor(pos):
            lead = pos.shape[:-2]
            flat = pos.expand(*lead, batch, n)
            subs["position_ids"] = flat.gather(-1, slots.expand(*lead, batch, length))
        cpos = kwargs.get("cache_position")
        if torch.is_tensor(cpos):
            subs["cache_position"] = torch.arange(length, device=device)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=device)
        allowed = (key_ok[:, None, :] & causal) | eye
        subs["attention_mask"] = self._mask_like(allowed[:, None], hidden.dtype)
        st.subs = subs
        kept_vis = (real & visual.gather(1, slots)).sum(1)
        self.last.clear()  # in place: handle.info["last"] is this dict
        self.last.update(layer=self.layer, tokens_before=n, tokens_after=length,
                         kept=real.sum(1).tolist(), visual_before=visual.sum(1).tolist(),
                         visual_kept=kept_vis.tolist(), slots=slots, real=real, scoring_seconds=scoring)

    def _decode_substitutes(self, kwargs) -> None:
        st = self.state
        slots_ok = st.key_ok
        batch, length = slots_ok.shape
        device = slots_ok.device
        t_past = st.past - st.n_full  # tokens decoded so far (beyond the prompt)
        n_new = t_past + st.q_len
        if st.am2d is not None:
            tail = st.am2d[:, st.n_full: st.n_full + n_new].to(device)
        else:
            tail = torch.ones(batch, n_new, dtype=torch.bool, device=device)
        q = torch.arange(st.q_len, device=device)[:, None] + t_past
        k = torch.arange(n_new, device=device)[None, :]
        new_ok = tail[:, None, :] & (k <= q)[None] | (k == q)[None]
        allowed = torch.cat([slots_ok[:, None, :].expand(-1, st.q_len, -1), new_ok], dim=-1)
        dtype = kwargs["position_embeddings"][0].dtype if "position_embeddings" in kwargs else torch.float32
        st.subs = {"attention_mask": self._mask_like(allowed[:, None], dtype)}
        cpos = kwargs.get("cache_position")
        if torch.is_tensor(cpos):
            st.subs["cache_position"] = cpos - st.n_full + length


def check_layer(policy, model, layer: Any) -> int:
    """``layer`` if it is a valid pruning layer of ``model`` (an int in ``[1, n_layers)``), else ``ValueError``."""
    _, lm = language_model(model)
    n_layers = len(lm.layers)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{type(policy).__name__}: layer must be an int (or 'auto' where the policy supports it), "
                         f"got {layer!r}")
    # Layer 0 is never pruned: its full-length cache is what HF reads (cache.get_seq_length()) to place
    # decoded tokens at their original positions, and layer K-1 provides the queries policies score from.
    if not 1 <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range for {type(policy).__name__} on a {n_layers}-layer "
                         f"language model: expected 1 <= layer < {n_layers}")
    return layer


def prune_visual_tokens(model, policy, *, calibration: Optional[Dict[str, Any]] = None):
    """Prune visual tokens of ``model``'s prompts inside its language model with ``policy``.

    Args:
        model: ``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` or
            ``Qwen2_5_VLForConditionalGeneration`` (attention ``sdpa``, ``eager`` or tokprune's routed one).
        policy: a :class:`tokprune.methods.base.VisualPolicy` (``keep`` visual tokens kept per row, int
            ``>= 0``; ``layer``; ``needs_query``/``needs_key``; ``score(ctx: VisualScoreContext) -> (batch,
            n_tokens)`` float scores, larger = keep; ``resolve_layer(model, calibration) -> int``), e.g.
            :class:`tokprune.methods.EntropyPrune`, ``FastV``, ``DivPrune``, ``RandomPrune``. A duck-typed
            object without ``resolve_layer`` must give an int ``layer``.
        calibration: model inputs for the policy's calibration pass (``EntropyPrune(layer="auto")``).

    Returns:
        A :class:`tokprune.methods.base.PatchHandle` (context manager; ``remove()`` undoes the patch);
        ``handle.info["layer"]`` is the resolved pruning layer and ``handle.info["last"]`` the dict of what
        the latest prefill did (see :class:`_VisualPruner`).

    Raises:
        ValueError: the model is not a VLM / has no visual token ids, ``keep`` is negative, the layer is
            out of range, or the model is already patched.
    """
    from tokprune.methods.base import PatchHandle  # the shared handle type (no method module is imported)

    language_model(model)
    if not visual_token_ids(model):
        raise ValueError(f"{type(model).__name__} has no image/video token id in its config: nothing to prune")
    keep = getattr(policy, "keep", None)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative int (visual tokens kept per row), got {keep!r}")
    if not callable(getattr(policy, "score", None)):
        raise TypeError("policy must have a score(ctx) method")
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise ValueError("model is already patched by prune_visual_tokens; remove() that patch first")
    resolve = getattr(policy, "resolve_layer", None)
    layer = resolve(model, calibration) if callable(resolve) else getattr(policy, "layer", None)
    pruner = _VisualPruner(model, policy, check_layer(policy, model, layer))
    handle = PatchHandle(model, [policy])
    handle.info["last"], handle.info["layer"] = pruner.last, pruner.layer
    handle.on_remove(pruner.remove)
    try:
        pruner._install()
    except BaseException:
        handle.remove()
        raise
    return handle
