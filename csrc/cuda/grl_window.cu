// grl_window.cu -- CUDA kernels of GRL's (shifted) window attention (SIMT, one thread per row).
//
// Math (per window w, head h; x_hat = x / max(||x||, 1e-12)):
//   S[i, j] = tau q_hat_i . k_hat_j + B[rel(i, j)] + M[i, j],   Y = softmax_j(S) v
// Forward: one thread per query row, online softmax over the N = ws^2 keys, saves the row's
// (m, 1/l) (grl_cuda.h). Backward (FlashAttention-2 style, P = exp(s - m) / l recomputed):
// query kernel -> dq, D_i = rowsum(P * dP); key kernel -> dk, dv (each thread owns its key row);
// window_bias_partial + the fixed-order reductions of grl_cuda_common.cuh -> dbias, dtau.
// No atomics anywhere: every output has one writer, every sum a fixed order.
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
    store_row_stat(s.stat + 2 * idx, m, l);
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
    const T* qown = w.q + pos * w.sl;
    const float iqn = inv_norm(qn);
    if constexpr (!kStreamRow<MAXD>) load_row<T, MAXD>(qown, 1, d, iqn, q);
    const T* dyp = static_cast<const T*>(gr.gout) + (t.b * L + pos) * p.C + t.h * d;
    if constexpr (!kStreamRow<MAXD>) load_row<T, MAXD>(dyp, 1, d, 1.0f, dy);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dq[c] = 0.0f;
    const int ri = g.shift > 0 ? window_token_region(g, t.win, i) : 0;
    const float tau = p.tau[t.h], m = s.stat[2 * idx], il = s.stat[2 * idx + 1];
    const float* bias = p.bias + t.h * g.table_rows + window_token_offset(g, i) + window_rel_base(g);
    float D = 0.0f;
    for (int pass = 0; pass < 2; ++pass) {
      window_walk_tokens(g, t.win, [&](int64_t, int64_t kpos, int rj, int64_t off) {
        const T* kp = w.q + kpos * w.sl + w.kv;
        const T* vp = kp + w.kv;
        const float ik = inv_norm(w.kn[kpos * p.nh]);
        float cs = 0.0f, dp = 0.0f;
#pragma unroll
        for (int c = 0; c < MAXD; ++c)
          if (c < d) {
            cs += row_elem<MAXD>(q, qown, c, iqn) * ldf(kp + c);
            dp += row_elem<MAXD>(dy, dyp, c) * ldf(vp + c);
          }
        cs *= ik;
        const float pj = row_prob(tau * cs + bias[-off] + wmask(g, ri, rj), m, il);
        if (pass == 0) {
          D += pj * dp;
        } else {
          const float wt = tau * (pj * (dp - D)) * ik;
#pragma unroll
          for (int c = 0; c < MAXD; ++c)
            if (c < d) dq[c] += wt * ldf(kp + c);
        }
      });
    }
    gr.drow[idx] = D;
    if constexpr (kStreamRow<MAXD>) load_row<T, MAXD>(qown, 1, d, iqn, q);
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
    // the own row unscaled: the logit is computed as the forward did (q_hat . k, then / |k|),
    // so that s - m is exact (k_hat . q / |q| differs by rounding, ~tau * eps)
    float k[MAXD], dk[MAXD], dv[MAXD];
    const T* kown = w.q + pos * w.sl + w.kv;
    if constexpr (!kStreamRow<MAXD>) load_row<T, MAXD>(kown, 1, d, 1.0f, k);
    const T* vp = w.q + pos * w.sl + 2 * w.kv;
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dk[c] = 0.0f, dv[c] = 0.0f;
    const int rj = g.shift > 0 ? window_token_region(g, t.win, j) : 0;
    const float tau = p.tau[t.h], ik = inv_norm(kn);
    // window(i, j) = off(i) - off(j) + base: the row walks with i
    const float* bias = p.bias + t.h * g.table_rows - window_token_offset(g, j) + window_rel_base(g);
    const T* gbase = static_cast<const T*>(gr.gout) + t.b * L * p.C + t.h * d;
    const float* st = s.stat + 2 * task * g.n;
    const float* drow = gr.drow + task * g.n;
    window_walk_tokens(g, t.win, [&](int64_t i, int64_t qpos, int ri, int64_t off) {
      const T* qp = w.q + qpos * w.sl;
      const T* gp = gbase + qpos * p.C;
      const float iq = inv_norm(w.qn[qpos * p.nh]);
      float cs = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          cs += (ldf(qp + c) * iq) * row_elem<MAXD>(k, kown, c);
          dp += ldf(gp + c) * ldf(vp + c);
        }
      cs *= ik;
      const float pij = row_prob(tau * cs + bias[off] + wmask(g, ri, rj), st[2 * i], st[2 * i + 1]);
      const float wt = tau * pij * (dp - drow[i]) * iq;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          dv[c] += pij * ldf(gp + c);
          dk[c] += wt * ldf(qp + c);
        }
    });
    load_row<T, MAXD>(kown, 1, d, ik, k);  // k_hat
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

