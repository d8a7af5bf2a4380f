"""Forward kernel of (shifted) window attention.

One program per (batch, window, head, block of queries); it loops over the window's
keys (N = ws*ws <= 1296) with an online softmax, reading q/k/v in place from qkv
(token j of window n at geometry.token_position) and writing Y straight into
(B, H*W, C), plus the row statistics for the backward (common.store_stats: (BWH, N, 2)
float32, the row max m in log2 units and l = sum exp2(s - m)).

Geometry arguments, in this order in every window kernel (see launcher.window_geo_args):
H, W, t (shift, also the mask shift), nWw, nW, nh, R; compiled in (constexpr): ws, d, AL, and
from them N = ws*ws, Rw = 2 ws - 1, C = nh*d.
"""
import triton
import triton.language as tl

from .common import (
    LOG2E, decode_bwh, grid_tile, inv_norm, load_rows, logits, online_softmax_step, store_rows, store_stats,
)


@triton.jit
def window_fwd(
    QKV, SCALE, BIAS, OUT, STAT,
    s_qb, s_ql, s_qc, s_ob, s_ol, s_oc,
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
    qkv_b = QKV + tl.multiple_of(b.to(tl.int64) * s_qb, AL)
    tau = tl.load(SCALE + h).to(tl.float32)
    bias_h = BIAS + h * R

    j = pid_m * BM + tl.arange(0, BM)
    vq = j < N
    qy, qx, qr, qc, qid = grid_tile(j, wy, wx, ws, ws, H, W, t, t, t, t)
    qpos = qr.to(tl.int64) * W + qc
    q = load_rows(qkv_b, tl.multiple_of(qpos * s_ql, AL), h * d, s_qc, d, vq, D, AL)
    inv_nq = inv_norm(q)
    sq = inv_nq * (tau * LOG2E)
    # table row of (query, key) = (qy - ky + ws - 1) * Rw + (qx - kx + ws - 1), split into a
    # per-query and a per-key term: one subtraction per pair, one live vector per side
    qrel = qy * Rw + qx + (ws - 1) * (Rw + 1)

    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for kb in range(0, tl.cdiv(N, BN)):
        jk = kb * BN + tl.arange(0, BN)
        vk = jk < N
        ky, kx, kr, kc, kid = grid_tile(jk, wy, wx, ws, ws, H, W, t, t, t, t)
        koff = (kr.to(tl.int64) * W + kc) * s_ql
        k = load_rows(qkv_b, tl.multiple_of(koff, AL), C + h * d, s_qc, d, vk, D, AL)
        v = load_rows(qkv_b, tl.multiple_of(koff, AL), 2 * C + h * d, s_qc, d, vk, D, AL)
        inv_nk = inv_norm(k)
        r = qrel[:, None] - (ky * Rw + kx)[None, :]
        s, _ = logits(q, sq, k, inv_nk, bias_h, r, qid, kid, vq, vk, PREC)
        m, l, acc = online_softmax_step(m, l, acc, s, v, DT, PREC)

    store_rows(OUT + tl.multiple_of(b.to(tl.int64) * s_ob, AL), tl.multiple_of(qpos * s_ol, AL), h * d, s_oc, d, vq,
               acc / l[:, None], D, AL)
    store_stats(STAT, pid.to(tl.int64) * N + j, vq, m, l)
