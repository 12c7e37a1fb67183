"""Document-causal attention microbenchmark: doc_attention (model/attention.py) against its dense-mask twin and
against SDPA on unpacked causal rows of the same length T.

Dimensions: B rows, T tokens per row, H query heads, G key/value heads, Dh head width.
Documents: lengths drawn uniformly from [100, 1500] (chat turns), packed into rows, the remainder padding.
Rows, each forward ("fwd") and forward+backward ("fwd+bwd"):
    ours (<path>)        doc_attention, the path its rule picks (varlen / flex on CUDA, dense on the CPU)
    flex / varlen        each fast path forced, where this torch has it (CUDA only)
    dense twin           doc_attention_ref: SDPA with the [B, 1, T, T] mask
    SDPA causal unpacked plain is_causal SDPA on the same [B, T] shape (flash on CUDA): the speed of light
GPU (--gpu: B=4, T=2048 and 4096, H=32, G=8, Dh=128, bf16): median ms, TFLOP/s counting only the causal,
same-document pairs (4·Dh·H FLOPs a pair forward, 2.5x that backward; unpacked SDPA counts its own T(T+1)/2
pairs a row), peak memory allocated beyond the inputs. CPU (default: B=2, T=1024, H=8, G=2, Dh=64, fp32,
documents scaled to 50-750): time and peak-RSS-growth ratios to the SDPA causal row only, each variant in a
fresh process; no absolute figures. Timings are reported, never asserted.
Usage: .venv/bin/python bench/bench_attention.py [--gpu]
"""
import argparse
import json
import os
import random
import subprocess
import sys

import torch

from bench._common import make_timer, peak_rss, reset_peak_rss
from model import attention as A

GPU_SHAPE = dict(B=4, H=32, G=8, Dh=128, Ts=(2048, 4096), dtype="bfloat16")
CPU_SHAPE = dict(B=2, H=8, G=2, Dh=64, Ts=(1024,), dtype="float32")
DOC_LEN = (100, 1500)


def packed_docs(B, T, seed=0):
    """doc ids [B, T]: documents of uniform length in DOC_LEN x min(1, T / 2048) (cut at T), then padding (-1):
    the CPU's shorter rows keep the GPU rows' documents per row."""
    rng = random.Random(seed)
    lo, hi = (max(1, int(n * min(1.0, T / 2048))) for n in DOC_LEN)
    doc = torch.full((B, T), -1, dtype=torch.long)
    i = 0
    for b in range(B):
        t = 0
        while T - t >= lo:
            n = min(rng.randint(lo, hi), T - t)
            doc[b, t:t + n], i, t = i, i + 1, t + n
    return doc


def useful_pairs(doc):
    """Causal same-document (query, key) pairs, padding excluded."""
    _, counts = torch.unique(doc[doc >= 0], return_counts=True)
    return int((counts * (counts + 1) // 2).sum())


def variants(cuda):
    out = ["ours", "dense", "causal"]
    if cuda and A.FLEX_ATTN is not None:
        out.insert(1, "flex")
    if cuda and A.VARLEN_ATTN is not None and A.VARLEN_WINDOW:
        out.insert(1, "varlen")
    return out


def run_one(variant, mode, B, T, H, G, Dh, dtype, device):
    """(ms, peak bytes beyond the inputs, label) of one variant."""
    dtype = getattr(torch, dtype)
    cuda = device == "cuda"
    doc = packed_docs(B, T)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, Dh, generator=g).to(device, dtype).requires_grad_(mode == "fwd+bwd")
               for n in (H, G, G))
    go = torch.randn(B, T, H, Dh, generator=g).to(device, dtype)
    spans = A.spans_to(doc, device)
    docs_dev = doc.to(device)
    if variant in ("flex", "varlen", "dense"):
        os.environ["DISTILL_ATTENTION"] = variant

    def fwd():
        if variant == "causal":
            return A.doc_attention(q, k, v, None)
        return A.doc_attention(q, k, v, A.Documents(docs_dev, None, spans))  # a fresh pattern per call, as a step
    label = variant
    if variant == "ours":
        label = f"ours ({A.choose_path(q, k, A.Documents(docs_dev, None, spans))})"

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fwd()
        else:
            fwd().backward(go)
    bench = make_timer(cuda, cpu_reps=3)
    step()  # compile / warm up before the memory mark
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = bench(step, grads=(q, k, v))
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = reset_peak_rss()
        ms = bench(step, grads=(q, k, v))
        peak = peak_rss() - base
    return ms, peak, label


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU shapes (needs CUDA)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of one CPU run in a fresh process
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(**json.loads(a.one))))
        return
    cuda = torch.cuda.is_available()
    if a.gpu and not cuda:
        sys.exit("--gpu needs a CUDA device")
    shape = GPU_SHAPE if cuda else CPU_SHAPE
    B, H, G, Dh, dtype = (shape[x] for x in ("B", "H", "G", "Dh", "dtype"))
    print(f"torch {torch.__version__}; paths here: varlen={A.VARLEN_ATTN is not None} (window={A.VARLEN_WINDOW}, "
          f"gqa={A.VARLEN_GQA}), flex={A.FLEX_ATTN is not None}; B={B} H={H} G={G} Dh={Dh} {dtype}, "
          f"documents {DOC_LEN[0]}-{DOC_LEN[1]} tokens x min(1, T / 2048)")
    if not cuda:
        print("CPU: ratios to 'causal' (SDPA on unpacked rows) only; GPU figures missing (no CUDA device)")
    for T in shape["Ts"]:
        doc = packed_docs(B, T)
        pairs = useful_pairs(doc)
        print(f"\nT={T}: {int((doc >= 0).sum())} document tokens in {len(torch.unique(doc[doc >= 0]))} documents, "
              f"{pairs / (B * T * (T + 1) / 2):.2f} of the causal pairs")
        for mode in ("fwd", "fwd+bwd"):
            rows = []
            for variant in variants(cuda):
                kw = dict(variant=variant, mode=mode, B=B, T=T, H=H, G=G, Dh=Dh, dtype=dtype,
                          device="cuda" if cuda else "cpu")
                if cuda:
                    rows.append(run_one(**kw))
                    os.environ.pop("DISTILL_ATTENTION", None)
                else:  # peak RSS is per process: one fresh process a variant
                    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(kw)], check=True,
                                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."})
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            ref_ms, ref_peak = rows[-1][0], max(rows[-1][1], 1)
            for (ms, peak, label), variant in zip(rows, variants(cuda)):
                if cuda:
                    n = B * T * (T + 1) // 2 if variant == "causal" else pairs
                    flops = 4 * Dh * H * n * (1 if mode == "fwd" else 3.5)
                    print(f"  {mode:8s} {label:22s} {ms:9.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s "
                          f"{peak / 2**30:7.2f} GiB")
                else:
                    print(f"  {mode:8s} {label:22s} time x{ms / ref_ms:6.2f}   peak RSS growth x{peak / ref_peak:6.2f}")


if __name__ == "__main__":
    main()
