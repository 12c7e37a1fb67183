"""Greedy decoding with the KV cache: equal to recomputing the whole sequence every step; a left-padded batch equal
to decoding each prompt alone; eos stops a row."""
import pytest
import torch

from model import KVCache, ModelArgs, MoEArgs, Transformer
from model.generate import generate

V = 61


def _model(kind: str, seed: int = 0) -> Transformer:
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, vocab_size=V,
                     rope_theta=10000.0, max_position_embeddings=128,
                     sliding_window=5 if kind == "window" else None,
                     moe=MoEArgs(num_experts=4, num_experts_per_tok=2) if kind == "moe" else None)
    # std 0.15: logits spread well beyond fp32 rounding, so argmax ties between two exact-arithmetic-equal
    # computations do not happen by accident.
    return Transformer(args).init_weights(std=0.15, generator=torch.Generator().manual_seed(seed)).eval()


def _greedy_recompute(model, prompt, n):
    """The reference: no cache, no padding, the full sequence through the model at every step."""
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([seq])))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


KINDS = ["dense", "moe", "window"]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_full_recompute(kind):
    """Prefill + one token at a time through the cache gives the logits of one full forward, at every step."""
    model = _model(kind)
    seq = torch.tensor(_prompts(1, [14])[0])
    with torch.no_grad():
        full_TV = model.logits(model(seq[None]))[0]
        cache = KVCache.allocate(model.args, 1, len(seq), "cpu", torch.float32)
        steps = [model.logits(model(seq[None, :6], cache=cache))[0]]
        for t in range(6, len(seq)):
            steps.append(model.logits(model(seq[None, t:t + 1], cache=cache))[0])
    torch.testing.assert_close(torch.cat(steps), full_TV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_recompute(kind):
    model = _model(kind)
    for prompt in _prompts(2, [1, 4, 9]):
        assert generate(model, [prompt], 12) == [_greedy_recompute(model, prompt, 12)]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_one_by_one(kind):
    """Left padding is invisible: pads have their own document and every prompt keeps its own positions."""
    model = _model(kind, seed=3)
    prompts = _prompts(4, [7, 1, 11, 3, 11])
    alone = [generate(model, [p], 10)[0] for p in prompts]
    assert generate(model, prompts, 10) == alone
    assert generate(model, prompts, 10, pad_id=V - 1) == alone  # the pad id does not matter either


def test_eos_stops_each_row():
    model = _model("dense", seed=5)
    prompts = _prompts(6, [5, 8, 2])
    free = generate(model, prompts, 12)
    eos = free[0][3]                                  # the token row 0 emits at step 4
    got = generate(model, prompts, 12, eos_id=eos)
    for row, full in zip(got, free):
        assert row == (full[:full.index(eos)] if eos in full else full)
    assert got[0] == free[0][:3]
    # all rows hit eos at once -> the loop stops early but the answer is the same
    assert generate(model, [prompts[0]], 12, eos_id=eos) == [free[0][:3]]


def test_bad_input():
    model = _model("dense")
    assert generate(model, [], 4) == []
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[5], []], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[5]], 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[5] * 100], 40)
