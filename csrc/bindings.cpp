// pybind11 module `vpo._C`. Torch-free: Python passes tensor.data_ptr() integers, sizes, and for CUDA the stream
// handle torch.cuda.current_stream().cuda_stream. std::invalid_argument surfaces in Python as ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>

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
#endif
}
