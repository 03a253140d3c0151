// Body of the fused paged FASA decode (one (request, KV head) unit), host only. Included twice by
// csrc/paged_fasa_host.cpp: once for the baseline ISA and once under `#pragma GCC target("avx2,fma")`
// (chosen at run time), each inside its own namespace. Not a standalone header.
//
// Unit (r, h), L = seq_lens[r], g = H / Hkv query heads:
//   L <= budget: every token is chosen (dense).
//   else: logits[j, t] = vote_scale * sum_i q[h*g+j, fc_dims[h, i]] * fc[t, i]   (packed FC side cache)
//         vote[t] = sum_j softmax_t(logits[j, :])[t]; the first `sink` and last `window` tokens forced;
//         the `budget` largest votes (ties to the lower token) by radix select.
//   out[h*g+j] = softmax(scale * q . K[chosen]) @ V[chosen], fp32 accumulation.
//
// The hot loops use GCC vector extensions of TP_FASA_VW floats (defined by the includer: 8 for the baseline,
// whose vectors become pairs of SSE registers, and AVX2; 16 for AVX-512): every FC value and every chosen K/V row is read once for the whole
// group of query heads.

namespace TP_FASA_NS {

constexpr int kVW = TP_FASA_VW;  // floats per vector: 8 (baseline / AVX2), 16 (AVX-512)
typedef float vf __attribute__((vector_size(4 * TP_FASA_VW)));
typedef uint32_t vu __attribute__((vector_size(4 * TP_FASA_VW)));
typedef uint16_t vh __attribute__((vector_size(2 * TP_FASA_VW)));
typedef float v8f __attribute__((vector_size(32)));  // attention rows: 8 floats in every variant (a 16-wide
typedef uint32_t v8u __attribute__((vector_size(32)));  // horizontal sum per chosen row costs more than it saves)
typedef uint16_t v8h __attribute__((vector_size(16)));

constexpr int kGroupTile = 4;  // query heads whose accumulators are kept in registers at once
constexpr int kPrefetchAhead = 8;  // chosen rows prefetched ahead of the one being read
constexpr int64_t kFcPrefetchAhead = 256;  // tokens ahead in each FC row

// f(j0, std::integral_constant<int, G>) for the tiles [j0, j0 + G) of g query heads (G <= kGroupTile): the
// kernels below keep a tile's accumulators in registers, so G is a template argument.
template <typename F>
inline void for_head_tiles(int64_t g, F&& f) {
  for (int64_t j0 = 0; j0 < g; j0 += kGroupTile) {
    switch (g - j0 < kGroupTile ? g - j0 : kGroupTile) {
      case 1: f(j0, std::integral_constant<int, 1>{}); break;
      case 2: f(j0, std::integral_constant<int, 2>{}); break;
      case 3: f(j0, std::integral_constant<int, 3>{}); break;
      default: f(j0, std::integral_constant<int, 4>{}); break;
    }
  }
}

inline float as_float(uint32_t b) {
#if defined(__GNUC__)
  return __builtin_bit_cast(float, b);
#else
  return bits_float(b);
#endif
}

// exp(x) for x <= 0 (logits minus their maximum), branch-free so that loops over it vectorise;
// relative error ~2e-7; values below -87 give ~1e-38 instead of 0.
inline float exp_le0(float x) {
  uint32_t xb = __builtin_bit_cast(uint32_t, x);  // x <= 0: clamp to >= -87 on the bits (unsigned min
  xb = xb < 0xC2AE0000u ? xb : 0xC2AE0000u;        // vectorises; a float compare needs -ffinite-math)
  x = as_float(xb);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (|.| < 2^22)
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667163e-1f + r * (4.1666667908e-2f +
                  r * (8.3333337680e-3f + r * 1.3888889225e-3f)))));
  return p * as_float(uint32_t(int32_t(n) + 127) << 23);
}

template <int DT>
constexpr int64_t elem_size() { return DT == kFloat32 ? 4 : DT == kInt8 ? 1 : 2; }

