"""tokprune._C (csrc/) against the oracles of tokprune/reference/.

On the CPU this tests the host build; with ``TOKPRUNE_TEST_DEVICE=cuda`` the same tests launch the CUDA
kernels on CUDA tensors (oracles on CPU copies). Verification and top-k must be exact; attention within
fp32 tolerance. The CUDA kernels share the math headers with the host build
(csrc/include/tokprune/*.h); tests/test_csrc_build.py compiles them.
"""

import math
import random

import pytest
import torch

from tests.helpers import assert_close, dev, host, needs_backend, oracle_copy
from tokprune import _ext
from tokprune.reference.fasa import sparse_decode_attention_reference
from tokprune.reference.selection import select_tokens_reference
from tokprune.reference.spec import verify_tree_greedy_reference, verify_tree_stochastic_reference

pytestmark = pytest.mark.skipif(_ext.load_error() is not None,
                                reason=f"tokprune._C not available: {_ext.load_error()}")
on_device = needs_backend("cuda")  # the kernel launches below: host build on cpu, CUDA kernels on cuda

if _ext.load_error() is None:
    from tokprune.kernels.cuda import (select_tokens_cuda, sparse_decode_attention_cuda, verify_tree_greedy_cuda,
                                       verify_tree_stochastic_cuda)


# --------------------------------------------------------------------------------------- oracles
# The plain oracles of tokprune/reference/ (contract: the docstring of tokprune.ops.spec), run on the CPU.
def oracle_greedy(tokens, parents, logits):
    return verify_tree_greedy_reference(host(tokens), host(parents), host(logits))


def oracle_stochastic(tokens, parents, target, draft, rule, uniforms):
    return verify_tree_stochastic_reference(*host(tokens, parents, target, draft), rule, host(uniforms))


def oracle_attention(q, k, v, indices, scale):
    return sparse_decode_attention_reference(*(oracle_copy(t) for t in (q, k, v, indices)), scale)


def oracle_topk(scores, keep):
    return select_tokens_reference(host(scores), keep)


# ------------------------------------------------------------------------------------ tree fuzz
def random_trees(rng, batch, n, vocab, pad=True):
    """Batch of random trees with padding suffixes (and padding leaves) in [B, n]."""
    parents = torch.full((batch, n), -1, dtype=torch.int64)
    tokens = torch.randint(0, vocab, (batch, n), generator=rng)
    for b in range(batch):
        size = n if not pad or b == 0 else int(torch.randint(1, n + 1, (1,), generator=rng))
        for i in range(1, size):
            parents[b, i] = int(torch.randint(0, i, (1,), generator=rng))
        if pad and size > 3:  # a padding node in the middle; its children are re-parented to the root
            hole = int(torch.randint(1, size, (1,), generator=rng))
            parents[b, hole] = -1
            parents[b][parents[b] == hole] = 0
    return tokens, parents


def steer_tokens(tokens, parents, rows, rng, prob=0.7):
    """Make each node's token the argmax of its parent's row with probability ``prob`` (deep accepts)."""
    tokens = tokens.clone()
    best = rows.argmax(-1)
    for b in range(tokens.shape[0]):
        for i in range(1, tokens.shape[1]):
            p = int(parents[b, i])
            if p >= 0 and float(torch.rand((), generator=rng)) < prob:
                tokens[b, i] = best[b, p]
    return tokens


def _assert_tree_equal(got, expected):
    for name, g, e in zip(("accept_index", "accept_len", "next_token"), host(*got), host(*expected)):
        assert g.dtype == torch.int64, name
        assert torch.equal(g, e), f"{name}: got {g.tolist()} expected {e.tolist()}"


@on_device
# ----------------------------------------------------------------------------------- verification
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_verify_greedy_matches_oracle(seed, dtype):
    rng = torch.Generator().manual_seed(seed)
    batch, n, vocab = 1 + seed % 3, [1, 2, 7, 16, 33, 64][seed], [1, 5, 50, 1000, 37, 4099][seed]
    tokens, parents = random_trees(rng, batch, n, vocab)
    logits = torch.randn(batch, n, vocab, generator=rng).to(dtype)
    if vocab > 4:
        logits[..., 3] = logits[..., 1]  # exact ties in some rows
    tokens = steer_tokens(tokens, parents, logits.float(), rng)
    _assert_tree_equal(verify_tree_greedy_cuda(*dev(tokens, parents, logits)), oracle_greedy(tokens, parents, logits))


