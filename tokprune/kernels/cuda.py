"""Python wrappers of the compiled extension ``tokprune._C`` (``csrc/``).

The extension takes raw pointers, shapes, element strides, dtype codes and a CUDA stream; this module
turns tensors into the bound argument structs (``VerifyArgs``, ``AttentionArgs``, ``TopkArgs``), allocates
outputs and workspaces, and registers every kernel as a ``torch.library`` custom op (namespace
``tokprune_ext``) with a fake implementation, so ``torch.compile`` can trace through them.

On CUDA tensors the ``.cu`` kernels run (on the current stream); on CPU tensors the host build of the
same ``__host__ __device__`` math runs (how the kernels are tested without a GPU).

Wrappers. Inputs are validated once, by the public op in :mod:`tokprune.ops` (shapes, dtypes, devices
always; index ranges in debug mode); these wrappers and the binding trust it (the binding keeps only
cheap asserts that stop a wrong call from touching foreign memory). Call the ops, not these, from
user code:

* :func:`verify_tree_greedy_cuda` / :func:`verify_tree_stochastic_cuda` — speculative tree verification;
* :func:`sparse_decode_attention_cuda` — decode attention over a gathered token set;
* :func:`select_tokens_cuda` — fused top-k selection, indices sorted ascending;
* :func:`paged_fasa_decode_host` — fused paged FASA decode step (host build only, per-call std::threads);
* :func:`small_m_linear_host` — fp32 ``x @ W^T (+ bias)`` for a few rows (host build only, OpenMP threads);
  :class:`SmallMLinearBound` — the same with the weight bound once (less Python per call).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Optional, Tuple

import torch

from tokprune import _ext
from tokprune._codes import ATTN_MAX_HEAD_DIM, DTYPES, RULE_IDS
from tokprune._debug import debug_checks

DTYPE_CODES = {getattr(torch, name): code for name, code in DTYPES.items()}
RULES = RULE_IDS
MAX_HEAD_DIM = ATTN_MAX_HEAD_DIM
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


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def sync_launches() -> bool:
    """Whether CUDA launches of tokprune._C synchronise their stream and raise a kernel fault at the op that
    caused it: in debug mode (:func:`tokprune._debug.debug_checks`, ``TOKPRUNE_DEBUG=1``) or with
    ``TOKPRUNE_CUDA_SYNC=1``. Off by default (a synchronisation per launch stalls the decode loop)."""
    return debug_checks() or os.environ.get("TOKPRUNE_CUDA_SYNC", "0") not in ("", "0")


def _args(cls_name: str, **fields):
    """A bound argument struct of tokprune._C (``VerifyArgs``, ``AttentionArgs``, ``TopkArgs``)."""
    args = getattr(_lib(), cls_name)()
    for name, value in fields.items():
        setattr(args, name, value)
    return args


def _launch(op: str, args, device: torch.device) -> None:
    on_cuda, stream = _stream(device)
    with _on_device(device):
        getattr(_lib(), op)(args, on_cuda, stream, on_cuda and sync_launches())


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
    args = _args("VerifyArgs", B=B, N=N, V=V, tokens=tok.data_ptr(), parents=par.data_ptr(),
                 logits=logits.data_ptr(), dtype=DTYPE_CODES[logits.dtype], l_sb=logits.stride(0),
                 l_sn=logits.stride(1), accept_index=accept.data_ptr(), accept_len=length.data_ptr(),
                 next_token=nxt.data_ptr(), depth=depth.data_ptr(), max_depth=max_depth.data_ptr())
    _launch("verify_tree_greedy", args, tokens.device)
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
    on_cuda = tokens.device.type == "cuda"
    workspace = torch.empty(B, 2, V, dtype=torch.float32, device=tokens.device) if on_cuda else None
    args = _args("VerifyArgs", B=B, N=N, V=V, rule=RULES[rule], tokens=tok.data_ptr(), parents=par.data_ptr(),
                 target=tp.data_ptr(), t_sb=tp.stride(0), t_sn=tp.stride(1), draft=dp.data_ptr(),
                 d_sb=dp.stride(0), d_sn=dp.stride(1), uniforms=uni.data_ptr(),
                 workspace=0 if workspace is None else workspace.data_ptr(), accept_index=accept.data_ptr(),
                 accept_len=length.data_ptr(), next_token=nxt.data_ptr(), depth=depth.data_ptr(),
                 max_depth=max_depth.data_ptr())
    _launch("verify_tree_stochastic", args, tokens.device)
    return _finish_tree(accept, length, nxt, max_depth)


def _verify_tree_stochastic_fake(tokens, parents, target_probs, draft_probs, rule, uniforms):
    return _tree_fake(tokens)


def verify_tree_greedy_cuda(tokens: torch.Tensor, parents: torch.Tensor,
                            target_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree verification with tokprune._C (contract: the docstring of :mod:`tokprune.ops.spec`).

    Args:
        tokens: ``(batch, nodes)`` int32/int64 draft tokens (node 0 = root, its token unused).
        parents: ``(batch, nodes)`` int32/int64; ``-1`` for the root and padding nodes.
        target_logits: ``(batch, nodes, vocab)`` fp32/fp16/bf16, last dim contiguous (else copied).

    Returns:
        ``accept_index (batch, max_depth + 1)``, ``accept_len (batch,)``, ``next_token (batch,)``, int64.
    """
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
    on_cuda = q.device.type == "cuda"
    splits = attention_splits(B * H, K) if on_cuda else 1
    workspace = torch.empty(B * H * splits * (D + 2), dtype=torch.float32, device=q.device) if on_cuda else None
    args = _args("AttentionArgs", B=B, H=H, Hkv=Hkv, Hi=Hi, K=K, D=D, dtype=DTYPE_CODES[q.dtype],
                 scale=float(scale), q=qq.data_ptr(), q_sb=qq.stride(0), q_sh=qq.stride(1),
                 k=kk.data_ptr(), k_sb=kk.stride(0), k_sh=kk.stride(1), k_st=kk.stride(2),
                 v=vv.data_ptr(), v_sb=vv.stride(0), v_sh=vv.stride(1), v_st=vv.stride(2),
                 indices=idx.data_ptr(), out=out.data_ptr(), splits=splits,
                 workspace=0 if workspace is None else workspace.data_ptr())
    _launch("sparse_decode_attention", args, q.device)
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
    return _call("sparse_decode_attention", _sparse_decode_attention_impl, q, k_cache, v_cache, indices, float(scale))


