// grl_stripe.cu -- CUDA kernels of GRL's anchored stripe attention (SIMT, one thread per row).
//
// Math (per window w, head h; x_hat = x / max(||x||, 1e-12)):
//   stage 1 (anchor i over tokens j): S1 = tau1 a_hat_i . k_hat_j + B1[a2w(i,j)] + M1,  Z = softmax_j(S1) v
//   stage 2 (token j over anchors i): S2 = tau2 q_hat_j . a_hat_i + B2[w2a(j,i)] + M2,  Y = softmax_i(S2) Z
// Forward: stage1 kernel (thread per anchor row, online softmax over the N1 tokens) writes Z
// and the rows' (m, 1/l); stage2 kernel (thread per token row) writes Y and its rows' (m, 1/l).
// Backward (FlashAttention-2 style, P = exp(s - m) / l recomputed, D = rowsum(P * dP)):
//   s2_tok: dq, D2                        s2_anc: dZ, stage-2 part of d a_hat
//   s1_anc: D1, stage-1 part of d a_hat, then d anchor          s1_tok: dk, dv
//   s2_bias / s1_bias + the fixed-order reductions of grl_cuda_common.cuh: dbias2, dtau2, dbias1, dtau1.
// No atomics: thread rows own their outputs, the parameter gradients are fixed-order sums.
// Inputs are read in place through 64-bit element strides; rows live in register tiles of
// MAXD floats. Index math (partition, shift, relative index, region ids) is grl_geometry.h;
// the loops over a window's tokens / anchors walk them with stripe_walk_tokens / _anchors
// (counters, no division per token) and relative indices as own offset - walked offset + const.
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

// Per-thread view of one (batch, window, head): base pointers so that rows are
// q + pos * sl (+ kv for k, + 2 kv for v) and anc + row * a_sh + col * a_sw; norms likewise.
// The loops take positions from stripe_walk_tokens / stripe_walk_anchors (no division).
template <typename T>
struct SView {
  const T* q;   // qkv + b * q_sb + h * d * q_sc
  const T* a;   // anchor + b * a_sb + h * d * a_sc
  const float *qn, *kn, *an;  // + b * (L or Ha*Wa) * nh + h
  int64_t kv;   // C * q_sc
};

template <typename T>
__device__ __forceinline__ SView<T> sview(const StripeProblem& p, const StripeSaved& s, int64_t b, int64_t h) {
  const StripeGeom& g = p.g;
  const int64_t L = g.H * g.W, A = g.Ha * g.Wa;
  return SView<T>{static_cast<const T*>(p.qkv) + b * p.q_sb + h * p.d * p.q_sc,
                  static_cast<const T*>(p.anchor) + b * p.a_sb + h * p.d * p.a_sc,
                  s.qn + b * L * p.nh + h, s.kn + b * L * p.nh + h, s.an + b * A * p.nh + h, p.C * p.q_sc};
}

__device__ __forceinline__ float mask_of(const StripeGeom& g, int aid, int tid) {
  return (g.shifted && aid != tid) ? kMaskValue : 0.0f;
}

// Own row of an anchor thread: (row, col) on the anchor grid (one division per row).
__device__ __forceinline__ void anchor_rc(const StripeGeom& g, int64_t apos, int64_t& row, int64_t& col) {
  row = apos / g.Wa;
  col = apos - row * g.Wa;
}

// ---- forward ---------------------------------------------------------------
template <typename T, int MAXD>
__global__ void stage1_forward(StripeProblem p, StripeSaved s) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n2;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t i = idx % g.n2, task = idx / g.n2;
    const Task t = split_task(task, p.nh, g.num_windows);
    const SView<T> w = sview<T>(p, s, t.b, t.h);
    const int64_t apos = stripe_anchor_position(g, t.win, i);
    int64_t ar, ac;
    anchor_rc(g, apos, ar, ac);
    float a[MAXD], z[MAXD];
    load_row<T, MAXD>(w.a + ar * p.a_sh + ac * p.a_sw, 1, d, inv_norm(w.an[apos * p.nh]), a);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) z[c] = 0.0f;
    const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
    const float tau = p.tau1[t.h];
    // a2w(i, j) = aoff(i) - toff(j) + base
    const float* bias = p.bias1 + t.h * g.table_rows + stripe_anchor_offset(g, i) + stripe_a2w_base(g);
    float m = -INFINITY, l = 0.0f;
    stripe_walk_tokens(g, t.win, [&](int64_t, int64_t pos, int tid, int64_t toff) {
      const T* kp = w.q + pos * p.q_sl + w.kv;
      const T* vp = kp + w.kv;
      float cs = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) cs += a[c] * ldf(kp + c);
      cs *= inv_norm(w.kn[pos * p.nh]);
      const float v = tau * cs + bias[-toff] + mask_of(g, aid, tid);
      const float mn = fmaxf(m, v), corr = expf(m - mn), pj = expf(v - mn);
      l = l * corr + pj;
      m = mn;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) z[c] = z[c] * corr + pj * ldf(vp + c);
    });
    float* zo = s.z + idx * d;
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) zo[c] = z[c] * inv;
    store_row_stat(s.stat1 + 2 * idx, m, l);
  }
}

