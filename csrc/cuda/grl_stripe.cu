// grl_stripe.cu -- CUDA kernels of GRL's anchored stripe attention (SIMT, one thread per row).
//
// Math (per window w, head h; x_hat = x / max(||x||, 1e-12)):
//   stage 1 (anchor i over tokens j): S1 = tau1 a_hat_i . k_hat_j + B1[a2w(i,j)] + M1,  Z = softmax_j(S1) v
//   stage 2 (token j over anchors i): S2 = tau2 q_hat_j . a_hat_i + B2[w2a(j,i)] + M2,  Y = softmax_i(S2) Z
// Forward: stage1 kernel (thread per anchor row, online softmax over the N1 tokens) writes Z
// and lse1; stage2 kernel (thread per token row) writes Y and lse2. Backward (FlashAttention-2
// style, probabilities recomputed from the saved lse, D = rowsum(P * dP)):
//   s2_tok: dq, D2, dtau2, dbias2        s2_anc: dZ, D1 = dZ . Z, stage-2 part of d a_hat
//   s1_tok: dk, dv, dtau1, dbias1         s1_anc: stage-1 part of d a_hat, then d anchor
// Thread rows own their outputs (no atomics) except the per-head dtau / dbias reductions.
// Inputs are read in place through 64-bit element strides; rows live in register tiles of
// MAXD floats. Index math (partition, shift, relative index, region ids) is grl_geometry.h.
#include "grl_cuda_common.cuh"

namespace grl {
namespace cuda {
namespace {

struct Task {
  int64_t b, win, h;
};

__device__ __forceinline__ Task split_task(int64_t task, int64_t nh, int64_t nw) {
  Task t;
  t.h = task % nh;
  t.win = (task / nh) % nw;
  t.b = task / (nh * nw);
  return t;
}

template <typename T>
__device__ __forceinline__ const T* token_ptr(const StripeProblem& p, int64_t b, int64_t pos, int part, int64_t h) {
  return static_cast<const T*>(p.qkv) + b * p.q_sb + pos * p.q_sl + (part * p.C + h * p.d) * p.q_sc;
}

template <typename T>
__device__ __forceinline__ const T* anchor_ptr(const StripeProblem& p, int64_t b, int64_t apos, int64_t h) {
  return static_cast<const T*>(p.anchor) + b * p.a_sb + (apos / p.g.Wa) * p.a_sh + (apos % p.g.Wa) * p.a_sw +
         h * p.d * p.a_sc;
}

__device__ __forceinline__ float mask_of(const StripeGeom& g, int aid, int tid) {
  return (g.shifted && aid != tid) ? kMaskValue : 0.0f;
}

// ---- forward ---------------------------------------------------------------
template <typename T, int MAXD>
__global__ void stage1_forward(StripeProblem p, StripeSaved s) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n2, L = g.H * g.W, d = p.d;
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t i = idx % g.n2, task = idx / g.n2;
    const Task t = split_task(task, p.nh, g.num_windows);
    const int64_t apos = stripe_anchor_position(g, t.win, i);
    float a[MAXD], z[MAXD];
    load_row<T, MAXD>(anchor_ptr<T>(p, t.b, apos, t.h), p.a_sc, d,
                      inv_norm(s.an[(t.b * g.Ha * g.Wa + apos) * p.nh + t.h]), a);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) z[c] = 0.0f;
    const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
    const float tau = p.tau1[t.h];
    const float* bias = p.bias1 + t.h * g.table_rows;
    float m = -INFINITY, l = 0.0f;
    for (int64_t j = 0; j < g.n1; ++j) {
      const int64_t pos = stripe_token_position(g, t.win, j);
      const T* kp = token_ptr<T>(p, t.b, pos, 1, t.h);
      const T* vp = token_ptr<T>(p, t.b, pos, 2, t.h);
      float cs = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) cs += a[c] * ldf(kp + c * p.q_sc);
      cs *= inv_norm(s.kn[(t.b * L + pos) * p.nh + t.h]);
      const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
      const float v = tau * cs + bias[stripe_a2w_index(g, i, j)] + mask_of(g, aid, tid);
      const float mn = fmaxf(m, v), corr = expf(m - mn), pj = expf(v - mn);
      l = l * corr + pj;
      m = mn;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) z[c] = z[c] * corr + pj * ldf(vp + c * p.q_sc);
    }
    float* zo = s.z + idx * d;
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) zo[c] = z[c] * inv;
    s.lse1[idx] = m + logf(l);
  }
}

