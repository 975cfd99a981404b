// The CUDA decode kernel of personamoe: route AND mix of a persona-MoE layer in one launch, for
// T <= kMaxTokens tokens (docs/design.md §1). Free of torch, pybind11 and CUDA headers so that the
// bindings compile with the host compiler alone.
#pragma once

#include <cstdint>
#include <string>

#include "../common/codes.h"

namespace personamoe_cuda {

using personamoe::DType;
using personamoe::Mode;
using personamoe::Normalize;

constexpr int kMaxTokens = 16;   // T <= 16: decode steps of up to 16 sequences
constexpr int kMaxExperts = 64;  // E <= 64 (the chosen set is one 64-bit mask)
constexpr int kMaxRank = 64;     // r <= 64 (one expert's h for all tokens fits a warp's tile)

// Everything one launch needs; Python fills it by field name (csrc/cuda/bindings.cpp,
// personamoe/backends/cuda_launch.py). Passed to the kernel by value.
struct DecodeParams {
  const void* x = nullptr;            // [T, d_in], rows x_stride elements apart, unit inner stride
  int64_t x_stride = 0;
  const void* a = nullptr;            // lora_a [E, r, d_in] contiguous
  const void* b = nullptr;            // lora_b [E, d_out, r] contiguous
  const void* scaling = nullptr;      // [E], dtype scaling_dtype
  const void* calibration = nullptr;  // [E] or null
  const void* table = nullptr;        // persona_bias or persona_weights [P, E] contiguous, or null
  const void* ids = nullptr;          // persona_ids [T] or null
  // scaling, calibration, table: F32, F16, BF16 or F64, read as they are; ids: I32 or I64.
  DType scaling_dtype = DType::F32, calibration_dtype = DType::F32, table_dtype = DType::F32;
  DType ids_dtype = DType::I64;
  int64_t P = 0;
  const void* weight = nullptr;       // base W [d_out, d_in], rows w_stride apart, or null (then y
  int64_t w_stride = 0;               //   holds the base output on entry)
  const void* bias = nullptr;         // [d_out] or null; used only with weight
  void* y = nullptr;                  // [T, d_out] contiguous; the layer's output on exit
  int32_t* topk_idx = nullptr;        // [T, k]
  float* topk_gates = nullptr;        // [T, k]
  float* scores = nullptr;            // [T, E]
  float* h_ws = nullptr;              // workspace [T, E*r] fp32
  uint32_t* counters = nullptr;       // [4], zero on entry; the kernel leaves them zero again
  int T = 0, d_in = 0, d_out = 0, E = 0, r = 0, k = 0;
  float temperature = 1.0f;
  Normalize normalize = Normalize::TopK;
  Mode mode = Mode::Token;            // Fixed: `table` holds persona_weights
  DType dtype = DType::F32;           // of x, A, B, W, bias and y: F32, F16 or BF16
  int vec = 0;    // 1 when x rows, A, W rows and d_in allow 16-byte loads (host-checked)
  int vec_b = 0;  // 1 when B and r allow 16-byte loads (host-checked)
};

// Launch on `stream` (a cudaStream_t as an address; the CPU emulation of the tests runs the grid
// on the calling thread instead). Returns "" or the error text.
std::string launch_decode(const DecodeParams& p, std::uintptr_t stream);

// cudaRuntimeGetVersion of the runtime linked in (works without a driver).
int runtime_version();

}  // namespace personamoe_cuda
