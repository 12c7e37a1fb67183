"""A minimal Mistral / Mixtral, read top to bottom. MoE is a config field (`ModelArgs.moe`), not a second class.

Dimensions: B batch, T query tokens, S key tokens (T, or cache length during decoding), D model width,
H query heads, G key/value heads (GQA: H % G == 0), Dh head width, F FFN width, E experts, K experts per token,
V vocabulary.

Packing: several documents may share one row. `positions_BT` restart at 0 per document (rotary phases are those
each document would have alone) and `doc_ids_BT` keeps attention inside a document, so a packed row gives each
document exactly its unpacked hidden states. model/attention.py runs that document-causal attention without a
T x T mask on CUDA (varlen or FlexAttention; the dense-mask twin on the CPU). Parameters follow HF's layout (rotate-half rotary, q/k not
permuted), so `model/hf.py` only renames and stacks experts.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model.attention import Documents, DocSpans, attention_mask, doc_attention


@dataclass
class MoEArgs:
    num_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    bos_token_id: int = 1
    eos_token_id: int = 2
    moe: MoEArgs | None = None

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEArgs(**self.moe)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                             "grouped-query attention needs n_kv_heads to divide n_heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.moe is not None and not 1 <= self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise ValueError(f"num_experts_per_tok={self.moe.num_experts_per_tok} must be in "
                             f"[1, num_experts={self.moe.num_experts}]")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the gain, as HF does, so bf16 models match bit for bit.
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary(positions_BT: torch.Tensor, head_dim: int, theta: float):
    """cos/sin [B, 1, T, Dh] for the rotate-half convention; phases in fp32 (positions up to 1e5 need it)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device, dtype=torch.float32) / head_dim)
    angles_BTd = positions_BT.float()[..., None] * inv_freq
    angles_BTDh = torch.cat([angles_BTd, angles_BTd], dim=-1)
    return angles_BTDh.cos()[:, None], angles_BTDh.sin()[:, None]


def apply_rotary(x_BHTDh, cos, sin):
    x1, x2 = x_BHTDh.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHTDh.float() * cos + rotated.float() * sin).to(x_BHTDh.dtype)


