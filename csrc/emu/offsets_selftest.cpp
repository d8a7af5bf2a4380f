// offsets_selftest.cpp -- 64-bit element offsets in the CUDA kernels (emulated on the host) and in
// the index math of grl_geometry.h. No torch. tests/test_large_offsets_cxx.py builds it with
//   g++ -std=c++20 -O1 -DGRL_CUDA_EMU -Wall -Wconversion -Werror -Icsrc/include -Icsrc/cuda -Icsrc/emu
//       csrc/emu/offsets_selftest.cpp
// (-Wconversion -Werror: an implicit 64 -> 32-bit narrowing anywhere in the kernels fails the build)
// and runs it. Three parts:
//  1. static_asserts: the index helpers return int64_t, every size / stride of the problem structs
//     is int64_t, global_index() / global_stride() are int64_t;
//  2. the helpers at positions beyond 2^31 (a 98304 x 98304 grid) against direct int64 formulas;
//  3. every kernel, forward and backward, on the LAST image of a batch so large that its rows,
//     its outputs' element offsets, its saved state and workspaces all lie beyond 2^31 elements
//     (batch 50331648 of 8 x 8 images; the thread index itself exceeds 2^31; checked): only the threads of
//     one (window, head) task of image 0 and of image B-1 run (the kernels are grid-stride loops,
//     emulated: blockIdx / threadIdx are set per row), in buffers that are lazy MAP_NORESERVE
//     mappings (~250 GB of address space for the stripe case, a few pages touched). The inputs have batch stride 0,
//     so both images see the same data, and image B-1 must give the same bits as image 0: a
//     32-bit offset reads zeros or writes elsewhere, and the compare fails.
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "grl_stripe.cu"
#include "grl_window.cu"

