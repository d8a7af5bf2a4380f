// grl_cpu_stripe.cpp -- fused CPU kernels of GRL's anchored stripe attention (forward, backward).
//
// Per window and head, with x_hat = x / max(||x||, 1e-12):
//   stage 1  Z = softmax_j(tau1 a_hat_i . k_hat_j + B1[a2w(i,j)] + M1) v     (anchors -> tokens)
//   stage 2  Y = softmax_i(tau2 q_hat_j . a_hat_i + B2[w2a(j,i)] + M2) Z     (tokens -> anchors)
// One task = (batch, window, head). Stage 1 streams blocks of 64 tokens with an online
// softmax and saves Z (N2 x d) and the row log-sum-exp; stage 2 rows (N2 entries) are
// complete and use an exact softmax. The backward recomputes probabilities (pass A: stage 2,
// giving dq, dZ and part of d a_hat; pass B: stage 1 from the saved (m, 1/l), giving dk, dv and
// the rest of d a_hat). Products are register-tiled GEMMs (grl_cpu_kernels.h); the task code
// (grl_cpu_stripe_impl.h) is compiled once per instruction set and chosen at run time.
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
  const acc_t* rbias1; const acc_t* rbias2;       // the bias tables reversed (grl_cpu_common.h)
  StripeGeom g; int64_t B, C, nh, d;
};

}  // namespace
}  // namespace cpu
}  // namespace grl

// ---- the task code, once per instruction set
#define GRL_ISA_IMPL "grl_cpu_stripe_impl.h"
#include "grl_cpu_isa_instances.h"

