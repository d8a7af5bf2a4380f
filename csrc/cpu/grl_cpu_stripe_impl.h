// grl_cpu_stripe_impl.h -- task code of the anchored stripe attention, compiled once per ISA
// (included by grl_cpu_stripe.cpp inside `#pragma GCC target` regions; no include guard).
//
// Per window and head, with x_hat = x / max(||x||, 1e-12):
//   stage 1  Z = softmax_j(tau1 a_hat_i . k_hat_j + B1[a2w(i,j)] + M1) v     (anchors -> tokens)
//   stage 2  Y = softmax_i(tau2 q_hat_j . a_hat_i + B2[w2a(j,i)] + M2) Z     (tokens -> anchors)
// Forward: the window's token rows are gathered block by block (64 tokens) into contiguous
// per-thread tiles in the product type T (float32, float64, or bfloat16 for vdpbf16ps):
// k^T and v as B operands, q as A; the anchors once per task (a as A, a^T as B), all RAW (bfloat16 inputs stay exact in the tiles): the dot products are scaled by the
// float32 inverse norms afterwards, so cosines carry float32 accuracy. Stage 1 streams blocks with an online softmax and saves Z (N2 x d) and the rows'
// (max, 1 / sum); stage 2 rows (N2 entries) are complete and use an exact softmax. Logits,
// softmax statistics and every accumulation are float32 (float64 for float64 inputs); stage
// 1's P v stays on float32 tiles (see below).
// Backward: recomputes probabilities (pass A: stage 2, giving dq, dZ and part of d a_hat; pass
// B: stage 1 from the saved (m, 1/l), giving dk, dv and the rest of d a_hat). Pass B recomputes
// the stage-1 logits exactly as the forward did and takes D1 = sum_j P dP from a first sweep over
// the blocks (kept in per-thread scratch when the window is small enough, kStage1CacheFloats), so
// that the cancelling gradients (logit scale, anchors at tau ~100) stay within 2x of the
// reference's float32 error. Float32 / float64 inputs: GEMM 1's float tiles. bfloat16 inputs on
// AVX512-BF16: stripe_backward_task_bf16, the logits and the dq, dk, d a_hat products on bf16
// tiles (tau-scaled dS rounded), dP, dZ and dv on float32 zmm tiles.

#include "grl_cpu_kernels.h"

