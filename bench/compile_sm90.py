"""Compile every Triton kernel for Hopper (sm_90) without a GPU and print what the compiler says of each.

Dimensions: T tokens, D hidden, F expert FFN hidden, E experts, k experts per token, N loss tokens, V vocabulary,
K teacher top-k.
What costs no device time: the public paths (route_topk, the MoE experts, linear_topk_kd_loss, forward and
backward) run on `meta` tensors at the benchmark shapes, with Triton's driver replaced by one that names an
sm_90 target and every launch turned into a compile (JITFunction.run with warmup=True). So each kernel is built
with the launcher's own block sizes and Triton's own argument specialisation, exactly the variants a GPU run
would build, and nothing is launched. Running on `meta` also shows there is no host sync on these paths: any
`.item()` / `.tolist()` on a meta tensor raises.
For each compiled kernel: registers per thread, stack and local-memory bytes (> 0 means spills), shared memory,
and whether the PTX has Hopper's wgmma (tensor-core GEMMs) and how many 16-byte global loads it issues.
Needs Triton with its bundled CUDA tools (Linux x86-64 wheel); no CUDA driver, no GPU.
Usage: python bench/compile_sm90.py [--only routing,grouped_gemm,kd_loss,odd_shapes,sweep] [--json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

if __name__ == "__main__":
    # Compiled, not interpreted (the interpreter replaces JITFunction at decoration time), and the Triton paths
    # even though meta tensors are not CUDA tensors (kernels.use_triton).
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["DISTILL_KERNELS"] = "triton"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

DEV = "meta"


class _Sm90Driver:
    """The part of Triton's active driver that JITFunction.run and create_binder use before a launch."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device(DEV)


def _capture_compiles():
    """Route every launch into a compile for sm_90; returns the list that collects (kernel name, CompiledKernel)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_Sm90Driver())
    compiled = []
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel
    JITFunction.run = compile_only
    return compiled


def _routing():
    from kernels.routing import route_topk
    T, E, k = 16384, 8, 2
    logits_TE = torch.empty(T, E, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    r = route_topk(logits_TE, k)
    torch.autograd.backward((r.weights_TK, r.probs_TE),
                            (torch.empty_like(r.weights_TK), torch.empty_like(r.probs_TE)))
    return f"T={T} E={E} k={k} bf16"


def _grouped_gemm():
    # The MoE experts as the model calls them (gather into w13, scatter out of w2, both backwards), Mixtral's
    # shapes at the training class (T = 4096, k = 2: M / E = 1024 rows per expert, the 128 x 256 tiles).
    from kernels.moe import moe_experts
    from kernels.routing import route_topk
    T, D, F, E, k = 4096, 4096, 14336, 8, 2
    x_TD = torch.empty(T, D, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    w13 = torch.empty(E, 2 * F, D, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    w2 = torch.empty(E, D, F, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    with torch.no_grad():
        routing = route_topk(torch.empty(T, E, dtype=torch.bfloat16, device=DEV), k)
    y_TD = moe_experts(x_TD, routing, w13, w2)
    y_TD.backward(torch.empty_like(y_TD))
    return f"T={T} D={D} F={F} E={E} k={k} bf16"


def _kd_loss():
    from kernels.kd_loss import _apply
    N, D, V, K = 16384, 4096, 32000, 64
    h_ND = torch.empty(N, D, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    W_VD = torch.empty(V, D, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    labels_N = torch.empty(N, dtype=torch.long, device=DEV)
    ids_NK = torch.empty(N, K, dtype=torch.long, device=DEV)
    lp_NK = torch.empty(N, K, dtype=torch.bfloat16, device=DEV)
    for tau in (1.0, 2.0):  # τ = 1 and τ != 1 are two specialisations (one LSE over V or two)
        # _apply(use_kernel=True, ...): the public linear_topk_kd_loss refuses non-CUDA tensors outside the
        # interpreter; this is the same call behind that check.
        out = _apply(True, h_ND, W_VD, labels_N, ids_NK, lp_NK, tau, 0.5, None, None, False, None)
        out.loss.backward()
    return f"N={N} D={D} V={V} K={K} bf16, tau 1 and 2"


def _odd_shapes():
    # The other specialisations the tests and small models reach: masked K and N (not multiples of the blocks),
    # the small-tile class (< 64 rows per expert), fp16 and fp32 GEMMs, a non-power-of-two vocabulary, k = 1.
    from kernels.grouped_gemm import grouped_mm
    from kernels.routing import route_topk
    for M, N, K, dtype in ((257, 72, 100, torch.float16), (257, 72, 100, torch.float32),
                           (1024, 1000, 1000, torch.bfloat16)):  # the last: 128 rows per expert, the middle class
        x_MK = torch.empty(M, K, dtype=dtype, device=DEV, requires_grad=True)
        w_ENK = torch.empty(8, N, K, dtype=dtype, device=DEV, requires_grad=True)
        y_MN = grouped_mm(x_MK, w_ENK, torch.empty(9, dtype=torch.int32, device=DEV))
        y_MN.backward(torch.empty_like(y_MN))
    r = route_topk(torch.empty(371, 4, dtype=torch.float16, device=DEV, requires_grad=True), 1)
    r.weights_TK.backward(torch.empty_like(r.weights_TK))
    from kernels.kd_loss import _apply
    h_ND = torch.empty(37, 64, dtype=torch.float32, device=DEV, requires_grad=True)
    W_VD = torch.empty(777, 64, dtype=torch.float32, device=DEV, requires_grad=True)
    out = _apply(True, h_ND, W_VD, torch.empty(37, dtype=torch.long, device=DEV),
                 torch.empty(37, 5, dtype=torch.long, device=DEV), torch.empty(37, 5, device=DEV), 0.7, 0.5, None,
                 None, False, None)
    out.loss.backward()
    return ("grouped M=257 N=72 K=100 E=8 fp16+fp32, M=1024 N=K=1000 bf16; routing T=371 E=4 k=1 fp16; "
            "kd N=37 D=64 V=777 K=5 fp32")


def _sweep():
    # Every candidate of bench_grouped_gemm.py --sweep, forward (w13: gather-free row tiles) and dW, so that the
    # GPU sweep only times configs that build without spills.
    from bench.bench_grouped_gemm import DW_SWEEP, MM_SWEEP
    from kernels.grouped_gemm import forced_config, grouped_mm_dw, grouped_mm_fwd
    M, N, K, E = 32768, 28672, 4096, 8
    x_MK = torch.empty(M, K, dtype=torch.bfloat16, device=DEV)
    w_ENK = torch.empty(E, N, K, dtype=torch.bfloat16, device=DEV)
    o = torch.empty(E + 1, dtype=torch.int32, device=DEV)
    for cfg in MM_SWEEP:
        with forced_config(mm=cfg):
            grouped_mm_fwd(x_MK, w_ENK, o)
    for cfg in DW_SWEEP:
        with forced_config(dw=cfg):
            grouped_mm_dw(torch.empty(M, N, dtype=torch.bfloat16, device=DEV), x_MK, o, E)
    return f"bench_grouped_gemm --sweep candidates at M={M} N={N} K={K} E={E} bf16"


def _resource_usage(cubin: bytes) -> dict:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def _variant(kernel) -> str:
    """The launcher's constexpr choices in a few words: the flags that are on and the block sizes."""
    fn, words = kernel.src.fn, []
    for (i,), v in sorted(kernel.src.constants.items()):
        param = fn.params[i]
        if not param.is_constexpr or isinstance(v, str) or v is False or param.name == "IGNORE":
            continue
        words.append(param.name if v is True else f"{param.name.removeprefix('BLOCK_')}={v}")
    return " ".join(words)


