// Image-attention statistics from materialized attention probabilities (SPEC.md, Cat-PO; "image-attention stats" (a)).
//
//   out[b, t, n] = (1 / H) * sum_h attn[b, h, qpos[b, t], ipos[b, n]]          out: [B, Tq, N_p] float32
//
// attn [B, H, T, T] is one layer's attention probabilities (query rows, key columns), addressed through element strides
// (stride_b, stride_h, stride_q, stride_k) so a non-contiguous view needs no copy. ipos [B, N_p] int64 are the image
// key positions; qpos [B, Tq] int64 the query rows (nullptr means every row: Tq == T and qpos[b, t] = t).
// Accumulation over heads: double on the CPU, float on CUDA (double for float64 inputs); the output is float32.
//
// Torch-free ABI, like segment_sum.h: raw pointers, sizes, and (CUDA) a cudaStream_t passed as an integer.
// float16 / bfloat16 are read as raw 16-bit words and converted by hand on the CPU (no torch, no <cuda_fp16.h> there),
// so Python never upcasts the [B, H, T, T] map.
#pragma once
#include <cstdint>

namespace vpo {

// Storage dtype codes shared with Python (0 and 1 agree with segment_sum's DType).
enum class AttnDType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Checked conversion from the integer code Python passes; throws std::invalid_argument naming `dtype`.
AttnDType attn_dtype_from_code(int code);

// Size/stride/pointer checks shared by the CPU and CUDA entry points (positions are not read here).
void check_image_attention_args(const void* attn, int64_t batch, int64_t heads, int64_t seq, int64_t stride_b,
                                int64_t stride_h, int64_t stride_q, int64_t stride_k, const int64_t* image_pos,
                                int64_t num_image, const int64_t* query_pos, int64_t num_query, const float* out);

// CPU. Validates everything it reads (sizes, strides, null pointers, every position in [0, T)); throws
// std::invalid_argument naming the argument.
void image_attention_probs_cpu(int dtype, const void* attn, int64_t batch, int64_t heads, int64_t seq,
                               int64_t stride_b, int64_t stride_h, int64_t stride_q, int64_t stride_k,
                               const int64_t* image_pos, int64_t num_image, const int64_t* query_pos,
                               int64_t num_query, float* out);

#ifdef VPO_WITH_CUDA
// CUDA. Pointers are device pointers; `stream` is a cudaStream_t. Sizes and strides are checked here; the positions are
// device memory and trusted (the Python wrapper checks them). One thread per output element (b, t, n), grid-stride,
// looping over the heads.
void image_attention_probs_cuda(int dtype, const void* attn, int64_t batch, int64_t heads, int64_t seq,
                                int64_t stride_b, int64_t stride_h, int64_t stride_q, int64_t stride_k,
                                const int64_t* image_pos, int64_t num_image, const int64_t* query_pos,
                                int64_t num_query, float* out, std::uintptr_t stream);
#endif

}  // namespace vpo
