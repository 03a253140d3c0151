"""Triton kernels against defects found by reading them with GPU semantics (issue 12).

* Large offsets: at run time Triton passes every int argument below 2**31 as i32 (and 1 as a
  constant), and ``tl.program_id`` is i32, so ``b * stride`` wraps past 2**31 elements unless one
  side is cast to int64 first. The interpreter computes i32 in numpy and wraps the same way, so the
  defect shows on the CPU: tensors are strided views into one lazily committed buffer of
  ``2**32 + 2**22`` bf16 elements (8 GiB of address space, only the rows used are ever written), with
  a batch stride just below 2**31 so that batch 2 starts past 2**32 elements. Wrapped i32 offsets
  land in the untouched start of the buffer (zeros), never outside it.
* NaN logits: argmax treats NaN as the maximum, lowest index among NaNs (``torch.argmax``) on every
  backend.
* Grids: every launch grid stays within CUDA's limits (axis 0 < 2**31, axes 1 and 2 <= 65535).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TEST_DEVICE, assert_close, dev, host, needs_backend
from tokprune._backend import TRITON_INTERPRET_AT_IMPORT

needs_triton = needs_backend("triton")  # on TEST_DEVICE, decided at set-up by unavailable_reason

# ------------------------------------------------------------------------------------ large offsets
_FAR_STRIDE = 2**31 - 2**20  # batch stride: < 2**31, so Triton passes it as i32
_BASE = 2**21  # first element of the first view; batch 2's i32-wrapped start is _BASE - 2**21 + ...
_BUF_ELEMS = 2**32 + 2**22


@pytest.fixture(scope="module")
def big_buffer():
    """One bf16 buffer of 2**32 + 2**22 elements on TEST_DEVICE; on the CPU pages are committed only where
    tests write (8 GiB of device memory on a GPU)."""
    return torch.empty(_BUF_ELEMS, dtype=torch.bfloat16, device=TEST_DEVICE)


def far_views(buf: torch.Tensor, shape, count: int, gen: torch.Generator):
    """``count`` tensors of ``shape = (3, A, B, C)`` filled with random values, whose batch ``b``
    starts at element ``_BASE + i * inner + b * _FAR_STRIDE`` of ``buf`` (``inner = A*B*C``): batch 2
    lies past 2**32 elements, and an i32 offset computation wraps into the untouched start of ``buf``."""
    assert shape[0] == 3
    inner = shape[1] * shape[2] * shape[3]
    assert (count + 1) * inner < 2**20, "views must stay small for the wrap to land inside the buffer"
    strides = (_FAR_STRIDE, shape[2] * shape[3], shape[3], 1)
    views = []
    for i in range(count):
        v = buf.as_strided(shape, strides, _BASE + i * inner)
        v.copy_(torch.randn(shape, generator=gen).to(buf.dtype).to(buf.device))
        views.append(v)
    return views


@needs_triton
def test_gather_tokens_past_2_31_elements(big_buffer):
    from tokprune.ops import gather_tokens

    gen = torch.Generator().manual_seed(0)
    (x,) = far_views(big_buffer, (3, 2, 64, 32), 1, gen)
    assert x.storage_offset() + 2 * x.stride(0) >= 2**32  # batch 2 starts past 2**32 elements
    index = torch.randint(0, 64, (3, 4, 20), generator=gen, dtype=torch.int32)
    out = gather_tokens(x, dev(index), backend="triton")
    assert_close(out, gather_tokens(host(x).contiguous(), index, backend="torch"), name="gather_tokens")


@needs_triton
def test_compress_qkv_past_2_31_elements(big_buffer):
    from tokprune.ops import compress_qkv

    gen = torch.Generator().manual_seed(1)
    q, k, v = far_views(big_buffer, (3, 2, 48, 32), 3, gen)
    index = torch.sort(torch.rand(3, 2, 48, generator=gen).argsort(-1)[..., :17], -1).values
    got = compress_qkv(q, k, v, dev(index), backend="triton")
    want = compress_qkv(host(q).contiguous(), host(k).contiguous(), host(v).contiguous(), index, backend="torch")
    for name, a, e in zip("qkv", got, want):
        assert_close(a, e, name=f"compress_qkv {name}")


@needs_triton
def test_decompress_into_view_past_2_31_elements(big_buffer):
    from tokprune.kernels.triton.token_sparse import decompress_triton

    gen = torch.Generator().manual_seed(2)
    (out,) = far_views(big_buffer, (3, 2, 40, 32), 1, gen)
    before = host(out).clone()
    index = torch.sort(torch.rand(3, 2, 40, generator=gen).argsort(-1)[..., :9], -1).values
    src = torch.randn(3, 2, 9, 32, generator=gen).to(torch.bfloat16)
    decompress_triton(*dev(src, index), out)
    want = before.scatter(2, index[..., None].expand(-1, -1, -1, 32), src)
    assert_close(out, want, name="decompress")


@needs_triton
def test_fasa_kernels_past_2_31_elements(big_buffer):
    from tokprune.ops import fc_scores, sparse_decode_attention

    gen = torch.Generator().manual_seed(3)
    k, v = far_views(big_buffer, (3, 2, 64, 32), 2, gen)
    q = torch.randn(3, 4, 1, 32, generator=gen).to(torch.bfloat16)
    fc_index = torch.randint(0, 16, (2, 4), generator=gen)
    got = fc_scores(dev(q), k, dev(fc_index), backend="triton")
    assert_close(got, fc_scores(q, host(k).contiguous(), fc_index, backend="torch"), name="fc_scores")
    for heads_of_index in (2, 4):  # indices per KV head and per query head
        idx = torch.randint(0, 64, (3, heads_of_index, 24), generator=gen)
        got = sparse_decode_attention(dev(q), k, v, dev(idx), 32 ** -0.5, backend="triton")
        want = sparse_decode_attention(q, host(k).contiguous(), host(v).contiguous(), idx, 32 ** -0.5,
                                       backend="torch")
        assert_close(got, want, name=f"sparse_decode_attention ({heads_of_index} index heads)")


# ------------------------------------------------------------------------------------------ NaN logits
def _nan_rows(vocab: int, dtype) -> torch.Tensor:
    """Rows with NaN in every position class (first/last lane, across chunks, beside +inf, all NaN)."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(10, vocab, generator=gen)
    rows[0, 1500] = float("nan")
    rows[0, 10] = 100.0  # a larger number does not beat NaN
    rows[1, [2047, 5]] = float("nan")  # lowest NaN index wins, across chunks
    rows[2, vocab - 1] = float("nan")  # last element, last (partial) chunk
    rows[3, 0] = float("inf")
    rows[3, 7] = float("nan")  # NaN beats +inf
    rows[4] = float("nan")  # all NaN -> 0
    rows[5] = float("-inf")  # no NaN, all -inf -> 0
    rows[6, [3, 1025]] = 50.0  # no NaN: lowest index among ties
    rows[7, [1024, 1023]] = float("nan")  # NaN at both sides of a chunk boundary
    rows[8, 2048] = float("nan")
    rows[8, 1] = float("nan")
    return rows.to(dtype)  # row 9: no NaN


