// Dispatcher and driver of the fused layer: picks the ISA path once, plans the work (which
// experts' h is needed, the shrink's tiles), and runs shrink -> route -> mix in ONE OpenMP
// parallel region (two barriers, no second fork). Routing reuses routing.cpp's per-token step.
#include "layer.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "layer_isa.h"
#include "routing.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace personamoe {
namespace {

using detail::Kernels;
using detail::Work;

// Fewer tokens than this: the mix takes dot products over r per output (no transposed tile).
// Measured on the dev machine (AVX-512): the tile's transposition pays off from ~4 tokens.
constexpr int64_t kDirectMaxTokens = 8;
// Up to this many tokens every thread routes all tokens itself (no barrier before the mix).
constexpr int64_t kRedundantRouteTokens = 32;

int cpu_level() {
#if defined(PERSONAMOE_X86_ISA)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (avx512) return 2;
  if (avx2) return 1;
#endif
  return 0;
}

Kernels kernels_for(int level) {
#if defined(PERSONAMOE_X86_ISA)
  if (level >= 2) return detail::kernels_avx512();
  if (level == 1) return detail::kernels_avx2();
#endif
  (void)level;
  return detail::kernels_generic();
}

Kernels pick_kernels() {
  int level = cpu_level();
  if (const char* env = std::getenv("PERSONAMOE_CPU_ISA")) {
    int want = level;
    if (std::strcmp(env, "generic") == 0) want = 0;
    if (std::strcmp(env, "avx2") == 0) want = 1;
    if (std::strcmp(env, "avx512") == 0) want = 2;
    if (want < level) level = want;  // never above what the CPU supports
  }
  return kernels_for(level);
}

// The kernels in use: chosen once, on first use; force_isa() may switch to an older path (tests).
std::atomic<const Kernels*> g_kernels{nullptr};

const Kernels& kernels() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  if (!k) {
    static const Kernels picked = pick_kernels();
    const Kernels* expected = nullptr;
    g_kernels.compare_exchange_strong(expected, &picked);
    k = g_kernels.load(std::memory_order_acquire);
  }
  return *k;
}

const float* persona_row(const LayerArgs& a, int64_t t) {
  if (!a.table || !a.persona_ids) return nullptr;
  const int64_t p = a.ids_dtype == DType::I32 ? static_cast<const int32_t*>(a.persona_ids)[t]
                                              : static_cast<const int64_t*>(a.persona_ids)[t];
  if (p < 0 || p >= a.P) return nullptr;  // "no persona": never read outside the table
  return a.table + p * a.E;
}

int threads_for(int requested, double macs) {
  // Below ~64K multiply-adds a second thread costs more (wake-up, barriers) than it saves.
  if (requested < 1) requested = 1;
  return macs < 65536.0 ? 1 : requested;
}

void static_range(int64_t n, int tid, int nt, int64_t* begin, int64_t* end) {
  const int64_t base = n / nt, extra = n % nt;
  *begin = tid * base + (tid < extra ? tid : extra);
  *end = *begin + base + (tid < extra ? 1 : 0);
}

}  // namespace

const char* active_isa() { return kernels().name; }

const char* force_isa(const char* name) {
  static const Kernels generic = kernels_for(0), avx2 = kernels_for(1), avx512 = kernels_for(2);
  const int level = cpu_level();
  int want = level;
  if (std::strcmp(name, "generic") == 0) want = 0;
  else if (std::strcmp(name, "avx2") == 0) want = 1;
  else if (std::strcmp(name, "avx512") == 0) want = 2;
  if (want > level) return nullptr;
  g_kernels.store(want == 0 ? &generic : (want == 1 ? &avx2 : &avx512), std::memory_order_release);
  return active_isa();
}

