// grl_cpu_common.h -- shared pieces of the fused CPU kernels (one job per file:
// grl_cpu_stripe.cpp, grl_cpu_window.cpp, grl_cpu_binding.cpp).
//
// Math (GRL_ATTENTION_SPEC.md): per window and head, with x_hat = x / max(||x||, 1e-12),
//   stage 1  Z = softmax_j(tau1 a_hat_i . k_hat_j + B1[r(i,j)] + M1) v      (anchors -> tokens)
//   stage 2  Y = softmax_i(tau2 q_hat_j . a_hat_i + B2[r(j,i)] + M2) Z      (tokens -> anchors)
//   window   Y = softmax_j(tau  q_hat_i . k_hat_j + B [r(i,j)] + M ) v
// Layout: qkv (B, H*W, 3C) [q|k|v], head-major channels, ANY strides (read in place);
// anchor (B, H/f, W/f, C) any strides; out (B, H*W, C) contiguous; bias tables are
// passed transposed as (nh, R) contiguous in the accumulation type.
//
// Work split: one task = (batch, window, head). Nothing of size N1 x N2 is stored:
// stage 1 streams token blocks with an online softmax (saving Z and the rows'
// (max, 1 / sum) for the backward), stage 2 and window rows are complete (N2 / N
// entries) and use an exact softmax. The backward recomputes probabilities from
// the saved row statistics (stage 1) or the logits (stage 2, window). Per-head grads
// of tau and of the bias tables are accumulated per worker chunk, then summed.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define GRL_X86 1
#include <immintrin.h>
#else
#define GRL_X86 0
#endif

#include "grl_geometry.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Target regions of the per-ISA copies of the task code (grl_cpu_kernels.h): every function
// defined between GRL_ISA_BEGIN_* and GRL_ISA_END is compiled for that instruction set.
#if GRL_X86 && defined(__clang__)
#define GRL_ISA_BEGIN_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt\"))), apply_to = function)")
#define GRL_ISA_BEGIN_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16\"))), apply_to = function)")
#define GRL_ISA_END _Pragma("clang attribute pop")
#elif GRL_X86
#define GRL_ISA_BEGIN_AVX2 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt\")")
#define GRL_ISA_BEGIN_AVX512 \
  _Pragma("GCC push_options") \
  _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16\")")
#define GRL_ISA_END _Pragma("GCC pop_options")
#endif

namespace grl {
namespace cpu {

constexpr int64_t kBlock = 64;  // tokens per block of stage 1
constexpr int64_t kStage1CacheFloats = int64_t(1) << 17;  // stage-1 backward scratch kept between its sweeps (512 KB)
constexpr int64_t kMaxStackD = 1024;  // largest head dim (one row on the stack)

// Strided 3-D view (B, L, C) of a tensor, element offsets.
struct View3 {
  int64_t sb, sl, sc;
};

inline StripeGeom stripe_from(const std::vector<int64_t>& p) {
  TORCH_CHECK(p.size() == 8, "stripe geometry needs 8 ints (H, W, sh, sw, shift_h, shift_w, down, shifted)");
  return make_stripe_geom(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
}

inline WindowGeom window_from(const std::vector<int64_t>& p) {
  TORCH_CHECK(p.size() == 4, "window geometry needs 4 ints (H, W, ws, shift)");
  return make_window_geom(p[0], p[1], p[2], p[3]);
}

// Static split of `tasks` into `chunks` contiguous ranges processed in parallel;
// fn(chunk, task) -- chunk indexes the per-chunk reduction buffers.
template <typename F>
inline void for_chunks(int64_t tasks, int64_t chunks, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t t0 = tasks * ch / chunks, t1 = tasks * (ch + 1) / chunks;
      for (int64_t t = t0; t < t1; ++t) fn(ch, t);
    }
  });
}

// Same split, handing each chunk its whole task range: fn(chunk, t0, t1).
template <typename F>
inline void for_chunk_ranges(int64_t tasks, int64_t chunks, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) fn(ch, tasks * ch / chunks, tasks * (ch + 1) / chunks);
  });
}

// Tasks to run, as flattened [t0, t1) ranges (t0, t1, t0', t1', ...): the entry points run
// {0, tasks}; the test-only *_tasks entries run a subset (image 0's and image B-1's tasks of a
// huge batch: tests/test_large_offsets.py checks the 64-bit write offsets with them).
using TaskRanges = std::vector<int64_t>;

