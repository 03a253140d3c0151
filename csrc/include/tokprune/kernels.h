// Argument structs and entry points of the three kernels. Plain C++ (no CUDA or torch types), so the
// binding file compiles with g++ alone. Host implementations live in host_kernels.cpp; CUDA launchers
// in *.cu (present only when the extension was built with nvcc, TOKPRUNE_WITH_CUDA defined).
#pragma once

#include <stdint.h>

namespace tokprune {

struct VerifyArgs {
  int64_t B = 0, N = 0, V = 0;
  const int64_t* tokens = nullptr;   // [B, N] contiguous
  const int32_t* parents = nullptr;  // [B, N] contiguous, -1 = padding (and root)
  // greedy
  const void* logits = nullptr;  // [B, N, V], last dim contiguous
  int dtype = 0;
  int64_t l_sb = 0, l_sn = 0;
  // stochastic
  const float* target = nullptr;  // [B, N, V], last dim contiguous
  int64_t t_sb = 0, t_sn = 0;
  const float* draft = nullptr;
  int64_t d_sb = 0, d_sn = 0;
  const float* uniforms = nullptr;  // [B, N] contiguous
  int rule = 0;
  float* workspace = nullptr;  // [B, 2, V] (CUDA only)
  // outputs
  int64_t* accept_index = nullptr;  // [B, N], -1 padded
  int64_t* accept_len = nullptr;    // [B]
  int64_t* next_token = nullptr;    // [B]
  int32_t* depth = nullptr;         // [B, N] scratch: node depths
  int32_t* max_depth = nullptr;     // [B]
};

struct AttentionArgs {
  int64_t B = 0, H = 0, Hkv = 0, Hi = 0, K = 0, D = 0;
  int dtype = 0;
  float scale = 1.0f;
  const void* q = nullptr;  // [B, H, D] (strides in elements, last dim contiguous)
  int64_t q_sb = 0, q_sh = 0;
  const void* k = nullptr;  // [B, Hkv, T, D]
  int64_t k_sb = 0, k_sh = 0, k_st = 0;
  const void* v = nullptr;
  int64_t v_sb = 0, v_sh = 0, v_st = 0;
  const int32_t* indices = nullptr;  // [B, Hi, K] contiguous, < 0 = padding
  void* out = nullptr;               // [B, H, D] contiguous, dtype of q
  int splits = 1;                    // CUDA split-K
  float* workspace = nullptr;        // [B * H * splits * (D + 2)] (CUDA only)
};

struct TopkArgs {
  int64_t R = 0, N = 0, keep = 0;
  const float* scores = nullptr;  // [R, N] contiguous
  int64_t* out = nullptr;         // [R, keep] contiguous
};

// Fused paged FASA decode (host only): for every (request r, KV head h) unit, the group vote over the packed
// FC side cache, sink + window + top-budget selection, and exact attention over the chosen tokens, K/V read
// in place through the block table. Every cache is addressed with element strides (block, head, token, dim).
struct PagedFasaArgs {
  int64_t R = 0, H = 0, Hkv = 0, D = 0, nd = 0;       // requests, query heads, KV heads, head dim, FC dims
  int64_t budget = 0, sink = 0, window = 0, block_size = 1;
  int dtype = 0;     // q, k, v
  int fc_dtype = 0;  // packed FC side cache
  int out_dtype = 0;
  float scale = 1.0f;       // attention softmax scale
  float vote_scale = 1.0f;  // FASA vote: softmax(vote_scale * q_fc . k_fc)
  const void* q = nullptr;  // [R, H, D], last dim contiguous
  int64_t q_sr = 0, q_sh = 0;
  const void* k = nullptr;  // [blocks, Hkv, block_size, D]
  int64_t k_sb = 0, k_sh = 0, k_st = 0, k_sd = 0;
  const void* v = nullptr;
  int64_t v_sb = 0, v_sh = 0, v_st = 0, v_sd = 0;
  void* fc = nullptr;  // [blocks, Hkv, block_size, nd]; written only for tokens >= pack_from
  int64_t f_sb = 0, f_sh = 0, f_st = 0, f_sd = 0;
  float* fc_scale = nullptr;  // int8 FC keys only: [blocks, Hkv, block_size] per-token scales (value = q * s);
                              // written with fc for tokens >= pack_from
  int64_t s_sb = 0, s_sh = 0, s_st = 0;
  int64_t pack_from = -1;  // >= 0: first write fc[t, i] = k[t, fc_dims[h, i]] for tokens pack_from <= t < seq_len
  const int32_t* fc_dims = nullptr;      // [Hkv, nd] contiguous: the q dimensions of each packed column
  const int32_t* block_table = nullptr;  // [R, max_blocks], row stride bt_sr, entries contiguous
  int64_t bt_sr = 0;
  const int32_t* seq_lens = nullptr;  // [R]
  void* out = nullptr;                // [R, H, D], last dim contiguous
  int64_t o_sr = 0, o_sh = 0;
  int32_t* selected = nullptr;  // optional [R, Hkv, budget] contiguous: chosen logical tokens ascending, -1 padded
  int threads = 1;              // OpenMP threads over the R * Hkv units (results do not depend on it)
};

void verify_greedy_host(const VerifyArgs& a);
void verify_stochastic_host(const VerifyArgs& a);
void sparse_attention_host(const AttentionArgs& a);
void topk_host(const TopkArgs& a);
void paged_fasa_host(const PagedFasaArgs& a);
bool host_has_openmp();

#ifdef TOKPRUNE_WITH_CUDA
// sync: synchronise the stream after the launch and raise kernel faults here (debug mode).
void verify_greedy_cuda(const VerifyArgs& a, void* stream, bool sync);
void verify_stochastic_cuda(const VerifyArgs& a, void* stream, bool sync);
void sparse_attention_cuda(const AttentionArgs& a, void* stream, bool sync);
void topk_cuda(const TopkArgs& a, void* stream, bool sync);
#endif

}  // namespace tokprune
