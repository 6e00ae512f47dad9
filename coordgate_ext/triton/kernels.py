"""Triton kernels of the gated convolution (DESIGN.md section 4), forward and backward.

Notation: input x (N, Cin, H, W), weight W (C, Cin/G, KH, KW) with G groups (Cg = C / G
output channels and Cin_g = Cin / G input channels per group), output grid Ho x Wo with
P = Ho * Wo pixels, gate g (C, Ho, Wo):

    y[n, c, i, j]   = b[c] + sum_{ci, u, v} W[c, ci, u, v] * x[n, G(c)*Cin_g + ci, i*sh + u*dh - ph, j*sw + v*dw - pw]
    out[n, c, i, j] = g[c, i, j] * y[n, c, i, j]
    mix[n, o, i, j] = mb[o] + sum_c M[o, c] * out[n, c, i, j]          (the fused 1x1 mix)

Every tensor is addressed through explicit element strides, so NCHW and channels_last (and
any other strided layout) share one kernel; pixel and channel offsets are widened to int64
before they meet a stride. Accumulation is float32 whatever the storage dtype.

Constexpr flags shared by the kernels:
    UPCAST      cast tl.dot operands to float32 (set when running under the Triton
                interpreter, whose bfloat16 arithmetic is not reliable; False on the GPU, where
                float16 / bfloat16 operands go to the tensor cores)
    ALLOW_TF32  float32 operands may use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)
    GATE_MODE   0: load g from a (C, Ho, Wo) map; 1: evaluate the MLP encoder in the kernel
                from the tile's pixel indices (coordinates r_i = -1 + i * 2/(Ho-1),
                q_j = -1 + j * 2/(Wo-1), hidden layers as small float32 dots, the last E x C
                layer as a tl.dot)
    activation codes are the indices of coordgate_ext.reference.ACTIVATIONS.

Programs of the forward kernels own a tile of BLOCK_M output pixels and loop over the batch
inside, so the gate of a tile is computed (or loaded) once and reused for every sample.
No kernel uses atomics: every reduction is owned by one program or written as per-program
partials that the launcher sums in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl


# Only builtins of triton.language and this module's own jit functions are used: the
# library's jit helpers (tl.cdiv, tl.sigmoid, tl.zeros, tl.sum) are bound when triton is
# imported, compiled or interpreted once for the process, and would not run in this module's
# interpreted copy (_runtime.py).


@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _sigmoid(a):
    return 1.0 / (1.0 + tl.exp(-a))


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _activation(a, ACT: tl.constexpr):
    """phi(a) for ACT an index into reference.ACTIVATIONS (float32 in, float32 out)."""
    if ACT == 1:
        # NaN passes, as in torch.relu (plain tl.maximum returns 0 for NaN on the GPU).
        a = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        a = _sigmoid(a)
    elif ACT == 3:
        a = 2.0 * _sigmoid(2.0 * a) - 1.0
    elif ACT == 4:
        a = a * _sigmoid(a)
    elif ACT == 5:
        a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 6:
        # softplus with torch's threshold of 20, written without overflow.
        soft = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL) + tl.log(1.0 + tl.exp(-tl.abs(a)))
        a = tl.where(a > 20.0, a, soft)
    return a


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc + a @ b with float32 accumulation."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _conv_tile(
    x_n_ptr, w_ptr, oi, oj, p_mask, c, c_mask, grp,
    H, W, Cin_g, KH, KW, sh, sw, ph, pw, dh, dw,
    stride_xc, stride_xh, stride_xw,
    stride_wc, stride_wi, stride_wh, stride_ww,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) float32 tile of the bias-free convolution of one sample as an implicit
    GEMM over K = KH * KW * Cin_g: pixels (oi, oj), channels c of group grp; x_n_ptr points at
    the sample. The reduction walks the taps (u, v) and, per tap, blocks of BLOCK_K input
    channels, so a tile's address is a pixel vector plus a channel vector (contiguous along K
    in channels_last) and its mask is a pixel-validity vector times a channel one."""
    n_ci = _cdiv(Cin_g, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    c64 = c.to(tl.int64)
    for t in range(0, KH * KW * n_ci):
        uv = t // n_ci
        ci = (t - uv * n_ci) * BLOCK_K + tl.arange(0, BLOCK_K)
        u = uv // KW
        v = uv - u * KW
        hi = oi * sh + (u * dh - ph)
        wi = oj * sw + (v * dw - pw)
        pix_ok = p_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        ci_mask = ci < Cin_g
        cin = (grp * Cin_g + ci).to(tl.int64)
        a = tl.load(
            x_n_ptr + (hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw)[:, None]
            + (cin * stride_xc)[None, :],
            mask=pix_ok[:, None] & ci_mask[None, :], other=0.0,
        )
        b = tl.load(
            w_ptr + (c64 * stride_wc)[None, :] + (ci.to(tl.int64) * stride_wi + u * stride_wh + v * stride_ww)[:, None],
            mask=ci_mask[:, None] & c_mask[None, :], other=0.0,
        )
        acc = _dot(a, b, acc, UPCAST, ALLOW_TF32)
    return acc


@triton.jit
def _gate_tile(
    g_ptr, enc_w0_ptr, enc_b0_ptr, enc_wh_ptr, enc_bh_ptr, enc_wl_ptr, enc_bl_ptr,
    oi, oj, p_mask, c, c_mask, E, scale_r, scale_q,
    stride_gc, stride_gh, stride_gw,
    GATE_MODE: tl.constexpr, N_LAYERS: tl.constexpr, BLOCK_E: tl.constexpr,
    HIDDEN_ACT: tl.constexpr, GATE_ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) gate tile g[c, oi, oj].

    GATE_MODE 0 loads it from the map (in the map's dtype: callers convert). GATE_MODE 1 evaluates the encoder: layer 0 (E, 2) as
    two broadcast FMAs, the N_LAYERS - 2 hidden (E, E) layers stacked in enc_wh (L-2, E, E)
    and the last (C, E) layer as tl.dot in float32 (gate maths stay in float32); with
    N_LAYERS == 1 the only layer (C, 2) is applied directly. Weights are contiguous."""
    c64 = c.to(tl.int64)
    mask = p_mask[:, None] & c_mask[None, :]
    if GATE_MODE == 0:
        g_pix = oi.to(tl.int64) * stride_gh + oj.to(tl.int64) * stride_gw
        g = tl.load(g_ptr + g_pix[:, None] + (c64 * stride_gc)[None, :], mask=mask, other=0.0)
    else:
        r = oi.to(tl.float32) * scale_r - 1.0
        q = oj.to(tl.float32) * scale_q - 1.0
        if N_LAYERS == 1:
            w_r = tl.load(enc_wl_ptr + c64 * 2, mask=c_mask, other=0.0).to(tl.float32)
            w_q = tl.load(enc_wl_ptr + c64 * 2 + 1, mask=c_mask, other=0.0).to(tl.float32)
            bl = tl.load(enc_bl_ptr + c64, mask=c_mask, other=0.0).to(tl.float32)
            pre = r[:, None] * w_r[None, :] + q[:, None] * w_q[None, :] + bl[None, :]
        else:
            e = tl.arange(0, BLOCK_E)
            e_mask = e < E
            w_r = tl.load(enc_w0_ptr + e * 2, mask=e_mask, other=0.0).to(tl.float32)
            w_q = tl.load(enc_w0_ptr + e * 2 + 1, mask=e_mask, other=0.0).to(tl.float32)
            b0 = tl.load(enc_b0_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
            h = _activation(r[:, None] * w_r[None, :] + q[:, None] * w_q[None, :] + b0[None, :], HIDDEN_ACT)
            h = tl.where(e_mask[None, :], h, 0.0)
            for layer in tl.static_range(N_LAYERS - 2):
                wh = tl.load(
                    enc_wh_ptr + layer * E * E + e[None, :] * E + e[:, None],
                    mask=e_mask[:, None] & e_mask[None, :], other=0.0,
                ).to(tl.float32)
                bh = tl.load(enc_bh_ptr + layer * E + e, mask=e_mask, other=0.0).to(tl.float32)
                h = _activation(tl.dot(h, wh, input_precision="ieee") + bh[None, :], HIDDEN_ACT)
                h = tl.where(e_mask[None, :], h, 0.0)
            wl = tl.load(
                enc_wl_ptr + c64[None, :] * E + e[:, None],
                mask=e_mask[:, None] & c_mask[None, :], other=0.0,
            ).to(tl.float32)
            bl = tl.load(enc_bl_ptr + c64, mask=c_mask, other=0.0).to(tl.float32)
            pre = tl.dot(h, wl, input_precision="ieee") + bl[None, :]
        g = _activation(pre, GATE_ACT)
    return g


@triton.jit
def _output_tile(Cg, Ho, Wo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The output tile of a program on the grid (cdiv(Ho*Wo, BLOCK_M), G * cdiv(Cg, BLOCK_N)):
    group grp, its channels c (BLOCK_N) and pixels (oi, oj) (BLOCK_M), with their masks."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_cblocks = _cdiv(Cg, BLOCK_N)
    grp = pid_n // n_cblocks
    c_local = (pid_n - grp * n_cblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = c_local < Cg
    c = grp * Cg + c_local
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = p < Ho * Wo
    oi = p // Wo
    oj = p - oi * Wo
    mask = p_mask[:, None] & c_mask[None, :]
    return grp, c, c_mask, p_mask, oi, oj, mask


@triton.jit
def _gated_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr,
    enc_w0_ptr, enc_b0_ptr, enc_wh_ptr, enc_bh_ptr, enc_wl_ptr, enc_bl_ptr,
    out_ptr, y_ptr,
    N, H, W, Cin_g, Cg, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw, E, scale_r, scale_q,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wc, stride_wi, stride_wh, stride_ww,
    stride_gc, stride_gh, stride_gw,
    stride_on, stride_oc, stride_oh, stride_ow,
    HAS_BIAS: tl.constexpr, SAVE_Y: tl.constexpr,
    GATE_MODE: tl.constexpr, N_LAYERS: tl.constexpr, BLOCK_E: tl.constexpr,
    HIDDEN_ACT: tl.constexpr, GATE_ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """out (N, C, Ho, Wo) = g * (conv2d(x, W) + b), and y = conv2d(x, W) + b when SAVE_Y
    (y has out's strides, so one offset tensor addresses both).

    Grid (cdiv(P, BLOCK_M), G * cdiv(Cg, BLOCK_N)): a program owns BLOCK_M pixels and
    BLOCK_N channels of one group, computes their gate once and loops over the batch."""
    grp, c, c_mask, p_mask, oi, oj, mask = _output_tile(Cg, Ho, Wo, BLOCK_M, BLOCK_N)

    # The gate of the tile is computed (or loaded, in the storage dtype) once and stays in
    # registers for the whole batch.
    g = _gate_tile(
        g_ptr, enc_w0_ptr, enc_b0_ptr, enc_wh_ptr, enc_bh_ptr, enc_wl_ptr, enc_bl_ptr,
        oi, oj, p_mask, c, c_mask, E, scale_r, scale_q, stride_gc, stride_gh, stride_gw,
        GATE_MODE, N_LAYERS, BLOCK_E, HIDDEN_ACT, GATE_ACT, BLOCK_M, BLOCK_N,
    )
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    c64 = c.to(tl.int64)
    for n in range(0, N):
        n64 = tl.cast(n, tl.int64)
        y = _conv_tile(
            x_ptr + n64 * stride_xn, w_ptr, oi, oj, p_mask, c, c_mask, grp,
            H, W, Cin_g, KH, KW, sh, sw, ph, pw, dh, dw,
            stride_xc, stride_xh, stride_xw, stride_wc, stride_wi, stride_wh, stride_ww,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ALLOW_TF32,
        )
        if HAS_BIAS:
            y += bias[None, :]
        o_pix = n64 * stride_on + oi.to(tl.int64) * stride_oh + oj.to(tl.int64) * stride_ow
        off = o_pix[:, None] + (c64 * stride_oc)[None, :]
        if SAVE_Y:
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + off, (g.to(tl.float32) * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_conv2d_mix_fwd_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr,
    enc_w0_ptr, enc_b0_ptr, enc_wh_ptr, enc_bh_ptr, enc_wl_ptr, enc_bl_ptr,
    m_ptr, mb_ptr, out_ptr, y_ptr,
    N, H, W, Cin_g, Cg, G, Cout, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw, E, scale_r, scale_q,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wc, stride_wi, stride_wh, stride_ww,
    stride_gc, stride_gh, stride_gw,
    stride_mo, stride_mc,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_yn, stride_yc, stride_yh, stride_yw,
    HAS_BIAS: tl.constexpr, HAS_MIX_BIAS: tl.constexpr, SAVE_Y: tl.constexpr,
    GATE_MODE: tl.constexpr, N_LAYERS: tl.constexpr, BLOCK_E: tl.constexpr,
    HIDDEN_ACT: tl.constexpr, GATE_ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """The block: out (N, Cout, Ho, Wo) = mb + M @ (g * (conv2d(x, W) + b)) with M (Cout, C),
    Cout <= BLOCK_O; y = conv2d(x, W) + b stored when SAVE_Y.

    Grid (cdiv(P, BLOCK_M),): a program owns BLOCK_M pixels and every channel; per sample
    it walks the channel blocks of every group, gates each conv tile on chip and feeds it
    (in the storage dtype) to the second GEMM, so the gated (N, C, Ho, Wo) tensor is never
    written."""
    pid_m = tl.program_id(0)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = p < Ho * Wo
    oi = p // Wo
    oj = p - oi * Wo
    o = tl.arange(0, BLOCK_O)
    o_mask = o < Cout
    n_cblocks = _cdiv(Cg, BLOCK_N)
    if HAS_MIX_BIAS:
        mix_bias = tl.load(mb_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
    for n in range(0, N):
        n64 = tl.cast(n, tl.int64)
        acc = tl.full((BLOCK_M, BLOCK_O), 0.0, tl.float32)
        for t in range(0, G * n_cblocks):
            grp = t // n_cblocks
            c_local = (t - grp * n_cblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
            c_mask = c_local < Cg
            c = (grp * Cg + c_local).to(tl.int64)
            y = _conv_tile(
                x_ptr + n64 * stride_xn, w_ptr, oi, oj, p_mask, c, c_mask, grp,
                H, W, Cin_g, KH, KW, sh, sw, ph, pw, dh, dw,
                stride_xc, stride_xh, stride_xw, stride_wc, stride_wi, stride_wh, stride_ww,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ALLOW_TF32,
            )
            if HAS_BIAS:
                y += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
            if SAVE_Y:
                y_pix = n64 * stride_yn + oi.to(tl.int64) * stride_yh + oj.to(tl.int64) * stride_yw
                tl.store(
                    y_ptr + y_pix[:, None] + (c * stride_yc)[None, :],
                    y.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :],
                )
            g = _gate_tile(
                g_ptr, enc_w0_ptr, enc_b0_ptr, enc_wh_ptr, enc_bh_ptr, enc_wl_ptr, enc_bl_ptr,
                oi, oj, p_mask, c, c_mask, E, scale_r, scale_q, stride_gc, stride_gh, stride_gw,
                GATE_MODE, N_LAYERS, BLOCK_E, HIDDEN_ACT, GATE_ACT, BLOCK_M, BLOCK_N,
            )
            z = (g.to(tl.float32) * y).to(out_ptr.dtype.element_ty)
            m = tl.load(
                m_ptr + (o.to(tl.int64) * stride_mo)[None, :] + (c * stride_mc)[:, None],
                mask=c_mask[:, None] & o_mask[None, :], other=0.0,
            )
            acc = _dot(z, m, acc, UPCAST, ALLOW_TF32)
        if HAS_MIX_BIAS:
            acc += mix_bias[None, :]
        o_pix = n64 * stride_on + oi.to(tl.int64) * stride_oh + oj.to(tl.int64) * stride_ow
        tl.store(
            out_ptr + o_pix[:, None] + (o.to(tl.int64) * stride_oc)[None, :], acc.to(out_ptr.dtype.element_ty),
            mask=p_mask[:, None] & o_mask[None, :],
        )


@triton.jit
def _gated_conv2d_bwd_gate_kernel(
    dout_ptr, x_ptr, w_ptr, b_ptr, g_ptr, y_ptr, dg_ptr, db_ptr,
    N, H, W, Cin_g, Cg, C, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw,
    stride_dn, stride_dc, stride_dh, stride_dw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wc, stride_wi, stride_wh, stride_ww,
    stride_gc, stride_gh, stride_gw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    HAS_BIAS: tl.constexpr, NEED_DG: tl.constexpr, NEED_DB: tl.constexpr, RECOMPUTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """dg (C, Ho, Wo) = sum_n dout * y and the per-tile partials of db, db_part (T, C) with
    db_part[t, c] = sum_{n, pixels of tile t} dout * g (the launcher sums the T rows).

    Grid as the forward kernel's; each program owns its dg entries (no atomics). y is read
    from y_ptr, or recomputed by the implicit GEMM when RECOMPUTE."""
    grp, c, c_mask, p_mask, oi, oj, mask = _output_tile(Cg, Ho, Wo, BLOCK_M, BLOCK_N)
    c64 = c.to(tl.int64)
    oi64 = oi.to(tl.int64)
    oj64 = oj.to(tl.int64)
    g_off = (oi64 * stride_gh + oj64 * stride_gw)[:, None] + (c64 * stride_gc)[None, :]
    if NEED_DB:
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    dg = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    ds = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for n in range(0, N):
        n64 = tl.cast(n, tl.int64)
        d_pix = n64 * stride_dn + oi64 * stride_dh + oj64 * stride_dw
        dout = tl.load(dout_ptr + d_pix[:, None] + (c64 * stride_dc)[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DG:
            if RECOMPUTE:
                y = _conv_tile(
                    x_ptr + n64 * stride_xn, w_ptr, oi, oj, p_mask, c, c_mask, grp,
                    H, W, Cin_g, KH, KW, sh, sw, ph, pw, dh, dw,
                    stride_xc, stride_xh, stride_xw, stride_wc, stride_wi, stride_wh, stride_ww,
                    BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ALLOW_TF32,
                )
                if HAS_BIAS:
                    y += bias[None, :]
            else:
                y_pix = n64 * stride_yn + oi64 * stride_yh + oj64 * stride_yw
                y = tl.load(y_ptr + y_pix[:, None] + (c64 * stride_yc)[None, :], mask=mask, other=0.0).to(tl.float32)
            dg += dout * y
        if NEED_DB:
            ds += dout
    if NEED_DG:
        tl.store(dg_ptr + g_off, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        tile = tl.program_id(0).to(tl.int64)
        tl.store(db_ptr + tile * C + c, tl.reduce(ds * g, 0, _add), mask=c_mask)


@triton.jit
def _gated_conv2d_bwd_input_kernel(
    dout_ptr, w_ptr, g_ptr, dx_ptr,
    H, W, Cin_g, Cg, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw,
    stride_dn, stride_dc, stride_dh, stride_dw,
    stride_wc, stride_wi, stride_wh, stride_ww,
    stride_gc, stride_gh, stride_gw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """dx (N, Cin, H, W): dx[n, ci, h, w] = sum_{c in group, u, v} W[c, ci, u, v] * (dout * g)[n, c, i, j]
    over the (i, j) with i*sh + u*dh - ph = h and j*sw + v*dw - pw = w; an implicit GEMM over
    K = KH * KW * Cg (taps outer, blocks of BLOCK_K output channels inner) whose A tile,
    dout * g, is formed as it is loaded.

    Grid (cdiv(H * W, BLOCK_M), G * cdiv(Cin_g, BLOCK_N), N)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n64 = tl.program_id(2).to(tl.int64)
    n_cblocks = _cdiv(Cin_g, BLOCK_N)
    grp = pid_n // n_cblocks
    ci = (pid_n - grp * n_cblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = ci < Cin_g
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = p < H * W
    hh = p // W
    ww = p - hh * W
    n_cb = _cdiv(Cg, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for t in range(0, KH * KW * n_cb):
        uv = t // n_cb
        c = grp * Cg + (t - uv * n_cb) * BLOCK_K + tl.arange(0, BLOCK_K)
        c_mask = c < (grp + 1) * Cg
        c64 = c.to(tl.int64)
        u = uv // KW
        v = uv - u * KW
        ti = hh + (ph - u * dh)
        tj = ww + (pw - v * dw)
        oi = ti // sh
        oj = tj // sw
        pix_ok = p_mask & (ti >= 0) & (tj >= 0) & (oi * sh == ti) & (oj * sw == tj) & (oi < Ho) & (oj < Wo)
        oi64 = tl.where(pix_ok, oi, 0).to(tl.int64)
        oj64 = tl.where(pix_ok, oj, 0).to(tl.int64)
        a_mask = pix_ok[:, None] & c_mask[None, :]
        dout = tl.load(
            dout_ptr + (n64 * stride_dn + oi64 * stride_dh + oj64 * stride_dw)[:, None] + (c64 * stride_dc)[None, :],
            mask=a_mask, other=0.0,
        )
        g = tl.load(
            g_ptr + (oi64 * stride_gh + oj64 * stride_gw)[:, None] + (c64 * stride_gc)[None, :],
            mask=a_mask, other=0.0,
        )
        a = (dout.to(tl.float32) * g.to(tl.float32)).to(dout.dtype)
        b = tl.load(
            w_ptr + (c64 * stride_wc + u * stride_wh + v * stride_ww)[:, None] + (ci.to(tl.int64) * stride_wi)[None, :],
            mask=c_mask[:, None] & ci_mask[None, :], other=0.0,
        )
        acc = _dot(a, b, acc, UPCAST, ALLOW_TF32)
    cin = (grp * Cin_g + ci).to(tl.int64)
    x_pix = n64 * stride_xn + hh.to(tl.int64) * stride_xh + ww.to(tl.int64) * stride_xw
    tl.store(
        dx_ptr + x_pix[:, None] + (cin * stride_xc)[None, :],
        acc.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & ci_mask[None, :],
    )


@triton.jit
def _gated_conv2d_bwd_weight_kernel(
    dout_ptr, x_ptr, g_ptr, dw_ptr,
    N, H, W, Cin_g, Cg, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw, steps_per_split,
    stride_dn, stride_dc, stride_dh, stride_dw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_gc, stride_gh, stride_gw,
    stride_ps, stride_pc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
):
    """Split-K partials of dW: part[s, c, (ci*KH + u)*KW + v] = sum over the s-th chunk of the
    reduction of (dout * g)[n, c, i, j] * x[n, cin, i*sh + u*dh - ph, j*sw + v*dw - pw].
    The reduction runs over steps (n, block of BLOCK_K pixels), steps_per_split steps per
    chunk; the launcher sums the S partials in order (deterministic; no atomics).

    Grid (G * cdiv(Cg, BLOCK_M), KH * KW * cdiv(Cin_g, BLOCK_N), S); part (S, C, Cin_g*KH*KW)
    float32. A program owns one tap (u, v): its B tile is a pixel vector plus a channel one."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_cblocks = _cdiv(Cg, BLOCK_M)
    grp = pid_m // n_cblocks
    c_local = (pid_m - grp * n_cblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_mask = c_local < Cg
    c64 = (grp * Cg + c_local).to(tl.int64)
    n_cib = _cdiv(Cin_g, BLOCK_N)
    uv = pid_n // n_cib
    ci = (pid_n - uv * n_cib) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = ci < Cin_g
    cin64 = (grp * Cin_g + ci).to(tl.int64)
    u = uv // KW
    v = uv - u * KW
    P = Ho * Wo
    n_pb = _cdiv(P, BLOCK_K)
    t_start = pid_s * steps_per_split
    t_stop = tl.minimum(t_start + steps_per_split, N * n_pb)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for t in range(t_start, t_stop):
        n = t // n_pb
        n64 = tl.cast(n, tl.int64)
        pix = (t - n * n_pb) * BLOCK_K + tl.arange(0, BLOCK_K)
        pix_mask = pix < P
        oi = pix // Wo
        oj = pix - oi * Wo
        oi64 = oi.to(tl.int64)
        oj64 = oj.to(tl.int64)
        a_mask = c_mask[:, None] & pix_mask[None, :]
        dout = tl.load(
            dout_ptr + (c64 * stride_dc)[:, None] + (n64 * stride_dn + oi64 * stride_dh + oj64 * stride_dw)[None, :],
            mask=a_mask, other=0.0,
        )
        g = tl.load(
            g_ptr + (c64 * stride_gc)[:, None] + (oi64 * stride_gh + oj64 * stride_gw)[None, :],
            mask=a_mask, other=0.0,
        )
        a = (dout.to(tl.float32) * g.to(tl.float32)).to(dout.dtype)
        hi = oi * sh + (u * dh - ph)
        wi = oj * sw + (v * dw - pw)
        pix_ok = pix_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        b = tl.load(
            x_ptr + (n64 * stride_xn + hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw)[:, None]
            + (cin64 * stride_xc)[None, :],
            mask=pix_ok[:, None] & ci_mask[None, :], other=0.0,
        )
        acc = _dot(a, b, acc, UPCAST, ALLOW_TF32)
    khw = KH * KW
    tl.store(
        dw_ptr + pid_s.to(tl.int64) * stride_ps + (c64 * stride_pc)[:, None] + (ci.to(tl.int64) * khw + uv)[None, :],
        acc, mask=c_mask[:, None] & ci_mask[None, :],
    )
