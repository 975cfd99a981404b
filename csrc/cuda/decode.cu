// Decode kernel: shrink, route and mix of one persona-MoE layer in one launch (T <= 16).
//
// The base output x @ W^T + b is computed either by the mix blocks themselves while they wait for
// the shrink (W given: the whole layer in one launch, y written once), or beside the kernel by
// cuBLAS and passed in `y` (W null), to which the adapters' term is then added in place. One grid
// of S + M blocks, roles taken by ticket (an atomic counter read at block start, as in decoupled
// look-back scans) rather than by blockIdx:
//   tickets [0, S):   shrink. Block s computes rows [4s, 4s+4) of h = x @ A^T for all T tokens:
//                     warp w takes row w % 4 over half w / 4 of d_in, and the two halves are
//                     summed in a fixed order (fp32; deterministic), into a workspace. Small
//                     blocks spread the shrink over E*r/4 SMs (32 at E*r = 128), not 8.
//   tickets [S, S+M): mix. M is at most the number of blocks the GPU holds at once (no second
//                     wave of mix blocks); block m takes output tiles m, m+M, ... of 32. For its
//                     first tile it computes the base while the shrink runs, then waits until all
//                     S shrink blocks are done, routes every token itself into shared memory
//                     (norms, calibration, persona bias with ids outside [0, P) = no persona,
//                     top-k with ties to the lower index, gates; the first mix block also writes
//                     the op's routing outputs) and mixes sum_e coef[t,e] * (B_e @ h_te) over the
//                     used experts only (its 8 warps split the experts, lanes the outputs) into y.
//                     Routing in every mix block costs a few microseconds of redundant work but
//                     takes the serial "last shrink block routes, then raises a flag" step off
//                     the critical path.
// A block that waits holds a ticket later than every shrink ticket, so every shrink block is
// already running: no deadlock whatever the scheduler does or the grid's size. The last block to
// exit resets the counters, so the next launch (or graph replay) finds them zero. No host sync.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "decode.h"

namespace personamoe_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;                    // rows of A per shrink block
constexpr int kSplits = kWarps / kRows;     // d_in halves per row (summed in a fixed order)
constexpr int kNOut = 32;  // outputs per mix tile (one per lane)
constexpr int kSmemFloats = kWarps * kMaxTokens * kMaxRank;  // 8192 floats = 32 KiB

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Load V consecutive elements as floats; V > 1 means one 16-byte load (alignment checked on host).
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_f(p[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "16-byte vectors");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_f(e[i]);
  }
}

// An element of an F32/F16/BF16/F64 array read as float, of an I32/I64 array as int64.
__device__ __forceinline__ float load_any_f(const void* p, DType code, int64_t i) {
  switch (code) {
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::F64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ int64_t load_id(const void* p, DType code, int64_t i) {
  return code == DType::I32 ? static_cast<int64_t>(static_cast<const int32_t*>(p)[i])
                      : static_cast<const int64_t*>(p)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// acc[rr][t] = mat[row0 + rr] . x[t] for ROWS rows (row index clamped to last_row) and every token,
// summed over the warp: the warp's lanes split d_in in V-element vectors. The 8 warps of a block
// read the same x vectors, so x comes from L2 once per block (then from L1).
// Vectors [v0, v1) of d_in only (the shrink splits d_in between warps; the base takes all of it).
template <typename T, int V, int ROWS>
__device__ void dot_rows(const DecodeParams& p, const T* mat, int64_t ld, int row0, int last_row,
                         int v0, int v1, float (&acc)[ROWS][kMaxTokens]) {
  const int lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(p.x);
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) acc[rr][t] = 0.f;
#pragma unroll 2  // two iterations' loads in flight per lane (few blocks stream W at decode)
  for (int v = v0 + lane; v < v1; v += 32) {
    float mv[ROWS][V];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
      const int row = min(row0 + rr, last_row);  // rows past the end are computed, not stored
      load_vec<T, V>(mat + row * ld + static_cast<int64_t>(v) * V, mv[rr]);
    }
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < p.T) {
        float xv[V];
        load_vec<T, V>(x + t * p.x_stride + static_cast<int64_t>(v) * V, xv);
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          float s = 0.f;
#pragma unroll
          for (int i = 0; i < V; ++i) s = fmaf(mv[rr][i], xv[i], s);
          acc[rr][t] += s;
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t)
      if (t < p.T) acc[rr][t] = warp_sum(acc[rr][t]);  // t < T is warp-uniform
}

// Shrink: warp w of block s takes row 4s + w % 4 of h = x @ A^T over half w / 4 of d_in; the
// halves meet in shared memory and are summed in a fixed order (deterministic h).
template <typename T, int V>
__device__ void shrink_rows(const DecodeParams& p, int block, float* part) {
  const int rows = p.E * p.r;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = block * kRows + warp % kRows, split = warp / kRows;
  const int nvec = p.d_in / V;
  const int v0 = static_cast<int>(static_cast<int64_t>(nvec) * split / kSplits);
  const int v1 = static_cast<int>(static_cast<int64_t>(nvec) * (split + 1) / kSplits);
  float acc[1][kMaxTokens];
  dot_rows<T, V, 1>(p, static_cast<const T*>(p.a), p.d_in, row, rows - 1, v0, v1, acc);
  if (lane == 0)
    for (int t = 0; t < p.T; ++t) part[warp * kMaxTokens + t] = acc[0][t];
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * p.T; i += kThreads) {
    const int rr = i / p.T, t = i % p.T;
    if (block * kRows + rr < rows) {
      float v = 0.f;
      for (int sp = 0; sp < kSplits; ++sp) v += part[(sp * kRows + rr) * kMaxTokens + t];
      p.h_ws[static_cast<int64_t>(t) * rows + block * kRows + rr] = v;
    }
  }
}