void layer_forward(const LayerArgs& a) {
  const Kernels& K = kernels();
  const int64_t T = a.T, E = a.E, r = a.r, k = a.k, ER = a.E * a.r;
  if (T <= 0) return;
  const bool fixed = a.mode == Mode::Fixed;
  const int64_t kmax = fixed ? E : k;

  // Which experts' h is needed: all of them for ranking, only non-zero weights in fixed mode.
  std::vector<unsigned char> needed(static_cast<size_t>(E), fixed ? 0 : 1);
  if (fixed)
    for (int64_t t = 0; t < T; ++t)
      if (const float* row = persona_row(a, t))
        for (int64_t e = 0; e < E; ++e)
          if (row[e] != 0.0f) needed[e] = 1;
  std::vector<int64_t> seg_start;
  std::vector<int32_t> seg_len;
  const bool h_given = a.h != nullptr;  // the caller computed h: no A segments to shrink
  for (int64_t e = 0; e < E && !h_given; ++e)
    if (needed[e])
      for (int64_t i = 0; i < r; i += detail::kRowGroup) {
        seg_start.push_back(e * r + i);
        seg_len.push_back(static_cast<int32_t>(r - i < detail::kRowGroup ? r - i : detail::kRowGroup));
      }

  // Base rows (W) as extra shrink segments when the caller asked for the base in the kernel.
  const int64_t base_row0 = ER;
  std::unique_ptr<float[]> ybase;
  if (a.weight) {
    ybase.reset(new float[static_cast<size_t>(T * a.d_out)]);
    for (int64_t i = 0; i < a.d_out; i += detail::kRowGroup) {
      seg_start.push_back(base_row0 + i);
      seg_len.push_back(static_cast<int32_t>(a.d_out - i < detail::kRowGroup ? a.d_out - i : detail::kRowGroup));
    }
  }
  std::unique_ptr<float[]> h(h_given ? nullptr : new float[static_cast<size_t>(T * ER)]);
  // Few tokens: every thread routes all of them itself (a few hundred ns a token) into its own
  // copy of the entries, which saves the barrier between routing and mixing; on a loaded machine
  // each barrier can cost a scheduler time slice. Only thread 0 writes the routing outputs.
  const bool redundant_route = T <= kRedundantRouteTokens && E <= 256;
  const size_t copies = redundant_route ? static_cast<size_t>(a.num_threads < 1 ? 1 : a.num_threads) : 1;
  std::unique_ptr<int32_t[]> ent_e(new int32_t[static_cast<size_t>(T * kmax) * copies]);
  std::unique_ptr<float[]> ent_c(new float[static_cast<size_t>(T * kmax) * copies]);
  std::unique_ptr<int32_t[]> ent_n(new int32_t[static_cast<size_t>(T) * copies]);

  Work w;
  w.a = &a;
  // The kernels only read h after the shrink phase, and the shrink writes no A rows when h is
  // given, so the caller's buffer is never written.
  w.h = h_given ? const_cast<float*>(a.h) : h.get();
  w.h_stride = h_given ? a.h_stride : ER;
  w.seg_start = seg_start.data();
  w.seg_len = seg_len.data();
  w.nseg = static_cast<int64_t>(seg_start.size());
  w.ent_e = ent_e.get();
  w.ent_c = ent_c.get();
  w.ent_n = ent_n.get();
  w.kmax = kmax;
  w.direct = T < kDirectMaxTokens;
  w.ybase = ybase.get();
  w.base_row0 = base_row0;
  // x small enough to stay in L2 while every A tile streams past once: segment-major shrink.
  w.seg_major = T * a.d_in * (a.dtype == DType::F32 ? 4 : 2) <= (256 << 10);

  const int64_t n_items = ((T + detail::kTokenGroup - 1) / detail::kTokenGroup) * w.nseg;
  const int64_t n_blocks = (a.d_out + detail::kOutBlock - 1) / detail::kOutBlock;
  const double macs = static_cast<double>(T) * (static_cast<double>(w.nseg) * detail::kRowGroup *
                                                    static_cast<double>(a.d_in) +
                                                static_cast<double>(kmax * r * a.d_out));
  const int nt = threads_for(a.num_threads, macs);
  const size_t scratch_floats =
      static_cast<size_t>(w.direct ? kmax * r : ER * detail::kOutBlock) + 16;
  std::unique_ptr<float[]> scratch(new float[scratch_floats * static_cast<size_t>(nt)]);
  std::unique_ptr<unsigned char[]> used(new unsigned char[static_cast<size_t>(E * nt)]);
  const float inv_t = 1.0f / a.temperature;

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    int64_t b0, b1;
    // 1. shrink: h = x A^T for the needed experts (contiguous item ranges keep A hot in L2).
    static_range(n_items, tid, nth, &b0, &b1);
    if (b1 > b0) K.shrink_items(w, b0, b1);
#pragma omp barrier
    // 2. route every token: scores, top-k, gates -> (expert, gate * scaling) entries.
    const size_t copy = redundant_route ? static_cast<size_t>(tid) : 0;
    Work wt = w;
    wt.ent_e = ent_e.get() + copy * static_cast<size_t>(T * kmax);
    wt.ent_c = ent_c.get() + copy * static_cast<size_t>(T * kmax);
    wt.ent_n = ent_n.get() + copy * static_cast<size_t>(T);
    if (redundant_route) {
      b0 = 0;
      b1 = T;
    } else {
      static_range(T, tid, nth, &b0, &b1);
    }
    // Thread-private score/index/gate rows when routing redundantly; thread 0 keeps the outputs.
    float sc_own[256];
    int32_t idx_own[256];
    float g_own[256];
    const bool own = redundant_route && tid != 0;
    for (int64_t t = b0; t < b1; ++t) {
      const float* row = persona_row(a, t);
      float* sc = own ? sc_own : a.scores + t * E;
      int32_t* idx = own ? idx_own : a.topk_idx + t * k;
      float* g = own ? g_own : a.topk_gates + t * k;
      int32_t* ee = const_cast<int32_t*>(wt.ent_e) + t * kmax;
      float* ec = const_cast<float*>(wt.ent_c) + t * kmax;
      int32_t n = 0;
      if (fixed) {
        for (int64_t e = 0; e < E; ++e) sc[e] = row ? row[e] : 0.0f;
        topk_lower_index(sc, E, k, idx);
        for (int64_t j = 0; j < k; ++j) g[j] = sc[idx[j]];
        for (int64_t e = 0; e < E; ++e)
          if (sc[e] != 0.0f) {
            ee[n] = static_cast<int32_t>(e);
            ec[n++] = sc[e] * a.scaling[e];
          }
      } else {
        route_token(w.h + t * w.h_stride, E, r, a.calibration, row, k, inv_t, a.normalize, sc, idx, g);
        for (int64_t j = 0; j < k; ++j)
          if (g[j] != 0.0f) {
            ee[n] = idx[j];
            ec[n++] = g[j] * a.scaling[idx[j]];
          }
      }
      const_cast<int32_t*>(wt.ent_n)[t] = n;
    }
    if (!redundant_route) {  // the same branch in every thread
#pragma omp barrier
    }
    // 3. mix the chosen experts into y, one block of outputs per work item.
    static_range(n_blocks, tid, nth, &b0, &b1);
    float* my_scratch = scratch.get() + scratch_floats * static_cast<size_t>(tid);
    unsigned char* my_used = used.get() + E * tid;
    for (int64_t b = b0; b < b1; ++b) K.mix_block(wt, b, my_scratch, my_used);
  }
}

