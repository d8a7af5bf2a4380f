"""Bias-table gradients without atomics: per-tile partials summed over windows, then binned.

The relative index of a (row, column) pair depends only on their in-window positions, never on
the window, so dB[h, r] = sum over windows w and pairs (j, k) with r(j, k) = r of dS[w, h, j, k].
Two steps, both in a fixed order (the result has the same bits on every run):

1. ``*_bias_partial`` (grid: window groups x heads, row blocks, column blocks): a program owns one
   (row block, column block) tile of one head and loops over the windows of its group,
   recomputing P = exp2(s - m) * (1 / l) (the forward's row statistics, common.load_stats) and
   dS of the tile (two products) and adding dS into a float32 register tile;
   it stores the tile once into GP (groups, nh, rows, cols). The host sums the groups.
2. ``bias_grad_reduce`` (grid: nh x table-row blocks ry): table row r = (ry, rx) is the sum of
   G[h, j, k] over the pairs with u - y = ry - oy, v - x = rx - ox (row j = (u, v) on a rh x rw
   window, column k = (y, x) on a ch x cw window); a program walks the rows u of the window
   with (rx, v) tiles (the columns x = v - rx + ox that fall inside the window are summed).

Rows are the softmax rows: queries (window), tokens (stripe stage 2), anchors (stripe stage 1).
"""
import triton
import triton.language as tl

from .common import LOG2E, grid_tile, inv_norm, load_rows, load_stats, load_ws, logits, mma


