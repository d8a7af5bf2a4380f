"""Forward kernels of anchored stripe attention.

Stage 1 (anchors attend to the window's tokens, N1 up to 10368) is split over token
blocks, flash-decoding style: ``stripe_fwd_anchor_partial`` writes per-split
(unnormalised accumulator, running max, running sum) and ``stripe_fwd_combine`` merges
them into Z (N2 x D per window and head, float32) and the stage-1 row statistics.
Stage 2 (``stripe_fwd_tokens``): every program takes a block of tokens, loops over the
window's anchors (N2 <= 648), and writes its rows of Y straight into (B, H*W, C), and the
stage-2 row statistics. Row statistics (common.store_stats): (BWH, rows, 2) float32, the row
max m in log2 units and l = sum exp2(s - m); the backward recomputes P = exp2(s - m) / l.

Geometry arguments, in this order in every stripe kernel (see launcher.stripe_geo_args):
H, W, th, tw (token roll), mth, mtw (token mask shifts: 0 when not shifted), Ha, Wa, tah, taw,
mtah, mtaw (the same on the anchor grid), nWw, nW, nh, R (table rows). Fixed per model and
compiled in (constexpr, launcher.stripe_geo_constexprs): sh, sw (stripe), ah, aw (anchor
window), d (head dim), AL (row alignment); N1 = sh*sw, N2 = ah*aw, Rw = sw + aw - 1 (table row
stride) and C = nh*d follow. Index math by constexpr sizes compiles to multiply-shift sequences.
"""
import triton
import triton.language as tl

from .common import (
    LOG2E, decode_bwh, grid_tile, inv_norm, load_rows, load_ws, logits, online_softmax_step,
    store_rows, store_stats, store_ws,
)


