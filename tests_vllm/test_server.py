"""vLLM's OpenAI-compatible server with the tokprune plugin (FASA, a budget below the prompt length) answers a
completion request, then is stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests_vllm.engine import ROOT

START_TIMEOUT_S = 900


def _dtype() -> str:
    """bf16, or fp32 on a CPU with AMX tiles (vLLM's bf16 AMX K/V layout is refused by tokprune)."""
    import torch

    return "float32" if torch.cpu._is_amx_tile_supported() else "bfloat16"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_openai_server_answers_with_the_plugin(smollm2_dir, tmp_path):
    port = _free_port()
    config = {"tokprune": {"method": "fasa", "budget": 32, "sink": 4, "window": 8, "fcs": "smollm2_135m",
                           "min_context": 0}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir),
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", _dtype(),
           "--enforce-eager", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20),
           "--additional-config", json.dumps(config)]
    log = tmp_path / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not healthy after {START_TIMEOUT_S} s"
            try:
                if _get(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(2)
        prompt = ("The grass is green. The sky is blue. The sun is yellow. " * 6
                  + "The capital of France is Paris. The capital of Italy is")
        body = json.dumps(dict(model="smollm2", prompt=prompt, max_tokens=8, temperature=0.0,
                               ignore_eos=True)).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            assert r.status == 200
            answer = json.loads(r.read())
        assert answer["usage"]["prompt_tokens"] > config["tokprune"]["budget"]  # decode took the sparse path
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["text"].strip()
        assert "tokprune: fasa budget=32 serves" in log.read_text()  # logged by the backend at start-up
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # stop the server by its PID
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its engine processes, if any survived
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    assert proc.returncode is not None
