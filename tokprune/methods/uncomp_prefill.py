"""UNComp's offline stage division of layers and its prefill hidden-state compression.

**Stage division** (offline, once per model; ``tokprune calibrate uncomp``). On a calibration text, the
input of every layer's attention (the normalised hidden states, ``(N, D)``) gets its matrix entropy
(:func:`tokprune.ops.matrix_entropy`: centred, rows L2-normalised, von Neumann, divided by ``log D``).
The profile is that entropy times the number of layers (the scale of the authors' stored profiles).
A new stage starts at layer ``i`` when the profile *drops* by more than ``threshold`` from layer
``i - 1`` (the authors' rule, threshold 1); stages are numbered 0, 1, ... from layer 0. The SmolLM2
result ships as ``tokprune/data/uncomp_smollm2_135m.json``.

**Prefill hidden-state compression** (``UNComp(prefill_compression=True)``). During the prefill, before
every layer ``l >= 1`` of stage ``s_l`` (of ``S`` = the last stage), the sequence is cut to

    ``keep_l = ceil(n * (min_keep + (1 - min_keep) * (S - s_l) / S))``  tokens  (stage 0: all ``n``)

chosen by the previous layer's attention: the post-RoPE queries of the last ``window`` tokens over the
keys, softmax, summed over queries and heads (the authors' ``attn[-8:].sum``); top ``keep_l``, kept in
order. The last ``window`` tokens are always kept (tokprune's addition: the last token gives the next
token's logits). The hidden states, residual included, RoPE ``(cos, sin)``, ``position_ids`` and a 4D
attention mask are gathered to the kept tokens, so layers ``>= l`` run on fewer tokens and write a
shorter KV cache; kept tokens keep their original positions. The authors use absolute lengths (a
minimum of 1536 tokens in the last stage, linear over stages up to their token budget); tokprune uses
the fraction ``min_keep`` of the prompt (``prefill_min_keep``, default 0.375 = 1536 / 4096).
UNComp's KV compression then runs on each layer's (shorter) cache as usual; its total stays
``ratio * n * heads * layers``, capped per layer at what the layer holds.

After a prefill, ``handle.info["prefill"]`` (the patch handle) holds the tokens each layer ran on and, per
layer, their original positions (``slots``); :attr:`UNComp.selected` then indexes each layer's
prefill-compressed sequence (``slots[l][selected[l]]`` are original positions). The logits of a compressed
prefill cover the kept tokens of the last layer only (the last token is always among them).

Batches: one row without padding (``ValueError`` naming ``input_ids`` / ``attention_mask`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

STAGES_FORMAT = "tokprune-uncomp-stages-v1"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
LAYER_GROUPS = ("split", "stages")


# ----------------------------------------------------------------------------------------------------------
# Stage division
# ----------------------------------------------------------------------------------------------------------
def _decoder(model):
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder stack (expected model.model.layers)")
    return inner


@torch.no_grad()
def layer_entropy_profile(model, input_ids: torch.Tensor) -> List[float]:
    """Matrix entropy of each layer's attention input on one prompt, times the number of layers.

    Args:
        model: a transformers decoder (Llama, Qwen2, ...).
        input_ids: ``(1, N)`` int64 calibration prompt.

    Returns:
        ``L`` floats: ``L * matrix_entropy(h_l, normalizer="dim")`` with ``h_l (N, D)`` the input of layer
        ``l``'s attention (after its input norm).
    """
    from tokprune.ops import matrix_entropy

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, N), got {tuple(input_ids.shape)}")
    layers = _decoder(model).layers
    seen: Dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        def capture(module, args, kwargs, i=i):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen[i] = matrix_entropy(x.float(), normalizer="dim")[0]
        hooks.append(layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True))
    try:
        model(input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [float(seen[i]) * len(layers) for i in range(len(layers))]


def stage_division(profile: Sequence[float], threshold: float = 1.0) -> List[int]:
    """Stage label per layer: a new stage starts where ``profile[i] - profile[i-1] < -threshold``.

    Args:
        profile: ``L`` floats (:func:`layer_entropy_profile`).
        threshold: drop (``> 0``) that opens a new stage.

    Returns:
        ``L`` non-decreasing ints starting at 0.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    labels, stage = [], 0
    for i, value in enumerate(profile):
        if i and value - profile[i - 1] < -threshold:
            stage += 1
        labels.append(stage)
    return labels


