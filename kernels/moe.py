"""The experts of a Mixtral MoE layer on top of the grouped GEMM: gather -> w1|w3 -> SwiGLU -> w2 -> combine.

Dimensions: T tokens, D hidden, F expert FFN hidden, E experts, K experts per token, M = T*K routed pairs.
Expert weights are stacked: w13_E2FD = [E, 2F, D] (rows [0, F) = w1 gate, [F, 2F) = w3 up; the layout of
transformers' MixtralExperts.gate_up_proj) and w2_EDF = [E, D, F] (MixtralExperts.down_proj).
"""
import torch
import torch.nn.functional as F_nn
from torch import Tensor

import kernels
from kernels.grouped_gemm import grouped_mm_ref


def moe_experts(x_TD: Tensor, routing, w13_E2FD: Tensor, w2_EDF: Tensor) -> Tensor:
    """y_TD = sum over each token's K experts of weight * w2 @ (silu(w1 @ x) * (w3 @ x)).

    `routing` is a kernels.routing.Routing. Picks the Triton grouped GEMM or the torch loop through
    kernels.use_triton(x_TD). The output has x_TD's dtype; the K-way combine runs in fp32.
    """
    if kernels.use_triton(x_TD):
        from kernels.grouped_gemm import grouped_mm as mm
    else:
        mm = grouped_mm_ref
    T, D = x_TD.shape
    K = routing.ids_TK.shape[1]
    F = w2_EDF.shape[2]
    order_M = routing.order_M.long()
    x_MD = x_TD[order_M // K]                                      # pair p = t*K + slot comes from token p // K
    h_M2F = mm(x_MD, w13_E2FD, routing.offsets_E1)
    a_MF = F_nn.silu(h_M2F[:, :F]) * h_M2F[:, F:]
    y_MD = mm(a_MF, w2_EDF, routing.offsets_E1)
    y_MD = y_MD * routing.weights_TK.reshape(-1)[order_M][:, None]  # fp32 (weights are fp32)
    y_TD = y_MD[routing.inverse_M.long()].view(T, K, D).sum(dim=1)  # back to pair order p, then sum the K slots
    return y_TD.to(x_TD.dtype)
