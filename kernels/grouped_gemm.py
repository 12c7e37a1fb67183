"""Grouped expert GEMM: rows of `x` sorted by expert, one weight matrix per expert.

Dimensions: M rows (routed (token, slot) pairs, sorted by expert), E experts, N output features,
K input features (the contraction), T tokens (M = T * k with k experts per token). `expert_offsets_E1` [E+1]
(int32) marks expert e's rows as [offsets[e], offsets[e+1]); offsets[0] = 0 and offsets[E] = M (the routing
kernel's contract).

    y[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ w[e].T     for every expert e

Layout of this file: `grouped_mm_ref` (torch loop) -> `_grouped_mm_kernel` (row-tiled: forward and dX) and
`_grouped_mm_dw_kernel` (per-expert row walk: dW) -> launchers `grouped_mm_fwd` / `_dx` / `_dw` (block sizes per
shape class) -> `GroupedMMFunction` -> public `grouped_mm`, plus the two fused-permutation variants the MoE layer
uses, `grouped_mm_gather` (reads x_TK[order_M // k] inside the loads) and `grouped_mm_scatter` (writes row m at
order_M[m] inside the stores), each with its `_ref`.

No host sync anywhere on the Triton path: grids depend on M, N, K, E only (so a CUDA graph can capture them) and
each program finds its expert from the offsets on the device. Checked without a GPU: every variant compiles for
sm_90 on Triton 3.6 and 3.9 (wgmma, cp.async pipelining, no spills: 186 registers for the 128 x 256 tile, 98 for
dW); numerics run in the 3.9 interpreter (tests/test_grouped_gemm.py). Triton 3.6's interpreter cannot run
these kernels with numpy 2 (its `range` over a runtime bound calls int() on a 1-element array): interpret with
3.9; compiled 3.6 is unaffected.
"""
import contextlib

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux-only; the torch path (grouped_mm_ref) works without it
    triton = None


def _check_inputs(x_MK: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor) -> None:
    if x_MK.dim() != 2 or w_ENK.dim() != 3:
        raise ValueError(f"x_MK must be 2-D [M, K] and w_ENK 3-D [E, N, K], got {tuple(x_MK.shape)} and "
                         f"{tuple(w_ENK.shape)}; flatten the token dimensions of x first")
    if x_MK.shape[1] != w_ENK.shape[2]:
        raise ValueError(f"contraction sizes differ: x_MK has K={x_MK.shape[1]}, w_ENK has K={w_ENK.shape[2]}; "
                         "w_ENK must be stored [E, out_features, in_features] (nn.Linear's layout)")
    if expert_offsets_E1.dim() != 1 or expert_offsets_E1.shape[0] != w_ENK.shape[0] + 1:
        raise ValueError(f"expert_offsets_E1 must be 1-D with E+1={w_ENK.shape[0] + 1} entries, got shape "
                         f"{tuple(expert_offsets_E1.shape)}; pass Routing.offsets_E1")
    if expert_offsets_E1.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_offsets_E1 must be int32 or int64, got {expert_offsets_E1.dtype}")
    if x_MK.dtype != w_ENK.dtype:
        raise ValueError(f"x_MK is {x_MK.dtype} but w_ENK is {w_ENK.dtype}; cast one so both match")
    if x_MK.device != w_ENK.device or x_MK.device != expert_offsets_E1.device:
        raise ValueError(f"x_MK ({x_MK.device}), w_ENK ({w_ENK.device}) and expert_offsets_E1 "
                         f"({expert_offsets_E1.device}) must be on one device")


def grouped_mm_ref(x_MK: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor) -> Tensor:
    """Pure-torch grouped GEMM: a loop over experts, differentiable through torch autograd.

    Host sync: slicing needs the offsets as Python ints, so this reads `expert_offsets_E1` to the host once per
    call (and validates it while it is there). The Triton `grouped_mm` never syncs.
    """
    _check_inputs(x_MK, w_ENK, expert_offsets_E1)
    M, E = x_MK.shape[0], w_ENK.shape[0]
    bounds = expert_offsets_E1.tolist()  # host sync (see docstring)
    if bounds[0] != 0 or bounds[-1] != M or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"expert_offsets_E1 must rise from 0 to M={M}, got {bounds}")
    y_parts = [x_MK[bounds[e]:bounds[e + 1]] @ w_ENK[e].T for e in range(E)]
    return torch.cat(y_parts, dim=0)


