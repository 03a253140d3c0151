// Small-M fp32 linear on the host: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for the few rows of a
// speculative tree forward (M = 2..16), where a GEMM library's packing costs about as much as reading the
// weights. Each weight row is read from memory once and reused for all M rows (tile body:
// include/tokprune/linear_body.h). Compiled for the baseline ISA, AVX2+FMA and AVX-512F, picked once at
// run time; OpenMP over contiguous blocks of N (threads from the caller).
#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tokprune/linear.h"

namespace tokprune {
namespace {

#define TP_LIN_NS lin_base
#define TP_LIN_BYTES 16
#define TP_LIN_MR 4
#define TP_LIN_NR 2
#include "tokprune/linear_body.h"
#undef TP_LIN_NS
#undef TP_LIN_BYTES
#undef TP_LIN_MR
#undef TP_LIN_NR

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define TP_LIN_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TP_LIN_NS lin_avx2
#define TP_LIN_BYTES 32
#define TP_LIN_MR 4
#define TP_LIN_NR 2
#include "tokprune/linear_body.h"
#undef TP_LIN_NS
#undef TP_LIN_BYTES
#undef TP_LIN_MR
#undef TP_LIN_NR
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define TP_LIN_NS lin_avx512
#define TP_LIN_BYTES 64
#define TP_LIN_MR 4
#define TP_LIN_NR 4
#include "tokprune/linear_body.h"
#undef TP_LIN_NS
#undef TP_LIN_BYTES
#undef TP_LIN_MR
#undef TP_LIN_NR
#pragma GCC pop_options
#endif

enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa isa() {
#ifdef TP_LIN_X86
  static const Isa v = __builtin_cpu_supports("avx512f") ? kAvx512
                       : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kAvx2
                                                                                           : kBase;
  return v;
#else
  return kBase;
#endif
}

// Prefetch distance in tiles (1 measured best on SmolLM2's shapes; 2 and 4 were slower).
constexpr int64_t kAhead = 1;

void run_range(Isa s, const LinearArgs& a, int64_t n0, int64_t n1) {
#ifdef TP_LIN_X86
  if (s == kAvx512) return lin_avx512::run(a, n0, n1, kAhead);
  if (s == kAvx2) return lin_avx2::run(a, n0, n1, kAhead);
#endif
  (void)s;
  lin_base::run(a, n0, n1, kAhead);
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
  // Blocks of 16 weight rows (a multiple of every NR) so a thread's range starts on a tile boundary.
  const int64_t unit = 16, blocks = (a.N + unit - 1) / unit;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(a.threads, blocks)));
  if (threads == 1) {
    run_range(s, a, 0, a.N);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    run_range(s, a, std::min(a.N, b0 * unit), std::min(a.N, b1 * unit));
  }
#else
  run_range(s, a, 0, a.N);
#endif
}

}  // namespace tokprune
