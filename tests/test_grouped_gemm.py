"""Grouped expert GEMM (Triton, run by the CPU interpreter here) against the torch loop, and the MoE layer built
on it against transformers' MixtralSparseMoeBlock.

Dimensions: M sorted rows, E experts, N output, K contraction (GEMM tests); T tokens, D hidden, F expert FFN
hidden, k experts per token (MoE tests). Interpreter dtypes are fp32 and fp16 only: Triton 3.9's interpreter
returns garbage for bf16 tl.dot; bf16 is covered by the CUDA-only tests at the end.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F_nn  # noqa: E402

import kernels  # noqa: E402
from kernels.grouped_gemm import (  # noqa: E402
    grouped_mm, grouped_mm_gather, grouped_mm_gather_ref, grouped_mm_ref, grouped_mm_scatter,
    grouped_mm_scatter_ref,
)
from kernels.moe import moe_experts, moe_experts_ref  # noqa: E402
from kernels.routing import route_topk, route_topk_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    """The public op picks its path from the tensors' device (kernels.use_triton): on CPU tensors it takes the
    torch twin unless DISTILL_KERNELS=triton, which these tests set so that the interpreter runs the kernel."""
    monkeypatch.setenv("DISTILL_KERNELS", "triton")

# Relative Frobenius error against an fp32 reference on the same (rounded) inputs. fp32: summation order only
# (~1e-7 measured). fp16: the kernel accumulates in fp32 and rounds once on store, 2^-11 = 4.9e-4 per element
# at worst, ~2e-4 measured as a norm.
TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _offsets(counts_E, device="cpu"):
    offsets_E1 = torch.zeros(len(counts_E) + 1, dtype=torch.int32, device=device)
    offsets_E1[1:] = torch.tensor(counts_E, device=device).cumsum(0)
    return offsets_E1


def _split(M, E, gen, empty=True):
    """Random counts summing to M; with `empty`, expert 1 (not the first, not the last when E > 2) gets none."""
    ids = torch.randint(0, E, (M,), generator=gen)
    if empty:
        ids[ids == 1] = 0
    return torch.bincount(ids, minlength=E).tolist()


def _check_grads(fn, ref, inputs, dtype, gen):
    """fn(*inputs) vs ref on fp32 copies of the same inputs: output, then every float input's gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    leaves32 = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in inputs]
    y = fn(*leaves)
    y32 = ref(*leaves32)
    dy = torch.randn(y32.shape, generator=gen).to(dtype)
    y.backward(dy)
    y32.backward(dy.float())
    errs = {"y": _rel(y, y32)}
    for i, (a, b) in enumerate(zip(leaves, leaves32)):
        if a.is_floating_point():
            errs[f"d{i}"] = _rel(a.grad, b.grad)
    assert y.dtype == dtype and y.shape == y32.shape
    assert all(e <= TOL[dtype] for e in errs.values()), errs
    return errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("E", [2, 8])
@pytest.mark.parametrize("M", [1, 33, 257])
def test_grouped_mm_matches_ref(M, E, dtype):
    gen = torch.Generator().manual_seed(M * 100 + E)
    N, K = 72, 100                                      # neither a multiple of any block size
    counts_E = _split(M, E, gen)
    x_MK = torch.randn(M, K, generator=gen).to(dtype)
    w_ENK = torch.randn(E, N, K, generator=gen).to(dtype)
    _check_grads(grouped_mm, grouped_mm_ref, (x_MK, w_ENK, _offsets(counts_E)), dtype, gen)