def torch_grouped_mm(x_MK: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor) -> Tensor:
    """The same product through torch._grouped_mm(mat_a [M, K], mat_b [E, K, N], offs = int32 row ends [E]): one
    call, no host sync, differentiable. Where it runs, see `torch_grouped_mm_runs`. On the CPU (torch 2.11 and
    2.13) its forward is bitwise equal to grouped_mm_ref; fwd+bwd of the MoE experts at the demo teacher's shape
    (T=2048, D=128, F=256, E=4) 23.6 -> 19.5 ms, at T=512, D=256, F=512, E=8 32.7 -> 20.9 ms (2 cores)."""
    return torch._grouped_mm(x_MK, w_ENK.transpose(1, 2), offs=expert_offsets_E1[1:])


_TORCH_GROUPED_MM_RUNS: dict = {}


def torch_grouped_mm_runs(device, dtype: torch.dtype) -> bool:
    """Whether this torch has torch._grouped_mm and it runs forward and backward on `device` in `dtype` (one tiny
    probe per device type and dtype and process: older builds lack it; CUDA builds need bf16 on sm90+)."""
    key = (torch.device(device).type, dtype)
    if key not in _TORCH_GROUPED_MM_RUNS:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                x = torch.randn(8, 16, device=device, dtype=dtype, requires_grad=True)
                w = torch.randn(2, 8, 16, device=device, dtype=dtype, requires_grad=True)
                y = torch_grouped_mm(x, w, torch.tensor([0, 3, 8], device=device, dtype=torch.int32))
                y.backward(torch.randn_like(y))  # a dense gradient: sum()'s zero-stride one is refused
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _TORCH_GROUPED_MM_RUNS[key] = ok
    return _TORCH_GROUPED_MM_RUNS[key]


# ----------------------------------------------------------------------------------------------------------------
# Triton path. Everything below stays on the device: the kernels read expert_offsets_E1 themselves, so the host
# never learns how many rows each expert got and launches a grid sized for the worst case.
# ----------------------------------------------------------------------------------------------------------------


