// pybind11 bindings of the CUDA decode kernel: raw addresses (tensor.data_ptr()) and the current
// stream as integers, GIL released during the launch, no libtorch link. The Python side
// (personamoe/backends/cuda_launch.py) checks shapes, dtypes, devices and alignment first.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "decode.h"

namespace py = pybind11;
using personamoe_cuda::DecodeParams;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void decode_py(std::uintptr_t x, int64_t x_stride, std::uintptr_t a, std::uintptr_t b,
               std::uintptr_t scaling, int scaling_dtype, std::uintptr_t calibration,
               int calibration_dtype, std::uintptr_t table, int table_dtype, std::uintptr_t ids,
               int ids_dtype, int64_t P, std::uintptr_t weight, int64_t w_stride,
               std::uintptr_t bias, std::uintptr_t y, std::uintptr_t topk_idx,
               std::uintptr_t topk_gates, std::uintptr_t scores, std::uintptr_t h_ws,
               std::uintptr_t coef_ws, std::uintptr_t used_ws, std::uintptr_t counters, int T,
               int d_in, int d_out, int E, int r, int k, double temperature, int normalize,
               bool fixed, int dtype, bool vec, std::uintptr_t stream) {
  DecodeParams p{};
  p.x = ptr<const void>(x);
  p.x_stride = x_stride;
  p.a = ptr<const void>(a);
  p.b = ptr<const void>(b);
  p.scaling = ptr<const void>(scaling);
  p.calibration = ptr<const void>(calibration);
  p.table = ptr<const void>(table);
  p.ids = ptr<const void>(ids);
  p.scaling_dtype = scaling_dtype;
  p.calibration_dtype = calibration_dtype;
  p.table_dtype = table_dtype;
  p.ids_dtype = ids_dtype;
  p.P = P;
  p.weight = ptr<const void>(weight);
  p.w_stride = w_stride;
  p.bias = ptr<const void>(bias);
  p.y = ptr<void>(y);
  p.topk_idx = ptr<int32_t>(topk_idx);
  p.topk_gates = ptr<float>(topk_gates);
  p.scores = ptr<float>(scores);
  p.h_ws = ptr<float>(h_ws);
  p.coef_ws = ptr<float>(coef_ws);
  p.used_ws = ptr<int32_t>(used_ws);
  p.counters = ptr<uint32_t>(counters);
  p.T = T;
  p.d_in = d_in;
  p.d_out = d_out;
  p.E = E;
  p.r = r;
  p.k = k;
  p.temperature = static_cast<float>(temperature);
  p.normalize = normalize;
  p.fixed = fixed ? 1 : 0;
  std::string err;
  {
    py::gil_scoped_release release;
    err = personamoe_cuda::launch_decode(p, dtype, vec, stream);
  }
  if (!err.empty()) throw std::runtime_error(err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "personamoe CUDA kernels (raw addresses; see personamoe/backends/cuda_launch.py)";
  m.def("decode", &decode_py, "Shrink, route and mix of T <= 16 tokens in one launch (and the base layer when weight != 0)");
  m.def("runtime_version", &personamoe_cuda::runtime_version,
        "CUDA runtime version linked in (needs no driver)");
  m.attr("MAX_TOKENS") = personamoe_cuda::kMaxTokens;
  m.attr("MAX_EXPERTS") = personamoe_cuda::kMaxExperts;
  m.attr("MAX_RANK") = personamoe_cuda::kMaxRank;
}