template <typename T, int MAXD>
__global__ void stage2_forward(StripeProblem p, StripeSaved s, T* out) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n1, L = g.H * g.W;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t j = idx % g.n1, task = idx / g.n1;
    const Task t = split_task(task, p.nh, g.num_windows);
    const SView<T> w = sview<T>(p, s, t.b, t.h);
    const int64_t pos = stripe_token_position(g, t.win, j);
    float q[MAXD], y[MAXD];
    load_row<T, MAXD>(w.q + pos * p.q_sl, 1, d, inv_norm(w.qn[pos * p.nh]), q);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) y[c] = 0.0f;
    const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
    const float tau = p.tau2[t.h];
    // w2a(j, i) = toff(j) - aoff(i) + base
    const float* bias = p.bias2 + t.h * g.table_rows + stripe_token_offset(g, j) + stripe_w2a_base(g);
    const float* zt = s.z + task * g.n2 * d;
    float m = -INFINITY, l = 0.0f;
    stripe_walk_anchors(g, t.win, [&](int64_t i, int64_t ar, int64_t ac, int aid, int64_t aoff) {
      const T* ap = w.a + ar * p.a_sh + ac * p.a_sw;
      float cs = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) cs += q[c] * ldf(ap + c);
      cs *= inv_norm(w.an[(ar * g.Wa + ac) * p.nh]);
      const float v = tau * cs + bias[-aoff] + mask_of(g, aid, tid);
      const float mn = fmaxf(m, v), corr = expf(m - mn), pi = expf(v - mn);
      l = l * corr + pi;
      m = mn;
      const float* zr = zt + i * d;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) y[c] = y[c] * corr + pi * zr[c];
    });
    T* op = out + (t.b * L + pos) * p.C + t.h * d;
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) stf(op + c, y[c] * inv);
    store_row_stat(s.stat2 + 2 * idx, m, l);
  }
}

