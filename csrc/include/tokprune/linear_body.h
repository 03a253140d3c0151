// Body of the small-M linear kernel, included by csrc/linear_host.cpp once per instruction set with
// TP_LIN_NS (namespace), TP_LIN_BYTES (vector bytes), TP_LIN_MR (x rows per tile), TP_LIN_NR (weight rows
// per tile). GCC vector extensions: the same source is SSE2, AVX2+FMA or AVX-512 depending on the target.
//
// A tile keeps MR x NR accumulators of one vector each (lanes along K): per K step it loads NR weight
// vectors and MR x vectors and issues MR * NR FMAs. The NR weight rows (<= 4 x K floats) stay in L1 while
// all M rows of x pass over them, so each weight row is read from memory once per call. Every output
// element is summed in the same order whatever M, the tile it lands in, or the thread count.
namespace TP_LIN_NS {

constexpr int L = TP_LIN_BYTES / 4;
static_assert(TP_LIN_MR >= 1 && TP_LIN_MR <= 4, "rows<> handles M remainders up to 3");
typedef float vec __attribute__((vector_size(TP_LIN_BYTES)));
typedef float vecu __attribute__((vector_size(TP_LIN_BYTES), aligned(4), may_alias));

static inline vec load(const float* p) { return *reinterpret_cast<const vecu*>(p); }

typedef int ivec __attribute__((vector_size(TP_LIN_BYTES)));
#if TP_LIN_BYTES == 64
static const ivec kEven = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
static const ivec kOdd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
#elif TP_LIN_BYTES == 32
static const ivec kEven = {0, 2, 4, 6, 8, 10, 12, 14};
static const ivec kOdd = {1, 3, 5, 7, 9, 11, 13, 15};
#else
static const ivec kEven = {0, 2, 4, 6};
static const ivec kOdd = {1, 3, 5, 7};
#endif

// Lanes [0, L/2): sums of adjacent lane pairs of a; lanes [L/2, L): the same for b.
static inline vec pair_sums(vec a, vec b) { return __builtin_shuffle(a, b, kEven) + __builtin_shuffle(a, b, kOdd); }

// v[0..L) -> one vector whose lane i is the sum of v[i]'s lanes, always by the same pairwise tree
// (adjacent lanes first), so a sum does not depend on which accumulators share the reduction.
static inline vec reduce(vec* v) {
  for (int n = L; n > 1; n /= 2)
    for (int k = 0; k < n / 2; ++k) v[k] = pair_sums(v[2 * k], v[2 * k + 1]);
  return v[0];
}

template <int MR, int NR>
static inline void tile(const LinearArgs& a, int64_t m0, int64_t n0, const float* pf, int pf_rows) {
  const int64_t K = a.K, Kv = K / L * L;
  const float* xr[MR];
  const float* wr[NR];
  for (int i = 0; i < MR; ++i) xr[i] = a.x + (m0 + i) * a.x_sm;
  for (int j = 0; j < NR; ++j) wr[j] = a.w + (n0 + j) * a.w_sn;
  vec acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vec{};
  for (int64_t k = 0; k < Kv; k += L) {
    vec wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load(wr[j] + k);
    for (int j = 0; j < pf_rows; ++j) __builtin_prefetch(pf + j * a.w_sn + k);
    for (int i = 0; i < MR; ++i) {
      const vec xv = load(xr[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  constexpr int T = MR * NR, G = (T + L - 1) / L;
  float sums[G * L];
  for (int g = 0; g < G; ++g) {
    vec v[L];
    for (int t = 0; t < L; ++t) v[t] = g * L + t < T ? acc[(g * L + t) / NR][(g * L + t) % NR] : vec{};
    const vec r = reduce(v);
    for (int t = 0; t < L; ++t) sums[g * L + t] = r[t];
  }
  for (int i = 0; i < MR; ++i) {
    float* yr = a.y + (m0 + i) * a.y_sm + n0;
    for (int j = 0; j < NR; ++j) {
      float s = sums[i * NR + j];
      for (int64_t k = Kv; k < K; ++k) s += xr[i][k] * wr[j][k];
      yr[j] = a.bias ? s + a.bias[n0 + j] : s;
    }
  }
}

// All M rows against weight rows [n0, n0 + NR). While the first M tile runs, the weight rows of a tile
// kPrefetchTiles ahead are prefetched (one cache line per row per 64 bytes of K), so the next tile's
// rows stream in while this one is computed.
template <int NR>
static void rows(const LinearArgs& a, int64_t n0, int64_t n_end, int64_t ahead) {
  const int64_t p0 = n0 + ahead * NR;
  const int pf_rows = int(std::max<int64_t>(0, std::min<int64_t>(NR, n_end - p0)));
  const float* pf = pf_rows ? a.w + p0 * a.w_sn : nullptr;
  int64_t m = 0;
  if (m + TP_LIN_MR <= a.M) {
    tile<TP_LIN_MR, NR>(a, m, n0, pf, pf_rows);
    m += TP_LIN_MR;
    for (; m + TP_LIN_MR <= a.M; m += TP_LIN_MR) tile<TP_LIN_MR, NR>(a, m, n0, nullptr, 0);
  }
  const int rest = int(a.M - m);
  const float* p = m == 0 ? pf : nullptr;
  const int pr = m == 0 ? pf_rows : 0;
  switch (rest) {
    case 1: tile<1, NR>(a, m, n0, p, pr); break;
    case 2: if (TP_LIN_MR > 2) tile<2, NR>(a, m, n0, p, pr); break;
    case 3: if (TP_LIN_MR > 3) tile<3, NR>(a, m, n0, p, pr); break;
    default: break;
  }
}

static void run(const LinearArgs& a, int64_t n_begin, int64_t n_end, int64_t ahead) {
  int64_t n = n_begin;
  for (; n + TP_LIN_NR <= n_end; n += TP_LIN_NR) rows<TP_LIN_NR>(a, n, n_end, ahead);
  for (; n < n_end; ++n) rows<1>(a, n, n_end, 0);
}

}  // namespace TP_LIN_NS
