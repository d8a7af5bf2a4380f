// grl_cuda.h -- host API of the CUDA kernels (no torch headers: the .cu files compile with
// nothing but the CUDA toolkit; csrc/cuda/grl_cuda_binding.cpp wraps them for torch).
//
// Layouts (element strides, 64-bit): qkv (B, H*W, 3C) [q|k|v] head-major channels, any batch
// and token strides, channel stride 1 (q_sc == 1: constant offsets inside a row keep the row
// tiles in registers); anchor (B, H/f, W/f, C) any strides but channel stride 1 (a_sc == 1);
// the binding checks it and the Python side copies the rare other layouts; outputs and gradients of qkv/anchor are
// contiguous in the input dtype; everything else (tau (nh), bias tables TRANSPOSED to
// (nh, R), saved state, workspaces, parameter gradients) is contiguous float32.
// Gradient buffers are fully written (no zero-initialization needed); the bias-table and
// logit-scale gradients are reduced in a fixed order without atomics (deterministic).
#pragma once

#if defined(GRL_CUDA_EMU)  // host build of the kernels (csrc/emu, docs/cuda.md)
#include "grl_cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include "grl_geometry.h"

namespace grl {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct StripeProblem {
  StripeGeom g;
  int64_t B, C, nh, d;
  int dtype;
  const void* qkv;
  int64_t q_sb, q_sl, q_sc;
  const void* anchor;
  int64_t a_sb, a_sh, a_sw, a_sc;
  const float* tau1;
  const float* bias1;  // (nh, R)
  const float* tau2;
  const float* bias2;  // (nh, R)
};

// Forward state kept for the backward (all float32, contiguous). Row statistics are the pair
// (m, 1/l) of a softmax row: its max logit and the inverse of l = sum_j exp(s_j - m). The
// backward recomputes P = exp(s - m) * (1/l) from the same s, so s - m is exact; one saved
// log-sum-exp (~100 at tau 100) would scale a whole row by a common rounding error ~1e-5,
// which does not cancel in the gradients that are sums of P (dP - D).
struct StripeSaved {
  float* z;      // (B, windows, nh, N2, d)   stage-1 output Z
  float* stat1;  // (B, windows, nh, N2, 2)   stage-1 row (m, 1/l)
  float* stat2;  // (B, windows, nh, N1, 2)   stage-2 row (m, 1/l)
  float* qn;    // (B, H*W, nh)              ||q||
  float* kn;    // (B, H*W, nh)              ||k||
  float* an;    // (B, Ha*Wa, nh)            ||anchor||
};

struct StripeGrads {
  const void* gout;  // (B, H*W, C) contiguous, input dtype
  void* gqkv;        // (B, H*W, 3C) contiguous, input dtype (fully written)
  void* ganc;        // (B, Ha, Wa, C) contiguous, input dtype (fully written)
  float* dtau1;      // (nh) (fully written)
  float* dbias1;     // (nh, R) (fully written)
  float* dtau2;
  float* dbias2;
  float* dz;  // workspace (B, windows, nh, N2, d)
  float* da;  // workspace (B, windows, nh, N2, d)
  float* d1;  // workspace (B, windows, nh, N2)
  float* d2;  // workspace (B, windows, nh, N1)
  float* bias_ws;  // workspace of stripe_bias_workspace(p) floats (bias / tau gradient partials)
};

struct WindowProblem {
  WindowGeom g;
  int64_t B, C, nh, d;
  int dtype;
  const void* qkv;
  int64_t q_sb, q_sl, q_sc;
  const float* tau;
  const float* bias;  // (nh, R)
};

struct WindowSaved {
  float* stat; // (B, windows, nh, N, 2)  row (m, 1/l), as StripeSaved
  float* qn;   // (B, H*W, nh)
  float* kn;   // (B, H*W, nh)
};

struct WindowGrads {
  const void* gout;  // (B, H*W, C) contiguous
  void* gqkv;        // (B, H*W, 3C) contiguous (fully written)
  float* dtau;       // (nh) (fully written)
  float* dbias;      // (nh, R) (fully written)
  float* drow;       // workspace (B, windows, nh, N): D_i = sum_j P_ij dP_ij
  float* bias_ws;    // workspace of window_bias_workspace(p) floats
};

// Largest head dim the kernels take (register tiles of 32 or 64 floats).
constexpr int64_t kMaxHeadDim = 64;

// Floats of the workspace StripeGrads::bias_ws / WindowGrads::bias_ws must hold.
int64_t stripe_bias_workspace(const StripeProblem& p);
int64_t window_bias_workspace(const WindowProblem& p);

cudaError_t stripe_forward(const StripeProblem& p, void* out, const StripeSaved& s, cudaStream_t stream);
cudaError_t stripe_backward(const StripeProblem& p, const StripeSaved& s, const StripeGrads& gr, cudaStream_t stream);
cudaError_t window_forward(const WindowProblem& p, void* out, const WindowSaved& s, cudaStream_t stream);
cudaError_t window_backward(const WindowProblem& p, const WindowSaved& s, const WindowGrads& gr, cudaStream_t stream);

}  // namespace cuda
}  // namespace grl