// Element i of a fp32 / fp16 / bf16 / int8 array as float (bf16 by a shift, so that loops vectorise).
template <int DT>
inline float ld(const void* p, int64_t i) {
  if (DT == kBFloat16) return as_float(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
  if (DT == kInt8) return float(static_cast<const int8_t*>(p)[i]);
  return load_as_float<DT>(p, i);
}

// Elements i..i+W-1 of a fp32 / fp16 / bf16 array as a vector V of W floats (VU / VH: W uint32 / uint16).
template <int DT, typename V, typename VU, typename VH, int W>
inline V load_floats(const void* p, int64_t i) {
  V x;
  if (DT == kFloat32) {
    __builtin_memcpy(&x, static_cast<const float*>(p) + i, sizeof x);
  } else if (DT == kBFloat16) {
    VH h;
    __builtin_memcpy(&h, static_cast<const uint16_t*>(p) + i, sizeof h);
    const VU u = __builtin_convertvector(h, VU) << 16;
    __builtin_memcpy(&x, &u, sizeof x);
  } else if (DT == kInt8) {
    // sign extension + int -> float (GCC scalarises __builtin_convertvector from int8 vectors)
    const int8_t* b = static_cast<const int8_t*>(p) + i;
#if TP_FASA_VW == 16  // the AVX-512 variant (the includer's target pragma)
    if constexpr (W == 16) {
      const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
      __builtin_memcpy(&x, &f, sizeof x);
      return x;
    }
#endif
#if defined(TP_FASA_X86)  // the AVX2 and AVX-512 variants
    if constexpr (W == 8) {
      const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
      __builtin_memcpy(&x, &f, sizeof x);
      return x;
    }
#endif
    for (int k = 0; k < W; ++k) x[k] = float(b[k]);
  } else {
    for (int k = 0; k < W; ++k) x[k] = load_as_float<DT>(p, i + k);
  }
  return x;
}
template <int DT>
inline vf ldv(const void* p, int64_t i) { return load_floats<DT, vf, vu, vh, kVW>(p, i); }
template <int DT>
inline v8f ld8(const void* p, int64_t i) { return load_floats<DT, v8f, v8u, v8h, 8>(p, i); }  // attention rows
inline v8f splat8(float s) {
  const v8u u = v8u{} + __builtin_bit_cast(uint32_t, s);
  v8f x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
}
inline void st8(float* p, v8f x) { __builtin_memcpy(p, &x, sizeof x); }
inline float hsum8(v8f x) { return ((x[0] + x[4]) + (x[2] + x[6])) + ((x[1] + x[5]) + (x[3] + x[7])); }

inline vf splatv(float s) {  // a broadcast (adding s to a zero vector would cost an add: -0 + 0 = +0)
  const vu u = vu{} + __builtin_bit_cast(uint32_t, s);
  vf x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
}
inline void stv(float* p, vf x) { __builtin_memcpy(p, &x, sizeof x); }
inline vf maxv(vf a, vf b) { return a > b ? a : b; }  // NaN in a is ignored, as the scalar max below
inline float hmaxv(vf x) {
  float m = x[0];
  for (int k = 1; k < kVW; ++k) m = x[k] > m ? x[k] : m;
  return m;
}

// tokprune::order_key without branches (so that loops over it vectorise): -0 becomes +0 by adding +0.
inline uint32_t order_key_flat(float x) {
  const uint32_t b = __builtin_bit_cast(uint32_t, x + 0.0f);
  return b ^ (uint32_t(int32_t(b) >> 31) | 0x80000000u);
}

// Prefetch the `bytes` bytes at p (one request per cache line).
inline void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o);
}

// Logits of G (<= kGroupTile) query heads over n tokens of one dims-major FC block ([nd, block_size], token
// axis unit stride): out[j * ld_out + t] = sum_i qfc[j * nd + i] * fc[i, t] (summed in i order), running maxima
// in mx[j] (unless mx is null). Each FC value is loaded once for the G heads.
// Rows are prefetched up to token n_stream (>= n: the FC rows go on past this range). int8 keys: the logits of
// token t are multiplied by scale[t] (token stride 1).
template <int FT, int G>
void fc_block_dims_major(const void* base, int64_t f_sd, int64_t nd, const float* qfc, int64_t n, float* out,
                         int64_t ld_out, float* mx, int64_t n_stream, const float* scale) {
  constexpr int64_t esz = elem_size<FT>();
  vf m[G];
  for (int j = 0; j < G; ++j) m[j] = splatv(-INFINITY);
  int64_t t = 0;
  for (; t + 2 * kVW <= n; t += 2 * kVW) {
    vf a0[G], a1[G];
    for (int j = 0; j < G; ++j) a0[j] = a1[j] = vf{};
    // one prefetch per cache line of each row (int8: every other step) and of the scales
    const bool fetch = t + kFcPrefetchAhead < n_stream && (esz > 1 || t % (64 / esz) == 0);
    if (FT == kInt8 && fetch) __builtin_prefetch(scale + t + kFcPrefetchAhead);
    for (int64_t i = 0; i < nd; ++i) {
      if (fetch)  // 16 rows stream at once: the hardware prefetcher alone falls behind
        __builtin_prefetch(static_cast<const char*>(base) + (i * f_sd + t + kFcPrefetchAhead) * esz);
      const vf x0 = ldv<FT>(base, i * f_sd + t), x1 = ldv<FT>(base, i * f_sd + t + kVW);
      for (int j = 0; j < G; ++j) {
        const vf qv = splatv(qfc[j * nd + i]);
        a0[j] += qv * x0;
        a1[j] += qv * x1;
      }
    }
    if (FT == kInt8) {
      const vf s0 = ldv<kFloat32>(scale, t), s1 = ldv<kFloat32>(scale, t + kVW);
      for (int j = 0; j < G; ++j) a0[j] *= s0, a1[j] *= s1;
    }
    for (int j = 0; j < G; ++j) {
      stv(out + j * ld_out + t, a0[j]);
      stv(out + j * ld_out + t + kVW, a1[j]);
      m[j] = maxv(maxv(a0[j], a1[j]), m[j]);
    }
  }
  for (; t + kVW <= n; t += kVW) {  // one vector of tokens left
    vf a0[G];
    for (int j = 0; j < G; ++j) a0[j] = vf{};
    for (int64_t i = 0; i < nd; ++i) {
      const vf x0 = ldv<FT>(base, i * f_sd + t);
      for (int j = 0; j < G; ++j) a0[j] += splatv(qfc[j * nd + i]) * x0;
    }
    if (FT == kInt8) {
      const vf s0 = ldv<kFloat32>(scale, t);
      for (int j = 0; j < G; ++j) a0[j] *= s0;
    }
    for (int j = 0; j < G; ++j) {
      stv(out + j * ld_out + t, a0[j]);
      m[j] = maxv(a0[j], m[j]);
    }
  }
  for (int j = 0; j < G; ++j) {
    float mj = hmaxv(m[j]);
    for (int64_t tt = t; tt < n; ++tt) {
      float acc = 0.0f;
      for (int64_t i = 0; i < nd; ++i) acc += qfc[j * nd + i] * ld<FT>(base, i * f_sd + tt);
      if (FT == kInt8) acc *= scale[tt];
      out[j * ld_out + tt] = acc;
      mj = acc > mj ? acc : mj;
    }
    if (mx) mx[j] = mj > mx[j] ? mj : mx[j];
  }
}