inline void check_task_ranges(const TaskRanges& r, int64_t tasks) {
  TORCH_CHECK(r.size() % 2 == 0, "grl cpu kernels: task ranges must be (t0, t1) pairs, got ", r.size(), " ints");
  int64_t prev = 0;
  for (size_t k = 0; k < r.size(); k += 2) {
    TORCH_CHECK(prev <= r[k] && r[k] <= r[k + 1] && r[k + 1] <= tasks, "grl cpu kernels: task ranges must be ascending ",
                "and disjoint within [0, ", tasks, "]; got [", r[k], ", ", r[k + 1], ")");
    prev = r[k + 1];
  }
}

// fn(t0, t1) over the tasks of every range, in parallel (one at::parallel_for per range).
template <typename F>
inline void for_task_ranges(const TaskRanges& r, const F& fn) {
  for (size_t k = 0; k + 1 < r.size(); k += 2) at::parallel_for(r[k], r[k + 1], 1, fn);
}

// Parameter-gradient partials: one buffer per chunk of tasks, summed in chunk order afterwards.
// A FIXED chunk count (not the thread count) makes the sums, and so the gradients, the same bits
// for every thread count; 64 chunks keep up to 64 threads busy.
constexpr int64_t kReductionChunks = 64;
inline int64_t num_chunks(int64_t tasks) {
  return std::max<int64_t>(1, std::min<int64_t>(tasks, kReductionChunks));
}

// for_chunk_ranges restricted to the task ranges: fn(chunk, t0, t1) on each chunk's range
// intersected with each of them (the chunks, and so the partials' order, are those of all tasks).
template <typename F>
inline void for_chunk_subranges(int64_t tasks, int64_t chunks, const TaskRanges& r, const F& fn) {
  for_chunk_ranges(tasks, chunks, [&](int64_t ch, int64_t t0, int64_t t1) {
    for (size_t k = 0; k + 1 < r.size(); k += 2) {
      const int64_t a = std::max(t0, r[k]), b = std::min(t1, r[k + 1]);
      if (a < b) fn(ch, a, b);
    }
  });
}

// A caller's output buffer (test-only entries): contiguous, the dtype and size the entry points allocate.
inline void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel,
              "grl cpu kernels: ", name, " must be a contiguous CPU tensor of ", numel, " elements of ", dtype,
              "; got ", t.numel(), " of ", t.scalar_type(), t.is_contiguous() ? "" : " (not contiguous)");
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_common(const at::Tensor& qkv, int64_t nh, int64_t H, int64_t W) {
  TORCH_CHECK(qkv.device().is_cpu(), "grl cpu kernels: qkv must be a CPU tensor");
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == H * W && qkv.size(2) % 3 == 0,
              "grl cpu kernels: qkv must be (B, H*W, 3C)");
  TORCH_CHECK(nh > 0 && (qkv.size(2) / 3) % nh == 0, "grl cpu kernels: C must be divisible by num_heads");
  TORCH_CHECK((qkv.size(2) / 3) / nh <= kMaxStackD, "grl cpu kernels: head dim above ", kMaxStackD);
}

inline void check_param(const at::Tensor& t, at::ScalarType acc, int64_t n0, int64_t n1, const char* name) {
  TORCH_CHECK(t.scalar_type() == acc && t.is_contiguous() && t.device().is_cpu(), "grl cpu kernels: ", name,
              " must be a contiguous CPU tensor of the accumulation dtype");
  TORCH_CHECK(t.numel() == n0 * n1, "grl cpu kernels: ", name, " has ", t.numel(), " elements, expected ", n0 * n1);
}

// Instruction-set level the kernels run at, chosen once at run time from the CPU's features
// (grl_cpu_binding.cpp): 0 baseline, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VL, DQ) with
// AVX512-BF16. Every kernel file holds one copy of its task code per level (see
// grl_cpu_kernels.h); set_cpu_isa() may lower the level (tests run every path).
int isa_level();
// level 3: the AVX-512 task code with its bfloat16 tile products on AMX (gemm_op, grl_cpu_kernels.h)
inline bool amx_active() { return isa_level() == 3; }
std::string cpu_path();
std::string set_cpu_isa(const std::string& name);

