"""FASA ops: fc_scores, pack_fc_keys, select_sparse_indices, sparse_decode_attention (torch + Triton vs oracle),
KV-selection baselines, FC agreement and calibration files."""

import pytest
import torch

from tests.helpers import assert_close, backend_params, dev, host
from tokprune._backend import BackendUnavailable
from tokprune.ops import fc_scores, fasa_bytes_per_step, pack_fc_keys, select_sparse_indices, sparse_decode_attention
from tokprune.reference.fasa import fc_dims, fc_scores_reference, sparse_decode_attention_reference

BACKENDS = backend_params("torch", "triton")
DECODE_BACKENDS = backend_params("torch", "triton", "cuda")  # sparse_decode_attention also has tokprune._C


def _qkv(batch=2, heads=4, kv_heads=2, n_tokens=37, head_dim=16, dtype=torch.float32):
    q = torch.randn(batch, heads, 1, head_dim).to(dtype)
    k = torch.randn(batch, kv_heads, n_tokens, head_dim).to(dtype)
    v = torch.randn(batch, kv_heads, n_tokens, head_dim).to(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------- fc_scores

def test_fc_dims_layout_pairs_rotate_half():
    dims = fc_dims(torch.tensor([[0, 3]]), head_dim=16, chunk=1)
    assert dims.tolist() == [[0, 8, 3, 11]]
    dims = fc_dims(torch.tensor([[1]]), head_dim=16, chunk=2)
    assert dims.tolist() == [[2, 3, 10, 11]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per", ["kv", "q"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fc_scores_matches_reference(backend, per, dtype):
    q, k, _ = _qkv(n_tokens=45, dtype=dtype)
    rows = 2 if per == "kv" else 4
    fc = torch.stack([torch.randperm(8)[:3] for _ in range(rows)])
    got = host(fc_scores(*dev(q, k, fc), backend=backend))
    assert got.shape == (2, 4, 45) and got.dtype == torch.float32
    assert_close(got, fc_scores_reference(q, k, fc), atol=1e-4, rtol=1e-4, name="fc_scores")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fc_scores_packed_and_chunk(backend):
    q, k, _ = _qkv(n_tokens=33, head_dim=32)
    fc = torch.tensor([[0, 5], [7, 2]])
    packed = pack_fc_keys(k, fc, chunk=2)
    assert packed.shape == (2, 2, 33, 8) and packed.is_contiguous()
    assert_close(packed[:, 1], k[:, 1][..., fc_dims(fc, 32, 2)[1]])
    expected = fc_scores_reference(q, k, fc, chunk=2)
    assert_close(fc_scores(*dev(q, packed, fc), chunk=2, packed=True, backend=backend), expected, name="packed")
    assert_close(fc_scores(*dev(q, k, fc), chunk=2, backend=backend), expected, name="strided")


def test_fc_scores_all_fcs_equals_full_logits_and_reduce():
    q, k, _ = _qkv()
    fc = torch.arange(8).expand(2, -1)
    full = torch.einsum("bhd,bhtd->bht", q[:, :, 0], k.repeat_interleave(2, 1))
    got = fc_scores(q, k, fc)
    assert_close(got, full, name="all FCs = q.k")
    assert_close(fc_scores(q, k, fc, reduce="max"), full.view(2, 2, 2, -1).amax(2))
    assert_close(fc_scores(q, k, fc, reduce="mean"), full.view(2, 2, 2, -1).mean(2))


def test_fc_scores_errors():
    q, k, _ = _qkv()
    fc = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(IndexError, match="fc_index values must lie in"):
        fc_scores(q, k, torch.tensor([[0, 8], [1, 2]]))
    with pytest.raises(ValueError, match="fc_index must be"):
        fc_scores(q, k, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="fc_index must be int32 or int64"):
        fc_scores(q, k, fc.float())
    with pytest.raises(ValueError, match="q must be"):
        fc_scores(q.expand(-1, -1, 2, -1), k, fc)
    with pytest.raises(ValueError, match="multiple"):
        fc_scores(q[:, :3], k, fc)
    with pytest.raises(ValueError, match="packed k_cache"):
        fc_scores(q, k, fc, packed=True)
    with pytest.raises(ValueError, match="reduce"):
        fc_scores(q, k, fc, reduce="sum")
    with pytest.raises(ValueError, match="chunk"):
        fc_scores(q, k, fc, chunk=3)
    with pytest.raises(BackendUnavailable):
        fc_scores(q, k, fc, backend="cuda")


# ------------------------------------------------------------------------------------ sparse decode attention

@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idx_heads", [2, 4])
def test_sparse_decode_matches_reference(backend, dtype, idx_heads):
    q, k, v = _qkv(n_tokens=111, head_dim=24, dtype=dtype)  # odd head_dim -> masked lanes
    index = torch.randint(-1, 111, (2, idx_heads, 77))
    index[1, 0, :] = -1  # a row with no valid index -> zeros
    got = host(sparse_decode_attention(*dev(q, k, v, index), 0.3, backend=backend))
    expected = sparse_decode_attention_reference(q.double(), k.double(), v.double(), index, 0.3)
    assert got.dtype == dtype and got.shape == q.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert_close(got.double(), expected, atol=tol, rtol=tol, name="sparse decode")
    heads_of_row0 = [0, 1] if idx_heads == 2 else [0]
    assert bool((got[1, heads_of_row0] == 0).all())


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_sparse_decode_all_tokens_equals_full_sdpa_many_splits(backend):
    q, k, v = _qkv(batch=1, n_tokens=300, head_dim=16)
    index = torch.randperm(300).view(1, 1, 300).expand(1, 2, -1).contiguous()  # unsorted, 10 splits of 32
    got = sparse_decode_attention(*dev(q, k, v, index.int()), 16 ** -0.5, backend=backend)
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert_close(got, full, name="all tokens vs SDPA")


def test_sparse_decode_empty_and_duplicates():
    q, k, v = _qkv()
    empty = sparse_decode_attention(q, k, v, torch.zeros(2, 2, 0, dtype=torch.long), 0.25)
    assert bool((empty == 0).all()) and empty.shape == q.shape
    dup = torch.tensor([3, 3, 5]).expand(2, 2, -1)
    ref = sparse_decode_attention_reference(q, k, v, dup, 0.25)
    assert_close(sparse_decode_attention(q, k, v, dup, 0.25), ref)


def test_sparse_decode_errors():
    q, k, v = _qkv()
    index = torch.zeros(2, 2, 3, dtype=torch.long)
    with pytest.raises(IndexError, match="< n_tokens"):
        sparse_decode_attention(q, k, v, index + 37, 0.25)
    with pytest.raises(TypeError, match="share a dtype"):
        sparse_decode_attention(q, k.half(), v, index, 0.25)
    with pytest.raises(ValueError, match="indices must be"):
        sparse_decode_attention(q, k, v, torch.zeros(2, 3, 3, dtype=torch.long), 0.25)
    with pytest.raises(TypeError, match="int32 or int64"):
        sparse_decode_attention(q, k, v, index.float(), 0.25)
    with pytest.raises(ValueError, match="v_cache"):
        sparse_decode_attention(q, k, v[:, :, :5], index, 0.25)
    with pytest.raises(TypeError, match="scale"):
        sparse_decode_attention(q, k, v, index, torch.tensor(0.25))


# ------------------------------------------------------------------------------------------------ selection

def test_select_keeps_sinks_window_and_top_scores():
    scores = torch.randn(2, 3, 50)
    idx = select_sparse_indices(scores, 20, sink=4, window=6)
    assert idx.shape == (2, 3, 20)
    for b in range(2):
        for h in range(3):
            row = set(idx[b, h].tolist())
            assert set(range(4)) <= row and set(range(44, 50)) <= row
            rest = scores[b, h, 4:44]
            best = set((rest.topk(10).indices + 4).tolist())
            assert best <= row
    assert bool((idx[..., 1:] > idx[..., :-1]).all())


def test_select_padding_never_selected_and_sinks_are_first_valid():
    scores = torch.randn(2, 1, 30)
    scores[1, 0, :5] = 100.0  # padded positions with huge scores
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :5] = False
    idx = select_sparse_indices(scores, 10, sink=2, window=3, valid=valid)
    assert not (set(idx[1, 0].tolist()) & set(range(5)))
    assert {5, 6, 27, 28, 29} <= set(idx[1, 0].tolist())
    # fewer valid tokens than the budget: empty slots are -1
    valid[0, :25] = False
    idx = select_sparse_indices(scores, 10, sink=2, window=3, valid=valid)
    assert sorted(i for i in idx[0, 0].tolist() if i >= 0) == [25, 26, 27, 28, 29]
    assert (idx[0, 0] == -1).sum() == 5


def test_select_budget_larger_than_sequence_and_window_clipped():
    idx = select_sparse_indices(torch.randn(1, 2, 7), 100, sink=4, window=64)
    assert idx.tolist() == [[list(range(7))] * 2][0] or idx[0, 0].tolist() == list(range(7))
    idx = select_sparse_indices(torch.randn(1, 1, 40), 8, sink=4, window=64)  # window shrinks to 4
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 36, 37, 38, 39]