def calibrate_stages(model, input_ids: torch.Tensor, *, threshold: float = 1.0, name: str = "",
                     meta: Optional[dict] = None) -> dict:
    """Profile ``model`` on ``input_ids`` and divide its layers into stages; the JSON-ready dict."""
    from tokprune.methods.token_sparse import model_signature

    profile = layer_entropy_profile(model, input_ids)
    return dict(format=STAGES_FORMAT, model=name, **model_signature(model), threshold=threshold,
                calibration_tokens=int(input_ids.shape[-1]), profile=profile,
                stages=stage_division(profile, threshold), **(meta or {}))


def _check_stages(stages: Any, n_layers: int) -> List[int]:
    ok = (isinstance(stages, (list, tuple)) and len(stages) == n_layers
          and all(isinstance(s, int) and not isinstance(s, bool) for s in stages)
          and stages[0] == 0 and all(0 <= b - a <= 1 for a, b in zip(stages, stages[1:])))
    if not ok:
        raise ValueError(f"UNComp: stages must be {n_layers} ints (one per layer) starting at 0, each equal to "
                         f"or 1 more than the previous, got {stages!r}")
    return list(stages)


def shipped_stages() -> List[Path]:
    """Stage divisions shipped with tokprune (``tokprune/data/uncomp_*.json``)."""
    return sorted(DATA_DIR.glob("uncomp_*.json"))


def resolve_stages(model, stages: Union[None, str, Path, Sequence[int]] = None) -> List[int]:
    """Stage label per layer of ``model``: ``stages`` as a list, a JSON file of
    ``tokprune calibrate uncomp``, or (``None``) the shipped division matching the model.

    Raises:
        ValueError: malformed stages, a file made for another model, or no shipped file matches.
    """
    from tokprune.methods.token_sparse import model_signature

    n_layers = len(_decoder(model).layers)
    want = model_signature(model)
    if isinstance(stages, (list, tuple)):
        return _check_stages(list(stages), n_layers)
    paths = [Path(stages)] if stages is not None else shipped_stages()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"UNComp: stages file {path} does not exist "
                                    f"(create it with: tokprune calibrate uncomp --out {path})")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != STAGES_FORMAT:
            raise ValueError(f"UNComp: {path} is not a stage division (expected format={STAGES_FORMAT!r})")
        got = {key: data.get(key) for key in want}
        if got == want:
            return _check_stages(data["stages"], n_layers)
        if stages is not None:
            raise ValueError(f"UNComp: stages file {path} was made for {got}, the model is {want}")
    raise ValueError(f"UNComp: no shipped stage division matches this model ({want}); run `tokprune calibrate "
                     "uncomp --out stages.json` and pass stages='stages.json' (or a list of stage labels)")


# ----------------------------------------------------------------------------------------------------------
# Layer budgets by stage
# ----------------------------------------------------------------------------------------------------------
def validate_options(policy) -> None:
    """``ValueError`` naming the UNComp argument when ``layer_groups`` / ``prefill_min_keep`` are bad."""
    if policy.layer_groups not in LAYER_GROUPS:
        raise ValueError(f"UNComp: layer_groups must be one of {LAYER_GROUPS}, got {policy.layer_groups!r}")
    keep = policy.prefill_min_keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"UNComp: prefill_min_keep must be a float in (0, 1], got {keep!r}")


