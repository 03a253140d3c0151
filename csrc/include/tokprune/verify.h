// Speculative tree verification: the per-element math and decisions shared by host and CUDA code.
// Contract (the docstring of tokprune.ops.spec): node 0 is the root, parents[i] < i or -1 (padding),
// children are visited in increasing node index.
#pragma once

#include "tokprune/common.h"

namespace tokprune {

// Depth of node i given its parent's depth; -1 marks an inactive node (padding, or below padding).
TP_HD int node_depth(int i, int parent, int parent_depth) {
  if (i == 0) return 0;
  if (parent < 0 || parent >= i || parent_depth < 0) return -1;
  return parent_depth + 1;
}

// Argmax order: larger value first, NaN above everything (like torch.argmax), ties to lower index.
TP_HD bool argmax_better(float a, int64_t ia, float b, int64_t ib) {
  bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

struct ArgMax {
  float value;
  int64_t index;
};

TP_HD ArgMax argmax_combine(ArgMax x, ArgMax y) { return argmax_better(y.value, y.index, x.value, x.index) ? y : x; }

// Acceptance test of draft token x with uniform u against the current target p and draft q.
TP_HD bool spec_accept(int rule, float u, float p_x, float q_x) {
  return rule == kTargetOnly ? (u < p_x) : (u * q_x < p_x);
}

// max(p - q, 0): the residual distribution before normalisation.
TP_HD float residual(float p, float q) {
  float r = p - q;
  return r > 0.0f ? r : 0.0f;
}

// Bonus-token test: cumsum(p)[v] > u0 * sum(p), both rounded to float as torch does.
TP_HD bool bonus_hit(double cum, float threshold) { return float(cum) > threshold; }

}  // namespace tokprune
