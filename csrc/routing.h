// Router-free ranking of persona experts (docs/design.md §1, steps 2-4) on a precomputed low-rank
// activation h. Free of torch and pybind: raw pointers in, raw pointers out.
#pragma once

#include <cstdint>

#include "common/codes.h"

namespace personamoe {

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

}  // namespace personamoe
