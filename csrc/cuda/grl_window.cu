// grl_window.cu -- CUDA kernels of GRL's (shifted) window attention (SIMT, one thread per row).
//
// Math (per window w, head h; x_hat = x / max(||x||, 1e-12)):
//   S[i, j] = tau q_hat_i . k_hat_j + B[rel(i, j)] + M[i, j],   Y = softmax_j(S) v
// Forward: one thread per query row, online softmax over the N = ws^2 keys, saves lse.
// Backward (FlashAttention-2 style): query kernel -> dq, D_i = rowsum(P * dP), dtau, dbias;
// key kernel -> dk, dv (each thread owns its key row, no atomics except dtau / dbias).
// Inputs are read in place through 64-bit element strides; index math is grl_geometry.h:
// the loops over a window walk it with window_walk_tokens (counters, no division per token).
#include "grl_cuda_common.cuh"

namespace grl {
namespace cuda {
namespace {

// Per-thread view of one (batch, window, head): base pointers so that a token's row is
// base + pos * q_sl (no division in the loops; positions come from window_walk_tokens).
template <typename T>
struct WView {
  const T* q;      // qkv + b * q_sb + h * d * q_sc (part 0); k = q + C * q_sc, v = q + 2 C * q_sc
  const float* qn; // s.qn + b * L * nh + h, indexed by pos * nh
  const float* kn;
  int64_t sl, kv;  // q_sl, C * q_sc
};

template <typename T>
__device__ __forceinline__ WView<T> wview(const WindowProblem& p, const WindowSaved& s, int64_t b, int64_t h) {
  const int64_t L = p.g.H * p.g.W;
  return WView<T>{static_cast<const T*>(p.qkv) + b * p.q_sb + h * p.d * p.q_sc, s.qn + b * L * p.nh + h,
                  s.kn + b * L * p.nh + h, p.q_sl, p.C * p.q_sc};
}

struct WTask {
  int64_t b, win, h;
};

__device__ __forceinline__ WTask split_wtask(int64_t task, int64_t nh, int64_t nw) {
  WTask t;
  t.h = task % nh;
  t.win = (task / nh) % nw;
  t.b = task / (nh * nw);
  return t;
}

__device__ __forceinline__ float wmask(const WindowGeom& g, int a, int b) {
  return (g.shift > 0 && a != b) ? kMaskValue : 0.0f;
}

template <typename T, int MAXD>
__global__ void window_forward_kernel(WindowProblem p, WindowSaved s, T* out) {
  const WindowGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n, L = g.H * g.W;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t i = idx % g.n, task = idx / g.n;
    const WTask t = split_wtask(task, p.nh, g.num_windows);
    const WView<T> w = wview<T>(p, s, t.b, t.h);
    const int64_t pos = window_token_position(g, t.win, i);
    float q[MAXD], y[MAXD];
    load_row<T, MAXD>(w.q + pos * w.sl, 1, d, inv_norm(w.qn[pos * p.nh]), q);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) y[c] = 0.0f;
    const int ri = g.shift > 0 ? window_token_region(g, t.win, i) : 0;
    const float tau = p.tau[t.h];
    const float* bias = p.bias + t.h * g.table_rows + window_token_offset(g, i) + window_rel_base(g);
    float m = -INFINITY, l = 0.0f;
    window_walk_tokens(g, t.win, [&](int64_t, int64_t kpos, int rj, int64_t off) {
      const T* kp = w.q + kpos * w.sl + w.kv;
      const T* vp = kp + w.kv;
      float cs = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) cs += q[c] * ldf(kp + c);
      cs *= inv_norm(w.kn[kpos * p.nh]);
      const float v = tau * cs + bias[-off] + wmask(g, ri, rj);
      const float mn = fmaxf(m, v), corr = expf(m - mn), pj = expf(v - mn);
      l = l * corr + pj;
      m = mn;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) y[c] = y[c] * corr + pj * ldf(vp + c);
    });
    T* op = out + (t.b * L + pos) * p.C + t.h * d;
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) stf(op + c, y[c] * inv);
    s.lse[idx] = m + logf(l);
  }
}

