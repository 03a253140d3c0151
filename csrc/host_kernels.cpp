// Host (CPU) implementations of the three kernels. They call the same __host__ __device__ math as
// the CUDA kernels (include/tokprune/*.h); only the loops differ (sequential here, blocks on the GPU).
#include <algorithm>
#include <vector>

#include "tokprune/attention.h"
#include "tokprune/kernels.h"
#include "tokprune/topk.h"
#include "tokprune/verify.h"

namespace tokprune {
namespace {

// Depths of one request's nodes; returns the largest depth. Writes -1 for inactive nodes.
int tree_depths(const int32_t* parents, int64_t N, int32_t* depth) {
  int best = 0;
  for (int64_t i = 0; i < N; ++i) {
    int p = parents[i];
    depth[i] = node_depth(int(i), p, (p >= 0 && p < i) ? depth[p] : -1);
    best = std::max(best, int(depth[i]));
  }
  return best;
}

// First active child of cur after node `after` (sibling order); -1 when none.
int64_t next_child(const int32_t* parents, const int32_t* depth, int64_t N, int64_t cur, int64_t after) {
  for (int64_t c = std::max(after, cur) + 1; c < N; ++c)
    if (parents[c] == cur && depth[c] >= 0) return c;
  return -1;
}

template <int DT>
void greedy_impl(const VerifyArgs& a) {
  for (int64_t b = 0; b < a.B; ++b) {
    const int32_t* parents = a.parents + b * a.N;
    const int64_t* tokens = a.tokens + b * a.N;
    int32_t* depth = a.depth + b * a.N;
    int64_t* path = a.accept_index + b * a.N;
    a.max_depth[b] = tree_depths(parents, a.N, depth);
    std::fill(path, path + a.N, int64_t(-1));
    int64_t cur = 0, len = 0;
    path[0] = 0;
    while (true) {
      const void* row = static_cast<const char*>(a.logits) +
                        (b * a.l_sb + cur * a.l_sn) * (DT == kFloat32 ? 4 : 2);
      ArgMax best{load_as_float<DT>(row, 0), 0};
      for (int64_t v = 1; v < a.V; ++v) best = argmax_combine(best, ArgMax{load_as_float<DT>(row, v), v});
      int64_t hit = -1;
      for (int64_t c = next_child(parents, depth, a.N, cur, cur); c >= 0; c = next_child(parents, depth, a.N, cur, c))
        if (tokens[c] == best.index) {
          hit = c;
          break;
        }
      if (hit < 0) {
        a.next_token[b] = best.index;
        break;
      }
      path[++len] = hit;
      cur = hit;
    }
    a.accept_len[b] = len;
  }
}

double sum_of(const std::vector<float>& x) {
  double s = 0.0;
  for (float v : x) s += v;
  return s;
}

}  // namespace

void verify_greedy_host(const VerifyArgs& a) {
  if (a.dtype == kFloat32) greedy_impl<kFloat32>(a);
  else if (a.dtype == kFloat16) greedy_impl<kFloat16>(a);
  else greedy_impl<kBFloat16>(a);
}

void verify_stochastic_host(const VerifyArgs& a) {
  std::vector<float> p(a.V), q(a.V);
  for (int64_t b = 0; b < a.B; ++b) {
    const int32_t* parents = a.parents + b * a.N;
    const int64_t* tokens = a.tokens + b * a.N;
    const float* u = a.uniforms + b * a.N;
    int32_t* depth = a.depth + b * a.N;
    int64_t* path = a.accept_index + b * a.N;
    a.max_depth[b] = tree_depths(parents, a.N, depth);
    std::fill(path, path + a.N, int64_t(-1));
    int64_t cur = 0, len = 0;
    path[0] = 0;
    while (true) {
      // p, q = copies of the target / draft distributions at the node we stand on
      const float* tp = a.target + b * a.t_sb + cur * a.t_sn;
      const float* dp = a.draft + b * a.d_sb + cur * a.d_sn;
      std::copy(tp, tp + a.V, p.begin());
      std::copy(dp, dp + a.V, q.begin());
      int64_t accepted = -1;
      for (int64_t c = next_child(parents, depth, a.N, cur, cur); c >= 0; c = next_child(parents, depth, a.N, cur, c)) {
        int64_t x = tokens[c];
        if (spec_accept(a.rule, u[c], p[x], q[x])) {
          accepted = c;
          break;
        }
        if (a.rule == kTargetOnly) {
          p[x] = 0.0f;
          float s = float(sum_of(p));
          if (s > 0.0f) for (auto& v : p) v = v / s;
        } else {
          double s = 0.0;
          for (int64_t v = 0; v < a.V; ++v) s += residual(p[v], q[v]);
          float sf = float(s);
          if (sf > 0.0f) for (int64_t v = 0; v < a.V; ++v) p[v] = residual(p[v], q[v]) / sf;
          if (a.rule == kRSD) {
            q[x] = 0.0f;
            float sq = float(sum_of(q));
            if (sq > 0.0f) for (auto& v : q) v = v / sq;
          }
        }
      }
      if (accepted < 0) break;
      path[++len] = accepted;
      cur = accepted;
    }
    a.accept_len[b] = len;
    // bonus token from the final p
    float threshold = u[0] * float(sum_of(p));
    double cum = 0.0;
    int64_t next = -1, last_positive = 0;
    for (int64_t v = 0; v < a.V; ++v) {
      cum += p[v];
      if (p[v] > 0.0f) last_positive = v;
      if (next < 0 && bonus_hit(cum, threshold)) next = v;
    }
    a.next_token[b] = next >= 0 ? next : last_positive;
  }
}

namespace {
template <int DT>
void attention_impl(const AttentionArgs& a) {
  const int64_t group = a.H / a.Hkv;
  std::vector<float> q(a.D), acc(a.D);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t kvh = h / group, hi = a.Hi == a.H ? h : kvh;
      for (int64_t d = 0; d < a.D; ++d) q[d] = load_as_float<DT>(a.q, b * a.q_sb + h * a.q_sh + d);
      std::fill(acc.begin(), acc.end(), 0.0f);
      SoftmaxState st = softmax_empty();
      const int32_t* idx = a.indices + (b * a.Hi + hi) * a.K;
      for (int64_t j = 0; j < a.K; ++j) {
        int64_t t = idx[j];
        if (t < 0) continue;
        const int64_t ko = b * a.k_sb + kvh * a.k_sh + t * a.k_st, vo = b * a.v_sb + kvh * a.v_sh + t * a.v_st;
        float dot = 0.0f;
        for (int64_t d = 0; d < a.D; ++d) dot += q[d] * load_as_float<DT>(a.k, ko + d);
        float alpha, beta;
        st = softmax_add(st, dot * a.scale, &alpha, &beta);
        for (int64_t d = 0; d < a.D; ++d) acc[d] = acc[d] * alpha + beta * load_as_float<DT>(a.v, vo + d);
      }
      for (int64_t d = 0; d < a.D; ++d) store_from_float<DT>(a.out, (b * a.H + h) * a.D + d, softmax_finish(acc[d], st));
    }
}
}  // namespace

