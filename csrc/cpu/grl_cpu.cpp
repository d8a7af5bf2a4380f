// grl_cpu.cpp -- fused CPU kernels of GRL's anchored-stripe and window attention.
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
// stage 1 streams token blocks with an online softmax (saving Z and the row
// log-sum-exp for the backward), stage 2 and window rows are complete (N2 / N
// entries) and use an exact softmax. The backward recomputes probabilities from
// the saved log-sum-exp (stage 1) or the logits (stage 2, window). Per-head grads
// of tau and of the bias tables are accumulated per worker chunk, then summed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "grl_geometry.h"
#include "grl_cpu_kernels.h"

// Bumped whenever the Python-visible signatures change; the loader rebuilds a stale build.
#define GRL_ABI_VERSION 1

namespace grl {
namespace cpu {

namespace {

constexpr int64_t kBlock = 64;  // tokens per block of stage 1

// Strided 3-D view (B, L, C) of a tensor, element offsets.
struct View3 {
  int64_t sb, sl, sc;
};

StripeGeom stripe_from(const std::vector<int64_t>& p) {
  TORCH_CHECK(p.size() == 8, "stripe geometry needs 8 ints (H, W, sh, sw, shift_h, shift_w, down, shifted)");
  return make_stripe_geom(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
}

WindowGeom window_from(const std::vector<int64_t>& p) {
  TORCH_CHECK(p.size() == 4, "window geometry needs 4 ints (H, W, ws, shift)");
  return make_window_geom(p[0], p[1], p[2], p[3]);
}

// Static split of `tasks` into `chunks` contiguous ranges processed in parallel;
// fn(chunk, task) -- chunk indexes the per-chunk reduction buffers.
template <typename F>
void for_chunks(int64_t tasks, int64_t chunks, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t t0 = tasks * ch / chunks, t1 = tasks * (ch + 1) / chunks;
      for (int64_t t = t0; t < t1; ++t) fn(ch, t);
    }
  });
}

int64_t num_chunks(int64_t tasks) {
  return std::max<int64_t>(1, std::min<int64_t>(tasks, at::get_num_threads()));
}

// ---------------------------------------------------------------------------
// anchored stripe attention
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct StripeArgs {
  const scalar_t* qkv; View3 vq;
  const scalar_t* anc; int64_t asb, ash, asw, asc;  // anchor strides (B, Ha, Wa, C)
  const acc_t* tau1; const acc_t* bias1;           // bias (nh, R)
  const acc_t* tau2; const acc_t* bias2;
  StripeGeom g; int64_t B, C, nh, d;
};

// Load normalized anchors of (b, win, h): ahat (n2 x d), aT (d x n2), norms.
template <typename scalar_t, typename acc_t>
void load_anchors(const StripeArgs<scalar_t, acc_t>& A, int64_t b, int64_t win, int64_t h, acc_t* ahat,
                  acc_t* aT, acc_t* anorm, int* aid) {
  const StripeGeom& g = A.g;
  const int64_t d = A.d;
  for (int64_t i = 0; i < g.n2; ++i) {
    const int64_t p = stripe_anchor_position(g, win, i);
    const scalar_t* src = A.anc + b * A.asb + (p / g.Wa) * A.ash + (p % g.Wa) * A.asw + h * d * A.asc;
    acc_t* dst = ahat + i * d;
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<acc_t>(src[c * A.asc]);
    anorm[i] = normalize_inplace(dst, d);
    for (int64_t c = 0; c < d; ++c) aT[c * g.n2 + i] = dst[c];
    aid[i] = g.shifted ? stripe_anchor_region(g, win, i) : 0;
  }
}

template <typename scalar_t, typename acc_t>
void stripe_forward_task(const StripeArgs<scalar_t, acc_t>& A, int64_t task, scalar_t* out, acc_t* zsave,
                         acc_t* lsesave) {
  const StripeGeom& g = A.g;
  const int64_t d = A.d, n1 = g.n1, n2 = g.n2, Rw = g.table_w;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const acc_t tau1 = A.tau1[h], tau2 = A.tau2[h];
  const acc_t* bias1 = A.bias1 + h * g.table_rows;
  const acc_t* bias2 = A.bias2 + h * g.table_rows;
  const bool masked = g.shifted != 0;

  std::vector<acc_t> ahat(n2 * d), aT(d * n2), anorm(n2), kT(d * kBlock), vb(kBlock * d), s(std::max(kBlock, n2)),
      m(n2), l(n2), qv(d), yv(d);
  std::vector<int> aid(n2), tid(kBlock);
  std::vector<int64_t> tpos(kBlock), toff(kBlock), abase(n2), aoff(n2);
  load_anchors(A, b, win, h, ahat.data(), aT.data(), anorm.data(), aid.data());
  for (int64_t i = 0; i < n2; ++i) {
    const int64_t u = i / g.aw, v = i % g.aw;
    abase[i] = (u + g.sh - 1) * Rw + (v + g.sw - 1);  // a2w row = abase[i] - (y*Rw + x)
    aoff[i] = u * Rw + v;                             // w2a row = (y+ah-1)*Rw + x+aw-1 - aoff[i]
  }
  acc_t* Z = zsave + task * n2 * d;  // (n2, d) un-normalized accumulator, then Z
  std::fill(Z, Z + n2 * d, acc_t(0));
  std::fill(m.begin(), m.end(), neg_inf<acc_t>());
  std::fill(l.begin(), l.end(), acc_t(0));
  const scalar_t* base = A.qkv + b * A.vq.sb;

  // ---- stage 1: anchors attend to the window, online softmax over token blocks
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    const int64_t nb = std::min(kBlock, n1 - jb);
    for (int64_t jj = 0; jj < nb; ++jj) {
      const int64_t j = jb + jj;
      tpos[jj] = stripe_token_position(g, win, j);
      toff[jj] = (j / g.sw) * Rw + (j % g.sw);
      tid[jj] = masked ? stripe_token_region(g, win, j) : 0;
      const scalar_t* kp = base + tpos[jj] * A.vq.sl + (A.C + h * d) * A.vq.sc;
      const scalar_t* vp = base + tpos[jj] * A.vq.sl + (2 * A.C + h * d) * A.vq.sc;
      for (int64_t c = 0; c < d; ++c) qv[c] = static_cast<acc_t>(kp[c * A.vq.sc]);
      normalize_inplace(qv.data(), d);
      for (int64_t c = 0; c < d; ++c) kT[c * kBlock + jj] = qv[c];
      for (int64_t c = 0; c < d; ++c) vb[jj * d + c] = static_cast<acc_t>(vp[c * A.vq.sc]);
    }
    for (int64_t i = 0; i < n2; ++i) {
      acc_t* sr = s.data();
      for (int64_t jj = 0; jj < nb; ++jj) sr[jj] = 0;
      for (int64_t c = 0; c < d; ++c) {
        const acc_t ac = ahat[i * d + c];
        const acc_t* kr = kT.data() + c * kBlock;
        for (int64_t jj = 0; jj < nb; ++jj) sr[jj] += ac * kr[jj];
      }
      const acc_t* brow = bias1 + abase[i];
      acc_t mx = m[i];
      for (int64_t jj = 0; jj < nb; ++jj) {
        acc_t v = tau1 * sr[jj] + brow[-toff[jj]];
        if (masked) v += (aid[i] != tid[jj]) ? acc_t(kMaskValue) : acc_t(0);
        sr[jj] = v;
        mx = v > mx ? v : mx;
      }
      const acc_t corr = exp_fast(m[i] - mx);  // m[i] = -inf on the first block -> 0
      acc_t sum = 0;
      for (int64_t jj = 0; jj < nb; ++jj) {
        sr[jj] = exp_fast(sr[jj] - mx);
        sum += sr[jj];
      }
      l[i] = l[i] * corr + sum;
      m[i] = mx;
      acc_t* zr = Z + i * d;
      for (int64_t c = 0; c < d; ++c) zr[c] *= corr;
      for (int64_t jj = 0; jj < nb; ++jj) {
        const acc_t p = sr[jj];
        const acc_t* vr = vb.data() + jj * d;
        for (int64_t c = 0; c < d; ++c) zr[c] += p * vr[c];
      }
    }
  }
  acc_t* lse = lsesave + task * n2;
  for (int64_t i = 0; i < n2; ++i) {
    const acc_t inv = acc_t(1) / l[i];
    for (int64_t c = 0; c < d; ++c) Z[i * d + c] *= inv;
    lse[i] = m[i] + std::log(l[i]);
  }

