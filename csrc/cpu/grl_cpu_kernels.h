// grl_cpu_kernels.h -- small numeric helpers of the fused CPU kernels.
//
// All inner loops run over a contiguous dimension (head dim d, a token block or
// the anchors of a window) so the compiler vectorizes them at -O3; exp uses a
// branch-free polynomial that vectorizes too (std::exp does not).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace grl {
namespace cpu {

// exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, degree-6 Taylor
// polynomial for e^r (relative error < 2e-7, below float32 rounding of the
// softmax sums); x below -87.3 (2^-126) returns 0. Written without calls or
// branches so loops over it vectorize.
static inline float exp_fast(float x) {
  const float lo = -87.3365f, hi = 88.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606820309417232e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof(s));
  return x < lo ? 0.0f : p * s;
}

static inline double exp_fast(double x) { return std::exp(x); }

template <typename acc_t>
static inline acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Row reductions with 16 independent partial results, so that they vectorize without
// -ffast-math (a single running max / sum is a serial dependency the compiler must keep).
template <typename T>
static inline T row_max(const T* x, int64_t n) {
  T part[16];
  for (int k = 0; k < 16; ++k) part[k] = neg_inf<T>();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) part[k] = x[j + k] > part[k] ? x[j + k] : part[k];
  T m = neg_inf<T>();
  for (int k = 0; k < 16; ++k) m = part[k] > m ? part[k] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <typename T>
static inline T row_sum(const T* x, int64_t n) {
  T part[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) part[k] += x[j + k];
  T s = 0;
  for (int k = 0; k < 16; ++k) s += part[k];
  for (; j < n; ++j) s += x[j];
  return s;
}

template <typename T>
static inline T row_dot(const T* x, const T* y, int64_t n) {
  T part[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) part[k] += x[j + k] * y[j + k];
  T s = 0;
  for (int k = 0; k < 16; ++k) s += part[k];
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

// x[j] = exp(x[j] - m) in place; returns the sum.
template <typename T>
static inline T exp_shift_sum(T* x, int64_t n, T m) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_fast(x[j] - m);
  return row_sum(x, n);
}

// r[0:d] = src[0:d * stride:stride] converted to the accumulation type; the common
// contiguous case (channel stride 1) gets its own loop, which vectorizes.
template <typename scalar_t, typename acc_t>
static inline void load_row(const scalar_t* __restrict src, int64_t stride, int64_t d, acc_t* __restrict r) {
  if (stride == 1) {
    for (int64_t c = 0; c < d; ++c) r[c] = static_cast<acc_t>(src[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) r[c] = static_cast<acc_t>(src[c * stride]);
  }
}

// Software prefetch of the cache lines of one row of d elements (stride in elements).
constexpr int64_t kPrefetch = 16;  // rows ahead
template <typename scalar_t>
static inline void prefetch_row(const scalar_t* p, int64_t d, int64_t stride) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = (d - 1) * stride * static_cast<int64_t>(sizeof(scalar_t)) + sizeof(scalar_t);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
  __builtin_prefetch(c + bytes - 1, 0, 3);  // the last line when the row straddles one more
}

// Same for a contiguous row about to be written (prefetch with intent to write).
template <typename scalar_t>
static inline void prefetch_row_for_write(scalar_t* p, int64_t d) {
  char* c = reinterpret_cast<char*>(p);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1, 3);
  __builtin_prefetch(c + bytes - 1, 1, 3);
}

// F.normalize: returns ||x|| and scales x in place by 1 / max(||x||, eps).
template <typename acc_t>
static inline acc_t normalize_inplace(acc_t* x, int64_t d) {
  const acc_t n = std::sqrt(row_dot(x, x, d));  // 16 partial sums: vectorizes
  const acc_t inv = acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
  for (int64_t c = 0; c < d; ++c) x[c] *= inv;
  return n;
}