template <typename T, int MAXD>
__global__ void stage2_forward(StripeProblem p, StripeSaved s, T* out) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n1, L = g.H * g.W, d = p.d;
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t j = idx % g.n1, task = idx / g.n1;
    const Task t = split_task(task, p.nh, g.num_windows);
    const int64_t pos = stripe_token_position(g, t.win, j);
    float q[MAXD], y[MAXD];
    load_row<T, MAXD>(token_ptr<T>(p, t.b, pos, 0, t.h), p.q_sc, d, inv_norm(s.qn[(t.b * L + pos) * p.nh + t.h]), q);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) y[c] = 0.0f;
    const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
    const float tau = p.tau2[t.h];
    const float* bias = p.bias2 + t.h * g.table_rows;
    const float* zt = s.z + task * g.n2 * d;
    float m = -INFINITY, l = 0.0f;
    for (int64_t i = 0; i < g.n2; ++i) {
      const int64_t apos = stripe_anchor_position(g, t.win, i);
      const T* ap = anchor_ptr<T>(p, t.b, apos, t.h);
      float cs = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) cs += q[c] * ldf(ap + c * p.a_sc);
      cs *= inv_norm(s.an[(t.b * g.Ha * g.Wa + apos) * p.nh + t.h]);
      const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
      const float v = tau * cs + bias[stripe_w2a_index(g, j, i)] + mask_of(g, aid, tid);
      const float mn = fmaxf(m, v), corr = expf(m - mn), pi = expf(v - mn);
      l = l * corr + pi;
      m = mn;
      const float* zr = zt + i * d;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) y[c] = y[c] * corr + pi * zr[c];
    }
    T* op = out + (t.b * L + pos) * p.C + t.h * d;
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) stf(op + c, y[c] * inv);
    s.lse2[idx] = m + logf(l);
  }
}

// ---- backward ----------------------------------------------------------------
// Stage-2 logit of (token j, anchor i) given q_hat in registers.
template <typename T, int MAXD>
__device__ __forceinline__ float stage2_logit(const StripeProblem& p, const StripeSaved& s, const Task& t, int64_t j,
                                              int64_t i, int tid, const float (&q)[MAXD], float* cos_out) {
  const StripeGeom& g = p.g;
  const int64_t apos = stripe_anchor_position(g, t.win, i);
  const T* ap = anchor_ptr<T>(p, t.b, apos, t.h);
  float cs = 0.0f;
#pragma unroll
  for (int c = 0; c < MAXD; ++c)
    if (c < p.d) cs += q[c] * ldf(ap + c * p.a_sc);
  cs *= inv_norm(s.an[(t.b * g.Ha * g.Wa + apos) * p.nh + t.h]);
  *cos_out = cs;
  const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
  return p.tau2[t.h] * cs + p.bias2[t.h * g.table_rows + stripe_w2a_index(g, j, i)] + mask_of(g, aid, tid);
}

