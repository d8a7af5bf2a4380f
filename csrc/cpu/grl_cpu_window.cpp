// grl_cpu_window.cpp -- fused CPU kernels of GRL's (shifted) window attention (forward, backward).
//
// Per window and head: Y = softmax_j(tau q_hat_i . k_hat_j + B[rel(i, j)] + M[i, j]) v, with
// x_hat = x / max(||x||, 1e-12). One task = (batch, window, head): the window's normalized
// q, k, v go to thread scratch (N x d), query blocks of 32 rows are complete (N entries) and
// use an exact softmax; the backward recomputes them (no saved state). The task code
// (grl_cpu_window_impl.h) is compiled once per instruction set and chosen at run time.
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
  const acc_t* rbias;                   // the bias table reversed (grl_cpu_common.h)
  const acc_t* bmat;                    // (nh, n, pad16(n)) bias per (query, key), or nullptr
  WindowGeom g; int64_t B, C, nh, d;
};

}  // namespace
}  // namespace cpu
}  // namespace grl

// ---- the task code, once per instruction set
#define GRL_ISA_IMPL "grl_cpu_window_impl.h"
#include "grl_cpu_isa_instances.h"

namespace grl {
namespace cpu {
namespace {

template <typename scalar_t, typename acc_t>
void window_forward_dispatch(const WindowArgs<scalar_t, acc_t>& A, int64_t t0, int64_t t1, scalar_t* out) {
  switch (isa_level()) {
#if GRL_X86
    case 3: isa_avx512::window_forward_range(A, t0, t1, out); return at::native::cpublas::brgemm_release();
    case 2: return isa_avx512::window_forward_range(A, t0, t1, out);
    case 1: return isa_avx2::window_forward_range(A, t0, t1, out);
#endif
    default: return isa_base::window_forward_range(A, t0, t1, out);
  }
}

template <typename scalar_t, typename acc_t>
void window_backward_dispatch(const WindowArgs<scalar_t, acc_t>& A, int64_t t0, int64_t t1, const scalar_t* go,
                              scalar_t* gq, acc_t* dt, acc_t* rdb) {
  switch (isa_level()) {
#if GRL_X86
    case 3:
      isa_avx512::window_backward_range(A, t0, t1, go, gq, dt, rdb);
      return at::native::cpublas::brgemm_release();
    case 2: return isa_avx512::window_backward_range(A, t0, t1, go, gq, dt, rdb);
    case 1: return isa_avx2::window_backward_range(A, t0, t1, go, gq, dt, rdb);
#endif
    default: return isa_base::window_backward_range(A, t0, t1, go, gq, dt, rdb);
  }
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

// Windows of at most this many tokens read their logits' bias from a per-call matrix (nh x n
// x pad16(n) floats: 32 KiB a head at window 8, 256 KiB at 16); larger ones from table runs.
constexpr int64_t kBiasMatrixMaxTokens = 256;

// The bias of every (query, key) pair of a window, per head: B[h, i, j] = table[rel(i, j)]
// (the same for every window; the shift masks are added per window). Rows padded to 16
// entries with zeros. Float32 only (the AVX-512 logits read it); undefined otherwise.
at::Tensor window_bias_matrix(const at::Tensor& rbias, const WindowGeom& g, int64_t nh) {
  if (rbias.scalar_type() != at::kFloat || g.n > kBiasMatrixMaxTokens || isa_level() < 2) return at::Tensor();
  const int64_t n = g.n, np = (n + 15) / 16 * 16, ws = g.ws, side = g.table_side, R = g.table_rows;
  auto bm = at::zeros({nh, n, np}, rbias.options());
  const float* rb = rbias.data_ptr<float>();
  float* o = bm.data_ptr<float>();
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t i = 0; i < n; ++i) {
      // window_logits' indexing: query (yi, xi) reads rb + R - 1 - qoff(i) + y2 * side + x2
      const int64_t qoff = (i / ws + ws - 1) * side + (i % ws + ws - 1);
      const float* base = rb + h * R + (R - 1 - qoff);
      float* row = o + (h * n + i) * np;
      for (int64_t j = 0; j < n; ++j) row[j] = base[j / ws * side + j % ws];
    }
  return bm;
}

template <typename scalar_t, typename acc_t>
WindowArgs<scalar_t, acc_t> window_args(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                                        const at::Tensor& rbias, const at::Tensor& bmat, const WindowGeom& g,
                                        int64_t nh) {
  WindowArgs<scalar_t, acc_t> A;
  A.qkv = qkv.data_ptr<scalar_t>();
  A.vq = {qkv.stride(0), qkv.stride(1), qkv.stride(2)};
  A.tau = tau.data_ptr<acc_t>(); A.bias = bias.data_ptr<acc_t>(); A.rbias = rbias.data_ptr<acc_t>();
  A.bmat = bmat.defined() ? bmat.data_ptr<acc_t>() : nullptr;
  A.g = g; A.B = qkv.size(0); A.C = qkv.size(2) / 3; A.nh = nh; A.d = A.C / nh;
  return A;
}

// The kernels on the task ranges, into the given buffers (out (B, L, C); gqkv (B, L, 3C); the
// zeroed per-chunk partials dtau (chunks, nh), rdbias (chunks, nh, R), reversed table order).
void window_forward_run(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias, const WindowGeom& g,
                        int64_t nh, const at::Tensor& out, const TaskRanges& ranges) {
  const auto rb = reversed_bias(bias);
  const auto bm = window_bias_matrix(rb, g, nh);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "grl_window_forward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const auto A = window_args<scalar_t, acc_t>(qkv, tau, bias, rb, bm, g, nh);
    scalar_t* o = out.data_ptr<scalar_t>();
    for_task_ranges(ranges, [&](int64_t t0, int64_t t1) { window_forward_dispatch(A, t0, t1, o); });
  });
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& qkv, const WindowGeom& g) {
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == qkv.scalar_type() &&
                  grad_out.numel() == qkv.size(0) * g.H * g.W * (qkv.size(2) / 3),
              "grl cpu kernels: grad_out must be a contiguous (B, H*W, C) tensor of qkv's dtype");
}

