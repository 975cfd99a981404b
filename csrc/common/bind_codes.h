// pybind11 side of codes.h: exports DType, Normalize and Mode into a module. The member names are
// the Python spellings (torch dtype names, personamoe/options.py values), so the Python launchers
// look members up by those names (personamoe/backends/kernel_codes.py) instead of copying numbers.
//
// module_local: _C and _C_cuda (and the emulated build of _C_cuda in the tests) each register
// their own Python types; a global registration would clash when the second module is imported.
// So an enum member of one module is not accepted by the other: take members from the module
// that is called (kernel_codes.py caches them per module).
#pragma once

#include <pybind11/pybind11.h>

#include "codes.h"

namespace personamoe {

inline void bind_codes(pybind11::module_& m) {
  namespace py = pybind11;
  py::enum_<DType>(m, "DType", py::module_local(), "Element type (csrc/common/codes.h)")
      .value("float32", DType::F32)
      .value("bfloat16", DType::BF16)
      .value("float16", DType::F16)
      .value("float64", DType::F64)
      .value("int32", DType::I32)
      .value("int64", DType::I64);
  py::enum_<Normalize>(m, "Normalize", py::module_local(), "Gate normalisation")
      .value("topk", Normalize::TopK)
      .value("full", Normalize::Full);
  py::enum_<Mode>(m, "Mode", py::module_local(), "token: ranked per token; fixed: persona weights")
      .value("token", Mode::Token)
      .value("fixed", Mode::Fixed);
}

}  // namespace personamoe