@on_device
def test_verify_greedy_ties_strided_int32_and_padding():
    # row 0: argmax ties between 2 and 5 -> 2; child order decides among equal tokens
    tokens = torch.tensor([[9, 2, 2, 5, 1], [9, 4, 0, 0, 0]], dtype=torch.int32)
    parents = torch.tensor([[-1, 0, 0, 0, 2], [-1, 0, -1, -1, -1]], dtype=torch.int32)
    base = torch.zeros(2, 5, 12)
    base[0, 0, 2] = base[0, 0, 5] = 3.0
    base[0, 1, 1] = 9.0  # node 1 wants token 1, but its child is under node 2 -> stops at node 1
    base[1, 0, 4] = 1.0
    logits = base.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous batch stride
    got = verify_tree_greedy_cuda(*dev(tokens, parents, logits))
    _assert_tree_equal(got, oracle_greedy(tokens, parents, logits))
    assert got[0].tolist() == [[0, 1, -1], [0, 1, -1]] and got[1].tolist() == [1, 1] and got[2].tolist() == [1, 0]


@on_device
@pytest.mark.parametrize("rule", ["specinfer", "rsd", "target_only"])
@pytest.mark.parametrize("seed", range(8))
def test_verify_stochastic_matches_oracle(rule, seed):
    rng = torch.Generator().manual_seed(100 + seed)
    batch, n, vocab = 1 + seed % 3, [1, 3, 6, 12, 20, 31, 9, 16][seed], [1, 3, 8, 64, 300, 50, 2000, 17][seed]
    tokens, parents = random_trees(rng, batch, n, vocab)
    temp = 0.3 + seed * 0.2  # peaked distributions give deep accepts, flat ones many rejections
    target = torch.softmax(torch.randn(batch, n, vocab, generator=rng) / temp, -1)
    draft = torch.softmax((target.log() + 0.5 * torch.randn(batch, n, vocab, generator=rng)), -1)
    if seed % 2:
        draft[..., : vocab // 2] = 0  # zeros in the draft (top-k/top-p style)
        draft = draft / draft.sum(-1, keepdim=True).clamp_min(1e-30)
        draft[draft.sum(-1) == 0] = 1.0 / vocab
    tokens = steer_tokens(tokens, parents, draft, rng, prob=0.6)
    uniforms = torch.rand(batch, n, generator=rng)
    got = verify_tree_stochastic_cuda(*dev(tokens, parents, target, draft), rule, dev(uniforms))
    _assert_tree_equal(got, oracle_stochastic(tokens, parents, target, draft, rule, uniforms))


@on_device
def test_verify_stochastic_forced_paths():
    """Hand-built case: rejection of node 1 renormalises p, node 2 (same parent) is then accepted."""
    tokens = torch.tensor([[0, 0, 1, 2]])
    parents = torch.tensor([[-1, 0, 0, 2]])
    target = torch.tensor([[[0.1, 0.6, 0.3]] * 4])
    draft = torch.tensor([[[0.8, 0.1, 0.1]] * 4])
    uniforms = torch.tensor([[0.5, 0.9, 0.99, 0.0]])
    for rule in ("specinfer", "rsd", "target_only"):
        got = verify_tree_stochastic_cuda(*dev(tokens, parents, target, draft), rule, dev(uniforms))
        _assert_tree_equal(got, oracle_stochastic(tokens, parents, target, draft, rule, uniforms))
    # specinfer: node 1 (token 0): 0.9*0.8 >= 0.1 reject; p -> [0, .5/.7, .2/.7]; node 2 (token 1) accepted;
    # node 3 (token 2): 0*0.1 < 0.3 accepted; bonus from target[3] with u=0.5 -> token 1.
    got = verify_tree_stochastic_cuda(*dev(tokens, parents, target, draft), "specinfer", dev(uniforms))
    assert got[0].tolist() == [[0, 2, 3]] and got[1].tolist() == [2] and got[2].tolist() == [1]


@on_device
@pytest.mark.slow
def test_verify_large_vocab_128k():
    rng = torch.Generator().manual_seed(7)
    batch, n, vocab = 2, 6, 128 * 1024
    tokens, parents = random_trees(rng, batch, n, vocab, pad=False)
    logits = torch.randn(batch, n, vocab, generator=rng)
    tokens = steer_tokens(tokens, parents, logits, rng, prob=0.8)
    _assert_tree_equal(verify_tree_greedy_cuda(*dev(tokens, parents, logits)), oracle_greedy(tokens, parents, logits))
    target = torch.softmax(logits * 3, -1)
    draft = torch.softmax(logits * 3 + torch.randn(batch, n, vocab, generator=rng), -1)
    uniforms = torch.rand(batch, n, generator=rng)
    for rule in ("specinfer", "rsd", "target_only"):
        got = verify_tree_stochastic_cuda(*dev(tokens, parents, target, draft), rule, dev(uniforms))
        _assert_tree_equal(got, oracle_stochastic(tokens, parents, target, draft, rule, uniforms))


def test_verify_errors_raised_by_the_op():
    """One validation point: the public op checks, then hands trusted tensors to tokprune._C."""
    from tokprune.ops import spec

    tokens, parents = torch.zeros(1, 3, dtype=torch.long), torch.tensor([[-1, 0, 0]])
    probs = torch.ones(1, 3, 5) / 5
    with pytest.raises(ValueError, match=r"target_logits must have shape \(B, N\)"):
        spec.verify_tree_greedy(tokens, parents, torch.zeros(1, 2, 5), backend="cuda")
    with pytest.raises(TypeError, match="target_logits must have dtype in"):
        spec.verify_tree_greedy(tokens, parents, torch.zeros(1, 3, 5, dtype=torch.float64), backend="cuda")
    with pytest.raises(IndexError, match=r"tokens of active nodes must lie in \[0, V=5\)"):
        spec.verify_tree_greedy(torch.tensor([[0, 1, 5]]), parents, torch.zeros(1, 3, 5), backend="cuda")
    with pytest.raises(ValueError, match="rule must be one of"):
        spec.verify_tree_stochastic(tokens, parents, target_probs=probs, draft_probs=probs, rule="bogus",
                                    uniforms=torch.rand(1, 3), backend="cuda")
    with pytest.raises(TypeError, match="uniforms must have dtype in"):
        spec.verify_tree_stochastic(tokens, parents, target_probs=probs, draft_probs=probs, rule="rsd",
                                    uniforms=torch.rand(1, 3, dtype=torch.float64), backend="cuda")
    with pytest.raises(ValueError, match="target_logits must be on cpu like the other inputs, got meta"):
        spec.verify_tree_greedy(tokens, parents, torch.zeros(1, 3, 5, device="meta"), backend="cuda")


def test_binding_asserts_on_argument_structs():
    """The binding takes argument structs and keeps only the checks that prevent memory errors."""
    lib = _ext.extension()
    a = lib.VerifyArgs()
    a.B, a.N, a.V, a.rule = 1, 1, 1, 7
    with pytest.raises(ValueError, match="rule code 7 is not 0 \\(specinfer\\), 1 \\(rsd\\), 2 \\(target_only\\)"):
        lib.verify_tree_stochastic(a, False)
    a.rule, a.dtype = 0, 5
    with pytest.raises(ValueError, match="dtype code 5 is not one of 0 \\(fp32\\), 1 \\(fp16\\), 2 \\(bf16\\)"):
        lib.verify_tree_greedy(a, False)
    a.dtype = 0
    with pytest.raises(ValueError, match="null pointer among tokens/parents/outputs"):
        lib.verify_tree_greedy(a, False)
    with pytest.raises(AttributeError):
        a.no_such_field = 1  # a misspelt field cannot be set silently
    t = torch.arange(4)
    a.tokens = t.data_ptr()
    assert a.tokens == t.data_ptr()  # pointers round-trip as integer addresses


@on_device
# --------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,T,K,D,per_head", [
    (1, 1, 1, 1, 1, 1, False), (2, 4, 2, 50, 7, 32, False), (2, 8, 2, 111, 40, 80, True),
    (1, 6, 6, 300, 300, 64, False), (3, 4, 1, 64, 5, 256, True), (2, 2, 1, 10, 0, 16, False)])