  // ---- stage 2: tokens attend to the anchors (rows of n2 entries, exact softmax)
  for (int64_t j = 0; j < n1; ++j) {
    const int64_t pos = stripe_token_position(g, win, j);
    const scalar_t* qp = base + pos * A.vq.sl + h * d * A.vq.sc;
    for (int64_t c = 0; c < d; ++c) qv[c] = static_cast<acc_t>(qp[c * A.vq.sc]);
    normalize_inplace(qv.data(), d);
    acc_t* sr = s.data();
    for (int64_t i = 0; i < n2; ++i) sr[i] = 0;
    for (int64_t c = 0; c < d; ++c) {
      const acc_t qc = qv[c];
      const acc_t* ar = aT.data() + c * n2;
      for (int64_t i = 0; i < n2; ++i) sr[i] += qc * ar[i];
    }
    const int64_t y = j / g.sw, x = j % g.sw;
    const acc_t* brow = bias2 + (y + g.ah - 1) * Rw + (x + g.aw - 1);
    const int t_id = masked ? stripe_token_region(g, win, j) : 0;
    acc_t mx = neg_inf<acc_t>();
    for (int64_t i = 0; i < n2; ++i) {
      acc_t v = tau2 * sr[i] + brow[-aoff[i]];
      if (masked) v += (aid[i] != t_id) ? acc_t(kMaskValue) : acc_t(0);
      sr[i] = v;
      mx = v > mx ? v : mx;
    }
    acc_t sum = 0;
    for (int64_t i = 0; i < n2; ++i) {
      sr[i] = exp_fast(sr[i] - mx);
      sum += sr[i];
    }
    std::fill(yv.begin(), yv.end(), acc_t(0));
    for (int64_t i = 0; i < n2; ++i) {
      const acc_t p = sr[i];
      const acc_t* zr = Z + i * d;
      for (int64_t c = 0; c < d; ++c) yv[c] += p * zr[c];
    }
    const acc_t inv = acc_t(1) / sum;
    scalar_t* op = out + (b * g.H * g.W + pos) * A.C + h * d;
    for (int64_t c = 0; c < d; ++c) op[c] = static_cast<scalar_t>(yv[c] * inv);
  }
}