// logits[j * L + t] for t < L (FC side cache read in place through the block table).
template <int FT>
void fc_logits(const PagedFasaArgs& a, int64_t r, int64_t h, int64_t L, const float* qfc, float* lg) {
  const int64_t g = a.H / a.Hkv, bs = a.block_size, nd = a.nd;
  const int32_t* table = a.block_table + r * a.bt_sr;
  const char* fc = static_cast<const char*>(a.fc);
  const int64_t esz = elem_size<FT>();
  for (int64_t b = 0, t0 = 0; t0 < L; ++b, t0 += bs) {
    const int64_t n = L - t0 < bs ? L - t0 : bs;
    const void* base = fc + (int64_t(table[b]) * a.f_sb + h * a.f_sh) * esz;
    const float* sc = FT == kInt8 ? a.fc_scale + int64_t(table[b]) * a.s_sb + h * a.s_sh : nullptr;
    if (a.f_st == 1 && (FT != kInt8 || a.s_st == 1)) {  // dims-major block ([nd, block_size]): 2 vectors of
                                                        // tokens x up to 4 heads in registers
      for_head_tiles(g, [&](int64_t j0, auto G) {
        fc_block_dims_major<FT, decltype(G)::value>(base, a.f_sd, nd, qfc + j0 * nd, n, lg + j0 * L + t0, L,
                                                    nullptr, n, sc);
      });
    } else {  // token-major ([block_size, nd]) or any strides: one dot product per token
      for (int64_t t = 0; t < n; ++t) {
        const int64_t row = t * a.f_st;
        for (int64_t j = 0; j < g; ++j) {
          const float* qj = qfc + j * nd;
          float s = 0.0f;
          if (a.f_sd == 1) {
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < nd; ++i) s += qj[i] * ld<FT>(base, row + i);
          } else {
            for (int64_t i = 0; i < nd; ++i) s += qj[i] * ld<FT>(base, row + i * a.f_sd);
          }
          if (FT == kInt8) s *= sc[t * a.s_st];
          lg[j * L + t0 + t] = s;
        }
      }
    }
  }
}

// The vote's softmax per query head in chunks of kChunk tokens: lg[j * L + t] becomes exp(logit - chunk max) and
// fac[j * chunks + c] = exp(chunk max - max) / sum_t exp(logit - max), so that softmax_j[t] = lg[j*L+t] * fac[j, c].
// On a dims-major FC cache whose block holds the whole sequence (tokprune's KV cache) each chunk's exps follow
// its logits at once, while the chunk is in L1 and the FC stream's prefetches are in flight (the exps cost no
// pass of their own); other layouts score all tokens first, then take the same per-chunk exps.
constexpr int64_t kChunk = kVoteChunk;  // defined by the includer (it sizes the scratch)
inline int64_t num_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }

