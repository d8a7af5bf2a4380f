// grl_cpu_window.cpp -- fused CPU kernels of GRL's (shifted) window attention (forward, backward).
//
// Per window and head: Y = softmax_j(tau q_hat_i . k_hat_j + B[rel(i, j)] + M[i, j]) v, with
// x_hat = x / max(||x||, 1e-12). One task = (batch, window, head): the window's normalized
// q, k, v go to thread scratch (N x d), query blocks of 32 rows are complete (N entries) and
// use an exact softmax; the backward recomputes them (no saved state).
#include "grl_cpu_common.h"

namespace grl {
namespace cpu {

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

// One window/head in thread scratch: normalized q_hat (n x dp) and k_hat (n x dp), k_hat^T
// (d x n), v (n x dp), v^T (d x n); rows zero-padded to dp = pad16(d) for the GEMM tiles.
template <typename scalar_t, typename acc_t>
struct WindowTile {
  int64_t n, d, dp;
  std::vector<acc_t> qh, qn, kh, kT, kn, v, vT;
  std::vector<int64_t> pos, qoff;
  std::vector<int> rid;
  WindowTile(int64_t n_, int64_t d_, bool backward)
      : n(n_), d(d_), dp(pad16(d_)), qh(n_ * dp, acc_t(0)), qn(n_), kh(backward ? n_ * dp : 0, acc_t(0)), kT(d_ * n_),
        kn(n_), v(n_ * dp, acc_t(0)), vT(backward ? d_ * n_ : 0), pos(n_), qoff(n_), rid(n_) {}

  void load(const WindowArgs<scalar_t, acc_t>& A, int64_t b, int64_t win, int64_t h, bool backward) {
    const WindowGeom& g = A.g;
    const int64_t side = g.table_side;
    const scalar_t* base = A.qkv + b * A.vq.sb + h * d * A.vq.sc;
    // positions first, walking the window row by row on the rolled grid (no divisions)
    const int64_t r0 = win / g.windows_w * g.ws, c0 = win % g.windows_w * g.ws;
    for (int64_t j = 0, y = 0, x = 0; j < n; ++j) {
      pos[j] = window_token_position_rc(g, r0 + y, c0 + x);
      qoff[j] = (y + g.ws - 1) * side + (x + g.ws - 1);  // rel row = qoff[i] - (y2 * side + x2)
      rid[j] = g.shift > 0 ? window_token_region_rc(g, r0 + y, c0 + x) : 0;
      if (++x == g.ws) x = 0, ++y;
    }
    // then the rows, prefetched kPrefetch tokens ahead (they are scattered over the image)
    auto prefetch = [&](int64_t j) {
      const scalar_t* qp = base + pos[j] * A.vq.sl;
      for (int part = 0; part < 3; ++part) prefetch_row(qp + part * A.C * A.vq.sc, d, A.vq.sc);
    };
    for (int64_t j = 0; j < std::min(kPrefetch, n); ++j) prefetch(j);
    for (int64_t j = 0; j < n; ++j) {
      if (j + kPrefetch < n) prefetch(j + kPrefetch);
      const scalar_t* qp = base + pos[j] * A.vq.sl;
      const scalar_t* kp = qp + A.C * A.vq.sc;
      const scalar_t* vp = kp + A.C * A.vq.sc;
      acc_t* qr = qh.data() + j * dp;
      acc_t* vr = v.data() + j * dp;
      acc_t kr[kMaxStackD];
      acc_t* kk = backward ? kh.data() + j * dp : kr;
      load_row(qp, A.vq.sc, d, qr);
      load_row(kp, A.vq.sc, d, kk);
      load_row(vp, A.vq.sc, d, vr);
      qn[j] = normalize_inplace(qr, d);
      kn[j] = normalize_inplace(kk, d);
      for (int64_t c = 0; c < d; ++c) kT[c * n + j] = kk[c];
      if (backward)
        for (int64_t c = 0; c < d; ++c) vT[c * n + j] = vr[c];
    }
  }

