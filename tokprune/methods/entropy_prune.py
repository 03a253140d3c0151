"""EntropyPrune: keep the visual tokens with the largest matrix-entropy information value.

Per visual token ``t`` the score is the matrix entropy of its post-RoPE query at layer ``K-1`` seen as an
``(H, d_h)`` matrix (heads x head dim): centre across heads, ``G_t = Z_t Z_tᵀ / H`` (the small ``H x H``
dual of the ``d_h x d_h`` covariance), ``S_t = -Σ λ log λ / log H`` with eigenvalues clamped to 1e-10,
in float64 (:func:`tokprune.ops.token_information_scores`). ``normalize=False`` is the released code
(the score grows with the token's norm); ``normalize=True`` divides ``G_t`` by its trace first, so the
eigenvalues form a distribution and ``S_t`` lies in ``[0, 1]``.

``layer="auto"`` picks the entropy-collapse layer from a calibration pass
(:func:`find_collapse_layer`): the matrix entropy of the visual-token hidden states entering each layer,
and the layer right after the sharpest drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from tokprune.methods.base import VisualPolicy


def token_scores(q: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """EntropyPrune information value of each token: ``q (B, N, H, d_h)`` -> ``(B, N)`` float32
    (:func:`tokprune.ops.token_information_scores`; ``normalize`` = trace-normalised eigenvalues)."""
    from tokprune.ops import token_information_scores

    return token_information_scores(q, exact_reference=not normalize)


def matrix_entropy_of(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, D) -> (B,)`` matrix entropy of token rows (:func:`tokprune.ops.matrix_entropy` defaults:
    centred, L2-normalised rows, trace-normalised spectrum, divided by ``log min(N, D)``)."""
    from tokprune.ops import matrix_entropy

    return matrix_entropy(x)


@torch.no_grad()
def visual_entropy_curve(model, **inputs) -> List[float]:
    """Matrix entropy of the visual-token hidden states entering each language-model layer.

    Args:
        model: a Llava / Qwen2-VL model; ``inputs``: its forward inputs (``input_ids`` required).

    Returns:
        ``num_layers + 1`` floats: entry ``l < L`` is the input of layer ``l`` (``0`` = embeddings), the last
        is the output of the last layer. Rows of a batch are averaged; padding never counts.
    """
    from tokprune.hf.vlm import language_model, visual_token_ids

    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("visual_entropy_curve needs input_ids to locate the visual tokens")
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in visual_token_ids(model):
        visual |= input_ids == token
    if not bool(visual.any()):
        raise ValueError("visual_entropy_curve: the inputs contain no visual tokens")
    _, lm = language_model(model)
    states: List[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, k: states.append(k["hidden_states"] if "hidden_states" in k else a[0]), with_kwargs=True)
        for layer in lm.layers]
    hooks.append(lm.layers[-1].register_forward_hook(lambda m, a, out: states.append(
        out[0] if isinstance(out, tuple) else out)))
    try:
        model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    curve = []
    for h in states:
        per_row = [matrix_entropy_of(h[b][visual[b]][None].float()) for b in range(h.shape[0]) if visual[b].any()]
        curve.append(float(torch.cat(per_row).mean()))
    return curve


def collapse_layer(curve: List[float]) -> int:
    """Layer right after the sharpest entropy drop: ``argmax_l (curve[l-1] - curve[l])`` over
    ``1 <= l <= L-1`` (``curve`` has ``L + 1`` entries as returned by :func:`visual_entropy_curve`)."""
    n_layers = len(curve) - 1
    if n_layers < 2:
        raise ValueError(f"need at least 2 layers to find a collapse layer, got a curve of {len(curve)} values")
    drops = torch.tensor([curve[l - 1] - curve[l] for l in range(1, n_layers)])
    return int(torch.argmax(drops)) + 1


def find_collapse_layer(model, **inputs) -> Tuple[int, List[float]]:
    """Calibration pass for ``EntropyPrune(layer="auto")``: ``(layer, curve)`` from
    :func:`visual_entropy_curve` and :func:`collapse_layer`."""
    curve = visual_entropy_curve(model, **inputs)
    return collapse_layer(curve), curve


def flops_matched_keep(average: int, n_visual: int, n_layers: int, layer: int) -> int:
    """Tokens to keep from ``layer`` on so that the layer-average visual token count equals ``average``:
    ``floor((L * average - K * N) / (L - K))`` clamped to ``[0, N]`` (LLaVA-1.5: 192/128/64 -> 166/98/29
    for ``N=576, L=32, K=2``)."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must lie in [0, {n_layers}), got {layer}")
    value = (n_layers * average - layer * n_visual) // (n_layers - layer)
    return int(min(max(value, 0), n_visual))


@dataclass
class EntropyPrune(VisualPolicy):
    """Keep the ``keep`` visual tokens with the largest query matrix entropy (EntropyPrune).

    Args:
        keep: visual tokens kept per row (``>= 0``).
        layer: pruning layer ``K`` (``>= 1``; the paper uses 2 for LLaVA-1.5/1.6, 1 for Qwen2.5-VL) or
            ``"auto"`` (entropy-collapse layer from a calibration pass, see :func:`find_collapse_layer`).
        normalize: trace-normalise each token's Gram matrix (``False`` = the released code).
    """

    keep: int = 128
    layer: Union[int, str] = 2
    normalize: bool = False
    needs_query = True

    def resolve_layer(self, model: Any, calibration: Optional[Dict[str, Any]] = None) -> int:
        """The pruning layer for ``model``: ``layer`` when it is an int, else (``"auto"``) the entropy-collapse
        layer of a calibration pass on ``calibration`` (the model's forward inputs; ``input_ids`` required).

        Raises:
            ValueError: ``layer="auto"`` without ``calibration``.
        """
        if self.layer != "auto":
            return super().resolve_layer(model, calibration)
        if calibration is None:
            raise ValueError("layer='auto' needs calibration=dict(input_ids=..., pixel_values=..., ...) "
                             "to find the entropy-collapse layer")
        layer, _ = find_collapse_layer(model, **calibration)
        return layer

    def score(self, ctx) -> torch.Tensor:
        """``(B, N)`` float32 information value of the visual tokens from layer ``K-1``'s post-RoPE
        queries (other positions get 0: they are always kept, only visual tokens compete)."""
        q = ctx.query()
        visual = ctx.visual_mask
        scores = torch.zeros(visual.shape, dtype=torch.float32, device=q.device)
        if bool(visual.any()):
            scores[visual] = token_scores(q[visual][None], normalize=self.normalize)[0]
        return scores
