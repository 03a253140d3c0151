"""SGLang-compatible speculative tree verification: drop-in functions with the argument lists, dtypes
and in-place semantics of ``sgl_kernel.verify_tree_greedy`` and
``sgl_kernel.tree_speculative_sampling_target_only``, implemented in vectorised torch (no SGLang needed).

SGLang's tree format (EAGLE), per request ``b`` of ``N`` draft nodes (node 0 = the last verified token):

* ``candidates [B, N]`` int64: the token of each node;
* ``retrive_index [B, N]`` int64: the *global* index of each node in the flattened ``[B * N]`` arrays
  (``predicts``, and ``target_predict`` viewed flat), usually ``b * N + i``;
* ``retrive_next_token [B, N]`` int64: a node's first child (local index), ``-1`` = leaf;
* ``retrive_next_sibling [B, N]`` int64: the next sibling (local index), ``-1`` = last.

Children are tried in the order of the sibling chain. :func:`tokprune.ops.tree_to_links` turns a
tokprune canonical tree into ``retrive_next_token`` / ``retrive_next_sibling`` (siblings chained in
increasing node index, the order SGLang's tree builder produces).

Outputs, written in place: ``accept_index [B, S]`` int32 gets the global indices of the accepted path
(root first; entries past the path are left untouched, SGLang fills them with -1 beforehand);
``accept_token_num [B]`` int32 the number of accepted draft tokens (at most ``S - 1``); ``predicts
[B * N]`` int32 the token emitted after each node of the path (the accepted child's token, and the
bonus token after the last accepted node); other entries of ``predicts`` are left untouched.

The torch loops run over tree depth and sibling rank only (vectorised over the batch); they read the
tree on the host (``.any()`` per level), like every tokprune verification op on the torch backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokprune.ops._checks import check_tensor

__all__ = ["verify_tree_greedy", "tree_speculative_sampling_target_only"]


def _check_tree(predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
                retrive_next_sibling):
    device = candidates.device if isinstance(candidates, torch.Tensor) else None
    check_tensor("predicts", predicts, ndim=1, dtypes=(torch.int32,), device=device)
    check_tensor("accept_index", accept_index, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("accept_token_num", accept_token_num, ndim=1, dtypes=(torch.int32,), device=device)
    check_tensor("candidates", candidates, ndim=2, dtypes=(torch.int64,))
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", retrive_next_token),
                    ("retrive_next_sibling", retrive_next_sibling)):
        check_tensor(name, t, ndim=2, dtypes=(torch.int64,), device=device)
        if t.shape != candidates.shape:
            raise ValueError(f"{name} must have the shape of candidates (B, N) = {tuple(candidates.shape)}, "
                             f"got {tuple(t.shape)}")
    bsz, n = candidates.shape
    if accept_index.shape[0] != bsz or accept_index.shape[1] < 1:
        raise ValueError(f"accept_index must be (B={bsz}, num_spec_step >= 1), got {tuple(accept_index.shape)}")
    if accept_token_num.shape[0] != bsz:
        raise ValueError(f"accept_token_num must be (B={bsz},), got {tuple(accept_token_num.shape)}")
    if bsz and n == 0:
        raise ValueError(f"candidates must have at least one node (the root) per request, got "
                         f"{tuple(candidates.shape)}")
    for name, t in (("retrive_next_token", retrive_next_token), ("retrive_next_sibling", retrive_next_sibling)):
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= n):
            raise IndexError(f"{name} values must be -1 or local node indices in [0, N={n}), got range "
                             f"[{int(t.min())}, {int(t.max())}]")
    if retrive_index.numel():
        lo, hi = int(retrive_index.min()), int(retrive_index.max())
        if lo < 0 or hi >= predicts.numel():
            raise IndexError(f"retrive_index values must be global indices in [0, predicts.numel()="
                             f"{predicts.numel()}), "
                             f"got range [{lo}, {hi}]")
    return bsz, n, accept_index.shape[1]


def _walk_level(rows, first, candidates, retrive_next_sibling, test):
    """Try the children of one node per row along the sibling chain, starting at ``first`` (local, -1 =
    none). ``test(node, searching) -> accepted`` is called once per sibling rank with the current
    child of every row. Returns ``(accepted [R] bool, node [R] local index of the accepted child)``."""
    n = candidates.shape[1]
    node = first.clone()
    searching = node >= 0
    accepted = torch.zeros_like(searching)
    for _ in range(n):
        if not bool(searching.any()):
            return accepted, node
        hit = searching & test(node.clamp_min(0), searching)
        accepted |= hit
        searching &= ~hit
        node = torch.where(searching, retrive_next_sibling[rows, node.clamp_min(0)], node)
        searching &= node >= 0
    if bool(searching.any()):
        raise ValueError("retrive_next_sibling has a cycle (a sibling chain longer than N nodes)")
    return accepted, node


def verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
) -> None:
    """Greedy tree verification with SGLang's ``verify_tree_greedy`` interface (in place, returns None).

    From the root, at most ``S - 1`` times: walk the current node's children along the sibling chain and
    accept the first whose token equals ``target_predict`` at the current node (read through its global
    index); stop when none matches. Same decisions as :func:`tokprune.ops.verify_tree_greedy` with
    ``target_logits`` whose argmax is ``target_predict`` (when the sibling chains are in increasing node
    order).

    Args:
        predicts: ``[B * N]`` (or larger) int32, mutable: ``predicts[g]`` for each node ``g`` of the accepted
            path = the token emitted after it.
        accept_index: ``[B, S]`` int32, mutable (``S = num_spec_step``, accepted tokens <= ``S - 1``).
        accept_token_num: ``[B]`` int32, mutable.
        candidates, retrive_index, retrive_next_token, retrive_next_sibling: ``[B, N]`` int64 (module
            docstring).
        target_predict: ``[B, N]`` int64, the target model's argmax token at each node, indexed by the
            nodes' global indices (flattened row-major).
    """
    bsz, n, steps = _check_tree(predicts, accept_index, accept_token_num, candidates, retrive_index,
                                retrive_next_token, retrive_next_sibling)
    check_tensor("target_predict", target_predict, ndim=2, dtypes=(torch.int64,), device=candidates.device)
    if target_predict.shape != candidates.shape:
        raise ValueError(f"target_predict must have the shape of candidates (B, N) = {tuple(candidates.shape)}, "
                         f"got {tuple(target_predict.shape)}")
    if bsz == 0:
        return
    flat_target = target_predict.reshape(-1)

    def step(rows, cur, last):
        target = flat_target[last]
        return _walk_level(rows, retrive_next_token[rows, cur], candidates, retrive_next_sibling,
                           lambda node, _: candidates[rows, node] == target), target

    last, _ = _run_levels(predicts, accept_index, accept_token_num, retrive_index, steps, step)
    predicts[last] = flat_target[last].to(torch.int32)


def _run_levels(predicts, accept_index, accept_token_num, retrive_index, steps, step, on_accept=None):
    """The level loop shared by both verifiers; ``step(rows, cur, last) -> ((accepted, node), emitted)``.
    Returns ``(last, cur)``: the global and local index of every row's last accepted node."""
    bsz = retrive_index.shape[0]
    rows = torch.arange(bsz, device=retrive_index.device)
    last = retrive_index[:, 0].clone()
    accept_index[:, 0] = last.to(torch.int32)
    cur = torch.zeros(bsz, dtype=torch.long, device=retrive_index.device)
    n_acc = torch.zeros(bsz, dtype=torch.long, device=retrive_index.device)
    live = rows
    for _ in range(1, steps):
        (accepted, node), emitted = step(live, cur[live], last[live])
        go = live[accepted]
        if go.numel() == 0:
            break
        node = node[accepted]
        global_node = retrive_index[go, node]
        predicts[last[go]] = emitted[accepted].to(torch.int32)
        n_acc[go] += 1
        accept_index[go, n_acc[go]] = global_node.to(torch.int32)
        last[go] = global_node
        cur[go] = node
        if on_accept is not None:
            on_accept(go, node)
        live = go
    accept_token_num.copy_(n_acc.to(torch.int32))
    return last, cur


