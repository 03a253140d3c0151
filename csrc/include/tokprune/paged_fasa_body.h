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

namespace TP_FASA_NS {

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

// Element i of a fp32 / fp16 / bf16 array as float (bf16 by a shift, so that loops vectorise).
template <int DT>
inline float ld(const void* p, int64_t i) {
  if (DT == kBFloat16) return as_float(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
  return load_as_float<DT>(p, i);
}

// logits[j * L + t] for t < L (FC side cache read in place through the block table).
template <int FT>
void fc_logits(const PagedFasaArgs& a, int64_t r, int64_t h, int64_t L, const float* qfc, float* lg) {
  const int64_t g = a.H / a.Hkv, bs = a.block_size, nd = a.nd;
  const int32_t* table = a.block_table + r * a.bt_sr;
  const char* fc = static_cast<const char*>(a.fc);
  const int64_t esz = FT == kFloat32 ? 4 : 2;
  for (int64_t b = 0, t0 = 0; t0 < L; ++b, t0 += bs) {
    const int64_t n = L - t0 < bs ? L - t0 : bs;
    const void* base = fc + (int64_t(table[b]) * a.f_sb + h * a.f_sh) * esz;
    if (a.f_st == 1) {  // dims-major block ([nd, block_size]): 32 tokens at a time, accumulators in registers
      for (int64_t j = 0; j < g; ++j) {
        const float* qj = qfc + j * nd;
        float* out = lg + j * L + t0;
        int64_t t = 0;
        for (; t + 32 <= n; t += 32) {
          float acc[32] = {};
          for (int64_t i = 0; i < nd; ++i) {
            const float qv = qj[i];
            const int64_t row = i * a.f_sd + t;
#pragma omp simd
            for (int tt = 0; tt < 32; ++tt) acc[tt] += qv * ld<FT>(base, row + tt);
          }
          for (int tt = 0; tt < 32; ++tt) out[t + tt] = acc[tt];
        }
        for (; t < n; ++t) {
          float acc = 0.0f;
          for (int64_t i = 0; i < nd; ++i) acc += qj[i] * ld<FT>(base, i * a.f_sd + t);
          out[t] = acc;
        }
      }
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
          lg[j * L + t0 + t] = s;
        }
      }
    }
  }
}

// FASA's vote and top-budget choice; writes the chosen logical tokens ascending into sel, returns their count.
template <int FT>
int64_t choose(const PagedFasaArgs& a, int64_t r, int64_t h, int64_t L, const float* qf, Scratch& w) {
  const int64_t g = a.H / a.Hkv, nd = a.nd, budget = a.budget;
  int32_t* sel = w.sel.data();
  if (budget == 0) return 0;
  if (L <= budget) {
    for (int64_t t = 0; t < L; ++t) sel[t] = int32_t(t);
    return L;
  }
  float* qfc = w.qfc.data();
  const int32_t* dims = a.fc_dims + h * nd;
  for (int64_t j = 0; j < g; ++j)
    for (int64_t i = 0; i < nd; ++i) qfc[j * nd + i] = qf[j * a.D + dims[i]] * a.vote_scale;
  float* lg = w.lg.data();
  fc_logits<FT>(a, r, h, L, qfc, lg);
  float* vote = w.vote.data();
  for (int64_t t = 0; t < L; ++t) vote[t] = 0.0f;
  for (int64_t j = 0; j < g; ++j) {
    float* x = lg + j * L;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < L; ++t) m = x[t] > m ? x[t] : m;
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) x[t] = exp_le0(x[t] - m);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < L; ++t) s += x[t];
    const float inv = 1.0f / s;
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) vote[t] += x[t] * inv;
  }
  const int64_t sink = a.sink < budget ? a.sink : budget;
  const int64_t window = a.window < budget - sink ? a.window : budget - sink;
  for (int64_t t = 0; t < sink; ++t) vote[t] = INFINITY;
  for (int64_t t = L - window; t < L; ++t) vote[t] = INFINITY;
  // radix select of the budget-th largest key (ties to the lower token), over a shrinking candidate list
  uint32_t* key = w.key.data();
  int32_t* cand = w.cand.data();
  for (int64_t t = 0; t < L; ++t) key[t] = order_key(vote[t]);
  int64_t nc = L;
  for (int64_t t = 0; t < L; ++t) cand[t] = int32_t(t);
  uint32_t prefix = 0, mask = 0, need = uint32_t(budget), hist[kRadixBins];
  uint32_t part[4][kRadixBins];  // 4 partial histograms: consecutive equal digits do not chain through memory
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int q = 0; q < 4; ++q)
      for (int d = 0; d < kRadixBins; ++d) part[q][d] = 0;
    int64_t c = 0;
    if (nc == L) {  // the candidates are every token in order: read the keys directly
      for (; c + 4 <= nc; c += 4)
        for (int q = 0; q < 4; ++q) ++part[q][radix_digit(key[c + q], shift)];
      for (; c < nc; ++c) ++part[0][radix_digit(key[c], shift)];
    } else {
      for (; c + 4 <= nc; c += 4)
        for (int q = 0; q < 4; ++q) ++part[q][radix_digit(key[cand[c + q]], shift)];
      for (; c < nc; ++c) ++part[0][radix_digit(key[cand[c]], shift)];
    }
    for (int d = 0; d < kRadixBins; ++d) hist[d] = part[0][d] + part[1][d] + part[2][d] + part[3][d];
    const uint32_t digit = radix_pick(hist, &need);
    prefix |= digit << shift;
    mask |= uint32_t(kRadixBins - 1) << shift;
    if (hist[digit] == uint32_t(nc)) continue;  // every candidate shares this digit: nothing to drop
    int64_t kept = 0;
    for (int64_t c = 0; c < nc; ++c)
      if ((key[cand[c]] & mask) == prefix) cand[kept++] = cand[c];
    nc = kept;
  }
  int64_t n = 0;
  uint32_t equal_taken = 0;
  for (int64_t t = 0; t < L; ++t)
    if (key[t] > prefix || (key[t] == prefix && equal_taken++ < need)) sel[n++] = int32_t(t);
  return n;
}