# -------------------------------------------------------------------------------------- top-k
def _select_tokens_impl(scores: torch.Tensor, keep: int) -> torch.Tensor:
    R, N = scores.shape
    keep = min(keep, N)
    out = torch.empty(R, keep, dtype=torch.int64, device=scores.device)
    _launch("select_tokens", _args("TopkArgs", R=R, N=N, keep=keep, scores=scores.data_ptr(), out=out.data_ptr()),
            scores.device)
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
    return _call("select_tokens", _select_tokens_impl, scores, keep)


# ----------------------------------------------------------------------------- paged FASA decode
def _paged_fasa_launch(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget, sink, window, scale,
                       vote_scale, threads, out, selected, fc_scale=None):
    PagedFasaHostCall(k_cache, v_cache, fc_cache, fc_dims, q.shape[1], out.dtype, budget, sink, window, scale,
                      vote_scale, threads, fc_scale=fc_scale)(q, block_table, seq_lens, out, selected)


def _paged_fasa_decode_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, fc_cache: torch.Tensor,
                            fc_dims: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, budget: int,
                            sink: int, window: int, scale: float, vote_scale: float,
                            threads: int, fc_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    selected = torch.empty(q.shape[0], k_cache.shape[1], budget, dtype=torch.int32, device=q.device)
    _paged_fasa_launch(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget, sink, window, scale,
                       vote_scale, threads, out, selected, fc_scale)
    return out, selected


def _paged_fasa_decode_fake(q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, budget, sink, window,
                            scale, vote_scale, threads, fc_scale=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[0], k_cache.shape[1], budget), dtype=torch.int32))


