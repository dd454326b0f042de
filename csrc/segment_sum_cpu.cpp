#include <stdexcept>
#include <string>

#include "segment_sum.h"

namespace vpo {
namespace {

void check_offsets(const int64_t* offsets, int64_t num_segments) {
  if (offsets == nullptr) throw std::invalid_argument("offsets: expected a non-null pointer");
  if (num_segments < 0) throw std::invalid_argument("num_segments: expected >= 0, got " + std::to_string(num_segments));
  if (offsets[0] != 0) throw std::invalid_argument("offsets[0]: expected 0, got " + std::to_string(offsets[0]));
  for (int64_t s = 0; s < num_segments; ++s) {
    if (offsets[s + 1] < offsets[s]) {
      throw std::invalid_argument("offsets: expected non-decreasing values, got offsets[" + std::to_string(s + 1) +
                                  "] = " + std::to_string(offsets[s + 1]) + " < offsets[" + std::to_string(s) +
                                  "] = " + std::to_string(offsets[s]));
    }
  }
}

template <typename T>
void fwd(const T* v, const T* w, const int64_t* offsets, int64_t S, T* out) {
  for (int64_t s = 0; s < S; ++s) {
    // Accumulate in double whatever the storage type: sequences can be long and log-probs large.
    double acc = 0.0;
    for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) acc += static_cast<double>(w ? w[i] * v[i] : v[i]);
    out[s] = static_cast<T>(acc);
  }
}

template <typename T>
void bwd(const T* g, const T* v, const T* w, const int64_t* offsets, int64_t S, T* dv, T* dw) {
  for (int64_t s = 0; s < S; ++s) {
    const T gs = g[s];
    for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) {
      if (dv) dv[i] = w ? w[i] * gs : gs;
      if (dw) dw[i] = v[i] * gs;
    }
  }
}

}  // namespace

void segment_sum_fwd_cpu(DType dtype, const void* values, const void* weights, const int64_t* offsets,
                         int64_t num_segments, void* out) {
  check_offsets(offsets, num_segments);
  if (num_segments > 0 && (values == nullptr && offsets[num_segments] > 0))
    throw std::invalid_argument("values: expected a non-null pointer");
  if (num_segments > 0 && out == nullptr) throw std::invalid_argument("out: expected a non-null pointer");
  switch (dtype) {
    case DType::kFloat32:
      fwd(static_cast<const float*>(values), static_cast<const float*>(weights), offsets, num_segments,
          static_cast<float*>(out));
      break;
    case DType::kFloat64:
      fwd(static_cast<const double*>(values), static_cast<const double*>(weights), offsets, num_segments,
          static_cast<double*>(out));
      break;
    default:
      throw std::invalid_argument("dtype: expected 0 (float32) or 1 (float64), got " +
                                  std::to_string(static_cast<int>(dtype)));
  }
}

void segment_sum_bwd_cpu(DType dtype, const void* grad_out, const void* values, const void* weights,
                         const int64_t* offsets, int64_t num_segments, void* grad_values, void* grad_weights) {
  check_offsets(offsets, num_segments);
  if (num_segments > 0 && grad_out == nullptr) throw std::invalid_argument("grad_out: expected a non-null pointer");
  if (grad_weights != nullptr && values == nullptr)
    throw std::invalid_argument("values: expected a non-null pointer when grad_weights is requested");
  switch (dtype) {
    case DType::kFloat32:
      bwd(static_cast<const float*>(grad_out), static_cast<const float*>(values), static_cast<const float*>(weights),
          offsets, num_segments, static_cast<float*>(grad_values), static_cast<float*>(grad_weights));
      break;
    case DType::kFloat64:
      bwd(static_cast<const double*>(grad_out), static_cast<const double*>(values),
          static_cast<const double*>(weights), offsets, num_segments, static_cast<double*>(grad_values),
          static_cast<double*>(grad_weights));
      break;
    default:
      throw std::invalid_argument("dtype: expected 0 (float32) or 1 (float64), got " +
                                  std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace vpo
