// grl_cpu_window_impl.h -- task code of the (shifted) window attention, compiled once per ISA
// (included by grl_cpu_window.cpp inside `#pragma GCC target` regions; no include guard).
//
// Per window and head: Y = softmax_j(tau q_hat_i . k_hat_j + B[rel(i, j)] + M[i, j]) v.
// Forward: the window's scattered token rows are gathered once into contiguous per-thread
// tiles of the product type T (float32 / float64, or bfloat16 for vdpbf16ps): q (A
// operand, n x d), k^T and v (B operands), raw (bfloat16 stays exact; the dot products are
// scaled by the float32 inverse norms afterwards); query blocks of 32 rows are complete (n
// entries) with an exact float32 softmax. Backward: recomputes the probabilities (no saved
// state) per query block; on bf16 tiles for bfloat16 inputs on AVX512-BF16 (all five
// products, see window_backward_task_bf16), else on GEMM 1's float tiles (float32 / float64
// inputs always: their results do not depend on the ISA's bf16 support).

#include "grl_cpu_kernels.h"

namespace grl {
namespace cpu {
namespace GRL_ISA {
namespace {

constexpr int64_t kQueryBlock = 32;  // query rows per block of window attention

// Positions, bias offsets and region ids of a window's tokens, walking it row by row on the
// rolled grid (no divisions); qoff[j] - (y2 * side + x2) is the bias row of (j, (y2, x2)).
// masked: the window spans more than one region of the shifted image (only those windows
// get the -100 mask); rid is padded to a multiple of 16 entries (vector loads).
// assign() refills it for another window (the forward keeps one per task range: its tasks
// run the heads of a window one after the other).
struct WindowIndex {
  std::vector<int64_t> pos, qoff;
  std::vector<int> rid;
  bool masked = false;
  int64_t win = -1;
  explicit WindowIndex(const WindowGeom& g) : pos(g.n), qoff(g.n), rid((g.n + 15) / 16 * 16, 0) {}
  WindowIndex(const WindowGeom& g, int64_t w) : WindowIndex(g) { assign(g, w); }
  void assign(const WindowGeom& g, int64_t w) {
    if (w == win) return;
    win = w;
    masked = false;
    const int64_t side = g.table_side;
    const int64_t r0 = w / g.windows_w * g.ws, c0 = w % g.windows_w * g.ws;
    for (int64_t j = 0, y = 0, x = 0; j < g.n; ++j) {
      pos[j] = window_token_position_rc(g, r0 + y, c0 + x);
      qoff[j] = (y + g.ws - 1) * side + (x + g.ws - 1);
      rid[j] = g.shift > 0 ? window_token_region_rc(g, r0 + y, c0 + x) : 0;
      masked = masked || rid[j] != rid[0];
      if (++x == g.ws) x = 0, ++y;
    }
  }
};

// Walk the window's rows (prefetched kPrefetch tokens ahead: they are scattered over the
// image) and hand emit(j, q, k, v) the converted rows.
template <typename scalar_t, typename acc_t, typename Emit>
GRL_INLINE void gather_window(const WindowArgs<scalar_t, acc_t>& A, const WindowIndex& I, int64_t b, int64_t h,
                              const Emit& emit) {
  const int64_t n = A.g.n, d = A.d;
  const scalar_t* base = A.qkv + b * A.vq.sb + h * d * A.vq.sc;
  auto prefetch = [&](int64_t j) {
    const scalar_t* qp = base + I.pos[j] * A.vq.sl;
    for (int part = 0; part < 3; ++part) prefetch_row(qp + part * A.C * A.vq.sc, d, A.vq.sc);
  };
  for (int64_t j = 0; j < std::min(kPrefetch, n); ++j) prefetch(j);
  acc_t q[kMaxStackD], k[kMaxStackD], v[kMaxStackD];
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPrefetch < n) prefetch(j + kPrefetch);
    const scalar_t* qp = base + I.pos[j] * A.vq.sl;
    load_row(qp, A.vq.sc, d, q);
    load_row(qp + A.C * A.vq.sc, A.vq.sc, d, k);
    load_row(qp + 2 * A.C * A.vq.sc, A.vq.sc, d, v);
    emit(j, q, k, v);
  }
}

// Prefetch into L2 what task `task` reads and writes: the q, k, v rows of its window and head,
// in the forward (out) its output rows, in the backward (gout, gqkv) its output-gradient rows
// and its qkv-gradient rows (for write); null pointers are skipped. Issued by the task before
// it, a whole task ahead (window rows are scattered over the image: without it one DRAM
// latency per row, ~50 % of a float32 window-8 backward). At most the first
// kPrefetchTaskTokens tokens (<= 230 KB of lines), so that large windows (32: 1024 tokens,
// ~0.9 MB) do not evict the running task's tiles from L2.
constexpr int64_t kPrefetchTaskTokens = 256;
template <typename scalar_t, typename acc_t>
GRL_INLINE void prefetch_window_task(const WindowArgs<scalar_t, acc_t>& A, int64_t task, const scalar_t* gout,
                                     scalar_t* gqkv, scalar_t* out = nullptr) {
  const WindowGeom& g = A.g;
  const int64_t d = A.d, C = A.C, L = g.H * g.W, sc = A.vq.sc;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const int64_t r0 = win / g.windows_w * g.ws, c0 = win % g.windows_w * g.ws;
  const scalar_t* base = A.qkv + b * A.vq.sb + h * d * sc;
  const int64_t count = std::min(g.n, kPrefetchTaskTokens);
  for (int64_t j = 0, y = 0, x = 0; j < count; ++j) {
    const int64_t pos = window_token_position_rc(g, r0 + y, c0 + x);
    const scalar_t* qp = base + pos * A.vq.sl;
    for (int part = 0; part < 3; ++part) prefetch_row<2>(qp + part * C * sc, d, sc);
    if (gout) prefetch_row<2>(gout + (b * L + pos) * C + h * d, d, 1);
    if (gqkv)
      for (int part = 0; part < 3; ++part) prefetch_row_for_write<2>(gqkv + (b * L + pos) * 3 * C + part * C + h * d, d);
    if (out) prefetch_row_for_write<2>(out + (b * L + pos) * C + h * d, d);
    if (++x == g.ws) x = 0, ++y;
  }
}

// Row i of the logits, in place: tau * cos + B[rel(i, j)] + M[i, j]; each key row y2 of the
// window reads one contiguous run of the reversed table rb.
// With colscale (the forward's raw dot products): tau * colscale[j] * dot instead.
template <typename acc_t>
GRL_INLINE void window_logits(const WindowGeom& g, const WindowIndex& I, int64_t i, acc_t tau, const acc_t* rb,
                              acc_t* row, const acc_t* colscale = nullptr) {
  const int64_t ws = g.ws, side = g.table_side;
  const acc_t* base = rb + (g.table_rows - 1 - I.qoff[i]);
  for (int64_t y2 = 0; y2 < ws; ++y2)
    bias_run(row + y2 * ws, colscale ? colscale + y2 * ws : nullptr, base + y2 * side, tau, ws);
  if (I.masked) add_region_mask(row, I.rid.data(), I.rid[i], g.n);
}

// The same logits from the per-call bias matrix A.bmat (nh x n x np: the table gathered once
// per call, see window_bias_matrix), on whole 16-wide vectors over the padded row (np
// entries; colscale padded too): row = s colscale dot + Bm[i] (+ M[i] in masked windows).
// Full-vector stores only: the 8-wide bias runs of window 8 stored as halves do not forward
// to the softmax's 16-wide loads (store-forwarding stalls were ~6 % of a window-8 forward).
// Falls back to window_logits without the matrix (large windows, float64).
template <typename scalar_t, typename acc_t>
GRL_INLINE void window_logits_row(const WindowArgs<scalar_t, acc_t>& A, const WindowIndex& I, int64_t h, int64_t i,
                                  acc_t s, const acc_t* rb, acc_t* row, const acc_t* colscale = nullptr) {
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<acc_t, float>::value) {
    if (A.bmat) {
      const int64_t n = A.g.n, np = pad16(n);
      const float* bm = A.bmat + (h * n + i) * np;
      const __m512 sv = _mm512_set1_ps(s), mv = _mm512_set1_ps(kMaskValue);
      const __m512i ri = _mm512_set1_epi32(I.rid[i]);
      for (int64_t j = 0; j < np; j += 16) {
        const __m512 sc = colscale ? _mm512_mul_ps(sv, _mm512_loadu_ps(colscale + j)) : sv;
        __m512 x = _mm512_fmadd_ps(sc, _mm512_loadu_ps(row + j), _mm512_loadu_ps(bm + j));
        if (I.masked) {
          const __mmask16 other = _mm512_cmpneq_epi32_mask(_mm512_loadu_si512(I.rid.data() + j), ri);
          x = _mm512_mask_add_ps(x, other, x, mv);
        }
        _mm512_storeu_ps(row + j, x);
      }
      return;
    }
  }
#endif
  window_logits(A.g, I, i, s, rb, row, colscale);
}

template <typename acc_t>
GRL_INLINE void softmax_row_inplace(acc_t* row, int64_t n) {
  const acc_t sum = exp_shift_sum(row, n, row_max(row, n));
  const acc_t inv = acc_t(1) / sum;
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
}

// Per task range scratch of the forward: the product tiles (zero pads written once: every
// task of a range writes the same data entries), the inverse norms, one query block's logits
// and outputs, and the index of the current window.
template <typename scalar_t, typename acc_t>
struct WindowForwardScratch {
  using T = typename OpType<scalar_t, acc_t>::T;
  static constexpr bool kInPlace = std::is_same<T, acc_t>::value;
  int64_t n, d, dp, dk, np, nk, MB;
  std::vector<T> qA, kB, vB, kT, vT, P;  // kT, vT: token-major raw k, v (bf16 tiles)
  std::vector<acc_t> qinv, kinv, S, Y;
  WindowIndex I;
  explicit WindowForwardScratch(const WindowArgs<scalar_t, acc_t>& A)
      : n(A.g.n), d(A.d), dp(pad16(d)), dk(kpad<T>(d)), np(pad16(n)), nk(kpad<T>(n)), MB(std::min(kQueryBlock, n)),
        qA(n * dk, T(0)), kB(dk * np, T(0)), vB(nk * dp, T(0)), kT(std::is_same<T, uint16_t>::value ? n * dk : 0, T(0)),
        vT(std::is_same<T, uint16_t>::value ? n * dp : 0, T(0)),
        P(kInPlace ? 0 : MB * nk, T(0)), qinv(pad16(n), acc_t(0)), kinv(np, acc_t(0)), S(MB * np), Y(MB * dp), I(A.g) {}
};

template <typename scalar_t, typename acc_t>
void window_forward_task(const WindowArgs<scalar_t, acc_t>& A, int64_t task, int64_t next, scalar_t* out,
                         WindowForwardScratch<scalar_t, acc_t>& W) {
  using T = typename OpType<scalar_t, acc_t>::T;
  using Lay = OpLayout<T>;
  constexpr bool kInPlace = std::is_same<T, acc_t>::value;
  const WindowGeom& g = A.g;
  const int64_t n = g.n, d = A.d, dp = W.dp, dk = W.dk, np = W.np, nk = W.nk;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  W.I.assign(g, win);
  const WindowIndex& I = W.I;
  // contiguous tiles: q rows (A), k^T (B, K = d, N = n), v (B, K = n, N = d), RAW (bfloat16
  // stays exact); the dot products are scaled by 1 / (|q| |k|) in float32
  T *qA = W.qA.data(), *kB = W.kB.data(), *vB = W.vB.data();
  acc_t *qinv = W.qinv.data(), *kinv = W.kinv.data();
  bool gathered = false;
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<T, uint16_t>::value && std::is_same<scalar_t, c10::BFloat16>::value) {
    if (A.vq.sc == 1) {
      // raw rows: q into its tile, k and v token-major into kT, vT, then into their B layouts;
      // the inverse norms from float32 sums of squares
      const uint16_t* base = reinterpret_cast<const uint16_t*>(A.qkv) + b * A.vq.sb + h * d;
      gather_bf16_rows(base, I.pos.data(), n, A.vq.sl, d, qA, dk, qinv);
      gather_bf16_rows(base + A.C, I.pos.data(), n, A.vq.sl, d, W.kT.data(), dk, kinv);
      gather_bf16_rows(base + 2 * A.C, I.pos.data(), n, A.vq.sl, d, W.vT.data(), dp, nullptr);
      inv_norms_from_sumsq(qinv, n);
      inv_norms_from_sumsq(kinv, n);
      bf16_rows_to_kn_pairs(W.kT.data(), n, dk, dk, kB, np);
      bf16_rows_to_nk_pairs(W.vT.data(), n, dp, d, vB, dp);
      gathered = true;
    }
  }
#endif
  if (!gathered) {
    T kb[kMaxStackD + 2], vb[kMaxStackD + 2];
    SumSqRows<acc_t> ssq(qinv), ssk(kinv);
    gather_window(A, I, b, h, [&](int64_t j, acc_t* q, acc_t* k, const acc_t* v) {
      ssq.push_row(q, d);
      ssk.push_row(k, d);
      // (q straight into its tile row: a std::memcpy of run-time length is a libc call per token)
      to_tile_row(q, qA + j * dk, d), to_tile_row(k, kb, d), to_tile_row(v, vb, d);
      for (int64_t c = 0; c < d; ++c) kB[Lay::bidx(c, j, np)] = kb[c], vB[Lay::bidx(j, c, dp)] = vb[c];
    });
    ssq.finish();
    ssk.finish();
    inv_norms_of_sumsq(qinv, n);
    inv_norms_of_sumsq(kinv, n);
  }
  if (next >= 0) prefetch_window_task<scalar_t, acc_t>(A, next, nullptr, nullptr, out);  // the next task's rows, into L2
  const int64_t MB = W.MB;
  acc_t *S = W.S.data(), *Y = W.Y.data();
  const acc_t tau = A.tau[h];
  const acc_t* rb = A.rbias + h * g.table_rows;
  for (int64_t i0 = 0; i0 < n; i0 += MB) {
    const int64_t mb = std::min(MB, n - i0);
    for (int64_t r = 0; r < mb; ++r) prefetch_row_for_write(out + (b * g.H * g.W + I.pos[i0 + r]) * A.C + h * d, d);
    gemm_op<T, acc_t>(mb, np, d, qA + i0 * dk, dk, kB, np, S, np, false);  // cos
    bool fused = false;
#if GRL_ISA_LEVEL >= 2
    if constexpr (std::is_same<acc_t, float>::value) {
      const int nv = static_cast<int>(n / 16);
      if (A.bmat && n % 16 == 0 && nv <= 4) {
        float sc[kQueryBlock];
        for (int64_t r = 0; r < mb; ++r) sc[r] = tau * qinv[i0 + r];
        const float* bm = A.bmat + (h * n + i0) * np;
        const int* ids = I.rid.data() + i0;
        T* pr = kInPlace ? reinterpret_cast<T*>(S) : W.P.data();
        const int64_t ldo = kInPlace ? np : nk;
        const float* S0 = S;
        auto bias = [bm, np](int64_t r, int v) { return _mm512_loadu_ps(bm + r * np + 16 * v); };
        softmax_block_regs_nv(nv, bias, S0, np, mb, I.rid.data(), ids, I.masked, sc, kinv, pr, ldo);
        fused = true;
      }
    }
#endif
    if (!fused) {
      for (int64_t r = 0; r < mb; ++r) {
        acc_t* row = S + r * np;
        window_logits_row(A, I, h, i0 + r, tau * qinv[i0 + r], rb, row, kinv);
        T* pr = kInPlace ? reinterpret_cast<T*>(row) : W.P.data() + r * nk;
        softmax_to(row, n, pr, [](acc_t x) { return Lay::from(x); });
      }
    }
    const T* Pm = kInPlace ? reinterpret_cast<const T*>(S) : W.P.data();
    gemm_op<T, acc_t>(mb, dp, n, Pm, kInPlace ? np : nk, vB, dp, Y, dp, false);  // P v
    for (int64_t r = 0; r < mb; ++r) store_row(out + (b * g.H * g.W + I.pos[i0 + r]) * A.C + h * d, Y + r * dp, d);
  }
}

