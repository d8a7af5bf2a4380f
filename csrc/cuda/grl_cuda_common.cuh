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
