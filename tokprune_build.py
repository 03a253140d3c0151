"""Build of the optional extension ``tokprune._C`` (pybind11 + ninja, no torch headers).

* ``csrc/*.cpp`` (host kernels + bindings) are compiled with the C++ compiler (``$CXX`` or g++) always;
* ``csrc/*.cu`` are compiled with nvcc when nvcc is found (``$TOKPRUNE_NVCC``, ``$CUDA_HOME/bin/nvcc``,
  ``PATH``, ``/usr/local/cuda/bin/nvcc``), for the archs in ``TOKPRUNE_CUDA_ARCHS`` (default ``80;90``),
  with ``-Xptxas -v``; the ptxas report of every kernel (registers, spills, shared memory) is saved as
  ``build/ext/ptxas.json`` and next to the module as ``tokprune/_C_build.json``;
* cudart is linked statically, so importing ``tokprune._C`` needs neither a GPU nor libcuda
  (the driver is loaded by cudart only when a CUDA kernel is launched). The CUDA runtime version of that
  nvcc is recorded in ``_C_build.json`` (``cuda_runtime``): the driver must support it;
* ``csrc/include/tokprune/codes.h`` is generated first from ``tokprune/_codes.py`` (the one table of
  dtype and rule codes shared by Python, Triton and C++).

Environment: ``TOKPRUNE_NO_EXT=1`` skips the extension, ``TOKPRUNE_NO_CUDA=1`` builds the host part only,
``TOKPRUNE_EXT_STRICT=1`` turns a compile error into a failure (``make test`` sets it; ``pip install``
otherwise never fails because of the extension). A machine without a C++ compiler, pybind11 or ninja
always skips the extension with a message.

Also a script: ``python tokprune_build.py [--strict] [--verbose]`` builds ``tokprune/_C*.so`` in place.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
BUILD_DIR = os.path.join(ROOT, "build", "ext")
REPORT_NAME = "_C_build.json"


class BuildError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[tokprune build] {msg}", file=sys.stderr, flush=True)


def sources() -> Tuple[List[str], List[str]]:
    """(C++ sources, CUDA sources) under csrc/, sorted."""
    if not os.path.isdir(CSRC):
        return [], []
    names = sorted(os.listdir(CSRC))
    return ([os.path.join(CSRC, n) for n in names if n.endswith(".cpp")],
            [os.path.join(CSRC, n) for n in names if n.endswith(".cu")])


def load_codes():
    """``tokprune/_codes.py`` loaded by path (it imports nothing, so torch is not needed to build)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tokprune_codes", os.path.join(ROOT, "tokprune", "_codes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_codes_header() -> str:
    """Render ``csrc/include/tokprune/codes.h`` from ``tokprune/_codes.py``; rewrite it only if it changed
    (so ninja does not rebuild for nothing). Returns its path."""
    codes = load_codes()
    path = os.path.join(ROOT, codes.HEADER_PATH)
    text = codes.c_header()
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return path


def nvcc_version(nvcc: Optional[str]) -> Optional[str]:
    """CUDA release of ``nvcc`` (``"13.0"``), which is the runtime statically linked into ``tokprune._C``;
    ``None`` when unknown."""
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def find_cxx() -> Optional[str]:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    return None


def find_nvcc() -> Optional[str]:
    if os.environ.get("TOKPRUNE_NO_CUDA") == "1":
        return None
    cands = [os.environ.get("TOKPRUNE_NVCC")]
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for cand in cands:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def find_ninja() -> Optional[str]:
    try:
        import ninja  # type: ignore

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def cuda_archs() -> List[str]:
    raw = os.environ.get("TOKPRUNE_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d+a?", a):
            raise BuildError(f"TOKPRUNE_CUDA_ARCHS={raw!r}: {a!r} is not an arch like 80 or 90a")
    return archs


