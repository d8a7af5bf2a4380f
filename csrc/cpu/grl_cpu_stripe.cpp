// grl_cpu_stripe.cpp -- fused CPU kernels of GRL's anchored stripe attention (forward, backward).
//
// Per window and head, with x_hat = x / max(||x||, 1e-12):
//   stage 1  Z = softmax_j(tau1 a_hat_i . k_hat_j + B1[a2w(i,j)] + M1) v     (anchors -> tokens)
//   stage 2  Y = softmax_i(tau2 q_hat_j . a_hat_i + B2[w2a(j,i)] + M2) Z     (tokens -> anchors)
// One task = (batch, window, head). Stage 1 streams blocks of 64 tokens with an online
// softmax and saves Z (N2 x d) and the row log-sum-exp; stage 2 rows (N2 entries) are
// complete and use an exact softmax. The backward recomputes probabilities (pass A: stage 2,
// giving dq, dZ and part of d a_hat; pass B: stage 1 from the saved lse, giving dk, dv and
// the rest of d a_hat). Products are 4 x 16 register-tiled GEMMs (grl_cpu_kernels.h).
#include "grl_cpu_common.h"

namespace grl {
namespace cpu {

namespace {

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

// Per-task scratch shared by the stripe forward and backward: normalized anchors a_hat
// (n2 x dp, zero-padded rows) and a_hat^T (d x n2), their norms and region ids, and the
// bias-row offsets: a2w row = abase[i] - toff[j], w2a row = tbase[j] - aoff[i].
template <typename scalar_t, typename acc_t>
struct AnchorTile {
  int64_t n2, d, dp;
  std::vector<acc_t> ahat, aT, anorm;
  std::vector<int> aid;
  std::vector<int64_t> abase, aoff;
  AnchorTile(const StripeArgs<scalar_t, acc_t>& A, int64_t b, int64_t win, int64_t h)
      : n2(A.g.n2), d(A.d), dp(pad16(A.d)), ahat(n2 * dp, acc_t(0)), aT(d * n2), anorm(n2), aid(n2), abase(n2),
        aoff(n2) {
    const StripeGeom& g = A.g;
    for (int64_t i = 0; i < n2; ++i) {
      const int64_t p = stripe_anchor_position(g, win, i);
      const scalar_t* src = A.anc + b * A.asb + (p / g.Wa) * A.ash + (p % g.Wa) * A.asw + h * d * A.asc;
      acc_t* dst = ahat.data() + i * dp;
      load_row(src, A.asc, d, dst);
      anorm[i] = normalize_inplace(dst, d);
      for (int64_t c = 0; c < d; ++c) aT[c * n2 + i] = dst[c];
      aid[i] = g.shifted ? stripe_anchor_region(g, win, i) : 0;
      const int64_t u = i / g.aw, v = i % g.aw;
      abase[i] = (u + g.sh - 1) * g.table_w + (v + g.sw - 1);
      aoff[i] = u * g.table_w + v;
    }
  }
};

// A block of up to kBlock consecutive tokens of a window: positions, bias offsets, region ids
// and (as requested) normalized rows x_hat (nb x dp, zero-padded), x_hat^T (d x kBlock), norms.
template <typename scalar_t, typename acc_t>
struct TokenBlock {
  int64_t nb = 0;
  std::vector<int64_t> pos, toff, tbase;
  std::vector<int> tid;
  TokenBlock() : pos(kBlock), toff(kBlock), tbase(kBlock), tid(kBlock) {}
  // Walks the block row by row on the rolled grid (one division per block, none per token).
  void index(const StripeGeom& g, int64_t win, int64_t jb) {
    nb = std::min(kBlock, g.n1 - jb);
    const int64_t r0 = win / g.windows_w * g.sh, c0 = win % g.windows_w * g.sw;
    int64_t y = jb / g.sw, x = jb % g.sw;
    for (int64_t jj = 0; jj < nb; ++jj) {
      pos[jj] = stripe_token_position_rc(g, r0 + y, c0 + x);
      toff[jj] = y * g.table_w + x;
      tbase[jj] = (y + g.ah - 1) * g.table_w + (x + g.aw - 1);
      tid[jj] = g.shifted ? stripe_token_region_rc(g, r0 + y, c0 + x) : 0;
      if (++x == g.sw) x = 0, ++y;
    }
  }
};

// Load part `part` (0 q, 1 k, 2 v) of the block's tokens: rows (nb x dp) and/or transposed
// (d x kBlock); normalize when norms != nullptr.
template <typename scalar_t, typename acc_t>
void load_tokens(const StripeArgs<scalar_t, acc_t>& A, const TokenBlock<scalar_t, acc_t>& T, int64_t b, int64_t h,
                 int part, acc_t* rows, acc_t* cols, acc_t* norms) {
  const int64_t d = A.d, dp = pad16(d);
  acc_t tmp[kMaxStackD];
  const scalar_t* base = A.qkv + b * A.vq.sb + (part * A.C + h * d) * A.vq.sc;
  // Token rows are scattered (a window row jumps to the next image row, and qkv rows are 3C
  // or more apart): the hardware prefetcher misses them, so prefetch kPrefetch tokens ahead.
  for (int64_t jj = 0; jj < std::min(kPrefetch, T.nb); ++jj) prefetch_row(base + T.pos[jj] * A.vq.sl, d, A.vq.sc);
  for (int64_t jj = 0; jj < T.nb; ++jj) {
    if (jj + kPrefetch < T.nb) prefetch_row(base + T.pos[jj + kPrefetch] * A.vq.sl, d, A.vq.sc);
    const scalar_t* src = base + T.pos[jj] * A.vq.sl;
    acc_t* r = rows ? rows + jj * dp : tmp;
    load_row(src, A.vq.sc, d, r);
    if (norms) norms[jj] = normalize_inplace(r, d);
    if (cols)
      for (int64_t c = 0; c < d; ++c) cols[c * kBlock + jj] = r[c];
  }
}

// Stage-1 logits into S (n2 x kBlock, cosines in, logits out) for a token block.
template <typename acc_t>
inline void stage1_logits(const StripeGeom& g, acc_t tau, const acc_t* bias, const std::vector<int64_t>& abase,
                          const std::vector<int>& aid, const int64_t* toff, const int* tid, int64_t nb, int64_t i,
                          acc_t* row) {
  const acc_t* brow = bias + abase[i];
  const int a = aid[i];
  for (int64_t jj = 0; jj < nb; ++jj) {
    acc_t v = tau * row[jj] + brow[-toff[jj]];
    if (g.shifted) v += (a != tid[jj]) ? acc_t(kMaskValue) : acc_t(0);
    row[jj] = v;
  }
}

// Stage-2 probabilities of token row jj (n2 entries, exact softmax) from its cosines.
template <typename acc_t>
inline void stage2_probs(const StripeGeom& g, acc_t tau, const acc_t* bias, const std::vector<int64_t>& aoff,
                         const std::vector<int>& aid, int64_t tbase, int tid, int64_t n2, const acc_t* cs, acc_t* P) {
  const acc_t* brow = bias + tbase;
  for (int64_t i = 0; i < n2; ++i) {
    acc_t v = tau * cs[i] + brow[-aoff[i]];
    if (g.shifted) v += (aid[i] != tid) ? acc_t(kMaskValue) : acc_t(0);
    P[i] = v;
  }
  const acc_t sum = exp_shift_sum(P, n2, row_max(P, n2));
  const acc_t inv = acc_t(1) / sum;
  for (int64_t i = 0; i < n2; ++i) P[i] *= inv;
}

template <typename scalar_t, typename acc_t>
void stripe_forward_task(const StripeArgs<scalar_t, acc_t>& A, int64_t task, scalar_t* out, acc_t* zsave,
                         acc_t* lsesave) {
  const StripeGeom& g = A.g;
  const int64_t d = A.d, dp = pad16(d), n1 = g.n1, n2 = g.n2;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const acc_t tau1 = A.tau1[h], tau2 = A.tau2[h];
  const acc_t* bias1 = A.bias1 + h * g.table_rows;
  const acc_t* bias2 = A.bias2 + h * g.table_rows;
  AnchorTile<scalar_t, acc_t> AT(A, b, win, h);
  TokenBlock<scalar_t, acc_t> TB;
  std::vector<acc_t> kT(d * kBlock), vb(kBlock * dp, acc_t(0)), qb(kBlock * dp, acc_t(0)), S(n2 * kBlock),
      S2(kBlock * n2), Z(n2 * dp, acc_t(0)), Yb(kBlock * dp), xn(kBlock), m(n2, neg_inf<acc_t>()), l(n2, acc_t(0));

  // ---- stage 1: anchors attend to the window; online softmax over token blocks
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    load_tokens(A, TB, b, h, 1, static_cast<acc_t*>(nullptr), kT.data(), xn.data());  // k_hat columns
    load_tokens(A, TB, b, h, 2, vb.data(), static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
    gemm<acc_t>(n2, nb, d, acc_t(1), AT.ahat.data(), dp, 1, kT.data(), kBlock, S.data(), kBlock, false);  // cos
    for (int64_t i = 0; i < n2; ++i) {
      acc_t* row = S.data() + i * kBlock;
      stage1_logits(g, tau1, bias1, AT.abase, AT.aid, TB.toff.data(), TB.tid.data(), nb, i, row);
      const acc_t bm = row_max(row, nb);
      const acc_t mx = bm > m[i] ? bm : m[i];
      const acc_t corr = exp_fast(m[i] - mx);  // 0 on the first block (m = -inf)
      const acc_t sum = exp_shift_sum(row, nb, mx);
      l[i] = l[i] * corr + sum;
      m[i] = mx;
      acc_t* zr = Z.data() + i * dp;
      for (int64_t c = 0; c < dp; ++c) zr[c] *= corr;
    }
    gemm<acc_t>(n2, dp, nb, acc_t(1), S.data(), kBlock, 1, vb.data(), dp, Z.data(), dp, true);  // Z += P v
  }
  acc_t* zs = zsave + task * n2 * d;
  acc_t* lse = lsesave + task * n2;
  for (int64_t i = 0; i < n2; ++i) {
    const acc_t inv = acc_t(1) / l[i];
    for (int64_t c = 0; c < dp; ++c) Z[i * dp + c] *= inv;
    for (int64_t c = 0; c < d; ++c) zs[i * d + c] = Z[i * dp + c];
    lse[i] = m[i] + std::log(l[i]);
  }

  // ---- stage 2: tokens attend to the anchors (rows of n2 entries, exact softmax)
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    load_tokens(A, TB, b, h, 0, qb.data(), static_cast<acc_t*>(nullptr), xn.data());  // q_hat rows
    for (int64_t jj = 0; jj < nb; ++jj) prefetch_row_for_write(out + (b * g.H * g.W + TB.pos[jj]) * A.C + h * d, d);
    gemm<acc_t>(nb, n2, d, acc_t(1), qb.data(), dp, 1, AT.aT.data(), n2, S2.data(), n2, false);  // cos
    for (int64_t jj = 0; jj < nb; ++jj) {
      acc_t* row = S2.data() + jj * n2;
      stage2_probs(g, tau2, bias2, AT.aoff, AT.aid, TB.tbase[jj], TB.tid[jj], n2, row, row);
    }
    gemm<acc_t>(nb, dp, n2, acc_t(1), S2.data(), n2, 1, Z.data(), dp, Yb.data(), dp, false);  // Y = P Z
    for (int64_t jj = 0; jj < nb; ++jj) {
      scalar_t* op = out + (b * g.H * g.W + TB.pos[jj]) * A.C + h * d;
      for (int64_t c = 0; c < d; ++c) op[c] = static_cast<scalar_t>(Yb[jj * dp + c]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void stripe_backward_task(const StripeArgs<scalar_t, acc_t>& A, int64_t task, const scalar_t* gout,
                          const acc_t* zsave, const acc_t* lsesave, scalar_t* gqkv, scalar_t* ganc,
                          acc_t* dtau1, acc_t* dbias1, acc_t* dtau2, acc_t* dbias2) {
  const StripeGeom& g = A.g;
  const int64_t d = A.d, dp = pad16(d), n1 = g.n1, n2 = g.n2, C = A.C, L = g.H * g.W;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const acc_t tau1 = A.tau1[h], tau2 = A.tau2[h];
  const acc_t* bias1 = A.bias1 + h * g.table_rows;
  const acc_t* bias2 = A.bias2 + h * g.table_rows;
  acc_t* db1 = dbias1 + h * g.table_rows;
  acc_t* db2 = dbias2 + h * g.table_rows;
  AnchorTile<scalar_t, acc_t> AT(A, b, win, h);
  TokenBlock<scalar_t, acc_t> TB;
  std::vector<acc_t> ZT(d * n2), Zp(n2 * dp, acc_t(0)), dZ(n2 * dp, acc_t(0)), dA(n2 * dp, acc_t(0)), D1(n2),
      xb(kBlock * dp, acc_t(0)), xn(kBlock), dYb(kBlock * dp, acc_t(0)), dXb(kBlock * dp), dVb(kBlock * dp),
      kT(d * kBlock), vT(d * kBlock), cs(std::max(kBlock * n2, n2 * kBlock)), P(n2 * kBlock), dP(n2 * kBlock);
  const acc_t* Z = zsave + task * n2 * d;
  const acc_t* lse = lsesave + task * n2;
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t c = 0; c < d; ++c) ZT[c * n2 + i] = Zp[i * dp + c] = Z[i * d + c];
  double dt1 = 0, dt2 = 0;  // long sums with cancellation: rows in acc_t, totals in double

  // ---- pass A: stage 2 backward per token block (rows of n2 entries)
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    load_tokens(A, TB, b, h, 0, xb.data(), static_cast<acc_t*>(nullptr), xn.data());  // q_hat rows
    const scalar_t* gbase = gout + b * L * C + h * d;
    for (int64_t jj = 0; jj < std::min(kPrefetch, nb); ++jj) prefetch_row(gbase + TB.pos[jj] * C, d, 1);
    for (int64_t jj = 0; jj < nb; ++jj) {
      if (jj + kPrefetch < nb) prefetch_row(gbase + TB.pos[jj + kPrefetch] * C, d, 1);
      load_row(gbase + TB.pos[jj] * C, 1, d, dYb.data() + jj * dp);
      prefetch_row_for_write(gqkv + (b * L + TB.pos[jj]) * 3 * C + h * d, d);
    }
    gemm<acc_t>(nb, n2, d, acc_t(1), xb.data(), dp, 1, AT.aT.data(), n2, cs.data(), n2, false);   // cos
    gemm<acc_t>(nb, n2, d, acc_t(1), dYb.data(), dp, 1, ZT.data(), n2, dP.data(), n2, false);     // dP = dY Z^T
    for (int64_t jj = 0; jj < nb; ++jj) {
      const acc_t* cr = cs.data() + jj * n2;
      acc_t* pr = P.data() + jj * n2;
      acc_t* dr = dP.data() + jj * n2;
      stage2_probs(g, tau2, bias2, AT.aoff, AT.aid, TB.tbase[jj], TB.tid[jj], n2, cr, pr);
      const acc_t D = row_dot(pr, dr, n2);
      for (int64_t i = 0; i < n2; ++i) dr[i] = pr[i] * (dr[i] - D);  // dS
      dt2 += row_dot(dr, cr, n2);
      acc_t* brow = db2 + TB.tbase[jj];
      for (int64_t i = 0; i < n2; ++i) brow[-AT.aoff[i]] += dr[i];
    }
    gemm<acc_t>(n2, dp, nb, acc_t(1), P.data(), 1, n2, dYb.data(), dp, dZ.data(), dp, true);   // dZ += P^T dY
    gemm<acc_t>(n2, dp, nb, tau2, dP.data(), 1, n2, xb.data(), dp, dA.data(), dp, true);       // da_hat += tau dS^T q_hat
    gemm<acc_t>(nb, dp, n2, tau2, dP.data(), n2, 1, AT.ahat.data(), dp, dXb.data(), dp, false); // dq_hat = tau dS a_hat
    for (int64_t jj = 0; jj < nb; ++jj) {
      acc_t* dq = dXb.data() + jj * dp;
      normalize_backward_inplace(dq, xb.data() + jj * dp, xn[jj], d);
      scalar_t* gq = gqkv + (b * L + TB.pos[jj]) * 3 * C + h * d;
      for (int64_t c = 0; c < d; ++c) gq[c] = static_cast<scalar_t>(dq[c]);
    }
  }

  // ---- pass B: stage 1 backward per token block (probabilities from the saved lse)
  for (int64_t i = 0; i < n2; ++i) {
    acc_t acc = 0;
    for (int64_t c = 0; c < d; ++c) acc += dZ[i * dp + c] * Zp[i * dp + c];
    D1[i] = acc;
  }
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    load_tokens(A, TB, b, h, 1, xb.data(), kT.data(), xn.data());  // k_hat rows and columns
    load_tokens(A, TB, b, h, 2, static_cast<acc_t*>(nullptr), vT.data(), static_cast<acc_t*>(nullptr));
    for (int64_t jj = 0; jj < nb; ++jj) {
      scalar_t* gk = gqkv + (b * L + TB.pos[jj]) * 3 * C + C + h * d;
      prefetch_row_for_write(gk, d);
      prefetch_row_for_write(gk + C, d);
    }
    gemm<acc_t>(n2, nb, d, acc_t(1), AT.ahat.data(), dp, 1, kT.data(), kBlock, cs.data(), kBlock, false);  // cos
    gemm<acc_t>(n2, nb, d, acc_t(1), dZ.data(), dp, 1, vT.data(), kBlock, dP.data(), kBlock, false);       // dZ v^T
    for (int64_t i = 0; i < n2; ++i) {
      const acc_t* cr = cs.data() + i * kBlock;
      acc_t* pr = P.data() + i * kBlock;
      acc_t* dr = dP.data() + i * kBlock;
      for (int64_t jj = 0; jj < nb; ++jj) pr[jj] = cr[jj];
      stage1_logits(g, tau1, bias1, AT.abase, AT.aid, TB.toff.data(), TB.tid.data(), nb, i, pr);
      const acc_t li = lse[i], Di = D1[i];
      for (int64_t jj = 0; jj < nb; ++jj) pr[jj] = exp_fast(pr[jj] - li);
      for (int64_t jj = 0; jj < nb; ++jj) dr[jj] = pr[jj] * (dr[jj] - Di);  // dS
      dt1 += row_dot(dr, cr, nb);
      acc_t* bw = db1 + AT.abase[i];
      for (int64_t jj = 0; jj < nb; ++jj) bw[-TB.toff[jj]] += dr[jj];
    }
    gemm<acc_t>(nb, dp, n2, acc_t(1), P.data(), 1, kBlock, dZ.data(), dp, dVb.data(), dp, false);     // dv = P^T dZ
    gemm<acc_t>(nb, dp, n2, tau1, dP.data(), 1, kBlock, AT.ahat.data(), dp, dXb.data(), dp, false);  // dk_hat
    gemm<acc_t>(n2, dp, nb, tau1, dP.data(), kBlock, 1, xb.data(), dp, dA.data(), dp, true);         // da_hat
    for (int64_t jj = 0; jj < nb; ++jj) {
      acc_t* dk = dXb.data() + jj * dp;
      normalize_backward_inplace(dk, xb.data() + jj * dp, xn[jj], d);
      scalar_t* gk = gqkv + (b * L + TB.pos[jj]) * 3 * C + C + h * d;
      scalar_t* gv = gk + C;
      for (int64_t c = 0; c < d; ++c) {
        gk[c] = static_cast<scalar_t>(dk[c]);
        gv[c] = static_cast<scalar_t>(dVb[jj * dp + c]);
      }
    }
  }
  // ---- anchors: both stages contributed to dA (gradient w.r.t. a_hat)
  for (int64_t i = 0; i < n2; ++i) {
    acc_t* dar = dA.data() + i * dp;
    normalize_backward_inplace(dar, AT.ahat.data() + i * dp, AT.anorm[i], d);
    const int64_t p = stripe_anchor_position(g, win, i);
    scalar_t* ga = ganc + (b * g.Ha * g.Wa + p) * C + h * d;
    for (int64_t c = 0; c < d; ++c) ga[c] = static_cast<scalar_t>(dar[c]);
  }
  dtau1[h] += static_cast<acc_t>(dt1);
  dtau2[h] += static_cast<acc_t>(dt2);
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
  // clones: the returns must not alias each other (torch custom-op contract)
  return {gqkv, ganc, dt_sum[0].clone(), db_sum[0].clone(), dt_sum[1].clone(), db_sum[1].clone()};
}

}  // namespace cpu
}  // namespace grl
