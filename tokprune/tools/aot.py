"""Compile every shipped Triton kernel for real GPUs without one and report resource usage.

    python -m tokprune.tools.aot [--arch 80 90] [--family NAME] [--kernel NAME] [--json FILE] [--check] [--jobs N]

For each registered kernel (see :mod:`tokprune.kernels.triton.aot`), each argument-type variant
(element and index dtypes; strides as Triton specialises them at run time: ``i32`` divisible by 16 with
unit strides the constant 1 and 16-byte aligned pointers, or ``i64`` for tensors past 2**31 elements),
each launch configuration and each target architecture, this runs ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``, writes the cubin, and reads registers, spill
(``STACK``/``LOCAL`` bytes) and static shared memory with the ``cuobjdump --dump-resource-usage`` that
ships inside the triton wheel; dynamic shared memory comes from the compiled kernel's metadata. It
also counts the 32-bit multiplications by a stride in the Triton IR (``i32_stride_products``): such
an offset wraps past 2**31 elements. ``--check`` exits with status 1 when any
configuration spills, needs more shared memory than the architecture allows per block, or fails to
compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

# Max dynamic shared memory per block (opt-in), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class AotResult:
    family: str
    kernel: str
    config: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    compile_s: float
    error: Optional[str] = None
    variant: str = ""
    i32_stride_products: int = 0

    @property
    def ok(self) -> bool:
        limit = SHARED_LIMIT.get(self.arch, 101376)
        return self.error is None and self.spill_bytes == 0 and self.shared_bytes <= limit


def cuobjdump_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found inside the triton wheel at {path}")
    return path


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def read_resource_usage(cubin: bytes) -> dict:
    """Parse ``cuobjdump --dump-resource-usage`` of one cubin: registers, stack, shared, local bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path],
                              capture_output=True, text=True, check=True).stdout
    match = _USAGE.search(text)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


_SSA = re.compile(r"^\s*(%[\w.]+)\s*=\s*([\w.]+)\s+(.*?)\s*:\s*(.*)$")


def count_i32_stride_products(ttir: str) -> int:
    """Number of 32-bit multiplications by a ``stride_*`` argument in a Triton IR module.

    Such a product (``i32 offset * i32 stride``) wraps once it passes 2**31 elements; a kernel that
    casts its offsets to int64 first has none. Splats / broadcasts / reshapes of a stride count as
    the stride itself.
    """
    derived = set()
    count = 0
    for line in ttir.splitlines():
        line = line.split(" loc(")[0]
        match = _SSA.match(line)
        if match is None:
            continue
        result, op, operands, types = match.groups()
        names = set(re.findall(r"%[\w.]+", operands))
        from_stride = any(n.startswith("%stride_") or n in derived for n in names)
        is_i32 = bool(re.search(r"(^|[\sx])i32>?\s*$", types.split("->")[-1].strip()))
        if op in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape") and from_stride and is_i32:
            derived.add(result)
        elif op == "arith.muli" and from_stride and is_i32:
            count += 1
    return count


