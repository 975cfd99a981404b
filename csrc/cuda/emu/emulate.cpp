// Runs the real decode kernel of ../decode.cu on the CPU (tests/test_cuda_emulated.py): the kernel
// source is included as is; blocks run one after another in ticket order, each with 256 threads
// (fibers of one OS thread, see cuda_runtime.h) that meet at real barriers. It checks the index arithmetic, reductions, routing and the
// ticket/flag/reset protocol; it says nothing about speed, memory ordering on a GPU, or races
// between blocks that run at the same time.
#define PERSONAMOE_CPU_EMULATION 1
#include "../decode.cu"

#include <ucontext.h>

#include <vector>

namespace {

template <typename T, int V>
struct Grid {
  static inline const personamoe_cuda::DecodeParams* params = nullptr;
  static inline int shrink_blocks = 0;
  static void fiber() {
    personamoe_cuda::decode_kernel<T, V>(*params, shrink_blocks);
    emu::finished = true;  // then back to the scheduler through uc_link
  }
};

template <typename T, int V>
void run_grid(const personamoe_cuda::DecodeParams& p) {
  using namespace personamoe_cuda;
  const int shrink_blocks = (p.E * p.r + kRows - 1) / kRows;
  const int mix_blocks = (p.d_out + kNOut - 1) / kNOut;
  emu::grid_dim.x = shrink_blocks + mix_blocks;
  Grid<T, V>::params = &p;
  Grid<T, V>::shrink_blocks = shrink_blocks;
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
      makecontext(&c, &Grid<T, V>::fiber, 0);
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

extern "C" int personamoe_emulate_decode(const personamoe_cuda::DecodeParams* p, int dtype,
                                         int vec) {
  using namespace personamoe_cuda;
  switch (dtype) {
    case kF32: vec ? run_grid<float, 4>(*p) : run_grid<float, 1>(*p); return 0;
    case kF16: vec ? run_grid<__half, 8>(*p) : run_grid<__half, 1>(*p); return 0;
    case kBF16: vec ? run_grid<__nv_bfloat16, 8>(*p) : run_grid<__nv_bfloat16, 1>(*p); return 0;
    default: return 1;
  }
}