namespace grl {
namespace cpu {
namespace GRL_ISA {
namespace {

// Per-task scratch shared by the stripe forward and backward: normalized anchors a_hat
// (n2 x dp, zero-padded rows) and a_hat^T (d x n2), their norms and region ids, and the
// bias-row offsets: a2w row = abase[i] - toff[j], w2a row = tbase[j] - aoff[i].
template <typename scalar_t, typename acc_t>
struct AnchorTile {
  int64_t n2, d, dp;
  std::vector<acc_t> ahat, aT, anorm;
  std::vector<int> aid;
  std::vector<int64_t> abase, aoff;
  std::vector<int32_t> aoff32;  // aoff as gather indices
  // raw: keep the rows unnormalized (the forward; anorm then holds 1 / max(||a||, eps)).
  AnchorTile(const StripeArgs<scalar_t, acc_t>& A, int64_t b, int64_t win, int64_t h, bool transposed, bool raw)
      : n2(A.g.n2), d(A.d), dp(pad16(A.d)), ahat(n2 * dp, acc_t(0)), aT(transposed ? d * n2 : 0), anorm(n2),
        aid(n2), abase(n2), aoff(n2), aoff32(n2) {
    const StripeGeom& g = A.g;
    for (int64_t i = 0; i < n2; ++i) {
      const int64_t p = stripe_anchor_position(g, win, i);
      const scalar_t* src = A.anc + b * A.asb + (p / g.Wa) * A.ash + (p % g.Wa) * A.asw + h * d * A.asc;
      acc_t* dst = ahat.data() + i * dp;
      load_row(src, A.asc, d, dst);
      anorm[i] = raw ? inv_norm(dst, d) : normalize_inplace(dst, d);
      if (transposed)
        for (int64_t c = 0; c < d; ++c) aT[c * n2 + i] = dst[c];
      aid[i] = g.shifted ? stripe_anchor_region(g, win, i) : 0;
      const int64_t u = i / g.aw, v = i % g.aw;
      abase[i] = (u + g.sh - 1) * g.table_w + (v + g.sw - 1);
      aoff[i] = u * g.table_w + v;
      aoff32[i] = static_cast<int32_t>(aoff[i]);
    }
  }
};

// A block of up to kBlock consecutive tokens of a window: positions, bias offsets, region
// ids, and the runs of consecutive columns of one window row (one contiguous run of the
// reversed stage-1 bias table each).
struct TokenBlock {
  int64_t nb = 0, nruns = 0;
  std::vector<int64_t> pos, toff, tbase;
  std::vector<int32_t> toff32;  // toff as gather indices
  std::vector<int> tid;
  std::vector<BiasRun> runs;
  TokenBlock() : pos(kBlock), toff(kBlock), tbase(kBlock), toff32(kBlock), tid(kBlock), runs(kBlock) {}
  // Walks the block row by row on the rolled grid (one division per block, none per token).
  void index(const StripeGeom& g, int64_t win, int64_t jb) {
    nb = std::min(kBlock, g.n1 - jb);
    nruns = 0;
    const int64_t r0 = win / g.windows_w * g.sh, c0 = win % g.windows_w * g.sw;
    int64_t y = jb / g.sw, x = jb % g.sw;
    for (int64_t jj = 0; jj < nb; ++jj) {
      pos[jj] = stripe_token_position_rc(g, r0 + y, c0 + x);
      toff[jj] = y * g.table_w + x;
      toff32[jj] = static_cast<int32_t>(toff[jj]);
      tbase[jj] = (y + g.ah - 1) * g.table_w + (x + g.aw - 1);
      tid[jj] = g.shifted ? stripe_token_region_rc(g, r0 + y, c0 + x) : 0;
      if (jj == 0 || x == 0) runs[nruns++] = BiasRun{jj, 0, toff[jj]};
      ++runs[nruns - 1].len;
      if (++x == g.sw) x = 0, ++y;
    }
  }
};

#if GRL_ISA_LEVEL >= 2
// 16 entries of a reversed bias-table row (base) for the 16 tokens idx[0..15] of a block: one load
// when they are consecutive entries (window rows of 16 or more tokens: a 16-aligned vector of the
// block never crosses a row), else a gather.
static GRL_INLINE __m512 stage1_bias16(const float* base, const int32_t* idx, bool runs) {
  return runs ? _mm512_loadu_ps(base + idx[0]) : _mm512_i32gather_ps(_mm512_loadu_si512(idx), base, 4);
}
#endif

// Stage-1 logits of anchor row i over a token block, in place (cosines in, logits out):
// tau1 * cos + B1[abase_i - toff_j] + mask, the bias read as contiguous runs of the
// reversed table rb1.
// With colscale (the forward's raw dot products): tau * colscale[j] * dot instead.
template <typename acc_t>
GRL_INLINE void stage1_logits(const StripeGeom& g, acc_t tau, const acc_t* rb1, int64_t abase_i, int aid_i,
                              const TokenBlock& T, acc_t* row, const acc_t* colscale = nullptr) {
  const acc_t* base = rb1 + (g.table_rows - 1 - abase_i);
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<acc_t, float>::value) {
    if (g.sw % 16) {  // runs of fewer than 16 tokens: gather the row's bias in one sweep
      bias_gather(row, colscale, base, T.toff32.data(), tau, T.nb);
      if (g.shifted) add_region_mask(row, T.tid.data(), aid_i, T.nb);
      return;
    }
  }
#endif
  for (int64_t r = 0; r < T.nruns; ++r) {
    const BiasRun run = T.runs[r];
    bias_run(row + run.j0, colscale ? colscale + run.j0 : nullptr, base + run.off, tau, run.len);
  }
  if (g.shifted) add_region_mask(row, T.tid.data(), aid_i, T.nb);
}

// Stage-2 logits of token row j over the anchors, in place: tau2 * cos + B2[tbase_j - aoff_i]
// + mask; anchors of one anchor row (aw of them) read one run of the reversed table rb2.
template <typename acc_t>
GRL_INLINE void stage2_logits(const StripeGeom& g, acc_t tau, const acc_t* rb2, int64_t tbase_j, int tid_j,
                              const int* aid, const int32_t* aoff32, acc_t* row, const acc_t* colscale = nullptr) {
  const acc_t* base = rb2 + (g.table_rows - 1 - tbase_j);
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<acc_t, float>::value) {
    if (g.aw % 16) {  // anchor rows of fewer than 16: gather the row's bias in one sweep
      bias_gather(row, colscale, base, aoff32, tau, g.n2);
      if (g.shifted) add_region_mask(row, aid, tid_j, g.n2);
      return;
    }
  }
#else
  (void)aoff32;
#endif
  for (int64_t u = 0; u < g.ah; ++u)
    bias_run(row + u * g.aw, colscale ? colscale + u * g.aw : nullptr, base + u * g.table_w, tau, g.aw);
  if (g.shifted) add_region_mask(row, aid, tid_j, g.n2);
}

// Stage-2 probabilities in place (exact softmax over the n2 anchors).
template <typename acc_t>
GRL_INLINE void softmax_inplace(acc_t* row, int64_t n) {
  const acc_t sum = exp_shift_sum(row, n, row_max(row, n));
  const acc_t inv = acc_t(1) / sum;
  for (int64_t i = 0; i < n; ++i) row[i] *= inv;
}

// Token rows of part `part` (0 q, 1 k, 2 v) of a block, read in place from qkv (prefetched
// kPrefetch tokens ahead: window rows are scattered over the image and qkv rows are 3C or
// more apart, which the hardware prefetcher does not follow), converted to acc_t and
// handed to emit(jj, row) (normalized first when norms != nullptr; rows already in acc_t
// with channel stride 1 and no norms are handed over in place).
template <typename scalar_t, typename acc_t, typename Emit>
GRL_INLINE void gather_tokens(const StripeArgs<scalar_t, acc_t>& A, const TokenBlock& T, int64_t b, int64_t h,
                              int part, acc_t* norms, const Emit& emit) {
  const int64_t d = A.d;
  acc_t tmp[kMaxStackD];
  const scalar_t* base = A.qkv + b * A.vq.sb + (part * A.C + h * d) * A.vq.sc;
  for (int64_t jj = 0; jj < std::min(kPrefetch, T.nb); ++jj) prefetch_row(base + T.pos[jj] * A.vq.sl, d, A.vq.sc);
  for (int64_t jj = 0; jj < T.nb; ++jj) {
    if (jj + kPrefetch < T.nb) prefetch_row(base + T.pos[jj + kPrefetch] * A.vq.sl, d, A.vq.sc);
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      if (!norms && A.vq.sc == 1) {  // float rows read in place: no copy through tmp
        emit(jj, static_cast<const acc_t*>(base + T.pos[jj] * A.vq.sl));
        continue;
      }
    }
    load_row(base + T.pos[jj] * A.vq.sl, A.vq.sc, d, tmp);
    if (norms) norms[jj] = normalize_inplace(tmp, d);
    emit(jj, static_cast<const acc_t*>(tmp));
  }
}

// Old-layout loader of the backward: rows (nb x dp) and/or transposed (d x kBlock).
template <typename scalar_t, typename acc_t>
GRL_INLINE void load_tokens(const StripeArgs<scalar_t, acc_t>& A, const TokenBlock& T, int64_t b, int64_t h, int part,
                            acc_t* rows, acc_t* cols, acc_t* norms) {
  const int64_t d = A.d, dp = pad16(d);
  gather_tokens(A, T, b, h, part, norms, [&](int64_t jj, const acc_t* r) {
    if (rows)
      for (int64_t c = 0; c < d; ++c) rows[jj * dp + c] = r[c];
    if (cols)
      for (int64_t c = 0; c < d; ++c) cols[c * kBlock + jj] = r[c];
  });
}

template <typename scalar_t, typename acc_t>
void stripe_forward_task(const StripeArgs<scalar_t, acc_t>& A, int64_t task, scalar_t* out, acc_t* zsave,
                         acc_t* stat1save) {
  using T = typename OpType<scalar_t, acc_t>::T;  // product type of the tiles
  using Lay = OpLayout<T>;
  constexpr bool kInPlace = std::is_same<T, acc_t>::value;  // probabilities stay in the logit buffer
  const StripeGeom& g = A.g;
  const int64_t d = A.d, dp = pad16(d), dk = kpad<T>(d), n1 = g.n1, n2 = g.n2, n2p = pad16(n2), n2k = kpad<T>(n2);
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const acc_t tau1 = A.tau1[h], tau2 = A.tau2[h];
  const acc_t* rb1 = A.rbias1 + h * g.table_rows;
  const acc_t* rb2 = A.rbias2 + h * g.table_rows;
  AnchorTile<scalar_t, acc_t> AT(A, b, win, h, false, true);  // raw anchors, anorm = 1 / |a|
  TokenBlock TB;
  // operand tiles (zero padding where K or N is rounded up)
  // Stage 1's P v runs on float32 tiles on every path: Z is saved for the backward, whose
  // recomputed float32 probabilities must match it (bf16-rounded P would bias the
  // gradients of tau1 through D = dZ . Z); its logits are exact on bf16 tiles (raw rows).
  std::vector<T> aA(n2 * dk, T(0)), aB(dk * n2p, T(0)), kB(dk * kBlock, T(0)), zB(n2k * dp, T(0)),
      qA(kBlock * dk, T(0)), P2(kInPlace ? 0 : kBlock * n2k, T(0));
  std::vector<acc_t> vB(kBlock * dp, acc_t(0)), S(n2 * kBlock), S2(kBlock * n2p), Z(n2 * dp, acc_t(0)), Yb(kBlock * dp), m(n2, neg_inf<acc_t>()),
      l(n2, acc_t(0)), xn(kBlock);
  T kt[kMaxStackD];
  // bfloat16 inputs on bf16 tiles with channel stride 1: token rows copied raw (kT: k token-major)
  constexpr bool kBf16Tiles = std::is_same<T, uint16_t>::value && std::is_same<scalar_t, c10::BFloat16>::value;
  const bool raw_bf16 = kBf16Tiles && A.vq.sc == 1;
  std::vector<T> kT(raw_bf16 ? kBlock * dk : 0, T(0));
  const uint16_t* qkv16 = reinterpret_cast<const uint16_t*>(A.qkv) + b * A.vq.sb + h * d;
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t c = 0; c < d; ++c) {
      const T v = Lay::from(AT.ahat[i * dp + c]);
      aA[i * dk + c] = v;
      aB[Lay::bidx(c, i, n2p)] = v;
    }
  std::vector<acc_t> sc1(n2), zcorr(n2);  // tau1 / |a_i|; the online step's rescale of Z row i
  for (int64_t i = 0; i < n2; ++i) sc1[i] = tau1 * AT.anorm[i];

