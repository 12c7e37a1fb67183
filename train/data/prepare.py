"""The packed dataset of a run, under one process or torchrun: rank 0 tokenises and packs into the cache,
the other ranks then read the same cache (`prepare_packed` is deterministic and keyed by content)."""
from __future__ import annotations

from pathlib import Path

from train import parallel
from train.data.packing import PackedDataset, prepare_packed


def build_packed(d, tokenizer_dir: str, teacher_names, cache_dir: Path, env: parallel.Env) -> PackedDataset:
    """The PackedDataset of `d` (a DataConfig): `d.packed` when given, else prepared from `d.paths`."""
    if d.packed:
        return PackedDataset.load(d.packed)
    from transformers import AutoTokenizer
    packed = None
    for turn in (True, False):  # rank 0 first, then everyone else
        if env.is_main == turn:
            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
            packed = prepare_packed(d.paths, tok, d.seq_len, teacher_names=teacher_names, cache_dir=str(cache_dir),
                                    num_proc=d.num_proc, pad_id=d.pad_id)
        parallel.barrier(env)
    return packed