void sparse_attention_host(const AttentionArgs& a) {
  if (a.dtype == kFloat32) attention_impl<kFloat32>(a);
  else if (a.dtype == kFloat16) attention_impl<kFloat16>(a);
  else attention_impl<kBFloat16>(a);
}

void topk_host(const TopkArgs& a) {
  std::vector<uint32_t> keys(a.N);
  uint32_t hist[kRadixBins];
  for (int64_t r = 0; r < a.R; ++r) {
    if (a.keep == 0) break;
    const float* s = a.scores + r * a.N;
    for (int64_t i = 0; i < a.N; ++i) keys[i] = order_key(s[i]);
    // radix select: the keep-th largest key (prefix) and how many of its equals to take (need)
    uint32_t prefix = 0, mask = 0, need = uint32_t(a.keep);
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      std::fill(hist, hist + kRadixBins, 0u);
      for (int64_t i = 0; i < a.N; ++i)
        if ((keys[i] & mask) == prefix) ++hist[radix_digit(keys[i], shift)];
      prefix |= radix_pick(hist, &need) << shift;
      mask |= uint32_t(kRadixBins - 1) << shift;
    }
    int64_t* out = a.out + r * a.keep;
    int64_t n = 0;
    uint32_t equal_taken = 0;
    for (int64_t i = 0; i < a.N; ++i) {
      bool take = keys[i] > prefix || (keys[i] == prefix && equal_taken++ < need);
      if (take) out[n++] = i;
    }
  }
}

}  // namespace tokprune
