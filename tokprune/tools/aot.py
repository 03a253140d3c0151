"""Compile every shipped Triton kernel for real GPUs without one and report resource usage.

    python -m tokprune.tools.aot [--arch 80 90] [--family NAME] [--json FILE] [--check]

For each registered kernel (see :mod:`tokprune.kernels.triton.aot`), each launch configuration and
each target architecture, this runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))``, writes the cubin, and reads registers, spill (``STACK``/``LOCAL`` bytes) and static shared
memory with the ``cuobjdump --dump-resource-usage`` that ships inside the triton wheel; dynamic shared
memory comes from the compiled kernel's metadata. ``--check`` exits with status 1 when any
configuration spills or needs more shared memory than the architecture allows per block.
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


def compile_one(spec, config, arch: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(spec.signature)
    signature.update({name: "constexpr" for name in config.constexprs})
    start = time.perf_counter()
    try:
        source = ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(config.constexprs))
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages, **config.options}
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        usage = read_resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # report, do not hide: a kernel that does not compile fails --check
        return AotResult(spec.family, spec.name, config.label(), arch, 0, 0, 0,
                         time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    shared = max(int(compiled.metadata.shared), usage["shared"])
    return AotResult(spec.family, spec.name, config.label(), arch, usage["registers"],
                     usage["stack"] + usage["local"], shared, time.perf_counter() - start)


def run_aot(archs: Sequence[int] = (80, 90), families: Optional[Sequence[str]] = None,
            planted_spill: bool = False, progress: bool = True) -> List[AotResult]:
    """Compile all registered kernels (optionally only ``families``) for ``archs``."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the AOT check without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    from tokprune.kernels.triton.aot import registered_kernels

    specs = registered_kernels()
    if families:
        specs = [s for s in specs if s.family in families]
    if planted_spill:
        from tokprune.tools._planted import planted_spill_kernel

        specs.append(planted_spill_kernel())
    jobs = [(s, c, a) for s in specs for c in s.configs for a in archs]
    results = []
    bar = _progress(len(jobs), progress)
    for spec, config, arch in jobs:
        results.append(compile_one(spec, config, arch))
        bar.update(1)
    bar.close()
    return results


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


def format_table(results: Sequence[AotResult]) -> str:
    header = ("family", "kernel", "config", "sm", "regs", "spill B", "shared B", "ok", "compile s")
    rows = [header] + [
        (r.family, r.kernel, r.config, str(r.arch), str(r.registers), str(r.spill_bytes),
         str(r.shared_bytes), "yes" if r.ok else ("ERROR: " + r.error if r.error else "NO"),
         f"{r.compile_s:.2f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokprune.tools.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default 80 90)")
    parser.add_argument("--family", nargs="+", help="only these kernel families")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit 1 on spills, shared overflow or errors")
    parser.add_argument("--planted-spill", action="store_true",
                        help="add a kernel configuration built to spill (proves --check catches spills)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    results = run_aot(args.arch, args.family, args.planted_spill, progress=not args.quiet)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiled configurations, {len(bad)} failing "
          f"(spill > 0, shared > per-block limit, or compile error)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in results], f, indent=1)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