def paged_fasa_decode_host(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, fc_cache: torch.Tensor,
                           fc_dims: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, budget: int,
                           sink: int, window: int, scale: float, vote_scale: float, threads: int,
                           out=None, want_selected: bool = False, fc_scale: Optional[torch.Tensor] = None):
    """Fused paged FASA decode with the host build of tokprune._C (contract and checks:
    :func:`tokprune.ops.paged.paged_fasa_decode`, which calls this on CPU tensors).

    Writes into ``out`` (``(R, Hq, head_dim)``, any dtype of fp32/fp16/bf16, last dim contiguous) when
    given, else a new tensor in q's dtype. Returns ``(out, selected)``; ``selected`` ``(R, Hkv, budget)``
    int32 chosen logical tokens ascending, ``-1`` padded, or ``None`` unless ``want_selected``. Under
    ``torch.compile`` it goes through the ``tokprune_ext::paged_fasa_decode`` custom op (a copy into ``out``)."""
    args = (q, k_cache, v_cache, fc_cache, fc_dims, block_table, seq_lens, int(budget), int(sink), int(window),
            float(scale), float(vote_scale), int(threads))
    if torch.compiler.is_compiling():
        res, selected = torch.ops.tokprune_ext.paged_fasa_decode(*args, fc_scale)
        if out is not None:
            out.copy_(res)
            res = out
        return res, (selected if want_selected else None)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    selected = torch.empty(q.shape[0], k_cache.shape[1], int(budget), dtype=torch.int32, device=q.device) \
        if want_selected else None
    _paged_fasa_launch(*args, out, selected, fc_scale)
    return out, selected


def _thread_args(local: threading.local, fields: dict):
    """This thread's ``PagedFasaArgs`` built from ``fields`` (once per thread: the kernel runs without the GIL,
    so two threads never share a struct)."""
    a = getattr(local, "args", None)
    if a is None:
        a = local.args = _args("PagedFasaArgs", **fields)
    return a


def _run_fasa(run, a, q: torch.Tensor, out: torch.Tensor, pack_from: Optional[int]) -> torch.Tensor:
    """Set the query, output and ``pack_from`` fields of ``a`` and launch; returns ``out``."""
    a.q, a.q_sr, a.q_sh = q.data_ptr(), q.stride(0), q.stride(1)
    a.out, a.o_sr, a.o_sh = out.data_ptr(), out.stride(0), out.stride(1)
    a.pack_from = -1 if pack_from is None else pack_from
    run(a, False, 0, False)
    return out


