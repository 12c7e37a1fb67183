"""Tiny models, tokenizer and chat rows for the trainer tests (no download; a few seconds to build)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers

SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]


def make_rows(n: int, seed: int = 0, domain_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if domain_every and i % domain_every == 0:
            row = {"messages": [{"role": "user", "content": f"Price of item {a}?"},
                                {"role": "assistant", "content": f"{a * 3} coins"}], "domain": True}
        else:
            row = {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                {"role": "assistant", "content": f"It is {a + b}."}]}
            if domain_every:
                row["domain"] = False
        rows.append(row)
    return rows


def write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer(out: Path, rows, specials=SPECIALS) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for r in rows for m in r["messages"]]
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def make_model(out: Path, vocab: int, tokenizer_dir: Path | None = None, seed: int = 0, moe: bool = False,
               layers: int = 2, heads: int = 4, kv_heads: int = 2, dim: int = 32, hidden: int = 48,
               window=None) -> Path:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim // heads,
                  rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
                  sliding_window=window, bos_token_id=1, eos_token_id=2)
    if moe:
        cfg = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
        m = transformers.MixtralForCausalLM(cfg)
    else:
        m = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(out)
    if tokenizer_dir is not None:
        transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def make_world(root: Path, n_rows: int = 48, domain_every: int = 0, moe_student: bool = False,
               teacher_layers: int = 3) -> dict:
    """rows.jsonl, a tokenizer, a student and a teacher (different shapes, same tokenizer) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_rows, domain_every=domain_every)
    data = write_jsonl(rows, root / "rows.jsonl")
    tok = make_tokenizer(root / "tok", rows)
    V = len(tok)
    student = make_model(root / "student", V, root / "tok", seed=1, moe=moe_student)
    teacher = make_model(root / "teacher", V, root / "tok", seed=2, layers=teacher_layers, dim=48, hidden=64)
    return {"root": root, "data": str(data), "tok": str(root / "tok"), "student": str(student),
            "teacher": str(teacher), "vocab": V}
