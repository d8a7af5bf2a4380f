"""Backward kernels of anchored stripe attention (FlashAttention-2 style, from saved stats).

Saved by the forward: Y (the output), Z (float32, N2 x D per window/head), the row
statistics of both stages ((m, l) per softmax row, common.store_stats). With
P2 = softmax(S2), Y = P2 Z and P1 = softmax(S1), Z = P1 V, and dS = P * (dP - rowsum(dO * O)).
Every kernel recomputes P = exp2(s - m) * (1 / l) from s with the forward's bits (logits, or
logits_t where the kernel's rows are the forward's columns: stages 2 in ``stripe_bwd_anchors2``,
1 in ``stripe_bwd_tokens1``):

1. ``stripe_bwd_tokens2`` (token blocks, loop over anchors): Delta2 = rowsum(dY * Y) (in 16
   bits sum_i P2 dP2, from a first pass over the anchors), dq and the tau2 partials.
2. ``stripe_bwd_anchors2`` (anchor blocks x token splits): dZ = P2^T dY and the
   stage-2 part of d(a_hat); partials per split, summed on the host.
3. (host) dZ = sum of splits, Delta1 = rowsum(dZ * Z); in 16 bits Delta1 = sum_j P1 dP1 from
   ``stripe_bwd_anchors1`` with DELTA_PASS (one split: all token blocks), with the loop's own P1
   and dP1 = round(dZ) V^T (rowsum(dZ * Z) is off by (dZ - round(dZ)) . Z and by Z's rounded
   P1 per row, which every dS1 of the row carries: the cancelling sums drift).
4. ``stripe_bwd_anchors1`` (anchor blocks x token splits): stage-1 part of d(a_hat).
5. ``stripe_bwd_anchor_finalize``: d(a_hat) -> d(anchor) through F.normalize, scattered
   to (B, H/f, W/f, C).
6. ``stripe_bwd_tokens1`` (token blocks, loop over anchors): dk, dv and the tau1 partials.
7. the bias-table gradients of both stages: bias_grad.py (partials per tile, no atomics).

The query/key/anchor gradients are accumulated against the normalised vectors and taken
through F.normalize's backward per row at the end; no N1 x N2 map is ever stored.
"""
import triton
import triton.language as tl

from .common import (
    EPS, LOG2E, decode_bwh, grid_tile, inv_norm, load_rows, load_stats, load_ws, logits, logits_t, mma,
    normalize_bwd, row_norm, unit_rows, store_rows, store_ws,
)


