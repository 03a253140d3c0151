"""Triton kernels and their launchers.

Every module here registers the kernels it ships, with every launch configuration its launchers
can choose and the argument types Triton specialises at run time (``strides=("i32", "i64")``),
through :func:`tokprune.kernels.triton.aot.register_aot`, so that ``python -m tokprune.tools.aot``
can compile all of them for sm_80 / sm_90 without a GPU. :func:`kernel_modules` finds the modules by
listing this package: a new kernel file needs no registration anywhere else. Launchers go through
:func:`tokprune.kernels.triton._launch.launch` (the tensor's device, checked grid, debug sync).
"""

import pkgutil


def kernel_modules():
    """Names of the kernel modules of this package (every submodule except ``aot``)."""
    return tuple(sorted(f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)
                        if m.name != "aot" and not m.name.startswith("_")))
