// The CUDA decode kernel of personamoe: route AND mix of a persona-MoE layer in one launch, for
// T <= kMaxTokens tokens (DESIGN.md §1). Free of torch, pybind11 and CUDA headers so that the
// bindings compile with the host compiler alone.
#pragma once

#include <cstdint>
#include <string>

namespace personamoe_cuda {

constexpr int kMaxTokens = 16;   // T <= 16: decode steps of up to 16 sequences
constexpr int kMaxExperts = 64;  // E <= 64 (the chosen set is one 64-bit mask)
constexpr int kMaxRank = 64;     // r <= 64 (one expert's h for all tokens fits a warp's tile)

// Element type codes shared with the Python side (personamoe/backends/cuda_launch.py).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kI32 = 4, kI64 = 5 };

struct DecodeParams {
  const void* x;            // [T, d_in], rows x_stride elements apart, unit inner stride
  int64_t x_stride;
  const void* a;            // lora_a [E, r, d_in] contiguous
  const void* b;            // lora_b [E, d_out, r] contiguous
  const void* scaling;      // [E], dtype scaling_dtype
  const void* calibration;  // [E] or null
  const void* table;        // persona_bias or persona_weights [P, E] contiguous, or null
  const void* ids;          // persona_ids [T] (int32/int64) or null
  int scaling_dtype, calibration_dtype, table_dtype, ids_dtype;
  int64_t P;
  const void* weight;       // base W [d_out, d_in], rows w_stride apart, or null (then y holds
  int64_t w_stride;         //   the base output on entry)
  const void* bias;         // [d_out] or null; used only with weight
  void* y;                  // [T, d_out] contiguous; the layer's output on exit
  int32_t* topk_idx;        // [T, k]
  float* topk_gates;        // [T, k]
  float* scores;            // [T, E]
  float* h_ws;              // workspace [T, E*r] fp32
  float* coef_ws;           // workspace [T, E] fp32
  int32_t* used_ws;         // workspace [1 + E]: count of used experts, then their ids
  uint32_t* counters;       // [4], zero on entry; the kernel leaves them zero again
  int T, d_in, d_out, E, r, k;
  float temperature;
  int normalize;            // 0 = topk, 1 = full
  int fixed;                // 1: persona_weights mode
};

// Launch on `stream` (a cudaStream_t as an address). dtype: kF32/kF16/kBF16 of x, A, B and y.
// vec: 1 when x rows, A, B, d_in and r allow 16-byte loads. Returns "" or the CUDA error text.
std::string launch_decode(const DecodeParams& p, int dtype, bool vec, std::uintptr_t stream);

// cudaRuntimeGetVersion of the runtime linked in (works without a driver).
int runtime_version();

}  // namespace personamoe_cuda
