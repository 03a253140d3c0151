"""Small-M linears of speculative tree forwards on SmolLM2-135M (CPU, fp32): the kernel alone and in a forward.

Three measurements, medians over ``--rounds`` (one warm-up each), threads from ``--threads``:

* ``decoder``: one pass over the 210 decoder linears (30 layers x q, k, v, o, gate, up, down; 425 MB of
  weights, so they come from memory as in a forward) with ``M`` rows: ``small_m`` (the host kernel,
  :class:`tokprune.kernels.cuda.SmallMLinearBound`), ``onednn`` (weights packed once,
  ``_linear_pointwise``) and ``F.linear`` (MKL) at ``M = 1`` as the memory-bound reference.
* ``lm_head``: the 49152 x 576 LM head (113 MB) right after such a pass, same providers.
* ``forward``: a whole tree forward of ``N`` nodes after a 256-token prefix, as
  :func:`tokprune.spec.generate` runs it (:func:`tokprune.spec.cost.measure_forward_cost`).

Usage::

    tokprune bench small-m [--rows 1,8,12] [--nodes 1,8,12] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List

import torch


def _median_ms(fn: Callable[[], float], rounds: int) -> float:
    fn()
    times = sorted(fn() for _ in range(rounds))
    return times[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokprune bench small-m", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,12", help="comma-separated M for the decoder / LM head passes")
    parser.add_argument("--nodes", default="1,8,12", help="comma-separated tree sizes for whole forwards ('' skips)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from tokprune import _ext
    from tokprune.kernels.cuda import SmallMLinearBound
    from tokprune.models import load_smollm2

    model, _ = load_smollm2()
    ext = _ext.extension()
    has_kernel = ext is not None and hasattr(ext, "small_m_linear")
    print(f"threads {torch.get_num_threads()}, small_m ISA: {ext.linear_small_m_isa() if has_kernel else 'n/a'}")
    linears: List[torch.nn.Linear] = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        linears += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    head = model.lm_head
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for M in [int(v) for v in args.rows.split(",") if v]:
            xs = {k: torch.randn(M, k, generator=g) for k in {lin.in_features for lin in linears + [head]}}
            providers: Dict[str, Callable] = {}
            if M == 1:
                providers["F.linear"] = lambda lin, x: torch.nn.functional.linear(x, lin.weight)
            if has_kernel:
                bound = {lin: SmallMLinearBound(lin.weight, None) for lin in linears + [head]}
                providers["small_m"] = lambda lin, x, b=bound: b[lin].run(x, torch.get_num_threads())
            if M > 1 and torch.backends.mkldnn.is_available():
                packed = {lin: torch.ops.mkldnn._reorder_linear_weight(lin.weight, 16) for lin in linears + [head]}
                providers["onednn"] = lambda lin, x, p=packed: torch.ops.mkldnn._linear_pointwise(
                    x, p[lin], None, "none", [], "")
            for name, call in providers.items():
                def decoder(call=call) -> float:
                    t0 = time.perf_counter()
                    for lin in linears:
                        call(lin, xs[lin.in_features])
                    return (time.perf_counter() - t0) * 1e3

                def lm_head(call=call) -> float:
                    decoder(call)  # stream the decoder weights first, as in a forward
                    t0 = time.perf_counter()
                    call(head, xs[head.in_features])
                    return (time.perf_counter() - t0) * 1e3

                print(f"M={M:2d} {name:<9} decoder pass {_median_ms(decoder, args.rounds):7.2f} ms   "
                      f"lm_head {_median_ms(lm_head, args.rounds):6.2f} ms", flush=True)
            if M > 1 and torch.backends.mkldnn.is_available():
                del packed
    nodes = [int(v) for v in args.nodes.split(",") if v]
    if nodes:
        from tokprune.spec.cost import measure_forward_cost

        cost = measure_forward_cost(model, nodes, rounds=args.rounds)
        print("tree forward (ms, median): " + "  ".join(f"{n} nodes {ms:.2f}" for n, ms in sorted(cost.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
