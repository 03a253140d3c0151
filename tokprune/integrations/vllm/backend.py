"""tokprune's attention backend for vLLM's CPU build: vLLM's own ``CPU_ATTN`` with token-sparse decode.

:class:`TokpruneCPUAttentionBackend` is vLLM's ``CPUAttentionBackend`` with two classes swapped:

* :class:`TokpruneCPUMetadataBuilder` plans each step once for all layers: a request is *sparse* when it
  decodes (one query token) and its context (cached tokens, the new one included) exceeds the budget.
  Every other request (prefill, chunked prefill, short decodes) stays dense. vLLM's own kernel still
  runs over the whole batch, but the scheduler metadata it gets says that each sparse request has a
  context of one token (its first), so the dense kernel does O(1) work for those rows and no dense
  work is done twice; no query or output is copied to split the batch.
* :class:`TokpruneCPUAttentionImpl` is vLLM's impl: vLLM writes K/V into its paged cache with its own
  op (``do_kv_cache_update``, once per token); the impl also writes the method's side cache there
  (FASA: the packed dominant-FC dimensions of each key; Quest: per-page key min/max), and after the
  dense kernel it overwrites the sparse rows' output with the method's attention, computed by the
  paged ops of :mod:`tokprune.ops.paged` straight from vLLM's cache through the block table.

The K/V layout inside vLLM's CPU cache depends on the ISA vLLM picked; the builder checks once at
start-up, with vLLM's own write op, that the layout is the one :func:`tokprune.ops.paged.vllm_cpu_kv_views`
reads, and fails otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from tokprune.integrations.vllm.config import (
    TokpruneConfigError,
    VllmSettings,
    check_model,
    load_fc_index,
    model_geometry,
    parse_settings,
)
from tokprune.ops.paged import (default_fc_dtype, fused_fasa_available, paged_fasa_decoder,
                                paged_sparse_decode_attention, vllm_cpu_kv_views)
from tokprune.reference.fasa import fc_dims

logger = init_logger("vllm.tokprune")  # a child of vLLM's logger, so vLLM's handlers print it


@dataclass
class SparsePlan:
    """The sparse requests of one step (shared by every layer), all CPU int64.

    Attributes:
        rows: ``(Rs,)`` request indices in the batch.
        tokens: ``(Rs,)`` index of each request's query token in the flattened ``(T, ...)`` query.
        seq_lens: ``(Rs,)`` true context lengths (the dense metadata says 1 for these rows).
        block_table: ``(Rs, ceil(max_len / block_size))`` block table rows.
        max_len: ``max(seq_lens)``.
        blk, off: ``(Rs, n)`` physical block and offset of logical token ``t`` (FASA: every ``t < n =
            n_blocks * block_size``; StreamingLLM: the ``n = budget`` sink and recent tokens).
        score_bias: FASA only: ``(Hkv * Rs, 1, n)`` fp32, 0 inside a request's context and ``-inf`` past it
            (added to the partial logits).
        keep_bias: FASA only: ``(Rs, n)`` fp32, ``+inf`` on the sink and window tokens (forced), ``-inf`` past
            the context, 0 elsewhere (added to the votes).
    """

    rows: torch.Tensor
    tokens: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_len: int
    blk: Optional[torch.Tensor] = None
    off: Optional[torch.Tensor] = None
    score_bias: Optional[torch.Tensor] = None
    keep_bias: Optional[torch.Tensor] = None
    table32: Optional[torch.Tensor] = None
    lens32: Optional[torch.Tensor] = None
    token_start: Optional[int] = None


@functools.lru_cache(maxsize=1)
def _warn_no_fused(reason: str) -> None:
    logger.warning("tokprune: the fused FASA decode kernel (tokprune._C) is not available (%s); FASA's sparse rows "
                   "run as torch ops, which is slower than vLLM's dense attention on this CPU", reason)


@dataclass
class SideWrite:
    """Where this step's new keys go in a FASA side cache (shared by every layer): ``keep`` ``(T',)`` indices
    of the tokens with a slot (``None``: all of them), and their physical ``blk``, ``off`` ``(T',)``."""

    keep: Optional[torch.Tensor]
    blk: torch.Tensor
    off: torch.Tensor


def plan_side_write(slot_mapping: torch.Tensor, block_size: int) -> SideWrite:
    """:class:`SideWrite` of a step from vLLM's ``slot_mapping`` (``-1`` = no slot)."""
    slots = slot_mapping.long()
    valid = slots >= 0
    keep = None
    if not bool(valid.all()):
        keep = valid.nonzero().squeeze(1)
        slots = slots.index_select(0, keep)
    return SideWrite(keep, slots // block_size, slots % block_size)


def plan_sparse_rows(common, settings: VllmSettings, block_size: int, kv_heads: int) -> Optional[SparsePlan]:
    """The step's :class:`SparsePlan` from vLLM's ``CommonAttentionMetadata``; ``None`` when no request decodes
    past the budget. Reads ``query_start_loc_cpu`` and ``seq_lens`` on the host (once per step, not per
    layer); the plan's tensors live on the block table's device."""
    n = common.num_reqs
    device = common.block_table_tensor.device
    loc = common.query_start_loc_cpu[: n + 1].long()
    seq_lens = common.seq_lens[:n].to("cpu", torch.long)
    sparse = ((loc[1:] - loc[:-1]) == 1) & (seq_lens > settings.sparse_after)
    if not bool(sparse.any()):
        return None
    rows = sparse.nonzero().squeeze(1)
    lens = seq_lens.index_select(0, rows)
    max_len = int(lens.max())
    n_blocks = -(-max_len // block_size)
    table = common.block_table_tensor.index_select(0, rows.to(device))[:, :n_blocks].long()
    lens = lens.to(device)
    used = torch.arange(n_blocks, device=device)[None, :] * block_size < lens[:, None]
    table = torch.where(used, table, torch.zeros_like(table))  # entries past a request's blocks: block 0
    tokens = loc.index_select(0, rows)
    plan = SparsePlan(rows.to(device), tokens.to(device), lens, table, max_len)
    if settings.method == "fasa" and fused_fasa_available(device):
        # the fused kernel needs only the table, the lengths and where the query / output rows are
        plan.table32 = table.to(torch.int32).contiguous()
        plan.lens32 = lens.to(torch.int32)
        first = int(tokens[0])
        if bool((tokens == torch.arange(first, first + tokens.numel())).all()):
            plan.token_start = first
        return plan
    if settings.method == "streaming":
        budget, sink = settings.budget, settings.sink
        j = torch.arange(budget, device=device)
        token = torch.where(j < sink, j, lens[:, None] - budget + j)  # (Rs, budget): sinks, then the newest
        plan.blk, plan.off = torch.gather(table, 1, token // block_size), token % block_size
    elif settings.method == "fasa":
        pos = torch.arange(n_blocks * block_size, device=device)[None, :]
        plan.blk = table.repeat_interleave(block_size, dim=1)  # (Rs, n)
        plan.off = (pos % block_size).expand_as(plan.blk)
        inside = pos < lens[:, None]
        window = min(settings.window, settings.budget - settings.sink)
        forced = inside & ((pos < settings.sink) | (pos >= lens[:, None] - window))
        zero = torch.zeros((), device=device)
        bias = torch.where(inside, zero, zero - torch.inf)  # (Rs, n)
        plan.score_bias = bias[None].expand(kv_heads, -1, -1).reshape(-1, 1, bias.shape[1])
        plan.keep_bias = torch.where(forced, zero + torch.inf, bias)
    return plan


def dense_rows_only(common, plan: SparsePlan):
    """A copy of vLLM's ``CommonAttentionMetadata`` in which each sparse request has a context of one token:
    the dense kernel then does O(1) work for it (its output row is overwritten by the sparse path)."""
    dense_lens = common.seq_lens.clone()
    dense_lens[plan.rows.to(dense_lens.device)] = 1
    return dataclasses.replace(common, seq_lens=dense_lens, max_seq_len=int(dense_lens.max()))


@dataclass
class TokpruneCPUMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata (with the sparse rows' ``seq_lens`` set to 1) plus the step's :class:`SparsePlan`."""

    sparse: Optional[SparsePlan] = None
    side_write: Optional[SideWrite] = None


def _settings_from_config(vllm_config) -> Optional[VllmSettings]:
    if vllm_config is None:
        return None
    return parse_settings(getattr(vllm_config, "additional_config", None))


def check_cpu_layout(isa: str, dtype: torch.dtype, head_dim: int, block_size: int) -> None:
    """Write two tokens with vLLM's own CPU cache-write op and check that
    :func:`tokprune.ops.paged.vllm_cpu_kv_views` reads them back bit-exactly.

    Raises:
        TokpruneConfigError: the layout of vLLM's cache for this ISA is not the one tokprune reads.
    """
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(0)
    kv_cache = torch.zeros(2, 1, block_size, 2 * head_dim, dtype=dtype)
    key = torch.randn(2, 1, head_dim, generator=gen).to(dtype)
    value = torch.randn(2, 1, head_dim, generator=gen).to(dtype)
    slots = torch.tensor([1, block_size + block_size - 1], dtype=torch.long)
    view = kv_cache.view(2, 1, 2 * block_size, head_dim)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    k_view, v_view = vllm_cpu_kv_views(kv_cache, head_dim)
    blk, off = slots // block_size, slots % block_size
    if not (torch.equal(k_view[blk, 0, off], key[:, 0]) and torch.equal(v_view[blk, 0, off], value[:, 0])):
        raise TokpruneConfigError(f"tokprune: vLLM's CPU KV-cache layout for ISA {isa!r} (dtype {dtype}, head size "
                                  f"{head_dim}, block size {block_size}) is not the one tokprune reads; "
                                  "serve without additional_config['tokprune'] on this machine")


class TokpruneCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder that also plans the sparse decode rows of each step."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.settings = _settings_from_config(vllm_config)
        self.active = (self.settings is not None and not self.is_cross_attention
                       and not self.is_encoder_only_attention and self.window_size == -1
                       and self.kv_cache_dtype == "auto")
        if self.settings is not None and not self.active:
            logger.warning("tokprune: layers %s keep vLLM's dense attention (cross/encoder attention, sliding "
                           "window or quantised KV cache)", layer_names[:2])
        if self.active:
            # Start-up checks (before any request): the model, the calibration, the cache layout.
            check_model(self.settings, vllm_config.model_config.hf_config, dtype=self.dtype,
                        block_size=self.block_size)
            check_cpu_layout(self.isa, self.dtype, self.head_dim, self.block_size)
            logger.info("tokprune: %s budget=%d serves %d attention layers (ISA %s, block size %d)",
                        self.settings.method, self.settings.budget, len(layer_names), self.isa, self.block_size)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        plan = side_write = None
        if self.active:
            plan = plan_sparse_rows(common_attn_metadata, self.settings, self.block_size, self.num_kv_heads)
            if self.settings.method == "fasa":
                side_write = plan_side_write(common_attn_metadata.slot_mapping[:common_attn_metadata.num_actual_tokens],
                                             self.block_size)
        if plan is not None:
            common_attn_metadata = dense_rows_only(common_attn_metadata, plan)
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return TokpruneCPUMetadata(**fields, sparse=plan, side_write=side_write)


@functools.lru_cache(maxsize=8)
def _fc_table(settings: VllmSettings, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    return load_fc_index(settings, layers, kv_heads, head_dim)


def _layer_index(layer_name: str) -> int:
    digits = [int(part) for part in layer_name.split(".") if part.isdigit()]
    if not digits:
        raise TokpruneConfigError(f"tokprune: cannot find a layer index in the attention layer name {layer_name!r}")
    return digits[-1] if len(digits) == 1 else digits[0]


class SparseDecodeMixin:
    """The method's side caches and sparse decode rows, shared by tokprune's CPU and CUDA impls.

    A subclass mixes this before vLLM's impl class, calls :meth:`_init_sparse` after vLLM's ``__init__``,
    defines ``_kv_views(kv_cache) -> (k, v)`` (``(num_blocks, Hkv, block_size, D)`` views) and
    ``_ops_backend`` (the tokprune backend of the paged ops), and calls :meth:`_sparse_step` after vLLM's
    dense attention in ``forward``.

    The FASA path is a handful of large torch ops per layer (index tensors are planned once per step by
    the metadata builder): one gather of the requests' blocks of the packed FC side cache, one batched
    matmul for the partial logits, FASA's vote, ``topk``, one gather of the chosen K and V rows and the
    exact attention over them.
    """

    _ops_backend: Optional[str] = None

    def _init_sparse(self, supported: bool) -> None:
        vllm_config = get_current_vllm_config_or_none()
        self.settings = _settings_from_config(vllm_config)
        self.active = self.settings is not None and supported
        self._geometry = None
        if self.active and self.settings.method == "fasa":
            self._geometry = model_geometry(vllm_config.model_config.hf_config)
        self._fc_index: Optional[torch.Tensor] = None
        self._side: Optional[torch.Tensor] = None  # FASA: packed FC keys; Quest: per-page (min, max)
        self._fasa_decoder = None  # (key, tokprune.ops.paged.PagedFasaDecoder) of the fused FASA step
        self._side_blocks = 0

    def _kv_views(self, kv_cache: torch.Tensor):
        raise NotImplementedError

    # -- side caches -----------------------------------------------------------------------------------
    def _side_cache(self, layer, num_blocks: int, kv_heads: int, block_size: int, like: torch.Tensor) -> torch.Tensor:
        if self._side is not None and self._side_blocks == num_blocks:
            return self._side
        self._side_blocks = num_blocks
        s = self.settings
        if s.method == "fasa":
            geo = self._geometry
            table = _fc_table(s, geo["layers"], geo["kv_heads"], geo["head_dim"])
            self._fc_index = table[_layer_index(layer.layer_name)].to(like.device)
            self._fc_dims = fc_dims(self._fc_index, self.head_size, s.chunk).to(like.device)  # (Hkv, nd)
            nd = self._fc_dims.shape[1]
            # q (Hkv, ., D) @ _q_sel (Hkv, D, nd) = the FC dimensions of q, times FASA's 1/sqrt(D)
            self._q_sel = torch.zeros(kv_heads, self.head_size, nd, device=like.device)
            self._q_sel.scatter_(1, self._fc_dims[:, None, :], self.head_size ** -0.5)
            if fused_fasa_available(like.device):
                # (Hkv, blocks, nd, block_size): each block's FC keys dimension-major, so the fused kernel's
                # partial logits vectorise over tokens; ``_side`` is the (blocks, Hkv, block_size, nd) view, the
                # layout of tokprune.ops.paged. bf16 (fp16 for an fp16 model): half the bytes of fp32 per vote,
                # as FASA's packed keys on tokprune's cache (``FASA.score_dtype``).
                dtype = getattr(torch, s.score_dtype) if s.score_dtype else default_fc_dtype(like.dtype)
                self._side_hm = torch.zeros(kv_heads, num_blocks, nd, block_size, dtype=dtype, device=like.device)
                self._side = self._side_hm.permute(1, 0, 3, 2)
            else:
                # fp32, head-major (Hkv, blocks, block_size, nd): a request's FC keys gather into one contiguous
                # (Hkv, blocks * block_size, nd) matrix per KV head (the torch path, :meth:`_fasa_tokens`).
                self._side_hm = torch.zeros(kv_heads, num_blocks, block_size, nd,
                                            dtype=getattr(torch, s.score_dtype or "float32"),
                                            device=like.device)
                self._side = self._side_hm.permute(1, 0, 2, 3)
        else:  # quest: (pages, kv_heads, 2, head_dim) min and max of the keys of each page of page_size tokens
            pages = num_blocks * block_size // s.page_size
            self._side = torch.zeros(pages, kv_heads, 2, self.head_size, dtype=like.dtype, device=like.device)
        return self._side

    def _write_quest_bounds(self, side, key, slot_mapping):
        ps = self.settings.page_size
        keep = (slot_mapping >= 0).nonzero().squeeze(1)
        slots = slot_mapping.long().index_select(0, keep)
        k = key.index_select(0, keep).to(side.dtype)  # (T', Hkv, D)
        page = slots // ps
        first = (slots % ps) == 0  # a page's first token resets its bounds (blocks are reused)
        side[page[first], :, 0] = k[first]
        side[page[first], :, 1] = k[first]
        index = page[:, None, None].expand_as(k)
        side[:, :, 0].scatter_reduce_(0, index, k, "amin")
        side[:, :, 1].scatter_reduce_(0, index, k, "amax")

    def _write_side(self, layer, key, kv_cache, attn_metadata) -> None:
        """The method's side cache for the tokens vLLM just wrote (FASA: packed FC keys, ``side[h, blk, off] =
        key[t, h, dims(h)]`` as :func:`tokprune.ops.paged.write_paged_fc_keys`; Quest: page bounds)."""
        if not self.active or self.settings.method == "streaming" or key is None:
            return
        k_view, _ = self._kv_views(kv_cache)
        num_blocks, kv_heads, block_size, _ = k_view.shape
        side = self._side_cache(layer, num_blocks, kv_heads, block_size, k_view)
        slot_mapping = attn_metadata.slot_mapping[: attn_metadata.num_actual_tokens]
        key = key[: slot_mapping.shape[0]]
        if self.settings.method == "quest":
            self._write_quest_bounds(side, key, slot_mapping)
            return
        where = getattr(attn_metadata, "side_write", None) or plan_side_write(slot_mapping, block_size)
        if where.keep is not None:
            key = key.index_select(0, where.keep)
        packed = torch.gather(key, 2, self._fc_dims[None].expand(key.shape[0], -1, -1))  # (T, Hkv, nd)
        self._side[where.blk, :, where.off] = packed.to(self._side.dtype)  # (T, Hkv, nd) into either layout

    # -- attention -------------------------------------------------------------------------------------
    def _quest_slots(self, q, plan: SparsePlan, block_size: int) -> torch.Tensor:
        from tokprune.ops import select_sparse_indices

        s = self.settings
        ps = s.page_size
        per_block = block_size // ps
        rows, heads, head_dim = q.shape
        n_pages = -(-plan.max_len // ps)
        j = torch.arange(n_pages, device=q.device)
        phys = plan.block_table[:, j // per_block] * per_block + j % per_block  # (Rs, P) physical page ids
        bounds = self._side[phys]  # (Rs, P, Hkv, 2, D)
        group = heads // self.num_kv_heads
        lo = bounds[:, :, :, 0].float().repeat_interleave(group, dim=2)  # (Rs, P, Hq, D)
        hi = bounds[:, :, :, 1].float().repeat_interleave(group, dim=2)
        qf = q.float()[:, None]
        bound = torch.maximum(qf * lo, qf * hi).sum(-1).transpose(1, 2)  # (Rs, Hq, P)
        page_lens = -(-plan.seq_lens // ps)
        valid = j[None, :] < page_lens[:, None]
        pages = select_sparse_indices(bound.masked_fill(~valid[:, None, :], 0.0), max(1, s.budget // ps),
                                      sink=0, window=1, valid=valid)  # (Rs, Hq, kp), -1 padded
        token = pages[..., None] * ps + torch.arange(ps, device=q.device)  # (Rs, Hq, kp, ps)
        ok = (pages[..., None] >= 0) & (token < plan.seq_lens[:, None, None, None])
        token = token.clamp_min(0)
        blk = torch.gather(plan.block_table, 1, (token // block_size).reshape(rows, -1)).view_as(token)
        slots = torch.where(ok, blk * block_size + token % block_size, torch.full_like(token, -1))
        return slots.reshape(rows, heads, -1)

    def _fasa_tokens(self, qh, plan: SparsePlan) -> torch.Tensor:
        """FASA's choice per KV head and sparse request: ``(Hkv, Rs, budget)`` logical token ids (unordered).

        ``qh (Hkv, Rs, g, D)`` fp32 queries. Partial logits from the packed FC keys, FASA's group vote (sum
        over the group's query heads of each head's softmax), sink and window forced, top-``budget``."""
        kv_heads, rows, group, head_dim = qh.shape
        keys = self._side_hm[:, plan.block_table]  # (Hkv, Rs, nb, bs, nd)
        keys = keys.view(kv_heads * rows, -1, keys.shape[-1]).float()  # (Hkv*Rs, n, nd)
        q_fc = torch.matmul(qh.view(kv_heads, rows * group, head_dim), self._q_sel)  # (Hkv, Rs*g, nd)
        logits = torch.baddbmm(plan.score_bias, q_fc.view(kv_heads * rows, group, -1), keys.transpose(1, 2))
        votes = torch.softmax(logits, dim=-1).sum(1).view(kv_heads, rows, -1)  # (Hkv, Rs, n)
        votes += plan.keep_bias
        return votes.topk(self.settings.budget, dim=-1, sorted=False).indices

    def _attend(self, qh, k_view, v_view, blk, off) -> torch.Tensor:
        """Exact attention of ``qh (Hkv, Rs, g, D)`` fp32 over the cached rows ``(blk, off)``
        ``(Hkv or 1, Rs, K)`` of each KV head, read in place from the paged views; ``(Hkv, Rs, g, D)`` fp32."""
        kv_heads, rows, group, head_dim = qh.shape
        head = torch.arange(kv_heads, device=qh.device)[:, None, None]
        k = k_view[blk, head, off].float().view(kv_heads * rows, -1, head_dim)  # (Hkv*Rs, K, D)
        v = v_view[blk, head, off].float().view(kv_heads * rows, -1, head_dim)
        q3 = qh.reshape(kv_heads * rows, group, head_dim)
        logits = torch.baddbmm(q3.new_empty(()), q3, k.transpose(1, 2), beta=0.0, alpha=self.scale)
        return torch.bmm(torch.softmax(logits, dim=-1), v).view(kv_heads, rows, group, head_dim)

    def _sparse_step(self, layer, query, key, kv_cache, attn_metadata, output) -> None:
        """After vLLM's dense attention: write the side cache for this step's keys, then overwrite the output of
        the step's sparse rows (``output (T, Hq, D)``) with the method's attention."""
        if not self.active or attn_metadata is None:
            return
        self._write_side(layer, key, kv_cache, attn_metadata)
        plan = getattr(attn_metadata, "sparse", None)
        if plan is None:
            return
        method = self.settings.method
        if self._side is None and method != "streaming":
            raise RuntimeError("tokprune: the side cache was never written")
        k_view, v_view = self._kv_views(kv_cache)
        if method == "fasa" and plan.table32 is not None:
            self._fused_fasa(query, k_view, v_view, plan, output)
            return
        if method == "fasa" and query.device.type == "cpu":
            from tokprune._backend import unavailable_reason

            _warn_no_fused(unavailable_reason("cuda", query.device, "paged_fasa_decode") or "disabled")
        q = query.index_select(0, plan.tokens)  # (Rs, Hq, D)
        if method == "quest":
            slots = self._quest_slots(q, plan, k_view.shape[2])
            out = paged_sparse_decode_attention(q, k_view, v_view, slots, self.scale, backend=self._ops_backend)
        else:
            rows, heads, head_dim = q.shape
            kv_heads = self.num_kv_heads
            qh = q.view(rows, kv_heads, heads // kv_heads, head_dim).transpose(0, 1).float().contiguous()  # (Hkv, Rs, g, D)
            if method == "fasa":
                token = self._fasa_tokens(qh, plan)  # (Hkv, Rs, K)
                blk, off = torch.gather(plan.blk[None].expand(kv_heads, -1, -1), 2, token), \
                    torch.gather(plan.off[None].expand(kv_heads, -1, -1), 2, token)
            else:  # streaming: the same tokens for every head
                blk, off = plan.blk[None], plan.off[None]
            out = self._attend(qh, k_view, v_view, blk, off).transpose(0, 1).reshape(rows, heads, head_dim)
        output.view(-1, self.num_heads, self.head_size)[plan.tokens] = out.to(output.dtype)

    def _fused_fasa(self, query, k_view, v_view, plan: SparsePlan, output) -> None:
        """FASA's sparse rows in one call of the fused host kernel (vote from the packed FC side cache, sink +
        window + top-budget, exact attention read in place from vLLM's cache), writing the output rows in
        place when the sparse rows' query tokens are contiguous (a decode-only batch). The layer's
        :func:`tokprune.ops.paged.paged_fasa_decoder` is bound once (rebuilt if the caches move or the thread
        count changes), so a step costs a few field writes of Python."""
        threads = torch.get_num_threads()
        key = (k_view.data_ptr(), v_view.data_ptr(), self._side.data_ptr(), k_view.shape[0], threads, query.dtype,
               output.dtype)
        if self._fasa_decoder is None or self._fasa_decoder[0] != key:
            s = self.settings
            decoder = paged_fasa_decoder(k_view, v_view, self._side, self._fc_dims, s.budget, s.sink, s.window,
                                         self.scale, heads=self.num_heads, out_dtype=output.dtype,
                                         vote_scale=self.head_size ** -0.5, num_threads=threads)
            self._fasa_decoder = (key, decoder)
        decoder = self._fasa_decoder[1]
        out3 = output.view(-1, self.num_heads, self.head_size)
        rows = plan.tokens.shape[0]
        if plan.token_start is not None:
            start = plan.token_start
            decoder(query[start:start + rows], plan.table32, plan.lens32, out=out3[start:start + rows])
        else:
            out3[plan.tokens] = decoder(query.index_select(0, plan.tokens), plan.table32, plan.lens32)


class TokpruneCPUAttentionImpl(SparseDecodeMixin, CPUAttentionBackendImpl):
    """vLLM's CPU attention impl plus tokprune's side caches and sparse decode rows."""

    _ops_backend = "torch"

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self._init_sparse(attn_type == AttentionType.DECODER and self.sliding_window == -1
                          and self.alibi_slopes is None and not self.logits_soft_cap and self.sinks is None
                          and not self.is_fp8_kv_cache and kv_sharing_target_layer_name is None)

    def _kv_views(self, kv_cache):
        return vllm_cpu_kv_views(kv_cache, self.head_size)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """vLLM's dense CPU attention for all rows (sparse rows read one token there), then tokprune's side
        cache write and sparse rows. Shapes as in vLLM: ``query (T, Hq, D)``, ``key (T, Hkv, D)``,
        ``output (T, Hq, D)``; vLLM wrote ``key``/``value`` into ``kv_cache`` before (``do_kv_cache_update``)."""
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        self._sparse_step(layer, query, key, kv_cache, attn_metadata, output)
        return output


class TokpruneCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's ``CPU_ATTN`` backend with tokprune's metadata builder and impl (same name, layout and kernels)."""

    @staticmethod
    def get_impl_cls():
        return TokpruneCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TokpruneCPUMetadataBuilder
