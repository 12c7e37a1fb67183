"""Expert parallelism for a frozen MoE teacher, forward only, applied from outside the model (gpt-fast's `tp.py`
way): each rank of a group (one node's GPUs) keeps E/ep experts of every MoE layer and the replicated rest
(embeddings, attention, norms, gates, LM head); each MoE layer routes its own tokens, sends every routed
(token, slot) copy to the rank that owns its expert with an all-to-all, runs the experts it owns on what it
received with the grouped GEMM, and sends the results back with a second all-to-all.

Dimensions: T tokens of this rank, D hidden, F expert FFN hidden, E experts, K experts per token, M = T*K routed
pairs of this rank, R ranks of the group (ep), L = E/R experts per rank, N rows received from all ranks.

Per rank Mixtral-8x7B at ep = 8 in bf16: 1.6 B replicated parameters (3.2 GB) + 45.1/8 B expert parameters
(11.3 GB) = ~14.5 GB, with no weight gather ever (FSDP2 sharding gathers every block each forward). Traffic: each
MoE layer sends M rows of D twice (dispatch, then the results back) and receives as many with balanced routing:
T = 16k tokens, K = 2, D = 4096, bf16: 268 MB per all-to-all, x 2 x 32 layers = 17 GB sent per micro-batch per
rank, (R-1)/R of it (15 GB at R = 8) over NVLink, the rest to itself (train.plan.all_to_all_bytes).

Ranks whose batch has no row of this teacher still run a forward on zero rows (TeacherSet, OnlineTeacher.empty_step)
while another rank of the group has rows: every all-to-all of a layer needs every rank of the group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import kernels
from kernels.moe import moe_experts_sorted
from model import Transformer
from model.model import MoEFeedForward
from train.errors import ConfigError


def expert_group(mesh=None):
    """The process group that shares one copy of the teacher: a DeviceMesh's shard dimension (the node's ranks
    under HSDP, train.parallel.shard_mesh), a ProcessGroup as given, or (None) every rank."""
    if mesh is None:
        return dist.group.WORLD
    if hasattr(mesh, "get_group"):  # a DeviceMesh
        return (mesh if mesh.ndim == 1 else mesh["shard"]).get_group()
    return mesh


def check_expert_placement(args, ep: int, where: str = "the teacher") -> None:
    """ConfigError unless `args` (ModelArgs) can be split over `ep` ranks by experts; run before any weight is read."""
    if args.moe is None:
        raise ConfigError(f"{where}: placement='expert' needs an MoE (Mixtral) teacher, this one is dense; use "
                          f"placement='shard' (FSDP2, 1/{ep} of it per rank) or 'replicate'")
    E = args.moe.num_experts
    if ep < 1 or E % ep:
        divisors = [d for d in range(1, E + 1) if E % d == 0]
        raise ConfigError(f"{where}: placement='expert' puts E/ep experts on each rank, and its {E} experts do not "
                          f"split over ep={ep} ranks; use a group of {divisors} ranks (--parallel.shard_group=N, "
                          f"the teacher's group is the shard group) or placement='shard'")


def expert_parallel(model: Transformer, mesh=None) -> Transformer:
    """Swap every MoEFeedForward of `model` for an ExpertParallelMoE holding this rank's experts of the group
    (`mesh`: see expert_group): rank r keeps experts [r*L, (r+1)*L). The model may arrive whole (its other experts
    are dropped here, after a copy of the slice: peak one whole model per rank, fine for tests and small
    teachers) or already sliced (model.load_hf(..., experts=range(r*L, (r+1)*L)) reads only the slice: what
    OnlineTeacher.load does). In place; returns `model`. Forward only (no autograd through the all-to-alls)."""
    group = expert_group(mesh)
    check_expert_placement(model.args, dist.get_world_size(group))
    for layer in model.layers:
        layer.feed_forward = ExpertParallelMoE(layer.feed_forward, group)
    return model


class ExpertParallelMoE(nn.Module):
    """MoEFeedForward's forward with the experts spread over a group; same parameter names (gate, w13, w2), so a
    sliced state dict loads into it; w13/w2 hold L = E/R experts."""

    def __init__(self, moe_ff: MoEFeedForward, group):
        super().__init__()
        self.moe, self.gate, self.group = moe_ff.moe, moe_ff.gate, group
        R, r = dist.get_world_size(group), dist.get_rank(group)
        E = self.moe.num_experts
        L = E // R
        w13, w2 = moe_ff.w13.detach(), moe_ff.w2.detach()
        if w13.shape[0] != L:  # whole: keep a copy of the slice, so that the E-expert storage can be freed
            assert w13.shape[0] == E, (tuple(w13.shape), E, R)
            w13, w2 = w13[r * L:(r + 1) * L].clone(), w2[r * L:(r + 1) * L].clone()
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def forward(self, x_BTD):
        if torch.is_grad_enabled() and x_BTD.requires_grad:
            raise RuntimeError("ExpertParallelMoE is forward only (a frozen teacher): run it under torch.no_grad()")
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        routing = kernels.route_topk(self.gate(x_TD), self.moe.num_experts_per_tok)  # replicated gate: all E
        w13, w2 = self.w13, self.w2
        if torch.is_autocast_enabled(x_TD.device.type):  # as MoEFeedForward: the experts' GEMMs in autocast's dtype
            dt = torch.get_autocast_dtype(x_TD.device.type)
            x_TD, w13, w2 = x_TD.to(dt), w13.to(dt), w2.to(dt)
        y_TD = dispatch_experts_combine(x_TD, routing, w13, w2, self.group)
        # This rank's load-balancing statistics, as MoEFeedForward returns them (a teacher has no aux loss).
        stats = (routing.counts_E.float(), routing.probs_TE.sum(0), B * T)
        return y_TD.view(B, T, D), stats


def dispatch_experts_combine(x_TD, routing, w13_L2FD, w2_LDF, group):
    """kernels.moe.moe_experts over a group: y_TD = sum over each token's K experts of weight * expert(x), where
    the experts live on the rank that owns them. Every rank of `group` must call it (T may be 0 on some).

    Host sync: one per call (per MoE layer), reading the exchanged counts as the all-to-alls' split sizes. A
    forward-only teacher has no backward to overlap it with, and the next collective needs the sizes anyway;
    padding every split to the worst case (M rows to every rank) would multiply the traffic by R."""
    T, D = x_TD.shape
    K = routing.ids_TK.shape[1]
    E = routing.counts_E.shape[0]
    R = dist.get_world_size(group)
    L = E // R
    assert w13_L2FD.shape[0] == L and E == L * R, (tuple(w13_L2FD.shape), E, R)
    order_M = routing.order_M.long()
    # Pairs sorted by expert are sorted by owner too (rank r owns experts [r*L, (r+1)*L)): the send buffer is the
    # routed copies in routing order, and its split for rank r is the sum of that rank's L expert counts.
    x_MD = x_TD[order_M // K]                                   # pair p = t*K + slot comes from token p // K
    send_RL = routing.counts_E.view(R, L).long()
    recv_RL = torch.empty_like(send_RL)                         # [source rank, local expert]
    dist.all_to_all_single(recv_RL, send_RL, group=group)
    sizes = torch.cat([send_RL.sum(1), recv_RL.reshape(-1)]).tolist()  # host sync: the split sizes (see above)
    send_R, recv_flat = sizes[:R], sizes[R:]
    recv_R = [sum(recv_flat[s * L:(s + 1) * L]) for s in range(R)]
    N = sum(recv_R)

    x_ND = x_MD.new_empty(N, D)
    dist.all_to_all_single(x_ND, x_MD, output_split_sizes=recv_R, input_split_sizes=send_R, group=group)
    # Received rows come by source rank, then by local expert; the grouped GEMM wants them by local expert: a
    # stable sort of their local expert ids (source order kept within an expert).
    local_N = torch.arange(L, device=x_ND.device).repeat(R).repeat_interleave(recv_RL.reshape(-1), output_size=N)
    perm_N = torch.sort(local_N, stable=True).indices
    offsets_L1 = torch.zeros(L + 1, dtype=torch.int32, device=x_ND.device)
    offsets_L1[1:] = recv_RL.sum(0).cumsum(0)
    y_ND = torch.empty_like(x_ND)
    if N:  # a rank whose experts got no token this layer still joins both all-to-alls
        y_ND[perm_N] = moe_experts_sorted(x_ND[perm_N], offsets_L1, w13_L2FD, w2_LDF)

    y_MD = y_ND.new_empty(T * K, D)
    dist.all_to_all_single(y_MD, y_ND, output_split_sizes=send_R, input_split_sizes=recv_R, group=group)
    # The combine exactly as kernels.moe.moe_experts_ref: weight each pair in fp32 (the weights are fp32), back to
    # pair order, sum the K slots, cast once.
    y_MD = y_MD * routing.weights_TK.reshape(-1)[order_M][:, None]
    y_TD = y_MD[routing.inverse_M.long()].view(T, K, D).sum(dim=1)
    return y_TD.to(x_TD.dtype)