// One query row of the softmax backward, shared by both backward tasks: dP -> dS = P (dP - D)
// in place, D = sum_j P dP from the same P and dP; returns the row's sum dS * cos (its tau
// gradient term); adds dS into the row's bias-gradient entries of rdb (REVERSED table order:
// the row starts at R - 1 - qoff and key (y2, x2) is at + y2 * side + x2).
template <typename acc_t>
static GRL_INLINE acc_t softmax_row_backward(const WindowGeom& g, int64_t qoff, const acc_t* pr, const acc_t* cr,
                                             acc_t* dr, acc_t* rdb) {
  const int64_t n = g.n, ws = g.ws, side = g.table_side;
  const acc_t D = row_dot(pr, dr, n);
  for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - D);  // dS
  acc_t* brow = rdb + (g.table_rows - 1 - qoff);
  for (int64_t y2 = 0; y2 < ws; ++y2) {
    acc_t* o = brow + y2 * side;
    const acc_t* sr = dr + y2 * ws;
    for (int64_t x2 = 0; x2 < ws; ++x2) o[x2] += sr[x2];
  }
  return row_dot(dr, cr, n);
}

#if GRL_ISA_LEVEL >= 2
// Backward on vdpbf16ps tiles (bfloat16 inputs, AVX512-BF16), float32 accumulation.
// With raw rows q, k, v (bf16, exact in the tiles), rq = 1 / max(|q|, eps), rk likewise:
//   cos    = rq_i rk_j (q_i . k_j)          raw dots on the forward's tiles (same bits as its
//                                             logits: window_logits with tau rq_i and rk_j)
//   dP     = dY v^T                          dY, v exact
//   dS     = P (dP - D),  D = sum_j P dP      float32, from these P and dP
//   dq_hat = sum_j bf16(tau rk_j dS_ij) k_j   (A = scaled dS rows, B = raw k, K = n tokens)
//   dk_hat^T += q^T bf16(tau rq_i dS_ij)      (A = raw q^T, B = scaled dS as VNNI pairs of
//   dv^T     += dY^T bf16(P_ij)                 query rows, K = the block's 32 queries)
// The two transposed products are computed transposed (d x n outputs, transposed back
// once per task), so the per-block packing writes contiguous rows (pairs of query rows
// interleaved) instead of transposing dS and P. Only P and tau-scaled dS are rounded to
// bf16 (the reference in bf16 rounds them, and q_hat, k_hat, too).
template <typename scalar_t, typename acc_t>
void window_backward_task_bf16(const WindowArgs<scalar_t, acc_t>& A, int64_t task, int64_t next, const scalar_t* gout,
                               scalar_t* gqkv, acc_t* dtau, acc_t* rdbias) {
  using T = uint16_t;
  using Lay = OpLayout<T>;
  const WindowGeom& g = A.g;
  const int64_t n = g.n, d = A.d, dp = pad16(d), dk = kpad<T>(d), np = pad16(n), nk = kpad<T>(n), C = A.C;
  const int64_t L = g.H * g.W, R = g.table_rows;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const WindowIndex I(g, win);
  // bf16 tiles of the raw rows: q (A of cos, n x dk), k^T (B of cos, K = d, N = np),
  // v^T (B of dP, K = d, N = np), k (B of dq, K = nk, N = dp), q^T (A of dk^T, d x nk);
  // float32 q_hat, k_hat rows (dp wide) and norms for the normalize backward.
  std::vector<T> qA(n * dk, T(0)), kB(dk * np, T(0)), vB(dk * np, T(0)), kR(nk * dp, T(0)), qT(d * nk, T(0));
  std::vector<acc_t> qh(n * dp, acc_t(0)), kh(n * dp, acc_t(0)), qn(n), kn(n), qinv(n), kinv(np, acc_t(0)), tkinv(n);
  const acc_t tau = A.tau[h];
  // In the K = d tiles (k^T, v^T) the VNNI pair (2p, 2p + 1) of column j is 32-bit word p
  // of row j: one 32-bit store per channel pair.
  T qb[kMaxStackD + 2], kb[kMaxStackD + 2], vb[kMaxStackD + 2];
  qb[d] = kb[d] = vb[d] = T(0);  // the K pad when d is odd
  uint32_t* kB32 = reinterpret_cast<uint32_t*>(kB.data());
  uint32_t* vB32 = reinterpret_cast<uint32_t*>(vB.data());
  gather_window(A, I, b, h, [&](int64_t j, acc_t* q, acc_t* k, const acc_t* v) {
    qinv[j] = inv_norm(q, d);
    kinv[j] = inv_norm(k, d);
    tkinv[j] = tau * kinv[j];
    bf16_bits_row(q, qb, d), bf16_bits_row(k, kb, d), bf16_bits_row(v, vb, d);
    for (int64_t c = 0; c < dk; ++c) qA[j * dk + c] = qb[c];  // a loop: memcpy of run-time length is a libc call
    for (int64_t p = 0; p < dk / 2; ++p) {
      std::memcpy(kB32 + p * np + j, kb + 2 * p, sizeof(uint32_t));
      std::memcpy(vB32 + p * np + j, vb + 2 * p, sizeof(uint32_t));
    }
    T* kr = kR.data() + Lay::bidx(j, 0, dp);
    for (int64_t c = 0; c < d; ++c) kr[2 * c] = kb[c], qT[c * nk + j] = qb[c];
    qn[j] = normalize_inplace(q, d);
    kn[j] = normalize_inplace(k, d);
    for (int64_t c = 0; c < d; ++c) qh[j * dp + c] = q[c], kh[j * dp + c] = k[c];
  });
  if (next >= 0) prefetch_window_task(A, next, gout, gqkv);  // the next task's rows, into L2
  const int64_t MB = std::min(kQueryBlock, n), MBk = kpad<T>(MB);
  // per block: raw dots -> P (mb x np), cos, dP -> dS; bf16 operands: dY rows (A of dP),
  // dY^T (A of dv^T, d x MBk), tau rk dS rows (A of dq, mb x nk), VNNI pairs of
  // tau rq dS and of P (B of dk^T and dv^T, K = mb, N = np)
  std::vector<acc_t> P(MB * np), cs(MB * np), dP(MB * np), dQ(MB * dp), dKT(d * np, acc_t(0)), dVT(d * np, acc_t(0));
  std::vector<T> dYA(MB * dk, T(0)), dYT(d * MBk, T(0)), dSA(MB * nk, T(0)), dSB(MBk * np, T(0)), PB(MBk * np, T(0));
  const acc_t* rb = A.rbias + h * R;
  acc_t* rdb = rdbias + h * R;
  double dt = 0;  // sum of ~n^2 terms with cancellation: rows in acc_t, the total in double
  for (int64_t i0 = 0; i0 < n; i0 += MB) {
    const int64_t mb = std::min(MB, n - i0);
    for (int64_t r = 0; r < mb; ++r) prefetch_row(gout + (b * L + I.pos[i0 + r]) * C + h * d, d, 1);
    gemm_op<T, acc_t>(mb, np, d, qA.data() + i0 * dk, dk, kB.data(), np, P.data(), np, false);  // raw dots
    for (int64_t r = 0; r < mb; ++r) {
      const int64_t i = i0 + r;
      acc_t* pr = P.data() + r * np;
      acc_t* cr = cs.data() + r * np;
      for (int64_t j = 0; j < n; ++j) cr[j] = qinv[i] * kinv[j] * pr[j];  // cos
      window_logits_row(A, I, h, i, tau * qinv[i], rb, pr, kinv.data());  // as the forward
      softmax_row_inplace(pr, n);
      const T* gy = reinterpret_cast<const T*>(gout + (b * L + I.pos[i]) * C + h * d);
      for (int64_t c = 0; c < d; ++c) dYA[r * dk + c] = gy[c], dYT[c * MBk + r] = gy[c];
    }
    if (mb & 1)
      for (int64_t c = 0; c < d; ++c) dYT[c * MBk + mb] = T(0);  // K pad of dv^T
    gemm_op<T, acc_t>(mb, np, d, dYA.data(), dk, vB.data(), np, dP.data(), np, false);  // dP = dY v^T
    for (int64_t r = 0; r < mb; ++r) {
      const acc_t* pr = P.data() + r * np;
      const acc_t* cr = cs.data() + r * np;
      acc_t* dr = dP.data() + r * np;
      dt += softmax_row_backward(g, I.qoff[i0 + r], pr, cr, dr, rdb);
      T* sa = dSA.data() + r * nk;
      for (int64_t j = 0; j < n; ++j) sa[j] = float_to_bf16_bits(tkinv[j] * dr[j]);
    }
    for (int64_t r = 0; r < mb; r += 2) {  // query rows (r, r + 1) -> one VNNI pair row
      const bool two = r + 1 < mb;
      const acc_t* d1 = dP.data() + r * np;
      const acc_t* p1 = P.data() + r * np;
      const acc_t s0 = tau * qinv[i0 + r], s1 = two ? tau * qinv[i0 + r + 1] : acc_t(0);
      pack_pair_bf16(d1, s0, two ? d1 + np : nullptr, s1, n, dSB.data() + r * np);
      pack_pair_bf16(p1, acc_t(1), two ? p1 + np : nullptr, acc_t(1), n, PB.data() + r * np);
    }
    gemm_op<T, acc_t>(mb, dp, n, dSA.data(), nk, kR.data(), dp, dQ.data(), dp, false);             // dq_hat
    gemm_op<T, acc_t>(d, np, mb, qT.data() + i0, nk, dSB.data(), np, dKT.data(), np, true);        // dk_hat^T
    gemm_op<T, acc_t>(d, np, mb, dYT.data(), MBk, PB.data(), np, dVT.data(), np, true);            // dv^T
    for (int64_t r = 0; r < mb; ++r) {
      acc_t* dq = dQ.data() + r * dp;
      normalize_backward_inplace(dq, qh.data() + (i0 + r) * dp, qn[i0 + r], d);
      store_row(gqkv + (b * L + I.pos[i0 + r]) * 3 * C + h * d, dq, d);
    }
  }
  store_kv_grads_transposed(dKT.data(), dVT.data(), np, n, kh.data(), dp, kn.data(), d, C,
                            [&](int64_t j) { return gqkv + (b * L + I.pos[j]) * 3 * C + C + h * d; });
  dtau[h] += static_cast<acc_t>(dt);
}
#endif

