"""route_topk (the Triton path, run by the interpreter on CPU tensors) against route_topk_ref and transformers'
Mixtral router: ids, weights, probs, the permutation metadata, and the gradient wrt the router logits.

Dimensions: T tokens, E experts, K experts per token, M = T*K routed pairs, D hidden (HF gate input).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere: CPU tensors, no GPU

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from kernels.routing import Routing, route_topk, route_topk_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    """The public op picks its path from the tensors' device (kernels.use_triton): on CPU tensors it takes the
    torch twin unless DISTILL_KERNELS=triton, which these tests set so that the interpreter runs the kernel."""
    monkeypatch.setenv("DISTILL_KERNELS", "triton")

EPS = torch.finfo(torch.float32).eps
# Both paths compute in fp32 from the same input, so the tolerances are fp32 ones whatever the input dtype:
# a prob or weight is one exp and one division (plus a sum of at most E terms) away from the other path's.
GRAD_TOL = {torch.float32: 1e-6, torch.float16: 2e-3}  # the fp16 grad is the fp32 one rounded (ulp 2^-11)


def _distinct_logits(T, E, dtype, seed):
    """Per row a random permutation of 0, 0.37, ..., (E-1)*0.37 plus a row offset: no two experts of a row are
    closer than 0.37 in logit (a prob ratio of 1.45), so no rounding can reorder them, in fp16 either."""
    g = torch.Generator().manual_seed(seed)
    rank_TE = torch.argsort(torch.rand(T, E, generator=g), dim=1).float()
    return (rank_TE * 0.37 + torch.randn(T, 1, generator=g)).to(dtype)


def _check_metadata(r: Routing, T, E, K):
    M = T * K
    ids_M = r.ids_TK.long().reshape(M)
    order_M, inverse_M = r.order_M.long(), r.inverse_M.long()
    assert r.ids_TK.dtype == r.counts_E.dtype == r.offsets_E1.dtype == r.order_M.dtype == torch.int32
    assert r.inverse_M.dtype == torch.int32
    assert r.ids_TK.shape == (T, K) and r.counts_E.shape == (E,) and r.offsets_E1.shape == (E + 1,)
    assert ((ids_M >= 0) & (ids_M < E)).all()
    assert (r.ids_TK.sort(dim=1).values.diff(dim=1) != 0).all(), "an expert chosen twice for one token"
    assert torch.equal(order_M.sort().values, torch.arange(M)), "order_M is not a permutation"
    assert torch.equal(inverse_M[order_M], torch.arange(M)), "inverse o order != identity"
    assert torch.equal(r.counts_E.long(), torch.bincount(ids_M, minlength=E))
    assert r.offsets_E1[0] == 0 and torch.equal(r.offsets_E1[1:].long(), r.counts_E.long().cumsum(0))
    # Sorted by expert, ascending pair index within an expert <=> the key expert*M + p strictly increases.
    assert (torch.diff(ids_M[order_M] * M + order_M) > 0).all()


def _assert_same(a: Routing, b: Routing, E):
    for name in ("ids_TK", "counts_E", "offsets_E1", "order_M", "inverse_M"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.weights_TK, b.weights_TK, rtol=0, atol=2 * E * EPS)
    torch.testing.assert_close(a.probs_TE, b.probs_TE, rtol=0, atol=2 * E * EPS)


def _grads(fn, logits_TE, k, dweights_TK, dprobs_TE):
    x = logits_TE.detach().requires_grad_(True)
    r = fn(x, k)
    (grad,) = torch.autograd.grad((r.weights_TK * dweights_TK).sum() + (r.probs_TE * dprobs_TE).sum(), x)
    return grad


SHAPES = [(T, E, k) for T in (1, 7, 33, 371) for E in (2, 4, 8) for k in sorted({1, 2, E})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,E,k", SHAPES, ids=[f"T{T}-E{E}-k{k}" for T, E, k in SHAPES])
def test_matches_ref(T, E, k, dtype):
    logits_TE = _distinct_logits(T, E, dtype, seed=T * 100 + E * 10 + k)
    r = route_topk(logits_TE, k)
    ref = route_topk_ref(logits_TE, k)
    _check_metadata(r, T, E, k)
    _assert_same(r, ref, E)
    assert r.weights_TK.dtype == r.probs_TE.dtype == torch.float32
    torch.testing.assert_close(r.weights_TK.sum(1), torch.ones(T), rtol=0, atol=2 * k * EPS)

    g = torch.Generator().manual_seed(T + E + k)
    dweights_TK, dprobs_TE = torch.randn(T, k, generator=g), torch.randn(T, E, generator=g)
    grad = _grads(route_topk, logits_TE, k, dweights_TK, dprobs_TE)
    grad_ref = _grads(route_topk_ref, logits_TE, k, dweights_TK, dprobs_TE)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=0, atol=GRAD_TOL[dtype])


@pytest.mark.parametrize("used", ["weights", "probs"])
def test_grad_from_one_output(used):
    # The other output's gradient arrives as materialised zeros; it must contribute nothing.
    T, E, k = 33, 8, 2
    logits_TE = _distinct_logits(T, E, torch.float32, seed=1)
    dweights_TK = torch.randn(T, k) * (used == "weights")
    dprobs_TE = torch.randn(T, E) * (used == "probs")
    x = logits_TE.clone().requires_grad_(True)
    r = route_topk(x, k)
    out = r.weights_TK if used == "weights" else r.probs_TE
    (grad,) = torch.autograd.grad((out * (dweights_TK if used == "weights" else dprobs_TE)).sum(), x)
    grad_ref = _grads(route_topk_ref, logits_TE, k, dweights_TK, dprobs_TE)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-6)


def _hf_router(E, k, D, seed):
    cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=2 * D, num_local_experts=E,
                                     num_experts_per_tok=k, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=32)
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
    with torch.no_grad():  # transformers 5.x leaves the router weight uninitialised (torch.empty)
        block.gate.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(seed)))
    return block.gate


def _hf_routing(gate, hidden_TD, k):
    """(logits_TE, weights_TK, ids_TK) from HF's own code: transformers 5.x's MixtralTopKRouter returns them;
    4.x's gate is a bare nn.Linear and the block does softmax(fp32) -> topk -> renormalise, repeated here."""
    out = gate(hidden_TD)
    if isinstance(out, tuple):
        logits_TE, weights_TK, ids_TK = out
    else:
        logits_TE = out
        weights_TK, ids_TK = torch.topk(torch.softmax(logits_TE.float(), dim=-1), k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return logits_TE, weights_TK, ids_TK


@pytest.mark.parametrize("T,E,k", [(7, 8, 2), (64, 8, 2), (33, 4, 1), (33, 4, 4)])
def test_matches_hf_mixtral(T, E, k):
    D = 16
    gate = _hf_router(E, k, D, seed=T + E)
    hidden_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(k)).requires_grad_(True)
    logits_TE, weights_hf_TK, ids_hf_TK = _hf_routing(gate, hidden_TD, k)
    r = route_topk(logits_TE, k)
    assert torch.equal(r.ids_TK.long(), ids_hf_TK)
    torch.testing.assert_close(r.weights_TK, weights_hf_TK, rtol=0, atol=2 * E * EPS)
    _check_metadata(r, T, E, k)

    # Gradient to the gate input through the weights and, as Mixtral's aux loss sees them, the fp32 softmax.
    dweights_TK, dprobs_TE = torch.randn(T, k), torch.randn(T, E)
    loss = (r.weights_TK * dweights_TK).sum() + (r.probs_TE * dprobs_TE).sum()
    loss_hf = (weights_hf_TK * dweights_TK).sum() + (torch.softmax(logits_TE.float(), -1) * dprobs_TE).sum()
    (grad,) = torch.autograd.grad(loss, hidden_TD, retain_graph=True)  # the gate matmul is shared
    (grad_hf,) = torch.autograd.grad(loss_hf, hidden_TD)
    torch.testing.assert_close(grad, grad_hf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [route_topk, route_topk_ref], ids=["triton", "ref"])