@pytest.mark.parametrize("N,K", [(37, 51), (32, 64), (300, 17)])  # odd; K a block multiple (EVEN_K); N > BLOCK_N
def test_grouped_mm_odd_shapes(N, K):
    gen = torch.Generator().manual_seed(N + K)
    M, E = 90, 3
    x_MK, w_ENK = torch.randn(M, K, generator=gen), torch.randn(E, N, K, generator=gen)
    _check_grads(grouped_mm, grouped_mm_ref, (x_MK, w_ENK, _offsets([40, 0, 50])), torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_rows_on_one_expert(dtype):
    gen = torch.Generator().manual_seed(7)
    M, E, N, K = 257, 8, 72, 100
    counts_E = [0] * E
    counts_E[5] = M
    x_MK, w_ENK = torch.randn(M, K, generator=gen).to(dtype), torch.randn(E, N, K, generator=gen).to(dtype)
    w = w_ENK.clone().requires_grad_()
    grouped_mm(x_MK, w, _offsets(counts_E)).sum().backward()
    assert torch.count_nonzero(w.grad[torch.arange(E) != 5]) == 0  # the 7 idle experts' dW is exactly zero
    _check_grads(grouped_mm, grouped_mm_ref, (x_MK, w_ENK, _offsets(counts_E)), dtype, gen)


def test_no_rows_at_all():
    x_MK, w_ENK = torch.randn(0, 20, requires_grad=True), torch.randn(3, 24, 20, requires_grad=True)
    y = grouped_mm(x_MK, w_ENK, _offsets([0, 0, 0]))
    assert y.shape == (0, 24)
    y.sum().backward()
    assert torch.count_nonzero(w_ENK.grad) == 0 and x_MK.grad.shape == (0, 20)


def test_reads_only_inside_the_tensors():
    """Views into NaN-padded buffers with transposed weights: a read of any row or column outside the views (a
    tile past M, N or K; another expert's weights) would turn an output NaN. Also covers arbitrary strides."""
    gen = torch.Generator().manual_seed(3)
    M, E, N, K = 45, 3, 40, 30
    x_buf = torch.full((M + 2, K + 3), float("nan"))
    x_buf[1:M + 1, :K] = torch.randn(M, K, generator=gen)
    w_buf = torch.full((E, K + 5, N + 7), float("nan"))  # stored [E, K, N]: w_ENK below is a transposed view
    w_buf[:, :K, :N] = torch.randn(E, K, N, generator=gen)
    x_MK, w_ENK = x_buf[1:M + 1, :K], w_buf[:, :K, :N].transpose(1, 2)
    errs = _check_grads(grouped_mm, grouped_mm_ref, (x_MK, w_ENK, _offsets([20, 0, 25])), torch.float32, gen)
    assert all(e == e for e in errs.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2])
def test_gather_and_scatter_variants(k, dtype):
    """The fused permutations of the MoE path against their explicit-permutation refs, gradients included."""
    gen = torch.Generator().manual_seed(11 + k)
    T, E, N, K = 37, 4, 72, 100
    routing = route_topk_ref(torch.randn(T, E, generator=gen), k)
    x_TK = torch.randn(T, K, generator=gen).to(dtype)
    x_MK = torch.randn(T * k, K, generator=gen).to(dtype)
    w_ENK = torch.randn(E, N, K, generator=gen).to(dtype)
    o, order, inv = routing.offsets_E1, routing.order_M, routing.inverse_M
    _check_grads(lambda x, w: grouped_mm_gather(x, w, o, order, inv, k),
                 lambda x, w: grouped_mm_gather_ref(x, w, o, order, inv, k), (x_TK, w_ENK), dtype, gen)
    _check_grads(lambda x, w: grouped_mm_scatter(x, w, o, order),
                 lambda x, w: grouped_mm_scatter_ref(x, w, o, order), (x_MK, w_ENK), dtype, gen)


def test_bad_inputs_raise():
    x_MK, w_ENK, o = torch.randn(4, 8), torch.randn(2, 6, 8), _offsets([1, 3])
    with pytest.raises(ValueError, match="contraction"):
        grouped_mm(x_MK, torch.randn(2, 6, 7), o)
    with pytest.raises(ValueError, match="E\\+1"):
        grouped_mm(x_MK, w_ENK, _offsets([1, 1, 2]))
    with pytest.raises(ValueError, match="float16"):
        grouped_mm(x_MK.half(), w_ENK, o)
    with pytest.raises(ValueError, match="2-D"):
        grouped_mm(x_MK[None], w_ENK, o)
    with pytest.raises(ValueError, match="int32"):
        grouped_mm(x_MK, w_ENK, o.float())
    with pytest.raises(ValueError, match="rise from 0"):
        grouped_mm_ref(x_MK, w_ENK, torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="order_M"):
        grouped_mm_scatter(x_MK, w_ENK, o, torch.arange(3))
    with pytest.raises(ValueError, match="k="):
        grouped_mm_gather(x_MK, w_ENK, o, torch.arange(4), torch.arange(4), 0)


