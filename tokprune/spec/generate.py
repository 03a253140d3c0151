"""Speculative generation on token trees for any Hugging Face causal LM.

One target forward per step on the whole draft tree (``tree_attention_mask`` + ``tree_positions`` +
a ``DynamicCache`` with preallocated, in-place layers), then lossless verification
(``verify_tree_greedy`` or ``verify_tree_stochastic``) and in-place compaction of the cache to the
accepted path. On the CPU (fp32), tree forwards run every ``nn.Linear`` on weights packed once for
oneDNN (see ``tokprune/spec/_linear.py``), and a model on SDPA attends without copying the cache into
repeated KV heads (``tokprune/spec/_attention.py``); the prefill runs the model unchanged.

Batches: every row advances by its OWN accepted length. The cache stays rectangular: a step appends
``max_b(accept_len[b]) + 1`` slots to every row; the slots a row did not accept are holes that later
queries never attend to (explicit masks and per-row position ids make this exact). Rows that finish
(EOS or ``max_new_tokens``) leave the batch. Greedy output is token-identical to
``model.generate(do_sample=False)`` up to floating-point ties.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from tokprune.spec import _kv
from tokprune.spec.drafters import DraftContext, Drafter


@dataclass
class SpecStats:
    """Counters of one :func:`generate` call.

    Attributes:
        target_forwards: target forwards on draft trees (the prefill is not counted).
        row_steps: sum over those forwards of the number of rows still generating.
        accepted_draft_tokens: draft tokens accepted, summed over rows and steps.
        new_tokens: tokens emitted (prefill token, accepted drafts and bonus tokens; after EOS /
            length truncation), summed over rows.
        draft_forwards: forwards of the draft model (0 for Token Recycling).
        tree_nodes: nodes per tree of the last step.
    """

    target_forwards: int = 0
    row_steps: int = 0
    accepted_draft_tokens: int = 0
    new_tokens: int = 0
    draft_forwards: int = 0
    tree_nodes: int = 0
    accept_lens: List[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens produced per row per target tree forward (accepted drafts + bonus)."""
        return (self.accepted_draft_tokens + self.row_steps) / max(self.row_steps, 1)

    @property
    def mean_accept_len(self) -> float:
        """Mean accepted draft tokens per row per target forward."""
        return self.accepted_draft_tokens / max(self.row_steps, 1)


