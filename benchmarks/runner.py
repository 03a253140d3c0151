"""Shared benchmark harness: time providers side by side in one run, print ratios, append CSV rows.

A benchmark file only builds inputs and a ``{provider_name: zero-arg callable}`` dict per case, then calls
:func:`compare`. Timing uses ``torch.utils.benchmark`` (median of blocked runs) on the CPU and
``triton.testing.do_bench`` on CUDA. Every row is stamped with date, device, tokprune version and backend
and appended to ``benchmarks/results/<benchmark>.csv``; ``benchmarks/plot.py`` draws PNGs from those CSVs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

import torch

RESULTS_DIR = Path(os.environ.get("TOKPRUNE_BENCH_DIR", Path(__file__).resolve().parent / "results"))
FIELDS = ["date", "device", "tokprune_version", "torch_version", "backend", "benchmark", "case", "params",
          "provider", "median_ms", "iqr_ms", "ratio_vs_baseline", "baseline", "metrics"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"


def time_callable(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> tuple:
    """``(median_ms, iqr_ms)`` of ``fn()``; the first call is a warm-up."""
    fn()
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.25, 0.5, 0.75])
        return ms[1], ms[2] - ms[0]
    from torch.utils.benchmark import Timer

    measurement = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return measurement.median * 1e3, measurement.iqr * 1e3


def compare(
    benchmark: str,
    case: str,
    providers: Mapping[str, Callable[[], object]],
    *,
    baseline: str,
    params: Optional[Mapping[str, object]] = None,
    metrics: Optional[Mapping[str, Mapping[str, object]]] = None,
    device: torch.device = torch.device("cpu"),
    backend: str = "torch",
    min_run_time: float = 0.5,
    write_csv: bool = True,
) -> List[dict]:
    """Time every provider in this run and report ``time(baseline) / time(provider)``.

    Args:
        benchmark: benchmark name (CSV file name).
        case: label of this input case (e.g. ``"T=8192"``).
        providers: ``{name: fn}`` zero-argument callables, each computing the same thing.
        baseline: key of ``providers`` that ratios are relative to (ratio > 1 means faster).
        params: the case's parameters, stored as JSON in the CSV.
        metrics: optional ``{provider: {metric: value}}`` (bytes read, FLOPs, ...), stored and printed.
        device, backend: where and with which tokprune backend the providers run.
        min_run_time: seconds of timing per provider on the CPU.

    Returns:
        The rows written (dicts with the CSV fields).
    """
    if baseline not in providers:
        raise ValueError(f"baseline={baseline!r} must be one of the providers {list(providers)}")
    import tokprune

    timings = {name: time_callable(fn, device, min_run_time) for name, fn in providers.items()}
    base_ms = timings[baseline][0]
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    rows = []
    print(f"\n[{benchmark}] {case}  ({device_name(device)})")
    for name, (ms, iqr) in timings.items():
        extra = dict((metrics or {}).get(name, {}))
        ratio = base_ms / ms if ms > 0 else float("inf")
        shown = "  ".join(f"{k}={v}" for k, v in extra.items())
        print(f"  {name:<28} {ms:10.3f} ms  ±{iqr:7.3f}  x{ratio:6.2f} vs {baseline}  {shown}")
        rows.append(dict(date=stamp, device=device_name(device), tokprune_version=tokprune.__version__,
                         torch_version=torch.__version__, backend=backend, benchmark=benchmark, case=case,
                         params=json.dumps(dict(params or {}), sort_keys=True), provider=name,
                         median_ms=f"{ms:.6f}", iqr_ms=f"{iqr:.6f}", ratio_vs_baseline=f"{ratio:.4f}",
                         baseline=baseline, metrics=json.dumps(extra, sort_keys=True)))
    if write_csv:
        append_rows(benchmark, rows)
    return rows


def append_rows(benchmark: str, rows: List[Dict[str, object]]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{benchmark}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
