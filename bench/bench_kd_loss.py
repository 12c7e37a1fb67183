"""LM head + CE + top-k KD microbenchmark: linear_topk_kd_loss against the naive full-logits paths and a chunked
torch.compile'd top-k KD written here in Liger-Kernel's chunked-loss design.

Dimensions: N tokens, D hidden, V vocabulary, K teacher top-k, C tokens per chunk.
On a GPU (N=16384, D=4096, V=32000, K=64, bf16, Mistral-7B's head at 16k tokens): median ms of forward+backward,
useful TFLOP/s (6·N·D·V: one GEMM forward, two backward), peak memory allocated beyond the inputs (this includes
dh and dW, N·D·2 + V·D·2 bytes = 0.39 GB, which every variant must return), and the max relative error of
loss / dh / dW against the fp32 reference on the same bf16 inputs. Variants, each one row:
    ours τ=1 / ours τ=2       linear_topk_kd_loss, λ = 0.5 (τ != 1 adds a second LSE over V)
    ours CE only              linear_topk_kd_loss with K = 0, λ = 0: the price of KD is the difference
    compiled chunked (Liger)  per chunk: torch.func.grad_and_value of (matmul + CE + KD) under torch.compile,
                              dh written, dW accumulated in fp32 (Liger's LigerFusedLinearDistillationBase shape)
    eager full logits bf16    what an HF-style trainer does: bf16 logits, fp32 log-softmaxes, autograd
    ref fp32                  linear_topk_kd_loss_ref: the oracle (fp32 GEMMs, so slow by design)
    liger FLCE (CE only)      Liger-Kernel's fused linear cross-entropy, if `liger_kernel` imports
On a CPU (N=2048, D=256, V=32000, K=64, fp32): time and peak RSS growth of linear_topk_kd_loss_chunked against
the reference, each in a fresh subprocess (peak RSS, VmHWM, is a per-process high-water mark); GPU figures missing.
Timings are reported, never asserted. Usage: .venv/bin/python bench/bench_kd_loss.py
"""
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench._common import peak_rss, reset_peak_rss
from kernels.kd_loss import (_chunk_size, linear_topk_kd_loss, linear_topk_kd_loss_chunked,
                             linear_topk_kd_loss_ref)

GPU_SHAPE = dict(N=16384, D=4096, V=32000, K=64)
CPU_SHAPE = dict(N=1024, D=256, V=32000, K=64)
TAU, LAM = 1.0, 0.5


def make_inputs(N, D, V, K, dtype, device, seed=0):
    """Student h, W with logits of std ~3; a random teacher's true top-k (distinct ids, sorted) at temperature 1;
    about 1/3 of the labels ignored, as for prompt tokens in completion-only training."""
    g = torch.Generator(device=device).manual_seed(seed)
    h_ND = torch.randn(N, D, generator=g, device=device).to(dtype)
    W_VD = (torch.randn(V, D, generator=g, device=device) * (3.0 / D ** 0.5)).to(dtype)
    labels_N = torch.randint(0, V, (N,), generator=g, device=device)
    labels_N[torch.rand(N, generator=g, device=device) < 1 / 3] = -100
    ids_NK = torch.empty(N, K, dtype=torch.long, device=device)
    lp_NK = torch.empty(N, K, dtype=torch.float32, device=device)
    for r0 in range(0, N, 2048):  # teacher logits in slices: an N x V fp32 tensor would be 2 GB on its own
        zt = torch.randn(min(2048, N - r0), V, generator=g, device=device) * 2.0
        lp, ids = torch.log_softmax(zt, -1).topk(K, dim=-1)
        ids_NK[r0:r0 + len(zt)], lp_NK[r0:r0 + len(zt)] = ids, lp
    return h_ND, W_VD, labels_N, ids_NK, lp_NK.to(dtype)


# ------------------------------------------------------------------------ baselines written for this benchmark

def _topk_kd_chunk_loss(h_CD, W_VD, y_C, ids_CK, lp_CK, n, tau, lam):
    """Matmul + CE + top-k KD on one chunk (fp32 softmax math), the function Liger's design compiles."""
    z_CV = (h_CD @ W_VD.T).float()
    mask_C = y_C != -100
    ce_C = -torch.log_softmax(z_CV, -1).gather(1, torch.where(mask_C, y_C, 0)[:, None]).squeeze(1)
    logq_CV = torch.log_softmax(z_CV / tau, -1)
    logp_CK = torch.log_softmax(lp_CK.float() / tau, -1)
    kd_C = tau * tau * (logp_CK.exp() * (logp_CK - logq_CV.gather(1, ids_CK))).sum(-1)
    ce_sum = torch.where(mask_C, ce_C, 0.0).sum()
    kd_sum = torch.where(mask_C, kd_C, 0.0).sum()
    return ((1 - lam) * ce_sum + lam * kd_sum) / n, (ce_sum, kd_sum)


_COMPILED = {}


