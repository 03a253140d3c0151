"""Python wrappers of the compiled extension ``tokprune._C`` (``csrc/``).

The extension takes raw pointers, shapes, element strides, dtype codes and a CUDA stream; this module
turns tensors into those arguments, checks shapes/devices/dtypes/strides with clear errors, allocates
outputs and workspaces, and registers every kernel as a ``torch.library`` custom op (namespace
``tokprune_ext``) with a fake implementation, so ``torch.compile`` can trace through them.

On CUDA tensors the ``.cu`` kernels run (on the current stream); on CPU tensors the host build of the
same ``__host__ __device__`` math runs (how the kernels are tested without a GPU).

Wrappers (inputs are expected to be validated by the public op in :mod:`tokprune.ops`; the checks
here guard the raw-pointer boundary):

* :func:`verify_tree_greedy_cuda` / :func:`verify_tree_stochastic_cuda` — speculative tree verification;
* :func:`sparse_decode_attention_cuda` — decode attention over a gathered token set;
* :func:`select_tokens_cuda` — fused top-k selection, indices sorted ascending.
"""

from __future__ import annotations

import contextlib
import math
from typing import Tuple

import torch

from tokprune import _ext

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
RULES = {"specinfer": 0, "rsd": 1, "target_only": 2}
MAX_HEAD_DIM = 256
NAMESPACE = "tokprune_ext"


def _lib():
    ext = _ext.extension()
    if ext is None:
        raise RuntimeError(f"the compiled extension tokprune._C is not available: {_ext.load_error()}")
    return ext


def _stream(device: torch.device) -> Tuple[bool, int]:
    if device.type == "cuda":
        return True, int(torch.cuda.current_stream(device).cuda_stream)
    if device.type != "cpu":
        raise ValueError(f"tokprune._C runs on cpu or cuda tensors, got device {device}")
    return False, 0


