"""AMX feasibility probe for issue 12: at::native::cpublas::brgemm (oneDNN ukernel, AMX where the CPU
has it) on the tile shapes of GRL's attention, against a plain AVX512-BF16 vdpbf16ps register tile
(4 rows x 16 columns, the shape of the probe only; the kernels' own tiles are 4 x 32), one thread.
Builds a small extension with load_inline (about a minute). Usage: python benchmarks/amx_probe.py
"""
import sys

import torch
from torch.utils.cpp_extension import load_inline

try:
    with open("/proc/cpuinfo") as f:
        FLAGS = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
except (OSError, StopIteration):
    FLAGS = set()
if "avx512_bf16" not in FLAGS:
    sys.exit("amx_probe: this CPU has no AVX512-BF16 (the comparison tile needs it); nothing to measure")
print("cpu flags:", " ".join(sorted(fl for fl in FLAGS if fl.startswith(("amx", "avx512_bf16")))))
src = r'''
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <chrono>
#include <vector>
using namespace at::native;
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void dp_tile(int64_t M, int64_t N, int64_t K, const uint16_t* A, const uint16_t* B, float* C) {
  // C (M x N) = A (M x K, row-major) B (VNNI: [K/2][N][2]); 4 rows x 16 cols per register tile
  for (int64_t i = 0; i < M; i += 4)
    for (int64_t j = 0; j < N; j += 16) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t kk = 0; kk < K / 2; ++kk) {
        __m512i b = _mm512_loadu_si512(B + (kk * N + j) * 2);
        for (int r = 0; r < 4; ++r) {
          int32_t pair; memcpy(&pair, A + (i + r) * K + 2 * kk, 4);
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), (__m512bh)b);
        }
      }
      for (int r = 0; r < 4; ++r) _mm512_storeu_ps(C + (i + r) * N + j, acc[r]);
    }
}
std::vector<double> probe(int64_t M, int64_t N, int64_t K, int64_t reps) {
  std::vector<at::BFloat16> A(M * K, at::BFloat16(0.5f)), B(K * N, at::BFloat16(0.25f));
  std::vector<float> C(M * N), D(M * N);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) cpublas::brgemm(M, N, K, K, N, N, false, A.data(), B.data(), C.data(), true);
  cpublas::brgemm_release(true);
  auto t1 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) dp_tile(M, N, K, (const uint16_t*)A.data(), (const uint16_t*)B.data(), D.data());
  auto t2 = std::chrono::steady_clock::now();
  double e = 0; for (int64_t i = 0; i < M * N; ++i) e = std::max(e, (double)std::abs(C[i] - D[i]));
  return {std::chrono::duration<double, std::nano>(t1 - t0).count() / reps,
          std::chrono::duration<double, std::nano>(t2 - t1).count() / reps, e};
}
'''
m = load_inline("grl_amx_probe", cpp_sources=src, functions=["probe"], extra_cflags=["-O3"], verbose=False)
torch.set_num_threads(1)
print("M N K | brgemm ns | vdpbf16ps tile ns | GFLOP/s brgemm / tile | max diff")
for M, N, K in [(32, 64, 16), (32, 64, 32), (32, 16, 64), (32, 32, 64), (64, 64, 32), (32, 512, 32), (64, 32, 64), (128, 128, 64)]:
    m.probe(M, N, K, 2000)
    b, d, e = m.probe(M, N, K, 200000 if M * N * K < 2e5 else 20000)
    f = 2 * M * N * K
    print(f"{M} {N} {K} | {b:.0f} | {d:.0f} | {f / b:.0f} / {f / d:.0f} | {e}")
