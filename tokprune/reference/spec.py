"""Plain-torch oracles of the token-tree ops, written for clarity (Python loops over rows and nodes).

They follow the tree-verification contract in the docstring of :mod:`tokprune.ops.spec` line by line; the fast
vectorised torch backend in :mod:`tokprune.ops.spec` and the Triton kernels are tested against them.
"""

from __future__ import annotations

from typing import List

import torch


def _row_children(parents_row: List[int]) -> List[List[int]]:
    children: List[List[int]] = [[] for _ in parents_row]
    for i, p in enumerate(parents_row):
        if i > 0 and p >= 0:
            children[p].append(i)  # increasing node index = sibling order
    return children


def tree_depths_reference(parents: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` int64 depth of every node (root 0); padding nodes get -1."""
    out = torch.full(parents.shape, -1, dtype=torch.int64)
    for b, row in enumerate(parents.tolist()):
        for i, p in enumerate(row):
            if i == 0:
                out[b, i] = 0
            elif p >= 0:
                out[b, i] = out[b, p] + 1
    return out


def ancestor_matrix_reference(parents: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` bool, ``[b, i, j]`` True iff node j is node i or one of its ancestors."""
    bsz, n = parents.shape
    out = torch.zeros(bsz, n, n, dtype=torch.bool)
    for b, row in enumerate(parents.tolist()):
        for i in range(n):
            out[b, i, i] = True
            if i == 0 or row[i] < 0:
                continue
            j = row[i]
            while j >= 0:
                out[b, i, j] = True
                j = row[j] if j > 0 else -1
    return out


def verify_tree_greedy_reference(tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor):
    """Greedy verification per the contract of :mod:`tokprune.ops.spec`; returns ``(accept_index, accept_len, next_token)`` int64."""
    depths = tree_depths_reference(parents)
    width = int(depths.max()) + 1
    bsz = parents.shape[0]
    accept_index = torch.full((bsz, width), -1, dtype=torch.int64)
    accept_len = torch.zeros(bsz, dtype=torch.int64)
    next_token = torch.zeros(bsz, dtype=torch.int64)
    for b in range(bsz):
        children = _row_children(parents[b].tolist())
        toks = tokens[b].tolist()
        cur, path = 0, [0]
        while True:
            t = int(torch.argmax(target_logits[b, cur].float()))
            nxt = next((c for c in children[cur] if toks[c] == t), None)
            if nxt is None:
                next_token[b] = t
                break
            path.append(nxt)
            cur = nxt
        accept_index[b, : len(path)] = torch.tensor(path)
        accept_len[b] = len(path) - 1
    return accept_index, accept_len, next_token


def sample_from_probs_reference(p: torch.Tensor, u: float) -> int:
    """Smallest ``v`` with ``cumsum(p)[v] > u * sum(p)``; if none, the last ``v`` with ``p[v] > 0``."""
    total = p.sum()
    cum = torch.cumsum(p, 0)
    hit = (cum > u * total).nonzero()
    if hit.numel():
        return int(hit[0])
    positive = (p > 0).nonzero()
    return int(positive[-1]) if positive.numel() else 0


def verify_tree_stochastic_reference(tokens, parents, target_probs, draft_probs, rule: str, uniforms):
    """Stochastic verification per the contract of :mod:`tokprune.ops.spec` (rules ``specinfer | rsd | target_only``)."""
    depths = tree_depths_reference(parents)
    width = int(depths.max()) + 1
    bsz = parents.shape[0]
    accept_index = torch.full((bsz, width), -1, dtype=torch.int64)
    accept_len = torch.zeros(bsz, dtype=torch.int64)
    next_token = torch.zeros(bsz, dtype=torch.int64)
    for b in range(bsz):
        children = _row_children(parents[b].tolist())
        toks = tokens[b].tolist()
        cur, path = 0, [0]
        p = target_probs[b, 0].float().clone()
        q = draft_probs[b, 0].float().clone() if draft_probs is not None else None
        while True:
            accepted = None
            for c in children[cur]:
                x = toks[c]
                u = uniforms[b, c].float()
                if rule == "target_only":
                    ok = bool(u < p[x])
                else:
                    ok = bool(u * q[x] < p[x])
                if ok:
                    accepted = c
                    break
                if rule in ("specinfer", "rsd"):
                    r = (p - q).clamp_min(0)
                    s = r.sum()
                    if s > 0:
                        p = r / s
                    if rule == "rsd":
                        q[x] = 0
                        sq = q.sum()
                        if sq > 0:
                            q = q / sq
                else:
                    p[x] = 0
                    s = p.sum()
                    if s > 0:
                        p = p / s
            if accepted is None:
                break
            path.append(accepted)
            cur = accepted
            p = target_probs[b, cur].float().clone()
            q = draft_probs[b, cur].float().clone() if draft_probs is not None else None
        next_token[b] = sample_from_probs_reference(p, float(uniforms[b, 0]))
        accept_index[b, : len(path)] = torch.tensor(path)
        accept_len[b] = len(path) - 1
    return accept_index, accept_len, next_token


def compact_accepted_kv_reference(cache: torch.Tensor, prefix_len, accept_index: torch.Tensor):
    """Out-of-place oracle of :func:`tokprune.ops.compact_accepted_kv`: ``(new_cache, new_lengths)``."""
    out = cache.clone()
    bsz = cache.shape[0]
    lengths = torch.zeros(bsz, dtype=torch.int64)
    for b in range(bsz):
        pl = int(prefix_len[b]) if isinstance(prefix_len, torch.Tensor) else int(prefix_len)
        path = [int(i) for i in accept_index[b].tolist() if i >= 0]
        for j, node in enumerate(path):
            out[b, :, pl + j] = cache[b, :, pl + node]
        lengths[b] = pl + len(path)
    return out, lengths
