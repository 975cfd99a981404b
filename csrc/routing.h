// Router-free ranking of persona experts (DESIGN.md §1, steps 2-4) on a precomputed low-rank
// activation h. Free of torch and pybind: raw pointers in, raw pointers out.
#pragma once

#include <cstdint>

namespace personamoe {

enum class Normalize : int { TopK = 0, Full = 1 };

// Scores, top-k and gates of one token.
//   h_t         [E, r] fp32, the token's low-rank activation for every expert
//   calibration [E] or nullptr (all ones)
//   bias_row    [E] or nullptr: the token's row of the persona bias table (nullptr = no persona)
//   scores      [E] out: n = ||h_e|| / c_e + bias_e
//   idx, gates  [k] out: the k best experts (ties to the lower index) and their gates
// A row with fewer than k allowed experts fills the empty slots with the lowest-index
// disallowed (-inf) experts at gate 0. Never reads outside the given arrays, whatever the data.
void route_token(const float* h_t, int64_t E, int64_t r, const float* calibration,
                 const float* bias_row, int64_t k, float inv_temperature, Normalize normalize,
                 float* scores, int32_t* idx, float* gates);

// Top-k of a score row with ties to the lower index; writes k indices into idx.
void topk_lower_index(const float* values, int64_t E, int64_t k, int32_t* idx);

// route_token over T tokens, in parallel (OpenMP) when num_threads > 1.
//   h           [T, E, r] fp32 contiguous
//   persona_bias [P, E] or nullptr; persona_ids [T] or nullptr. An id outside [0, P) means
//               "no persona" (no bias), so any id is safe to pass.
void route_tokens(const float* h, int64_t T, int64_t E, int64_t r, const float* calibration,
                  const float* persona_bias, const int64_t* persona_ids, int64_t P, int64_t k,
                  float temperature, Normalize normalize, int32_t* topk_idx, float* topk_gates,
                  float* scores, int num_threads);

}  // namespace personamoe
