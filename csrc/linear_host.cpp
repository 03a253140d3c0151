// Small-M fp32 linear on the host: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for the few rows of a
// speculative tree forward (M = 2..16), where a GEMM library's packing costs about as much as reading the
// weights. Each weight row is read from memory once and reused for all M rows (tile body:
// include/tokprune/linear_body.h). Compiled for the baseline ISA, AVX2+FMA and AVX-512F, picked once at
// run time (capped by $TOKPRUNE_LINEAR_ISA = base | avx2, for tests); OpenMP over contiguous blocks of N
// (threads from the caller).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tokprune/linear.h"

namespace tokprune {
namespace {

#define TP_LIN_NS lin_base
#define TP_LIN_BYTES 16
#define TP_LIN_ACC 8
#include "tokprune/linear_body.h"
#undef TP_LIN_NS
#undef TP_LIN_BYTES
#undef TP_LIN_ACC

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define TP_LIN_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TP_LIN_NS lin_avx2
#define TP_LIN_BYTES 32
#define TP_LIN_ACC 8
#include "tokprune/linear_body.h"
#undef TP_LIN_NS
#undef TP_LIN_BYTES
#undef TP_LIN_ACC
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define TP_LIN_NS lin_avx512
#define TP_LIN_BYTES 64
#define TP_LIN_ACC 24
#include "tokprune/linear_body.h"
#undef TP_LIN_NS
#undef TP_LIN_BYTES
#undef TP_LIN_ACC
#pragma GCC pop_options
#endif

enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set of this CPU, capped by $TOKPRUNE_LINEAR_ISA ("base" or "avx2"; read once), which
// lets tests run the narrower variants on a wider machine.
Isa isa() {
#ifdef TP_LIN_X86
  static const Isa v = [] {
    Isa best = __builtin_cpu_supports("avx512f") ? kAvx512
               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kAvx2
                                                                                   : kBase;
    const char* cap = std::getenv("TOKPRUNE_LINEAR_ISA");
    if (cap && std::strcmp(cap, "base") == 0) best = kBase;
    if (cap && std::strcmp(cap, "avx2") == 0 && best > kAvx2) best = kAvx2;
    return best;
  }();
  return v;
#else
  return kBase;
#endif
}

// Prefetch distance of the weight stream in floats (16 KB). On SmolLM2-135M (1 thread, AVX-512, NR = 3,
// prefetch into L2) an 8-node tree forward took 70.0-71.5 ms at 16 KB (4 runs), 72.2-73.6 at 8 KB, 70.9-75.5
// at 32 KB and 72.4-72.7 at 64 KB; prefetching into L1 4 KB ahead: 82.6-83.9 ms.
constexpr int64_t kPfDist = 4096;

int64_t packed_size(Isa s, const LinearArgs& a) {
#ifdef TP_LIN_X86
  if (s == kAvx512) return lin_avx512::packed_size(a);
  if (s == kAvx2) return lin_avx2::packed_size(a);
#endif
  return lin_base::packed_size(a);
}

void pack(Isa s, const LinearArgs& a, float* xp) {
#ifdef TP_LIN_X86
  if (s == kAvx512) return lin_avx512::pack(a, xp);
  if (s == kAvx2) return lin_avx2::pack(a, xp);
#endif
  lin_base::pack(a, xp);
}

// Weight rows per tile. AVX-512 (24 accumulators): 3 (8 x rows per tile) except for 9..12 rows, which fit
// one 12 x 2 tile; on SmolLM2-135M tree forwards (ms, 1 thread) NR = 3 / 2 / 4 gave 71.5 / 73.1 / 74.9 at 8
// nodes, 84.4 / 80.6 / 86.0 at 12 and 94.2 / 98.4 / 100.2 at 16. SSE2 / AVX2 (8 accumulators): 2.
void run_range(Isa s, const LinearArgs& a, const float* xp, int64_t n0, int64_t n1) {
#ifdef TP_LIN_X86
  if (s == kAvx512) {
    if (a.M > 8 && a.M <= 12) return lin_avx512::run<2>(a, xp, n0, n1, kPfDist);
    return lin_avx512::run<3>(a, xp, n0, n1, kPfDist);
  }
  if (s == kAvx2) return lin_avx2::run<2>(a, xp, n0, n1, kPfDist);
#endif
  (void)s;
  lin_base::run<2>(a, xp, n0, n1, kPfDist);
}

}  // namespace

const char* linear_small_m_isa() {
  switch (isa()) {
    case kAvx512: return "avx512f";
    case kAvx2: return "avx2";
    default: return "base";
  }
}

void linear_small_m_host(const LinearArgs& a) {
  if (a.M <= 0 || a.N <= 0) return;
  const Isa s = isa();
  // x packed K-block-major into a 64-byte aligned buffer (vector loads never split a cache line)
  std::unique_ptr<float[]> buf(new float[size_t(packed_size(s, a)) + 16]);
  float* xp = buf.get() + ((64 - reinterpret_cast<uintptr_t>(buf.get()) % 64) % 64) / sizeof(float);
  pack(s, a, xp);
  // Blocks of 12 weight rows (a multiple of every NR) so a thread's range starts on a tile boundary.
  const int64_t unit = 12, blocks = (a.N + unit - 1) / unit;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(a.threads, blocks)));
  if (threads == 1) {
    run_range(s, a, xp, 0, a.N);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    run_range(s, a, xp, std::min(a.N, b0 * unit), std::min(a.N, b1 * unit));
  }
#else
  run_range(s, a, xp, 0, a.N);
#endif
}

}  // namespace tokprune
