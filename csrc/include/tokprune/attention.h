// Online softmax over a gathered token set, shared by host and CUDA code.
#pragma once

#include "tokprune/common.h"

namespace tokprune {

// exp(a - b) with exp(-inf - b) = 0 (an empty state has m = -inf).
TP_HD float exp_diff(float a, float b) { return a == -INFINITY ? 0.0f : expf(a - b); }

// Softmax state of one row: running max m and running denominator l (accumulator kept by the caller).
struct SoftmaxState {
  float m;
  float l;
};

TP_HD SoftmaxState softmax_empty() { return SoftmaxState{-INFINITY, 0.0f}; }

// Add a score s; returns the factors (alpha for the old accumulator, beta for the new value).
TP_HD SoftmaxState softmax_add(SoftmaxState st, float s, float* alpha, float* beta) {
  float m = st.m > s ? st.m : s;
  *alpha = exp_diff(st.m, m);
  *beta = exp_diff(s, m);
  return SoftmaxState{m, st.l * *alpha + *beta};
}

// Merge two states; returns the factors to apply to each accumulator.
TP_HD SoftmaxState softmax_merge(SoftmaxState x, SoftmaxState y, float* ax, float* ay) {
  float m = x.m > y.m ? x.m : y.m;
  if (m == -INFINITY) {
    *ax = 0.0f;
    *ay = 0.0f;
    return softmax_empty();
  }
  *ax = exp_diff(x.m, m);
  *ay = exp_diff(y.m, m);
  return SoftmaxState{m, x.l * *ax + y.l * *ay};
}

// Final normalisation; a row without any valid token gives zeros.
TP_HD float softmax_finish(float acc, SoftmaxState st) { return st.l > 0.0f ? acc / st.l : 0.0f; }

}  // namespace tokprune