template <typename T, int MAXD>
__global__ void stage2_backward_tokens(StripeProblem p, StripeSaved s, StripeGrads gr) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n1, L = g.H * g.W, d = p.d;
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t j = idx % g.n1, task = idx / g.n1;
    const Task t = split_task(task, p.nh, g.num_windows);
    const int64_t pos = stripe_token_position(g, t.win, j);
    const float qn = s.qn[(t.b * L + pos) * p.nh + t.h];
    float q[MAXD], dy[MAXD], dq[MAXD];
    load_row<T, MAXD>(token_ptr<T>(p, t.b, pos, 0, t.h), p.q_sc, d, inv_norm(qn), q);
    load_row<T, MAXD>(static_cast<const T*>(gr.gout) + (t.b * L + pos) * p.C + t.h * d, 1, d, 1.0f, dy);
    const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
    const float lse = s.lse2[idx], tau = p.tau2[t.h];
    const float* zt = s.z + task * g.n2 * d;
    float D = 0.0f;
    for (int64_t i = 0; i < g.n2; ++i) {
      float cs;
      const float pi = expf(stage2_logit<T, MAXD>(p, s, t, j, i, tid, q, &cs) - lse);
      float dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) dp += dy[c] * zt[i * d + c];
      D += pi * dp;
    }
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dq[c] = 0.0f;
    float dt = 0.0f;
    for (int64_t i = 0; i < g.n2; ++i) {
      float cs;
      const float pi = expf(stage2_logit<T, MAXD>(p, s, t, j, i, tid, q, &cs) - lse);
      float dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) dp += dy[c] * zt[i * d + c];
      const float ds = pi * (dp - D);
      dt += ds * cs;
      atomicAdd(gr.dbias2 + t.h * g.table_rows + stripe_w2a_index(g, j, i), ds);
      const int64_t apos = stripe_anchor_position(g, t.win, i);
      const T* ap = anchor_ptr<T>(p, t.b, apos, t.h);
      const float w = tau * ds * inv_norm(s.an[(t.b * g.Ha * g.Wa + apos) * p.nh + t.h]);
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) dq[c] += w * ldf(ap + c * p.a_sc);
    }
    gr.d2[idx] = D;
    atomicAdd(gr.dtau2 + t.h, dt);
    normalize_backward(dq, q, qn);
    T* gq = static_cast<T*>(gr.gqkv) + (t.b * L + pos) * 3 * p.C + t.h * d;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) stf(gq + c, dq[c]);
  }
}

template <typename T, int MAXD>
__global__ void stage2_backward_anchors(StripeProblem p, StripeSaved s, StripeGrads gr) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n2, L = g.H * g.W, d = p.d;
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t i = idx % g.n2, task = idx / g.n2;
    const Task t = split_task(task, p.nh, g.num_windows);
    const int64_t apos = stripe_anchor_position(g, t.win, i);
    float a[MAXD], dz[MAXD], da[MAXD];
    load_row<T, MAXD>(anchor_ptr<T>(p, t.b, apos, t.h), p.a_sc, d,
                      inv_norm(s.an[(t.b * g.Ha * g.Wa + apos) * p.nh + t.h]), a);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dz[c] = 0.0f, da[c] = 0.0f;
    const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
    const float tau = p.tau2[t.h];
    const float* bias = p.bias2 + t.h * g.table_rows;
    const float* zr = s.z + idx * d;
    for (int64_t j = 0; j < g.n1; ++j) {
      const int64_t pos = stripe_token_position(g, t.win, j);
      const T* qp = token_ptr<T>(p, t.b, pos, 0, t.h);
      const T* gp = static_cast<const T*>(gr.gout) + (t.b * L + pos) * p.C + t.h * d;
      const float iq = inv_norm(s.qn[(t.b * L + pos) * p.nh + t.h]);
      float cs = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          cs += a[c] * ldf(qp + c * p.q_sc);
          dp += ldf(gp + c) * zr[c];
        }
      cs *= iq;
      const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
      const float v = tau * cs + bias[stripe_w2a_index(g, j, i)] + mask_of(g, aid, tid);
      const int64_t row = task * g.n1 + j;
      const float pj = expf(v - s.lse2[row]);
      const float w = tau * pj * (dp - gr.d2[row]) * iq;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          dz[c] += pj * ldf(gp + c);
          da[c] += w * ldf(qp + c * p.q_sc);
        }
    }
    float D1 = 0.0f;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) {
        gr.dz[idx * d + c] = dz[c];
        gr.da[idx * d + c] = da[c];
        D1 += dz[c] * zr[c];
      }
    gr.d1[idx] = D1;
  }
}

