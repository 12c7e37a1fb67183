"""Document-causal attention for packed rows: causal, same document, Mistral's sliding window, GQA, without a
T x T mask on CUDA.

Dimensions: B batch, T tokens (queries = keys in training), S keys, H query heads, G key/value heads, Dh head
width, R documents over the whole batch, N = B*T flattened tokens, W sliding window, BS block-mask tile, nQ / nK
query / key tiles (ceil(T / BS)).

Why: the dense twin (`doc_attention_ref`) hands SDPA a [B, 1, T, T] boolean mask. On CUDA the flash backend
refuses any mask and the memory-efficient one has no GQA, so torch runs the math backend: bf16 upcast to fp32
and all T x T scores, 32 heads x 4096^2 x 4 B = 2 GiB per sequence at T = 4096, no causal skipping.

A document is a maximal run of equal ids in a row; `doc_spans` checks on the host that every id is one run (the
packer in train/data.py places each document contiguously, padding last), so runs and the twin's id equality
give the same mask. Token t of a row may attend to key j iff  lo[t] <= j <= t,  lo[t] = max(start[t], t - W + 1),
start[t] the row index of its document's first token: an interval per query, which both fast paths use.

Paths, in the order `choose_path` tries them on CUDA (the CPU always runs the dense twin: in torch 2.13
FlexAttention has no CPU backward and varlen attention no CPU kernel):
  1. "varlen": torch.nn.attention.varlen.varlen_attn (FlashAttention-2 on [N, H, Dh]) with cu_seqlens and the
     longest document, both built on the host by `doc_spans`. Chosen first because it skips masked work at
     token granularity (FlexAttention at BS = 128 tiles, evaluating the mask in every partial tile), needs no
     compile and no block tables. Needs bf16/fp16, `window_size` (causality and W; torch >= 2.11) and, for
     GQA, `enable_gqa` (added after 2.11: on the GPU image's 2.11 a GQA model takes path 2, not a copy of K/V
     widened H/G times, which autograd would keep per layer: 0.4 GB a layer at B*T = 32k, H = 32, G = 8).
  2. "flex": torch.compile'd FlexAttention with a BlockMask whose tables (`block_tables`) are computed with
     fixed-shape tensor ops from `start` on the device, once per forward: no host sync, any dtype (fp32 too),
     GQA and W in the mask. Used without host spans too (the model derives `start` on the device).
  3. "dense": the twin, SDPA with the [B, 1, T, T] mask (the CPU, decoding, a torch without either).
Rows without documents and without an active window take SDPA's is_causal flash path ("causal").
`DISTILL_ATTENTION=auto|varlen|flex|dense` forces a path (a debugging switch; auto is the rule above).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BLOCK = 128  # FlexAttention's sparse tile (its default): tables are B x nQ x nK, 8 x 32 x 32 ints at T = 4096


# ------------------------------------------------------------------------------------------ import-time probes

def _probe_varlen():
    """(varlen_attn or None, has window_size, has enable_gqa), from the signature of this torch's varlen_attn."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False, False
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


