"""Attention transfer (the paper's optional phase-1 term): KL between teacher and student attention rows.

    L_attn = mean over layers l, heads h and loss-token query rows t of  KL( A_T[l, h, t, :] || A_S[l, h, t, :] )

A = softmax(q kᵀ / sqrt(Dh)) under each model's own mask (causal, same packed document, its sliding window),
rebuilt from the post-rotary (q, k) that `model.capture_qk` collects. Teacher and student need the same
number of layers and query heads (head widths and KV-head counts may differ: maps are T x T either way).

Memory: one layer at a time. Each layer's term runs under `torch.utils.checkpoint`, so its B x H x T x T
maps (a few fp32 copies: scores, log-probs of both models) exist only while that layer's term is computed,
in the forward and again in the backward: peak is one layer's maps instead of L layers'. At B=1, H=32,
T=4096 one fp32 map is 2 GiB, so long sequences want the per-head loop below the layer (not done: the
paper's students are trained at T <= 2048 with this term).

Dimensions: B batch, H query heads, G key/value heads, T tokens (queries and keys), Dh head width, L layers.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from model.model import attention_mask


def check_compatible(student_args, teacher_args) -> None:
    """ValueError unless the two models' attention maps can be compared one to one."""
    s, t = student_args, teacher_args
    if (s.n_layers, s.n_heads) != (t.n_layers, t.n_heads):
        raise ValueError(f"attention transfer needs the same layers and heads: student has {s.n_layers} layers x "
                         f"{s.n_heads} heads, teacher {t.n_layers} x {t.n_heads}; set loss.attn_weight=0 or "
                         f"use a teacher of the student's shape")
    if s.sliding_window != t.sliding_window:
        raise ValueError(f"attention transfer needs the same attention mask: student sliding_window="
                         f"{s.sliding_window}, teacher {t.sliding_window} (a key the teacher sees and the student "
                         f"cannot makes the KL infinite); set loss.attn_weight=0")


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
    check_compatible(student_args, teacher_args)
    L = student_args.n_layers
    if len(student_qk) != L or len(teacher_qk) != L:
        raise ValueError(f"attention transfer: captured {len(student_qk)} student and {len(teacher_qk)} teacher "
                         f"layers for {L}-layer models; each model must run exactly one forward under capture_qk")
    B, H, T, _ = student_qk[0][0].shape
    if teacher_qk[0][0].shape[:3] != (B, H, T):
        raise ValueError(f"attention transfer: student queries {(B, H, T)} vs teacher "
                         f"{tuple(teacher_qk[0][0].shape[:3])} (batch, heads, tokens); the teacher must run on "
                         f"exactly the student's rows")
    dev = student_qk[0][0].device
    doc_BT = doc_ids_BT.to(dev) if doc_ids_BT is not None else torch.zeros(B, T, dtype=torch.long, device=dev)
    idx_T = torch.arange(T, device=dev)
    mask_s = attention_mask(doc_BT, doc_BT, idx_T, idx_T, student_args.sliding_window)
    mask_t = mask_s if teacher_args.sliding_window == student_args.sliding_window else \
        attention_mask(doc_BT, doc_BT, idx_T, idx_T, teacher_args.sliding_window)
    rows_BT = (labels_BT.to(dev) != -100).float()
    total = torch.zeros((), device=dev)
    for (q_s, k_s), (q_t, k_t) in zip(student_qk, teacher_qk):
        q_t, k_t = q_t.detach().to(dev), k_t.detach().to(dev)
        total = total + checkpoint(_layer_kl_sum, q_s, k_s, q_t, k_t, mask_s, mask_t, rows_BT, use_reentrant=False)
    return total
