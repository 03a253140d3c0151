"""The CPU-side parts of ``make gpu-check`` (tokprune/tools/gpu_check.py, gpu_smoke.py).

On this machine every GPU step must be skipped *with a reason*, the report and CSV must still be
written, nothing may be recorded as validated, and the pieces that decide (the environment gate, the
validation entry) must decide correctly from faked facts. The smoke and stress programs themselves run
here on CPU tensors (Triton interpreter, host build of tokprune._C) with small sizes.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from tokprune.tools import gpu_check as gc

H200 = {"torch": "2.11.0+cu130", "torch_cuda": "13.0", "cuda_available": True, "device_name": "NVIDIA H200",
        "capability": [9, 0], "driver_cuda": "13.0", "triton": "3.6.0", "pybind11": True, "ninja": True,
        "cxx": "g++", "compute_sanitizer": "/usr/local/cuda/bin/compute-sanitizer",
        "nvcc": [{"path": "/opt/cuda-12.4/bin/nvcc", "release": "12.4"},
                 {"path": "/usr/local/cuda-13.0/bin/nvcc", "release": "13.0"}]}


def test_gate_accepts_a_matching_h200_and_picks_the_nvcc_of_torchs_cuda():
    g = gc.gate(H200)
    assert g.gpu and g.build and g.arch == "90" and g.reasons == []
    assert g.nvcc == "/usr/local/cuda-13.0/bin/nvcc"  # not the first one found: the one matching torch


@pytest.mark.parametrize("change,gpu,build,reason", [
    (dict(torch_cuda=None, cuda_available=False), False, False, "CPU build"),
    (dict(cuda_available=False), False, False, "no CUDA device is visible"),
    (dict(capability=[7, 0]), False, False, "compute capability 7.0 is below 7.5"),
    (dict(driver_cuda="12.8"), False, False, "the driver supports CUDA 12.8 but torch needs 13.0"),
    (dict(triton=None), False, False, "triton is not installed"),
    (dict(nvcc=[{"path": "/opt/cuda-12.4/bin/nvcc", "release": "12.4"}]), True, False,
     "no nvcc of torch's CUDA 13.0"),
    (dict(pybind11=False), True, False, "pybind11 is missing"),
])
def test_gate_refuses_with_the_reason(change, gpu, build, reason):
    g = gc.gate(dict(H200, **change))
    assert (g.gpu, g.build) == (gpu, build)
    assert any(reason in r for r in g.reasons), g.reasons


def test_gate_notes_a_minor_version_difference():
    g = gc.gate(dict(H200, nvcc=[{"path": "/usr/local/cuda/bin/nvcc", "release": "13.1"}]))
    assert g.build and g.nvcc == "/usr/local/cuda/bin/nvcc" and "differs in minor version" in g.notes[0]


def test_check_on_this_cpu_skips_every_gpu_step_with_a_reason_and_writes_the_report(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: make gpu-check runs the real steps")
    monkeypatch.setattr(gc, "write_validated", lambda *a, **k: pytest.fail("nothing may be validated on a CPU"))
    code = gc.run_check(str(tmp_path))
    assert code == 2  # nothing was proven
    report = (tmp_path / "gpu_check.md").read_text()
    with open(tmp_path / "gpu_check.csv") as f:
        rows = list(csv.DictReader(f))
    steps = {r["step"]: r for r in rows if r["kind"] == "step"}
    assert set(steps) == set(gc.STEPS)
    for name in gc.STEPS:
        assert steps[name]["status"] == "skipped", name
        assert steps[name]["detail"], f"{name} skipped without a reason"
        assert f"| {name} | skipped |" in report
    assert "torch.version.cuda is None" in steps["suite"]["detail"] or "no CUDA device" in steps["suite"]["detail"]
    assert "Not recorded" in report


def test_validation_entry_needs_every_correctness_step(tmp_path):
    g = gc.gate(H200)
    ok = [gc.StepResult(s, "passed") for s in gc.CORRECTNESS_STEPS]
    for r in ok:
        if r.name in ("smoke", "stress"):
            r.rows = [{"backend": "triton", "status": "passed"}, {"backend": "cuda", "status": "passed"}]
    entry = gc.validation_entry(ok, H200, g)
    assert entry["backends"] == ["triton", "cuda"] and entry["torch"] == H200["torch"]
    # the build failed: the cuda backend is not validated, triton still is
    no_build = [gc.StepResult("build", "failed") if r.name == "build" else r for r in ok]
    assert gc.validation_entry(no_build, H200, g)["backends"] == ["triton"]
    # any other correctness step not passed: nothing is validated
    for name in ("suite", "sanitizer", "large", "stress", "smoke"):
        bad = [gc.StepResult(name, "skipped", "x") if r.name == name else r for r in ok]
        assert gc.validation_entry(bad, H200, g) is None, name
    # written next to other archs, read back by the backend selection
    path = tmp_path / "validated_archs.json"
    path.write_text(json.dumps({"archs": {"sm_80": {"backends": ["triton"]}}}))
    gc.write_validated("90", entry, str(path))
    data = json.loads(path.read_text())
    assert set(data["archs"]) == {"sm_80", "sm_90"} and data["archs"]["sm_90"]["backends"] == ["triton", "cuda"]


def _declared_kernel_ops():
    """op -> kernel backends, from every ``resolve_backend(..., (backends), "op")`` call under tokprune/ops."""
    import glob
    import re

    declared = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(root, "tokprune", "ops", "*.py")):
        for backends, op in re.findall(r'resolve_backend\([^()]*?\(([^()]*)\),\s*"(\w+)"', open(path).read()):
            kernels = tuple(b for b in ("triton", "cuda") if f'"{b}"' in backends)
            if kernels:  # an op may resolve more than once (a fallback without one backend): the union
                declared[op] = tuple(b for b in ("triton", "cuda") if b in kernels + declared.get(op, ()))
    return declared


def _shipped_triton_kernels():
    """Names of the Triton kernels the package ships: every ``*_kernel`` @triton.jit function of the kernel
    modules and every AOT registration."""
    import importlib

    from triton.runtime.jit import KernelInterface

    from tokprune.kernels.triton import kernel_modules
    from tokprune.kernels.triton.aot import registered_kernels

    names = {k.name for k in registered_kernels()}
    for module in kernel_modules():
        for attr, obj in vars(importlib.import_module(module)).items():
            if isinstance(obj, KernelInterface) and attr.endswith("_kernel"):
                names.add(getattr(obj, "fn", obj).__name__)
    return names


def test_smoke_covers_every_kernel_backend_of_the_ops_and_passes_on_cpu(monkeypatch):
    """gpu_smoke (the sanitizer's program) calls every Triton/CUDA op and thereby launches every Triton kernel
    the package ships and every op of tokprune._C; here on CPU tensors (interpreter and host build), each
    result equal to the torch backend. A new kernel, op or _C entry point that the smoke does not reach fails
    this test."""
    from triton.runtime.jit import KernelInterface

    from tokprune import _ext
    from tokprune.kernels import cuda as cuda_kernels
    from tokprune.tools.gpu_smoke import KERNEL_OPS, run_ops

    launched, c_calls = set(), set()
    kernel_classes = {type(k) for k in _kernel_objects()}
    for cls in kernel_classes:
        real_run = cls.run

        def recording_run(self, *args, _real=real_run, **kwargs):
            launched.add(getattr(self, "fn", self).__name__)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", recording_run)
    c_ops = set(_ext.build_info().get("ops", ()))
    real_lib = cuda_kernels._lib

    class Recording:
        def __init__(self, lib):
            self._lib = lib

        def __getattr__(self, name):
            if name in c_ops:
                c_calls.add(name)
            return getattr(self._lib, name)

    monkeypatch.setattr(cuda_kernels, "_lib", lambda: Recording(real_lib()))

    rows = run_ops(torch.device("cpu"))
    assert {(r["op"], r["backend"]) for r in rows} == {(op, b) for op, bs in KERNEL_OPS.items() for b in bs}
    assert [r for r in rows if r["status"] == "failed"] == []
    assert all(r["detail"] for r in rows if r["status"] == "skipped")
    # every op that declares a kernel backend in its resolve_backend call is called with exactly those backends
    declared = _declared_kernel_ops()
    assert {op: bs for op, bs in declared.items() if op not in KERNEL_OPS} == {}, \
        "ops with kernel backends that gpu_smoke does not call"
    assert all(set(bs) == set(KERNEL_OPS[op]) for op, bs in declared.items()), (declared, KERNEL_OPS)
    # every shipped Triton kernel was launched, and every op of tokprune._C was called
    assert issubclass(next(iter(kernel_classes)), KernelInterface)
    assert _shipped_triton_kernels() - launched == set(), "Triton kernels the smoke program never launches"
    if _ext.extension() is not None:
        assert c_ops and c_ops - c_calls == set(), "tokprune._C ops the smoke program never calls"


def _kernel_objects():
    import importlib

    from triton.runtime.jit import KernelInterface

    from tokprune.kernels.triton import kernel_modules

    return [obj for m in kernel_modules() for obj in vars(importlib.import_module(m)).values()
            if isinstance(obj, KernelInterface)]


def test_smoke_moves_strided_views_with_their_layout():
    """gpu_smoke._to keeps a non-contiguous view's strides and storage offset on the target device (the
    vLLM-style K view must reach the GPU kernels strided, not as a contiguous copy)."""
    from tokprune.ops.paged import vllm_cpu_kv_views
    from tokprune.tools.gpu_smoke import _to

    kv = torch.randn(2, 3, 2, 8, 2 * 4)[1]
    k, v = vllm_cpu_kv_views(kv, 4)
    assert not k.is_contiguous()
    for t in (k, v):
        moved = _to(t, "meta")
        assert moved.device.type == "meta" and moved.shape == t.shape
        assert moved.stride() == t.stride() and moved.storage_offset() == t.storage_offset()


def test_stress_logic_on_cpu_small():
    res = gc.run_stress(torch.device("cpu"), batch=4, vocab=64, repeats=6, nodes=5, distinct=3)
    assert res.status == "passed", res.details
    ran = [r for r in res.rows if r["status"] == "passed"]
    assert ran and all(r["repeats"] == 6 and r["mismatches"] == 0 for r in ran)


def test_stress_detects_a_differing_repeat(monkeypatch):
    from tokprune.ops import spec

    real = spec.verify_tree_stochastic

    def flaky(*args, backend=None, **kwargs):
        out = real(*args, backend=backend, **kwargs)
        if backend != "torch":
            out = (out[0], out[1], out[2] + 1)  # a wrong bonus token, as a race would give
        return out

    monkeypatch.setattr(spec, "verify_tree_stochastic", flaky)
    res = gc.run_stress(torch.device("cpu"), batch=2, vocab=16, repeats=2, nodes=3, distinct=1, backends=("cuda",))
    assert res.status == "failed" and "repeats differ" in res.reason


def test_audit_and_bench_skip_on_cpu_with_a_reason():
    for fn in (gc.run_audit, gc.run_bench):
        res = fn(torch.device("cpu"))
        assert res.status == "skipped" and "CUDA" in res.reason


def test_test_device_cuda_without_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backend.py",
                           "-k", "auto_is_torch"], cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TOKPRUNE_TEST_DEVICE="cuda"))
    assert proc.returncode != 0 and "TOKPRUNE_TEST_DEVICE=cuda but torch sees no CUDA device" in proc.stdout + proc.stderr


def test_make_target_passes_out(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["make", "-n", "gpu-check", f"OUT={tmp_path}"], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"make unavailable: {out.stderr[:200]}")
    assert f"-m tokprune.tools.gpu_check --out {tmp_path}" in out.stdout


def test_bench_and_audit_code_runs_on_cpu_with_tiny_shapes():
    """The GPU-only steps' own code (op calls, case tables, rows) exercised with tiny shapes on the CPU, so
    an API mistake shows here and not first on the GPU. Nothing is measured."""
    res = gc.run_bench(torch.device("cpu"), small=True, timer=gc._time_cpu)
    assert res.status == "passed", [r for r in res.rows if r.get("status") == "failed"]
    ops_run = {(r["op"], r["backend"]) for r in res.rows if r["status"] == "passed"}
    assert {("sparse_decode_attention", "triton"), ("sparse_decode_attention", "cuda"), ("fc_scores", "triton"),
            ("select_tokens", "cuda"), ("gather_tokens", "triton"), ("verify_tree_greedy", "cuda"),
            ("verify_tree_stochastic", "triton"), ("token_information_scores", "triton")} <= ops_run
    with_baseline = {"sparse_decode_attention", "fc_scores", "select_tokens", "gather_tokens", "verify_tree_greedy",
                     "verify_tree_stochastic"}  # the others are compared with their torch backend row
    assert all(r["baseline"] and r["baseline_ms"] is not None for r in res.rows
               if r["status"] == "passed" and r["op"] in with_baseline)
    assert {"compress_qkv", "decompress", "matrix_entropy"} <= {r["op"] for r in res.rows if r["status"] == "passed"}
    # every op with a kernel backend (the smoke program's list) is benchmarked with each of its kernel backends
    from tokprune.tools.gpu_smoke import KERNEL_OPS

    assert {(op, b) for op, bs in KERNEL_OPS.items() for b in bs} - ops_run == set()
    against_attention = {"token_sparse_attention": "sdpa(causal)", "paged_sparse_decode_attention": "sdpa(full)",
                         "paged_decode_attention": "sdpa(full)"}
    for op, base in against_attention.items():
        assert any(r["op"] == op and r["baseline"] == base and r["baseline_ms"] is not None for r in res.rows
                   if r["status"] == "passed"), op
    audit = gc.run_audit(torch.device("cpu"), steps=4, warmup=2, small=True)
    assert audit.status == "passed" and audit.rows[0]["steps"] == 4
    assert audit.rows[0]["tokprune_C"] == (gc_unavailable("cuda") is None)


def gc_unavailable(backend):
    from tokprune._backend import unavailable_reason

    return unavailable_reason(backend, torch.device("cpu"), "sparse_decode_attention")


def test_audit_fails_on_a_host_sync_in_the_decode_step(monkeypatch):
    """A decode op that synchronises (as ``.item()`` does under ``torch.cuda.set_sync_debug_mode``) fails the
    audit with the count; simulated on the CPU by the warning that mode emits."""
    import warnings

    from tokprune.ops import paged

    real = paged.paged_select

    def syncing(*args, **kwargs):
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(paged, "paged_select", syncing)
    audit = gc.run_audit(torch.device("cpu"), steps=4, warmup=2, small=True)
    assert audit.status == "failed" and "host synchronisations in the steady state (max 1 per step)" in audit.reason


def test_suite_step_runs_every_test_file_that_uses_the_device_helpers(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = gc.kernel_test_files()
    for name in ("test_paged.py", "test_triton_defects.py", "test_fasa.py", "test_csrc.py", "test_op_limits.py"):
        assert f"tests/{name}" in files, name
    for name in os.listdir(os.path.join(root, "tests")):
        if name.startswith("test_") and name.endswith(".py") and name != "test_gpu_check.py":
            text = open(os.path.join(root, "tests", name)).read()
            if "backend_params(" in text or "needs_backend(" in text:
                assert f"tests/{name}" in files, f"{name} uses the device helpers but the suite step skips it"
    # a new file is picked up by its import line alone
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_new_kernel.py").write_text("from tests.helpers import assert_close, dev, host\n")
    (tmp_path / "tests" / "test_cpu_only.py").write_text("from tests.helpers import assert_close\n")
    assert gc.kernel_test_files(str(tmp_path)) == ["tests/test_new_kernel.py"]


@pytest.mark.slow
def test_large_offset_program_on_cpu():
    """gpu_smoke.large_offsets on CPU tensors (interpreter, host build): views past 2**31 elements of one
    lazily committed buffer. (It reported a mismatch when run against the int32 gather kernel that
    preceded the int64 fix.)"""
    from tokprune.tools.gpu_smoke import large_offsets

    try:
        rows = large_offsets(torch.device("cpu"))
    except (RuntimeError, MemoryError) as exc:  # no room for the lazily committed 13 GB address range
        pytest.skip(f"cannot reserve the large buffer here: {exc}")
    assert rows and [r for r in rows if r["status"] == "failed"] == []
    assert {r["op"] for r in rows} == {"gather_tokens@2^31", "sparse_decode_attention@2^31", "fc_scores@2^31",
                                       "paged_sparse_decode_attention@2^31", "paged_decode_attention@2^31",
                                       "paged_fc_scores@2^31"}


def test_recompile_audit_finds_every_compiled_triton_kernel():
    """Outside the interpreter every @triton.jit kernel of tokprune holds a compile cache the audit can count
    (all empty here: nothing was launched)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json; from tokprune.tools.gpu_check import triton_cache_sizes; "
            "print(json.dumps(triton_cache_sizes()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    for kernel in ("fasa._fc_scores_kernel", "fasa._sparse_decode_split_kernel", "gather._gather_tokens_kernel",
                   "spec._verify_stochastic_kernel", "entropy._masked_gram_kernel"):
        assert sizes.get(kernel) == 0, (kernel, sizes)