void shrink_only(DType dtype, const void* x, int64_t x_stride, const void* wts, int64_t T,
                 int64_t d_in, int64_t rows, float* h, int num_threads) {
  if (T <= 0 || rows <= 0) return;
  LayerArgs a;
  a.T = T;
  a.d_in = d_in;
  a.E = 1;
  a.r = rows;
  a.dtype = dtype;
  a.x = x;
  a.x_stride = x_stride;
  a.lora_a = wts;
  std::vector<int64_t> seg_start;
  std::vector<int32_t> seg_len;
  for (int64_t i = 0; i < rows; i += detail::kRowGroup) {
    seg_start.push_back(i);
    seg_len.push_back(static_cast<int32_t>(rows - i < detail::kRowGroup ? rows - i : detail::kRowGroup));
  }
  Work w;
  w.a = &a;
  w.h = h;
  w.h_stride = rows;
  w.seg_start = seg_start.data();
  w.seg_len = seg_len.data();
  w.nseg = static_cast<int64_t>(seg_start.size());
  const Kernels& K = kernels();
  const int64_t n_items = ((T + detail::kTokenGroup - 1) / detail::kTokenGroup) * w.nseg;
  const int nt = num_threads < 1 ? 1 : num_threads;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    int64_t b0, b1;
    static_range(n_items, tid, nth, &b0, &b1);
    if (b1 > b0) K.shrink_items(w, b0, b1);
  }
}

}  // namespace personamoe