def test_sparse_attention_matches_oracle(dtype, B, H, Hkv, T, K, D, per_head):
    g = torch.Generator().manual_seed(B * 1000 + H * 10 + K)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    indices = torch.randint(-1, T, (B, H if per_head else Hkv, K), generator=g)  # -1 = padding
    if K:
        indices[0, 0] = -1  # a row with no valid token -> zeros
    scale = D ** -0.5
    out = host(sparse_decode_attention_cuda(*dev(q, k, v, indices), scale))
    assert out.dtype == dtype and out.shape == (B, H, 1, D)
    expected = oracle_attention(q, k, v, indices, scale)
    if dtype == torch.float32:
        assert_close(out, expected.float(), name="attention fp32")
    else:
        # fp32 accumulation then one rounding: within one ulp-level tolerance of the dtype
        assert_close(out, expected.to(dtype), name=f"attention {dtype}")
    if K:
        assert torch.equal(out[0, : (H // Hkv) if not per_head else 1].float(),
                           torch.zeros_like(out[0, : (H // Hkv) if not per_head else 1].float()))


@on_device
def test_sparse_attention_strided_cache_and_int32():
    g = torch.Generator().manual_seed(3)
    base_k = torch.randn(2, 40, 3, 16, generator=g)  # (B, T, Hkv, D) viewed as (B, Hkv, T, D)
    base_v = torch.randn(2, 40, 3, 16, generator=g)
    k, v = base_k.transpose(1, 2), base_v.transpose(1, 2)
    q = torch.randn(2, 6, 1, 16, generator=g)
    indices = torch.randint(0, 40, (2, 3, 9), generator=g, dtype=torch.int32)
    out = sparse_decode_attention_cuda(*dev(q, k, v, indices), 0.3)
    assert_close(out, oracle_attention(q, k, v, indices, 0.3).float())


def test_sparse_attention_errors():
    from tokprune.ops import fasa

    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    idx = torch.zeros(1, 2, 3, dtype=torch.long)
    kv3 = torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match=r"must be a multiple of k_cache kv_heads \(3\)"):
        fasa.sparse_decode_attention(q, kv3, kv3, torch.zeros(1, 3, 2).long(), 1.0, backend="cuda")
    with pytest.raises(TypeError, match="q, k_cache and v_cache must share a dtype"):
        fasa.sparse_decode_attention(q, k.half(), k.half(), idx, 1.0, backend="cuda")
    with pytest.raises(ValueError, match=r"indices must be \(batch=1, kv_heads=2 or heads=4"):
        fasa.sparse_decode_attention(q, k, k, torch.zeros(1, 3, 2).long(), 1.0, backend="cuda")
    with pytest.raises(IndexError, match="indices values must be < n_tokens=5"):
        fasa.sparse_decode_attention(q, k, k, idx + 5, 1.0, backend="cuda")
    # the kernel's own limit is asserted by the binding (it sizes shared memory)
    with pytest.raises(ValueError, match=r"head_dim D=300 must be in \[1, 256\]"):
        fasa.sparse_decode_attention(torch.randn(1, 2, 1, 300), torch.randn(1, 2, 5, 300),
                                     torch.randn(1, 2, 5, 300), idx, 1.0, backend="cuda")
    a = _ext.extension().AttentionArgs()
    a.B, a.H, a.Hkv, a.Hi, a.K, a.D = 1, 4, 3, 3, 1, 8
    with pytest.raises(ValueError, match="H=4 is not a multiple of Hkv=3"):
        _ext.extension().sparse_decode_attention(a, False)


@on_device
# -------------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("rows,n,keep", [(1, 1, 1), (3, 37, 5), (2, 64, 64), (2, 10, 25), (4, 1000, 999),
                                         (2, 5000, 4096), (1, 20000, 4096), (3, 7, 0), (2, 300, 1)])
def test_topk_matches_oracle(rows, n, keep):
    g = torch.Generator().manual_seed(n + keep)
    scores = torch.randn(rows, n, generator=g)
    scores[:, ::3] = 0.5                     # many exact ties
    scores[:, 1::11] = float("-inf")         # padding sorts last
    scores[0, 2::13] = -0.0                  # -0.0 ties with +0.0
    scores[0, 4::13] = 0.0
    if rows > 1:
        scores[1] = torch.randint(-3, 3, (n,), generator=g).float()  # heavy ties
    got = host(select_tokens_cuda(dev(scores.contiguous()), keep))
    assert got.dtype == torch.int64
    assert torch.equal(got, oracle_topk(scores, keep))


@on_device
def test_topk_extremes_and_errors():
    scores = torch.tensor([[float("-inf")] * 4 + [float("inf"), 1e38, -1e38, 1e-45]])
    assert select_tokens_cuda(dev(scores), 3).tolist() == [[4, 5, 7]]
    assert select_tokens_cuda(dev(scores), 8).tolist() == [list(range(8))]
    assert select_tokens_cuda(dev(scores), 6).tolist() == [[0, 1, 4, 5, 6, 7]]
    from tokprune.ops import select_tokens

    with pytest.raises(TypeError, match="scores must have dtype in"):
        select_tokens(torch.randn(2, 4, dtype=torch.float64), 2, backend="cuda")
    with pytest.raises(ValueError, match="keep must be a non-negative int"):
        select_tokens(torch.randn(2, 4), -1, backend="cuda")
    a = _ext.extension().TopkArgs()
    a.R, a.N, a.keep = 1, 4, 9
    with pytest.raises(ValueError, match=r"keep=9 must lie in \[0, N=4\]"):
        _ext.extension().select_tokens(a, False)


@on_device
def test_select_tokens_op_cuda_backend_equals_torch():
    from tokprune.ops import select_tokens

    g = torch.Generator().manual_seed(11)
    scores = torch.randn(2, 3, 300, generator=g).half()  # fp16 input, many ties after rounding
    mask = torch.rand(2, 3, 300, generator=g) < 0.02
    scores, mask = dev(scores, mask)
    for keep in (0, 1, 17, 299, 300, 500):
        km = mask if keep >= 20 else None
        assert torch.equal(select_tokens(scores, keep, keep_mask=km, backend="cuda"),
                           select_tokens(scores, keep, keep_mask=km, backend="torch"))


@on_device
# -------------------------------------------------------------- cross-checks with the public ops
def test_spec_ops_cuda_backend_equals_torch():
    spec = pytest.importorskip("tokprune.ops.spec")
    rng = torch.Generator().manual_seed(5)
    batch, n, vocab = 3, 12, 40
    tokens, parents = random_trees(rng, batch, n, vocab)
    logits = torch.randn(batch, n, vocab, generator=rng)
    tokens = steer_tokens(tokens, parents, logits, rng)
    tokens, parents, logits = dev(tokens, parents, logits)
    _assert_tree_equal(spec.verify_tree_greedy(tokens, parents, logits, backend="cuda"),
                       spec.verify_tree_greedy(tokens, parents, logits, backend="torch"))
    target = torch.softmax(logits * 2, -1)
    draft = dev(torch.softmax(host(logits) * 2 + torch.randn(batch, n, vocab, generator=rng), -1))
    uniforms = dev(torch.rand(batch, n, generator=rng))
    for rule in ("specinfer", "rsd", "target_only"):
        kw = dict(target_probs=target, draft_probs=draft, rule=rule, uniforms=uniforms)
        _assert_tree_equal(spec.verify_tree_stochastic(tokens, parents, backend="cuda", **kw),
                           spec.verify_tree_stochastic(tokens, parents, backend="torch", **kw))


@on_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fasa_op_cuda_backend_equals_torch(dtype):
    fasa = pytest.importorskip("tokprune.ops.fasa")
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 8, 1, 64, generator=g).to(dtype)
    k = torch.randn(2, 2, 90, 64, generator=g).to(dtype)
    v = torch.randn(2, 2, 90, 64, generator=g).to(dtype)
    idx = torch.randint(-1, 90, (2, 2, 33), generator=g)
    q, k, v, idx = dev(q, k, v, idx)
    assert_close(fasa.sparse_decode_attention(q, k, v, idx, 0.125, backend="cuda"),
                 fasa.sparse_decode_attention(q, k, v, idx, 0.125, backend="torch"))


# ----------------------------------------------------------------------- torch.library registration
@pytest.mark.slow
def test_custom_ops_registered_and_traceable():
    from torch.library import opcheck

    g = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 50, generator=g)
    opcheck(torch.ops.tokprune_ext.select_tokens.default, (scores, 7))
    q, k = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
    idx = torch.randint(-1, 20, (1, 2, 6), generator=g)
    opcheck(torch.ops.tokprune_ext.sparse_decode_attention.default, (q, k, k, idx, 0.25))
    tokens, parents = torch.tensor([[0, 3, 5, 3]]), torch.tensor([[-1, 0, 0, 1]])
    logits = torch.randn(1, 4, 8, generator=g)
    opcheck(torch.ops.tokprune_ext.verify_tree_greedy.default, (tokens, parents, logits))
    probs = torch.softmax(logits, -1)
    opcheck(torch.ops.tokprune_ext.verify_tree_stochastic.default,
            (tokens, parents, probs, probs.flip(-1), "rsd", torch.rand(1, 4, generator=g)))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def pipeline(scores, q, k, v):
        keep = select_tokens_cuda(scores, 6).view(1, 2, 6)
        return sparse_decode_attention_cuda(q, k, v, keep, 0.25)

    s2 = torch.randn(2, 20, generator=g)
    expected = oracle_attention(q, k, k, oracle_topk(s2, 6).view(1, 2, 6), 0.25).float()
    assert_close(pipeline(s2, q, k, k), expected)


# ------------------------------------------------------------------- CUDA launch errors (debug sync)
def test_sync_mode_follows_debug_and_environment(monkeypatch):
    from tokprune import _debug
    from tokprune.kernels import cuda as kcuda

    monkeypatch.delenv("TOKPRUNE_CUDA_SYNC", raising=False)
    previous = _debug.set_debug(False)
    try:
        assert not kcuda.sync_launches()
        monkeypatch.setenv("TOKPRUNE_CUDA_SYNC", "1")
        assert kcuda.sync_launches()
        monkeypatch.setenv("TOKPRUNE_CUDA_SYNC", "0")
        _debug.set_debug(True)
        assert kcuda.sync_launches()
    finally:
        _debug.set_debug(previous)


def test_launch_passes_the_sync_flag_for_cuda_tensors_only(monkeypatch):
    from tokprune.kernels import cuda as kcuda

    calls = []

    class FakeLib:
        TopkArgs = type("TopkArgs", (), {})

        def select_tokens(self, args, on_cuda, stream, sync):
            calls.append((on_cuda, stream, sync))

    monkeypatch.setattr(kcuda, "_lib", lambda: FakeLib())
    monkeypatch.setattr(kcuda, "_stream", lambda device: (device.type == "cuda", 7 if device.type == "cuda" else 0))
    monkeypatch.setattr(kcuda, "_on_device", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setenv("TOKPRUNE_CUDA_SYNC", "1")
    kcuda._launch("select_tokens", kcuda._args("TopkArgs", R=1), torch.device("cuda"))
    kcuda._launch("select_tokens", kcuda._args("TopkArgs", R=1), torch.device("cpu"))
    assert calls == [(True, 7, True), (False, 0, False)]


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="tokprune._C was built without nvcc")
def test_cuda_launch_failure_is_raised_by_the_op_that_launched():
    """Without a usable GPU/driver the launch itself fails: the binding raises a RuntimeError naming the op
    (the same path reports 'no kernel image' on an unsupported architecture), it does not crash."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_gpu_check.py and make gpu-check cover real launches")
    lib = _ext.extension()
    a = lib.TopkArgs()
    a.R, a.N, a.keep, a.scores, a.out = 1, 4, 2, 16, 32  # never dereferenced: the launch fails first
    with pytest.raises(RuntimeError, match="select_tokens: CUDA launch failed: "):
        lib.select_tokens(a, True, 0, True)
