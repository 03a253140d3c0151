"""``make gpu-check``: prove (or disprove) every tokprune kernel on the CUDA machine it runs on.

One command, at most ~10 minutes on one H100/H200, with the torch and triton already installed there and
no network. Steps (each in its own process, with its own time limit; a step that cannot run is
*skipped with the reason*):

1. ``env``       gate: CUDA device, compute capability, driver, ``torch.version.cuda``, an nvcc whose
                 release matches torch's CUDA, pybind11/ninja (:func:`gate`).
2. ``build``     ``tokprune._C`` built strictly (``TOKPRUNE_EXT_STRICT=1``) for exactly the device's arch
                 with that nvcc.
3. ``suite``     the kernel tests with ``TOKPRUNE_TEST_DEVICE=cuda`` (CUDA tensors, interpreter off): every
                 test file using the device helpers of tests/helpers.py (:func:`kernel_test_files`).
4. ``smoke``     :mod:`tokprune.tools.gpu_smoke`: every Triton and CUDA op against the torch backend.
5. ``sanitizer`` ``compute-sanitizer`` memcheck, racecheck and synccheck over the smoke program.
6. ``large``     kernels on tensors past 2**31 elements.
7. ``stress``    stochastic tree verification, batch 512, vocabulary 128K, 200 repeats, every result equal
                 to the CPU oracle (torch backend on CPU copies), under a time limit (a race can hang).
8. ``audit``     100 FASA decode steps (contiguous and paged cache): host synchronisations
                 (``torch.cuda.set_sync_debug_mode``, must be 0 after warm-up) and Triton recompilations
                 (compiled-kernel cache sizes after warm-up and at the end).
9. ``bench``     every op of :data:`tokprune.tools.gpu_smoke.KERNEL_OPS` against its baseline (SDPA,
                 flash-attn when importable, torch ops, its own torch backend) with CUDA events,
                 interleaved rounds, medians.

Writes ``gpu_check.md`` and ``gpu_check.csv`` to ``--out`` (``OUT=`` of the Makefile). When every
correctness step passed it records the device's architecture in ``tokprune/data/validated_archs.json``
(with the backends proven there), which switches ``auto`` to the kernel backends on that architecture.

On a machine without a GPU every GPU step is skipped with the reason, and the report is still written
(``tests/test_gpu_check.py`` runs it that way in CI).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: test files whose kernel tests run on CUDA in the ``suite`` step (those present are used), besides every file
#: that uses the device helpers of tests/helpers.py (:func:`kernel_test_files`).
KERNEL_TESTS = ("tests/test_csrc.py", "tests/test_spec_ops.py", "tests/test_selection.py", "tests/test_entropy.py",
                "tests/test_token_sparse.py", "tests/test_fasa.py", "tests/test_triton_defects.py",
                "tests/test_paged.py", "tests/test_backend.py")
#: how a test file shows that it runs kernels on TOKPRUNE_TEST_DEVICE (helpers imported from tests.helpers).
_DEVICE_HELPERS = re.compile(r"from tests\.helpers import[^\n]*\b(TEST_DEVICE|needs_backend|backend_params|dev)\b")


def kernel_test_files(root: str = ROOT) -> List[str]:
    """Test files of the ``suite`` step: :data:`KERNEL_TESTS` plus every ``tests/test_*.py`` importing the device
    helpers (``TEST_DEVICE``, ``needs_backend``, ``backend_params``, ``dev``), so a newly converted file is
    run on the GPU without being listed here."""
    import glob

    files = [f for f in KERNEL_TESTS if os.path.exists(os.path.join(root, f))]
    for path in sorted(glob.glob(os.path.join(root, "tests", "test_*.py"))):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if rel not in files and rel != "tests/test_gpu_check.py":
            with open(path) as f:
                if _DEVICE_HELPERS.search(f.read()):
                    files.append(rel)
    return files
#: steps whose success validates an architecture (bench and audit measure; they do not validate).
CORRECTNESS_STEPS = ("env", "build", "suite", "smoke", "sanitizer", "large", "stress")
STEPS = CORRECTNESS_STEPS + ("audit", "bench")
#: default time limits in seconds (the whole check stays under ~10 minutes on one H100/H200).
LIMITS = {"env": 60, "build": 150, "suite": 200, "smoke": 60, "sanitizer": 240, "large": 60, "stress": 120,
          "audit": 60, "bench": 120}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


@dataclass
class StepResult:
    """Outcome of one step: ``status`` is ``passed | failed | skipped``; ``reason`` says why when not passed."""
    name: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    details: List[str] = field(default_factory=list)
    rows: List[dict] = field(default_factory=list)  # CSV rows (benchmarks, per-op results)


# --------------------------------------------------------------------------------------------- facts
def _version(text: Optional[str]) -> Optional[Tuple[int, int]]:
    m = re.search(r"(\d+)\.(\d+)", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvcc_candidates(torch_cuda: Optional[str]) -> List[str]:
    """nvcc executables to consider, the one of torch's CUDA release first."""
    cands = [os.environ.get("TOKPRUNE_NVCC")]
    if torch_cuda:
        cands.append(f"/usr/local/cuda-{torch_cuda}/bin/nvcc")
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    seen, out = set(), []
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK) and os.path.realpath(c) not in seen:
            seen.add(os.path.realpath(c))
            out.append(c)
    return out


