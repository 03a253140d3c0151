"""Speculative decoding on token trees: tree utilities, tree attention masks, lossless verification,
and KV-cache compaction.

This docstring is the **tree-verification contract**: every backend (torch here, Triton in
:mod:`tokprune.kernels.triton.spec`, CUDA in ``csrc/verify_tree.cu`` with its host build) and the
oracles in :mod:`tokprune.reference.spec` implement exactly this, and the tests compare them on it.

Canonical tree (shared by every op and backend):

* ``parents [B, N]`` int32/int64. Node 0 is the root (the last verified token), ``parents[b, 0] = -1``.
  Every other node ``i`` has ``0 <= parents[b, i] < i`` (topological order) or ``parents[b, i] = -1``,
  which marks an inactive *padding* node (lets one batch hold trees of different sizes). Padding nodes
  cannot have children. (Checked in debug mode, ``TOKPRUNE_DEBUG=1``; the CUDA kernel treats a node whose parent
  is not an earlier active node as padding.)
* ``tokens [B, N]`` int32/int64: the token of each node (the root's token is the last verified one);
  tokens of active non-root nodes lie in ``[0, V)`` (checked in debug mode).
* Children of a node are visited in increasing node index ("sibling order").
* ``target[b, i]`` (logits or probabilities, ``[B, N, V]``) is the target model's output AT node ``i``,
  i.e. its distribution of the token that follows node ``i``; ``draft[b, i]`` likewise for the drafter.

Greedy verification (:func:`verify_tree_greedy`): from the root, ``t = argmax(target_logits[b, cur])``
with the lowest index on ties and NaN counting as the maximum (``torch.argmax``'s rule, on every
backend; in debug mode the torch backend rejects a NaN argmax); move to the first child of ``cur`` in
sibling order whose token is ``t``; when none exists, ``t`` is the bonus token ``next_token[b]``.

Stochastic verification (:func:`verify_tree_stochastic`), float32 throughout: at the current node with
target row ``p`` and draft row ``q`` (fresh copies of the rows of that node), the children are tested in
sibling order, child ``c`` (token ``x``) with its own uniform ``u = uniforms[b, c]``:

* ``specinfer``: accept iff ``u * q[x] < p[x]``; on rejection ``p <- max(p - q, 0) / sum(max(p - q, 0))``
  (unchanged when that sum is 0);
* ``rsd``: the same test and update of ``p``, and also ``q[x] <- 0; q <- q / sum(q)`` (when positive);
* ``target_only``: accept iff ``u < p[x]``; on rejection ``p[x] <- 0; p <- p / sum(p)`` (when positive).

The first accepted child becomes the current node (its own rows are loaded); when no child is accepted
the walk stops and the bonus token is drawn from the current ``p``: the smallest ``v`` with
``cumsum(p)[v] > uniforms[b, 0] * sum(p)`` (both sides rounded to float32), or, if rounding leaves none,
the last ``v`` with ``p[v] > 0`` (0 for an all-zero row).

Verification outputs (all int64): ``accept_index [B, max_depth + 1]`` (node indices of the accepted
path, root first, -1 padded; ``max_depth`` = largest depth of an active node over the batch),
``accept_len [B]`` (accepted draft tokens = path length - 1) and ``next_token [B]`` (bonus token).

The torch backend is vectorised over the batch: it loops only over tree depth and sibling rank, and
it reads the target/draft rows of the nodes it visits only (``depth x B`` rows, not ``N x B``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from tokprune._backend import resolve_backend
from tokprune._debug import debug_checks
from tokprune.ops._checks import FLOAT_DTYPES, check_tensor

INT_DTYPES = (torch.int32, torch.int64)
RULES = ("specinfer", "rsd", "target_only")
PrefixLen = Union[int, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# validation and tree structure
# ----------------------------------------------------------------------------------------------------

def _check_parents(parents, name: str = "parents") -> torch.Tensor:
    """Validate a canonical tree and return it as int64 (the structure, which reads data, in debug mode)."""
    check_tensor(name, parents, ndim=2, dtypes=INT_DTYPES)
    bsz, n = parents.shape
    if n == 0:
        raise ValueError(f"{name} must have at least one node (the root), got shape {tuple(parents.shape)}")
    par = parents.long()
    if bsz == 0 or not debug_checks():
        return par
    if bool((par[:, 0] != -1).any()):
        bad = int((par[:, 0] != -1).nonzero()[0])
        raise ValueError(f"{name}[b, 0] must be -1 (node 0 is the root), got {int(par[bad, 0])} in row {bad}")
    node = torch.arange(n, device=par.device)
    wrong = (par < -1) | (par >= node)
    if bool(wrong.any()):
        b, i = (int(v) for v in wrong.nonzero()[0])
        raise ValueError(f"{name}[b, i] must satisfy -1 <= parents < i (topological order), got "
                         f"{name}[{b}, {i}] = {int(par[b, i])}")
    active = (par >= 0) | (node == 0)
    parent_active = active.gather(1, par.clamp_min(0))
    orphan = (par >= 0) & ~parent_active
    if bool(orphan.any()):
        b, i = (int(v) for v in orphan.nonzero()[0])
        raise ValueError(f"{name}[{b}, {i}] = {int(par[b, i])} points to a padding node (parents = -1); "
                         f"padding nodes cannot have children")
    return par


def _active(par: torch.Tensor) -> torch.Tensor:
    node = torch.arange(par.shape[1], device=par.device)
    return (par >= 0) | (node == 0)


def _depths(par: torch.Tensor) -> torch.Tensor:
    """Depth by pointer jumping (list ranking): O(log depth) vectorised steps. Padding nodes: -1."""
    dist = (par >= 0).long()
    jump = par.clone()
    while bool((jump >= 0).any()):
        has = jump >= 0
        j = jump.clamp_min(0)
        dist = dist + torch.where(has, dist.gather(1, j), torch.zeros_like(dist))
        jump = torch.where(has, jump.gather(1, j), jump)
    return torch.where(_active(par), dist, torch.full_like(dist, -1))


def _ancestors(par: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` bool: ``[b, i, j]`` iff j is i or an ancestor of i. Loops over depth only."""
    bsz, n = par.shape
    node = torch.arange(n, device=par.device)
    anc = torch.eye(n, dtype=torch.bool, device=par.device).expand(bsz, n, n).clone()
    cur = par.clone()
    cols = node.view(1, 1, n)
    while bool((cur >= 0).any()):
        anc |= (cur.unsqueeze(-1) == cols)
        cur = torch.where(cur >= 0, par.gather(1, cur.clamp_min(0)), cur)
    return anc


