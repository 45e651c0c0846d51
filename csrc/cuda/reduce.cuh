// Block-wide reductions shared by the CUDA kernels: a fixed combination order (warp shuffles,
// then one warp over the per-warp results), so results are deterministic; no atomics.
#pragma once

#include <cuda_runtime.h>

namespace torch_ext {

// v combined over the block with `op`; the result is valid in thread 0. blockDim.x must be a
// multiple of 32 (at most 1024). warp_partials: __shared__ storage for 32 values, which the
// caller must not reuse before a __syncthreads(). shfl(v, offset): __shfl_down_sync of v.
template <typename T, typename Op, typename Shfl>
__device__ T block_reduce(T v, Op op, T* warp_partials, Shfl shfl, T identity) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  // Lane 0 only ever combines lanes that are in range, so the others need no guard.
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, shfl(v, offset));
  if (warps == 1) return v;
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? warp_partials[lane] : identity;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = op(v, shfl(v, offset));
  }
  return v;
}

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* warp_partials) {
  return block_reduce(
      v, [](A a, A b) { return a + b; }, warp_partials,
      [](A x, int offset) { return __shfl_down_sync(0xffffffffu, x, offset); }, A(0));
}

}  // namespace torch_ext