if triton is not None:  # without Triton only grouped_mm_ref (the CPU path) is usable
    @triton.jit
    def _grouped_mm_kernel(
        a_ptr, a_rows_ptr, b_ptr, c_ptr, c_rows_ptr, offsets_ptr,
        N, K, E, num_tiles_m,
        stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        GROUP_M: tl.constexpr, A_GATHER: tl.constexpr, A_ROW_DIV: tl.constexpr, C_SCATTER: tl.constexpr,
        EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """C[c_row(m), n] = sum_k A[a_row(m), k] * B[e(m), k, n] for the M sorted rows, e(m) = expert owning row m.

        Here K is the contraction and N the output width, whatever they are called outside: the forward passes
        B = w_ENK viewed [E, K, N] (strides swapped), dX passes B = w_ENK itself ([E, N, K], contracting over N).
        a_row(m) = a_rows[m] // A_ROW_DIV if A_GATHER else m (reads token rows through Routing.order_M // top-k);
        c_row(m) = c_rows[m] if C_SCATTER else m (writes in pair order through Routing.order_M).

        Schedule: the row tiles of expert e are BLOCK_M-row slices of [offsets[e], offsets[e+1]), numbered after the
        tiles of experts 0..e-1. Their total is at most cdiv(M, BLOCK_M) + E - 1 (each expert adds at most one
        partial tile), the host launches num_tiles_m = cdiv(M, BLOCK_M) + E row tiles, and programs past the real
        total return at once.
        """
        pid = tl.program_id(0)
        num_tiles_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering (Triton matmul tutorial): GROUP_M consecutive row tiles sweep the N tiles together, so a
        # weight column tile is read from HBM once per group rather than once per row tile.
        tiles_per_group = GROUP_M * num_tiles_n
        first_m = (pid // tiles_per_group) * GROUP_M
        group_m = min(num_tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % tiles_per_group) % group_m
        pid_n = (pid % tiles_per_group) // group_m

        # Which expert owns row tile pid_m: E <= BLOCK_E offsets in one vector, no loop.
        e_idx = tl.arange(0, BLOCK_E)
        starts = tl.load(offsets_ptr + e_idx, mask=e_idx < E, other=0).to(tl.int32)
        ends = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < E, other=0).to(tl.int32)
        tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
        tiles_end = tl.cumsum(tiles, 0)                      # inclusive: tiles of experts 0..e
        if pid_m >= tl.sum(tiles, 0):
            return
        expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
        is_e = e_idx == expert
        row_start = tl.sum(tl.where(is_e, starts, 0), 0) + (pid_m - tl.sum(tl.where(is_e, tiles_end - tiles, 0), 0)) * BLOCK_M
        row_end = tl.sum(tl.where(is_e, ends, 0), 0)

        offs_m = row_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end                            # rows of the next expert (or past M) are never read
        if A_GATHER:
            a_rows = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64) // A_ROW_DIV
        else:
            a_rows = offs_m.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        # int64 offsets: M * N reaches 2^31 at Mixtral sizes (32768 rows x 2F = 28672 is 0.94e9; T = 40k overflows).
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
                b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k0) & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc=acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        if C_SCATTER:
            c_rows = tl.load(c_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            c_rows = offs_m.to(tl.int64)
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


    @triton.jit
    def _grouped_mm_dw_kernel(
        p_ptr, p_rows_ptr, q_ptr, q_rows_ptr, c_ptr, offsets_ptr,
        N, K,
        stride_pm, stride_pn, stride_qm, stride_qk, stride_ce, stride_cn, stride_ck,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
        P_GATHER: tl.constexpr, Q_GATHER: tl.constexpr, Q_ROW_DIV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """C[e, n, k] = sum over expert e's rows m of P[p_row(m), n] * Q[q_row(m), k]   (dW = dYᵀ X per expert).

        One program per (expert, N tile, K tile) walks its expert's rows in BLOCK_M steps between offsets read on
        the device; an expert with no rows writes zeros (its true gradient).
        p_row(m) = p_rows[m] if P_GATHER else m; q_row(m) = q_rows[m] // Q_ROW_DIV if Q_GATHER else m.
        """
        pid = tl.program_id(0)
        expert = tl.program_id(1)
        num_tiles_k = tl.cdiv(K, BLOCK_K)
        pid_n = pid // num_tiles_k
        pid_k = pid % num_tiles_k
        row_start = tl.load(offsets_ptr + expert).to(tl.int32)
        row_end = tl.load(offsets_ptr + expert + 1).to(tl.int32)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask_k = offs_k < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < row_end
            if P_GATHER:
                p_rows = tl.load(p_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
            else:
                p_rows = offs_m.to(tl.int64)
            if Q_GATHER:
                q_rows = tl.load(q_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64) // Q_ROW_DIV
            else:
                q_rows = offs_m.to(tl.int64)
            p = tl.load(p_ptr + p_rows[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            q = tl.load(q_ptr + q_rows[:, None] * stride_qm + offs_k[None, :] * stride_qk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(tl.trans(p), q, acc=acc, input_precision=INPUT_PRECISION)

        c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


    # ----------------------------------------------------------------------------------------------------------------
    # Launchers: check inputs, allocate outputs, choose block sizes from the shapes.
    # ----------------------------------------------------------------------------------------------------------------
def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _input_precision(t: Tensor) -> str:
    # fp32 inputs follow torch's own switch (TF32 when torch would use it, exact fp32 otherwise); 16-bit inputs
    # always multiply exactly and accumulate in fp32, so the value is ignored for them.
    if t.dtype == torch.float32 and t.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


_FORCED: dict = {}  # {"mm": cfg, "dw": cfg} while `forced_config` is active (bench_grouped_gemm --sweep)


@contextlib.contextmanager
def forced_config(mm: dict | None = None, dw: dict | None = None):
    """Launch with these block sizes instead of the per-shape-class defaults (dicts shaped like `_mm_config`'s /
    `_dw_config`'s results). For the sweep in bench/bench_grouped_gemm.py that picks the defaults on a GPU; the
    caller owns the configs' validity (powers of two, tl.dot's minimum of 16, shared memory)."""
    saved = dict(_FORCED)
    _FORCED.update({k: v for k, v in (("mm", mm), ("dw", dw)) if v is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _mm_config(M: int, N: int, K: int, E: int, dtype: torch.dtype) -> dict:
    """Fixed block sizes per shape class for the row-tiled kernel (fwd and dX); M is the number of sorted rows.

    The class is the mean rows per expert M / E, which sets how much of a BLOCK_M tile an expert fills:
    - >= 256 (training: Mixtral T = 4096, k = 2 gives 1024): 128 x 256 x 64 tiles, 8 warps, 3 stages, the
      Triton matmul tutorial's best fp16 config on H100; smem 3 * (128*64 + 64*256) * 2 B = 144 KiB < 227 KiB.
      At most E partial tiles waste under E * 128 rows of M's work (8 * 128 / 8192 = 12 % at T = 4096 only in
      the worst case; 0 when counts are multiples of 128).
    - >= 64: 64 x 128 x 64, 4 warps, 4 stages.
    - smaller (decode, tests): 32 x 64 x 64, 4 warps, 3 stages; padding rows cost more than a wide tile buys.
    fp32 halves BLOCK_K (same smem bytes). Blocks shrink to the next power of two >= N, K (at least 16, tl.dot's
    minimum) so that tiny test shapes do not compute mostly padding.
    Row strides N or K that are not multiples of 16 elements (Triton specialises an integer argument only on
    divisibility by 16, so it cannot prove K = 1000 rows 16-byte aligned) rule out vector loads and cp.async:
    each element is its own load with its own address, and the tiles above spill (1.5 KB per thread at
    128 x 256, 0.5 KB at 64 x 128 x 64; bench/compile_sm90.py on Triton 3.9). Such shapes get
    BLOCK_M <= 64 x 128 x 32 (x 16 in fp32) at 8 warps: no spills.
    """
    if "mm" in _FORCED:
        return dict(_FORCED["mm"])
    rows_per_expert = M / max(E, 1)
    if rows_per_expert >= 256:
        bm, bn, bk, warps, stages = 128, 256, 64, 8, 3
    elif rows_per_expert >= 64:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 32, 64, 64, 4, 3
    if N % 16 or K % 16:
        bm, bn, bk, warps, stages = min(bm, 64), 128, 32, 8, 3
    if dtype == torch.float32:
        bk //= 2
    return dict(BLOCK_M=bm, BLOCK_N=min(bn, _pow2_at_least_16(N)), BLOCK_K=min(bk, _pow2_at_least_16(K)),
                GROUP_M=8, num_warps=warps, num_stages=stages)


def _dw_config(M: int, N: int, K: int, E: int, dtype: torch.dtype) -> dict:
    """Block sizes for dW[e] = dY[seg]ᵀ X[seg]: a 128 x 128 output tile walked down its expert's rows 64 at a time.

    Grid = E * cdiv(N, 128) * cdiv(K, 128): at Mixtral's w13 (N = 28672, K = 4096) that is 8 * 224 * 32 = 57k
    programs, so even all rows on one expert leaves 7k programs busy, ~54 per SM on 132 SMs. smem:
    3 stages * (64*128 + 64*128) * 2 B = 96 KiB.
    """
    if "dw" in _FORCED:
        return dict(_FORCED["dw"])
    bm = 64 if dtype != torch.float32 else 32
    if M / max(E, 1) < 64:
        bm = 32
    return dict(BLOCK_N=min(128, _pow2_at_least_16(N)), BLOCK_K=min(128, _pow2_at_least_16(K)), BLOCK_M=bm,
                num_warps=8, num_stages=3)


def _launch_row_tiled(a: Tensor, a_rows_M, a_row_div: int, b: Tensor, b_strides_ekn, c: Tensor, c_rows_M,
                      offsets_E1: Tensor, M: int, N: int, K: int) -> None:
    """c[c_row(m), :N] = a[a_row(m), :K] @ b[e(m)] with b addressed through b_strides_ekn = (e, k, n) strides."""
    E = offsets_E1.shape[0] - 1
    if M == 0 or N == 0:
        return
    cfg = _mm_config(M, N, K, E, a.dtype)
    num_tiles_m = triton.cdiv(M, cfg["BLOCK_M"]) + E  # worst case over every split of M rows into E experts
    grid = (num_tiles_m * triton.cdiv(N, cfg["BLOCK_N"]),)
    dummy = offsets_E1  # any tensor: the pointer of a disabled gather/scatter is never dereferenced
    _grouped_mm_kernel[grid](
        a, dummy if a_rows_M is None else a_rows_M, b, c, dummy if c_rows_M is None else c_rows_M, offsets_E1,
        N, K, E, num_tiles_m,
        a.stride(0), a.stride(1), *b_strides_ekn, c.stride(0), c.stride(1),
        BLOCK_E=max(2, triton.next_power_of_2(E)), A_GATHER=a_rows_M is not None, A_ROW_DIV=a_row_div,
        C_SCATTER=c_rows_M is not None, EVEN_K=K % cfg["BLOCK_K"] == 0, INPUT_PRECISION=_input_precision(a),
        **cfg,
    )


def grouped_mm_fwd(x: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor, gather_rows_M=None, row_div: int = 1,
                   scatter_rows_M=None) -> Tensor:
    """y[c_row(m)] = x[a_row(m)] @ w[e(m)]ᵀ for the M sorted rows; a_row(m) = gather_rows_M[m] // row_div or m,
    c_row(m) = scatter_rows_M[m] or m. Returns y [M, N] in x's dtype."""
    M = x.shape[0] if gather_rows_M is None else gather_rows_M.shape[0]
    E, N, K = w_ENK.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # Contract over w's last dim: b[e, k, n] = w[e, n, k].
    _launch_row_tiled(x, gather_rows_M, row_div, w_ENK, (w_ENK.stride(0), w_ENK.stride(2), w_ENK.stride(1)),
                      y, scatter_rows_M, expert_offsets_E1, M, N, K)
    return y


def grouped_mm_dx(dy: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor, dy_rows_M=None) -> Tensor:
    """dX[m] = dy[dy_row(m)] @ w[e(m)] (a grouped GEMM contracting over N), dy_row(m) = dy_rows_M[m] or m.
    Returns dX [M, K] in sorted-row order."""
    M = dy.shape[0]
    E, N, K = w_ENK.shape
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    # Contract over w's middle dim: b[e, n, k] = w[e, n, k], output width K.
    _launch_row_tiled(dy, dy_rows_M, 1, w_ENK, (w_ENK.stride(0), w_ENK.stride(1), w_ENK.stride(2)),
                      dx, None, expert_offsets_E1, M, K, N)
    return dx


def grouped_mm_dw(dy: Tensor, x: Tensor, expert_offsets_E1: Tensor, E: int, dy_rows_M=None, x_rows_M=None,
                  x_row_div: int = 1, out_dtype=None) -> Tensor:
    """dW[e] = sum over e's rows m of dy[dy_row(m)]ᵀ x[x_row(m)]; returns [E, N, K] (fp32-accumulated)."""
    M = dy.shape[0] if dy_rows_M is None else dy_rows_M.shape[0]
    N, K = dy.shape[1], x.shape[1]
    dw = torch.empty(E, N, K, dtype=out_dtype or x.dtype, device=x.device)
    if N == 0 or K == 0:
        return dw
    cfg = _dw_config(M, N, K, E, x.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(K, cfg["BLOCK_K"]), E)
    dummy = expert_offsets_E1
    _grouped_mm_dw_kernel[grid](
        dy, dummy if dy_rows_M is None else dy_rows_M, x, dummy if x_rows_M is None else x_rows_M, dw,
        expert_offsets_E1, N, K,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        P_GATHER=dy_rows_M is not None, Q_GATHER=x_rows_M is not None, Q_ROW_DIV=x_row_div,
        INPUT_PRECISION=_input_precision(x), **cfg,
    )
    return dw


class GroupedMMFunction(torch.autograd.Function):
    """y = grouped GEMM of x and w with optional row gather (forward reads x[order_M[m] // k]) or row scatter
    (forward writes row m of the result at order_M[m]). The backward never leaves the device either:
    dX is the same row-tiled kernel contracting over N, dW the per-expert row-walking kernel."""

    @staticmethod
    def forward(ctx, x, w_ENK, expert_offsets_E1, order_M, inverse_M, gather_k: int, scatter: bool):
        gather = order_M is not None and not scatter
        y = grouped_mm_fwd(x, w_ENK, expert_offsets_E1,
                           gather_rows_M=order_M if gather else None, row_div=gather_k,
                           scatter_rows_M=order_M if scatter else None)
        ctx.save_for_backward(x, w_ENK, expert_offsets_E1, order_M, inverse_M)
        ctx.gather, ctx.scatter, ctx.gather_k = gather, scatter, gather_k
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_ENK, offsets_E1, order_M, inverse_M = ctx.saved_tensors
        dy_rows = order_M if ctx.scatter else None       # forward wrote row m at order_M[m]: read it back there
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm_dx(dy, w_ENK, offsets_E1, dy_rows_M=dy_rows)
            if ctx.gather:
                # Row m read token order_M[m] // k, so token t's gradient sums its k pairs p = t*k + slot, which
                # sit at sorted rows inverse_M[p]: a deterministic gather + sum (no atomics).
                T, k = x.shape[0], ctx.gather_k
                dx = dx[inverse_M.long()].view(T, k, x.shape[1]).sum(dim=1)
        if ctx.needs_input_grad[1]:
            dw = grouped_mm_dw(dy, x, offsets_E1, w_ENK.shape[0], dy_rows_M=dy_rows,
                               x_rows_M=order_M if ctx.gather else None, x_row_div=ctx.gather_k,
                               out_dtype=w_ENK.dtype)
        return dx, dw, None, None, None, None, None


def _check_permutation(name: str, order_M: Tensor, M: int, device) -> None:
    if order_M.dim() != 1 or order_M.shape[0] != M or order_M.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor of M={M} entries, got "
                         f"{tuple(order_M.shape)} {order_M.dtype}; pass Routing.order_M / Routing.inverse_M")
    if order_M.device != device:
        raise ValueError(f"{name} is on {order_M.device}, the GEMM inputs on {device}; move it there")


def grouped_mm(x_MK: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor) -> Tensor:
    """Grouped GEMM: y[o[e]:o[e+1]] = x[o[e]:o[e+1]] @ w[e]ᵀ, differentiable in x and w. The path is picked
    here (kernels.use_triton): the Triton kernel on CUDA (no host sync), `grouped_mm_ref` on the CPU.

    Preconditions not checked (checking needs a host sync): offsets rise from 0 to M = x_MK.shape[0]. Rows
    outside [offsets[0], offsets[E]) are left unwritten.
    """
    from kernels import use_triton
    _check_inputs(x_MK, w_ENK, expert_offsets_E1)
    if not use_triton(x_MK):
        return grouped_mm_ref(x_MK, w_ENK, expert_offsets_E1)
    return GroupedMMFunction.apply(x_MK, w_ENK, expert_offsets_E1, None, None, 1, False)


def grouped_mm_gather(x_TK: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor, order_M: Tensor,
                      inverse_M: Tensor, k: int) -> Tensor:
    """grouped_mm(x_TK[order_M // k], w, offsets) with the gather fused into the kernel's loads: the [M, K]
    gathered copy of x (k times x's size) is never written. Returns y_MN in sorted (expert) order."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int (experts per token)")
    _check_inputs(x_TK, w_ENK, expert_offsets_E1)
    M = x_TK.shape[0] * k
    _check_permutation("order_M", order_M, M, x_TK.device)
    _check_permutation("inverse_M", inverse_M, M, x_TK.device)
    return GroupedMMFunction.apply(x_TK, w_ENK, expert_offsets_E1, order_M, inverse_M, k, False)


def grouped_mm_scatter(x_MK: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor, order_M: Tensor) -> Tensor:
    """grouped_mm(x, w, offsets) written in pair order: row m of the product lands at row order_M[m], fused
    into the kernel's stores (the un-permute pass over [M, N] disappears). Returns y_PN."""
    _check_inputs(x_MK, w_ENK, expert_offsets_E1)
    _check_permutation("order_M", order_M, x_MK.shape[0], x_MK.device)
    return GroupedMMFunction.apply(x_MK, w_ENK, expert_offsets_E1, order_M, None, 1, True)


def grouped_mm_gather_ref(x_TK: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor, order_M: Tensor,
                          inverse_M: Tensor, k: int) -> Tensor:
    """Pure-torch twin of grouped_mm_gather (an explicit gather, then grouped_mm_ref)."""
    return grouped_mm_ref(x_TK[order_M.long() // k], w_ENK, expert_offsets_E1)


def grouped_mm_scatter_ref(x_MK: Tensor, w_ENK: Tensor, expert_offsets_E1: Tensor, order_M: Tensor) -> Tensor:
    """Pure-torch twin of grouped_mm_scatter (grouped_mm_ref, then an explicit scatter to rows order_M)."""
    y_MN = grouped_mm_ref(x_MK, w_ENK, expert_offsets_E1)
    return torch.empty_like(y_MN).index_copy(0, order_M.long(), y_MN)