// Fused base: outputs [32m, 32m+32) of x @ W^T + b into base_s[t][l] (warp w: outputs 4w..4w+3).
template <typename T, int V>
__device__ void base_rows(const DecodeParams& p, int block, float* base_s) {
  constexpr int kOutPerWarp = kNOut / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = block * kNOut + warp * kOutPerWarp;
  float acc[kOutPerWarp][kMaxTokens];
  dot_rows<T, V, kOutPerWarp>(p, static_cast<const T*>(p.weight), p.w_stride, row0,
                              p.d_out - 1, 0, p.d_in / V, acc);
  if (lane == 0) {
    const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
    for (int rr = 0; rr < kOutPerWarp; ++rr) {
      const int n = row0 + rr;
      const float bn = (bias != nullptr && n < p.d_out) ? to_f(bias[n]) : 0.f;
      for (int t = 0; t < p.T; ++t) base_s[t * kNOut + warp * kOutPerWarp + rr] = acc[rr][t] + bn;
    }
  }
}

// Scores, top-k and gates of every token, by each mix block for itself (h read through L2: the
// shrink blocks wrote it): coef[t, e] = gate * scaling and the list of used experts go to shared
// memory; only the block with `outputs` set writes the op's scores, top-k indices and gates.
__device__ void route_tokens(const DecodeParams& p, float* smem, float* coef_s, int* used_s,
                             bool outputs) {
  const int E = p.E, r = p.r, T = p.T, k = p.k;
  const int rows = E * r;
  float* sc = smem;  // [T, E]
  __shared__ unsigned long long used_mask;
  if (threadIdx.x == 0) used_mask = 0ull;
  for (int i = threadIdx.x; i < T * E; i += kThreads) {
    const int t = i / E, e = i % E;
    float tab = 0.f;
    if (p.table != nullptr && p.ids != nullptr) {
      const int64_t id = load_id(p.ids, p.ids_dtype, t);
      if (id >= 0 && id < p.P) tab = load_any_f(p.table, p.table_dtype, id * E + e);
    }
    float n;
    if (p.mode == Mode::Fixed) {
      n = tab;
    } else {
      float ss = 0.f;
      const float* hp = p.h_ws + static_cast<int64_t>(t) * rows + e * r;
      for (int j = 0; j < r; ++j) {
        const float v = __ldcg(hp + j);
        ss = fmaf(v, v, ss);
      }
      n = sqrtf(ss);
      if (p.calibration != nullptr) n = n / load_any_f(p.calibration, p.calibration_dtype, e);
      n += tab;
    }
    sc[i] = n;
    if (outputs) p.scores[i] = n;
  }
  __syncthreads();
  if (threadIdx.x < T) {
    const int t = threadIdx.x;
    const float* n = sc + t * E;
    const float inv_tau = 1.f / p.temperature;
    unsigned long long taken = 0ull, used = 0ull;
    int sel[kMaxExperts];
    float val[kMaxExperts];
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        if (taken >> e & 1ull) continue;
        // Strict (ties keep the lower index); NaN ranks last, as in the reference.
        if (best < 0 || (!isnan(n[e]) && (isnan(n[best]) || n[e] > n[best]))) best = e;
      }
      taken |= 1ull << best;
      sel[j] = best;
      val[j] = n[best];
    }
    float* coef = coef_s + t * kMaxExperts;
    for (int e = 0; e < E; ++e) coef[e] = 0.f;
    if (p.mode == Mode::Fixed) {
      if (outputs)
        for (int j = 0; j < k; ++j) {
          p.topk_idx[t * k + j] = sel[j];
          p.topk_gates[t * k + j] = val[j];
        }
      for (int e = 0; e < E; ++e) {
        const float c = n[e] * load_any_f(p.scaling, p.scaling_dtype, e);
        coef[e] = c;
        if (c != 0.f) used |= 1ull << e;
      }
    } else {
      const float ninf = -INFINITY;
      float m = ninf, den = 0.f;
      if (p.normalize == Normalize::Full) {  // full: softmax over every allowed expert, not renormalised
        for (int e = 0; e < E; ++e)
          if (n[e] != ninf) m = fmaxf(m, n[e] * inv_tau);
        if (m == ninf) m = 0.f;
        for (int e = 0; e < E; ++e)
          if (n[e] != ninf) den += expf(n[e] * inv_tau - m);
      } else {  // topk: softmax over the chosen allowed experts
        for (int j = 0; j < k; ++j)
          if (val[j] != ninf) m = fmaxf(m, val[j] * inv_tau);
        if (m == ninf) m = 0.f;
        for (int j = 0; j < k; ++j)
          if (val[j] != ninf) den += expf(val[j] * inv_tau - m);
      }
      if (den == 0.f) den = 1.f;
      for (int j = 0; j < k; ++j) {
        const float g = val[j] != ninf ? expf(val[j] * inv_tau - m) / den : 0.f;
        if (outputs) {
          p.topk_idx[t * k + j] = sel[j];
          p.topk_gates[t * k + j] = g;
        }
        const float c = g * load_any_f(p.scaling, p.scaling_dtype, sel[j]);
        coef[sel[j]] += c;
        if (c != 0.f) used |= 1ull << sel[j];  // NaN != 0: a NaN token keeps its experts
      }
    }
    atomicOr(&used_mask, used);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int u = 0;
    for (int e = 0; e < E; ++e)
      if (used_mask >> e & 1ull) used_s[1 + u++] = e;
    used_s[0] = u;
  }
  __syncthreads();
}

