// C++ tests of the fused layer kernel (csrc/layer.h) against a plain scalar implementation of
// docs/design.md §1, written here independently. Built only with -DPERSONAMOE_BUILD_TESTS=ON (never in
// the wheel); run under -DPERSONAMOE_SANITIZE=ON for AddressSanitizer + UBSan:
//
//   cmake -S . -B build/cpptest -DPERSONAMOE_BUILD_TESTS=ON -DPERSONAMOE_SANITIZE=ON \
//         -DPERSONAMOE_CUDA=OFF -Dpybind11_DIR=$(python -m pybind11 --cmakedir)
//   cmake --build build/cpptest --target personamoe_cpp_tests && build/cpptest/personamoe_cpp_tests
//
// Every input buffer is allocated at its exact size (no slack), so ASan flags any read or write
// past an array, including through garbage persona ids, -inf bias rows and ragged sizes.
// `personamoe_cpp_tests bench T [iters]` times one L-case call instead (d = 2048, E = 8, r = 16).
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "layer.h"
#include "routing.h"

using personamoe::DType;
using personamoe::LayerArgs;

namespace {

int g_failures = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      ++g_failures;                                              \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);  \
      std::fprintf(stderr, __VA_ARGS__);                         \
      std::fprintf(stderr, "\n");                                \
    }                                                            \
  } while (0)

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
float from_f16(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}

// A tensor held both as fp32 values (already rounded to the dtype) and as raw dtype storage.
struct Buf {
  std::vector<float> f;
  std::vector<uint16_t> h;
  DType dt;
  Buf(size_t n, DType d, std::mt19937& rng, float scale) : f(n), dt(d) {
    std::normal_distribution<float> nd(0.0f, scale);
    if (d != DType::F32) h.resize(n);
    for (size_t i = 0; i < n; ++i) {
      float v = nd(rng);
      if (d == DType::BF16) {
        h[i] = to_bf16(v);
        v = from_bf16(h[i]);
      } else if (d == DType::F16) {
        h[i] = to_f16(v);
        v = from_f16(h[i]);
      }
      f[i] = v;
    }
  }
  void* data() { return dt == DType::F32 ? static_cast<void*>(f.data()) : h.data(); }
  float get(size_t i) const {
    return dt == DType::F32 ? f[i] : (dt == DType::BF16 ? from_bf16(h[i]) : from_f16(h[i]));
  }
};

struct Case {
  int64_t T, d_in, d_out, E, r, k;
  DType dt;
  int mode;       // 0 token, 1 fixed
  bool bias;      // persona bias table (token mode)
  bool calib;
  int normalize;  // 0 topk, 1 full
  float temperature;
  bool ids32;
  int threads;
  bool base = false;  // the kernel computes x W^T + b too
  bool h_given = false;  // the caller passes h (strided, computed here in double)
};