def _argmax_available_backends():
    from tokprune._backend import unavailable_reason

    return [b for b in ("triton", "cuda") if unavailable_reason(b, TEST_DEVICE, "verify_tree_greedy") is None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_argmax_nan_is_maximum_on_every_backend(dtype):
    """Root-only trees: the bonus token is the argmax of row 0, NaN counted as the maximum."""
    from tokprune.ops import verify_tree_greedy

    vocab = 2500  # three 1024-wide chunks of the Triton kernel, the last one partial
    rows = _nan_rows(vocab, dtype)
    bsz = rows.shape[0]
    expected = rows.float().argmax(-1)
    assert expected[:9].tolist() == [1500, 5, vocab - 1, 7, 0, 0, 3, 1023, 1]  # torch.argmax's rule
    backends = _argmax_available_backends()
    assert "triton" in backends or not TRITON_INTERPRET_AT_IMPORT
    tokens = torch.zeros(bsz, 1, dtype=torch.long)
    parents = torch.full((bsz, 1), -1)
    for backend in backends:
        _, accept_len, next_token = verify_tree_greedy(*dev(tokens, parents, rows[:, None, :]), backend=backend)
        assert next_token.tolist() == expected.tolist(), backend
        assert accept_len.tolist() == [0] * bsz
    with pytest.raises(ValueError, match="NaN"):  # the torch backend rejects a NaN argmax
        verify_tree_greedy(*dev(tokens, parents, rows[:, None, :]), backend="torch")


def test_greedy_path_through_nan_argmax():
    """A draft token equal to the first NaN of a row is accepted by the kernels (torch.argmax's pick)."""
    from tokprune.ops import verify_tree_greedy

    vocab = 1300
    logits = torch.randn(2, 3, vocab)
    logits[:, 0, 700] = float("nan")
    logits[:, 0, 900] = float("nan")
    logits[0, 1, 42] = float("nan")
    parents = torch.tensor([[-1, 0, 1]] * 2)
    tokens = torch.tensor([[0, 700, 42], [0, 900, 5]])
    for backend in _argmax_available_backends():
        accept_index, accept_len, next_token = verify_tree_greedy(*dev(tokens, parents, logits), backend=backend)
        # row 1 drafts the second NaN (900): rejected, the bonus token is the first NaN (700)
        assert accept_index.tolist() == [[0, 1, 2], [0, -1, -1]], backend
        assert accept_len.tolist() == [2, 0]
        assert next_token.tolist() == [int(logits[0, 2].argmax()), 700]


# ------------------------------------------------------------------------------ grids and devices
def test_grids_stay_within_cuda_limits_for_long_sequences():
    """Token blocks go on grid axis 0 (2**31 - 1 programs); heads, batch, splits on axes 1 / 2."""
    import triton

    from tokprune.kernels.triton import fasa, gather, token_sparse
    from tokprune.kernels.triton._launch import MAX_GRID, check_grid, token_grid

    def within(grid):
        return all(n <= limit for n, limit in zip(grid, MAX_GRID)) and check_grid(grid, "k") == tuple(grid)

    for n_tokens in (1, 1_000_000, 16_000_000, 300_000_000):
        for batch, heads in ((1, 32), (64, 128)):
            block_t = fasa._fc_config(16).constexprs["BLOCK_T"]
            grid = fasa.fc_scores_grid(batch, heads, n_tokens, block_t)
            assert within(grid) and grid[0] * block_t >= n_tokens > (grid[0] - 1) * block_t
            assert grid[1:] == (heads, batch)
            for config in (gather._launch_config(n_tokens), token_sparse._launch_config(n_tokens)):
                block_k = config.constexprs["BLOCK_K"]
                grid = token_grid(batch, heads, n_tokens, block_k)
                assert within(grid) and grid[0] * block_k >= n_tokens > (grid[0] - 1) * block_k
    # decode: index rows (batch x heads) on axis 0, even for huge batches
    grid = fasa.sparse_decode_grid(8192, 32, 4, 64, 4)
    assert within(grid) and grid == (8192 * 32, 64, 1)
    # the old layout (batch x heads, token blocks) is what check_grid rejects past ~1M tokens
    with pytest.raises(ValueError, match="grid axis 1 has 62500 programs|grid axis 1 has 65536"):
        check_grid((32, triton.cdiv(1_048_576, 16)), "old fc_scores layout")
    with pytest.raises(ValueError, match="_fc_scores_kernel: grid axis 2"):
        check_grid((1, 1, 70000), "_fc_scores_kernel")


def test_split_plan_uses_batch_times_heads():
    from tokprune.kernels.triton.fasa import split_plan

    n_keep, block_k = 4096, 32
    assert split_plan(n_keep, block_k) == (64, 64)  # no device information: finest split
    few, _ = split_plan(n_keep, block_k, programs=8, n_sms=132)
    many, size = split_plan(n_keep, block_k, programs=4096, n_sms=132)
    assert few == 64 and many == 1 and size >= n_keep  # B*H fills the SMs: no split, no combine work
    mid, size = split_plan(n_keep, block_k, programs=132, n_sms=132)
    assert mid == 4 and mid * size >= n_keep and size % block_k == 0


@needs_triton
def test_every_triton_launch_runs_under_the_tensor_device(monkeypatch):
    """All launchers go through _launch.launch: grid checked and the tensor's device made current."""
    import contextlib

    from tokprune import ops
    from tokprune.kernels.triton import _launch

    seen = []
    real_check = _launch.check_grid

    def record_check(grid, what):
        seen.append(what)
        return real_check(grid, what)

    devices = []

    def record_guard(device):
        devices.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_launch, "check_grid", record_check)
    monkeypatch.setattr(_launch, "device_guard", record_guard)
    q, k, idx = dev(torch.randn(1, 4, 1, 16), torch.randn(1, 2, 20, 16), torch.randint(0, 20, (1, 2, 5)))
    ops.fc_scores(q, k, dev(torch.randint(0, 8, (2, 2))), backend="triton")
    ops.sparse_decode_attention(q, k, k, idx, 0.25, backend="triton")
    ops.gather_tokens(k, idx, backend="triton")
    qf = dev(torch.randn(1, 4, 20, 16))
    sel = dev(torch.sort(torch.rand(1, 4, 20).argsort(-1)[..., :6], -1).values)
    qc, _, _ = ops.compress_qkv(qf, k, k, sel, backend="triton")
    ops.decompress(qc, sel, 20, backend="triton")
    ops.verify_tree_greedy(*dev(torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), -1), torch.randn(1, 1, 30)),
                           backend="triton")
    probs = dev(torch.softmax(torch.randn(1, 1, 30), -1))
    ops.verify_tree_stochastic(*dev(torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), -1)), probs, probs,
                               rule="specinfer", uniforms=dev(torch.rand(1, 1)), backend="triton")
    ops.token_information_scores(dev(torch.randn(1, 5, 4, 8)), backend="triton")
    assert {"_fc_scores_kernel", "_sparse_decode_split_kernel", "_sparse_decode_combine_kernel",
            "_gather_tokens_kernel", "_compress_qkv_kernel", "_decompress_kernel", "_verify_greedy_kernel",
            "_verify_stochastic_kernel", "_token_gram_kernel"} <= set(seen)
    assert len(devices) == len(seen) and all(d == q.device for d in devices)