namespace grl {
namespace cpu {
namespace {

template <typename scalar_t, typename acc_t>
void stripe_forward_dispatch(const StripeArgs<scalar_t, acc_t>& A, int64_t t0, int64_t t1, scalar_t* out, acc_t* z,
                             acc_t* stat1) {
  switch (isa_level()) {
#if GRL_X86
    case 3: isa_avx512::stripe_forward_range(A, t0, t1, out, z, stat1); return at::native::cpublas::brgemm_release();
    case 2: return isa_avx512::stripe_forward_range(A, t0, t1, out, z, stat1);
    case 1: return isa_avx2::stripe_forward_range(A, t0, t1, out, z, stat1);
#endif
    default: return isa_base::stripe_forward_range(A, t0, t1, out, z, stat1);
  }
}

template <typename scalar_t, typename acc_t>
void stripe_backward_dispatch(const StripeArgs<scalar_t, acc_t>& A, int64_t t0, int64_t t1, const scalar_t* go,
                              const acc_t* z, const acc_t* stat1, scalar_t* gq, scalar_t* ga, acc_t* dt1, acc_t* rdb1,
                              acc_t* dt2, acc_t* rdb2) {
  switch (isa_level()) {
#if GRL_X86
    case 3:
      isa_avx512::stripe_backward_range(A, t0, t1, go, z, stat1, gq, ga, dt1, rdb1, dt2, rdb2);
      return at::native::cpublas::brgemm_release();
    case 2: return isa_avx512::stripe_backward_range(A, t0, t1, go, z, stat1, gq, ga, dt1, rdb1, dt2, rdb2);
    case 1: return isa_avx2::stripe_backward_range(A, t0, t1, go, z, stat1, gq, ga, dt1, rdb1, dt2, rdb2);
#endif
    default: return isa_base::stripe_backward_range(A, t0, t1, go, z, stat1, gq, ga, dt1, rdb1, dt2, rdb2);
  }
}

template <typename scalar_t, typename acc_t>
StripeArgs<scalar_t, acc_t> stripe_args(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                                        const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2,
                                        const at::Tensor& rbias1, const at::Tensor& rbias2, const StripeGeom& g,
                                        int64_t nh) {
  StripeArgs<scalar_t, acc_t> A;
  A.qkv = qkv.data_ptr<scalar_t>();
  A.vq = {qkv.stride(0), qkv.stride(1), qkv.stride(2)};
  A.anc = anchor.data_ptr<scalar_t>();
  A.asb = anchor.stride(0); A.ash = anchor.stride(1); A.asw = anchor.stride(2); A.asc = anchor.stride(3);
  A.tau1 = tau1.data_ptr<acc_t>(); A.bias1 = bias1.data_ptr<acc_t>();
  A.tau2 = tau2.data_ptr<acc_t>(); A.bias2 = bias2.data_ptr<acc_t>();
  A.rbias1 = rbias1.data_ptr<acc_t>(); A.rbias2 = rbias2.data_ptr<acc_t>();
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

// The kernels on the task ranges, into the given buffers (out (B, L, C), zsave (tasks, n2, d),
// stat1save (tasks, n2, 2); gqkv (B, L, 3C), ganc (B, Ha, Wa, C); the zeroed per-chunk partials
// dtau (chunks, 2, nh), rdbias (chunks, 2, nh, R), reversed table order).
void stripe_forward_run(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                        const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2, const StripeGeom& g,
                        int64_t nh, const at::Tensor& out, const at::Tensor& zsave, const at::Tensor& stat1save,
                        const TaskRanges& ranges) {
  const auto rb1 = reversed_bias(bias1), rb2 = reversed_bias(bias2);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "grl_stripe_forward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const auto A = stripe_args<scalar_t, acc_t>(qkv, anchor, tau1, bias1, tau2, bias2, rb1, rb2, g, nh);
    scalar_t* o = out.data_ptr<scalar_t>();
    acc_t* z = zsave.data_ptr<acc_t>();
    acc_t* stat1 = stat1save.data_ptr<acc_t>();
    for_task_ranges(ranges, [&](int64_t t0, int64_t t1) { stripe_forward_dispatch(A, t0, t1, o, z, stat1); });
  });
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& zsave,
                           const at::Tensor& stat1save, const StripeGeom& g, int64_t nh) {
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3, d = C / nh;
  const auto acc = acc_type_of(qkv.scalar_type());
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == qkv.scalar_type() &&
                  grad_out.numel() == B * g.H * g.W * C,
              "grl cpu kernels: grad_out must be a contiguous (B, H*W, C) tensor of qkv's dtype");
  TORCH_CHECK(zsave.is_contiguous() && zsave.numel() == B * g.num_windows * nh * g.n2 * d &&
                  stat1save.is_contiguous() && stat1save.numel() == B * g.num_windows * nh * g.n2 * 2 &&
                  zsave.scalar_type() == acc && stat1save.scalar_type() == acc,
              "grl cpu kernels: saved stripe forward state does not match the geometry");
}

void stripe_backward_run(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& anchor,
                         const at::Tensor& tau1, const at::Tensor& bias1, const at::Tensor& tau2,
                         const at::Tensor& bias2, const at::Tensor& zsave, const at::Tensor& stat1save,
                         const StripeGeom& g, int64_t nh, const at::Tensor& gqkv, const at::Tensor& ganc,
                         const at::Tensor& dtau, const at::Tensor& dbias, const TaskRanges& ranges) {
  const int64_t tasks = qkv.size(0) * g.num_windows * nh;
  const int64_t chunks = dtau.size(0);
  const auto rb1 = reversed_bias(bias1), rb2 = reversed_bias(bias2);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "grl_stripe_backward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const auto A = stripe_args<scalar_t, acc_t>(qkv, anchor, tau1, bias1, tau2, bias2, rb1, rb2, g, nh);
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const acc_t* z = zsave.data_ptr<acc_t>();
    const acc_t* stat1 = stat1save.data_ptr<acc_t>();
    scalar_t* gq = gqkv.data_ptr<scalar_t>();
    scalar_t* ga = ganc.data_ptr<scalar_t>();
    acc_t* dt = dtau.data_ptr<acc_t>();
    acc_t* db = dbias.data_ptr<acc_t>();
    const int64_t R = g.table_rows;
    for_chunk_subranges(tasks, chunks, ranges, [&](int64_t ch, int64_t t0, int64_t t1) {
      acc_t* dtc = dt + ch * 2 * nh;
      acc_t* dbc = db + ch * 2 * nh * R;
      stripe_backward_dispatch(A, t0, t1, go, z, stat1, gq, ga, dtc, dbc, dtc + nh, dbc + nh * R);
    });
  });
}

std::vector<at::Tensor> chunk_partials(const at::Tensor& qkv, const StripeGeom& g, int64_t nh) {
  const int64_t chunks = num_chunks(qkv.size(0) * g.num_windows * nh);
  const auto opt = qkv.options().dtype(acc_type_of(qkv.scalar_type()));
  return {at::zeros({chunks, 2, nh}, opt), at::zeros({chunks, 2, nh, g.table_rows}, opt)};
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
  auto stat1save = at::empty({B, g.num_windows, nh, g.n2, 2}, qkv.options().dtype(acc));  // rows' (m, 1/l)
  stripe_forward_run(qkv, anchor, tau1, bias1, tau2, bias2, g, nh, out, zsave, stat1save, {0, B * g.num_windows * nh});
  return {out, zsave, stat1save};
}

