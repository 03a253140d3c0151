// Small CUDA helpers shared by the .cu files (nvcc only).
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <stdexcept>
#include <string>

namespace tokprune {

inline void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& x, const T& y) const { return x + y; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& x, const T& y) const { return y < x ? y : x; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& x, const T& y) const { return y > x ? y : x; }
};

// Block-wide reduction whose result every thread receives. Ends with a barrier, so temp storage and
// the broadcast slot can be reused immediately.
template <typename T, int THREADS, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, typename cub::BlockReduce<T, THREADS>::TempStorage& tmp,
                                             T* slot) {
  T r = cub::BlockReduce<T, THREADS>(tmp).Reduce(v, op);
  if (threadIdx.x == 0) *slot = r;
  __syncthreads();
  T out = *slot;
  __syncthreads();
  return out;
}

}  // namespace tokprune