inline void exp_chunk(float* lg, int64_t L, int64_t g, int64_t c0, int64_t n, const float* cmax, float* cm, float* cs,
                      int64_t nch) {
  const int64_t c = c0 / kChunk;
  for (int64_t j = 0; j < g; ++j) {
    float* x = lg + j * L + c0;
    const float m = cmax[j];
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < n; ++t) {
      x[t] = exp_le0(x[t] - m);
      s += x[t];
    }
    cm[j * nch + c] = m, cs[j * nch + c] = s;
  }
}

template <int FT>
void chunked_softmax(const PagedFasaArgs& a, int64_t r, int64_t h, int64_t L, const float* qfc, float* lg, float* fac,
                     float* cs) {
  const int64_t g = a.H / a.Hkv, nd = a.nd, nch = num_chunks(L);
  float* cm = fac;             // chunk maxima, turned into factors at the end
  float* cmax = cs + g * nch;  // per head: the current chunk's maximum (scratch after cs)
  if (a.f_st == 1 && (FT != kInt8 || a.s_st == 1) && a.block_size >= L && L > 0) {  // one dims-major block:
    const int64_t esz = elem_size<FT>(), blk = a.block_table[r * a.bt_sr];    // exps chunk by chunk behind the stream
    const char* base = static_cast<const char*>(a.fc) + (blk * a.f_sb + h * a.f_sh) * esz;
    const float* sc = FT == kInt8 ? a.fc_scale + blk * a.s_sb + h * a.s_sh : nullptr;
    for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
      const int64_t n = L - c0 < kChunk ? L - c0 : kChunk;
      for (int64_t j = 0; j < g; ++j) cmax[j] = -INFINITY;
      for_head_tiles(g, [&](int64_t j0, auto G) {
        fc_block_dims_major<FT, decltype(G)::value>(base + c0 * esz, a.f_sd, nd, qfc + j0 * nd, n, lg + j0 * L + c0,
                                                    L, cmax + j0, L - c0, sc ? sc + c0 : nullptr);
      });
      exp_chunk(lg, L, g, c0, n, cmax, cm, cs, nch);
    }
  } else {
    fc_logits<FT>(a, r, h, L, qfc, lg);
    for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
      const int64_t n = L - c0 < kChunk ? L - c0 : kChunk;
      for (int64_t j = 0; j < g; ++j) {
        const float* x = lg + j * L + c0;
        vf mv = splatv(-INFINITY);
        int64_t t = 0;
        for (; t + kVW <= n; t += kVW) mv = maxv(ldv<kFloat32>(x, t), mv);
        float m = hmaxv(mv);
        for (; t < n; ++t) m = x[t] > m ? x[t] : m;
        cmax[j] = m;
      }
      exp_chunk(lg, L, g, c0, n, cmax, cm, cs, nch);
    }
  }
  for (int64_t j = 0; j < g; ++j) {  // factors: exp(chunk max - max) / normaliser
    float* f = cm + j * nch;
    const float* sj = cs + j * nch;
    float m = -INFINITY;
    for (int64_t c = 0; c < nch; ++c) m = f[c] > m ? f[c] : m;
    float z = 0.0f;
    for (int64_t c = 0; c < nch; ++c) f[c] = expf(f[c] - m), z += sj[c] * f[c];
    const float iz = 1.0f / z;
    for (int64_t c = 0; c < nch; ++c) f[c] *= iz;
  }
}

// The need-th largest (need >= 1) of the n keys key[0..n) (list == nullptr) or key[list[0..n)], by radix select
// from the highest bit where they differ (kmin / kmax: their minimum and maximum; the common prefix is skipped:
// FASA's votes share sign and high exponent bits). Returns the threshold key; *need becomes how many keys equal
// to it are taken (lowest tokens first). cand: room for n indices.
inline uint32_t radix_threshold(const uint32_t* key, const int32_t* list, int64_t n, uint32_t kmin, uint32_t kmax,
                                uint32_t* need, int32_t* cand) {
  const uint32_t diff = kmin ^ kmax;
  if (diff == 0) return kmin;
  int top = 31 - __builtin_clz(diff);
  uint32_t mask = top == 31 ? 0u : ~((2u << top) - 1u);
  uint32_t prefix = kmin & mask;
  const int32_t* src = list;  // nullptr: every key of the input (until the first narrowing)
  int64_t nc = n;
  uint32_t part[4][kRadixBins], hist[kRadixBins];  // 4 partial histograms: equal digits do not chain in memory
  while (top >= 0) {
    const int bits = top + 1 < kRadixBits ? top + 1 : kRadixBits;
    const int shift = top + 1 - bits, bins = 1 << bits;
    const uint32_t dm = uint32_t(bins - 1);
    for (int q = 0; q < 4; ++q)
      for (int d = 0; d < bins; ++d) part[q][d] = 0;
    int64_t c = 0;
    if (src == nullptr) {
      for (; c + 4 <= nc; c += 4)
        for (int q = 0; q < 4; ++q) ++part[q][(key[c + q] >> shift) & dm];
      for (; c < nc; ++c) ++part[0][(key[c] >> shift) & dm];
    } else {
      for (; c + 4 <= nc; c += 4)
        for (int q = 0; q < 4; ++q) ++part[q][(key[src[c + q]] >> shift) & dm];
      for (; c < nc; ++c) ++part[0][(key[src[c]] >> shift) & dm];
    }
    for (int d = 0; d < bins; ++d) hist[d] = part[0][d] + part[1][d] + part[2][d] + part[3][d];
    const uint32_t digit = radix_pick(hist, need, bins);
    prefix |= digit << shift;
    mask |= dm << shift;
    top = shift - 1;
    if (top < 0 || hist[digit] == uint32_t(nc)) continue;  // done, or nothing to drop
    int64_t kept = 0;
    if (src == nullptr) {
      for (int64_t i = 0; i < nc; ++i) {
        cand[kept] = int32_t(i);
        kept += (key[i] & mask) == prefix;
      }
    } else {
      for (int64_t i = 0; i < nc; ++i) {
        const int32_t t = src[i];
        cand[kept] = t;
        kept += (key[t] & mask) == prefix;
      }
    }
    src = cand;
    nc = kept;
  }
  return prefix;
}

