"""The decode hot path reads no tensor data on the host: FASA, Quest and StreamingLLM decode attention on
tokprune's KV cache trace under ``torch.compile(fullgraph=True)`` (a host synchronisation is a graph break
there, exactly where a GPU would sync or a CUDA graph capture would fail) and equal eager execution.

The ``aot_eager`` backend traces the graph (dynamo + AOTAutograd) without generating C++ code, which keeps
the test fast on the CPU; a graph break fails under ``fullgraph=True`` whatever the backend.
"""

import pytest
import torch

from tests.helpers import assert_close
from tokprune import _debug
from tokprune.hf.kv_cache import TokpruneLayer
from tokprune.methods import FASA, Quest, StreamingLLM
from tokprune.methods.base import DecodeContext, decode_valid_mask


class _Module:
    layer_idx = 0


def _layer(batch=2, kv_heads=2, n_tokens=150, dim=16):
    layer = TokpruneLayer(capacity=64, layer_idx=0)
    k = torch.randn(batch, kv_heads, n_tokens, dim)
    v = torch.randn(batch, kv_heads, n_tokens, dim)
    layer.update(k[:, :, :-1], v[:, :, :-1])  # prefill, then one decode token appended
    layer.update(k[:, :, -1:], v[:, :, -1:])
    return layer


def _decode_fn(policy, layer):
    def fn(query, mask):
        valid = decode_valid_mask(mask, query.shape[0], layer.keys.shape[2], layer)
        ctx = DecodeContext(_Module(), query, layer.keys, layer.values, valid, 0.25, layer)
        return policy.attend_decode(ctx)

    return fn


@pytest.fixture
def no_debug():
    previous = _debug.set_debug(False)
    torch._dynamo.reset()
    yield
    _debug.set_debug(previous)
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", [FASA(fcs="uncalibrated", budget=24, sink=2, window=8, decline_ratio=0),
                                    Quest(budget=32, page_size=8, decline_ratio=0),
                                    StreamingLLM(budget=24, sink=4, decline_ratio=0)], ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("padding", [True, False], ids=["left_padding", "no_mask"])
def test_decode_attention_compiles_fullgraph_and_equals_eager(policy, padding, no_debug):
    layer = _layer()
    query = torch.randn(2, 4, 1, 16)
    mask = torch.ones(2, 1, 1, layer.length, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding in row 1
    if not padding:  # what generate passes without padding: no mask (the unpadded fast paths)
        mask = None
    fn = _decode_fn(policy, layer)
    eager = fn(query, mask)  # also creates the policy's side buffer on the cache layer
    assert eager is not None and eager.shape == (2, 4, 1, 16)
    if isinstance(policy, (FASA, Quest)):
        assert len(layer.side) == 1  # scoring reads the side buffer (packed FC keys / page bounds)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(query, mask), eager)
    # next decode step: one token appended (side buffers updated at append), still no graph break
    k = torch.randn(2, 2, 1, 16)
    layer.update(k, k)
    mask = None if mask is None else torch.nn.functional.pad(mask, (0, 1), value=True)
    query = torch.randn(2, 4, 1, 16)
    assert_close(compiled(query, mask), fn(query, mask))


def test_a_host_sync_is_caught(no_debug):
    """Negative control: with debug checks on (they read index ranges on the host), the same compile fails."""
    layer = _layer()
    fn = _decode_fn(FASA(fcs="uncalibrated", budget=24, sink=2, window=8, decline_ratio=0), layer)
    query = torch.randn(2, 4, 1, 16)
    fn(query, None)
    _debug.set_debug(True)
    with pytest.raises(Exception, match="(?i)graph break|unsupported|data-dependent|item|tolist|Tensor.__bool__"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(query, None)