template <typename T, int MAXD>
__global__ void stage1_backward_tokens(StripeProblem p, StripeSaved s, StripeGrads gr) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n1, L = g.H * g.W, d = p.d;
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t j = idx % g.n1, task = idx / g.n1;
    const Task t = split_task(task, p.nh, g.num_windows);
    const int64_t pos = stripe_token_position(g, t.win, j);
    const float kn = s.kn[(t.b * L + pos) * p.nh + t.h];
    float k[MAXD], dk[MAXD], dv[MAXD];
    load_row<T, MAXD>(token_ptr<T>(p, t.b, pos, 1, t.h), p.q_sc, d, inv_norm(kn), k);
    const T* vp = token_ptr<T>(p, t.b, pos, 2, t.h);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dk[c] = 0.0f, dv[c] = 0.0f;
    const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
    const float tau = p.tau1[t.h];
    const float* bias = p.bias1 + t.h * g.table_rows;
    float dt = 0.0f;
    for (int64_t i = 0; i < g.n2; ++i) {
      const int64_t apos = stripe_anchor_position(g, t.win, i);
      const T* ap = anchor_ptr<T>(p, t.b, apos, t.h);
      const float ia = inv_norm(s.an[(t.b * g.Ha * g.Wa + apos) * p.nh + t.h]);
      const int64_t row = task * g.n2 + i;
      const float* dzr = gr.dz + row * d;
      float cs = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          cs += k[c] * ldf(ap + c * p.a_sc);
          dp += dzr[c] * ldf(vp + c * p.q_sc);
        }
      cs *= ia;
      const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
      const int64_t r = stripe_a2w_index(g, i, j);
      const float v = tau * cs + bias[r] + mask_of(g, aid, tid);
      const float pi = expf(v - s.lse1[row]);
      const float ds = pi * (dp - gr.d1[row]);
      dt += ds * cs;
      atomicAdd(gr.dbias1 + t.h * g.table_rows + r, ds);
      const float w = tau * ds * ia;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          dv[c] += pi * dzr[c];
          dk[c] += w * ldf(ap + c * p.a_sc);
        }
    }
    atomicAdd(gr.dtau1 + t.h, dt);
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

template <typename T, int MAXD>
__global__ void stage1_backward_anchors(StripeProblem p, StripeSaved s, StripeGrads gr) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n2, L = g.H * g.W, d = p.d;
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t i = idx % g.n2, task = idx / g.n2;
    const Task t = split_task(task, p.nh, g.num_windows);
    const int64_t apos = stripe_anchor_position(g, t.win, i);
    const float an = s.an[(t.b * g.Ha * g.Wa + apos) * p.nh + t.h];
    float a[MAXD], da[MAXD];
    load_row<T, MAXD>(anchor_ptr<T>(p, t.b, apos, t.h), p.a_sc, d, inv_norm(an), a);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) da[c] = (c < d) ? gr.da[idx * d + c] : 0.0f;
    const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
    const float tau = p.tau1[t.h], lse = s.lse1[idx], D1 = gr.d1[idx];
    const float* bias = p.bias1 + t.h * g.table_rows;
    const float* dzr = gr.dz + idx * d;
    for (int64_t j = 0; j < g.n1; ++j) {
      const int64_t pos = stripe_token_position(g, t.win, j);
      const T* kp = token_ptr<T>(p, t.b, pos, 1, t.h);
      const T* vp = token_ptr<T>(p, t.b, pos, 2, t.h);
      const float ik = inv_norm(s.kn[(t.b * L + pos) * p.nh + t.h]);
      float cs = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          cs += a[c] * ldf(kp + c * p.q_sc);
          dp += dzr[c] * ldf(vp + c * p.q_sc);
        }
      cs *= ik;
      const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
      const float v = tau * cs + bias[stripe_a2w_index(g, i, j)] + mask_of(g, aid, tid);
      const float pj = expf(v - lse);
      const float w = tau * pj * (dp - D1) * ik;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) da[c] += w * ldf(kp + c * p.q_sc);
    }
    normalize_backward(da, a, an);
    T* ga = static_cast<T*>(gr.ganc) + (t.b * g.Ha * g.Wa + apos) * p.C + t.h * d;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) stf(ga + c, da[c]);
  }
}