template <typename scalar_t, typename acc_t>
void stripe_backward_task(const StripeArgs<scalar_t, acc_t>& A, int64_t task, const scalar_t* gout,
                          const acc_t* zsave, const acc_t* lsesave, scalar_t* gqkv, scalar_t* ganc,
                          acc_t* dtau1, acc_t* dbias1, acc_t* dtau2, acc_t* dbias2) {
  const StripeGeom& g = A.g;
  const int64_t d = A.d, n1 = g.n1, n2 = g.n2, Rw = g.table_w, C = A.C;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const acc_t tau1 = A.tau1[h], tau2 = A.tau2[h];
  const acc_t* bias1 = A.bias1 + h * g.table_rows;
  const acc_t* bias2 = A.bias2 + h * g.table_rows;
  acc_t* db1 = dbias1 + h * g.table_rows;
  acc_t* db2 = dbias2 + h * g.table_rows;
  const bool masked = g.shifted != 0;

  std::vector<acc_t> ahat(n2 * d), aT(d * n2), anorm(n2), ZT(d * n2), dZ(n2 * d, acc_t(0)), dA(n2 * d, acc_t(0)),
      D1(n2), s(std::max(kBlock, n2)), cs(std::max(kBlock, n2)), dp(std::max(kBlock, n2)), qv(d), dy(d), dq(d),
      kb(kBlock * d), kT(d * kBlock), vT(d * kBlock), knorm(kBlock), dkb(kBlock * d), dvb(kBlock * d);
  std::vector<int> aid(n2), tid(kBlock);
  std::vector<int64_t> tpos(kBlock), toff(kBlock), abase(n2), aoff(n2);
  load_anchors(A, b, win, h, ahat.data(), aT.data(), anorm.data(), aid.data());
  for (int64_t i = 0; i < n2; ++i) {
    const int64_t u = i / g.aw, v = i % g.aw;
    abase[i] = (u + g.sh - 1) * Rw + (v + g.sw - 1);
    aoff[i] = u * Rw + v;
  }
  const acc_t* Z = zsave + task * n2 * d;
  const acc_t* lse = lsesave + task * n2;
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t c = 0; c < d; ++c) ZT[c * n2 + i] = Z[i * d + c];
  const scalar_t* base = A.qkv + b * A.vq.sb;
  const int64_t L = g.H * g.W;
  acc_t dt1 = 0, dt2 = 0;

  // ---- pass A: stage 2 backward, one token row at a time
  for (int64_t j = 0; j < n1; ++j) {
    const int64_t pos = stripe_token_position(g, win, j);
    const scalar_t* qp = base + pos * A.vq.sl + h * d * A.vq.sc;
    for (int64_t c = 0; c < d; ++c) qv[c] = static_cast<acc_t>(qp[c * A.vq.sc]);
    const acc_t qn = normalize_inplace(qv.data(), d);
    const scalar_t* gp = gout + (b * L + pos) * C + h * d;
    for (int64_t c = 0; c < d; ++c) dy[c] = static_cast<acc_t>(gp[c]);
    for (int64_t i = 0; i < n2; ++i) cs[i] = 0, dp[i] = 0;
    for (int64_t c = 0; c < d; ++c) {
      const acc_t qc = qv[c], yc = dy[c];
      const acc_t* ar = aT.data() + c * n2;
      const acc_t* zr = ZT.data() + c * n2;
      for (int64_t i = 0; i < n2; ++i) {
        cs[i] += qc * ar[i];
        dp[i] += yc * zr[i];
      }
    }
    const int64_t y = j / g.sw, x = j % g.sw;
    const int64_t rb = (y + g.ah - 1) * Rw + (x + g.aw - 1);
    const int t_id = masked ? stripe_token_region(g, win, j) : 0;
    acc_t mx = neg_inf<acc_t>();
    for (int64_t i = 0; i < n2; ++i) {
      acc_t v = tau2 * cs[i] + bias2[rb - aoff[i]];
      if (masked) v += (aid[i] != t_id) ? acc_t(kMaskValue) : acc_t(0);
      s[i] = v;
      mx = v > mx ? v : mx;
    }
    acc_t sum = 0;
    for (int64_t i = 0; i < n2; ++i) {
      s[i] = exp_fast(s[i] - mx);
      sum += s[i];
    }
    const acc_t inv = acc_t(1) / sum;
    acc_t Dj = 0;
    for (int64_t i = 0; i < n2; ++i) {
      s[i] *= inv;
      Dj += s[i] * dp[i];
    }
    std::fill(dq.begin(), dq.end(), acc_t(0));
    for (int64_t i = 0; i < n2; ++i) {
      const acc_t p = s[i];
      const acc_t ds = p * (dp[i] - Dj);
      dt2 += ds * cs[i];
      db2[rb - aoff[i]] += ds;
      const acc_t tds = tau2 * ds;
      acc_t* dzr = dZ.data() + i * d;
      acc_t* dar = dA.data() + i * d;
      const acc_t* ar = ahat.data() + i * d;
      for (int64_t c = 0; c < d; ++c) {
        dzr[c] += p * dy[c];
        dar[c] += tds * qv[c];
        dq[c] += tds * ar[c];
      }
    }
    normalize_backward_inplace(dq.data(), qv.data(), qn, d);
    scalar_t* gq = gqkv + (b * L + pos) * 3 * C + h * d;
    for (int64_t c = 0; c < d; ++c) gq[c] = static_cast<scalar_t>(dq[c]);
  }

  // ---- pass B: stage 1 backward over token blocks
  for (int64_t i = 0; i < n2; ++i) {
    acc_t acc = 0;
    for (int64_t c = 0; c < d; ++c) acc += dZ[i * d + c] * Z[i * d + c];
    D1[i] = acc;
  }
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    const int64_t nb = std::min(kBlock, n1 - jb);
    for (int64_t jj = 0; jj < nb; ++jj) {
      const int64_t j = jb + jj;
      tpos[jj] = stripe_token_position(g, win, j);
      toff[jj] = (j / g.sw) * Rw + (j % g.sw);
      tid[jj] = masked ? stripe_token_region(g, win, j) : 0;
      const scalar_t* kp = base + tpos[jj] * A.vq.sl + (C + h * d) * A.vq.sc;
      const scalar_t* vp = base + tpos[jj] * A.vq.sl + (2 * C + h * d) * A.vq.sc;
      acc_t* kr = kb.data() + jj * d;
      for (int64_t c = 0; c < d; ++c) kr[c] = static_cast<acc_t>(kp[c * A.vq.sc]);
      knorm[jj] = normalize_inplace(kr, d);
      for (int64_t c = 0; c < d; ++c) {
        kT[c * kBlock + jj] = kr[c];
        vT[c * kBlock + jj] = static_cast<acc_t>(vp[c * A.vq.sc]);
      }
    }
    std::fill(dkb.begin(), dkb.end(), acc_t(0));
    std::fill(dvb.begin(), dvb.end(), acc_t(0));
    for (int64_t i = 0; i < n2; ++i) {
      for (int64_t jj = 0; jj < nb; ++jj) cs[jj] = 0, dp[jj] = 0;
      const acc_t* ar = ahat.data() + i * d;
      const acc_t* dzr = dZ.data() + i * d;
      for (int64_t c = 0; c < d; ++c) {
        const acc_t ac = ar[c], zc = dzr[c];
        const acc_t* kr = kT.data() + c * kBlock;
        const acc_t* vr = vT.data() + c * kBlock;
        for (int64_t jj = 0; jj < nb; ++jj) {
          cs[jj] += ac * kr[jj];
          dp[jj] += zc * vr[jj];
        }
      }
      const int64_t rb = abase[i];
      const acc_t li = lse[i], Di = D1[i];
      acc_t* dar = dA.data() + i * d;
      for (int64_t jj = 0; jj < nb; ++jj) {
        acc_t v = tau1 * cs[jj] + bias1[rb - toff[jj]];
        if (masked) v += (aid[i] != tid[jj]) ? acc_t(kMaskValue) : acc_t(0);
        s[jj] = exp_fast(v - li);
      }
      for (int64_t jj = 0; jj < nb; ++jj) {
        const acc_t p = s[jj];
        const acc_t ds = p * (dp[jj] - Di);
        dt1 += ds * cs[jj];
        db1[rb - toff[jj]] += ds;
        const acc_t tds = tau1 * ds;
        acc_t* dvr = dvb.data() + jj * d;
        acc_t* dkr = dkb.data() + jj * d;
        const acc_t* kr = kb.data() + jj * d;
        for (int64_t c = 0; c < d; ++c) {
          dvr[c] += p * dzr[c];
          dkr[c] += tds * ar[c];
          dar[c] += tds * kr[c];
        }
      }
    }
    for (int64_t jj = 0; jj < nb; ++jj) {
      acc_t* dkr = dkb.data() + jj * d;
      normalize_backward_inplace(dkr, kb.data() + jj * d, knorm[jj], d);
      scalar_t* gk = gqkv + (b * L + tpos[jj]) * 3 * C + C + h * d;
      scalar_t* gv = gk + C;
      for (int64_t c = 0; c < d; ++c) {
        gk[c] = static_cast<scalar_t>(dkr[c]);
        gv[c] = static_cast<scalar_t>(dvb[jj * d + c]);
      }
    }
  }
  // ---- anchors: both stages contributed to dA (gradient w.r.t. a_hat)
  for (int64_t i = 0; i < n2; ++i) {
    acc_t* dar = dA.data() + i * d;
    normalize_backward_inplace(dar, ahat.data() + i * d, anorm[i], d);
    const int64_t p = stripe_anchor_position(g, win, i);
    scalar_t* ga = ganc + (b * g.Ha * g.Wa + p) * C + h * d;
    for (int64_t c = 0; c < d; ++c) ga[c] = static_cast<scalar_t>(dar[c]);
  }
  dtau1[h] += dt1;
  dtau2[h] += dt2;
}

