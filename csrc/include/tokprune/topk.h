// Top-k selection by radix select on order-preserving 32-bit keys, shared by host and CUDA code.
// Selected = the k largest scores, ties to the lower index; output sorted by index.
#pragma once

#include "tokprune/common.h"

namespace tokprune {

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// Order-preserving key: larger float -> larger unsigned key. -0.0 and +0.0 share one key (they tie).
TP_HD uint32_t order_key(float x) {
  if (x == 0.0f) x = 0.0f;
  uint32_t b = float_bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

TP_HD uint32_t radix_digit(uint32_t key, int shift) { return (key >> shift) & (kRadixBins - 1); }

// Given the histogram of the current digit among the candidates (`bins` buckets), pick the digit that holds
// the need-th largest key (1-based); *need becomes the rank within that digit's bucket.
TP_HD uint32_t radix_pick(const uint32_t* hist, uint32_t* need, int bins = kRadixBins) {
  uint32_t above = 0;
  for (int d = bins - 1; d > 0; --d) {
    if (above + hist[d] >= *need) {
      *need -= above;
      return uint32_t(d);
    }
    above += hist[d];
  }
  *need -= above;
  return 0;
}

}  // namespace tokprune
