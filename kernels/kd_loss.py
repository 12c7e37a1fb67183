"""The LM head fused with cross-entropy and top-k knowledge distillation, chunked over tokens, next to a naive
full-logits twin `linear_topk_kd_loss_ref` with the same signature and outputs.

Dimensions: N tokens (batch x sequence, flattened), D hidden, V vocabulary, K teacher top-k, C tokens per chunk.

What all three paths compute, with z_NV = h_ND W_VDᵀ and m_i = [y_i != -100]:
    CE_i = -log softmax(z_i)[y_i]                                    (labels are already the next tokens)
    p_i  = softmax over the K slots of L_i / τ                       (teacher top-k logprobs re-tempered)
    KD_i = τ² Σ_k p_ik (log p_ik - log softmax(z_i / τ)[I_ik])
    loss = Σ_i m_i ((1 - λ) CE_i + λ KD_i) / n                       n = `normalizer`, a device tensor
Returned: KDLossOutput(loss, ce_sum = Σ m_i CE_i, kd_sum = Σ m_i KD_i); gradients for h and W only.

Teacher distribution and its tail. L = z_T - logsumexp(z_T) at the teacher's temperature 1, so L/τ differs from
z_T/τ by a per-row constant and a softmax of L/τ over the K slots is exactly the teacher's tempered
distribution softmax(z_T / τ) *conditioned on the top-k set*. The tail mass (1 - Σ_k exp L_k, the teacher's
probability outside its top k) is dropped by this renormalisation: the student is pulled towards the teacher's
ranking inside the top k, and towards pushing the rest of its own mass into the top k, with no target for
how the tail is shared. With K = V this is the full KL(softmax(z_T/τ) || softmax(z_S/τ)) times τ²; with K = 1
and L = 0 it is τ² (-log softmax(z/τ)[I]), i.e. CE when τ = 1 and I = y (both tested). No other tail
handling is offered: a "tail bucket" at τ != 1 would need the teacher's tempered tail, which a top-k store
cannot give. How much is dropped depends on the teacher: a confident teacher at τ = 1 leaves little outside
K = 64; at τ > 1 the tempered tail grows and is ignored.

Schedule (Liger-Kernel's fused linear cross-entropy, extended by the KD term). For each chunk of C tokens:
    z_CV  = h_CD W_VDᵀ                       one matmul
    per row: LSE(z), LSE(z/τ), CE, KD, and dz_CV = dloss/dz written over z in place
    dh_CD = dz_CV W_VD ; dW_VD += dz_CVᵀ h_CD   two matmuls, dW accumulated in fp32
so extra memory is one C x V chunk (plus dh and the fp32 dW, which any backward needs), never N x V, and the
backward only scales the stored dh and dW by dloss (one elementwise pass over N·D + V·D elements).
Budget at N=16384, D=4096, V=32000 in bf16 (arithmetic; not yet measured on a GPU): the 2048-token logits
chunk 131 MB + fp32 dW 524 MB + dh 134 MB, and at the end of the forward dW cast to bf16 (262 MB) while the
fp32 copy is alive: ~0.92 GB beyond the inputs, of which 0.39 GB are the gradients themselves.
With dloss/dz_ij = (1/n) [(1-λ)(softmax(z_i)_j - [j = y_i]) + λ τ (softmax(z_i/τ)_j - P_ij)], where
P_ij = Σ_k p_ik [I_ik = j] is the teacher's mass on token j (duplicate ids add up).

Three paths share the chunk loop:
- `linear_topk_kd_loss` (the Triton path): matmuls are torch.matmul (cuBLAS) on the chunk in the input dtype;
  the per-row work is one Triton kernel `_kd_loss_rows_kernel`. Why cuBLAS and not a fused matmul+loss: the
  three GEMMs are ~99 % of the FLOPs (6·N·D·V = 12.9 TFLOP at N=16384, D=4096, V=32000, vs ~50 flop per logit
  for the loss), cuBLAS runs them near peak, and the loss kernel reads the bf16 chunk twice and writes it
  once (3 x 2 B x C x V: 0.4 GB per C=2048 chunk, ~0.1 ms at 4 TB/s against ~2 ms of GEMMs). A GEMM with the
  online-softmax epilogue fused would save that ~5 % but needs a second GEMM pass (or a stored chunk) for
  the gradient, since the LSE is known only after all of V: left as the stretch.
  Logits live in the input dtype (bf16 on GPU, as Liger and HF do); the kernel upcasts to fp32 for the LSEs
  and sums, and writes dz back in the input dtype for the bf16 backward GEMMs.
- `linear_topk_kd_loss_chunked`: the same loop in plain torch with fp32 logits, for CPU (the trainer's path
  there) and as a readable statement of the kernel.
- `linear_topk_kd_loss_ref`: fp32 full logits, autograd; the oracle. Memory ~4 x N x V x 4 bytes.

Host synchronisation: none in the hot path. The normaliser is a device tensor (default: the loss tokens in
this call, clamped to >= 1, computed on device). Checking that ids and labels lie in [0, V) needs their values
on the host: `check_ids=True` (default) does that one sync per call and raises ValueError; the trainer's hot
loop passes `check_ids=False` once its teacher signal has been validated (store written by us, or an online
teacher whose vocabulary size was checked via `teacher_vocab_size=`). Out-of-range ids with `check_ids=False`
are undefined behaviour (out-of-bounds reads in the kernel, an index error in torch).
"""
import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton wheel for this platform: the torch paths still work
    triton = None

    class tl:  # noqa: N801 - only so that the kernel's `tl.constexpr` annotations evaluate; never launched
        constexpr = None

