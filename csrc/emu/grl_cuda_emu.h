// grl_cuda_emu.h -- a tiny CUDA emulation layer: the .cu sources of csrc/cuda compile as plain
// C++ for the host (g++ -DGRL_CUDA_EMU) and run on the CPU, so CI executes the SAME kernel code
// that nvcc compiles for the GPU (one source; see docs/cuda.md).
//
// What it provides (exactly what the kernels use today):
//   * the qualifiers __global__ / __device__ / __host__ / __forceinline__ / __launch_bounds__;
//   * threadIdx / blockIdx / blockDim / gridDim as thread_local dim3 (one set per host thread);
//   * launches: GRL_LAUNCH(grid, block, smem, stream, kernel)(args...) (grl_cuda_common.cuh)
//     expands to kernel<<<...>>>(args...) under nvcc and to grl::emu::launch(...)(args...) here,
//     which runs every block (OpenMP-parallel across blocks when compiled with -fopenmp) and,
//     inside a block, every thread one after the other to completion;
//   * atomicAdd(float*, float) via std::atomic_ref (safe across the OpenMP block workers);
//   * __half / __nv_bfloat16 storage types with IEEE round-to-nearest-even conversions
//     (__float2half, __half2float, __float2bfloat16, __bfloat162float);
//   * cudaError_t / cudaStream_t / cudaGetLastError / cudaGetErrorString; math comes from <cmath>
//     (expf, logf, sqrtf, fmaxf, INFINITY are the host's correctly rounded-or-close libm versions).
//
// Design for later: threads of a block run sequentially to completion, which is exact as long
// as the kernels use neither __shared__ memory shared between threads nor barriers (true today:
// one thread per attention row, no cross-thread communication except atomics). When a kernel
// starts using __syncthreads / __shared__ / warp shuffles, `run_block` below becomes the one
// place to change: run the block's threads as fibers (ucontext / a small stackful coroutine
// per thread, switching at every __syncthreads) or as std::threads meeting at a std::barrier,
// and give each block a zeroed shared-memory arena of the launch's `smem` bytes plus the static
// __shared__ arrays. Nothing else in the layer or in the kernels would change.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#ifndef __restrict__
#define __restrict__ __restrict
#endif

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ---- runtime API subset --------------------------------------------------------------
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct CUstream_st* cudaStream_t;

namespace grl {
namespace emu {
inline thread_local cudaError_t last_error = cudaSuccess;
}  // namespace emu
}  // namespace grl

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = grl::emu::last_error;
  grl::emu::last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
  }
  return "unknown error (emulated)";
}

// ---- atomics ----------------------------------------------------------------------------
inline float atomicAdd(float* address, float val) {
  return std::atomic_ref<float>(*address).fetch_add(val, std::memory_order_relaxed);
}

// ---- 16-bit floating types ---------------------------------------------------------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

namespace grl {
namespace emu {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// binary32 -> binary16, round to nearest, ties to even; overflow -> inf, NaN stays NaN (quiet).
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN / inf
  if (a >= 0x47800000u) return sign | 0x7c00u;                                 // >= 2^16: inf
  if (a < 0x38800000u) {
    // below the smallest normal half (2^-14): the result is k * 2^-24. Adding 0.5 (= 2^23 *
    // 2^-24) places 2^-24 at the last bit of the float's significand, so the float adder does
    // the round-to-nearest-even, and k is what is left in the low mantissa bits.
    const float r = float_of(a) + 0.5f;
    return sign | static_cast<uint16_t>(bits_of(r) - 0x3f000000u);
  }
  // normal: drop 13 mantissa bits with RNE, rebias the exponent (127 -> 15); a carry out of the
  // mantissa correctly bumps the exponent (and 65520 and above become inf).
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t r = a + 0xfffu + odd - ((127u - 15u) << 23);
  return sign | static_cast<uint16_t>(r >> 13);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return float_of(sign | 0x7f800000u | (m << 13));         // inf / NaN
  if (e == 0) return std::copysign(static_cast<float>(m) * 0x1p-24f, sign ? -1.0f : 1.0f);  // zero / subnormal
  return float_of(sign | ((e + 127u - 15u) << 23) | (m << 13));
}

// binary32 -> bfloat16 (the upper half), round to nearest, ties to even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

}  // namespace emu
}  // namespace grl

inline __half __float2half(float f) { return __half{grl::emu::f32_to_f16(f)}; }
inline float __half2float(__half h) { return grl::emu::f16_to_f32(h.x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{grl::emu::f32_to_bf16(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return grl::emu::bf16_to_f32(b.x); }

// ---- launches ------------------------------------------------------------------------------
namespace grl {
namespace emu {

// One block: every thread runs to completion in turn (see the design note above).
template <typename... P, typename... A>
void run_block(void (*kernel)(P...), const dim3& block, A&... args) {
  for (unsigned int z = 0; z < block.z; ++z)
    for (unsigned int y = 0; y < block.y; ++y)
      for (unsigned int x = 0; x < block.x; ++x) {
        threadIdx = dim3(x, y, z);
        kernel(args...);  // by value, like a launch: every thread gets its own copy
      }
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  void operator()(P... args) const {
    if (smem != 0 || block.x * block.y * block.z == 0 || block.x * block.y * block.z > 1024 || grid.y > 65535 ||
        grid.z > 65535 || grid.x == 0) {
      last_error = cudaErrorInvalidConfiguration;  // dynamic shared memory: not emulated yet
      return;
    }
    const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    const dim3 g = grid, b = block;
    void (*k)(P...) = kernel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (nblocks > 1)
#endif
    for (int64_t n = 0; n < nblocks; ++n) {
      gridDim = g;
      blockDim = b;
      blockIdx = dim3(static_cast<unsigned int>(n % g.x), static_cast<unsigned int>((n / g.x) % g.y),
                      static_cast<unsigned int>(n / (static_cast<int64_t>(g.x) * g.y)));
      run_block(k, b, args...);
    }
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream: launches are synchronous*/,
                    void (*kernel)(P...)) {
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace emu
}  // namespace grl
