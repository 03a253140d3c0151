// Shared by the host build (g++) and the CUDA build (nvcc): one copy of the kernel math.
// Everything here is __host__ __device__ under nvcc and plain inline functions under g++.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tokprune/codes.h"

#ifdef __CUDACC__
#define TP_HD __host__ __device__ __forceinline__
#else
#define TP_HD inline
#endif

namespace tokprune {

// dtype codes (DType), verification rule codes (Rule) and kAttnMaxHeadDim come from codes.h, generated
// from tokprune/_codes.py (the one table shared with Python and Triton).

TP_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t b;
  memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

TP_HD float bits_float(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float x;
  memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// ---- 16-bit float storage (raw uint16_t bits), exact conversions, round-to-nearest-even back ----
TP_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

TP_HD uint16_t float_to_bf16(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

TP_HD float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    float f = float(mant) * 5.9604644775390625e-8f;  // subnormal: mant * 2^-24 (exact)
    return sign ? -f : f;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

TP_HD uint16_t float_to_fp16(float f) {
  uint32_t x = float_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal half
    float m = bits_float(a) * 16777216.0f;                // exact scaling by 2^24
    return uint16_t(sign | uint32_t(rintf(m)));           // rintf: round half to even
  }
  uint32_t h = (((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13);
  uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1u;  // carry may reach the exponent
  return uint16_t(sign | h);
}

// Load element i of a float32 / float16 / bfloat16 array as float.
template <int DT>
TP_HD float load_as_float(const void* p, int64_t i) {
  if (DT == kFloat32) return static_cast<const float*>(p)[i];
  if (DT == kFloat16) return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
  return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

template <int DT>
TP_HD void store_from_float(void* p, int64_t i, float v) {
  if (DT == kFloat32) static_cast<float*>(p)[i] = v;
  else if (DT == kFloat16) static_cast<uint16_t*>(p)[i] = float_to_fp16(v);
  else static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
}

}  // namespace tokprune