// Order-preserving keys of a vector of votes (order_key_flat lane by lane).
inline vu order_keys(vf x) {
  x += splatv(0.0f);  // -0 -> +0
  vu b;
  __builtin_memcpy(&b, &x, sizeof b);
  typedef int32_t vi __attribute__((vector_size(4 * TP_FASA_VW)));
  const vu sign = (vu)((vi)b >> 31);
  return b ^ (sign | 0x80000000u);
}

// The tokens t of [lo, hi) with key[t] >= bound, ascending, into cand; returns their count.
inline int64_t collect_at_least(const uint32_t* key, int64_t lo, int64_t hi, uint32_t bound, int32_t* cand) {
  int64_t n = 0, t = lo;
#if TP_FASA_VW == 16
  const __m512i b = _mm512_set1_epi32(int32_t(bound));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; t + 16 <= hi; t += 16) {
    const __mmask16 hit = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + t), b);
    if (hit) {
      _mm512_mask_compressstoreu_epi32(cand + n, hit, _mm512_add_epi32(_mm512_set1_epi32(int32_t(t)), iota));
      n += __builtin_popcount(hit);
    }
  }
#else
  const v8u b8 = v8u{} + bound;
  for (; t + 8 <= hi; t += 8) {  // most groups of 8 hold no candidate and are skipped
    v8u k8;
    __builtin_memcpy(&k8, key + t, sizeof k8);
    const v8u hit = (v8u)(k8 >= b8);
    uint64_t lanes[4];
    __builtin_memcpy(lanes, &hit, sizeof lanes);
    if ((lanes[0] | lanes[1] | lanes[2] | lanes[3]) == 0) continue;
    for (int64_t u = t; u < t + 8; ++u) {  // branch-free (cand has room for one more)
      cand[n] = int32_t(u);
      n += key[u] >= bound;
    }
  }
#endif
  for (; t < hi; ++t) {
    cand[n] = int32_t(t);
    n += key[t] >= bound;
  }
  return n;
}

inline void key_range(const uint32_t* key, const int32_t* list, int64_t n, uint32_t* kmin, uint32_t* kmax) {
  uint32_t lo = 0xFFFFFFFFu, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = list ? key[list[i]] : key[i];
    lo = k < lo ? k : lo;
    hi = k > hi ? k : hi;
  }
  *kmin = lo, *kmax = hi;
}

