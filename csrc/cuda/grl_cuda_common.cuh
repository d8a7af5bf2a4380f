// grl_cuda_common.cuh -- dtype access, launch helpers and row norms shared by the .cu files.
#pragma once

#if defined(GRL_CUDA_EMU)
#include "grl_cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "grl_cuda.h"
#include "grl_geometry.h"

// Kernel launch, one spelling for both builds: GRL_LAUNCH(grid, block, smem, stream, kernel)(args...)
// is kernel<<<grid, block, smem, stream>>>(args...) under nvcc and the emulated loop over blocks
// and threads (grl::emu::launch) in the host build.
#if defined(GRL_CUDA_EMU)
#define GRL_LAUNCH(grid, block, smem, stream, ...) ::grl::emu::launch(grid, block, smem, stream, &__VA_ARGS__)
#else
#define GRL_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace grl {
namespace cuda {

template <typename T>
__device__ __forceinline__ float ldf(const T* p);
template <>
__device__ __forceinline__ float ldf<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float ldf<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float ldf<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__device__ __forceinline__ void stf(T* p, float v);
template <>
__device__ __forceinline__ void stf<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void stf<__half>(__half* p, float v) { *p = __float2half(v); }
template <>
__device__ __forceinline__ void stf<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

constexpr int kThreads = 128;


inline unsigned int grid_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  if (b > 65535LL * 512) b = 65535LL * 512;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(b);
}

__device__ __forceinline__ int64_t global_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

__device__ __forceinline__ float inv_norm(float n) { return 1.0f / fmaxf(n, float(kNormEps)); }

// Load d elements (stride sc) scaled by `scale` into a register tile.
template <typename T, int MAXD>
__device__ __forceinline__ void load_row(const T* p, int64_t sc, int d, float scale, float (&r)[MAXD]) {
#pragma unroll
  for (int c = 0; c < MAXD; ++c) r[c] = (c < d) ? ldf(p + c * sc) * scale : 0.0f;
}

template <int MAXD>
__device__ __forceinline__ float dot_row(const float (&a)[MAXD], const float (&b)[MAXD]) {
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < MAXD; ++c) s += a[c] * b[c];
  return s;
}

// Backward kernels hold three d-wide rows per thread; at MAXD 64 that is 192 registers and
// ptxas spills. There the rows read from an input (dY, the own query / key row) are re-read
// from memory at each use instead (an L1 hit: the same address on every iteration; the same
// bits as the tile).
template <int MAXD>
constexpr bool kStreamRow = MAXD > 32;

template <int MAXD, typename T>
__device__ __forceinline__ float row_elem(const float (&tile)[MAXD], const T* p, int c, float scale = 1.0f) {
  if constexpr (kStreamRow<MAXD>) {
    return ldf(p + c) * scale;  // the bits load_row(p, 1, d, scale, tile) put in the tile
  } else {
    return tile[c];
  }
}

// A pointer the compiler can no longer prove equal to itself (an empty asm that "changes" it):
// reads through it after the dot products of a column kernel are new loads (L1 hits) instead
// of the two walked rows kept in registers, which at MAXD 64 would not fit next to two
// accumulator tiles. Only at MAXD 64; nothing is emitted.
template <int MAXD, bool kOn = true, typename P>
__device__ __forceinline__ P* reread(P* p) {
  if constexpr (kOn && kStreamRow<MAXD>) {
#if defined(GRL_CUDA_EMU)
    asm volatile("" : "+r"(p));
#else
    asm volatile("" : "+l"(p));
#endif
  }
  return p;
}

// dL/dx of x_hat = x / max(||x||, eps) given g = dL/dx_hat (in place).
template <int MAXD>
__device__ __forceinline__ void normalize_backward(float (&g)[MAXD], const float (&xhat)[MAXD], float n) {
  if (n > float(kNormEps)) {
    const float dot = dot_row(xhat, g), inv = 1.0f / n;
#pragma unroll
    for (int c = 0; c < MAXD; ++c) g[c] = (g[c] - xhat[c] * dot) * inv;
  } else {
#pragma unroll
    for (int c = 0; c < MAXD; ++c) g[c] *= 1.0f / float(kNormEps);
  }
}

