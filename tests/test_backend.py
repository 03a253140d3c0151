import pytest
import torch

from tokprune._backend import BackendUnavailable, resolve_backend, unavailable_reason

CPU = torch.device("cpu")


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TOKPRUNE_BACKEND", raising=False)
    assert resolve_backend(None, CPU, ("torch", "triton"), "op") == "torch"
    assert resolve_backend("auto", CPU, ("torch", "triton", "cuda"), "op") == "torch"


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("TOKPRUNE_BACKEND", "triton")
    # conftest enabled the interpreter before import, so triton can run on CPU tensors
    assert resolve_backend(None, CPU, ("torch", "triton"), "op") == "triton"
    # an explicit argument wins over the environment
    assert resolve_backend("torch", CPU, ("torch", "triton"), "op") == "torch"


def test_unknown_and_unimplemented_backends_raise():
    with pytest.raises(BackendUnavailable, match="unknown"):
        resolve_backend("tpu", CPU, ("torch",), "my_op")
    with pytest.raises(BackendUnavailable, match="my_op: backend='triton' is not implemented"):
        resolve_backend("triton", CPU, ("torch",), "my_op")


def test_triton_without_interpreter_says_why(monkeypatch):
    import tokprune._backend as backend

    monkeypatch.setattr(backend, "TRITON_INTERPRET_AT_IMPORT", False)
    reason = unavailable_reason("triton", CPU)
    assert "TRITON_INTERPRET=1" in reason and "0 active drivers" in reason
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        resolve_backend("triton", CPU, ("torch", "triton"), "op")


def test_cuda_backend_on_cuda_tensor_without_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    reason = unavailable_reason("cuda", torch.device("cuda"))
    assert reason is not None and ("no CUDA device" in reason or "tokprune._C" in reason)
    assert "no CUDA device" in unavailable_reason("triton", torch.device("cuda"))
