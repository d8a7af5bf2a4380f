"""Triton helpers shared by the stripe and window kernels (index math, norms, logits).

Everything here mirrors :mod:`grl_kernels.geometry`:

- ``grid_tile`` is ``token_position`` / ``anchor_position`` plus the region id: element ``i``
  of window (wy, wx) sits at rolled-grid coordinates (Y, X) = (wy*wh + i // ww, wx*ww + i % ww),
  at image row/column ((Y + shift_y) % Hg, (X + shift_x) % Wg), and in region
  3*band(Y) + band(X);
- ``band`` is ``region_band`` (the Python-slice quirk included: shift 0 gives band 2
  everywhere), evaluated on rolled-grid coordinates;
- ``logits`` returns the scores in log2 units: tau*cos*log2(e) + bias*log2(e) + mask*log2(e).
  The bias table is passed pre-multiplied by log2(e), transposed to (nh, R).

Kernels work in log2 units (exp2) throughout. Row statistics saved for the backward
(``store_stats`` / ``load_stats``): float32 (rows, 2), [row max m (log2 units), l] with
l = sum_j exp2(s_j - m); the backward recomputes P = exp2(s - m) * (1 / l). Not the log-sum-exp
m + log2(l): at tau ~ 100 the scores are ~2^8, and a rounded lse would scale a whole row of P by
one common (1 + ~1e-5), a bias that does not cancel in the gradients that are long reductions
(logit scales, bias tables, anchors). s - m cancels exactly when the backward recomputes s with
the same bits as the forward: same operands, same products in the same order (``logits``, and
``logits_t`` in kernels whose rows are the forward's columns).
"""
import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
MASK_LOG2 = tl.constexpr(-100.0 * 1.4426950408889634)  # the published -100, in log2 units
EPS = tl.constexpr(1e-12)  # F.normalize's eps
# Decided with triton.jit itself: kernels are interpreted iff TRITON_INTERPRET=1 when imported.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def mma(a, b, PREC: tl.constexpr):
    """tl.dot with float32 accumulation.

    Interpreted, as a broadcast product summed over K instead: the interpreter's tl.dot is
    numpy's BLAS, whose sum order over K can differ between A B and the transposed product
    (OpenBLAS's Haswell / Zen sgemm kernels do), so the backward's ``logits_t`` would miss the
    forward's bits, which the kernels rely on (stripe_bwd's docstring) and which a GPU's
    K-ordered FMA dot keeps. The sum over the same K positions gives both orientations the same
    bits whatever BLAS numpy has. Operands are widened to float32 first (Triton 3.9's interpreter
    multiplies bfloat16 as raw uint16 bits; 16-bit products are exact in float32)."""
    if INTERPRETED:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def online_softmax_step(m, l, acc, s, vals, DT: tl.constexpr, PREC: tl.constexpr):
    """One column block of a streaming softmax in log2 units: with running row max ``m`` and
    sum ``l``, fold the scores ``s`` (BM x BN) and values ``vals`` (BN x D) into ``acc``.
    Returns the updated (m, l, acc); the result is acc / l once every block is folded."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(DT), vals, PREC)
    return m_new, l, acc


@triton.jit
def decode_bwh(pid, nh, nW, nWw):
    """Program id along axis 0 -> (batch, head, window row, window column); heads vary fastest."""
    h = pid % nh
    w = (pid // nh) % nW
    b = pid // (nh * nW)
    return b, h, w // nWw, w % nWw


@triton.jit
def band(pos, size, win, shift):
    """geometry.region_band on a vector of rolled-grid positions."""
    b = tl.where(pos >= size - win, 1, 0)
    b = tl.where(pos >= size - shift, 2, b)
    return tl.where(shift == 0, 2, b)


@triton.jit
def grid_tile(i, wy, wx, wh: tl.constexpr, ww: tl.constexpr, Hg, Wg, ty, tx, mty, mtx):
    """Elements ``i`` of window (wy, wx) on a (Hg, Wg) grid cut in (wh, ww) windows and rolled by
    (ty, tx), 0 <= ty < Hg, 0 <= tx < Wg: in-window (y, x), image (row, col) and region id
    3*band_y + band_x, the bands taken with the mask shifts (mty, mtx) (0 where the block is not
    shifted: band 2 everywhere). The window sizes are constexpr (fixed per model)."""
    y = i // ww  # ww, wh constexpr: multiply-shift, no division
    x = i % ww
    Y = wy * wh + y
    X = wx * ww + x
    rid = 3 * band(Y, Hg, wh, mty) + band(X, Wg, ww, mtx)
    # Y < Hg and 0 <= ty < Hg: the roll is one conditional subtraction, not a modulo
    row = Y + ty
    col = X + tx
    return y, x, tl.where(row >= Hg, row - Hg, row), tl.where(col >= Wg, col - Wg, col), rid


@triton.jit
def load_rows(base, row_off, col0, s_c, d, valid, D: tl.constexpr, AL: tl.constexpr):
    """(R, D) tile: rows at element offsets ``row_off`` (int64), columns col0 .. col0+d-1 (zero-padded).

    The kernels pass row offsets (and batch offsets) wrapped in tl.multiple_of(.., AL), AL a power
    of two dividing every row stride (launcher.row_align): with the head dim d constexpr, rows of
    an odd-width head (d = 30: offsets h*30 + pos*3C) then load as 2-element vectors instead of
    2-byte scalars (the hint must sit on an op of the kernel, not on a helper's argument).
    The padding columns d..D-1 are masked."""
    dd = tl.arange(0, D)
    ptrs = base + row_off[:, None] + (col0 + dd)[None, :] * s_c
    return tl.load(ptrs, mask=valid[:, None] & (dd < d)[None, :], other=0.0)


@triton.jit
def store_rows(base, row_off, col0, s_c, d, valid, val, D: tl.constexpr, AL: tl.constexpr):
    dd = tl.arange(0, D)
    ptrs = base + row_off[:, None] + (col0 + dd)[None, :] * s_c
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=valid[:, None] & (dd < d)[None, :])


@triton.jit
def load_ws(base, row, valid, D: tl.constexpr):
    """(R, D) tile of a float32 workspace laid out (rows, D); ``row`` is int64."""
    dd = tl.arange(0, D)
    return tl.load(base + row[:, None] * D + dd[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def store_ws(base, row, valid, val, D: tl.constexpr):
    dd = tl.arange(0, D)
    tl.store(base + row[:, None] * D + dd[None, :], val, mask=valid[:, None])


@triton.jit
def row_norm(x):
    """||x|| per row, in float32."""
    xf = x.to(tl.float32)
    return tl.sqrt(tl.sum(xf * xf, axis=1))


@triton.jit
def inv_norm(x):
    """1 / max(||x||, eps) per row: the factor of F.normalize."""
    return 1.0 / tl.maximum(row_norm(x), EPS)


@triton.jit
def unit_rows(x, inv, DT: tl.constexpr):
    """x / max(||x||, eps) per row, in DT. The gradient products use this operand (|x_hat| <= 1)
    rather than dS / ||x||, which overflows float16 for vectors below eps (1 / eps = 1e12)."""
    return (x.to(tl.float32) * inv[:, None]).to(DT)


@triton.jit
def normalize_bwd(x, inv, n, dxhat):
    """Gradient of F.normalize: (dxhat - xhat (xhat . dxhat)) / ||x||, or dxhat / eps below eps."""
    xhat = x.to(tl.float32) * inv[:, None]
    proj = tl.sum(xhat * dxhat, axis=1)
    proj = tl.where(n > EPS, proj, 0.0)
    return (dxhat - xhat * proj[:, None]) * inv[:, None]


@triton.jit
def _add_bias_mask(s, bias_ptr, r, idr, idc, vr, vc):
    s += tl.load(bias_ptr + r, mask=vr[:, None] & vc[None, :], other=0.0)
    s = tl.where(idr[:, None] != idc[None, :], s + MASK_LOG2, s)
    return tl.where(vc[None, :], s, float("-inf"))


@triton.jit
def logits(xr, sr, xc, ic, bias_ptr, r, idr, idc, vr, vc, PREC: tl.constexpr):
    """Scores (log2 units) of rows ``xr`` against columns ``xc`` and the raw dot products.

    sr: per-row factor tau*log2(e)/||x_r||; ic: per-column 1/||x_c||; r: table row of every
    pair; idr/idc: region ids (-100 where they differ); columns with vc false get -inf.
    s = (raw * sr) * ic + bias (+ mask), in this order.
    """
    raw = mma(xr, tl.trans(xc), PREC)
    s = raw * sr[:, None] * ic[None, :]
    return _add_bias_mask(s, bias_ptr, r, idr, idc, vr, vc), raw


@triton.jit
def logits_t(xr, ir, xc, sc, bias_ptr, r, idr, idc, vr, vc, PREC: tl.constexpr):
    """``logits`` of the forward whose rows are ``xc`` and columns ``xr``, transposed, with the
    same bits: s[i, j] = (raw[i, j] * sc[j]) * ir[i] + bias (+ mask), sc the factor
    tau*log2(e)/||x_c|| of the forward's rows, ir the 1/||x_r|| of its columns. Used by backward
    kernels that loop over the forward's rows, so that s - m cancels exactly (see the module
    docstring). Columns with vc false and rows with vr false get -inf: P = exp2(s - m) / l with
    the column's statistics would overflow on a padding row (s = 0, m down to ~ -2^8) and turn
    the reductions over rows (the tau partials) into NaN."""
    raw = mma(xr, tl.trans(xc), PREC)
    s = raw * sc[None, :] * ir[:, None]
    s = _add_bias_mask(s, bias_ptr, r, idr, idc, vr, vc)
    return tl.where(vr[:, None], s, float("-inf")), raw


@triton.jit
def store_stats(STAT, row, valid, m, l):
    """Row statistics of a softmax for the backward: STAT[row] = (m, l), float32 (rows, 2)."""
    tl.store(STAT + 2 * row, m, mask=valid)
    tl.store(STAT + 2 * row + 1, l, mask=valid)


@triton.jit
def load_stats(STAT, row, valid):
    """(m, 1 / l) of ``store_stats`` (one division per row, in the backward: the forward's
    registers are tight); rows with ``valid`` false read (0, inf), 1 / l = 0: their P is 0."""
    m = tl.load(STAT + 2 * row, mask=valid, other=0.0)
    l = tl.load(STAT + 2 * row + 1, mask=valid, other=float("inf"))
    return m, 1.0 / l
