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
    proc, results = _run_aot(tmp_path, "--check")
    print(proc.stdout)
    assert results, proc.stderr[-2000:]
    assert {r["arch"] for r in results} == {80, 90}
    for r in results:
        assert r["error"] is None, r
        assert r["spill_bytes"] == 0, f"{r['kernel']} [{r['config']}] spills on sm_{r['arch']}"
        assert r["shared_bytes"] <= SHARED_LIMIT[80], r
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_planted_spill_is_caught(tmp_path):
    proc, results = _run_aot(tmp_path, "--check", "--family", "planted", "--planted-spill")
    planted = [r for r in results if r["family"] == "planted"]
    assert planted and all(r["spill_bytes"] > 0 and not r["ok"] for r in planted), planted
    assert proc.returncode == 1
    assert "NO" in proc.stdout
