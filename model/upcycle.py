"""Sparse upcycling: a dense Mistral becomes a Mixtral-style MoE (the paper's "2x7B" student).

Every expert starts as a copy of the dense FFN. Whatever the router picks, the K renormalised weights sum to 1
and all experts are equal, so the MoE output equals the dense output at step 0 (up to fp rounding of
w·y + (1-w)·y). The router gets small random weights rather than zeros: zeros would make every token tie and,
by the tie rule, always pick experts 0..K-1, so the experts would never diverge.
"""
from __future__ import annotations

import copy

import torch

from model.model import MoEArgs, Transformer


def upcycle(dense: Transformer, num_experts: int, top_k: int = 2, router_std: float = 0.02,
            aux_loss_coef: float = 0.02, seed: int = 0) -> Transformer:
    if dense.args.moe is not None:
        raise ValueError("upcycle() needs a dense model; this one already has "
                         f"{dense.args.moe.num_experts} experts")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    args = copy.deepcopy(dense.args)
    args.moe = MoEArgs(num_experts=num_experts, num_experts_per_tok=top_k, router_aux_loss_coef=aux_loss_coef)
    p0 = next(dense.parameters())
    with torch.device("meta"):
        moe = Transformer(args)
    moe = moe.to_empty(device=p0.device).to(p0.dtype)

    dense_sd = dense.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.state_dict().items():
            if name in dense_sd:
                p.copy_(dense_sd[name])
            elif name.endswith("feed_forward.w13"):  # [E, 2F, D]: gate rows then up rows, per expert
                prefix = name.removesuffix("w13")
                w1, w3 = dense_sd[prefix + "w1.weight"], dense_sd[prefix + "w3.weight"]
                p.copy_(torch.cat([w1, w3], 0).expand_as(p))
            elif name.endswith("feed_forward.w2"):  # [E, D, F]
                p.copy_(dense_sd[name + ".weight"].expand_as(p))
            elif name.endswith("feed_forward.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * router_std)
            else:
                raise AssertionError(f"upcycle: no source for {name}")
    return moe