  // ---- stage 1: anchors attend to the window; online softmax over token blocks
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    bool raw_done = false;
#if GRL_ISA_LEVEL >= 2
    if constexpr (kBf16Tiles) {
      if (raw_bf16) {  // raw rows token-major, then into the B layout; 1 / |k| from sums of squares
        gather_bf16_rows(qkv16 + A.C, TB.pos.data(), nb, A.vq.sl, d, kT.data(), dk, xn.data());
        inv_norms_from_sumsq(xn.data(), nb);
        bf16_rows_to_kn_pairs(kT.data(), nb, dk, dk, kB.data(), kBlock);
        raw_done = true;
      }
    }
#endif
    if (!raw_done) {
      SumSqRows<acc_t> ss(xn.data());  // raw k in the tile, 1 / |k| applied to the dot products
      gather_tokens(A, TB, b, h, 1, static_cast<acc_t*>(nullptr), [&](int64_t jj, const acc_t* r) {
        ss.push_row(r, d);
        to_tile_row(r, kt, d);
        for (int64_t c = 0; c < d; ++c) kB[Lay::bidx(c, jj, kBlock)] = kt[c];
      });
      ss.finish();
      inv_norms_of_sumsq(xn.data(), nb);
    }
    gather_tokens(A, TB, b, h, 2, static_cast<acc_t*>(nullptr), [&](int64_t jj, const acc_t* r) {
      for (int64_t c = 0; c < d; ++c) vB[jj * dp + c] = r[c];
    });
    gemm_op<T, acc_t>(n2, pad16(nb), d, aA.data(), dk, kB.data(), kBlock, S.data(), kBlock, false);  // cos
    bool fused = false;
#if GRL_ISA_LEVEL >= 2
    if constexpr (std::is_same<acc_t, float>::value) {
      // blocks of 16, 32, 48 or 64 tokens: logits and the online step in registers, rows interleaved
      if (nb % 16 == 0) {
        const float* base0 = rb1 + (g.table_rows - 1);
        const int64_t* ab = AT.abase.data();
        const int32_t* to = TB.toff32.data();
        const bool runs = g.sw % 16 == 0;  // stage1_logits' bias runs
        auto bias = [=](int64_t r, int v) { return stage1_bias16(base0 - ab[r], to + 16 * v, runs); };
        float* rows = S.data();
        online_block_regs_nv(static_cast<int>(nb / 16), bias, rows, kBlock, n2, TB.tid.data(), AT.aid.data(), g.shifted,
                             sc1.data(), xn.data(), rows, kBlock, m.data(), l.data(), zcorr.data());
        for (int64_t i = 0; i < n2; ++i) {
          acc_t* zr = Z.data() + i * dp;
          for (int64_t c = 0; c < dp; ++c) zr[c] *= zcorr[i];
        }
        fused = true;
      }
    }
#endif
    for (int64_t i = 0; i < n2 && !fused; ++i) {
      acc_t* row = S.data() + i * kBlock;
      stage1_logits(g, tau1 * AT.anorm[i], rb1, AT.abase[i], AT.aid[i], TB, row, xn.data());
      const acc_t bm = row_max(row, nb);
      const acc_t mx = bm > m[i] ? bm : m[i];
      const acc_t corr = exp_fast(m[i] - mx);  // 0 on the first block (m = -inf)
      const acc_t sum = exp_shift_sum(row, nb, mx);
      l[i] = l[i] * corr + sum;
      m[i] = mx;
      acc_t* zr = Z.data() + i * dp;
      for (int64_t c = 0; c < dp; ++c) zr[c] *= corr;
    }
    gemm_op<acc_t, acc_t>(n2, dp, nb, S.data(), kBlock, vB.data(), dp, Z.data(), dp, true);  // Z += P v
  }
  acc_t* zs = zsave + task * n2 * d;
  acc_t* st = stat1save + task * n2 * 2;  // the rows' (m, 1/l): the backward's P = exp(s - m) / l
  for (int64_t i = 0; i < n2; ++i) {
    const acc_t inv = acc_t(1) / l[i];
    st[2 * i] = m[i];
    st[2 * i + 1] = inv;
    for (int64_t c = 0; c < d; ++c) {
      const acc_t z = Z[i * dp + c] * inv;
      zs[i * d + c] = z;
      zB[Lay::bidx(i, c, dp)] = Lay::from(z);
    }
  }

  // ---- stage 2: tokens attend to the anchors (rows of n2 entries, exact softmax)
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    bool raw_done = false;
#if GRL_ISA_LEVEL >= 2
    if constexpr (kBf16Tiles) {
      if (raw_bf16) {
        gather_bf16_rows(qkv16, TB.pos.data(), nb, A.vq.sl, d, qA.data(), dk, xn.data());
        inv_norms_from_sumsq(xn.data(), nb);
        raw_done = true;
      }
    }
#endif
    if (!raw_done) {
      SumSqRows<acc_t> ss(xn.data());
      gather_tokens(A, TB, b, h, 0, static_cast<acc_t*>(nullptr), [&](int64_t jj, const acc_t* r) {
        ss.push_row(r, d);
        to_tile_row(r, qA.data() + jj * dk, d);
      });
      ss.finish();
      inv_norms_of_sumsq(xn.data(), nb);
    }
    for (int64_t jj = 0; jj < nb; ++jj) prefetch_row_for_write(out + (b * g.H * g.W + TB.pos[jj]) * A.C + h * d, d);
    gemm_op<T, acc_t>(nb, n2p, d, qA.data(), dk, aB.data(), n2p, S2.data(), n2p, false);  // cos
    bool fused = false;
#if GRL_ISA_LEVEL >= 2
    if constexpr (std::is_same<acc_t, float>::value) {
      // rows of 16, 32, 48 or 64 anchors: logits and softmax in registers, rows interleaved
      if (n2 % 16 == 0 && n2 <= 64) {
        float sc[kBlock];
        for (int64_t jj = 0; jj < nb; ++jj) sc[jj] = tau2 * xn[jj];
        T* pr = kInPlace ? reinterpret_cast<T*>(S2.data()) : P2.data();
        const int64_t ldo = kInPlace ? n2p : n2k;
        const float* base0 = rb2 + (g.table_rows - 1);
        const int64_t* tb = TB.tbase.data();
        const int64_t aw = g.aw, tw = g.table_w;
        const int32_t* ao = AT.aoff32.data();
        // stage2_logits' bias: anchor rows of 16 or more as contiguous runs, shorter ones gathered
        auto run_bias = [=](int64_t r, int v) {
          return _mm512_loadu_ps(base0 - tb[r] + (16 * v / aw) * tw + (16 * v) % aw);
        };
        auto gather_bias = [=](int64_t r, int v) {
          return _mm512_i32gather_ps(_mm512_loadu_si512(ao + 16 * v), base0 - tb[r], 4);
        };
        const float* dots = S2.data();
        const int* kid = AT.aid.data();
        const int* rid = TB.tid.data();
        const bool msk = g.shifted;
        const float* cs = AT.anorm.data();
        const int nv = static_cast<int>(n2 / 16);
        if (aw % 16 == 0) softmax_block_regs_nv(nv, run_bias, dots, n2p, nb, kid, rid, msk, sc, cs, pr, ldo);
        else softmax_block_regs_nv(nv, gather_bias, dots, n2p, nb, kid, rid, msk, sc, cs, pr, ldo);
        fused = true;
      }
    }
#endif
    if (!fused) {
      for (int64_t jj = 0; jj < nb; ++jj) {
        acc_t* row = S2.data() + jj * n2p;
        stage2_logits(g, tau2 * xn[jj], rb2, TB.tbase[jj], TB.tid[jj], AT.aid.data(), AT.aoff32.data(), row, AT.anorm.data());
        T* pr = kInPlace ? reinterpret_cast<T*>(row) : P2.data() + jj * n2k;
        softmax_to(row, n2, pr, [](acc_t x) { return Lay::from(x); });
      }
    }
    const T* P2m = kInPlace ? reinterpret_cast<const T*>(S2.data()) : P2.data();
    gemm_op<T, acc_t>(nb, dp, n2, P2m, kInPlace ? n2p : n2k, zB.data(), dp, Yb.data(), dp, false);  // Y = P Z
    for (int64_t jj = 0; jj < nb; ++jj)
      store_row(out + (b * g.H * g.W + TB.pos[jj]) * A.C + h * d, Yb.data() + jj * dp, d);
  }
}

// ---- backward helpers shared by the float-tile and the bf16-tile task