void window_backward_run(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& tau,
                         const at::Tensor& bias, const WindowGeom& g, int64_t nh, const at::Tensor& gqkv,
                         const at::Tensor& dtau, const at::Tensor& dbias, const TaskRanges& ranges) {
  const int64_t tasks = qkv.size(0) * g.num_windows * nh;
  const int64_t chunks = dtau.size(0);
  const auto rb = reversed_bias(bias);
  const auto bm = window_bias_matrix(rb, g, nh);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "grl_window_backward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const auto A = window_args<scalar_t, acc_t>(qkv, tau, bias, rb, bm, g, nh);
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    scalar_t* gq = gqkv.data_ptr<scalar_t>();
    acc_t* dt = dtau.data_ptr<acc_t>();
    acc_t* db = dbias.data_ptr<acc_t>();
    for_chunk_subranges(tasks, chunks, ranges, [&](int64_t ch, int64_t t0, int64_t t1) {
      window_backward_dispatch(A, t0, t1, go, gq, dt + ch * nh, db + ch * nh * g.table_rows);
    });
  });
}

std::vector<at::Tensor> chunk_partials(const at::Tensor& qkv, const WindowGeom& g, int64_t nh) {
  const int64_t chunks = num_chunks(qkv.size(0) * g.num_windows * nh);
  const auto opt = qkv.options().dtype(acc_type_of(qkv.scalar_type()));
  return {at::zeros({chunks, nh}, opt), at::zeros({chunks, nh, g.table_rows}, opt)};
}

}  // namespace

std::vector<at::Tensor> window_forward(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                                       const std::vector<int64_t>& geom, int64_t nh) {
  const WindowGeom g = window_from(geom);
  check_window(qkv, tau, bias, g, nh);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3;
  auto out = at::empty({B, g.H * g.W, C}, qkv.options());
  window_forward_run(qkv, tau, bias, g, nh, out, {0, B * g.num_windows * nh});
  return {out};  // no saved state: the backward recomputes complete rows
}

std::vector<at::Tensor> window_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& tau,
                                        const at::Tensor& bias, const std::vector<int64_t>& geom, int64_t nh) {
  const WindowGeom g = window_from(geom);
  check_window(qkv, tau, bias, g, nh);
  check_grad_out(grad_out, qkv, g);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3;
  auto gqkv = at::empty({B, g.H * g.W, 3 * C}, qkv.options());
  advise_huge_pages(gqkv);  // written whole by the tasks: fault it in 2 MiB at a time
  const auto part = chunk_partials(qkv, g, nh);
  window_backward_run(grad_out, qkv, tau, bias, g, nh, gqkv, part[0], part[1], {0, B * g.num_windows * nh});
  return {gqkv, part[0].sum(0), part[1].sum(0).flip({1})};  // the kernels accumulate in reversed table order
}

// ---- test-only entries (grl_cpu_common.h)
void window_forward_tasks(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                          const std::vector<int64_t>& geom, int64_t nh, const at::Tensor& out,
                          const TaskRanges& ranges) {
  const WindowGeom g = window_from(geom);
  check_window(qkv, tau, bias, g, nh);
  check_task_ranges(ranges, qkv.size(0) * g.num_windows * nh);
  check_buffer(out, qkv.scalar_type(), qkv.size(0) * g.H * g.W * (qkv.size(2) / 3), "out");
  window_forward_run(qkv, tau, bias, g, nh, out, ranges);
}

std::vector<at::Tensor> window_backward_tasks(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& tau,
                                              const at::Tensor& bias, const std::vector<int64_t>& geom, int64_t nh,
                                              const at::Tensor& gqkv, const TaskRanges& ranges) {
  const WindowGeom g = window_from(geom);
  check_window(qkv, tau, bias, g, nh);
  check_grad_out(grad_out, qkv, g);
  check_task_ranges(ranges, qkv.size(0) * g.num_windows * nh);
  check_buffer(gqkv, qkv.scalar_type(), qkv.size(0) * g.H * g.W * qkv.size(2), "gqkv");
  const auto part = chunk_partials(qkv, g, nh);
  window_backward_run(grad_out, qkv, tau, bias, g, nh, gqkv, part[0], part[1], ranges);
  return part;
}

}  // namespace cpu
}  // namespace grl
