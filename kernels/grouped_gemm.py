"""Grouped expert GEMM: rows of `x` sorted by expert, one weight matrix per expert.

Dimensions: M rows (routed (token, slot) pairs, sorted by expert), E experts, N output features,
K input features (the contraction). `expert_offsets_E1` [E+1] (int32) marks expert e's rows as
[offsets[e], offsets[e+1]); offsets[0] = 0 and offsets[E] = M (the routing kernel's contract).

    y[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ w[e].T     for every expert e
"""
import torch
from torch import Tensor


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