// One token row of the stage-2 softmax backward: dP -> dS = P (dP - D) in place, D = sum_i P dP
// from the same P and dP; returns sum_i dS cos (the row's tau2 term); adds dS into the row's
// bias-gradient entries of rdb2 (REVERSED: the row starts at R - 1 - tbase, anchor i at + aoff[i]).
template <typename acc_t>
GRL_INLINE acc_t stage2_row_backward(const StripeGeom& g, int64_t tbase, const acc_t* pr, const acc_t* cr, acc_t* dr,
                                     acc_t* rdb2) {
  const int64_t n2 = g.n2;
  const acc_t D = row_dot(pr, dr, n2);
  for (int64_t i = 0; i < n2; ++i) dr[i] = pr[i] * (dr[i] - D);  // dS
  acc_t* brow = rdb2 + (g.table_rows - 1 - tbase);
  for (int64_t u = 0; u < g.ah; ++u)
    for (int64_t v = 0; v < g.aw; ++v) brow[u * g.table_w + v] += dr[u * g.aw + v];
  return row_dot(dr, cr, n2);
}

// Stage-1 anchor row over a token block, recomputed exactly as stripe_forward_task computed it:
// pr holds the raw dots a . k_j (in) and P = exp(s - m) * (1/l) from the saved (m, 1/l) (out);
// cr the cosines ra rk_j (a . k_j).
template <typename acc_t>
GRL_INLINE void stage1_row_probs(const StripeGeom& g, acc_t tau1, const acc_t* rb1, acc_t ainv, int64_t abase, int aid,
                                 const TokenBlock& TB, const acc_t* kinv, acc_t m, acc_t il, acc_t* pr, acc_t* cr) {
  const int64_t nb = TB.nb;
  for (int64_t jj = 0; jj < nb; ++jj) cr[jj] = ainv * kinv[jj] * pr[jj];  // cos
  stage1_logits(g, tau1 * ainv, rb1, abase, aid, TB, pr, kinv);
  for (int64_t jj = 0; jj < nb; ++jj) pr[jj] = exp_fast(pr[jj] - m) * il;
}

// Stage-1 anchor row: dP -> dS = P (dP - D) in place (D = D1 of the row); returns sum_j dS cos
// (its tau1 term); adds dS into the row's bias-gradient runs of rdb1 (REVERSED: + toff[jj]).
template <typename acc_t>
GRL_INLINE acc_t stage1_row_backward(const StripeGeom& g, const TokenBlock& TB, int64_t abase, acc_t D,
                                     const acc_t* pr, const acc_t* cr, acc_t* dr, acc_t* rdb1) {
  const int64_t nb = TB.nb;
  for (int64_t jj = 0; jj < nb; ++jj) dr[jj] = pr[jj] * (dr[jj] - D);  // dS
  acc_t* bw = rdb1 + (g.table_rows - 1 - abase);
  for (int64_t r = 0; r < TB.nruns; ++r) {
    const BiasRun run = TB.runs[r];
    acc_t* o = bw + run.off;
    const acc_t* s = dr + run.j0;
    for (int64_t x = 0; x < run.len; ++x) o[x] += s[x];
  }
  return row_dot(dr, cr, nb);
}

#if GRL_ISA_LEVEL >= 2
// float32 blocks of a multiple of 16 tokens: the two row functions above in one sweep of 16 lanes
// each (instead of three and four), with the same operations per entry. The bias-table entries
// of a 16-token vector are contiguous when the window rows have 16 or more tokens (stage1_logits'
// runs), else gathered (and scattered: the tokens of one anchor row have distinct entries).
GRL_INLINE void stage1_row_probs(const StripeGeom& g, float tau1, const float* rb1, float ainv, int64_t abase, int aid,
                                 const TokenBlock& TB, const float* kinv, float m, float il, float* pr, float* cr) {
  if (TB.nb % 16) {
    stage1_row_probs<float>(g, tau1, rb1, ainv, abase, aid, TB, kinv, m, il, pr, cr);
    return;
  }
  const float* base = rb1 + (g.table_rows - 1 - abase);
  const int32_t* to = TB.toff32.data();
  const bool runs = g.sw % 16 == 0;
  const __m512 av = _mm512_set1_ps(ainv), sv = _mm512_set1_ps(tau1 * ainv), mv = _mm512_set1_ps(m),
               ilv = _mm512_set1_ps(il);
  const __m512i ri = _mm512_set1_epi32(aid);
  for (int64_t j = 0; j < TB.nb; j += 16) {
    const __m512 kv = _mm512_loadu_ps(kinv + j), dot = _mm512_loadu_ps(pr + j);
    _mm512_storeu_ps(cr + j, _mm512_mul_ps(_mm512_mul_ps(av, kv), dot));  // cos
    const __m512 x = logit16(_mm512_mul_ps(sv, kv), dot, stage1_bias16(base, to + j, runs), TB.tid.data() + j, ri, g.shifted);
    _mm512_storeu_ps(pr + j, _mm512_mul_ps(exp_fast16(_mm512_sub_ps(x, mv)), ilv));
  }
}

GRL_INLINE float stage1_row_backward(const StripeGeom& g, const TokenBlock& TB, int64_t abase, float D, const float* pr,
                                     const float* cr, float* dr, float* rdb1) {
  if (TB.nb % 16) return stage1_row_backward<float>(g, TB, abase, D, pr, cr, dr, rdb1);
  float* bw = rdb1 + (g.table_rows - 1 - abase);
  const int32_t* to = TB.toff32.data();
  const bool runs = g.sw % 16 == 0;
  const __m512 dv = _mm512_set1_ps(D);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < TB.nb; j += 16) {
    const __m512 ds = _mm512_mul_ps(_mm512_loadu_ps(pr + j), _mm512_sub_ps(_mm512_loadu_ps(dr + j), dv));
    _mm512_storeu_ps(dr + j, ds);
    if (runs) {
      float* o = bw + to[j];
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), ds));
    } else {
      const __m512i ix = _mm512_loadu_si512(to + j);
      _mm512_i32scatter_ps(bw, ix, _mm512_add_ps(_mm512_i32gather_ps(ix, bw, 4), ds), 4);
    }
    acc = _mm512_fmadd_ps(ds, _mm512_loadu_ps(cr + j), acc);  // row_dot's order
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// A buffer one stage-1 block fills (kept between pass B's sweeps): the task's own, and its size.
struct BlockBuf {
  void* home;
  int64_t bytes;
};