def test_cpu_fast_top_matches_select_tokens_semantics_with_ties():
    from tokprune.ops import select_tokens
    from tokprune.ops.fasa import _select_top_cpu

    g = torch.Generator().manual_seed(1)
    for trial in range(100):
        n = int(torch.randint(1, 50, (1,), generator=g))
        keep = int(torch.randint(0, n + 1, (1,), generator=g))
        w = torch.randint(-3, 3, (3, 2, n), generator=g).float()  # many ties, +-inf
        w[w == -3] = float("-inf")
        w[w == 2] = float("inf")
        assert torch.equal(_select_top_cpu(w, keep), select_tokens(w, keep)), (trial, w, keep)


def test_select_errors():
    with pytest.raises(ValueError, match="NaN"):
        select_sparse_indices(torch.tensor([[[0.0, float("nan")]]]), 1)
    with pytest.raises(ValueError, match="budget"):
        select_sparse_indices(torch.zeros(1, 1, 3), -1)
    with pytest.raises(ValueError, match="valid must be"):
        select_sparse_indices(torch.zeros(1, 1, 3), 2, valid=torch.ones(1, 4, dtype=torch.bool))


def test_bytes_per_step():
    b = fasa_bytes_per_step(8192, 64, 3, 8, 256, element_bytes=2)
    assert b["full"] == 2 * 8192 * 64 * 2 * 3
    assert b["fasa"] == 8192 * 16 * 2 * 3 + 2 * 256 * 64 * 2 * 3
    assert b["ratio"] > 4


