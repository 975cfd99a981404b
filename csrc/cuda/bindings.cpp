// pybind11 bindings of the CUDA decode kernel: DecodeParams filled by field name (addresses from
// tensor.data_ptr(); ../common/bind_struct.h) and the current stream as an integer, the GIL
// released during the launch, no libtorch link. The Python side
// (personamoe/backends/cuda_launch.py) checks shapes, dtypes, devices and alignment first.
// tests/test_cuda_emulated.py builds this same file against the CPU emulation (emu/).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/bind_codes.h"
#include "../common/bind_struct.h"
#include "decode.h"

namespace py = pybind11;
using personamoe_cuda::DecodeParams;

namespace {

void bind_decode_params(py::module_& m) {
  personamoe::StructBinding<DecodeParams>(
      m, "DecodeParams",
      "One launch of the decode kernel (csrc/cuda/decode.h), by field name: "
      "DecodeParams(T=..., x=addr, ...). Pointer fields are addresses (data_ptr(), 0 = none).")
      .address("x", &DecodeParams::x)
      .field("x_stride", &DecodeParams::x_stride)
      .address("a", &DecodeParams::a)
      .address("b", &DecodeParams::b)
      .address("scaling", &DecodeParams::scaling)
      .address("calibration", &DecodeParams::calibration)
      .address("table", &DecodeParams::table)
      .address("ids", &DecodeParams::ids)
      .field("scaling_dtype", &DecodeParams::scaling_dtype)
      .field("calibration_dtype", &DecodeParams::calibration_dtype)
      .field("table_dtype", &DecodeParams::table_dtype)
      .field("ids_dtype", &DecodeParams::ids_dtype)
      .field("P", &DecodeParams::P)
      .address("weight", &DecodeParams::weight)
      .field("w_stride", &DecodeParams::w_stride)
      .address("bias", &DecodeParams::bias)
      .address("y", &DecodeParams::y)
      .address("topk_idx", &DecodeParams::topk_idx)
      .address("topk_gates", &DecodeParams::topk_gates)
      .address("scores", &DecodeParams::scores)
      .address("h_ws", &DecodeParams::h_ws)
      .address("counters", &DecodeParams::counters)
      .field("T", &DecodeParams::T)
      .field("d_in", &DecodeParams::d_in)
      .field("d_out", &DecodeParams::d_out)
      .field("E", &DecodeParams::E)
      .field("r", &DecodeParams::r)
      .field("k", &DecodeParams::k)
      .field("temperature", &DecodeParams::temperature)
      .field("normalize", &DecodeParams::normalize)
      .field("mode", &DecodeParams::mode)
      .field("dtype", &DecodeParams::dtype)
      .field("vec", &DecodeParams::vec)
      .field("vec_b", &DecodeParams::vec_b)
      .done();
}

// decode(params: DecodeParams, stream) or decode(stream, **fields) (the hot path: no object).
PyObject* decode_py(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  DecodeParams p{};
  std::uintptr_t stream = 0;
  if (nargs == 2 && kwnames == nullptr) {
    p = py::handle(args[0]).cast<const DecodeParams&>();
    stream = py::handle(args[1]).cast<std::uintptr_t>();
  } else if (nargs == 1) {
    stream = py::handle(args[0]).cast<std::uintptr_t>();
    personamoe::StructFields<DecodeParams>::instance().fill(p, args + 1, kwnames);
  } else {
    throw py::type_error("decode(params: DecodeParams, stream) or decode(stream, **fields)");
  }
  std::string err;
  {
    py::gil_scoped_release release;
    err = personamoe_cuda::launch_decode(p, stream);
  }
  if (!err.empty()) throw std::runtime_error(err);
  Py_RETURN_NONE;
}

}  // namespace

// tests/test_cuda_emulated.py builds this file under another module name, so that the emulated
// module and a real _C_cuda imported earlier in the same process do not share one import slot.
#ifndef PERSONAMOE_CUDA_MODULE
#define PERSONAMOE_CUDA_MODULE _C_cuda
#endif

PYBIND11_MODULE(PERSONAMOE_CUDA_MODULE, m) {
  m.doc() = "personamoe CUDA kernels (raw addresses; see personamoe/backends/cuda_launch.py)";
  personamoe::bind_codes(m);
  bind_decode_params(m);
  personamoe::def_fastcall<&decode_py>(
      m, "decode",
      "decode(params, stream) or decode(stream, **fields of DecodeParams): shrink, route and mix "
      "of T <= 16 tokens in one launch (and the base layer when weight != 0)");
  m.def("runtime_version", &personamoe_cuda::runtime_version,
        "CUDA runtime version linked in (needs no driver)");
  m.attr("MAX_TOKENS") = personamoe_cuda::kMaxTokens;
  m.attr("MAX_EXPERTS") = personamoe_cuda::kMaxExperts;
  m.attr("MAX_RANK") = personamoe_cuda::kMaxRank;
}