// ---- backward ----------------------------------------------------------------
template <typename T, int MAXD>
__global__ void stage2_backward_tokens(StripeProblem p, StripeSaved s, StripeGrads gr) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n1, L = g.H * g.W;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t j = idx % g.n1, task = idx / g.n1;
    const Task t = split_task(task, p.nh, g.num_windows);
    const SView<T> w = sview<T>(p, s, t.b, t.h);
    const int64_t pos = stripe_token_position(g, t.win, j);
    const float qn = w.qn[pos * p.nh];
    float q[MAXD], dy[MAXD], dq[MAXD];
    const T* qown = w.q + pos * p.q_sl;
    const float iqn = inv_norm(qn);
    if constexpr (!kStreamRow<MAXD>) load_row<T, MAXD>(qown, 1, d, iqn, q);
    const T* dyp = static_cast<const T*>(gr.gout) + (t.b * L + pos) * p.C + t.h * d;
    if constexpr (!kStreamRow<MAXD>) load_row<T, MAXD>(dyp, 1, d, 1.0f, dy);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dq[c] = 0.0f;
    const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
    const float m = s.stat2[2 * idx], il = s.stat2[2 * idx + 1], tau = p.tau2[t.h];
    const float* bias = p.bias2 + t.h * g.table_rows + stripe_token_offset(g, j) + stripe_w2a_base(g);
    const float* zt = s.z + task * g.n2 * d;
    float D = 0.0f;
    // pass 0: D = sum_i P dP; pass 1: dS = P (dP - D) -> dq
    for (int pass = 0; pass < 2; ++pass) {
      stripe_walk_anchors(g, t.win, [&](int64_t i, int64_t ar, int64_t ac, int aid, int64_t aoff) {
        const T* ap = w.a + ar * p.a_sh + ac * p.a_sw;
        const float ia = inv_norm(w.an[(ar * g.Wa + ac) * p.nh]);
        const float* zr = zt + i * d;
        float cs = 0.0f, dp = 0.0f;
#pragma unroll
        for (int c = 0; c < MAXD; ++c)
          if (c < d) {
            cs += row_elem<MAXD>(q, qown, c, iqn) * ldf(ap + c);
            dp += row_elem<MAXD>(dy, dyp, c) * zr[c];
          }
        cs *= ia;
        const float pi = row_prob(tau * cs + bias[-aoff] + mask_of(g, aid, tid), m, il);
        if (pass == 0) {
          D += pi * dp;
        } else {
          const float wt = tau * (pi * (dp - D)) * ia;
#pragma unroll
          for (int c = 0; c < MAXD; ++c)
            if (c < d) dq[c] += wt * ldf(ap + c);
        }
      });
    }
    gr.d2[idx] = D;
    if constexpr (kStreamRow<MAXD>) load_row<T, MAXD>(qown, 1, d, iqn, q);
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
  const int64_t total = p.B * g.num_windows * p.nh * g.n2, L = g.H * g.W;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t i = idx % g.n2, task = idx / g.n2;
    const Task t = split_task(task, p.nh, g.num_windows);
    const SView<T> w = sview<T>(p, s, t.b, t.h);
    const int64_t apos = stripe_anchor_position(g, t.win, i);
    int64_t ar, ac;
    anchor_rc(g, apos, ar, ac);
    // the own row unscaled: the logit is computed as stage2_forward did (q_hat . a, then / |a|),
    // so that s - m is exact (a_hat . q / |q| differs by rounding, ~tau * eps)
    float a[MAXD], dz[MAXD], da[MAXD];
    const T* aown = w.a + ar * p.a_sh + ac * p.a_sw;
    if constexpr (!kStreamRow<MAXD>) load_row<T, MAXD>(aown, 1, d, 1.0f, a);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dz[c] = 0.0f, da[c] = 0.0f;
    const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
    const float tau = p.tau2[t.h], ia = inv_norm(w.an[apos * p.nh]);
    // w2a(j, i) = toff(j) - aoff(i) + base: walks with j
    const float* bias = p.bias2 + t.h * g.table_rows - stripe_anchor_offset(g, i) + stripe_w2a_base(g);
    const float* zr = s.z + idx * d;
    const T* gbase = static_cast<const T*>(gr.gout) + t.b * L * p.C + t.h * d;
    const float* st2 = s.stat2 + 2 * task * g.n1;
    const float* d2 = gr.d2 + task * g.n1;
    stripe_walk_tokens(g, t.win, [&](int64_t j, int64_t pos, int tid, int64_t toff) {
      const T* qp = w.q + pos * p.q_sl;
      const T* gp = gbase + pos * p.C;
      const float iq = inv_norm(w.qn[pos * p.nh]);
      float cs = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          cs += (ldf(qp + c) * iq) * row_elem<MAXD>(a, aown, c);
          dp += ldf(gp + c) * zr[c];
        }
      cs *= ia;
      const float pj = row_prob(tau * cs + bias[toff] + mask_of(g, aid, tid), st2[2 * j], st2[2 * j + 1]);
      const float wt = tau * pj * (dp - d2[j]) * iq;
      const T* gp2 = reread<MAXD>(gp);
      const T* qp2 = reread<MAXD>(qp);
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          dz[c] += pj * ldf(gp2 + c);
          da[c] += wt * ldf(qp2 + c);
        }
    });
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) {
        gr.dz[idx * d + c] = dz[c];
        gr.da[idx * d + c] = da[c];
      }
  }
}

