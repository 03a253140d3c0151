"""Ahead-of-time GPU compile of every shipped Triton kernel (no GPU needed)."""

import json
import os
import subprocess
import sys

import pytest

from tokprune.tools.aot import SHARED_LIMIT


def _run_aot(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "tokprune.tools.aot", "--quiet", "--json", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=1800)
    return proc, json.loads(out.read_text()) if out.exists() else []


@pytest.mark.slow
def test_shipped_kernels_compile_without_spills(tmp_path):
    proc, results = _run_aot(tmp_path, "--check", "--jobs", "2")
    print(proc.stdout)
    assert results, proc.stderr[-2000:]
    assert {r["arch"] for r in results} == {80, 90}
    for r in results:
        assert r["error"] is None, r
        assert r["spill_bytes"] == 0, f"{r['kernel']} [{r['variant']} {r['config']}] spills on sm_{r['arch']}"
        assert r["shared_bytes"] <= SHARED_LIMIT[80], r
        # 64-bit address arithmetic (issue 12): no i32 offset * i32 stride product in any kernel
        assert r["i32_stride_products"] == 0, f"{r['kernel']} [{r['variant']}] multiplies a stride in i32"
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_planted_spill_is_caught(tmp_path):
    proc, results = _run_aot(tmp_path, "--check", "--family", "planted", "--planted-spill")
    planted = [r for r in results if r["family"] == "planted"]
    assert planted and all(r["spill_bytes"] > 0 and not r["ok"] for r in planted), planted
    assert proc.returncode == 1
    assert "NO" in proc.stdout


# ------------------------------------------------------------------ what is registered (no compile)
def test_aot_registers_the_signatures_that_run():
    """Every dtype the launchers pass (bf16 is the production dtype) and both index dtypes are
    registered, with i32 strides (unit strides the constant 1) as well as i64 strides."""
    from tokprune.kernels.triton.aot import registered_kernels

    specs = registered_kernels()
    by_kernel = {}
    for s in specs:
        by_kernel.setdefault(s.name, []).append(s)
    for name in ("_gather_tokens_kernel", "_compress_qkv_kernel", "_decompress_kernel", "_sparse_decode_split_kernel"):
        sigs = by_kernel[name]
        elems = {t for s in sigs for a, t in s.signature.items() if a in ("x_ptr", "q_ptr", "src_ptr")}
        assert elems == {"*fp32", "*bf16", "*fp16"}, name
        index = {t for s in sigs for a, t in s.signature.items() if a in ("index_ptr", "idx_ptr")}
        assert index == {"*i32", "*i64"}, name
        modes = {s.variant.rsplit("strides ", 1)[-1] for s in sigs}
        assert modes == {"i32", "i64"}, name
        for s in sigs:
            strides = [a for a in s.signature if a.startswith("stride_")]
            if s.variant.endswith("strides i32"):
                assert s.constants and all(v == 1 for v in s.constants.values())
                assert all(s.signature[a] == "i32" and a in s.divisible for a in strides)
            else:
                assert not s.constants and all(s.signature[a] == "i64" for a in strides)
    for name in ("_fc_scores_kernel", "_masked_gram_kernel", "_token_gram_kernel"):
        elems = {s.signature.get("q_ptr", s.signature.get("x_ptr")) for s in by_kernel[name]}
        assert elems == {"*fp32", "*bf16", "*fp16"}, name


def test_register_aot_rejects_a_stale_signature():
    from tokprune.kernels.triton.aot import LaunchConfig, register_aot
    from tokprune.kernels.triton.gather import _gather_tokens_kernel

    with pytest.raises(ValueError, match="signature must name the non-constexpr parameters"):
        register_aot("test", _gather_tokens_kernel, {"x_ptr": "*fp32"}, [LaunchConfig({"BLOCK_K": 16})])
    sig = {name: "i32" for name in _gather_signature_names()}
    with pytest.raises(ValueError, match="unit names"):
        register_aot("test", _gather_tokens_kernel, sig, [LaunchConfig({"BLOCK_K": 16})], strides=("i32",),
                     unit=("n_keep",))
    with pytest.raises(ValueError, match="stride mode"):
        register_aot("test", _gather_tokens_kernel, sig, [LaunchConfig({"BLOCK_K": 16})], strides=("u64",))


