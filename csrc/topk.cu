// Fused top-k selection: one block per row, radix select over order-preserving 32-bit keys
// (4 passes of 8 bits, shared-memory histograms), then one pass in index order that compacts the
// selected indices with block scans, so the output is sorted ascending without a sort.
#include <stdint.h>

#include "tokprune/cuda_utils.cuh"
#include "tokprune/kernels.h"
#include "tokprune/topk.h"

namespace tokprune {
namespace {

constexpr int kThreads = 512;

__global__ void __launch_bounds__(kThreads) topk_kernel(TopkArgs a) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ uint32_t hist[kRadixBins];
  __shared__ uint32_t s_prefix, s_need;
  const float* s = a.scores + int64_t(blockIdx.x) * a.N;
  int64_t* out = a.out + int64_t(blockIdx.x) * a.keep;

  uint32_t prefix = 0, mask = 0, need = uint32_t(a.keep);
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kRadixBins; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < a.N; i += kThreads) {
      const uint32_t key = order_key(s[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[radix_digit(key, shift)], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t n = need;
      s_prefix = prefix | (radix_pick(hist, &n) << shift);
      s_need = n;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= uint32_t(kRadixBins - 1) << shift;
  }
  // prefix = key of the keep-th largest score; take every larger key and the first `need` equal ones.
  uint32_t eq_before = 0, taken = 0;
  for (int64_t base = 0; base < a.N && taken < uint32_t(a.keep); base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const uint32_t key = i < a.N ? order_key(s[i]) : 0u;
    const uint32_t eq = i < a.N && key == prefix, gt = i < a.N && key > prefix;
    uint32_t eq_rank, eq_total, pos, take_total;
    Scan(scan_tmp).ExclusiveSum(eq, eq_rank, eq_total);
    __syncthreads();
    const uint32_t take = gt || (eq && eq_before + eq_rank < need);
    Scan(scan_tmp).ExclusiveSum(take, pos, take_total);
    __syncthreads();
    if (take) out[taken + pos] = i;
    eq_before += eq_total;
    taken += take_total;
  }
}

}  // namespace

void topk_cuda(const TopkArgs& a, void* stream, bool sync) {
  if (a.R > 2147483647) throw std::invalid_argument("select_tokens: more than 2^31-1 rows");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  topk_kernel<<<unsigned(a.R), kThreads, 0, s>>>(a);
  check_launch("select_tokens", s, sync);
}

}  // namespace tokprune
