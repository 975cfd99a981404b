// Runs the real decode kernel of ../decode.cu on the CPU, for tests/test_cuda_emulated.py. The
// test builds this file with ../bindings.cpp (the real bindings) and this folder's CUDA shims on
// the include path into a stand-in personamoe._C_cuda, so the Python launcher, the bindings and
// the kernel run as they are, on CPU tensors.
//
// The kernel source is included as is; launch_decode's grid runs here (emulate_grid): blocks one
// after another in ticket order, each with 256 CUDA threads that are fibers (ucontext) of the one
// calling OS thread, switched only at barriers and spin waits (cuda_runtime.h). It checks the
// index arithmetic, reductions, routing and the ticket/flag/reset protocol; it says nothing about
// speed, memory ordering on a GPU, or races between blocks that run at the same time.
#define PERSONAMOE_CPU_EMULATION 1
#include "../decode.cu"

#include <ucontext.h>

#include <vector>

namespace personamoe_cuda {
namespace {

template <typename T, int V, int VB>
struct Grid {
  static inline const DecodeParams* params = nullptr;
  static inline int shrink_blocks = 0;
  static void fiber() {
    decode_kernel<T, V, VB>(*params, shrink_blocks);
    emu::finished = true;  // then back to the scheduler through uc_link
  }
};

template <typename T, int V, int VB>
void emulate_grid(const DecodeParams& p, int shrink_blocks, int mix_blocks) {
  emu::grid_dim.x = static_cast<unsigned>(shrink_blocks + mix_blocks);
  Grid<T, V, VB>::params = &p;
  Grid<T, V, VB>::shrink_blocks = shrink_blocks;
  emu::block_barrier.count = kThreads;
  for (int w = 0; w < kWarps; ++w) emu::warp_barriers[w].count = 32;
  constexpr size_t kStack = 64 * 1024;
  std::vector<char> stacks(kStack * kThreads);
  emu::fiber_ctx.assign(kThreads, ucontext_t{});
  emu::fiber_idx.assign(kThreads, dim3{});
  for (unsigned b = 0; b < emu::grid_dim.x; ++b) {
    for (int t = 0; t < kThreads; ++t) {
      ucontext_t& c = emu::fiber_ctx[t];
      getcontext(&c);
      c.uc_stack.ss_sp = stacks.data() + t * kStack;
      c.uc_stack.ss_size = kStack;
      c.uc_link = &emu::sched_ctx;
      makecontext(&c, &Grid<T, V, VB>::fiber, 0);
      emu::fiber_idx[t].x = static_cast<unsigned>(t);
    }
    std::vector<bool> done(kThreads, false);
    for (int left = kThreads; left > 0;) {
      for (int t = 0; t < kThreads; ++t) {
        if (done[t]) continue;
        emu::current = t;
        swapcontext(&emu::sched_ctx, &emu::fiber_ctx[t]);
        if (emu::finished) {
          emu::finished = false;
          done[t] = true;
          --left;
        }
      }
    }
  }
}

}  // namespace
}  // namespace personamoe_cuda