def tree_speculative_sampling_target_only(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor,
    target_probs: torch.Tensor,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
    deterministic: bool = True,
    *,
    draft_probs: Optional[torch.Tensor] = None,
) -> None:
    """Stochastic tree verification with SGLang's ``tree_speculative_sampling_target_only`` interface.

    At the current node ``c`` (root first) with coin ``u = uniform_samples[b, c]`` and target row
    ``p = target_probs[b, c]``, children are tried along the sibling chain with a running sum
    ``acc += p[token]``; a child is accepted iff ``u <= acc / max(threshold_acc, 1e-9)`` or
    ``p[token] >= threshold_single``, and becomes the current node (``acc`` restarts at 0). A rejected
    child's token gets ``draft[token] = p[token]``. When no child is accepted (or ``S - 1`` were), the
    bonus token is drawn from ``relu(p - draft)`` of the last node (``draft`` = 0 after ``S - 1``
    acceptances): the smallest ``v`` with ``cumsum[v] > u_f * sum`` (``u_f`` =
    ``uniform_samples_for_final_sampling[b]``), ``V - 1`` if rounding leaves none. With
    ``threshold_single = threshold_acc = 1`` the emitted tokens follow the target distribution
    (one coin per node used as an inverse CDF over the tried siblings; the same law as
    :func:`tokprune.ops.verify_tree_stochastic` with ``rule="target_only"``, not the same draws).

    Args:
        predicts, accept_index, accept_token_num: int32 outputs, as in :func:`verify_tree_greedy`.
        candidates, retrive_index, retrive_next_token, retrive_next_sibling: ``[B, N]`` int64.
        uniform_samples: ``[B, N]`` float32 coins, one per node (indexed by local node index).
        uniform_samples_for_final_sampling: ``[B]`` float32.
        target_probs: ``[B, N, V]`` float32 target distribution at each node (local index).
        threshold_single, threshold_acc: floats in ``[0, 1]`` (1 = exact sampling).
        deterministic: accepted for compatibility; the torch implementation is always deterministic.
        draft_probs: optional ``[B, N, V]`` float32, written in place as SGLang's older interface did
            (rejected tokens' target probabilities); a zero buffer is used internally when omitted.
    """
    bsz, n, steps = _check_tree(predicts, accept_index, accept_token_num, candidates, retrive_index,
                                retrive_next_token, retrive_next_sibling)
    device = candidates.device
    check_tensor("uniform_samples", uniform_samples, ndim=2, dtypes=(torch.float32,), device=device)
    check_tensor("uniform_samples_for_final_sampling", uniform_samples_for_final_sampling, ndim=1,
                 dtypes=(torch.float32,), device=device)
    check_tensor("target_probs", target_probs, ndim=3, dtypes=(torch.float32,), device=device)
    if uniform_samples.shape != candidates.shape:
        raise ValueError(f"uniform_samples must have the shape of candidates (B, N) = {tuple(candidates.shape)}, "
                         f"got {tuple(uniform_samples.shape)}")
    if uniform_samples_for_final_sampling.shape[0] != bsz:
        raise ValueError(f"uniform_samples_for_final_sampling must be (B={bsz},), got "
                         f"{tuple(uniform_samples_for_final_sampling.shape)}")
    if tuple(target_probs.shape[:2]) != tuple(candidates.shape) or target_probs.shape[2] == 0:
        raise ValueError(f"target_probs must be (B, N) = {tuple(candidates.shape)} + (V,) with V >= 1, got "
                         f"{tuple(target_probs.shape)}")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, ndim=3, dtypes=(torch.float32,), device=device)
        if draft_probs.shape != target_probs.shape:
            raise ValueError(f"draft_probs must have the shape of target_probs {tuple(target_probs.shape)}, got "
                             f"{tuple(draft_probs.shape)}")
    for name, value in (("threshold_single", threshold_single), ("threshold_acc", threshold_acc)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    vocab = target_probs.shape[2]
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= vocab):
        raise IndexError(f"candidates must be token ids in [0, V={vocab}), got range "
                         f"[{int(candidates.min())}, {int(candidates.max())}]")
    if bsz == 0:
        return
    thr_single = torch.tensor(float(threshold_single), dtype=torch.float32, device=device)
    thr_acc = torch.tensor(max(float(threshold_acc), 1e-9), dtype=torch.float32, device=device)
    # draft row of each request's current node: rejected tokens' target probabilities
    draft_row = torch.zeros(bsz, vocab, dtype=torch.float32, device=device)

    def step(rows, cur, last):
        coin = uniform_samples[rows, cur]
        acc = torch.zeros(rows.numel(), dtype=torch.float32, device=device)
        chosen = torch.zeros(rows.numel(), dtype=torch.long, device=device)

        def test(node, searching):
            nonlocal acc, chosen
            token = candidates[rows, node]
            p = target_probs[rows, cur, token]
            acc = torch.where(searching, acc + p, acc)
            hit = (coin <= acc / thr_acc) | (p >= thr_single)
            rejected = searching & ~hit
            if bool(rejected.any()):
                r = rejected.nonzero().squeeze(1)
                draft_row[rows[r], token[r]] = p[r]
                if draft_probs is not None:
                    draft_probs[rows[r], cur[r], token[r]] = p[r]
            chosen = torch.where(searching & hit, token, chosen)
            return hit

        return _walk_level(rows, retrive_next_token[rows, cur], candidates, retrive_next_sibling, test), chosen

    def on_accept(go, node):
        draft_row[go] = 0.0  # a new current node: nothing rejected there yet

    last, cur = _run_levels(predicts, accept_index, accept_token_num, retrive_index, steps, step, on_accept)
    rows = torch.arange(bsz, device=device)
    full = accept_token_num.long() == steps - 1  # no children were tried at the last node
    if draft_probs is not None:
        sub = draft_probs[rows, cur]
    else:
        sub = draft_row
    sub = torch.where(full[:, None], torch.zeros_like(sub), sub)
    residual = (target_probs[rows, cur] - sub).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    u = uniform_samples_for_final_sampling[:, None] * total
    cdf = torch.cumsum(residual, dim=-1)
    token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(vocab - 1)
    predicts[last] = token.to(torch.int32)

