// grl_cpu_kernels.h -- small numeric helpers of the fused CPU kernels.
//
// All inner loops run over a contiguous dimension (head dim d, a token block or
// the anchors of a window) so the compiler vectorizes them at -O3; exp uses a
// branch-free polynomial that vectorizes too (std::exp does not).
#pragma once

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

// F.normalize: returns ||x|| and scales x in place by 1 / max(||x||, eps).
template <typename acc_t>
static inline acc_t normalize_inplace(acc_t* x, int64_t d) {
  acc_t ss = 0;
  for (int64_t c = 0; c < d; ++c) ss += x[c] * x[c];
  const acc_t n = std::sqrt(ss);
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

}  // namespace cpu
}  // namespace grl
