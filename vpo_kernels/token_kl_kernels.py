"""The Triton kernels of the token-KL op (:mod:`vpo_kernels.token_kl`, whose docstring derives them): the forward's
online sweep over two logits tiles (policy and reference) per vocabulary split and its combine, and the recompute
backward with fp32 atomics. They share the log-prob kernels' tile helpers (:mod:`vpo_kernels.linear_logprobs_kernels`).
The configs, the host launchers and the autograd Function are in :mod:`vpo_kernels.token_kl`.
"""
import triton
import triton.language as tl

from vpo_kernels.epilogue import _head_transform
from vpo_kernels.linear_logprobs_kernels import _dot, _grouped_tile

@triton.jit
def _logits_pair_tile(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows, row_mask, offs_v, v_mask, D,
                      HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SHARED_W: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """(z, r): policy and reference logits at [rows, offs_v], two [BLOCK_N, BLOCK_V] fp32 register tiles built in one
    loop over D. With SHARED_W (W_ref is W) each W chunk is loaded once and feeds both GEMMs."""
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    r = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        nd_mask = row_mask[:, None] & d_mask[None, :]
        vd_mask = v_mask[:, None] & d_mask[None, :]
        hb = tl.load(h_ptr + rows[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        hrb = tl.load(hr_ptr + rows[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        wb = tl.load(w_ptr + offs_v[:, None] * D + offs_d[None, :], mask=vd_mask, other=0.0)  # [BLOCK_V, BLOCK_D]
        z = _dot(hb, tl.trans(wb), z, IEEE)  # [BLOCK_N, BLOCK_D] @ [BLOCK_D, BLOCK_V] -> [BLOCK_N, BLOCK_V]
        if SHARED_W:
            r = _dot(hrb, tl.trans(wb), r, IEEE)  # same W chunk, no second load
        else:
            wrb = tl.load(wr_ptr + offs_v[:, None] * D + offs_d[None, :], mask=vd_mask, other=0.0)  # [BLOCK_V, BLOCK_D]
            r = _dot(hrb, tl.trans(wrb), r, IEEE)
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_REF_BIAS:
        r += tl.load(br_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return z, r


@triton.jit
def _kl_partial_kernel(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, order_ptr, n_valid_ptr, part_ptr, N, V, D,
                       SPLIT_V, scale, softcap,
                       HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SHARED_W: tl.constexpr,
                       SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                       GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N) * SPLIT_V,), 1-D, in the grouped order of linear_logprobs._grouped_tile: the resident
    # programs form a GROUP_N x (~132 / GROUP_N) rectangle of (N block, V split), sharing h / h_ref blocks along a row
    # and W / W_ref tiles along a column in L2.
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), SPLIT_V, GROUP_N)
    n_valid = tl.load(n_valid_ptr)
    if pid_n * BLOCK_N >= n_valid:
        return  # every row of this block is ignored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    rows = tl.load(order_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)  # original row ids, valid first

    n_vtiles = tl.cdiv(V, BLOCK_V)
    split = SPLIT_V
    per_split = tl.cdiv(n_vtiles, split)
    t_lo = pid_s * per_split
    t_hi = tl.minimum(t_lo + per_split, n_vtiles)

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # policy running max
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ exp(z - m)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ exp(z - m) · (z - r)
    m_r = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # reference running max
    s_r = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ exp(r - m_r)
    inv_cap = 1.0 / softcap  # softcap is 1.0 when there is none
    for t in range(t_lo, t_hi):
        offs_v = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        z, r = _logits_pair_tile(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows, row_mask, offs_v, v_mask, D,
                                 HAS_BIAS, HAS_REF_BIAS, SHARED_W, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
        r, _ = _head_transform(r, scale, softcap, inv_cap, SOFTCAP)  # both heads' logits transformed alike
        z, _ = _head_transform(z, scale, softcap, inv_cap, SOFTCAP)
        # Reference first, so that r is dead (folded into d) before the policy's exp tile is formed.
        r_m = tl.where(v_mask[None, :], r, float("-inf"))  # padding columns add exp(-inf) = 0
        m_r_new = tl.maximum(m_r, tl.max(r_m, axis=1))  # finite: each tile has >= 1 real column
        s_r = s_r * tl.exp(m_r - m_r_new) + tl.sum(tl.exp(r_m - m_r_new[:, None]), axis=1)
        m_r = m_r_new
        d = tl.where(v_mask[None, :], z - r, 0.0)  # [BLOCK_N, BLOCK_V]; padding columns: 0 (not -inf - -inf)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile
        e = tl.exp(z - m_new[:, None])  # [BLOCK_N, BLOCK_V]
        s = s * alpha + tl.sum(e, axis=1)
        u = u * alpha + tl.sum(e * d, axis=1)
        m = m_new
    # [5, SPLIT_V, N] at the ORIGINAL row id, so the combine kernel reads them in row order.
    base = part_ptr + pid_s * N + rows
    stride = split * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + stride, s, mask=row_mask)
    tl.store(base + 2 * stride, u, mask=row_mask)
    tl.store(base + 3 * stride, m_r, mask=row_mask)
    tl.store(base + 4 * stride, s_r, mask=row_mask)


@triton.jit
def _kl_combine_kernel(part_ptr, labels_ptr, kl_ptr, lse_ptr, e_ptr, N, ignore_index, SPLIT_V,
                       HAS_LABELS: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N),) in original row order; writes every row (0 where ignored).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    if HAS_LABELS:
        y = tl.load(labels_ptr + offs_n, mask=in_n, other=ignore_index)
        valid = in_n & (y != ignore_index)
    else:
        valid = in_n
    stride = SPLIT_V * N
    # M = max_s m_s; S = Σ_s s_s exp(m_s - M), U likewise (u was rescaled with the policy's max, like s).
    # Ignored rows were never written: masked to m = 0, s = u = 0.
    big_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    big_mr = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    for sp in range(0, SPLIT_V):
        big_m = tl.maximum(big_m, tl.load(part_ptr + sp * N + offs_n, mask=valid, other=0.0))
        big_mr = tl.maximum(big_mr, tl.load(part_ptr + 3 * stride + sp * N + offs_n, mask=valid, other=0.0))
    big_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    big_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    big_sr = tl.zeros([BLOCK_N], dtype=tl.float32)
    for sp in range(0, SPLIT_V):
        at = part_ptr + sp * N + offs_n
        scale = tl.exp(tl.load(at, mask=valid, other=0.0) - big_m)
        big_s += tl.load(at + stride, mask=valid, other=0.0) * scale
        big_u += tl.load(at + 2 * stride, mask=valid, other=0.0) * scale
        scale_r = tl.exp(tl.load(at + 3 * stride, mask=valid, other=0.0) - big_mr)
        big_sr += tl.load(at + 4 * stride, mask=valid, other=0.0) * scale_r
    big_s = tl.where(valid, big_s, 1.0)  # no log(0) or 0/0 on ignored rows
    big_sr = tl.where(valid, big_sr, 1.0)
    log_s = tl.log(big_s)
    e_d = big_u / big_s  # E_p[z - r]
    kl = e_d - (big_m - big_mr) - (log_s - tl.log(big_sr))  # = E_p[d] - lse_z + lse_r, maxima cancelled first
    tl.store(kl_ptr + offs_n, tl.where(valid, kl, 0.0), mask=in_n)
    tl.store(lse_ptr + offs_n, tl.where(valid, big_m + log_s, 0.0), mask=in_n)
    tl.store(e_ptr + offs_n, tl.where(valid, e_d, 0.0), mask=in_n)


@triton.jit
def _kl_bwd_kernel(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, order_ptr, n_valid_ptr, lse_ptr, e_ptr, g_ptr,
                   dh_ptr, dw_ptr, db_ptr, N, V, D, scale, softcap,
                   HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SHARED_W: tl.constexpr,
                   SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                   COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V),), 1-D, in the tile order of _lse_bwd_kernel: groups of GROUP_N
    # N blocks x all V blocks (N fastest inside a group), so concurrent programs spread their atomics over many dh / dW
    # blocks.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_pid_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    n_valid = tl.load(n_valid_ptr)
    if pid_n * BLOCK_N >= n_valid:
        return  # every row of this block is ignored: zero gradient, no work
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    rows = tl.load(order_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_mask = offs_v < V

    z, r = _logits_pair_tile(h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, rows, row_mask, offs_v, v_mask, D,
                             HAS_BIAS, HAS_REF_BIAS, SHARED_W, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)  # [BLOCK_N, BLOCK_V] x2
    inv_cap = 1.0 / softcap  # softcap is 1.0 when there is none
    r, _ = _head_transform(r, scale, softcap, inv_cap, SOFTCAP)
    z, _ = _head_transform(z, scale, softcap, inv_cap, SOFTCAP)  # tanh is recovered below as z'/cap: one tile less
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)  # [BLOCK_N] policy lse
    e_d = tl.load(e_ptr + rows, mask=row_mask, other=0.0)  # [BLOCK_N] E_p[z - r]
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)  # [BLOCK_N] ∂L/∂KL
    tile_mask = row_mask[:, None] & v_mask[None, :]
    # Ordered so that r dies before p is formed: at most two [BLOCK_N, BLOCK_V] fp32 tiles are live at a time.
    dz = (tl.where(tile_mask, z - r, 0.0) - e_d[:, None]) * g[:, None]  # g · (d - E)
    if SOFTCAP:  # the chain rule through the transform: ∂z'/∂z = scale·(1 − (z'/cap)²)
        t = z * inv_cap
        dz = dz * (1.0 - t * t)
    dz = dz * scale
    dz = dz * tl.exp(tl.where(tile_mask, z, float("-inf")) - lse[:, None])  # · p (from the saved lse; 0 on padding)
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_mask, sem="relaxed")  # [BLOCK_V]
    if COMPUTE_DH or COMPUTE_DW:
        # Tensor-core operand in the input dtype (as PyTorch's own 16-bit backward materializes it); fp32 sums.
        dz_op = dz.to(h_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_V]
        dz_t = tl.trans(dz_op)  # [BLOCK_V, BLOCK_N], formed once outside the D loop
        n_dchunks = tl.cdiv(D, BLOCK_D)
        shift = pid_n + pid_v  # tile-dependent first D chunk: concurrent programs add into different addresses
        for c in range(0, n_dchunks):
            offs_d = ((c + shift) % n_dchunks) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            if COMPUTE_DH:
                wb = tl.load(w_ptr + offs_v[:, None] * D + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :],
                             other=0.0)  # [BLOCK_V, BLOCK_D]
                dh_blk = _dot(dz_op, wb, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), IEEE)
                # [BLOCK_N, BLOCK_V] @ [BLOCK_V, BLOCK_D] -> [BLOCK_N, BLOCK_D]
                tl.atomic_add(dh_ptr + rows[:, None] * D + offs_d[None, :], dh_blk,
                              mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
            if COMPUTE_DW:
                hb = tl.load(h_ptr + rows[:, None] * D + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                             other=0.0)  # [BLOCK_N, BLOCK_D]
                dw_blk = _dot(dz_t, hb, tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32), IEEE)
                # [BLOCK_V, BLOCK_N] @ [BLOCK_N, BLOCK_D] -> [BLOCK_V, BLOCK_D]
                tl.atomic_add(dw_ptr + offs_v[:, None] * D + offs_d[None, :], dw_blk,
                              mask=v_mask[:, None] & d_mask[None, :], sem="relaxed")
