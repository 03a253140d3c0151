"""Settings of the vLLM integration, read from ``additional_config={"tokprune": {...}}``, and the
start-up checks that a model can be served by the chosen method.

Nothing here imports vLLM: the functions take plain dicts and objects with Hugging Face config
attributes, so they are testable without a vLLM install.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

CONFIG_KEY = "tokprune"
METHODS = ("fasa", "quest", "streaming")
# key -> (type, default) of every setting; "method" and "budget" are required.
KEYS = {
    "method": (str, None),
    "budget": (int, None),
    "sink": (int, 4),
    "window": (int, 64),
    "fcs": (str, None),
    "num_fcs": (int, None),
    "chunk": (int, 1),
    "page_size": (int, 16),
    "min_context": (int, None),
    "score_dtype": (str, None),
}
SCORE_DTYPES = ("float32", "bfloat16", "float16")
#: Default decline rule per method: a decode request is sparse only when its context exceeds
#: ``DECLINE_RATIO[method] * budget`` (and the budget). FASA: with budget 256 the ratio over stock vLLM was 1.06x /
#: 1.03x at 4K (batch 1 / 8) and 1.30x / 1.61x at 8K (fp32, fused kernel, 2-core CPU, 2026-12-05; README "Serving
#: with vLLM", ``benchmarks/bench_vllm.py --min-context 0``): sparse from just under 4K, i.e. 15 x budget (it was
#: 20 x budget before the kernel's vote got 2x faster, when 4K batch 8 measured 0.88x). Quest and StreamingLLM
#: were not measured inside vLLM: the budget alone.
DECLINE_RATIO = {"fasa": 15.0, "quest": 0.0, "streaming": 0.0}
DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data"


class TokpruneConfigError(ValueError):
    """``additional_config["tokprune"]`` is invalid, or the model cannot be served by the method."""


@dataclass(frozen=True)
class VllmSettings:
    """Validated settings of the plugin.

    Attributes:
        method: ``"fasa" | "quest" | "streaming"``.
        budget: tokens attended per KV head (FASA, StreamingLLM) or query head (Quest) in a decode step;
            a decode request whose context (cached tokens, the new one included) is ``<= budget`` takes
            vLLM's own dense attention, exactly.
        sink, window: first / most recent tokens always attended (FASA; StreamingLLM uses ``sink`` and
            fills the rest of the budget with the most recent tokens).
        fcs: FASA calibration file (a path or the name of a file shipped in ``tokprune/data``).
        num_fcs: dominant frequency chunks per KV head (FASA; default a quarter of the head's FCs).
        chunk: rotation pairs per FC (FASA; must match the calibration).
        page_size: tokens per page (Quest; must divide vLLM's block size).
        min_context: decline rule: a decode request takes the sparse path only when its context exceeds
            ``max(budget, min_context)``; ``0``: the budget alone; ``None`` (default): the measured rule
            ``DECLINE_RATIO[method] * budget`` (FASA: 15 x budget; see :data:`DECLINE_RATIO`).
        score_dtype: FASA's packed FC side cache dtype, ``"float32" | "bfloat16" | "float16"``; ``None``
            (default): bf16 (fp16 for an fp16 model) with the fused kernel, the half of the bytes an fp32 copy
            makes the vote read, else fp32 (the torch path).
    """

    method: str
    budget: int
    sink: int = 4
    window: int = 64
    fcs: Optional[str] = None
    num_fcs: Optional[int] = None
    chunk: int = 1
    page_size: int = 16
    min_context: Optional[int] = None
    score_dtype: Optional[str] = None

    @property
    def sparse_after(self) -> int:
        """A decode request whose context (cached tokens, the new one included) exceeds this many tokens takes
        the sparse path; every other request takes vLLM's dense attention."""
        floor = self.min_context if self.min_context is not None else int(DECLINE_RATIO[self.method] * self.budget)
        return max(self.budget, floor)


def _fail(key: str, message: str) -> None:
    raise TokpruneConfigError(f'additional_config["{CONFIG_KEY}"]["{key}"]: {message}')


def parse_settings(additional_config: Any) -> Optional[VllmSettings]:
    """Settings from vLLM's ``additional_config``; ``None`` (plugin inert) when the ``"tokprune"`` key is
    absent.

    Args:
        additional_config: vLLM's ``VllmConfig.additional_config`` (a dict, possibly empty or ``None``).

    Raises:
        TokpruneConfigError: an unknown key, a wrong type, an unknown method or an invalid budget; the
            message names the key and the allowed values.
    """
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    raw = additional_config[CONFIG_KEY]
    if not isinstance(raw, Mapping):
        raise TokpruneConfigError(f'additional_config["{CONFIG_KEY}"] must be a dict such as '
                                  f'{{"method": "fasa", "budget": 256}}, got {type(raw).__name__}')
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        _fail(unknown[0], f"unknown key; allowed keys: {', '.join(KEYS)}")
    if "method" not in raw:
        _fail("method", f"required; allowed values: {', '.join(METHODS)}")
    method = raw["method"]
    if method not in METHODS:
        _fail("method", f"unknown method {method!r}; allowed values: {', '.join(METHODS)}")
    if "budget" not in raw:
        _fail("budget", "required: a positive int (tokens attended per head in a decode step)")
    values = {}
    for key, (kind, default) in KEYS.items():
        value = raw.get(key, default)
        if key in ("method",) or value is None:
            values[key] = value
            continue
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            _fail(key, f"must be an int, got {value!r}")
        if key == "score_dtype" and value not in SCORE_DTYPES:
            _fail(key, f"unknown dtype {value!r}; allowed values: {', '.join(SCORE_DTYPES)}")
        if kind is str and not isinstance(value, str):
            _fail(key, f"must be a string (a path or a shipped calibration name), got {value!r}")
        values[key] = value
    if values["budget"] < 1:
        _fail("budget", f"must be a positive int (tokens attended per head), got {values['budget']!r}")
    for key in ("sink", "window", "min_context"):
        if values[key] is not None and values[key] < 0:
            _fail(key, f"must be a non-negative int, got {values[key]!r}")
    if values["sink"] >= values["budget"]:
        _fail("sink", f"must be smaller than budget={values['budget']}, got {values['sink']}")
    for key in ("chunk", "page_size"):
        if values[key] < 1:
            _fail(key, f"must be a positive int, got {values[key]!r}")
    if values["num_fcs"] is not None and values["num_fcs"] < 1:
        _fail("num_fcs", f"must be a positive int, got {values['num_fcs']!r}")
    if method == "quest" and values["budget"] < values["page_size"]:
        _fail("budget", f"must be >= page_size={values['page_size']} for quest, got {values['budget']}")
    return VllmSettings(**values)


def shipped_calibrations() -> dict:
    """``name -> path`` of the FASA calibrations shipped in ``tokprune/data`` (``fasa_<name>.json``)."""
    return {p.stem[len("fasa_"):]: p for p in sorted(DATA_DIR.glob("fasa_*.json"))}


def resolve_calibration(fcs: Optional[str]) -> Path:
    """Path of a FASA calibration given as a path or a shipped name (``"smollm2_135m"``).

    Raises:
        TokpruneConfigError: ``fcs`` missing, or neither a file nor a shipped name.
    """
    shipped = shipped_calibrations()
    if fcs is None:
        _fail("fcs", "FASA needs a calibration: a file from `tokprune calibrate fasa --out FILE` or a "
                     f"shipped name ({', '.join(shipped) or 'none shipped'})")
    for name in (fcs, fcs.removeprefix("fasa_").removesuffix(".json")):
        if name in shipped:
            return shipped[name]
    path = Path(fcs).expanduser()
    if path.is_file():
        return path
    _fail("fcs", f"{fcs!r} is neither a file nor a shipped calibration ({', '.join(shipped) or 'none'}); "
                 "create one with `tokprune calibrate fasa --out FILE`")
    raise AssertionError("unreachable")


def _text_config(hf_config):
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def _has_rope(text_config) -> bool:
    if getattr(text_config, "position_embedding_type", "rope") not in ("rope", "rotary", None):
        return False
    for name in ("rope_parameters", "rope_scaling", "rope_theta", "rotary_emb_base", "rope_type"):
        if getattr(text_config, name, None) is not None:
            return True
    return False


def model_geometry(hf_config) -> dict:
    """``{"layers", "heads", "kv_heads", "head_dim"}`` of a Hugging Face (text) config."""
    tc = _text_config(hf_config)
    heads = int(getattr(tc, "num_attention_heads"))
    head_dim = getattr(tc, "head_dim", None) or int(getattr(tc, "hidden_size")) // heads
    return dict(layers=int(getattr(tc, "num_hidden_layers")), heads=heads,
                kv_heads=int(getattr(tc, "num_key_value_heads", None) or heads), head_dim=int(head_dim))


def load_fc_index(settings: VllmSettings, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``(layers, kv_heads, F)`` int64 dominant FCs of every layer from the FASA calibration.

    Raises:
        TokpruneConfigError: missing/unreadable calibration, or one made for another geometry.
    """
    from tokprune.methods.fasa import FCCalibration

    path = resolve_calibration(settings.fcs)
    try:
        cal = FCCalibration.load(path)
    except (ValueError, OSError, KeyError) as exc:
        _fail("fcs", f"cannot read FASA calibration {path.name}: {exc}")
    if cal.chunk != settings.chunk:
        _fail("chunk", f"{settings.chunk} but the calibration {path.name} used chunk={cal.chunk}")
    got = (cal.ranking.shape[0], cal.ranking.shape[1], cal.head_dim)
    if got != (layers, kv_heads, head_dim):
        _fail("fcs", f"calibration {path.name} is for layers={got[0]}, kv_heads={got[1]}, head_dim={got[2]}; "
                     f"the model has layers={layers}, kv_heads={kv_heads}, head_dim={head_dim}")
    n_fc = head_dim // (2 * settings.chunk)
    num = settings.num_fcs or max(1, n_fc // 4)
    if num > n_fc:
        _fail("num_fcs", f"must be <= {n_fc} (head_dim / (2*chunk)), got {num}")
    return cal.ranking[:, :, :num].clone()


def check_model(settings: VllmSettings, hf_config, *, dtype=None, block_size: Optional[int] = None) -> dict:
    """Start-up check that ``settings.method`` can serve the model described by ``hf_config``.

    FASA needs RoPE (its frequency chunks are rotation pairs), an even head size and a calibration for
    the model's geometry; Quest needs ``page_size`` to divide the block size. Returns
    :func:`model_geometry` of the model.

    Raises:
        TokpruneConfigError: naming what the model lacks.
    """
    geo = model_geometry(hf_config)
    if geo["head_dim"] % (2 * settings.chunk):
        raise TokpruneConfigError(f"tokprune {settings.method}: head size {geo['head_dim']} is not a multiple of "
                                  f"2*chunk={2 * settings.chunk}")
    if settings.method == "fasa":
        if not _has_rope(_text_config(hf_config)):
            raise TokpruneConfigError("tokprune fasa needs a model with rotary position embeddings (RoPE): its "
                                      "frequency chunks are RoPE rotation pairs; this model has none "
                                      f"(model_type={getattr(hf_config, 'model_type', '?')})")
        load_fc_index(settings, geo["layers"], geo["kv_heads"], geo["head_dim"])
    if settings.method == "quest" and block_size is not None and block_size % settings.page_size:
        _fail("page_size", f"must divide vLLM's block size {block_size}, got {settings.page_size}")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TokpruneConfigError(f"tokprune {settings.method}: unsupported model dtype {dtype}")
    return geo
