// grl_cuda_binding.cpp -- torch binding of the CUDA kernels (the .cu files include no torch).
//
// Same Python-visible convention as the CPU module:
//   stripe_forward(qkv, anchor, tau1, bias1 (nh,R), tau2, bias2, geom, nh) -> [out, *state]
//   stripe_backward(grad_out, qkv, anchor, tau1, bias1, tau2, bias2, *state, geom, nh)
//       -> [d_qkv, d_anchor, d_tau1, d_bias1 (nh,R), d_tau2, d_bias2]
//   window_forward(qkv, tau, bias (nh,R), geom, nh) -> [out, *state]
//   window_backward(grad_out, qkv, tau, bias, *state, geom, nh) -> [d_qkv, d_tau, d_bias (nh,R)]
// Parameters, saved state and workspaces are float32 contiguous; qkv/anchor keep their strides.
// Every function takes a trailing `stream` (torch.cuda.current_stream().cuda_stream) and is
// called under the tensors' device (Python side): the file then needs no c10/cuda header and
// compiles against a CPU build of torch plus the CUDA runtime headers (CI compile check).
//
// Built twice: for the GPU (`_C_cuda`, tensors on a CUDA device) and, with -DGRL_CUDA_EMU, for
// the host (`_C_cuda_emu`: the same kernels through csrc/emu/grl_cuda_emu.h, CPU tensors; the
// stream argument is ignored there). GRL_ON_DEVICE / GRL_DEVICE_NAME hide the difference.
#include <torch/extension.h>
#if defined(GRL_CUDA_EMU)
#include "grl_cuda_emu.h"
#define GRL_ON_DEVICE(t) ((t).device().is_cpu())
#define GRL_DEVICE_NAME "CPU (emulated CUDA)"
#else
#include <cuda_runtime_api.h>
#define GRL_ON_DEVICE(t) ((t).is_cuda())
#define GRL_DEVICE_NAME "CUDA"
#endif

#include <vector>

#include "grl_cuda.h"

#define GRL_ABI_VERSION 1
#ifndef GRL_SOURCE_HASH  // set by the build (hash of csrc/, see build_config.py)
#define GRL_SOURCE_HASH 0LL
#endif

namespace {

using grl::cuda::StripeProblem;
using grl::cuda::WindowProblem;

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return grl::cuda::kFloat32;
    case at::kHalf: return grl::cuda::kFloat16;
    case at::kBFloat16: return grl::cuda::kBFloat16;
    default: TORCH_CHECK(false, "grl cuda kernels: qkv must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_f32(const at::Tensor& t, int64_t numel, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(GRL_ON_DEVICE(t) && t.device() == ref.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == numel,
              "grl cuda kernels: ", name, " must be a contiguous float32 tensor of ", numel, " elements on ",
              ref.device());
}

cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(s)); }

void check_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "grl cuda kernels: ", what, " failed: ", cudaGetErrorString(err));
}

void check_qkv(const at::Tensor& qkv, int64_t nh, int64_t H, int64_t W) {
  TORCH_CHECK(GRL_ON_DEVICE(qkv), "grl cuda kernels: qkv must be a " GRL_DEVICE_NAME " tensor");
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == H * W && qkv.size(2) % 3 == 0, "grl cuda kernels: qkv must be (B, H*W, 3C)");
  const int64_t C = qkv.size(2) / 3;
  TORCH_CHECK(nh > 0 && C % nh == 0, "grl cuda kernels: C must be divisible by num_heads");
  TORCH_CHECK(C / nh <= grl::cuda::kMaxHeadDim, "grl cuda kernels: head dim ", C / nh, " exceeds ",
              grl::cuda::kMaxHeadDim);
}