namespace {

using namespace grl;
using namespace grl::cuda;

template <typename A, typename B>
constexpr bool same = std::is_same<A, B>::value;

// ---- 1. types ------------------------------------------------------------------------
constexpr StripeGeom sg() { return StripeGeom{}; }
constexpr WindowGeom wg() { return WindowGeom{}; }
static_assert(same<decltype(unroll_position(0, 0, 0, 0, 1, 1)), int64_t>, "unroll_position");
static_assert(same<decltype(stripe_token_position(sg(), 0, 0)), int64_t>, "stripe_token_position");
static_assert(same<decltype(stripe_anchor_position(sg(), 0, 0)), int64_t>, "stripe_anchor_position");
static_assert(same<decltype(stripe_token_position_rc(sg(), 0, 0)), int64_t>, "stripe_token_position_rc");
static_assert(same<decltype(stripe_anchor_position_rc(sg(), 0, 0)), int64_t>, "stripe_anchor_position_rc");
static_assert(same<decltype(window_token_position(wg(), 0, 0)), int64_t>, "window_token_position");
static_assert(same<decltype(window_token_position_rc(wg(), 0, 0)), int64_t>, "window_token_position_rc");
static_assert(same<decltype(stripe_w2a_index(sg(), 0, 0)), int64_t>, "stripe_w2a_index");
static_assert(same<decltype(stripe_a2w_index(sg(), 0, 0)), int64_t>, "stripe_a2w_index");
static_assert(same<decltype(window_rel_index(wg(), 0, 0)), int64_t>, "window_rel_index");
static_assert(same<decltype(stripe_token_offset(sg(), 0)), int64_t>, "stripe_token_offset");
static_assert(same<decltype(window_token_offset(wg(), 0)), int64_t>, "window_token_offset");
static_assert(same<decltype(global_index()), int64_t> && same<decltype(global_stride()), int64_t>, "global_index");
#define GRL_I64(S, f) static_assert(same<decltype(S::f), int64_t>, #S "::" #f " must be int64_t")
GRL_I64(StripeGeom, H); GRL_I64(StripeGeom, W); GRL_I64(StripeGeom, Ha); GRL_I64(StripeGeom, Wa);
GRL_I64(StripeGeom, n1); GRL_I64(StripeGeom, n2); GRL_I64(StripeGeom, num_windows); GRL_I64(StripeGeom, windows_w);
GRL_I64(StripeGeom, table_rows); GRL_I64(StripeGeom, table_w);
GRL_I64(WindowGeom, H); GRL_I64(WindowGeom, W); GRL_I64(WindowGeom, n); GRL_I64(WindowGeom, num_windows);
GRL_I64(WindowGeom, windows_w); GRL_I64(WindowGeom, table_rows); GRL_I64(WindowGeom, table_side);
GRL_I64(StripeProblem, B); GRL_I64(StripeProblem, C); GRL_I64(StripeProblem, nh); GRL_I64(StripeProblem, d);
GRL_I64(StripeProblem, q_sb); GRL_I64(StripeProblem, q_sl); GRL_I64(StripeProblem, q_sc);
GRL_I64(StripeProblem, a_sb); GRL_I64(StripeProblem, a_sh); GRL_I64(StripeProblem, a_sw); GRL_I64(StripeProblem, a_sc);
GRL_I64(WindowProblem, B); GRL_I64(WindowProblem, C); GRL_I64(WindowProblem, nh); GRL_I64(WindowProblem, d);
GRL_I64(WindowProblem, q_sb); GRL_I64(WindowProblem, q_sl); GRL_I64(WindowProblem, q_sc);
#undef GRL_I64

int failures = 0;

void expect(bool cond, const char* what, long long got, long long want) {
  if (!cond) {
    std::printf("FAIL %s: got %lld, expected %lld\n", what, got, want);
    ++failures;
  }
}

// ---- 2. helpers beyond 2^31 ---------------------------------------------------------------
constexpr int64_t kBig = 98304;  // 3 * 2^15: a kBig x kBig grid has 9.7e9 positions

int64_t roll(int64_t x, int64_t t, int64_t n) { return (x + t) % n; }

void helpers_beyond_2_31() {
  const int64_t lim = int64_t(1) << 31;
  // a shifted stripe geometry, f = 2: anchor grid 49152 x 49152 (2.4e9 positions)
  const StripeGeom g = make_stripe_geom(kBig, kBig, 64, 32, 32, 16, 2, 1);
  const int64_t wins[] = {0, g.num_windows / 2 + 7, g.num_windows - 1};
  int64_t above = 0;
  for (int64_t win : wins) {
    const int64_t wy = win / g.windows_w, wx = win % g.windows_w;
    for (int64_t j = 0; j < g.n1; j += 7) {
      const int64_t y = roll(wy * g.sh + j / g.sw, g.shift_h, g.H), x = roll(wx * g.sw + j % g.sw, g.shift_w, g.W);
      const int64_t got = stripe_token_position(g, win, j);
      expect(got == y * g.W + x, "stripe_token_position", got, y * g.W + x);
      above += got >= lim;
    }
    for (int64_t i = 0; i < g.n2; i += 3) {
      const int64_t y = roll(wy * g.ah + i / g.aw, g.ash, g.Ha), x = roll(wx * g.aw + i % g.aw, g.asw, g.Wa);
      const int64_t got = stripe_anchor_position(g, win, i);
      expect(got == y * g.Wa + x, "stripe_anchor_position", got, y * g.Wa + x);
      above += got >= lim;
    }
    // the division-free walks (the CUDA kernels' inner loops) give the same positions
    stripe_walk_tokens(g, win, [&](int64_t j, int64_t pos, int, int64_t) {
      if (j % 5 == 0) expect(pos == stripe_token_position(g, win, j), "stripe_walk_tokens", pos, stripe_token_position(g, win, j));
    });
    stripe_walk_anchors(g, win, [&](int64_t i, int64_t row, int64_t col, int, int64_t) {
      const int64_t want = stripe_anchor_position(g, win, i);
      expect(row * g.Wa + col == want, "stripe_walk_anchors", row * g.Wa + col, want);
    });
  }
  const WindowGeom w = make_window_geom(kBig, kBig, 32, 16);
  for (int64_t win : {int64_t(0), w.num_windows - 1, w.num_windows - w.windows_w + 3}) {
    const int64_t wy = win / w.windows_w, wx = win % w.windows_w;
    for (int64_t j = 0; j < w.n; j += 5) {
      const int64_t y = roll(wy * w.ws + j / w.ws, w.shift, w.H), x = roll(wx * w.ws + j % w.ws, w.shift, w.W);
      const int64_t got = window_token_position(w, win, j);
      expect(got == y * w.W + x, "window_token_position", got, y * w.W + x);
      above += got >= lim;
    }
    window_walk_tokens(w, win, [&](int64_t j, int64_t pos, int, int64_t) {
      expect(pos == window_token_position(w, win, j), "window_walk_tokens", pos, window_token_position(w, win, j));
    });
  }
  expect(above > 100, "positions beyond 2^31 checked", above, 100);
  // the emulated thread index: block 2^25, 128 threads per block -> 2^32 + 5
  blockIdx = dim3(1u << 25);
  blockDim = dim3(128);
  threadIdx = dim3(5);
  gridDim = dim3(1u << 26);
  expect(global_index() == (int64_t(1) << 32) + 5, "global_index", global_index(), (int64_t(1) << 32) + 5);
  expect(global_stride() == int64_t(1) << 33, "global_stride", global_stride(), int64_t(1) << 33);
  std::printf("ok helpers beyond 2^31 (%lld positions above 2^31)\n", (long long)above);
}

// ---- 3. the kernels on the last image of a huge batch ----------------------------------------
constexpr int64_t kHugeB = (int64_t(1) << 25) + (int64_t(1) << 24);  // 50331648 images of 8 x 8

uint32_t rng_state = 2024u;
float frand() {  // uniform in [-1, 1)
  rng_state = rng_state * 1664525u + 1013904223u;
  return static_cast<float>(rng_state >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

std::vector<std::pair<void*, size_t>> mappings;

// n elements of T, zero, committed lazily (only touched pages cost memory).
template <typename T>
T* lazy(int64_t n) {
  const size_t bytes = static_cast<size_t>(n) * sizeof(T);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::printf("SKIP cannot map %zu bytes lazily\n", bytes);
    std::exit(77);
  }
  mappings.emplace_back(p, bytes);
  return static_cast<T*>(p);
}

void release_all() {
  for (auto& m : mappings) munmap(m.first, m.second);
  mappings.clear();
}

float* filled(int64_t n, float lo, float hi) {
  float* p = lazy<float>(n);
  for (int64_t i = 0; i < n; ++i) p[i] = lo + (hi - lo) * 0.5f * (frand() + 1.0f);
  return p;
}

// Runs kernel(args...) as the threads idx0 .. idx0 + n - 1 of a grid large enough that each
// runs one iteration of its grid-stride loop.
template <typename K, typename... A>
void run_rows(K kernel, int64_t idx0, int64_t n, A&&... args) {
  for (int64_t idx = idx0; idx < idx0 + n; ++idx) {
    gridDim = dim3(0x7fffffffu);
    blockDim = dim3(static_cast<unsigned int>(kThreads));
    blockIdx = dim3(static_cast<unsigned int>(idx / kThreads));
    threadIdx = dim3(static_cast<unsigned int>(idx % kThreads));
    kernel(args...);
  }
}

// Rows [r0, r0 + n) of image 0 equal rows [rL, rL + n) bit for bit (row width w), and are not all 0.
template <typename T>
void same_rows(const char* what, const T* buf, int64_t r0, int64_t rL, int64_t n, int64_t w) {
  bool nonzero = false;
  for (int64_t e = 0; e < n * w; ++e) {
    const T a = buf[r0 * w + e], b = buf[rL * w + e];
    if (std::memcmp(&a, &b, sizeof(T)) != 0) {
      std::printf("FAIL %s: element %lld of the last image (offset %lld) differs from image 0's\n", what,
                  (long long)e, (long long)(rL * w + e));
      ++failures;
      return;
    }
    T zero{};
    nonzero |= std::memcmp(&a, &zero, sizeof(T)) != 0;
  }
  if (!nonzero) {
    std::printf("FAIL %s: all zero (the rows were never written)\n", what);
    ++failures;
  }
}

using bf16 = __nv_bfloat16;

bf16* activations(int64_t n) {  // one image's worth of random bfloat16 values (read with batch stride 0)
  bf16* p = lazy<bf16>(n);
  for (int64_t i = 0; i < n; ++i) p[i] = __float2bfloat16(frand());
  return p;
}

void huge_window() {
  WindowProblem p;
  p.g = make_window_geom(8, 8, 4, 2);
  const WindowGeom& g = p.g;
  const int64_t B = kHugeB, nh = 1, d = 2, C = nh * d, L = g.H * g.W, rows = B * g.num_windows * nh * g.n;
  p.B = B; p.C = C; p.nh = nh; p.d = d; p.dtype = kBFloat16;
  p.qkv = activations(L * 3 * C); p.q_sb = 0; p.q_sl = 3 * C; p.q_sc = 1;
  p.tau = filled(nh, 1.0f, 10.0f);
  p.bias = filled(nh * g.table_rows, 0.0f, 16.0f);
  bf16* out = lazy<bf16>(B * L * C);
  WindowSaved s{lazy<float>(rows * 2), lazy<float>(B * L * nh), lazy<float>(B * L * nh)};
  bf16* gout = lazy<bf16>(B * L * C);
  for (int64_t e = 0; e < L * C; ++e) gout[e] = gout[(B - 1) * L * C + e] = __float2bfloat16(frand());
  // bias partials with one window per group: the last image's pairs sit beyond 2^31
  const BiasGroups gp{B * g.num_windows, 1};
  const int64_t part = gp.groups * nh * g.n * g.n;
  WindowGrads gr{gout, lazy<bf16>(B * L * 3 * C), lazy<float>(nh), lazy<float>(nh * g.table_rows), lazy<float>(rows),
                 lazy<float>(2 * part)};
  const int64_t win = g.num_windows - 1, t0 = win * nh, tL = ((B - 1) * g.num_windows + win) * nh;
  for (int64_t b : {int64_t(0), B - 1}) {  // the norms of every row of the image
    run_rows(row_norms_kernel<bf16>, b * L * nh, L * nh, static_cast<const bf16*>(p.qkv), B, L, L, nh, d, p.q_sb,
             int64_t(0), p.q_sl, p.q_sc, int64_t(0), s.qn);
    run_rows(row_norms_kernel<bf16>, b * L * nh, L * nh, static_cast<const bf16*>(p.qkv), B, L, L, nh, d, p.q_sb,
             int64_t(0), p.q_sl, p.q_sc, C, s.kn);
  }
  for (int64_t t : {t0, tL}) run_rows(window_forward_kernel<bf16, 32>, t * g.n, g.n, p, s, out);
  for (int64_t t : {t0, tL}) run_rows(window_backward_queries<bf16, 32>, t * g.n, g.n, p, s, gr);
  for (int64_t t : {t0, tL}) run_rows(window_backward_keys<bf16, 32>, t * g.n, g.n, p, s, gr);
  for (int64_t t : {t0, tL})  // group = window t / nh, head 0: its N x N pairs
    run_rows(window_bias_partial<bf16>, t * g.n * g.n, g.n * g.n, p, s, gr, gp, gr.bias_ws, gr.bias_ws + part);
  expect(tL * g.n * g.n > (int64_t(1) << 31), "window bias partial index beyond 2^31", tL * g.n * g.n, int64_t(1) << 31);
  expect(tL * g.n > (int64_t(1) << 31), "window thread index beyond 2^31", tL * g.n, int64_t(1) << 31);
  expect((B - 1) * L * C > (int64_t(1) << 31), "window output offset beyond 2^31", (B - 1) * L * C, int64_t(1) << 31);
  same_rows("window qn", s.qn, 0, (B - 1) * L, L, nh);
  same_rows("window kn", s.kn, 0, (B - 1) * L, L, nh);
  same_rows("window out", out, 0, (B - 1) * L, L, C);  // rows of the other windows: 0 in both
  same_rows("window row stats", s.stat, t0, tL, 1, 2 * g.n);
  same_rows("window bias partial", gr.bias_ws, t0, tL, 1, g.n * g.n);
  same_rows("window tau partial", gr.bias_ws + part, t0, tL, 1, g.n * g.n);
  same_rows("window drow", gr.drow, t0, tL, 1, g.n);
  same_rows("window d_qkv", static_cast<bf16*>(gr.gqkv), 0, (B - 1) * L, L, 3 * C);
  std::printf("ok window kernels on image %lld (offsets up to %lld)\n", (long long)(B - 1),
              (long long)(B * L * 3 * C));
}

void huge_stripe() {
  StripeProblem p;
  // shifted, f = 1 (anchor grid = token grid: the anchor rows, Z and d_anchor offsets reach 2^31
  // at the same batch as the token rows; f = 2 is part 2's)
  p.g = make_stripe_geom(8, 8, 4, 8, 2, 4, 1, 1);
  const StripeGeom& g = p.g;
  const int64_t B = kHugeB, nh = 1, d = 2, C = nh * d, L = g.H * g.W, A = g.Ha * g.Wa;
  const int64_t tasks = B * g.num_windows * nh;
  p.B = B; p.C = C; p.nh = nh; p.d = d; p.dtype = kBFloat16;
  p.qkv = activations(L * 3 * C); p.q_sb = 0; p.q_sl = 3 * C; p.q_sc = 1;
  p.anchor = activations(A * C); p.a_sb = 0; p.a_sh = g.Wa * C; p.a_sw = C; p.a_sc = 1;
  p.tau1 = filled(nh, 1.0f, 10.0f); p.tau2 = filled(nh, 1.0f, 10.0f);
  p.bias1 = filled(nh * g.table_rows, 0.0f, 16.0f); p.bias2 = filled(nh * g.table_rows, 0.0f, 16.0f);
  bf16* out = lazy<bf16>(B * L * C);
  StripeSaved s{lazy<float>(tasks * g.n2 * d), lazy<float>(tasks * g.n2 * 2), lazy<float>(tasks * g.n1 * 2),
                lazy<float>(B * L * nh), lazy<float>(B * L * nh), lazy<float>(B * A * nh)};
  bf16* gout = lazy<bf16>(B * L * C);
  for (int64_t e = 0; e < L * C; ++e) gout[e] = gout[(B - 1) * L * C + e] = __float2bfloat16(frand());
  StripeGrads gr{gout, lazy<bf16>(B * L * 3 * C), lazy<bf16>(B * A * C), lazy<float>(nh),
                 lazy<float>(nh * g.table_rows), lazy<float>(nh), lazy<float>(nh * g.table_rows),
                 lazy<float>(tasks * g.n2 * d), lazy<float>(tasks * g.n2 * d), lazy<float>(tasks * g.n2),
                 lazy<float>(tasks * g.n1), lazy<float>(2 * tasks * g.n1 * g.n2)};
  const BiasGroups gp{B * g.num_windows, 1};  // one window per group (nh = 1: group = task)
  const int64_t part = tasks * g.n1 * g.n2;
  const int64_t win = g.num_windows - 1, t0 = win * nh, tL = ((B - 1) * g.num_windows + win) * nh;
  const bf16* q = static_cast<const bf16*>(p.qkv);
  for (int64_t b : {int64_t(0), B - 1}) {
    run_rows(row_norms_kernel<bf16>, b * L * nh, L * nh, q, B, L, L, nh, d, p.q_sb, int64_t(0), p.q_sl, p.q_sc,
             int64_t(0), s.qn);
    run_rows(row_norms_kernel<bf16>, b * L * nh, L * nh, q, B, L, L, nh, d, p.q_sb, int64_t(0), p.q_sl, p.q_sc, C,
             s.kn);
    run_rows(row_norms_kernel<bf16>, b * A * nh, A * nh, static_cast<const bf16*>(p.anchor), B, A, g.Wa, nh, d,
             p.a_sb, p.a_sh, p.a_sw, p.a_sc, int64_t(0), s.an);
  }
  for (int64_t t : {t0, tL}) run_rows(stage1_forward<bf16, 32>, t * g.n2, g.n2, p, s);
  for (int64_t t : {t0, tL}) run_rows(stage2_forward<bf16, 32>, t * g.n1, g.n1, p, s, out);
  for (int64_t t : {t0, tL}) run_rows(stage2_backward_tokens<bf16, 32>, t * g.n1, g.n1, p, s, gr);
  for (int64_t t : {t0, tL}) run_rows(stage2_backward_anchors<bf16, 32>, t * g.n2, g.n2, p, s, gr);
  for (int64_t t : {t0, tL}) run_rows(stage1_backward_tokens<bf16, 32>, t * g.n1, g.n1, p, s, gr);
  for (int64_t t : {t0, tL}) run_rows(stage1_backward_anchors<bf16, 32>, t * g.n2, g.n2, p, s, gr);
  for (int64_t t : {t0, tL})
    run_rows(stripe_bias_partial<bf16, 2>, t * g.n1 * g.n2, g.n1 * g.n2, p, s, gr, gp, gr.bias_ws, gr.bias_ws + part);
  same_rows("stripe bias2 partial", gr.bias_ws, t0, tL, 1, g.n1 * g.n2);
  same_rows("stripe tau2 partial", gr.bias_ws + part, t0, tL, 1, g.n1 * g.n2);
  for (int64_t t : {t0, tL})
    run_rows(stripe_bias_partial<bf16, 1>, t * g.n1 * g.n2, g.n1 * g.n2, p, s, gr, gp, gr.bias_ws, gr.bias_ws + part);
  same_rows("stripe bias1 partial", gr.bias_ws, t0, tL, 1, g.n1 * g.n2);
  same_rows("stripe tau1 partial", gr.bias_ws + part, t0, tL, 1, g.n1 * g.n2);
  expect(tL * g.n2 > (int64_t(1) << 31), "stripe thread index beyond 2^31", tL * g.n2, int64_t(1) << 31);
  expect(tL * g.n2 * d > (int64_t(1) << 31), "stripe Z offset beyond 2^31", tL * g.n2 * d, int64_t(1) << 31);
  same_rows("stripe an", s.an, 0, (B - 1) * A, A, nh);
  same_rows("stripe z", s.z, t0, tL, 1, g.n2 * d);
  same_rows("stripe row stats 1", s.stat1, t0, tL, 1, 2 * g.n2);
  same_rows("stripe row stats 2", s.stat2, t0, tL, 1, 2 * g.n1);
  same_rows("stripe out", out, 0, (B - 1) * L, L, C);
  same_rows("stripe dz", gr.dz, t0, tL, 1, g.n2 * d);
  same_rows("stripe da", gr.da, t0, tL, 1, g.n2 * d);
  same_rows("stripe d1", gr.d1, t0, tL, 1, g.n2);
  same_rows("stripe d2", gr.d2, t0, tL, 1, g.n1);
  same_rows("stripe d_qkv", static_cast<bf16*>(gr.gqkv), 0, (B - 1) * L, L, 3 * C);
  same_rows("stripe d_anchor", static_cast<bf16*>(gr.ganc), 0, (B - 1) * A, A, C);
  std::printf("ok stripe kernels on image %lld (offsets up to %lld)\n", (long long)(B - 1),
              (long long)(B * L * 3 * C));
}

}  // namespace

int main() {
  helpers_beyond_2_31();
  huge_window();
  release_all();
  huge_stripe();
  release_all();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all offset checks ok\n");
  return 0;
}
