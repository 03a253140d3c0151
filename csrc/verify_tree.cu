// Speculative tree verification on the GPU: one thread block per request. Argmax, sums and the
// bonus-token cumsum are block reductions/scans over V in fixed order, so results are deterministic.
// Semantics: include/tokprune/verify.h and the contract in the docstring of tokprune.ops.spec.
#include <stdint.h>

#include "tokprune/cuda_utils.cuh"
#include "tokprune/kernels.h"
#include "tokprune/verify.h"

namespace tokprune {
namespace {

constexpr int kThreads = 256;
constexpr int kScanItems = 8;  // elements per thread per chunk of the bonus-token scan
constexpr int64_t kNone = INT64_MAX;

struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(const ArgMax& x, const ArgMax& y) const { return argmax_combine(x, y); }
};

union SharedTemp {
  cub::BlockReduce<ArgMax, kThreads>::TempStorage argmax;
  cub::BlockReduce<int64_t, kThreads>::TempStorage index;
  cub::BlockReduce<double, kThreads>::TempStorage sum;
  cub::BlockScan<double, kThreads>::TempStorage scan;
};

struct Shared {
  SharedTemp tmp;
  ArgMax argmax;
  int64_t index;
  double sum;
  int flag;
};

// Node depths (thread 0, nodes in topological order), -1 paths and the request's max depth.
__device__ void init_request(const VerifyArgs& a, int64_t b, Shared& sh) {
  const int32_t* parents = a.parents + b * a.N;
  int32_t* depth = a.depth + b * a.N;
  int64_t* path = a.accept_index + b * a.N;
  for (int64_t i = threadIdx.x; i < a.N; i += kThreads) path[i] = i == 0 ? 0 : -1;
  if (threadIdx.x == 0) {
    int best = 0;
    for (int64_t i = 0; i < a.N; ++i) {
      int p = parents[i];
      depth[i] = node_depth(int(i), p, (p >= 0 && p < i) ? depth[p] : -1);
      best = depth[i] > best ? depth[i] : best;
    }
    a.max_depth[b] = best;
  }
  __syncthreads();
}

// Smallest active child c > after of cur (with tokens[c] == token unless token < 0); -1 if none.
__device__ int64_t next_child(const VerifyArgs& a, int64_t b, int64_t cur, int64_t after, int64_t token, Shared& sh) {
  const int32_t* parents = a.parents + b * a.N;
  const int32_t* depth = a.depth + b * a.N;
  const int64_t* tokens = a.tokens + b * a.N;
  int64_t best = kNone;
  for (int64_t c = after + 1 + threadIdx.x; c < a.N; c += kThreads)
    if (parents[c] == cur && depth[c] >= 0 && (token < 0 || tokens[c] == token)) {
      best = c;  // strided scan: the first hit of this thread is its smallest
      break;
    }
  best = block_allreduce<int64_t, kThreads>(best, MinOp(), sh.tmp.index, &sh.index);
  return best == kNone ? -1 : best;
}

__device__ double block_sum(double v, Shared& sh) { return block_allreduce<double, kThreads>(v, SumOp(), sh.tmp.sum, &sh.sum); }

template <int DT>
__global__ void __launch_bounds__(kThreads) verify_greedy_kernel(VerifyArgs a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  init_request(a, b, sh);
  int64_t* path = a.accept_index + b * a.N;
  int64_t cur = 0, len = 0;
  while (true) {
    const void* row = static_cast<const char*>(a.logits) + (b * a.l_sb + cur * a.l_sn) * (DT == kFloat32 ? 4 : 2);
    ArgMax best{-INFINITY, kNone};
    for (int64_t v = threadIdx.x; v < a.V; v += kThreads) best = argmax_combine(best, ArgMax{load_as_float<DT>(row, v), v});
    best = block_allreduce<ArgMax, kThreads>(best, ArgMaxOp(), sh.tmp.argmax, &sh.argmax);
    int64_t hit = next_child(a, b, cur, cur, best.index, sh);
    if (hit < 0) {
      if (threadIdx.x == 0) a.next_token[b] = best.index;
      break;
    }
    ++len;
    if (threadIdx.x == 0) path[len] = hit;
    cur = hit;
  }
  if (threadIdx.x == 0) a.accept_len[b] = len;
}

__global__ void __launch_bounds__(kThreads, 1) verify_stochastic_kernel(VerifyArgs a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const int64_t V = a.V;
  init_request(a, b, sh);
  int64_t* path = a.accept_index + b * a.N;
  const float* u = a.uniforms + b * a.N;
  const int64_t* tokens = a.tokens + b * a.N;
  float* p = a.workspace + b * 2 * V;
  float* q = p + V;
  int64_t cur = 0, len = 0;
  while (true) {
    const float* tp = a.target + b * a.t_sb + cur * a.t_sn;
    const float* dp = a.draft + b * a.d_sb + cur * a.d_sn;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      p[v] = tp[v];
      q[v] = dp[v];
    }
    __syncthreads();
    int64_t accepted = -1;
    for (int64_t c = next_child(a, b, cur, cur, -1, sh); c >= 0; c = next_child(a, b, cur, c, -1, sh)) {
      const int64_t x = tokens[c];
      if (spec_accept(a.rule, u[c], p[x], q[x])) {  // every thread evaluates the same test
        accepted = c;
        break;
      }
      if (a.rule == kTargetOnly) {
        __syncthreads();
        if (threadIdx.x == 0) p[x] = 0.0f;
        __syncthreads();
        double s = 0.0;
        for (int64_t v = threadIdx.x; v < V; v += kThreads) s += p[v];
        const float sf = float(block_sum(s, sh));
        if (sf > 0.0f)
          for (int64_t v = threadIdx.x; v < V; v += kThreads) p[v] = p[v] / sf;
      } else {
        double s = 0.0;
        for (int64_t v = threadIdx.x; v < V; v += kThreads) s += residual(p[v], q[v]);
        const float sf = float(block_sum(s, sh));
        if (sf > 0.0f)
          for (int64_t v = threadIdx.x; v < V; v += kThreads) p[v] = residual(p[v], q[v]) / sf;
        if (a.rule == kRSD) {
          __syncthreads();
          if (threadIdx.x == 0) q[x] = 0.0f;
          __syncthreads();
          double sq = 0.0;
          for (int64_t v = threadIdx.x; v < V; v += kThreads) sq += q[v];
          const float sqf = float(block_sum(sq, sh));
          if (sqf > 0.0f)
            for (int64_t v = threadIdx.x; v < V; v += kThreads) q[v] = q[v] / sqf;
        }
      }
      __syncthreads();
    }
    if (accepted < 0) break;
    ++len;
    if (threadIdx.x == 0) path[len] = accepted;
    cur = accepted;
    __syncthreads();  // p/q are reloaded for the new node
  }
  if (threadIdx.x == 0) a.accept_len[b] = len;
  // Bonus token: smallest v with cumsum(p)[v] > u[0] * sum(p); else the last v with p[v] > 0.
  double total = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) total += p[v];
  const float threshold = u[0] * float(block_sum(total, sh));
  double carry = 0.0;
  int64_t last_positive = -1, found = kNone;
  for (int64_t base = 0; base < V; base += int64_t(kThreads) * kScanItems) {
    const int64_t first = base + int64_t(threadIdx.x) * kScanItems;
    float vals[kScanItems];
    double local = 0.0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      vals[j] = first + j < V ? p[first + j] : 0.0f;
      local += vals[j];
      if (vals[j] > 0.0f) last_positive = first + j;
    }
    double before, chunk_total;
    cub::BlockScan<double, kThreads>(sh.tmp.scan).ExclusiveSum(local, before, chunk_total);
    __syncthreads();
    double cum = carry + before;
    int64_t hit = kNone;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      cum += vals[j];
      if (hit == kNone && first + j < V && bonus_hit(cum, threshold)) hit = first + j;
    }
    found = block_allreduce<int64_t, kThreads>(hit, MinOp(), sh.tmp.index, &sh.index);
    if (found != kNone) break;
    carry += chunk_total;
  }
  if (found == kNone) {
    last_positive = block_allreduce<int64_t, kThreads>(last_positive, MaxOp(), sh.tmp.index, &sh.index);
    found = last_positive < 0 ? 0 : last_positive;
  }
  if (threadIdx.x == 0) a.next_token[b] = found;
}

}  // namespace

void verify_greedy_cuda(const VerifyArgs& a, void* stream, bool sync) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.dtype == kFloat32) verify_greedy_kernel<kFloat32><<<unsigned(a.B), kThreads, 0, s>>>(a);
  else if (a.dtype == kFloat16) verify_greedy_kernel<kFloat16><<<unsigned(a.B), kThreads, 0, s>>>(a);
  else verify_greedy_kernel<kBFloat16><<<unsigned(a.B), kThreads, 0, s>>>(a);
  check_launch("verify_tree_greedy", s, sync);
}

void verify_stochastic_cuda(const VerifyArgs& a, void* stream, bool sync) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  verify_stochastic_kernel<<<unsigned(a.B), kThreads, 0, s>>>(a);
  check_launch("verify_tree_stochastic", s, sync);
}

}  // namespace tokprune