class PagedFasaHostCall:
    """The host kernel of ``paged_fasa_decode`` bound to one set of caches, for a decode loop that calls it
    once per layer and step: the argument struct is built once per calling thread (the kernel runs without
    the GIL, so threads never share one), and a call only sets the rows, the query, the block table, the
    lengths and the outputs before it launches (a handful of attribute writes instead of ~50).
    :func:`paged_fasa_decode_host` builds one per call. Checks: by the public op, or by the factory
    :func:`tokprune.ops.paged.paged_fasa_decoder` (once) and its per-call shape/dtype test.

    Args:
        k_cache, v_cache: ``(num_blocks, Hkv, block_size, head_dim)`` fp32/fp16/bf16, any strides.
        fc_cache: ``(num_blocks, Hkv, block_size, nd)`` packed FC keys (fp32/fp16/bf16, or int8 with
            ``fc_scale``), any strides.
        fc_scale: int8 FC keys only: ``(num_blocks, Hkv, block_size)`` fp32 per-token scales, any strides.
        fc_dims: ``(Hkv, nd)`` int (converted to int32 once).
        heads: query heads ``Hq``; ``out_dtype``: dtype of the output rows.
        budget, sink, window, scale, vote_scale, threads: as :func:`paged_fasa_decode_host`.
    """

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, fc_cache: torch.Tensor, fc_dims: torch.Tensor,
                 heads: int, out_dtype: torch.dtype, budget: int, sink: int, window: int, scale: float,
                 vote_scale: float, threads: int, fc_scale: Optional[torch.Tensor] = None):
        dims = fc_dims.to(torch.int32).contiguous()
        self._keep = (k_cache, v_cache, fc_cache, dims, fc_scale)  # the struct points into these
        self._run = _lib().paged_fasa_decode
        kc, vc, ff = k_cache, v_cache, fc_cache
        self._fields = dict(H=heads, Hkv=kc.shape[1], D=kc.shape[3], nd=dims.shape[1], budget=int(budget),
                            sink=int(sink), window=int(window), block_size=kc.shape[2], dtype=DTYPE_CODES[kc.dtype],
                            fc_dtype=DTYPE_CODES[ff.dtype], out_dtype=DTYPE_CODES[out_dtype], scale=float(scale),
                            vote_scale=float(vote_scale), k=kc.data_ptr(), k_sb=kc.stride(0), k_sh=kc.stride(1),
                            k_st=kc.stride(2), k_sd=kc.stride(3), v=vc.data_ptr(), v_sb=vc.stride(0),
                            v_sh=vc.stride(1), v_st=vc.stride(2), v_sd=vc.stride(3), fc=ff.data_ptr(),
                            f_sb=ff.stride(0), f_sh=ff.stride(1), f_st=ff.stride(2), f_sd=ff.stride(3),
                            fc_dims=dims.data_ptr(), threads=max(1, int(threads)))
        if fc_scale is not None:
            self._fields.update(fc_scale=fc_scale.data_ptr(), s_sb=fc_scale.stride(0), s_sh=fc_scale.stride(1),
                                s_st=fc_scale.stride(2))
        self._local = threading.local()

    def __call__(self, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                 selected: Optional[torch.Tensor] = None, pack_from: Optional[int] = None) -> torch.Tensor:
        """Launch on ``q (R, Hq, head_dim)``, ``block_table (R, max_blocks)`` and ``seq_lens (R,)`` (int32 with a
        contiguous last dimension is used as is; anything else is converted); writes ``out (R, Hq, head_dim)``
        (last dim contiguous) and, if given, ``selected (R, Hkv, budget)`` int32; returns ``out``.
        ``pack_from`` (int >= 0): each unit first writes its FC keys ``fc_cache[t] = k_cache[t, fc_dims]`` for
        the tokens ``pack_from <= t < seq_len`` (the FC side cache kept in step by the kernel itself)."""
        a = _thread_args(self._local, self._fields)
        if block_table.dtype != torch.int32 or (block_table.shape[1] > 1 and block_table.stride(1) != 1):
            block_table = block_table.to(torch.int32).contiguous()
        if seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
            seq_lens = seq_lens.to(torch.int32).contiguous()
        q = _last_dim_contiguous(q)
        a.R = q.shape[0]
        a.block_table, a.bt_sr = block_table.data_ptr(), block_table.stride(0)
        a.seq_lens = seq_lens.data_ptr()
        a.selected = 0 if selected is None else selected.data_ptr()
        return _run_fasa(self._run, a, q, out, pack_from)

    def launcher(self, block_table: torch.Tensor, seq_lens: torch.Tensor):
        """``launch(q, out, pack_from=None) -> out`` for a decode loop whose block table and lengths live in fixed
        tensors (their contents may change between calls): ``block_table (R, max_blocks)`` and ``seq_lens (R,)``
        int32 with contiguous last dimensions (checked here). A call sets only the query, the output and
        ``pack_from`` in a per-thread argument struct: ``q (R, Hq, head_dim)`` and ``out`` of the bound dtypes
        with contiguous last dimensions (the caller guarantees both: nothing is checked per call)."""
        if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous() or \
                (block_table.shape[1] > 1 and block_table.stride(1) != 1):
            raise ValueError("launcher: block_table and seq_lens must be int32 with a contiguous last dimension")
        fields = dict(self._fields, R=block_table.shape[0], block_table=block_table.data_ptr(),
                      bt_sr=block_table.stride(0), seq_lens=seq_lens.data_ptr())
        local, run, keep = threading.local(), self._run, (self, block_table, seq_lens)

        def launch(q: torch.Tensor, out: torch.Tensor, pack_from: Optional[int] = None) -> torch.Tensor:
            return _run_fasa(run, _thread_args(local, fields), q, out, pack_from)

        launch.keep = keep  # the struct points into these
        return launch


# ------------------------------------------------------------------------------ small-M linear
def _small_m_linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         threads: int) -> torch.Tensor:
    return SmallMLinearBound(weight, bias).run(x, max(1, int(threads)))