template <typename T, int MAXD>
__global__ void stage1_backward_tokens(StripeProblem p, StripeSaved s, StripeGrads gr) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n1, L = g.H * g.W;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t j = idx % g.n1, task = idx / g.n1;
    const Task t = split_task(task, p.nh, g.num_windows);
    const SView<T> w = sview<T>(p, s, t.b, t.h);
    const int64_t pos = stripe_token_position(g, t.win, j);
    const float kn = w.kn[pos * p.nh];
    // the own row unscaled: the logit is computed as stage1_forward did (a_hat . k, then / |k|)
    float k[MAXD], dk[MAXD], dv[MAXD];
    const T* kown = w.q + pos * p.q_sl + w.kv;
    if constexpr (!kStreamRow<MAXD>) load_row<T, MAXD>(kown, 1, d, 1.0f, k);
    const T* vp = w.q + pos * p.q_sl + 2 * w.kv;
#pragma unroll
    for (int c = 0; c < MAXD; ++c) dk[c] = 0.0f, dv[c] = 0.0f;
    const int tid = g.shifted ? stripe_token_region(g, t.win, j) : 0;
    const float tau = p.tau1[t.h], ik = inv_norm(kn);
    // a2w(i, j) = aoff(i) - toff(j) + base: walks with i
    const float* bias = p.bias1 + t.h * g.table_rows - stripe_token_offset(g, j) + stripe_a2w_base(g);
    const float* st1 = s.stat1 + 2 * task * g.n2;
    const float* d1 = gr.d1 + task * g.n2;
    const float* dzt = gr.dz + task * g.n2 * d;
    stripe_walk_anchors(g, t.win, [&](int64_t i, int64_t ar, int64_t ac, int aid, int64_t aoff) {
      const T* ap = w.a + ar * p.a_sh + ac * p.a_sw;
      const float ia = inv_norm(w.an[(ar * g.Wa + ac) * p.nh]);
      const float* dzr = dzt + i * d;
      float cs = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          cs += (ldf(ap + c) * ia) * row_elem<MAXD>(k, kown, c);
          dp += dzr[c] * ldf(vp + c);
        }
      cs *= ik;
      const float pi = row_prob(tau * cs + bias[aoff] + mask_of(g, aid, tid), st1[2 * i], st1[2 * i + 1]);
      const float wt = tau * (pi * (dp - d1[i])) * ia;
      // (not for float32 rows: ptxas then spills more, 20 B instead of 12 B, sm_90)
      constexpr bool kReread = !std::is_same<T, float>::value;
      const T* ap2 = reread<MAXD, kReread>(ap);
      const float* dzr2 = reread<MAXD, kReread>(dzr);
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          dv[c] += pi * dzr2[c];
          dk[c] += wt * ldf(ap2 + c);
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

template <typename T, int MAXD>
__global__ void stage1_backward_anchors(StripeProblem p, StripeSaved s, StripeGrads gr) {
  const StripeGeom g = p.g;
  const int64_t total = p.B * g.num_windows * p.nh * g.n2;
  const int d = static_cast<int>(p.d);  // 32-bit: cheap c < d tile predicates (no spills at d = 64)
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t i = idx % g.n2, task = idx / g.n2;
    const Task t = split_task(task, p.nh, g.num_windows);
    const SView<T> w = sview<T>(p, s, t.b, t.h);
    const int64_t apos = stripe_anchor_position(g, t.win, i);
    int64_t ar, ac;
    anchor_rc(g, apos, ar, ac);
    const float an = w.an[apos * p.nh];
    float a[MAXD], da[MAXD];
    load_row<T, MAXD>(w.a + ar * p.a_sh + ac * p.a_sw, 1, d, inv_norm(an), a);
#pragma unroll
    for (int c = 0; c < MAXD; ++c) da[c] = (c < d) ? gr.da[idx * d + c] : 0.0f;
    const int aid = g.shifted ? stripe_anchor_region(g, t.win, i) : 0;
    const float tau = p.tau1[t.h], m = s.stat1[2 * idx], il = s.stat1[2 * idx + 1];
    const float* bias = p.bias1 + t.h * g.table_rows + stripe_anchor_offset(g, i) + stripe_a2w_base(g);
    const float* dzr = gr.dz + idx * d;
    float D1 = 0.0f;
    // pass 0: D1 = sum_j P dP (as the reference's softmax backward; dZ . Z would carry Z's
    // rounding into every dS of the row); pass 1: the stage-1 part of d a_hat
    for (int pass = 0; pass < 2; ++pass)
    stripe_walk_tokens(g, t.win, [&](int64_t, int64_t pos, int tid, int64_t toff) {
      const T* kp = w.q + pos * p.q_sl + w.kv;
      const T* vp = kp + w.kv;
      const float ik = inv_norm(w.kn[pos * p.nh]);
      float cs = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) {
          cs += a[c] * ldf(kp + c);
          dp += dzr[c] * ldf(vp + c);
        }
      cs *= ik;
      const float pj = row_prob(tau * cs + bias[-toff] + mask_of(g, aid, tid), m, il);
      if (pass == 0) {
        D1 += pj * dp;
        return;
      }
      const float wt = tau * (pj * (dp - D1)) * ik;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) da[c] += wt * ldf(kp + c);
    });
    gr.d1[idx] = D1;
    normalize_backward(da, a, an);
    T* ga = static_cast<T*>(gr.ganc) + (t.b * g.Ha * g.Wa + apos) * p.C + t.h * d;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) stf(ga + c, da[c]);
  }
}