# ---------------------------------------------------------------------------------------------------------------
# The MoE layer against transformers' Mixtral block
# ---------------------------------------------------------------------------------------------------------------
def _mixtral_block(D, F, E, k, seed):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                        router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(cfg).float()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    # transformers 5.x stores the experts stacked exactly as we do: gate_up_proj [E, 2F, D] (gate rows, then up
    # rows: `.chunk(2, dim=-1)` of its output), down_proj [E, D, F].
    assert block.experts.gate_up_proj.shape == (E, 2 * F, D) and block.experts.down_proj.shape == (E, D, F)
    return block


def _our_block(x_TD, gate_ED, w13_E2FD, w2_EDF, k):
    logits_TE = x_TD @ gate_ED.T
    route = route_topk if kernels.use_triton(logits_TE) else route_topk_ref
    return moe_experts(x_TD, route(logits_TE, k), w13_E2FD, w2_EDF)


@pytest.mark.parametrize("kernels_mode", ["triton", "torch"])
@pytest.mark.parametrize("E,k", [(8, 2), (4, 1)])
def test_moe_matches_mixtral_block(E, k, kernels_mode, monkeypatch):
    monkeypatch.setenv("DISTILL_KERNELS", kernels_mode)
    T, D, F = 37, 48, 40
    block = _mixtral_block(D, F, E, k, seed=E + k)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    dy_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(6))

    x_hf = x_TD.clone().requires_grad_()
    y_hf = block(x_hf[None])[0]
    y_hf.backward(dy_TD)

    x = x_TD.clone().requires_grad_()
    params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    ours = [p.detach().clone().requires_grad_() for p in params]
    y = _our_block(x, *ours, k)
    y.backward(dy_TD)

    errs = {"y": _rel(y, y_hf), "dx": _rel(x.grad, x_hf.grad)}
    errs.update({n: _rel(a.grad, p.grad) for n, a, p in zip(("dgate", "dw13", "dw2"), ours, params)})
    if k == 1:
        # One expert per token: the renormalised weight is p / p = 1, so the router's gradient is zero up to
        # rounding on both sides (its only signal is the aux loss); compare it to the other gradients' scale.
        scale = block.experts.down_proj.grad.abs().max()
        assert ours[0].grad.abs().max() <= 1e-6 * scale and block.gate.weight.grad.abs().max() <= 1e-6 * scale
        del errs["dgate"]
    assert all(e <= 2e-6 for e in errs.values()), errs


def test_moe_paths_agree_fp16(monkeypatch):
    """Triton MoE (fused gather/scatter) vs the torch path in fp16, against an fp32 reference of both."""
    T, D, F, E, k = 33, 40, 24, 4, 2
    gen = torch.Generator().manual_seed(9)
    x_TD = torch.randn(T, D, generator=gen)
    routing = route_topk_ref(torch.randn(T, E, generator=gen), k)
    w13, w2 = torch.randn(E, 2 * F, D, generator=gen) * 0.2, torch.randn(E, D, F, generator=gen) * 0.2
    y32 = moe_experts_ref(x_TD, routing, w13, w2)
    monkeypatch.setenv("DISTILL_KERNELS", "triton")
    y16 = moe_experts(x_TD.half(), routing, w13.half(), w2.half())
    assert y16.dtype == torch.float16 and _rel(y16, y32) <= 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_cpu_torch_grouped_mm_path_matches_loop(dtype, monkeypatch):
    """The CPU torch path (torch._grouped_mm where it runs) against the per-expert loop: output and gradients,
    with an expert that receives no token."""
    import kernels.moe as moe
    if not moe.torch_grouped_mm_runs("cpu", dtype):
        pytest.skip(f"torch._grouped_mm does not run on this CPU build in {dtype}")
    monkeypatch.setenv("DISTILL_KERNELS", "torch")
    calls, real = [], moe.torch_grouped_mm
    monkeypatch.setattr(moe, "torch_grouped_mm", lambda *a: calls.append(1) or real(*a))
    T, D, F, E, k = 45, 32, 24, 4, 2
    gen = torch.Generator().manual_seed(11)
    logits_TE = torch.randn(T, E, generator=gen)
    logits_TE[:, 2] = -1e4  # expert 2 gets no token
    routing = route_topk_ref(logits_TE, k)
    assert routing.counts_E[2] == 0
    x = torch.randn(T, D, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * F, D, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(E, D, F, generator=gen) * 0.2).to(dtype)
    dy = torch.randn(T, D, generator=gen).to(dtype)
    outs = []
    for fn in (moe_experts, moe_experts_ref):
        leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
        y = fn(leaves[0], routing, *leaves[1:])
        y.backward(dy)
        outs.append([y] + [t.grad for t in leaves])
    assert len(calls) == 2  # both GEMMs of moe_experts went through torch._grouped_mm
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(*outs):
        assert a.dtype == dtype and _rel(a, b) <= tol