CASES = {"routing": _routing, "grouped_gemm": _grouped_gemm, "kd_loss": _kd_loss, "odd_shapes": _odd_shapes,
         "sweep": _sweep}  # group name -> the call that launches its kernels at its shapes
GROUPS = tuple(CASES)


def report(groups=GROUPS) -> list[dict]:
    import triton
    compiled = _capture_compiles()
    rows, seen = [], set()
    for group in groups:
        start = len(compiled)
        case = CASES[group]()
        for name, kernel in compiled[start:]:
            key = (name, kernel.hash)  # a specialisation launched twice (e.g. fwd and dX) is reported once
            if key in seen:
                continue
            seen.add(key)
            ptx, md = kernel.asm["ptx"], kernel.metadata
            rows.append({"group": group, "case": case, "kernel": name, "variant": _variant(kernel),
                         "triton": triton.__version__,
                         "num_warps": md.num_warps, "num_stages": md.num_stages, "shared_bytes": md.shared,
                         **_resource_usage(kernel.asm["cubin"]), "wgmma": "wgmma.mma_async" in ptx,
                         "ld_global_v4": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
                         "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca")})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    a = p.parse_args()
    groups = [g for g in a.only.split(",") if g]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise SystemExit(f"--only {','.join(bad)}: unknown; choose from {','.join(GROUPS)}")
    rows = report(groups)
    if a.json:
        print(json.dumps(rows))
        return
    print(f"# sm_90 compile report, Triton {rows[0]['triton'] if rows else '?'}, torch {torch.__version__} "
          "(no GPU used; spills = stack or local bytes > 0)")
    print(f"{'kernel':<23} {'variant':<60} {'warps':>5} {'stages':>6} {'regs':>4} {'spill B':>7} {'smem KiB':>8} "
          f"{'wgmma':>5} {'ld.v4':>5} {'cp.async':>8}")
    for r in rows:
        print(f"{r['kernel']:<23} {r['variant']:<60} {r['num_warps']:>5} {r['num_stages']:>6} {r['regs']:>4} "
              f"{r['stack'] + r['local']:>7} {r['shared_bytes'] / 1024:>8.1f} {'yes' if r['wgmma'] else 'no':>5} "
              f"{r['ld_global_v4']:>5} {r['cp_async']:>8}")
    for case in dict.fromkeys((r["group"], r["case"]) for r in rows):
        print(f"# {case[0]}: {case[1]}")


if __name__ == "__main__":
    main()
