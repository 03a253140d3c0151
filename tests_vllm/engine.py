"""Run one vLLM engine in a child process and return its results (``python -m tests_vllm.engine SPEC``).

vLLM spawns its engine core and worker processes; running each engine in a fresh child process keeps
tests independent (vLLM caches backend selection per process) and makes sure every engine and its
children are gone when the test moves on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_TIMEOUT_S = 900


def backend_classes(worker) -> list:
    """Called inside the vLLM worker (``collective_rpc``): the attention backend and impl classes in use."""
    from vllm.model_executor.layers.attention import Attention

    found = set()
    for module in worker.model_runner.model.modules():
        if isinstance(module, Attention):
            backend, impl = module.attn_backend, type(module.impl)
            found.add(f"{backend.__module__}.{backend.__qualname__}|{impl.__module__}.{impl.__qualname__}")
    return sorted(found)


def _child(spec: dict) -> None:
    from vllm import LLM, SamplingParams

    import torch

    # bf16 on a CPU with AMX tiles gets vLLM's AMX K/V layout, which tokprune refuses: fp32 there
    dtype = "float32" if torch.cpu._is_amx_tile_supported() else "bfloat16"
    llm = LLM(spec["model"], dtype=dtype, enforce_eager=True, max_model_len=spec.get("max_model_len", 2560),
              max_num_seqs=spec.get("max_num_seqs", 8), seed=0, enable_prefix_caching=False,
              kv_cache_memory_bytes=spec.get("kv_bytes", 512 << 20),
              additional_config=spec.get("additional_config") or {})
    classes = llm.collective_rpc(backend_classes)[0]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=spec.get("ignore_eos", False))
    inputs = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    outs = llm.generate(inputs, params, use_tqdm=False)
    result = dict(classes=classes, tokens=[list(o.outputs[0].token_ids) for o in outs],
                  texts=[o.outputs[0].text for o in outs])
    print("RESULT " + json.dumps(result), flush=True)


def run_engine(spec: dict, log_path: Path, env=None) -> dict:
    """Run :func:`_child` with ``spec`` in a fresh process; returns its result dict.

    Raises:
        RuntimeError: the child failed; the message holds the tail of its output.
    """
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1", **(env or {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests_vllm.engine", json.dumps(spec)], cwd=ROOT,
                                env=full_env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=ENGINE_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = Path(log_path).read_text()[-4000:]
    raise RuntimeError(f"engine failed (exit {proc.returncode}):\n{tail}")


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
