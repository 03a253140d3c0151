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


# ------------------------------------------------------------------ TOKPRUNE_BACKEND is a preference
def test_environment_preference_falls_back_and_says_so_once(monkeypatch, caplog):
    import logging
    import warnings

    import tokprune._backend as backend

    monkeypatch.setenv("TOKPRUNE_BACKEND", "cuda")
    monkeypatch.setattr(backend, "_FALLBACKS_SEEN", set())
    with caplog.at_level(logging.DEBUG, logger="tokprune"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # an op without a cuda backend (fc_scores, gather_tokens, ...) runs with the auto choice
            assert resolve_backend(None, CPU, ("torch", "triton"), "gather_tokens") == "torch"
            assert resolve_backend("auto", CPU, ("torch", "triton"), "gather_tokens") == "torch"
    messages = [r.getMessage() for r in caplog.records if "gather_tokens" in r.getMessage()]
    assert len(messages) == 1 and "TOKPRUNE_BACKEND='cuda' not used (not implemented" in messages[0]
    fallbacks = [w for w in caught if issubclass(w.category, backend.BackendFallbackWarning)]
    assert len(fallbacks) == 1  # debug mode (tests set TOKPRUNE_DEBUG=1): also one warning
    # an explicit argument that cannot run still raises
    with pytest.raises(BackendUnavailable, match="gather_tokens: backend='cuda' is not implemented"):
        resolve_backend("cuda", CPU, ("torch", "triton"), "gather_tokens")


def test_environment_preference_used_when_it_can_run(monkeypatch):
    monkeypatch.setenv("TOKPRUNE_BACKEND", "triton")
    assert resolve_backend(None, CPU, ("torch", "triton"), "op") == "triton"  # interpreter is on in tests
    monkeypatch.setenv("TOKPRUNE_BACKEND", "tpu")
    with pytest.raises(BackendUnavailable, match="TOKPRUNE_BACKEND='tpu' is unknown"):
        resolve_backend(None, CPU, ("torch",), "op")


def test_gather_tokens_runs_under_a_cuda_preference(monkeypatch):
    from tokprune.ops import gather_tokens

    import tokprune._backend as backend

    monkeypatch.setenv("TOKPRUNE_BACKEND", "cuda")
    monkeypatch.setattr(backend, "_FALLBACKS_SEEN", set())
    x = torch.randn(2, 1, 5, 3)
    idx = torch.tensor([[[4, 0]], [[1, 1]]])
    expected = torch.stack([x[b, 0, idx[b, 0]] for b in range(2)]).unsqueeze(1)
    with pytest.warns(backend.BackendFallbackWarning, match="gather_tokens: TOKPRUNE_BACKEND='cuda' not used"):
        assert torch.equal(gather_tokens(x, idx), expected)


# ------------------------------------------------- auto on CUDA, validated archs, image and driver facts
def _fake_gpu(monkeypatch, *, arch=(9, 0), driver="13.0", built=("sm_80", "sm_90"), runtime="13.0",
              validated=None):
    """A CUDA device with the given facts, and a tokprune._C built for ``built`` with CUDA ``runtime``."""
    import tokprune._backend as backend
    from tokprune import _ext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(backend, "device_facts", lambda device: {
        "name": "Fake GPU", "capability": arch, "arch": f"sm_{arch[0]}{arch[1]}", "driver_cuda": driver})
    monkeypatch.setattr(backend, "triton_installed", lambda: True)
    info = {"cuda": True, "archs": list(built), "ops": ["verify_tree_greedy", "select_tokens"],
            "parts": {"host": [], "cuda": ["verify_tree.cu"]}}
    monkeypatch.setattr(_ext, "load_error", lambda: None)
    monkeypatch.setattr(_ext, "_build_info", lambda: info)
    monkeypatch.setattr(_ext, "cuda_runtime_version", lambda: runtime)
    monkeypatch.setattr(backend, "validated_archs", lambda: dict(validated or {}))
    monkeypatch.delenv("TOKPRUNE_BACKEND", raising=False)
    return torch.device("cuda", 0)


ALL = ("torch", "triton", "cuda")


def test_auto_on_cuda_is_torch_until_gpu_check_validated_the_arch(monkeypatch):
    dev = _fake_gpu(monkeypatch)
    assert resolve_backend(None, dev, ALL, "verify_tree_greedy") == "torch"
    # backend="cuda" is an explicit opt-in, allowed because image and driver match
    assert resolve_backend("cuda", dev, ALL, "verify_tree_greedy") == "cuda"
    dev = _fake_gpu(monkeypatch, validated={"sm_90": {"backends": ["triton"]}})
    assert resolve_backend(None, dev, ALL, "verify_tree_greedy") == "triton"
    dev = _fake_gpu(monkeypatch, validated={"sm_90": {"backends": ["triton", "cuda"]}})
    assert resolve_backend(None, dev, ALL, "verify_tree_greedy") == "cuda"
    assert resolve_backend(None, dev, ("torch", "triton"), "fc_scores") == "triton"
    # validated elsewhere only: this GPU stays on torch
    dev = _fake_gpu(monkeypatch, arch=(8, 0), validated={"sm_90": {"backends": ["triton", "cuda"]}})
    assert resolve_backend(None, dev, ALL, "verify_tree_greedy") == "torch"


def test_sm75_gpu_gets_a_no_kernel_image_reason(monkeypatch):
    dev = _fake_gpu(monkeypatch, arch=(7, 5), validated={"sm_75": {"backends": ["cuda", "triton"]}})
    reason = unavailable_reason("cuda", dev, "verify_tree_greedy")
    assert "sm_75" in reason and "no kernel image" in reason and "sm_80, sm_90" in reason
    with pytest.raises(BackendUnavailable, match="no kernel image"):
        resolve_backend("cuda", dev, ALL, "verify_tree_greedy")
    # even where validated, auto skips a backend that cannot run
    assert resolve_backend(None, dev, ALL, "verify_tree_greedy") == "triton"


def test_old_driver_is_reported_against_the_runtime_of_the_build(monkeypatch):
    dev = _fake_gpu(monkeypatch, driver="12.4", runtime="13.0")
    reason = unavailable_reason("cuda", dev, "select_tokens")
    assert "CUDA 13.0 runtime" in reason and "supports CUDA 12.4" in reason
    dev = _fake_gpu(monkeypatch, driver="13.1", runtime="13.0")
    assert unavailable_reason("cuda", dev, "select_tokens") is None
    dev = _fake_gpu(monkeypatch, driver="12.2", runtime="12.4")  # minor-version compatibility within 12.x
    assert unavailable_reason("cuda", dev, "select_tokens") is None


@pytest.mark.parametrize("cap,built,runs", [
    ((8, 0), ("sm_80", "sm_90"), True), ((8, 6), ("sm_80", "sm_90"), True),   # SASS of sm_80 runs on sm_86
    ((8, 9), ("sm_90",), False), ((10, 0), ("sm_80", "sm_90"), True),          # PTX of compute_90 JITs on sm_100
    ((7, 0), ("sm_80", "sm_90"), False), ((7, 5), ("sm_80",), False),
    ((10, 0), ("sm_90a",), False), ((9, 0), ("sm_90a",), True), ((9, 0), (), False)])
def test_kernel_image_rule(cap, built, runs):
    from tokprune._backend import kernel_image_reason

    reason = kernel_image_reason(cap, list(built))
    assert (reason is None) == runs, reason


def test_validated_archs_file(tmp_path, monkeypatch):
    import json

    import tokprune._backend as backend

    with open(backend.VALIDATED_ARCHS_PATH) as f:
        shipped = json.load(f)
    assert "archs" in shipped and isinstance(shipped["archs"], dict)
    path = tmp_path / "validated_archs.json"
    path.write_text(json.dumps({"archs": {"sm_90": {"backends": ["triton", "cuda"], "torch": "2.11"}}}))
    monkeypatch.setattr(backend, "VALIDATED_ARCHS_PATH", str(path))
    backend.validated_archs.cache_clear()
    try:
        assert backend.validated_archs()["sm_90"]["backends"] == ["triton", "cuda"]
        path.write_text("not json")
        backend.validated_archs.cache_clear()
        assert backend.validated_archs() == {}
    finally:
        backend.validated_archs.cache_clear()


def test_info_reports_runtime_archs_capability_and_driver(monkeypatch):
    from tokprune.cli import info_lines

    _fake_gpu(monkeypatch, arch=(7, 5), driver="12.4", runtime="13.0")
    text = "\n".join(info_lines())
    assert "CUDA runtime 13.0" in text
    assert "compute capability 7.5 (sm_75), driver supports CUDA 12.4" in text
    assert "no kernel image" in text and "validated: no; auto order: torch -> triton" in text
    assert "GPU architectures validated by make gpu-check: none yet" in text


def test_shared_data_checks_are_debug_only():
    from tokprune import _debug
    from tokprune.ops import matrix_entropy
    from tokprune.ops._checks import check_finite, check_index

    bad_index = torch.tensor([0, 7])
    nan = torch.tensor([[[1.0, float("nan")], [0.5, 0.25]]])
    previous = _debug.set_debug(False)
    try:
        check_index("index", bad_index, 4)  # values not read
        check_finite("scores", nan)
        matrix_entropy(nan)  # NaN in, NaN out: no host-side finiteness scan
        with pytest.raises(TypeError, match="index must be int32 or int64"):
            check_index("index", bad_index.float(), 4)  # the dtype is metadata: always checked
        _debug.set_debug(True)
        with pytest.raises(IndexError, match=r"index values must lie in \[0, 4\), got range \[0, 7\]"):
            check_index("index", bad_index, 4)
        with pytest.raises(ValueError, match="scores contains NaN"):
            check_finite("scores", nan)
        with pytest.raises(ValueError, match="x contains NaN"):
            matrix_entropy(nan)
    finally:
        _debug.set_debug(previous)