template <typename scalar_t, typename acc_t>
StripeArgs<scalar_t, acc_t> stripe_args(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                                        const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2,
                                        const StripeGeom& g, int64_t nh) {
  StripeArgs<scalar_t, acc_t> A;
  A.qkv = qkv.data_ptr<scalar_t>();
  A.vq = {qkv.stride(0), qkv.stride(1), qkv.stride(2)};
  A.anc = anchor.data_ptr<scalar_t>();
  A.asb = anchor.stride(0); A.ash = anchor.stride(1); A.asw = anchor.stride(2); A.asc = anchor.stride(3);
  A.tau1 = tau1.data_ptr<acc_t>(); A.bias1 = bias1.data_ptr<acc_t>();
  A.tau2 = tau2.data_ptr<acc_t>(); A.bias2 = bias2.data_ptr<acc_t>();
  A.g = g; A.B = qkv.size(0); A.C = qkv.size(2) / 3; A.nh = nh; A.d = A.C / nh;
  return A;
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_common(const at::Tensor& qkv, int64_t nh, int64_t H, int64_t W) {
  TORCH_CHECK(qkv.device().is_cpu(), "grl cpu kernels: qkv must be a CPU tensor");
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == H * W && qkv.size(2) % 3 == 0,
              "grl cpu kernels: qkv must be (B, H*W, 3C)");
  TORCH_CHECK(nh > 0 && (qkv.size(2) / 3) % nh == 0, "grl cpu kernels: C must be divisible by num_heads");
}