// Scalar reference of the adapter part (y_base = 0), in double.
void reference(const Case& c, const Buf& x, const Buf& A, const Buf& B, const std::vector<float>& s,
               const std::vector<float>& cal, const std::vector<float>& table, int64_t P,
               const std::vector<int64_t>& ids, std::vector<double>& y, std::vector<int32_t>& idx,
               std::vector<float>& gates) {
  const int64_t T = c.T, E = c.E, r = c.r, k = c.k;
  y.assign(static_cast<size_t>(T * c.d_out), 0.0);
  idx.assign(static_cast<size_t>(T * k), 0);
  gates.assign(static_cast<size_t>(T * k), 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = ids.empty() ? -1 : ids[t];
    const bool valid = p >= 0 && p < P;
    std::vector<double> h(static_cast<size_t>(E * r));
    for (int64_t q = 0; q < E * r; ++q) {
      double acc = 0;
      for (int64_t i = 0; i < c.d_in; ++i) acc += double(x.get(t * c.d_in + i)) * A.get(q * c.d_in + i);
      h[q] = acc;
    }
    std::vector<float> n(static_cast<size_t>(E));
    std::vector<double> coeff(static_cast<size_t>(E), 0.0);
    if (c.mode == 1) {
      for (int64_t e = 0; e < E; ++e) n[e] = valid ? table[p * E + e] : 0.0f;
      personamoe::topk_lower_index(n.data(), E, k, idx.data() + t * k);
      for (int64_t j = 0; j < k; ++j) gates[t * k + j] = n[idx[t * k + j]];
      for (int64_t e = 0; e < E; ++e) coeff[e] = double(n[e]) * s[e];
    } else {
      for (int64_t e = 0; e < E; ++e) {
        double ss = 0;
        for (int64_t i = 0; i < r; ++i) ss += h[e * r + i] * h[e * r + i];
        double v = std::sqrt(ss) / (cal.empty() ? 1.0 : cal[e]);
        if (c.bias && valid) v += table[p * E + e];
        n[e] = static_cast<float>(v);
      }
      int32_t* ix = idx.data() + t * k;
      personamoe::topk_lower_index(n.data(), E, k, ix);
      const double ninf = -std::numeric_limits<double>::infinity();
      std::vector<double> z(static_cast<size_t>(c.normalize == 0 ? k : E));
      for (size_t j = 0; j < z.size(); ++j)
        z[j] = double(n[c.normalize == 0 ? ix[j] : static_cast<int32_t>(j)]) / c.temperature;
      double m = ninf;
      for (double v : z)
        if (v > m) m = v;
      double den = 0;
      for (double& v : z) {
        v = (v == ninf || m == ninf) ? 0.0 : std::exp(v - m);
        den += v;
      }
      for (int64_t j = 0; j < k; ++j) {
        const double pz = z[c.normalize == 0 ? j : ix[j]];
        const double g = den > 0 ? pz / den : 0.0;
        gates[t * k + j] = static_cast<float>(g);
        coeff[ix[j]] += g * s[ix[j]];
      }
    }
    for (int64_t o = 0; o < c.d_out; ++o) {
      double acc = 0;
      for (int64_t e = 0; e < E; ++e)
        if (coeff[e] != 0)
          for (int64_t i = 0; i < r; ++i) acc += coeff[e] * B.get((e * c.d_out + o) * r + i) * h[e * r + i];
      y[t * c.d_out + o] = acc;
    }
  }
}