  // Row i of the probabilities: P[j] = softmax_j(tau * cos[j] + B[rel(i, j)] + M[i, j]) (normalized).
  void softmax_row(const WindowArgs<scalar_t, acc_t>& A, int64_t i, acc_t tau, const acc_t* bias, const acc_t* cs,
                   acc_t* P) const {
    const WindowGeom& g = A.g;
    const int64_t ws = g.ws, side = g.table_side;
    const bool masked = g.shift > 0;
    const int ri = rid[i];
    for (int64_t y2 = 0; y2 < ws; ++y2) {
      const acc_t* brow = bias + qoff[i] - y2 * side;  // x2 runs backwards through the table row
      const acc_t* c = cs + y2 * ws;
      acc_t* o = P + y2 * ws;
      const int* rr = rid.data() + y2 * ws;
      for (int64_t x2 = 0; x2 < ws; ++x2) {
        acc_t val = tau * c[x2] + brow[-x2];
        if (masked) val += (ri != rr[x2]) ? acc_t(kMaskValue) : acc_t(0);
        o[x2] = val;
      }
    }
    const acc_t sum = exp_shift_sum(P, n, row_max(P, n));
    const acc_t inv = acc_t(1) / sum;
    for (int64_t j = 0; j < n; ++j) P[j] *= inv;
  }
};

constexpr int64_t kQueryBlock = 32;  // query rows per block of window attention

template <typename scalar_t, typename acc_t>
void window_forward_task(const WindowArgs<scalar_t, acc_t>& A, int64_t task, scalar_t* out) {
  const WindowGeom& g = A.g;
  const int64_t n = g.n, d = A.d;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  WindowTile<scalar_t, acc_t> T(n, d, false);
  T.load(A, b, win, h, false);
  const int64_t dp = T.dp, MB = std::min(kQueryBlock, n);
  std::vector<acc_t> S(MB * n), P(MB * n), Y(MB * dp);
  const acc_t tau = A.tau[h];
  const acc_t* bias = A.bias + h * g.table_rows;
  for (int64_t i0 = 0; i0 < n; i0 += MB) {
    const int64_t mb = std::min(MB, n - i0);
    for (int64_t r = 0; r < mb; ++r) prefetch_row_for_write(out + (b * g.H * g.W + T.pos[i0 + r]) * A.C + h * d, d);
    gemm<acc_t>(mb, n, d, acc_t(1), T.qh.data() + i0 * dp, dp, 1, T.kT.data(), n, S.data(), n, false);  // cos
    for (int64_t r = 0; r < mb; ++r) T.softmax_row(A, i0 + r, tau, bias, S.data() + r * n, P.data() + r * n);
    gemm<acc_t>(mb, dp, n, acc_t(1), P.data(), n, 1, T.v.data(), dp, Y.data(), dp, false);  // P v
    for (int64_t r = 0; r < mb; ++r) {
      scalar_t* op = out + (b * g.H * g.W + T.pos[i0 + r]) * A.C + h * d;
      for (int64_t c = 0; c < d; ++c) op[c] = static_cast<scalar_t>(Y[r * dp + c]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void window_backward_task(const WindowArgs<scalar_t, acc_t>& A, int64_t task, const scalar_t* gout, scalar_t* gqkv,
                          acc_t* dtau, acc_t* dbias) {
  const WindowGeom& g = A.g;
  const int64_t n = g.n, d = A.d, C = A.C, L = g.H * g.W, ws = g.ws, side = g.table_side;
  const int64_t h = task % A.nh, win = (task / A.nh) % g.num_windows, b = task / (A.nh * g.num_windows);
  WindowTile<scalar_t, acc_t> T(n, d, true);
  T.load(A, b, win, h, true);
  const int64_t dp = T.dp, MB = std::min(kQueryBlock, n);
  std::vector<acc_t> S(MB * n), P(MB * n), dP(MB * n), dY(MB * dp, acc_t(0)), dQ(MB * dp), dK(n * dp, acc_t(0)),
      dV(n * dp, acc_t(0));
  const acc_t tau = A.tau[h];
  const acc_t* bias = A.bias + h * g.table_rows;
  acc_t* db = dbias + h * g.table_rows;
  double dt = 0;  // sum of ~n^2 terms with cancellation: rows in acc_t, the total in double
  for (int64_t i0 = 0; i0 < n; i0 += MB) {
    const int64_t mb = std::min(MB, n - i0);
    for (int64_t r = 0; r < mb; ++r) prefetch_row(gout + (b * L + T.pos[i0 + r]) * C + h * d, d, 1);
    gemm<acc_t>(mb, n, d, acc_t(1), T.qh.data() + i0 * dp, dp, 1, T.kT.data(), n, S.data(), n, false);  // cos
    for (int64_t r = 0; r < mb; ++r) {
      T.softmax_row(A, i0 + r, tau, bias, S.data() + r * n, P.data() + r * n);
      const scalar_t* gp = gout + (b * L + T.pos[i0 + r]) * C + h * d;
      for (int64_t c = 0; c < d; ++c) dY[r * dp + c] = static_cast<acc_t>(gp[c]);
    }
    gemm<acc_t>(mb, n, d, acc_t(1), dY.data(), dp, 1, T.vT.data(), n, dP.data(), n, false);  // dP = dY v^T
    for (int64_t r = 0; r < mb; ++r) {
      const acc_t* pr = P.data() + r * n;
      const acc_t* cr = S.data() + r * n;
      acc_t* dr = dP.data() + r * n;
      const acc_t D = row_dot(pr, dr, n);
      for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - D);  // dS
      dt += row_dot(dr, cr, n);
      const int64_t qo = T.qoff[i0 + r];
      for (int64_t y2 = 0; y2 < ws; ++y2) {
        acc_t* brow = db + qo - y2 * side;
        const acc_t* sr = dr + y2 * ws;
        for (int64_t x2 = 0; x2 < ws; ++x2) brow[-x2] += sr[x2];
      }
    }
    gemm<acc_t>(mb, dp, n, tau, dP.data(), n, 1, T.kh.data(), dp, dQ.data(), dp, false);               // dq_hat
    gemm<acc_t>(n, dp, mb, tau, dP.data(), 1, n, T.qh.data() + i0 * dp, dp, dK.data(), dp, true);      // dk_hat
    gemm<acc_t>(n, dp, mb, acc_t(1), P.data(), 1, n, dY.data(), dp, dV.data(), dp, true);              // dv
    for (int64_t r = 0; r < mb; ++r) {
      acc_t* dq = dQ.data() + r * dp;
      normalize_backward_inplace(dq, T.qh.data() + (i0 + r) * dp, T.qn[i0 + r], d);
      scalar_t* gq = gqkv + (b * L + T.pos[i0 + r]) * 3 * C + h * d;
      for (int64_t c = 0; c < d; ++c) gq[c] = static_cast<scalar_t>(dq[c]);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    acc_t* dkr = dK.data() + j * dp;
    normalize_backward_inplace(dkr, T.kh.data() + j * dp, T.kn[j], d);
    scalar_t* gk = gqkv + (b * L + T.pos[j]) * 3 * C + C + h * d;
    scalar_t* gv = gk + C;
    for (int64_t c = 0; c < d; ++c) {
      gk[c] = static_cast<scalar_t>(dkr[c]);
      gv[c] = static_cast<scalar_t>(dV[j * dp + c]);
    }
  }
  dtau[h] += static_cast<acc_t>(dt);
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

std::vector<at::Tensor> window_forward(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
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
  return {out};  // no saved state: the backward recomputes complete rows
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

}  // namespace cpu
}  // namespace grl