def _children(par: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(children [B, N, K], rank [B, N])``: children of each node in sibling order (-1 padded), and
    each node's rank among its siblings (-1 for the root and padding nodes). O(N log N) per row."""
    bsz, n = par.shape
    device = par.device
    node = torch.arange(n, device=device)
    has_parent = par >= 0
    # stable sort by parent keeps increasing node index inside each sibling group
    key = torch.where(has_parent, par, n)
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    new_group = torch.ones_like(sorted_key, dtype=torch.bool)
    new_group[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    start = torch.cummax(torch.where(new_group, node.expand(bsz, n), 0), dim=1).values
    rank_sorted = node - start
    rank = torch.empty_like(par).scatter_(1, order, rank_sorted)
    rank = torch.where(has_parent, rank, torch.full_like(rank, -1))
    k = int(rank.max()) + 1 if rank.numel() else 0
    children = torch.full((bsz, n + 1, max(k, 1)), -1, dtype=torch.long, device=device)
    row = torch.where(has_parent, par, torch.full_like(par, n))  # padding/root -> dummy row n
    children[torch.arange(bsz, device=device).unsqueeze(1), row, rank.clamp_min(0)] = torch.where(
        has_parent, node.expand(bsz, n), torch.full_like(par, -1))
    return children[:, :n, :k], rank


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node.

    Args:
        parents: ``[B, N]`` int32/int64 canonical tree.

    Returns:
        ``[B, N]`` int64: 0 for the root, ``depth(parent) + 1`` otherwise, -1 for padding nodes.
    """
    return _depths(_check_parents(parents))


def tree_to_links(parents: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """First-child / next-sibling links of a canonical tree.

    Args:
        parents: ``[B, N]`` int32/int64 canonical tree.

    Returns:
        ``(first_child, next_sibling)``, both ``[B, N]`` in the dtype of ``parents``; -1 where none.
        Siblings are chained in increasing node index.
    """
    par = _check_parents(parents)
    children, rank = _children(par)
    bsz, n = par.shape
    first_child = children[:, :, 0] if children.shape[-1] else torch.full_like(par, -1)
    padded = torch.cat([children, torch.full((bsz, n, 1), -1, dtype=torch.long, device=par.device)], dim=2)
    nxt = padded[torch.arange(bsz, device=par.device).unsqueeze(1), par.clamp_min(0), (rank + 1).clamp_min(0)]
    next_sibling = torch.where(par >= 0, nxt, torch.full_like(par, -1))
    return first_child.to(parents.dtype), next_sibling.to(parents.dtype)


def links_to_tree(first_child: torch.Tensor, next_sibling: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tree_to_links`.

    Args:
        first_child, next_sibling: ``[B, N]`` int32/int64, -1 where none.

    Returns:
        ``parents [B, N]`` in the dtype of ``first_child`` (nodes reached by no link are padding, -1).
        Loops over sibling rank only.
    """
    check_tensor("first_child", first_child, ndim=2, dtypes=INT_DTYPES)
    check_tensor("next_sibling", next_sibling, ndim=2, dtypes=INT_DTYPES, device=first_child.device)
    if first_child.shape != next_sibling.shape:
        raise ValueError(f"next_sibling must have the shape of first_child {tuple(first_child.shape)}, "
                         f"got {tuple(next_sibling.shape)}")
    bsz, n = first_child.shape
    fc, ns = first_child.long(), next_sibling.long()
    for name, t in (("first_child", fc), ("next_sibling", ns)):
        if debug_checks() and t.numel() and (int(t.min()) < -1 or int(t.max()) >= n):
            raise ValueError(f"{name} values must lie in [-1, {n}), got range [{int(t.min())}, {int(t.max())}]")
    node = torch.arange(n, device=fc.device).expand(bsz, n)
    par = torch.full((bsz, n + 1), -1, dtype=torch.long, device=fc.device)
    par.scatter_(1, torch.where(fc >= 0, fc, n), torch.where(fc >= 0, node, -1))
    for _ in range(n):
        src = par[:, :n]
        tgt = torch.where((ns >= 0) & (src >= 0), ns, n)
        new = par.clone()
        new.scatter_(1, tgt, src)
        new[:, n] = -1
        if torch.equal(new, par):
            break
        par = new
    return par[:, :n].to(first_child.dtype)


def tree_to_paths(parents: torch.Tensor) -> torch.Tensor:
    """Root-to-leaf path matrix (``retrieve_indices`` in Medusa/EAGLE/SGLang terms).

    Args:
        parents: ``[B, N]`` int32/int64 canonical tree.

    Returns:
        ``[B, L, max_depth + 1]`` int64, ``L`` = largest number of leaves over the batch. Row ``l`` holds
        the node indices from the root to the ``l``-th leaf (leaves in increasing node index), -1 padded;
        missing leaves are all -1 rows.
    """
    par = _check_parents(parents)
    bsz, n = par.shape
    depth = _depths(par)
    active = depth >= 0
    has_child = torch.zeros(bsz, n + 1, dtype=torch.bool, device=par.device)
    has_child.scatter_(1, torch.where(par >= 0, par, n), torch.ones_like(active))
    leaf = active & ~has_child[:, :n]
    n_leaves = leaf.sum(1)
    n_l = int(n_leaves.max()) if bsz else 0
    width = int(depth.max()) + 1 if bsz else 1
    # leaf indices in increasing order, -1 padded
    order = torch.sort(torch.where(leaf, torch.arange(n, device=par.device), n), dim=1).values[:, :n_l]
    leaf_idx = torch.where(order < n, order, torch.full_like(order, -1))
    anc = _ancestors(par)
    rows = anc[torch.arange(bsz, device=par.device).unsqueeze(1), leaf_idx.clamp_min(0)]  # [B, L, N]
    rows &= (leaf_idx >= 0).unsqueeze(-1)
    out = torch.full((bsz, n_l, width + 1), -1, dtype=torch.long, device=par.device)
    col = torch.where(rows, depth.unsqueeze(1).expand_as(rows), width)
    out.scatter_(2, col, torch.arange(n, device=par.device).expand_as(rows).clone().masked_fill(~rows, -1))
    return out[:, :, :width]


def paths_to_tree(retrieve_indices: torch.Tensor, num_nodes: int, *, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Inverse of :func:`tree_to_paths`.

    Args:
        retrieve_indices: ``[B, L, D]`` int32/int64 root-to-leaf paths, -1 padded.
        num_nodes: ``N``; nodes on no path become padding nodes.
        dtype: dtype of the result (int32 by default, the canonical one).

    Returns:
        ``parents [B, N]``.
    """
    check_tensor("retrieve_indices", retrieve_indices, ndim=3, dtypes=INT_DTYPES)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
    ri = retrieve_indices.long()
    if debug_checks() and ri.numel() and (int(ri.min()) < -1 or int(ri.max()) >= num_nodes):
        raise ValueError(f"retrieve_indices values must lie in [-1, {num_nodes}), got range "
                         f"[{int(ri.min())}, {int(ri.max())}]")
    bsz = ri.shape[0]
    par = torch.full((bsz, num_nodes + 1), -1, dtype=torch.long, device=ri.device)
    if ri.shape[2] > 1:
        child, parent = ri[:, :, 1:], ri[:, :, :-1]
        ok = (child >= 0) & (parent >= 0)
        par.scatter_(1, torch.where(ok, child, num_nodes).flatten(1), torch.where(ok, parent, -1).flatten(1))
    return par[:, :num_nodes].to(dtype)


# ----------------------------------------------------------------------------------------------------
# positions and masks
# ----------------------------------------------------------------------------------------------------

def _prefix_tensor(prefix_len: PrefixLen, bsz: int, device, name: str = "prefix_len") -> torch.Tensor:
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dim() != 1 or prefix_len.shape[0] != bsz or prefix_len.dtype not in INT_DTYPES:
            raise ValueError(f"{name} must be an int or a [B={bsz}] int tensor, got {prefix_len.dtype} "
                             f"shape {tuple(prefix_len.shape)}")
        if debug_checks() and prefix_len.numel() and int(prefix_len.min()) < 0:
            raise ValueError(f"{name} must be >= 0, got min {int(prefix_len.min())}")
        return prefix_len.to(device=device, dtype=torch.long)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"{name} must be a non-negative int or a [B] int tensor, got {prefix_len!r}")
    return torch.full((bsz,), prefix_len, dtype=torch.long, device=device)


def tree_positions(parents: torch.Tensor, prefix_len: PrefixLen) -> torch.Tensor:
    """Position ids of tree nodes: ``prefix_len + depth``.

    Args:
        parents: ``[B, N]`` int32/int64 canonical tree.
        prefix_len: int, or ``[B]`` int tensor (e.g. number of real tokens of left-padded rows).
            The root is at position ``prefix_len``.

    Returns:
        ``[B, N]`` int64 (padding nodes get ``prefix_len``).
    """
    par = _check_parents(parents)
    pl = _prefix_tensor(prefix_len, par.shape[0], par.device)
    return pl.unsqueeze(1) + _depths(par).clamp_min(0)


def tree_attention_mask(
    parents: torch.Tensor,
    prefix_len: int,
    dtype: torch.dtype = torch.float32,
    *,
    prefix_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Additive 4D attention mask of a token tree after a cached prefix, for Hugging Face models.

    Node ``i`` attends to every prefix token (unless ``prefix_mask`` says it is padding) and to itself
    and its ancestors. Padding nodes attend to the prefix and to themselves (no fully masked rows).

    Args:
        parents: ``[B, N]`` int32/int64 canonical tree.
        prefix_len: int ``P``, number of cached tokens before the root.
        dtype: float dtype of the mask (the model's dtype).
        prefix_mask: optional ``[B, P]`` bool/int, HF ``attention_mask`` convention (1/True = real token,
            0 = padding).

    Returns:
        ``[B, 1, N, P + N]`` ``dtype``: 0 where attention is allowed, ``torch.finfo(dtype).min`` elsewhere.
    """
    par = _check_parents(parents)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a float dtype, got {dtype}")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be a non-negative int for tree_attention_mask, got {prefix_len!r}")
    bsz, n = par.shape
    allowed_tree = _ancestors(par)
    if prefix_mask is not None:
        check_tensor("prefix_mask", prefix_mask, ndim=2, device=par.device)
        if tuple(prefix_mask.shape) != (bsz, prefix_len):
            raise ValueError(f"prefix_mask must have shape (B={bsz}, prefix_len={prefix_len}), "
                             f"got {tuple(prefix_mask.shape)}")
        allowed_prefix = prefix_mask.bool().unsqueeze(1).expand(bsz, n, prefix_len)
    else:
        allowed_prefix = torch.ones(bsz, n, prefix_len, dtype=torch.bool, device=par.device)
    allowed = torch.cat([allowed_prefix, allowed_tree], dim=2)
    mask = torch.zeros(bsz, 1, n, prefix_len + n, dtype=dtype, device=par.device)
    return mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)


def tree_mask_packed(parents: torch.Tensor, *, word_bits: int = 32) -> torch.Tensor:
    """Bit-packed ``N x N`` tree mask for kernels.

    Bit ``j % word_bits`` of word ``j // word_bits`` of row ``i`` is set iff node ``j`` is node ``i`` or
    one of its ancestors (two's complement: the top bit makes a word negative).

    Args:
        parents: ``[B, N]`` int32/int64 canonical tree.
        word_bits: 32 (int32 words) or 64 (int64 words).

    Returns:
        ``[B, N, ceil(N / word_bits)]`` int32 or int64.
    """
    if word_bits not in (32, 64):
        raise ValueError(f"word_bits must be 32 or 64, got {word_bits!r}")
    par = _check_parents(parents)
    bsz, n = par.shape
    anc = _ancestors(par)
    words = -(-n // word_bits)
    pad = words * word_bits - n
    if pad:
        anc = torch.cat([anc, torch.zeros(bsz, n, pad, dtype=torch.bool, device=par.device)], dim=2)
    bits = torch.ones(word_bits, dtype=torch.long, device=par.device) << torch.arange(word_bits, device=par.device)
    packed = (anc.view(bsz, n, words, word_bits).long() * bits).sum(-1)  # distinct bits: sum == OR
    if word_bits == 32:
        packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
    return packed


def unpack_tree_mask(packed: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Inverse of :func:`tree_mask_packed`: ``[B, N, W]`` int32/int64 words -> ``[B, N, N]`` bool."""
    check_tensor("packed", packed, ndim=3, dtypes=INT_DTYPES)
    word_bits = 32 if packed.dtype == torch.int32 else 64
    bits = torch.arange(word_bits, device=packed.device)
    flat = ((packed.long().unsqueeze(-1) >> bits) & 1).bool().flatten(2)
    return flat[:, :, :num_nodes]


# ----------------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------------

def _check_tree_inputs(tokens, parents, name_v: str, v_tensor):
    par = _check_parents(parents)
    check_tensor("tokens", tokens, ndim=2, dtypes=INT_DTYPES, device=par.device)
    if tokens.shape != parents.shape:
        raise ValueError(f"tokens must have the shape of parents {tuple(parents.shape)}, got {tuple(tokens.shape)}")
    check_tensor(name_v, v_tensor, ndim=3, dtypes=FLOAT_DTYPES, device=par.device)
    if tuple(v_tensor.shape[:2]) != tuple(parents.shape) or v_tensor.shape[2] == 0:
        raise ValueError(f"{name_v} must have shape (B, N) = {tuple(parents.shape)} + (V,) with V >= 1, "
                         f"got {tuple(v_tensor.shape)}")
    vocab = v_tensor.shape[2]
    tok = tokens.long()
    if not debug_checks():
        return par, tok
    active = _active(par)
    bad = active & ((tok < 0) | (tok >= vocab))
    bad[:, 0] = False  # the root's token is never tested
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        raise IndexError(f"tokens of active nodes must lie in [0, V={vocab}), got tokens[{b}, {i}] = {int(tok[b, i])}")
    return par, tok


def _empty_outputs(bsz, width, device):
    accept_index = torch.full((bsz, width), -1, dtype=torch.long, device=device)
    accept_index[:, 0] = 0
    return (accept_index, torch.zeros(bsz, dtype=torch.long, device=device),
            torch.zeros(bsz, dtype=torch.long, device=device))


def verify_tree_greedy(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification: follow the child whose token equals the target's argmax, recursively.

    From the root: ``t = argmax(target_logits[b, cur])`` (lowest index on ties); move to the first child
    of ``cur`` (sibling order) whose token is ``t``; when none exists, ``t`` is the bonus token.

    Args:
        tokens: ``[B, N]`` int32/int64 node tokens.
        parents: ``[B, N]`` int32/int64 canonical tree.
        target_logits: ``[B, N, V]`` fp32/fp16/bf16, the target's logits AT each node (for the token
            after it). A NaN counts as the maximum (``torch.argmax``) on every backend; in debug mode the
            torch backend rejects a NaN argmax of a visited node.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Returns:
        ``(accept_index [B, max_depth + 1], accept_len [B], next_token [B])``, all int64.
    """
    par, tok = _check_tree_inputs(tokens, parents, "target_logits", target_logits)
    chosen = resolve_backend(backend, par.device, ("torch", "triton", "cuda"), "verify_tree_greedy")
    if chosen == "cuda":
        from tokprune.kernels.cuda import verify_tree_greedy_cuda

        return verify_tree_greedy_cuda(tok.contiguous(), par.to(torch.int32).contiguous(), target_logits)
    width = int(_depths(par).max()) + 1 if par.shape[0] else 1
    if chosen == "triton":
        from tokprune.kernels.triton.spec import verify_tree_greedy_triton

        first_child, next_sibling = tree_to_links(par)
        return verify_tree_greedy_triton(tok, first_child, next_sibling, target_logits, width)
    return _verify_greedy_torch(tok, par, target_logits, width)


def _verify_greedy_torch(tok, par, logits, width):
    bsz, n = par.shape
    device = par.device
    accept_index, accept_len, next_token = _empty_outputs(bsz, width, device)
    if bsz == 0:
        return accept_index, accept_len, next_token
    children, _ = _children(par)
    rows = torch.arange(bsz, device=device)
    cur = torch.zeros(bsz, dtype=torch.long, device=device)
    for step in range(width):
        row_logits = _node_rows(logits, rows, cur)
        t = row_logits.argmax(dim=-1)  # first maximal index; a NaN counts as the maximum
        if debug_checks() and bool(torch.isnan(row_logits.gather(1, t.unsqueeze(1))).any()):
            raise ValueError("target_logits contains NaN in the row of a visited node")
        if children.shape[-1]:
            cand = children[rows, cur]  # [R, K]
            match = (cand >= 0) & (tok[rows.unsqueeze(1), cand.clamp_min(0)] == t.unsqueeze(1))
            found = match.any(-1)
            nxt = cand.gather(1, match.int().argmax(-1, keepdim=True)).squeeze(1)
        else:
            found = torch.zeros_like(rows, dtype=torch.bool)
            nxt = cur
        stop = ~found
        next_token[rows[stop]] = t[stop]
        go = rows[found]
        if go.numel() == 0:
            break
        accept_index[go, step + 1] = nxt[found]
        accept_len[go] += 1
        rows, cur = go, nxt[found]
    return accept_index, accept_len, next_token


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> torch.Tensor:
    """Sampling distribution of ``logits [..., V]``: ``softmax(logits / temperature)`` restricted to the
    ``top_k`` largest logits (ties at the k-th value kept) and then to the smallest set of most likely
    tokens whose mass reaches ``top_p`` (a token is kept iff the mass strictly before it, in descending
    order, is below ``top_p``), renormalised. Returns float32 probabilities of the same shape."""
    x = logits.float() / temperature
    vocab = x.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def verify_tree_stochastic(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: Optional[torch.Tensor] = None,
    draft_probs: Optional[torch.Tensor] = None,
    *,
    rule: str = "specinfer",
    target_logits: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    uniforms: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless stochastic verification of a draft tree (the emitted tokens follow the target).

    At the current node (root first) with target row ``p`` and draft row ``q``, children are tested in
    sibling order with their own uniform ``u``; the first accepted child becomes the current node.

    * ``"specinfer"`` (siblings drawn i.i.d. from ``q``, with replacement): accept iff ``u q[x] < p[x]``;
      on rejection ``p <- norm(max(p - q, 0))``.
    * ``"rsd"`` (siblings drawn without replacement, e.g. Gumbel-top-k): same test; on rejection also
      ``q[x] <- 0; q <- norm(q)``.
    * ``"target_only"`` (deterministic drafts, e.g. top-k): accept iff ``u < p[x]``; on rejection
      ``p[x] <- 0; p <- norm(p)`` (so a duplicate sibling can never be accepted twice).

    When no child is accepted the bonus token is the smallest ``v`` with
    ``cumsum(p)[v] > uniforms[b, 0] * sum(p)``. The exact definition is the contract in this module's
    docstring.

    Args:
        tokens: ``[B, N]`` int32/int64 node tokens.
        parents: ``[B, N]`` int32/int64 canonical tree.
        target_probs: ``[B, N, V]`` float target distribution at each node (already post temperature /
            top-k / top-p; rows sum to 1). Give either this or ``target_logits``.
        draft_probs: ``[B, N, V]`` float distribution the children of each node were drawn from;
            required for ``"specinfer"`` and ``"rsd"``, ignored by ``"target_only"``.
        rule: ``"specinfer" | "rsd" | "target_only"``.
        target_logits: ``[B, N, V]`` target logits; ``temperature`` (> 0), ``top_k``, ``top_p`` are then
            applied inside the op (see :func:`process_logits`).
        uniforms: ``[B, N]`` float32 in ``[0, 1)``; ``uniforms[b, c]`` is node c's acceptance draw and
            ``uniforms[b, 0]`` drives the bonus token. Drawn from ``generator`` when omitted.
        generator: ``torch.Generator`` for the uniforms (reproducible runs).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Returns:
        ``(accept_index [B, max_depth + 1], accept_len [B], next_token [B])``, all int64.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if (target_probs is None) == (target_logits is None):
        raise ValueError("give exactly one of target_probs (already processed) and target_logits")
    target = target_probs if target_probs is not None else target_logits
    target_name = "target_probs" if target_probs is not None else "target_logits"
    par, tok = _check_tree_inputs(tokens, parents, target_name, target)
    if target_probs is not None and (temperature != 1.0 or top_k is not None or top_p is not None):
        raise ValueError("temperature, top_k and top_p apply to target_logits; target_probs must already be "
                         "processed")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use verify_tree_greedy for greedy decoding), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if rule != "target_only":
        if draft_probs is None:
            raise ValueError(f"rule={rule!r} needs draft_probs [B, N, V]")
        check_tensor("draft_probs", draft_probs, ndim=3, dtypes=FLOAT_DTYPES, device=par.device)
        if draft_probs.shape != target.shape:
            raise ValueError(f"draft_probs must have the shape of {target_name} {tuple(target.shape)}, "
                             f"got {tuple(draft_probs.shape)}")
    else:
        draft_probs = None
    bsz, n = par.shape
    if uniforms is None:
        uniforms = torch.rand(bsz, n, generator=generator, dtype=torch.float32,
                              device=generator.device if generator is not None else par.device).to(par.device)
    else:
        check_tensor("uniforms", uniforms, ndim=2, dtypes=(torch.float32,), device=par.device)
        if uniforms.shape != parents.shape:
            raise ValueError(f"uniforms must have shape {tuple(parents.shape)}, got {tuple(uniforms.shape)}")
        if debug_checks() and uniforms.numel() and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
            raise ValueError("uniforms must lie in [0, 1) (NaN is rejected)")
    chosen = resolve_backend(backend, par.device, ("torch", "triton", "cuda"), "verify_tree_stochastic")
    width = int(_depths(par).max()) + 1 if bsz else 1
    if chosen in ("cuda", "triton"):
        if target_logits is not None:
            target_probs = process_logits(target_logits, temperature, top_k, top_p)
        tp = target_probs.float().contiguous()
        dp = draft_probs.float().contiguous() if draft_probs is not None else None
        if chosen == "cuda":
            from tokprune.kernels.cuda import verify_tree_stochastic_cuda

            return verify_tree_stochastic_cuda(tok.contiguous(), par.to(torch.int32).contiguous(), tp,
                                               dp if dp is not None else tp, rule, uniforms.contiguous())
        from tokprune.kernels.triton.spec import verify_tree_stochastic_triton

        first_child, next_sibling = tree_to_links(par)
        return verify_tree_stochastic_triton(tok, first_child, next_sibling, tp, dp, rule, uniforms, width)
    if target_logits is not None:
        def target_rows(b, c):
            return process_logits(_node_rows(target_logits, b, c), temperature, top_k, top_p)
    else:
        def target_rows(b, c):
            return _node_rows(target_probs, b, c)
    return _verify_stochastic_torch(tok, par, target_rows, draft_probs, rule, uniforms, width)


def _normalise_(x: torch.Tensor) -> torch.Tensor:
    """In place: ``x / sum(x)`` on rows whose sum is positive; other rows unchanged."""
    total = x.sum(-1, keepdim=True)
    positive = total > 0
    if bool(positive.all()):
        return x.div_(total)
    return x.copy_(torch.where(positive, x / total, x))


def sample_from_probs(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: smallest ``v`` with ``cumsum(p)[v] > u * sum(p)``; if rounding leaves
    none, the last ``v`` with ``p[v] > 0`` (0 for an all-zero row). ``p [R, V]`` float32, ``u [R]``."""
    cum = torch.cumsum(p, dim=-1)
    thr = (u * p.sum(-1)).unsqueeze(1)
    v = torch.searchsorted(cum, thr, right=True).squeeze(1)
    vocab = p.shape[-1]
    over = v >= vocab
    if bool(over.any()):
        last_pos = torch.where(p[over] > 0, torch.arange(vocab, device=p.device), -1).amax(-1).clamp_min(0)
        v = v.clone()
        v[over] = last_pos
    return v


def _node_rows(x: torch.Tensor, rows: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """``x[rows, cur]`` of a ``[B, N, V]`` tensor as a fresh float32 ``[R, V]`` tensor."""
    if x.is_contiguous():
        out = x.view(-1, x.shape[-1]).index_select(0, rows * x.shape[1] + cur)
    else:
        out = x[rows, cur]
    return out.float() if out.dtype != torch.float32 else out


def _verify_stochastic_torch(tok, par, target_rows, draft_probs, rule, uniforms, width):
    bsz, n = par.shape
    device = par.device
    accept_index, accept_len, next_token = _empty_outputs(bsz, width, device)
    if bsz == 0:
        return accept_index, accept_len, next_token
    children, _ = _children(par)
    n_sib = children.shape[-1]
    rows = torch.arange(bsz, device=device)
    cur = torch.zeros(bsz, dtype=torch.long, device=device)
    for step in range(width):
        p = target_rows(rows, cur)  # fresh [R, V] float32, modified in place below
        if debug_checks() and bool(torch.isnan(p.sum(-1)).any()):  # one cheap pass: a NaN anywhere makes the row sum NaN
            raise ValueError("the target distribution contains NaN in the row of a visited node")
        q = _node_rows(draft_probs, rows, cur) if draft_probs is not None else None
        n_rows = rows.numel()
        kids = children[rows, cur] if n_sib else None  # [R, K]
        accepted = torch.full_like(rows, -1)
        searching = torch.ones_like(rows, dtype=torch.bool)
        for r in range(n_sib):
            c = kids[:, r]
            valid = (c >= 0) & searching
            if not bool(valid.any()):
                break
            cc = c.clamp_min(0)
            x = tok[rows, cc].unsqueeze(1)
            u = uniforms[rows, cc]
            px = p.gather(1, x).squeeze(1)
            if rule == "target_only":
                ok = u < px
            else:
                ok = u * q.gather(1, x).squeeze(1) < px
            acc = valid & ok
            accepted = torch.where(acc, c, accepted)
            searching &= ~acc
            ri = (valid & ~ok).nonzero().squeeze(1)
            if ri.numel() == 0:
                continue
            full = ri.numel() == n_rows  # every row rejected: update in place, no row selection
            xr = x if full else x.index_select(0, ri)
            ps = p if full else p.index_select(0, ri)
            if rule == "target_only":
                _normalise_(ps.scatter_(1, xr, 0.0))
            else:
                qs = q if full else q.index_select(0, ri)
                res = (ps - qs).clamp_min_(0)
                total = res.sum(-1, keepdim=True)
                positive = total > 0
                ps = res.div_(total) if bool(positive.all()) else torch.where(positive, res.div_(total), ps)
                if rule == "rsd":
                    _normalise_(qs.scatter_(1, xr, 0.0))
                    if not full:
                        q.index_copy_(0, ri, qs)
            if full:
                p = ps
            else:
                p.index_copy_(0, ri, ps)
        found = accepted >= 0
        stop = ~found
        if bool(stop.any()):
            next_token[rows[stop]] = sample_from_probs(p[stop], uniforms[rows[stop], 0])
        go = rows[found]
        if go.numel() == 0:
            break
        accept_index[go, step + 1] = accepted[found]
        accept_len[go] += 1
        rows, cur = go, accepted[found]
    return accept_index, accept_len, next_token


# ----------------------------------------------------------------------------------------------------
# KV-cache compaction
# ----------------------------------------------------------------------------------------------------

def _check_accept_index(accept_index, bsz, device) -> torch.Tensor:
    check_tensor("accept_index", accept_index, ndim=2, dtypes=INT_DTYPES, device=device)
    if accept_index.shape[0] != bsz or accept_index.shape[1] == 0:
        raise ValueError(f"accept_index must have shape (B={bsz}, W >= 1), got {tuple(accept_index.shape)}")
    ai = accept_index.long()
    if not debug_checks():
        return ai
    valid = ai >= 0
    # valid entries form a prefix of each row and strictly increase (a root-to-node path)
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("accept_index rows must be a prefix of node indices followed by -1 padding")
    if bool((valid[:, 1:] & (ai[:, 1:] <= ai[:, :-1])).any()):
        raise ValueError("accept_index rows must be strictly increasing node indices (a root-to-node path)")
    if bool((ai < -1).any()):
        raise ValueError("accept_index values must be >= -1")
    return ai


def compact_accepted_kv(
    cache: torch.Tensor,
    prefix_len: PrefixLen,
    accept_index: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Move the accepted path's KV rows into place, in place.

    The tree's N nodes sit at rows ``prefix_len + i`` of ``cache``. Row ``prefix_len[b] + j`` receives
    row ``prefix_len[b] + accept_index[b, j]`` for every valid ``j``; rows after the new length keep
    stale values.

    Args:
        cache: ``[B, H, T, D]`` float keys or values, modified in place.
        prefix_len: int or ``[B]`` int tensor, cache length before the tree (the root's row).
        accept_index: ``[B, W]`` int32/int64 accepted path (root first, -1 padded), as returned by the
            verify ops.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``[B]`` int64 new lengths ``prefix_len + accept_len + 1``.
    """
    check_tensor("cache", cache, ndim=4, dtypes=FLOAT_DTYPES + (torch.float64,))
    bsz, _, t, _ = cache.shape
    ai = _check_accept_index(accept_index, bsz, cache.device)
    pl = _prefix_tensor(prefix_len, bsz, cache.device)
    width = ai.shape[1]
    if debug_checks() and bsz and int((pl + torch.maximum(ai.amax(1), torch.full_like(pl, width - 1))).max()) >= t:
        raise IndexError(f"cache has T={t} rows, fewer than prefix_len + the accepted node / path width")
    chosen = resolve_backend(backend, cache.device, ("torch", "triton"), "compact_accepted_kv")
    lengths = pl + (ai >= 0).sum(1)
    if chosen == "triton":
        from tokprune.kernels.triton.spec import compact_accepted_kv_triton

        compact_accepted_kv_triton(cache, pl, ai)
        return lengths
    valid = ai >= 0
    dst = pl.unsqueeze(1) + torch.arange(width, device=cache.device)
    src = torch.where(valid, pl.unsqueeze(1) + ai, dst)
    h, d = cache.shape[1], cache.shape[3]
    rows = cache.gather(2, src.view(bsz, 1, width, 1).expand(bsz, h, width, d))
    cache.scatter_(2, dst.view(bsz, 1, width, 1).expand(bsz, h, width, d), rows)
    return lengths