// Pass B's two sweeps over the token blocks. block(jb, full, buf) fills one block's buffers
// (buf[k]: where buffer k is this time; buffers 0 and 1 are P and dP, n2 rows of stride kBlock;
// full: also those only the gradients need) and returns nb; grad(nb, buf) reads them.
// D1 = sum_j P dP over the recomputed rows (as the reference's softmax backward), in a first
// sweep: dZ . Z (Z from the forward's online softmax) differs from it by rounding that tau1
// amplifies in every dS of the row (anchor gradients at tau 100: 10-40x the reference's error).
// Windows whose blocks fit kStage1CacheFloats keep the first sweep's buffers (per-thread scratch,
// <= 512 KB, L2-resident; GRL-T/S stripes 8 x 64 with f = 4: 32 x 512 per window) and the
// second sweep reads them instead of recomputing: each block fills its own slot of that cache,
// so nothing is copied in or out.
template <typename acc_t, int NB, typename Block, typename Grad>
GRL_INLINE void stage1_sweeps(const StripeGeom& g, int64_t win, TokenBlock& TB, const BlockBuf (&bufs)[NB],
                              acc_t* D1, const Block& block, const Grad& grad) {
  const int64_t n1 = g.n1, n2 = g.n2, nblocks = (n1 + kBlock - 1) / kBlock;
  int64_t per_block = 0;
  void* buf[NB];
  for (int k = 0; k < NB; ++k) per_block += bufs[k].bytes, buf[k] = bufs[k].home;
  const bool cached = nblocks * per_block <= kStage1CacheFloats * static_cast<int64_t>(sizeof(acc_t));
  // The cache lives per thread (<= 512 KB, kept between tasks and calls), not zeroed: a block
  // writes every entry of its slot that the gradients read (the pads they read too: K pad rows,
  // zero tile columns), so stale bytes reach only pad outputs that are never stored.
  thread_local std::vector<char> cache;
  if (cached && static_cast<int64_t>(cache.size()) < nblocks * per_block) cache.resize(nblocks * per_block);
  auto bind = [&](int64_t blk) {  // buf -> the block's slot of the cache
    char* base = cache.data() + blk * per_block;
    for (int k = 0; k < NB; ++k) buf[k] = base, base += bufs[k].bytes;
  };
  {
    std::vector<double> dsum(n2, 0.0);
    for (int64_t jb = 0; jb < n1; jb += kBlock) {
      if (cached) bind(jb / kBlock);
      const int64_t nb = block(jb, cached, static_cast<void* const*>(buf));
      const acc_t* P = static_cast<const acc_t*>(buf[0]);
      const acc_t* dP = static_cast<const acc_t*>(buf[1]);
      for (int64_t i = 0; i < n2; ++i) dsum[i] += row_dot(P + i * kBlock, dP + i * kBlock, nb);
    }
    for (int64_t i = 0; i < n2; ++i) D1[i] = static_cast<acc_t>(dsum[i]);
  }
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    int64_t nb;
    if (cached) {
      TB.index(g, win, jb);
      nb = TB.nb;
      bind(jb / kBlock);
    } else {
      nb = block(jb, true, static_cast<void* const*>(buf));
    }
    grad(nb, static_cast<void* const*>(buf));
  }
}