def _gather_signature_names():
    from tokprune.kernels.triton.aot import registered_kernels

    return next(list(s.signature) + list(s.constants) for s in registered_kernels()
                if s.name == "_gather_tokens_kernel" and s.variant.endswith("i64"))


def test_stride_product_counter():
    """The IR scan that proves 64-bit address arithmetic: i32 multiplications by a stride argument."""
    from tokprune.tools.aot import count_i32_stride_products

    wraps = """
    %b = tt.get_program_id z : i32
    %x_base = arith.muli %b, %stride_xb : i32 loc(#loc1)
    %s = tt.splat %stride_xn : i32 -> tensor<16x1xi32>
    %r = arith.muli %rows, %s : tensor<16x1xi32>
    %ok = arith.muli %b, %n_dims : i32
    """
    safe = """
    %b64 = arith.extsi %b : i32 to i64
    %x = arith.extsi %stride_xb : i32 to i64
    %x_base = arith.muli %b64, %x : i64
    %s = tt.splat %x : i64 -> tensor<16x1xi64>
    %r = arith.muli %rows, %s : tensor<16x1xi64>
    """
    assert count_i32_stride_products(wraps) == 2
    assert count_i32_stride_products(safe) == 0


def _captured_launches(monkeypatch):
    """Run the launchers of bf16 production-shaped inputs with ``launch`` replaced by a recorder."""
    import torch

    from tokprune.kernels.triton import fasa, gather, token_sparse

    calls = []

    def record(kernel, grid, device, *args, **kwargs):
        calls.append((kernel, args))

    for module in (fasa, gather, token_sparse):
        monkeypatch.setattr(module, "launch", record)
    q = torch.randn(2, 8, 1, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 256, 64, dtype=torch.bfloat16)
    for index_dtype in (torch.int32, torch.int64):
        idx = torch.randint(0, 256, (2, 2, 32), dtype=index_dtype)
        fasa.sparse_decode_attention_triton(q, k, k, idx, 0.125)
        gather.gather_tokens_triton(k, idx)
        qf = torch.randn(2, 8, 256, 64, dtype=torch.bfloat16)
        sel = torch.randint(0, 256, (2, 8, 32), dtype=index_dtype)
        qc, _, _ = token_sparse.compress_qkv_triton(qf, k, k, sel)
        token_sparse.decompress_triton(qc, sel, torch.zeros(2, 256, 8, 64, dtype=torch.bfloat16).transpose(1, 2))
    fasa.fc_scores_triton(q, k, torch.randint(0, 64, (2, 8)), False)
    return [(kernel, args) for kernel, args in calls if kernel is not fasa._sparse_decode_combine_kernel]


def test_aot_i32_signature_is_what_triton_specialises_at_run_time(monkeypatch):
    """For contiguous bf16 inputs below 2**31 elements, Triton's own run-time specialisation of the
    launch arguments equals a registered "strides i32" signature: same types, the unit strides the
    constant 1, and every argument registered as divisible by 16 is divisible at run time."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from tokprune.kernels.triton.aot import _runtime_params, registered_kernels

    specs = registered_kernels()
    launches = _captured_launches(monkeypatch)
    assert len(launches) == 9
    for kernel, args in launches:
        names = _runtime_params(kernel)
        runtime = {n: native_specialize_impl(BaseBackend, a, False, True, True) for n, a in zip(names, args)}
        types = {n: ("constexpr" if t == "constexpr" else t) for n, (t, _) in runtime.items()}
        candidates = [s for s in specs if s.kernel is kernel and s.variant.endswith("strides i32")]
        match = [s for s in candidates
                 if all((types[n] == "constexpr" and s.constants.get(n) == 1 and runtime[n][1] == 1)
                        or (types[n] != "constexpr" and s.signature.get(n) == types[n])
                        for n in names if n.startswith("stride_") or n.endswith("_ptr"))]
        assert match, (kernel.__name__ if hasattr(kernel, "__name__") else kernel, types)
        for n in match[0].divisible:
            assert runtime[n][1] == "D", (n, runtime[n])