void check_param(const at::Tensor& t, at::ScalarType acc, int64_t n0, int64_t n1, const char* name) {
  TORCH_CHECK(t.scalar_type() == acc && t.is_contiguous() && t.device().is_cpu(), "grl cpu kernels: ", name,
              " must be a contiguous CPU tensor of the accumulation dtype");
  TORCH_CHECK(t.numel() == n0 * n1, "grl cpu kernels: ", name, " has ", t.numel(), " elements, expected ", n0 * n1);
}

void check_stripe(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1, const at::Tensor& bias1,
                  const at::Tensor& tau2, const at::Tensor& bias2, const StripeGeom& g, int64_t nh) {
  check_common(qkv, nh, g.H, g.W);
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.down > 0 && g.H % g.sh == 0 && g.W % g.sw == 0 && g.sh % g.down == 0 &&
                  g.sw % g.down == 0,
              "grl cpu kernels: invalid stripe geometry");
  const int64_t C = qkv.size(2) / 3;
  TORCH_CHECK(anchor.dim() == 4 && anchor.size(0) == qkv.size(0) && anchor.size(1) == g.Ha &&
                  anchor.size(2) == g.Wa && anchor.size(3) == C && anchor.scalar_type() == qkv.scalar_type() &&
                  anchor.device().is_cpu(),
              "grl cpu kernels: anchor must be (B, H/f, W/f, C) with qkv's dtype");
  const auto acc = acc_type_of(qkv.scalar_type());
  check_param(tau1, acc, nh, 1, "scale1");
  check_param(tau2, acc, nh, 1, "scale2");
  check_param(bias1, acc, nh, g.table_rows, "bias1");
  check_param(bias2, acc, nh, g.table_rows, "bias2");
}

}  // namespace

std::vector<at::Tensor> stripe_forward(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                                       const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2,
                                       const std::vector<int64_t>& geom, int64_t nh) {
  const StripeGeom g = stripe_from(geom);
  check_stripe(qkv, anchor, tau1, bias1, tau2, bias2, g, nh);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3, d = C / nh;
  const auto acc = acc_type_of(qkv.scalar_type());
  auto out = at::empty({B, g.H * g.W, C}, qkv.options());
  auto zsave = at::empty({B, g.num_windows, nh, g.n2, d}, qkv.options().dtype(acc));
  auto lsesave = at::empty({B, g.num_windows, nh, g.n2}, qkv.options().dtype(acc));
  const int64_t tasks = B * g.num_windows * nh;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "grl_stripe_forward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const auto A = stripe_args<scalar_t, acc_t>(qkv, anchor, tau1, bias1, tau2, bias2, g, nh);
    scalar_t* o = out.data_ptr<scalar_t>();
    acc_t* z = zsave.data_ptr<acc_t>();
    acc_t* lse = lsesave.data_ptr<acc_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) stripe_forward_task(A, t, o, z, lse);
    });
  });
  return {out, zsave, lsesave};
}

std::vector<at::Tensor> stripe_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& anchor,
                                        const at::Tensor& tau1, const at::Tensor& bias1, const at::Tensor& tau2,
                                        const at::Tensor& bias2, const at::Tensor& zsave, const at::Tensor& lsesave,
                                        const std::vector<int64_t>& geom, int64_t nh) {
  const StripeGeom g = stripe_from(geom);
  check_stripe(qkv, anchor, tau1, bias1, tau2, bias2, g, nh);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3, d = C / nh;
  const auto acc = acc_type_of(qkv.scalar_type());
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == qkv.scalar_type() &&
                  grad_out.numel() == B * g.H * g.W * C,
              "grl cpu kernels: grad_out must be a contiguous (B, H*W, C) tensor of qkv's dtype");
  TORCH_CHECK(zsave.is_contiguous() && zsave.numel() == B * g.num_windows * nh * g.n2 * d &&
                  lsesave.is_contiguous() && lsesave.numel() == B * g.num_windows * nh * g.n2 &&
                  zsave.scalar_type() == acc && lsesave.scalar_type() == acc,
              "grl cpu kernels: saved stripe forward state does not match the geometry");
  auto gqkv = at::empty({B, g.H * g.W, 3 * C}, qkv.options());
  auto ganc = at::empty({B, g.Ha, g.Wa, C}, qkv.options());
  const int64_t tasks = B * g.num_windows * nh;
  const int64_t chunks = num_chunks(tasks);
  auto dtau = at::zeros({chunks, 2, nh}, qkv.options().dtype(acc));
  auto dbias = at::zeros({chunks, 2, nh, g.table_rows}, qkv.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "grl_stripe_backward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const auto A = stripe_args<scalar_t, acc_t>(qkv, anchor, tau1, bias1, tau2, bias2, g, nh);
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const acc_t* z = zsave.data_ptr<acc_t>();
    const acc_t* lse = lsesave.data_ptr<acc_t>();
    scalar_t* gq = gqkv.data_ptr<scalar_t>();
    scalar_t* ga = ganc.data_ptr<scalar_t>();
    acc_t* dt = dtau.data_ptr<acc_t>();
    acc_t* db = dbias.data_ptr<acc_t>();
    const int64_t R = g.table_rows;
    for_chunks(tasks, chunks, [&](int64_t ch, int64_t t) {
      acc_t* dtc = dt + ch * 2 * nh;
      acc_t* dbc = db + ch * 2 * nh * R;
      stripe_backward_task(A, t, go, z, lse, gq, ga, dtc, dbc, dtc + nh, dbc + nh * R);
    });
  });
  auto dt_sum = dtau.sum(0);
  auto db_sum = dbias.sum(0);
  return {gqkv, ganc, dt_sum[0], db_sum[0], dt_sum[1], db_sum[1]};
}