def _probe_flex():
    """(flex_attention, BlockMask) or (None, None): needs enable_gqa and BlockMask.from_kv_blocks(seq_lengths=)
    (torch >= 2.6), so that T need not be a multiple of BLOCK."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:
        return None, None
    if ("enable_gqa" not in inspect.signature(flex_attention).parameters
            or "seq_lengths" not in inspect.signature(BlockMask.from_kv_blocks).parameters):
        return None, None
    return flex_attention, BlockMask


VARLEN_ATTN, VARLEN_WINDOW, VARLEN_GQA = _probe_varlen()
FLEX_ATTN, BLOCK_MASK = _probe_flex()
_flex_compiled = None  # torch.compile(flex_attention), made on first CUDA use: eager flex materialises scores
_PATHS = ("auto", "varlen", "flex", "dense")


# ------------------------------------------------------------------------------------ host-built boundaries

@dataclass
class DocSpans:
    """Where the packed documents of a batch lie, built on the host from the CPU doc ids by `doc_spans` and
    moved with the batch (`.to(device, non_blocking=True)`), so no forward waits for the device to find them."""
    start_BT: torch.Tensor     # int32: row index of the first token of each token's document
    cu_seqlens_R: torch.Tensor  # int32 [R + 1]: document boundaries in the flattened B*T order (varlen's input)
    max_seqlen: int            # longest document (a host int: varlen's grid size)

    def to(self, device, non_blocking: bool = False) -> DocSpans:
        return DocSpans(self.start_BT.to(device, non_blocking=non_blocking),
                        self.cu_seqlens_R.to(device, non_blocking=non_blocking), self.max_seqlen)

    def pin_memory(self) -> DocSpans:
        return DocSpans(self.start_BT.pin_memory(), self.cu_seqlens_R.pin_memory(), self.max_seqlen)


def _run_starts(doc_BT):
    """(is_start_BT, start_BT int32): where a run of equal ids begins, and each token's run start. Fixed-shape
    ops only (cummax), so on the device this needs no sync."""
    B, T = doc_BT.shape
    is_start_BT = torch.ones(B, T, dtype=torch.bool, device=doc_BT.device)
    is_start_BT[:, 1:] = doc_BT[:, 1:] != doc_BT[:, :-1]
    idx_T = torch.arange(T, device=doc_BT.device)
    start_BT = torch.where(is_start_BT, idx_T, 0).cummax(dim=1).values
    return is_start_BT, start_BT.to(torch.int32)


def doc_spans(doc_ids_BT: torch.Tensor) -> DocSpans:
    """DocSpans of a CPU batch (PackedBatch.doc_ids_BT before it is copied to the device): ~B*T integer ops on
    the host, no device work. Raises ValueError if an id is split into several runs of a row (the twin's mask
    joins them, the fast paths would not)."""
    if doc_ids_BT.device.type != "cpu":
        raise ValueError(f"doc_spans needs the CPU doc ids (got a tensor on {doc_ids_BT.device}): build the spans "
                         f"from the loader's batch before it is copied to the device, so no step waits for it")
    doc_BT = doc_ids_BT.long()
    B, T = doc_BT.shape
    is_start_BT, start_BT = _run_starts(doc_BT)
    sorted_BT = doc_BT.sort(dim=1).values
    distinct_B = (sorted_BT[:, 1:] != sorted_BT[:, :-1]).sum(1) + 1
    runs_B = is_start_BT.sum(1)
    if not torch.equal(runs_B, distinct_B):
        b = int((runs_B != distinct_B).nonzero()[0, 0])
        raise ValueError(f"doc_ids_BT row {b} has {int(runs_B[b])} runs of ids but {int(distinct_B[b])} distinct "
                         f"ids: each document (and the padding) must be one contiguous run of its row")
    starts_R = is_start_BT.reshape(-1).nonzero().squeeze(1)  # a host op on a CPU tensor: no device sync
    cu_R = torch.cat([starts_R, torch.tensor([B * T])]).to(torch.int32)
    return DocSpans(start_BT, cu_R, int((cu_R[1:] - cu_R[:-1]).max()))


def spans_to(doc_ids_BT: torch.Tensor | None, device) -> DocSpans | None:
    """`doc_spans` of a CPU batch, copied to `device` (pinned, non-blocking on CUDA: the copy queues behind the
    device's work instead of waiting for it). None when there are no ids or they are already off the host (the
    model then derives what it needs on the device)."""
    if doc_ids_BT is None or doc_ids_BT.device.type != "cpu":
        return None
    spans = doc_spans(doc_ids_BT)
    if torch.device(device).type == "cuda":
        return spans.pin_memory().to(device, non_blocking=True)
    return spans.to(device)


def device_starts(doc_ids_BT: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """start_BT where no host spans were passed: from the doc ids on their device (no sync), or 0 (one
    document per row). Assumes what `doc_spans` checks (each id one run)."""
    if doc_ids_BT is None:
        return torch.zeros(B, T, dtype=torch.int32, device=device)
    return _run_starts(doc_ids_BT)[1]


# --------------------------------------------------------------------------------------------- the masks

def attention_mask(q_doc_BT, k_doc_BS, q_idx_T, k_idx_S, sliding_window: int | None):
    """Boolean [B, 1, T, S], True = may attend: causal, same document, and (Mistral) key within the window: the
    dense twin's mask.

    The window follows HF: query i sees key j iff i - window < j <= i. Indices are row offsets, which inside one
    packed document differ exactly as positions do. Every query sees at least itself, so no row is all-masked.
    """
    allowed_TS = k_idx_S[None, :] <= q_idx_T[:, None]
    if sliding_window is not None:
        allowed_TS = allowed_TS & (k_idx_S[None, :] > q_idx_T[:, None] - sliding_window)
    same_doc_BTS = q_doc_BT[:, :, None] == k_doc_BS[:, None, :]
    return (allowed_TS[None] & same_doc_BTS)[:, None]


def lowest_key(start_BT: torch.Tensor, window: int | None) -> torch.Tensor:
    """lo_BT int32: the first key each query may see (its document's start, or W - 1 keys back)."""
    if window is None:
        return start_BT
    idx_T = torch.arange(start_BT.shape[1], device=start_BT.device, dtype=torch.int32)
    return torch.maximum(start_BT, idx_T - (window - 1))


def block_tables(lo_BT: torch.Tensor, block: int = BLOCK):
    """FlexAttention's kv tables for the mask  lo[t] <= j <= t  (j, t < T): (kv_num [B, 1, nQ], kv_idx
    [B, 1, nQ, nK], full_num, full_idx), int32. A tile is "full" (no mask evaluated) when every query and key in
    it is inside T and allowed; "partial" when some pair is allowed. Tiles that cross T are never full, as in
    torch's create_block_mask. Fixed-shape ops: B*T*nK compares (1M at B=8, T=4096), no sync."""
    B, T = lo_BT.shape
    nQ = nK = -(-T // block)
    dev = lo_BT.device
    pad = nQ * block - T
    q_Tp = torch.arange(nQ * block, device=dev)
    # padded queries get an empty interval (lo = t + 1): they are never allowed
    lo_BTp = torch.cat([lo_BT.long(), (q_Tp[T:] + 1).expand(B, pad)], dim=1)
    lo_BQb = lo_BTp.view(B, nQ, block)
    q_Qb = q_Tp.view(nQ, block)
    k0_K = torch.arange(nK, device=dev) * block
    k1_K = (k0_K + block - 1).clamp(max=T - 1)
    # any: some query t of the tile has an allowed key in [k0, k1]: max(lo, k0) <= min(t, k1), t < T
    lo_hi = torch.maximum(lo_BQb[..., None], k0_K)
    t_hi = torch.minimum(q_Qb[..., None], k1_K)
    valid_Qb = (q_Qb < T)[..., None]
    any_BQK = ((lo_hi <= t_hi) & valid_Qb).any(dim=2)
    # full: every query of the tile is inside T and sees all of [k0, k0 + BS) (which is then inside T too)
    full_BQK = ((lo_BQb[..., None] <= k0_K) & (q_Qb[..., None] >= k0_K + block - 1) & valid_Qb).all(dim=2)
    partial_BQK = any_BQK & ~full_BQK

    def ordered(dense_BQK):  # torch's layout: count, then the listed tiles first in ascending order
        num = dense_BQK.sum(-1).to(torch.int32)
        idx = torch.argsort(dense_BQK.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[:, None].contiguous(), idx[:, None].contiguous()

    return (*ordered(partial_BQK), *ordered(full_BQK))


def interval_mask_mod(lo_BT: torch.Tensor, block: int = BLOCK):
    """FlexAttention mask_mod for  lo[t] <= j <= t. lo is padded to the tile grid (padded queries see nothing) so
    the kernel may evaluate it on the last partial tile without reading past the tensor."""
    B, T = lo_BT.shape
    pad = -(-T // block) * block - T
    idx = torch.arange(T, T + pad, device=lo_BT.device, dtype=lo_BT.dtype)
    lo_BTp = torch.cat([lo_BT, (idx + 1).expand(B, pad)], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= lo_BTp[b, q_idx])
    return mask_mod


def build_block_mask(lo_BT: torch.Tensor, block: int = BLOCK):
    """The BlockMask for  lo[t] <= j <= t  on lo's device (q-side tables derived by torch, on the device)."""
    T = lo_BT.shape[1]
    kv_num, kv_idx, full_num, full_idx = block_tables(lo_BT, block)
    return BLOCK_MASK.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                     mask_mod=interval_mask_mod(lo_BT, block), seq_lengths=(T, T))


@dataclass
class Documents:
    """The attention pattern of one forward, shared by every layer; each path's mask is built on first use and
    kept for the other layers (one block mask or one dense mask per forward, not per layer)."""
    doc_BT: torch.Tensor | None      # on the activations' device; None = one document per row
    window: int | None               # None when every key is inside the window
    spans: DocSpans | None = None    # host-built (on the device now); enables the varlen path
    mask_B1TS: torch.Tensor | None = None  # decoding against a KV cache (S != T): this dense mask, always
    _cache: dict = field(default_factory=dict, repr=False)

    def start_BT(self, B, T, device):
        if self.spans is not None:
            return self.spans.start_BT
        if "start" not in self._cache:
            self._cache["start"] = device_starts(self.doc_BT, B, T, device)
        return self._cache["start"]

    def dense_mask(self, B, T, device):
        if self.mask_B1TS is not None:
            return self.mask_B1TS
        if "dense" not in self._cache:
            doc_BT = self.doc_BT if self.doc_BT is not None else torch.zeros(B, T, dtype=torch.long, device=device)
            idx_T = torch.arange(T, device=device)
            self._cache["dense"] = attention_mask(doc_BT, doc_BT, idx_T, idx_T, self.window)
        return self._cache["dense"]

    def block_mask(self, B, T, device):
        if "block" not in self._cache:
            self._cache["block"] = build_block_mask(lowest_key(self.start_BT(B, T, device), self.window))
        return self._cache["block"]


# ------------------------------------------------------------------------------------------------- the op

def choose_path(q_BHTDh, k_BGTDh, docs: Documents | None) -> str:
    """"causal", "varlen", "flex" or "dense" for these inputs (module doc: the rule and its reasons)."""
    forced = os.environ.get("DISTILL_ATTENTION", "auto").lower()
    if forced not in _PATHS:
        raise ValueError(f"DISTILL_ATTENTION={forced!r} is not one of {_PATHS}; unset it or pick one of those")
    if docs is None or (docs.doc_BT is None and docs.window is None):
        return "causal"
    if docs.mask_B1TS is not None:
        return "dense"
    if forced != "auto":
        return forced
    return pick_path(q_BHTDh.is_cuda, q_BHTDh.dtype, q_BHTDh.shape[1] != k_BGTDh.shape[1], docs.spans is not None)


def pick_path(cuda: bool, dtype: torch.dtype, gqa: bool, host_spans: bool) -> str:
    """The rule of the module doc for a packed batch, given what this torch has (VARLEN_*, FLEX_ATTN)."""
    if not cuda:
        return "dense"
    if (VARLEN_ATTN is not None and VARLEN_WINDOW and host_spans and dtype in (torch.bfloat16, torch.float16)
            and (VARLEN_GQA or not gqa)):
        return "varlen"
    if FLEX_ATTN is not None:
        return "flex"
    return "dense"


def doc_attention(q_BHTDh, k_BGTDh, v_BGTDh, docs: Documents | None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(Dh)) v under `docs` (None = plain causal), GQA by head groups; returns o [B, T, H, Dh].
    Picks its path with `choose_path`."""
    path = choose_path(q_BHTDh, k_BGTDh, docs)
    B, H, T, Dh = q_BHTDh.shape
    G = k_BGTDh.shape[1]
    if path == "causal":
        o = F.scaled_dot_product_attention(q_BHTDh, k_BGTDh, v_BGTDh, is_causal=True, enable_gqa=H != G)
        return o.transpose(1, 2)
    if path == "dense":
        return doc_attention_ref(q_BHTDh, k_BGTDh, v_BGTDh, docs)
    if path == "varlen":
        if VARLEN_ATTN is None or docs.spans is None:
            raise ValueError("DISTILL_ATTENTION=varlen needs torch.nn.attention.varlen and host-built DocSpans "
                             "(model.attention.doc_spans of the CPU doc ids, passed as doc_spans=)")
        sp = docs.spans
        # [B, H, T, Dh] -> [N, H, Dh]: one copy of q, k, v (O(N) bytes, not O(T^2))
        q_NHDh, k_NGDh, v_NGDh = (x.transpose(1, 2).reshape(B * T, x.shape[1], Dh)
                                  for x in (q_BHTDh, k_BGTDh, v_BGTDh))
        window = (docs.window - 1 if docs.window is not None else -1, 0)  # flash: i - left <= j <= i
        kw = {"enable_gqa": True} if H != G else {}
        o_NHDh = VARLEN_ATTN(q_NHDh, k_NGDh, v_NGDh, sp.cu_seqlens_R, sp.cu_seqlens_R, sp.max_seqlen,
                             sp.max_seqlen, window_size=window, **kw)
        return o_NHDh.view(B, T, H, Dh)
    if FLEX_ATTN is None:
        raise ValueError("DISTILL_ATTENTION=flex needs torch.nn.attention.flex_attention (torch >= 2.6)")
    block_mask = docs.block_mask(B, T, q_BHTDh.device)
    o = _flex(q_BHTDh)(q_BHTDh, k_BGTDh, v_BGTDh, block_mask=block_mask, enable_gqa=H != G)
    return o.transpose(1, 2)


def _flex(q):
    """Compiled FlexAttention on CUDA (eager flex would build the T x T scores); eager elsewhere (CPU tests)."""
    global _flex_compiled
    if not q.is_cuda:
        return FLEX_ATTN
    if _flex_compiled is None:
        _flex_compiled = torch.compile(FLEX_ATTN, dynamic=False)
    return _flex_compiled


def doc_attention_ref(q_BHTDh, k_BGTDh, v_BGTDh, docs: Documents | None) -> torch.Tensor:
    """The dense twin: SDPA with the [B, 1, T, T] boolean mask (math backend on CUDA: fp32 T x T scores)."""
    B, H, T, _ = q_BHTDh.shape
    G = k_BGTDh.shape[1]
    mask = None if docs is None else docs.dense_mask(B, T, q_BHTDh.device)
    o = F.scaled_dot_product_attention(q_BHTDh, k_BGTDh, v_BGTDh, attn_mask=mask, is_causal=mask is None,
                                       enable_gqa=H != G)
    return o.transpose(1, 2)