@triton.jit
def window_bwd_bias_partial(
    QKV, SCALE, BIAS, DOUT, STAT, DELTA, GP,
    s_qb, s_ql, s_qc, s_gb, s_gl, s_gc,
    H, W, t, nWw, nW, nh, R,
    win_per_group, n_win,
    ws: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    N: tl.constexpr = ws * ws
    Rw: tl.constexpr = 2 * ws - 1
    C = nh * d  # computed here, not passed: its divisibility (from d) is then known
    pid = tl.program_id(0)
    h = pid % nh
    grp = pid // nh
    DT = QKV.dtype.element_ty
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R
    j = tl.program_id(1) * BM + tl.arange(0, BM)
    jk = tl.program_id(2) * BN + tl.arange(0, BN)
    vq = j < N
    vk = jk < N
    g = tl.zeros([BM, BN], tl.float32)
    w0 = grp * win_per_group
    for w in range(w0, tl.minimum(w0 + win_per_group, n_win)):
        b = w // nW
        wy = (w % nW) // nWw
        wx = (w % nW) % nWw
        b64 = tl.cast(b, tl.int64)
        qkv_b = QKV + tl.multiple_of(b64 * s_qb, AL)
        qy, qx, qr, qc, qid = grid_tile(j, wy, wx, ws, ws, H, W, t, t, t, t)
        ky, kx, kr, kc, kid = grid_tile(jk, wy, wx, ws, ws, H, W, t, t, t, t)
        qoff = (qr.to(tl.int64) * W + qc)
        koff = (kr.to(tl.int64) * W + kc) * s_ql
        q = load_rows(qkv_b, tl.multiple_of(qoff * s_ql, AL), h * d, s_qc, d, vq, D, AL)
        k = load_rows(qkv_b, tl.multiple_of(koff, AL), C + h * d, s_qc, d, vk, D, AL)
        v = load_rows(qkv_b, tl.multiple_of(koff, AL), 2 * C + h * d, s_qc, d, vk, D, AL)
        do = load_rows(DOUT + tl.multiple_of(b64 * s_gb, AL), tl.multiple_of(qoff * s_gl, AL), h * d, s_gc, d, vq, D,
                       AL).to(DT)
        row = (tl.cast(w, tl.int64) * nh + h) * N + j
        m, inv_l = load_stats(STAT, row, vq)
        delta = tl.load(DELTA + row, mask=vq, other=0.0)
        r = (qy[:, None] - ky[None, :] + ws - 1) * Rw + (qx[:, None] - kx[None, :] + ws - 1)
        s, _ = logits(q, inv_norm(q) * (tau * LOG2E), k, inv_norm(k), bias_h, r, qid, kid, vq, vk, PREC)
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        dp = mma(do, tl.trans(v), PREC)
        g += p * (dp - delta[:, None])
    gp = GP + ((grp * nh + h).to(tl.int64) * N + j[:, None]) * N + jk[None, :]
    tl.store(gp, g, mask=vq[:, None] & vk[None, :])


@triton.jit
def stripe_bwd_bias2_partial(
    QKV, ANC, SCALE, BIAS, Z, DOUT, STAT, DELTA, GP,
    s_qb, s_ql, s_qc, s_ab, s_ah, s_aw, s_ac, s_gb, s_gl, s_gc,
    H, W, th, tw, mth, mtw, Ha, Wa, tah, taw, mtah, mtaw, nWw, nW, nh, R,
    win_per_group, n_win,
    sh: tl.constexpr, sw: tl.constexpr, ah: tl.constexpr, aw: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """Stage 2: rows = tokens (softmax over anchors, values Z), columns = anchors. G is (N1, N2)."""
    N1: tl.constexpr = sh * sw
    N2: tl.constexpr = ah * aw
    Rw: tl.constexpr = sw + aw - 1
    C = nh * d  # computed here, not passed: its divisibility (from d) is then known
    pid = tl.program_id(0)
    h = pid % nh
    grp = pid // nh
    DT = QKV.dtype.element_ty
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R
    j = tl.program_id(1) * BM + tl.arange(0, BM)
    i = tl.program_id(2) * BN + tl.arange(0, BN)
    vj = j < N1
    vi = i < N2
    g = tl.zeros([BM, BN], tl.float32)
    w0 = grp * win_per_group
    for w in range(w0, tl.minimum(w0 + win_per_group, n_win)):
        b = w // nW
        wy = (w % nW) // nWw
        wx = (w % nW) % nWw
        b64 = tl.cast(b, tl.int64)
        bwh = tl.cast(w, tl.int64) * nh + h
        ty, tx, tr, tc, tid = grid_tile(j, wy, wx, sh, sw, H, W, th, tw, mth, mtw)
        au, av, ar, ac, aid = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, mtah, mtaw)
        tpos = tr.to(tl.int64) * W + tc
        q = load_rows(QKV + tl.multiple_of(b64 * s_qb, AL), tl.multiple_of(tpos * s_ql, AL), h * d, s_qc, d, vj, D, AL)
        aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
        a = load_rows(ANC + tl.multiple_of(b64 * s_ab, AL), aoff, h * d, s_ac, d, vi, D, AL)
        do = load_rows(DOUT + tl.multiple_of(b64 * s_gb, AL), tl.multiple_of(tpos * s_gl, AL), h * d, s_gc, d, vj, D,
                       AL).to(DT)
        z = load_ws(Z, bwh * N2 + i, vi, D).to(DT)
        m, inv_l = load_stats(STAT, bwh * N1 + j, vj)
        delta = tl.load(DELTA + bwh * N1 + j, mask=vj, other=0.0)
        r = (ty[:, None] - au[None, :] + ah - 1) * Rw + (tx[:, None] - av[None, :] + aw - 1)
        s, _ = logits(q, inv_norm(q) * (tau * LOG2E), a, inv_norm(a), bias_h, r, tid, aid, vj, vi, PREC)
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        dp = mma(do, tl.trans(z), PREC)
        g += p * (dp - delta[:, None])
    gp = GP + ((grp * nh + h).to(tl.int64) * N1 + j[:, None]) * N2 + i[None, :]
    tl.store(gp, g, mask=vj[:, None] & vi[None, :])


@triton.jit
def stripe_bwd_bias1_partial(
    QKV, ANC, SCALE, BIAS, DZ, STAT, DELTA, GP,
    s_qb, s_ql, s_qc, s_ab, s_ah, s_aw, s_ac,
    H, W, th, tw, mth, mtw, Ha, Wa, tah, taw, mtah, mtaw, nWw, nW, nh, R,
    win_per_group, n_win,
    sh: tl.constexpr, sw: tl.constexpr, ah: tl.constexpr, aw: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """Stage 1: rows = anchors (softmax over tokens, values v, upstream dZ), columns = tokens. G is (N2, N1)."""
    N1: tl.constexpr = sh * sw
    N2: tl.constexpr = ah * aw
    Rw: tl.constexpr = sw + aw - 1
    C = nh * d  # computed here, not passed: its divisibility (from d) is then known
    pid = tl.program_id(0)
    h = pid % nh
    grp = pid // nh
    DT = QKV.dtype.element_ty
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R
    i = tl.program_id(1) * BM + tl.arange(0, BM)
    j = tl.program_id(2) * BN + tl.arange(0, BN)
    vi = i < N2
    vj = j < N1
    g = tl.zeros([BM, BN], tl.float32)
    w0 = grp * win_per_group
    for w in range(w0, tl.minimum(w0 + win_per_group, n_win)):
        b = w // nW
        wy = (w % nW) // nWw
        wx = (w % nW) % nWw
        b64 = tl.cast(b, tl.int64)
        bwh = tl.cast(w, tl.int64) * nh + h
        au, av, ar, ac, aid = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, mtah, mtaw)
        ty, tx, tr, tc, tid = grid_tile(j, wy, wx, sh, sw, H, W, th, tw, mth, mtw)
        toff = (tr.to(tl.int64) * W + tc) * s_ql
        qkv_b = QKV + tl.multiple_of(b64 * s_qb, AL)
        aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
        a = load_rows(ANC + tl.multiple_of(b64 * s_ab, AL), aoff, h * d, s_ac, d, vi, D, AL)
        k = load_rows(qkv_b, tl.multiple_of(toff, AL), C + h * d, s_qc, d, vj, D, AL)
        v = load_rows(qkv_b, tl.multiple_of(toff, AL), 2 * C + h * d, s_qc, d, vj, D, AL)
        dz = load_ws(DZ, bwh * N2 + i, vi, D).to(DT)
        m, inv_l = load_stats(STAT, bwh * N2 + i, vi)
        delta = tl.load(DELTA + bwh * N2 + i, mask=vi, other=0.0)
        r = (au[:, None] - ty[None, :] + sh - 1) * Rw + (av[:, None] - tx[None, :] + sw - 1)
        s, _ = logits(a, inv_norm(a) * (tau * LOG2E), k, inv_norm(k), bias_h, r, aid, tid, vi, vj, PREC)
        p = tl.exp2(s - m[:, None]) * inv_l[:, None]
        dp = mma(dz, tl.trans(v), PREC)
        g += p * (dp - delta[:, None])
    gp = GP + ((grp * nh + h).to(tl.int64) * N2 + i[:, None]) * N1 + j[None, :]
    tl.store(gp, g, mask=vi[:, None] & vj[None, :])


@triton.jit
def bias_grad_reduce(G, DB, R, rh: tl.constexpr, rw: tl.constexpr, ch: tl.constexpr, cw: tl.constexpr,
                     oy: tl.constexpr, ox: tl.constexpr, Rh: tl.constexpr, Rw: tl.constexpr,
                     BX: tl.constexpr, BV: tl.constexpr):
    """DB[h, ry*Rw + rx] = sum of G[h, j, k] over the pairs of that table row (module docstring).

    One program per (head, table row ry), vectorised over BX columns rx of the table and BV row
    positions v: for each row u of the rectangle (y = u - ry + oy), column x = v - rx + ox. Fixed
    order: the same bits on every run."""
    pid = tl.program_id(0)
    h = pid // Rh
    ry = pid % Rh
    u0 = tl.maximum(ry - oy, 0)
    u1 = tl.minimum(ry - oy + ch, rh)
    Nr: tl.constexpr = rh * rw
    Nc: tl.constexpr = ch * cw
    base = G + h.to(tl.int64) * Nr * Nc
    for xb in range(0, Rw, BX):
        rx = xb + tl.arange(0, BX)
        acc = tl.zeros([BX, BV], tl.float32)
        for u in range(u0, u1):
            y = u - ry + oy
            for vb in range(0, rw, BV):
                vv = vb + tl.arange(0, BV)
                xx = vv[None, :] - rx[:, None] + ox
                m = (rx < Rw)[:, None] & (vv < rw)[None, :] & (xx >= 0) & (xx < cw)
                off = (u * rw + vv[None, :]).to(tl.int64) * Nc + y * cw + xx
                acc += tl.load(base + off, mask=m, other=0.0)
        tl.store(DB + h * R + ry * Rw + rx, tl.sum(acc, 1), mask=rx < Rw)
