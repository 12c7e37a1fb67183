"""The top-k store: its format, its identity (hashes of teacher, tokenizer, settings) and `StoreReader`, which
serves it by sample index. `train.teachers.capture.run_capture` writes it.

A store is one teacher's top-K (ids, log-probabilities) at every loss position (labels != -100) of a packed
dataset, or of the sequences of one of its teachers (phase 2: one store per teacher over its own rows).

Layout (every array a plain .npy, written with allow_pickle=False and read with mmap_mode="r"):
    manifest.json              written last; its presence means the store is complete
    capture.json               the capture's settings, written first; a resumed capture must match them
    ids-b{b}.npy               [R_b, K] uint16 when V <= 65,536, else int32: block b's rows, best first
    logprobs-b{b}.npy          [R_b, K] float16, or bfloat16 bit patterns as uint16 (numpy has no bf16)
    index-b{b}.npy             [S_b, 3] int64: (sample index, first row, row count), one line per sample
    part-b{b}.json             block b's byte counts, committed after its arrays (the block's commit)
Block b holds the selected samples b*block_samples .. (b+1)*block_samples - 1 (all samples, or those of one
teacher); a sample's rows are its loss positions in ascending t, so reading sample s is one contiguous slice of one
block (random access through the page cache). Blocks do not depend on the world size: a capture lists the blocks
without a part file and rank r of W takes those with b mod W == r, so a capture killed at any point resumes at any
world size, and its bytes equal an uninterrupted capture's (same blocks, same batches within each block).

Dimensions: B batch rows, T tokens per row, K teacher top-k, V vocabulary, S samples (packed sequences),
R stored rows (loss tokens), N loss positions of one batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from train.data import IGNORE, tokenizer_fingerprint
from train.teachers.signal import TopK, dense_topk, loss_positions

FORMAT = "topk-store-v2"  # v2: blocks as shards (world-size-independent resume)
LOGPROB_DTYPES = ("float16", "bfloat16")

# ----------------------------------------------------------------------------------------------------------
# Identity: hashes of the teacher, the tokenizer and the capture's settings


def _sha256_file(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model_dir) -> dict:
    """sha256 over the full bytes of every *.safetensors file (name order), and per file.

    Full bytes, not headers: two fine-tunes of one architecture have identical headers. hashlib's sha256 runs at
    about 1-2 GB/s, so Mixtral-8x7B (93 GB) costs a minute or two, once per capture, on one rank, at the end.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    per_file = {f.name: _sha256_file(f) for f in files}
    total = hashlib.sha256("".join(f"{n}:{d}\n" for n, d in per_file.items()).encode()).hexdigest()
    return {"sha256": total, "files": per_file,
            "method": "sha256 over the bytes of each *.safetensors file; total = sha256 of 'name:digest' lines"}


def weights_quick_hash(model_dir) -> str:
    """sha256 over each safetensors file's name, size and JSON header (names, dtypes, shapes, offsets): cheap, run
    by every rank on every (re)start to refuse resuming a capture with another teacher architecture or file set.
    It does not see a same-shaped weight change; the manifest's full hash does."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f"{f.name}:{f.stat().st_size}:".encode() + fh.read(n))
    return h.hexdigest()


def tokenizer_sha256(tokenizer_dir) -> str | None:
    """sha256 of the tokenizer's content (train.data.tokenizer_fingerprint: vocabulary, merges, added tokens; not
    file formatting or the library version that wrote it), None when the directory holds no tokenizer. The
    trainer computes the same hash for the student's tokenizer and refuses a store whose hash differs."""
    fp = tokenizer_fingerprint(tokenizer_dir)
    return None if fp is None else hashlib.sha256(fp.encode()).hexdigest()


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65,536 (2 B per id), int32 beyond."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def expected_for(packed_dataset, k: int, tokenizer_dir=None) -> dict:
    """What a training run expects of its stores: StoreReader(path, expected_for(...)) refuses any other."""
    expected = {"k": int(k), "dataset_fingerprint": packed_dataset.fingerprint, "seq_len": packed_dataset.seq_len}
    if tokenizer_dir is not None:
        expected["tokenizer_sha256"] = tokenizer_sha256(tokenizer_dir)
    return expected


# ----------------------------------------------------------------------------------------------------------
# Small file helpers: every visible file appears by an atomic rename of a complete, fsynced temporary


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary beside `path`, fsync, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def storage_dtype(lp_dtype: str) -> np.dtype:
    return np.dtype(np.float16) if lp_dtype == "float16" else np.dtype(np.uint16)


# ----------------------------------------------------------------------------------------------------------
# Reading


