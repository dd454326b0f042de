"""The Triton kernels of the linear log-probs op (:mod:`vpo_kernels.linear_logprobs`, whose docstring derives them):
the forward's online-logsumexp sweep over vocabulary splits and its combine, the recompute backward with fp32
atomics, and the tile helpers the token-KL kernels (:mod:`vpo_kernels.token_kl_kernels`) share. The configs, the host
launchers and the autograd Function are in :mod:`vpo_kernels.linear_logprobs`.
"""
import triton
import triton.language as tl

from vpo_kernels.epilogue import _head_transform
from vpo_kernels.target_logits import _gather_dot_rows

@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; fp32 operands in full "ieee" precision (tf32 would lose ~1e-3)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z[rows, offs_v] as a [BLOCK_N, BLOCK_V] fp32 register tile; rows / offs_v are int64."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        hb = tl.load(h_ptr + rows[:, None] * D + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                     other=0.0)  # [BLOCK_N, BLOCK_D]
        wb = tl.load(w_ptr + offs_v[:, None] * D + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :],
                     other=0.0)  # [BLOCK_V, BLOCK_D]
        acc = _dot(hb, tl.trans(wb), acc, IEEE)  # [BLOCK_N, BLOCK_D] @ [BLOCK_D, BLOCK_V] -> [BLOCK_N, BLOCK_V]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _grouped_tile(pid, num_pid_n, SPLIT_V, GROUP_N: tl.constexpr):
    """(pid_n, pid_s) of a 1-D program id in the forward's L2-friendly order.

    Every forward program sweeps its V split tile by tile, re-reading its h block [BLOCK_N, D] once per V tile. With the
    plain order (N blocks fastest, one split at a time) the ~132 resident programs hold ~132 different h blocks (at
    D = 3584, bf16: 132 x 0.9 MB, far beyond a 50 MB L2) and one W stream: h came from HBM on every V tile (~140 GB at
    N=16k, V=152k). Here ids go in groups of GROUP_N N blocks x all SPLIT_V splits, N fastest inside a group, so the
    resident programs form a GROUP_N x (~132 / GROUP_N) rectangle: each h block is shared by the ~16 programs of its
    row (same rows, different splits, sweeping in step) and each W tile by the GROUP_N programs of its column. Per
    step the wave then reads ~GROUP_N h blocks + ~132 / GROUP_N W tiles from HBM instead of ~132 + 1.
    """
    per_group = GROUP_N * SPLIT_V
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_s = (pid % per_group) // group_size
    return pid_n, pid_s


@triton.jit
def _lse_partial_kernel(h_ptr, w_ptr, b_ptr, order_ptr, n_valid_ptr, m_part_ptr, s_part_ptr, N, V, D, SPLIT_V,
                        scale, softcap,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, GROUP_N: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N) * SPLIT_V,), 1-D (axis 0: no 65535 limit), in the grouped order of _grouped_tile.
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), SPLIT_V, GROUP_N)
    n_valid = tl.load(n_valid_ptr)
    if pid_n * BLOCK_N >= n_valid:
        return  # every row of this block is ignored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    rows = tl.load(order_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)  # original row ids, valid first

    n_vtiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_vtiles, SPLIT_V)
    t_lo = pid_s * per_split
    t_hi = tl.minimum(t_lo + per_split, n_vtiles)

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # running Σ exp(z - m)
    inv_cap = 1.0 / softcap  # softcap is 1.0 when there is none
    for t in range(t_lo, t_hi):
        offs_v = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D,
                         HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)  # [BLOCK_N, BLOCK_V]
        z, _ = _head_transform(z, scale, softcap, inv_cap, SOFTCAP)  # z' = cap·tanh(scale·z / cap)
        z = tl.where(v_mask[None, :], z, float("-inf"))  # padding columns add exp(-inf) = 0
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: each tile has >= 1 real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    # Stored at the ORIGINAL row id, so the combine kernel reads them in row order.
    tl.store(m_part_ptr + pid_s * N + rows, m, mask=row_mask)
    tl.store(s_part_ptr + pid_s * N + rows, s, mask=row_mask)