#if GRL_ISA_LEVEL >= 2
// Backward on vdpbf16ps tiles (bfloat16 inputs, AVX512-BF16), float32 accumulation. Raw rows q,
// k, a (bf16, exact in the tiles), rx = 1 / max(|x|, eps). The logits come from the raw dots
// exactly as in the forward (stage2_logits / stage1_logits with tau rx); softmax statistics, D, dS
// and the tau and bias sums are float32 as in the float task. The products that feed dS stay on
// float32 tiles (gemm_op on float rows): dP = dY Z^T, dZ^T += dY^T P and dP = dZ v^T (rounding Z,
// P or dZ there moves the tau and bias gradients by ~2^-9 relative), and dv^T = dZ^T P (a bf16 P
// and dZ round dv twice; P rows are its B as they stand). On bf16 tiles, rounding tau-scaled dS:
// pass A (stage 2: token rows j, anchor columns i)
//   dq_hat    = sum_i bf16(tau2 ra_i dS_ji) a_i   (A = scaled dS rows, B = raw a, K = n2)
//   da_hat^T += q^T bf16(tau2 rq_j dS_ji)         (A = raw q^T, B = VNNI pairs of token rows, K = nb)
// pass B (stage 1: anchor rows i, token columns j)
//   da_hat   += sum_j bf16(tau1 rk_j dS_ij) k_j   (A = scaled dS rows, B = raw k, K = nb)
//   dk_hat^T  = a^T bf16(tau1 ra_i dS_ij)         (A = raw a^T, B = VNNI pairs of anchor rows, K = n2)
// The transposed products (d x n outputs) let the packing write pairs of rows, not transposes.
template <typename scalar_t, typename acc_t>
void stripe_backward_task_bf16(const StripeArgs<scalar_t, acc_t>& A, int64_t task, const scalar_t* gout,
                               const acc_t* zsave, const acc_t* stat1save, scalar_t* gqkv, scalar_t* ganc,
                               acc_t* dtau1, acc_t* rdbias1, acc_t* dtau2, acc_t* rdbias2) {
  using T = uint16_t;
  using Lay = OpLayout<T>;
  const StripeGeom& g = A.g;
  const int64_t d = A.d, dp = pad16(d), dk = kpad<T>(d), n1 = g.n1, n2 = g.n2, n2p = pad16(n2), n2k = kpad<T>(n2);
  const int64_t C = A.C, L = g.H * g.W, R = g.table_rows;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const acc_t tau1 = A.tau1[h], tau2 = A.tau2[h];
  const acc_t* rb1 = A.rbias1 + h * R;
  const acc_t* rb2 = A.rbias2 + h * R;
  acc_t* rdb1 = rdbias1 + h * R;
  acc_t* rdb2 = rdbias2 + h * R;
  const acc_t* Z = zsave + task * n2 * d;
  const acc_t* st = stat1save + task * n2 * 2;  // rows' (m, 1/l) of stage 1
  AnchorTile<scalar_t, acc_t> AT(A, b, win, h, false, false);  // a_hat rows, |a| (normalize backward)
  AnchorTile<scalar_t, acc_t> AR(A, b, win, h, false, true);   // raw rows, anorm = 1 / |a|
  TokenBlock TB;
  // per task, raw a: rows (A of the stage-1 dots, n2 x dk), a^T (B of the stage-2 dots, K = d,
  // N = n2p), a (B of dq, K = n2, N = dp), a^T (A of dk^T, d x n2k); float32 Z^T (B of dP)
  std::vector<T> aA(n2 * dk, T(0)), aB(dk * n2p, T(0)), aR(n2k * dp, T(0)), aTA(d * n2k, T(0));
  std::vector<acc_t> ZT(d * n2p, acc_t(0));
  std::vector<acc_t> ta2(n2);  // tau2 / |a_i|
  for (int64_t i = 0; i < n2; ++i) {
    ta2[i] = tau2 * AR.anorm[i];
    for (int64_t c = 0; c < d; ++c) {
      const T v = Lay::from(AR.ahat[i * dp + c]);
      aA[i * dk + c] = v;
      aB[Lay::bidx(c, i, n2p)] = v;
      aR[Lay::bidx(i, c, dp)] = v;
      aTA[c * n2k + i] = v;
      ZT[c * n2p + i] = Z[i * d + c];
    }
  }
  // pass A, per block: raw q rows (A of the dots), q^T (A of da^T, K = nb); packed: tau2 ra dS
  // rows (A of dq), VNNI pairs of token rows of tau2 rq dS (B of da^T, K = nb, N = n2p); float32
  // dY rows (A of dP) and dY^T (A of dZ^T, whose B is P itself)
  std::vector<T> qA(kBlock * dk, T(0)), qT(d * kBlock, T(0)), dSA2(kBlock * n2k, T(0)), dSB2(kBlock * n2p, T(0));
  std::vector<acc_t> dY(kBlock * dp, acc_t(0)), dYT(d * kBlock), P2(kBlock * n2p), cs2(kBlock * n2p), dP2(kBlock * n2p),
      dQ(kBlock * dp), xb(kBlock * dp, acc_t(0)), xn(kBlock), xinv(kBlock), dZT(d * n2p, acc_t(0)),
      dAT(d * n2p, acc_t(0)), dA(n2 * dp, acc_t(0)), D1(n2);
  T xr[kMaxStackD + 2];
  xr[d] = T(0);  // the K pad when d is odd
  double dt1 = 0, dt2 = 0;  // long sums with cancellation: rows in acc_t, totals in double

  // ---- pass A: stage 2 backward per token block (rows of n2 entries)
  for (int64_t jb = 0; jb < n1; jb += kBlock) {
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    SumSqRows<acc_t> ssq(xinv.data());  // 1 / |q| (inv_norm's bits) after the gather
    gather_tokens(A, TB, b, h, 0, static_cast<acc_t*>(nullptr), [&](int64_t jj, const acc_t* r) {
      ssq.push_row(r, d);
      for (int64_t c = 0; c < d; ++c) xr[c] = Lay::from(r[c]), qT[c * kBlock + jj] = xr[c];
      for (int64_t c = 0; c < dk; ++c) qA[jj * dk + c] = xr[c];  // a loop: memcpy of run-time length is a libc call
      acc_t* qh = xb.data() + jj * dp;  // q_hat row (and |q|) for the normalize backward
      for (int64_t c = 0; c < d; ++c) qh[c] = r[c];
      xn[jj] = normalize_inplace(qh, d);
    });
    ssq.finish();
    inv_norms_of_sumsq(xinv.data(), nb);
    const scalar_t* gbase = gout + b * L * C + h * d;
    for (int64_t jj = 0; jj < std::min(kPrefetch, nb); ++jj) prefetch_row(gbase + TB.pos[jj] * C, d, 1);
    for (int64_t jj = 0; jj < nb; ++jj) {
      if (jj + kPrefetch < nb) prefetch_row(gbase + TB.pos[jj + kPrefetch] * C, d, 1);
      acc_t* gy = dY.data() + jj * dp;
      load_row(gbase + TB.pos[jj] * C, 1, d, gy);
      for (int64_t c = 0; c < d; ++c) dYT[c * kBlock + jj] = gy[c];
      prefetch_row_for_write(gqkv + (b * L + TB.pos[jj]) * 3 * C + h * d, d);
    }
    if (nb & 1)
      for (int64_t c = 0; c < d; ++c) qT[c * kBlock + nb] = T(0);  // K pad of da^T
    gemm_op<T, acc_t>(nb, n2p, d, qA.data(), dk, aB.data(), n2p, P2.data(), n2p, false);          // raw dots
    gemm_op<acc_t, acc_t>(nb, n2p, d, dY.data(), dp, ZT.data(), n2p, dP2.data(), n2p, false);  // dP = dY Z^T
    for (int64_t jj = 0; jj < nb; ++jj) {
      acc_t* pr = P2.data() + jj * n2p;
      acc_t* cr = cs2.data() + jj * n2p;
      acc_t* dr = dP2.data() + jj * n2p;
      for (int64_t i = 0; i < n2; ++i) cr[i] = xinv[jj] * AR.anorm[i] * pr[i];  // cos
      stage2_logits(g, tau2 * xinv[jj], rb2, TB.tbase[jj], TB.tid[jj], AT.aid.data(), AT.aoff32.data(), pr, AR.anorm.data());
      softmax_inplace(pr, n2);
      dt2 += stage2_row_backward(g, TB.tbase[jj], pr, cr, dr, rdb2);
      T* sa = dSA2.data() + jj * n2k;
      for (int64_t i = 0; i < n2; ++i) sa[i] = float_to_bf16_bits(ta2[i] * dr[i]);
    }
    for (int64_t jj = 0; jj < nb; jj += 2) {  // token rows (jj, jj + 1) -> one VNNI pair row
      const bool two = jj + 1 < nb;
      const acc_t* d1 = dP2.data() + jj * n2p;
      const acc_t s0 = tau2 * xinv[jj], s1 = two ? tau2 * xinv[jj + 1] : acc_t(0);
      pack_pair_bf16(d1, s0, two ? d1 + n2p : nullptr, s1, n2, dSB2.data() + jj * n2p);
    }
    gemm_op<T, acc_t>(nb, dp, n2, dSA2.data(), n2k, aR.data(), dp, dQ.data(), dp, false);   // dq_hat
    gemm_op<T, acc_t>(d, n2p, nb, qT.data(), kBlock, dSB2.data(), n2p, dAT.data(), n2p, true);   // da_hat^T
    gemm_op<acc_t, acc_t>(d, n2p, nb, dYT.data(), kBlock, P2.data(), n2p, dZT.data(), n2p, true);  // dZ^T
    for (int64_t jj = 0; jj < nb; ++jj) {
      acc_t* dq = dQ.data() + jj * dp;
      normalize_backward_inplace(dq, xb.data() + jj * dp, xn[jj], d);
      store_row(gqkv + (b * L + TB.pos[jj]) * 3 * C + h * d, dq, d);
    }
  }

  // ---- pass B: stage 1 backward per token block (probabilities from the saved (m, 1/l))
  // dZ rows (A of dP, n2 x dp; dZ^T is the A of dv^T)
  std::vector<acc_t> dZ(n2 * dp, acc_t(0));
  for (int64_t c = 0; c < d; ++c)
    for (int64_t i = 0; i < n2; ++i) dZ[i * dp + c] = dZT[c * n2p + i];
  // per block: raw k^T (B of the dots, K = d, N = kBlock), raw k (B of da, K = nb, N = dp), float32
  // v^T (B of dP); packed: tau1 rk dS rows (A of da), VNNI pairs of anchor rows of tau1 ra dS (B of
  // dk^T, K = n2, N = kBlock)
  std::vector<T> kB(dk * kBlock, T(0)), kR(kBlock * dp, T(0)), dSA1(n2 * kBlock, T(0)), dSB1(n2k * kBlock, T(0));
  std::vector<acc_t> vT(d * kBlock), P(n2 * kBlock), dP(n2 * kBlock), cs(n2 * kBlock), dKT(d * kBlock), dVT(d * kBlock);
  // In the K = d tile the VNNI pair (2p, 2p + 1) of column jj is 32-bit word p of row jj.
  uint32_t* kB32 = reinterpret_cast<uint32_t*>(kB.data());
  // pass B's block buffers (stage1_sweeps: buf[k] is where buffer k is for this block)
  constexpr int64_t F = sizeof(acc_t);
  const BlockBuf bufs[] = {{P.data(), n2 * kBlock * F}, {dP.data(), n2 * kBlock * F}, {cs.data(), n2 * kBlock * F},
                           {xb.data(), kBlock * dp * F}, {xn.data(), kBlock * F}, {xinv.data(), kBlock * F},
                           {kR.data(), kBlock * dp * 2}};
  struct Bufs {  // typed view of buf
    acc_t *P, *dP, *cs, *xb, *xn, *xinv;
    T* kR;
    explicit Bufs(void* const* b)
        : P(static_cast<acc_t*>(b[0])), dP(static_cast<acc_t*>(b[1])), cs(static_cast<acc_t*>(b[2])),
          xb(static_cast<acc_t*>(b[3])), xn(static_cast<acc_t*>(b[4])), xinv(static_cast<acc_t*>(b[5])),
          kR(static_cast<T*>(b[6])) {}
  };
  auto block = [&](int64_t jb, bool full, void* const* buf) {  // full: also the k_hat rows and raw k (not needed for D1)
    const Bufs u(buf);
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    SumSqRows<acc_t> ssk(u.xinv);  // 1 / |k| (inv_norm's bits) after the gather
    gather_tokens(A, TB, b, h, 1, static_cast<acc_t*>(nullptr), [&](int64_t jj, const acc_t* r) {
      ssk.push_row(r, d);
      for (int64_t c = 0; c < d; ++c) xr[c] = Lay::from(r[c]);
      for (int64_t p = 0; p < dk / 2; ++p) std::memcpy(kB32 + p * kBlock + jj, xr + 2 * p, sizeof(uint32_t));
      if (!full) return;
      T* kr = u.kR + Lay::bidx(jj, 0, dp);
      for (int64_t c = 0; c < d; ++c) kr[2 * c] = xr[c];
      acc_t* kh = u.xb + jj * dp;  // k_hat row (and |k|) for the normalize backward
      for (int64_t c = 0; c < d; ++c) kh[c] = r[c];
      u.xn[jj] = normalize_inplace(kh, d);
    });
    ssk.finish();
    inv_norms_of_sumsq(u.xinv, nb);
    for (int64_t jj = nb; jj < kBlock; ++jj)  // a short last block: zero columns in the tile
      for (int64_t p = 0; p < dk / 2; ++p) kB32[p * kBlock + jj] = 0;
    load_tokens(A, TB, b, h, 2, static_cast<acc_t*>(nullptr), vT.data(), static_cast<acc_t*>(nullptr));
    if (full && (nb & 1)) {  // the K pad row of da
      T* kr = u.kR + Lay::bidx(nb, 0, dp);
      for (int64_t c = 0; c < d; ++c) kr[2 * c] = T(0);
    }
    gemm_op<T, acc_t>(n2, pad16(nb), d, aA.data(), dk, kB.data(), kBlock, u.P, kBlock, false);   // raw dots
    gemm_op<acc_t, acc_t>(n2, pad16(nb), d, dZ.data(), dp, vT.data(), kBlock, u.dP, kBlock, false);  // dZ v^T
    for (int64_t i = 0; i < n2; ++i)
      stage1_row_probs(g, tau1, rb1, AR.anorm[i], AR.abase[i], AR.aid[i], TB, u.xinv, st[2 * i], st[2 * i + 1],
                       u.P + i * kBlock, u.cs + i * kBlock);
    return nb;
  };
  // the k gradient row of block token jj (the v gradient row follows C elements later)
  auto kv_row = [&](int64_t jj) { return gqkv + (b * L + TB.pos[jj]) * 3 * C + C + h * d; };
  auto grad = [&](int64_t nb, void* const* buf) {
    const Bufs u(buf);
    for (int64_t jj = 0; jj < nb; ++jj) prefetch_row_for_write(kv_row(jj), d), prefetch_row_for_write(kv_row(jj) + C, d);
    acc_t tk[kBlock];  // tau1 / |k_j|
    for (int64_t jj = 0; jj < nb; ++jj) tk[jj] = tau1 * u.xinv[jj];
    for (int64_t i = 0; i < n2; ++i) {
      acc_t* dr = u.dP + i * kBlock;
      dt1 += stage1_row_backward(g, TB, AR.abase[i], D1[i], u.P + i * kBlock, u.cs + i * kBlock, dr, rdb1);
      T* sa = dSA1.data() + i * kBlock;
      for (int64_t jj = 0; jj < nb; ++jj) sa[jj] = float_to_bf16_bits(tk[jj] * dr[jj]);
      if (nb & 1) sa[nb] = T(0);  // K pad of da
    }
    for (int64_t i = 0; i < n2; i += 2) {  // anchor rows (i, i + 1) -> one VNNI pair row
      const bool two = i + 1 < n2;
      const acc_t* d1 = u.dP + i * kBlock;
      const acc_t s0 = tau1 * AR.anorm[i], s1 = two ? tau1 * AR.anorm[i + 1] : acc_t(0);
      pack_pair_bf16(d1, s0, two ? d1 + kBlock : nullptr, s1, nb, dSB1.data() + i * kBlock);
    }
    const int64_t nbp = pad16(nb);
    gemm_op<T, acc_t>(n2, dp, nb, dSA1.data(), kBlock, u.kR, dp, dA.data(), dp, true);          // da_hat
    gemm_op<T, acc_t>(d, nbp, n2, aTA.data(), n2k, dSB1.data(), kBlock, dKT.data(), kBlock, false);  // dk_hat^T
    gemm_op<acc_t, acc_t>(d, nbp, n2, dZT.data(), n2p, u.P, kBlock, dVT.data(), kBlock, false);  // dv^T
    store_kv_grads_transposed(dKT.data(), dVT.data(), kBlock, nb, u.xb, dp, u.xn, d, C, kv_row);
  };
  stage1_sweeps(g, win, TB, bufs, D1.data(), block, grad);
  // ---- anchors: da_hat = pass B's rows + pass A's transposed sums
  acc_t dar[kMaxStackD];
  for (int64_t i = 0; i < n2; ++i) {
    for (int64_t c = 0; c < d; ++c) dar[c] = dA[i * dp + c] + dAT[c * n2p + i];
    normalize_backward_inplace(dar, AT.ahat.data() + i * dp, AT.anorm[i], d);
    const int64_t p = stripe_anchor_position(g, win, i);
    store_row(ganc + (b * g.Ha * g.Wa + p) * C + h * d, dar, d);
  }
  dtau1[h] += static_cast<acc_t>(dt1);
  dtau2[h] += static_cast<acc_t>(dt2);
}
#endif