// FASA's vote and top-budget choice; writes the chosen logical tokens ascending into sel, returns their count.
//
// Selection of `need` tokens out of the m = hi - lo competing ones without sorting or a histogram over all m:
// while writing the keys, the maximum of each group of `span` tokens (strided by the vector width) is kept;
// `need` groups hold a maximum >= the need-th largest group maximum, so at least `need` tokens lie at or above
// it, and it is a lower bound of the threshold. With about 2 * need groups it leaves a few more than `need`
// candidates (about 1.25 * need for i.i.d. votes; all tokens in the worst case), one vector compare per 16
// keys collects them, and the exact radix select runs over the candidates only.
template <int FT>
int64_t choose(const PagedFasaArgs& a, int64_t r, int64_t h, int64_t L, const float* qf, Scratch& w) {
  const int64_t g = a.H / a.Hkv, nd = a.nd, budget = a.budget;
  int32_t* sel = w.sel;
  if (budget == 0) return 0;
  if (L <= budget) {
    for (int64_t t = 0; t < L; ++t) sel[t] = int32_t(t);
    return L;
  }
  float* qfc = w.qfc;
  const int32_t* dims = a.fc_dims + h * nd;
  for (int64_t j = 0; j < g; ++j)
    for (int64_t i = 0; i < nd; ++i) qfc[j * nd + i] = qf[j * a.D + dims[i]] * a.vote_scale;
  float* lg = w.lg;
  float* fac = w.chunk;  // [g][chunks]: exp(chunk max - max) / normaliser, the softmax factor of a chunk's exps
  chunked_softmax<FT>(a, r, h, L, qfc, lg, fac, w.chunk + g * num_chunks(L));
  // Forced: the first `sink` and the last `window` tokens; the rest [lo, hi) competes for `need` places.
  const int64_t sink = a.sink < budget ? a.sink : budget;
  const int64_t window = a.window < budget - sink ? a.window : budget - sink;
  const int64_t lo = sink, hi = L - window;
  uint32_t need = uint32_t(budget - sink - window);
  int64_t n = 0;
  for (int64_t t = 0; t < sink; ++t) sel[n++] = int32_t(t);
  if (need > 0) {
    // keys of the votes sum_j softmax_j, and the group maxima
    int64_t span = (hi - lo) / (2 * int64_t(need));
    span = span < 1 ? 1 : span > 16 ? 16 : span;
    uint32_t* key = w.key;
    uint32_t* gmax = w.gmax;
    const int64_t nch = num_chunks(L);
    auto vote = [&](int64_t t) {  // sum_j softmax_j[t]
      const int64_t c = t / kChunk;
      float v = lg[t] * fac[c];
      for (int64_t j = 1; j < g; ++j) v += lg[j * L + t] * fac[j * nch + c];
      return v;
    };
    int64_t ng = 0, t = lo;
    for (; t < hi && t % kVW != 0; ++t) {  // up to the first whole vector: one group per token
      key[t] = order_key_flat(vote(t));
      gmax[ng++] = key[t];
    }
    for (; t + kVW * span <= hi; t += kVW * span) {  // vectors never straddle a chunk (kVW divides kChunk)
      vu gm = vu{};
      for (int64_t i = 0; i < span; ++i) {
        const int64_t u = t + i * kVW, c = u / kChunk;
        vf v = ldv<kFloat32>(lg, u) * splatv(fac[c]);
        for (int64_t j = 1; j < g; ++j) v += ldv<kFloat32>(lg + j * L, u) * splatv(fac[j * nch + c]);
        const vu k = order_keys(v);
        __builtin_memcpy(key + u, &k, sizeof k);
        gm = gm > k ? gm : k;
      }
      __builtin_memcpy(gmax + ng, &gm, sizeof gm);
      ng += kVW;
    }
    for (; t < hi; ++t) {  // the tail: one group per token
      key[t] = order_key_flat(vote(t));
      gmax[ng++] = key[t];
    }
    uint32_t kmin, kmax, group_need = need;
    key_range(gmax, nullptr, ng, &kmin, &kmax);
    const uint32_t bound = radix_threshold(gmax, nullptr, ng, kmin, kmax, &group_need, w.cand2);
    int32_t* cand = w.cand;
    const int64_t nc = collect_at_least(key, lo, hi, bound, cand);
    key_range(key, cand, nc, &kmin, &kmax);
    const uint32_t thr = radix_threshold(key, cand, nc, kmin, kmax, &need, w.cand2);
    uint32_t equal_seen = 0;
    for (int64_t c = 0; c < nc; ++c) {  // branch-free compaction (sel has room for one more)
      const int32_t u = cand[c];
      const uint32_t k = key[u];
      sel[n] = u;
      n += (k > thr) | ((k == thr) & (equal_seen < need));
      equal_seen += k == thr;
    }
  }
  for (int64_t t = hi; t < L; ++t) sel[n++] = int32_t(t);
  return n;
}

// Scores of G (<= kGroupTile) query heads against one row-major key row: att[j * n] = q_j . k.
template <int DT, int G>
inline void dot_row(const float* qf, int64_t D, const void* kp, float* att, int64_t n) {
  v8f acc[G];
  for (int j = 0; j < G; ++j) acc[j] = v8f{};
  for (int64_t d = 0; d < D; d += 8) {
    const v8f x = ld8<DT>(kp, d);
    for (int j = 0; j < G; ++j) {
      v8f qv;
      __builtin_memcpy(&qv, qf + j * D + d, sizeof qv);
      acc[j] += qv * x;
    }
  }
  for (int j = 0; j < G; ++j) att[j * n] = hsum8(acc[j]);
}

