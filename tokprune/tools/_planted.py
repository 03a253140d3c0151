"""A kernel configuration built to spill registers, used to prove that the AOT check catches spills.

Not part of the shipped kernels: it is compiled only by ``python -m tokprune.tools.aot --planted-spill``.
"""

import triton
import triton.language as tl

from tokprune.kernels.triton.aot import AotKernel, LaunchConfig


@triton.jit
def _planted_row_norm_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x / tl.sum(x * x, 0) + tl.max(x, 0))


def planted_spill_kernel() -> AotKernel:
    # 1024 fp32 values on one warp is 32 live values a thread; capping registers at 32 forces spills.
    config = LaunchConfig({"BLOCK": 1024}, num_warps=1, num_stages=1, options={"maxnreg": 32})
    return AotKernel("planted", _planted_row_norm_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, (config,))
