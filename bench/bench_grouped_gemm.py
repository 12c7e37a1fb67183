"""Grouped expert GEMM microbenchmark, and the whole MoE expert block against transformers' Mixtral block.

Dimensions: T tokens, D hidden, F expert FFN hidden, E experts, k experts per token, M = T*k sorted rows;
a GEMM is [M, Kc] x [E, N, Kc] -> [M, N] (Kc its contraction).
On a GPU (Mixtral: D = 4096, F = 14336, E = 8, k = 2, T in {4096, 16384}, bf16), for both expert GEMMs
(w13: N = 2F, Kc = D; w2: N = D, Kc = F), balanced and skewed loads, the TFLOP/s of forward and forward+backward
for: our Triton grouped_mm, torch._grouped_mm (where this torch has it), the torch loop (grouped_mm_ref), and one
dense torch.matmul of the same FLOPs (the ceiling). Then the whole block (routing + experts + combine): ours vs
transformers' MixtralSparseMoeBlock with the same weights (its default eager experts, and its "grouped_mm"
experts where that exists). On a CPU: a small shape, torch paths only; the GPU figures are reported missing.
Timings are never asserted. Usage: .venv/bin/python bench/bench_grouped_gemm.py [--sweep]
--sweep (GPU): times candidate block sizes of the forward and dW kernels (MM_SWEEP, DW_SWEEP) at one Mixtral
layer against the dense matmul, to choose the launchers' defaults on that GPU.
"""
import sys

import torch

import kernels
from bench._common import make_timer
from kernels.grouped_gemm import grouped_mm, grouped_mm_ref, torch_grouped_mm, torch_grouped_mm_runs
from kernels.moe import moe_experts
from kernels.routing import route_topk, route_topk_ref

E, k = 8, 2


