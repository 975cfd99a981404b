// pybind11 bindings of the CPU kernels: raw addresses (tensor.data_ptr()) in, GIL released while
// the kernel runs, no libtorch link. The Python side (personamoe/backends/cpp_backend.py) checks
// shapes, dtypes and contiguity before any address reaches here.
#include <pybind11/pybind11.h>

#include <cstdint>

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
  m.def("has_openmp", &has_openmp, "Whether the extension was built with OpenMP");
}