def test_expert_without_tokens(fn):
    T, E, k = 33, 8, 2
    logits_TE = _distinct_logits(T, E, torch.float32, seed=2)
    logits_TE[:, 5] = -30.0  # expert 5 is last in every row
    r = fn(logits_TE, k)
    _check_metadata(r, T, E, k)
    assert r.counts_E[5] == 0 and r.offsets_E1[5] == r.offsets_E1[6]
    _assert_same(r, route_topk_ref(logits_TE, k), E)


@pytest.mark.parametrize("k", [1, 2])
def test_all_tokens_to_one_expert(k):
    T, E = 37, 4
    logits_TE = _distinct_logits(T, E, torch.float32, seed=3)
    logits_TE[:, 2] = 30.0  # expert 2 is first in every row
    r = route_topk(logits_TE, k)
    _check_metadata(r, T, E, k)
    assert torch.equal(r.ids_TK[:, 0], torch.full((T,), 2, dtype=torch.int32))
    assert r.counts_E[2] == T and r.counts_E.sum() == T * k
    # k=1: every pair goes to expert 2, so the order is the identity; slot 0 of token t is pair t*k.
    assert torch.equal(r.order_M[r.offsets_E1[2]:r.offsets_E1[3]].long(), torch.arange(T) * k)
    _assert_same(r, route_topk_ref(logits_TE, k), E)