// ---------------------------------------------------------------------------
// window attention
// ---------------------------------------------------------------------------
namespace {

template <typename scalar_t, typename acc_t>
struct WindowArgs {
  const scalar_t* qkv; View3 vq;
  const acc_t* tau; const acc_t* bias;  // bias (nh, R)
  WindowGeom g; int64_t B, C, nh, d;
};

// Normalized q (n x d), k (n x d) and kT (d x n), v (n x d), vT (d x n) of one window/head.
template <typename scalar_t, typename acc_t>
struct WindowTile {
  std::vector<acc_t> qh, qn, kh, kT, kn, v, vT;
  std::vector<int64_t> pos, qoff, koff;
  std::vector<int> rid;
  WindowTile(int64_t n, int64_t d)
      : qh(n * d), qn(n), kh(n * d), kT(d * n), kn(n), v(n * d), vT(d * n), pos(n), qoff(n), koff(n), rid(n) {}

  void load(const WindowArgs<scalar_t, acc_t>& A, int64_t b, int64_t win, int64_t h, bool need_vT) {
    const WindowGeom& g = A.g;
    const int64_t n = g.n, d = A.d, side = g.table_side;
    const scalar_t* base = A.qkv + b * A.vq.sb;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = window_token_position(g, win, j);
      pos[j] = p;
      const int64_t y = j / g.ws, x = j % g.ws;
      qoff[j] = (y + g.ws - 1) * side + (x + g.ws - 1);  // rel row = qoff[i] - koff[j]
      koff[j] = y * side + x;
      rid[j] = g.shift > 0 ? window_token_region(g, win, j) : 0;
      const scalar_t* qp = base + p * A.vq.sl + h * d * A.vq.sc;
      const scalar_t* kp = qp + A.C * A.vq.sc;
      const scalar_t* vp = kp + A.C * A.vq.sc;
      acc_t* qr = qh.data() + j * d;
      acc_t* kr = kh.data() + j * d;
      acc_t* vr = v.data() + j * d;
      for (int64_t c = 0; c < d; ++c) {
        qr[c] = static_cast<acc_t>(qp[c * A.vq.sc]);
        kr[c] = static_cast<acc_t>(kp[c * A.vq.sc]);
        vr[c] = static_cast<acc_t>(vp[c * A.vq.sc]);
      }
      qn[j] = normalize_inplace(qr, d);
      kn[j] = normalize_inplace(kr, d);
      for (int64_t c = 0; c < d; ++c) kT[c * n + j] = kr[c];
      if (need_vT)
        for (int64_t c = 0; c < d; ++c) vT[c * n + j] = vr[c];
    }
  }

  // Logits of query i against every key into s (n), cosines into cs (n); returns the max.
  acc_t logits(const WindowArgs<scalar_t, acc_t>& A, int64_t i, acc_t tau, const acc_t* bias, acc_t* cs,
               acc_t* s) const {
    const int64_t n = A.g.n, d = A.d;
    const bool masked = A.g.shift > 0;
    for (int64_t j = 0; j < n; ++j) cs[j] = 0;
    const acc_t* qr = qh.data() + i * d;
    for (int64_t c = 0; c < d; ++c) {
      const acc_t qc = qr[c];
      const acc_t* kr = kT.data() + c * n;
      for (int64_t j = 0; j < n; ++j) cs[j] += qc * kr[j];
    }
    const acc_t* brow = bias + qoff[i];
    const int ri = rid[i];
    acc_t mx = neg_inf<acc_t>();
    for (int64_t j = 0; j < n; ++j) {
      acc_t val = tau * cs[j] + brow[-koff[j]];
      if (masked) val += (ri != rid[j]) ? acc_t(kMaskValue) : acc_t(0);
      s[j] = val;
      mx = val > mx ? val : mx;
    }
    return mx;
  }
};

template <typename scalar_t, typename acc_t>
void window_forward_task(const WindowArgs<scalar_t, acc_t>& A, int64_t task, scalar_t* out) {
  const WindowGeom& g = A.g;
  const int64_t n = g.n, d = A.d;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  WindowTile<scalar_t, acc_t> T(n, d);
  T.load(A, b, win, h, false);
  std::vector<acc_t> s(n), cs(n), yv(d);
  const acc_t tau = A.tau[h];
  const acc_t* bias = A.bias + h * g.table_rows;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t mx = T.logits(A, i, tau, bias, cs.data(), s.data());
    acc_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_fast(s[j] - mx);
      sum += s[j];
    }
    std::fill(yv.begin(), yv.end(), acc_t(0));
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = s[j];
      const acc_t* vr = T.v.data() + j * d;
      for (int64_t c = 0; c < d; ++c) yv[c] += p * vr[c];
    }
    const acc_t inv = acc_t(1) / sum;
    scalar_t* op = out + (b * g.H * g.W + T.pos[i]) * A.C + h * d;
    for (int64_t c = 0; c < d; ++c) op[c] = static_cast<scalar_t>(yv[c] * inv);
  }
}