def compile_one(spec, config, arch: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = dict(getattr(spec, "constants", {}))
    signature = dict(spec.signature)
    signature.update({name: "constexpr" for name in constants})
    signature.update({name: "constexpr" for name in config.constexprs})
    arg_names = list(spec.kernel.arg_names)
    attrs = {(arg_names.index(n),): [["tt.divisibility", 16]] for n in getattr(spec, "divisible", ())}
    variant = getattr(spec, "variant", "")
    start = time.perf_counter()
    try:
        source = ASTSource(fn=spec.kernel, signature=signature, constexprs={**constants, **config.constexprs},
                           attrs=attrs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages, **config.options}
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        usage = read_resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # report, do not hide: a kernel that does not compile fails --check
        return AotResult(spec.family, spec.name, config.label(), arch, 0, 0, 0,
                         time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                         variant=variant)
    shared = max(int(compiled.metadata.shared), usage["shared"])
    return AotResult(spec.family, spec.name, config.label(), arch, usage["registers"],
                     usage["stack"] + usage["local"], shared, time.perf_counter() - start, variant=variant,
                     i32_stride_products=count_i32_stride_products(compiled.asm.get("ttir", "")))


def run_aot(archs: Sequence[int] = (80, 90), families: Optional[Sequence[str]] = None,
            planted_spill: bool = False, progress: bool = True, n_jobs: int = 1,
            kernels: Optional[Sequence[str]] = None) -> List[AotResult]:
    """Compile all registered kernels (optionally only ``families``) for ``archs``, in ``n_jobs``
    processes (results keep the registry order)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the AOT check without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    from tokprune.kernels.triton.aot import registered_kernels

    specs = registered_kernels()
    if families:
        specs = [s for s in specs if s.family in families]
    if kernels:
        specs = [s for s in specs if s.name in kernels]
    if planted_spill:
        from tokprune.tools._planted import planted_spill_kernel

        specs.append(planted_spill_kernel())
    jobs = [(s, c, a) for s in specs for c in s.configs for a in archs]
    bar = _progress(len(jobs), progress)
    if n_jobs <= 1 or planted_spill:
        results = []
        for spec, config, arch in jobs:
            results.append(compile_one(spec, config, arch))
            bar.update(1)
    else:  # worker processes rebuild the registry (same import order) and compile by position
        import concurrent.futures
        import multiprocessing

        positions = {id(s): i for i, s in enumerate(registered_kernels())}
        work = [(positions[id(s)], list(s.configs).index(c), a) for s, c, a in jobs]
        results = [None] * len(work)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_by_position, *w): i for i, w in enumerate(work)}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    return results


def _compile_by_position(spec_index: int, config_index: int, arch: int) -> AotResult:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from tokprune.kernels.triton.aot import registered_kernels

    spec = registered_kernels()[spec_index]
    return compile_one(spec, spec.configs[config_index], arch)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="aot compile", disable=not enabled, file=sys.stderr)
    except ImportError:  # tqdm is in the bench/test extras only
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def _table(header, rows) -> str:
    rows = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results: Sequence[AotResult]) -> str:
    header = ("family", "kernel", "variant", "config", "sm", "regs", "spill B", "shared B", "i32 x stride", "ok",
              "compile s")
    return _table(header, [
        (r.family, r.kernel, r.variant, r.config, str(r.arch), str(r.registers), str(r.spill_bytes),
         str(r.shared_bytes), str(r.i32_stride_products), "yes" if r.ok else ("ERROR: " + r.error if r.error else "NO"),
         f"{r.compile_s:.2f}")
        for r in results
    ])


def format_summary(results: Sequence[AotResult]) -> str:
    """One row per kernel: compiled configurations, max registers / spill / shared, failures."""
    groups = {}
    for r in results:
        groups.setdefault((r.family, r.kernel), []).append(r)
    rows = []
    for (family, kernel), rs in groups.items():
        rows.append((family, kernel, str(len(rs)), str(max(r.registers for r in rs)),
                     str(max(r.spill_bytes for r in rs)), str(max(r.shared_bytes for r in rs)),
                     str(max(r.i32_stride_products for r in rs)), str(sum(not r.ok for r in rs))))
    return _table(("family", "kernel", "compiled", "max regs", "max spill B", "max shared B", "max i32 x stride",
                   "failing"), rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokprune.tools.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default 80 90)")
    parser.add_argument("--family", nargs="+", help="only these kernel families")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit 1 on spills, shared overflow or errors")
    parser.add_argument("--planted-spill", action="store_true",
                        help="add a kernel configuration built to spill (proves --check catches spills)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--kernel", nargs="+", help="only these kernels (function names)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    args = parser.parse_args(argv)
    results = run_aot(args.arch, args.family, args.planted_spill, progress=not args.quiet, n_jobs=args.jobs,
                      kernels=args.kernel)
    print(format_table(results))
    print()
    print(format_summary(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiled configurations, {len(bad)} failing "
          f"(spill > 0, shared > per-block limit, or compile error)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in results], f, indent=1)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
