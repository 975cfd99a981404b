// pybind11 bindings of the CPU kernels: raw addresses (tensor.data_ptr()) in, GIL released while
// the kernel runs, no libtorch link. The Python side (personamoe/backends/cpp_backend.py) checks
// shapes, dtypes and contiguity before any address reaches here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "layer.h"
#include "routing.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void route_tokens_py(std::uintptr_t h, int64_t T, int64_t E, int64_t r, std::uintptr_t calibration,
                     std::uintptr_t persona_bias, std::uintptr_t persona_ids, int64_t P, int64_t k,
                     double temperature, int normalize, std::uintptr_t topk_idx,
                     std::uintptr_t topk_gates, std::uintptr_t scores, int num_threads) {
  py::gil_scoped_release release;
  personamoe::route_tokens(ptr<const float>(h), T, E, r, ptr<const float>(calibration),
                           ptr<const float>(persona_bias), ptr<const int64_t>(persona_ids), P, k,
                           static_cast<float>(temperature),
                           static_cast<personamoe::Normalize>(normalize), ptr<int32_t>(topk_idx),
                           ptr<float>(topk_gates), ptr<float>(scores), num_threads);
}

// One call for the layer's adapter part (layer.h). Dims: (T, d_in, d_out, E, r, k);
// dtype 0/1/2 = fp32/bf16/fp16; ids_kind 0 = none, 1 = int32, 2 = int64; mode 0 = token, 1 = fixed.
// weight/bias 0: y already holds the base output; else the kernel computes it (layer.h).
// h_in 0: the kernel runs the shrink; else h = x A^T [T, E*r] fp32 precomputed by the caller.
void layer_forward_py(int64_t T, int64_t d_in, int64_t d_out, int64_t E, int64_t r, int64_t k,
                      int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t lora_a,
                      std::uintptr_t lora_b, std::uintptr_t scaling, std::uintptr_t calibration,
                      std::uintptr_t table, int64_t P, std::uintptr_t persona_ids, int ids_kind,
                      int mode, double temperature, int normalize, std::uintptr_t y,
                      int64_t y_stride, std::uintptr_t topk_idx, std::uintptr_t topk_gates,
                      std::uintptr_t scores, int num_threads, std::uintptr_t weight,
                      std::uintptr_t bias, std::uintptr_t h_in) {
  personamoe::LayerArgs a;
  a.T = T;
  a.d_in = d_in;
  a.d_out = d_out;
  a.E = E;
  a.r = r;
  a.k = k;
  a.dtype = static_cast<personamoe::DType>(dtype);
  a.x = ptr<const void>(x);
  a.x_stride = x_stride;
  a.lora_a = ptr<const void>(lora_a);
  a.lora_b = ptr<const void>(lora_b);
  a.scaling = ptr<const float>(scaling);
  a.calibration = ptr<const float>(calibration);
  a.table = ptr<const float>(table);
  a.P = P;
  a.persona_ids = ids_kind == 0 ? nullptr : ptr<const void>(persona_ids);
  a.ids_int32 = ids_kind == 1;
  a.fixed = mode == 1;
  a.temperature = static_cast<float>(temperature);
  a.normalize = normalize;
  a.y = ptr<void>(y);
  a.y_stride = y_stride;
  a.topk_idx = ptr<int32_t>(topk_idx);
  a.topk_gates = ptr<float>(topk_gates);
  a.scores = ptr<float>(scores);
  a.num_threads = num_threads;
  a.weight = ptr<const void>(weight);
  a.bias = ptr<const void>(bias);
  a.h_in = ptr<const float>(h_in);
  py::gil_scoped_release release;
  personamoe::layer_forward(a);
}

void shrink_only_py(int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t w, int64_t T,
                    int64_t d_in, int64_t rows, std::uintptr_t h, int num_threads) {
  py::gil_scoped_release release;
  personamoe::shrink_only(static_cast<personamoe::DType>(dtype), ptr<const void>(x), x_stride,
                          ptr<const void>(w), T, d_in, rows, ptr<float>(h), num_threads);
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "personamoe CPU kernels (raw pointers; see personamoe/backends/cpp_backend.py)";
  m.def("route_tokens", &route_tokens_py, "Scores, top-k and gates from h [T, E, r] fp32",
        py::arg("h"), py::arg("T"), py::arg("E"), py::arg("r"), py::arg("calibration"),
        py::arg("persona_bias"), py::arg("persona_ids"), py::arg("P"), py::arg("k"),
        py::arg("temperature"), py::arg("normalize"), py::arg("topk_idx"), py::arg("topk_gates"),
        py::arg("scores"), py::arg("num_threads"));
  m.def("layer_forward", &layer_forward_py,
        "The fused adapter part of the layer (shrink, route, mix) added into y; see layer.h");
  m.def("shrink_only", &shrink_only_py, "h [T, rows] fp32 = x @ w^T with the layer's micro-kernel");
  m.def(
      "force_isa",
      [](const std::string& name) -> py::object {
        const char* got = personamoe::force_isa(name.c_str());
        if (!got) return py::none();
        return py::str(got);
      },
      "Switch the vectorised path (generic/avx2/avx512/best); None when the CPU lacks it");
  m.def("active_isa", &personamoe::active_isa, "The vectorised path in use: avx512, avx2 or generic");
  m.def("has_openmp", &has_openmp, "Whether the extension was built with OpenMP");
}