class StoreReader:
    """Random access to a complete store by sample index; arrays stay memory-mapped (nothing is loaded whole
    except the per-sample index, 24 B per sample).

    expected: fields the run requires of the store (see `expected_for`: k, dataset_fingerprint, seq_len,
    tokenizer_sha256; any manifest field may be named). A difference raises ValueError naming the field and both
    values. device: where `signals` returns its tensors; the compact rows (2 + 2 B per entry) cross to it before
    they are expanded to the dense [B, T, K] int64 + fp32 (12 B per entry, over every position).
    """

    def __init__(self, path, expected: dict | None = None, device="cpu"):
        self.path, self.device = Path(path), torch.device(device)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise ValueError(f"{mf} not found: {self.path} is not a complete top-k store (a capture that has not "
                             f"finished leaves no manifest); fix: run or resume `train/main.py capture`")
        self.manifest = m = json.loads(mf.read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"{mf}: format {m.get('format')!r}, this code reads {FORMAT!r}; fix: capture again")
        for key, want in (expected or {}).items():
            if key not in m:
                raise ValueError(f"expected field {key!r} is not a manifest field; fields: {sorted(m)}")
            if m[key] != want:
                raise ValueError(f"store {self.path} does not match this run: {key} is {m[key]!r} in the store, "
                                 f"{want!r} in the run; fix: capture a store for this run's {key}")
        self.k, self.logprobs_dtype = m["k"], m["logprobs_dtype"]
        self.rows_of = m["rows_of"]
        S = m["num_samples"]
        self._ids, self._logprobs = [], []
        self._where_S3 = np.full((S, 3), -1, dtype=np.int64)  # (shard, first row, count); -1 = not in store
        for i, sh in enumerate(m["shards"]):
            self._ids.append(self._open(sh["ids"], mmap_mode="r"))
            self._logprobs.append(self._open(sh["logprobs"], mmap_mode="r"))
            index = self._open(sh["index"])
            self._where_S3[index[:, 0]] = np.concatenate([np.full((len(index), 1), i), index[:, 1:]], axis=1)

    def _open(self, name: str, mmap_mode=None) -> np.ndarray:
        """One array of the store; a missing, truncated or foreign file is a ValueError naming it (numpy's own
        "mmap length is greater than file size" names none)."""
        f = self.path / name
        try:
            return np.load(f, mmap_mode=mmap_mode, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"store {self.path}: {name} is missing, truncated or not a .npy array ({e}); the store is "
                             "damaged: capture it again (or copy it again)") from None

    def rows(self, sample_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, K], stored logprobs [n, K]) of one sample: memory-mapped views, no copy."""
        if not 0 <= sample_idx < len(self._where_S3) or self._where_S3[sample_idx, 0] < 0:
            raise ValueError(f"sample {sample_idx} is not in store {self.path} (rows_of={self.rows_of!r}, "
                             f"{len(self._where_S3)} samples); the batch and the store disagree")
        shard, first, count = self._where_S3[sample_idx].tolist()
        return self._ids[shard][first:first + count], self._logprobs[shard][first:first + count]

    def signals(self, batch) -> TopK:
        """The stored rows of batch.sample_idx_B expanded to [B, T, K] (on `self.device`) at the positions where
        labels_BT != -100. Host syncs only if the batch's labels are on the GPU (the loader's are not)."""
        labels_BT = batch.labels_BT.cpu()
        B, T = labels_BT.shape
        idx_N = loss_positions(labels_BT)
        counts_B = (labels_BT != IGNORE).sum(1).tolist()
        ids, lps = [], []
        for b, s in enumerate(batch.sample_idx_B.tolist()):
            ids_nK, lp_nK = self.rows(s)
            if len(ids_nK) != counts_B[b]:
                raise ValueError(f"sample {s}: the store holds {len(ids_nK)} loss positions, the batch's labels have "
                                 f"{counts_B[b]}; the store was captured from other data")
            ids.append(ids_nK)
            lps.append(lp_nK)
        # int32: torch has no general-purpose uint16; the widening to int64/fp32 happens on the device.
        ids_NK = torch.from_numpy(np.concatenate(ids).astype(np.int32) if ids else np.zeros((0, self.k), np.int32))
        lp_NK = np.concatenate(lps) if lps else np.zeros((0, self.k), dtype=storage_dtype(self.logprobs_dtype))
        if self.logprobs_dtype == "bfloat16":
            logprobs_NK = torch.from_numpy(lp_NK.view(np.int16)).view(torch.bfloat16)
        else:
            logprobs_NK = torch.from_numpy(lp_NK)
        dev = self.device
        return dense_topk(idx_N.to(dev), ids_NK.to(dev), logprobs_NK.to(dev), B, T)