StripeProblem stripe_problem(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                             const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2,
                             const std::vector<int64_t>& geom, int64_t nh) {
  TORCH_CHECK(geom.size() == 8, "stripe geometry needs 8 ints");
  StripeProblem p;
  p.g = grl::make_stripe_geom(geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6], geom[7]);
  check_qkv(qkv, nh, p.g.H, p.g.W);
  TORCH_CHECK(p.g.sh > 0 && p.g.sw > 0 && p.g.down > 0 && p.g.H % p.g.sh == 0 && p.g.W % p.g.sw == 0 &&
                  p.g.sh % p.g.down == 0 && p.g.sw % p.g.down == 0,
              "grl cuda kernels: invalid stripe geometry");
  p.B = qkv.size(0); p.C = qkv.size(2) / 3; p.nh = nh; p.d = p.C / nh;
  TORCH_CHECK(GRL_ON_DEVICE(anchor) && anchor.device() == qkv.device() && anchor.scalar_type() == qkv.scalar_type() &&
                  anchor.dim() == 4 && anchor.size(0) == p.B && anchor.size(1) == p.g.Ha && anchor.size(2) == p.g.Wa &&
                  anchor.size(3) == p.C,
              "grl cuda kernels: anchor must be (B, H/f, W/f, C) on qkv's device with qkv's dtype");
  check_f32(tau1, nh, "scale1", qkv); check_f32(tau2, nh, "scale2", qkv);
  check_f32(bias1, nh * p.g.table_rows, "bias1", qkv); check_f32(bias2, nh * p.g.table_rows, "bias2", qkv);
  p.dtype = dtype_code(qkv);
  TORCH_CHECK(qkv.stride(2) == 1 && anchor.stride(3) == 1,
              "grl cuda kernels: qkv and anchor need channel stride 1 (got ", qkv.stride(2), " and ", anchor.stride(3), ")");
  p.qkv = qkv.data_ptr(); p.q_sb = qkv.stride(0); p.q_sl = qkv.stride(1); p.q_sc = qkv.stride(2);
  p.anchor = anchor.data_ptr();
  p.a_sb = anchor.stride(0); p.a_sh = anchor.stride(1); p.a_sw = anchor.stride(2); p.a_sc = anchor.stride(3);
  p.tau1 = tau1.data_ptr<float>(); p.bias1 = bias1.data_ptr<float>();
  p.tau2 = tau2.data_ptr<float>(); p.bias2 = bias2.data_ptr<float>();
  return p;
}

std::vector<at::Tensor> stripe_forward(const at::Tensor& qkv, const at::Tensor& anchor, const at::Tensor& tau1,
                                       const at::Tensor& bias1, const at::Tensor& tau2, const at::Tensor& bias2,
                                       const std::vector<int64_t>& geom, int64_t nh, int64_t stream) {
  const StripeProblem p = stripe_problem(qkv, anchor, tau1, bias1, tau2, bias2, geom, nh);
  const auto& g = p.g;
  auto f32 = qkv.options().dtype(at::kFloat);
  auto out = at::empty({p.B, g.H * g.W, p.C}, qkv.options());
  auto z = at::empty({p.B, g.num_windows, nh, g.n2, p.d}, f32);
  auto stat1 = at::empty({p.B, g.num_windows, nh, g.n2, 2}, f32);  // rows' (m, 1/l)
  auto stat2 = at::empty({p.B, g.num_windows, nh, g.n1, 2}, f32);
  auto qn = at::empty({p.B, g.H * g.W, nh}, f32), kn = at::empty({p.B, g.H * g.W, nh}, f32);
  auto an = at::empty({p.B, g.Ha * g.Wa, nh}, f32);
  grl::cuda::StripeSaved s{z.data_ptr<float>(), stat1.data_ptr<float>(), stat2.data_ptr<float>(),
                           qn.data_ptr<float>(), kn.data_ptr<float>(), an.data_ptr<float>()};
  check_ok(grl::cuda::stripe_forward(p, out.data_ptr(), s, as_stream(stream)), "stripe forward");
  return {out, z, stat1, stat2, qn, kn, an};
}

