// pybind11 module `vpo._C`. Torch-free: Python passes tensor.data_ptr() integers, sizes, and for CUDA the stream
// handle torch.cuda.current_stream().cuda_stream. std::invalid_argument surfaces in Python as ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "attention_stats.h"
#include "segment_sum.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

vpo::DType dtype_of(int code) {
  if (code != 0 && code != 1) throw std::invalid_argument("dtype: expected 0 (float32) or 1 (float64)");
  return static_cast<vpo::DType>(code);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vpo C++/CUDA kernels (torch-free ABI: raw pointers, sizes, stream handles).";
#ifdef VPO_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = VPO_CUDA_ARCHS_STR;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif

  m.def(
      "segment_sum_fwd_cpu",
      [](int dtype, std::uintptr_t values, std::uintptr_t weights, std::uintptr_t offsets, int64_t num_segments,
         std::uintptr_t out) {
        py::gil_scoped_release release;
        vpo::segment_sum_fwd_cpu(dtype_of(dtype), ptr<const void>(values), ptr<const void>(weights),
                                 ptr<const int64_t>(offsets), num_segments, ptr<void>(out));
      },
      py::arg("dtype"), py::arg("values"), py::arg("weights"), py::arg("offsets"), py::arg("num_segments"),
      py::arg("out"), "out[s] = sum_{i in segment s} weights[i] * values[i] (weights = 0 pointer means 1).");
  m.def(
      "segment_sum_bwd_cpu",
      [](int dtype, std::uintptr_t grad_out, std::uintptr_t values, std::uintptr_t weights, std::uintptr_t offsets,
         int64_t num_segments, std::uintptr_t grad_values, std::uintptr_t grad_weights) {
        py::gil_scoped_release release;
        vpo::segment_sum_bwd_cpu(dtype_of(dtype), ptr<const void>(grad_out), ptr<const void>(values),
                                 ptr<const void>(weights), ptr<const int64_t>(offsets), num_segments,
                                 ptr<void>(grad_values), ptr<void>(grad_weights));
      },
      py::arg("dtype"), py::arg("grad_out"), py::arg("values"), py::arg("weights"), py::arg("offsets"),
      py::arg("num_segments"), py::arg("grad_values"), py::arg("grad_weights"));
  m.def(
      "image_attention_probs_cpu",
      [](int dtype, std::uintptr_t attn, int64_t batch, int64_t heads, int64_t seq, int64_t stride_b, int64_t stride_h,
         int64_t stride_q, int64_t stride_k, std::uintptr_t image_pos, int64_t num_image, std::uintptr_t query_pos,
         int64_t num_query, std::uintptr_t out) {
        py::gil_scoped_release release;
        vpo::image_attention_probs_cpu(dtype, ptr<const void>(attn), batch, heads, seq, stride_b, stride_h, stride_q,
                                       stride_k, ptr<const int64_t>(image_pos), num_image,
                                       ptr<const int64_t>(query_pos), num_query, ptr<float>(out));
      },
      py::arg("dtype"), py::arg("attn"), py::arg("batch"), py::arg("heads"), py::arg("seq"), py::arg("stride_b"),
      py::arg("stride_h"), py::arg("stride_q"), py::arg("stride_k"), py::arg("image_pos"), py::arg("num_image"),
      py::arg("query_pos"), py::arg("num_query"), py::arg("out"),
      "out[b, t, n] = mean_h attn[b, h, query_pos[b, t], image_pos[b, n]] (float32 out [B, Tq, N_p]; query_pos = 0 "
      "pointer means every row). dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16.");
#ifdef VPO_WITH_CUDA
  m.def(
      "segment_sum_fwd_cuda",
      [](int dtype, std::uintptr_t values, std::uintptr_t weights, std::uintptr_t offsets, int64_t num_segments,
         std::uintptr_t out, std::uintptr_t stream) {
        vpo::segment_sum_fwd_cuda(dtype_of(dtype), ptr<const void>(values), ptr<const void>(weights),
                                  ptr<const int64_t>(offsets), num_segments, ptr<void>(out), stream);
      },
      py::arg("dtype"), py::arg("values"), py::arg("weights"), py::arg("offsets"), py::arg("num_segments"),
      py::arg("out"), py::arg("stream"));
  m.def(
      "segment_sum_bwd_cuda",
      [](int dtype, std::uintptr_t grad_out, std::uintptr_t values, std::uintptr_t weights, std::uintptr_t offsets,
         int64_t num_segments, int64_t num_tokens, std::uintptr_t grad_values, std::uintptr_t grad_weights,
         std::uintptr_t stream) {
        vpo::segment_sum_bwd_cuda(dtype_of(dtype), ptr<const void>(grad_out), ptr<const void>(values),
                                  ptr<const void>(weights), ptr<const int64_t>(offsets), num_segments, num_tokens,
                                  ptr<void>(grad_values), ptr<void>(grad_weights), stream);
      },
      py::arg("dtype"), py::arg("grad_out"), py::arg("values"), py::arg("weights"), py::arg("offsets"),
      py::arg("num_segments"), py::arg("num_tokens"), py::arg("grad_values"), py::arg("grad_weights"),
      py::arg("stream"));
  m.def(
      "image_attention_probs_cuda",
      [](int dtype, std::uintptr_t attn, int64_t batch, int64_t heads, int64_t seq, int64_t stride_b, int64_t stride_h,
         int64_t stride_q, int64_t stride_k, std::uintptr_t image_pos, int64_t num_image, std::uintptr_t query_pos,
         int64_t num_query, std::uintptr_t out, std::uintptr_t stream) {
        vpo::image_attention_probs_cuda(dtype, ptr<const void>(attn), batch, heads, seq, stride_b, stride_h, stride_q,
                                        stride_k, ptr<const int64_t>(image_pos), num_image,
                                        ptr<const int64_t>(query_pos), num_query, ptr<float>(out), stream);
      },
      py::arg("dtype"), py::arg("attn"), py::arg("batch"), py::arg("heads"), py::arg("seq"), py::arg("stride_b"),
      py::arg("stride_h"), py::arg("stride_q"), py::arg("stride_k"), py::arg("image_pos"), py::arg("num_image"),
      py::arg("query_pos"), py::arg("num_query"), py::arg("out"), py::arg("stream"));
#endif
}
