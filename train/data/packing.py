"""Tokenised documents -> fixed-length packed sequences (best-fit decreasing, one teacher per sequence).

Dimension names: S packed sequences, L = T = seq_len tokens per sequence, R documents (rows of the tokenized
dataset), P their tokens laid end to end.

Conventions of the packed arrays:
    labels[s, t] != -100  =>  labels[s, t] == tokens[s, t+1] and doc_ids[s, t] == doc_ids[s, t+1]
    positions restart at 0 for every document; doc_ids is the document's row index in the tokenized dataset;
    padding: token pad_id (an existing id: the vocabulary is never resized), label -100, doc id -1,
    positions 0, 1, ... of its own (padding is its own pseudo-document, so it never attends into a real one).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from train.data.chat import IGNORE, tokenize_rows
from train.data.rows import DEFAULT_TEACHER, load_rows

PAD_DOC_ID = -1             # doc id of padding tokens
_FORMAT_VERSION = "data-v1"  # bump when packing semantics change (saved PackedDatasets of older versions refuse)
# The packed cache is keyed on this file's bytes and the tokenised input's fingerprint (which carries the chat
# code's hash), never on the sampler's code.
_CODE_HASH = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=8).hexdigest()


class _CapacityIndex:
    """Multiset of open sequences keyed by remaining capacity 0..L, with `smallest capacity >= n` in O(log L):
    a segment tree of counts over capacities. Best fit needs this query once per document; a linear scan over
    capacities would cost O(L) per document (4096 * 1e6 steps for a million documents)."""

    def __init__(self, max_capacity: int):
        self.size = 1 << max(1, max_capacity.bit_length())  # > max_capacity
        self.count = [0] * (2 * self.size)
        self.bins: list[list[int]] = [[] for _ in range(max_capacity + 1)]

    def push(self, capacity: int, bin_id: int) -> None:
        self.bins[capacity].append(bin_id)
        i = capacity + self.size
        while i:
            self.count[i] += 1
            i //= 2

    def pop_at_least(self, n: int) -> tuple[int, int] | None:
        count, i = self.count, n + self.size
        if count[i] == 0:
            while i > 1 and not (i % 2 == 0 and count[i + 1] > 0):
                i //= 2
            if i == 1:
                return None
            i += 1
            while i < self.size:
                i = 2 * i if count[2 * i] > 0 else 2 * i + 1
        capacity = i - self.size
        bin_id = self.bins[capacity].pop()
        while i:
            count[i] -= 1
            i //= 2
        return capacity, bin_id


def _best_fit_decreasing(lengths_R: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign documents to sequences: (sequence of each doc, token offset of each doc in it, sequence count).
    Longest first, each into the open sequence it fills most tightly: padding is typically < 1 % where
    sequential greedy packing wastes about half a document per sequence."""
    order = np.argsort(-lengths_R, kind="stable")  # deterministic: ties keep row order
    seq_of_R = np.empty(len(lengths_R), dtype=np.int64)
    offset_R = np.empty(len(lengths_R), dtype=np.int64)
    used: list[int] = []
    index = _CapacityIndex(seq_len)
    for lo in range(0, len(order), 1 << 16):  # Python ints for 65k documents at a time, not ~36 B for each of all
        for d, n in zip(order[lo:lo + (1 << 16)].tolist(), lengths_R[order[lo:lo + (1 << 16)]].tolist()):
            found = index.pop_at_least(n)
            if found is None:
                capacity, s = seq_len, len(used)
                used.append(0)
            else:
                capacity, s = found
            seq_of_R[d], offset_R[d] = s, used[s]
            used[s] += n
            if capacity - n > 0:
                index.push(capacity - n, s)
    return seq_of_R, offset_R, len(used)


def _arrow_columns(ds, names):
    import pyarrow as pa
    table = ds.with_format("arrow")[:] if len(ds) else pa.table({n: [] for n in names})
    return {n: table.column(n).combine_chunks() if isinstance(table.column(n), pa.ChunkedArray)
            else table.column(n) for n in names}


@dataclass
class PackedBatch:
    """One rank's micro-batch. All int64 torch tensors; labels are next tokens (-100 = no loss)."""
    tokens_BT: torch.Tensor
    labels_BT: torch.Tensor
    positions_BT: torch.Tensor
    doc_ids_BT: torch.Tensor
    teacher_B: torch.Tensor      # index into the run's teacher names; one teacher per sequence
    sample_idx_B: torch.Tensor   # global index of each sequence in the PackedDataset (offline stores key on it)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                              for f in fields(self)})

    def pin_memory(self) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