@triton.jit
def stripe_fwd_anchor_partial(
    QKV, ANC, SCALE, BIAS, ACC, MS, LS,
    s_qb, s_ql, s_qc, s_ab, s_ah, s_aw, s_ac,
    H, W, th, tw, mth, mtw, Ha, Wa, tah, taw, mtah, mtaw, nWw, nW, nh, R,
    blocks_per_split, n_splits,
    sh: tl.constexpr, sw: tl.constexpr, ah: tl.constexpr, aw: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    N1: tl.constexpr = sh * sw
    N2: tl.constexpr = ah * aw
    Rw: tl.constexpr = sw + aw - 1
    C = nh * d  # computed here, not passed: its divisibility (from d) is then known
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b, h, wy, wx = decode_bwh(pid, nh, nW, nWw)
    DT = QKV.dtype.element_ty
    qkv_b = QKV + tl.multiple_of(b.to(tl.int64) * s_qb, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    i = pid_m * BM + tl.arange(0, BM)
    vi = i < N2
    au, av, ar, ac, aid = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, mtah, mtaw)
    aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
    a = load_rows(ANC + tl.multiple_of(b.to(tl.int64) * s_ab, AL), aoff, h * d, s_ac, d, vi, D, AL)
    inv_na = inv_norm(a)
    sa = inv_na * (tau * LOG2E)

    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    blk0 = pid_s * blocks_per_split
    blk1 = tl.minimum(blk0 + blocks_per_split, tl.cdiv(N1, BN))
    for jb in range(blk0, blk1):
        j = jb * BN + tl.arange(0, BN)
        vj = j < N1
        ty, tx, tr, tc, tid = grid_tile(j, wy, wx, sh, sw, H, W, th, tw, mth, mtw)
        toff = (tr.to(tl.int64) * W + tc) * s_ql
        k = load_rows(qkv_b, tl.multiple_of(toff, AL), C + h * d, s_qc, d, vj, D, AL)
        v = load_rows(qkv_b, tl.multiple_of(toff, AL), 2 * C + h * d, s_qc, d, vj, D, AL)
        inv_nk = inv_norm(k)
        r = (au[:, None] - ty[None, :] + sh - 1) * Rw + (av[:, None] - tx[None, :] + sw - 1)
        s, _ = logits(a, sa, k, inv_nk, bias_h, r, aid, tid, vi, vj, PREC)
        m, l, acc = online_softmax_step(m, l, acc, s, v, DT, PREC)

    row = (pid.to(tl.int64) * n_splits + pid_s) * N2 + i
    store_ws(ACC, row, vi, acc, D)
    tl.store(MS + row, m, mask=vi)
    tl.store(LS + row, l, mask=vi)


@triton.jit
def stripe_fwd_combine(ACC, MS, LS, Z, STAT, N2, n_splits, D: tl.constexpr, BM: tl.constexpr):
    """Merge the split partials: Z = sum_s w_s acc_s / l, w_s = 2^(m_s - m), m = max_s m_s,
    l = sum_s w_s l_s; stores the row statistics (m, l) of stage 1."""
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    i = pid_m * BM + tl.arange(0, BM)
    vi = i < N2
    base = pid.to(tl.int64) * n_splits * N2 + i
    mmax = tl.full([BM], float("-inf"), tl.float32)
    for s in range(0, n_splits):
        mmax = tl.maximum(mmax, tl.load(MS + base + s * N2, mask=vi, other=0.0))
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for s in range(0, n_splits):
        w = tl.exp2(tl.load(MS + base + s * N2, mask=vi, other=0.0) - mmax)
        l += w * tl.load(LS + base + s * N2, mask=vi, other=1.0)
        acc += w[:, None] * load_ws(ACC, base + s * N2, vi, D)
    row = pid.to(tl.int64) * N2 + i
    store_ws(Z, row, vi, acc / l[:, None], D)
    store_stats(STAT, row, vi, mmax, l)


@triton.jit
def stripe_fwd_tokens(
    QKV, ANC, SCALE, BIAS, Z, OUT, STAT,
    s_qb, s_ql, s_qc, s_ab, s_ah, s_aw, s_ac, s_ob, s_ol, s_oc,
    H, W, th, tw, mth, mtw, Ha, Wa, tah, taw, mtah, mtaw, nWw, nW, nh, R,
    sh: tl.constexpr, sw: tl.constexpr, ah: tl.constexpr, aw: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    N1: tl.constexpr = sh * sw
    N2: tl.constexpr = ah * aw
    Rw: tl.constexpr = sw + aw - 1
    C = nh * d  # computed here, not passed: its divisibility (from d) is then known
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h, wy, wx = decode_bwh(pid, nh, nW, nWw)
    DT = QKV.dtype.element_ty
    anc_b = ANC + tl.multiple_of(b.to(tl.int64) * s_ab, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    j = pid_m * BM + tl.arange(0, BM)
    vj = j < N1
    ty, tx, tr, tc, tid = grid_tile(j, wy, wx, sh, sw, H, W, th, tw, mth, mtw)
    tpos = tr.to(tl.int64) * W + tc
    q = load_rows(QKV + tl.multiple_of(b.to(tl.int64) * s_qb, AL), tl.multiple_of(tpos * s_ql, AL), h * d, s_qc, d, vj,
                  D, AL)
    inv_nq = inv_norm(q)
    sq = inv_nq * (tau * LOG2E)

    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for ib in range(0, tl.cdiv(N2, BN)):
        i = ib * BN + tl.arange(0, BN)
        vi = i < N2
        au, av, ar, ac, aid = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, mtah, mtaw)
        aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
        a = load_rows(anc_b, aoff, h * d, s_ac, d, vi, D, AL)
        inv_na = inv_norm(a)
        r = (ty[:, None] - au[None, :] + ah - 1) * Rw + (tx[:, None] - av[None, :] + aw - 1)
        s, _ = logits(q, sq, a, inv_na, bias_h, r, tid, aid, vj, vi, PREC)
        z = load_ws(Z, pid.to(tl.int64) * N2 + i, vi, D).to(DT)
        m, l, acc = online_softmax_step(m, l, acc, s, z, DT, PREC)

    store_rows(OUT + tl.multiple_of(b.to(tl.int64) * s_ob, AL), tl.multiple_of(tpos * s_ol, AL), h * d, s_oc, d, vj,
               acc / l[:, None], D, AL)
    store_stats(STAT, pid.to(tl.int64) * N1 + j, vj, m, l)
