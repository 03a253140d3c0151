"""Draft-tree builders producing the canonical token tree of :mod:`tokprune.ops.spec`.

A tree is ``parents [B, N]`` int32 (node 0 = root = last verified token, ``parents[:, 0] = -1``, every
other active node has ``0 <= parents[b, i] < i``; ``-1`` on a non-root node marks an inactive padding
node) and ``tokens [B, N]`` int64. Children of a node are ordered by increasing node index, which is
the order in which verification tests them.

Builders:

* :func:`dyspec_tree` -- DySpec greedy expansion: repeatedly add the candidate with the highest
  cumulative draft probability (product of draft probabilities along its root path) until a node
  budget is reached. The candidate pool is a tensor "heap" of the top children of every expanded
  node; ``width > 1`` adds several candidates per draft call (exactly greedy for ``width=1``).
* :func:`sampled_tree` -- level-by-level trees with a branching factor per depth:
  ``"gumbel"`` draws siblings without replacement by Gumbel-top-k (RSD; verify with rule ``"rsd"``),
  ``"replace"`` draws them i.i.d. with replacement (SpecInfer; rule ``"specinfer"``), ``"topk"`` takes
  the deterministic top-k (rule ``"target_only"``).
* :func:`token_recycling_tree` -- Token Recycling: a static tree template filled breadth-first from an
  adjacency matrix ``[vocab, k]`` of candidate tokens; :func:`update_adjacency` rewrites the rows of
  the tokens the target just saw with the top-k of its logits there.

Builders that need a draft model take an ``expand`` callback::

    expand(tokens [B, n], parents [B, n], lo, hi) -> probs [B, hi - lo, V] float32

returning the draft distribution (rows sum to 1, already temperature/top-k/top-p warped) AT nodes
``lo .. hi-1``, i.e. over their children. Builders call it with contiguous increasing ranges starting
at ``(0, 1)``, so a drafter can feed exactly the new nodes into its KV cache.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from tokprune.ops.spec import tree_attention_mask
from tokprune.ops.spec import tree_depths  # noqa: F401  (re-exported: one convention, padding nodes -1)

ExpandFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]

RULE_OF_MODE = {"gumbel": "rsd", "replace": "specinfer", "topk": "target_only"}


@dataclass
class DraftTree:
    """A draft token tree.

    Attributes:
        tokens: ``[B, N]`` int64 token of every node (node 0 = root).
        parents: ``[B, N]`` int32 parent index, ``-1`` for the root and for inactive padding nodes.
        draft_probs: ``[B, N, V]`` float32 draft distribution at every node (the one its children
            were drawn from; uniform on leaves), or ``None`` for deterministic trees.
        rule: stochastic verification rule matching how siblings were drawn
            (``"rsd" | "specinfer" | "target_only"``).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: Optional[torch.Tensor] = None
    rule: str = "target_only"

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def active(self) -> torch.Tensor:
        """``[B, N]`` bool, True for the root and every non-padding node."""
        act = self.parents >= 0
        act[:, 0] = True
        return act


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` bool: ``[b, i, j]`` True iff node ``j`` is node ``i`` or one of its ancestors.

    ``parents [B, N]`` int32/int64 canonical tree (validated). Padding nodes see only themselves. This is
    the tree block of :func:`tokprune.ops.tree_attention_mask` (the same computation, no second copy).
    """
    return tree_attention_mask(parents, 0, torch.float32)[:, 0] == 0


def _check_root(root: torch.Tensor) -> torch.Tensor:
    if not isinstance(root, torch.Tensor) or root.dim() != 1:
        raise ValueError(f"root must be a 1-D tensor [B] of token ids, got "
                         f"{tuple(root.shape) if isinstance(root, torch.Tensor) else type(root).__name__}")
    return root.long()


def _topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of the last dim, in decreasing order.

    ``torch.topk`` (a partial selection: a full sort of a 49k-token vocabulary per node costs ~100x
    more); ties between equal values are ordered as ``torch.topk`` orders them (deterministic on a
    given device).
    """
    k = min(k, x.shape[-1])
    return torch.topk(x, k, dim=-1, largest=True, sorted=True).indices


def dyspec_tree(root: torch.Tensor, expand: ExpandFn, budget: int, *, max_children: int = 8,
                width: int = 1) -> DraftTree:
    """DySpec greedy expansion under a node budget.

    Starting from the root, the tree repeatedly gains the candidate token with the highest cumulative
    draft probability ``prod q(path)`` among the top ``max_children`` children of every node expanded
    so far (a max-heap kept as a tensor per batch row). ``width`` candidates are added per call to
    ``expand`` (``width=1`` is exact greedy; larger widths trade exactness for fewer draft calls). A
    candidate of probability 0 is never added: the slot becomes an inactive padding node instead.

    Args:
        root: ``[B]`` int64 last verified token of every row.
        expand: draft callback (see module docstring).
        budget: total number of nodes ``N`` including the root, ``>= 1``.
        max_children: children considered per expanded node.
        width: nodes added per draft call, ``>= 1``.

    Returns:
        :class:`DraftTree` with ``N = budget`` nodes, ``draft_probs=None`` and rule ``"target_only"``
        (siblings are deterministic and distinct).
    """
    root = _check_root(root)
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if max_children < 1 or width < 1:
        raise ValueError(f"max_children and width must be >= 1, got {max_children} and {width}")
    bsz, dev = root.shape[0], root.device
    tokens = root.view(bsz, 1)
    parents = torch.full((bsz, 1), -1, dtype=torch.long, device=dev)
    score = torch.zeros(bsz, 1, device=dev)
    pool_s = torch.empty(bsz, 0, device=dev)
    pool_p = torch.empty(bsz, 0, dtype=torch.long, device=dev)
    pool_t = torch.empty(bsz, 0, dtype=torch.long, device=dev)
    lo, hi = 0, 1
    while hi < budget:
        q = expand(tokens, parents, lo, hi).float()  # [B, m, V]
        c = min(max_children, q.shape[-1])
        top_t = _topk(q, c)
        child_s = score[:, lo:hi, None] + torch.log(q.gather(-1, top_t))
        par = torch.arange(lo, hi, device=dev).view(1, -1, 1).expand_as(top_t)
        pool_s = torch.cat([pool_s, child_s.flatten(1)], 1)
        pool_p = torch.cat([pool_p, par.flatten(1)], 1)
        pool_t = torch.cat([pool_t, top_t.flatten(1)], 1)
        w = min(width, budget - hi)
        pick = _topk(pool_s, w)
        if pick.shape[1] < w:  # fewer candidates than slots: pad with copies marked invalid below
            pick = torch.cat([pick, pick[:, :1].expand(bsz, w - pick.shape[1])], 1)
        chosen = pool_s.gather(1, pick)
        ok = chosen > float("-inf")
        ok[:, 1:] &= pick[:, 1:] != pick[:, :1]  # duplicated pads
        new_par = torch.where(ok, pool_p.gather(1, pick), torch.full_like(pick, -1))
        new_tok = torch.where(ok, pool_t.gather(1, pick), torch.zeros_like(pick))
        pool_s = pool_s.scatter(1, pick, float("-inf"))
        tokens = torch.cat([tokens, new_tok], 1)
        parents = torch.cat([parents, new_par], 1)
        score = torch.cat([score, torch.where(ok, chosen, torch.full_like(chosen, float("-inf")))], 1)
        lo, hi = hi, hi + w
    return DraftTree(tokens, parents.int(), None, "target_only")


def sampled_tree(root: torch.Tensor, expand: ExpandFn, branching: Sequence[int], *, mode: str = "gumbel",
                 generator: Optional[torch.Generator] = None) -> DraftTree:
    """Level-by-level tree: every node at depth ``d`` gets ``branching[d]`` children drawn from its draft
    distribution.

    Modes (and the verification rule they need to stay lossless):

    * ``"gumbel"``: without replacement, by Gumbel-top-k on ``log q`` (RSD) -> rule ``"rsd"``; siblings
      are ordered by decreasing perturbed key, which is the order of sequential sampling without
      replacement. Tokens of probability 0 are never drawn (their slots become padding nodes).
    * ``"replace"``: i.i.d. with replacement (SpecInfer) -> rule ``"specinfer"``; duplicates allowed.
    * ``"topk"``: the deterministic ``branching[d]`` most likely tokens -> rule ``"target_only"``.

    Args:
        root: ``[B]`` int64.
        expand: draft callback (see module docstring); called once per level.
        branching: children per node for depths ``0 .. D-1``.
        mode: ``"gumbel" | "replace" | "topk"``.
        generator: ``torch.Generator`` for the draws (reproducible trees).

    Returns:
        :class:`DraftTree` with ``N = 1 + b0 + b0*b1 + ...`` nodes, ``draft_probs [B, N, V]`` (uniform
        rows on the leaves) and the matching rule.
    """
    root = _check_root(root)
    if mode not in RULE_OF_MODE:
        raise ValueError(f"mode must be one of {sorted(RULE_OF_MODE)}, got {mode!r}")
    if any((not isinstance(b, int)) or b < 1 for b in branching):
        raise ValueError(f"branching must be a sequence of ints >= 1, got {list(branching)!r}")
    bsz, dev = root.shape[0], root.device
    tokens = root.view(bsz, 1)
    parents = torch.full((bsz, 1), -1, dtype=torch.long, device=dev)
    probs: List[torch.Tensor] = []
    lo, hi = 0, 1
    vocab = None
    for b in branching:
        q = expand(tokens, parents, lo, hi).float()  # [B, m, V]
        probs.append(q)
        m, vocab = q.shape[1], q.shape[-1]
        b_eff = min(b, vocab) if mode != "replace" else b
        if mode == "gumbel":
            u = torch.rand(q.shape, generator=generator, device=dev).clamp_(1e-20, 1.0 - 1e-7)
            keys = torch.log(q) - torch.log(-torch.log(u))
            idx = _topk(keys, b_eff)
            ok = keys.gather(-1, idx) > float("-inf")
        elif mode == "replace":
            idx = torch.multinomial(q.reshape(-1, vocab), b_eff, replacement=True,
                                    generator=generator).view(bsz, m, b_eff)
            ok = torch.ones_like(idx, dtype=torch.bool)
        else:
            idx = _topk(q, b_eff)
            ok = q.gather(-1, idx) > 0
        node = torch.arange(lo, hi, device=dev)
        parent_active = (parents[:, lo:hi] >= 0) | (node == 0)
        ok = ok & parent_active[..., None]
        new_par = torch.where(ok, node.view(1, -1, 1).expand_as(idx), torch.full_like(idx, -1)).flatten(1)
        new_tok = torch.where(ok, idx, torch.zeros_like(idx)).flatten(1)
        tokens = torch.cat([tokens, new_tok], 1)
        parents = torch.cat([parents, new_par], 1)
        lo, hi = hi, hi + new_tok.shape[1]
    draft_probs = None
    if probs:
        leaves = torch.full((bsz, hi - lo, vocab), 1.0 / vocab, device=dev)
        draft_probs = torch.cat(probs + [leaves], 1)
    return DraftTree(tokens, parents.int(), draft_probs, RULE_OF_MODE[mode])


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, stable at both ends (``-inf`` at ``a = 0``)."""
    a = a.clamp_max(0.0)
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def beam_tree(root: torch.Tensor, expand: ExpandFn, beam_width: int, depth: int, *,
              generator: Optional[torch.Generator] = None) -> DraftTree:
    """RSD-S: a draft tree from Stochastic Beam Search (Kool et al., 2019), as in Recursive Speculative
    Decoding (Jeon et al., 2024). Verify with rule ``"rsd"``.

    Every node carries its draft log-probability ``phi`` (sum of ``log q`` along its path) and a perturbed
    value ``G`` (root: ``phi = G = 0``). A beam node's children get ``G~ = phi + log q(x) + Gumbel`` and are
    conditioned on their maximum being the parent's ``G`` (``G = -log(exp(-G_par) - exp(-max G~) +
    exp(-G~))``); the ``beam_width`` children of highest ``G`` over the whole level form the next beam.
    The children a node keeps are therefore the first ones of a Gumbel-top-k draw from its ``q``
    (sampling without replacement, in that order), and how many it keeps depends only on perturbed
    values, which are independent of which tokens were drawn: recursive rejection sampling (rule
    ``"rsd"``) stays lossless, with a variable number of children per node (RSD-C, a constant
    branching factor, is :func:`sampled_tree` ``mode="gumbel"``).

    Args:
        root: ``[B]`` int64.
        expand: draft callback (see module docstring); called once per level on the current beam.
        beam_width: ``W >= 1`` nodes per level.
        depth: ``D >= 0`` levels.
        generator: ``torch.Generator`` for the Gumbel draws.

    Returns:
        :class:`DraftTree` with ``N = 1 + W * D`` nodes (children of a node in decreasing ``G`` order;
        slots with no candidate of positive probability are padding nodes), ``draft_probs [B, N, V]``
        (uniform rows on the last level) and rule ``"rsd"``.
    """
    root = _check_root(root)
    for name, v, lo_ in (("beam_width", beam_width, 1), ("depth", depth, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo_:
            raise ValueError(f"{name} must be an int >= {lo_}, got {v!r}")
    bsz, dev = root.shape[0], root.device
    ninf = float("-inf")
    tokens = root.view(bsz, 1)
    parents = torch.full((bsz, 1), -1, dtype=torch.long, device=dev)
    phi = torch.zeros(bsz, 1, device=dev)
    big_g = torch.zeros(bsz, 1, device=dev)
    probs: List[torch.Tensor] = []
    lo, hi = 0, 1
    vocab = None
    for _ in range(depth):
        q = expand(tokens, parents, lo, hi).float()  # [B, m, V]
        probs.append(q)
        m, vocab = q.shape[1], q.shape[-1]
        alive = (phi > ninf)[..., None]  # beam nodes that are not padding
        u = torch.rand(q.shape, generator=generator, device=dev).clamp_(1e-20, 1.0 - 1e-7)
        g_tilde = phi[..., None] + torch.log(q) - torch.log(-torch.log(u))
        g_tilde = torch.where(alive, g_tilde, torch.full_like(g_tilde, ninf))
        c = min(beam_width, vocab)
        top = torch.topk(g_tilde, c, dim=-1)  # per node, decreasing G~ (== decreasing G)
        gt, idx = top.values, top.indices
        z = gt[..., :1]
        par_g = big_g[..., None]
        ok = gt > ninf
        # G = T - relu(v) - log1p(exp(-|v|)), v = T - G~ + log(1 - exp(G~ - Z))  (stable form)
        v = par_g - gt + _log1mexp(torch.where(ok, gt - z, torch.zeros_like(gt)))
        g_child = par_g - v.clamp_min(0) - torch.log1p(torch.exp(-v.abs()))
        g_child = torch.where(ok, g_child, torch.full_like(g_child, ninf))
        w = min(beam_width, m * c)
        pick = torch.topk(g_child.flatten(1), w, dim=-1).indices  # [B, w], decreasing G
        par_local = pick // c
        # siblings stay in decreasing-G order; groups ordered by parent (stable sort)
        order = torch.sort(par_local, dim=1, stable=True).indices
        pick = pick.gather(1, order)
        par_local = par_local.gather(1, order)
        sel_g = g_child.flatten(1).gather(1, pick)
        ok = sel_g > ninf
        new_tok = torch.where(ok, idx.flatten(1).gather(1, pick), torch.zeros_like(pick))
        new_par = torch.where(ok, lo + par_local, torch.full_like(pick, -1))
        q_sel = q.gather(2, idx).flatten(1).gather(1, pick)
        new_phi = torch.where(ok, phi.gather(1, par_local) + torch.log(q_sel), torch.full_like(sel_g, ninf))
        if w < beam_width:  # fewer candidates than the beam (tiny vocabulary): pad the level
            extra = beam_width - w
            new_tok = torch.cat([new_tok, new_tok.new_zeros(bsz, extra)], 1)
            new_par = torch.cat([new_par, new_par.new_full((bsz, extra), -1)], 1)
            new_phi = torch.cat([new_phi, new_phi.new_full((bsz, extra), ninf)], 1)
            sel_g = torch.cat([sel_g, sel_g.new_full((bsz, extra), ninf)], 1)
        tokens = torch.cat([tokens, new_tok], 1)
        parents = torch.cat([parents, new_par], 1)
        phi, big_g = new_phi, sel_g
        lo, hi = hi, hi + beam_width
    draft_probs = None
    if probs:
        leaves = torch.full((bsz, hi - lo, vocab), 1.0 / vocab, device=dev)
        draft_probs = torch.cat(probs + [leaves], 1)
    return DraftTree(tokens, parents.int(), draft_probs, "rsd")


# ----------------------------------------------------------------------------------------------------
# Token Recycling
# ----------------------------------------------------------------------------------------------------

@dataclass
class RecyclingTemplate:
    """Static tree shape of Token Recycling: node ``i`` takes the ``ranks[i]``-th candidate of its
    parent's token in the adjacency matrix. ``parents[0] = -1`` (root)."""

    parents: torch.Tensor  # [N] int64
    ranks: torch.Tensor  # [N] int64 (root: -1)
    levels: List[torch.Tensor]  # node indices per depth, depth 0 = [0]

    @property
    def num_nodes(self) -> int:
        return int(self.parents.shape[0])

    @classmethod
    def from_parents_ranks(cls, parents: Sequence[int], ranks: Sequence[int]) -> "RecyclingTemplate":
        parents_t = torch.tensor(list(parents), dtype=torch.long)
        ranks_t = torch.tensor(list(ranks), dtype=torch.long)
        if parents_t.numel() == 0 or int(parents_t[0]) != -1:
            raise ValueError("template parents must start with the root (-1)")
        if any(not (0 <= p < i) for i, p in enumerate(parents_t.tolist()) if i > 0):
            raise ValueError("template parents must satisfy 0 <= parents[i] < i for i > 0")
        depth = [0] * len(parents_t)
        for i in range(1, len(parents_t)):
            depth[i] = depth[int(parents_t[i])] + 1
        levels = [torch.tensor([i for i, d in enumerate(depth) if d == lv], dtype=torch.long)
                  for lv in range(max(depth) + 1)]
        return cls(parents_t, ranks_t, levels)

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "RecyclingTemplate":
        """A template from rank paths (the Token Recycling authors' notation): path ``(r0, r1, ..., rd)``
        is the node reached by taking the ``r0``-th candidate of the root, then the ``r1``-th candidate of
        that token, ... The root (empty path) is added as node 0; every proper prefix of a path must be a
        path too. Nodes are ordered by depth, then lexicographically (parents before children, siblings
        by rank), which is breadth-first order.
        """
        uniq = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        if any(len(p) == 0 for p in uniq):
            raise ValueError("paths must be non-empty (the root is implicit)")
        if any(r < 0 for p in uniq for r in p):
            raise ValueError("path ranks must be >= 0")
        index = {(): 0}
        parents, ranks = [-1], [-1]
        for p in uniq:
            if p[:-1] not in index:
                raise ValueError(f"path {list(p)} has no parent path {list(p[:-1])}")
            index[p] = len(parents)
            parents.append(index[p[:-1]])
            ranks.append(p[-1])
        return cls.from_parents_ranks(parents, ranks)

    def paths(self) -> List[Tuple[int, ...]]:
        """Rank path of every node (root: ``()``), in node order."""
        out: List[Tuple[int, ...]] = [()]
        for i in range(1, self.num_nodes):
            out.append(out[int(self.parents[i])] + (int(self.ranks[i]),))
        return out

    def reach(self, rank_probs: Sequence[float]) -> List[float]:
        """Probability that each node is on the accepted path under ``rank_probs`` (root: 1)."""
        probs = list(rank_probs)
        if self.num_nodes > 1 and int(self.ranks[1:].max()) >= len(probs):
            raise ValueError(f"rank_probs needs {int(self.ranks[1:].max()) + 1} entries, got {len(probs)}")
        out = [1.0] * self.num_nodes
        for i in range(1, self.num_nodes):
            out[i] = out[int(self.parents[i])] * probs[int(self.ranks[i])]
        return out

    def prune(self, n: int, rank_probs: Sequence[float]) -> "RecyclingTemplate":
        """The sub-template of the ``n`` nodes most likely to be accepted under ``rank_probs`` (ties: lower
        node index first). A child is never more likely than its parent, so the kept set is closed under
        taking parents; for ``n >= num_nodes`` the template itself."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if n >= self.num_nodes:
            return self
        r = self.reach(rank_probs)
        keep = sorted(range(self.num_nodes), key=lambda i: (-r[i], i))[:n]
        paths = self.paths()
        return RecyclingTemplate.from_paths([paths[i] for i in keep if i > 0])

    def expected_accepted(self, rank_probs: Sequence[float]) -> float:
        """``E[accepted draft tokens]`` if the rank-``r`` candidate of every node is the target's next
        token with probability ``rank_probs[r]`` independently per step (ranks exclusive): the sum over
        non-root nodes of the product of their path's rank probabilities."""
        return float(sum(self.reach(rank_probs)[1:]))


# Token Recycling's default tree ("2.2.2", Luo et al. 2024): 80 nodes + root, depth 6, level widths
# 8/21/25/15/8/3, k = 8. Written as {parent rank path: number of children}; children always take ranks
# 0 .. c-1 of their parent's candidates. (tests/test_spec_trees.py checks widths, count, depth, parents.)
_PAPER_CHILDREN = {
    "": 8,
    "0": 8, "1": 4, "2": 3, "3": 2, "4": 1, "5": 1, "6": 1, "7": 1,
    "00": 8, "01": 3, "02": 2, "03": 1, "04": 1, "05": 1, "06": 1, "07": 1, "10": 2, "11": 1,
    "20": 1, "30": 1, "40": 1, "50": 1,
    "000": 5, "001": 2, "002": 1, "003": 1, "004": 1, "010": 1, "020": 1, "100": 1, "200": 1, "300": 1,
    "0000": 3, "0001": 1, "0002": 1, "0010": 1, "0100": 1, "1000": 1,
    "00000": 2, "00010": 1,
}
PAPER_TEMPLATE_NAME = "paper-2.2.2"


def paper_template() -> RecyclingTemplate:
    """Token Recycling's fixed "2.2.2" template (the authors' default): 81 nodes (80 + root), depth 6,
    level widths 8/21/25/15/8/3, ranks < 8 (``k = 8``)."""
    paths = [tuple(int(c) for c in parent) + (r,) for parent, n in _PAPER_CHILDREN.items() for r in range(n)]
    return RecyclingTemplate.from_paths(paths)


def named_template(name: str) -> RecyclingTemplate:
    """A named Token Recycling template: ``"paper-2.2.2"`` (alias ``"paper"``)."""
    if name in ("paper", PAPER_TEMPLATE_NAME):
        return paper_template()
    raise ValueError(f"unknown template name {name!r}; known: 'paper' / {PAPER_TEMPLATE_NAME!r}")


def recycling_template(budget: int, k: int, *, max_depth: int = 8,
                       rank_probs: Optional[Sequence[float]] = None) -> RecyclingTemplate:
    """A static tree of ``budget`` nodes for Token Recycling, grown greedily (heap) by the product of
    assumed acceptance probabilities of the candidate ranks along each path.

    Args:
        budget: number of nodes including the root.
        k: adjacency width (candidates per token); no node gets more than ``k`` children.
        max_depth: deepest level allowed.
        rank_probs: assumed acceptance probability of the rank-``r`` candidate, strictly decreasing;
            default ``0.5 * 0.55**r``.
    """
    if budget < 1 or k < 1:
        raise ValueError(f"budget and k must be >= 1, got {budget} and {k}")
    probs = list(rank_probs) if rank_probs is not None else [0.5 * 0.55 ** r for r in range(k)]
    if len(probs) < k:
        raise ValueError(f"rank_probs needs k={k} entries, got {len(probs)}")
    parents, ranks, depth, logp = [-1], [-1], [0], [0.0]
    heap: list = []
    counter = 0

    def push_children(node: int) -> None:
        nonlocal counter
        if depth[node] >= max_depth:
            return
        for r in range(k):
            heapq.heappush(heap, (-(logp[node] + math.log(probs[r])), counter, node, r))
            counter += 1

    push_children(0)
    while len(parents) < budget and heap:
        neg, _, par, r = heapq.heappop(heap)
        parents.append(par)
        ranks.append(r)
        depth.append(depth[par] + 1)
        logp.append(-neg)
        push_children(len(parents) - 1)
    return RecyclingTemplate.from_parents_ranks(parents, ranks)


def init_adjacency(vocab_size: int, k: int, device=None) -> torch.Tensor:
    """A fresh ``[vocab, k]`` int64 adjacency matrix (row ``v`` = ``0 .. k-1``: distinct placeholders)."""
    return torch.arange(k, device=device).repeat(vocab_size, 1)


def token_recycling_tree(root: torch.Tensor, adjacency: torch.Tensor, template: RecyclingTemplate) -> DraftTree:
    """Fill ``template`` breadth-first from ``adjacency``: ``tokens[:, i] = adjacency[tokens[:, parent_i],
    rank_i]`` (one gather per level).

    Args:
        root: ``[B]`` int64.
        adjacency: ``[V, k]`` int64 candidate tokens per token.
        template: the static tree shape.

    Returns:
        :class:`DraftTree` (``draft_probs=None``, rule ``"target_only"``: siblings are distinct
        when every adjacency row holds distinct tokens).
    """
    root = _check_root(root)
    if adjacency.dim() != 2:
        raise ValueError(f"adjacency must be [vocab, k], got shape {tuple(adjacency.shape)}")
    if template.num_nodes > 1 and int(template.ranks[1:].max()) >= adjacency.shape[1]:
        raise ValueError(f"template uses rank {int(template.ranks.max())} but adjacency has k={adjacency.shape[1]}")
    bsz, n, dev = root.shape[0], template.num_nodes, root.device
    tpar = template.parents.to(dev)
    trank = template.ranks.to(dev)
    tokens = torch.empty(bsz, n, dtype=torch.long, device=dev)
    tokens[:, 0] = root
    for idx in template.levels[1:]:
        idx = idx.to(dev)
        tokens[:, idx] = adjacency[tokens[:, tpar[idx]], trank[idx]]
    return DraftTree(tokens, tpar.int().expand(bsz, n).contiguous(), None, "target_only")


def update_adjacency(adjacency: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token Recycling update, in place: for every (unmasked) token ``t`` seen by the target,
    ``adjacency[t] = top-k(logits at t)`` (the candidates the target proposes after ``t``).

    When a token occurs several times, the last occurrence (flattened order) wins.

    Args:
        adjacency: ``[V, k]`` int64, modified in place.
        tokens: ``[...]`` int64 token ids.
        logits: ``[..., V']`` the target's logits at those tokens.
        mask: optional ``[...]`` bool, True for entries to use.

    Returns:
        ``adjacency``.
    """
    k = adjacency.shape[1]
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits must be tokens.shape + (vocab,), got {tuple(logits.shape)} for tokens "
                         f"{tuple(tokens.shape)}")
    t = tokens.reshape(-1).long()
    lg = logits.reshape(-1, logits.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1)
        t, lg = t[keep], lg[keep]
    if t.numel() == 0:
        return adjacency
    cand = _topk(lg.float(), k)
    pos = torch.arange(t.numel(), device=t.device)
    last = torch.full((adjacency.shape[0],), -1, dtype=torch.long, device=t.device)
    last.scatter_reduce_(0, t, pos, reduce="amax")
    sel = last[t] == pos
    adjacency[t[sel]] = cand[sel].to(adjacency.dtype)
    return adjacency
