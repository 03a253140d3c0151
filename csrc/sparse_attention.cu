// Sparse decode attention over a gathered token set: split-K over the selected tokens (one block per
// (split, head, batch), one warp per token, online softmax per warp, warps merged in shared memory),
// then a combine kernel merges the splits. GQA: query head h reads KV head h / (H / Hkv).
#include <stdint.h>

#include "tokprune/attention.h"
#include "tokprune/cuda_utils.cuh"
#include "tokprune/kernels.h"

namespace tokprune {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPerLane = kAttnMaxHeadDim / 32;

template <int DT>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(AttentionArgs a) {
  const int split = blockIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t kvh = h / (a.H / a.Hkv), hi = a.Hi == a.H ? h : kvh;
  const int64_t chunk = (a.K + a.splits - 1) / a.splits;
  const int64_t start = split * chunk, end = start + chunk < a.K ? start + chunk : a.K;

  float q[kPerLane], acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int d = lane + 32 * j;
    q[j] = d < a.D ? load_as_float<DT>(a.q, b * a.q_sb + h * a.q_sh + d) : 0.0f;
    acc[j] = 0.0f;
  }
  SoftmaxState st = softmax_empty();
  const int32_t* idx = a.indices + (b * a.Hi + hi) * a.K;
  for (int64_t j = start + warp; j < end; j += kWarps) {
    const int64_t t = idx[j];
    if (t < 0) continue;  // padding (warp-uniform)
    const int64_t ko = b * a.k_sb + kvh * a.k_sh + t * a.k_st, vo = b * a.v_sb + kvh * a.v_sh + t * a.v_st;
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < a.D) dot += q[i] * load_as_float<DT>(a.k, ko + d);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    float alpha, beta;
    st = softmax_add(st, dot * a.scale, &alpha, &beta);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < a.D) acc[i] = acc[i] * alpha + beta * load_as_float<DT>(a.v, vo + d);
    }
  }
  __shared__ float s_m[kWarps], s_l[kWarps];
  __shared__ float s_acc[kWarps][kAttnMaxHeadDim];
  if (lane == 0) {
    s_m[warp] = st.m;
    s_l[warp] = st.l;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < a.D) s_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float* ws = a.workspace + ((b * a.H + h) * a.splits + split) * (a.D + 2);
  for (int d = threadIdx.x; d < a.D; d += kThreads) {
    SoftmaxState m = softmax_empty();
    float out = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      float ax, ay;
      m = softmax_merge(m, SoftmaxState{s_m[w], s_l[w]}, &ax, &ay);
      out = out * ax + s_acc[w][d] * ay;
    }
    ws[2 + d] = out;
    if (d == 0) {
      ws[0] = m.m;
      ws[1] = m.l;
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) attention_combine_kernel(AttentionArgs a) {
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const float* ws = a.workspace + (b * a.H + h) * a.splits * (a.D + 2);
  for (int d = threadIdx.x; d < a.D; d += kThreads) {
    SoftmaxState m = softmax_empty();
    float out = 0.0f;
    for (int s = 0; s < a.splits; ++s) {
      const float* part = ws + s * (a.D + 2);
      float ax, ay;
      m = softmax_merge(m, SoftmaxState{part[0], part[1]}, &ax, &ay);
      out = out * ax + part[2 + d] * ay;
    }
    store_from_float<DT>(a.out, (b * a.H + h) * a.D + d, softmax_finish(out, m));
  }
}

template <int DT>
void launch(const AttentionArgs& a, cudaStream_t s) {
  attention_split_kernel<DT><<<dim3(unsigned(a.splits), unsigned(a.H), unsigned(a.B)), kThreads, 0, s>>>(a);
  attention_combine_kernel<DT><<<dim3(unsigned(a.H), unsigned(a.B)), kThreads, 0, s>>>(a);
}

}  // namespace

void sparse_attention_cuda(const AttentionArgs& a, void* stream, bool sync) {
  if (a.H > 65535 || a.B > 65535) throw std::invalid_argument("sparse_decode_attention: B and H must be <= 65535");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.dtype == kFloat32) launch<kFloat32>(a, s);
  else if (a.dtype == kFloat16) launch<kFloat16>(a, s);
  else launch<kBFloat16>(a, s);
  check_launch("sparse_decode_attention", s, sync);
}

}  // namespace tokprune
