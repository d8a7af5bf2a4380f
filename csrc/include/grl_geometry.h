// grl_geometry.h -- the index math of GRL's anchored-stripe and window attention.
//
// ONE header shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda);
// it mirrors grl_kernels/geometry.py exactly (see GRL_ATTENTION_SPEC.md sections 1-3):
//   * tokens are row-major on the (H, W) grid, anchors on the (H/f, W/f) grid;
//   * partition = roll by (-shift) then cut into windows row-major, positions
//     row-major inside a window; token window n pairs with anchor window n;
//   * relative index of the stripe stages uses raw anchor-grid positions;
//   * region ids label the ROLLED grid (band 0 / 1 / 2 per dimension, with the
//     Python-slice quirk: shift 0 puts every position in band 2).
// Plain C++ (no torch, no CUDA runtime); every function is host+device inline.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define GRL_HD __host__ __device__ __forceinline__
#else
#define GRL_HD inline
#endif

namespace grl {

// The published mask constant (-100, not -inf) and F.normalize's epsilon. The epsilon is the
// double torch uses: acc_t(kNormEps) rounds it to the accumulation type, as torch does
// (1e-12f differs from 1e-12 by 2e-8 relative, which a float64 kernel would show).
constexpr float kMaskValue = -100.0f;
constexpr double kNormEps = 1e-12;

// Band of position `pos` along a dimension of `size` cut in windows of `window`
// with cyclic shift `shift` (geometry.region_band).
GRL_HD int region_band(int64_t pos, int64_t size, int64_t window, int64_t shift) {
  if (shift == 0) return 2;  // "[-0:]" is the whole dimension
  if (pos >= size - shift) return 2;
  if (pos >= size - window) return 1;
  return 0;
}

struct StripeGeom {
  int64_t H, W;          // token grid
  int64_t sh, sw;        // stripe (window) size in tokens
  int64_t shift_h, shift_w;
  int64_t down;          // anchor down factor f
  int64_t shifted;       // block's stripe_shift: masks only when != 0
  // derived
  int64_t ah, aw;        // anchor window = stripe / f
  int64_t ash, asw;      // anchor shift = shift / f
  int64_t Ha, Wa;        // anchor grid
  int64_t n1, n2;        // tokens / anchors per window
  int64_t windows_h, windows_w, num_windows;
  int64_t table_h, table_w, table_rows;  // bias table (sh+ah-1) x (sw+aw-1)
};

GRL_HD StripeGeom make_stripe_geom(int64_t H, int64_t W, int64_t sh, int64_t sw, int64_t shift_h,
                                   int64_t shift_w, int64_t down, int64_t shifted) {
  StripeGeom g;
  g.H = H; g.W = W; g.sh = sh; g.sw = sw; g.shift_h = shift_h; g.shift_w = shift_w;
  g.down = down; g.shifted = shifted;
  g.ah = sh / down; g.aw = sw / down;
  g.ash = shift_h / down; g.asw = shift_w / down;
  g.Ha = H / down; g.Wa = W / down;
  g.n1 = sh * sw; g.n2 = g.ah * g.aw;
  g.windows_h = H / sh; g.windows_w = W / sw; g.num_windows = g.windows_h * g.windows_w;
  g.table_h = sh + g.ah - 1; g.table_w = sw + g.aw - 1; g.table_rows = g.table_h * g.table_w;
  return g;
}

// Position (row, col) on the ROLLED grid -> row-major index on the image grid (shift undone).
// 0 <= row < size and 0 <= shift < size, so the roll is one conditional subtraction: loops
// that walk a window row by row use these *_rc forms and need no integer division.
GRL_HD int64_t unroll_position(int64_t row, int64_t col, int64_t shift_h, int64_t shift_w, int64_t H, int64_t W) {
  int64_t y = row + shift_h, x = col + shift_w;
  y = y >= H ? y - H : y;
  x = x >= W ? x - W : x;
  return y * W + x;
}

GRL_HD int64_t stripe_token_position_rc(const StripeGeom& g, int64_t row, int64_t col) {
  return unroll_position(row, col, g.shift_h, g.shift_w, g.H, g.W);
}

GRL_HD int64_t stripe_anchor_position_rc(const StripeGeom& g, int64_t row, int64_t col) {
  return unroll_position(row, col, g.ash, g.asw, g.Ha, g.Wa);
}

// Row-major image index of token j of window `win` (shift undone).
GRL_HD int64_t stripe_token_position(const StripeGeom& g, int64_t win, int64_t j) {
  const int64_t wy = win / g.windows_w, wx = win % g.windows_w;
  return stripe_token_position_rc(g, wy * g.sh + j / g.sw, wx * g.sw + j % g.sw);
}

// Row-major anchor-grid index of anchor i of window `win`.
GRL_HD int64_t stripe_anchor_position(const StripeGeom& g, int64_t win, int64_t i) {
  const int64_t wy = win / g.windows_w, wx = win % g.windows_w;
  return stripe_anchor_position_rc(g, wy * g.ah + i / g.aw, wx * g.aw + i % g.aw);
}

// Stage 2 (token j -> anchor i) bias row.
GRL_HD int64_t stripe_w2a_index(const StripeGeom& g, int64_t j, int64_t i) {
  const int64_t y = j / g.sw, x = j % g.sw, u = i / g.aw, v = i % g.aw;
  return (y - u + g.ah - 1) * g.table_w + (x - v + g.aw - 1);
}

// Stage 1 (anchor i -> token j) bias row.
GRL_HD int64_t stripe_a2w_index(const StripeGeom& g, int64_t i, int64_t j) {
  const int64_t y = j / g.sw, x = j % g.sw, u = i / g.aw, v = i % g.aw;
  return (u - y + g.sh - 1) * g.table_w + (v - x + g.sw - 1);
}

// Region id (3 * band_h + band_w) of the token / anchor at (row, col) of the rolled grid.
GRL_HD int stripe_token_region_rc(const StripeGeom& g, int64_t row, int64_t col) {
  return 3 * region_band(row, g.H, g.sh, g.shift_h) + region_band(col, g.W, g.sw, g.shift_w);
}

GRL_HD int stripe_anchor_region_rc(const StripeGeom& g, int64_t row, int64_t col) {
  return 3 * region_band(row, g.Ha, g.ah, g.ash) + region_band(col, g.Wa, g.aw, g.asw);
}

// Region id of token j of window `win` on the rolled grid.
GRL_HD int stripe_token_region(const StripeGeom& g, int64_t win, int64_t j) {
  const int64_t wy = win / g.windows_w, wx = win % g.windows_w;
  return stripe_token_region_rc(g, wy * g.sh + j / g.sw, wx * g.sw + j % g.sw);
}

// Region id of anchor i of window `win` on the rolled anchor grid.
GRL_HD int stripe_anchor_region(const StripeGeom& g, int64_t win, int64_t i) {
  const int64_t wy = win / g.windows_w, wx = win % g.windows_w;
  return stripe_anchor_region_rc(g, wy * g.ah + i / g.aw, wx * g.aw + i % g.aw);
}

struct WindowGeom {
  int64_t H, W, ws, shift;  // shift = ws / 2 on shifted blocks, else 0 (mask only when > 0)
  int64_t n, windows_h, windows_w, num_windows, table_side, table_rows;
};

GRL_HD WindowGeom make_window_geom(int64_t H, int64_t W, int64_t ws, int64_t shift) {
  WindowGeom g;
  g.H = H; g.W = W; g.ws = ws; g.shift = shift;
  g.n = ws * ws; g.windows_h = H / ws; g.windows_w = W / ws; g.num_windows = g.windows_h * g.windows_w;
  g.table_side = 2 * ws - 1; g.table_rows = g.table_side * g.table_side;
  return g;
}

GRL_HD int64_t window_token_position_rc(const WindowGeom& g, int64_t row, int64_t col) {
  return unroll_position(row, col, g.shift, g.shift, g.H, g.W);
}

GRL_HD int64_t window_token_position(const WindowGeom& g, int64_t win, int64_t j) {
  const int64_t wy = win / g.windows_w, wx = win % g.windows_w;
  return window_token_position_rc(g, wy * g.ws + j / g.ws, wx * g.ws + j % g.ws);
}

// Bias row of query j1 -> key j2.
GRL_HD int64_t window_rel_index(const WindowGeom& g, int64_t j1, int64_t j2) {
  const int64_t y1 = j1 / g.ws, x1 = j1 % g.ws, y2 = j2 / g.ws, x2 = j2 % g.ws;
  return (y1 - y2 + g.ws - 1) * g.table_side + (x1 - x2 + g.ws - 1);
}

GRL_HD int window_token_region_rc(const WindowGeom& g, int64_t row, int64_t col) {
  return 3 * region_band(row, g.H, g.ws, g.shift) + region_band(col, g.W, g.ws, g.shift);
}

GRL_HD int window_token_region(const WindowGeom& g, int64_t win, int64_t j) {
  const int64_t wy = win / g.windows_w, wx = win % g.windows_w;
  return window_token_region_rc(g, wy * g.ws + j / g.ws, wx * g.ws + j % g.ws);
}

// ---- division-free walks over one window (the CUDA kernels' inner loops) ------------------
// fn is called for every position of window `win` in row-major order, with counters instead of
// a division per position: the roll is one conditional subtraction per row and per column, the
// region bands are compares, and the bias-row offset `off` is y * table_w + x (window: y * side
// + x) for the position's (y, x) inside the window, so that
//   a2w row (anchor i, token j) = abase(i) - off(j),  abase(i) = (u + sh - 1) * table_w + (v + sw - 1)
//   w2a row (token j, anchor i) = tbase(j) - off(i),  tbase(j) = (y + ah - 1) * table_w + (x + aw - 1)
//   window row (query i, key j) = qbase(i) - off(j),  qbase(i) = (y + ws - 1) * side + (x + ws - 1)
// (the same offsets as stripe_a2w_index / stripe_w2a_index / window_rel_index).
// Offsets of one position from its index in the window (one division, for a thread's own row)
// and the constant parts of the three relative indices:
//   a2w(i, j) = aoff(i) - toff(j) + stripe_a2w_base(g),  w2a(j, i) = toff(j) - aoff(i) + stripe_w2a_base(g),
//   window(i, j) = off(i) - off(j) + window_rel_base(g).
GRL_HD int64_t stripe_token_offset(const StripeGeom& g, int64_t j) { return (j / g.sw) * g.table_w + j % g.sw; }
GRL_HD int64_t stripe_anchor_offset(const StripeGeom& g, int64_t i) { return (i / g.aw) * g.table_w + i % g.aw; }
GRL_HD int64_t stripe_a2w_base(const StripeGeom& g) { return (g.sh - 1) * g.table_w + (g.sw - 1); }
GRL_HD int64_t stripe_w2a_base(const StripeGeom& g) { return (g.ah - 1) * g.table_w + (g.aw - 1); }
GRL_HD int64_t window_token_offset(const WindowGeom& g, int64_t j) { return (j / g.ws) * g.table_side + j % g.ws; }
GRL_HD int64_t window_rel_base(const WindowGeom& g) { return (g.ws - 1) * g.table_side + (g.ws - 1); }

// Tokens: fn(j, pos, region, off) with pos the row-major image index.
template <typename F>
GRL_HD void stripe_walk_tokens(const StripeGeom& g, int64_t win, F&& fn) {
  const int64_t r0 = (win / g.windows_w) * g.sh, c0 = (win % g.windows_w) * g.sw;
  int64_t j = 0;
  for (int64_t y = 0; y < g.sh; ++y) {
    int64_t row = r0 + y + g.shift_h;
    row = row >= g.H ? row - g.H : row;
    const int bh = g.shifted ? 3 * region_band(r0 + y, g.H, g.sh, g.shift_h) : 0;
      for (int64_t x = 0; x < g.sw; ++x, ++j) {
      int64_t col = c0 + x + g.shift_w;
      col = col >= g.W ? col - g.W : col;
      const int region = g.shifted ? bh + region_band(c0 + x, g.W, g.sw, g.shift_w) : 0;
      fn(j, row * g.W + col, region, y * g.table_w + x);
    }
  }
}

// Anchors: fn(i, row, col, region, off) with (row, col) on the anchor grid (shift undone).
template <typename F>
GRL_HD void stripe_walk_anchors(const StripeGeom& g, int64_t win, F&& fn) {
  const int64_t r0 = (win / g.windows_w) * g.ah, c0 = (win % g.windows_w) * g.aw;
  int64_t i = 0;
  for (int64_t u = 0; u < g.ah; ++u) {
    int64_t row = r0 + u + g.ash;
    row = row >= g.Ha ? row - g.Ha : row;
    const int bh = g.shifted ? 3 * region_band(r0 + u, g.Ha, g.ah, g.ash) : 0;
      for (int64_t v = 0; v < g.aw; ++v, ++i) {
      int64_t col = c0 + v + g.asw;
      col = col >= g.Wa ? col - g.Wa : col;
      const int region = g.shifted ? bh + region_band(c0 + v, g.Wa, g.aw, g.asw) : 0;
      fn(i, row, col, region, u * g.table_w + v);
    }
  }
}

// Window tokens: fn(j, pos, region, off); region is 0 on unshifted blocks (shift == 0).
template <typename F>
GRL_HD void window_walk_tokens(const WindowGeom& g, int64_t win, F&& fn) {
  const int64_t r0 = (win / g.windows_w) * g.ws, c0 = (win % g.windows_w) * g.ws;
  int64_t j = 0;
  for (int64_t y = 0; y < g.ws; ++y) {
    int64_t row = r0 + y + g.shift;
    row = row >= g.H ? row - g.H : row;
    const int bh = g.shift > 0 ? 3 * region_band(r0 + y, g.H, g.ws, g.shift) : 0;
      for (int64_t x = 0; x < g.ws; ++x, ++j) {
      int64_t col = c0 + x + g.shift;
      col = col >= g.W ? col - g.W : col;
      const int region = g.shift > 0 ? bh + region_band(c0 + x, g.W, g.ws, g.shift) : 0;
      fn(j, row * g.W + col, region, y * g.table_side + x);
    }
  }
}

}  // namespace grl