def _small_m_linear_fake(x, weight, bias, threads):
    return x.new_empty((x.shape[0], weight.shape[0]))


def small_m_linear_host(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        threads: int = 1) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` with the host build of tokprune._C (contract and checks:
    :func:`tokprune.ops.linear.small_m_linear`, which calls this on CPU tensors).

    Args:
        x: ``(M, K)`` float32 CPU (any row stride).
        weight: ``(N, K)`` float32 CPU.
        bias: ``(N,)`` float32 or ``None``.
        threads: OpenMP threads over blocks of N (results do not depend on it).

    Returns:
        ``(M, N)`` float32, contiguous.
    """
    return _call("small_m_linear", _small_m_linear_impl, x, weight, bias, int(threads))


class SmallMLinearBound:
    """:func:`small_m_linear_host` with the weight and bias bound once, for a layer called many times
    (the linears of speculative tree forwards): the argument struct is built once per thread and a call
    only sets x, y and M: 4.7 us per call of an 8 x 16 x 16 layer vs 11.4 us through
    :func:`small_m_linear_host` (1 thread; ~210 calls per SmolLM2-135M tree forward). Same kernel, same
    results.

    Args:
        weight: ``(N, K)`` float32 CPU; it must not be resized or moved while bound (in-place value
            updates are seen).
        bias: ``(N,)`` float32 CPU or ``None``.

    Call: ``bound(x, threads)`` with ``x`` ``(M, K)`` float32 CPU (any row stride) and ``threads >= 1``
    returns ``(M, N)`` float32, contiguous (under ``torch.compile`` it goes through the registered op).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"weight must be a 2D float32 CPU tensor, got {tuple(weight.shape)} "
                             f"{weight.dtype} on {weight.device}")
        if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != torch.float32
                                 or bias.device.type != "cpu"):
            raise ValueError(f"bias must be a float32 CPU tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
        self.weight, self.bias = weight, bias
        self._w = _last_dim_contiguous(weight)
        self._b = None if bias is None else bias.contiguous()
        self._local = threading.local()  # one argument struct per thread (the kernel runs without the GIL)
        self._op = _lib().small_m_linear

    def _struct(self):
        a = getattr(self._local, "args", None)
        if a is None:
            N, K = self._w.shape
            a = _args("LinearArgs", N=N, K=K, w=self._w.data_ptr(), w_sn=self._w.stride(0) if N > 1 else K,
                      bias=0 if self._b is None else self._b.data_ptr(), y_sm=N)
            self._local.args = a
        return a

    def __call__(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return small_m_linear_host(x, self.weight, self.bias, threads)
        K = self._w.shape[1]
        if x.dim() != 2 or x.shape[1] != K or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"x must be a float32 CPU tensor of shape (M, {K}), got {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        return self.run(x, threads)

    def run(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        """:meth:`__call__` without the argument checks, for callers that guarantee them (``x`` a 2D
        float32 CPU tensor with the weight's K columns, ``threads >= 1``)."""
        N, K = self._w.shape
        M = x.shape[0]
        if K > 1 and x.stride(1) != 1:
            x = x.contiguous()
        y = torch.empty(M, N)
        a = getattr(self._local, "args", None) or self._struct()
        a.M, a.x, a.x_sm, a.y, a.threads = M, x.data_ptr(), x.stride(0) if M > 1 else K, y.data_ptr(), threads
        self._op(a, False, 0, False)
        return y


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
_paged_fasa_decode_op = _register("paged_fasa_decode", _paged_fasa_decode_impl, _paged_fasa_decode_fake)
_small_m_linear_op = _register("small_m_linear", _small_m_linear_impl, _small_m_linear_fake)


def _call(name, impl, *args):
    """Under torch.compile go through the registered op (traced with its fake); in eager call the
    implementation directly (the same code, without the dispatcher's one-off import of torch._dynamo)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.tokprune_ext, name)(*args)
    return impl(*args)


__all__ = ["verify_tree_greedy_cuda", "verify_tree_stochastic_cuda", "sparse_decode_attention_cuda",
           "select_tokens_cuda", "paged_fasa_decode_host", "small_m_linear_host", "SmallMLinearBound",
           "attention_splits", "DTYPE_CODES", "RULES"]