template <typename scalar_t, typename acc_t>
void window_backward_task(const WindowArgs<scalar_t, acc_t>& A, int64_t task, const scalar_t* gout, scalar_t* gqkv,
                          acc_t* dtau, acc_t* dbias) {
  const WindowGeom& g = A.g;
  const int64_t n = g.n, d = A.d, C = A.C, L = g.H * g.W;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  WindowTile<scalar_t, acc_t> T(n, d);
  T.load(A, b, win, h, true);
  std::vector<acc_t> s(n), cs(n), dp(n), dy(d), dq(d), dk(n * d, acc_t(0)), dv(n * d, acc_t(0));
  const acc_t tau = A.tau[h];
  const acc_t* bias = A.bias + h * g.table_rows;
  acc_t* db = dbias + h * g.table_rows;
  acc_t dt = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t mx = T.logits(A, i, tau, bias, cs.data(), s.data());
    acc_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_fast(s[j] - mx);
      sum += s[j];
    }
    const scalar_t* gp = gout + (b * L + T.pos[i]) * C + h * d;
    for (int64_t c = 0; c < d; ++c) dy[c] = static_cast<acc_t>(gp[c]);
    for (int64_t j = 0; j < n; ++j) dp[j] = 0;
    for (int64_t c = 0; c < d; ++c) {
      const acc_t yc = dy[c];
      const acc_t* vr = T.vT.data() + c * n;
      for (int64_t j = 0; j < n; ++j) dp[j] += yc * vr[j];
    }
    const acc_t inv = acc_t(1) / sum;
    acc_t Di = 0;
    for (int64_t j = 0; j < n; ++j) {
      s[j] *= inv;
      Di += s[j] * dp[j];
    }
    std::fill(dq.begin(), dq.end(), acc_t(0));
    const acc_t* qr = T.qh.data() + i * d;
    const int64_t qo = T.qoff[i];
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = s[j];
      const acc_t ds = p * (dp[j] - Di);
      dt += ds * cs[j];
      db[qo - T.koff[j]] += ds;
      const acc_t tds = tau * ds;
      const acc_t* kr = T.kh.data() + j * d;
      acc_t* dkr = dk.data() + j * d;
      acc_t* dvr = dv.data() + j * d;
      for (int64_t c = 0; c < d; ++c) {
        dq[c] += tds * kr[c];
        dkr[c] += tds * qr[c];
        dvr[c] += p * dy[c];
      }
    }
    normalize_backward_inplace(dq.data(), qr, T.qn[i], d);
    scalar_t* gq = gqkv + (b * L + T.pos[i]) * 3 * C + h * d;
    for (int64_t c = 0; c < d; ++c) gq[c] = static_cast<scalar_t>(dq[c]);
  }
  for (int64_t j = 0; j < n; ++j) {
    acc_t* dkr = dk.data() + j * d;
    normalize_backward_inplace(dkr, T.kh.data() + j * d, T.kn[j], d);
    scalar_t* gk = gqkv + (b * L + T.pos[j]) * 3 * C + C + h * d;
    scalar_t* gv = gk + C;
    for (int64_t c = 0; c < d; ++c) {
      gk[c] = static_cast<scalar_t>(dkr[c]);
      gv[c] = static_cast<scalar_t>(dv[j * d + c]);
    }
  }
  dtau[h] += dt;
}

void check_window(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias, const WindowGeom& g,
                  int64_t nh) {
  check_common(qkv, nh, g.H, g.W);
  TORCH_CHECK(g.ws > 0 && g.H % g.ws == 0 && g.W % g.ws == 0 && g.shift >= 0 && g.shift < g.ws,
              "grl cpu kernels: invalid window geometry");
  const auto acc = acc_type_of(qkv.scalar_type());
  check_param(tau, acc, nh, 1, "scale");
  check_param(bias, acc, nh, g.table_rows, "bias");
}

template <typename scalar_t, typename acc_t>
WindowArgs<scalar_t, acc_t> window_args(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                                        const WindowGeom& g, int64_t nh) {
  WindowArgs<scalar_t, acc_t> A;
  A.qkv = qkv.data_ptr<scalar_t>();
  A.vq = {qkv.stride(0), qkv.stride(1), qkv.stride(2)};
  A.tau = tau.data_ptr<acc_t>(); A.bias = bias.data_ptr<acc_t>();
  A.g = g; A.B = qkv.size(0); A.C = qkv.size(2) / 3; A.nh = nh; A.d = A.C / nh;
  return A;
}

}  // namespace

at::Tensor window_forward(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                          const std::vector<int64_t>& geom, int64_t nh) {
  const WindowGeom g = window_from(geom);
  check_window(qkv, tau, bias, g, nh);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3;
  auto out = at::empty({B, g.H * g.W, C}, qkv.options());
  const int64_t tasks = B * g.num_windows * nh;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "grl_window_forward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const auto A = window_args<scalar_t, acc_t>(qkv, tau, bias, g, nh);
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) window_forward_task(A, t, o);
    });
  });
  return out;
}