@pytest.mark.parametrize("E,k", [(4, 2), (8, 3), (5, 5)])
def test_ties_lower_expert_first(E, k):
    T = 40
    logits_TE = torch.randint(0, 3, (T, E), generator=torch.Generator().manual_seed(E)).float()
    logits_TE[0] = 1.0  # an all-equal row: slots take experts 0, 1, ..., k-1
    r, ref = route_topk(logits_TE, k), route_topk_ref(logits_TE, k)
    assert torch.equal(r.ids_TK[0], torch.arange(k, dtype=torch.int32))
    # The rule, spelled out: sort by (-logit, expert) and take the first k.
    expect_TK = torch.tensor([sorted(range(E), key=lambda e: (-row[e], e))[:k] for row in logits_TE.tolist()],
                             dtype=torch.int32)
    assert torch.equal(r.ids_TK, expect_TK) and torch.equal(ref.ids_TK, expect_TK)
    _check_metadata(r, T, E, k)
    _assert_same(r, ref, E)


def test_odd_layouts_and_many_blocks():
    # A strided (non-contiguous) input, a non-power-of-two E, bf16 input; and many loop steps in the metadata
    # kernel's histogram scan (E=256 -> 8 tokens per block and 4 blocks per step: 600 tokens -> 19 steps).
    for logits_TE, k in [(_distinct_logits(9, 21, torch.float32, seed=4)[:, ::3], 3),
                         (_distinct_logits(50, 6, torch.bfloat16, seed=5), 2),
                         (_distinct_logits(600, 256, torch.float32, seed=6), 2)]:
        T, E = logits_TE.shape
        r = route_topk(logits_TE, k)
        _check_metadata(r, T, E, k)
        _assert_same(r, route_topk_ref(logits_TE, k), E)


@pytest.mark.parametrize("fn", [route_topk, route_topk_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("logits,k,match", [
    (torch.randn(4), 1, "2-D"),
    (torch.randn(2, 3, 4), 1, "2-D"),
    (torch.randn(4, 4), 0, "k=0"),
    (torch.randn(4, 4), 5, "k=5"),
    (torch.randn(4, 4), 2.0, "k=2.0"),
    (torch.randint(0, 5, (4, 4)), 1, "float"),
], ids=["1d", "3d", "k0", "k_gt_E", "k_float", "int_logits"])
def test_value_errors(fn, logits, k, match):
    with pytest.raises(ValueError, match=match):
        fn(logits, k)


def test_public_op_picks_the_torch_twin_on_cpu(monkeypatch):
    """Kernel choice lives in kernels/: route_topk on CPU tensors in auto mode is route_topk_ref (the Triton
    Function is never entered); forced to Triton it is."""
    from kernels import routing
    calls = []
    real = routing.RouteTopKFunction.apply
    monkeypatch.setattr(routing.RouteTopKFunction, "apply", lambda *a: calls.append(1) or real(*a))
    logits_TE = torch.randn(37, 8, generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("DISTILL_KERNELS", "auto")
    for got, want in zip(route_topk(logits_TE, 2), route_topk_ref(logits_TE, 2)):
        assert torch.equal(got, want)
    assert calls == []
    monkeypatch.setenv("DISTILL_KERNELS", "triton")
    route_topk(logits_TE, 2)
    assert calls == [1]
