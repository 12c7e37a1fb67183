"""The objective: the trainable module (student forward + fused LM head, CE and top-k KD) and the optional
attention-transfer term. To change the KD objective, this file and kernels/kd_loss.py are the two to read.

Normalisation (docs/design.md, decision 2): every term's sum over loss tokens is divided by n, the loss-token count of
the whole optimizer step over all micro-batches and ranks (the step computes it once, before the
micro-batches), so the gradient is the same whatever the split into micro-batches and ranks. The MoE
load-balancing loss is a per-forward mean and is averaged over the step's forwards (coef * aux_scale * aux).

Attention transfer (the paper's optional phase-1 term): KL between teacher and student attention rows.

    L_attn = mean over layers l, heads h and loss-token query rows t of  KL( A_T[l, h, t, :] || A_S[l, h, t, :] )

A = softmax(q kᵀ / sqrt(Dh)) under each model's own mask (causal, same packed document, its sliding window),
rebuilt from the post-rotary (q, k) that `model.capture_qk` collects. Teacher and student need the same
number of layers and query heads (head widths and KV-head counts may differ: maps are T x T either way).

Memory: one layer at a time. Each layer's term runs under `torch.utils.checkpoint`, so its B x H x T x T
maps (a few fp32 copies: scores, log-probs of both models) exist only while that layer's term is computed,
in the forward and again in the backward: peak is one layer's maps instead of L layers'. At B=1, H=32,
T=4096 one fp32 map is 2 GiB, so long sequences want the per-head loop below the layer (not done: the
paper's students are trained at T <= 2048 with this term).

Dimensions: B sequences, T tokens (queries and keys), N = B*T, K teacher top-k, D hidden, V vocabulary,
H query heads, G key/value heads, Dh head width, L layers.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import kernels
from model import Transformer, capture_qk
from model.model import attention_mask


# ------------------------------------------------------------------------------------------------------------
# The trainable module: student forward and the fused loss in one forward, so DDP/FSDP see the LM head used
# inside the wrapped module (the loss reads the head weight directly instead of producing logits).


@dataclass
class LossSettings:
    kd_weight: float
    tau: float
    attn_weight: float
    aux_coef: float


class LossStats(NamedTuple):
    """One forward's detached statistics, summed over micro-batches and ranks by the step (one all-reduce)."""
    loss: torch.Tensor      # what was backpropagated (already divided by the step's loss tokens n)
    ce_sum: torch.Tensor    # CE summed over this forward's loss tokens
    kd_sum: torch.Tensor    # top-k KD summed likewise
    attn_sum: torch.Tensor  # attention KL summed over layers, heads and loss rows
    aux: torch.Tensor       # MoE load-balancing loss of this forward (a mean)