class _CompiledChunkedKD(torch.autograd.Function):
    """Liger-Kernel's chunked-loss schedule: per chunk, a torch.compile'd grad_and_value of matmul + loss gives
    the chunk's loss, dh and dW in the forward; dW accumulates in fp32; backward scales by dloss."""

    @staticmethod
    def forward(ctx, h_ND, W_VD, y_N, ids_NK, lp_NK, tau, lam):
        key = (tau, lam)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(torch.func.grad_and_value(
                lambda h, W, y, i, lp, n: _topk_kd_chunk_loss(h, W, y, i, lp, n, tau, lam),
                argnums=(0, 1), has_aux=True), dynamic=False)
        step = _COMPILED[key]
        N, D = h_ND.shape
        C = _chunk_size(N, D, W_VD.shape[0])
        n = (y_N != -100).sum().clamp(min=1).float()
        dh_ND = torch.empty_like(h_ND)
        dW_VD = torch.zeros(W_VD.shape, dtype=torch.float32, device=W_VD.device)
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for c0 in range(0, N, C):
            c1 = min(c0 + C, N)
            (dh_CD, dW_c), (loss_c, _) = step(h_ND[c0:c1], W_VD, y_N[c0:c1], ids_NK[c0:c1], lp_NK[c0:c1], n)
            dh_ND[c0:c1] = dh_CD
            dW_VD += dW_c
            loss += loss_c
        ctx.save_for_backward(dh_ND, dW_VD.to(W_VD.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh_ND, dW_VD = ctx.saved_tensors
        return dh_ND * grad_loss, dW_VD * grad_loss, None, None, None, None, None


def compiled_chunked_kd(h_ND, W_VD, y_N, ids_NK, lp_NK, tau, lam):
    return _CompiledChunkedKD.apply(h_ND, W_VD, y_N, ids_NK, lp_NK, tau, lam)


def eager_full_logits(h_ND, W_VD, y_N, ids_NK, lp_NK, tau, lam):
    """HF-style: N x V logits in the input dtype, fp32 log-softmaxes over all of them, autograd."""
    z_NV = (h_ND @ W_VD.T).float()
    mask_N = y_N != -100
    n = mask_N.sum().clamp(min=1)
    ce = F.cross_entropy(z_NV, y_N, ignore_index=-100, reduction="sum")
    logq_NV = torch.log_softmax(z_NV / tau, -1)
    logp_NK = torch.log_softmax(lp_NK.float() / tau, -1)
    kd_N = tau * tau * (logp_NK.exp() * (logp_NK - logq_NV.gather(1, ids_NK))).sum(-1)
    return ((1 - lam) * ce + lam * torch.where(mask_N, kd_N, 0.0).sum()) / n


# ------------------------------------------------------------------------------------------------------- GPU

def _row(name, shape, dtype, ms, extra_mb, err=""):
    N, D, V, K = shape["N"], shape["D"], shape["V"], shape["K"]
    tflops = 6 * N * D * V / (ms * 1e-3) / 1e12 if ms == ms else float("nan")
    print(f"{name:<26} {N:>6} {D:>5} {V:>6} {K:>3} {dtype:>5} {ms:>9.2f} {tflops:>8.3g} {extra_mb:>9.0f}  {err}")


def _header():
    print(f"{'variant':<26} {'N':>6} {'D':>5} {'V':>6} {'K':>3} {'dtype':>5} {'ms f+b':>9} {'TFLOP/s':>8} "
          f"{'extra MB':>9}  max rel err loss / dh / dW vs ref fp32")


def _gpu():
    import triton.testing

    shape = GPU_SHAPE
    N, D, V, K = shape["N"], shape["D"], shape["V"], shape["K"]
    h_ND, W_VD, y_N, ids_NK, lp_NK = make_inputs(N, D, V, K, torch.bfloat16, "cuda")
    empty_NK = ids_NK[:, :0]

    def loss_of(out):
        return out if isinstance(out, torch.Tensor) else out.loss

    variants = [
        ("ours τ=1", lambda h, W: linear_topk_kd_loss(h, W, y_N, ids_NK, lp_NK, 1.0, LAM, check_ids=False)),
        ("ours τ=2", lambda h, W: linear_topk_kd_loss(h, W, y_N, ids_NK, lp_NK, 2.0, LAM, check_ids=False)),
        ("ours CE only (K=0)", lambda h, W: linear_topk_kd_loss(h, W, y_N, empty_NK, lp_NK[:, :0], 1.0, 0.0,
                                                                 check_ids=False)),
        ("compiled chunked (Liger)", lambda h, W: compiled_chunked_kd(h, W, y_N, ids_NK, lp_NK, TAU, LAM)),
        ("eager full logits bf16", lambda h, W: eager_full_logits(h, W, y_N, ids_NK, lp_NK, TAU, LAM)),
        ("ref fp32", lambda h, W: linear_topk_kd_loss_ref(h, W, y_N, ids_NK, lp_NK, TAU, LAM, check_ids=False)),
    ]
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        liger_ce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        variants.append(("liger FLCE (CE only)", lambda h, W: liger_ce(W, h, y_N)))
    except ImportError:
        print("# liger_kernel not installed: no Liger FLCE row (pip install liger-kernel to add it)")

    # The oracle once, for the error columns (fp32 math on the same bf16 inputs).
    h = h_ND.detach().clone().requires_grad_(True)
    W = W_VD.detach().clone().requires_grad_(True)
    ref = linear_topk_kd_loss_ref(h, W, y_N, ids_NK, lp_NK, TAU, LAM, check_ids=False)
    ref.loss.backward()
    ref_loss, ref_dh, ref_dW = ref.loss.item(), h.grad.float(), W.grad.float()
    del h, W, ref
    torch.cuda.empty_cache()

    _header()
    for name, fn in variants:
        h = h_ND.detach().clone().requires_grad_(True)
        W = W_VD.detach().clone().requires_grad_(True)

        def step():
            h.grad = W.grad = None
            loss_of(fn(h, W)).backward()

        try:
            step()  # compile / autotune / warm the allocator
            err = ""
            if name.startswith("ours τ=1") or name.startswith("compiled") or name.startswith("eager"):
                h.grad = W.grad = None
                loss = loss_of(fn(h, W))
                loss.backward()
                rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()  # noqa: E731
                err = (f"{abs(loss.item() - ref_loss) / abs(ref_loss):.1e} / {rel(h.grad, ref_dh):.1e} / "
                       f"{rel(W.grad, ref_dW):.1e}")
            h.grad = W.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(step, warmup=100, rep=1000, return_mode="median")
            _row(name, shape, "bf16", ms, extra_mb, err)
        except torch.OutOfMemoryError:
            print(f"{name:<26} out of memory")
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile missing a host compiler: report, go on
            print(f"{name:<26} n/a: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        del h, W
        torch.cuda.empty_cache()
    print(f"# GPU: {torch.cuda.get_device_name(0)}; λ={LAM}; chunk C={_chunk_size(N, D, V)} tokens; "
          "'extra MB' counts dh and dW (0.39 GB in bf16) on top of the loss's own buffers")
    print("# KD overhead = (ours τ=1) / (ours CE only) - 1; targets: >= 1.5x compiled chunked, >= 640 TFLOP/s, "
          "<= 1 GB extra, KD <= 10 % over CE")


# ------------------------------------------------------------------------------------------------------- CPU

def _cpu_variant(name):
    """One CPU measurement in this (fresh) process: median time of fwd+bwd and the peak RSS growth."""
    torch.manual_seed(0)
    fn = {"chunked": linear_topk_kd_loss_chunked, "ref": linear_topk_kd_loss_ref}[name]
    shape = CPU_SHAPE
    warm = make_inputs(8, shape["D"], shape["V"], shape["K"], torch.float32, "cpu", seed=1)
    h, W = warm[0].requires_grad_(True), warm[1].requires_grad_(True)
    fn(h, W, *warm[2:], TAU, LAM).loss.backward()  # load every code path at a negligible size
    del warm, h, W
    h_ND, W_VD, y_N, ids_NK, lp_NK = make_inputs(shape["N"], shape["D"], shape["V"], shape["K"], torch.float32,
                                                 "cpu")
    h, W = h_ND.requires_grad_(True), W_VD.requires_grad_(True)
    base = reset_peak_rss()
    times = []
    for _ in range(3):
        h.grad = W.grad = None
        t0 = time.perf_counter()
        fn(h, W, y_N, ids_NK, lp_NK, TAU, LAM, check_ids=False).loss.backward()
        times.append(time.perf_counter() - t0)
    extra_mb = (peak_rss() - base) / 2**20
    print(json.dumps({"ms": statistics.median(times) * 1e3, "extra_mb": extra_mb}))


def _cpu():
    shape = CPU_SHAPE
    print(f"# CPU only (no CUDA device): GPU figures missing; the Triton kernel is not timed (the interpreter is "
          f"not a benchmark). fp32, λ={LAM}, τ={TAU}, {torch.get_num_threads()} torch threads; 'extra MB' = "
          "peak RSS growth in a fresh process, including dh and dW")
    _header()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    for label, name in [("ours chunked torch (CPU)", "chunked"), ("ref fp32", "ref")]:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu-variant", name], env=env,
                             capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            print(f"{label:<26} failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        _row(label, shape, "fp32", r["ms"], r["extra_mb"])
    print(f"# chunk C={_chunk_size(shape['N'], shape['D'], shape['V'])} tokens: one C x V fp32 chunk is "
          f"{_chunk_size(shape['N'], shape['D'], shape['V']) * shape['V'] * 4 / 2**20:.0f} MB, one N x V tensor "
          f"{shape['N'] * shape['V'] * 4 / 2**20:.0f} MB")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--cpu-variant":
        _cpu_variant(sys.argv[2])
    elif torch.cuda.is_available():
        _gpu()
    else:
        _cpu()


if __name__ == "__main__":
    main()
