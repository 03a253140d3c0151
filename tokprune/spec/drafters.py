"""Drafters: they propose a token tree for every generation step and learn from the verification.

* :class:`TokenRecyclingDrafter` -- needs only the target: an adjacency matrix ``[vocab, k]`` of the
  target's past top-k candidates, a static tree template filled breadth-first (Token Recycling).
* :class:`DraftModelDrafter` -- any small Hugging Face causal LM with the target's vocabulary; its own
  ``DynamicCache``; trees grown by DySpec greedy expansion (``tree="dyspec"``), Gumbel-top-k without
  replacement with a constant branching factor (``"rsd"``, RSD-C), stochastic beam search (``"rsd_s"``,
  RSD-S), sampling with replacement (``"specinfer"``) or deterministic top-k (``"topk"``).
* :class:`LayerSkipDrafter` -- a :class:`DraftModelDrafter` whose draft model is the target's first
  ``k`` decoder layers + its final norm and LM head (weights shared, own KV cache).

Protocol used by :func:`tokprune.spec.generate` (one instance may be reused across calls)::

    drafter.begin(ctx)                 # after the target's prefill
    tree = drafter.propose(root)       # root [B] = last verified token, not yet in the target cache
    drafter.commit(tree, target_logits, accept_index, accept_len, next_token)
    drafter.select_rows(rows)          # finished rows left the batch
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tokprune.spec import _kv
from tokprune.ops.spec import tree_positions
from tokprune.spec.trees import (DraftTree, RecyclingTemplate, ancestor_matrix, beam_tree, dyspec_tree,
                                 init_adjacency, named_template, recycling_template, sampled_tree,
                                 token_recycling_tree, update_adjacency)


@dataclass
class DraftContext:
    """What a drafter learns at :meth:`Drafter.begin`.

    Attributes:
        model: the target model.
        input_ids: ``[B, L]`` prompt (left padded).
        attention_mask: ``[B, L]`` 1 for real tokens.
        vocab_size: size of the target's logits.
        prompt_logits: ``[B, L, V]`` target logits over the prompt, when the drafter asked for them
            (``needs_prompt_logits``), else ``None``.
        do_sample, temperature, top_k, top_p: the decoding configuration.
        generator: ``torch.Generator`` for drafting draws.
    """

    model: object
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vocab_size: int
    prompt_logits: Optional[torch.Tensor] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None


class Drafter:
    """Base class; see the module docstring for the protocol."""

    needs_prompt_logits: bool = False
    draft_forwards: int = 0

    def begin(self, ctx: DraftContext) -> None:
        raise NotImplementedError

    def propose(self, root: torch.Tensor) -> DraftTree:
        raise NotImplementedError

    def commit(self, tree: DraftTree, target_logits: torch.Tensor, accept_index: torch.Tensor,
               accept_len: torch.Tensor, next_token: torch.Tensor) -> None:
        pass

    def select_rows(self, rows: torch.Tensor) -> None:
        pass


class TokenRecyclingDrafter(Drafter):
    """Token Recycling (Luo et al., 2024): no draft model.

    Keeps ``adjacency [vocab, k]``: row ``t`` holds the top-``k`` tokens the target predicted the last
    time it saw ``t``. Each step fills a static tree template breadth-first from the root, and after
    verification rewrites the rows of every token in the tree with the top-``k`` of the target logits
    at that node.

    Modes (``prompt_fill``):

    * ``False`` (default, the paper's): the matrix starts empty and then persists across
      :func:`~tokprune.spec.generate` calls of this drafter ("hot start"); the prompt's logits are not
      used (the prefill computes the last position's logits only).
    * ``True`` (tokprune's addition): the rows of the prompt's tokens are also filled from the target's
      logits over the prompt at prefill (one LM-head pass over the prompt), which helps a cold matrix.

    Args:
        k: candidates per token (the paper: 8).
        template: ``"auto"`` (default: the tree the measured cost model of :mod:`tokprune.spec.cost`
            picks for this model and device at the first call: the paper's template on GPUs, the size
            maximising expected tokens/s on a CPU), ``"paper"`` (the paper's 81-node "2.2.2" tree, needs
            ``k >= 8``), a :class:`RecyclingTemplate`, or ``None`` to build one of ``budget`` nodes with
            :func:`~tokprune.spec.trees.recycling_template`.
        budget: tree nodes including the root when ``template=None``.
        max_depth: deepest level when ``template=None``.
        prompt_fill: see above.
    """

    def __init__(self, k: int = 8, budget: Optional[int] = None, max_depth: int = 8,
                 template="auto", prompt_fill: bool = False):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        if budget is not None and template == "auto":
            template = None
        if template is None:
            template = recycling_template(24 if budget is None else budget, k, max_depth=max_depth)
        elif isinstance(template, str) and template != "auto":
            template = named_template(template)
        elif not isinstance(template, (str, RecyclingTemplate)):
            raise TypeError(f"template must be 'auto', 'paper', a RecyclingTemplate or None, got "
                            f"{type(template).__name__}")
        if isinstance(template, RecyclingTemplate) and template.num_nodes > 1 \
                and int(template.ranks[1:].max()) >= k:
            raise ValueError(f"the template uses rank {int(template.ranks[1:].max())}; it needs k > that, got k={k}")
        self.template = template
        self.prompt_fill = bool(prompt_fill)
        self.needs_prompt_logits = self.prompt_fill
        self.adjacency: Optional[torch.Tensor] = None

    def reset(self) -> None:
        """Forget the adjacency matrix (the next call starts cold)."""
        self.adjacency = None

    def begin(self, ctx: DraftContext) -> None:
        if self.template == "auto":
            from tokprune.spec.cost import choose_recycling_template

            self.template = choose_recycling_template(ctx.model, k=self.k)
        if self.adjacency is None or self.adjacency.shape[0] != ctx.vocab_size \
                or self.adjacency.device != ctx.input_ids.device:
            self.adjacency = init_adjacency(ctx.vocab_size, self.k, device=ctx.input_ids.device)
        if self.prompt_fill and ctx.prompt_logits is not None:
            update_adjacency(self.adjacency, ctx.input_ids, ctx.prompt_logits, mask=ctx.attention_mask.bool())

    def propose(self, root: torch.Tensor) -> DraftTree:
        return token_recycling_tree(root, self.adjacency, self.template)

    def commit(self, tree, target_logits, accept_index, accept_len, next_token) -> None:
        update_adjacency(self.adjacency, tree.tokens, target_logits, mask=tree.active())


TREES = ("dyspec", "rsd", "rsd_s", "specinfer", "topk")


class DraftModelDrafter(Drafter):
    """Trees drafted by a small causal LM sharing the target's vocabulary.

    The draft keeps its own ``DynamicCache`` of the verified sequence. Each step it feeds, in one
    forward, the tokens accepted at the previous step plus the new root (rows of different lengths are
    right-padded; the padding slots are holes), then grows the tree, feeding the nodes it expands with a
    tree mask; after verification the tree slots are cropped away.

    DySpec expansion: the default adds ``width=4`` nodes per draft forward (4x fewer draft forwards;
    the tree can differ from the exact greedy one); ``exact=True`` (or ``width=1``) adds one node per
    draft forward, the paper's exact greedy node-by-node expansion.

    Args:
        draft_model: Hugging Face causal LM (same tokenizer as the target).
        tree: ``"dyspec" | "rsd" | "rsd_s" | "specinfer" | "topk"``.
        budget: node budget of ``"dyspec"`` trees (root included).
        max_children: DySpec candidates per expanded node.
        width: DySpec nodes added per draft forward (ignored when ``exact``).
        exact: DySpec exact greedy expansion (one node per draft forward).
        branching: children per node and depth for ``"rsd" | "specinfer" | "topk"``.
        beam_width, depth: RSD-S stochastic beam (``tree="rsd_s"``): ``1 + beam_width * depth`` nodes.
    """

    def __init__(self, draft_model, *, tree: str = "dyspec", budget: int = 16, max_children: int = 4,
                 width: int = 4, exact: bool = False, branching: Sequence[int] = (3, 2, 2, 1),
                 beam_width: int = 3, depth: int = 3):
        if tree not in TREES:
            raise ValueError(f"tree must be one of {TREES}, got {tree!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an int >= 1, got {width!r}")
        self.draft = draft_model
        self.tree = tree
        self.budget = budget
        self.max_children = max_children
        self.exact = bool(exact)
        self.width = 1 if exact else width
        self.branching = tuple(branching)
        self.beam_width = beam_width
        self.depth = depth
        self.cache = None

    # -- protocol -------------------------------------------------------------------------------------
    def begin(self, ctx: DraftContext) -> None:
        self.ctx = ctx
        self.draft_forwards = 0
        self.cache = _kv.new_cache(self.draft)
        with torch.no_grad():
            _kv.forward_prompt(self.draft, self.cache, ctx.input_ids, ctx.attention_mask, logits_to_keep=1)
        self.draft_forwards += 1
        self.valid = ctx.attention_mask.bool()
        self.n_valid = ctx.attention_mask.long().sum(-1)
        bsz = ctx.input_ids.shape[0]
        self.extra = torch.zeros(bsz, 0, dtype=torch.long, device=ctx.input_ids.device)
        self.extra_len = torch.zeros(bsz, dtype=torch.long, device=ctx.input_ids.device)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.ctx
        v = c.vocab_size
        if logits.shape[-1] > v:
            logits = logits[..., :v]
        probs = _kv.warp(logits, c.do_sample, c.temperature, c.top_k, c.top_p)
        if probs.shape[-1] < v:
            probs = torch.nn.functional.pad(probs, (0, v - probs.shape[-1]))
        return probs

    @torch.no_grad()
    def propose(self, root: torch.Tensor) -> DraftTree:
        bsz, dev = root.shape[0], root.device
        # 1. pending chunk = tokens accepted last step (not in the draft cache) + root, right-padded
        lens = self.extra_len + 1
        width = int(lens.max())
        col = torch.arange(width, device=dev)
        pend = torch.zeros(bsz, width, dtype=torch.long, device=dev)
        if width > 1:
            pend[:, :width - 1] = self.extra[:, :width - 1]
        pend.scatter_(1, (lens - 1).view(-1, 1), root.view(-1, 1))
        pend_valid = col.view(1, -1) < lens.view(-1, 1)
        t0 = self.valid.shape[1]
        causal = (col.view(1, -1, 1) >= col.view(1, 1, -1)) & pend_valid.unsqueeze(1)
        causal = causal | torch.eye(width, dtype=torch.bool, device=dev)  # padded slots see themselves
        vis = torch.cat([self.valid.unsqueeze(1).expand(bsz, width, t0), causal], 2)
        positions = self.n_valid.view(-1, 1) + col.view(1, -1)
        logits = _kv.forward_chunk(self.draft, self.cache, pend, positions, vis)
        self.draft_forwards += 1
        root_logits = logits.gather(1, (lens - 1).view(-1, 1, 1).expand(bsz, 1, logits.shape[-1]))
        self.valid = torch.cat([self.valid, pend_valid], 1)
        self.n_valid = self.n_valid + lens
        self.t_pre = self.valid.shape[1]
        root_pos = self.n_valid - 1
        prefix_vis = self.valid

        # 2. grow the tree; node i >= 1 lives in draft slot t_pre + i - 1
        def expand(tokens, parents, lo, hi):
            if lo == 0:
                return self._probs(root_logits)
            m = hi - lo
            anc = ancestor_matrix(parents[:, :hi])  # [B, hi, hi]
            vis_new = torch.cat([prefix_vis.unsqueeze(1).expand(bsz, m, self.t_pre), anc[:, lo:hi, 1:hi]], 2)
            pos = tree_positions(parents[:, :hi], root_pos)[:, lo:hi]
            lg = _kv.forward_chunk(self.draft, self.cache, tokens[:, lo:hi], pos, vis_new)
            self.draft_forwards += 1
            return self._probs(lg)

        gen = self.ctx.generator
        if self.tree == "dyspec":
            tree = dyspec_tree(root, expand, self.budget, max_children=self.max_children, width=self.width)
        elif self.tree == "rsd_s":
            tree = beam_tree(root, expand, self.beam_width, self.depth, generator=gen)
        else:
            mode = {"rsd": "gumbel", "specinfer": "replace", "topk": "topk"}[self.tree]
            tree = sampled_tree(root, expand, self.branching, mode=mode, generator=gen)
        return tree

    def commit(self, tree, target_logits, accept_index, accept_len, next_token) -> None:
        _kv.crop_cache(self.cache, self.t_pre)
        width = int(accept_len.max()) if accept_len.numel() else 0
        if width > 0:
            idx = accept_index[:, 1:width + 1].clamp_min(0)
            self.extra = tree.tokens.gather(1, idx)
        else:
            self.extra = tree.tokens[:, :0]
        self.extra_len = accept_len.clone()

    def select_rows(self, rows: torch.Tensor) -> None:
        _kv.select_batch(self.cache, rows)
        self.valid = self.valid.index_select(0, rows)
        self.n_valid = self.n_valid.index_select(0, rows)
        self.extra = self.extra.index_select(0, rows)
        self.extra_len = self.extra_len.index_select(0, rows)


def layer_skip_model(model, num_layers: int):
    """A view of ``model`` that runs only its first ``num_layers`` decoder layers, then its final norm
    and LM head. Parameters are shared (no copy); the view has its own config with
    ``num_hidden_layers = num_layers``.

    Works for models whose decoder layers are ``model.model.layers`` (Llama, Qwen2, Mistral, ...).
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"layer_skip_model needs model.model.layers (Llama-like), got {type(model).__name__}")
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must lie in [1, {len(layers)}], got {num_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:num_layers]
    new_inner = copy.copy(inner)
    new_inner._modules = dict(inner._modules)
    new_inner._modules["layers"] = torch.nn.ModuleList(list(layers)[:num_layers])
    new_inner.config = config
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft._modules["model"] = new_inner
    draft.config = config
    return draft


class LayerSkipDrafter(DraftModelDrafter):
    """Self-drafting with the target's first ``num_layers`` layers + final norm + LM head (shared
    weights, own KV cache). Same tree options as :class:`DraftModelDrafter`.

    Args:
        model: the target model.
        num_layers: decoder layers the draft runs.
        **kwargs: see :class:`DraftModelDrafter`.
    """

    def __init__(self, model, num_layers: int, **kwargs):
        super().__init__(layer_skip_model(model, num_layers), **kwargs)
        self.num_layers = num_layers