_ARRAYS = ("tokens", "labels", "positions", "doc_ids", "teacher")


class PackedDataset:
    """Packed sequences as numpy arrays (module doc). Build with `pack`, persist with save/load (npy + JSON)."""

    def __init__(self, tokens, labels, positions, doc_ids, teacher, teacher_names, seq_len, pad_id, stats,
                 fingerprint=None):
        self.tokens, self.labels, self.positions, self.doc_ids, self.teacher = (
            tokens, labels, positions, doc_ids, teacher)
        self.teacher_names, self.seq_len, self.pad_id = list(teacher_names), int(seq_len), int(pad_id)
        self.stats = dict(stats)
        self.fingerprint = fingerprint or self._content_hash()

    def __len__(self) -> int:
        return len(self.teacher)

    def _settings(self) -> dict:
        return {"format": _FORMAT_VERSION, "seq_len": self.seq_len, "pad_id": self.pad_id,
                "teacher_names": self.teacher_names}

    def _content_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self._settings(), sort_keys=True).encode())
        for name in _ARRAYS:
            array = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(memoryview(array.reshape(-1).view(np.uint8)))
        return h.hexdigest()

    def batch(self, indices) -> PackedBatch:
        """The sequences at `indices` (global indices) as a PackedBatch of int64 CPU tensors."""
        idx_B = np.asarray(indices, dtype=np.int64)
        take = lambda a: torch.from_numpy(np.asarray(a[idx_B], dtype=np.int64))  # noqa: E731
        return PackedBatch(take(self.tokens), take(self.labels), take(self.positions), take(self.doc_ids),
                           take(self.teacher), torch.from_numpy(idx_B.copy()))

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(getattr(self, name)), allow_pickle=False)
        meta = {**self._settings(), "stats": self.stats, "fingerprint": self.fingerprint}
        (directory / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory, mmap: bool = True, verify: bool = False) -> "PackedDataset":
        """mmap=True maps the arrays (ranks share the page cache); verify=True re-hashes the content."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise ValueError(f"{directory}: no meta.json, not a saved PackedDataset; fix: write it with .save()")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: packed with format {meta.get('format')!r}, this code reads "
                             f"{_FORMAT_VERSION!r}; fix: pack the data again")
        arrays = {n: np.load(directory / f"{n}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
                  for n in _ARRAYS}
        packed = cls(**arrays, teacher_names=meta["teacher_names"], seq_len=meta["seq_len"], pad_id=meta["pad_id"],
                     stats=meta["stats"], fingerprint=meta["fingerprint"])
        if verify and packed._content_hash() != meta["fingerprint"]:
            raise ValueError(f"{directory}: content does not match its fingerprint; fix: pack the data again")
        return packed


def pack(tokenized_ds, seq_len: int, teacher_names: Sequence[str] | None = None, pad_id: int = 0) -> PackedDataset:
    """Pack tokenised documents (from `tokenize_rows`) into [S, seq_len] sequences, one teacher per sequence.

    teacher_names: the run's teachers, in the order `teacher` indexes them (default: "reference" first, then
    the other names found, sorted). pad_id: any EXISTING token id (never add a pad token); padding carries
    label -100 and doc id -1, so its value only needs to be a valid embedding row.
    A document longer than seq_len keeps its first seq_len tokens (counted in stats and warned about); a
    document left without any loss token (all-prompt after truncation) is dropped, counted and warned about.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}; fix: use at least 2")
    if pad_id < 0:
        raise ValueError(f"pad_id={pad_id}; fix: pass an existing token id, e.g. tokenizer.eos_token_id")
    missing = {"input_ids", "labels"} - set(tokenized_ds.column_names)
    if missing:
        raise ValueError(f"pack: columns {sorted(missing)} missing (found {tokenized_ds.column_names}); fix: pass "
                         f"tokenize_rows(...)")
    has_teacher = "teacher" in tokenized_ds.column_names
    cols = _arrow_columns(tokenized_ds, ["input_ids", "labels"] + (["teacher"] if has_teacher else []))
    import pyarrow.compute as pc
    lengths_R = pc.list_value_length(cols["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    ids_flat = pc.list_flatten(cols["input_ids"]).to_numpy(zero_copy_only=False)
    labels_flat = pc.list_flatten(cols["labels"]).to_numpy(zero_copy_only=False)
    names_R = np.asarray(cols["teacher"].to_pylist() if has_teacher else [DEFAULT_TEACHER] * len(lengths_R),
                         dtype=object)
    n_docs = len(lengths_R)
    if n_docs >= 2**31:
        raise ValueError(f"{n_docs} documents overflow int32 doc ids; fix: split the dataset")

    found = sorted(set(names_R.tolist()))
    if teacher_names is None:
        teacher_names = ([DEFAULT_TEACHER] if DEFAULT_TEACHER in found else []) + [t for t in found
                                                                                  if t != DEFAULT_TEACHER]
    teacher_names = list(teacher_names)
    unknown = [t for t in found if t not in teacher_names]
    if unknown:
        raise ValueError(f"pack: rows name teachers {unknown} that are not among the run's teachers {teacher_names}; "
                         f"fix: add them to the config or relabel the rows")
    teacher_R = np.asarray([teacher_names.index(t) for t in names_R.tolist()], dtype=np.int32).reshape(-1)

    # Truncate to seq_len (head kept) and compute each kept token's source index in the flat arrays.
    starts_R = np.zeros(n_docs, dtype=np.int64)
    np.cumsum(lengths_R[:-1], out=starts_R[1:])
    kept_R = np.minimum(lengths_R, seq_len)
    truncated_R = lengths_R > seq_len
    doc_P = np.repeat(np.arange(n_docs, dtype=np.int64), kept_R)
    kept_starts_R = np.cumsum(kept_R) - kept_R
    within_P = np.arange(len(doc_P), dtype=np.int64) - kept_starts_R[doc_P]
    src_P = starts_R[doc_P] + within_P
    labels_P = labels_flat[src_P].astype(np.int32)
    labels_P[(kept_starts_R + kept_R - 1)[truncated_R]] = IGNORE  # target cut off (see tokenize_rows)
    loss_R = np.bincount(doc_P, weights=labels_P != IGNORE, minlength=n_docs).astype(np.int64)
    keep_R = loss_R > 0

    # Each teacher's documents are packed on their own, so a sequence never mixes teachers.
    seq_of_R = np.full(n_docs, -1, dtype=np.int64)
    offset_R = np.zeros(n_docs, dtype=np.int64)
    seq_teacher, n_seqs = [], 0
    for t in range(len(teacher_names)):
        docs = np.flatnonzero(keep_R & (teacher_R == t))
        if len(docs) == 0:
            continue
        seq_local, offset_local, count = _best_fit_decreasing(kept_R[docs], seq_len)
        seq_of_R[docs] = seq_local + n_seqs
        offset_R[docs] = offset_local
        seq_teacher += [t] * count
        n_seqs += count

    tokens_SL = np.full((n_seqs, seq_len), pad_id, dtype=np.int32)
    labels_SL = np.full((n_seqs, seq_len), IGNORE, dtype=np.int32)
    doc_ids_SL = np.full((n_seqs, seq_len), PAD_DOC_ID, dtype=np.int32)
    positions_SL = np.zeros((n_seqs, seq_len), dtype=np.int32)
    placed = keep_R[doc_P]
    dest = (seq_of_R[doc_P] * seq_len + offset_R[doc_P] + within_P)[placed]
    tokens_SL.reshape(-1)[dest] = ids_flat[src_P[placed]]
    labels_SL.reshape(-1)[dest] = labels_P[placed]
    doc_ids_SL.reshape(-1)[dest] = doc_P[placed]
    positions_SL.reshape(-1)[dest] = within_P[placed]
    # Padding is one pseudo-document per sequence tail, positions 0, 1, ... (within max_position_embeddings).
    used_S = (doc_ids_SL != PAD_DOC_ID).sum(axis=1)
    pad_SL = doc_ids_SL == PAD_DOC_ID
    positions_SL[pad_SL] = (np.arange(seq_len)[None, :] - used_S[:, None])[pad_SL]

    n_tokens = int(kept_R[keep_R].sum())
    stats = {
        "docs": int(keep_R.sum()), "sequences": int(n_seqs), "tokens": n_tokens,
        "loss_tokens": int(loss_R[keep_R].sum()),
        "truncated_docs": int(truncated_R.sum()), "truncated_tokens": int((lengths_R - kept_R).sum()),
        "dropped_docs_no_loss": int((~keep_R).sum()), "dropped_tokens": int(kept_R[~keep_R].sum()),
        "padding_fraction": float(1.0 - n_tokens / max(1, n_seqs * seq_len)),
        "sequences_per_teacher": {name: int(seq_teacher.count(t)) for t, name in enumerate(teacher_names)},
    }
    if "num_tokens" in tokenized_ds.column_names:  # documents already cut at tokenize_rows' max_seq_len
        full_R = np.asarray(tokenized_ds["num_tokens"], dtype=np.int64)
        stats["truncated_docs_at_tokenize"] = int((full_R > lengths_R).sum())
        stats["truncated_tokens_at_tokenize"] = int((full_R - lengths_R).sum())
    # Documents cut at tokenize_rows' max_seq_len arrive here already at seq_len (truncated_docs counts only
    # those cut here); the warning gives the documents cut anywhere, so a cut never reads as "0 truncated".
    cut_docs = stats["truncated_docs"] + stats.get("truncated_docs_at_tokenize", 0)
    cut_tokens = stats["truncated_tokens"] + stats.get("truncated_tokens_at_tokenize", 0)
    if cut_docs:
        warnings.warn(f"pack: {cut_docs} of {n_docs} documents were longer than seq_len={seq_len} and lost their tail "
                      f"({cut_tokens} tokens cut); raise data.seq_len to keep them whole", stacklevel=2)
    if n_docs and not keep_R.any():
        full = (np.asarray(tokenized_ds["num_tokens"], dtype=np.int64) if "num_tokens" in tokenized_ds.column_names
                else lengths_R)
        raise ValueError(f"pack: none of the {n_docs} documents keeps an answer token within seq_len={seq_len} "
                         f"(every answer starts beyond it; the shortest document has {int(full.min())} tokens); fix: "
                         f"raise data.seq_len")
    if stats["dropped_docs_no_loss"]:
        warnings.warn(f"pack: dropped {stats['dropped_docs_no_loss']} documents with no answer token left after "
                      f"truncation ({stats['dropped_tokens']} tokens); fix: raise seq_len", stacklevel=2)
    return PackedDataset(tokens_SL, labels_SL, positions_SL, doc_ids_SL, np.asarray(seq_teacher, dtype=np.int32),
                         teacher_names, seq_len, pad_id, stats)


def prepare_packed(paths_or_dataset, tokenizer, seq_len: int, teacher_names: Sequence[str] | None = None,
                   cache_dir: str | None = None, num_proc: int | None = None,
                   pad_id: int | None = None) -> PackedDataset:
    """load_rows -> tokenize_rows(max_seq_len=seq_len) -> pack, in one call. With cache_dir, every stage is cached
    there and the PackedDataset is saved under cache_dir/packed-<key> and loaded (memory-mapped) next time.
    pad_id defaults to the tokenizer's pad token, else its eos token (both existing ids).
    Under torchrun call it on rank 0 first and then on the others after a barrier: the stages are
    deterministic, so the others then only read the caches (concurrent first builds would race on the files)."""
    rows = load_rows(paths_or_dataset, teacher_names=teacher_names, cache_dir=cache_dir)
    tokenized = tokenize_rows(rows, tokenizer, max_seq_len=seq_len, num_proc=num_proc, cache_dir=cache_dir)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cache_dir is None:
        return pack(tokenized, seq_len, teacher_names, pad_id=pad_id)
    key = hashlib.blake2b(f"{tokenized._fingerprint}|{seq_len}|{teacher_names}|{pad_id}|{_CODE_HASH}".encode(),
                          digest_size=8).hexdigest()
    target = Path(cache_dir) / f"packed-{key}"
    if (target / "meta.json").exists():
        return PackedDataset.load(target)
    packed = pack(tokenized, seq_len, teacher_names, pad_id=pad_id)
    scratch = Path(cache_dir) / f".packed-{key}-{os.getpid()}"
    packed.save(scratch)
    try:
        os.replace(scratch, target)  # atomic: a reader sees a complete directory or none
    except OSError:  # another process finished first; its copy is identical
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    return PackedDataset.load(target)