def test_whole_check_keeps_to_its_time_budget(tmp_path, monkeypatch):
    """Steps that would start after the budget is spent are skipped with that reason (faked GPU facts and
    fake steps: nothing runs on a device)."""
    calls = []

    def fake_step(name, out_dir, limit, extra=()):
        calls.append((name, limit))
        return gc.StepResult(name, "passed")

    clock = iter(range(0, 100000, 200))  # every time.time() call advances 200 s
    monkeypatch.setattr(gc.time, "time", lambda: next(clock))
    monkeypatch.setattr(gc, "_python_step", fake_step)
    monkeypatch.setattr(gc, "step_build", lambda g, o, limit: fake_step("build", o, limit))
    monkeypatch.setattr(gc, "step_suite", lambda o, limit: fake_step("suite", o, limit))
    monkeypatch.setattr(gc, "step_sanitizer", lambda g, f, o, limit: fake_step("sanitizer", o, limit))
    code = gc.run_check(str(tmp_path), facts=H200, record=False, budget_s=600)
    rows = {r["step"]: r for r in csv.DictReader(open(tmp_path / "gpu_check.csv")) if r["kind"] == "step"}
    assert calls and all(limit <= 600 for _, limit in calls)
    skipped = [n for n, r in rows.items() if r["status"] == "skipped"]
    assert skipped and all("budget of the whole check is spent" in rows[n]["detail"] for n in skipped)
    assert code == 0