def _on_device(device: torch.device):
    """Make ``device`` current while a CUDA kernel is launched (the statically linked cudart of tokprune._C
    launches on the thread's current device, which torch sets here); a no-op for CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check(cond: bool, op: str, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(f"{op}: {msg}")


def _same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        _check(dev == first, op, f"{name} is on {dev} but {next(iter(devices))} is on {first}; "
                                 "all inputs must be on one device")
    return first


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_tree(op: str, tokens: torch.Tensor, parents: torch.Tensor, vocab: int) -> None:
    _check(tokens.dim() == 2, op, f"tokens must be (batch, nodes), got shape {tuple(tokens.shape)}")
    _check(parents.shape == tokens.shape, op,
           f"parents must have the shape of tokens {tuple(tokens.shape)}, got {tuple(parents.shape)}")
    _check(tokens.shape[1] >= 1, op, "the tree needs at least the root node (nodes >= 1)")
    for name, t in (("tokens", tokens), ("parents", parents)):
        _check(t.dtype in (torch.int32, torch.int64), op, f"{name} must be int32 or int64, got {t.dtype}", TypeError)
    if tokens.device.type == "cpu" and tokens.numel() and not torch.compiler.is_compiling():
        # host build: an out-of-range token would read out of bounds, so check (cheap on CPU).
        active = parents >= 0
        if bool(active.any()):
            t = tokens[active]
            lo, hi = int(t.min()), int(t.max())
            _check(lo >= 0 and hi < vocab, op, f"tokens of non-root nodes must lie in [0, {vocab}), got [{lo}, {hi}]",
                   IndexError)
        _check(int(parents.max()) < tokens.shape[1], op, "parents must be < number of nodes", IndexError)


def _tree_outputs(tokens: torch.Tensor):
    B, N = tokens.shape
    dev = tokens.device
    return (torch.empty(B, N, dtype=torch.int64, device=dev), torch.empty(B, dtype=torch.int64, device=dev),
            torch.empty(B, dtype=torch.int64, device=dev), torch.empty(B, N, dtype=torch.int32, device=dev),
            torch.zeros(B, dtype=torch.int32, device=dev))


def _finish_tree(accept, length, nxt, max_depth):
    width = int(max_depth.max()) + 1 if max_depth.numel() else 1
    return accept[:, :width].clone(), length, nxt


# ----------------------------------------------------------------------------------- verification
def _verify_tree_greedy_impl(tokens: torch.Tensor, parents: torch.Tensor,
                           target_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N = tokens.shape
    V = target_logits.shape[-1]
    tok = tokens.to(torch.int64).contiguous()
    par = parents.to(torch.int32).contiguous()
    logits = _last_dim_contiguous(target_logits)
    accept, length, nxt, depth, max_depth = _tree_outputs(tokens)
    on_cuda, stream = _stream(tokens.device)
    with _on_device(tokens.device):
        _lib().verify_tree_greedy(on_cuda, stream, B, N, V, tok.data_ptr(), par.data_ptr(), logits.data_ptr(),
                                  DTYPE_CODES[logits.dtype], logits.stride(0), logits.stride(1), accept.data_ptr(),
                                  length.data_ptr(), nxt.data_ptr(), depth.data_ptr(), max_depth.data_ptr())
    return _finish_tree(accept, length, nxt, max_depth)


def _tree_fake(tokens: torch.Tensor):
    B, N = tokens.shape
    width = torch.library.get_ctx().new_dynamic_size(min=1)
    return (tokens.new_empty((B, width), dtype=torch.int64), tokens.new_empty((B,), dtype=torch.int64),
            tokens.new_empty((B,), dtype=torch.int64))


def _verify_tree_greedy_fake(tokens, parents, target_logits):
    return _tree_fake(tokens)


def _verify_tree_stochastic_impl(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                               draft_probs: torch.Tensor, rule: str,
                               uniforms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N = tokens.shape
    V = target_probs.shape[-1]
    tok = tokens.to(torch.int64).contiguous()
    par = parents.to(torch.int32).contiguous()
    tp, dp = _last_dim_contiguous(target_probs), _last_dim_contiguous(draft_probs)
    uni = uniforms.contiguous()
    accept, length, nxt, depth, max_depth = _tree_outputs(tokens)
    on_cuda, stream = _stream(tokens.device)
    workspace = torch.empty(B, 2, V, dtype=torch.float32, device=tokens.device) if on_cuda else None
    with _on_device(tokens.device):
        _lib().verify_tree_stochastic(
            on_cuda, stream, B, N, V, RULES[rule], tok.data_ptr(), par.data_ptr(),
            tp.data_ptr(), tp.stride(0), tp.stride(1), dp.data_ptr(), dp.stride(0), dp.stride(1),
            uni.data_ptr(), 0 if workspace is None else workspace.data_ptr(), accept.data_ptr(),
            length.data_ptr(), nxt.data_ptr(), depth.data_ptr(), max_depth.data_ptr())
    return _finish_tree(accept, length, nxt, max_depth)


def _verify_tree_stochastic_fake(tokens, parents, target_probs, draft_probs, rule, uniforms):
    return _tree_fake(tokens)


def verify_tree_greedy_cuda(tokens: torch.Tensor, parents: torch.Tensor,
                            target_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree verification with tokprune._C (contract: tokprune.ops.spec / CONTRACTS).

    Args:
        tokens: ``(batch, nodes)`` int32/int64 draft tokens (node 0 = root, its token unused).
        parents: ``(batch, nodes)`` int32/int64; ``-1`` for the root and padding nodes.
        target_logits: ``(batch, nodes, vocab)`` fp32/fp16/bf16, last dim contiguous (else copied).

    Returns:
        ``accept_index (batch, max_depth + 1)``, ``accept_len (batch,)``, ``next_token (batch,)``, int64.
    """
    op = "verify_tree_greedy"
    _check(target_logits.dim() == 3 and target_logits.shape[:2] == tokens.shape, op,
           f"target_logits must be (batch, nodes, vocab) with (batch, nodes) = {tuple(tokens.shape)}, "
           f"got {tuple(target_logits.shape)}")
    _check(target_logits.dtype in DTYPE_CODES, op,
           f"target_logits must be float32/float16/bfloat16, got {target_logits.dtype}", TypeError)
    _check(target_logits.shape[-1] >= 1, op, "vocab must be >= 1")
    _same_device(op, tokens=tokens, parents=parents, target_logits=target_logits)
    _check_tree(op, tokens, parents, target_logits.shape[-1])
    return _call("verify_tree_greedy", _verify_tree_greedy_impl, tokens, parents, target_logits)