# ---------------------------------------------------------------------------------------------------------------
# Convergence: a tiny Mixtral trained with the kernels and with the torch paths
# ---------------------------------------------------------------------------------------------------------------
def _train_losses(steps, mode, monkeypatch):
    from model.model import ModelArgs, MoEArgs, Transformer

    monkeypatch.setenv("DISTILL_KERNELS", mode)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, vocab_size=64,
                     rope_theta=10000.0, moe=MoEArgs(num_experts=4, num_experts_per_tok=2))
    model = Transformer(args).init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, 64, (2, 17), generator=gen)
    losses = []
    for _ in range(steps):
        hidden_BTD, aux = model.forward_with_aux(tokens_BT[:, :-1])
        logits = model.logits(hidden_BTD)
        loss = F_nn.cross_entropy(logits.flatten(0, 1), tokens_BT[:, 1:].flatten()) + 0.02 * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _check_convergence(steps, monkeypatch):
    ref = _train_losses(steps, "torch", monkeypatch)
    ours = _train_losses(steps, "triton", monkeypatch)
    assert ref[-1] < ref[0] - 0.05 * steps / 30, ref          # it does learn (memorises one batch)
    # fp32 on both sides: only summation order differs, and it compounds through Adam's steps.
    diffs = [abs(a - b) / abs(b) for a, b in zip(ours, ref)]
    assert max(diffs) <= 1e-4, (diffs, ours, ref)


def test_convergence_short(monkeypatch):
    _check_convergence(5, monkeypatch)


@pytest.mark.slow
def test_convergence_30_steps(monkeypatch):
    _check_convergence(30, monkeypatch)


# ---------------------------------------------------------------------------------------------------------------
# CUDA only (skipped here): bf16, no host sync
# ---------------------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                          reason="needs a CUDA GPU and compiled (not interpreted) Triton")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_ref_without_host_sync(dtype):
    gen = torch.Generator().manual_seed(0)
    M, E, N, K = 1000, 8, 384, 520
    counts_E = _split(M, E, gen)
    x_MK = torch.randn(M, K, generator=gen).to("cuda", dtype).requires_grad_()
    w_ENK = torch.randn(E, N, K, generator=gen).to("cuda", dtype).requires_grad_()
    o = _offsets(counts_E, "cuda")
    dy = torch.randn(M, N, generator=gen).to("cuda", dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host copy inside raises
    try:
        y = grouped_mm(x_MK, w_ENK, o)
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x32, w32 = x_MK.detach().float().requires_grad_(), w_ENK.detach().float().requires_grad_()
    y32 = grouped_mm_ref(x32, w32, o)
    y32.backward(dy.float())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # bf16 stores with 2^-8 relative rounding
    assert _rel(y, y32) <= tol and _rel(x_MK.grad, x32.grad) <= tol and _rel(w_ENK.grad, w32.grad) <= tol


def test_public_op_picks_the_torch_twin_on_cpu(monkeypatch):
    """Kernel choice lives in kernels/: grouped_mm on CPU tensors in auto mode is grouped_mm_ref (the Triton
    Function is never entered); forced to Triton it is."""
    from kernels import grouped_gemm
    calls = []
    real = grouped_gemm.GroupedMMFunction.apply
    monkeypatch.setattr(grouped_gemm.GroupedMMFunction, "apply", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(5)
    x_MK, w_ENK = torch.randn(30, 16, generator=gen), torch.randn(3, 8, 16, generator=gen)
    offsets = torch.tensor([0, 10, 10, 30])
    monkeypatch.setenv("DISTILL_KERNELS", "auto")
    assert torch.equal(grouped_mm(x_MK, w_ENK, offsets), grouped_mm_ref(x_MK, w_ENK, offsets))
    assert calls == []
    monkeypatch.setenv("DISTILL_KERNELS", "triton")
    grouped_mm(x_MK, w_ENK, offsets)
    assert calls == [1]
