"""Registry of Triton kernels and the launch configurations they can be compiled with.

A kernel module calls :func:`register_aot` once per kernel (and argument-type variant), at import,
with the argument types of its non-constexpr parameters and the list of configurations (constexpr
values plus ``num_warps`` / ``num_stages``) that its launcher can pick. :mod:`tokprune.tools.aot`
compiles each of them ahead of time for real GPU targets and reads the cubin's resource usage.

What runs is not what a kernel declares: at launch Triton specialises every int argument (``i32``
below 2**31, ``i64`` above, the constant 1 when it equals 1, "divisible by 16" when it is) and every
pointer (16-byte aligned or not). ``register_aot(..., strides=("i32", "i64"))`` therefore registers
the signatures that actually run for the ``stride_*`` arguments (see :func:`register_aot`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple


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
    # Arguments Triton specialises to a constant at run time (an int argument equal to 1).
    constants: Mapping[str, Any] = field(default_factory=dict)
    # Arguments Triton marks "divisible by 16" (pointers 16-byte aligned, ints multiple of 16).
    divisible: Tuple[str, ...] = ()
    # Short description of the argument types of this registration (shown in the AOT table).
    variant: str = ""

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))


_REGISTRY: List[AotKernel] = []

#: Stride signatures :func:`register_aot` can register (see its ``strides`` argument).
STRIDE_MODES = ("i32", "i64")


def _runtime_params(kernel) -> List[str]:
    """Names of the non-constexpr parameters of a ``@triton.jit`` function, in order."""
    params = getattr(kernel, "params", None)
    if params is None:  # an interpreted function (TRITON_INTERPRET=1) keeps the Python signature only
        import inspect

        fn = getattr(kernel, "fn", kernel)
        return [n for n, p in inspect.signature(fn).parameters.items()
                if "constexpr" not in str(p.annotation)]
    return [p.name for p in params if not p.is_constexpr]


def register_aot(family: str, kernel, signature: Dict[str, str], configs: Sequence[LaunchConfig], *,
                 strides: Optional[Sequence[str]] = None, unit: Sequence[str] = (), variant: str = "") -> None:
    """Record ``kernel`` and the configurations its launcher can use, for ahead-of-time checks.

    Args:
        family: kernel family name shown in the AOT table (``"entropy"``, ``"fasa"``, ...).
        kernel: the ``@triton.jit`` function.
        signature: Triton type of every non-constexpr argument (``"*bf16"``, ``"i32"``, ``"fp32"``),
            keyed by parameter name; the names must be exactly the kernel's non-constexpr parameters.
        configs: every configuration the launcher may pick; must not be empty.
        strides: ``None`` registers ``signature`` as given. Otherwise one registration per mode:
            ``"i32"``, the common run-time signature (tensors below 2**31 elements, contiguous in the
            last dimension, 16-byte aligned): every ``stride_*`` argument ``i32`` divisible by 16,
            those named in ``unit`` the constant 1, every pointer 16-byte aligned;
            ``"i64"``, tensors past 2**31 elements or odd views: every ``stride_*`` ``i64``, no hints.
        unit: ``stride_*`` arguments equal to 1 for contiguous inputs (used by the ``"i32"`` mode).
        variant: short description of the element / index types, shown in the AOT table.

    Raises:
        ValueError: no configs, a signature that does not name the kernel's parameters, or an
            unknown stride mode / unit name.
    """
    if not configs:
        raise ValueError(f"register_aot({family}): configs must list at least one LaunchConfig")
    params = _runtime_params(kernel)
    if list(signature) != params:
        raise ValueError(f"register_aot({family}): signature must name the non-constexpr parameters of "
                         f"{getattr(getattr(kernel, 'fn', kernel), '__name__', kernel)} in order {params}, "
                         f"got {list(signature)}")
    if strides is None:
        _REGISTRY.append(AotKernel(family, kernel, dict(signature), tuple(configs), variant=variant))
        return
    stride_args = [n for n in signature if n.startswith("stride_")]
    bad = [u for u in unit if u not in stride_args]
    if bad:
        raise ValueError(f"register_aot({family}): unit names {bad} are not stride_* parameters")
    for mode in strides:
        if mode not in STRIDE_MODES:
            raise ValueError(f"register_aot({family}): stride mode must be one of {STRIDE_MODES}, got {mode!r}")
        sig = {n: (mode if n in stride_args else t) for n, t in signature.items()}
        label = ",".join(p for p in (variant, f"strides {mode}") if p)
        if mode == "i64":
            _REGISTRY.append(AotKernel(family, kernel, sig, tuple(configs), variant=label))
            continue
        constants = {u: 1 for u in unit}
        divisible = tuple(n for n, t in sig.items()
                          if t.startswith("*") or (n in stride_args and n not in constants))
        _REGISTRY.append(AotKernel(family, kernel, {n: t for n, t in sig.items() if n not in constants},
                                   tuple(configs), constants, divisible, label))


def type_variants(with_index: bool, wide: Sequence[str] = ("fp32", "bf16")) -> List[Tuple[str, Optional[str], Tuple[str, ...]]]:
    """``(element type, index type, stride modes)`` to register for a kernel reading float tensors
    (and an index tensor when ``with_index``).

    Every element type gets the common ``i32`` strides; the element types in ``wide`` also get the
    ``i64`` strides of tensors past 2**31 elements (fp32 holds the most bytes per register for pure
    copies, bf16 is the production dtype; kernels that convert to fp32 on load need bf16 only).
    Index pointers (the ops accept int32 and int64): bf16 with both, fp32 with int64 (what the
    selection ops return), fp16 with int32; not the full cross product, to bound the compile time.
    """
    rows = [("fp32", "i64"), ("bf16", "i64"), ("bf16", "i32"), ("fp16", "i32")] if with_index else \
        [("fp32", None), ("bf16", None), ("fp16", None)]
    return [(elem, index, ("i32", "i64") if elem in wide and index != "i32" else ("i32",)) for elem, index in rows]


def registered_kernels() -> List[AotKernel]:
    """Import every kernel module the package ships and return the registry."""
    import importlib

    from tokprune.kernels.triton import kernel_modules

    for module in kernel_modules():
        importlib.import_module(module)
    return list(_REGISTRY)
