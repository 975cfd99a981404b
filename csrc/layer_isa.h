// Internal interface between the dispatcher (layer.cpp) and the per-ISA kernels (isa/*.cpp).
// Only plain structs and function pointers cross it, so no inline or template code is shared
// between translation units built with different -m flags (a linker could otherwise keep an
// AVX-512 copy of a shared inline function for a caller that runs on an older CPU).
#pragma once

#include <cstdint>

#include "layer.h"

namespace personamoe {
namespace detail {

constexpr int kTokenGroup = 4;   // tokens per shrink tile
constexpr int kRowGroup = 4;     // rows of A per shrink tile
constexpr int64_t kOutBlock = 64;  // outputs per mix block (multiple of every vector width)

struct Work {
  const LayerArgs* a = nullptr;
  float* h = nullptr;  // [T, E*r] fp32, only the rows of needed experts are written
  int64_t h_stride = 0;
  // Shrink: row segments of A ([start, start+len), len <= kRowGroup) over the needed experts.
  const int64_t* seg_start = nullptr;
  const int32_t* seg_len = nullptr;
  int64_t nseg = 0;
  bool seg_major = false;  // shrink item order: segment-major (few tokens) or token-major
  // Base GEMM in the kernel (few tokens): segments from row base_row0 on are rows of W, written to
  // ybase [T, d_out] fp32; the mix then writes y = ybase + bias + mix. nullptr: y holds the base.
  float* ybase = nullptr;
  int64_t base_row0 = 0;
  // Mix: per token up to kmax entries (expert, coefficient = gate * scaling).
  const int32_t* ent_e = nullptr;
  const float* ent_c = nullptr;
  const int32_t* ent_n = nullptr;
  int64_t kmax = 0;
  bool direct = false;  // mix by dot products over r (few tokens) instead of a transposed tile
};

struct Kernels {
  const char* name;
  // Shrink items [begin, end): item = token_group * nseg + segment.
  void (*shrink_items)(const Work& w, int64_t begin, int64_t end);
  // Mix output block `block` ([block*kOutBlock, ...)) for every token, adding into y.
  // scratch: E*r*kOutBlock floats + E bytes, private to the calling thread.
  void (*mix_block)(const Work& w, int64_t block, float* scratch, unsigned char* used);
};

Kernels kernels_generic();
Kernels kernels_avx2();
Kernels kernels_avx512();

}  // namespace detail
}  // namespace personamoe
