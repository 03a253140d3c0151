"""Build checks of csrc/: every .cu compiles for sm_80 and sm_90 with no register spills (ptxas -v),
and the build skips cleanly when it cannot run. Needs nvcc for the compile checks (skipped with the
reason otherwise); everything else runs everywhere."""

import concurrent.futures
import os
import shutil
import subprocess

import pytest

import tokprune_build as tb
from tokprune import _ext

NVCC = tb.find_nvcc()
REQUIRED_ARCHS = ("sm_80", "sm_90")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here")
SMEM_LIMIT_SM80 = 48 * 1024  # static shared memory per block


def _cu_sources():
    return [os.path.basename(p)[:-3] for p in tb.sources()[1]]


def _fresh_report():
    """The ptxas records of the last build if it covers every .cu for sm_80 and sm_90 and is newer than
    the sources (``make test`` builds first, so this is the normal case); else ``None``."""
    path = os.path.join(tb.ROOT, "tokprune", tb.REPORT_NAME)
    if not os.path.exists(path):
        return None
    newest = max(os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(tb.CSRC) for f in fs)
    if os.path.getmtime(path) < newest:
        return None
    records = _ext.build_report().get("ptxas", [])
    have = {(r["source"], r["arch"]) for r in records}
    if not all((src, arch) in have for src in _cu_sources() for arch in REQUIRED_ARCHS):
        return None
    return records