// rdb1 / rdb2: this chunk's bias gradients in REVERSED table order (the driver flips them).
// Float tiles (GEMM 1, strided A views for the transposed products), normalized rows.
template <typename scalar_t, typename acc_t>
void stripe_backward_task(const StripeArgs<scalar_t, acc_t>& A, int64_t task, const scalar_t* gout,
                          const acc_t* zsave, const acc_t* stat1save, scalar_t* gqkv, scalar_t* ganc,
                          acc_t* dtau1, acc_t* rdbias1, acc_t* dtau2, acc_t* rdbias2) {
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<typename OpType<scalar_t, acc_t>::T, uint16_t>::value) {
    stripe_backward_task_bf16(A, task, gout, zsave, stat1save, gqkv, ganc, dtau1, rdbias1, dtau2, rdbias2);
    return;
  } else
#endif
  {
  const StripeGeom& g = A.g;
  const int64_t d = A.d, dp = pad16(d), n1 = g.n1, n2 = g.n2, C = A.C, L = g.H * g.W, R = g.table_rows;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const acc_t tau1 = A.tau1[h], tau2 = A.tau2[h];
  const acc_t* rb1 = A.rbias1 + h * R;
  const acc_t* rb2 = A.rbias2 + h * R;
  acc_t* rdb1 = rdbias1 + h * R;
  acc_t* rdb2 = rdbias2 + h * R;
  AnchorTile<scalar_t, acc_t> AT(A, b, win, h, true, false);
  TokenBlock TB;
  std::vector<acc_t> ZT(d * n2), dZ(n2 * dp, acc_t(0)), dA(n2 * dp, acc_t(0)), D1(n2),
      xb(kBlock * dp, acc_t(0)), xn(kBlock), dYb(kBlock * dp, acc_t(0)), dXb(kBlock * dp), dVb(kBlock * dp),
      vT(d * kBlock), cs(std::max(kBlock * n2, n2 * kBlock)), P(n2 * kBlock), dP(n2 * kBlock);
  const acc_t* Z = zsave + task * n2 * d;
  const acc_t* st = stat1save + task * n2 * 2;  // rows' (m, 1/l) of stage 1
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t c = 0; c < d; ++c) ZT[c * n2 + i] = Z[i * d + c];
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
      for (int64_t i = 0; i < n2; ++i) pr[i] = cr[i];
      stage2_logits(g, tau2, rb2, TB.tbase[jj], TB.tid[jj], AT.aid.data(), AT.aoff32.data(), pr);
      softmax_inplace(pr, n2);
      dt2 += stage2_row_backward(g, TB.tbase[jj], pr, cr, dP.data() + jj * n2, rdb2);
    }
    gemm<acc_t>(n2, dp, nb, acc_t(1), P.data(), 1, n2, dYb.data(), dp, dZ.data(), dp, true);   // dZ += P^T dY
    gemm<acc_t>(n2, dp, nb, tau2, dP.data(), 1, n2, xb.data(), dp, dA.data(), dp, true);       // da_hat += tau dS^T q_hat
    gemm<acc_t>(nb, dp, n2, tau2, dP.data(), n2, 1, AT.ahat.data(), dp, dXb.data(), dp, false); // dq_hat = tau dS a_hat
    for (int64_t jj = 0; jj < nb; ++jj) {
      acc_t* dq = dXb.data() + jj * dp;
      normalize_backward_inplace(dq, xb.data() + jj * dp, xn[jj], d);
      store_row(gqkv + (b * L + TB.pos[jj]) * 3 * C + h * d, dq, d);
    }
  }

  // ---- pass B: stage 1 backward per token block (probabilities from the saved (m, 1/l))
  // The logits are recomputed exactly as stripe_forward_task computed them (raw anchor and key
  // rows on the same product tiles, then tau1 / |a| / |k| and the bias, stage1_row_probs), so
  // that s - m is exact and the recomputed row sums to 1: a logit an ulp off (a_hat . k_hat
  // instead) scales P by ~tau * 1e-7, which the cancelling logit-scale gradient does not forgive.
  using T = typename OpType<scalar_t, acc_t>::T;
  using Lay = OpLayout<T>;
  const int64_t dk = kpad<T>(d);
  AnchorTile<scalar_t, acc_t> AR(A, b, win, h, false, true);  // raw anchors, anorm = 1 / |a| (as the forward)
  std::vector<T> aA(n2 * dk, T(0)), kB(dk * kBlock, T(0));
  std::vector<acc_t> kinv(kBlock);
  for (int64_t i = 0; i < n2; ++i)
    for (int64_t c = 0; c < d; ++c) aA[i * dk + c] = Lay::from(AR.ahat[i * dp + c]);
  // pass B's block buffers (stage1_sweeps: buf[k] is where buffer k is for this block)
  constexpr int64_t F = sizeof(acc_t);
  const BlockBuf bufs[] = {{P.data(), n2 * kBlock * F}, {dP.data(), n2 * kBlock * F}, {cs.data(), n2 * kBlock * F},
                           {xb.data(), kBlock * dp * F}, {xn.data(), kBlock * F}};
  struct Bufs {  // typed view of buf
    acc_t *P, *dP, *cs, *xb, *xn;
    explicit Bufs(void* const* b)
        : P(static_cast<acc_t*>(b[0])), dP(static_cast<acc_t*>(b[1])), cs(static_cast<acc_t*>(b[2])),
          xb(static_cast<acc_t*>(b[3])), xn(static_cast<acc_t*>(b[4])) {}
  };
  // One token block: k_hat rows (xb, |k| in xn), v^T, the cosines (cs), the probabilities (P)
  // and dP = dZ v^T of every anchor row.
  auto block = [&](int64_t jb, bool khat, void* const* buf) {  // khat: also the k_hat rows (not needed to sum D1 alone)
    const Bufs u(buf);
    TB.index(g, win, jb);
    const int64_t nb = TB.nb;
    SumSqRows<acc_t> ssk(kinv.data());  // 1 / |k| (inv_norm's bits) after the gather
    gather_tokens(A, TB, b, h, 1, static_cast<acc_t*>(nullptr), [&](int64_t jj, const acc_t* r) {
      ssk.push_row(r, d);
      for (int64_t c = 0; c < d; ++c) kB[Lay::bidx(c, jj, kBlock)] = Lay::from(r[c]);
      if (!khat) return;
      acc_t* kh = u.xb + jj * dp;  // k_hat row (and |k|) for the gradient products
      for (int64_t c = 0; c < d; ++c) kh[c] = r[c];
      u.xn[jj] = normalize_inplace(kh, d);
    });
    ssk.finish();
    inv_norms_of_sumsq(kinv.data(), nb);
    for (int64_t jj = nb; jj < kBlock; ++jj)  // a short last block: zero columns in the tile
      for (int64_t c = 0; c < d; ++c) kB[Lay::bidx(c, jj, kBlock)] = T(0);
    load_tokens(A, TB, b, h, 2, static_cast<acc_t*>(nullptr), vT.data(), static_cast<acc_t*>(nullptr));
    gemm_op<T, acc_t>(n2, pad16(nb), d, aA.data(), dk, kB.data(), kBlock, u.P, kBlock, false);  // raw dots
    gemm<acc_t>(n2, nb, d, acc_t(1), dZ.data(), dp, 1, vT.data(), kBlock, u.dP, kBlock, false);       // dZ v^T
    for (int64_t i = 0; i < n2; ++i)
      stage1_row_probs(g, tau1, rb1, AR.anorm[i], AR.abase[i], AR.aid[i], TB, kinv.data(), st[2 * i], st[2 * i + 1],
                       u.P + i * kBlock, u.cs + i * kBlock);
    return nb;
  };
  // the k gradient row of block token jj (the v gradient row follows C elements later)
  auto kv_row = [&](int64_t jj) { return gqkv + (b * L + TB.pos[jj]) * 3 * C + C + h * d; };
  auto grad = [&](int64_t nb, void* const* buf) {
    const Bufs u(buf);
    for (int64_t jj = 0; jj < nb; ++jj) prefetch_row_for_write(kv_row(jj), d), prefetch_row_for_write(kv_row(jj) + C, d);
    for (int64_t i = 0; i < n2; ++i)
      dt1 += stage1_row_backward(g, TB, AT.abase[i], D1[i], u.P + i * kBlock, u.cs + i * kBlock,
                                 u.dP + i * kBlock, rdb1);
    gemm<acc_t>(nb, dp, n2, acc_t(1), u.P, 1, kBlock, dZ.data(), dp, dVb.data(), dp, false);     // dv = P^T dZ
    gemm<acc_t>(nb, dp, n2, tau1, u.dP, 1, kBlock, AT.ahat.data(), dp, dXb.data(), dp, false);  // dk_hat
    gemm<acc_t>(n2, dp, nb, tau1, u.dP, kBlock, 1, u.xb, dp, dA.data(), dp, true);         // da_hat
    for (int64_t jj = 0; jj < nb; ++jj) {
      acc_t* dkr = dXb.data() + jj * dp;
      normalize_backward_inplace(dkr, u.xb + jj * dp, u.xn[jj], d);
      store_row(kv_row(jj), dkr, d);
      store_row(kv_row(jj) + C, dVb.data() + jj * dp, d);
    }
  };
  stage1_sweeps(g, win, TB, bufs, D1.data(), block, grad);
  // ---- anchors: both stages contributed to dA (gradient w.r.t. a_hat)
  for (int64_t i = 0; i < n2; ++i) {
    acc_t* dar = dA.data() + i * dp;
    normalize_backward_inplace(dar, AT.ahat.data() + i * dp, AT.anorm[i], d);
    const int64_t p = stripe_anchor_position(g, win, i);
    store_row(ganc + (b * g.Ha * g.Wa + p) * C + h * d, dar, d);
  }
  dtau1[h] += static_cast<acc_t>(dt1);
  dtau2[h] += static_cast<acc_t>(dt2);
  }
}

}  // namespace

