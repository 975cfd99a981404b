#include "routing.h"

#include <cmath>
#include <limits>

namespace personamoe {

// a outranks b: a larger score, any number above NaN (strict, so ties keep the lower index).
static inline bool ranks_above(float a, float b) {
  return !std::isnan(a) && (std::isnan(b) || a > b);
}

void topk_lower_index(const float* values, int64_t E, int64_t k, int32_t* idx) {
  // E is small (a bank of adapters): k scans beat a heap. Strict '>' while scanning upward keeps
  // the lower index on ties; a chosen mask makes every slot distinct even for NaN/-inf rows.
  bool chosen_stack[256];
  bool* chosen = chosen_stack;
  bool* heap = nullptr;
  if (E > 256) chosen = heap = new bool[E];
  for (int64_t e = 0; e < E; ++e) chosen[e] = false;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      if (chosen[e]) continue;
      // NaN ranks last (docs/design.md §1.3): a NaN score is taken only when nothing else is
      // left. A plain `>` would keep a NaN that happens to be scanned first.
      if (best < 0 || ranks_above(values[e], values[best])) best = e;
    }
    chosen[best] = true;
    idx[j] = static_cast<int32_t>(best);
  }
  delete[] heap;
}

static void softmax_allowed(const float* z, int64_t n, float* out) {
  // Softmax over the entries that are not -inf; a row with none allowed is all zeros.
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf;
  for (int64_t i = 0; i < n; ++i)
    if (z[i] != neg_inf && !(z[i] <= m)) m = z[i];  // NaN propagates into m
  if (m == neg_inf) {
    for (int64_t i = 0; i < n; ++i) out[i] = 0.0f;
    return;
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = (z[i] == neg_inf) ? 0.0f : std::exp(z[i] - m);
    sum += out[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) out[i] *= inv;
}

void route_token(const float* h_t, int64_t E, int64_t r, const float* calibration,
                 const float* bias_row, int64_t k, float inv_temperature, Normalize normalize,
                 float* scores, int32_t* idx, float* gates) {
  for (int64_t e = 0; e < E; ++e) {
    const float* he = h_t + e * r;
    float ss = 0.0f;
    for (int64_t i = 0; i < r; ++i) ss += he[i] * he[i];
    float n = std::sqrt(ss);
    if (calibration) n /= calibration[e];
    if (bias_row) n += bias_row[e];
    scores[e] = n;
  }
  topk_lower_index(scores, E, k, idx);
  // Scratch for the gate softmax: on the stack for ordinary banks, on the heap past 256 experts.
  float stack_buf[2 * 256];
  float* heap = E > 256 ? new float[2 * E] : nullptr;
  float* z = heap ? heap : stack_buf;
  float* p = z + (heap ? E : 256);
  if (normalize == Normalize::TopK) {
    for (int64_t j = 0; j < k; ++j) z[j] = scores[idx[j]] * inv_temperature;
    softmax_allowed(z, k, gates);
  } else {
    // "full": softmax over all E scores, then the chosen entries (not renormalised).
    for (int64_t e = 0; e < E; ++e) z[e] = scores[e] * inv_temperature;
    softmax_allowed(z, E, p);
    for (int64_t j = 0; j < k; ++j) gates[j] = p[idx[j]];
  }
  delete[] heap;
}

}  // namespace personamoe
