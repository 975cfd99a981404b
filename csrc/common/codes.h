// The codes every kernel and binding shares: element types, gate normalisation, routing mode.
// One definition for the CPU kernels (csrc/layer.h), the CUDA decode kernel (csrc/cuda/decode.h)
// and both pybind11 modules, which export them as enums (csrc/common/bind_codes.h) so that Python
// never spells a number. Plain C++ only: no torch, pybind11 or CUDA headers, so nvcc, the host
// compiler and the CPU emulation of the CUDA kernel all include it as it is.
#pragma once

namespace personamoe {

// Element type of an array. Kernel inputs x, A, B, W, y: F32, BF16 or F16. The CUDA kernel also
// reads small fp32/fp16/bf16/fp64 vectors (scaling, calibration, table) in their own dtype, and
// persona ids are I32 or I64 on both backends.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3, I32 = 4, I64 = 5 };

// How the gates are normalised (personamoe/options.py: "topk", "full").
enum class Normalize : int { TopK = 0, Full = 1 };

// Routing mode: experts ranked per token ("token": persona_bias), or the persona's fixed weights
// ("fixed": persona_weights, no ranking).
enum class Mode : int { Token = 0, Fixed = 1 };

}  // namespace personamoe