// Entry points of this ISA (explicitly instantiated below, inside the ISA's target region).
template <typename scalar_t, typename acc_t>
void stripe_forward_range(const StripeArgs<scalar_t, acc_t>& A, int64_t t0, int64_t t1, scalar_t* out, acc_t* z,
                          acc_t* stat1) {
  for (int64_t t = t0; t < t1; ++t) stripe_forward_task(A, t, out, z, stat1);
}

template <typename scalar_t, typename acc_t>
void stripe_backward_range(const StripeArgs<scalar_t, acc_t>& A, int64_t t0, int64_t t1, const scalar_t* gout,
                           const acc_t* z, const acc_t* stat1, scalar_t* gqkv, scalar_t* ganc, acc_t* dt1, acc_t* rdb1,
                           acc_t* dt2, acc_t* rdb2) {
  for (int64_t t = t0; t < t1; ++t) stripe_backward_task(A, t, gout, z, stat1, gqkv, ganc, dt1, rdb1, dt2, rdb2);
}

#define GRL_STRIPE_INSTANTIATE(S, A_)                                                                            \
  template void stripe_forward_range<S, A_>(const StripeArgs<S, A_>&, int64_t, int64_t, S*, A_*, A_*);          \
  template void stripe_backward_range<S, A_>(const StripeArgs<S, A_>&, int64_t, int64_t, const S*, const A_*,  \
                                             const A_*, S*, S*, A_*, A_*, A_*, A_*);
GRL_STRIPE_INSTANTIATE(float, float)
GRL_STRIPE_INSTANTIATE(double, double)
GRL_STRIPE_INSTANTIATE(c10::BFloat16, float)
#undef GRL_STRIPE_INSTANTIATE

}  // namespace GRL_ISA
}  // namespace cpu
}  // namespace grl