IGNORE_INDEX = -100


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


class KDLossOutput(NamedTuple):
    loss: Tensor    # fp32 scalar, differentiable wrt hidden and weight
    ce_sum: Tensor  # fp32 scalar, detached: Σ_i m_i CE_i (for logging; divide by the token count yourself)
    kd_sum: Tensor  # fp32 scalar, detached: Σ_i m_i KD_i


# ------------------------------------------------------------------------------------------------ input checks

def _check_inputs(hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight,
                  normalizer, teacher_vocab_size, check_ids):
    """ValueError naming the value and the fix. Host syncs only when check_ids=True (values of ids/labels)."""
    if hidden_ND.dim() != 2:
        raise ValueError(f"hidden_ND must be 2-D [N, D], got shape {tuple(hidden_ND.shape)}; "
                         "flatten batch and sequence first: hidden.reshape(-1, D)")
    if weight_VD.dim() != 2:
        raise ValueError(f"weight_VD must be 2-D [V, D] (the LM head's nn.Linear.weight), got shape "
                         f"{tuple(weight_VD.shape)}")
    N, D = hidden_ND.shape
    V = weight_VD.shape[0]
    if weight_VD.shape[1] != D:
        raise ValueError(f"weight_VD is [V={V}, {weight_VD.shape[1]}] but hidden_ND has D={D}; pass the LM head "
                         "weight as [V, D] (nn.Linear(D, V).weight), not transposed")
    if not (hidden_ND.is_floating_point() and weight_VD.is_floating_point()):
        raise ValueError(f"hidden_ND ({hidden_ND.dtype}) and weight_VD ({weight_VD.dtype}) must be float tensors")
    if hidden_ND.dtype != weight_VD.dtype:
        raise ValueError(f"hidden_ND is {hidden_ND.dtype} but weight_VD is {weight_VD.dtype}; cast both to one "
                         "dtype (bf16 on GPU, fp32 on CPU)")
    if labels_N.shape != (N,):
        raise ValueError(f"labels_N must be [N={N}] (one next-token label per hidden row), got shape "
                         f"{tuple(labels_N.shape)}; flatten it with labels.reshape(-1)")
    if labels_N.is_floating_point() or labels_N.dtype == torch.bool:
        raise ValueError(f"labels_N must be an integer tensor, got {labels_N.dtype}")
    if teacher_ids_NK.dim() != 2 or teacher_ids_NK.shape[0] != N:
        raise ValueError(f"teacher_ids_NK must be [N={N}, K], got shape {tuple(teacher_ids_NK.shape)}")
    K = teacher_ids_NK.shape[1]
    if teacher_logprobs_NK.shape != teacher_ids_NK.shape:
        raise ValueError(f"teacher_logprobs_NK has shape {tuple(teacher_logprobs_NK.shape)} but teacher_ids_NK "
                         f"has {tuple(teacher_ids_NK.shape)}; both hold the same K top-k slots per token")
    if teacher_ids_NK.is_floating_point() or teacher_ids_NK.dtype == torch.bool:
        raise ValueError(f"teacher_ids_NK must be an integer tensor, got {teacher_ids_NK.dtype}")
    if not teacher_logprobs_NK.is_floating_point():
        raise ValueError(f"teacher_logprobs_NK must be a float tensor, got {teacher_logprobs_NK.dtype}")
    if K > V:
        raise ValueError(f"teacher top-k K={K} exceeds the vocabulary V={V}; keep at most V ids per token")
    if isinstance(tau, Tensor) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau={tau!r} must be a finite Python number > 0 (the distillation temperature)")
    if isinstance(kd_weight, Tensor) or not isinstance(kd_weight, (int, float)) or not 0 <= kd_weight <= 1:
        raise ValueError(f"kd_weight={kd_weight!r} (λ) must be a Python number in [0, 1]: "
                         "loss = (1-λ)·CE + λ·KD")
    if K == 0 and kd_weight != 0:
        raise ValueError(f"teacher tensors have K=0 slots but kd_weight={kd_weight}; an empty teacher is plain "
                         "CE: pass kd_weight=0.0, or give the teacher's top-k")
    if teacher_vocab_size is not None and teacher_vocab_size != V:
        raise ValueError(f"teacher vocabulary size {teacher_vocab_size} differs from the student's V={V}: "
                         "top-k ids index the student's vocabulary, so teacher and student must share one "
                         "tokenizer and vocabulary (no resize, no padding rows)")
    devices = {t.device for t in (hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK)}
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must hold one number (the loss-token count of the optimizer step), "
                             f"got shape {tuple(normalizer.shape)}")
        devices.add(normalizer.device)
    elif normalizer is not None and not isinstance(normalizer, (int, float)):
        raise ValueError(f"normalizer={normalizer!r} must be a 1-element tensor, a number, or None")
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if check_ids:
        # Host sync (one, for both checks): the only one in this module; pass check_ids=False in hot loops.
        mask_N = labels_N != IGNORE_INDEX
        bad_label_N = mask_N & ((labels_N < 0) | (labels_N >= V))
        bad_ids_NK = mask_N[:, None] & ((teacher_ids_NK < 0) | (teacher_ids_NK >= V))
        if bool(bad_label_N.any() | bad_ids_NK.any()):
            if bad_label_N.any():
                i = int(bad_label_N.nonzero()[0, 0])
                raise ValueError(f"labels_N[{i}]={int(labels_N[i])} is outside [0, V={V}) and is not {IGNORE_INDEX}; "
                                 f"labels must be student token ids or {IGNORE_INDEX} (no loss)")
            i, k = (int(x) for x in bad_ids_NK.nonzero()[0])
            raise ValueError(f"teacher_ids_NK[{i}, {k}]={int(teacher_ids_NK[i, k])} is outside [0, V={V}) at a loss "
                             "position; the teacher's vocabulary must be the student's (check the store or the "
                             "teacher's tokenizer; pass teacher_vocab_size= to compare sizes)")
    return N, D, V, K