def verify_tree_stochastic_cuda(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                                draft_probs: torch.Tensor, rule: str,
                                uniforms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stochastic tree verification (``rule`` in ``specinfer | rsd | target_only``) with tokprune._C.

    Args:
        tokens, parents: ``(batch, nodes)`` int32/int64 as in :func:`verify_tree_greedy_cuda`.
        target_probs, draft_probs: ``(batch, nodes, vocab)`` float32 distributions at each node.
        rule: acceptance rule.
        uniforms: ``(batch, nodes)`` float32 in ``[0, 1)``; node c's value drives c's test, the root's
            value drives the bonus sample.

    Returns:
        ``accept_index (batch, max_depth + 1)``, ``accept_len (batch,)``, ``next_token (batch,)``, int64.
    """
    op = "verify_tree_stochastic"
    _check(rule in RULES, op, f"rule must be one of {tuple(RULES)}, got {rule!r}")
    for name, t in (("target_probs", target_probs), ("draft_probs", draft_probs)):
        _check(t.dim() == 3 and t.shape[:2] == tokens.shape, op,
               f"{name} must be (batch, nodes, vocab) with (batch, nodes) = {tuple(tokens.shape)}, "
               f"got {tuple(t.shape)}")
        _check(t.dtype == torch.float32, op, f"{name} must be float32, got {t.dtype}", TypeError)
    _check(target_probs.shape == draft_probs.shape, op,
           f"draft_probs {tuple(draft_probs.shape)} must match target_probs {tuple(target_probs.shape)}")
    _check(target_probs.shape[-1] >= 1, op, "vocab must be >= 1")
    _check(uniforms.shape == tokens.shape, op,
           f"uniforms must have the shape of tokens {tuple(tokens.shape)}, got {tuple(uniforms.shape)}")
    _check(uniforms.dtype == torch.float32, op, f"uniforms must be float32, got {uniforms.dtype}", TypeError)
    _same_device(op, tokens=tokens, parents=parents, target_probs=target_probs, draft_probs=draft_probs,
                 uniforms=uniforms)
    _check_tree(op, tokens, parents, target_probs.shape[-1])
    return _call("verify_tree_stochastic", _verify_tree_stochastic_impl, tokens, parents, target_probs, draft_probs, rule, uniforms)


# ------------------------------------------------------------------------------- sparse attention
def attention_splits(batch_heads: int, n_selected: int) -> int:
    """Split-K factor of the CUDA kernel: enough blocks to fill ~2 waves of an H100, >= 32 tokens a split."""
    if n_selected <= 0:
        return 1
    return max(1, min(64, math.ceil(n_selected / 32), math.ceil(264 / max(batch_heads, 1))))


def _sparse_decode_attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                indices: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, _, D = q.shape
    Hkv, Hi, K = k_cache.shape[1], indices.shape[1], indices.shape[2]
    qq, kk, vv = _last_dim_contiguous(q), _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache)
    idx = indices.to(torch.int32).contiguous()
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    on_cuda, stream = _stream(q.device)
    splits = attention_splits(B * H, K) if on_cuda else 1
    workspace = torch.empty(B * H * splits * (D + 2), dtype=torch.float32, device=q.device) if on_cuda else None
    with _on_device(q.device):
        _lib().sparse_decode_attention(
            on_cuda, stream, B, H, Hkv, Hi, K, D, DTYPE_CODES[q.dtype], float(scale),
            qq.data_ptr(), qq.stride(0), qq.stride(1), kk.data_ptr(), kk.stride(0), kk.stride(1), kk.stride(2),
            vv.data_ptr(), vv.stride(0), vv.stride(1), vv.stride(2), idx.data_ptr(), out.data_ptr(), splits,
            0 if workspace is None else workspace.data_ptr())
    return out


def _sparse_decode_attention_fake(q, k_cache, v_cache, indices, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def sparse_decode_attention_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention of one query token over selected cached tokens, with tokprune._C.

    Args:
        q: ``(batch, heads, 1, head_dim)`` fp32/fp16/bf16, ``head_dim <= 256``.
        k_cache, v_cache: ``(batch, kv_heads, seq, head_dim)`` same dtype (any strides; last dim
            contiguous or it is copied). ``heads`` is a multiple of ``kv_heads``.
        indices: ``(batch, kv_heads or heads, n_selected)`` int32/int64 token indices; ``< 0`` = padding.
        scale: softmax scale.

    Returns:
        ``(batch, heads, 1, head_dim)`` in q's dtype; a row with no valid index is zeros.
    """
    op = "sparse_decode_attention"
    _check(q.dim() == 4 and q.shape[2] == 1, op, f"q must be (batch, heads, 1, head_dim), got {tuple(q.shape)}")
    _check(q.dtype in DTYPE_CODES, op, f"q must be float32/float16/bfloat16, got {q.dtype}", TypeError)
    B, H, _, D = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(t.dim() == 4 and t.shape[0] == B and t.shape[3] == D, op,
               f"{name} must be (batch={B}, kv_heads, seq, head_dim={D}), got {tuple(t.shape)}")
        _check(t.dtype == q.dtype, op, f"{name} must have q's dtype {q.dtype}, got {t.dtype}", TypeError)
    _check(k_cache.shape == v_cache.shape, op,
           f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}")
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    _check(Hkv >= 1 and H % Hkv == 0, op, f"heads={H} must be a multiple of kv_heads={Hkv}")
    _check(1 <= D <= MAX_HEAD_DIM, op, f"head_dim={D} must be in [1, {MAX_HEAD_DIM}]")
    _check(indices.dim() == 3 and indices.shape[0] == B and indices.shape[1] in (Hkv, H), op,
           f"indices must be (batch={B}, kv_heads={Hkv} or heads={H}, n_selected), got {tuple(indices.shape)}")
    _check(indices.dtype in (torch.int32, torch.int64), op, f"indices must be int32 or int64, got {indices.dtype}",
           TypeError)
    _same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, indices=indices)
    if q.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling():
        hi = int(indices.max())
        _check(hi < T, op, f"indices must be < seq={T} (negative = padding), got max {hi}", IndexError)
    return _call("sparse_decode_attention", _sparse_decode_attention_impl, q, k_cache, v_cache, indices, float(scale))


