"""Routing microbenchmark: route_topk (Triton) against route_topk_ref (torch), Mixtral's shape.

Dimensions: T tokens, E experts, K experts per token, M = T*K routed pairs.
On a GPU: median µs per call (triton.testing.do_bench) and GB/s for both paths, forward and forward+backward,
plus a CUDA-graph capture of route_topk replayed and checked against eager (possible only with no host sync).
On a CPU: the torch path only, said so in the output. Usage: .venv/bin/python bench/bench_routing.py
"""
import torch

from bench._common import make_timer
from kernels.routing import route_topk, route_topk_ref

T, E, K = 16384, 8, 2
DTYPE = torch.bfloat16  # the router logits' dtype under bf16 autocast / bf16 weights


def _bytes_fwd(T, E, K, elt):
    # Logits read; probs_TE fp32, weights_TK fp32, ids_TK int32, counts E, offsets E+1, order and inverse M
    # int32 written. At T=16384, E=8, K=2, bf16: 256 KiB read + 512 + 128 + 128 + 256 KiB written = 1.28 MiB.
    # The kernel's own NB x E histogram (4 KiB) and the re-read of ids are not counted: not useful traffic.
    M = T * K
    return T * E * elt + T * E * 4 + 2 * T * K * 4 + (2 * E + 1) * 4 + 2 * M * 4


def _bytes_bwd(T, E, K, elt):
    # Reads probs, d probs, weights, d weights, ids; writes d logits.
    return 2 * T * E * 4 + 3 * T * K * 4 + T * E * elt


def _row(name, us, nbytes):
    gbs = nbytes / (us * 1e-6) / 1e9
    print(f"{name:<28} {T:>6} {E:>3} {K:>2} {str(DTYPE).replace('torch.', ''):>9} {us:>10.1f} {gbs:>9.1f}")


def _fwd_bwd(fn, logits_TE, dweights_TK, dprobs_TE):
    x = logits_TE.detach().requires_grad_(True)
    r = fn(x, K)
    torch.autograd.backward((r.weights_TK, r.probs_TE), (dweights_TK, dprobs_TE))


def main():
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    logits_TE = torch.randn(T, E, device=dev).to(DTYPE)
    dweights_TK = torch.randn(T, K, device=dev)
    dprobs_TE = torch.randn(T, E, device=dev)
    elt = logits_TE.element_size()
    fwd_bytes, bwd_bytes = _bytes_fwd(T, E, K, elt), _bytes_fwd(T, E, K, elt) + _bytes_bwd(T, E, K, elt)
    print(f"{'variant':<28} {'T':>6} {'E':>3} {'K':>2} {'dtype':>9} {'us/call':>10} {'GB/s':>9}")

    bench_ms = make_timer(cuda, cpu_reps=20)

    def bench(fn):
        return bench_ms(fn) * 1e3  # ms -> µs

    if not cuda:
        print("# CPU only (no CUDA device): the Triton kernel is not timed; torch path (route_topk_ref) only.")
        _row("torch ref fwd", bench(lambda: route_topk_ref(logits_TE, K)), fwd_bytes)
        _row("torch ref fwd+bwd", bench(lambda: _fwd_bwd(route_topk_ref, logits_TE, dweights_TK, dprobs_TE)),
             bwd_bytes)
        return

    with torch.no_grad():
        _row("triton route_topk fwd", bench(lambda: route_topk(logits_TE, K)), fwd_bytes)
        _row("torch ref fwd", bench(lambda: route_topk_ref(logits_TE, K)), fwd_bytes)
    _row("triton route_topk fwd+bwd", bench(lambda: _fwd_bwd(route_topk, logits_TE, dweights_TK, dprobs_TE)),
         bwd_bytes)
    _row("torch ref fwd+bwd", bench(lambda: _fwd_bwd(route_topk_ref, logits_TE, dweights_TK, dprobs_TE)),
         bwd_bytes)

    # CUDA graph: warm up (compiles the kernels) on a side stream, capture, replay, compare with eager.
    # Capture fails on any host sync (.item(), a data-dependent size), so success shows there is none.
    try:
        same = _graph_capture(logits_TE, bench, fwd_bytes)
        print(f"# CUDA graph capture of route_topk: ok; replay on new logits equals eager: {same}")
    except RuntimeError as e:  # a failed capture is a result: a host sync or an uncapturable op inside
        print(f"# CUDA graph capture of route_topk FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    print(f"# GPU: {torch.cuda.get_device_name(0)}; forward = 2 launches, backward = 1")


def _graph_capture(logits_TE, bench, fwd_bytes) -> bool:
    dev = logits_TE.device
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            route_topk(logits_TE, K)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = route_topk(logits_TE, K)
        logits_TE.copy_(torch.randn(T, E, device=dev).to(DTYPE))  # new inputs into the captured buffer
        graph.replay()
        eager = route_topk(logits_TE, K)
        same = all(torch.equal(a, b) for a, b in zip(captured, eager))
        _row("triton route_topk graph", bench(graph.replay), fwd_bytes)
    return same


if __name__ == "__main__":
    main()