// Exact attention of the group's query heads over the n chosen tokens; writes the output rows.
template <int DT>
void attend(const PagedFasaArgs& a, int64_t r, int64_t h, int64_t n, const float* qf, Scratch& w) {
  const int64_t g = a.H / a.Hkv, D = a.D, bs = a.block_size;
  const int32_t* table = a.block_table + r * a.bt_sr;
  const int32_t* sel = w.sel.data();
  float* att = w.att.data();
  float* acc = w.acc.data();
  for (int64_t i = 0; i < g * D; ++i) acc[i] = 0.0f;
  const int64_t esz = DT == kFloat32 ? 4 : 2;
  const char* kc = static_cast<const char*>(a.k) + h * a.k_sh * esz;
  const char* vc = static_cast<const char*>(a.v) + h * a.v_sh * esz;
  if (a.k_sd == 1) {  // row-major keys: one dot product per token and query head
    for (int64_t s = 0; s < n; ++s) {
      const int64_t t = sel[s];
      const void* kp = kc + (int64_t(table[t / bs]) * a.k_sb + (t % bs) * a.k_st) * esz;
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
    float m = -INFINITY;
    for (int64_t s = 0; s < n; ++s) m = x[s] > m ? x[s] : m;
    float l = 0.0f;
#pragma omp simd reduction(+ : l)
    for (int64_t s = 0; s < n; ++s) {
      x[s] = exp_le0(x[s] - m);
      l += x[s];
    }
    w.denom[j] = l;
  }
  for (int64_t s = 0; s < n; ++s) {
    const int64_t t = sel[s];
    const void* vp = vc + (int64_t(table[t / bs]) * a.v_sb + (t % bs) * a.v_st) * esz;
    for (int64_t j = 0; j < g; ++j) {
      const float p = att[j * n + s];
      float* aj = acc + j * D;
      if (a.v_sd == 1) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) aj[d] += p * ld<DT>(vp, d);
      } else {
        for (int64_t d = 0; d < D; ++d) aj[d] += p * ld<DT>(vp, d * a.v_sd);
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

template <int DT, int FT>
void unit_impl(const PagedFasaArgs& a, int64_t unit, Scratch& w) {
  const int64_t r = unit / a.Hkv, h = unit % a.Hkv, g = a.H / a.Hkv, D = a.D;
  const int64_t L = a.seq_lens[r] > 0 ? a.seq_lens[r] : 0;
  float* qf = w.qf.data();
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
  else unit_impl<DT, kBFloat16>(a, unit, w);
}

void run_unit(const PagedFasaArgs& a, int64_t unit, Scratch& w) {
  if (a.dtype == kFloat32) unit_fc<kFloat32>(a, unit, w);
  else if (a.dtype == kFloat16) unit_fc<kFloat16>(a, unit, w);
  else unit_fc<kBFloat16>(a, unit, w);
}

}  // namespace TP_FASA_NS
