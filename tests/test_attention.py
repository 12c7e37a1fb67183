"""model/attention.py on the CPU: what each fast path would receive (FlexAttention's block tables + mask_mod,
varlen's cu_seqlens) equals, element for element, the dense mask the twin uses; FlexAttention's forward (it runs
on the CPU in torch 2.13, eagerly) equals the twin within 1e-5; a packed row equals each document run alone
(output and grads) on the twin. GPU parity: tests/test_gpu_attention.py.

Dimensions: B batch, T tokens, H query heads, G key/value heads, Dh head width.
"""
import warnings

import pytest
import torch

from model import attention as A
from model.model import ModelArgs, Transformer

PAD = -1


def _docs(B, T, lengths_per_row, seed=0):
    """doc ids [B, T]: row b holds documents of the given lengths in order, then padding (PAD) to T."""
    doc = torch.full((B, T), PAD, dtype=torch.long)
    next_id = 0
    for b, lengths in enumerate(lengths_per_row):
        t = 0
        for n in lengths:
            doc[b, t:t + n] = next_id
            next_id, t = next_id + 1, t + n
        assert t <= T
    return doc


# awkward layouts: a document of length 1, a row all one document, a row of padding after its documents, a row
# that is nothing but padding; T not a multiple of the tile (and, with block=16, many tiles in a short row)
CASES = {
    "len1_and_padding": (3, 300, [[100, 1, 149], [300], [7, 1, 1, 200]]),
    "all_padding_row": (2, 77, [[], [30, 40]]),
    "exact_tiles": (2, 256, [[128, 128], [1, 255]]),
}


def _dense(doc, window):
    T = doc.shape[1]
    idx = torch.arange(T)
    return A.attention_mask(doc, doc, idx, idx, window)[:, 0]  # [B, T, T]


def _expand_block_mask(lo_BT, block):
    """The [B, T, T] mask FlexAttention computes from our tables: full tiles all allowed, partial tiles
    mask_mod, other tiles nothing."""
    B, T = lo_BT.shape
    kv_num, kv_idx, full_num, full_idx = A.block_tables(lo_BT, block)
    mod = A.interval_mask_mod(lo_BT, block)
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        mod_TT = mod(torch.tensor(b), None, q, k)
        for qb in range(kv_num.shape[2]):
            rows = slice(qb * block, (qb + 1) * block)
            for j in kv_idx[b, 0, qb, :kv_num[b, 0, qb]].tolist():
                cols = slice(j * block, (j + 1) * block)
                out[b, rows, cols] = mod_TT[rows, cols]
            for j in full_idx[b, 0, qb, :full_num[b, 0, qb]].tolist():
                out[b, rows, j * block:(j + 1) * block] = True
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 24, 1])  # 24 is shorter than most documents; 1 = itself only
@pytest.mark.parametrize("block", [A.BLOCK, 16])
def test_block_mask_equals_dense_mask(case, window, block):
    B, T, lengths = CASES[case]
    doc = _docs(B, T, lengths)
    lo = A.lowest_key(A.doc_spans(doc).start_BT, window)
    assert torch.equal(_expand_block_mask(lo, block), _dense(doc, window))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 24])