@dataclass
class KVCache:
    """Pre-allocated keys/values for greedy decoding (model/generate.py). `length` is a host int: decoding is a
    Python loop by nature; training never builds a cache."""
    k: list = field(default_factory=list)   # per layer [B, G, S_max, Dh]
    v: list = field(default_factory=list)
    doc_BS: torch.Tensor | None = None      # document id of every cached key (padding gets its own id)
    length: int = 0

    @classmethod
    def allocate(cls, args: ModelArgs, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        return cls(k=[torch.empty(shape, device=device, dtype=dtype) for _ in range(args.n_layers)],
                   v=[torch.empty(shape, device=device, dtype=dtype) for _ in range(args.n_layers)],
                   doc_BS=torch.empty(batch, max_len, device=device, dtype=torch.long))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args, self.layer_id = args, layer_id
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.capture: list | None = None  # set by `capture_qk`: post-rotary (q, k) for the attention-transfer loss

    def forward(self, x_BTD, cos, sin, docs: Documents | None, cache: KVCache | None):
        B, T, _ = x_BTD.shape
        a = self.args
        q = self.wq(x_BTD).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.capture is not None:
            self.capture.append((q, k))
        if cache is not None:
            s0 = cache.length
            cache.k[self.layer_id][:, :, s0:s0 + T] = k
            cache.v[self.layer_id][:, :, s0:s0 + T] = v
            k, v = cache.k[self.layer_id][:, :, :s0 + T], cache.v[self.layer_id][:, :, :s0 + T]
        o_BTHDh = doc_attention(q, k, v, docs)  # model/attention.py: varlen / FlexAttention / dense twin
        return self.wo(o_BTHDh.reshape(B, T, a.n_heads * a.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEFeedForward(nn.Module):
    """Mixtral's sparse block: fp32 softmax over E experts, top-K, the K weights renormalised, SwiGLU experts.

    Experts are stacked (w13 [E, 2F, D]: gate rows then up rows; w2 [E, D, F]) so the grouped GEMM and expert
    parallelism are reshapes. Routing and the expert GEMMs go through `kernels` (Triton on CUDA, torch on CPU).
    """

    def __init__(self, dim: int, hidden_dim: int, moe: MoEArgs):
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(dim, moe.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(moe.num_experts, 2 * hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(moe.num_experts, dim, hidden_dim))

    def forward(self, x_BTD):
        from kernels.moe import moe_experts

        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        logits_TE = self.gate(x_TD)
        routing = kernels.route_topk(logits_TE, self.moe.num_experts_per_tok)  # Triton on CUDA, torch on CPU
        w13, w2 = self.w13, self.w2
        if torch.is_autocast_enabled(x_TD.device.type):  # autocast stops at Triton: the experts' GEMMs in its dtype
            dt = torch.get_autocast_dtype(x_TD.device.type)
            x_TD, w13, w2 = x_TD.to(dt), w13.to(dt), w2.to(dt)
        y_TD = moe_experts(x_TD, routing, w13, w2)
        # Load-balancing statistics (Mixtral's aux loss): assignments and probability mass per expert, summed
        # here and combined over layers in Transformer.forward_with_aux exactly as HF's load_balancing_loss_func.
        stats = (routing.counts_E.float(), routing.probs_TE.sum(0), B * T)
        return y_TD.view(B, T, D), stats


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = (FeedForward(args.dim, args.hidden_dim) if args.moe is None
                             else MoEFeedForward(args.dim, args.hidden_dim, args.moe))

    def forward(self, x, cos, sin, docs, cache):
        h = x + self.attention(self.attention_norm(x), cos, sin, docs, cache)
        out = self.feed_forward(self.ffn_norm(h))
        if isinstance(out, tuple):
            return h + out[0], out[1]
        return h + out, None


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Fresh weights for training from scratch: N(0, std) matrices, unit norms; output projections scaled by
        1/sqrt(2 n_layers) (GPT-2's residual scaling) so the residual stream does not grow with depth."""
        out_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            else:
                s = out_std if name.endswith(("wo.weight", "w2.weight", ".w2")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * s)
        return self

    def forward(self, tokens_BT, positions_BT=None, doc_ids_BT=None, cache: KVCache | None = None,
                doc_spans: DocSpans | None = None):
        """Final-norm hidden states [B, T, D]; `logits` turns them into [.., V] (the trainer never does that for
        the whole batch: kernels/kd_loss.py fuses the head into the loss)."""
        return self.forward_with_aux(tokens_BT, positions_BT, doc_ids_BT, cache, doc_spans)[0]

    def forward_with_aux(self, tokens_BT, positions_BT=None, doc_ids_BT=None, cache: KVCache | None = None,
                         doc_spans: DocSpans | None = None):
        """(hidden [B, T, D], aux): aux is Mixtral's load-balancing loss (unscaled, as HF's `aux_loss`), a zero
        scalar for a dense model.

        `doc_spans`: `model.attention.doc_spans(doc_ids_BT)` built on the host from the CPU ids and moved with the
        batch; it lets CUDA take the varlen path. Without it CUDA derives what FlexAttention needs from doc_ids_BT
        on the device (no sync); the CPU runs the dense twin either way (model/attention.py)."""
        B, T = tokens_BT.shape
        dev = tokens_BT.device
        s0 = cache.length if cache is not None else 0
        if positions_BT is None:
            positions_BT = torch.arange(s0, s0 + T, device=dev).expand(B, T)
        cos, sin = rotary(positions_BT, self.args.head_dim, self.args.rope_theta)

        window = self.args.sliding_window
        if window is not None and window >= s0 + T:
            window = None  # every key is inside the window
        if cache is None:  # training / scoring: one pattern for all layers; None = plain causal (flash on CUDA)
            docs = None if doc_ids_BT is None and window is None else Documents(doc_ids_BT, window, doc_spans)
        else:  # decoding: T new queries against all s0 + T cached keys, a small dense [B, 1, T, s0 + T] mask
            doc_BT = doc_ids_BT if doc_ids_BT is not None else torch.zeros(B, T, dtype=torch.long, device=dev)
            cache.doc_BS[:, s0:s0 + T] = doc_BT
            mask = attention_mask(doc_BT, cache.doc_BS[:, :s0 + T], torch.arange(s0, s0 + T, device=dev),
                                  torch.arange(s0 + T, device=dev), window)
            docs = Documents(doc_BT, window, mask_B1TS=mask)

        h = self.tok_embeddings(tokens_BT)
        counts_E = probs_E = None
        rows = 0
        for layer in self.layers:
            h, stats = layer(h, cos, sin, docs, cache)
            if stats is not None:
                counts_E = stats[0] if counts_E is None else counts_E + stats[0]
                probs_E = stats[1] if probs_E is None else probs_E + stats[1]
                rows += stats[2]
        if cache is not None:
            cache.length = s0 + T
        if counts_E is None:
            aux = h.new_zeros((), dtype=torch.float32)
        else:
            aux = self.args.moe.num_experts * torch.sum((counts_E / rows) * (probs_E / rows))
        return self.norm(h), aux

    def logits(self, hidden_BTD):
        return self.output(hidden_BTD)


@contextmanager
def capture_qk(model: Transformer):
    """Collect every layer's post-rotary (q [B, H, T, Dh], k [B, G, T, Dh]) during one forward, in layer order,
    for the attention-transfer loss, which rebuilds one layer's T x T maps at a time instead of keeping all."""
    sink: list = []
    attns = [layer.attention for layer in model.layers]
    for a in attns:
        a.capture = sink
    try:
        yield sink
    finally:
        for a in attns:
            a.capture = None
