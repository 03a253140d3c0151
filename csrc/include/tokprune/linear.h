// Small-M fp32 linear y[M, N] = x[M, K] @ W[N, K]^T (+ bias), host (CPU) kernel (csrc/linear_host.cpp).
#pragma once

#include <stdint.h>

namespace tokprune {

struct LinearArgs {
  int64_t M = 0, N = 0, K = 0;
  const float* x = nullptr;     // [M, K], row stride x_sm, last dim contiguous
  int64_t x_sm = 0;
  const float* w = nullptr;     // [N, K], row stride w_sn, last dim contiguous
  int64_t w_sn = 0;
  const float* bias = nullptr;  // optional [N] contiguous
  float* y = nullptr;           // [M, N], row stride y_sm, last dim contiguous
  int64_t y_sm = 0;
  int threads = 1;              // OpenMP threads over blocks of N (results do not depend on it)
};

void linear_small_m_host(const LinearArgs& a);
// The instruction set the kernel runs with on this machine: "avx512f", "avx2" or "base" (the best the CPU has,
// capped by $TOKPRUNE_LINEAR_ISA = "base" | "avx2" when set; read once per process).
const char* linear_small_m_isa();

}  // namespace tokprune