class StudentWithLoss(nn.Module):
    """`compute_dtype`: bf16 runs the student's forward under autocast (every matmul, and through the MoE
    layer's explicit cast the grouped GEMM too) and the LM head + loss on bf16 inputs; None: fp32 all through."""

    def __init__(self, student: Transformer, loss: LossSettings, teacher_args=None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.student, self.loss, self.teacher_args = student, loss, teacher_args
        self.compute_dtype = compute_dtype

    def forward(self, tokens_BT, labels_BT, positions_BT, doc_ids_BT, ids_BTK, logprobs_BTK, normalizer,
                aux_scale: float, teacher_qk=None, check_ids: bool = False,
                doc_spans=None) -> tuple[torch.Tensor, LossStats]:
        """(loss to backpropagate, its detached LossStats). The LM head + CE + top-k KD run fused and chunked in
        `kernels.linear_topk_kd_loss` (which picks Triton or torch itself); under a bf16 compute dtype the head
        runs in bf16, as autocast would run an nn.Linear, but outside autocast, because the loss picks its own
        precisions (fp32 softmax statistics, fp32 dW accumulation)."""
        s, lo = self.student, self.loss
        attn = teacher_qk is not None
        dt = self.compute_dtype
        autocast = (torch.autocast(tokens_BT.device.type, dtype=dt) if dt is not None else contextlib.nullcontext())
        with autocast, (capture_qk(s) if attn else contextlib.nullcontext()) as student_qk:
            hidden_BTD, aux = s.forward_with_aux(tokens_BT, positions_BT, doc_ids_BT, doc_spans=doc_spans)
        hidden_ND, weight_VD = hidden_BTD.reshape(-1, hidden_BTD.shape[-1]), s.output.weight
        N, K = hidden_ND.shape[0], ids_BTK.shape[-1]  # K = 0 for sft
        if dt is not None:
            hidden_ND, weight_VD = hidden_ND.to(dt), weight_VD.to(dt)
        with torch.autocast(hidden_ND.device.type, enabled=False):
            out = kernels.linear_topk_kd_loss(hidden_ND, weight_VD, labels_BT.reshape(N), ids_BTK.reshape(N, K),
                                              logprobs_BTK.reshape(N, K), tau=lo.tau, kd_weight=lo.kd_weight,
                                              normalizer=normalizer, check_ids=check_ids)
        loss = out.loss
        attn_sum = torch.zeros((), device=loss.device)
        if attn:
            attn_sum = attention_kl_sum(student_qk, teacher_qk, s.args, self.teacher_args, labels_BT, doc_ids_BT)
            loss = loss + lo.attn_weight * attn_sum / (normalizer * s.args.n_layers * s.args.n_heads)
        if s.args.moe is not None and lo.aux_coef > 0:
            loss = loss + (lo.aux_coef * aux_scale) * aux
        return loss, LossStats(loss.detach().float(), out.ce_sum.float(), out.kd_sum.float(),
                               attn_sum.detach().float(), aux.detach().float())

    @torch.no_grad()
    def evaluate(self, tokens_BT, positions_BT, doc_ids_BT, idx_N, labels_N, ids_NK, logprobs_NK,
                 doc_spans=None) -> torch.Tensor:
        """Validation sums of one batch at its N loss positions (`idx_N`, flat into B*T), no gradient: a device
        tensor [CE sum, KL(teacher || student) sum, top-1 agreements, N]. The KL is the training loss's KD term
        at τ = 1 (over the teacher's top-k, renormalised: kernels/kd_loss.py), computed by the same kernel call;
        K = 0 (no teacher signal) gives CE only, with the KL and top-1 sums 0. Top-1: the student's argmax over V
        equals the teacher's best id. Under FSDP2 call it through `train.parallel.forward_method`, which gathers
        the root's weights (embeddings, LM head) as `forward` does."""
        from train.teachers.signal import topk_logprobs  # the teachers' chunked top-k of an LM head
        s, dt = self.student, self.compute_dtype
        autocast = (torch.autocast(tokens_BT.device.type, dtype=dt) if dt is not None else contextlib.nullcontext())
        with autocast:
            hidden_BTD, _ = s.forward_with_aux(tokens_BT, positions_BT, doc_ids_BT, doc_spans=doc_spans)
        hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1]).index_select(0, idx_N)
        weight_VD = s.output.weight
        if dt is not None:
            hidden_ND, weight_VD = hidden_ND.to(dt), weight_VD.to(dt)
        N, K = hidden_ND.shape[0], ids_NK.shape[-1]
        with torch.autocast(hidden_ND.device.type, enabled=False):
            out = kernels.linear_topk_kd_loss(hidden_ND, weight_VD, labels_N, ids_NK, logprobs_NK, tau=1.0,
                                              kd_weight=1.0 if K else 0.0, check_ids=False)
            top1 = torch.zeros((), device=hidden_ND.device)
            if K and N:
                student_N = topk_logprobs(hidden_ND, weight_VD, 1)[0][:, 0]
                teacher_N = ids_NK.gather(1, logprobs_NK.argmax(-1, keepdim=True))[:, 0]
                top1 = (student_N == teacher_N).sum().float()
        return torch.stack([out.ce_sum.float(), out.kd_sum.float(), top1, torch.tensor(float(N), device=top1.device)])


# ------------------------------------------------------------------------------------------------------------
# The attention-transfer term (see the module docstring)


def effective_window(sliding_window: int | None, seq_len: int) -> int:
    """Keys a query can reach in a sequence of seq_len tokens: a window >= seq_len is no window at all."""
    return seq_len if sliding_window is None else min(sliding_window, seq_len)


