// Fused paged FASA decode, host (CPU) build: one call per layer, parallel over the (request, KV head)
// units on `threads` std::threads (the caller's thread included) that take units from an atomic counter
// and are joined before returning: no pool outlives the call, so the kernel shares no threading runtime
// state with torch's or a serving engine's OpenMP. The unit's work lives in include/tokprune/paged_fasa_body.h,
// compiled three times: for the baseline ISA, AVX2+FMA and AVX-512, picked once at run time.
#include <math.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "tokprune/common.h"
#include "tokprune/kernels.h"
#include "tokprune/topk.h"

namespace tokprune {
namespace {

constexpr int64_t kVoteChunk = 512;  // tokens per chunk of the vote's softmax (paged_fasa_body.h)

// Per-thread scratch, carved for the call's longest request out of one grow-only block per thread (kept
// between calls on the same thread: no allocation and no zero-fill per step on the decode path).
class Scratch {
 public:
  float *qf, *qfc, *lg, *att, *acc, *denom, *chunk;
  uint32_t *key, *gmax;  // per token; per token group (the selection's lower bound)
  int32_t *cand, *cand2, *sel;  // candidates (two lists); sel: room for one entry more than chosen
  int64_t *koff, *voff;          // byte offsets of the chosen K / V rows

  Scratch(const PagedFasaArgs& a, int64_t max_len) {
    const int64_t g = a.H / a.Hkv, n = std::max<int64_t>(std::min(a.budget, max_len), 1) + 1;
    const int64_t L = max_len > a.budget ? max_len + 1 : 0;  // the vote runs only past the budget
    const int64_t words[] = {g * a.D, g * std::max<int64_t>(a.nd, 1), g * L, g * n, g * a.D, g, L, L, L, L, n,
                             2 * n, 2 * n, 2 * g * ((L + kVoteChunk - 1) / kVoteChunk) + g};
    constexpr int kParts = sizeof words / sizeof words[0];
    size_t offset[kParts], total = 0;
    for (int i = 0; i < kParts; ++i) offset[i] = total, total += (size_t(words[i]) * 4 + 63) / 64 * 64;
    char* base = static_cast<char*>(block().reserve(total));
    float** f[] = {&qf, &qfc, &lg, &att, &acc, &denom};
    for (int i = 0; i < 6; ++i) *f[i] = reinterpret_cast<float*>(base + offset[i]);
    key = reinterpret_cast<uint32_t*>(base + offset[6]);
    gmax = reinterpret_cast<uint32_t*>(base + offset[7]);
    cand = reinterpret_cast<int32_t*>(base + offset[8]);
    cand2 = reinterpret_cast<int32_t*>(base + offset[9]);
    sel = reinterpret_cast<int32_t*>(base + offset[10]);
    koff = reinterpret_cast<int64_t*>(base + offset[11]);
    voff = reinterpret_cast<int64_t*>(base + offset[12]);
    chunk = reinterpret_cast<float*>(base + offset[13]);
  }

 private:
  struct Block {
    void* data = nullptr;
    size_t bytes = 0;
    ~Block() { std::free(data); }
    void* reserve(size_t need) {
      if (need > bytes) {
        std::free(data);
        data = nullptr, bytes = 0;
        data = std::aligned_alloc(64, need);
        if (!data) throw std::bad_alloc();
        bytes = need;
      }
      return data;
    }
  };
  static Block& block() {
    thread_local Block b;
    return b;
  }
};

}  // namespace
}  // namespace tokprune

namespace tokprune {
namespace {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 8-float vectors inside the baseline build stay internal
#define TP_FASA_NS fasa_base
#define TP_FASA_VW 8
#include "tokprune/paged_fasa_body.h"
#undef TP_FASA_NS
#undef TP_FASA_VW

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define TP_FASA_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TP_FASA_NS fasa_avx2
#define TP_FASA_VW 8
#define TP_FASA_X86 1  // x86 intrinsics of the pragma's ISA may be used
#include "tokprune/paged_fasa_body.h"
#undef TP_FASA_NS
#undef TP_FASA_VW
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define TP_FASA_NS fasa_avx512
#define TP_FASA_VW 16
#include "tokprune/paged_fasa_body.h"
#undef TP_FASA_NS
#undef TP_FASA_VW
#undef TP_FASA_X86
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

bool use_avx2() {
#ifdef TP_FASA_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool use_avx512() {
#ifdef TP_FASA_AVX2
  static const bool ok = use_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

}  // namespace

// The host kernels thread with std::thread (see paged_fasa_host); OpenMP is used for `omp simd` only.
bool host_has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

void paged_fasa_host(const PagedFasaArgs& a) {
  int64_t max_len = 0;
  for (int64_t r = 0; r < a.R; ++r) max_len = std::max<int64_t>(max_len, a.seq_lens[r]);
  const int64_t units = a.R * a.Hkv;
  const int isa = use_avx512() ? 2 : use_avx2() ? 1 : 0;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(a.threads, units)));
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto work = [&]() {
    try {
      Scratch w(a, max_len);
      for (int64_t u = next.fetch_add(1); u < units && !failed.load(); u = next.fetch_add(1)) {
#ifdef TP_FASA_AVX2
        if (isa == 2) {
          fasa_avx512::run_unit(a, u, w);
          continue;
        }
        if (isa == 1) {
          fasa_avx2::run_unit(a, u, w);
          continue;
        }
#endif
        fasa_base::run_unit(a, u, w);
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  std::vector<std::thread> helpers;
  helpers.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) helpers.emplace_back(work);
  work();
  for (auto& t : helpers) t.join();
  (void)isa;
  if (error) std::rethrow_exception(error);
}

}  // namespace tokprune