def split_weighted(weight: torch.Tensor, total: int, caps: torch.Tensor) -> torch.Tensor:
    """Split ``total`` integer slots in proportion to ``weight (G,)``, item ``g`` capped at ``caps[g]``.

    Capped items give their excess to the others (water filling); integer rounding by largest remainder
    (ties: lower index).

    Returns:
        ``(G,)`` int64 in ``[0, caps]`` summing to ``min(total, caps.sum())``.
    """
    weight = weight.double()
    caps = caps.double()
    total = min(int(total), int(caps.sum()))
    share = torch.zeros_like(weight)
    free = torch.ones(weight.numel(), dtype=torch.bool)
    remaining = float(total)
    while bool(free.any()):
        ideal = remaining * weight / weight[free].sum()
        over = free & (ideal > caps)
        if not bool(over.any()):
            share[free] = ideal[free]
            break
        share[over] = caps[over]
        free &= ~over
        remaining = total - float(share[~free].sum())
    base = torch.minimum(share.floor(), caps)
    left = total - int(base.sum())
    if left > 0:
        frac = torch.where(base < caps, share - base, torch.full_like(share, -1.0))
        base[torch.sort(frac, descending=True, stable=True).indices[:left]] += 1
    return base.long()


def stage_weights(stages: Sequence[int], high_to_low: float) -> torch.Tensor:
    """``(L,)`` float64 layer weights: ``high_to_low`` in stage 0 down to 1 in the last stage, linear in
    the stage index (the authors' keep lengths also fall linearly with the stage); all 1 for one stage."""
    s = torch.tensor(list(stages), dtype=torch.float64)
    last = float(s.max())
    if last == 0:
        return torch.ones_like(s)
    return 1 + (float(high_to_low) - 1) * (last - s) / last


def layer_budgets(policy, layer_entropy: torch.Tensor, total: int, caps: torch.Tensor) -> torch.Tensor:
    """Per-layer slot totals of one row for UNComp: ``(L,)`` int64 summing to ``min(total, caps.sum())``.

    ``layer_groups="stages"``: weights of :func:`stage_weights`; ``"split"``: the ``high_fraction`` of
    layers with the largest ``layer_entropy (L,)`` weigh ``high_to_low`` (ties: lower index), the others
    1; ``layer_budgets=False``: equal weights. ``caps (L,)``: slots each layer can hold.
    """
    n_layers = layer_entropy.numel()
    if not policy.layer_budgets:
        weight = torch.ones(n_layers, dtype=torch.float64)
    elif policy.layer_groups == "stages":
        weight = stage_weights(policy._state["stages"], policy.high_to_low)
    else:
        order = torch.sort(layer_entropy.double(), descending=True, stable=True).indices
        weight = torch.ones(n_layers, dtype=torch.float64)
        weight[order[:int(round(policy.high_fraction * n_layers))]] = float(policy.high_to_low)
    return split_weighted(weight, total, caps)


def prefill_keep_counts(stages: Sequence[int], n: int, min_keep: float, window: int) -> List[int]:
    """Tokens kept before each layer during a prefill of ``n`` tokens (layer 0 and stage 0: ``n``).

    ``keep_l = ceil(n * (min_keep + (1 - min_keep) * (S - s_l) / S))``, at least ``min(window, n)``.
    """
    last = max(stages)
    out = []
    for s in stages:
        if last == 0 or s == 0:
            out.append(n)
        else:
            frac = min_keep + (1 - min_keep) * (last - s) / last
            out.append(min(n, max(min(window, n), math.ceil(n * frac - 1e-9))))
    return out