# ------------------------------------------------------------------------- FASA decode, GQA groups
@needs_triton
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (16, 2), (4, 4)])
@pytest.mark.parametrize("per", ["kv", "q"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_gqa_groups(heads, kv_heads, per, dtype):
    """Indices per KV head: one program serves up to four heads of a group (group 3: one masked lane,
    group 8: two head chunks); per query head: one head per program."""
    from tokprune.ops import sparse_decode_attention

    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(2, heads, 1, 48, generator=gen).to(dtype)
    k = torch.randn(2, kv_heads, 90, 48, generator=gen).to(dtype)
    v = torch.randn(2, kv_heads, 90, 48, generator=gen).to(dtype)
    idx = torch.randint(-1, 90, (2, kv_heads if per == "kv" else heads, 70), generator=gen)
    idx[1, 0] = -1  # a row with no valid token gives zeros
    got = sparse_decode_attention(*dev(q, k, v, idx), 48 ** -0.5, backend="triton")
    want = sparse_decode_attention(q, k, v, idx, 48 ** -0.5, backend="torch")  # oracle on the CPU
    assert_close(got, want, name=f"sparse decode H={heads} Hkv={kv_heads} per {per}")


def test_debug_mode_synchronises_cuda_launches(monkeypatch):
    """In debug mode a CUDA fault surfaces at the Triton launch that caused it, naming the kernel."""
    import contextlib

    from tokprune import _debug
    from tokprune.kernels.triton import _launch

    class FakeKernel:
        __name__ = "_fake_kernel"
        launched = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.launched.append(grid)

    synced = []

    def fault(device):
        synced.append(device)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(_launch, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", fault)
    monkeypatch.delenv("TOKPRUNE_CUDA_SYNC", raising=False)
    previous = _debug.set_debug(True)
    try:
        with pytest.raises(RuntimeError, match="_fake_kernel failed on cuda:1"):
            _launch.launch(FakeKernel(), (3,), torch.device("cuda", 1))
        _debug.set_debug(False)
        _launch.launch(FakeKernel(), (3,), torch.device("cuda", 1))  # off: no synchronisation
        _launch.launch(FakeKernel(), (3,), torch.device("cpu"))
    finally:
        _debug.set_debug(previous)
    assert synced == [torch.device("cuda", 1)] and FakeKernel.launched == [(3,), (3,), (3,)]


@needs_triton
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (16, 2)])
@pytest.mark.parametrize("per", ["kv", "q", "packed"])
def test_fc_scores_gqa_groups(heads, kv_heads, per):
    """FCs per KV head (and the packed layout): one program scores the whole group from one key tile."""
    from tokprune.ops import fc_scores, pack_fc_keys

    gen = torch.Generator().manual_seed(heads + kv_heads)
    q = torch.randn(2, heads, 1, 32, generator=gen)
    k = torch.randn(2, kv_heads, 70, 32, generator=gen)
    fc = torch.randint(0, 16, (heads if per == "q" else kv_heads, 3), generator=gen)
    keys = pack_fc_keys(k, fc) if per == "packed" else k
    kw = dict(packed=per == "packed")
    got = fc_scores(q, keys, fc, backend="triton", **kw)
    assert_close(got, fc_scores(q, keys, fc, backend="torch", **kw), name=f"fc_scores per {per}")