std::vector<at::Tensor> stripe_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& anchor,
                                        const at::Tensor& tau1, const at::Tensor& bias1, const at::Tensor& tau2,
                                        const at::Tensor& bias2, const at::Tensor& zsave, const at::Tensor& stat1save,
                                        const std::vector<int64_t>& geom, int64_t nh) {
  const StripeGeom g = stripe_from(geom);
  check_stripe(qkv, anchor, tau1, bias1, tau2, bias2, g, nh);
  check_backward_inputs(grad_out, qkv, zsave, stat1save, g, nh);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3;
  auto gqkv = at::empty({B, g.H * g.W, 3 * C}, qkv.options());
  advise_huge_pages(gqkv);  // written whole by the tasks: fault it in 2 MiB at a time
  auto ganc = at::empty({B, g.Ha, g.Wa, C}, qkv.options());
  const auto part = chunk_partials(qkv, g, nh);
  stripe_backward_run(grad_out, qkv, anchor, tau1, bias1, tau2, bias2, zsave, stat1save, g, nh, gqkv, ganc, part[0],
                      part[1], {0, B * g.num_windows * nh});
  auto dt_sum = part[0].sum(0);
  auto db_sum = part[1].sum(0).flip({2});  // the kernels accumulate in reversed table order
  // clones: the returns must not alias each other (torch custom-op contract)
  return {gqkv, ganc, dt_sum[0].clone(), db_sum[0].clone(), dt_sum[1].clone(), db_sum[1].clone()};
}

// ---- test-only entries (grl_cpu_common.h)
void stripe_forward_tasks(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                          const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2,
                          const std::vector<int64_t>& geom, int64_t nh, const at::Tensor& out,
                          const at::Tensor& zsave, const at::Tensor& stat1save, const TaskRanges& ranges) {
  const StripeGeom g = stripe_from(geom);
  check_stripe(qkv, anchor, tau1, bias1, tau2, bias2, g, nh);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3, tasks = B * g.num_windows * nh;
  const auto acc = acc_type_of(qkv.scalar_type());
  check_task_ranges(ranges, tasks);
  check_buffer(out, qkv.scalar_type(), B * g.H * g.W * C, "out");
  check_buffer(zsave, acc, tasks * g.n2 * (C / nh), "zsave");
  check_buffer(stat1save, acc, tasks * g.n2 * 2, "stat1save");
  stripe_forward_run(qkv, anchor, tau1, bias1, tau2, bias2, g, nh, out, zsave, stat1save, ranges);
}

std::vector<at::Tensor> stripe_backward_tasks(const at::Tensor& grad_out, const at::Tensor& qkv,
                                              const at::Tensor& anchor, const at::Tensor& tau1,
                                              const at::Tensor& bias1, const at::Tensor& tau2,
                                              const at::Tensor& bias2, const at::Tensor& zsave,
                                              const at::Tensor& stat1save, const std::vector<int64_t>& geom,
                                              int64_t nh, const at::Tensor& gqkv, const at::Tensor& ganc,
                                              const TaskRanges& ranges) {
  const StripeGeom g = stripe_from(geom);
  check_stripe(qkv, anchor, tau1, bias1, tau2, bias2, g, nh);
  check_backward_inputs(grad_out, qkv, zsave, stat1save, g, nh);
  const int64_t B = qkv.size(0), C = qkv.size(2) / 3;
  check_task_ranges(ranges, B * g.num_windows * nh);
  check_buffer(gqkv, qkv.scalar_type(), B * g.H * g.W * 3 * C, "gqkv");
  check_buffer(ganc, qkv.scalar_type(), B * g.Ha * g.Wa * C, "ganc");
  const auto part = chunk_partials(qkv, g, nh);
  stripe_backward_run(grad_out, qkv, anchor, tau1, bias1, tau2, bias2, zsave, stat1save, g, nh, gqkv, ganc, part[0],
                      part[1], ranges);
  return part;
}

}  // namespace cpu
}  // namespace grl
