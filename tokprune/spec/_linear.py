"""CPU tree forwards with pre-packed weights (private to :mod:`tokprune.spec`).

A tree forward multiplies ``M = B x N`` rows (N = tree nodes) by every weight matrix. On the CPU the
default fp32 GEMM (MKL) re-packs the weight matrix on every call, which for small ``M`` > 1 costs about
as much as reading it; oneDNN weights packed once (``torch.ops.mkldnn._reorder_linear_weight`` +
``_linear_pointwise``) avoid that. With a single row (``M = 1``) it is the other way round: on SmolLM2-135M (1 thread) a
1-node forward took 80.9 ms on packed weights vs 59.6 ms with ``F.linear`` (MKL), so 1-row inputs keep
``F.linear`` (exactly what ``model.generate`` computes). :func:`packed_linears` swaps every fp32
``nn.Linear`` of a model to this dispatch for the duration of a ``with`` block. A layer's packed copy is
made on its first call that needs it and kept on the module (one extra copy of those weights in memory,
rebuilt when a weight changes) until :func:`release_packed` or the model goes away.
Results differ from ``F.linear`` by float rounding only (different summation order).

For ``2 <= M <= SMALL_M_MAX`` rows the fp32 host kernel of :func:`tokprune.ops.linear.small_m_linear` (each
weight row read once for all rows, no packing; called through
:class:`tokprune.kernels.cuda.SmallMLinearBound`, the weight bound once) runs instead of oneDNN on every
layer when ``tokprune._C`` is built, so trees of up to 16 nodes never pack. On SmolLM2-135M (1 thread,
AVX-512) it beats the packed path on every decoder linear and, since the kernel keeps up to 8 (12) rows'
accumulators in registers and prefetches the weight stream into L2, on the 49152 x 576 LM head too: whole
8-node tree forward 70.1 / 71.9 ms vs 79.2 / 83.7 ms before (LM head on oneDNN, older kernel; same session).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch

SMALL_M_MAX = 16

_PACKED: "weakref.WeakKeyDictionary[torch.nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def packing_available(model) -> bool:
    """True when the model's linears can use the packed CPU path (fp32 weights on the CPU, oneDNN)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        p = next(model.parameters())
    except StopIteration:
        return False
    return p.device.type == "cpu" and p.dtype == torch.float32


def _packed_weight(module: torch.nn.Linear, rows_hint: int):
    w = module.weight
    key = (w.data_ptr(), w._version, tuple(w.shape))
    hit = _PACKED.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint)
    _PACKED[module] = (key, packed)
    return packed


def _small_m_kernel():
    """:class:`tokprune.kernels.cuda.SmallMLinearBound` when tokprune._C has the small-M kernel, else ``None``."""
    from tokprune._backend import unavailable_reason

    if unavailable_reason("cuda", torch.device("cpu"), "small_m_linear") is not None:
        return None
    from tokprune.kernels.cuda import SmallMLinearBound

    return SmallMLinearBound


def _fast_forward(module: torch.nn.Linear, rows_hint: int, small_m=None):
    bias = module.bias.detach() if module.bias is not None else None
    run = small_m(module.weight.detach(), bias).run if small_m is not None else None
    n_out = module.weight.shape[0]
    linear, pointwise, threads = torch.nn.functional.linear, torch.ops.mkldnn._linear_pointwise, torch.get_num_threads

    def forward(x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        numel = x.numel()
        if x.dtype != torch.float32 or torch.is_grad_enabled() or numel == k or not x.is_cpu:
            return linear(x, module.weight, module.bias)
        rows = numel // k if k else 0
        if run is not None and 2 <= rows <= SMALL_M_MAX:
            return run(x.reshape(rows, k), threads()).view(*x.shape[:-1], n_out)
        return pointwise(x, _packed_weight(module, rows_hint), bias, "none", [], "")

    return forward


@contextlib.contextmanager
def packed_linears(model, enabled: bool = True, rows_hint: int = 16) -> Iterator[bool]:
    """Inside the block, every fp32 CPU ``nn.Linear`` of ``model`` runs 2..``SMALL_M_MAX`` rows on the small-M
    host kernel (when ``tokprune._C`` is built) and more rows on oneDNN weights packed once (on first use);
    1-row inputs, other dtypes/devices and grad mode keep ``F.linear``.

    Args:
        model: a ``torch.nn.Module``.
        enabled: ``False`` makes this a no-op.
        rows_hint: typical number of input rows (tree nodes x batch) the packing is tuned for.

    Yields:
        whether the packed path is active.
    """
    if not enabled or not packing_available(model):
        yield False
        return
    swapped = []
    small_m = _small_m_kernel()
    try:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 and "forward" not in m.__dict__:
                m.forward = _fast_forward(m, rows_hint, small_m)
                swapped.append(m)
        yield True
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


def release_packed(model) -> int:
    """Drop the packed weight copies of ``model``'s linears; returns how many were dropped."""
    n = 0
    for m in model.modules():
        if m in _PACKED:
            del _PACKED[m]
            n += 1
    return n
