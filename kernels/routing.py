"""Fused top-k routing for a Mixtral-style MoE: softmax, top-k, renormalise, and the permutation metadata the
grouped GEMM needs, next to a pure-torch twin `route_topk_ref` with the same signature and outputs.

Dimensions: T tokens, E experts, K experts per token (top-k), M = T*K routed (token, slot) pairs, NB token
blocks of the forward grid. A pair's flat index is p = t*K + slot.

What both paths compute (Mixtral's `MixtralTopKRouter`, plus the metadata):
    probs_TE   = softmax(fp32(logits_TE))                     full softmax, kept for the load-balancing loss
    ids_TK     = the K largest experts per token, slot 0 first
    weights_TK = probs of ids_TK / their sum                  equal to a softmax over the K chosen logits
    counts_E, offsets_E1 = pairs per expert and their exclusive cumsum ([E+1], offsets_E1[E] = M)
    order_M    = pairs sorted by expert, ascending p within an expert (stable), so rows of the grouped GEMM
                 for expert e are order_M[offsets_E1[e]:offsets_E1[e+1]]
    inverse_M  = the inverse permutation (inverse_M[order_M] = arange(M)), to combine expert outputs
                 back in token order

Tie rule (kernel and reference share it): experts are ranked by their fp32 router logit, largest first, and
among equal logits the lower expert index ranks first. Softmax is monotone, so this is the ranking by
probability; ranking the exact logits rather than rounded probs lets both paths agree bit-for-bit on the ids
even where two exp implementations round a prob differently. NaN logits give undefined ids.

Launches (Triton path): 2 in the forward, 1 in the backward, no host synchronisation, every buffer sized
from T, E and K alone (so a CUDA graph can capture it):
    1. `_route_topk_kernel`, one program per BLOCK_T tokens: softmax, top-k, renormalise; writes probs,
       weights, ids and the block's expert histogram counts_BE[b, :].
    2. `_route_metadata_kernel`, same grid: each program reduces the NB x E histogram (its own prefix over
       earlier blocks and the totals), then scatters its pairs into order_M / inverse_M; program 0 writes
       counts_E and offsets_E1. A grid-wide prefix sum needs a grid-wide barrier, and a kernel boundary is
       the only one that is free of spin-waits, hence two launches, not one.
The backward (`_route_topk_bwd_kernel`, 1 launch) reads probs, weights and ids saved by the forward, not
the logits.
"""
import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path (`route_topk_ref`) works without Triton
    triton = None


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


# ----------------------------------------------------------------------------------------------- reference

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