def openmp_flags(cxx: str) -> List[str]:
    """``["-fopenmp"]`` when ``cxx`` compiles and links an OpenMP program, else ``[]`` (the host kernels then
    run on one thread). The module links the same ``libgomp.so.1`` soname that torch's CPU wheel loads
    first, so one OpenMP runtime serves both."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel reduction(+ : n)\n"
                    "n += 1;\nreturn n > 0 ? 0 : 1; }\n")
        try:
            proc = subprocess.run(shlex.split(cxx) + ["-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return []
    return ["-fopenmp"] if proc.returncode == 0 else []


def missing_requirements() -> Optional[str]:
    """Why the extension cannot be built here (None when it can)."""
    cpp, _ = sources()
    if not cpp:
        return f"no C++ sources in {CSRC}"
    if find_cxx() is None:
        return "no C++ compiler (g++/c++/clang++) on PATH"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (pip install pybind11)"
    if find_ninja() is None:
        return "ninja is not installed (pip install ninja)"
    return None


def _ninja_file(cxx: str, nvcc: Optional[str], archs: List[str], out_so: str) -> Tuple[str, List[str]]:
    import pybind11

    cpp, cu = sources()
    py_inc = sysconfig.get_paths()["include"]
    inc = [os.path.join(CSRC, "include"), py_inc, pybind11.get_include()]
    omp = openmp_flags(cxx)
    cxxflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unused-function",
                "-Wno-unknown-pragmas", "-pthread"] + omp
    cxxflags += [f"-I{i}" for i in inc]
    lines = ["ninja_required_version = 1.3", ""]
    objs, ptxas = [], []
    ldflags = ["-shared", "-pthread"] + omp
    if nvcc:
        arch_str = ";".join(archs)
        cxxflags += ["-DTOKPRUNE_WITH_CUDA", f'-DTOKPRUNE_CUDA_ARCHS="{arch_str}"']
        # nvcc on PATH may be a wrapper script: look for cudart beside it, in CUDA_HOME, /usr/local/cuda.
        roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), os.environ.get("CUDA_HOME", ""),
                 "/usr/local/cuda"]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        last = archs[-1]
        gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
        nvflags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-lineinfo",
                   f"-I{os.path.join(CSRC, 'include')}"] + gencode
        # stderr (the ptxas report) goes to $out.ptxas; on failure it is printed.
        lines += [f"nvflags = {' '.join(shlex.quote(f) for f in nvflags)}",
                  "rule nvcc",
                  f"  command = {shlex.quote(nvcc)} $nvflags -c $in -o $out 2> $out.ptxas "
                  "|| (cat $out.ptxas >&2; exit 1)",
                  "  description = NVCC $in", ""]
        libdir = next((os.path.join(r, sub) for r in roots if r
                       for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))
                       if os.path.isfile(os.path.join(r, sub, "libcudart_static.a"))), None)
        if libdir is None:
            raise BuildError(f"nvcc found at {nvcc} but no libcudart_static.a under {[r for r in roots if r]}")
        ldflags += [f"-L{libdir}", "-lcudart_static", "-ldl", "-lpthread", "-lrt"]
    lines += [f"cxxflags = {' '.join(shlex.quote(f) for f in cxxflags)}",
              "rule cxx",
              f"  command = {cxx} -MMD -MF $out.d $cxxflags -c $in -o $out",
              "  depfile = $out.d", "  deps = gcc", "  description = CXX $in", "",
              f"ldflags = {' '.join(shlex.quote(f) for f in ldflags)}",
              "rule link", f"  command = {cxx} $in -o $out $ldflags", "  description = LINK $out", ""]
    headers = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(CSRC, "include")) for f in fs]
    # .cu first: with one job, a CUDA compile error stops the build before the slow pybind11 compile.
    if nvcc:
        for src in cu:
            obj = os.path.join(BUILD_DIR, os.path.basename(src) + ".o")
            objs.append(obj)
            ptxas.append(obj + ".ptxas")
            lines.append(f"build {obj}: nvcc {src} | {' '.join(headers)}")
    for src in cpp:
        obj = os.path.join(BUILD_DIR, os.path.basename(src) + ".o")
        objs.append(obj)
        lines.append(f"build {obj}: cxx {src}")
    lines.append(f"build {out_so}: link {' '.join(objs)}")
    lines.append("")
    return "\n".join(lines), ptxas


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}


def parse_ptxas(text: str, source: str = "") -> List[dict]:
    """Records ``{kernel, arch, registers, spill_stores, spill_loads, stack, smem, source}`` from ``-Xptxas -v``."""
    records, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "source": source, "registers": None,
                   "spill_stores": None, "spill_loads": None, "stack": None, "smem": 0}
            records.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    names = _demangle([r["kernel"] for r in records])
    for r in records:
        r["mangled"] = r["kernel"]
        r["kernel"] = names.get(r["kernel"], r["kernel"]).replace("(anonymous namespace)::", "")
    return records


def build(output: str, *, strict: bool = False, verbose: bool = False) -> Optional[dict]:
    """Build the extension into ``output`` (a path ending in the Python extension suffix).

    Returns the build report (also written beside ``output`` as ``_C_build.json``), or ``None`` when the
    extension was skipped (reason printed). Raises :class:`BuildError` on failure when ``strict``.
    """
    reason = missing_requirements()
    if reason is not None:  # a machine without a compiler is not an error, even when strict
        _log(f"skipping the optional extension tokprune._C: {reason}; tokprune will use its torch/Triton backends")
        return None
    try:
        return _build(output, verbose)
    except BuildError as exc:
        if strict:
            raise
        if find_nvcc() is not None:
            _log(f"building tokprune._C with nvcc failed; retrying the host part only.\n{exc}")
            try:
                return _build(output, verbose, use_cuda=False)
            except BuildError as exc2:
                exc = exc2
        _log(f"building tokprune._C failed; continuing without it (torch/Triton backends).\n{exc}")
        return None


def _build(output: str, verbose: bool, use_cuda: bool = True) -> dict:
    cxx, nvcc = find_cxx(), find_nvcc() if use_cuda else None
    archs = cuda_archs() if nvcc else []
    if nvcc is None:
        _log(("nvcc not found" if use_cuda else "without nvcc") + ": building the host (CPU) part of tokprune._C only")
    os.makedirs(BUILD_DIR, exist_ok=True)
    write_codes_header()
    out_so = os.path.join(BUILD_DIR, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    text, ptxas_files = _ninja_file(cxx, nvcc, archs, out_so)
    ninja_path = os.path.join(BUILD_DIR, "build.ninja")
    old = open(ninja_path).read() if os.path.exists(ninja_path) else None
    if old != text:
        with open(ninja_path, "w") as f:
            f.write(text)
    cmd = [find_ninja(), "-C", BUILD_DIR] + (["-v"] if verbose else [])
    jobs = os.environ.get("TOKPRUNE_BUILD_JOBS")
    if jobs:
        cmd += ["-j", jobs]
    _log(f"compiling csrc/ with {cxx}" + (f" and {nvcc} for sm_{', sm_'.join(archs)}" if nvcc else "")
         + " (ninja)")
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise BuildError(f"ninja failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    if verbose:
        print(proc.stdout, file=sys.stderr)
    records = []
    for path in ptxas_files:
        src = os.path.basename(path)[: -len(".cu.o.ptxas")]
        with open(path) as f:
            records += parse_ptxas(f.read(), src)
    report = {"cuda": nvcc is not None, "archs": [f"sm_{a}" for a in archs] if nvcc else [],
              "cxx": cxx, "nvcc": nvcc, "cuda_runtime": nvcc_version(nvcc), "ninja_seconds": round(seconds, 2),
              "ninja_output": proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else [],
              "ptxas": records}
    with open(os.path.join(BUILD_DIR, "ptxas.json"), "w") as f:
        json.dump(records, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    shutil.copyfile(out_so, output)
    with open(os.path.join(os.path.dirname(os.path.abspath(output)), REPORT_NAME), "w") as f:
        json.dump(report, f, indent=1)
    spills = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    where = ": " + ", ".join(f"{r['kernel']}@{r['arch']}" for r in spills) if spills else ""
    _log(f"built {output} in {seconds:.1f} s; {len(records)} kernel builds, {len(spills)} with spills{where}")
    return report


def inplace_output() -> str:
    return os.path.join(ROOT, "tokprune", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))


def extension_setup():
    """``(cmdclass, ext_modules)`` for setup.py; empty when the extension cannot or should not be built."""
    if os.environ.get("TOKPRUNE_NO_EXT") == "1":
        _log("TOKPRUNE_NO_EXT=1: not building tokprune._C")
        return {}, []
    reason = missing_requirements()
    strict = os.environ.get("TOKPRUNE_EXT_STRICT") == "1"
    if reason is not None:
        _log(f"skipping the optional extension tokprune._C: {reason}")
        return {}, []
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    class NinjaBuildExt(build_ext):
        """Builds tokprune._C with ninja (g++ + nvcc) instead of distutils' compiler."""

        def build_extension(self, ext):
            output = self.get_ext_fullpath(ext.name)
            self._tokprune_report = os.path.join(os.path.dirname(os.path.abspath(output)), REPORT_NAME)
            report = build(output, strict=strict, verbose=bool(self.verbose > 1))
            if report is None and not os.path.exists(output):
                # Leave no half-built module behind; setuptools may still try to copy it in place.
                self._tokprune_skipped = True

        def copy_extensions_to_source(self):
            if getattr(self, "_tokprune_skipped", False):
                return
            super().copy_extensions_to_source()
            src = getattr(self, "_tokprune_report", "")
            dst = os.path.join(ROOT, "tokprune", REPORT_NAME)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(dst):
                shutil.copyfile(src, dst)

        def get_outputs(self):
            return [] if getattr(self, "_tokprune_skipped", False) else super().get_outputs()

    return {"build_ext": NinjaBuildExt}, [Extension("tokprune._C", sources=[])]


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    strict, verbose = "--strict" in argv, "--verbose" in argv
    if os.environ.get("TOKPRUNE_NO_EXT") == "1":
        _log("TOKPRUNE_NO_EXT=1: not building tokprune._C")
        return 0
    try:
        build(inplace_output(), strict=strict or os.environ.get("TOKPRUNE_EXT_STRICT") == "1", verbose=verbose)
    except BuildError as exc:
        _log(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
