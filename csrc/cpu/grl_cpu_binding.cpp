// grl_cpu_binding.cpp -- Python module of the fused CPU kernels (plus the header's index
// math materialized for tests). Layout conventions: see grl_cpu_common.h.
#include "grl_cpu_common.h"

// Bumped whenever the Python-visible signatures change; the loader rebuilds a stale build.
#define GRL_ABI_VERSION 1
#ifndef GRL_SOURCE_HASH  // set by the build (hash of csrc/, see build_config.py)
#define GRL_SOURCE_HASH 0LL
#endif

namespace grl {
namespace cpu {

// ---------------------------------------------------------------------------
// run-time choice of the instruction set (see grl_cpu_kernels.h)
// ---------------------------------------------------------------------------
namespace {

const char* const kIsaNames[] = {"baseline", "avx2", "avx512bf16", "amx"};

int detect_isa() {
#if GRL_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return at::native::cpublas::could_pack(at::kBFloat16) ? 3 : 2;  // oneDNN's brgemm runs AMX here
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2"))
    return 1;
#endif
  return 0;
}

int& forced_isa() {
  static int forced = -1;  // -1: the detected level
  return forced;
}

int detected_isa() {
  static const int level = detect_isa();
  return level;
}

}  // namespace

int isa_level() {
  const int f = forced_isa();
  return f >= 0 ? f : detected_isa();
}

std::string cpu_path() {
  static const char* const kPaths[] = {
      "baseline x86-64/portable C++ tiles (float32 products; bfloat16 inputs via float32)",
      "AVX2+FMA float32 register tiles (bfloat16 inputs via float32 tiles)",
      "AVX-512 float32 register tiles + AVX512-BF16 vdpbf16ps bfloat16 tiles (forwards, window backward, stripe backward's dq, dk, d anchor)",
      "AVX-512 float32 register tiles + bfloat16 tile products (forwards, window backward, stripe backward's dq, dk, d anchor) on AMX through oneDNN's brgemm (at::native::cpublas) from 131072 multiply-adds up, smaller ones on AVX512-BF16 vdpbf16ps",
  };
  std::string s = std::string(kIsaNames[isa_level()]) + ": " + kPaths[isa_level()];
#if defined(__AVX512F__)
  s += "; built with AVX-512 as the default target (-march=native)";
#elif defined(__AVX2__)
  s += "; built with AVX2 as the default target";
#else
  s += "; portable build (ISA chosen at run time)";
#endif
  return s;
}

// Force a level (tests run every path): "auto" restores detection; a level above what the
// CPU supports is refused. Returns the name of the level now in use.
std::string set_cpu_isa(const std::string& name) {
  int want = -1;
  if (name != "auto") {
    for (int i = 0; i < 4; ++i)
      if (name == kIsaNames[i]) want = i;
    TORCH_CHECK(want >= 0, "set_cpu_isa: unknown instruction set '", name,
                "'; expected 'auto', 'baseline', 'avx2', 'avx512bf16' or 'amx'");
    TORCH_CHECK(want <= detected_isa(), "set_cpu_isa: this CPU does not support '", name, "' (best: '",
                kIsaNames[detected_isa()], "')");
  }
  forced_isa() = want;
  return kIsaNames[isa_level()];
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
  m.attr("source_hash") = static_cast<int64_t>(GRL_SOURCE_HASH);
  m.def("stripe_forward", &grl::cpu::stripe_forward, "stripe attention forward -> [out, Z, stage-1 rows (m, 1/l)]");
  m.def("stripe_backward", &grl::cpu::stripe_backward,
        "stripe attention backward -> (d_qkv, d_anchor, d_tau1, d_bias1 (nh, R), d_tau2, d_bias2)");
  m.def("window_forward", &grl::cpu::window_forward, "window attention forward -> [out]");
  m.def("window_backward", &grl::cpu::window_backward, "window attention backward -> (d_qkv, d_tau, d_bias (nh, R))");
  m.def("cpu_path", &grl::cpu::cpu_path, "the instruction-set path the kernels run (chosen at run time)");
  m.def("set_cpu_isa", &grl::cpu::set_cpu_isa,
        "force 'baseline', 'avx2', 'avx512bf16' or 'amx' (at most what the CPU has), or 'auto'; returns the level in use");
  m.def("block_cache_enter", &grl::cpu::block_cache_enter, py::arg("min_bytes"), py::arg("slack"),
        py::arg("max_fit") = 2.0,
        "open an inference scope of the block cache (installs it in front of the CPU allocator on first use)");
  m.def("block_cache_exit", &grl::cpu::block_cache_exit, "close a scope; the last one unmaps the cached blocks");
  m.def("block_cache_stats", &grl::cpu::block_cache_stats, py::arg("reset_peak") = false,
        "the block cache's counters and bytes (in use, cached, high-water, peak resident)");
  // test-only (tests/test_large_offsets.py): the kernels on task ranges [t0, t1, ...] only, into the
  // caller's contiguous buffers; the backward ones return the per-chunk partials (tau, reversed bias)
  m.def("_stripe_forward_tasks", &grl::cpu::stripe_forward_tasks,
        "TEST ONLY: stripe_forward's tasks in the ranges, into (out, zsave, stat1save)");
  m.def("_stripe_backward_tasks", &grl::cpu::stripe_backward_tasks,
        "TEST ONLY: stripe_backward's tasks in the ranges, into (gqkv, ganc) -> [d_tau, d_bias] per chunk");
  m.def("_window_forward_tasks", &grl::cpu::window_forward_tasks,
        "TEST ONLY: window_forward's tasks in the ranges, into out");
  m.def("_window_backward_tasks", &grl::cpu::window_backward_tasks,
        "TEST ONLY: window_backward's tasks in the ranges, into gqkv -> [d_tau, d_bias] per chunk");
  m.def("stripe_tables", &grl::cpu::stripe_tables, "header index math: token/anchor positions, regions, w2a, a2w");
  m.def("window_tables", &grl::cpu::window_tables, "header index math: positions, regions, relative index");
}
