// CPU image-attention statistics (see attention_stats.h): a gather of N_p image columns from Tq query rows of each
// head's [T, T] probability map, summed over heads in double.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_stats.h"

namespace vpo {
namespace {

// IEEE binary16 -> float, by hand (subnormals, inf and NaN included): the CPU build has no half type.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;  // +-0
    } else {  // subnormal: renormalize the mantissa
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / NaN (payload kept)
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bfloat16 is the top half of a float32.
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct LoadF32 {
  static double load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
struct LoadF64 {
  static double load(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
};
struct LoadF16 {
  static double load(const void* p, int64_t i) { return half_bits_to_float(static_cast<const uint16_t*>(p)[i]); }
};
struct LoadBF16 {
  static double load(const void* p, int64_t i) { return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]); }
};

void check_positions(const char* name, const int64_t* pos, int64_t count, int64_t seq) {
  for (int64_t i = 0; i < count; ++i) {
    if (pos[i] < 0 || pos[i] >= seq) {
      throw std::invalid_argument(std::string(name) + ": expected positions in [0, " + std::to_string(seq) +
                                  "), got " + std::to_string(pos[i]) + " at flat index " + std::to_string(i));
    }
  }
}

template <typename Load>
void gather_mean(const void* attn, int64_t B, int64_t H, int64_t sb, int64_t sh, int64_t sq, int64_t sk,
                 const int64_t* ipos, int64_t NP, const int64_t* qpos, int64_t TQ, float* out) {
  std::vector<double> acc(static_cast<size_t>(NP));
  std::vector<int64_t> key_off(static_cast<size_t>(NP));
  const double inv_h = 1.0 / static_cast<double>(H);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* ip = ipos + b * NP;
    for (int64_t n = 0; n < NP; ++n) key_off[n] = ip[n] * sk;
    for (int64_t t = 0; t < TQ; ++t) {
      const int64_t row = qpos ? qpos[b * TQ + t] : t;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base = b * sb + h * sh + row * sq;  // start of query row `row` of head h
        for (int64_t n = 0; n < NP; ++n) acc[n] += Load::load(attn, base + key_off[n]);
      }
      float* o = out + (b * TQ + t) * NP;
      for (int64_t n = 0; n < NP; ++n) o[n] = static_cast<float>(acc[n] * inv_h);
    }
  }
}

}  // namespace

AttnDType attn_dtype_from_code(int code) {
  if (code < 0 || code > 3) {
    throw std::invalid_argument("dtype: expected 0 (float32), 1 (float64), 2 (float16) or 3 (bfloat16), got " +
                                std::to_string(code));
  }
  return static_cast<AttnDType>(code);
}

void check_image_attention_args(const void* attn, int64_t batch, int64_t heads, int64_t seq, int64_t stride_b,
                                int64_t stride_h, int64_t stride_q, int64_t stride_k, const int64_t* image_pos,
                                int64_t num_image, const int64_t* query_pos, int64_t num_query, const float* out) {
  if (batch < 0) throw std::invalid_argument("batch: expected >= 0, got " + std::to_string(batch));
  if (heads < 1) throw std::invalid_argument("heads: expected >= 1, got " + std::to_string(heads));
  if (seq < 1) throw std::invalid_argument("seq: expected >= 1, got " + std::to_string(seq));
  if (num_image < 1) throw std::invalid_argument("num_image: expected >= 1, got " + std::to_string(num_image));
  if (num_query < 0) throw std::invalid_argument("num_query: expected >= 0, got " + std::to_string(num_query));
  if (query_pos == nullptr && num_query != seq) {
    throw std::invalid_argument("num_query: expected num_query == seq (" + std::to_string(seq) +
                                ") when query_pos is null (every row), got " + std::to_string(num_query));
  }
  if (stride_b < 0 || stride_h < 0 || stride_q < 0 || stride_k < 0) {
    throw std::invalid_argument("stride: expected non-negative element strides, got (" + std::to_string(stride_b) +
                                ", " + std::to_string(stride_h) + ", " + std::to_string(stride_q) + ", " +
                                std::to_string(stride_k) + ")");
  }
  if (batch == 0 || num_query == 0) return;  // nothing is read or written
  if (attn == nullptr) throw std::invalid_argument("attn: expected a non-null pointer");
  if (image_pos == nullptr) throw std::invalid_argument("image_pos: expected a non-null pointer");
  if (out == nullptr) throw std::invalid_argument("out: expected a non-null pointer");
}

void image_attention_probs_cpu(int dtype, const void* attn, int64_t batch, int64_t heads, int64_t seq,
                               int64_t stride_b, int64_t stride_h, int64_t stride_q, int64_t stride_k,
                               const int64_t* image_pos, int64_t num_image, const int64_t* query_pos,
                               int64_t num_query, float* out) {
  const AttnDType dt = attn_dtype_from_code(dtype);
  check_image_attention_args(attn, batch, heads, seq, stride_b, stride_h, stride_q, stride_k, image_pos, num_image,
                             query_pos, num_query, out);
  if (batch == 0 || num_query == 0) return;
  check_positions("image_pos", image_pos, batch * num_image, seq);
  if (query_pos != nullptr) check_positions("query_pos", query_pos, batch * num_query, seq);
  const auto run = [&](auto load) {
    using Load = decltype(load);
    gather_mean<Load>(attn, batch, heads, stride_b, stride_h, stride_q, stride_k, image_pos, num_image,
                      query_pos, num_query, out);
  };
  switch (dt) {
    case AttnDType::kFloat32: run(LoadF32{}); break;
    case AttnDType::kFloat64: run(LoadF64{}); break;
    case AttnDType::kFloat16: run(LoadF16{}); break;
    case AttnDType::kBFloat16: run(LoadBF16{}); break;
  }
}

}  // namespace vpo