std::vector<at::Tensor> stripe_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& anchor,
                                        const at::Tensor& tau1, const at::Tensor& bias1, const at::Tensor& tau2,
                                        const at::Tensor& bias2, const at::Tensor& z, const at::Tensor& stat1,
                                        const at::Tensor& stat2, const at::Tensor& qn, const at::Tensor& kn,
                                        const at::Tensor& an, const std::vector<int64_t>& geom, int64_t nh, int64_t stream) {
  const StripeProblem p = stripe_problem(qkv, anchor, tau1, bias1, tau2, bias2, geom, nh);
  const auto& g = p.g;
  const int64_t tasks = p.B * g.num_windows * nh;
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == qkv.scalar_type() &&
                  grad_out.device() == qkv.device() && grad_out.numel() == p.B * g.H * g.W * p.C,
              "grl cuda kernels: grad_out must be a contiguous (B, H*W, C) tensor like the output");
  check_f32(z, tasks * g.n2 * p.d, "saved Z", qkv);
  check_f32(stat1, tasks * g.n2 * 2, "saved stage-1 row statistics", qkv);
  check_f32(stat2, tasks * g.n1 * 2, "saved stage-2 row statistics", qkv);
  check_f32(qn, p.B * g.H * g.W * nh, "saved q norms", qkv);
  check_f32(kn, p.B * g.H * g.W * nh, "saved k norms", qkv);
  check_f32(an, p.B * g.Ha * g.Wa * nh, "saved anchor norms", qkv);
  auto f32 = qkv.options().dtype(at::kFloat);
  auto gqkv = at::empty({p.B, g.H * g.W, 3 * p.C}, qkv.options());
  auto ganc = at::empty({p.B, g.Ha, g.Wa, p.C}, qkv.options());
  auto dtau1 = at::zeros({nh}, f32), dtau2 = at::zeros({nh}, f32);
  auto dbias1 = at::zeros({nh, g.table_rows}, f32), dbias2 = at::zeros({nh, g.table_rows}, f32);
  auto dz = at::empty({tasks, g.n2, p.d}, f32), da = at::empty({tasks, g.n2, p.d}, f32);
  auto d1 = at::empty({tasks, g.n2}, f32), d2 = at::empty({tasks, g.n1}, f32);
  auto ws = at::empty({grl::cuda::stripe_bias_workspace(p)}, f32);
  grl::cuda::StripeSaved s{z.data_ptr<float>(), stat1.data_ptr<float>(), stat2.data_ptr<float>(),
                           qn.data_ptr<float>(), kn.data_ptr<float>(), an.data_ptr<float>()};
  grl::cuda::StripeGrads gr{grad_out.data_ptr(), gqkv.data_ptr(), ganc.data_ptr(),
                            dtau1.data_ptr<float>(), dbias1.data_ptr<float>(), dtau2.data_ptr<float>(),
                            dbias2.data_ptr<float>(), dz.data_ptr<float>(), da.data_ptr<float>(),
                            d1.data_ptr<float>(), d2.data_ptr<float>(), ws.data_ptr<float>()};
  check_ok(grl::cuda::stripe_backward(p, s, gr, as_stream(stream)), "stripe backward");
  return {gqkv, ganc, dtau1, dbias1, dtau2, dbias2};
}

WindowProblem window_problem(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                             const std::vector<int64_t>& geom, int64_t nh) {
  TORCH_CHECK(geom.size() == 4, "window geometry needs 4 ints");
  WindowProblem p;
  p.g = grl::make_window_geom(geom[0], geom[1], geom[2], geom[3]);
  check_qkv(qkv, nh, p.g.H, p.g.W);
  TORCH_CHECK(p.g.ws > 0 && p.g.H % p.g.ws == 0 && p.g.W % p.g.ws == 0 && p.g.shift >= 0 && p.g.shift < p.g.ws,
              "grl cuda kernels: invalid window geometry");
  p.B = qkv.size(0); p.C = qkv.size(2) / 3; p.nh = nh; p.d = p.C / nh;
  check_f32(tau, nh, "scale", qkv);
  check_f32(bias, nh * p.g.table_rows, "bias", qkv);
  p.dtype = dtype_code(qkv);
  TORCH_CHECK(qkv.stride(2) == 1, "grl cuda kernels: qkv needs channel stride 1 (got ", qkv.stride(2), ")");
  p.qkv = qkv.data_ptr(); p.q_sb = qkv.stride(0); p.q_sl = qkv.stride(1); p.q_sc = qkv.stride(2);
  p.tau = tau.data_ptr<float>(); p.bias = bias.data_ptr<float>();
  return p;
}

std::vector<at::Tensor> window_forward(const at::Tensor& qkv, const at::Tensor& tau, const at::Tensor& bias,
                                       const std::vector<int64_t>& geom, int64_t nh, int64_t stream) {
  const WindowProblem p = window_problem(qkv, tau, bias, geom, nh);
  const auto& g = p.g;
  auto f32 = qkv.options().dtype(at::kFloat);
  auto out = at::empty({p.B, g.H * g.W, p.C}, qkv.options());
  auto stat = at::empty({p.B, g.num_windows, nh, g.n, 2}, f32);  // rows' (m, 1/l)
  auto qn = at::empty({p.B, g.H * g.W, nh}, f32), kn = at::empty({p.B, g.H * g.W, nh}, f32);
  grl::cuda::WindowSaved s{stat.data_ptr<float>(), qn.data_ptr<float>(), kn.data_ptr<float>()};
  check_ok(grl::cuda::window_forward(p, out.data_ptr(), s, as_stream(stream)), "window forward");
  return {out, stat, qn, kn};
}