// rdbias: this chunk's bias gradient in REVERSED table order (the driver flips it).
// Float tiles (GEMM 1, strided A views for the transposed products): normalized rows,
// cos = q_hat k_hat^T, dP = dY v^T, dS = P (dP - D), dq_hat = tau dS k_hat,
// dk_hat += tau dS^T q_hat, dv += P^T dY per query block.
template <typename scalar_t, typename acc_t>
void window_backward_task(const WindowArgs<scalar_t, acc_t>& A, int64_t task, int64_t next, const scalar_t* gout,
                          scalar_t* gqkv, acc_t* dtau, acc_t* rdbias) {
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<typename OpType<scalar_t, acc_t>::T, uint16_t>::value) {
    window_backward_task_bf16(A, task, next, gout, gqkv, dtau, rdbias);
    return;
  } else
#endif
  {
  const WindowGeom& g = A.g;
  const int64_t n = g.n, d = A.d, dp = pad16(d), C = A.C, L = g.H * g.W;
  const int64_t R = g.table_rows;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  const WindowIndex I(g, win);
  // normalized q_hat, k_hat (n x dp), k_hat^T (d x n), v (n x dp), v^T (d x n), the norms
  std::vector<acc_t> qh(n * dp, acc_t(0)), qn(n), kh(n * dp, acc_t(0)), kT(d * n), kn(n), vT(d * n);
  gather_window(A, I, b, h, [&](int64_t j, acc_t* q, acc_t* k, const acc_t* v) {
    qn[j] = normalize_inplace(q, d);
    kn[j] = normalize_inplace(k, d);
    for (int64_t c = 0; c < d; ++c) {
      qh[j * dp + c] = q[c];
      kh[j * dp + c] = k[c];
      kT[c * n + j] = k[c];
      vT[c * n + j] = v[c];
    }
  });
  if (next >= 0) prefetch_window_task(A, next, gout, gqkv);  // the next task's rows, into L2
  const int64_t MB = std::min(kQueryBlock, n);
  std::vector<acc_t> S(MB * n), P(MB * n), dP(MB * n), dY(MB * dp, acc_t(0)), dQ(MB * dp), dK(n * dp, acc_t(0)),
      dV(n * dp, acc_t(0));
  const acc_t tau = A.tau[h];
  const acc_t* rb = A.rbias + h * R;
  acc_t* rdb = rdbias + h * R;
  double dt = 0;  // sum of ~n^2 terms with cancellation: rows in acc_t, the total in double
  for (int64_t i0 = 0; i0 < n; i0 += MB) {
    const int64_t mb = std::min(MB, n - i0);
    for (int64_t r = 0; r < mb; ++r) prefetch_row(gout + (b * L + I.pos[i0 + r]) * C + h * d, d, 1);
    gemm<acc_t>(mb, n, d, acc_t(1), qh.data() + i0 * dp, dp, 1, kT.data(), n, S.data(), n, false);  // cos
    for (int64_t r = 0; r < mb; ++r) {
      acc_t* pr = P.data() + r * n;
      const acc_t* cr = S.data() + r * n;
      for (int64_t j = 0; j < n; ++j) pr[j] = cr[j];
      window_logits(g, I, i0 + r, tau, rb, pr);
      softmax_row_inplace(pr, n);
      load_row(gout + (b * L + I.pos[i0 + r]) * C + h * d, 1, d, dY.data() + r * dp);
    }
    gemm<acc_t>(mb, n, d, acc_t(1), dY.data(), dp, 1, vT.data(), n, dP.data(), n, false);  // dP = dY v^T
    for (int64_t r = 0; r < mb; ++r) {
      const acc_t* pr = P.data() + r * n;
      const acc_t* cr = S.data() + r * n;
      acc_t* dr = dP.data() + r * n;
      dt += softmax_row_backward(g, I.qoff[i0 + r], pr, cr, dr, rdb);
    }
    gemm<acc_t>(mb, dp, n, tau, dP.data(), n, 1, kh.data(), dp, dQ.data(), dp, false);               // dq_hat
    gemm<acc_t>(n, dp, mb, tau, dP.data(), 1, n, qh.data() + i0 * dp, dp, dK.data(), dp, true);      // dk_hat
    gemm<acc_t>(n, dp, mb, acc_t(1), P.data(), 1, n, dY.data(), dp, dV.data(), dp, true);            // dv
    for (int64_t r = 0; r < mb; ++r) {
      acc_t* dq = dQ.data() + r * dp;
      normalize_backward_inplace(dq, qh.data() + (i0 + r) * dp, qn[i0 + r], d);
      store_row(gqkv + (b * L + I.pos[i0 + r]) * 3 * C + h * d, dq, d);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    acc_t* dkr = dK.data() + j * dp;
    normalize_backward_inplace(dkr, kh.data() + j * dp, kn[j], d);
    scalar_t* gk = gqkv + (b * L + I.pos[j]) * 3 * C + C + h * d;
    store_row(gk, dkr, d);
    store_row(gk + C, dV.data() + j * dp, d);
  }
  dtau[h] += static_cast<acc_t>(dt);
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void window_forward_range(const WindowArgs<scalar_t, acc_t>& A, int64_t t0, int64_t t1, scalar_t* out) {
  if (t0 >= t1) return;
  WindowForwardScratch<scalar_t, acc_t> W(A);
  for (int64_t t = t0; t < t1; ++t) window_forward_task(A, t, t + 1 < t1 ? t + 1 : -1, out, W);
}

template <typename scalar_t, typename acc_t>
void window_backward_range(const WindowArgs<scalar_t, acc_t>& A, int64_t t0, int64_t t1, const scalar_t* gout,
                           scalar_t* gqkv, acc_t* dtau, acc_t* rdbias) {
  for (int64_t t = t0; t < t1; ++t) window_backward_task(A, t, t + 1 < t1 ? t + 1 : -1, gout, gqkv, dtau, rdbias);
}

#define GRL_WINDOW_INSTANTIATE(S, A_)                                                              \
  template void window_forward_range<S, A_>(const WindowArgs<S, A_>&, int64_t, int64_t, S*);      \
  template void window_backward_range<S, A_>(const WindowArgs<S, A_>&, int64_t, int64_t, const S*, S*, A_*, A_*);
GRL_WINDOW_INSTANTIATE(float, float)
GRL_WINDOW_INSTANTIATE(double, double)
GRL_WINDOW_INSTANTIATE(c10::BFloat16, float)
#undef GRL_WINDOW_INSTANTIATE

}  // namespace GRL_ISA
}  // namespace cpu
}  // namespace grl
