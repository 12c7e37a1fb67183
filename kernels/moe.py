"""The experts of a Mixtral MoE layer on top of the grouped GEMM: gather -> w1|w3 -> SwiGLU -> w2 -> combine.

Dimensions: T tokens, D hidden, F expert FFN hidden, E experts, K experts per token, M = T*K routed pairs.
Expert weights are stacked: w13_E2FD = [E, 2F, D] (rows [0, F) = w1 gate, [F, 2F) = w3 up; the layout of
transformers' MixtralExperts.gate_up_proj) and w2_EDF = [E, D, F] (MixtralExperts.down_proj).
"""
import torch.nn.functional as F_nn
from torch import Tensor

import kernels
from kernels.grouped_gemm import grouped_mm_ref, torch_grouped_mm, torch_grouped_mm_runs


def moe_experts(x_TD: Tensor, routing, w13_E2FD: Tensor, w2_EDF: Tensor) -> Tensor:
    """y_TD = sum over each token's K experts of weight * w2 @ (silu(w1 @ x) * (w3 @ x)).

    `routing` is a kernels.routing.Routing. Picks the Triton grouped GEMM through kernels.use_triton(x_TD);
    otherwise the torch path: torch._grouped_mm on the CPU where it runs, else the per-expert loop. The output
    has x_TD's dtype; the K-way combine runs in fp32.
    """
    if kernels.use_triton(x_TD):
        return _moe_experts_fused(x_TD, routing, w13_E2FD, w2_EDF)
    if x_TD.device.type == "cpu" and torch_grouped_mm_runs("cpu", x_TD.dtype):
        return moe_experts_ref(x_TD, routing, w13_E2FD, w2_EDF, gemm=torch_grouped_mm)
    return moe_experts_ref(x_TD, routing, w13_E2FD, w2_EDF)


def moe_experts_ref(x_TD: Tensor, routing, w13_E2FD: Tensor, w2_EDF: Tensor, gemm=grouped_mm_ref) -> Tensor:
    """The contract's dataflow step by step with a torch grouped GEMM (default: the per-expert loop, one host
    sync per GEMM, see grouped_mm_ref); every intermediate is materialised."""
    T, D = x_TD.shape
    K = routing.ids_TK.shape[1]
    order_M = routing.order_M.long()
    x_MD = x_TD[order_M // K]                                       # pair p = t*K + slot comes from token p // K
    y_MD = _swiglu_experts(x_MD, routing.offsets_E1, w13_E2FD, w2_EDF, gemm)
    y_MD = y_MD * routing.weights_TK.reshape(-1)[order_M][:, None]  # fp32 (weights are fp32)
    y_TD = y_MD[routing.inverse_M.long()].view(T, K, D).sum(dim=1)  # back to pair order p, then sum the K slots
    return y_TD.to(x_TD.dtype)


def moe_experts_sorted(x_MD: Tensor, offsets_E1: Tensor, w13_E2FD: Tensor, w2_EDF: Tensor) -> Tensor:
    """y_MD = w2 @ (silu(w1 @ x) * (w3 @ x)) of rows already sorted by expert (offsets_E1 as Routing's), unweighted,
    in x's dtype: the expert step of moe_experts without the routing around it (expert parallelism runs it on the
    rows other ranks sent, train.teachers.expert). The GEMM is picked as moe_experts picks it: kernels.grouped_mm
    (Triton) where use_triton, torch._grouped_mm on the CPU where it runs, else the per-expert loop."""
    if kernels.use_triton(x_MD):
        gemm = kernels.grouped_mm
    elif x_MD.device.type == "cpu" and torch_grouped_mm_runs("cpu", x_MD.dtype):
        gemm = torch_grouped_mm
    else:
        gemm = grouped_mm_ref
    return _swiglu_experts(x_MD, offsets_E1, w13_E2FD, w2_EDF, gemm)


def _swiglu_experts(x_MD: Tensor, offsets_E1: Tensor, w13_E2FD: Tensor, w2_EDF: Tensor, gemm) -> Tensor:
    F = w2_EDF.shape[2]
    h_M2F = gemm(x_MD, w13_E2FD, offsets_E1)
    a_MF = F_nn.silu(h_M2F[:, :F]) * h_M2F[:, F:]
    return gemm(a_MF, w2_EDF, offsets_E1)


def _moe_experts_fused(x_TD: Tensor, routing, w13_E2FD: Tensor, w2_EDF: Tensor) -> Tensor:
    """Triton path, same arithmetic as moe_experts_ref with two permutations folded into the GEMMs:
    - the gather x_TD[order_M // K] happens in the first GEMM's loads (grouped_mm_gather): the [M, D] copy of x
      is never written nor read back (2 * M * D * 2 B = 1 GiB of traffic per layer at T = 16k, M = 32k, bf16);
      its backward sums each token's K rows of dX by a gather through inverse_M.
    - the un-permute back to pair order happens in the second GEMM's stores (grouped_mm_scatter): the separate
      y_MD[inverse_M] pass disappears; its backward reads dY through order_M inside the kernels.
    The routing weight and the K-way sum stay in torch: folding the weight into the epilogue would force the
    backward to keep the unweighted [M, D] product for d(weight) anyway, and the two ops are one pass over
    [M, D] against ~3 GEMMs of 2 * M * D * F FLOPs.
    """
    from kernels.grouped_gemm import grouped_mm_gather, grouped_mm_scatter
    T, D = x_TD.shape
    K = routing.ids_TK.shape[1]
    F = w2_EDF.shape[2]
    h_M2F = grouped_mm_gather(x_TD, w13_E2FD, routing.offsets_E1, routing.order_M, routing.inverse_M, K)
    a_MF = F_nn.silu(h_M2F[:, :F]) * h_M2F[:, F:]
    y_PD = grouped_mm_scatter(a_MF, w2_EDF, routing.offsets_E1, routing.order_M)  # pair order p = t*K + slot
    y_TD = (y_PD.view(T, K, D) * routing.weights_TK[:, :, None]).sum(dim=1)      # fp32 (weights are fp32)
    return y_TD.to(x_TD.dtype)
