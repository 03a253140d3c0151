"""Token sparse attention as a prefill policy (:class:`tokprune.methods.base.PrefillPolicy`).

    from tokprune.methods.base import patch
    from tokprune.methods.token_sparse import TokenSparseAttention

    with TokenSparseAttention(keep=0.25, layers="profile").patch(model):    # or patch(model, ts, FASA(...))
        logits = model(input_ids).logits

Each patched layer and head re-scores and re-selects its tokens on every call (interleaved
selection): a token skipped by one layer is seen again by the next, nothing is evicted from the KV
cache (the cache keeps every token's keys and values, so decoding is unaffected). It composes with a
decode policy: ``patch(model, TokenSparseAttention(), FASA(...))``.

Which layers (``layers``):

* ``"profile"``: the paper's rule. A calibration pass measures each layer's hidden-state drift
  ``mean_t ||h_out - h_in|| / ||h_in||`` (:func:`layer_drift`); layers whose normalised drift is at most
  the ``delta`` quantile (``delta = 0.5``) are sparse (:func:`sparse_layers_from_drift`). Profiles are
  JSON files written by ``tokprune calibrate token-sparse``; the one for SmolLM2-135M ships in
  ``tokprune/data/``. ``profile=`` names another file.
* ``"second_half"``: layers ``L // 2 .. L - 1`` (tokprune's earlier default; not the paper's rule).
* a list of layer indices, or ``None`` (every layer).

How many tokens: ``keep`` (a fraction or a count: tokprune's explicit budget) or ``keep=None, tau=``
(the paper's coverage count, one per layer call: :func:`tokprune.ops.token_sparse.coverage_keep_count`).

The policy declines (returns ``None`` so SDPA runs, exactly dense) when

* the call is a decode step (``q_len == 1``) or a prefill chunk on top of a cache (``q_len != kv_len``);
* the layer is not a sparse layer;
* the sequence is shorter than ``min_tokens`` (default :data:`MIN_TOKENS`: the shortest measured length
  at which one layer's token sparse attention beats dense SDPA on a CPU, see README), or the budget
  keeps every token;
* the attention mask is not "causal + key padding" (e.g. sliding window or packed sequences), or the
  model uses attention sinks (``s_aux``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from tokprune.methods.base import PrefillPolicy, check_int
from tokprune.ops.token_sparse import resolve_keep, token_sparse_attention

PROFILE_FORMAT = "tokprune-token-sparse-profile-v1"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Prompt length below which the policy declines (dense SDPA). Measured rule: the whole model differs from
# dense only in the sparse layers' attention, so the model is never slower than dense where one layer's
# token sparse attention (scores + selection + gathers + SDPA on the kept tokens + scatter, keep=0.25,
# window 128, SmolLM2 head shapes) is faster than dense SDPA. `tokprune bench token-sparse --tokens ...
# --rounds 7 --threads 1` (interleaved CPU-time medians): 0.47x at 256 tokens, 1.18x at 384, 1.83x at 512
# and more above (README); 512 keeps a margin over the crossover.
MIN_TOKENS = 512
PAPER_TAU = 0.005
_MATCH_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads")


# ----------------------------------------------------------------------------------------------------------
# Layer profile (the paper's sparse-layer rule)
# ----------------------------------------------------------------------------------------------------------
def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layer stack (model.model.layers)")
    return layers


@torch.no_grad()
def layer_drift(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> List[float]:
    """Hidden-state drift of every decoder layer on one forward pass.

    ``drift[l] = mean over real tokens t (and rows) of ||h_out[t] - h_in[t]||_2 / (||h_in[t]||_2 + 1e-8)``
    with ``h_in``/``h_out`` the input/output of decoder layer ``l`` (before the final norm), in float32.

    Args:
        model: a transformers causal LM with ``model.model.layers``.
        input_ids: ``(batch, n_tokens)`` int64.
        attention_mask: optional ``(batch, n_tokens)`` 0/1 (padding excluded from the mean).

    Returns:
        ``num_layers`` floats.
    """
    layers = _decoder_layers(model)
    sums: List[Optional[torch.Tensor]] = [None] * len(layers)
    inputs: Dict[int, torch.Tensor] = {}
    valid = None if attention_mask is None else attention_mask.bool()

    def pre(i):
        def hook(module, args, kwargs):
            inputs[i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).float()
        return hook

    def post(i):
        def hook(module, args, output):
            h_out = (output[0] if isinstance(output, tuple) else output).float()
            h_in = inputs.pop(i)
            ratio = (h_out - h_in).norm(dim=-1) / (h_in.norm(dim=-1) + 1e-8)  # (B, N)
            sums[i] = ratio[valid].mean() if valid is not None else ratio.mean()
        return hook

    hooks = []
    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
            hooks.append(layer.register_forward_hook(post(i)))
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [float(s) for s in sums]


def sparse_layers_from_drift(drift: Sequence[float], delta: float = 0.5) -> List[int]:
    """The paper's sparse layers: drift normalised to sum 1, threshold = its ``delta`` quantile (linear
    interpolation, as ``torch.quantile``), layers with normalised drift ``<= threshold``, ascending."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1] (a quantile of the layer drift), got {delta!r}")
    values = torch.tensor(list(drift), dtype=torch.float64)
    if values.numel() == 0:
        raise ValueError("drift is empty")
    norm = values / values.sum()
    threshold = torch.quantile(norm, delta)
    return [i for i in range(norm.numel()) if bool(norm[i] <= threshold)]


