"""Call every Triton and CUDA (tokprune._C) op once and compare it with the torch backend on the CPU.

This is the program ``make gpu-check`` runs under ``compute-sanitizer`` (memcheck, racecheck,
synccheck): small inputs, every kernel launched at least once, results checked, exit code 1 on any
mismatch. It also holds the large-offset check (tensors past 2**31 elements on the GPU) and is
usable on the CPU (Triton interpreter, host build of tokprune._C), which is how CI tests it.

Usage: ``python -m tokprune.tools.gpu_smoke [--device cuda] [--large] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# (op, implemented kernel backends) covered here; tests/test_gpu_check.py checks this against the ops (every
# op whose resolve_backend call names "triton" or "cuda"), the Triton kernels the package ships (every
# ``*_kernel`` of tokprune/kernels/triton and every AOT registration) and the op list of tokprune._C: each
# must be launched by :func:`run_ops`. Ops with a torch backend only (dense_decode_attention,
# window_attention_scores, token_sparse_scores) launch no tokprune kernel and are not called here.
KERNEL_OPS: Dict[str, Tuple[str, ...]] = {
    "verify_tree_greedy": ("triton", "cuda"),
    "verify_tree_stochastic": ("triton", "cuda"),
    "compact_accepted_kv": ("triton",),
    "fc_scores": ("triton",),
    "sparse_decode_attention": ("triton", "cuda"),
    "select_tokens": ("cuda",),
    "gather_tokens": ("triton",),
    "compress_qkv": ("triton",),
    "decompress": ("triton",),
    "token_sparse_attention": ("triton",),
    "matrix_entropy": ("triton",),
    "truncated_matrix_entropy": ("triton",),
    "token_information_scores": ("triton",),
    "write_paged_fc_keys": ("triton",),
    "paged_fc_scores": ("triton",),
    "paged_select": ("triton",),
    "paged_sparse_decode_attention": ("triton",),
    "paged_decode_attention": ("triton",),
    "update_paged_page_bounds": ("triton",),
    "paged_quest_scores": ("triton",),
    "paged_select_pages": ("triton",),
    "paged_fasa_decode": ("cuda",),
    "small_m_linear": ("cuda",),
}


def _tree(gen: torch.Generator, bsz: int, n: int, vocab: int):
    parents = torch.full((bsz, n), -1, dtype=torch.int64)
    for b in range(bsz):
        for i in range(1, n):
            parents[b, i] = int(torch.randint(0, i, (1,), generator=gen))
    tokens = torch.randint(0, vocab, (bsz, n), generator=gen)
    return tokens, parents


def _paged_layout(gen: torch.Generator, lens: Sequence[int], block_size: int, extra_blocks: int = 3):
    """``(block_table int32 (R, max_blocks), num_blocks, slots of every cached token in request order)``:
    shuffled physical blocks, entries past a row's last used block ``-1`` (never read)."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
    at = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[at:at + n].int()
        at += n
    slots = torch.tensor([int(table[r, t // block_size]) * block_size + t % block_size
                          for r, n in enumerate(lens) for t in range(n)], dtype=torch.int64)
    return table, num_blocks, slots


def _paged_cases(gen: torch.Generator) -> Dict[str, list]:
    """The paged ops (tokprune.ops.paged) on a vLLM-style strided cache, GQA 4:2, three ragged requests."""
    from tokprune.ops import paged

    bs, hkv, hq, d, ps = 8, 2, 4, 32, 4
    lens = [30, 5, 17]
    table, nb, slots = _paged_layout(gen, lens, bs)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kv = torch.randn(2, nb, hkv, bs, 2 * d, generator=gen)[1]  # a layer of a stacked cache (storage offset)
    k, v = paged.vllm_cpu_kv_views(kv, d)  # K transposed per block: strided views
    q = torch.randn(len(lens), hq, d, generator=gen)
    fc_index = torch.stack([torch.randperm(d // 2, generator=gen)[:3] for _ in range(hkv)])
    fc_q_index = torch.stack([torch.randperm(d // 2, generator=gen)[:3] for _ in range(hq)])
    fc_cache = torch.randn(nb, hkv, bs, 6, generator=gen)
    write_slots = torch.cat([slots[:9], torch.tensor([-1])])  # a padding token (slot -1) is skipped
    keys = torch.randn(len(write_slots), hkv, d, generator=gen)
    scores = torch.randn(len(lens), hkv, 32, generator=gen)
    sel = paged.paged_select(scores, 12, 1, 2, seq_lens, table, bs, backend="torch")
    sel[2, 0] = -1  # a row with no valid slot: zeros
    sel_q = paged.paged_select(torch.randn(len(lens), hq, 32, generator=gen), 9, 1, 2, seq_lens, table, bs,
                               backend="torch")
    kmin = torch.randn(nb, hkv, bs // ps, d, generator=gen)  # stale bounds of reused blocks
    kmax = kmin + 5
    all_keys = torch.stack([k[s // bs, :, s % bs] for s in slots.tolist()])
    fmin, fmax = paged.update_paged_page_bounds(kmin.clone(), kmax.clone(), all_keys, slots, ps, backend="torch")
    page_scores = torch.randn(len(lens), hq, 8, generator=gen)
    fc_dims = torch.stack([torch.randperm(d, generator=gen)[:6] for _ in range(hkv)])
    bf = torch.bfloat16
    return {
        "write_paged_fc_keys": (paged.write_paged_fc_keys, (fc_cache, keys, write_slots.int(), fc_index), {}),
        "paged_fc_scores": [
            (paged.paged_fc_scores, (q, fc_cache, table, seq_lens, fc_index), {"reduce": "max", "max_len": 32}),
            (paged.paged_fc_scores, (q, k, table, seq_lens, fc_q_index), {"packed": False, "max_len": 32})],
        "paged_select": (paged.paged_select, (scores, 12, 1, 2, seq_lens.long(), table, bs), {}),
        "paged_sparse_decode_attention": [
            (paged.paged_sparse_decode_attention, (q, k, v, sel, d ** -0.5), {}),
            (paged.paged_sparse_decode_attention, (q.to(bf), k.to(bf), v.to(bf), sel_q.int(), d ** -0.5), {})],
        "paged_decode_attention": [
            (paged.paged_decode_attention, (q, k, v, table, seq_lens, d ** -0.5), {"max_len": 32}),
            (paged.paged_decode_attention, (q.to(bf), k.to(bf), v.to(bf), table.long(), seq_lens, 0.2), {})],
        "update_paged_page_bounds": (paged.update_paged_page_bounds, (kmin, kmax, all_keys, slots, ps), {}),
        "paged_quest_scores": (paged.paged_quest_scores, (q, fmin, fmax, table, seq_lens, ps), {"max_len": 32}),
        "paged_select_pages": (paged.paged_select_pages, (page_scores, 3, seq_lens, table, bs, ps), {}),
        "paged_fasa_decode": [  # lens 30 / 5 / 17 with budget 12: two sparse rows and one dense row
            (paged.paged_fasa_decode, (q, k, v, fc_cache, fc_dims, table, seq_lens, 12, 1, 2, d ** -0.5), {}),
            (paged.paged_fasa_decode, (q.to(bf), k.to(bf), v.to(bf), fc_cache, fc_dims.int(), table, seq_lens, 12, 1,
                                       2, d ** -0.5), {})],
    }


def _cases(gen: torch.Generator) -> Dict[str, list]:
    """op -> one case or a list of cases ``(function, CPU positional inputs, keyword arguments)``."""
    from tokprune import ops
    from tokprune.ops import spec
    from tokprune.ops.linear import small_m_linear

    tokens, parents = _tree(gen, 3, 9, 1500)
    logits = torch.randn(3, 9, 1500, generator=gen)
    best = logits.argmax(-1).gather(1, parents.clamp_min(0))
    tokens = torch.where(torch.rand(3, 9, generator=gen) < 0.7, best, tokens)  # deep accepted paths
    target = torch.softmax(logits * 2, -1)
    draft = torch.softmax(logits * 2 + torch.randn(3, 9, 1500, generator=gen), -1)
    uniforms = torch.rand(3, 9, generator=gen)
    q = torch.randn(2, 8, 1, 64, generator=gen)
    k = torch.randn(2, 2, 300, 64, generator=gen)
    v = torch.randn(2, 2, 300, 64, generator=gen)
    idx = torch.randint(-1, 300, (2, 2, 70), generator=gen)
    fc_index = torch.randint(0, 32, (2, 4), generator=gen)
    x4 = torch.randn(2, 2, 120, 32, generator=gen)
    gidx = torch.randint(0, 120, (2, 6, 40), generator=gen)
    sidx = torch.sort(torch.stack([torch.randperm(120, generator=gen)[:40] for _ in range(12)]).view(2, 6, 40)).values
    qkv = (torch.randn(2, 6, 120, 32, generator=gen), x4, torch.randn(2, 2, 120, 32, generator=gen))
    comp = torch.randn(2, 6, 40, 32, generator=gen)
    cache = torch.randn(3, 2, 30, 16, generator=gen)
    accept = torch.tensor([[0, 2, 5, -1], [0, 1, -1, -1], [0, 3, 4, 8]])
    return {
        "verify_tree_greedy": (spec.verify_tree_greedy, (tokens, parents, logits), {}),
        "verify_tree_stochastic": (spec.verify_tree_stochastic, (tokens, parents, target, draft),
                                   {"rule": "rsd", "uniforms": uniforms}),
        "compact_accepted_kv": (spec.compact_accepted_kv, (cache, torch.tensor([4, 7, 2]), accept), {}),
        "fc_scores": (ops.fc_scores, (q, k, fc_index), {}),
        "sparse_decode_attention": (ops.sparse_decode_attention, (q, k, v, idx), {"scale": 0.125}),
        "select_tokens": (ops.select_tokens, (torch.randn(4, 3, 500, generator=gen),), {"keep": 77}),
        "gather_tokens": (ops.gather_tokens, (x4, gidx), {}),
        "compress_qkv": (ops.compress_qkv, qkv + (sidx,), {}),
        "decompress": (ops.decompress, (comp, sidx, 120), {}),
        "token_sparse_attention": [
            (ops.token_sparse_attention, (qkv[0], x4, qkv[2]), {"keep": 0.25, "window": 8}),
            (ops.token_sparse_attention, tuple(t.to(torch.bfloat16) for t in (qkv[0], x4, qkv[2])),
             {"keep": 40, "window": 8, "causal": False})],
        "matrix_entropy": (ops.matrix_entropy, (torch.randn(2, 50, 36, generator=gen),), {}),
        "truncated_matrix_entropy": (ops.truncated_matrix_entropy, (torch.randn(1, 2, 40, 16, generator=gen), 8), {}),
        "token_information_scores": (ops.token_information_scores, (torch.randn(2, 11, 8 * 24, generator=gen),),
                                     {"num_heads": 8, "exact_reference": False}),
        "small_m_linear": [(small_m_linear, (torch.randn(5, 37, generator=gen), torch.randn(29, 37, generator=gen),
                                             torch.randn(29, generator=gen)), {}),
                           (small_m_linear, (torch.randn(12, 64, generator=gen), torch.randn(40, 64, generator=gen)),
                            {})],
        **_paged_cases(gen),
    }


def _to(obj, device):
    """``obj`` (tensors, nested in tuples/lists/dicts) on ``device``; a non-contiguous view keeps its strides and
    storage offset there (its whole storage is copied), so kernels see the same strided layout as on the CPU."""
    if isinstance(obj, torch.Tensor):
        if obj.device == torch.device(device) or obj.is_contiguous():
            return obj.to(device)
        n = obj.untyped_storage().nbytes() // obj.element_size()
        whole = obj.as_strided((n,), (1,), 0).to(device)
        return whole.as_strided(obj.shape, obj.stride(), obj.storage_offset())
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _compare(got, expected, name: str) -> Optional[str]:
    """``None`` when equal (integers exactly, floats within the dtype's tolerance), else a description."""
    if isinstance(expected, (tuple, list)):
        for i, (g, e) in enumerate(zip(got, expected)):
            bad = _compare(g, e, f"{name}[{i}]")
            if bad:
                return bad
        return None
    if not isinstance(expected, torch.Tensor):
        return None if got == expected else f"{name}: {got!r} != {expected!r}"
    got = got.detach().cpu()
    if got.shape != expected.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if not expected.is_floating_point():
        return None if torch.equal(got, expected) else f"{name}: integer results differ"
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(expected.dtype, 1e-4)
    a, e = got.double(), expected.double()
    if torch.equal(torch.isnan(a), torch.isnan(e)) and bool(
            ((a - e).abs().nan_to_num(0) <= tol + tol * e.abs().nan_to_num(0)).all()):
        return None
    return f"{name}: max abs diff {float((a - e).abs().nan_to_num(0).max()):.3g} > tol {tol:g}"


def run_ops(device: torch.device, ops_filter: Optional[Sequence[str]] = None, seed: int = 0) -> List[dict]:
    """Every (op, kernel backend) of :data:`KERNEL_OPS` on ``device`` against the torch backend on the CPU.

    Returns rows ``{"op", "backend", "status": "passed" | "failed" | "skipped", "detail"}``; a backend that
    cannot run on ``device`` is skipped with :func:`tokprune._backend.unavailable_reason`.
    """
    from tokprune._backend import unavailable_reason

    gen = torch.Generator().manual_seed(seed)
    cases = _cases(gen)
    rows = []
    for op, backends in KERNEL_OPS.items():
        if ops_filter and op not in ops_filter:
            continue
        variants = cases[op] if isinstance(cases[op], list) else [cases[op]]
        for vi, (fn, args, kwargs) in enumerate(variants):
            label = op if len(variants) == 1 else f"{op}[{vi}]"
            expected = fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], backend="torch",
                          **kwargs)
            if op == "compact_accepted_kv":
                expected = (args[0].clone(), expected)
                fn(expected[0], *args[1:], backend="torch", **kwargs)
            for backend in backends:
                reason = unavailable_reason(backend, device, op)
                if reason is not None:
                    rows.append({"op": op, "backend": backend, "status": "skipped", "detail": reason})
                    continue
                try:
                    dargs = _to([a.clone() if isinstance(a, torch.Tensor) else a for a in args], device)
                    got = fn(*dargs, backend=backend, **_to(kwargs, device))
                    if op == "compact_accepted_kv":
                        got = (dargs[0], got)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    bad = _compare(got, expected, label)
                except Exception as exc:  # a kernel error is a result here, reported with its traceback tail
                    bad = f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
                rows.append({"op": op, "backend": backend, "status": "failed" if bad else "passed",
                             "detail": bad or ""})
    return rows


def large_offsets(device: torch.device) -> List[dict]:
    """Kernels on views whose elements lie past 2**31 of one buffer (~13 GB of ``device`` memory, only the
    viewed rows written): batch 2 starts beyond 2**32 elements, so int32 address arithmetic would wrap
    (into the untouched start of the buffer: wrong values, reported as a mismatch, not a crash). The same
    view serves as a paged cache of 3 blocks (block 2 past 2**32 elements) for the paged ops."""
    from tokprune import ops
    from tokprune._backend import unavailable_reason

    n_batch, heads, dim = 3, 2, 64  # batch 2 starts at 2 * stride_b > 2**31 elements
    stride_b = 2**31 - 2**20  # < 2**31 elements: passed to Triton as i32, products overflow without int64
    base = 2**22  # the views start here, so a wrapped (negative) offset still lands inside the buffer
    buf = torch.empty(base + stride_b * n_batch + 2**20, dtype=torch.bfloat16, device=device)  # lazily committed
    n_tok = 4096
    x = buf.as_strided((n_batch, heads, n_tok, dim), (stride_b, n_tok * dim, dim, 1), base)
    gen = torch.Generator().manual_seed(3)
    x.copy_(torch.randn(n_batch, heads, n_tok, dim, generator=gen).to(torch.bfloat16).to(device))
    q = torch.randn(n_batch, 4, 1, dim, generator=gen).to(torch.bfloat16).to(device)
    idx = torch.randint(0, n_tok, (n_batch, heads, 300), generator=gen).to(device)
    xc = x.contiguous()
    # x is also a paged cache: 3 blocks of 4096 tokens (block 2 past 2**32 elements), one per request
    from tokprune.ops import paged

    qp = q[:, :, 0]
    ptable = torch.tensor([[2], [0], [1]], dtype=torch.int32, device=device)
    plens = torch.tensor([4096, 3000, 4095], dtype=torch.int32, device=device)
    pslots = paged.paged_select(torch.randn(n_batch, heads, n_tok, generator=gen).to(device), 300, 4, 16, plens,
                                ptable, n_tok, backend="torch")
    fcx = torch.arange(8, device=device).view(2, 4)
    rows = []
    checks = {
        "gather_tokens": (lambda t, b: ops.gather_tokens(t, idx, backend=b), ("triton",)),
        "sparse_decode_attention": (lambda t, b: ops.sparse_decode_attention(q, t, t, idx, 0.125, backend=b),
                                    ("triton", "cuda")),
        "fc_scores": (lambda t, b: ops.fc_scores(q, t, torch.arange(8, device=device).view(2, 4), backend=b),
                      ("triton",)),
        "paged_sparse_decode_attention": (
            lambda t, b: paged.paged_sparse_decode_attention(qp, t, t, pslots, 0.125, backend=b), ("triton",)),
        "paged_decode_attention": (
            lambda t, b: paged.paged_decode_attention(qp, t, t, ptable, plens, 0.125, max_len=n_tok, backend=b),
            ("triton",)),
        "paged_fc_scores": (lambda t, b: paged.paged_fc_scores(qp, t, ptable, plens, fcx, packed=False, max_len=n_tok,
                                                               backend=b), ("triton",)),
    }
    for op, (call, backends) in checks.items():
        expected = call(xc, "torch").cpu()
        for backend in backends:
            reason = unavailable_reason(backend, device, op)
            if reason is not None:
                rows.append({"op": f"{op}@2^31", "backend": backend, "status": "skipped", "detail": reason})
                continue
            try:
                bad = _compare(call(x, backend), expected, op)
            except Exception as exc:
                bad = f"{type(exc).__name__}: {exc}"
            rows.append({"op": f"{op}@2^31", "backend": backend, "status": "failed" if bad else "passed",
                         "detail": bad or ""})
    del buf, x, xc
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokprune.tools.gpu_smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--large", action="store_true", help="also run the 2**31-offset checks")
    parser.add_argument("--json", help="write the result rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run_ops(device)
    if args.large:
        rows += large_offsets(device)
    for r in rows:
        print(f"{r['status']:<8} {r['op']:<28} {r['backend']:<7} {r['detail'].splitlines()[0] if r['detail'] else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