template <typename T, int V>
__device__ void mix_outputs(const DecodeParams& p, int block, float* smem, const float* base_s,
                            const float* coef_s, const int* used_s) {
  const int E = p.E, r = p.r, Tn = p.T;
  const int rows = E * r;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = block * kNOut + lane;
  const bool valid = n < p.d_out;
  const T* b = static_cast<const T*>(p.b);
  float* hs = smem + warp * kMaxTokens * kMaxRank;  // this warp's coef * h of one expert
  float acc[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) acc[t] = 0.f;
  const int used = used_s[0];
  for (int u = warp; u < used; u += kWarps) {
    const int e = used_s[1 + u];
    for (int i = lane; i < Tn * r; i += 32) {
      const int t = i / r, j = i % r;
      hs[t * kMaxRank + j] = coef_s[t * kMaxExperts + e] *
                             __ldcg(p.h_ws + static_cast<int64_t>(t) * rows + e * r + j);
    }
    __syncwarp();
    if (valid) {
      const T* brow = b + (static_cast<int64_t>(e) * p.d_out + n) * r;
      for (int j0 = 0; j0 < r; j0 += V) {
        float bv[V];
        load_vec<T, V>(brow + j0, bv);
#pragma unroll
        for (int t = 0; t < kMaxTokens; ++t) {
          if (t < Tn) {
#pragma unroll
            for (int i = 0; i < V; ++i) acc[t] = fmaf(bv[i], hs[t * kMaxRank + j0 + i], acc[t]);
          }
        }
      }
    }
    __syncwarp();
  }
  __syncthreads();
  float* red = smem;  // [warps, T, 32], reusing the staging tiles
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t)
    if (t < Tn) red[(warp * kMaxTokens + t) * 32 + lane] = acc[t];
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  for (int i = threadIdx.x; i < Tn * kNOut; i += kThreads) {
    const int t = i / kNOut, l = i % kNOut;
    const int nn = block * kNOut + l;
    if (nn < p.d_out) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += red[(w * kMaxTokens + t) * 32 + l];
      const int64_t o = static_cast<int64_t>(t) * p.d_out + nn;
      const float base = p.weight != nullptr ? base_s[t * kNOut + l] : to_f(y[o]);
      y[o] = from_f<T>(base + s);
    }
  }
  __syncthreads();  // smem (the reduction tiles) is reused by the block's next tile
}

