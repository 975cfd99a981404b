// pybind11 bindings of the CPU kernels: LayerArgs filled by field name (addresses from
// tensor.data_ptr(); csrc/common/bind_struct.h), the GIL released while the kernel runs, no
// libtorch link. The Python side
// (personamoe/backends/cpp_backend.py) checks shapes, dtypes and contiguity before any address
// reaches here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/bind_codes.h"
#include "common/bind_struct.h"
#include "layer.h"

namespace py = pybind11;
using personamoe::LayerArgs;

namespace {

void bind_layer_args(py::module_& m) {
  personamoe::StructBinding<LayerArgs>(
      m, "LayerArgs",
      "One call of the fused layer (csrc/layer.h), by field name: LayerArgs(T=..., x=addr, ...). "
      "Pointer fields are addresses (tensor.data_ptr(), 0 = none).")
      .field("T", &LayerArgs::T)
      .field("d_in", &LayerArgs::d_in)
      .field("d_out", &LayerArgs::d_out)
      .field("E", &LayerArgs::E)
      .field("r", &LayerArgs::r)
      .field("k", &LayerArgs::k)
      .field("dtype", &LayerArgs::dtype)
      .address("x", &LayerArgs::x)
      .field("x_stride", &LayerArgs::x_stride)
      .address("lora_a", &LayerArgs::lora_a)
      .address("lora_b", &LayerArgs::lora_b)
      .address("scaling", &LayerArgs::scaling)
      .address("calibration", &LayerArgs::calibration)
      .address("table", &LayerArgs::table)
      .field("P", &LayerArgs::P)
      .address("persona_ids", &LayerArgs::persona_ids)
      .field("ids_dtype", &LayerArgs::ids_dtype)
      .field("mode", &LayerArgs::mode)
      .field("temperature", &LayerArgs::temperature)
      .field("normalize", &LayerArgs::normalize)
      .address("weight", &LayerArgs::weight)
      .address("bias", &LayerArgs::bias)
      .address("y", &LayerArgs::y)
      .field("y_stride", &LayerArgs::y_stride)
      .address("h", &LayerArgs::h)
      .field("h_stride", &LayerArgs::h_stride)
      .address("topk_idx", &LayerArgs::topk_idx)
      .address("topk_gates", &LayerArgs::topk_gates)
      .address("scores", &LayerArgs::scores)
      .field("num_threads", &LayerArgs::num_threads)
      .done();
}

// layer_forward(args: LayerArgs) or layer_forward(**fields) (the hot path: no LayerArgs object).
PyObject* layer_forward_py(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  LayerArgs a{};
  if (nargs == 1 && kwnames == nullptr)
    a = py::handle(args[0]).cast<const LayerArgs&>();
  else if (nargs == 0)
    personamoe::StructFields<LayerArgs>::instance().fill(a, args, kwnames);
  else
    throw py::type_error("layer_forward(args: LayerArgs) or layer_forward(**fields of LayerArgs)");
  {
    py::gil_scoped_release release;
    personamoe::layer_forward(a);
  }
  Py_RETURN_NONE;
}

// Kept for benchmarks/bench_layer.py --base-in-kernel, which passes the dtype as its int code.
void shrink_only_py(int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t w, int64_t T,
                    int64_t d_in, int64_t rows, std::uintptr_t h, int num_threads) {
  py::gil_scoped_release release;
  personamoe::shrink_only(static_cast<personamoe::DType>(dtype), reinterpret_cast<const void*>(x),
                          x_stride, reinterpret_cast<const void*>(w), T, d_in, rows,
                          reinterpret_cast<float*>(h), num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "personamoe CPU kernels (raw addresses; see personamoe/backends/cpp_backend.py)";
  personamoe::bind_codes(m);
  bind_layer_args(m);
  personamoe::def_fastcall<&layer_forward_py>(
      m, "layer_forward",
      "layer_forward(args: LayerArgs) or layer_forward(**fields): the fused layer (shrink, route, "
      "mix; the base too when weight != 0) into y, GIL released (csrc/layer.h)");
  m.def("shrink_only", &shrink_only_py,
        "h [T, rows] fp32 = x @ w^T with the layer's micro-kernel (a measurement hook)");
  m.def(
      "force_isa",
      [](const std::string& name) -> py::object {
        const char* got = personamoe::force_isa(name.c_str());
        if (!got) return py::none();
        return py::str(got);
      },
      "Switch the vectorised path (generic/avx2/avx512/best); None when the CPU lacks it");
  m.def("active_isa", &personamoe::active_isa, "The vectorised path in use: avx512, avx2 or generic");
}