def _config_of(model_or_config) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "text_config", None) or config


def model_signature(model_or_config) -> Dict[str, Any]:
    """The config fields a profile must match: ``model_type``, layers, hidden size, heads."""
    config = _config_of(model_or_config)
    return {key: getattr(config, key, None) for key in _MATCH_KEYS}


def calibrate_profile(model, input_ids: torch.Tensor, *, delta: float = 0.5, name: str = "",
                      attention_mask: Optional[torch.Tensor] = None, meta: Optional[dict] = None) -> dict:
    """Profile ``model`` on ``input_ids`` (:func:`layer_drift`) and pick its sparse layers
    (:func:`sparse_layers_from_drift`); returns the JSON-ready profile dict."""
    drift = layer_drift(model, input_ids, attention_mask)
    total = sum(drift)
    return dict(format=PROFILE_FORMAT, model=name, **model_signature(model), delta=delta,
                calibration_tokens=int(input_ids.shape[-1]), drift=drift,
                drift_normalized=[d / total for d in drift],
                sparse_layers=sparse_layers_from_drift(drift, delta), **(meta or {}))


def load_profile(path: Union[str, Path]) -> dict:
    """Read a ``tokprune calibrate token-sparse`` JSON profile (``ValueError`` if it is not one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token-sparse profile {path} does not exist "
                                f"(create it with: tokprune calibrate token-sparse --out {path})")
    profile = json.loads(path.read_text())
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path} is not a token-sparse profile (expected format={PROFILE_FORMAT!r})")
    return profile


def shipped_profiles() -> List[Path]:
    """Profiles shipped with tokprune (``tokprune/data/token_sparse_*.json``)."""
    return sorted(DATA_DIR.glob("token_sparse_*.json"))


def profile_layers(model_or_config, profile: Union[None, str, Path] = None) -> List[int]:
    """Sparse layers for a model from ``profile`` (a path) or from the shipped profile matching it.

    Raises:
        ValueError: the profile was made for another model (layers / width / heads / type differ), or no
            shipped profile matches (run ``tokprune calibrate token-sparse``).
    """
    want = model_signature(model_or_config)
    if profile is not None:
        data = load_profile(profile)
        got = {key: data.get(key) for key in _MATCH_KEYS}
        if got != want:
            raise ValueError(f"token-sparse profile {profile} was made for {got}, the model is {want}")
        return list(data["sparse_layers"])
    for path in shipped_profiles():
        data = load_profile(path)
        if {key: data.get(key) for key in _MATCH_KEYS} == want:
            return list(data["sparse_layers"])
    raise ValueError(f"layers='profile': no shipped token-sparse profile matches this model ({want}); run "
                     "`tokprune calibrate token-sparse --out profile.json` and pass profile='profile.json'")


# ----------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TokenSparseAttention(PrefillPolicy):
    """Prefill policy: per-head token selection -> compressed dense attention -> scatter back.

    Attributes:
        keep: fraction of tokens kept per head in ``(0, 1]`` or a count; ``None``: the coverage rule
            with ``tau``.
        tau: coverage threshold for ``keep=None`` (default then :data:`PAPER_TAU` = 0.005, the paper's).
        layers: ``"second_half"`` (default; layers ``L // 2 ..``), ``"profile"`` (the paper's drift rule,
            from ``profile`` or the shipped profile of the model), a list of layer indices, or ``None``
            (every patched layer).
        profile: path of a ``tokprune calibrate token-sparse`` profile for ``layers="profile"``.
        min_tokens: sequences shorter than this are left to SDPA; also a floor on the kept count
            (window included). Default :data:`MIN_TOKENS` (measured); the paper's is 1024 + window.
        window: observation window of the scoring rule and always-kept recent tokens (paper: 128).
        kernel_size: pooling width of the scores (paper: 7).
        backend: gather/scatter backend (``None``: automatic).
    """

    keep: Union[None, float, int] = 0.25
    layers: Union[None, str, Sequence[int]] = "second_half"
    min_tokens: int = MIN_TOKENS
    window: int = 128
    kernel_size: int = 7
    tau: Optional[float] = None
    profile: Optional[str] = None
    backend: Optional[str] = None
    calls: int = field(default=0, init=False, repr=False, compare=False)  # sparse calls made (not declined)
    _resolved: Dict[int, Optional[frozenset]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.keep is None:
            self.tau = PAPER_TAU if self.tau is None else self.tau
            if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau < 1.0:
                raise ValueError(f"tau must be a float in [0, 1) (coverage threshold; paper: 0.005), got {self.tau!r}")
        elif self.tau is not None:
            raise ValueError(f"keep={self.keep!r} and tau={self.tau!r} both given: set keep=None to use the coverage "
                             "threshold tau")
        elif isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or \
                (isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0) or \
                (isinstance(self.keep, int) and self.keep < 1):
            raise ValueError(f"keep must be a float in (0, 1], a positive int, or None (with tau), got {self.keep!r}")
        check_int(self, "min_tokens", self.min_tokens)
        check_int(self, "window", self.window, minimum=1)
        if isinstance(self.layers, str):
            if self.layers not in ("second_half", "profile"):
                raise ValueError(f"layers must be None, 'second_half', 'profile' or a list of layer indices, "
                                 f"got {self.layers!r}")
        elif self.layers is not None:
            self.layers = frozenset(int(i) for i in self.layers)
        if self.profile is not None and self.layers != "profile":
            raise ValueError(f"profile={self.profile!r} is used by layers='profile' only (layers={self.layers!r})")

    # ------------------------------------------------------------------------------------------ layers
    def sparse_layers(self, model_or_config) -> Optional[frozenset]:
        """The layer indices this policy makes sparse on a model (``None``: every layer)."""
        config = _config_of(model_or_config)
        key = id(config)
        if key not in self._resolved:
            n_layers = config.num_hidden_layers
            if self.layers == "second_half":
                chosen = frozenset(range(n_layers // 2, n_layers))
            elif self.layers == "profile":
                chosen = frozenset(profile_layers(config, self.profile))
            else:
                chosen = self.layers
            self._resolved[key] = chosen
        return self._resolved[key]

    def bind(self, model) -> None:
        """Resolve ``layers`` for ``model`` now (a missing / mismatched profile raises at patch time)."""
        if self.layers in ("second_half", "profile"):
            self.sparse_layers(model)

    def applies(self, layer_idx: Optional[int], q_len: int, kv_len: int, n_layers: Optional[int] = None,
                config: Any = None) -> bool:
        """Whether a call with these lengths in this layer is handled (not left to SDPA)."""
        if q_len <= 1 or q_len != kv_len or q_len < max(self.min_tokens, 2):
            return False
        if isinstance(self.layers, str):
            if config is None and n_layers is not None and self.layers == "second_half":
                if layer_idx is None or layer_idx < n_layers // 2:
                    return False
            elif config is not None and layer_idx not in self.sparse_layers(config):
                return False
        elif self.layers is not None and layer_idx not in self.layers:
            return False
        if self.keep is None:
            return q_len > min(self.window, q_len)
        if isinstance(self.keep, int):
            return self.keep < q_len
        return resolve_keep(self.keep, q_len) < q_len

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """HF attention call -> ``(batch, q_len, heads, head_dim)``, or ``None`` to decline."""
        if kwargs.get("s_aux") is not None or kwargs.get("sliding_window"):
            return None
        config = getattr(module, "config", None)
        if not self.applies(getattr(module, "layer_idx", None), query.shape[2], key.shape[2], config=config):
            return None
        padding = key_padding_from_mask(attention_mask, query.shape[0], key.shape[2])
        if padding is False:
            return None
        out = token_sparse_attention(query, key, value, keep=self.keep, tau=self.tau, causal=True,
                                     min_tokens=self.min_tokens, window=self.window,
                                     kernel_size=self.kernel_size, scale=scaling, key_padding_mask=padding,
                                     backend=self.backend)
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


# ----------------------------------------------------------------------------------------------------------
# tokprune calibrate token-sparse
# ----------------------------------------------------------------------------------------------------------
def calibrate_main(argv=None) -> int:
    """``tokprune calibrate token-sparse --model smollm2 --text stdlib --tokens 2048 --delta 0.5 --out p.json``."""
    parser = argparse.ArgumentParser(prog="tokprune calibrate token-sparse",
                                     description="Profile per-layer hidden-state drift and pick the sparse layers "
                                                 "(delta quantile rule of Token Sparse Attention).")
    from tokprune.models import add_calibration_arguments, load_calibration_inputs

    add_calibration_arguments(parser, tokens=2048)
    parser.add_argument("--delta", type=float, default=0.5, help="drift quantile (paper: 0.5)")
    args = parser.parse_args(argv)
    loaded = load_calibration_inputs(args)
    if loaded is None:
        return 2
    model, ids = loaded
    profile = calibrate_profile(model, ids, delta=args.delta, name="SmolLM2-135M-Instruct",
                                meta=dict(text=args.text,
                                          command=f"tokprune calibrate token-sparse --tokens {args.tokens} "
                                                  f"--delta {args.delta} --text {args.text}"))
    for i, (raw, norm) in enumerate(zip(profile["drift"], profile["drift_normalized"])):
        mark = "  sparse" if i in profile["sparse_layers"] else ""
        print(f"  layer {i:3d}  drift {raw:.4f}  normalised {norm:.4f}{mark}")
    print(f"sparse layers (delta={args.delta}, {ids.shape[1]} tokens): {profile['sparse_layers']}")
    if args.out:
        Path(args.out).write_text(json.dumps(profile, indent=1) + "\n")
        print(f"-> {args.out}")
    return 0


__all__ = ["TokenSparseAttention", "key_padding_from_mask", "layer_drift", "sparse_layers_from_drift",
           "calibrate_profile", "load_profile", "profile_layers", "model_signature", "shipped_profiles",
           "MIN_TOKENS", "PAPER_TAU"]
