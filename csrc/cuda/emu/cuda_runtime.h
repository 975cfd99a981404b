// CPU emulation shim (see emulate.cpp): just enough of the CUDA runtime and device built-ins
// for decode.cu to compile as host C++ and run one block at a time, one fiber per CUDA thread.
#pragma once
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time: static storage is that block's shared memory

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};
using std::isnan;  // CUDA device code has isnan in the global namespace
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return 0;
}
// A pretend device of EMU_SMS multiprocessors holding one block each: a grid far smaller than a
// real GPU's, so the emulated tests run the mix blocks' grid-stride loop over many tiles.
#ifndef EMU_SMS
#define EMU_SMS 3
#endif
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return 0;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = EMU_SMS;
  return 0;
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = 1;
  return 0;
}

namespace emu {
// The threads of one block are fibers (ucontext) of one OS thread, switched at barriers only:
// deterministic, and cheap enough to run 256 "threads" per block in a unit test.
inline ucontext_t sched_ctx;
inline std::vector<ucontext_t> fiber_ctx;
inline std::vector<dim3> fiber_idx;
inline int current = 0;
inline dim3 grid_dim;
inline float shfl_buf[32][32];
inline long spins = 0;
inline bool finished = false;  // set by a fiber whose kernel returned

inline void yield() { swapcontext(&fiber_ctx[current], &sched_ctx); }

struct Barrier {
  int count = 0, arrived = 0;
  unsigned gen = 0;
  void arrive_and_wait() {
    const unsigned g = gen;
    if (++arrived == count) {
      arrived = 0;
      ++gen;
    } else {
      while (gen == g) yield();
    }
  }
};
inline Barrier block_barrier;
inline Barrier warp_barriers[32];
}  // namespace emu

#define threadIdx (emu::fiber_idx[emu::current])
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::warp_barriers[threadIdx.x / 32].arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
  emu::shfl_buf[w][l] = v;
  __syncwarp();
  const float r = emu::shfl_buf[w][l ^ o];
  __syncwarp();
  return r;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// Blocks run in ticket order, so a waiting block should never wait: a long wait is a protocol bug.
inline void __nanosleep(unsigned) {
  if (++emu::spins > 1000000) std::abort();
  emu::yield();
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
