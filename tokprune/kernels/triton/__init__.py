"""Triton kernels and their launchers.

Every module here registers the kernels it ships, with every launch configuration its launchers
can choose, through :func:`tokprune.kernels.triton.aot.register_aot`, so that
``python -m tokprune.tools.aot`` can compile all of them for sm_80 / sm_90 without a GPU.
"""

KERNEL_MODULES = (
    "tokprune.kernels.triton.gather",
)