# ------------------------------------------------------------------------------------------- KV baselines

def test_policy_argument_errors():
    from tokprune.methods import FASA

    with pytest.raises(ValueError, match="budget"):
        FASA(budget=0)
    with pytest.raises(ValueError, match="aggregate"):
        FASA(aggregate="median")
    with pytest.raises(FileNotFoundError, match="calibrate fasa"):
        FASA(fcs="/nonexistent/fcs.pt")


# ------------------------------------------------------------------------------------------- calibration

def test_fc_agreement_finds_planted_frequency_chunk():
    from tokprune.methods.fasa import fc_agreement

    heads, n_q, n_tokens, d = 2, 8, 64, 16
    q = torch.randn(heads, n_q, d) * 0.01
    k = torch.randn(1, n_tokens, d) * 0.01
    q[:, :, [5, 13]] = torch.randn(heads, n_q, 2) * 5  # pair 5 = dims (5, 13) carries the logits
    k[:, :, [5, 13]] = torch.randn(1, n_tokens, 2) * 5
    agree = fc_agreement(q, k, topk=8)
    assert agree.shape == (8, heads)
    assert bool((agree.argmax(0) == 5).all()) and float(agree[5].min()) > 0.9


@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_calibration_roundtrip_and_fasa_loads_it(tmp_path, suffix):
    from tokprune.methods import FASA, FCCalibration

    ranking = torch.stack([torch.randperm(8) for _ in range(6)]).view(3, 2, 8)
    cal = FCCalibration(ranking, torch.rand(3, 2, 8), head_dim=16, meta={"text": "x"})
    path = tmp_path / f"fcs{suffix}"
    cal.save(path)
    policy = FASA(fcs=str(path), num_fcs=3)
    assert policy.fc_index(2, 2, 16, "cpu").tolist() == ranking[2, :, :3].tolist()
    with pytest.raises(ValueError, match="head_dim"):
        policy.fc_index(0, 2, 32, "cpu")
    with pytest.raises(ValueError, match="not a FASA calibration"):
        FCCalibration.load({"ranking": [1]})