# -------------------------------------------------------------------------------------- top-k
def _select_tokens_impl(scores: torch.Tensor, keep: int) -> torch.Tensor:
    R, N = scores.shape
    keep = min(keep, N)
    out = torch.empty(R, keep, dtype=torch.int64, device=scores.device)
    on_cuda, stream = _stream(scores.device)
    with _on_device(scores.device):
        _lib().select_tokens(on_cuda, stream, R, N, keep, scores.data_ptr(), out.data_ptr())
    return out


def _select_tokens_fake(scores, keep):
    return scores.new_empty((scores.shape[0], min(keep, scores.shape[1])), dtype=torch.int64)


def select_tokens_cuda(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``min(keep, n)`` largest scores per row, ties to the lower index, sorted ascending.

    Args:
        scores: ``(rows, n)`` float32, contiguous, no NaN (``-inf`` sorts last, ``+inf`` first).
        keep: ``>= 0``.

    Returns:
        ``(rows, min(keep, n))`` int64.
    """
    op = "select_tokens"
    _check(scores.dim() == 2, op, f"scores must be (rows, n_tokens), got shape {tuple(scores.shape)}")
    _check(scores.dtype == torch.float32, op, f"scores must be float32, got {scores.dtype}", TypeError)
    _check(scores.is_contiguous(), op, "scores must be contiguous")
    _check(isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0, op,
           f"keep must be a non-negative int, got {keep!r}")
    return _call("select_tokens", _select_tokens_impl, scores, keep)


# ------------------------------------------------------------------------------ torch.library ops
def _register(name, impl, fake):
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


_verify_tree_greedy_op = _register("verify_tree_greedy", _verify_tree_greedy_impl, _verify_tree_greedy_fake)
_verify_tree_stochastic_op = _register("verify_tree_stochastic", _verify_tree_stochastic_impl,
                                       _verify_tree_stochastic_fake)
_sparse_decode_attention_op = _register("sparse_decode_attention", _sparse_decode_attention_impl,
                                        _sparse_decode_attention_fake)
_select_tokens_op = _register("select_tokens", _select_tokens_impl, _select_tokens_fake)


def _call(name, impl, *args):
    """Under torch.compile go through the registered op (traced with its fake); in eager call the
    implementation directly (the same code, without the dispatcher's one-off import of torch._dynamo)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.tokprune_ext, name)(*args)
    return impl(*args)


__all__ = ["verify_tree_greedy_cuda", "verify_tree_stochastic_cuda", "sparse_decode_attention_cuda",
           "select_tokens_cuda", "attention_splits", "DTYPE_CODES", "RULES"]
