"""Batched greedy decoding with the KV cache.

Dimensions: B prompts in the batch, T prompt length after padding (the longest prompt), S cache length.

Prompts of different lengths are left-padded to T. Padding must not change any answer, so:
- pad tokens get their own document id (`_PAD_DOC`), and attention never crosses documents: a real token never
  sees a pad key, and a pad query sees only pads (so no row of the mask is empty);
- positions count from each prompt's first real token (the rotary phase is the unpadded one), and the k-th new
  token of row b sits at position len(prompt_b) + k;
- the cache row offsets of one prompt differ exactly as its positions do, so Mistral's sliding window (which the
  model measures in row offsets) covers the same keys as in the unpadded sequence.
Hence a padded batch gives each prompt the tokens it would get alone (tested, up to fp rounding in argmax ties).
"""
from __future__ import annotations

import torch

from model.model import KVCache, Transformer

_PAD_DOC, _REAL_DOC = 1, 0


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
             pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of every prompt, at most `max_new_tokens` tokens each; a row stops at its first `eos_id`
    (not included in the result). Returns one list of new token ids per prompt, in the prompts' order."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (at least <s>); got an empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    args = model.args
    B, T = len(prompts), max(len(p) for p in prompts)
    if T + max_new_tokens > args.max_position_embeddings:
        raise ValueError(f"generate: prompt length {T} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings={args.max_position_embeddings}; shorten one of them")
    dev = model.output.weight.device
    dtype = model.output.weight.dtype

    lens_B = torch.tensor([len(p) for p in prompts], device=dev)
    # left-padded on the host: one copy to the device, not one per prompt
    tokens_BT = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=dev)
    offset_B = T - lens_B                                       # left padding of each row
    col_T = torch.arange(T, device=dev)
    is_pad_BT = col_T[None, :] < offset_B[:, None]
    positions_BT = (col_T[None, :] - offset_B[:, None]).clamp_min(0)
    doc_BT = torch.where(is_pad_BT, _PAD_DOC, _REAL_DOC)

    cache = KVCache.allocate(args, B, T + max_new_tokens, dev, dtype)
    hidden = model(tokens_BT, positions_BT, doc_BT, cache=cache)
    next_B = model.logits(hidden[:, -1]).argmax(-1)

    out_BN = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)
    done_B = torch.zeros(B, dtype=torch.bool, device=dev)
    real_doc_B1 = torch.full((B, 1), _REAL_DOC, device=dev)
    steps = 0
    while True:
        out_BN[:, steps] = next_B
        steps += 1
        if eos_id is not None:
            done_B |= next_B == eos_id
            if bool(done_B.all()):  # host sync once per token: decoding is a host loop anyway
                break
        if steps == max_new_tokens:
            break
        # the token just emitted is new token number steps-1 of its row: position len(prompt) + steps - 1
        hidden = model(next_B[:, None], (lens_B + steps - 1)[:, None], real_doc_B1, cache=cache)
        next_B = model.logits(hidden[:, -1]).argmax(-1)

    result = []
    for row in out_BN[:, :steps].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        result.append(row)
    return result