def _normalizer(labels_N, normalizer):
    """The divisor n as a 0-d fp32 device tensor, without a host sync."""
    if normalizer is None:
        return (labels_N != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    if isinstance(normalizer, Tensor):
        return normalizer.detach().reshape(()).to(device=labels_N.device, dtype=torch.float32)
    return torch.tensor(float(normalizer), dtype=torch.float32, device=labels_N.device)


# -------------------------------------------------------------------------------------------------- reference

def linear_topk_kd_loss_ref(hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau=1.0,
                            kd_weight=1.0, normalizer=None, *, teacher_vocab_size=None, check_ids=True,
                            chunk_size=None) -> KDLossOutput:
    """Naive oracle: full N x V fp32 logits, autograd for the gradients. `chunk_size` is accepted and ignored."""
    N, D, V, K = _check_inputs(hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau,
                               kd_weight, normalizer, teacher_vocab_size, check_ids)
    n = _normalizer(labels_N, normalizer)
    z_NV = hidden_ND.float() @ weight_VD.float().T
    return loss_from_logits_ref(z_NV, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight, n)


def loss_from_logits_ref(z_NV, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight, n) -> KDLossOutput:
    """The reference's loss on given logits (fp32 math whatever z_NV's dtype): also the bf16 torch baseline of
    the GPU tests, fed logits from a bf16 matmul."""
    z_NV = z_NV.float()
    mask_N = labels_N != IGNORE_INDEX
    y_N = torch.where(mask_N, labels_N, 0).long()
    ids_NK = torch.where(mask_N[:, None], teacher_ids_NK, 0).long()  # ignored rows may hold any id: never read
    ce_N = -torch.log_softmax(z_NV, dim=-1).gather(1, y_N[:, None]).squeeze(1)
    logq_NV = torch.log_softmax(z_NV / tau, dim=-1)
    logp_NK = torch.log_softmax(teacher_logprobs_NK.detach().float() / tau, dim=-1)
    p_NK = logp_NK.exp()
    # p = 0 slots (teacher logprob -inf) add nothing; the where keeps 0 * -inf out of the sum
    log_ratio_NK = torch.where(p_NK > 0, logp_NK - logq_NV.gather(1, ids_NK), 0.0)
    kd_N = tau * tau * (p_NK * log_ratio_NK).sum(-1)
    ce_sum = torch.where(mask_N, ce_N, 0.0).sum()
    kd_sum = torch.where(mask_N, kd_N, 0.0).sum()
    loss = ((1.0 - kd_weight) * ce_sum + kd_weight * kd_sum) / n
    return KDLossOutput(loss, ce_sum.detach(), kd_sum.detach())


# ------------------------------------------------------------------------------------------------------ kernel

@_jit
def _kd_loss_rows_kernel(
    logits_ptr, stride_logits,       # [C, V] logits in, dloss/dlogits out (in place), input dtype
    labels_ptr,                      # [C] int
    ids_ptr, stride_ids,             # [C, K] int
    lp_ptr, stride_lp,               # [C, K] float: teacher logprobs at temperature 1
    scratch_ptr,                     # [C, K] fp32: final dlogits at the teacher's ids (see step 5)
    ce_ptr, kd_ptr,                  # [C] fp32 out: CE_i, KD_i (0 on ignored rows)
    norm_ptr,                        # [] fp32: the normaliser n
    V, K, tau, inv_tau, ce_weight, kd_weight,
    IGNORE: tl.constexpr, TAU_IS_ONE: tl.constexpr, HAS_TEACHER: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per token row. Loads are fp32-upcast; every sum and LSE is fp32."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits
    ids_ptr += row * stride_ids
    lp_ptr += row * stride_lp
    scratch_ptr += row * K
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    y = tl.load(labels_ptr + row)
    if y != IGNORE:
        # 1. Online log-sum-exp over V of z and of z/τ, one read of the row.
        m = float("-inf")
        s = 0.0
        mt = float("-inf")
        st = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs_v
            z = tl.load(logits_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
            if not TAU_IS_ONE:
                zt = z * inv_tau
                mt_new = tl.maximum(mt, tl.max(zt, 0))
                st = st * tl.exp(mt - mt_new) + tl.sum(tl.exp(zt - mt_new), 0)
                mt = mt_new
        lse = m + tl.log(s)
        if TAU_IS_ONE:
            lse_t = lse
        else:
            lse_t = mt + tl.log(st)
        ce = lse - tl.load(logits_ptr + y).to(tl.float32)
        kd = 0.0
        if COMPUTE_GRAD:
            n = tl.load(norm_ptr).to(tl.float32)
            a = ce_weight / n          # weight of the CE gradient softmax(z) - onehot(y)
            b = kd_weight * tau / n    # weight of the KD gradient softmax(z/τ) - P
        if HAS_TEACHER:
            # 2. log Σ_k exp(L_k/τ): the teacher's log-normaliser over its K slots.
            lm = float("-inf")
            ls = 0.0
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                lt = tl.load(lp_ptr + kk, mask=kk < K, other=float("-inf")).to(tl.float32) * inv_tau
                lm_new = tl.maximum(lm, tl.max(lt, 0))
                ls = ls * tl.exp(lm - lm_new) + tl.sum(tl.exp(lt - lm_new), 0)
                lm = lm_new
            lse_p = lm + tl.log(ls)
            # 3. Gather z at the K ids: Σ p log p and Σ p z_I give KD = τ² (Σ p log p - Σ p z_I / τ + LSE(z/τ)).
            plogp = 0.0
            pz = 0.0
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                kmask = kk < K
                logp = tl.load(lp_ptr + kk, mask=kmask, other=float("-inf")).to(tl.float32) * inv_tau - lse_p
                p = tl.exp(logp)
                ids = tl.load(ids_ptr + kk, mask=kmask, other=0)
                z_i = tl.load(logits_ptr + ids, mask=kmask, other=0.0).to(tl.float32)
                plogp += tl.sum(p * tl.where(p > 0, logp, 0.0), 0)  # 0 · log 0 = 0
                pz += tl.sum(p * z_i, 0)
                if COMPUTE_GRAD:
                    # P at each slot's id, summed over all slots holding that id (O(K²) compares: 4096 per
                    # row at K=64, against ~10 flops x V=32000 per row in the V passes). With it, slots that
                    # share an id compute the same final value, so their racing stores in step 5 agree.
                    P = tl.zeros([BLOCK_K], dtype=tl.float32)
                    for k1 in range(0, K, BLOCK_K):
                        kk1 = k1 + offs_k
                        ids1 = tl.load(ids_ptr + kk1, mask=kk1 < K, other=-1)
                        lp1 = tl.load(lp_ptr + kk1, mask=kk1 < K, other=float("-inf")).to(tl.float32)
                        p1 = tl.exp(lp1 * inv_tau - lse_p)
                        P += tl.sum(tl.where(ids[:, None] == ids1[None, :], p1[None, :], 0.0), 1)
                    g = a * tl.exp(z_i - lse) - tl.where(ids == y, a, 0.0)
                    if TAU_IS_ONE:
                        g += b * (tl.exp(z_i - lse) - P)
                    else:
                        g += b * (tl.exp(z_i * inv_tau - lse_t) - P)
                    tl.store(scratch_ptr + kk, g, mask=kmask)
            kd = tau * tau * (plogp - inv_tau * pz + lse_t)
        tl.store(ce_ptr + row, ce)
        tl.store(kd_ptr + row, kd)
        if COMPUTE_GRAD:
            # Every warp's reads of z (steps 1-3) must land before any warp overwrites the row.
            tl.debug_barrier()
            # 4. Dense gradient over V, written over z: a·softmax(z) + b·softmax(z/τ), minus a at y.
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs_v
                z = tl.load(logits_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                if TAU_IS_ONE:
                    g = (a + b) * tl.exp(z - lse)
                else:
                    g = a * tl.exp(z - lse) + b * tl.exp(z * inv_tau - lse_t)
                g = tl.where(cols == y, g - a, g)
                tl.store(logits_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)
            if HAS_TEACHER:
                # 5. Overwrite the K teacher ids with their final values from step 3 (which include -b·P and,
                #    where an id is y, -a), after step 4's stores.
                tl.debug_barrier()
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + offs_k
                    ids = tl.load(ids_ptr + kk, mask=kk < K, other=0)
                    g = tl.load(scratch_ptr + kk, mask=kk < K, other=0.0)
                    tl.store(logits_ptr + ids, g.to(logits_ptr.dtype.element_ty), mask=kk < K)
    else:
        tl.store(ce_ptr + row, 0.0)
        tl.store(kd_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs_v
                tl.store(logits_ptr + cols, tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty), mask=cols < V)


def _rows_triton(logits_CV, labels_C, ids_CK, lp_CK, ce_C, kd_C, n, tau, kd_weight, compute_grad):
    """Launch `_kd_loss_rows_kernel` on one chunk: CE/KD per row into ce_C/kd_C, dlogits over logits_CV."""
    C, V = logits_CV.shape
    K = ids_CK.shape[1]
    scratch_CK = torch.empty((C, K), dtype=torch.float32, device=logits_CV.device) if compute_grad and K else ce_C
    if K == 0:  # never read (HAS_TEACHER=False); an empty tensor may have a null data pointer, which Triton refuses
        ids_CK = lp_CK = ce_C[:, None]
    # BLOCK_V = 4096 logits per step: 16 fp32 values per thread at 8 warps, two online LSEs in registers;
    # V=32000 is 8 steps per pass. BLOCK_K = 64 holds the usual top-k in one step; the K x K id compare is
    # then a 64 x 64 tile (16 values per thread).
    block_v = min(4096, triton.next_power_of_2(V))
    block_k = min(64, triton.next_power_of_2(max(K, 1)))
    _kd_loss_rows_kernel[(C,)](
        logits_CV, logits_CV.stride(0), labels_C, ids_CK, ids_CK.stride(0), lp_CK, lp_CK.stride(0), scratch_CK,
        ce_C, kd_C, n, V, K, float(tau), 1.0 / tau, 1.0 - kd_weight, float(kd_weight),
        IGNORE=IGNORE_INDEX, TAU_IS_ONE=tau == 1.0, HAS_TEACHER=K > 0, COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v, BLOCK_K=block_k, num_warps=8,
    )


def _rows_torch(z_CV, labels_C, ids_CK, lp_CK, ce_C, kd_C, n, tau, kd_weight, compute_grad):
    """The kernel's per-row work in torch ops on fp32 logits; at most ~3 C x V buffers live at once."""
    mask_C = labels_C != IGNORE_INDEX
    y_C = torch.where(mask_C, labels_C, 0).long()
    ids_CK = torch.where(mask_C[:, None], ids_CK, 0).long()  # ignored rows may hold any id: never read
    lse_C = torch.logsumexp(z_CV, dim=1)
    zt_CV = z_CV if tau == 1.0 else z_CV * (1.0 / tau)
    lse_t_C = lse_C if tau == 1.0 else torch.logsumexp(zt_CV, dim=1)
    ce_C.copy_(torch.where(mask_C, lse_C - z_CV.gather(1, y_C[:, None]).squeeze(1), 0.0))
    logp_CK = torch.log_softmax(lp_CK.float() / tau, dim=1)
    p_CK = torch.where(mask_C[:, None], logp_CK.exp(), 0.0)
    if ids_CK.shape[1]:
        plogp_C = (p_CK * torch.where(p_CK > 0, logp_CK, 0.0)).sum(1)  # 0 · log 0 = 0
        pz_C = (p_CK * z_CV.gather(1, ids_CK)).sum(1)
        kd_C.copy_(torch.where(mask_C, tau * tau * (plogp_C - pz_C / tau + lse_t_C), 0.0))
    else:  # no teacher (K = 0, λ = 0): plain CE
        kd_C.zero_()
    if not compute_grad:
        return
    zero = torch.zeros((), dtype=torch.float32, device=z_CV.device)
    a_C = torch.where(mask_C, (1.0 - kd_weight) / n, zero)
    b_C = torch.where(mask_C, kd_weight * tau / n, zero)
    # dz = a (softmax(z) - onehot(y)) + b (softmax(z/τ) - P), built in z's buffer.
    if tau == 1.0:
        z_CV.sub_(lse_C[:, None]).exp_().mul_((a_C + b_C)[:, None])
    else:
        q_CV = zt_CV.sub_(lse_t_C[:, None]).exp_().mul_(b_C[:, None])
        z_CV.sub_(lse_C[:, None]).exp_().mul_(a_C[:, None]).add_(q_CV)
        del q_CV
    z_CV.scatter_add_(1, y_C[:, None], -a_C[:, None])
    z_CV.scatter_add_(1, ids_CK, -(b_C[:, None] * p_CK))  # scatter_add: duplicate ids add up


# ------------------------------------------------------------------------------------------- chunk loop (fwd)

def _chunk_size(N, D, V):
    """Tokens per chunk. Rule: the chunk's logits are no larger than the weight itself (C <= D, so C·V <= V·D:
    the loss's extra memory is O(weight), independent of N) and at most 2^26 logits (128 MiB in bf16), at least
    128 rows (GEMM efficiency: a C x D x V matmul reads V·D weights for 2·C·D·V flops, so C >= ~128..1024
    keeps it compute-bound). Mistral-7B, D=4096, V=32000: min(4096, 2^26/32000 -> 2048) = 2048 rows,
    131 MB of bf16 logits, 8 chunks at N=16384. CPU test shape D=256: 256 rows, 33 MB of fp32 logits."""
    pow2_floor = lambda x: 1 << (max(int(x), 1).bit_length() - 1)  # noqa: E731
    C = min(pow2_floor(D), pow2_floor((1 << 26) // V))
    return max(1, min(max(C, 128), N))


_ADDMM_OUT_DTYPE_OK = True  # flips to False the first time torch refuses addmm(out_dtype=fp32) on fp32 `self`


def _addmm_fp32_(acc_VD, a_VC, b_CD):
    """acc += a @ b with fp32 accumulation across chunks. bf16/fp16 on CUDA: cuBLAS writing fp32 with beta=1
    (torch >= 2.8 `addmm(out_dtype=)`; Liger-Kernel uses the same call), so each chunk adds its fp32 partial
    product with no V x D temporary and no bf16 rounding. Older torch (or a CUDA build whose addmm.dtype_out
    insists that `self` be bf16): the partial product is rounded to bf16 once per chunk, through a V x D temp."""
    global _ADDMM_OUT_DTYPE_OK
    if a_VC.dtype == acc_VD.dtype:
        acc_VD.addmm_(a_VC, b_CD)
        return
    if _ADDMM_OUT_DTYPE_OK and acc_VD.is_cuda:
        try:
            torch.addmm(acc_VD, a_VC, b_CD, out_dtype=torch.float32, out=acc_VD)
            return
        except (TypeError, RuntimeError, NotImplementedError):  # raised at dispatch, before any work
            _ADDMM_OUT_DTYPE_OK = False
    acc_VD.add_(torch.mm(a_VC, b_CD))


def linear_topk_kd_fwd(hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight, n,
                       chunk_size, use_kernel, need_dh, need_dW):
    """The chunk loop: loss, ce_sum, kd_sum and (when needed) dh, dW for a unit upstream gradient.

    use_kernel: per-row work in Triton and logits in the input dtype; else torch ops on fp32 logits."""
    N, D = hidden_ND.shape
    V = weight_VD.shape[0]
    C = chunk_size or _chunk_size(N, D, V)
    compute_grad = need_dh or need_dW
    dev = hidden_ND.device
    # Kernel path: GEMMs in the input dtype (bf16 tensor cores). Torch path: fp32 throughout; the fp32 copy
    # of W (V·D·4 bytes) exists only when W is not fp32 already.
    dtype = hidden_ND.dtype if use_kernel else torch.float32
    W_VD = weight_VD.contiguous().to(dtype)
    h_ND = hidden_ND.contiguous()
    lp_NK = teacher_logprobs_NK.detach()
    ce_N = torch.empty(N, dtype=torch.float32, device=dev)
    kd_N = torch.empty(N, dtype=torch.float32, device=dev)
    dh_ND = torch.empty_like(h_ND) if need_dh else None
    dW_VD = torch.zeros((V, D), dtype=torch.float32, device=dev) if need_dW else None
    logits_buf = torch.empty((min(C, N), V), dtype=dtype, device=dev)
    rows = _rows_triton if use_kernel else _rows_torch
    z_CV = None
    for c0 in range(0, N, C):
        c1 = min(c0 + C, N)
        h_CD = h_ND[c0:c1].to(dtype)
        z_CV = torch.mm(h_CD, W_VD.T, out=logits_buf[: c1 - c0])
        rows(z_CV, labels_N[c0:c1], teacher_ids_NK[c0:c1], lp_NK[c0:c1], ce_N[c0:c1], kd_N[c0:c1], n, tau,
             kd_weight, compute_grad)
        if need_dh:  # z_CV now holds dloss/dz
            if dh_ND.dtype == dtype:
                torch.mm(z_CV, W_VD, out=dh_ND[c0:c1])
            else:  # torch path on bf16 inputs: fp32 product, rounded once into dh
                dh_ND[c0:c1] = z_CV @ W_VD
        if need_dW:
            _addmm_fp32_(dW_VD, z_CV.T, h_CD)
    del logits_buf, z_CV
    ce_sum, kd_sum = ce_N.sum(), kd_N.sum()
    loss = ((1.0 - kd_weight) * ce_sum + kd_weight * kd_sum) / n
    if need_dW:
        dW_VD = dW_VD.to(weight_VD.dtype)
    return loss, ce_sum, kd_sum, dh_ND, dW_VD


def linear_topk_kd_bwd(dh_ND, dW_VD, grad_loss):
    """Scale the forward's dh and dW by the upstream gradient, in place (no N x D or V x D copy)."""
    if dh_ND is not None:
        dh_ND.mul_(grad_loss.to(dh_ND.dtype))
    if dW_VD is not None:
        dW_VD.mul_(grad_loss.to(dW_VD.dtype))
    return dh_ND, dW_VD


class LinearTopkKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight, n,
                chunk_size, use_kernel, grad_enabled):
        # needs_input_grad follows requires_grad even under torch.no_grad, where no backward can run; the
        # caller's grad mode (forward itself always runs with grad off) says whether dh and dW are wanted.
        loss, ce_sum, kd_sum, dh_ND, dW_VD = linear_topk_kd_fwd(
            hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight, n, chunk_size,
            use_kernel, need_dh=grad_enabled and ctx.needs_input_grad[0],
            need_dW=grad_enabled and ctx.needs_input_grad[1])
        ctx.save_for_backward(dh_ND, dW_VD)
        ctx.consumed = False
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        if ctx.consumed:
            raise RuntimeError("linear_topk_kd_loss: backward ran twice on one forward; the stored gradients are "
                               "scaled in place, so retain_graph=True is not supported: call the loss again")
        ctx.consumed = True
        dh_ND, dW_VD = linear_topk_kd_bwd(*ctx.saved_tensors, grad_loss)
        return dh_ND, dW_VD, None, None, None, None, None, None, None, None, None


def _apply(use_kernel, hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight,
           normalizer, teacher_vocab_size, check_ids, chunk_size):
    _check_inputs(hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight,
                  normalizer, teacher_vocab_size, check_ids)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (tokens per chunk) or None (auto)")
    n = _normalizer(labels_N, normalizer)
    loss, ce_sum, kd_sum = LinearTopkKDFunction.apply(
        hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, float(tau), float(kd_weight), n,
        chunk_size, use_kernel, torch.is_grad_enabled())
    return KDLossOutput(loss, ce_sum, kd_sum)


# ------------------------------------------------------------------------------------------- public functions

def linear_topk_kd_loss(hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau=1.0,
                        kd_weight=1.0, normalizer=None, *, teacher_vocab_size=None, check_ids=True,
                        chunk_size=None) -> KDLossOutput:
    """LM head + CE + top-k KD, chunked over tokens (see the module docstring). The path is picked here, from
    the tensors' device and DISTILL_KERNELS (kernels.use_triton): per-row work in Triton on CUDA, the same chunk
    loop in torch (`linear_topk_kd_loss_chunked`) on the CPU.

    hidden_ND, weight_VD: bf16 (GPU) or fp32; labels_N: next-token ids, -100 = no loss; teacher_ids_NK,
    teacher_logprobs_NK: the teacher's top-k at temperature 1 (rows at -100 positions are ignored); tau: τ > 0;
    kd_weight: λ in [0, 1]; normalizer: device tensor n (default: this call's loss-token count, >= 1);
    teacher_vocab_size: checked against V if given; check_ids: validate ids/labels in [0, V) (one host sync;
    pass False in hot loops); chunk_size: tokens per chunk (default `_chunk_size`). K = 0 with kd_weight = 0
    is plain CE. Gradients flow to hidden_ND and weight_VD only."""
    from kernels import use_triton
    use_kernel = use_triton(hidden_ND)
    if use_kernel and triton is None:
        raise ImportError("DISTILL_KERNELS=triton but Triton is not installed: pip install triton, or unset "
                          "DISTILL_KERNELS to use the torch path")
    if use_kernel and not hidden_ND.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("DISTILL_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "imported (the interpreter); unset DISTILL_KERNELS to use the torch path on the CPU")
    return _apply(use_kernel, hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight,
                  normalizer, teacher_vocab_size, check_ids, chunk_size)


def linear_topk_kd_loss_chunked(hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau=1.0,
                                kd_weight=1.0, normalizer=None, *, teacher_vocab_size=None, check_ids=True,
                                chunk_size=None) -> KDLossOutput:
    """The same loss and chunk loop in plain torch with fp32 logits: the CPU path, same memory behaviour."""
    return _apply(False, hidden_ND, weight_VD, labels_N, teacher_ids_NK, teacher_logprobs_NK, tau, kd_weight,
                  normalizer, teacher_vocab_size, check_ids, chunk_size)