// ---- bias / logit-scale gradients (grl_cuda_common.cuh, step 1) ---------------------------
// Thread (grp, h, row, col) of one stage over the windows of group grp (consecutive windows
// of all batches; the window position advances with counters): the logit recomputed exactly
// as the forward did, P = exp(s - m) / l, dS = P (dP - D), and sum_w dS, sum_w dS * cos
// written to pb / pt at ((grp * nh + h) * rows + row) * cols + col.
//   stage 2: row = token j (sh x sw), col = anchor i, dP = dY_j . Z_i, D = D2_j;
//   stage 1: row = anchor i (ah x aw), col = token j, dP = dZ_i . v_j, D = D1_i.
__device__ __forceinline__ int64_t wrap(int64_t x, int64_t n) { return x >= n ? x - n : x; }

template <typename T, int STAGE>
__global__ void stripe_bias_partial(StripeProblem p, StripeSaved s, StripeGrads gr, BiasGroups gp, float* pb,
                                    float* pt) {
  const StripeGeom g = p.g;
  const int64_t L = g.H * g.W, A = g.Ha * g.Wa, n_win = p.B * g.num_windows;
  const int64_t rows = STAGE == 2 ? g.n1 : g.n2, cols = STAGE == 2 ? g.n2 : g.n1;
  const int64_t total = gp.groups * p.nh * rows * cols;
  const int d = static_cast<int>(p.d);
  for (int64_t idx = global_index(); idx < total; idx += global_stride()) {
    const int64_t col = idx % cols, row = (idx / cols) % rows, h = (idx / (rows * cols)) % p.nh;
    const int64_t grp = idx / (p.nh * rows * cols);
    const int64_t j = STAGE == 2 ? row : col, i = STAGE == 2 ? col : row;  // token j, anchor i
    const int64_t y = j / g.sw, x = j - y * g.sw, u = i / g.aw, v = i - u * g.aw;
    const float tau = STAGE == 2 ? p.tau2[h] : p.tau1[h];
    const float bias = STAGE == 2 ? p.bias2[h * g.table_rows + stripe_w2a_index(g, j, i)]
                                  : p.bias1[h * g.table_rows + stripe_a2w_index(g, i, j)];
    const T* qkv = static_cast<const T*>(p.qkv) + h * p.d * p.q_sc;
    const T* anc = static_cast<const T*>(p.anchor) + h * p.d * p.a_sc;
    const int64_t w0 = grp * gp.per, w1 = (w0 + gp.per < n_win) ? w0 + gp.per : n_win;
    WindowCursor cur(w0, g.windows_w, g.num_windows);
    float sb = 0.0f, st = 0.0f;
    for (int64_t w = w0; w < w1; ++w, cur.next(g.windows_h, g.windows_w)) {
      const int64_t b = cur.b;
      const int64_t tr = cur.wy * g.sh + y, tc = cur.wx * g.sw + x, ur = cur.wy * g.ah + u, uc = cur.wx * g.aw + v;
      const int64_t pos = stripe_token_position_rc(g, tr, tc);
      const int64_t ar = wrap(ur + g.ash, g.Ha), ac = wrap(uc + g.asw, g.Wa);
      const float mask = (g.shifted && stripe_anchor_region_rc(g, ur, uc) != stripe_token_region_rc(g, tr, tc))
                             ? kMaskValue : 0.0f;
      const T* ap = anc + b * p.a_sb + ar * p.a_sh + ac * p.a_sw;
      const float ia = inv_norm(s.an[(b * A + ar * g.Wa + ac) * p.nh + h]);
      const int64_t task = (b * g.num_windows + cur.win(g.windows_w)) * p.nh + h;
      float cs = 0.0f, dp = 0.0f, m, il, D;
      if (STAGE == 2) {  // q_hat_j . a_hat_i (q scaled first, as stage2_forward), dY_j . Z_i
        const T* qp = qkv + b * p.q_sb + pos * p.q_sl;
        const T* dyp = static_cast<const T*>(gr.gout) + (b * L + pos) * p.C + h * p.d;
        const float* zr = s.z + (task * g.n2 + i) * d;
        const float iq = inv_norm(s.qn[(b * L + pos) * p.nh + h]);
        for (int c = 0; c < d; ++c) {
          cs += (ldf(qp + c) * iq) * ldf(ap + c);
          dp += ldf(dyp + c) * zr[c];
        }
        cs *= ia;
        const int64_t r = task * g.n1 + j;
        m = s.stat2[2 * r], il = s.stat2[2 * r + 1], D = gr.d2[r];
      } else {  // a_hat_i . k_hat_j (a scaled first, as stage1_forward), dZ_i . v_j
        const T* kp = qkv + b * p.q_sb + pos * p.q_sl + p.C * p.q_sc;
        const T* vp = kp + p.C * p.q_sc;
        const float* dzr = gr.dz + (task * g.n2 + i) * d;
        for (int c = 0; c < d; ++c) {
          cs += (ldf(ap + c) * ia) * ldf(kp + c);
          dp += dzr[c] * ldf(vp + c);
        }
        cs *= inv_norm(s.kn[(b * L + pos) * p.nh + h]);
        const int64_t r = task * g.n2 + i;
        m = s.stat1[2 * r], il = s.stat1[2 * r + 1], D = gr.d1[r];
      }
      const float ds = row_prob(tau * cs + bias + mask, m, il) * (dp - D);
      sb += ds;
      st += ds * cs;
    }
    pb[idx] = sb;
    pt[idx] = st;
  }
}