# ----------------------------------------------------------------------------------------------------------
# Prefill hidden-state compression (hooks)
# ----------------------------------------------------------------------------------------------------------
class _PrefillCompressor:
    """Hooks behind ``UNComp(prefill_compression=True)``; state of the running prefill only."""

    def __init__(self, model, policy, stages: List[int]):
        self.policy = policy
        self.stages = stages
        self.decoder = _decoder(model)
        self.layers = self.decoder.layers
        attn = self.layers[0].self_attn
        self.rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if self.rope is None:
            raise ValueError(f"UNComp(prefill_compression=True): {type(attn).__name__}'s module has no "
                             "apply_rotary_pos_emb; cannot score tokens for this model")
        cfg = self.decoder.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.active = False
        self.captured: Dict[str, Any] = {}
        self.info: Dict[str, Any] = {}

    def install(self, handle) -> None:
        hooks = [self.decoder.register_forward_pre_hook(self._on_start, with_kwargs=True),
                 self.decoder.register_forward_hook(self._on_end)]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            hooks.append(attn.register_forward_pre_hook(self._on_attn, with_kwargs=True))
            hooks.append(attn.q_proj.register_forward_hook(self._capture("q")))
            hooks.append(attn.k_proj.register_forward_hook(self._capture("k")))
            if i >= 1:
                hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        for h in hooks:
            handle.on_remove(h.remove)
        handle.on_remove(self._reset)
        handle.info["prefill"] = self.info

    def _reset(self) -> None:
        self.active = False
        self.captured = {}

    # -- hooks --------------------------------------------------------------------------------------------
    def _on_start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        self.active = x is not None and past == 0 and x.shape[1] > 1
        if not self.active:
            return None
        if x.shape[0] != 1:
            raise ValueError(f"UNComp(prefill_compression=True) supports batch 1 only: input_ids has batch "
                             f"{x.shape[0]}; run the rows one by one or set prefill_compression=False")
        am = kwargs.get("attention_mask")
        if torch.is_tensor(am) and am.dim() == 2 and not bool(am.bool().all()):
            raise ValueError("UNComp(prefill_compression=True) does not support padding: attention_mask has "
                             "zeros; pass the row without padding or set prefill_compression=False")
        n = x.shape[1]
        self.captured = {}
        self.subs: Dict[str, Any] = {}
        self.slots = torch.arange(n, device=x.device)
        self.keep = prefill_keep_counts(self.stages, n, self.policy.prefill_min_keep, self.policy.window)
        self.info.clear()
        self.info.update(tokens=n, lengths=[n], slots=[self.slots])
        return None

    def _on_end(self, module, args, output):
        self.active = False
        self.captured = {}
        return None

    def _on_attn(self, module, args, kwargs):
        if self.active:
            self.captured["cos_sin"] = kwargs["position_embeddings"]
            self.captured["scaling"] = getattr(module, "scaling", self.head_dim ** -0.5)
        return None

    def _capture(self, name):
        def hook(module, args, output):
            if self.active:
                self.captured[name] = output
            return None
        return hook

    def _scores(self) -> torch.Tensor:
        """``(m,)`` attention of the previous layer's last ``window`` queries, summed over queries/heads."""
        q, k = self.captured["q"], self.captured["k"]
        cos, sin = self.captured["cos_sin"]
        m = k.shape[1]
        w = min(self.policy.window, m)
        d = self.head_dim
        q = q[:, -w:].view(1, w, self.heads, d).transpose(1, 2)
        k = k.view(1, m, self.kv_heads, d).transpose(1, 2)
        q, _ = self.rope(q, q, cos[:, -w:], sin[:, -w:])
        _, k = self.rope(k, k, cos, sin)
        g = self.heads // self.kv_heads
        logits = torch.matmul(q.float().reshape(1, self.kv_heads, g * w, d), k.float().transpose(-1, -2))
        logits = logits.view(1, self.kv_heads, g, w, m) * self.captured["scaling"]
        causal = torch.arange(m, device=k.device)[None, :] <= torch.arange(m - w, m, device=k.device)[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
        return torch.softmax(logits, dim=-1).sum(dim=(0, 1, 2, 3))

    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            if not self.active:
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            m = hidden.shape[1]
            keep = self.keep[layer]
            new_args, new_kwargs = args, dict(kwargs)
            if keep < m:
                from tokprune.ops import select_tokens

                recent = torch.zeros(1, m, dtype=torch.bool, device=hidden.device)
                recent[:, m - min(self.policy.window, keep):] = True
                idx = select_tokens(self._scores()[None], keep, keep_mask=recent)[0].sort().values
                hidden = hidden.index_select(1, idx)
                if "hidden_states" in kwargs:
                    new_kwargs["hidden_states"] = hidden
                else:
                    new_args = (hidden,) + tuple(args[1:])
                cos, sin = kwargs["position_embeddings"]
                self.subs["position_embeddings"] = (cos.index_select(1, idx), sin.index_select(1, idx))
                pos = kwargs.get("position_ids")
                if torch.is_tensor(pos):
                    self.subs["position_ids"] = pos.index_select(-1, idx)
                am = kwargs.get("attention_mask")
                if torch.is_tensor(am) and am.dim() == 4:
                    self.subs["attention_mask"] = am.index_select(-2, idx).index_select(-1, idx)
                self.slots = self.slots.index_select(0, idx)
            for name, value in self.subs.items():
                if name in kwargs:
                    new_kwargs[name] = value
            self.info["lengths"].append(hidden.shape[1])
            self.info["slots"].append(self.slots)
            return new_args, new_kwargs
        return hook


def install_prefill_compression(model, policy, handle) -> None:
    """Install UNComp's prefill hidden-state compression on ``model`` for ``policy`` (a bound
    :class:`tokprune.methods.uncomp.UNComp`); the hooks are removed with ``handle``.

    After each prefill ``handle.info["prefill"]`` holds ``tokens`` (prompt length), ``lengths`` (tokens
    each layer ran on, ``L`` ints) and ``slots`` (per layer ``(m_l,)`` int64 original positions).
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager", "tokprune"):
        raise ValueError(f"UNComp(prefill_compression=True) supports sdpa/eager attention, got {impl!r}")
    _PrefillCompressor(model, policy, policy._state["stages"]).install(handle)


# ----------------------------------------------------------------------------------------------------------
# tokprune calibrate uncomp
# ----------------------------------------------------------------------------------------------------------
def calibrate_main(argv=None) -> int:
    """``tokprune calibrate uncomp --model smollm2 --text stdlib --tokens 1024 --threshold 1 --out s.json``."""
    parser = argparse.ArgumentParser(prog="tokprune calibrate uncomp",
                                     description="Per-layer hidden-state matrix entropy and UNComp's stage division.")
    from tokprune.models import add_calibration_arguments, load_calibration_inputs

    add_calibration_arguments(parser, tokens=1024)
    parser.add_argument("--threshold", type=float, default=1.0, help="profile drop opening a new stage (authors: 1)")
    args = parser.parse_args(argv)
    loaded = load_calibration_inputs(args)
    if loaded is None:
        return 2
    model, ids = loaded
    data = calibrate_stages(model, ids, threshold=args.threshold, name="SmolLM2-135M-Instruct",
                            meta=dict(text=args.text, command=f"tokprune calibrate uncomp --tokens {args.tokens} "
                                                              f"--threshold {args.threshold} --text {args.text}"))
    for i, (value, stage) in enumerate(zip(data["profile"], data["stages"])):
        print(f"  layer {i:3d}  entropy x L {value:8.3f}  stage {stage}")
    print(f"stages ({ids.shape[1]} tokens, threshold {args.threshold}): {data['stages']}")
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
        print(f"-> {args.out}")
    return 0


__all__ = ["layer_entropy_profile", "stage_division", "calibrate_stages", "resolve_stages", "shipped_stages",
           "split_weighted", "stage_weights", "layer_budgets", "prefill_keep_counts", "install_prefill_compression",
           "validate_options", "calibrate_main", "STAGES_FORMAT"]
