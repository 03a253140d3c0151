// Body of the small-M linear kernel, included by csrc/linear_host.cpp once per instruction set with
// TP_LIN_NS (namespace), TP_LIN_BYTES (vector bytes) and TP_LIN_ACC (accumulator vectors per tile; the host
// picks the weight rows per tile, NR, per call). GCC vector extensions: the same source is SSE2, AVX2+FMA or
// AVX-512 depending on the target.
//
// x is first packed (pack(), once per call) K-block-major: block kb holds the L floats [kb*L, kb*L + L) of
// every row, rows one after another, so a tile reads all of its x rows through one pointer with constant
// offsets. A tile keeps MR x NR accumulators of one vector each (lanes along K, MR * NR <= TP_LIN_ACC): per K
// step it loads NR weight vectors and MR x vectors (one load each) and issues MR * NR FMAs. All M rows fit in
// one tile when M <= TP_LIN_ACC / NR (8 rows at NR = 3, 12 at NR = 2 on AVX-512), so each weight row is read
// once and used for every row while it is in registers; larger M is split into equal tiles over the same NR
// weight rows (then in L1). The first tile of every weight block prefetches the weight stream a fixed
// distance ahead into L2 (one line per row per K step), which keeps memory busy while the FMAs run. Every
// output element is summed in the same order whatever M, NR, the tile it lands in, or the thread count
// (per lane in K order, then the same pairwise lane tree, then the K % L tail, then the bias).
namespace TP_LIN_NS {

constexpr int L = TP_LIN_BYTES / 4;
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

// The most x rows one tile holds with nr weight rows.
constexpr int kMaxRows = 16;
constexpr int mr_max(int nr) { return TP_LIN_ACC / nr < kMaxRows ? TP_LIN_ACC / nr : kMaxRows; }

// Floats of the packed x: M rows of the K / L full vectors of x.
static inline int64_t packed_size(const LinearArgs& a) { return a.M * (a.K / L * L); }

// xp[(kb * M + i) * L + l] = x[i, kb * L + l] for the full vectors of K (the tail K % L stays in x).
static void pack(const LinearArgs& a, float* xp) {
  const int64_t nb = a.K / L;
  for (int64_t i = 0; i < a.M; ++i) {
    const float* xr = a.x + i * a.x_sm;
    for (int64_t kb = 0; kb < nb; ++kb) *reinterpret_cast<vecu*>(xp + (kb * a.M + i) * L) = load(xr + kb * L);
  }
}

// Rows [m0, m0 + MR) of x against weight rows [n0, n0 + R). pf_end: prefetch the weight stream pf_dist
// floats ahead of each row's position while below pf_end (nullptr: no prefetch).
template <int MR, int R>
static inline void tile(const LinearArgs& a, const float* xp, int64_t m0, int64_t n0, const float* pf_end,
                        int64_t pf_dist) {
  const int64_t K = a.K, Kv = K / L * L, xs = a.M * L;
  const float* wr[R];
  for (int j = 0; j < R; ++j) wr[j] = a.w + (n0 + j) * a.w_sn;
  const float* xb = xp + m0 * L;
  vec acc[MR][R];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < R; ++j) acc[i][j] = vec{};
  for (int64_t k = 0; k < Kv; k += L, xb += xs) {
    vec wv[R];
    for (int j = 0; j < R; ++j) wv[j] = load(wr[j] + k);
    if (pf_end)
      for (int j = 0; j < R; ++j)
        if (wr[j] + k + pf_dist < pf_end) __builtin_prefetch(wr[j] + k + pf_dist, 0, 1);  // into L2
    for (int i = 0; i < MR; ++i) {
      vec xv = load(xb + i * L);
      if (R > 1) __asm__("" : "+v"(xv));  // one load per x vector, not one folded into every FMA
      for (int j = 0; j < R; ++j) acc[i][j] += xv * wv[j];
    }
  }
  constexpr int T = MR * R, G = (T + L - 1) / L;
  float sums[G * L];
  for (int g = 0; g < G; ++g) {
    vec v[L];
    for (int t = 0; t < L; ++t) v[t] = g * L + t < T ? acc[(g * L + t) / R][(g * L + t) % R] : vec{};
    const vec r = reduce(v);
    for (int t = 0; t < L; ++t) sums[g * L + t] = r[t];
  }
  for (int i = 0; i < MR; ++i) {
    const float* xr = a.x + (m0 + i) * a.x_sm;
    float* yr = a.y + (m0 + i) * a.y_sm + n0;
    for (int j = 0; j < R; ++j) {
      float s = sums[i * R + j];
      for (int64_t k = Kv; k < K; ++k) s += xr[k] * wr[j][k];
      yr[j] = a.bias ? s + a.bias[n0 + j] : s;
    }
  }
}

// tile<rows, R> for a run-time rows in [1, mr_max(R)].
template <int R, int MR = 1>
static inline void tile_rows(int rows, const LinearArgs& a, const float* xp, int64_t m0, int64_t n0,
                             const float* pf_end, int64_t pf_dist) {
  if constexpr (MR <= mr_max(R)) {
    if (rows == MR) return tile<MR, R>(a, xp, m0, n0, pf_end, pf_dist);
    return tile_rows<R, MR + 1>(rows, a, xp, m0, n0, pf_end, pf_dist);
  }
}

// All M rows against weight rows [n0, n0 + R), in ceil(M / mr_max(R)) tiles of (nearly) equal size; the
// first one prefetches.
template <int R>
static inline void rows(const LinearArgs& a, const float* xp, int64_t n0, const float* pf_end, int64_t pf_dist) {
  const int64_t tiles = (a.M + mr_max(R) - 1) / mr_max(R);
  int64_t m = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int r = int(a.M * (t + 1) / tiles - m);
    tile_rows<R>(r, a, xp, m, n0, t == 0 ? pf_end : nullptr, pf_dist);
    m += r;
  }
}

// Weight rows [n_begin, n_end), NR at a time; pf_dist: prefetch distance in floats (0: none).
template <int NR>
static void run(const LinearArgs& a, const float* xp, int64_t n_begin, int64_t n_end, int64_t pf_dist) {
  const float* pf_end = pf_dist > 0 ? a.w + n_end * a.w_sn : nullptr;
  int64_t n = n_begin;
  for (; n + NR <= n_end; n += NR) rows<NR>(a, xp, n, pf_end, pf_dist);
  for (; n < n_end; ++n) rows<1>(a, xp, n, nullptr, 0);
}

}  // namespace TP_LIN_NS