// V: vector width of the loads of x, A and W (their rows and d_in allow it); VB: of B (r allows
// it). Separate, so that an adapter rank that is not a multiple of 8 keeps the base GEMV's 16-byte
// loads.
template <typename T, int V, int VB>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeParams p, int shrink_blocks) {
  __shared__ float smem[kSmemFloats];
  __shared__ float base_s[kMaxTokens * kNOut];  // the fused base output of a mix tile
  __shared__ float coef_s[kMaxTokens * kMaxExperts];  // gate * scaling, this block's routing
  __shared__ int used_s[1 + kMaxExperts];  // count of used experts, then their ids
  __shared__ int s_ticket;
  if (threadIdx.x == 0) s_ticket = static_cast<int>(atomicAdd(&p.counters[0], 1u));
  __syncthreads();
  const int ticket = s_ticket;
  if (ticket < shrink_blocks) {
    shrink_rows<T, V>(p, ticket, smem);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(&p.counters[1], 1u);
  } else {
    const int mix_blocks = static_cast<int>(gridDim.x) - shrink_blocks;
    const int tiles = (p.d_out + kNOut - 1) / kNOut;
    int tile = ticket - shrink_blocks;
    // While the shrink blocks run, compute the first tile's base outputs (when W is given), so
    // the wait costs nothing and y is written once.
    if (p.weight != nullptr && tile < tiles) base_rows<T, V>(p, tile, base_s);
    if (threadIdx.x == 0) {
      // A volatile load polls L2 without the atomic traffic that would slow the shrink blocks.
      while (*reinterpret_cast<volatile uint32_t*>(&p.counters[1]) <
             static_cast<uint32_t>(shrink_blocks))
        __nanosleep(100);
      __threadfence();
    }
    __syncthreads();
    route_tokens(p, smem, coef_s, used_s, ticket == shrink_blocks);
    for (; tile < tiles; tile += mix_blocks) {
      if (p.weight != nullptr && tile != ticket - shrink_blocks) base_rows<T, V>(p, tile, base_s);
      __syncthreads();
      mix_outputs<T, VB>(p, tile, smem, base_s, coef_s, used_s);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&p.counters[3], 1u) == gridDim.x - 1) {
      for (int i = 0; i < 4; ++i) atomicExch(&p.counters[i], 0u);
    }
  }
}

#ifdef PERSONAMOE_CPU_EMULATION
// Defined by emu/emulate.cpp (which includes this file): runs the grid's blocks one after another
// on the calling thread, in ticket order.
template <typename T, int V, int VB>
void emulate_grid(const DecodeParams& p, int shrink_blocks, int mix_blocks);
#endif

// How many blocks of this kernel the current device holds at once (SMs x blocks per SM), cached per
// device: the mix blocks never exceed it, so none waits for a second wave.
template <typename T, int V, int VB>
int resident_blocks() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) dev = 0;
  static int cache[64] = {};
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int sms = 0, per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_kernel<T, V, VB>, kThreads, 0);
  const int n = (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
  if (dev < 64) cache[dev] = n;
  return n;
}

template <typename T, int V, int VB>
cudaError_t launch_grid(const DecodeParams& p, cudaStream_t stream) {
  const int shrink_blocks = (p.E * p.r + kRows - 1) / kRows;
  const int tiles = (p.d_out + kNOut - 1) / kNOut;
  // No more mix blocks than the GPU holds at once: a block per tile up to that, then each block
  // strides over several tiles. Those that do not fit beside the shrink blocks at first start
  // when the (short) shrink blocks exit, which is also when the routing they wait for is ready.
  const int resident = resident_blocks<T, V, VB>();
  const int mix_blocks = tiles < resident ? tiles : resident;
#ifdef PERSONAMOE_CPU_EMULATION
  (void)stream;
  emulate_grid<T, V, VB>(p, shrink_blocks, mix_blocks);
#else
  const dim3 grid(shrink_blocks + mix_blocks), block(kThreads);
  decode_kernel<T, V, VB><<<grid, block, 0, stream>>>(p, shrink_blocks);
#endif
  return cudaGetLastError();
}

template <typename T, int V>
cudaError_t launch_b(const DecodeParams& p, cudaStream_t stream) {
  constexpr int VB = 16 / sizeof(T);
  return p.vec_b ? launch_grid<T, V, VB>(p, stream) : launch_grid<T, V, 1>(p, stream);
}

template <typename T>
cudaError_t launch_typed(const DecodeParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  return p.vec ? launch_b<T, V>(p, stream) : launch_b<T, 1>(p, stream);
}

}  // namespace

std::string launch_decode(const DecodeParams& p, std::uintptr_t stream) {
  if (p.T < 1 || p.T > kMaxTokens || p.E < 1 || p.E > kMaxExperts || p.r < 1 ||
      p.r > kMaxRank || p.k < 1 || p.k > p.E)
    return "decode kernel: shape outside T<=16, E<=64, r<=64, 1<=k<=E";
  auto s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (p.dtype) {
    case DType::F32: err = launch_typed<float>(p, s); break;
    case DType::F16: err = launch_typed<__half>(p, s); break;
    case DType::BF16: err = launch_typed<__nv_bfloat16>(p, s); break;
    default: return "decode kernel: dtype must be float32, float16 or bfloat16";
  }
  if (err != cudaSuccess) return std::string("decode kernel launch: ") + cudaGetErrorString(err);
  return "";
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace personamoe_cuda