// ||row|| of rows (b, pos, h): element (b, pos, h*d + c) at
// b*sb + (pos / pw)*sy + (pos % pw)*sx + (coff + h*d + c)*sc. out is (B, P, nh).
template <typename T>
__global__ void row_norms_kernel(const T* x, int64_t B, int64_t P, int64_t pw, int64_t nh, int64_t d, int64_t sb,
                                 int64_t sy, int64_t sx, int64_t sc, int64_t coff, float* out) {
  const int64_t total = B * P * nh;
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t h = idx % nh, pos = (idx / nh) % P, b = idx / (nh * P);
    const T* p = x + b * sb + (pos / pw) * sy + (pos % pw) * sx + (coff + h * d) * sc;
    float ss = 0.0f;
    for (int64_t c = 0; c < d; ++c) {
      const float v = ldf(p + c * sc);
      ss += v * v;
    }
    out[idx] = sqrtf(ss);
  }
}

// ---- softmax row statistics ------------------------------------------------------------
// A row's (m, 1/l) at st[0], st[1] (grl_cuda.h, StripeSaved): saved by the forward, and
// P = exp(s - m) / l recomputed by the backward from the same logit s.
__device__ __forceinline__ void store_row_stat(float* st, float m, float l) {
  st[0] = m;
  st[1] = 1.0f / l;
}
__device__ __forceinline__ float row_prob(float s, float m, float inv_l) { return expf(s - m) * inv_l; }

// ---- bias-table and logit-scale gradients without atomics ---------------------------------
// dB[h, r] = sum over windows w and in-window pairs (row i, column j) with rel(i, j) = r of
// dS[w, h, i, j], and dtau[h] = sum of dS * cos over everything. The relative index depends
// only on the in-window positions, never on the window, so:
//   1. a partial kernel (per attention kind) has one thread per (window group, h, i, j); it
//      loops over the windows of its group recomputing dS and cos and writes
//      PB[grp, h, i, j] = sum_w dS and PT[grp, h, i, j] = sum_w dS * cos;
//   2. bias_grad_reduce: one thread per (h, r) sums PB (and PT) over the groups and the pairs
//      of table row r: rows on an rh x rw rectangle, columns on ch x cw,
//      r = (u - y + oy) * Rw + (v - x + ox) for row (u, v) and column (y, x);
//   3. tau_grad_reduce: one thread per head sums the R per-row PT sums.
// Steps 2 and 3 accumulate in double (small kernels; the sums cancel). Every sum runs in a fixed order: the same bits on every run, for any launch configuration.
struct BiasBins {
  int64_t rh, rw, ch, cw, oy, ox, Rh, Rw;
  int64_t pairs() const { return rh * rw * ch * cw; }
};

constexpr int64_t kBiasThreads = int64_t(1) << 18;   // aimed-at threads of a partial kernel
constexpr int64_t kBiasMaxFloats = int64_t(1) << 26;  // partials cap: 64M floats (256 MB)

// Window groups of the partial kernel: enough (group, h, i, j) threads to fill a GPU, partials
// within kBiasMaxFloats (never fewer than one group), and at most one group per window.
struct BiasGroups {
  int64_t groups, per;  // groups of `per` consecutive windows (the last may be short)
};
inline BiasGroups bias_groups(int64_t n_win, int64_t nh, int64_t pairs) {
  const int64_t cells = nh * pairs;
  int64_t want = (kBiasThreads + cells - 1) / cells;
  const int64_t cap = kBiasMaxFloats / (2 * cells);
  if (want > cap) want = cap;
  if (want > n_win) want = n_win;
  if (want < 1) want = 1;
  const int64_t per = (n_win + want - 1) / want;
  return BiasGroups{(n_win + per - 1) / per, per};
}

// Workspace floats: PB and PT (groups, nh, pairs) each, then TT (nh, R) in double (at an even
// float offset; the workspace itself is at least 8-byte aligned).
inline int64_t bias_tt_offset(int64_t part) { return 2 * part; }
inline int64_t bias_workspace_floats(int64_t n_win, int64_t nh, const BiasBins& b) {
  const BiasGroups gp = bias_groups(n_win, nh, b.pairs());
  return bias_tt_offset(gp.groups * nh * b.pairs()) + 2 * nh * b.Rh * b.Rw;
}