template <typename T, int MAXD>
__global__ void window_backward_queries(WindowProblem p, WindowSaved s, WindowGrads gr) {
  const WindowGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n, L = g.H * g.W;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t i = idx % g.n, task = idx / g.n;
    const WTask t = split_wtask(task, p.nh, g.num_windows);
    const WView<T> w = wview<T>(p, s, t.b, t.h);
    const int64_t pos = window_token_position(g, t.win, i);
    const float qn = w.qn[pos * p.nh];
    float q[MAXD], dy[MAXD], dq[MAXD];
    load_row<T, MAXD>(w.q + pos * w.sl, 1, d, inv_norm(qn), q);
    load_row<T, MAXD>(static_cast<const T*>(gr.gout) + (t.b * L + pos) * p.C + t.h * d, 1, d, 1.0f, dy);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dq[c] = 0.0f;
    const int ri = g.shift > 0 ? window_token_region(g, t.win, i) : 0;
    const float tau = p.tau[t.h], lse = s.lse[idx];
    const int64_t rbase = t.h * g.table_rows + window_token_offset(g, i) + window_rel_base(g);
    const float* bias = p.bias + rbase;
    float* dbias = gr.dbias + rbase;
    float D = 0.0f, dt = 0.0f;
    for (int pass = 0; pass < 2; ++pass) {
      window_walk_tokens(g, t.win, [&](int64_t, int64_t kpos, int rj, int64_t off) {
        const T* kp = w.q + kpos * w.sl + w.kv;
        const T* vp = kp + w.kv;
        const float ik = inv_norm(w.kn[kpos * p.nh]);
        float cs = 0.0f, dp = 0.0f;
#pragma unroll
        for (int c = 0; c < MAXD; ++c)
          if (c < d) {
            cs += q[c] * ldf(kp + c);
            dp += dy[c] * ldf(vp + c);
          }
        cs *= ik;
        const float pj = expf(tau * cs + bias[-off] + wmask(g, ri, rj) - lse);
        if (pass == 0) {
          D += pj * dp;
        } else {
          const float ds = pj * (dp - D);
          dt += ds * cs;
          atomicAdd(dbias - off, ds);
          const float wt = tau * ds * ik;
#pragma unroll
          for (int c = 0; c < MAXD; ++c)
            if (c < d) dq[c] += wt * ldf(kp + c);
        }
      });
    }
    gr.drow[idx] = D;
    atomicAdd(gr.dtau + t.h, dt);
    normalize_backward(dq, q, qn);
    T* gq = static_cast<T*>(gr.gqkv) + (t.b * L + pos) * 3 * p.C + t.h * d;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) stf(gq + c, dq[c]);
  }
}