def test_build_step_fails_unless_the_report_shows_cuda_kernels_for_exactly_the_device_arch(tmp_path, monkeypatch):
    """A strict build that exits 0 but compiled no CUDA kernels (nvcc not picked up) or other archs does not
    count as built: the cuda backend would otherwise be validated on a host-only extension."""
    g = gc.gate(H200)
    monkeypatch.setattr(gc, "_run", lambda cmd, limit, env=None, log=None: (0, "ok", 1.0))
    report = tmp_path / "_C_build.json"
    for content, expected in [
        ({"cuda": False, "archs": []}, "without CUDA kernels"),
        ({"cuda": True, "archs": ["sm_80", "sm_90"]}, "expected exactly ['sm_90']"),
        (None, "no build report"),
    ]:
        if content is None:
            report.unlink()
        else:
            report.write_text(json.dumps(content))
        res = gc.step_build(g, str(tmp_path), 10, report_path=str(report))
        assert res.status == "failed" and expected in res.reason, (content, res.reason)
    report.write_text(json.dumps({"cuda": True, "archs": ["sm_90"], "cuda_runtime": "13.0"}))
    res = gc.step_build(g, str(tmp_path), 10, report_path=str(report))
    assert res.status == "passed" and "CUDA runtime 13.0" in res.details[0]


def test_report_has_a_benchmark_table_from_the_bench_rows(tmp_path):
    g = gc.gate(H200)
    bench = gc.StepResult("bench", "passed", rows=[
        {"kind": "bench", "op": "sparse_decode_attention", "backend": "triton", "shape": "B4", "status": "passed",
         "median_ms": 0.5, "baseline": "sdpa(full)", "baseline_ms": 2.0, "speedup_vs_baseline": 4.0},
        {"kind": "bench", "op": "fc_scores", "backend": "cuda", "shape": "B4", "status": "skipped", "detail": "x"}])
    md, csv_path = gc.write_report(str(tmp_path), H200, g, [bench], None)
    text = open(md).read()
    assert "| sparse_decode_attention | triton | B4 | 0.5 | sdpa(full) | 2.0 | 4.0 |" in text
    assert "| fc_scores | cuda |" not in text  # skipped cases stay in the CSV only
    rows = list(csv.DictReader(open(csv_path)))
    assert {r["op"] for r in rows if r["kind"] == "bench"} == {"sparse_decode_attention", "fc_scores"}