def test_block_tables_equal_torch_create_block_mask(case, window):
    """Our fixed-shape tables (device-side, no sync) are exactly what torch derives by evaluating the mask."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T, lengths = CASES[case]
    lo = A.lowest_key(A.doc_spans(_docs(B, T, lengths)).start_BT, window)
    theirs = create_block_mask(A.interval_mask_mod(lo), B, 1, T, T, device="cpu")
    ours = A.block_tables(lo)
    for o, t in zip(ours, (theirs.kv_num_blocks, theirs.kv_indices, theirs.full_kv_num_blocks,
                           theirs.full_kv_indices)):
        assert torch.equal(o, t)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 24, 1])
def test_cu_seqlens_equal_dense_mask(case, window):
    """varlen attends within [cu[r], cu[r+1]) of the flattened B*T tokens, causally, W - 1 keys back."""
    B, T, lengths = CASES[case]
    doc = _docs(B, T, lengths)
    sp = A.doc_spans(doc)
    cu = sp.cu_seqlens_R.long()
    assert cu[0] == 0 and cu[-1] == B * T and bool((cu[1:] > cu[:-1]).all())
    assert sp.max_seqlen == int((cu[1:] - cu[:-1]).max())
    run_N = torch.searchsorted(cu[1:], torch.arange(B * T), right=True).view(B, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    left = window - 1 if window is not None else T  # varlen's window_size = (W - 1, 0)
    mask = (run_N[:, :, None] == run_N[:, None, :]) & (j <= i) & (i - j <= left)
    assert torch.equal(mask, _dense(doc, window))


def test_device_starts_match_host_spans():
    B, T, lengths = CASES["len1_and_padding"]
    doc = _docs(B, T, lengths)
    assert torch.equal(A.device_starts(doc, B, T, "cpu"), A.doc_spans(doc).start_BT)
    assert torch.equal(A.device_starts(None, B, T, "cpu"), torch.zeros(B, T, dtype=torch.int32))


def test_doc_spans_rejects_a_split_document():
    doc = torch.tensor([[0, 0, 1, 1, 0, PAD]])
    with pytest.raises(ValueError, match="contiguous run"):
        A.doc_spans(doc)


def _qkv(B, T, H, G, Dh, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, Dh, generator=g) for n in (H, G, G))
    return [x.requires_grad_(grad) for x in (q, k, v)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 24])
def test_flex_forward_equals_twin_on_cpu(case, window):
    """GQA 4:1. Eager FlexAttention on the CPU applies our mask_mod (it evaluates it densely, so the tables are
    covered by the tests above, not by this one)."""
    B, T, lengths = CASES[case]
    doc = _docs(B, T, lengths)
    q, k, v = _qkv(B, T, 8, 2, 16)
    docs = A.Documents(doc, window, A.doc_spans(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": intended here
        o = A.FLEX_ATTN(q, k, v, block_mask=docs.block_mask(B, T, "cpu"), enable_gqa=True).transpose(1, 2)
    ref = A.doc_attention_ref(q, k, v, docs)
    assert (o - ref).abs().max().item() <= 1e-5


def test_model_forward_on_flex_equals_dense_twin(monkeypatch):
    """The model's plumbing to the fast path (Documents built once, block mask from host spans or from device
    starts), forced onto eager FlexAttention on the CPU, forward only."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=101,
                     sliding_window=40)
    m = Transformer(args).init_weights(generator=torch.Generator().manual_seed(0)).eval()
    B, T, lengths = CASES["len1_and_padding"]
    doc = _docs(B, T, lengths)
    tokens = torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(tokens, None, doc)
        monkeypatch.setenv("DISTILL_ATTENTION", "flex")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from_host = m(tokens, None, doc, doc_spans=A.doc_spans(doc))
            from_device = m(tokens, None, doc)
    assert (from_host - ref).abs().max().item() <= 1e-5
    assert (from_device - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("window", [None, 24])
def test_packed_equals_each_document_alone_on_twin(window):
    """Output and q/k/v gradients of a packed row equal each document's own causal attention (GQA 4:1)."""
    lengths = [50, 1, 70, 30]
    T = sum(lengths) + 9  # 9 padding tokens
    doc = _docs(1, T, [lengths])
    q, k, v = _qkv(1, T, 8, 2, 16, grad=True)
    g_o = torch.randn(1, T, 8, 16, generator=torch.Generator().manual_seed(2))
    o = A.doc_attention_ref(q, k, v, A.Documents(doc, window, A.doc_spans(doc)))
    (o * g_o).sum().backward()
    t = 0
    for n in lengths:
        qs, ks, vs = (x.detach()[:, :, t:t + n].clone().requires_grad_() for x in (q, k, v))
        w = window if window is not None and window < n else None
        alone = A.doc_attention_ref(qs, ks, vs, None if w is None else A.Documents(None, w))
        (alone * g_o[:, t:t + n]).sum().backward()
        torch.testing.assert_close(o[:, t:t + n], alone)  # fp32 defaults: rtol 1.3e-6, atol 1e-5
        for packed, single in ((q, qs), (k, ks), (v, vs)):
            torch.testing.assert_close(packed.grad[:, :, t:t + n], single.grad)
        t += n


def test_path_rule(monkeypatch):
    q, k = torch.zeros(1, 8, 4, 2), torch.zeros(1, 2, 4, 2)
    docs = A.Documents(torch.zeros(1, 4, dtype=torch.long), None)
    assert A.choose_path(q, k, None) == "causal"
    assert A.choose_path(q, k, A.Documents(None, None)) == "causal"
    assert A.choose_path(q, k, docs) == "dense"  # CPU
    assert A.choose_path(q, k, A.Documents(None, 3, mask_B1TS=torch.ones(1, 1, 4, 4, dtype=torch.bool))) == "dense"
    monkeypatch.setenv("DISTILL_ATTENTION", "flex")
    assert A.choose_path(q, k, docs) == "flex"
    monkeypatch.setenv("DISTILL_ATTENTION", "fast")
    with pytest.raises(ValueError, match="DISTILL_ATTENTION"):
        A.choose_path(q, k, docs)
    # CUDA: varlen needs host spans, a 16-bit dtype and (for GQA) enable_gqa; fp32 or no spans -> flex
    bf16 = torch.bfloat16
    varlen_ok = A.VARLEN_ATTN is not None and A.VARLEN_WINDOW
    fallback = "flex" if A.FLEX_ATTN is not None else "dense"
    assert A.pick_path(True, bf16, False, True) == ("varlen" if varlen_ok else fallback)
    assert A.pick_path(True, bf16, True, True) == ("varlen" if varlen_ok and A.VARLEN_GQA else fallback)
    assert A.pick_path(True, torch.float32, True, True) == fallback
    assert A.pick_path(True, bf16, True, False) == fallback
    assert A.pick_path(False, bf16, True, True) == "dense"