void run_case(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t T = c.T, E = c.E, r = c.r, k = c.k;
  Buf x(static_cast<size_t>(T * c.d_in), c.dt, rng, 1.0f);
  Buf A(static_cast<size_t>(E * r * c.d_in), c.dt, rng, 1.0f / std::sqrt(float(c.d_in)));
  Buf B(static_cast<size_t>(E * c.d_out * r), c.dt, rng, 1.0f / std::sqrt(float(r)));
  std::uniform_real_distribution<float> ud(0.5f, 1.5f);
  std::vector<float> s(static_cast<size_t>(E)), cal;
  for (auto& v : s) v = ud(rng);
  if (c.calib) {
    cal.resize(static_cast<size_t>(E));
    for (auto& v : cal) v = ud(rng);
  }
  const int64_t P = 3;
  std::vector<float> table;
  std::vector<int64_t> ids;
  std::vector<int32_t> ids32;
  if (c.mode == 1 || c.bias) {
    table.resize(static_cast<size_t>(P * E));
    for (auto& v : table) v = ud(rng) - 1.0f;
    if (c.mode == 0) {
      // Row 1 allows only expert 0; row 2 allows none.
      for (int64_t e = 0; e < E; ++e) {
        table[1 * E + e] = e == 0 ? 0.0f : -std::numeric_limits<float>::infinity();
        table[2 * E + e] = -std::numeric_limits<float>::infinity();
      }
    } else {
      table[1 * E + 0] = 0.0f;  // fixed mode: a zero weight is skipped
    }
    const int64_t pool[] = {0, 1, 2, -1, 3, -7, 1000000007LL, std::numeric_limits<int64_t>::min()};
    for (int64_t t = 0; t < T; ++t) ids.push_back(pool[(t * 5 + seed) % 8]);
    for (int64_t v : ids) ids32.push_back(static_cast<int32_t>(v));
  }
  std::vector<double> yref;
  std::vector<int32_t> iref;
  std::vector<float> gref;
  reference(c, x, A, B, s, cal, table, P, c.ids32 ? std::vector<int64_t>(ids32.begin(), ids32.end()) : ids,
            yref, iref, gref);

  Buf W(static_cast<size_t>(c.d_out * c.d_in), c.dt, rng, 1.0f / std::sqrt(float(c.d_in)));
  Buf bias(static_cast<size_t>(c.d_out), c.dt, rng, 0.5f);
  if (c.base)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < c.d_out; ++o) {
        double acc = bias.get(o);
        for (int64_t i = 0; i < c.d_in; ++i) acc += double(x.get(t * c.d_in + i)) * W.get(o * c.d_in + i);
        yref[t * c.d_out + o] += acc;
      }
  // y starts as garbage when the kernel computes the base (it must not be read), zeros otherwise.
  std::vector<uint16_t> yh(static_cast<size_t>(T * c.d_out), c.base ? 0x7FC1 : 0);
  std::vector<float> yf(static_cast<size_t>(T * c.d_out), c.base ? std::nanf("") : 0.0f);
  std::vector<int32_t> idx(static_cast<size_t>(T * k), -1);
  std::vector<float> gates(static_cast<size_t>(T * k)), scores(static_cast<size_t>(T * E));
  LayerArgs a;
  a.T = T;
  a.d_in = c.d_in;
  a.d_out = c.d_out;
  a.E = E;
  a.r = r;
  a.k = k;
  a.dtype = c.dt;
  a.x = x.data();
  a.x_stride = c.d_in;
  a.lora_a = A.data();
  a.lora_b = B.data();
  a.scaling = s.data();
  a.calibration = c.calib ? cal.data() : nullptr;
  a.table = table.empty() ? nullptr : table.data();
  a.P = P;
  a.persona_ids = table.empty() ? nullptr : (c.ids32 ? static_cast<const void*>(ids32.data()) : ids.data());
  a.ids_dtype = c.ids32 ? DType::I32 : DType::I64;
  a.mode = c.mode == 1 ? personamoe::Mode::Fixed : personamoe::Mode::Token;
  a.temperature = c.temperature;
  a.normalize = c.normalize == 1 ? personamoe::Normalize::Full : personamoe::Normalize::TopK;
  a.y = c.dt == DType::F32 ? static_cast<void*>(yf.data()) : yh.data();
  a.y_stride = c.d_out;
  a.topk_idx = idx.data();
  a.topk_gates = gates.data();
  a.scores = scores.data();
  a.num_threads = c.threads;
  a.weight = c.base ? W.data() : nullptr;
  a.bias = c.base && (seed % 2 == 0) ? bias.data() : nullptr;
  if (c.base && !a.bias)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < c.d_out; ++o) yref[t * c.d_out + o] -= bias.get(o);
  // A given h lives in a wider buffer (row stride E*r + 3); the kernel must neither shrink nor
  // write it. Its padding columns hold NaN, which must never reach an output.
  const int64_t hs = E * r + 3;
  std::vector<float> hbuf;
  if (c.h_given) {
    hbuf.assign(static_cast<size_t>(T * hs), std::nanf(""));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t q = 0; q < E * r; ++q) {
        double acc = 0.0;
        for (int64_t i = 0; i < c.d_in; ++i) acc += double(x.get(t * c.d_in + i)) * A.get(q * c.d_in + i);
        hbuf[static_cast<size_t>(t * hs + 1 + q)] = static_cast<float>(acc);
      }
    a.h = hbuf.data() + 1;
    a.h_stride = hs;
  }
  const std::vector<float> hbefore = hbuf;
  personamoe::layer_forward(a);
  for (size_t i = 0; i < hbuf.size(); ++i)
    if (std::memcmp(&hbuf[i], &hbefore[i], sizeof(float)) != 0) {
      std::printf("FAIL T=%lld: the kernel wrote into the caller's h\n", static_cast<long long>(T));
      ++g_failures;
      break;
    }

  const double tol = c.dt == DType::F32 ? 1e-4 : (c.dt == DType::F16 ? 2e-2 : 8e-2);
  int bad = 0;
  for (int64_t i = 0; i < T * c.d_out && bad < 3; ++i) {
    const double got = c.dt == DType::F32 ? yf[i] : (c.dt == DType::BF16 ? from_bf16(yh[i]) : from_f16(yh[i]));
    if (!(std::fabs(got - yref[i]) <= tol * (1 + std::fabs(yref[i])))) {
      ++bad;
      CHECK(false, "y[%lld] = %g, expected %g (T=%lld d_in=%lld d_out=%lld E=%lld r=%lld k=%lld dt=%d mode=%d)",
            (long long)i, got, yref[i], (long long)T, (long long)c.d_in, (long long)c.d_out,
            (long long)E, (long long)r, (long long)k, int(c.dt), c.mode);
    }
  }
  for (int64_t i = 0; i < T * k; ++i) {
    CHECK(idx[i] == iref[i], "topk_idx[%lld] = %d, expected %d", (long long)i, idx[i], iref[i]);
    CHECK(std::fabs(gates[i] - gref[i]) <= 1e-4, "gate[%lld] = %g, expected %g", (long long)i, gates[i], gref[i]);
  }
}

