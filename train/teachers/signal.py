"""The teacher signal: for every loss position of a batch, the teacher's top-k token ids and log-probabilities,
and the helpers every source uses to produce it (docs/design.md, decision 1: one contract for online and offline).

Dimensions: B batch rows, T tokens per row, D model width, V vocabulary, K teacher top-k,
N loss positions of a batch (labels != -100), C loss positions per LM-head chunk.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from train.data import IGNORE


class TopK(NamedTuple):
    """Aligned with labels_BT: row (b, t) is the teacher's top-K over the distribution that predicts labels_BT[b, t]
    (its logits at position t), best first. Rows where labels_BT == -100 hold id 0, logprob 0 (the loss ignores
    them)."""
    ids_BTK: torch.Tensor       # int64
    logprobs_BTK: torch.Tensor  # float32


class Rows(NamedTuple):
    """The fields of a PackedBatch a teacher reads, for a subset of its rows (see `select_rows`)."""
    tokens_BT: torch.Tensor
    labels_BT: torch.Tensor
    positions_BT: torch.Tensor | None
    doc_ids_BT: torch.Tensor | None
    sample_idx_B: torch.Tensor | None


def select_rows(batch, rows_B: torch.Tensor | None) -> Rows:
    """`batch` (a PackedBatch or Rows) restricted to the row indices `rows_B` (all rows when None)."""
    def pick(x):
        if x is None or rows_B is None:
            return x
        return x.index_select(0, rows_B.to(x.device))
    return Rows(pick(batch.tokens_BT), pick(batch.labels_BT), pick(getattr(batch, "positions_BT", None)),
                pick(getattr(batch, "doc_ids_BT", None)), pick(getattr(batch, "sample_idx_B", None)))


def loss_positions(labels_BT: torch.Tensor) -> torch.Tensor:
    """Flat indices (into B*T) of the loss positions, ascending (row-major: b, then t): the order in which
    `TopK` rows are produced online and stored offline.

    Host sync: `nonzero` must know N. The data loader hands labels over on the CPU, where this costs nothing;
    on a CUDA tensor it waits for the queue (the trainer should pass CPU labels)."""
    return (labels_BT.reshape(-1) != IGNORE).nonzero().squeeze(1)


def head_chunk_rows(vocab_size: int, budget_bytes: int = 256 << 20) -> int:
    """Loss positions per LM-head chunk so that one chunk's logits stay under `budget_bytes`.

    Per position a chunk holds V logits in the model dtype (2 B in bf16) and their fp32 copy (4 B), 6 B x V:
    at V = 32000 that is 192 KB, so 256 MiB gives C = 1398 positions (a [1398, 4096] x [4096, 32000] GEMM,
    large enough to be compute-bound), instead of N x V x 6 B = 1.5 GB for a 8 x 1024-token batch at N = 8192.
    """
    return max(1, budget_bytes // (6 * vocab_size))


@torch.no_grad()
def topk_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, k: int, chunk_rows: int | None = None):
    """Top-k of log_softmax(hidden_ND @ weight_VD.T) per row, chunk by chunk: (ids_NK int64, logprobs_NK fp32).

    Logits come out of the GEMM in the weight dtype (bf16 on GPU, as the teacher's own head computes them) and
    are normalised in fp32. top-k runs on the fp32 logits and the log-partition is subtracted afterwards:
    log_softmax is a per-row shift, so the order is the same and no second [C, V] fp32 buffer is needed.
    """
    N, V = hidden_ND.shape[0], weight_VD.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"k={k} must be in [1, V={V}]")
    C = chunk_rows or head_chunk_rows(V)
    ids_NK = torch.empty(N, k, dtype=torch.long, device=hidden_ND.device)
    logprobs_NK = torch.empty(N, k, dtype=torch.float32, device=hidden_ND.device)
    for s in range(0, N, C):  # no host sync inside: N is already a host int
        logits_CV = F.linear(hidden_ND[s:s + C].to(weight_VD.dtype), weight_VD).float()
        top_CK, ids_CK = logits_CV.topk(k, dim=-1)
        logprobs_NK[s:s + C] = top_CK - torch.logsumexp(logits_CV, dim=-1, keepdim=True)
        ids_NK[s:s + C] = ids_CK
    return ids_NK, logprobs_NK


def dense_topk(idx_N: torch.Tensor, ids_NK: torch.Tensor, logprobs_NK: torch.Tensor, B: int, T: int) -> TopK:
    """Scatter per-loss-position rows into the dense TopK contract (id 0, logprob 0 elsewhere)."""
    K = ids_NK.shape[1]
    ids_BTK = torch.zeros(B * T, K, dtype=torch.long, device=ids_NK.device)
    logprobs_BTK = torch.zeros(B * T, K, dtype=torch.float32, device=ids_NK.device)
    idx_N = idx_N.to(ids_NK.device)
    ids_BTK[idx_N] = ids_NK.long()
    logprobs_BTK[idx_N] = logprobs_NK.float()
    return TopK(ids_BTK.view(B, T, K), logprobs_BTK.view(B, T, K))


def default_dtype(device) -> torch.dtype:
    """bf16 on CUDA (the teacher's native precision, half the memory of fp32), fp32 on CPU (correctness runs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
