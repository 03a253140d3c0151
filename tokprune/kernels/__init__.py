"""Kernel implementations: ``triton/`` (JIT kernels and launchers). CUDA kernels live in ``csrc/``."""
