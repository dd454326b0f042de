// CUDA image-attention statistics (see attention_stats.h).
//
// One thread per output element (b, t, n) of out [B, Tq, N_p], grid-stride over B * Tq * N_p, looping over the H heads:
//   out[b, t, n] = (1 / H) * sum_h attn[b, h, qpos[b, t], ipos[b, n]]
// Consecutive threads take consecutive n, i.e. consecutive image keys: the image tokens of a row are usually one
// contiguous run of positions, so a warp's loads of one head's row are coalesced. Accumulation in float (double for
// float64 inputs); the output is float32. Pure gather, memory bound: B * Tq * N_p * H loads, no reuse to exploit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "attention_stats.h"

namespace vpo {
namespace {

constexpr int kThreads = 256;

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__global__ void gather_mean_kernel(const T* __restrict__ attn, int64_t B, int64_t H, int64_t sb, int64_t sh,
                                   int64_t sq, int64_t sk, const int64_t* __restrict__ ipos, int64_t NP,
                                   const int64_t* __restrict__ qpos, int64_t TQ, float* __restrict__ out) {
  using A = typename Acc<T>::type;
  const int64_t total = B * TQ * NP;
  const A inv_h = A(1) / static_cast<A>(H);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx % NP;  // image key (fastest: coalesced)
    const int64_t bt = idx / NP;  // b * TQ + t
    const int64_t b = bt / TQ;
    const int64_t t = bt - b * TQ;
    const int64_t row = qpos ? qpos[bt] : t;
    const T* p = attn + b * sb + row * sq + ipos[b * NP + n] * sk;  // head 0's element; heads are sh apart
    A acc = A(0);
    for (int64_t h = 0; h < H; ++h) acc += to_acc(p[h * sh]);
    out[idx] = static_cast<float>(acc * inv_h);
  }
}

inline unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const int64_t cap = 65535LL * 16;  // the kernel grid-strides over the rest
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

template <typename T>
void launch(const void* attn, int64_t B, int64_t H, int64_t sb, int64_t sh, int64_t sq, int64_t sk,
            const int64_t* ipos, int64_t NP, const int64_t* qpos, int64_t TQ, float* out, cudaStream_t st) {
  gather_mean_kernel<T><<<grid_for(B * TQ * NP), kThreads, 0, st>>>(static_cast<const T*>(attn), B, H, sb, sh, sq, sk,
                                                                    ipos, NP, qpos, TQ, out);
}

}  // namespace

void image_attention_probs_cuda(int dtype, const void* attn, int64_t batch, int64_t heads, int64_t seq,
                                int64_t stride_b, int64_t stride_h, int64_t stride_q, int64_t stride_k,
                                const int64_t* image_pos, int64_t num_image, const int64_t* query_pos,
                                int64_t num_query, float* out, std::uintptr_t stream) {
  const AttnDType dt = attn_dtype_from_code(dtype);
  check_image_attention_args(attn, batch, heads, seq, stride_b, stride_h, stride_q, stride_k, image_pos, num_image,
                             query_pos, num_query, out);
  if (batch == 0 || num_query == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dt) {
    case AttnDType::kFloat32:
      launch<float>(attn, batch, heads, stride_b, stride_h, stride_q, stride_k, image_pos, num_image, query_pos,
                    num_query, out, st);
      break;
    case AttnDType::kFloat64:
      launch<double>(attn, batch, heads, stride_b, stride_h, stride_q, stride_k, image_pos, num_image, query_pos,
                     num_query, out, st);
      break;
    case AttnDType::kFloat16:
      launch<__half>(attn, batch, heads, stride_b, stride_h, stride_q, stride_k, image_pos, num_image, query_pos,
                     num_query, out, st);
      break;
    case AttnDType::kBFloat16:
      launch<__nv_bfloat16>(attn, batch, heads, stride_b, stride_h, stride_q, stride_k, image_pos, num_image,
                            query_pos, num_query, out, st);
      break;
  }
  check_cuda(cudaGetLastError(), "image_attention_probs_cuda launch");
}

}  // namespace vpo
