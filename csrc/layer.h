// The fused persona-MoE layer on CPU (docs/design.md §1): shrink over all experts, scores, top-k,
// gates (or the fixed mode's weights) and the gated mix of the chosen experts, and for few tokens
// the base GEMM x W^T + b too. Free of torch and pybind: raw pointers in, raw pointers out.
//
// Where the base GEMM runs was decided by measurement (benchmarks/README.md, "Decisions"):
//  - few tokens (the caller's BASE_IN_KERNEL_MAX_TOKENS, 28): inside this kernel, as extra rows of
//    the shrink. The layer is memory-bound on W there; W, A and B go through one pass and y is
//    written once (one rounding for bf16/fp16), with no second call.
//  - more: the caller computes x W^T + b beside the kernel (oneDNN on the plain fp32 weight, else
//    torch's BLAS) and passes weight = nullptr and that y; the kernel adds the mix in place. These
//    tiles are not a cache-blocked GEMM (x W^T took 2x MKL's time at T = 256). From
//    SHRINK_GEMM_MIN_TOKENS (256) the fp32 shrink is a oneDNN GEMM too, passed in as `h`.
#pragma once

#include <cstdint>

#include "common/codes.h"

namespace personamoe {

// Everything one call needs. Pointers of the input dtype are void*; the rest is fp32/int.
// Python fills it by field name (csrc/bindings.cpp, personamoe/backends/cpp_backend.py).
struct LayerArgs {
  int64_t T = 0, d_in = 0, d_out = 0, E = 0, r = 0, k = 0;
  DType dtype = DType::F32;  // of x, lora_a, lora_b, weight, bias and y: F32, BF16 or F16
  const void* x = nullptr;  // [T, d_in], row stride x_stride, unit inner stride
  int64_t x_stride = 0;
  const void* lora_a = nullptr;  // [E, r, d_in] contiguous
  const void* lora_b = nullptr;  // [E, d_out, r] contiguous
  const float* scaling = nullptr;      // [E]
  const float* calibration = nullptr;  // [E] or nullptr (all ones)
  const float* table = nullptr;        // [P, E] persona bias (token mode) or weights (fixed mode)
  int64_t P = 0;
  const void* persona_ids = nullptr;  // [T] or nullptr; ids outside [0, P) = no persona
  DType ids_dtype = DType::I64;       // of persona_ids: I32 or I64
  Mode mode = Mode::Token;            // Fixed: `table` holds persona_weights
  float temperature = 1.0f;
  Normalize normalize = Normalize::TopK;
  // Base layer: with `weight` set (contiguous [d_out, d_in], dtype of x; `bias` [d_out] or
  // nullptr) the kernel computes x W^T + b itself and y's contents are ignored; with nullptr, y
  // already holds the base output and the mix is added into it.
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;  // [T, d_out], row stride y_stride
  int64_t y_stride = 0;
  // Precomputed shrink: h [T, E*r] fp32, row stride h_stride (e.g. a BLAS/oneDNN GEMM, or an
  // all-reduced h of a row-parallel layer). Set: the kernel skips its own shrink and routes and
  // mixes from this h; nullptr: the kernel computes h = x A^T itself.
  const float* h = nullptr;
  int64_t h_stride = 0;
  int32_t* topk_idx = nullptr;  // [T, k] out
  float* topk_gates = nullptr;  // [T, k] out
  float* scores = nullptr;      // [T, E] out (fixed mode: the token's weight row)
  int num_threads = 1;
};

// Runs the whole adapter part of the layer. Never reads outside the arrays described above,
// whatever the values (ids, NaN, -inf) hold.
void layer_forward(const LayerArgs& args);

// Which vectorised path runs here: "avx512", "avx2" or "generic" (override with the environment
// variable PERSONAMOE_CPU_ISA=generic|avx2|avx512, never above what the CPU supports).
const char* active_isa();

// Switch to the path `name` ("generic", "avx2", "avx512", or "best"), for tests and
// measurements. Returns the path now active, or nullptr (nothing changed) when this CPU lacks it.
// Not to be called while another thread runs layer_forward.
const char* force_isa(const char* name);

// Measurement hook: the shrink alone, h [T, rows] fp32 = x [T, d_in] @ w[rows, d_in]^T with this
// file's micro-kernel (benchmarks/bench_layer.py --base-in-kernel times it against BLAS).
void shrink_only(DType dtype, const void* x, int64_t x_stride, const void* w, int64_t T,
                 int64_t d_in, int64_t rows, float* h, int num_threads);

}  // namespace personamoe