@triton.jit
def stripe_bwd_tokens2(
    QKV, ANC, SCALE, BIAS, Z, OUT, DOUT, STAT, DELTA, DQKV, DTAU,
    s_qb, s_ql, s_qc, s_ab, s_ah, s_aw, s_ac, s_ob, s_ol, s_oc, s_gb, s_gl, s_gc, s_db, s_dl, s_dc,
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
    b64 = b.to(tl.int64)
    anc_b = ANC + tl.multiple_of(b64 * s_ab, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    j = pid_m * BM + tl.arange(0, BM)
    vj = j < N1
    ty, tx, tr, tc, tid = grid_tile(j, wy, wx, sh, sw, H, W, th, tw, mth, mtw)
    tpos = tr.to(tl.int64) * W + tc
    q = load_rows(QKV + tl.multiple_of(b64 * s_qb, AL), tl.multiple_of(tpos * s_ql, AL), h * d, s_qc, d, vj, D, AL)
    nq = row_norm(q)
    inv_nq = 1.0 / tl.maximum(nq, EPS)
    sq = inv_nq * (tau * LOG2E)
    do = load_rows(DOUT + tl.multiple_of(b64 * s_gb, AL), tl.multiple_of(tpos * s_gl, AL), h * d, s_gc, d, vj, D,
                   AL).to(DT)
    tok = pid.to(tl.int64) * N1 + j
    m, inv_l = load_stats(STAT, tok, vj)
    o = load_rows(OUT + tl.multiple_of(b64 * s_ob, AL), tl.multiple_of(tpos * s_ol, AL), h * d, s_oc, d, vj, D, AL)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # float32; in 16 bits pass 0 replaces it
    if DT == tl.float32:
        tl.store(DELTA + tok, delta, mask=vj)
    # 16 bits: pass 0 sums Delta2 = sum_i P2 dP2 with pass 1's own P2 and dP2 (not rowsum(dY * Y)
    # with Y rounded to 16 bits: see window_bwd_dq); float32 runs pass 1 only
    for ps in tl.static_range(1 if DT == tl.float32 else 0, 2):
        dl = tl.zeros([BM], tl.float32)
        dqh = tl.zeros([BM, D], tl.float32)
        dtau = tl.zeros([BM], tl.float32)
        for ib in range(0, tl.cdiv(N2, BN)):
            i = ib * BN + tl.arange(0, BN)
            vi = i < N2
            au, av, ar, ac, aid = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, mtah, mtaw)
            aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
            a = load_rows(anc_b, aoff, h * d, s_ac, d, vi, D, AL)
            inv_na = inv_norm(a)
            r = (ty[:, None] - au[None, :] + ah - 1) * Rw + (tx[:, None] - av[None, :] + aw - 1)
            s, raw = logits(q, sq, a, inv_na, bias_h, r, tid, aid, vj, vi, PREC)
            p = tl.exp2(s - m[:, None]) * inv_l[:, None]
            z = load_ws(Z, pid.to(tl.int64) * N2 + i, vi, D).to(DT)
            dp = mma(do, tl.trans(z), PREC)
            if ps == 0:
                dl += tl.sum(p * dp, 1)
            else:
                ds = p * (dp - delta[:, None])
                dtau += tl.sum(ds * raw * inv_na[None, :], 1) * inv_nq
                dqh += mma(ds.to(DT), unit_rows(a, inv_na, DT), PREC)
        if ps == 0:
            delta = dl
            tl.store(DELTA + tok, delta, mask=vj)

    dq = normalize_bwd(q, inv_nq, nq, dqh * tau)
    store_rows(DQKV + tl.multiple_of(b64 * s_db, AL), tl.multiple_of(tpos * s_dl, AL), h * d, s_dc, d, vj, dq, D, AL)
    tl.store(DTAU + pid.to(tl.int64) * tl.num_programs(1) + pid_m, tl.sum(dtau, 0))


@triton.jit
def stripe_bwd_anchors2(
    QKV, ANC, SCALE, BIAS, Z, DOUT, STAT, DELTA, DZP, DAP,
    s_qb, s_ql, s_qc, s_ab, s_ah, s_aw, s_ac, s_gb, s_gl, s_gc,
    H, W, th, tw, mth, mtw, Ha, Wa, tah, taw, mtah, mtaw, nWw, nW, nh, R,
    blocks_per_split, BWH,
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
    b64 = b.to(tl.int64)
    qkv_b = QKV + tl.multiple_of(b64 * s_qb, AL)
    dout_b = DOUT + tl.multiple_of(b64 * s_gb, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    i = pid_m * BM + tl.arange(0, BM)
    vi = i < N2
    au, av, ar, ac, aid = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, mtah, mtaw)
    aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
    a = load_rows(ANC + tl.multiple_of(b64 * s_ab, AL), aoff, h * d, s_ac, d, vi, D, AL)
    inv_na = inv_norm(a)
    zi = load_ws(Z, pid.to(tl.int64) * N2 + i, vi, D).to(DT)

    dz = tl.zeros([BM, D], tl.float32)
    dah = tl.zeros([BM, D], tl.float32)
    blk0 = pid_s * blocks_per_split
    blk1 = tl.minimum(blk0 + blocks_per_split, tl.cdiv(N1, BN))
    for jb in range(blk0, blk1):
        j = jb * BN + tl.arange(0, BN)
        vj = j < N1
        ty, tx, tr, tc, tid = grid_tile(j, wy, wx, sh, sw, H, W, th, tw, mth, mtw)
        tpos = tr.to(tl.int64) * W + tc
        q = load_rows(qkv_b, tl.multiple_of(tpos * s_ql, AL), h * d, s_qc, d, vj, D, AL)
        inv_nq = inv_norm(q)
        r = (ty[None, :] - au[:, None] + ah - 1) * Rw + (tx[None, :] - av[:, None] + aw - 1)
        s, _ = logits_t(a, inv_na, q, inv_nq * (tau * LOG2E), bias_h, r, aid, tid, vi, vj, PREC)
        tok = pid.to(tl.int64) * N1 + j
        m, inv_l = load_stats(STAT, tok, vj)
        delta = tl.load(DELTA + tok, mask=vj, other=0.0)
        p = tl.exp2(s - m[None, :]) * inv_l[None, :]
        do = load_rows(dout_b, tl.multiple_of(tpos * s_gl, AL), h * d, s_gc, d, vj, D, AL).to(DT)
        dz += mma(p.to(DT), do, PREC)
        dp = mma(zi, tl.trans(do), PREC)
        ds = p * (dp - delta[None, :])
        dah += mma(ds.to(DT), unit_rows(q, inv_nq, DT), PREC)

    row = (pid_s * BWH + pid).to(tl.int64) * N2 + i
    store_ws(DZP, row, vi, dz, D)
    store_ws(DAP, row, vi, dah * tau, D)


@triton.jit
def stripe_bwd_anchors1(
    QKV, ANC, SCALE, BIAS, DZ, DELTA, STAT, DAP,
    s_qb, s_ql, s_qc, s_ab, s_ah, s_aw, s_ac,
    H, W, th, tw, mth, mtw, Ha, Wa, tah, taw, mtah, mtaw, nWw, nW, nh, R,
    blocks_per_split, BWH,
    sh: tl.constexpr, sw: tl.constexpr, ah: tl.constexpr, aw: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, DELTA_PASS: tl.constexpr = False,
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
    b64 = b.to(tl.int64)
    qkv_b = QKV + tl.multiple_of(b64 * s_qb, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    i = pid_m * BM + tl.arange(0, BM)
    vi = i < N2
    au, av, ar, ac, aid = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, mtah, mtaw)
    aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
    a = load_rows(ANC + tl.multiple_of(b64 * s_ab, AL), aoff, h * d, s_ac, d, vi, D, AL)
    inv_na = inv_norm(a)
    sa = inv_na * (tau * LOG2E)
    arow = pid.to(tl.int64) * N2 + i
    dzi = load_ws(DZ, arow, vi, D).to(DT)
    m, inv_l = load_stats(STAT, arow, vi)
    if DELTA_PASS:
        delta = tl.zeros([BM], tl.float32)  # unused: this launch sums sum_j l * P1 dP1 instead
    else:
        delta = tl.load(DELTA + arow, mask=vi, other=0.0)

    dah = tl.zeros([BM, D], tl.float32)
    dl = tl.zeros([BM], tl.float32)
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
        dp = mma(dzi, tl.trans(v), PREC)
        if DELTA_PASS:
            dl += tl.sum(tl.exp2(s - m[:, None]) * dp, 1)
        else:
            p = tl.exp2(s - m[:, None]) * inv_l[:, None]
            ds = p * (dp - delta[:, None])
            dah += mma(ds.to(DT), unit_rows(k, inv_nk, DT), PREC)

    if DELTA_PASS:
        tl.store(DELTA + arow, dl * inv_l, mask=vi)
    else:
        store_ws(DAP, (pid_s * BWH + pid).to(tl.int64) * N2 + i, vi, dah * tau, D)


@triton.jit
def stripe_bwd_anchor_finalize(
    ANC, DAH, DANC,
    s_ab, s_ah, s_aw, s_ac, s_eb, s_eh, s_ew, s_ec,
    H, W, th, tw, mth, mtw, Ha, Wa, tah, taw, mtah, mtaw, nWw, nW, nh, R,
    sh: tl.constexpr, sw: tl.constexpr, ah: tl.constexpr, aw: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr,
):
    N1: tl.constexpr = sh * sw
    N2: tl.constexpr = ah * aw
    Rw: tl.constexpr = sw + aw - 1
    C = nh * d  # computed here, not passed: its divisibility (from d) is then known
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h, wy, wx = decode_bwh(pid, nh, nW, nWw)
    b64 = b.to(tl.int64)
    i = pid_m * BM + tl.arange(0, BM)
    vi = i < N2
    au, av, ar, ac, _ = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, 0, 0)
    aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
    a = load_rows(ANC + tl.multiple_of(b64 * s_ab, AL), aoff, h * d, s_ac, d, vi, D, AL)
    na = row_norm(a)
    inv_na = 1.0 / tl.maximum(na, EPS)
    dah = load_ws(DAH, pid.to(tl.int64) * N2 + i, vi, D)
    da = normalize_bwd(a, inv_na, na, dah)
    store_rows(DANC + tl.multiple_of(b64 * s_eb, AL),
               tl.multiple_of(ar.to(tl.int64) * s_eh + ac.to(tl.int64) * s_ew, AL), h * d, s_ec, d, vi, da, D, AL)


@triton.jit
def stripe_bwd_tokens1(
    QKV, ANC, SCALE, BIAS, DZ, DELTA, STAT, DQKV, DTAU,
    s_qb, s_ql, s_qc, s_ab, s_ah, s_aw, s_ac, s_db, s_dl, s_dc,
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
    b64 = b.to(tl.int64)
    anc_b = ANC + tl.multiple_of(b64 * s_ab, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    j = pid_m * BM + tl.arange(0, BM)
    vj = j < N1
    ty, tx, tr, tc, tid = grid_tile(j, wy, wx, sh, sw, H, W, th, tw, mth, mtw)
    tpos = tr.to(tl.int64) * W + tc
    qkv_b = QKV + tl.multiple_of(b64 * s_qb, AL)
    k = load_rows(qkv_b, tl.multiple_of(tpos * s_ql, AL), C + h * d, s_qc, d, vj, D, AL)
    v = load_rows(qkv_b, tl.multiple_of(tpos * s_ql, AL), 2 * C + h * d, s_qc, d, vj, D, AL)
    nk = row_norm(k)
    inv_nk = 1.0 / tl.maximum(nk, EPS)

    dkh = tl.zeros([BM, D], tl.float32)
    dv = tl.zeros([BM, D], tl.float32)
    dtau = tl.zeros([BM], tl.float32)
    for ib in range(0, tl.cdiv(N2, BN)):
        i = ib * BN + tl.arange(0, BN)
        vi = i < N2
        au, av, ar, ac, aid = grid_tile(i, wy, wx, ah, aw, Ha, Wa, tah, taw, mtah, mtaw)
        aoff = tl.multiple_of(ar.to(tl.int64) * s_ah + ac.to(tl.int64) * s_aw, AL)
        a = load_rows(anc_b, aoff, h * d, s_ac, d, vi, D, AL)
        inv_na = inv_norm(a)
        r = (au[None, :] - ty[:, None] + sh - 1) * Rw + (av[None, :] - tx[:, None] + sw - 1)
        s, raw = logits_t(k, inv_nk, a, inv_na * (tau * LOG2E), bias_h, r, tid, aid, vj, vi, PREC)
        arow = pid.to(tl.int64) * N2 + i
        m, inv_l = load_stats(STAT, arow, vi)
        delta = tl.load(DELTA + arow, mask=vi, other=0.0)
        p = tl.exp2(s - m[None, :]) * inv_l[None, :]
        dz = load_ws(DZ, arow, vi, D).to(DT)
        dv += mma(p.to(DT), dz, PREC)
        dp = mma(v, tl.trans(dz), PREC)
        ds = p * (dp - delta[None, :])
        dtau += tl.sum(ds * raw * inv_na[None, :], 1) * inv_nk
        dkh += mma(ds.to(DT), unit_rows(a, inv_na, DT), PREC)

    dk = normalize_bwd(k, inv_nk, nk, dkh * tau)
    dqkv_b = DQKV + tl.multiple_of(b64 * s_db, AL)
    store_rows(dqkv_b, tl.multiple_of(tpos * s_dl, AL), C + h * d, s_dc, d, vj, dk, D, AL)
    store_rows(dqkv_b, tl.multiple_of(tpos * s_dl, AL), 2 * C + h * d, s_dc, d, vj, dv, D, AL)
    tl.store(DTAU + pid.to(tl.int64) * tl.num_programs(1) + pid_m, tl.sum(dtau, 0))