def test_sparse_decode_reads_strided_cache_views_in_place():
    """The torch path gathers rows from a view of a preallocated buffer (capacity > length, a storage offset,
    batch 1 / one KV head) without copying the cache; a layout whose strides do not allow it falls back."""
    from tokprune.ops.fasa import _row_gather
    from tokprune.reference.fasa import sparse_decode_attention_reference

    for shape, length in [((2, 3, 100, 16), None), ((1, 3, 100, 16), 70), ((2, 1, 100, 16), 33), ((3, 2, 64, 16), 50)]:
        buf = torch.randn(*shape)
        k = (buf if length is None else buf[:, :, :length])[-2:] if shape[0] == 3 else \
            (buf if length is None else buf[:, :, :length])
        idx = torch.randint(0, k.shape[2], (k.shape[0], k.shape[1], 9))
        assert torch.equal(_row_gather(k, idx), torch.gather(k, 2, idx[..., None].expand(-1, -1, -1, 16))), shape
    moved = torch.randn(2, 50, 3, 16).transpose(1, 2)  # (B, Hkv, T, D) with tokens outermost: fallback
    idx = torch.randint(0, 50, (2, 3, 7))
    assert torch.equal(_row_gather(moved, idx), torch.gather(moved, 2, idx[..., None].expand(-1, -1, -1, 16)))
    kbuf, vbuf = torch.randn(2, 2, 96, 16), torch.randn(2, 2, 96, 16)
    q = torch.randn(2, 4, 1, 16)
    k, v = kbuf[:, :, :61], vbuf[:, :, :61]
    index = torch.randint(-1, 61, (2, 4, 12))
    assert_close(sparse_decode_attention(q, k, v, index, 0.25, backend="torch"),
                 sparse_decode_attention_reference(q, k, v, index, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sparse_decode_unpadded_fast_path_equals_masked_path(dtype, index_dtype):
    """padded=False (no -1 entries promised; one SDPA over the gathered rows) equals the masked torch path and
    the oracle, on a strided view of a preallocated buffer with unsorted indices and duplicates."""
    from tokprune.reference.fasa import sparse_decode_attention_reference

    kbuf, vbuf = torch.randn(2, 3, 120, 24).to(dtype), torch.randn(2, 3, 120, 24).to(dtype)
    k, v = kbuf[:, :, :101], vbuf[:, :, :101]
    q = torch.randn(2, 9, 1, 24).to(dtype)
    index = torch.randint(0, 101, (2, 3, 33)).to(index_dtype)
    fast = sparse_decode_attention(q, k, v, index, 0.2, backend="torch", padded=False)
    masked = sparse_decode_attention(q, k, v, index, 0.2, backend="torch")
    assert fast.dtype == dtype and fast.shape == q.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    assert_close(fast.double(), masked.double(), atol=tol, rtol=tol, name="unpadded vs masked")
    assert_close(fast.double(), sparse_decode_attention_reference(q.double(), k.double(), v.double(), index, 0.2),
                 atol=tol, rtol=tol, name="unpadded vs oracle")
    empty = sparse_decode_attention(q, k, v, index[..., :0], 0.2, padded=False)
    assert bool((empty == 0).all())


def test_select_without_valid_leaves_scores_untouched_and_forces_sink_window():
    scores = torch.randn(2, 3, 50)
    before = scores.clone()
    index = select_sparse_indices(scores, 12, sink=3, window=4)
    assert torch.equal(scores, before)  # the forced slots are written into a copy
    for row in index.reshape(-1, 12).tolist():
        assert {0, 1, 2, 46, 47, 48, 49} <= set(row) and row == sorted(row)