def _as_eos_set(eos_token_id) -> List[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    if isinstance(eos_token_id, torch.Tensor):
        return [int(x) for x in eos_token_id.flatten().tolist()]
    return [int(x) for x in eos_token_id]


def _first_token(logits: torch.Tensor, do_sample: bool, temperature, top_k, top_p, generator) -> torch.Tensor:
    if not do_sample:
        return logits.float().argmax(-1)
    probs = _kv.warp(logits, True, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_UNSET = object()


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    drafter: Drafter,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Union[None, int, Sequence[int], object] = _UNSET,
    pad_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_stats: bool = False,
    packed_weights: Optional[bool] = None,
    fold_gqa: bool = True,
) -> Union[torch.Tensor, Tuple[torch.Tensor, SpecStats]]:
    """Speculative decoding of a Hugging Face causal LM with a draft token tree per step.

    Args:
        model: target ``*ForCausalLM`` (Llama, Qwen2, ... with ``DynamicCache``, sdpa or eager attention).
        input_ids: ``[B, L]`` int64 prompts, LEFT padded when rows differ in length.
        drafter: a :class:`~tokprune.spec.drafters.Drafter` (Token Recycling, draft model, layer skip).
        max_new_tokens: maximum number of new tokens per row (``>= 0``).
        do_sample: ``False``: greedy (verification by ``verify_tree_greedy``; token-identical to
            ``model.generate(do_sample=False)``); ``True``: sampling with lossless stochastic
            verification under the drafter's rule.
        temperature, top_k, top_p: sampling distribution of the target (and of the draft).
        eos_token_id: int or list; rows stop after emitting one. Default: the model's
            ``generation_config.eos_token_id`` (like ``model.generate``); ``None`` disables EOS.
        pad_token_id: fills rows that stopped early; default ``generation_config.pad_token_id``, else
            the first EOS id, else 0.
        attention_mask: ``[B, L]`` 1 for real tokens, 0 for (left) padding.
        generator: ``torch.Generator`` for every random draw (first token, drafting, verification).
        return_stats: also return a :class:`SpecStats` (target forwards, accepted draft tokens, tokens
            per forward, ...).
        packed_weights: run tree forwards of up to 16 nodes on the small-M host kernel of ``tokprune._C``
            and larger ones on oneDNN-packed weights (packed on first use: one extra copy of the model's
            linear weights, kept until ``tokprune.spec.release_packed(model)``). ``None`` (default): on when
            the model is fp32 on the CPU. Outputs differ from the unpacked path by float rounding only.
        fold_gqa: when the model's attention is ``"sdpa"``, tree forwards fold the query heads of each KV
            head into the query dimension instead of copying the cache into repeated heads
            (``tokprune/spec/_attention.py``); the prefill is unchanged. Float rounding only.

    Returns:
        ``[B, L + T]`` int64 (``T`` = new tokens of the longest row), or ``(ids, stats)``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a [B, L] int tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature!r}")
    if not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must be a tokprune.spec Drafter, got {type(drafter).__name__}")
    input_ids = input_ids.long()
    bsz, plen = input_ids.shape
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("every row of attention_mask needs at least one real token")
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is _UNSET:
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    eos = _as_eos_set(eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    stats = SpecStats()
    out = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
    if max_new_tokens == 0:
        result = input_ids.clone()
        return (result, stats) if return_stats else result

    # prefill (model's own causal + padding mask, like model.generate)
    cache = _kv.new_cache(model)
    want_all = bool(getattr(drafter, "needs_prompt_logits", False))
    logits = _kv.forward_prompt(model, cache, input_ids, attention_mask, logits_to_keep=None if want_all else 1)
    vocab = logits.shape[-1]
    root = _first_token(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
    ctx = DraftContext(model=model, input_ids=input_ids, attention_mask=attention_mask, vocab_size=vocab,
                       prompt_logits=logits if want_all else None, do_sample=do_sample, temperature=temperature,
                       top_k=top_k, top_p=top_p, generator=generator)
    del logits
    drafter.begin(ctx)
    from tokprune.spec._attention import tree_attention
    from tokprune.spec._linear import packed_linears

    use_packed = packed_weights if packed_weights is not None else True
    with packed_linears(model, enabled=bool(use_packed)), tree_attention(model, enabled=bool(fold_gqa)):
        lengths = _decode_loop(model, cache, drafter, root, input_ids, attention_mask, out, stats, eos,
                               max_new_tokens, do_sample, temperature, top_k, top_p, generator)
    stats.draft_forwards = int(getattr(drafter, "draft_forwards", 0))
    result = torch.cat([input_ids, out[:, :int(lengths.max())]], 1)
    return (result, stats) if return_stats else result


def _decode_loop(model, cache, drafter, root, input_ids, attention_mask, out, stats, eos, max_new_tokens,
                 do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    """The speculative steps after the prefill; fills ``out``/``stats``, returns ``[B]`` new lengths."""
    from tokprune.ops.spec import tree_attention_mask, tree_positions, verify_tree_greedy, verify_tree_stochastic

    bsz, dev = input_ids.shape[0], input_ids.device
    lengths = torch.zeros(bsz, dtype=torch.long, device=dev)
    rows = torch.arange(bsz, device=dev)  # batch slot -> original row
    valid = attention_mask.bool()
    n_valid = attention_mask.long().sum(-1)
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev) if eos else None

    def emit(tokens: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Write ``tokens[j, :count[j]]`` after each active row's output; returns finished flags."""
        width = tokens.shape[1]
        col = torch.arange(width, device=dev).view(1, -1)
        use = col < count.view(-1, 1)
        if eos_t is not None:
            is_eos = torch.isin(tokens, eos_t) & use
            first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(count, width))
            use &= col <= first.view(-1, 1)
            hit_eos = first < width
        else:
            hit_eos = torch.zeros_like(count, dtype=torch.bool)
        start = lengths[rows]
        dest = start.view(-1, 1) + col
        use &= dest < max_new_tokens
        r_idx = rows.view(-1, 1).expand_as(dest)[use]
        out[r_idx, dest[use]] = tokens[use]
        n = use.sum(1)
        lengths[rows] = start + n
        stats.new_tokens += int(n.sum())
        return hit_eos | (lengths[rows] >= max_new_tokens)

    finished = emit(root.view(-1, 1), torch.ones_like(root))
    while True:
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows, root, valid, n_valid = rows[keep], root[keep], valid[keep], n_valid[keep]
            _kv.select_batch(cache, keep)
            drafter.select_rows(keep)
        tree = drafter.propose(root)
        parents, tokens = tree.parents, tree.tokens
        t_len = valid.shape[1]
        mask = tree_attention_mask(parents, t_len, _kv.model_dtype(model), prefix_mask=valid)
        positions = tree_positions(parents, n_valid)
        kwargs = {_kv._cache_kwarg(model): cache, "use_cache": True}
        target_logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, **kwargs).logits
        stats.target_forwards += 1
        stats.row_steps += int(rows.numel())
        stats.tree_nodes = int(tokens.shape[1])
        if do_sample:
            draft_probs = tree.draft_probs if tree.rule != "target_only" else None
            accept_index, accept_len, next_token = verify_tree_stochastic(
                tokens, parents, None, draft_probs, rule=tree.rule, target_logits=target_logits,
                temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        else:
            accept_index, accept_len, next_token = verify_tree_greedy(tokens, parents, target_logits)
        # keep the root and the accepted nodes of every row; shorter rows leave holes
        width = int(accept_len.max()) + 1
        keep_idx = accept_index[:, :width]
        _kv.keep_tail_rows(cache, t_len, keep_idx.clamp_min(0))
        valid = torch.cat([valid, keep_idx >= 0], 1)
        n_valid = n_valid + accept_len + 1
        drafter.commit(tree, target_logits, accept_index, accept_len, next_token)
        stats.accepted_draft_tokens += int(accept_len.sum())
        stats.accept_lens.extend(accept_len.tolist())
        # emitted this step: accepted draft tokens, then the bonus token
        path_tok = tokens.gather(1, keep_idx[:, 1:].clamp_min(0))
        new = torch.cat([path_tok, torch.zeros_like(next_token).view(-1, 1)], 1)
        new.scatter_(1, accept_len.view(-1, 1), next_token.view(-1, 1))
        finished = emit(new, accept_len + 1)
        root = next_token
    return lengths