// acc[j * D + d0 ..][0..CW*8) = sum_s p[j * n + s] * V[row s, d0 : d0 + CW*8] for G (<= kGroupTile) query heads
// (accumulators in registers); row s starts at byte offset voff[s] of vc. Each V line is read once for the G heads.
template <int DT, int G, int CW>
inline void pv_group(const float* p, int64_t n, const int64_t* voff, const char* vc, int64_t D, int64_t d0,
                     float* acc) {
  v8f s8[G][CW];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < CW; ++c) s8[j][c] = v8f{};
  for (int64_t s = 0; s < n; ++s) {
    const void* vp = vc + voff[s];
    v8f x[CW];
    for (int c = 0; c < CW; ++c) x[c] = ld8<DT>(vp, d0 + 8 * c);
    for (int j = 0; j < G; ++j) {
      const v8f pv = splat8(p[j * n + s]);
      for (int c = 0; c < CW; ++c) s8[j][c] += pv * x[c];
    }
  }
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < CW; ++c) st8(acc + j * D + d0 + 8 * c, s8[j][c]);
}

template <int DT, int G>
inline void pv_rows(const float* p, int64_t n, const int64_t* voff, const char* vc, int64_t D, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) pv_group<DT, G, 4>(p, n, voff, vc, D, d0, acc);
  for (; d0 < D; d0 += 8) pv_group<DT, G, 1>(p, n, voff, vc, D, d0, acc);
}

// Exact attention of the group's query heads over the n chosen tokens; writes the output rows.
template <int DT>
void attend(const PagedFasaArgs& a, int64_t r, int64_t h, int64_t n, const float* qf, Scratch& w) {
  const int64_t g = a.H / a.Hkv, D = a.D, bs = a.block_size;
  const int32_t* table = a.block_table + r * a.bt_sr;
  const int32_t* sel = w.sel;
  float* att = w.att;
  float* acc = w.acc;
  const int64_t esz = DT == kFloat32 ? 4 : 2;
  const char* kc = static_cast<const char*>(a.k) + h * a.k_sh * esz;
  const char* vc = static_cast<const char*>(a.v) + h * a.v_sh * esz;
  const bool rows_k = a.k_sd == 1, rows_v = a.v_sd == 1;
  int64_t* koff = w.koff;  // byte offsets of the chosen rows (one division per row, here only)
  int64_t* voff = w.voff;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t t = sel[s], b = table[t / bs], o = t % bs;
    koff[s] = (b * a.k_sb + o * a.k_st) * esz;
    voff[s] = (b * a.v_sb + o * a.v_st) * esz;
  }
  if (rows_k && D % 8 == 0) {  // row-major keys: each chosen row read once for the group, rows prefetched
    for (int64_t s = 0; s < n; ++s) {
      if (s + kPrefetchAhead < n) {
        prefetch_row(kc + koff[s + kPrefetchAhead], D * esz);
        if (rows_v) prefetch_row(vc + voff[s + kPrefetchAhead], D * esz);
      }
      const void* kp = kc + koff[s];
      for_head_tiles(g, [&](int64_t j0, auto G) {
        dot_row<DT, decltype(G)::value>(qf + j0 * D, D, kp, att + j0 * n + s, n);
      });
    }
  } else if (rows_k) {
    for (int64_t s = 0; s < n; ++s) {
      const void* kp = kc + koff[s];
      for (int64_t j = 0; j < g; ++j) {
        const float* qj = qf + j * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qj[d] * ld<DT>(kp, d);
        att[j * n + s] = dot;
      }
    }
  } else {  // e.g. vLLM's K^T blocks: per run of chosen tokens in one block, dimension-major (cache lines reused)
    for (int64_t i = 0; i < g * n; ++i) att[i] = 0.0f;
    for (int64_t s0 = 0; s0 < n;) {
      const int64_t b = sel[s0] / bs;
      int64_t s1 = s0 + 1;
      while (s1 < n && sel[s1] / bs == b) ++s1;
      const void* kp = kc + int64_t(table[b]) * a.k_sb * esz;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t row = d * a.k_sd;
        for (int64_t s = s0; s < s1; ++s) {
          const float x = ld<DT>(kp, row + (sel[s] % bs) * a.k_st);
          for (int64_t j = 0; j < g; ++j) att[j * n + s] += qf[j * D + d] * x;
        }
      }
      s0 = s1;
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* x = att + j * n;
    vf mv = splatv(-INFINITY);
    int64_t s = 0;
    for (; s + kVW <= n; s += kVW) mv = maxv(ldv<kFloat32>(x, s), mv);
    float m = hmaxv(mv);
    for (; s < n; ++s) m = x[s] > m ? x[s] : m;
    float l = 0.0f;
#pragma omp simd reduction(+ : l)
    for (int64_t s = 0; s < n; ++s) {
      x[s] = exp_le0(x[s] - m);
      l += x[s];
    }
    w.denom[j] = l;
  }
  if (rows_v && D % 8 == 0) {  // up to 4 query heads at once: each V line read once per tile of heads
    for_head_tiles(g, [&](int64_t j0, auto G) {
      pv_rows<DT, decltype(G)::value>(att + j0 * n, n, voff, vc, D, acc + j0 * D);
    });
  } else {
    for (int64_t i = 0; i < g * D; ++i) acc[i] = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      const void* vp = vc + voff[s];
      for (int64_t j = 0; j < g; ++j) {
        const float p = att[j * n + s];
        float* aj = acc + j * D;
        if (rows_v) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) aj[d] += p * ld<DT>(vp, d);
        } else {
          for (int64_t d = 0; d < D; ++d) aj[d] += p * ld<DT>(vp, d * a.v_sd);
        }
      }
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    const float l = w.denom[j];
    const int64_t o = r * a.o_sr + (h * g + j) * a.o_sh;
    for (int64_t d = 0; d < D; ++d) {
      const float y = l > 0.0f ? acc[j * D + d] / l : 0.0f;
      if (a.out_dtype == kFloat32) store_from_float<kFloat32>(a.out, o + d, y);
      else if (a.out_dtype == kFloat16) store_from_float<kFloat16>(a.out, o + d, y);
      else store_from_float<kBFloat16>(a.out, o + d, y);
    }
  }
}

