// Segmented preference-head reduction: per-sequence sums of weighted per-token values.
//
//   out[s] = sum_{i in [offsets[s], offsets[s+1])} w[i] * v[i]          (w == nullptr means w ≡ 1)
//   backward:  dv[i] = w[i] * g[seg(i)],   dw[i] = v[i] * g[seg(i)]
//
// Torch-free ABI: raw pointers, sizes and (for CUDA) a cudaStream_t passed as an integer from Python, so the extension
// builds against any (or no) torch. Segments are contiguous ranges of a flat token array described by CSR offsets
// [S + 1] (offsets[0] == 0, offsets[S] == N, non-decreasing): both padded [R, T] batches (offsets = arange(R+1)*T) and
// packed sequences fit. Reductions are deterministic (one block / one loop per segment, no atomics).
#pragma once
#include <cstdint>

namespace vpo {

enum class DType : int { kFloat32 = 0, kFloat64 = 1 };

// CPU. Throws std::invalid_argument on bad offsets or null pointers.
void segment_sum_fwd_cpu(DType dtype, const void* values, const void* weights, const int64_t* offsets,
                         int64_t num_segments, void* out);
void segment_sum_bwd_cpu(DType dtype, const void* grad_out, const void* values, const void* weights,
                         const int64_t* offsets, int64_t num_segments, void* grad_values, void* grad_weights);

#ifdef VPO_WITH_CUDA
// CUDA. All pointers are device pointers; `stream` is a cudaStream_t. Offsets are trusted (validated by the caller).
void segment_sum_fwd_cuda(DType dtype, const void* values, const void* weights, const int64_t* offsets,
                          int64_t num_segments, void* out, std::uintptr_t stream);
void segment_sum_bwd_cuda(DType dtype, const void* grad_out, const void* values, const void* weights,
                          const int64_t* offsets, int64_t num_segments, int64_t num_tokens, void* grad_values,
                          void* grad_weights, std::uintptr_t stream);
#endif

}  // namespace vpo