// Position (batch b, window row wy, window column wx) of window w of a batch-major list of
// windows, advanced with counters (the partial kernels walk consecutive windows).
struct WindowCursor {
  int64_t b, wy, wx;
  __device__ __forceinline__ WindowCursor(int64_t w, int64_t windows_w, int64_t num_windows)
      : b(w / num_windows), wy((w % num_windows) / windows_w), wx((w % num_windows) % windows_w) {}
  __device__ __forceinline__ int64_t win(int64_t windows_w) const { return wy * windows_w + wx; }
  __device__ __forceinline__ void next(int64_t windows_h, int64_t windows_w) {
    if (++wx == windows_w) {
      wx = 0;
      if (++wy == windows_h) wy = 0, ++b;
    }
  }
};

namespace {  // kernels defined in this header: one copy per translation unit

__global__ void bias_grad_reduce(const float* pb, const float* pt, int64_t groups, int64_t nh, BiasBins b,
                                 float* dbias, double* tt) {
  const int64_t R = b.Rh * b.Rw, Nr = b.rh * b.rw, Nc = b.ch * b.cw, gstride = nh * Nr * Nc;
  for (int64_t idx = global_index(); idx < nh * R; idx += global_stride()) {
    const int64_t h = idx / R, r = idx - h * R, ry = r / b.Rw, rx = r - ry * b.Rw;
    const int64_t dy = ry - b.oy, dx = rx - b.ox;  // row - column offsets of the pairs of r
    const int64_t u0 = dy > 0 ? dy : 0, u1 = (b.ch + dy < b.rh) ? b.ch + dy : b.rh;
    const int64_t v0 = dx > 0 ? dx : 0, v1 = (b.cw + dx < b.rw) ? b.cw + dx : b.rw;
    double sb = 0.0, st = 0.0;  // thousands of cancelling terms (rows of dS sum to 0): in double
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t base = grp * gstride + h * Nr * Nc;
      for (int64_t u = u0; u < u1; ++u)
        for (int64_t v = v0; v < v1; ++v) {
          const int64_t off = base + (u * b.rw + v) * Nc + (u - dy) * b.cw + (v - dx);
          sb += pb[off];
          st += pt[off];
        }
    }
    dbias[idx] = static_cast<float>(sb);
    tt[idx] = st;
  }
}

__global__ void tau_grad_reduce(const double* tt, int64_t nh, int64_t R, float* dtau) {
  for (int64_t h = global_index(); h < nh; h += global_stride()) {
    double s = 0.0;
    for (int64_t r = 0; r < R; ++r) s += tt[h * R + r];
    dtau[h] = static_cast<float>(s);
  }
}

}  // namespace

// Steps 2 and 3 on the workspace ws laid out as bias_workspace_floats describes.
inline void reduce_bias_grads(float* ws, int64_t n_win, int64_t nh, const BiasBins& b, float* dbias, float* dtau,
                              cudaStream_t st) {
  const BiasGroups gp = bias_groups(n_win, nh, b.pairs());
  const int64_t part = gp.groups * nh * b.pairs(), R = b.Rh * b.Rw;
  double* tt = reinterpret_cast<double*>(ws + bias_tt_offset(part));
  GRL_LAUNCH(grid_for(nh * R), kThreads, 0, st, bias_grad_reduce)(ws, ws + part, gp.groups, nh, b, dbias, tt);
  GRL_LAUNCH(1, kThreads, 0, st, tau_grad_reduce)(tt, nh, R, dtau);
}

// Calls fn(T{}, MaxD<MAXD>{}) with the element type of `dtype` and the register row width
// for head dim d (32 or 64); cudaErrorInvalidValue for anything else. The tag arguments
// let one generic lambda per entry point instantiate every (dtype, width) pair.
template <int N>
struct MaxD {
  static constexpr int value = N;
};

template <typename F>
cudaError_t dispatch_dtype_width(int dtype, int64_t d, F&& fn) {
  auto by_width = [&](auto tag) -> cudaError_t {
    if (d <= 32) return fn(tag, MaxD<32>{});
    if (d <= 64) return fn(tag, MaxD<64>{});
    return cudaErrorInvalidValue;
  };
  switch (dtype) {
    case kFloat32: return by_width(float{});
    case kFloat16: return by_width(__half{});
    case kBFloat16: return by_width(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace grl