std::vector<at::Tensor> window_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& tau,
                                        const at::Tensor& bias, const std::vector<int64_t>& geom, int64_t nh) {
  const WindowGeom g = window_from(geom);
  check_window(qkv, tau, bias, g, nh);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3;
  const auto acc = acc_type_of(qkv.scalar_type());
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == qkv.scalar_type() &&
                  grad_out.numel() == B * g.H * g.W * C,
              "grl cpu kernels: grad_out must be a contiguous (B, H*W, C) tensor of qkv's dtype");
  auto gqkv = at::empty({B, g.H * g.W, 3 * C}, qkv.options());
  const int64_t tasks = B * g.num_windows * nh;
  const int64_t chunks = num_chunks(tasks);
  auto dtau = at::zeros({chunks, nh}, qkv.options().dtype(acc));
  auto dbias = at::zeros({chunks, nh, g.table_rows}, qkv.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "grl_window_backward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const auto A = window_args<scalar_t, acc_t>(qkv, tau, bias, g, nh);
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    scalar_t* gq = gqkv.data_ptr<scalar_t>();
    acc_t* dt = dtau.data_ptr<acc_t>();
    acc_t* db = dbias.data_ptr<acc_t>();
    for_chunks(tasks, chunks, [&](int64_t ch, int64_t t) {
      window_backward_task(A, t, go, gq, dt + ch * nh, db + ch * nh * g.table_rows);
    });
  });
  return {gqkv, dtau.sum(0), dbias.sum(0)};
}

// ---------------------------------------------------------------------------
// the header's index math, materialized (tests compare it with geometry.py)
// ---------------------------------------------------------------------------
std::vector<at::Tensor> stripe_tables(const std::vector<int64_t>& geom) {
  const StripeGeom g = stripe_from(geom);
  auto opt = at::TensorOptions().dtype(at::kLong);
  auto tpos = at::empty({g.num_windows, g.n1}, opt), apos = at::empty({g.num_windows, g.n2}, opt);
  auto tid = at::empty({g.num_windows, g.n1}, opt), aid = at::empty({g.num_windows, g.n2}, opt);
  auto w2a = at::empty({g.n1, g.n2}, opt), a2w = at::empty({g.n2, g.n1}, opt);
  auto tp = tpos.accessor<int64_t, 2>(), ap = apos.accessor<int64_t, 2>();
  auto ti = tid.accessor<int64_t, 2>(), ai = aid.accessor<int64_t, 2>();
  auto wa = w2a.accessor<int64_t, 2>(), aw = a2w.accessor<int64_t, 2>();
  for (int64_t w = 0; w < g.num_windows; ++w) {
    for (int64_t j = 0; j < g.n1; ++j) tp[w][j] = stripe_token_position(g, w, j), ti[w][j] = stripe_token_region(g, w, j);
    for (int64_t i = 0; i < g.n2; ++i) ap[w][i] = stripe_anchor_position(g, w, i), ai[w][i] = stripe_anchor_region(g, w, i);
  }
  for (int64_t j = 0; j < g.n1; ++j)
    for (int64_t i = 0; i < g.n2; ++i) wa[j][i] = stripe_w2a_index(g, j, i), aw[i][j] = stripe_a2w_index(g, i, j);
  return {tpos, apos, tid, aid, w2a, a2w};
}

std::vector<at::Tensor> window_tables(const std::vector<int64_t>& geom) {
  const WindowGeom g = window_from(geom);
  auto opt = at::TensorOptions().dtype(at::kLong);
  auto pos = at::empty({g.num_windows, g.n}, opt), rid = at::empty({g.num_windows, g.n}, opt);
  auto idx = at::empty({g.n, g.n}, opt);
  auto p = pos.accessor<int64_t, 2>(), r = rid.accessor<int64_t, 2>(), ix = idx.accessor<int64_t, 2>();
  for (int64_t w = 0; w < g.num_windows; ++w)
    for (int64_t j = 0; j < g.n; ++j) p[w][j] = window_token_position(g, w, j), r[w][j] = window_token_region(g, w, j);
  for (int64_t a = 0; a < g.n; ++a)
    for (int64_t c = 0; c < g.n; ++c) ix[a][c] = window_rel_index(g, a, c);
  return {pos, rid, idx};
}

}  // namespace cpu
}  // namespace grl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grl_kernels fused CPU kernels (anchored stripe and window attention)";
  m.attr("abi_version") = GRL_ABI_VERSION;
  m.def("stripe_forward", &grl::cpu::stripe_forward, "stripe attention forward -> (out, Z, lse1)");
  m.def("stripe_backward", &grl::cpu::stripe_backward,
        "stripe attention backward -> (d_qkv, d_anchor, d_tau1, d_bias1 (nh, R), d_tau2, d_bias2)");
  m.def("window_forward", &grl::cpu::window_forward, "window attention forward");
  m.def("window_backward", &grl::cpu::window_backward, "window attention backward -> (d_qkv, d_tau, d_bias (nh, R))");
  m.def("stripe_tables", &grl::cpu::stripe_tables, "header index math: token/anchor positions, regions, w2a, a2w");
  m.def("window_tables", &grl::cpu::window_tables, "header index math: positions, regions, relative index");
}