def _counts(M: int, load: str) -> list[int]:
    """Rows per expert. balanced: M / E each. skewed: proportional to 16:8:4:2:1:1:1:1 (expert 0 gets 47 %, the
    shape of a router early in training or of a hot expert), rounding remainder to expert 0."""
    if load == "balanced":
        shares = [1] * E
    else:
        shares = [16, 8, 4, 2] + [1] * (E - 4)
    counts = [M * s // sum(shares) for s in shares]
    counts[0] += M - sum(counts)
    return counts


def _offsets(counts, device):
    o = torch.zeros(E + 1, dtype=torch.int32, device=device)
    o[1:] = torch.tensor(counts, device=device).cumsum(0)
    return o


def _row(variant, shape, load, ms, flops, extra=""):
    tflops = flops / (ms * 1e-3) / 1e12
    print(f"{variant:<38} {shape:<26} {load:<9} {ms:>9.3f} {tflops:>8.3f}  {extra}")


def _fwd_bwd(fn, inputs, dy):
    def run():
        fn(*inputs).backward(dy)
    return run


def bench_gemms(T_list, D, F, dtype, device, bench, variants):
    for T in T_list:
        M = T * k
        for gemm, N, Kc in (("w13", 2 * F, D), ("w2", D, F)):
            shape = f"{gemm} M={M} N={N} K={Kc}"
            x_MK = (torch.randn(M, Kc, device=device) * 0.5).to(dtype).requires_grad_()
            w_ENK = (torch.randn(E, N, Kc, device=device) * Kc ** -0.5).to(dtype).requires_grad_()
            dy_MN = torch.randn(M, N, device=device).to(dtype)
            flops = 2 * M * N * Kc
            # The dense ceiling: one [M, Kc] @ [Kc, N] matmul, the same FLOPs without any grouping.
            w_KN = (torch.randn(Kc, N, device=device) * Kc ** -0.5).to(dtype).requires_grad_()
            with torch.no_grad():
                _row("dense torch.matmul fwd", shape, "-", bench(lambda: x_MK @ w_KN), flops)
            _row("dense torch.matmul fwd+bwd", shape, "-",
                 bench(_fwd_bwd(torch.matmul, (x_MK, w_KN), dy_MN), (x_MK, w_KN)), 3 * flops)
            del w_KN
            for load in ("balanced", "skewed"):
                o = _offsets(_counts(M, load), device)
                for name, fn in variants(o):
                    try:
                        with torch.no_grad():
                            ms = bench(lambda: fn(x_MK, w_ENK, o))
                        _row(f"{name} fwd", shape, load, ms, flops)
                        ms = bench(_fwd_bwd(lambda a, b: fn(a, b, o), (x_MK, w_ENK), dy_MN), (x_MK, w_ENK))
                        _row(f"{name} fwd+bwd", shape, load, ms, 3 * flops)
                    except Exception as e:  # noqa: BLE001 - a missing or unsupported peer is reported, not fatal
                        print(f"{name:<38} {shape:<26} {load:<9} n/a: {type(e).__name__}: {str(e)[:80]}")
            del x_MK, w_ENK, dy_MN


def _peer(device, dtype) -> list:
    """torch._grouped_mm as a variant where it runs forward and backward on `device` in `dtype`, else nothing."""
    return [("torch._grouped_mm", torch_grouped_mm)] if torch_grouped_mm_runs(device, dtype) else []


def bench_block(T_list, D, F, dtype, device, bench, our_path):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    impls = ["eager"] + (["grouped_mm"] if device == "cuda" else [])
    for T in T_list:
        shape = f"block T={T} D={D} F={F}"
        flops = 6 * T * k * D * F  # three [M, D] x [D, F]-sized GEMMs (w1, w3, w2) per routed row
        x_TD = torch.randn(1, T, D, device=device).to(dtype).requires_grad_()
        dy_TD = torch.randn(1, T, D, device=device).to(dtype)
        base = {}
        for impl in impls:
            cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                                router_jitter_noise=0.0, experts_implementation=impl)
            block = MixtralSparseMoeBlock(cfg).to(device=device, dtype=dtype)
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0.0, D ** -0.5)
            params = list(block.parameters())
            try:
                with torch.no_grad():
                    ms_f = bench(lambda: block(x_TD))
                ms_fb = bench(_fwd_bwd(block, (x_TD,), dy_TD), [x_TD, *params])
                base[impl] = (ms_f, ms_fb)
                _row(f"transformers Mixtral ({impl}) fwd", shape, "router", ms_f, flops)
                _row(f"transformers Mixtral ({impl}) fwd+bwd", shape, "router", ms_fb, 3 * flops)
            except Exception as e:  # noqa: BLE001
                print(f"transformers Mixtral ({impl}) {shape} n/a: {type(e).__name__}: {str(e)[:80]}")
            if impl == "eager":
                gate_ED, w13, w2 = (p.detach().clone().requires_grad_() for p in
                                    (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj))
            del block, params

        def ours(x_BTD):
            x = x_BTD.view(T, D)
            logits_TE = x @ gate_ED.T
            route = route_topk if kernels.use_triton(logits_TE) else route_topk_ref
            return moe_experts(x, route(logits_TE, k), w13, w2).view(1, T, D)
        with torch.no_grad():
            ms_f = bench(lambda: ours(x_TD))
        ms_fb = bench(_fwd_bwd(ours, (x_TD,), dy_TD), [x_TD, gate_ED, w13, w2])
        vs = lambda i, ms: f"{base['eager'][i] / ms:.2f}x transformers eager" if "eager" in base else ""  # noqa: E731
        _row(f"ours ({our_path}) fwd", shape, "router", ms_f, flops, vs(0, ms_f))
        _row(f"ours ({our_path}) fwd+bwd", shape, "router", ms_fb, 3 * flops, vs(1, ms_fb))
        del x_TD, dy_TD, gate_ED, w13, w2


# Candidate block sizes for `--sweep` (bf16, Mixtral's shapes). The first of each list is the launcher's default
# for >= 256 rows per expert; every entry compiles for sm_90 without spills (bench/compile_sm90.py --only sweep).
MM_SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                                      (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 256, 32, 8, 5),
                                      (64, 256, 64, 4, 4))]
DW_SWEEP = [dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, num_warps=w, num_stages=st)
            for bn, bk, bm, w, st in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                      (128, 128, 64, 4, 4), (128, 128, 32, 8, 4), (128, 128, 128, 8, 2))]


def _cfg_str(cfg):
    keys = [k for k in cfg if k.startswith("BLOCK")]
    return "x".join(str(cfg[k]) for k in keys) + f" w{cfg['num_warps']} s{cfg['num_stages']}"


