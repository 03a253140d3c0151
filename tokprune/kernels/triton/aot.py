"""Registry of Triton kernels and the launch configurations they can be compiled with.

A kernel module calls :func:`register_aot` once per kernel, at import, with the argument types of
its non-constexpr parameters and the list of configurations (constexpr values plus ``num_warps`` /
``num_stages``) that its launcher can pick. :mod:`tokprune.tools.aot` compiles each of them ahead of
time for real GPU targets and reads the cubin's resource usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence


@dataclass(frozen=True)
class LaunchConfig:
    """One compile-time configuration of a kernel: constexpr values and launch options."""

    constexprs: Mapping[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    # Extra options passed to triton.compile (e.g. {"maxnreg": 32}); only for planted-failure tests.
    options: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items()]
        parts += [f"warps={self.num_warps}", f"stages={self.num_stages}"]
        parts += [f"{k}={v}" for k, v in self.options.items()]
        return ",".join(parts)


@dataclass(frozen=True)
class AotKernel:
    """A Triton kernel with the signature of its runtime arguments and all launchable configs."""

    family: str
    kernel: Any  # triton.runtime.jit.JITFunction
    signature: Mapping[str, str]  # non-constexpr argument -> triton type string ("*fp32", "i32", ...)
    configs: Sequence[LaunchConfig]

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))


_REGISTRY: List[AotKernel] = []


def register_aot(family: str, kernel, signature: Dict[str, str], configs: Sequence[LaunchConfig]) -> None:
    """Record ``kernel`` and the configurations its launcher can use, for ahead-of-time checks.

    Args:
        family: kernel family name shown in the AOT table (``"entropy"``, ``"fasa"``, ...).
        kernel: the ``@triton.jit`` function.
        signature: Triton type of every non-constexpr argument, in parameter order.
        configs: every configuration the launcher may pick; must not be empty.
    """
    if not configs:
        raise ValueError(f"register_aot({family}): configs must list at least one LaunchConfig")
    _REGISTRY.append(AotKernel(family, kernel, dict(signature), tuple(configs)))


def registered_kernels() -> List[AotKernel]:
    """Import every kernel module the package ships and return the registry."""
    import importlib

    from tokprune.kernels.triton import kernel_modules

    for module in kernel_modules():
        importlib.import_module(module)
    return list(_REGISTRY)