// Backward of x_hat = x / max(||x||, eps): given g = dL/dx_hat, x_hat and ||x||,
// dL/dx = (g - x_hat (x_hat . g)) / ||x|| when ||x|| > eps, else g / eps.
// Writes the result into g.
template <typename acc_t>
static inline void normalize_backward_inplace(acc_t* g, const acc_t* xhat, acc_t n, int64_t d) {
  if (n > acc_t(kNormEps)) {
    acc_t dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += xhat[c] * g[c];
    const acc_t inv = acc_t(1) / n;
    for (int64_t c = 0; c < d; ++c) g[c] = (g[c] - xhat[c] * dot) * inv;
  } else {
    const acc_t inv = acc_t(1) / acc_t(kNormEps);
    for (int64_t c = 0; c < d; ++c) g[c] *= inv;
  }
}

// Round the head dim up to a multiple of 16 (scratch rows are zero-padded to it so the
// GEMM micro-kernel below always works on full 16-wide column tiles of d).
static inline int64_t pad16(int64_t d) { return (d + 15) / 16 * 16; }

// C (M x N, row stride ldc) = alpha * A * B  (+ C when accumulate), with
// A(r, k) = A[r * ars + k * acs] (so A may be a transposed view) and B row-major (K x N, ldb).
// Register tiles of MR x NR accumulators: for each k, MR broadcasts of A and one NR-wide
// load of B feed MR * NR fused multiply-adds (plain C++; the compiler vectorizes the NR loop).
// Full MR x 16 tile. GCC/Clang vector extensions keep the MR x 16 accumulators in registers
// (plain arrays got spilled to the stack): per k, one 16-wide load of B, MR broadcasts of A.
template <int MR, typename T>
static inline void gemm_tile_full(int64_t K, T alpha, const T* __restrict A, int64_t ars, int64_t acs,
                                  const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc, bool accumulate) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(T);  // lanes per vector
  constexpr int NV = 16 / L;         // vectors per 16-wide row tile
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], B + k * ldb + v * L, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * ars + k * acs];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      V out = alpha * acc[r][v];
      T* c = C + r * ldc + v * L;
      if (accumulate) {
        V old;
        std::memcpy(&old, c, sizeof(V));
        out += old;
      }
      std::memcpy(c, &out, sizeof(V));
    }
  }
}

// Edge tile (fewer than NR columns): plain loops, accumulating straight into C.
template <typename T>
static inline void gemm_tile_edge(int64_t mr, int64_t nr, int64_t K, T alpha, const T* A, int64_t ars, int64_t acs,
                                  const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < mr; ++r) {
    T acc[64] = {};
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[r * ars + k * acs];
      const T* b = B + k * ldb;
      for (int64_t jj = 0; jj < nr; ++jj) acc[jj] += a * b[jj];
    }
    T* c = C + r * ldc;
    for (int64_t jj = 0; jj < nr; ++jj) c[jj] = accumulate ? c[jj] + alpha * acc[jj] : alpha * acc[jj];
  }
}

template <typename T>
static void gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t ars, int64_t acs, const T* B,
                 int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int MR = 4, NR = 16;
  const int64_t Nf = N / NR * NR;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    for (int64_t j = 0; j < Nf; j += NR)
      gemm_tile_full<MR, T>(K, alpha, A + i * ars, ars, acs, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    if (Nf < N) gemm_tile_edge<T>(MR, N - Nf, K, alpha, A + i * ars, ars, acs, B + Nf, ldb, C + i * ldc + Nf, ldc, accumulate);
  }
  for (; i < M; ++i) {
    for (int64_t j = 0; j < Nf; j += NR)
      gemm_tile_full<1, T>(K, alpha, A + i * ars, ars, acs, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    if (Nf < N) gemm_tile_edge<T>(1, N - Nf, K, alpha, A + i * ars, ars, acs, B + Nf, ldb, C + i * ldc + Nf, ldc, accumulate);
  }
}

}  // namespace cpu
}  // namespace grl