template <typename T, int MAXD>
__global__ void window_backward_keys(WindowProblem p, WindowSaved s, WindowGrads gr) {
  const WindowGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n, L = g.H * g.W;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t j = idx % g.n, task = idx / g.n;
    const WTask t = split_wtask(task, p.nh, g.num_windows);
    const WView<T> w = wview<T>(p, s, t.b, t.h);
    const int64_t pos = window_token_position(g, t.win, j);
    const float kn = w.kn[pos * p.nh];
    float k[MAXD], dk[MAXD], dv[MAXD];
    load_row<T, MAXD>(w.q + pos * w.sl + w.kv, 1, d, inv_norm(kn), k);
    const T* vp = w.q + pos * w.sl + 2 * w.kv;
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dk[c] = 0.0f, dv[c] = 0.0f;
    const int rj = g.shift > 0 ? window_token_region(g, t.win, j) : 0;
    const float tau = p.tau[t.h];
    // window(i, j) = off(i) - off(j) + base: the row walks with i
    const float* bias = p.bias + t.h * g.table_rows - window_token_offset(g, j) + window_rel_base(g);
    const T* gbase = static_cast<const T*>(gr.gout) + t.b * L * p.C + t.h * d;
    const float* lse = s.lse + task * g.n;
    const float* drow = gr.drow + task * g.n;
    window_walk_tokens(g, t.win, [&](int64_t i, int64_t qpos, int ri, int64_t off) {
      const T* qp = w.q + qpos * w.sl;
      const T* gp = gbase + qpos * p.C;
      const float iq = inv_norm(w.qn[qpos * p.nh]);
      float cs = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          cs += k[c] * ldf(qp + c);
          dp += ldf(gp + c) * ldf(vp + c);
        }
      cs *= iq;
      const float pij = expf(tau * cs + bias[off] + wmask(g, ri, rj) - lse[i]);
      const float wt = tau * pij * (dp - drow[i]) * iq;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          dv[c] += pij * ldf(gp + c);
          dk[c] += wt * ldf(qp + c);
        }
    });
    normalize_backward(dk, k, kn);
    T* gk = static_cast<T*>(gr.gqkv) + (t.b * L + pos) * 3 * p.C + p.C + t.h * d;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) {
        stf(gk + c, dk[c]);
        stf(gk + p.C + c, dv[c]);
      }
  }
}

template <typename T>
void launch_wnorms(const WindowProblem& p, const WindowSaved& s, cudaStream_t st) {
  const int64_t L = p.g.H * p.g.W;
  const T* q = static_cast<const T*>(p.qkv);
  GRL_LAUNCH(grid_for(p.B * L * p.nh), kThreads, 0, st, row_norms_kernel<T>)(q, p.B, L, L, p.nh, p.d, p.q_sb, 0, p.q_sl,
                                                                      p.q_sc, 0, s.qn);
  GRL_LAUNCH(grid_for(p.B * L * p.nh), kThreads, 0, st, row_norms_kernel<T>)(q, p.B, L, L, p.nh, p.d, p.q_sb, 0, p.q_sl,
                                                                      p.q_sc, p.C, s.kn);
}

template <typename T, int MAXD>
cudaError_t wforward_impl(const WindowProblem& p, void* out, const WindowSaved& s, cudaStream_t st) {
  launch_wnorms<T>(p, s, st);
  const int64_t rows = p.B * p.g.num_windows * p.nh * p.g.n;
  GRL_LAUNCH(grid_for(rows), kThreads, 0, st, window_forward_kernel<T, MAXD>)(p, s, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T, int MAXD>
cudaError_t wbackward_impl(const WindowProblem& p, const WindowSaved& s, const WindowGrads& gr, cudaStream_t st) {
  const int64_t rows = p.B * p.g.num_windows * p.nh * p.g.n;
  GRL_LAUNCH(grid_for(rows), kThreads, 0, st, window_backward_queries<T, MAXD>)(p, s, gr);
  GRL_LAUNCH(grid_for(rows), kThreads, 0, st, window_backward_keys<T, MAXD>)(p, s, gr);
  return cudaGetLastError();
}

}  // namespace

cudaError_t window_forward(const WindowProblem& p, void* out, const WindowSaved& s, cudaStream_t stream) {
  if (p.B * p.g.num_windows * p.nh == 0) return cudaSuccess;
  return dispatch_dtype_width(p.dtype, p.d, [&](auto t, auto w) {
    return wforward_impl<decltype(t), decltype(w)::value>(p, out, s, stream);
  });
}

cudaError_t window_backward(const WindowProblem& p, const WindowSaved& s, const WindowGrads& gr, cudaStream_t stream) {
  if (p.B * p.g.num_windows * p.nh == 0) return cudaSuccess;
  return dispatch_dtype_width(p.dtype, p.d, [&](auto t, auto w) {
    return wbackward_impl<decltype(t), decltype(w)::value>(p, s, gr, stream);
  });
}

}  // namespace cuda
}  // namespace grl