// Block cache of large tensor blocks for inference scopes (grl_cpu_block_cache.cpp; driven by
// grl_kernels.heap): enter/exit nest; stats are counters and bytes (in use, cached, peaks).
// max_fit: a request may take a cached block up to this many times its size, whole (>= 1)
bool block_cache_enter(int64_t min_bytes, double slack, double max_fit);  // false: another CPU allocator is installed
void block_cache_exit();
std::unordered_map<std::string, int64_t> block_cache_stats(bool reset_peak);

// Transparent huge pages for a large output the kernels are about to write (Linux, THP mode
// `madvise` or `always`; a no-op elsewhere and with GRL_KERNELS_HUGEPAGES=0). A fresh buffer
// of more than glibc's mmap threshold (32 MiB at most) is new anonymous memory: the kernels'
// first writes then fault it in 4 KiB at a time (a float32 stripe backward of GRL-T's blocks at
// 256 x 256: ~12k faults, 10-15 % of a one-thread backward). MADV_HUGEPAGE on the 2 MiB-aligned
// interior lets each fault map 2 MiB. Memory the allocator reuses is already mapped and only
// advised again. (On VMs whose balloon reports free pages, fresh huge pages cost more for the
// first calls of a process: docs/compiled.md.)
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("GRL_KERNELS_HUGEPAGES");
    return v == nullptr || std::string(v) != "0";
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.numel() * t.element_size();
  if (!enabled || bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: failure is harmless
#else
  (void)t;
#endif
}

// Bias tables reversed along the table (rb[h][k] = bias[h][R - 1 - k]): relative indices
// of a window row DEcrease along the row, so in the reversed table a row of logits reads
// one contiguous run per window row instead of a gather (bias[base - x] = rb[R - 1 - base + x]).
inline at::Tensor reversed_bias(const at::Tensor& bias) { return bias.flip({1}).contiguous(); }

// Entry points (Python-visible through grl_cpu_binding.cpp).
std::vector<at::Tensor> stripe_forward(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                                       const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2,
                                       const std::vector<int64_t>& geom, int64_t nh);
std::vector<at::Tensor> stripe_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& anchor,
                                        const at::Tensor& tau1, const at::Tensor& bias1, const at::Tensor& tau2,
                                        const at::Tensor& bias2, const at::Tensor& zsave, const at::Tensor& stat1save,
                                        const std::vector<int64_t>& geom, int64_t nh);
std::vector<at::Tensor> window_forward(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                                       const std::vector<int64_t>& geom, int64_t nh);
std::vector<at::Tensor> window_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& tau,
                                        const at::Tensor& bias, const std::vector<int64_t>& geom, int64_t nh);
// Test-only (tests/test_large_offsets.py; bound as _*_tasks): the same kernels on the task
// ranges only, writing into the caller's buffers (contiguous, the shapes stripe_forward /
// window_forward / *_backward allocate, e.g. lazily committed mappings); the backward ones
// return the per-chunk (tau, reversed bias) partials unsummed.
void stripe_forward_tasks(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                          const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2,
                          const std::vector<int64_t>& geom, int64_t nh, const at::Tensor& out,
                          const at::Tensor& zsave, const at::Tensor& stat1save, const TaskRanges& ranges);
std::vector<at::Tensor> stripe_backward_tasks(const at::Tensor& grad_out, const at::Tensor& qkv,
                                              const at::Tensor& anchor, const at::Tensor& tau1,
                                              const at::Tensor& bias1, const at::Tensor& tau2,
                                              const at::Tensor& bias2, const at::Tensor& zsave,
                                              const at::Tensor& stat1save, const std::vector<int64_t>& geom,
                                              int64_t nh, const at::Tensor& gqkv, const at::Tensor& ganc,
                                              const TaskRanges& ranges);
void window_forward_tasks(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                          const std::vector<int64_t>& geom, int64_t nh, const at::Tensor& out,
                          const TaskRanges& ranges);
std::vector<at::Tensor> window_backward_tasks(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& tau,
                                              const at::Tensor& bias, const std::vector<int64_t>& geom, int64_t nh,
                                              const at::Tensor& gqkv, const TaskRanges& ranges);
std::vector<at::Tensor> stripe_tables(const std::vector<int64_t>& geom);
std::vector<at::Tensor> window_tables(const std::vector<int64_t>& geom);

}  // namespace cpu
}  // namespace grl