void bench(int64_t T, int iters, int threads) {
  const Case c{T, 2048, 2048, 8, 16, 2, DType::F32, 0, false, false, 0, 1.0f, false, threads};
  std::mt19937 rng(1);
  Buf x(static_cast<size_t>(T * c.d_in), c.dt, rng, 1.0f);
  // 64 adapter banks (128 MiB) rotated, so A and B come from DRAM as in a real model.
  const int n_sets = 64;
  std::vector<Buf> As, Bs;
  for (int i = 0; i < n_sets; ++i) {
    As.emplace_back(8 * 16 * 2048, c.dt, rng, 0.02f);
    Bs.emplace_back(8 * 2048 * 16, c.dt, rng, 0.25f);
  }
  std::vector<float> s(8, 1.0f), y(static_cast<size_t>(T * 2048)), g(static_cast<size_t>(T * 2)),
      sc(static_cast<size_t>(T * 8));
  std::vector<int32_t> idx(static_cast<size_t>(T * 2));
  LayerArgs a;
  a.T = T; a.d_in = 2048; a.d_out = 2048; a.E = 8; a.r = 16; a.k = 2;
  a.x = x.data(); a.x_stride = 2048; a.scaling = s.data();
  a.y = y.data(); a.y_stride = 2048; a.topk_idx = idx.data(); a.topk_gates = g.data();
  a.scores = sc.data(); a.num_threads = threads;
  double best = 1e30;
  std::vector<double> all;
  for (int i = 0; i < iters; ++i) {
    a.lora_a = As[i % n_sets].data();
    a.lora_b = Bs[i % n_sets].data();
    // One thread: this thread's CPU time (robust on a shared machine); more: wall-clock.
    timespec c0, c1;
    clock_gettime(threads == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &c0);
    personamoe::layer_forward(a);
    clock_gettime(threads == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &c1);
    const double us = (c1.tv_sec - c0.tv_sec) * 1e6 + (c1.tv_nsec - c0.tv_nsec) * 1e-3;
    if (us < best) best = us;
    all.push_back(us);
  }
  std::sort(all.begin(), all.end());
  std::printf("T=%lld threads=%d isa=%s best %.1f us, median %.1f us (weights from DRAM)\n",
              (long long)T, threads, personamoe::active_isa(), best, all[all.size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::strcmp(argv[1], "bench") == 0) {
    bench(std::atoll(argv[2]), argc >= 4 ? std::atoi(argv[3]) : 200, argc >= 5 ? std::atoi(argv[4]) : 1);
    return 0;
  }
  int n = 0;
  uint32_t seed = 1;
  for (const char* isa : {"generic", "avx2", "avx512"}) {
    if (!personamoe::force_isa(isa)) {
      std::printf("path %s: not supported by this CPU, not run\n", isa);
      continue;
    }
  const DType dts[] = {DType::F32, DType::BF16, DType::F16};
  const int64_t Ts[] = {0, 1, 3, 7, 64};
  const int64_t shapes[][4] = {{37, 45, 3, 5}, {64, 130, 8, 16}, {19, 70, 1, 1}, {33, 17, 3, 8}};
  for (const DType dt : dts)
    for (const int64_t T : Ts)
      for (const auto& sh : shapes)
        for (int variant = 0; variant < 6; ++variant) {
          const int64_t E = sh[2];
          const int64_t k = variant % 2 == 0 ? 1 : E;
          Case c{T, sh[0], sh[1], E, sh[3], k, dt, variant == 3 ? 1 : 0, variant == 1 || variant == 2,
                 variant == 2, variant == 1 ? 1 : 0, variant == 2 ? 0.5f : 1.0f, variant == 2,
                 1 + (variant % 2)};
          if (variant == 4) {  // base in the kernel, with a persona bias table and 2 threads
            c.base = true;
            c.bias = true;
            c.k = E > 1 ? 2 : 1;
            c.threads = 2;
          }
          if (variant == 5) {  // h given by the caller (a oneDNN shrink, an all-reduced h)
            c.h_given = true;
            c.bias = true;
            c.k = E > 1 ? 2 : 1;
            c.threads = 2;
          }
          run_case(c, seed++);
          ++n;
        }
    std::printf("path %s: %d cases so far, %d failures\n", isa, n, g_failures);
  }
  std::printf("%d cases, %d failures, isa %s\n", n, g_failures, personamoe::active_isa());
  return g_failures == 0 ? 0 : 1;
}