def collect_facts() -> dict:
    """What the gate decides from: torch/triton versions, device, driver, nvcc candidates, build tools."""
    import torch

    sys.path.insert(0, ROOT)
    import tokprune_build as tb
    from tokprune._backend import driver_cuda_version

    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "device_name": None, "capability": None, "driver_cuda": driver_cuda_version(), "triton": None,
             "nvcc": [], "pybind11": False, "ninja": tb.find_ninja() is not None, "cxx": tb.find_cxx(),
             "compute_sanitizer": shutil.which("compute-sanitizer")
             or next((p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import pybind11  # noqa: F401

        facts["pybind11"] = True
    except ImportError:
        pass
    if facts["cuda_available"]:
        facts["device_name"] = torch.cuda.get_device_name(0)
        facts["capability"] = list(torch.cuda.get_device_capability(0))
    facts["nvcc"] = [{"path": p, "release": tb.nvcc_version(p)} for p in nvcc_candidates(facts["torch_cuda"])]
    return facts


@dataclass
class Gate:
    """Decision of the environment gate: ``gpu`` (GPU steps can run), ``build`` (``_C`` can be built), the
    chosen ``nvcc`` and ``arch``, and the reasons for what cannot run."""
    gpu: bool
    build: bool
    arch: Optional[str]
    nvcc: Optional[str]
    reasons: List[str]
    notes: List[str]


def gate(facts: dict) -> Gate:
    """Decide from ``facts`` (see :func:`collect_facts`) what can run. Pure: tests feed it faked facts."""
    reasons, notes = [], []
    gpu = True
    if not facts.get("torch_cuda"):
        gpu = False
        reasons.append(f"torch {facts.get('torch')} is a CPU build (torch.version.cuda is None)")
    elif not facts.get("cuda_available"):
        gpu = False
        reasons.append("no CUDA device is visible to torch")
    if not facts.get("triton"):
        gpu = False
        reasons.append("triton is not installed")
    cap = facts.get("capability")
    arch = f"{cap[0]}{cap[1]}" if cap else None
    if gpu and cap and tuple(cap) < (7, 5):
        gpu = False
        reasons.append(f"compute capability {cap[0]}.{cap[1]} is below 7.5, the oldest GPU Triton supports")
    torch_cuda, driver = _version(facts.get("torch_cuda")), _version(facts.get("driver_cuda"))
    if gpu and torch_cuda and driver and driver < torch_cuda and driver[0] < torch_cuda[0]:
        gpu = False
        reasons.append(f"the driver supports CUDA {facts.get('driver_cuda')} but torch needs {facts.get('torch_cuda')}")
    nvcc = None
    build = gpu
    if gpu:
        same = [n for n in facts.get("nvcc", []) if _version(n.get("release")) == torch_cuda]
        major = [n for n in facts.get("nvcc", []) if _version(n.get("release"))
                 and torch_cuda and _version(n.get("release"))[0] == torch_cuda[0]]
        pick = (same or major or [None])[0]
        if pick is None:
            build = False
            found = ", ".join(f"{n['path']} ({n.get('release')})" for n in facts.get("nvcc", [])) or "none"
            reasons.append(f"no nvcc of torch's CUDA {facts.get('torch_cuda')} (found: {found}); tokprune._C is not "
                           f"built, the cuda backend is not validated")
        else:
            nvcc = pick["path"]
            if not same:
                notes.append(f"nvcc {pick.get('release')} differs in minor version from torch's CUDA "
                             f"{facts.get('torch_cuda')}")
            rel = _version(pick.get("release"))
            if driver and rel and driver[0] < rel[0]:
                build = False
                reasons.append(f"the driver supports CUDA {facts.get('driver_cuda')}, older than nvcc {pick.get('release')}")
        for tool, ok in (("pybind11", facts.get("pybind11")), ("ninja", facts.get("ninja")), ("a C++ compiler", facts.get("cxx"))):
            if not ok:
                build = False
                reasons.append(f"{tool} is missing: tokprune._C is not built, the cuda backend is not validated")
    return Gate(gpu=gpu, build=build, arch=arch, nvcc=nvcc, reasons=reasons, notes=notes)


# ------------------------------------------------------------------------------------------- running
def _run(cmd: List[str], limit: float, env: Optional[dict] = None, log: Optional[str] = None) -> Tuple[int, str, float]:
    """Run ``cmd`` with a time limit; returns (exit code, output tail, seconds). 124 = time limit."""
    start = time.time()
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=limit)
        code, out = proc.returncode, (proc.stdout or "") + (proc.stderr or "")
    except subprocess.TimeoutExpired as exc:
        code = 124
        out = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        out += f"\n[time limit of {limit:.0f} s reached]"
    if log:
        with open(log, "w") as f:
            f.write(out)
    return code, out[-4000:], time.time() - start


#: correctness steps run with tokprune's debug mode: data checks on, and every tokprune._C launch synchronised
#: so that a kernel fault is reported by the op that caused it.
DEBUG_ENV = {"TOKPRUNE_DEBUG": "1", "TOKPRUNE_CUDA_SYNC": "1"}


def _python_step(name: str, out_dir: str, limit: float, extra: Sequence[str] = ()) -> StepResult:
    """Run ``--run-step name`` of this module in a fresh process (isolation and a time limit)."""
    result_file = os.path.join(out_dir, f"step_{name}.json")
    if os.path.exists(result_file):
        os.remove(result_file)
    env = DEBUG_ENV if name in ("smoke", "large") else {}
    code, tail, seconds = _run([sys.executable, "-m", "tokprune.tools.gpu_check", "--run-step", name,
                                "--out", out_dir, *extra], limit, env, log=os.path.join(out_dir, f"step_{name}.log"))
    if os.path.exists(result_file):
        with open(result_file) as f:
            res = StepResult(**json.load(f))
        res.seconds = seconds
        return res
    why = "time limit reached (hang?)" if code == 124 else f"process exited with {code}"
    return StepResult(name, "failed", why, seconds, details=tail.splitlines()[-20:])


def check_build_report(report: dict, arch: str) -> Optional[str]:
    """Why the build report (``tokprune/_C_build.json``) does not show CUDA kernels compiled for exactly
    ``sm_<arch>``; ``None`` when it does."""
    if not report:
        return "no build report (tokprune/_C_build.json) was written"
    if not report.get("cuda"):
        return "tokprune._C was built without CUDA kernels (host build only)"
    if report.get("archs") != [f"sm_{arch}"]:
        return f"tokprune._C was built for {report.get('archs')}, expected exactly ['sm_{arch}']"
    return None


def step_build(g: Gate, out_dir: str, limit: float, report_path: Optional[str] = None) -> StepResult:
    if not g.build:
        return StepResult("build", "skipped", "; ".join(r for r in g.reasons) or "gate refused the build")
    env = {"TOKPRUNE_CUDA_ARCHS": g.arch, "TOKPRUNE_NVCC": g.nvcc, "TOKPRUNE_EXT_STRICT": "1"}
    code, tail, seconds = _run([sys.executable, os.path.join(ROOT, "tokprune_build.py")], limit, env,
                               log=os.path.join(out_dir, "build.log"))
    if code != 0:
        return StepResult("build", "failed", f"tokprune_build.py exited with {code}", seconds, tail.splitlines()[-20:])
    try:
        with open(report_path or os.path.join(ROOT, "tokprune", "_C_build.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        report = {}
    bad = check_build_report(report, g.arch)
    if bad:
        return StepResult("build", "failed", bad, seconds, tail.splitlines()[-20:])
    return StepResult("build", "passed", "", seconds,
                      [f"built for sm_{g.arch} with {g.nvcc} (CUDA runtime {report.get('cuda_runtime')})"])


def step_suite(out_dir: str, limit: float) -> StepResult:
    files = kernel_test_files()
    junit = os.path.join(out_dir, "suite.xml")
    code, tail, seconds = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                                "not real_weights", f"--junitxml={junit}", *files], limit,
                               {"TOKPRUNE_TEST_DEVICE": "cuda"}, log=os.path.join(out_dir, "suite.log"))
    counts = {}
    if os.path.exists(junit):
        text = open(junit).read()
        m = re.search(r'<testsuite [^>]*errors="(\d+)" failures="(\d+)" skipped="(\d+)" tests="(\d+)"', text)
        if m:
            counts = dict(zip(("errors", "failures", "skipped", "tests"), map(int, m.groups())))
    summary = tail.strip().splitlines()[-1] if tail.strip() else ""
    status = "passed" if code == 0 else "failed"
    reason = "" if code == 0 else ("time limit reached" if code == 124 else f"pytest exited with {code}: {summary}")
    return StepResult("suite", status, reason, seconds, [summary, f"files: {' '.join(files)}"],
                      [{"kind": "suite", **counts}] if counts else [])


def step_sanitizer(g: Gate, facts: dict, out_dir: str, limit: float) -> StepResult:
    tool = facts.get("compute_sanitizer")
    if not tool:
        return StepResult("sanitizer", "skipped", "compute-sanitizer not found (PATH, /usr/local/cuda/bin)")
    details, rows, failed = [], [], []
    start = time.time()
    for check in SANITIZER_TOOLS:
        cmd = [tool, "--tool", check, "--error-exitcode", "3", "--print-limit", "20",
               sys.executable, "-m", "tokprune.tools.gpu_smoke", "--device", "cuda"]
        env = dict(DEBUG_ENV, **({"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if check == "memcheck" else {}))
        code, tail, seconds = _run(cmd, limit / len(SANITIZER_TOOLS), env,
                                   log=os.path.join(out_dir, f"sanitizer_{check}.log"))
        errors = re.search(r"ERROR SUMMARY: (\d+) error", tail)
        rows.append({"kind": "sanitizer", "tool": check, "exit": code, "errors": errors.group(1) if errors else "",
                     "seconds": round(seconds, 1)})
        details.append(f"{check}: exit {code}, {errors.group(0) if errors else 'no summary'} ({seconds:.0f} s)")
        if code != 0:
            failed.append(check)
    return StepResult("sanitizer", "failed" if failed else "passed",
                      f"{', '.join(failed)} reported errors or failed" if failed else "", time.time() - start,
                      details, rows)


# ------------------------------------------------------------------- in-process steps (--run-step)
def run_smoke(device) -> StepResult:
    from tokprune.tools.gpu_smoke import run_ops

    rows = run_ops(device)
    bad = [r for r in rows if r["status"] == "failed"]
    return StepResult("smoke", "failed" if bad else "passed",
                      f"{len(bad)} op/backend pairs differ from the torch backend" if bad else "",
                      details=[f"{r['status']} {r['op']} {r['backend']} {r['detail'][:200]}" for r in rows],
                      rows=[{"kind": "smoke", **r} for r in rows])


def run_large(device) -> StepResult:
    from tokprune.tools.gpu_smoke import large_offsets

    rows = large_offsets(device)
    bad = [r for r in rows if r["status"] == "failed"]
    return StepResult("large", "failed" if bad else "passed", f"{len(bad)} failed" if bad else "",
                      details=[f"{r['status']} {r['op']} {r['backend']} {r['detail'][:200]}" for r in rows],
                      rows=[{"kind": "large", **r} for r in rows])


def run_stress(device, batch: int = 512, vocab: int = 131072, repeats: int = 200, nodes: int = 6,
               distinct: int = 4, backends: Sequence[str] = ("triton", "cuda")) -> StepResult:
    """Stochastic verification ``repeats`` times per kernel backend (``distinct`` input sets, each repeated),
    every result equal to the torch backend on CPU copies (vectorised oracle, itself tested against
    :mod:`tokprune.reference.spec`). A race shows as a differing repeat; a hang as the step's time limit."""
    import torch

    from tokprune._backend import unavailable_reason
    from tokprune.ops import spec

    gen = torch.Generator().manual_seed(11)
    parents = torch.full((batch, nodes), -1, dtype=torch.int64)
    for i in range(1, nodes):  # a chain plus branches: deep paths and sibling rejections
        parents[:, i] = torch.randint(max(0, i - 2), i, (batch,), generator=gen)
    logits = torch.randn(batch, nodes, vocab, generator=gen) * 3
    target = torch.softmax(logits, -1)
    draft = torch.softmax(logits + torch.randn(batch, nodes, vocab, generator=gen), -1)
    tokens = torch.multinomial(draft.view(-1, vocab), 1, generator=gen).view(batch, nodes)
    rows, details, bad = [], [], 0
    inputs = {}
    for backend in backends:
        reason = unavailable_reason(backend, device, "verify_tree_stochastic")
        if reason is not None:
            details.append(f"{backend}: skipped: {reason}")
            rows.append({"kind": "stress", "backend": backend, "status": "skipped", "detail": reason})
            continue
        if not inputs:
            inputs = {k: v.to(device) for k, v in
                      (("tokens", tokens), ("parents", parents), ("target", target), ("draft", draft))}
        mismatches = 0
        for d in range(distinct):
            rule = ("specinfer", "rsd", "target_only")[d % 3]
            u = torch.rand(batch, nodes, generator=gen)
            expected = spec.verify_tree_stochastic(tokens, parents, target, draft, rule=rule, uniforms=u,
                                                   backend="torch")
            ud = u.to(device)
            for _ in range(max(1, repeats // distinct)):
                got = spec.verify_tree_stochastic(inputs["tokens"], inputs["parents"], inputs["target"],
                                                  inputs["draft"], rule=rule, uniforms=ud, backend=backend)
                if not all(torch.equal(g.cpu(), e) for g, e in zip(got, expected)):
                    mismatches += 1
        bad += mismatches
        runs = distinct * max(1, repeats // distinct)
        details.append(f"{backend}: {runs - mismatches}/{runs} repeats equal to the CPU oracle "
                       f"(batch {batch}, vocab {vocab}, {nodes} nodes)")
        rows.append({"kind": "stress", "backend": backend, "status": "failed" if mismatches else "passed",
                     "repeats": runs, "mismatches": mismatches, "batch": batch, "vocab": vocab})
    ran = [r for r in rows if r["status"] != "skipped"]
    if not ran:
        return StepResult("stress", "skipped", "no kernel backend can run verify_tree_stochastic here",
                          details=details, rows=rows)
    return StepResult("stress", "failed" if bad else "passed", f"{bad} repeats differ" if bad else "",
                      details=details, rows=rows)


def triton_cache_sizes() -> Dict[str, int]:
    """Compiled variants held by every ``@triton.jit`` kernel of tokprune (recompilation audit)."""
    import importlib

    from tokprune.kernels.triton import kernel_modules

    sizes = {}
    for module in kernel_modules():  # every kernel module the package ships
        mod_name = module.rsplit(".", 1)[1]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name, obj in vars(mod).items():
            for _ in range(4):  # autotuner / heuristics wrappers hold the JITFunction in .fn
                if hasattr(obj, "device_caches") or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            caches = getattr(obj, "device_caches", None)
            if caches is None:
                continue
            try:  # (kernel_cache, ...) per device in the Triton versions this was written against
                sizes[f"{mod_name}.{name}"] = sum(len(entry[0]) for entry in caches.values())
            except (TypeError, IndexError, KeyError):
                sizes[f"{mod_name}.{name}"] = -1  # layout unknown to this check: reported, not compared
    return sizes


def run_audit(device, steps: int = 100, warmup: int = 10, backend: str = "triton", small: bool = False) -> StepResult:
    """FASA decode over ``steps`` steps of a growing cache, contiguous (fc_scores -> select_sparse_indices ->
    sparse_decode_attention) and paged (write_paged_fc_keys -> paged_fc_scores -> paged_select ->
    paged_sparse_decode_attention): host synchronisations per step in the steady state (must be 0) and
    Triton kernels compiled after warm-up (must not grow: a new compile per length would recompile every
    step)."""
    import warnings

    import torch

    from tokprune import _debug, ops
    from tokprune._backend import unavailable_reason
    from tokprune.ops import paged

    if device.type != "cuda" and not small:
        return StepResult("audit", "skipped", "needs a CUDA device (torch.cuda.set_sync_debug_mode)")
    on_cuda = device.type == "cuda"
    reason = unavailable_reason(backend, device, "fc_scores")
    if reason is not None:
        return StepResult("audit", "skipped", f"{backend}: {reason}")
    previous = _debug.set_debug(False)  # the production path: no data-reading checks
    gen = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, dim, start, budget = (1, 4, 2, 32, 40, 16) if small else (4, 32, 8, 128, 4000, 512)
    total = start + steps
    k = torch.randn(batch, kv_heads, total, dim, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(batch, kv_heads, total, dim, generator=gen).to(device, torch.bfloat16)
    fc = torch.randint(0, dim // 2, (kv_heads, 8), generator=gen).to(device)
    q_all = torch.randn(steps, batch, heads, 1, dim, generator=gen).to(device, torch.bfloat16)
    # the same cache, paged (vLLM layout, block size 16, each request on its own blocks) with the FASA side cache
    bs = 16
    n_blk = -(-total // bs)
    pad = n_blk * bs - total

    def paged_view(x):
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(batch, kv_heads, n_blk, bs, dim).transpose(1, 2).reshape(batch * n_blk, kv_heads, bs, dim)

    k_paged, v_paged = paged_view(k), paged_view(v)
    table = torch.arange(batch * n_blk, device=device, dtype=torch.int32).view(batch, n_blk)
    fc_cache = torch.zeros(batch * n_blk, kv_heads, bs, 16, device=device, dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), start, device=device, dtype=torch.int32)
    with_c = unavailable_reason("cuda", device, "sparse_decode_attention") is None
    syncs, cache_after_warmup = [], {}
    try:
        for step in range(steps):
            n = start + step
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if on_cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    scores = ops.fc_scores(q_all[step], k[:, :, :n], fc, backend=backend)
                    idx = ops.select_sparse_indices(scores.float(), budget, sink=4, window=min(64, budget // 2))
                    ops.sparse_decode_attention(q_all[step], k[:, :, :n], v[:, :, :n], idx, dim ** -0.5,
                                                backend=backend)
                    if with_c:  # the same attention through tokprune._C
                        ops.sparse_decode_attention(q_all[step], k[:, :, :n], v[:, :, :n], idx, dim ** -0.5,
                                                    backend="cuda")
                    # paged step: write this token's FC keys, score, select slots, attend (max_len given: no sync)
                    slot = table[:, (n - 1) // bs].long() * bs + (n - 1) % bs
                    paged.write_paged_fc_keys(fc_cache, k[:, :, n - 1], slot, fc, backend=backend)
                    q_row = q_all[step][:, :, 0]
                    pscores = paged.paged_fc_scores(q_row, fc_cache, table, seq_lens, fc, reduce="max",
                                                    max_len=total, backend=backend)
                    slots = paged.paged_select(pscores, budget, 4, min(64, budget // 2), seq_lens, table, bs,
                                               backend=backend)
                    paged.paged_sparse_decode_attention(q_row, k_paged, v_paged, slots, dim ** -0.5, backend=backend)
                    seq_lens += 1
                finally:
                    if on_cuda:
                        torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum(1 for w in caught if "synchroniz" in str(w.message).lower()))
            if step + 1 == warmup:
                if on_cuda:
                    torch.cuda.synchronize(device)
                cache_after_warmup = triton_cache_sizes()
        if on_cuda:
            torch.cuda.synchronize(device)
    finally:
        _debug.set_debug(previous)
    cache_end = triton_cache_sizes()
    grew = {name: (cache_after_warmup.get(name, 0), size) for name, size in cache_end.items()
            if size > cache_after_warmup.get(name, 0)}
    steady = syncs[warmup:]
    rows = [{"kind": "audit", "steps": steps, "tokprune_C": with_c, "syncs_per_step_median": statistics.median(steady),
             "syncs_per_step_max": max(steady), "kernels_compiled_after_warmup": sum(cache_after_warmup.values()),
             "kernels_compiled_at_end": sum(cache_end.values())}]
    details = [f"paths: contiguous ({backend}{' and cuda' if with_c else ''}) and paged ({backend})",
               f"host syncs per decode step after warm-up: median {statistics.median(steady)}, max {max(steady)}",
               f"Triton variants after {warmup} steps: {sum(cache_after_warmup.values())}, after {steps}: "
               f"{sum(cache_end.values())}"] + [f"recompiled: {n} {a} -> {b}" for n, (a, b) in grew.items()]
    problems = ([f"{len(grew)} kernels recompiled after warm-up"] if grew else []) + (
        [f"host synchronisations in the steady state (max {max(steady)} per step)"] if max(steady) else [])
    return StepResult("audit", "failed" if problems else "passed", "; ".join(problems), details=details, rows=rows)


def _time_cuda(fns: Dict[str, callable], rounds: int = 15, warmup: int = 3) -> Dict[str, float]:
    """Median milliseconds of each callable with CUDA events, rounds interleaved across callables."""
    import torch

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _time_cpu(fns: Dict[str, callable], rounds: int = 1, warmup: int = 0) -> Dict[str, float]:
    """Stand-in for :func:`_time_cuda` when the bench code itself is tested on a CPU (not a measurement)."""
    out = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        out[name] = (time.perf_counter() - start) * 1e3
    return out


def run_bench(device, small: bool = False, timer=None) -> StepResult:
    """Every op with each kernel backend against its baseline (same run, interleaved, medians). ``small`` and
    ``timer`` exist for testing this code on a CPU with tiny shapes; they measure nothing."""
    import torch
    import torch.nn.functional as F

    from tokprune import _debug, ops
    from tokprune._backend import unavailable_reason
    from tokprune.ops import spec

    if device.type != "cuda" and not small:
        return StepResult("bench", "skipped", "needs a CUDA device (CUDA events)")
    timer = timer or _time_cuda
    previous = _debug.set_debug(False)
    rows, details = [], []
    gen = torch.Generator().manual_seed(1)

    def r(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    try:
        flash = None
        try:
            from flash_attn import flash_attn_func as flash  # type: ignore
        except ImportError:
            pass
        B, H, Hkv, T, D, K = (1, 4, 2, 64, 32, 16) if small else (4, 32, 8, 16384, 128, 1024)
        q, k, v = r(B, H, 1, D), r(B, Hkv, T, D), r(B, Hkv, T, D)
        idx = torch.sort(torch.randint(0, T, (B, Hkv, K), generator=gen)).values.to(device)
        fc = torch.randint(0, D // 2, (Hkv, 8), generator=gen).to(device)
        cases = []
        baselines = {"sdpa(full)": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        if flash is not None:
            qf, kf, vf = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            baselines["flash_attn(full)"] = lambda: flash(qf, kf, vf)
        for be in ("triton", "cuda", "torch"):
            cases.append(("sparse_decode_attention", be, f"B{B} H{H}/{Hkv} T{T} D{D} K{K} bf16",
                          lambda be=be: ops.sparse_decode_attention(q, k, v, idx, D ** -0.5, backend=be), baselines))
        full_logits = {"q@k(full)": lambda: torch.matmul(q.view(B, Hkv, H // Hkv, D), k.transpose(-1, -2))}
        for be in ("triton", "torch"):
            cases.append(("fc_scores", be, f"B{B} H{H}/{Hkv} T{T} D{D} F8", lambda be=be: ops.fc_scores(q, k, fc, backend=be),
                          full_logits))
        scores = torch.randn(B * H, T, generator=gen).to(device)
        topk = {"torch.topk": lambda: torch.topk(scores, K, dim=-1)}
        for be in ("cuda", "torch"):
            cases.append(("select_tokens", be, f"rows {B * H} n {T} keep {K}",
                          lambda be=be: ops.select_tokens(scores, K, backend=be), topk))
        gidx = torch.randint(0, T, (B, H, K), generator=gen).to(device)
        gather_base = {"torch.gather": lambda: torch.gather(k.repeat_interleave(H // Hkv, 1), 2,
                                                            gidx[..., None].expand(-1, -1, -1, D))}
        for be in ("triton", "torch"):
            cases.append(("gather_tokens", be, f"B{B} H{H}/{Hkv} T{T} K{K}",
                          lambda be=be: ops.gather_tokens(k, gidx, backend=be), gather_base))
        V, N = (100, 4) if small else (128256, 16)
        tokens = torch.randint(0, V, (8, N), generator=gen).to(device)
        parents = torch.clamp(torch.arange(N) - 1, min=-1).repeat(8, 1).to(device)
        logits = r(8, N, V, dtype=torch.float32)
        probs = torch.softmax(logits, -1)
        u = torch.rand(8, N, generator=gen).to(device)
        for be in ("triton", "cuda", "torch"):
            cases.append(("verify_tree_greedy", be, f"B8 N{N} V{V}",
                          lambda be=be: spec.verify_tree_greedy(tokens, parents, logits, backend=be),
                          {"argmax(all rows)": lambda: logits.argmax(-1)}))
            cases.append(("verify_tree_stochastic", be, f"B8 N{N} V{V} rsd",
                          lambda be=be: spec.verify_tree_stochastic(tokens, parents, probs, probs, rule="rsd",
                                                                    uniforms=u, backend=be),
                          {"argmax(all rows)": lambda: logits.argmax(-1)}))
        x, xh = (r(1, 8, 64), 4) if small else (r(2, 576, 4096), 32)
        for be in ("triton", "torch"):
            cases.append(("token_information_scores", be, f"{tuple(x.shape)} heads{xh}",
                          lambda be=be: ops.token_information_scores(x, num_heads=xh, exact_reference=False, backend=be),
                          {}))
        xm = r(4, 64, 48) if small else r(32, 1024, 128)
        for be in ("triton", "torch"):
            cases.append(("matrix_entropy", be, f"{tuple(xm.shape)}", lambda be=be: ops.matrix_entropy(xm, backend=be),
                          {}))
        n_keep = T // 4
        sidx = torch.sort(torch.rand(B, H, T, generator=gen).argsort(-1)[..., :n_keep], -1).values.to(device)
        qs = r(B, H, T, D)
        comp = r(B, H, n_keep, D)
        for be in ("triton", "torch"):
            cases.append(("compress_qkv", be, f"B{B} H{H}/{Hkv} N{T} keep{n_keep} D{D}",
                          lambda be=be: ops.compress_qkv(qs, k, v, sidx, backend=be), {}))
            cases.append(("decompress", be, f"B{B} H{H} N{T} keep{n_keep} D{D}",
                          lambda be=be: ops.decompress(comp, sidx, T, backend=be), {}))
        xt = r(1, 4, 40, 16) if small else r(1, 32, 2048, 128)
        for be in ("triton", "torch"):
            cases.append(("truncated_matrix_entropy", be, f"{tuple(xt.shape)} k32",
                          lambda be=be: ops.truncated_matrix_entropy(xt, 8 if small else 32, backend=be), {}))
        # speculative KV compaction: the accepted path of a 16-node tree moved into place
        cache_kv = r(B * 2, Hkv, T, D)
        prefix = torch.full((B * 2,), T - 32, dtype=torch.int64, device=device)
        accept = torch.tensor([0, 2, 5, 9, -1], device=device).repeat(B * 2, 1)
        dst_rows = torch.arange(T - 32, T - 28, device=device)
        src_rows = (T - 32) + torch.tensor([0, 2, 5, 9], device=device)
        for be in ("triton", "torch"):
            cases.append(("compact_accepted_kv", be, f"B{B * 2} Hkv{Hkv} T{T} D{D} path4",
                          lambda be=be: spec.compact_accepted_kv(cache_kv, prefix, accept, backend=be),
                          {"index_copy(4 rows)": lambda: cache_kv.index_copy_(2, dst_rows, cache_kv.index_select(2, src_rows))}))
        # token sparse attention (prefill) against dense causal attention
        Np = 128 if small else 8192
        qp, kp, vp = r(1, H, Np, D), r(1, Hkv, Np, D), r(1, Hkv, Np, D)
        dense_prefill = {"sdpa(causal)": lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True,
                                                                               enable_gqa=True)}
        if flash is not None:
            qpf, kpf, vpf = (t.transpose(1, 2).contiguous() for t in (qp, kp, vp))
            dense_prefill["flash_attn(causal)"] = lambda: flash(qpf, kpf, vpf, causal=True)
        for be in ("triton", "torch"):
            cases.append(("token_sparse_attention", be, f"B1 H{H}/{Hkv} N{Np} D{D} keep0.25",
                          lambda be=be: ops.token_sparse_attention(qp, kp, vp, keep=0.25, window=min(128, Np // 4),
                                                                   backend=be), dense_prefill))
        cases += _paged_bench_cases(device, r, gen, small, flash)
        for op, be, shape, fn, bases in cases:
            reason = unavailable_reason(be, device, op)
            if reason is not None:
                rows.append({"kind": "bench", "op": op, "backend": be, "shape": shape, "status": "skipped",
                             "detail": reason})
                continue
            try:
                timed = timer({"op": fn, **bases})
            except Exception as exc:  # record, keep benchmarking the rest
                rows.append({"kind": "bench", "op": op, "backend": be, "shape": shape, "status": "failed",
                             "detail": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            for base, ms in ((b, timed[b]) for b in bases) if bases else [("", None)]:
                rows.append({"kind": "bench", "op": op, "backend": be, "shape": shape, "status": "passed",
                             "median_ms": round(timed["op"], 4), "baseline": base,
                             "baseline_ms": None if ms is None else round(ms, 4),
                             "speedup_vs_baseline": None if not ms else round(ms / timed["op"], 3)})
            details.append(f"{op} [{be}] {shape}: {timed['op']:.3f} ms"
                           + "".join(f"; {b} {timed[b]:.3f} ms" for b in bases))
    finally:
        _debug.set_debug(previous)
    failed = [x for x in rows if x.get("status") == "failed"]
    return StepResult("bench", "failed" if failed else "passed", f"{len(failed)} benchmark cases failed" if failed else "",
                      details=details, rows=rows)


def _paged_bench_cases(device, r, gen, small: bool, flash) -> list:
    """Bench cases of the paged decode ops (tokprune.ops.paged): ``R`` requests of ``T`` tokens each on a
    shuffled block table; attention against SDPA / flash-attn over a contiguous cache of the same size."""
    import torch
    import torch.nn.functional as F

    from tokprune.ops import paged

    R, H, Hkv, T, D, K, bs, ps = (2, 4, 2, 64, 32, 16, 16, 4) if small else (8, 32, 8, 16384, 128, 1024, 16, 16)
    nb = R * T // bs + 4
    table = torch.randperm(nb, generator=gen)[:R * T // bs].view(R, T // bs).to(device, torch.int32)
    seq_lens = torch.full((R,), T, dtype=torch.int32, device=device)
    k_cache, v_cache = r(nb, Hkv, bs, D), r(nb, Hkv, bs, D)
    q = r(R, H, D)
    fc_index = torch.stack([torch.randperm(D // 2, generator=gen)[:8] for _ in range(Hkv)]).to(device)
    fc_cache = r(nb, Hkv, bs, 16)
    key = r(R, Hkv, D)
    slot_mapping = (table[:, -1].long() * bs + bs - 1).contiguous()  # the last slot of each request
    scores = torch.randn(R, Hkv, T, generator=gen).to(device)
    slots = paged.paged_select(scores, K, 4, 64 if not small else 4, seq_lens, table, bs, backend="torch")
    kmin = r(nb, Hkv, bs // ps, D)
    kmax = kmin + 1
    page_scores = torch.randn(R, H, T // ps, generator=gen).to(device)
    q4, kc, vc = q.view(R, H, 1, D), r(R, Hkv, T, D), r(R, Hkv, T, D)
    dense = {"sdpa(full)": lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)}
    if flash is not None:
        qf, kf, vf = q4.transpose(1, 2).contiguous(), kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
        dense["flash_attn(full)"] = lambda: flash(qf, kf, vf)
    shape = f"R{R} H{H}/{Hkv} T{T} D{D} bs{bs}"
    scale = D ** -0.5
    cases = []
    for be in ("triton", "torch"):
        cases += [
            ("write_paged_fc_keys", be, f"{shape} F8", lambda be=be: paged.write_paged_fc_keys(
                fc_cache, key, slot_mapping, fc_index, backend=be), {}),
            ("paged_fc_scores", be, f"{shape} F8", lambda be=be: paged.paged_fc_scores(
                q, fc_cache, table, seq_lens, fc_index, reduce="max", max_len=T, backend=be),
             {"q@k(full)": lambda: torch.matmul(q.view(R, Hkv, H // Hkv, D), kc.transpose(-1, -2))}),
            ("paged_select", be, f"{shape} K{K}", lambda be=be: paged.paged_select(
                scores, K, 4, 64 if not small else 4, seq_lens, table, bs, backend=be),
             {"torch.topk": lambda: torch.topk(scores, K, dim=-1)}),
            ("paged_sparse_decode_attention", be, f"{shape} K{K}", lambda be=be: paged.paged_sparse_decode_attention(
                q, k_cache, v_cache, slots, scale, backend=be), dense),
            ("paged_decode_attention", be, shape, lambda be=be: paged.paged_decode_attention(
                q, k_cache, v_cache, table, seq_lens, scale, max_len=T, backend=be), dense),
            ("update_paged_page_bounds", be, f"{shape} page{ps}", lambda be=be: paged.update_paged_page_bounds(
                kmin, kmax, key, slot_mapping, ps, backend=be), {}),
            ("paged_quest_scores", be, f"{shape} page{ps}", lambda be=be: paged.paged_quest_scores(
                q, kmin, kmax, table, seq_lens, ps, max_len=T, backend=be), dense),
            ("paged_select_pages", be, f"{shape} page{ps} pages{K // ps}", lambda be=be: paged.paged_select_pages(
                page_scores, K // ps, seq_lens, table, bs, ps, backend=be), {}),
        ]
    # the fused FASA step (host build only: on a GPU its "cuda" row is skipped with the reason) and the
    # small-M linear of speculative tree forwards (fp32), each against its torch backend and a dense baseline
    from tokprune.ops.linear import small_m_linear
    from tokprune.reference.fasa import fc_dims

    dims = fc_dims(fc_index, D, 1)  # (Hkv, 16): the FC cache's packed dims
    M, N, Kin = (4, 24, 40) if small else (8, 1536, 576)
    x, weight = r(M, Kin, dtype=torch.float32), r(N, Kin, dtype=torch.float32)
    for be in ("cuda", "torch"):
        cases += [
            ("paged_fasa_decode", be, f"{shape} F8 budget{K}", lambda be=be: paged.paged_fasa_decode(
                q, k_cache, v_cache, fc_cache, dims, table, seq_lens, K, 4, 4, scale, backend=be), dense),
            ("small_m_linear", be, f"M{M} N{N} K{Kin} fp32", lambda be=be: small_m_linear(x, weight, backend=be),
             {"F.linear": lambda: F.linear(x, weight)}),
        ]
    return cases


def run_step_in_process(name: str, out_dir: str, args) -> StepResult:
    import torch

    device = torch.device(args.device)
    if name == "smoke":
        return run_smoke(device)
    if name == "large":
        return run_large(device)
    if name == "stress":
        return run_stress(device, args.stress_batch, args.stress_vocab, args.stress_repeats)
    if name == "audit":
        return run_audit(device)
    if name == "bench":
        return run_bench(device)
    raise ValueError(f"unknown in-process step {name!r}")


# ---------------------------------------------------------------------------------------- report
def write_report(out_dir: str, facts: dict, g: Gate, results: List[StepResult], validated: Optional[dict]) -> Tuple[str, str]:
    """``gpu_check.md`` (human) and ``gpu_check.csv`` (one row per step and per measured case)."""
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "gpu_check.md")
    cap = facts.get("capability")
    lines = ["# tokprune gpu-check", "",
             f"- date (UTC): {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
             f"- device: {facts.get('device_name') or 'none'}"
             + (f", compute capability {cap[0]}.{cap[1]} (sm_{cap[0]}{cap[1]})" if cap else ""),
             f"- driver supports CUDA: {facts.get('driver_cuda') or 'unknown'}; torch {facts.get('torch')} "
             f"(CUDA {facts.get('torch_cuda') or 'none'}); triton {facts.get('triton') or 'not installed'}",
             f"- nvcc: {g.nvcc or 'none chosen'}; compute-sanitizer: {facts.get('compute_sanitizer') or 'not found'}",
             f"- gate: GPU steps {'run' if g.gpu else 'skipped'}; tokprune._C build {'run' if g.build else 'skipped'}"]
    lines += [f"  - {r}" for r in g.reasons] + [f"  - note: {n}" for n in g.notes]
    lines += ["", "| step | status | seconds | reason |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.reason.replace('|', '/')} |")
    bench = [row for r in results for row in r.rows if row.get("kind") == "bench" and row.get("status") == "passed"]
    if bench:
        lines += ["", "## Benchmarks (CUDA events, interleaved rounds, medians; speedup = baseline ms / op ms)", "",
                  "| op | backend | shape | ms | baseline | baseline ms | speedup |", "|---|---|---|---|---|---|---|"]
        for row in bench:
            lines.append(f"| {row['op']} | {row['backend']} | {row['shape']} | {row['median_ms']} | "
                         f"{row.get('baseline') or '-'} | {row.get('baseline_ms') or '-'} | "
                         f"{row.get('speedup_vs_baseline') or '-'} |")
    for r in results:
        if r.details:
            lines += ["", f"## {r.name}", ""] + [f"    {d}" for d in r.details]
    lines += ["", "## Validation", "",
              (f"Recorded in tokprune/data/validated_archs.json: {json.dumps(validated)}" if validated else
               "Not recorded: not every correctness step passed (" + ", ".join(
                   f"{r.name}={r.status}" for r in results if r.name in CORRECTNESS_STEPS) + ").")]
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    path = os.path.join(out_dir, "gpu_check.csv")
    rows = [{"kind": "step", "step": r.name, "status": r.status, "seconds": round(r.seconds, 2), "detail": r.reason}
            for r in results]
    rows += [dict(row, step=r.name) for r in results for row in r.rows]
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else str(row.get(k)).splitlines()[0] if row.get(k) != "" else "")
                             for k in keys})
    return md, path


def validation_entry(results: List[StepResult], facts: dict, g: Gate) -> Optional[dict]:
    """The validated_archs.json entry when every correctness step passed (``None`` otherwise). ``backends``
    lists ``triton``, plus ``cuda`` when tokprune._C was built and its kernels ran in smoke and stress."""
    by_name = {r.name: r for r in results}
    needed = [s for s in CORRECTNESS_STEPS if s != "build"]
    if not g.gpu or any(by_name.get(s) is None or by_name[s].status != "passed" for s in needed):
        return None
    ran = lambda step, be: any(row.get("backend") == be and row.get("status") == "passed"  # noqa: E731
                               for row in by_name[step].rows)
    backends = [be for be in ("triton", "cuda") if ran("smoke", be) and ran("stress", be)]
    if "cuda" in backends and by_name.get("build", StepResult("build", "skipped")).status != "passed":
        backends.remove("cuda")
    if not backends:
        return None
    try:
        with open(os.path.join(ROOT, "tokprune", "_C_build.json")) as f:
            build = json.load(f)
    except (OSError, ValueError):
        build = {}
    return {"backends": backends, "device": facts.get("device_name"), "torch": facts.get("torch"),
            "tokprune_C": {"archs": build.get("archs"), "cuda_runtime": build.get("cuda_runtime")}
            if "cuda" in backends else None,
            "torch_cuda": facts.get("torch_cuda"), "triton": facts.get("triton"),
            "driver_cuda": facts.get("driver_cuda"), "nvcc": g.nvcc,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}


def write_validated(arch: str, entry: dict, path: Optional[str] = None) -> str:
    """Add ``sm_<arch>`` -> ``entry`` to ``validated_archs.json`` (other architectures are kept)."""
    from tokprune import _backend

    path = path or _backend.VALIDATED_ARCHS_PATH
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data.setdefault("archs", {})[f"sm_{arch}"] = entry
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    _backend.validated_archs.cache_clear()
    return path


def run_check(out_dir: str, steps: Sequence[str] = STEPS, facts: Optional[dict] = None,
              limits: Optional[dict] = None, extra: Sequence[str] = (), record: bool = True,
              budget_s: float = 600.0) -> int:
    """Run the check; returns the exit code: 0 when every step that ran passed, 1 when one failed, 2 when
    the gate found no usable GPU (nothing was proven; the report says why)."""
    os.makedirs(out_dir, exist_ok=True)
    limits = dict(LIMITS, **(limits or {}))
    start = time.time()
    facts = facts or collect_facts()
    g = gate(facts)
    results = [StepResult("env", "passed" if g.gpu else "skipped", "; ".join(g.reasons) if not g.gpu else "",
                          time.time() - start, [f"{k}: {v}" for k, v in facts.items()])]
    no_gpu = "; ".join(g.reasons) or "no usable GPU"
    for name in steps:
        if name == "env":
            continue
        if not g.gpu:
            results.append(StepResult(name, "skipped", no_gpu))
            continue
        left = budget_s - (time.time() - start)
        if left < 15:
            results.append(StepResult(name, "skipped", f"the {budget_s:.0f} s budget of the whole check is spent"))
            continue
        limits[name] = min(limits[name], left)
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        if name == "build":
            res = step_build(g, out_dir, limits[name])
        elif name == "suite":
            res = step_suite(out_dir, limits[name])
        elif name == "sanitizer":
            res = step_sanitizer(g, facts, out_dir, limits[name])
        else:
            res = _python_step(name, out_dir, limits[name], extra)
        results.append(res)
        print(f"[gpu-check] {name}: {res.status} {res.reason} ({res.seconds:.0f} s)", file=sys.stderr, flush=True)
    validated = None
    if record and g.arch and set(CORRECTNESS_STEPS) <= set(steps):
        validated = validation_entry(results, facts, g)
        if validated:
            write_validated(g.arch, validated)
    md, csv_path = write_report(out_dir, facts, g, results, validated)
    print(f"[gpu-check] report: {md}, {csv_path} ({time.time() - start:.0f} s)", file=sys.stderr)
    if any(r.status == "failed" for r in results):
        return 1
    return 0 if g.gpu else 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokprune.tools.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-check-out", help="folder for gpu_check.md / gpu_check.csv")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--no-record", action="store_true", help="do not write validated_archs.json")
    parser.add_argument("--budget-s", type=float, default=600.0, help="time budget of the whole check (seconds)")
    parser.add_argument("--run-step", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--stress-batch", type=int, default=512)
    parser.add_argument("--stress-vocab", type=int, default=131072)
    parser.add_argument("--stress-repeats", type=int, default=200)
    args = parser.parse_args(argv)
    if args.run_step:  # child process of one step: write its result as JSON
        res = run_step_in_process(args.run_step, args.out, args)
        with open(os.path.join(args.out, f"step_{args.run_step}.json"), "w") as f:
            json.dump(asdict(res), f, default=str)
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; expected some of {STEPS}")
    extra = ["--stress-batch", str(args.stress_batch), "--stress-vocab", str(args.stress_vocab),
             "--stress-repeats", str(args.stress_repeats)]
    return run_check(args.out, steps, extra=extra, record=not args.no_record, budget_s=args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