std::vector<at::Tensor> window_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& tau,
                                        const at::Tensor& bias, const at::Tensor& stat, const at::Tensor& qn,
                                        const at::Tensor& kn, const std::vector<int64_t>& geom, int64_t nh, int64_t stream) {
  const WindowProblem p = window_problem(qkv, tau, bias, geom, nh);
  const auto& g = p.g;
  const int64_t rows = p.B * g.num_windows * nh * g.n;
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == qkv.scalar_type() &&
                  grad_out.device() == qkv.device() && grad_out.numel() == p.B * g.H * g.W * p.C,
              "grl cuda kernels: grad_out must be a contiguous (B, H*W, C) tensor like the output");
  check_f32(stat, rows * 2, "saved row statistics", qkv);
  check_f32(qn, p.B * g.H * g.W * nh, "saved q norms", qkv);
  check_f32(kn, p.B * g.H * g.W * nh, "saved k norms", qkv);
  auto f32 = qkv.options().dtype(at::kFloat);
  auto gqkv = at::empty({p.B, g.H * g.W, 3 * p.C}, qkv.options());
  auto dtau = at::zeros({nh}, f32);
  auto dbias = at::zeros({nh, g.table_rows}, f32);
  auto drow = at::empty({rows}, f32);
  auto ws = at::empty({grl::cuda::window_bias_workspace(p)}, f32);
  grl::cuda::WindowSaved s{stat.data_ptr<float>(), qn.data_ptr<float>(), kn.data_ptr<float>()};
  grl::cuda::WindowGrads gr{grad_out.data_ptr(), gqkv.data_ptr(), dtau.data_ptr<float>(), dbias.data_ptr<float>(),
                            drow.data_ptr<float>(), ws.data_ptr<float>()};
  check_ok(grl::cuda::window_backward(p, s, gr, as_stream(stream)), "window backward");
  return {gqkv, dtau, dbias};
}

}  // namespace

#if defined(GRL_CUDA_EMU)
// The emulation's 16-bit conversions, for the tests (compared with torch's on every half value
// and on the rounding boundaries): float32 tensor -> int32 tensor of the 16-bit patterns.
at::Tensor emu_round_bits(const at::Tensor& x, bool bf16) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x must be a float32 CPU tensor");
  auto xc = x.contiguous();
  auto out = at::empty(xc.sizes(), xc.options().dtype(at::kInt));
  const float* src = xc.data_ptr<float>();
  int32_t* dst = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < xc.numel(); ++i)
    dst[i] = bf16 ? __float2bfloat16(src[i]).x : __float2half(src[i]).x;
  return out;
}

// 16-bit patterns (int32 tensor) -> float32 through the emulation's widening conversions.
at::Tensor emu_widen_bits(const at::Tensor& bits, bool bf16) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kInt, "bits must be an int32 CPU tensor");
  auto bc = bits.contiguous();
  auto out = at::empty(bc.sizes(), bc.options().dtype(at::kFloat));
  const int32_t* src = bc.data_ptr<int32_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < bc.numel(); ++i) {
    const uint16_t b = static_cast<uint16_t>(src[i]);
    dst[i] = bf16 ? __bfloat162float(__nv_bfloat16{b}) : __half2float(__half{b});
  }
  return out;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(GRL_CUDA_EMU)
  m.doc() = "grl_kernels CUDA kernels emulated on the CPU (csrc/emu/grl_cuda_emu.h)";
  m.attr("emulated") = true;
  m.def("emu_round_bits", &emu_round_bits, "float32 -> 16-bit patterns (bf16=True: bfloat16, else float16)");
  m.def("emu_widen_bits", &emu_widen_bits, "16-bit patterns -> float32");
#else
  m.doc() = "grl_kernels CUDA kernels (anchored stripe and window attention)";
  m.attr("emulated") = false;
#endif
  m.attr("abi_version") = GRL_ABI_VERSION;
  m.attr("source_hash") = static_cast<int64_t>(GRL_SOURCE_HASH);
  m.def("stripe_forward", &stripe_forward, "stripe attention forward -> [out, *state]");
  m.def("stripe_backward", &stripe_backward, "stripe attention backward");
  m.def("window_forward", &window_forward, "window attention forward -> [out, *state]");
  m.def("window_backward", &window_backward, "window attention backward");
}
