"""The shapes every tokprune method takes, and the one handle every ``patch()`` returns.

A method is a small dataclass that implements **one** scoring function; everything else (selection with
sink / window, the attention call, declining to dense attention, hooks, undo) is shared here or in
:mod:`tokprune.hf`. Three roles:

=================  ==================================================  ===============================
role               the method implements                               patched through
=================  ==================================================  ===============================
``"decode"``       :meth:`KVPolicy.score` -> ``(B, Hkv | H, T)``       :mod:`tokprune.hf.attention`
``"prefill"``      :meth:`PrefillPolicy.attend` (or ``None``: dense)   :mod:`tokprune.hf.attention`
``"visual"``       :meth:`VisualPolicy.score` -> ``(B, N)``             :mod:`tokprune.hf.vlm`
=================  ==================================================  ===============================

Adding a KV method = one dataclass + one ``score()``::

    @dataclass
    class RecentOnly(KVPolicy):
        def score(self, ctx):                       # ctx: DecodeContext
            return ctx.zeros()                      # no preference: sink + window decide

Policies compose on one model: :func:`patch` takes any mix of roles and returns one :class:`PatchHandle`
that undoes all of them (``with patch(model, TokenSparseAttention(), FASA(fcs=...)):``).

Binding: :meth:`Policy.bind` is called once by ``patch()`` with the model, before any hook is installed.
Policies resolve model-dependent settings there (``layer="auto"``, calibration checks, layer lists), so
the hf layer never imports a method module (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch


# ----------------------------------------------------------------------------------------------------------
# One handle for every patch
# ----------------------------------------------------------------------------------------------------------
class PatchHandle:
    """Undo list of one patch of ``model``: ``remove()`` runs every registered undo step once, newest first.

    Every ``patch()`` in tokprune returns this type; handles nest (:meth:`adopt` takes another handle's undo
    steps), and it is a context manager whose exit calls :meth:`remove` (also when the block raises).

    Attributes:
        model: the patched model.
        policies: the policies attached by this patch (for introspection, e.g. counters).
        active: ``False`` once removed.
        info: free-form facts a patch reports after a call (e.g. visual pruning's ``last`` dict).
    """

    def __init__(self, model: Any, policies: Sequence[Any] = ()):
        self.model = model
        self.policies: List[Any] = list(policies)
        self.active = True
        self.info: dict = {}
        self._undo: List[Callable[[], None]] = []

    def on_remove(self, undo: Callable[[], None]) -> Callable[[], None]:
        """Register ``undo`` (no arguments) to run at :meth:`remove`; returns it (usable as a decorator)."""
        if not self.active:
            raise RuntimeError("this patch was already removed")
        self._undo.append(undo)
        return undo

    def adopt(self, other: "PatchHandle") -> "PatchHandle":
        """Take over ``other``'s undo steps and policies (``other`` becomes inert); returns ``self``."""
        self._undo.extend(other._undo)
        self.policies.extend(other.policies)
        self.info.update(other.info)
        other._undo, other.active = [], False
        return self

    def remove(self) -> None:
        """Undo the patch (idempotent). Every step runs even if an earlier one raises; the first error is
        re-raised after all steps ran."""
        if not self.active:
            return
        self.active = False
        error: Optional[BaseException] = None
        while self._undo:
            step = self._undo.pop()
            try:
                step()
            except BaseException as exc:  # keep undoing; report the first failure
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        names = ", ".join(type(p).__name__ for p in self.policies)
        return f"PatchHandle({type(self.model).__name__}, [{names}], active={self.active})"


# ----------------------------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------------------------
def check_int(owner: Any, name: str, value: Any, *, minimum: int = 0) -> int:
    """``value`` if it is an int ``>= minimum`` (bools rejected), else ``ValueError`` naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(owner).__name__}: {name} must be an int >= {minimum}, got {value!r}")
    return value


class Policy:
    """Root of every method. ``role`` is ``"decode"``, ``"prefill"`` or ``"visual"``."""

    role: str = ""

    def bind(self, model: Any) -> None:
        """Resolve model-dependent settings once, before hooks are installed (default: nothing).

        Raise ``ValueError`` naming the setting when the method cannot serve ``model``.
        """

    def attach(self, model: Any, handle: PatchHandle) -> None:
        """Install extra hooks on ``model`` after the attention/visual patch (default: none); register their
        undo with ``handle.on_remove``. UNComp uses it to compress the cache after each prefill forward."""

    def patch(self, model: Any, **kwargs: Any) -> PatchHandle:
        """Attach this policy to ``model`` alone; see :func:`patch`."""
        return patch(model, self, **kwargs)


@dataclass
class DecodeContext:
    """What a KV policy sees at one decode step of one layer (batch ``B``, ``H`` query heads, ``Hkv`` KV
    heads, ``T`` cached tokens including the current one, head dim ``D``).

    Attributes:
        module: the HF attention module (``module.layer_idx``).
        query: ``(B, H, 1, D)`` post-RoPE query of the step.
        key, value: ``(B, Hkv, T, D)`` the whole cache of the layer (views; do not modify).
        valid: ``(B, T)`` bool of attendable keys (padding False), or ``None`` when all are.
        scale: softmax scale.
        cache_layer: the :class:`tokprune.hf.kv_cache.TokpruneLayer` holding ``key``/``value`` (side
            buffers such as packed keys live there), or ``None`` on another cache.
    """

    module: Any
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    valid: Optional[torch.Tensor]
    scale: float
    cache_layer: Any = None

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def batch(self) -> int:
        return self.key.shape[0]

    @property
    def heads(self) -> int:
        return self.query.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.key.shape[2]

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    def zeros(self, per_head: bool = False) -> torch.Tensor:
        """``(B, Hkv or H, T)`` float32 zeros: "no preference" scores."""
        heads = self.query.shape[1] if per_head else self.key.shape[1]
        return torch.zeros(self.key.shape[0], heads, self.key.shape[2], device=self.key.device)


def decode_valid_mask(attention_mask: Optional[torch.Tensor], batch: int, n_tokens: int,
                      cache_layer: Any = None) -> Optional[torch.Tensor]:
    """``(batch, n_tokens)`` bool of the keys the decode query may attend, or ``None`` when all may.

    Args:
        attention_mask: what the HF attention function received: ``None``, a bool ``(batch, 1, q_len, kv_len)``
            mask (True = attend) or an additive float mask of that shape (``0`` = attend, very negative =
            masked); ``kv_len >= n_tokens`` (the first ``n_tokens`` columns are the cached keys).
        batch, n_tokens: the decode call's batch and cached-token count.
        cache_layer: the :class:`tokprune.hf.kv_cache.TokpruneLayer` of the call (ragged rows are masked).

    Reads no tensor data (no host synchronisation): a mask that happens to be all-True is returned as is.
    """
    valid = None
    if attention_mask is not None:
        last = attention_mask[:, 0, -1, :] if attention_mask.dim() == 4 else attention_mask
        last = last[..., :n_tokens]
        valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
        valid = valid.expand(batch, n_tokens)
    rows = cache_layer.valid_mask() if cache_layer is not None and getattr(cache_layer, "ragged", False) else None
    if rows is not None:
        valid = rows if valid is None else valid & rows
    return valid


def ratio_for_batch(table, batch: int) -> float:
    """A decline ratio for ``batch`` rows from ``table``: a number, or ``{batch: ratio}`` (the entry of the largest
    measured batch at most ``batch``; the smallest one below all of them)."""
    if not isinstance(table, dict):
        return table
    keys = sorted(table)
    chosen = keys[0]
    for key in keys:
        if key <= batch:
            chosen = key
    return table[chosen]


@dataclass
class KVPolicy(Policy):
    """Decode-time KV selection with a token budget (kvpress's ``ScorerPress`` shape).

    A subclass implements :meth:`score`; the base class masks padding, keeps the ``sink`` first and
    ``window`` newest valid tokens, takes the top ``budget`` by score per KV head (or per query head when
    ``per_head``), and runs exact attention over them. When the method cannot win (``budget >= T``, or
    :meth:`declines` says so) the dense decode path computes exact attention.

    Attributes:
        budget: tokens attended per head and step (sink and window included), ``>= 1``.
        sink: first valid tokens always kept.
        window: most recent valid tokens always kept.
        backend: op backend (``None``: automatic).
        decline_ratio: dense attention while ``n_tokens < decline_ratio * budget`` (the method cannot win
            there); ``None``: the method's measured :attr:`DECLINE_RATIO` (``benchmarks/bench_fasa_decline.py``
            prints the break-even per method); ``0``: only ``budget >= n_tokens`` declines (quality evals).
    """

    budget: int = 256
    sink: int = 4
    window: int = 64
    backend: Optional[str] = None
    decline_ratio: Optional[float] = None

    #: break-even ``n_tokens / budget`` below which the dense step is faster (measured per method): one float,
    #: or ``{batch: ratio}`` (a call of batch ``b`` uses the entry of the largest key ``<= b``, the smallest key
    #: below it; the per-step overhead of a sparse step is amortised over the rows, so larger batches win earlier)
    DECLINE_RATIO = 1.0
    role = "decode"
    per_head = False  # score() returns (B, H, T) (True) or (B, Hkv, T) (False)
    observes_prefill = False  # prefill() is called on multi-token calls (SnapKV, UNComp)

    def __post_init__(self):
        check_int(self, "budget", self.budget, minimum=1)
        check_int(self, "sink", self.sink)
        check_int(self, "window", self.window)
        ratio = self.decline_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0):
            raise ValueError(f"{type(self).__name__}: decline_ratio must be a float >= 0 or None, got {ratio!r}")

    def score(self, ctx: DecodeContext) -> torch.Tensor:  # pragma: no cover - abstract
        """``(B, Hkv, T)`` (or ``(B, H, T)`` when ``per_head``) float scores, larger = keep; ``-inf`` =
        never keep. Padding is masked by the caller."""
        raise NotImplementedError

    def decline_ratio_for(self, batch: int = 1) -> float:
        """The ratio :meth:`declines` uses for a call of ``batch`` rows: ``decline_ratio`` if given, else
        :attr:`DECLINE_RATIO` (its entry for ``batch`` when it is a ``{batch: ratio}`` table)."""
        if self.decline_ratio is not None:
            return self.decline_ratio
        return ratio_for_batch(type(self).DECLINE_RATIO, batch)

    def declines(self, n_tokens: int, ctx: Optional[DecodeContext] = None, *, batch: Optional[int] = None) -> bool:
        """``True`` when dense attention is the better choice for ``n_tokens`` cached tokens: the budget covers
        the cache, or ``n_tokens < decline_ratio * budget`` (the measured cost rule, for the batch of ``ctx`` or
        ``batch``, default 1). Decides from shapes only (no tensor data)."""
        if batch is None:
            batch = ctx.batch if ctx is not None else 1
        return self.budget >= n_tokens or n_tokens < self.decline_ratio_for(batch) * self.budget

    def select(self, scores: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """Token indices ``(B, Hkv or H, K)`` (``-1`` = empty) from :meth:`score`'s output: ``sink`` first and
        ``window`` newest valid tokens plus the best-scoring rest, ``budget`` in all."""
        from tokprune.ops.fasa import select_sparse_indices

        return select_sparse_indices(scores, self.budget, sink=self.sink, window=self.window, valid=ctx.valid)

    def select_pads(self, ctx: DecodeContext) -> bool:
        """Whether :meth:`select` may leave ``-1`` slots for ``ctx`` (decided from shapes, no data). The base
        selection pads only rows with padding (``ctx.valid`` given); without it the attention skips masking. A
        method that overrides :meth:`select` is assumed to pad unless it overrides this too."""
        return ctx.valid is not None or type(self).select is not KVPolicy.select

    def attend_decode(self, ctx: DecodeContext) -> Optional[torch.Tensor]:
        """The shared decode path: ``None`` when :meth:`declines` (the router runs dense attention), else
        ``score -> select -> sparse_decode_attention``: ``(B, H, 1, D)`` in the query dtype.

        Reads no tensor data on the host (``torch.compile(fullgraph=True)`` traces it; data-reading checks of
        the ops run only in debug mode)."""
        if self.declines(ctx.n_tokens, ctx):
            return None
        from tokprune.ops.fasa import sparse_decode_attention

        index = self.select(self.score(ctx), ctx)
        return sparse_decode_attention(ctx.query, ctx.key, ctx.value, index, ctx.scale, backend=self.backend,
                                       padded=self.select_pads(ctx))

    def prefill(self, module, query, key, value, attention_mask, scale) -> None:
        """Observe a multi-token call (only when ``observes_prefill``); SDPA computes it.

        ``query (B, H, q, D)``, ``key``/``value (B, Hkv, T, D)`` post-RoPE, ``attention_mask`` as HF gives it."""


@dataclass
class PrefillPolicy(Policy):
    """Multi-token (prefill) attention policy: ``attend(module, q, k, v, mask, scale, **kw)`` returns
    ``(B, q_len, H, D)`` or ``None`` to decline (SDPA computes the call)."""

    role = "prefill"

    def attend(self, module, query, key, value, attention_mask, scale, **kwargs) -> Optional[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


@dataclass
class VisualPolicy(Policy):
    """Visual-token pruning at language-model layer ``layer``: ``score(ctx) -> (B, N)`` float scores of the
    prompt tokens (only visual tokens compete; larger = keep); the ``keep`` best per row survive.

    ``needs_query`` / ``needs_key``: the policy reads layer ``K-1``'s post-RoPE queries / keys from the
    :class:`tokprune.hf.vlm.VisualScoreContext`.
    """

    keep: int = 128
    layer: Any = 2

    role = "visual"
    needs_query = False
    needs_key = False

    def score(self, ctx) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def resolve_layer(self, model: Any, calibration: Optional[dict] = None) -> int:
        """The pruning layer for ``model`` (an int ``layer`` as given; subclasses resolve ``"auto"``)."""
        if self.layer == "auto":
            raise ValueError(f"{type(self).__name__} does not support layer='auto'")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"{type(self).__name__}: layer must be an int, got {self.layer!r}")
        return self.layer

    def __call__(self, model, **kwargs):
        """``with policy(model): ...`` — same as :meth:`patch`."""
        return self.patch(model, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------------------
def patch(model: Any, *policies: Any, layers: Optional[Sequence[int]] = None, calibration: Optional[dict] = None,
          cache: bool = True) -> PatchHandle:
    """Attach any mix of decode, prefill and visual policies to ``model``; one handle undoes all.

    Args:
        model: a transformers causal LM (or VLM for visual policies).
        policies: at most one policy per role (``KVPolicy``, ``PrefillPolicy``, ``VisualPolicy``).
        layers: decoder layers the decode/prefill policies apply to (default: all).
        calibration: model inputs for a visual policy's ``layer="auto"`` calibration pass.
        cache: make ``model.generate`` use tokprune's preallocated KV cache (the fast path).

    Returns:
        A :class:`PatchHandle` (context manager).

    Raises:
        ValueError: two policies share a role, a policy has no role, or a policy cannot serve the model.
    """
    by_role: dict = {}
    for policy in policies:
        role = getattr(policy, "role", None)
        if role not in ("decode", "prefill", "visual"):
            raise ValueError(f"{type(policy).__name__} has no role; expected a KVPolicy, PrefillPolicy or VisualPolicy")
        if role in by_role:
            raise ValueError(f"two {role} policies given ({type(by_role[role]).__name__}, {type(policy).__name__})")
        by_role[role] = policy
    if not by_role:
        raise ValueError("patch: give at least one policy")
    for policy in by_role.values():
        policy.bind(model)
    handle = PatchHandle(model)
    try:
        if "decode" in by_role or "prefill" in by_role:
            from tokprune.hf.attention import patch_attention

            handle.adopt(patch_attention(model, prefill=by_role.get("prefill"), decode=by_role.get("decode"),
                                         layers=layers, cache=cache))
        if "visual" in by_role:
            from tokprune.hf.vlm import prune_visual_tokens

            handle.adopt(prune_visual_tokens(model, by_role["visual"], calibration=calibration))
        for policy in by_role.values():
            policy.attach(model, handle)
    except BaseException:
        handle.remove()
        raise
    return handle


__all__ = ["PatchHandle", "Policy", "DecodeContext", "KVPolicy", "PrefillPolicy", "VisualPolicy", "patch",
           "check_int", "decode_valid_mask"]
