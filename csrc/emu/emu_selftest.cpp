// emu_selftest.cpp -- the CUDA kernels, emulated on the host, on EXACTLY sized malloc'd buffers,
// for AddressSanitizer / UBSan (no torch). tests/test_cuda_emulation.py builds it with
//   g++ -std=c++20 -O0 -g1 -DGRL_CUDA_EMU -fsanitize=address,undefined -fno-sanitize-recover=all
//       -Icsrc/include -Icsrc/cuda -Icsrc/emu csrc/emu/emu_selftest.cpp
// and runs it: any read or write outside a buffer (each buffer is its own allocation, so one
// element past the end hits ASan's red zone), any signed overflow, misaligned or out-of-range
// access aborts with a report. The inputs are strided like GRL's: qkv a channel slice of a
// wider (B, L, 5C) tensor, allocated only from its first to its last element; anchors transposed
// (non-contiguous). The process prints one line per case and checks every output is finite.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "grl_stripe.cu"
#include "grl_window.cu"

namespace {

using namespace grl;
using namespace grl::cuda;

uint32_t rng_state = 12345u;
float frand() {  // uniform in [-1, 1)
  rng_state = rng_state * 1664525u + 1013904223u;
  return static_cast<float>(rng_state >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

size_t elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

void store(void* buf, int dtype, size_t i, float v) {
  if (dtype == kFloat32) static_cast<float*>(buf)[i] = v;
  else if (dtype == kFloat16) static_cast<__half*>(buf)[i] = __float2half(v);
  else static_cast<__nv_bfloat16*>(buf)[i] = __float2bfloat16(v);
}

float load(const void* buf, int dtype, size_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(buf)[i];
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(buf)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(buf)[i]);
}

// An exactly sized allocation of n elements filled with random values (or zeros).
void* alloc(size_t n, int dtype, bool zero) {
  void* p = std::malloc(n * elem_size(dtype));
  if (!p) std::abort();
  for (size_t i = 0; i < n; ++i) store(p, dtype, i, zero ? 0.0f : frand());
  return p;
}
float* allocf(size_t n, bool zero, float lo = -1.0f, float hi = 1.0f) {
  float* p = static_cast<float*>(alloc(n, kFloat32, true));
  if (!zero)
    for (size_t i = 0; i < n; ++i) p[i] = lo + (hi - lo) * 0.5f * (frand() + 1.0f);
  return p;
}

int failures = 0;

void check_finite(const char* what, const void* buf, int dtype, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(load(buf, dtype, i))) {
      std::printf("FAIL %s: element %zu is not finite\n", what, i);
      ++failures;
      return;
    }
}

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("FAIL %s: %s\n", what, cudaGetErrorString(e));
    ++failures;
  }
}

// qkv: a (B, L, 3C) slice starting at channel C of a (B, L, 5C) tensor, allocated from its
// first to its last element only.
struct QKV {
  void* buf;
  int64_t sb, sl, sc;
  size_t n;
};
QKV make_qkv(int64_t B, int64_t L, int64_t C, int dtype) {
  QKV q{nullptr, L * 5 * C, 5 * C, 1, 0};
  q.n = static_cast<size_t>((B - 1) * q.sb + (L - 1) * q.sl + 3 * C);
  q.buf = alloc(q.n, dtype, false);
  return q;
}

void stripe_case(int64_t B, int64_t H, int64_t W, int64_t sh, int64_t sw, int64_t shift_h, int64_t shift_w,
                 int64_t f, int64_t shifted, int64_t nh, int64_t d, int dtype) {
  StripeProblem p;
  p.g = make_stripe_geom(H, W, sh, sw, shift_h, shift_w, f, shifted);
  const StripeGeom& g = p.g;
  p.B = B; p.C = nh * d; p.nh = nh; p.d = d; p.dtype = dtype;
  const int64_t L = H * W, C = p.C, A = g.Ha * g.Wa, tasks = B * g.num_windows * nh;
  QKV q = make_qkv(B, L, C, dtype);
  p.qkv = q.buf; p.q_sb = q.sb; p.q_sl = q.sl; p.q_sc = q.sc;
  // anchors stored as (B, Wa, Ha, C) and viewed as (B, Ha, Wa, C): non-contiguous
  void* anc = alloc(static_cast<size_t>(B * A * C), dtype, false);
  p.anchor = anc; p.a_sb = A * C; p.a_sh = C; p.a_sw = g.Ha * C; p.a_sc = 1;
  float* tau1 = allocf(nh, false, 1.0f, 10.0f);
  float* tau2 = allocf(nh, false, 1.0f, 10.0f);
  float* bias1 = allocf(nh * g.table_rows, false, 0.0f, 16.0f);
  float* bias2 = allocf(nh * g.table_rows, false, 0.0f, 16.0f);
  p.tau1 = tau1; p.tau2 = tau2; p.bias1 = bias1; p.bias2 = bias2;
  void* out = alloc(static_cast<size_t>(B * L * C), dtype, true);
  StripeSaved s{allocf(tasks * g.n2 * d, true), allocf(tasks * g.n2 * 2, true), allocf(tasks * g.n1 * 2, true),
                allocf(B * L * nh, true), allocf(B * L * nh, true), allocf(B * A * nh, true)};
  ok(stripe_forward(p, out, s, nullptr), "stripe forward");
  void* gout = alloc(static_cast<size_t>(B * L * C), dtype, false);
  StripeGrads gr{gout, alloc(static_cast<size_t>(B * L * 3 * C), dtype, true),
                 alloc(static_cast<size_t>(B * A * C), dtype, true), allocf(nh, true), allocf(nh * g.table_rows, true),
                 allocf(nh, true), allocf(nh * g.table_rows, true), allocf(tasks * g.n2 * d, true),
                 allocf(tasks * g.n2 * d, true), allocf(tasks * g.n2, true), allocf(tasks * g.n1, true),
                 allocf(stripe_bias_workspace(p), true)};
  ok(stripe_backward(p, s, gr, nullptr), "stripe backward");
  check_finite("stripe out", out, dtype, B * L * C);
  check_finite("stripe d_qkv", gr.gqkv, dtype, B * L * 3 * C);
  check_finite("stripe d_anchor", gr.ganc, dtype, B * A * C);
  check_finite("stripe d_bias1", gr.dbias1, kFloat32, nh * g.table_rows);
  check_finite("stripe d_bias2", gr.dbias2, kFloat32, nh * g.table_rows);
  std::printf("ok stripe B%lld %lldx%lld stripe %lldx%lld shift %lld,%lld f%lld masked=%lld nh%lld d%lld dtype%d\n",
              (long long)B, (long long)H, (long long)W, (long long)sh, (long long)sw, (long long)shift_h,
              (long long)shift_w, (long long)f, (long long)shifted, (long long)nh, (long long)d, dtype);
  for (void* ptr : {q.buf, anc, static_cast<void*>(tau1), static_cast<void*>(tau2), static_cast<void*>(bias1),
                    static_cast<void*>(bias2), out, static_cast<void*>(s.z), static_cast<void*>(s.stat1),
                    static_cast<void*>(s.stat2), static_cast<void*>(s.qn), static_cast<void*>(s.kn),
                    static_cast<void*>(s.an), gout, gr.gqkv, gr.ganc, static_cast<void*>(gr.dtau1),
                    static_cast<void*>(gr.dbias1), static_cast<void*>(gr.dtau2), static_cast<void*>(gr.dbias2),
                    static_cast<void*>(gr.dz), static_cast<void*>(gr.da), static_cast<void*>(gr.d1),
                    static_cast<void*>(gr.d2), static_cast<void*>(gr.bias_ws)})
    std::free(ptr);
}