// fc[t, i] = k[t, fc_dims[h, i]] (rounded to the FC dtype) for the tokens pack_from <= t < L of unit (r, h).
template <int DT, int FT>
void pack_fc(const PagedFasaArgs& a, int64_t r, int64_t h, int64_t L) {
  const int64_t bs = a.block_size, nd = a.nd;
  const int32_t* table = a.block_table + r * a.bt_sr;
  const int32_t* dims = a.fc_dims + h * nd;
  for (int64_t t = a.pack_from; t < L; ++t) {
    const int64_t b = table[t / bs], o = t % bs;
    const int64_t krow = b * a.k_sb + h * a.k_sh + o * a.k_st, frow = b * a.f_sb + h * a.f_sh + o * a.f_st;
    if (FT == kInt8) {  // symmetric per token: scale = max |x| / 127, q = round_half_even(x / scale)
      float amax = 0.0f;
      for (int64_t i = 0; i < nd; ++i) amax = fmaxf(amax, fabsf(load_as_float<DT>(a.k, krow + dims[i] * a.k_sd)));
      const float scale = amax / 127.0f, div = scale > 0.0f ? scale : 1.0f;
      a.fc_scale[b * a.s_sb + h * a.s_sh + o * a.s_st] = scale;
      for (int64_t i = 0; i < nd; ++i) {
        float q = rintf(load_as_float<DT>(a.k, krow + dims[i] * a.k_sd) / div);
        q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
        static_cast<int8_t*>(a.fc)[frow + i * a.f_sd] = int8_t(q);
      }
    } else {
      for (int64_t i = 0; i < nd; ++i)
        store_from_float<FT>(a.fc, frow + i * a.f_sd, load_as_float<DT>(a.k, krow + dims[i] * a.k_sd));
    }
  }
}

template <int DT, int FT>
void unit_impl(const PagedFasaArgs& a, int64_t unit, Scratch& w) {
  const int64_t r = unit / a.Hkv, h = unit % a.Hkv, g = a.H / a.Hkv, D = a.D;
  const int64_t L = a.seq_lens[r] > 0 ? a.seq_lens[r] : 0;
  if (a.pack_from >= 0) pack_fc<DT, FT>(a, r, h, L);
  float* qf = w.qf;
  for (int64_t j = 0; j < g; ++j)
    for (int64_t d = 0; d < D; ++d) qf[j * D + d] = ld<DT>(a.q, r * a.q_sr + (h * g + j) * a.q_sh + d);
  const int64_t n = choose<FT>(a, r, h, L, qf, w);
  if (a.selected) {
    int32_t* out = a.selected + unit * a.budget;
    for (int64_t s = 0; s < a.budget; ++s) out[s] = s < n ? w.sel[s] : -1;
  }
  for (int64_t i = 0; i < g * D; ++i) qf[i] *= a.scale;
  attend<DT>(a, r, h, n, qf, w);
}

template <int DT>
void unit_fc(const PagedFasaArgs& a, int64_t unit, Scratch& w) {
  if (a.fc_dtype == kFloat32) unit_impl<DT, kFloat32>(a, unit, w);
  else if (a.fc_dtype == kFloat16) unit_impl<DT, kFloat16>(a, unit, w);
  else if (a.fc_dtype == kInt8) unit_impl<DT, kInt8>(a, unit, w);
  else unit_impl<DT, kBFloat16>(a, unit, w);
}

void run_unit(const PagedFasaArgs& a, int64_t unit, Scratch& w) {
  if (a.dtype == kFloat32) unit_fc<kFloat32>(a, unit, w);
  else if (a.dtype == kFloat16) unit_fc<kFloat16>(a, unit, w);
  else unit_fc<kBFloat16>(a, unit, w);
}

}  // namespace TP_FASA_NS