def sweep(T=16384, D=4096, F=14336, dtype=torch.bfloat16):
    """Time each MM_SWEEP config on the forward (row-tiled) kernel and each DW_SWEEP config on the dW kernel, at
    one Mixtral layer's w13 and w2 with balanced load, against the dense matmul of the same FLOPs: the figures
    for choosing `_mm_config` / `_dw_config` defaults on this GPU. Reports; changes nothing."""
    from kernels.grouped_gemm import forced_config, grouped_mm_dw, grouped_mm_fwd
    M = T * k
    bench = make_timer(True, 0)
    print(f"# sweep: T={T} (M={M}), bf16, balanced; '% dense' = our TFLOP/s over the dense matmul's, same FLOPs")
    print(f"{'kernel':<8} {'gemm':<26} {'config (blocks, warps, stages)':<32} {'ms':>8} {'TFLOP/s':>8} {'% dense':>8}")
    for gemm, N, Kc in (("w13", 2 * F, D), ("w2", D, F)):
        shape = f"{gemm} M={M} N={N} K={Kc}"
        x_MK = (torch.randn(M, Kc, device="cuda") * 0.5).to(dtype)
        w_ENK = (torch.randn(E, N, Kc, device="cuda") * Kc ** -0.5).to(dtype)
        dy_MN = torch.randn(M, N, device="cuda").to(dtype)
        o = _offsets(_counts(M, "balanced"), "cuda")
        flops = 2 * M * N * Kc
        w_KN = w_ENK[0].T.contiguous()
        dense_ms = bench(lambda: x_MK @ w_KN)
        del w_KN
        print(f"{'dense':<8} {shape:<26} {'torch.matmul':<32} {dense_ms:>8.3f} {flops / dense_ms / 1e9:>8.1f} "
              f"{100:>8.0f}")
        for kernel, configs, fn in (
                ("fwd", MM_SWEEP, lambda: grouped_mm_fwd(x_MK, w_ENK, o)),
                ("dW", DW_SWEEP, lambda: grouped_mm_dw(dy_MN, x_MK, o, E))):
            for cfg in configs:
                try:
                    with forced_config(**{"mm" if kernel == "fwd" else "dw": cfg}):
                        ms = bench(fn)
                    print(f"{kernel:<8} {shape:<26} {_cfg_str(cfg):<32} {ms:>8.3f} {flops / ms / 1e9:>8.1f} "
                          f"{100 * dense_ms / ms:>8.0f}")
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: reported, the sweep goes on
                    print(f"{kernel:<8} {shape:<26} {_cfg_str(cfg):<32} n/a: {type(e).__name__}: {str(e)[:60]}")
        del x_MK, w_ENK, dy_MN


def main():
    if "--sweep" in sys.argv[1:]:
        if not torch.cuda.is_available():
            print("# --sweep times Triton kernels: it needs a CUDA device (none here); nothing measured")
            return
        sweep()
        return
    cuda = torch.cuda.is_available()
    bench = make_timer(cuda, cpu_reps=3)
    print(f"{'variant':<38} {'shape':<26} {'load':<9} {'ms':>9} {'TFLOP/s':>8}")
    if cuda:
        D, F, T_list, dtype = 4096, 14336, (4096, 16384), torch.bfloat16
        print(f"# GPU: {torch.cuda.get_device_name(0)}, bf16, E={E}, k={k}; fwd+bwd counts 3x the forward FLOPs")

        peer = _peer("cuda", dtype)
        bench_gemms(T_list, D, F, dtype, "cuda", bench,
                    lambda o: [("triton grouped_mm", grouped_mm)] + peer + [("torch loop (grouped_mm_ref)", grouped_mm_ref)])
        bench_block(T_list, D, F, dtype, "cuda", bench, "triton")
    else:
        # Small enough for < 1 min on 2 shared cores; torch paths only (the Triton interpreter is a test tool).
        D, F, T_list, dtype = 256, 512, (512,), torch.float32
        print(f"# CPU only (no CUDA device): GPU figures missing; torch paths only, fp32, E={E}, k={k}, "
              f"D={D}, F={F} instead of Mixtral's 4096, 14336")
        peer = _peer("cpu", dtype)
        bench_gemms(T_list, D, F, dtype, "cpu", bench, lambda o: peer + [("torch loop (grouped_mm_ref)", grouped_mm_ref)])
        bench_block(T_list, D, F, dtype, "cpu", bench, "torch")


if __name__ == "__main__":
    main()
