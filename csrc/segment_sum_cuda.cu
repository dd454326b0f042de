// CUDA segmented reduction: one block per segment (grid-stride over segments), warp-shuffle block reduction in fp64
// accumulators for determinism and accuracy; the backward is a grid-stride broadcast over segments.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "segment_sum.h"

namespace vpo {
namespace {

constexpr int kThreads = 256;  // 8 warps: segments are sequences of ~10^2–10^4 tokens

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
__global__ void fwd_kernel(const T* __restrict__ v, const T* __restrict__ w, const int64_t* __restrict__ offsets,
                           int64_t S, T* __restrict__ out) {
  __shared__ double warp_sums[kThreads / 32];
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t begin = offsets[s], end = offsets[s + 1];
    double acc = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      acc += static_cast<double>(w ? w[i] * v[i] : v[i]);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffff, acc, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
      acc = threadIdx.x < (kThreads / 32) ? warp_sums[threadIdx.x] : 0.0;
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffff, acc, off);
      if (threadIdx.x == 0) out[s] = static_cast<T>(acc);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void bwd_kernel(const T* __restrict__ g, const T* __restrict__ v, const T* __restrict__ w,
                           const int64_t* __restrict__ offsets, int64_t S, T* __restrict__ dv, T* __restrict__ dw) {
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const T gs = g[s];
    for (int64_t i = offsets[s] + threadIdx.x; i < offsets[s + 1]; i += blockDim.x) {
      if (dv) dv[i] = w ? w[i] * gs : gs;
      if (dw) dw[i] = v[i] * gs;
    }
  }
}

inline unsigned grid_for(int64_t S) {
  const int64_t cap = 65535LL * 16;  // plenty of blocks; the kernels grid-stride over the rest
  return static_cast<unsigned>(S < cap ? (S > 0 ? S : 1) : cap);
}

}  // namespace

void segment_sum_fwd_cuda(DType dtype, const void* values, const void* weights, const int64_t* offsets,
                          int64_t num_segments, void* out, std::uintptr_t stream) {
  if (num_segments < 0) throw std::invalid_argument("num_segments: expected >= 0, got " + std::to_string(num_segments));
  if (num_segments == 0) return;
  if (offsets == nullptr || out == nullptr) throw std::invalid_argument("offsets/out: expected non-null pointers");
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      fwd_kernel<float><<<grid_for(num_segments), kThreads, 0, st>>>(
          static_cast<const float*>(values), static_cast<const float*>(weights), offsets, num_segments,
          static_cast<float*>(out));
      break;
    case DType::kFloat64:
      fwd_kernel<double><<<grid_for(num_segments), kThreads, 0, st>>>(
          static_cast<const double*>(values), static_cast<const double*>(weights), offsets, num_segments,
          static_cast<double*>(out));
      break;
    default:
      throw std::invalid_argument("dtype: expected 0 (float32) or 1 (float64)");
  }
  check_cuda(cudaGetLastError(), "segment_sum_fwd_cuda launch");
}

void segment_sum_bwd_cuda(DType dtype, const void* grad_out, const void* values, const void* weights,
                          const int64_t* offsets, int64_t num_segments, int64_t /*num_tokens*/, void* grad_values,
                          void* grad_weights, std::uintptr_t stream) {
  if (num_segments < 0) throw std::invalid_argument("num_segments: expected >= 0, got " + std::to_string(num_segments));
  if (num_segments == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      bwd_kernel<float><<<grid_for(num_segments), kThreads, 0, st>>>(
          static_cast<const float*>(grad_out), static_cast<const float*>(values), static_cast<const float*>(weights),
          offsets, num_segments, static_cast<float*>(grad_values), static_cast<float*>(grad_weights));
      break;
    case DType::kFloat64:
      bwd_kernel<double><<<grid_for(num_segments), kThreads, 0, st>>>(
          static_cast<const double*>(grad_out), static_cast<const double*>(values),
          static_cast<const double*>(weights), offsets, num_segments, static_cast<double*>(grad_values),
          static_cast<double*>(grad_weights));
      break;
    default:
      throw std::invalid_argument("dtype: expected 0 (float32) or 1 (float64)");
  }
  check_cuda(cudaGetLastError(), "segment_sum_bwd_cuda launch");
}

}  // namespace vpo