// ---- launchers -----------------------------------------------------------------
template <typename T>
void launch_norms(const StripeProblem& p, const StripeSaved& s, cudaStream_t st) {
  const StripeGeom& g = p.g;
  const int64_t L = g.H * g.W;
  const T* q = static_cast<const T*>(p.qkv);
  GRL_LAUNCH(grid_for(p.B * L * p.nh), kThreads, 0, st, row_norms_kernel<T>)(q, p.B, L, L, p.nh, p.d, p.q_sb, 0, p.q_sl,
                                                                      p.q_sc, 0, s.qn);
  GRL_LAUNCH(grid_for(p.B * L * p.nh), kThreads, 0, st, row_norms_kernel<T>)(q, p.B, L, L, p.nh, p.d, p.q_sb, 0, p.q_sl,
                                                                      p.q_sc, p.C, s.kn);
  GRL_LAUNCH(grid_for(p.B * g.Ha * g.Wa * p.nh), kThreads, 0, st, row_norms_kernel<T>)(
      static_cast<const T*>(p.anchor), p.B, g.Ha * g.Wa, g.Wa, p.nh, p.d, p.a_sb, p.a_sh, p.a_sw, p.a_sc, 0, s.an);
}

template <typename T, int MAXD>
cudaError_t forward_impl(const StripeProblem& p, void* out, const StripeSaved& s, cudaStream_t st) {
  const int64_t tasks = p.B * p.g.num_windows * p.nh;
  launch_norms<T>(p, s, st);
  GRL_LAUNCH(grid_for(tasks * p.g.n2), kThreads, 0, st, stage1_forward<T, MAXD>)(p, s);
  GRL_LAUNCH(grid_for(tasks * p.g.n1), kThreads, 0, st, stage2_forward<T, MAXD>)(p, s, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T, int MAXD>
cudaError_t backward_impl(const StripeProblem& p, const StripeSaved& s, const StripeGrads& gr, cudaStream_t st) {
  const int64_t tasks = p.B * p.g.num_windows * p.nh;
  GRL_LAUNCH(grid_for(tasks * p.g.n1), kThreads, 0, st, stage2_backward_tokens<T, MAXD>)(p, s, gr);
  GRL_LAUNCH(grid_for(tasks * p.g.n2), kThreads, 0, st, stage2_backward_anchors<T, MAXD>)(p, s, gr);
  GRL_LAUNCH(grid_for(tasks * p.g.n1), kThreads, 0, st, stage1_backward_tokens<T, MAXD>)(p, s, gr);
  GRL_LAUNCH(grid_for(tasks * p.g.n2), kThreads, 0, st, stage1_backward_anchors<T, MAXD>)(p, s, gr);
  return cudaGetLastError();
}

}  // namespace

cudaError_t stripe_forward(const StripeProblem& p, void* out, const StripeSaved& s, cudaStream_t stream) {
  if (p.B * p.g.num_windows * p.nh == 0) return cudaSuccess;
  return dispatch_dtype_width(p.dtype, p.d, [&](auto t, auto w) {
    return forward_impl<decltype(t), decltype(w)::value>(p, out, s, stream);
  });
}

cudaError_t stripe_backward(const StripeProblem& p, const StripeSaved& s, const StripeGrads& gr, cudaStream_t stream) {
  if (p.B * p.g.num_windows * p.nh == 0) return cudaSuccess;
  return dispatch_dtype_width(p.dtype, p.d, [&](auto t, auto w) {
    return backward_impl<decltype(t), decltype(w)::value>(p, s, gr, stream);
  });
}

}  // namespace cuda
}  // namespace grl