// Table-row bins of the two stages (rows x columns as stripe_bias_partial lays them out).
BiasBins stripe_bins(const StripeGeom& g, int stage) {
  if (stage == 2) return BiasBins{g.sh, g.sw, g.ah, g.aw, g.ah - 1, g.aw - 1, g.table_h, g.table_w};
  return BiasBins{g.ah, g.aw, g.sh, g.sw, g.sh - 1, g.sw - 1, g.table_h, g.table_w};
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
  GRL_LAUNCH(grid_for(tasks * p.g.n2), kThreads, 0, st, stage1_backward_anchors<T, MAXD>)(p, s, gr);  // D1 first
  GRL_LAUNCH(grid_for(tasks * p.g.n1), kThreads, 0, st, stage1_backward_tokens<T, MAXD>)(p, s, gr);
  // parameter gradients, stage 2 then stage 1, on one workspace (both stages have N1 * N2 pairs)
  const int64_t n_win = p.B * p.g.num_windows;
  const BiasBins b2 = stripe_bins(p.g, 2), b1 = stripe_bins(p.g, 1);
  const BiasGroups gp = bias_groups(n_win, p.nh, b2.pairs());
  const int64_t part = gp.groups * p.nh * b2.pairs();
  GRL_LAUNCH(grid_for(part), kThreads, 0, st, stripe_bias_partial<T, 2>)(p, s, gr, gp, gr.bias_ws, gr.bias_ws + part);
  reduce_bias_grads(gr.bias_ws, n_win, p.nh, b2, gr.dbias2, gr.dtau2, st);
  GRL_LAUNCH(grid_for(part), kThreads, 0, st, stripe_bias_partial<T, 1>)(p, s, gr, gp, gr.bias_ws, gr.bias_ws + part);
  reduce_bias_grads(gr.bias_ws, n_win, p.nh, b1, gr.dbias1, gr.dtau1, st);
  return cudaGetLastError();
}

}  // namespace

int64_t stripe_bias_workspace(const StripeProblem& p) {
  return bias_workspace_floats(p.B * p.g.num_windows, p.nh, stripe_bins(p.g, 2));  // = stage 1's
}

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
