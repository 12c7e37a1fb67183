"""Fused top-k routing for a Mixtral-style MoE: softmax, top-k, renormalise, and the permutation metadata the
grouped GEMM needs, with a pure-torch twin `route_topk_ref` of the same signature.

Dimensions: T tokens, E experts, K experts per token (top-k), M = T*K routed (token, slot) pairs.
A pair's flat index is p = t*K + slot.

Tie rule (kernel and reference share it): experts are ranked by their fp32 router logit, largest first, and
among equal logits the lower expert index ranks first. Softmax is monotone, so this is the ranking by
probability; ranking on the exact logits (not on rounded probs) lets both paths agree bit-for-bit on the ids
even where two exp implementations round probs differently.
"""
from typing import NamedTuple

import torch
from torch import Tensor


class Routing(NamedTuple):
    weights_TK: Tensor  # fp32, top-k probs renormalised to sum to 1 per row; differentiable wrt the logits
    ids_TK: Tensor      # int32 expert ids, slot 0 = largest prob
    probs_TE: Tensor    # fp32 full softmax over experts (Mixtral's aux loss); differentiable wrt the logits
    counts_E: Tensor    # int32 pairs routed to each expert
    offsets_E1: Tensor  # int32 [E+1]: exclusive cumsum of counts_E; offsets_E1[0] = 0, offsets_E1[E] = M
    order_M: Tensor     # int32: sorted position m -> pair p; sorted by expert, ascending p within an expert
    inverse_M: Tensor   # int32: pair p -> sorted position m, so inverse_M[order_M] = arange(M)


def _check_inputs(router_logits_TE: Tensor, k: int) -> None:
    if router_logits_TE.dim() != 2:
        raise ValueError(f"router_logits_TE must be 2-D [T, E], got shape {tuple(router_logits_TE.shape)}; "
                         "flatten the batch dimensions first (x.view(-1, E))")
    if not router_logits_TE.is_floating_point():
        raise ValueError(f"router_logits_TE must be a float tensor, got {router_logits_TE.dtype}; "
                         "pass the gate's output before any cast to an integer type")
    E = router_logits_TE.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k={k!r} must be an int in [1, E={E}] (experts per token)")


def route_topk_ref(router_logits_TE: Tensor, k: int) -> Routing:
    """Pure-torch routing with the same outputs as `route_topk`. No host sync: every size is T, E or k."""
    _check_inputs(router_logits_TE, k)
    T, E = router_logits_TE.shape
    M = T * k
    logits_TE = router_logits_TE.float()
    probs_TE = torch.softmax(logits_TE, dim=-1)
    # The tie rule, explicitly: a stable descending sort keeps equal logits in ascending expert order
    # (torch.topk documents no order among equal values).
    ids_TK = torch.sort(logits_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    top_TK = probs_TE.gather(1, ids_TK)
    weights_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)

    ids_M = ids_TK.reshape(M)
    # scatter_add, not bincount: CUDA bincount reads max(ids) on the host to size its output.
    counts_E = torch.zeros(E, dtype=torch.int32, device=ids_M.device).scatter_add_(
        0, ids_M, torch.ones(M, dtype=torch.int32, device=ids_M.device))
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int32, device=ids_M.device)
    offsets_E1[1:] = counts_E.cumsum(0)
    order_M = torch.sort(ids_M, stable=True).indices  # stable: ascending p within an expert
    inverse_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(M, device=ids_M.device))
    return Routing(weights_TK, ids_TK.to(torch.int32), probs_TE, counts_E, offsets_E1,
                   order_M.to(torch.int32), inverse_M.to(torch.int32))


def route_topk(router_logits_TE: Tensor, k: int) -> Routing:
    """Placeholder until the Triton path lands: same outputs as `route_topk_ref`."""
    return route_topk_ref(router_logits_TE, k)
