"""GPU checks of model/attention.py (skipped without CUDA; written against torch 2.11 and 2.13): each fast path
against the dense twin in fp32 (forward and q/k/v gradients), bf16 error against the fp32 twin at most bf16
SDPA's, no host sync once compiled, and the model's three paths agreeing.

The bf16 rule: inputs rounded to bf16 once; the oracle is the twin in fp32 on those inputs; "bf16 SDPA" is SDPA's
flash kernel in bf16 run on each document alone (the same work without packing). Our error (relative Frobenius
norm) must be at most that one's x 1.1 + 1e-3. Run: TRITON_INTERPRET=0 .venv/bin/pytest -q tests/test_gpu_attention.py

Dimensions: B batch, T tokens, H query heads, G key/value heads, Dh head width.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from model import attention as A

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and compiled (not interpreted) Triton: FlexAttention")
DEV = "cuda"
LENGTHS = [[700, 1, 250, 1200, 97], [2048], [1500, 300]]  # row 2 ends in 248 padding tokens; T = 2248 (not x128)
T = 2248
H, G, Dh = 32, 8, 128


def _case(dtype, seed=0):
    doc = torch.full((len(LENGTHS), T), -1, dtype=torch.long)
    i = 0
    for b, row in enumerate(LENGTHS):
        t = 0
        for n in row:
            doc[b, t:t + n], i, t = i, i + 1, t + n
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(len(LENGTHS), n, T, Dh, generator=g).to(dtype) for n in (H, G, G))
    go = torch.randn(len(LENGTHS), T, H, Dh, generator=g).to(dtype)
    return doc, q, k, v, go


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run(path, doc, window, q, k, v, go, monkeypatch):
    """(o, dq, dk, dv) of doc_attention forced onto `path`, spans built on the host as the trainer does."""
    monkeypatch.setenv("DISTILL_ATTENTION", path)
    docs = A.Documents(doc.to(DEV), window, A.spans_to(doc, DEV))
    q, k, v = (x.to(DEV).requires_grad_() for x in (q, k, v))
    o = A.doc_attention(q, k, v, docs)
    o.backward(go.to(DEV))
    return o.detach(), q.grad, k.grad, v.grad


def _paths(dtype):
    out = []
    if A.FLEX_ATTN is not None:
        out.append("flex")
    if A.VARLEN_ATTN is not None and A.VARLEN_WINDOW and dtype != torch.float32:
        out.append("varlen")
    return out


@pytest.mark.parametrize("window", [None, 512])
def test_fp32_fast_path_equals_twin(window, monkeypatch):
    if "flex" not in _paths(torch.float32):
        pytest.skip("no FlexAttention in this torch (varlen has no fp32)")
    doc, q, k, v, go = _case(torch.float32)
    ours = _run("flex", doc, window, q, k, v, go, monkeypatch)
    ref = _run("dense", doc, window, q, k, v, go, monkeypatch)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref):
        assert _rel(a, b) <= 1e-5, name


def _sdpa_bf16_per_document(doc, q, k, v, go):
    """bf16 SDPA (flash) on each document alone, window None: (o, dq, dk, dv) packed back into rows."""
    q, k, v = (x.to(DEV).requires_grad_() for x in (q, k, v))
    o = torch.zeros(q.shape[0], T, H, Dh, device=DEV, dtype=q.dtype)
    for b, row in enumerate(LENGTHS):
        t = 0
        for n in row:
            s = slice(t, t + n)
            o[b, s] = F.scaled_dot_product_attention(q[b:b + 1, :, s], k[b:b + 1, :, s], v[b:b + 1, :, s],
                                                     is_causal=True, enable_gqa=True)[0].transpose(0, 1)
            t += n
    valid = doc.to(DEV) >= 0  # padding rows: not part of any document here
    (o * go.to(DEV) * valid[..., None, None]).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("path", ["flex", "varlen"])
def test_bf16_error_at_most_sdpa(path, monkeypatch):
    if path not in _paths(torch.bfloat16):
        pytest.skip(f"{path} is not available in torch {torch.__version__}")
    doc, q, k, v, go = _case(torch.bfloat16)
    valid = (doc >= 0)[..., None, None]
    go = go * valid  # compare on document tokens only (padding attends to padding, SDPA-per-doc skips it)
    oracle = _run("dense", doc, None, q.float(), k.float(), v.float(), go.float(), monkeypatch)
    ours = _run(path, doc, None, q, k, v, go, monkeypatch)
    sdpa = _sdpa_bf16_per_document(doc, q, k, v, go)
    vd = valid.to(DEV)
    for name, a, s, r in zip(("o", "dq", "dk", "dv"), ours, sdpa, oracle):
        if name == "o":
            a, s, r = a * vd, s * vd, r * vd
        else:  # [B, H, T, Dh]: padding tokens' grads differ by design (SDPA-per-doc never sees them)
            m = vd.permute(0, 2, 1, 3)
            a, s, r = a * m, s * m, r * m
        assert _rel(a, r) <= _rel(s, r) * 1.1 + 1e-3, name


def test_no_host_sync_once_warm(monkeypatch):
    doc, q, k, v, go = _case(torch.bfloat16)
    for path in _paths(torch.bfloat16):
        _run(path, doc, 512, q, k, v, go, monkeypatch)  # compile / autotune first
        spans = A.spans_to(doc, DEV)  # host work and a pinned non-blocking copy, before the guarded region
        qd, kd, vd = (x.to(DEV).requires_grad_() for x in (q, k, v))
        docd, god = doc.to(DEV), go.to(DEV)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            monkeypatch.setenv("DISTILL_ATTENTION", path)
            A.doc_attention(qd, kd, vd, A.Documents(docd, 512, spans)).backward(god)
            A.doc_attention(qd, kd, vd, A.Documents(docd, 512, None)).backward(god)  # device-derived starts
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_model_paths_agree(monkeypatch):
    """Student-sized toy model in bf16: auto with host spans, auto without (flex from device starts), the twin."""
    from model.model import ModelArgs, Transformer
    args = ModelArgs(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1024, vocab_size=1000,
                     sliding_window=1024)
    m = Transformer(args).init_weights(generator=torch.Generator().manual_seed(0)).to(DEV, torch.bfloat16)
    doc = _case(torch.bfloat16)[0]
    tokens = torch.randint(0, 1000, doc.shape, generator=torch.Generator().manual_seed(1))
    pos = torch.zeros_like(doc)
    for b in range(doc.shape[0]):  # positions restart per document
        start = A.doc_spans(doc[b:b + 1]).start_BT[0].long()
        pos[b] = torch.arange(T) - start
    with torch.no_grad():
        monkeypatch.setenv("DISTILL_ATTENTION", "dense")
        ref = m(tokens.to(DEV), pos.to(DEV), doc.to(DEV)).float()
        monkeypatch.setenv("DISTILL_ATTENTION", "auto")
        with_spans = m(tokens.to(DEV), pos.to(DEV), doc.to(DEV), doc_spans=A.spans_to(doc, DEV)).float()
        without = m(tokens.to(DEV), pos.to(DEV), doc.to(DEV)).float()
    assert _rel(with_spans, ref) <= 2e-2 and _rel(without, ref) <= 2e-2
