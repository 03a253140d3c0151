"""Token-tree verification and accepted-path KV compaction (one program per request).

The tree arrives as first-child / next-sibling links (computed by :mod:`tokprune.ops.spec`), so a
program walks the children of its current node in sibling order with scalar loads. Rows of the
vocabulary are processed in chunks of ``BLOCK_V`` so that any vocabulary size (128k+) works; the
stochastic kernel keeps its working distributions ``p`` and ``q`` in a global scratch buffer of one
row per request. Semantics: the contract in :mod:`tokprune.ops.spec`, oracle: :mod:`tokprune.reference.spec`.

GPU occupancy: one program per request walks the tree serially and reduces the vocabulary in
``BLOCK_V`` chunks, so at batch 1 a single SM works. Splitting the vocabulary reduction over several
programs would need a grid-wide exchange per tree level (a second launch or a cooperative grid);
it is not done here. The CUDA kernel of :mod:`tokprune._C` has the same one-block-per-request shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokprune._codes import RULE_IDS
from tokprune.kernels.triton._launch import launch
from tokprune.kernels.triton.aot import LaunchConfig, register_aot, type_variants

_BLOCK_V = 1024
_NUM_WARPS = 4


@triton.jit
def _row_argmax(row_ptr, vocab, BLOCK_V: tl.constexpr):
    """argmax of a row of ``vocab`` values with ``torch.argmax``'s rule: NaN is larger than every
    number, and the lowest index wins among equal maxima (or among NaNs).

    Per-lane running maximum, one final reduction: a lane keeps its earliest maximum (a NaN replaces
    a number, never another NaN); if any lane holds a NaN the lowest NaN index wins, else the lowest
    index among the lanes holding the largest number. ``tl.max`` alone would drop NaNs (GPU
    ``fmax`` returns the other operand), so NaNs are handled explicitly.
    """
    offs = tl.arange(0, BLOCK_V)
    acc_val = tl.full([BLOCK_V], -float("inf"), dtype=tl.float32)
    acc_idx = offs
    for v0 in range(0, vocab, BLOCK_V):
        idx = v0 + offs
        vals = tl.load(row_ptr + idx, mask=idx < vocab, other=-float("inf")).to(tl.float32)
        better = (vals > acc_val) | ((vals != vals) & (acc_val == acc_val))
        acc_idx = tl.where(better, idx, acc_idx)
        acc_val = tl.where(better, vals, acc_val)
    is_nan = acc_val != acc_val
    any_nan = tl.max(is_nan.to(tl.int32), axis=0)
    best = tl.max(tl.where(is_nan, -float("inf"), acc_val), axis=0)
    winner = tl.where(any_nan > 0, is_nan, acc_val == best)
    return tl.min(tl.where(winner, acc_idx, 2147483647), axis=0)


@triton.jit
def _verify_greedy_kernel(
    tokens_ptr, first_child_ptr, next_sibling_ptr, logits_ptr,
    accept_index_ptr, accept_len_ptr, next_token_ptr,
    n_nodes, vocab, width,
    stride_tb, stride_lb, stride_ln, stride_ab,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tok_row = tokens_ptr + b * stride_tb
    fc_row = first_child_ptr + b * n_nodes
    ns_row = next_sibling_ptr + b * n_nodes
    cur = 0
    length = 0
    searching = 1
    while searching == 1:
        t = _row_argmax(logits_ptr + b * stride_lb + cur.to(tl.int64) * stride_ln, vocab, BLOCK_V)
        c = tl.load(fc_row + cur)
        found = -1
        while (c >= 0) & (found < 0):
            x = tl.load(tok_row + c)
            found = tl.where(x == t, c, found)
            c = tl.load(ns_row + c)
        if found >= 0:
            length += 1
            tl.store(accept_index_ptr + b * stride_ab + length, found.to(tl.int64))
            cur = found
        else:
            tl.store(next_token_ptr + b, t.to(tl.int64))
            searching = 0
    tl.store(accept_len_ptr + b, length.to(tl.int64))


@triton.jit
def _load_rows(src_ptr, dst_ptr, vocab, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, vocab, BLOCK_V):
        idx = v0 + offs
        m = idx < vocab
        tl.store(dst_ptr + idx, tl.load(src_ptr + idx, mask=m, other=0.0), mask=m)


@triton.jit
def _row_sum(ptr, vocab, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        idx = v0 + offs
        acc += tl.load(ptr + idx, mask=idx < vocab, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _residual_update(p_ptr, q_ptr, vocab, BLOCK_V: tl.constexpr):
    """p <- max(p - q, 0) / sum(...) when the sum is positive."""
    offs = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        idx = v0 + offs
        m = idx < vocab
        r = tl.maximum(tl.load(p_ptr + idx, mask=m, other=0.0) - tl.load(q_ptr + idx, mask=m, other=0.0), 0.0)
        acc += r
    s = tl.sum(acc, axis=0)
    if s > 0:
        tl.debug_barrier()
        for v0 in range(0, vocab, BLOCK_V):
            idx = v0 + offs
            m = idx < vocab
            r = tl.maximum(tl.load(p_ptr + idx, mask=m, other=0.0) - tl.load(q_ptr + idx, mask=m, other=0.0), 0.0)
            tl.store(p_ptr + idx, r / s, mask=m)
    tl.debug_barrier()


@triton.jit
def _zero_and_normalise(ptr, x, vocab, BLOCK_V: tl.constexpr):
    """row[x] <- 0; row <- row / sum(row) when the sum is positive."""
    tl.store(ptr + x, 0.0)
    tl.debug_barrier()
    s = _row_sum(ptr, vocab, BLOCK_V)
    if s > 0:
        offs = tl.arange(0, BLOCK_V)
        for v0 in range(0, vocab, BLOCK_V):
            idx = v0 + offs
            m = idx < vocab
            tl.store(ptr + idx, tl.load(ptr + idx, mask=m, other=0.0) / s, mask=m)
    tl.debug_barrier()


@triton.jit
def _verify_stochastic_kernel(
    tokens_ptr, first_child_ptr, next_sibling_ptr, target_ptr, draft_ptr, uniforms_ptr,
    p_ptr, q_ptr,
    accept_index_ptr, accept_len_ptr, next_token_ptr,
    n_nodes, vocab, width,
    stride_tb, stride_pb, stride_pn, stride_ub, stride_ab,
    RULE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tok_row = tokens_ptr + b * stride_tb
    fc_row = first_child_ptr + b * n_nodes
    ns_row = next_sibling_ptr + b * n_nodes
    u_row = uniforms_ptr + b * stride_ub
    p_row = p_ptr + b * vocab
    q_row = q_ptr + b * vocab
    cur = 0
    length = 0
    searching = 1
    while searching == 1:
        row_off = b * stride_pb + cur.to(tl.int64) * stride_pn
        _load_rows(target_ptr + row_off, p_row, vocab, BLOCK_V)
        if RULE != 2:
            _load_rows(draft_ptr + row_off, q_row, vocab, BLOCK_V)
        tl.debug_barrier()
        c = tl.load(fc_row + cur)
        accepted = -1
        while (c >= 0) & (accepted < 0):
            x = tl.load(tok_row + c).to(tl.int64)
            u = tl.load(u_row + c)
            px = tl.load(p_row + x)
            if RULE == 2:
                ok = u < px
            else:
                ok = u * tl.load(q_row + x) < px
            # Every thread of the program reads the scalars p[x] and q[x] from the scratch rows above;
            # the next write to those rows comes right after (residual update / zeroing on rejection,
            # or the next level's _load_rows once a child is accepted). Warps run independently, so
            # without this barrier a fast warp could overwrite p/q before a slow one has read p[x],
            # and the warps would disagree on acceptance (wrong path, or a hang at a later barrier).
            # The Triton interpreter runs a program as one thread and cannot show this race: the fix
            # is by construction (the CUDA kernel has the same barrier).
            tl.debug_barrier()
            if ok:
                accepted = c
            else:
                if RULE == 2:
                    _zero_and_normalise(p_row, x, vocab, BLOCK_V)
                else:
                    _residual_update(p_row, q_row, vocab, BLOCK_V)
                    if RULE == 1:
                        _zero_and_normalise(q_row, x, vocab, BLOCK_V)
                c = tl.load(ns_row + c)
        if accepted >= 0:
            length += 1
            tl.store(accept_index_ptr + b * stride_ab + length, accepted.to(tl.int64))
            cur = accepted
        else:
            searching = 0
    # bonus token: smallest v with cumsum(p)[v] > u0 * sum(p); else the last v with p[v] > 0
    total = _row_sum(p_row, vocab, BLOCK_V)
    thr = tl.load(u_row) * total
    offs = tl.arange(0, BLOCK_V)
    running = 0.0
    pick = 2147483647
    last_pos = 0
    for v0 in range(0, vocab, BLOCK_V):
        idx = v0 + offs
        m = idx < vocab
        vals = tl.load(p_row + idx, mask=m, other=0.0)
        cum = running + tl.cumsum(vals, axis=0)
        pick = tl.minimum(pick, tl.min(tl.where(m & (cum > thr), idx, 2147483647), axis=0))
        last_pos = tl.maximum(last_pos, tl.max(tl.where(m & (vals > 0), idx, 0), axis=0))
        running = running + tl.sum(vals, axis=0)
    pick = tl.where(pick < vocab, pick, last_pos)
    tl.store(next_token_ptr + b, pick.to(tl.int64))
    tl.store(accept_len_ptr + b, length.to(tl.int64))


@triton.jit
def _compact_kv_kernel(
    cache_ptr, prefix_ptr, accept_ptr,
    n_heads, width, head_dim,
    stride_cb, stride_ch, stride_ct, stride_cd, stride_ab,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_heads).to(tl.int64)
    h = (pid % n_heads).to(tl.int64)
    base = cache_ptr + b * stride_cb + h * stride_ch
    pl = tl.load(prefix_ptr + b)
    offs = tl.arange(0, BLOCK_D)
    # destinations j never exceed sources accept[j] (paths are increasing), and a program handles its
    # rows in order, so moving in place row by row is safe.
    for j in range(0, width):
        node = tl.load(accept_ptr + b * stride_ab + j)
        if (node >= 0) & (node != j):
            for d0 in range(0, head_dim, BLOCK_D):
                dm = (d0 + offs) < head_dim
                row = tl.load(base + (pl + node) * stride_ct + (d0 + offs) * stride_cd, mask=dm)
                tl.store(base + (pl + j) * stride_ct + (d0 + offs) * stride_cd, row, mask=dm)


def _links(first_child, next_sibling):
    return first_child.to(torch.int32).contiguous(), next_sibling.to(torch.int32).contiguous()


def _outputs(bsz, width, device):
    accept_index = torch.full((bsz, width), -1, dtype=torch.int64, device=device)
    accept_index[:, 0] = 0
    return (accept_index, torch.zeros(bsz, dtype=torch.int64, device=device),
            torch.zeros(bsz, dtype=torch.int64, device=device))


def verify_tree_greedy_triton(tokens, first_child, next_sibling, target_logits, width):
    """Launcher; inputs validated by :func:`tokprune.ops.verify_tree_greedy`."""
    bsz, n_nodes, vocab = target_logits.shape
    accept_index, accept_len, next_token = _outputs(bsz, width, tokens.device)
    if bsz == 0:
        return accept_index, accept_len, next_token
    tok = tokens.to(torch.int64).contiguous()
    fc, ns = _links(first_child, next_sibling)
    logits = target_logits if target_logits.stride(-1) == 1 else target_logits.contiguous()
    launch(_verify_greedy_kernel, (bsz,), logits.device,
           tok, fc, ns, logits, accept_index, accept_len, next_token,
           n_nodes, vocab, width,
           tok.stride(0), logits.stride(0), logits.stride(1), accept_index.stride(0),
           BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS, num_stages=1)
    return accept_index, accept_len, next_token


def verify_tree_stochastic_triton(tokens, first_child, next_sibling, target_probs, draft_probs, rule, uniforms,
                                  width):
    """Launcher; ``target_probs``/``draft_probs`` contiguous float32 (``draft_probs`` may be None for
    ``target_only``). Inputs validated by :func:`tokprune.ops.verify_tree_stochastic`."""
    bsz, n_nodes, vocab = target_probs.shape
    accept_index, accept_len, next_token = _outputs(bsz, width, tokens.device)
    if bsz == 0:
        return accept_index, accept_len, next_token
    tok = tokens.to(torch.int64).contiguous()
    fc, ns = _links(first_child, next_sibling)
    tp = target_probs.float().contiguous()
    dp = tp if draft_probs is None else draft_probs.float().contiguous()
    u = uniforms.float().contiguous()
    scratch = torch.empty(2, bsz, vocab, dtype=torch.float32, device=tokens.device)
    launch(_verify_stochastic_kernel, (bsz,), tp.device,
           tok, fc, ns, tp, dp, u, scratch[0], scratch[1], accept_index, accept_len, next_token,
           n_nodes, vocab, width,
           tok.stride(0), tp.stride(0), tp.stride(1), u.stride(0), accept_index.stride(0),
           RULE=RULE_IDS[rule], BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS, num_stages=1)
    return accept_index, accept_len, next_token


def _compact_block_d(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def compact_accepted_kv_triton(cache, prefix_len, accept_index) -> None:
    """In-place launcher; ``prefix_len [B]`` int64, ``accept_index [B, W]`` int64 (validated)."""
    bsz, n_heads, _, head_dim = cache.shape
    if cache.numel() == 0:
        return
    pl = prefix_len.to(torch.int64).contiguous()
    ai = accept_index.to(torch.int64).contiguous()
    launch(_compact_kv_kernel, (bsz * n_heads,), cache.device,
           cache, pl, ai, n_heads, ai.shape[1], head_dim, *cache.stride(), ai.stride(0),
           BLOCK_D=_compact_block_d(head_dim), num_warps=2, num_stages=1)


def _register() -> None:
    greedy_sig = {"tokens_ptr": "*i64", "first_child_ptr": "*i32", "next_sibling_ptr": "*i32",
                  "logits_ptr": "*fp32", "accept_index_ptr": "*i64", "accept_len_ptr": "*i64",
                  "next_token_ptr": "*i64", "n_nodes": "i32", "vocab": "i32", "width": "i32",
                  "stride_tb": "i64", "stride_lb": "i64", "stride_ln": "i64", "stride_ab": "i64"}
    for dtype, _, modes in type_variants(with_index=False, wide=("bf16",)):  # logits in the model's dtype
        register_aot("spec", _verify_greedy_kernel, {**greedy_sig, "logits_ptr": f"*{dtype}"},
                     [LaunchConfig({"BLOCK_V": _BLOCK_V}, num_warps=_NUM_WARPS, num_stages=1)],
                     strides=modes, variant=dtype)
    stoch_sig = {"tokens_ptr": "*i64", "first_child_ptr": "*i32", "next_sibling_ptr": "*i32",
                 "target_ptr": "*fp32", "draft_ptr": "*fp32", "uniforms_ptr": "*fp32",
                 "p_ptr": "*fp32", "q_ptr": "*fp32",
                 "accept_index_ptr": "*i64", "accept_len_ptr": "*i64", "next_token_ptr": "*i64",
                 "n_nodes": "i32", "vocab": "i32", "width": "i32",
                 "stride_tb": "i64", "stride_pb": "i64", "stride_pn": "i64", "stride_ub": "i64", "stride_ab": "i64"}
    register_aot("spec", _verify_stochastic_kernel, stoch_sig,  # probabilities are cast to fp32 first
                 [LaunchConfig({"RULE": r, "BLOCK_V": _BLOCK_V}, num_warps=_NUM_WARPS, num_stages=1)
                  for r in sorted(RULE_IDS.values())], strides=("i32", "i64"), variant="fp32")
    compact_sig = {"cache_ptr": "*fp32", "prefix_ptr": "*i64", "accept_ptr": "*i64",
                   "n_heads": "i32", "width": "i32", "head_dim": "i32",
                   "stride_cb": "i64", "stride_ch": "i64", "stride_ct": "i64", "stride_cd": "i64", "stride_ab": "i64"}
    for dtype, _, modes in type_variants(with_index=False, wide=("bf16",)):
        register_aot("spec", _compact_kv_kernel, {**compact_sig, "cache_ptr": f"*{dtype}"},
                     [LaunchConfig({"BLOCK_D": bd}, num_warps=2, num_stages=1) for bd in (64, 128)],
                     strides=modes, unit=("stride_cd",), variant=dtype)


_register()