def check_compatible(student_args, teacher_args, seq_len: int) -> None:
    """ValueError unless the two models' attention maps can be compared one to one at sequences of seq_len
    tokens. Windows are compared as they act: Mistral's 4096 and Mixtral's none are the same mask at
    seq_len <= 4096 (the paper's pair)."""
    s, t = student_args, teacher_args
    if (s.n_layers, s.n_heads) != (t.n_layers, t.n_heads):
        raise ValueError(f"attention transfer needs the same layers and heads: student has {s.n_layers} layers x "
                         f"{s.n_heads} heads, teacher {t.n_layers} x {t.n_heads}; set loss.attn_weight=0 or "
                         f"use a teacher of the student's shape")
    ws, wt = effective_window(s.sliding_window, seq_len), effective_window(t.sliding_window, seq_len)
    if ws != wt:
        raise ValueError(f"attention transfer needs the same attention mask: at seq_len {seq_len} the student "
                         f"sees {ws} keys back (sliding_window={s.sliding_window}), the teacher {wt} "
                         f"(sliding_window={t.sliding_window}); a key the teacher sees and the student cannot "
                         f"makes the KL infinite; set loss.attn_weight=0 or data.seq_len <= {min(ws, wt)}")


def _log_attention(q_BHTD, k_BGTD, mask_B1TT):
    """log softmax(q kᵀ / sqrt(Dh)) in fp32 over allowed keys; -inf elsewhere."""
    H, G = q_BHTD.shape[1], k_BGTD.shape[1]
    k_BHTD = k_BGTD.repeat_interleave(H // G, dim=1) if G != H else k_BGTD
    scores_BHTT = (q_BHTD.float() @ k_BHTD.float().transpose(-1, -2)) / math.sqrt(q_BHTD.shape[-1])
    return scores_BHTT.masked_fill(~mask_B1TT, float("-inf")).log_softmax(-1)


def _layer_kl_sum(q_s, k_s, q_t, k_t, mask_s, mask_t, rows_BT):
    """Σ over heads and loss rows of KL(A_T || A_S) for one layer (a checkpointed unit)."""
    logp_s = _log_attention(q_s, k_s, mask_s)
    logp_t = _log_attention(q_t, k_t, mask_t)
    # Masked keys: both log-probs are -inf and their difference NaN; `where` zeroes it (and its gradient).
    kl_BHT = (logp_t.exp() * torch.where(mask_t, logp_t - logp_s, 0.0)).sum(-1)
    return (kl_BHT * rows_BT[:, None, :]).sum()


def attention_kl_sum(student_qk: list, teacher_qk: list, student_args, teacher_args, labels_BT,
                     doc_ids_BT=None) -> torch.Tensor:
    """Σ over layers, heads and loss rows (labels != -100) of KL(A_T || A_S); differentiable w.r.t. the student's
    q and k. Divide by (loss rows x layers x heads) for the mean; the trainer divides by the optimizer step's
    global loss-token count instead, like the other terms."""
    L = student_args.n_layers
    if len(student_qk) != L or len(teacher_qk) != L:
        raise ValueError(f"attention transfer: captured {len(student_qk)} student and {len(teacher_qk)} teacher "
                         f"layers for {L}-layer models; each model must run exactly one forward under capture_qk")
    B, H, T, _ = student_qk[0][0].shape
    if teacher_qk[0][0].shape[:3] != (B, H, T):
        raise ValueError(f"attention transfer: student queries {(B, H, T)} vs teacher "
                         f"{tuple(teacher_qk[0][0].shape[:3])} (batch, heads, tokens); the teacher must run on "
                         f"exactly the student's rows")
    check_compatible(student_args, teacher_args, T)
    dev = student_qk[0][0].device
    doc_BT = doc_ids_BT.to(dev) if doc_ids_BT is not None else torch.zeros(B, T, dtype=torch.long, device=dev)
    idx_T = torch.arange(T, device=dev)
    mask_s = attention_mask(doc_BT, doc_BT, idx_T, idx_T, effective_window(student_args.sliding_window, T))
    mask_t = mask_s  # the same effective window (check_compatible)
    rows_BT = (labels_BT.to(dev) != -100).float()
    total = torch.zeros((), device=dev)
    for (q_s, k_s), (q_t, k_t) in zip(student_qk, teacher_qk):
        q_t, k_t = q_t.detach().to(dev), k_t.detach().to(dev)
        total = total + checkpoint(_layer_kl_sum, q_s, k_s, q_t, k_t, mask_s, mask_t, rows_BT, use_reentrant=False)
    return total