// Step 1 of the bias / logit-scale gradients (grl_cuda_common.cuh): thread (grp, h, i, j) for
// query i and key j, over the windows of group grp (consecutive windows of all batches),
// recomputes the logit exactly as the forward did, P = exp(s - m) / l, dP = dY_i . v_j and
// dS = P (dP - D_i), and writes sum_w dS and sum_w dS * cos to pb / pt at
// ((grp * nh + h) * N + i) * N + j. The window position advances with counters.
template <typename T>
__global__ void window_bias_partial(WindowProblem p, WindowSaved s, WindowGrads gr, BiasGroups gp, float* pb,
                                    float* pt) {
  const WindowGeom g = p.g;
  const int64_t N = g.n, L = g.H * g.W, n_win = p.B * g.num_windows, total = gp.groups * p.nh * N * N;
  const int d = static_cast<int>(p.d);
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t j = idx % N, i = (idx / N) % N, h = (idx / (N * N)) % p.nh, grp = idx / (p.nh * N * N);
    const int64_t yi = i / g.ws, xi = i - yi * g.ws, yj = j / g.ws, xj = j - yj * g.ws;
    const float tau = p.tau[h], bias = p.bias[h * g.table_rows + window_rel_index(g, i, j)];
    const T* qkv = static_cast<const T*>(p.qkv) + h * p.d * p.q_sc;
    const T* gout = static_cast<const T*>(gr.gout) + h * p.d;
    const int64_t w0 = grp * gp.per, w1 = (w0 + gp.per < n_win) ? w0 + gp.per : n_win;
    WindowCursor cur(w0, g.windows_w, g.num_windows);
    float sb = 0.0f, st = 0.0f;
    for (int64_t w = w0; w < w1; ++w, cur.next(g.windows_h, g.windows_w)) {
      const int64_t b = cur.b;
      const int64_t ri_ = cur.wy * g.ws + yi, ci_ = cur.wx * g.ws + xi, rj_ = cur.wy * g.ws + yj, cj_ = cur.wx * g.ws + xj;
      const int64_t posi = window_token_position_rc(g, ri_, ci_), posj = window_token_position_rc(g, rj_, cj_);
      const float mask =
          (g.shift > 0 && window_token_region_rc(g, ri_, ci_) != window_token_region_rc(g, rj_, cj_)) ? kMaskValue : 0.0f;
      const T* qp = qkv + b * p.q_sb + posi * p.q_sl;
      const T* kp = qkv + b * p.q_sb + posj * p.q_sl + p.C * p.q_sc;
      const T* vp = kp + p.C * p.q_sc;
      const T* dyp = gout + (b * L + posi) * p.C;
      const float iq = inv_norm(s.qn[(b * L + posi) * p.nh + h]);
      float cs = 0.0f, dp = 0.0f;
      for (int c = 0; c < d; ++c) {
        cs += (ldf(qp + c) * iq) * ldf(kp + c);
        dp += ldf(dyp + c) * ldf(vp + c);
      }
      cs *= inv_norm(s.kn[(b * L + posj) * p.nh + h]);
      const int64_t row = ((b * g.num_windows + cur.win(g.windows_w)) * p.nh + h) * N + i;
      const float ds = row_prob(tau * cs + bias + mask, s.stat[2 * row], s.stat[2 * row + 1]) * (dp - gr.drow[row]);
      sb += ds;
      st += ds * cs;
    }
    pb[idx] = sb;
    pt[idx] = st;
  }
}

BiasBins window_bins(const WindowGeom& g) {
  return BiasBins{g.ws, g.ws, g.ws, g.ws, g.ws - 1, g.ws - 1, g.table_side, g.table_side};
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
  const int64_t n_win = p.B * p.g.num_windows;
  const BiasBins bins = window_bins(p.g);
  const BiasGroups gp = bias_groups(n_win, p.nh, bins.pairs());
  const int64_t part = gp.groups * p.nh * bins.pairs();
  GRL_LAUNCH(grid_for(part), kThreads, 0, st, window_bias_partial<T>)(p, s, gr, gp, gr.bias_ws, gr.bias_ws + part);
  reduce_bias_grads(gr.bias_ws, n_win, p.nh, bins, gr.dbias, gr.dtau, st);
  return cudaGetLastError();
}

}  // namespace

int64_t window_bias_workspace(const WindowProblem& p) {
  return bias_workspace_floats(p.B * p.g.num_windows, p.nh, window_bins(p.g));
}

cudaError_t window_forward(const WindowProblem& p, void* out, const WindowSaved& s, cudaStream_t stream) {
  if (p.B * p.g.num_windows * p.nh == 0) return cudaSuccess;
  return dispatch_dtype_width(p.dtype, p.d, [&](auto t, auto w) {
    return wforward_impl<decltype(t), decltype(w)::value>(p, out, s, stream);
  });
}

cudaError_t window_backward(const WindowProblem& p, const WindowSaved& s, const WindowGrads& gr, cudaStream_t stream) {
  if (p.B * p.g.num_windows * p.nh == 0) return cudaSuccess;  // (the binding zero-fills dtau / dbias)
  return dispatch_dtype_width(p.dtype, p.d, [&](auto t, auto w) {
    return wbackward_impl<decltype(t), decltype(w)::value>(p, s, gr, stream);
  });
}

}  // namespace cuda
}  // namespace grl