@triton.jit
def _lse_combine_kernel(m_part_ptr, s_part_ptr, h_ptr, w_ptr, b_ptr, labels_ptr,
                        logp_ptr, tgt_ptr, lse_ptr, N, D, ignore_index, SPLIT_V, scale, softcap,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N),) in original row order; writes every row (0 where ignored).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    y = tl.load(labels_ptr + offs_n, mask=in_n, other=ignore_index).to(tl.int64)
    valid = in_n & (y != ignore_index)
    # Fold the splits: M = max_s m_s, S = Σ_s s_s exp(m_s - M). Ignored rows were never written: masked to m=0, s=0.
    big_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    for sp in range(0, SPLIT_V):
        big_m = tl.maximum(big_m, tl.load(m_part_ptr + sp * N + offs_n, mask=valid, other=0.0))
    big_s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for sp in range(0, SPLIT_V):
        m_s = tl.load(m_part_ptr + sp * N + offs_n, mask=valid, other=0.0)
        s_s = tl.load(s_part_ptr + sp * N + offs_n, mask=valid, other=0.0)
        big_s += s_s * tl.exp(m_s - big_m)
    lse = big_m + tl.log(tl.where(valid, big_s, 1.0))  # no log(0) on ignored rows
    tgt = _gather_dot_rows(h_ptr, w_ptr, b_ptr, offs_n, y, valid, D, HAS_BIAS, BLOCK_N, BLOCK_D)  # [BLOCK_N]
    tgt, _ = _head_transform(tgt, scale, softcap, 1.0 / softcap, SOFTCAP)  # 0 stays 0 on ignored rows
    tl.store(lse_ptr + offs_n, tl.where(valid, lse, 0.0), mask=in_n)
    tl.store(tgt_ptr + offs_n, tgt, mask=in_n)
    tl.store(logp_ptr + offs_n, tl.where(valid, tgt - lse, 0.0), mask=in_n)


@triton.jit
def _lse_bwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, n_valid_ptr, lse_ptr, g_ptr, t_ptr,
                    dh_ptr, dw_ptr, db_ptr, N, V, D, scale, softcap,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_T: tl.constexpr, IEEE: tl.constexpr,
                    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V),), 1-D. Tiles are visited in groups of GROUP_N N blocks x all V blocks
    # (N fastest inside a group), so the ~132 resident programs spread their atomics over ~GROUP_N dh row blocks and
    # ~132 / GROUP_N dW row blocks instead of hammering a single dW (or dh) block.
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

    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, D,
                     HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)  # [BLOCK_N, BLOCK_V]
    z, th = _head_transform(z, scale, softcap, 1.0 / softcap, SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)  # [BLOCK_N]
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)  # ∂L/∂logp
    y = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    coef = g  # weight of the one-hot term: g + t
    if HAS_T:
        coef += tl.load(t_ptr + rows, mask=row_mask, other=0.0)
    tile_mask = row_mask[:, None] & v_mask[None, :]
    z = tl.where(tile_mask, z, float("-inf"))  # padding rows / columns: p = 0 (and no exp overflow)
    p = tl.exp(z - lse[:, None])  # softmax from the saved lse, [BLOCK_N, BLOCK_V]
    dz = -g[:, None] * p + tl.where(offs_v[None, :] == y[:, None], coef[:, None], 0.0)  # y = -1 on padding rows
    if SOFTCAP:
        dz = dz * (1.0 - th * th)  # the chain rule through the transform: ∂z'/∂z = scale·(1 − t²)
    dz = dz * scale
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_mask, sem="relaxed")  # [BLOCK_V]
    if COMPUTE_DH or COMPUTE_DW:
        # Tensor-core operand in the input dtype (as PyTorch's own 16-bit backward materializes it); fp32 sums.
        dz_op = dz.to(h_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_V]
        dz_t = tl.trans(dz_op)  # [BLOCK_V, BLOCK_N], formed once outside the D loop
        n_dchunks = tl.cdiv(D, BLOCK_D)
        # Start the D sweep at a tile-dependent chunk so concurrent programs add into different addresses.
        shift = pid_n + pid_v
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
