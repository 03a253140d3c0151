// Small CUDA helpers shared by the .cu files (nvcc only).
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <stdexcept>
#include <string>

namespace tokprune {

// Launch errors (bad configuration, no kernel image for this GPU) are reported by cudaGetLastError at
// once. Errors while the kernel runs (illegal address, trap) surface at the next synchronising call,
// possibly far from the op; with sync = true (tokprune debug mode or TOKPRUNE_CUDA_SYNC=1, decided in
// tokprune/kernels/cuda.py) the stream is synchronised here so they are raised by the op that caused them.
inline void check_launch(const char* op, cudaStream_t stream, bool sync) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err));
  if (!sync) return;
  err = cudaStreamSynchronize(stream);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": CUDA kernel failed (caught by the synchronising debug mode): " +
                             cudaGetErrorString(err));
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