void window_case(int64_t B, int64_t H, int64_t W, int64_t ws, int64_t shift, int64_t nh, int64_t d, int dtype) {
  WindowProblem p;
  p.g = make_window_geom(H, W, ws, shift);
  const WindowGeom& g = p.g;
  p.B = B; p.C = nh * d; p.nh = nh; p.d = d; p.dtype = dtype;
  const int64_t L = H * W, C = p.C, rows = B * g.num_windows * nh * g.n;
  QKV q = make_qkv(B, L, C, dtype);
  p.qkv = q.buf; p.q_sb = q.sb; p.q_sl = q.sl; p.q_sc = q.sc;
  float* tau = allocf(nh, false, 1.0f, 10.0f);
  float* bias = allocf(nh * g.table_rows, false, 0.0f, 16.0f);
  p.tau = tau; p.bias = bias;
  void* out = alloc(static_cast<size_t>(B * L * C), dtype, true);
  WindowSaved s{allocf(rows * 2, true), allocf(B * L * nh, true), allocf(B * L * nh, true)};
  ok(window_forward(p, out, s, nullptr), "window forward");
  void* gout = alloc(static_cast<size_t>(B * L * C), dtype, false);
  WindowGrads gr{gout, alloc(static_cast<size_t>(B * L * 3 * C), dtype, true), allocf(nh, true),
                 allocf(nh * g.table_rows, true), allocf(rows, true), allocf(window_bias_workspace(p), true)};
  ok(window_backward(p, s, gr, nullptr), "window backward");
  check_finite("window out", out, dtype, B * L * C);
  check_finite("window d_qkv", gr.gqkv, dtype, B * L * 3 * C);
  check_finite("window d_bias", gr.dbias, kFloat32, nh * g.table_rows);
  std::printf("ok window B%lld %lldx%lld ws %lld shift %lld nh%lld d%lld dtype%d\n", (long long)B, (long long)H,
              (long long)W, (long long)ws, (long long)shift, (long long)nh, (long long)d, dtype);
  for (void* ptr : {q.buf, static_cast<void*>(tau), static_cast<void*>(bias), out, static_cast<void*>(s.stat),
                    static_cast<void*>(s.qn), static_cast<void*>(s.kn), gout, gr.gqkv, static_cast<void*>(gr.dtau),
                    static_cast<void*>(gr.dbias), static_cast<void*>(gr.drow), static_cast<void*>(gr.bias_ws)})
    std::free(ptr);
}

}  // namespace

int main() {
  // stripes: shifted square, vertical groups (non-square, t = 0 anchor quirk), unshifted,
  // head dims 30 (MAXD 32) and 64, every dtype
  stripe_case(2, 16, 16, 8, 8, 4, 4, 2, 1, 2, 30, kFloat32);
  stripe_case(2, 16, 32, 8, 32, 0, 0, 4, 1, 1, 16, kBFloat16);  // groups along W (full width, shift 0)
  stripe_case(1, 32, 16, 16, 4, 0, 2, 4, 1, 2, 8, kFloat16);    // W-type block, non-square
  stripe_case(1, 16, 16, 8, 8, 0, 0, 2, 0, 1, 64, kFloat32);
  stripe_case(1, 16, 16, 8, 8, 4, 4, 2, 1, 1, 64, kBFloat16);
  // windows: shifted / unshifted, non-square, head dims 30 and 64
  window_case(2, 12, 18, 6, 3, 3, 30, kFloat32);
  window_case(1, 8, 12, 4, 2, 1, 64, kFloat16);
  window_case(1, 8, 8, 4, 0, 2, 16, kBFloat16);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all cases ok\n");
  return 0;
}