def _compile(src: str, arch: str, out_dir: str, extra=()):
    cmd = [NVCC, "-O3", "-std=c++17", "-Xptxas", "-v", f"-I{os.path.join(tb.CSRC, 'include')}",
           "-gencode", f"arch=compute_{arch[3:]},code={arch}", "-c", src, "-o",
           os.path.join(out_dir, f"{os.path.basename(src)}.{arch}.o"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed for {src} ({arch}):\n{proc.stderr[-4000:]}"
    return tb.parse_ptxas(proc.stderr, os.path.basename(src)[:-3])


@pytest.fixture(scope="module")
def ptxas_records(tmp_path_factory):
    records = _fresh_report()
    if records is not None:
        print(f"using the ptxas report of the last build ({len(records)} kernel builds)")
        return records
    out = str(tmp_path_factory.mktemp("nvcc"))
    jobs = [(src, arch) for src in tb.sources()[1] for arch in REQUIRED_ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(job[0], job[1], out), jobs))
    return [r for rs in results for r in rs]


def _table(records):
    return "\n".join(f"{r['arch']:<6} regs={r['registers']:<4} spill_st={r['spill_stores']:<4} "
                     f"spill_ld={r['spill_loads']:<4} smem={r['smem']:<6} {r['kernel']}" for r in records)


@needs_nvcc
def test_every_cu_compiles_for_sm80_and_sm90(ptxas_records):
    sources = _cu_sources()
    assert sources, "no .cu files under csrc/"
    for src in sources:
        for arch in REQUIRED_ARCHS:
            kernels = [r for r in ptxas_records if r["source"] == src and r["arch"] == arch]
            assert kernels, f"{src}.cu produced no kernel for {arch}"
    assert all(r["registers"] is not None and r["spill_stores"] is not None for r in ptxas_records)


@needs_nvcc
def test_no_register_spills_and_smem_within_sm80(ptxas_records):
    print("\n" + _table(ptxas_records))
    spills = [r for r in ptxas_records if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "kernels with register spills:\n" + _table(spills)
    big = [r for r in ptxas_records if r["smem"] > SMEM_LIMIT_SM80]
    assert not big, "kernels over the 48 KiB static shared memory of sm_80:\n" + _table(big)


@needs_nvcc
@pytest.mark.slow
def test_spill_check_fails_on_a_planted_spill(tmp_path):
    src = tmp_path / "planted.cu"
    src.write_text(
        "__global__ void planted(const float* x, float* y, int n) {\n"
        "  float a[48];\n"
        "#pragma unroll\n"
        "  for (int i = 0; i < 48; ++i) a[i] = x[threadIdx.x + i * n];\n"
        "  float s = 0.f;\n"
        "#pragma unroll\n"
        "  for (int i = 0; i < 48; ++i) s += a[i] * a[47 - i] + a[(i * 7) % 48];\n"
        "  y[threadIdx.x] = s;\n}\n")
    records = _compile(str(src), "sm_80", str(tmp_path), extra=("-maxrregcount=16",))
    assert records and records[0]["kernel"].startswith("planted")
    assert records[0]["spill_stores"] > 0 and records[0]["spill_loads"] > 0


def test_parse_ptxas_reads_registers_spills_and_smem():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 2384 bytes smem, 536 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers
"""
    foo, bar = tb.parse_ptxas(text, "x")
    got = (foo["arch"], foo["registers"], foo["spill_stores"], foo["spill_loads"], foo["smem"])
    assert got == ("sm_80", 64, 4, 8, 2384)
    assert (bar["arch"], bar["registers"], bar["spill_stores"], bar["smem"]) == ("sm_90", 30, 0, 0)
    if shutil.which("c++filt"):
        assert foo["kernel"] == "foo(float*)"


def test_build_skips_cleanly(monkeypatch, capsys):
    monkeypatch.setenv("TOKPRUNE_NO_EXT", "1")
    assert tb.extension_setup() == ({}, [])
    assert "TOKPRUNE_NO_EXT=1" in capsys.readouterr().err
    monkeypatch.delenv("TOKPRUNE_NO_EXT")
    monkeypatch.setattr(tb, "find_cxx", lambda: None)
    assert tb.extension_setup() == ({}, [])
    assert "no C++ compiler" in capsys.readouterr().err
    # even a strict build only skips (with the reason) when there is no compiler
    assert tb.build(os.path.join(str(tb.BUILD_DIR), "never.so"), strict=True) is None
    monkeypatch.setattr(tb, "sources", lambda: ([], []))
    assert "no C++ sources" in tb.missing_requirements()


def test_cuda_archs_from_environment(monkeypatch):
    monkeypatch.delenv("TOKPRUNE_CUDA_ARCHS", raising=False)
    assert tb.cuda_archs() == ["80", "90"]
    monkeypatch.setenv("TOKPRUNE_CUDA_ARCHS", "sm_80, 90a")
    assert tb.cuda_archs() == ["80", "90a"]
    monkeypatch.setenv("TOKPRUNE_CUDA_ARCHS", "hopper")
    with pytest.raises(tb.BuildError, match="'hopper' is not an arch"):
        tb.cuda_archs()


@pytest.mark.skipif(_ext.load_error() is not None, reason=f"tokprune._C not available: {_ext.load_error()}")
@pytest.mark.slow
def test_module_reports_its_build_and_needs_no_cuda_driver():
    info = _ext.build_info()
    assert set(info["ops"]) == {"verify_tree_greedy", "verify_tree_stochastic", "sparse_decode_attention",
                                "select_tokens", "paged_fasa_decode", "small_m_linear"}
    report = _ext.build_report()
    if report:
        assert info["cuda"] == report["cuda"] and info["archs"] == report["archs"]
        if report["cuda"]:  # the runtime linked statically, what the driver must support (issue 12 defect 4)
            assert report["cuda_runtime"] == tb.nvcc_version(report["nvcc"]) and _ext.cuda_runtime_version()
    assert bool(info["parts"]["cuda"]) == info["cuda"]
    if shutil.which("ldd"):
        # cudart is linked statically: importing needs neither libcudart.so nor libcuda (no GPU here)
        deps = subprocess.run(["ldd", _ext.extension().__file__], capture_output=True, text=True).stdout
        assert "libcuda" not in deps and "libcudart" not in deps, deps
    from tokprune.cli import info_lines

    text = "\n".join(info_lines())
    assert "compiled parts: host (g++)" in text
    if info["cuda"]:
        assert "CUDA (nvcc): verify_tree.cu" in text


def test_committed_codes_header_is_the_rendering_of_the_python_table():
    """csrc/include/tokprune/codes.h is generated from tokprune/_codes.py: a hand edit of either side
    (a code changed in one place only) fails here."""
    from tokprune import _codes

    with open(os.path.join(tb.ROOT, _codes.HEADER_PATH)) as f:
        assert f.read() == _codes.c_header()
    assert tb.load_codes().DTYPES == _codes.DTYPES  # the build reads the same table, without torch
    # every consumer takes the codes from the table
    from tokprune.kernels import cuda as kcuda
    from tokprune.kernels.triton import spec as tspec
    from tokprune.ops import spec as ospec

    assert tspec.RULE_IDS is _codes.RULE_IDS and kcuda.RULES is _codes.RULE_IDS
    assert tuple(ospec.RULES) == tuple(_codes.RULE_IDS)
    assert {str(k).replace("torch.", ""): v for k, v in kcuda.DTYPE_CODES.items()} == _codes.DTYPES


def test_codes_header_rewritten_only_when_the_table_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "ROOT", str(tmp_path))
    (tmp_path / "tokprune").mkdir()
    shutil.copy(os.path.join(os.path.dirname(tb.__file__), "tokprune", "_codes.py"), tmp_path / "tokprune")
    path = tb.write_codes_header()
    first = os.stat(path).st_mtime_ns
    assert "enum Rule : int { kSpecInfer = 0, kRSD = 1, kTargetOnly = 2 };" in open(path).read()
    assert tb.write_codes_header() == path and os.stat(path).st_mtime_ns == first  # unchanged: not rewritten
    src = tmp_path / "tokprune" / "_codes.py"
    src.write_text(src.read_text().replace('"target_only": 2', '"target_only": 3'))
    tb.write_codes_header()
    assert "kTargetOnly = 3" in open(path).read()


@pytest.mark.skipif(_ext.load_error() is not None, reason=f"tokprune._C not available: {_ext.load_error()}")
def test_compiled_codes_and_op_list_come_from_the_binary():
    from tokprune import _codes

    info = _ext.build_info()
    assert info["codes"] == {"dtypes": _codes.DTYPES, "rules": _codes.RULE_IDS,
                             "attn_max_head_dim": _codes.ATTN_MAX_HEAD_DIM}, "stale build: rebuild tokprune._C"
    # the op list is recorded by the binding as it binds each function: every listed op is callable
    lib = _ext.extension()
    assert info["ops"] and all(callable(getattr(lib, op)) for op in info["ops"])


def test_nvcc_version_parsed(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    fake.chmod(0o755)
    assert tb.nvcc_version(str(fake)) == "12.4"
    assert tb.nvcc_version(None) is None


_CONV_PROGRAM = r"""
#include "tokprune/common.h"
#include <cstdio>
using namespace tokprune;
int main(int argc, char** argv) {
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  for (unsigned h = 0; h < 65536; ++h) { float x = fp16_to_float((uint16_t)h); fwrite(&x, 4, 1, out); }
  float x;
  while (fread(&x, 4, 1, in) == 1) {
    uint16_t hb = float_to_fp16(x), bb = float_to_bf16(x);
    fwrite(&hb, 2, 1, out);
    fwrite(&bb, 2, 1, out);
  }
  fclose(in);
  fclose(out);
  return 0;
}
"""


@pytest.mark.skipif(tb.find_cxx() is None, reason="no C++ compiler")
def test_shared_header_float16_conversions_match_torch(tmp_path):
    """csrc/include/tokprune/common.h converts fp16/bf16 exactly like torch (all halves, RNE midpoints)."""
    import numpy as np
    import torch

    (tmp_path / "conv.cpp").write_text(_CONV_PROGRAM)
    exe = tmp_path / "conv"
    subprocess.run([tb.find_cxx(), "-O1", f"-I{os.path.join(tb.CSRC, 'include')}", str(tmp_path / "conv.cpp"),
                    "-o", str(exe)], check=True)
    halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = halves.float()[torch.isfinite(halves.float())].sort().values.double()
    g = torch.Generator().manual_seed(0)
    floats = torch.cat([
        torch.randint(-2**31, 2**31, (200_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32),
        ((finite[:-1] + finite[1:]) / 2).float(),  # exact ties: round half to even
        torch.tensor([65504.0, 65519.99, 65520.0, 1e-45, -0.0, float("inf"), float("-inf"), float("nan")])])
    floats.numpy().tofile(tmp_path / "in.bin")
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    raw = np.fromfile(tmp_path / "out.bin", dtype=np.uint8)
    h2f = torch.from_numpy(raw[: 65536 * 4].copy().view(np.float32))
    pairs = torch.from_numpy(raw[65536 * 4:].copy().view(np.int16)).view(-1, 2)
    ref = halves.float()
    assert bool(((h2f == ref) | (h2f.isnan() & ref.isnan())).all())
    for col, dtype in ((0, torch.float16), (1, torch.bfloat16)):
        expected = floats.to(dtype)
        got = pairs[:, col].contiguous().view(dtype)
        same = (got.view(torch.int16) == expected.view(torch.int16)) | (got.isnan() & expected.isnan())
        assert bool(same.all()), f"{dtype}: {int((~same).sum())} conversions differ, e.g. {floats[~same][:4].tolist()}"


@needs_nvcc
def test_cuda_compile_error_fails_the_strict_build(tmp_path, monkeypatch):
    """What `make ext` (and so `make test`) runs: a compile error in a .cu file is an error."""
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void broken(float* x) { x[0] = undefined_symbol; }\n")
    cpp, _ = tb.sources()
    monkeypatch.setattr(tb, "sources", lambda: (cpp, [str(broken)]))
    monkeypatch.setattr(tb, "BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("TOKPRUNE_BUILD_JOBS", "1")  # the .cu fails before the C++ files are compiled
    with pytest.raises(tb.BuildError, match="undefined_symbol"):
        tb.build(str(tmp_path / "pkg" / "_C.so"), strict=True)


def test_lenient_build_falls_back_to_host_then_to_nothing(monkeypatch, capsys):
    """What `pip install` runs: a failed CUDA build retries host-only; a failed host build skips."""
    calls = []

    def fake_build(output, verbose, use_cuda=True):
        calls.append(use_cuda)
        if use_cuda or len(calls) > 2:
            raise tb.BuildError(f"planted failure {len(calls)}")
        return {"cuda": False}

    monkeypatch.setattr(tb, "_build", fake_build)
    monkeypatch.setattr(tb, "missing_requirements", lambda: None)
    monkeypatch.setattr(tb, "find_nvcc", lambda: "/fake/nvcc")
    assert tb.build("unused.so", strict=False) == {"cuda": False} and calls == [True, False]
    assert "retrying the host part only" in capsys.readouterr().err
    calls.append("second build")
    assert tb.build("unused.so", strict=False) is None
    assert "continuing without it" in capsys.readouterr().err
    with pytest.raises(tb.BuildError, match="planted failure"):
        tb.build("unused.so", strict=True)