# ------------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _route_topk_kernel(logits_ptr, stride_t, stride_e, probs_ptr, weights_ptr, ids_ptr, counts_BE_ptr,
                           T, E, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        pid = tl.program_id(0)
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        e = tl.arange(0, BLOCK_E)
        t_ok = t < T
        e_ok = e < E
        mask_TE = t_ok[:, None] & e_ok[None, :]
        # Padding experts are -inf (prob 0, never chosen); padding tokens read 0 so no row is all -inf.
        x = tl.load(logits_ptr + t[:, None] * stride_t + e[None, :] * stride_e, mask=mask_TE, other=0.0)
        x = tl.where(e_ok[None, :], x.to(tl.float32), float("-inf"))
        ex = tl.exp(x - tl.max(x, axis=1)[:, None])
        probs = ex / tl.sum(ex, axis=1)[:, None]
        tl.store(probs_ptr + t[:, None] * E + e[None, :], probs, mask=mask_TE)

        # K rounds of argmax; slot_TE[t, e] = the slot expert e fills for token t, -1 if not chosen.
        # min(index) among the maxima is the tie rule; `avail` (not -inf) marks candidates so that a
        # genuine -inf logit can still be chosen when k exceeds the number of finite ones.
        avail = (t[:, None] >= 0) & e_ok[None, :]
        slot_TE = tl.full((BLOCK_T, BLOCK_E), -1, tl.int32)
        for j in tl.static_range(K):
            best = tl.max(tl.where(avail, x, float("-inf")), axis=1)
            idx = tl.min(tl.where(avail & (x == best[:, None]), e[None, :], BLOCK_E), axis=1)
            sel = e[None, :] == idx[:, None]
            slot_TE = tl.where(sel, j, slot_TE)
            avail = avail & ~sel
            tl.store(ids_ptr + t * K + j, idx, mask=t_ok)

        # w = ex / sum of the chosen ex: the softmax over the K chosen logits, one rounding fewer than
        # probs / sum(probs) and equal to it in exact arithmetic.
        chosen = slot_TE >= 0
        inv_sum = 1.0 / tl.sum(tl.where(chosen, ex, 0.0), axis=1)
        for j in tl.static_range(K):
            w = tl.sum(tl.where(slot_TE == j, ex, 0.0), axis=1) * inv_sum
            tl.store(weights_ptr + t * K + j, w, mask=t_ok)
        hist = tl.sum((chosen & t_ok[:, None]).to(tl.int32), axis=0)
        tl.store(counts_BE_ptr + pid * E + e, hist, mask=e_ok)

    @triton.jit
    def _route_metadata_kernel(ids_ptr, counts_BE_ptr, counts_ptr, offsets_ptr, order_ptr, inverse_ptr,
                               T, E, NB, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                               CHUNK_B: tl.constexpr):
        pid = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        e_ok = e < E
        # Every program reads the whole NB x E histogram (NB*E*4 bytes: 4 KiB at T=16384, E=8, BLOCK_T=128, one
        # CHUNK_B=128 step) for the expert totals and its own prefix over earlier blocks; cheaper than a third
        # launch while NB*E is small. The reads grow as NB^2 * E over the grid: 32 MiB of L2 at T=131072, E=8.
        total_E = tl.zeros((BLOCK_E,), tl.int32)
        before_E = tl.zeros((BLOCK_E,), tl.int32)
        # A while loop, not `for b0 in range(0, NB, CHUNK_B)`: Triton 3.6's interpreter cannot take a runtime
        # range bound under numpy >= 2.3 (int() of a 1-element array); compiled code is the same loop.
        b0 = 0
        while b0 < NB:
            b = b0 + tl.arange(0, CHUNK_B)
            tile = tl.load(counts_BE_ptr + b[:, None] * E + e[None, :], mask=(b < NB)[:, None] & e_ok[None, :],
                           other=0)
            total_E += tl.sum(tile, axis=0)
            before_E += tl.sum(tl.where((b < pid)[:, None], tile, 0), axis=0)
            b0 += CHUNK_B
        incl_E = tl.cumsum(total_E, axis=0)
        # Program 0 alone writes the totals: pid * E + e < E holds only there (a vector mask, not a branch).
        first_E = pid * E + e < E
        tl.store(counts_ptr + e, total_E, mask=first_E)
        tl.store(offsets_ptr + 1 + e, incl_E, mask=first_E)
        tl.store(offsets_ptr + e, incl_E - total_E, mask=pid + e == 0)

        # Sorted position of pair (t, j) with expert e = offsets[e] + pairs of e in earlier blocks
        # + pairs of e in earlier tokens of this block. A token's K ids are distinct, so the one-hot of its
        # experts is 0/1 and an exclusive cumsum over tokens ranks the pairs in ascending p.
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        onehot = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for j in tl.static_range(K):
            idx = tl.load(ids_ptr + t * K + j, mask=t_ok, other=-1)
            onehot += (idx[:, None] == e[None, :]).to(tl.int32)
        base_TE = tl.cumsum(onehot, axis=0) - onehot + (incl_E - total_E + before_E)[None, :]
        for j in tl.static_range(K):
            idx = tl.load(ids_ptr + t * K + j, mask=t_ok, other=-1)
            m = tl.sum(tl.where(idx[:, None] == e[None, :], base_TE, 0), axis=1)
            tl.store(inverse_ptr + t * K + j, m, mask=t_ok)
            tl.store(order_ptr + m, t * K + j, mask=t_ok)

    @triton.jit
    def _route_topk_bwd_kernel(probs_ptr, dprobs_ptr, weights_ptr, dweights_ptr, ids_ptr, dlogits_ptr,
                               T, E, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        # d logits = p * (dp - <p, dp>)                      through probs_TE (softmax over E)
        #          + w * (dw - <w, dw>) on the K chosen     through weights_TK (softmax over the chosen K)
        pid = tl.program_id(0)
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        e = tl.arange(0, BLOCK_E)
        t_ok = t < T
        mask_TE = t_ok[:, None] & (e < E)[None, :]
        offs_TE = t[:, None] * E + e[None, :]
        p = tl.load(probs_ptr + offs_TE, mask=mask_TE, other=0.0)
        dp = tl.load(dprobs_ptr + offs_TE, mask=mask_TE, other=0.0).to(tl.float32)
        dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        w_TE = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        dw_TE = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        for j in tl.static_range(K):
            idx = tl.load(ids_ptr + t * K + j, mask=t_ok, other=-1)
            w = tl.load(weights_ptr + t * K + j, mask=t_ok, other=0.0)
            dw = tl.load(dweights_ptr + t * K + j, mask=t_ok, other=0.0).to(tl.float32)
            sel = idx[:, None] == e[None, :]
            w_TE = tl.where(sel, w[:, None], w_TE)
            dw_TE = tl.where(sel, dw[:, None], dw_TE)
        dl += w_TE * (dw_TE - tl.sum(w_TE * dw_TE, axis=1)[:, None])
        tl.store(dlogits_ptr + offs_TE, dl.to(dlogits_ptr.dtype.element_ty), mask=mask_TE)


# ----------------------------------------------------------------------------------------------- launchers

def _block_sizes(E: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps). About 8 tile values per thread: the K-round argmax and the backward then
    stay in registers (ptxas sm_90, Triton 3.6: 40 / 45 / 70 registers for the three kernels at E=8, 1024-value
    tiles, 4 warps; at 32 values per thread the backward spilled). 128 tokens per program gives 128 programs at
    T=16384, E=8: about one per H100/H200 SM."""
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T = max(8, min(128, 2048 // BLOCK_E))
    num_warps = min(16, max(4, BLOCK_T * BLOCK_E // 256))
    return BLOCK_T, BLOCK_E, num_warps


def _on_device(x: Tensor):
    # Triton launches on the current CUDA device; make it x's (nothing to do on CPU / interpreter).
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def route_topk_fwd(router_logits_TE: Tensor, k: int) -> tuple[Tensor, ...]:
    """Two launches; returns the fields of `Routing` in order. Inputs are checked here (ValueError)."""
    _check_inputs(router_logits_TE, k)
    if triton is None:
        raise ImportError("route_topk needs Triton (pip install triton); route_topk_ref is the torch path")
    T, E = router_logits_TE.shape
    M = T * k
    dev = router_logits_TE.device
    BLOCK_T, BLOCK_E, num_warps = _block_sizes(E)
    NB = max(1, triton.cdiv(T, BLOCK_T))  # T = 0 still launches one (fully masked) program
    probs_TE = torch.empty(T, E, dtype=torch.float32, device=dev)
    weights_TK = torch.empty(T, k, dtype=torch.float32, device=dev)
    ids_TK = torch.empty(T, k, dtype=torch.int32, device=dev)
    counts_BE = torch.empty(NB, E, dtype=torch.int32, device=dev)  # per-block histograms, launch 1 -> 2
    counts_E = torch.empty(E, dtype=torch.int32, device=dev)
    offsets_E1 = torch.empty(E + 1, dtype=torch.int32, device=dev)
    order_M = torch.empty(M, dtype=torch.int32, device=dev)
    inverse_M = torch.empty(M, dtype=torch.int32, device=dev)
    with _on_device(router_logits_TE):
        _route_topk_kernel[(NB,)](router_logits_TE, router_logits_TE.stride(0), router_logits_TE.stride(1),
                                  probs_TE, weights_TK, ids_TK, counts_BE, T, E,
                                  K=k, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, num_warps=num_warps)
        _route_metadata_kernel[(NB,)](ids_TK, counts_BE, counts_E, offsets_E1, order_M, inverse_M, T, E, NB,
                                      K=k, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, CHUNK_B=max(4, 1024 // BLOCK_E),
                                      num_warps=num_warps)
    return weights_TK, ids_TK, probs_TE, counts_E, offsets_E1, order_M, inverse_M


def route_topk_bwd(probs_TE: Tensor, dprobs_TE: Tensor, weights_TK: Tensor, dweights_TK: Tensor,
                   ids_TK: Tensor, logits_dtype: torch.dtype) -> Tensor:
    """One launch: d(router logits) [T, E] in `logits_dtype` from the gradients of weights_TK and probs_TE."""
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    BLOCK_T, BLOCK_E, num_warps = _block_sizes(E)
    dlogits_TE = torch.empty(T, E, dtype=logits_dtype, device=probs_TE.device)
    with _on_device(probs_TE):
        _route_topk_bwd_kernel[(max(1, triton.cdiv(T, BLOCK_T)),)](
            probs_TE, dprobs_TE.contiguous(), weights_TK, dweights_TK.contiguous(), ids_TK, dlogits_TE, T, E,
            K=K, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, num_warps=num_warps)
    return dlogits_TE


class RouteTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, router_logits_TE: Tensor, k: int):
        outs = route_topk_fwd(router_logits_TE, k)
        weights_TK, ids_TK, probs_TE = outs[:3]
        ctx.save_for_backward(probs_TE, weights_TK, ids_TK)
        ctx.logits_dtype = router_logits_TE.dtype
        ctx.mark_non_differentiable(ids_TK, *outs[3:])  # ids and the metadata are integers
        return outs

    @staticmethod
    def backward(ctx, dweights_TK, _dids, dprobs_TE, *_dmetadata):
        # Autograd materialises a missing gradient (weights or probs unused) as zeros, so both are tensors.
        probs_TE, weights_TK, ids_TK = ctx.saved_tensors
        return route_topk_bwd(probs_TE, dprobs_TE, weights_TK, dweights_TK, ids_TK, ctx.logits_dtype), None


def route_topk(router_logits_TE: Tensor, k: int) -> Routing:
    """Fused top-k routing (see the module docstring: tie rule, 2 forward launches + 1 backward, metadata). The
    path is picked here (kernels.use_triton): Triton on CUDA, `route_topk_ref` on the CPU; same contract.

    router_logits_TE: [T, E], any float dtype (computed in fp32); k: experts per token, 1 <= k <= E.
    Gradients reach the logits from weights_TK and probs_TE; the other fields are integer metadata.
    Inputs are checked (ValueError) in route_topk_fwd / route_topk_ref.
    """
    from kernels import use_triton
    if not use_triton(router_logits_TE):
        return route_topk_ref(router_logits_TE, k)
    return Routing(*RouteTopKFunction.apply(router_logits_TE, k))
