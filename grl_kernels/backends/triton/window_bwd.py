"""Backward kernels of window attention (FlashAttention-2 style, from the saved row statistics).

P is recomputed as exp2(s - m) * (1 / l) from the forward's (m, l) per query
(common.store_stats) and s with the forward's bits (``logits_t`` in ``window_bwd_dkv``, whose
rows are keys; ``window_bwd_dq``, whose rows are the queries, accumulates l * dS and applies
1 / l once after its loop).

``window_bwd_dq`` (query blocks, loop over keys): Delta = rowsum(dO * O) (in float32; in 16 bits
Delta = sum_k P dP from a first pass over the keys, see the kernel), dq and the tau
partials (the bias-table gradient: bias_grad.py, without atomics). ``window_bwd_dkv`` (key blocks, loop over queries,
after the first kernel so Delta is complete): dk and dv.
"""
import triton
import triton.language as tl

from .common import (
    EPS, LOG2E, decode_bwh, grid_tile, inv_norm, load_rows, load_stats, logits, logits_t, mma,
    normalize_bwd, row_norm, store_rows, unit_rows,
)


@triton.jit
def window_bwd_dq(
    QKV, SCALE, BIAS, OUT, DOUT, STAT, DELTA, DQKV, DTAU,
    s_qb, s_ql, s_qc, s_ob, s_ol, s_oc, s_gb, s_gl, s_gc, s_db, s_dl, s_dc,
    H, W, t, nWw, nW, nh, R,
    ws: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    N: tl.constexpr = ws * ws
    Rw: tl.constexpr = 2 * ws - 1
    C = nh * d  # computed here, not passed: its divisibility (from d) is then known
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h, wy, wx = decode_bwh(pid, nh, nW, nWw)
    DT = QKV.dtype.element_ty
    b64 = b.to(tl.int64)
    qkv_b = QKV + tl.multiple_of(b64 * s_qb, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    j = pid_m * BM + tl.arange(0, BM)
    vq = j < N
    qy, qx, qr, qc, qid = grid_tile(j, wy, wx, ws, ws, H, W, t, t, t, t)
    qpos = qr.to(tl.int64) * W + qc
    q = load_rows(qkv_b, tl.multiple_of(qpos * s_ql, AL), h * d, s_qc, d, vq, D, AL)
    nq = row_norm(q)
    inv_nq = 1.0 / tl.maximum(nq, EPS)
    sq = inv_nq * (tau * LOG2E)
    qrel = qy * Rw + qx + (ws - 1) * (Rw + 1)  # table row = qrel - (ky * Rw + kx), as in window_fwd
    do = load_rows(DOUT + tl.multiple_of(b64 * s_gb, AL), tl.multiple_of(qpos * s_gl, AL), h * d, s_gc, d, vq, D,
                   AL).to(DT)
    row = pid.to(tl.int64) * N + j
    m, inv_l = load_stats(STAT, row, vq)
    o = load_rows(OUT + tl.multiple_of(b64 * s_ob, AL), tl.multiple_of(qpos * s_ol, AL), h * d, s_oc, d, vq, D, AL)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # float32; in 16 bits pass 0 replaces it
    if DT == tl.float32:
        tl.store(DELTA + row, delta, mask=vq)
    # 16 bits: pass 0 sums Delta = sum_k P dP from the P and dP that pass 1 uses (rowsum(dO * O)
    # with O rounded to 16 bits is off by |dO| |O| 2^-9 per row, which every dS of the row
    # carries: rows of dS then do not sum to 0, and the cancelling sums of dtau, the bias table
    # and dk drift); float32 runs pass 1 only
    for ps in tl.static_range(1 if DT == tl.float32 else 0, 2):
        dl = tl.zeros([BM], tl.float32)
        dqh = tl.zeros([BM, D], tl.float32)
        dtau = tl.zeros([BM], tl.float32)
        for kb in range(0, tl.cdiv(N, BN)):
            jk = kb * BN + tl.arange(0, BN)
            vk = jk < N
            ky, kx, kr, kc, kid = grid_tile(jk, wy, wx, ws, ws, H, W, t, t, t, t)
            koff = (kr.to(tl.int64) * W + kc) * s_ql
            k = load_rows(qkv_b, tl.multiple_of(koff, AL), C + h * d, s_qc, d, vk, D, AL)
            v = load_rows(qkv_b, tl.multiple_of(koff, AL), 2 * C + h * d, s_qc, d, vk, D, AL)
            inv_nk = inv_norm(k)
            r = qrel[:, None] - (ky * Rw + kx)[None, :]
            s, raw = logits(q, sq, k, inv_nk, bias_h, r, qid, kid, vq, vk, PREC)
            # l * P = exp2(s - m) and l * dS: the row factor 1 / l is applied once, after the loop
            p = tl.exp2(s - m[:, None])
            dp = mma(do, tl.trans(v), PREC)
            if ps == 0:
                dl += tl.sum(p * dp, 1)
            else:
                ds = p * (dp - delta[:, None])
                dtau += tl.sum(ds * raw * inv_nk[None, :], 1) * inv_nq
                dqh += mma(ds.to(DT), unit_rows(k, inv_nk, DT), PREC)
        if ps == 0:
            delta = dl * inv_l
            tl.store(DELTA + row, delta, mask=vq)

    dq = normalize_bwd(q, inv_nq, nq, dqh * (tau * inv_l)[:, None])
    store_rows(DQKV + tl.multiple_of(b64 * s_db, AL), tl.multiple_of(qpos * s_dl, AL), h * d, s_dc, d, vq, dq, D, AL)
    tl.store(DTAU + pid.to(tl.int64) * tl.num_programs(1) + pid_m, tl.sum(dtau * inv_l, 0))


@triton.jit
def window_bwd_dkv(
    QKV, SCALE, BIAS, DOUT, STAT, DELTA, DQKV,
    s_qb, s_ql, s_qc, s_gb, s_gl, s_gc, s_db, s_dl, s_dc,
    H, W, t, nWw, nW, nh, R,
    ws: tl.constexpr, d: tl.constexpr, AL: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    N: tl.constexpr = ws * ws
    Rw: tl.constexpr = 2 * ws - 1
    C = nh * d  # computed here, not passed: its divisibility (from d) is then known
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h, wy, wx = decode_bwh(pid, nh, nW, nWw)
    DT = QKV.dtype.element_ty
    b64 = b.to(tl.int64)
    qkv_b = QKV + tl.multiple_of(b64 * s_qb, AL)
    dout_b = DOUT + tl.multiple_of(b64 * s_gb, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    jk = pid_m * BM + tl.arange(0, BM)
    vk = jk < N
    ky, kx, kr, kc, kid = grid_tile(jk, wy, wx, ws, ws, H, W, t, t, t, t)
    kpos = kr.to(tl.int64) * W + kc
    k = load_rows(qkv_b, tl.multiple_of(kpos * s_ql, AL), C + h * d, s_qc, d, vk, D, AL)
    v = load_rows(qkv_b, tl.multiple_of(kpos * s_ql, AL), 2 * C + h * d, s_qc, d, vk, D, AL)
    nk = row_norm(k)
    inv_nk = 1.0 / tl.maximum(nk, EPS)

    dkh = tl.zeros([BM, D], tl.float32)
    dv = tl.zeros([BM, D], tl.float32)
    for qb in range(0, tl.cdiv(N, BN)):
        j = qb * BN + tl.arange(0, BN)
        vq = j < N
        qy, qx, qr, qc, qid = grid_tile(j, wy, wx, ws, ws, H, W, t, t, t, t)
        qpos = qr.to(tl.int64) * W + qc
        q = load_rows(qkv_b, tl.multiple_of(qpos * s_ql, AL), h * d, s_qc, d, vq, D, AL)
        inv_nq = inv_norm(q)
        r = (qy[None, :] - ky[:, None] + ws - 1) * Rw + (qx[None, :] - kx[:, None] + ws - 1)
        s, _ = logits_t(k, inv_nk, q, inv_nq * (tau * LOG2E), bias_h, r, kid, qid, vk, vq, PREC)
        row = pid.to(tl.int64) * N + j
        m, inv_l = load_stats(STAT, row, vq)
        delta = tl.load(DELTA + row, mask=vq, other=0.0)
        p = tl.exp2(s - m[None, :]) * inv_l[None, :]
        do = load_rows(dout_b, tl.multiple_of(qpos * s_gl, AL), h * d, s_gc, d, vq, D, AL).to(DT)
        dv += mma(p.to(DT), do, PREC)
        dp = mma(v, tl.trans(do), PREC)
        ds = p * (dp - delta[None, :])
        dkh += mma(ds.to(DT), unit_rows(q, inv_nq, DT), PREC)

    dk = normalize_bwd(k, inv_nk, nk, dkh * tau)
    dqkv_b = DQKV + tl.multiple_of(b64 * s_db, AL)
    store_rows(dqkv_b, tl.multiple_of(kpos * s_dl, AL), C + h * d, s_dc, d, vk, dk, D, AL)
    store_rows(dqkv_b, tl.multiple_of(kpos * s_dl, AL), 2 * C + h * d, s_dc, d, vk, dv, D, AL)
