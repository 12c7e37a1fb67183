"""Offline teacher signals: `run_capture` writes a top-k store, `StoreReader` serves it by sample index.

A store is one teacher's top-K (ids, log-probabilities) at every loss position (labels != -100) of a packed
dataset, or of the sequences of one of its teachers (phase 2: one store per teacher over its own rows).

Layout (every array a plain .npy, written with allow_pickle=False and read with mmap_mode="r"):
    manifest.json                    written last; its presence means the store is complete
    ids-{r}-of-{W}.npy               [R_r, K] uint16 when V <= 65,536, else int32: rank r's rows, best first
    logprobs-{r}-of-{W}.npy          [R_r, K] float16, or bfloat16 bit patterns as uint16 (numpy has no bf16)
    index-{r}-of-{W}.npy             [S_r, 3] int64: (sample index, first row, row count), one line per sample
    part-{r}-of-{W}.json             rank r's settings and byte counts, committed after its arrays
Rank r captures the r-th, (r+W)-th, ... of the selected sample indices; a sample's rows are its loss positions
in ascending t, so reading sample s is one contiguous slice of one shard (random access through the page cache).

While a capture runs, rank r fills `*.npy.partial` arrays preallocated to their final size (the row count of every
sample is known from its labels before the teacher runs) in blocks of `block_samples` samples; after each block
the arrays are flushed (msync) and progress-{r}-of-{W}.json is atomically replaced. A restarted capture reopens
the partial arrays and continues after the last committed block; blocks and batches are the same as in an
uninterrupted run, so the store comes out byte-identical.

Dimensions: B batch rows, T tokens per row, K teacher top-k, V vocabulary, S samples (packed sequences),
R stored rows (loss tokens), N loss positions of one batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from train.data import tokenizer_fingerprint
from train.teacher import (IGNORE_INDEX, OnlineTeacher, TopK, _distributed, _mesh_device, collective_device,
                           default_dtype, dense_topk, loss_positions)

FORMAT = "topk-store-v1"
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


def _atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary beside `path`, fsync, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _names(rank: int, world_size: int) -> dict[str, str]:
    tag = f"{rank:05d}-of-{world_size:05d}"
    return {"ids": f"ids-{tag}.npy", "logprobs": f"logprobs-{tag}.npy", "index": f"index-{tag}.npy",
            "part": f"part-{tag}.json", "progress": f"progress-{tag}.json"}


def _any_rank(flag: bool) -> bool:
    """True if `flag` holds on any rank (a sharded teacher needs every rank in each forward)."""
    import torch.distributed as dist
    t = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())  # host sync: once per block, decides whether the block runs


# ----------------------------------------------------------------------------------------------------------
# Capture


def _loss_counts(labels_SL, samples: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Loss positions per sample, read a few thousand sequences at a time (labels may be a 4 GB memmap)."""
    out = np.zeros(len(samples), dtype=np.int64)
    for s in range(0, len(samples), chunk):
        out[s:s + chunk] = (np.asarray(labels_SL[samples[s:s + chunk]]) != IGNORE_INDEX).sum(axis=1)
    return out


def _to_storage(ids_NK: torch.Tensor, logprobs_NK: torch.Tensor, id_dtype: np.dtype, lp_dtype: str):
    """Device rows -> numpy rows in the stored dtypes. Host sync (the rows go to disk): once per batch."""
    ids = ids_NK.to(torch.int32).cpu().numpy().astype(id_dtype)
    if lp_dtype == "float16":
        lp = logprobs_NK.to(torch.float16).cpu().numpy()
    else:  # bf16 keeps fp32's range with 8 bits of mantissa; stored as its bit pattern
        lp = logprobs_NK.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return ids, lp


def _storage_dtype(lp_dtype: str) -> np.dtype:
    return np.dtype(np.float16) if lp_dtype == "float16" else np.dtype(np.uint16)


def run_capture(teacher_path, packed_dataset, out_dir, k: int, batch_size: int, rank: int = 0, world_size: int = 1,
                dtype: str | torch.dtype = "float16", teacher: str | None = None, tokenizer_path=None,
                device=None, compute_dtype: torch.dtype | None = None, shard: bool = False,
                block_samples: int = 64) -> dict:
    """Run the teacher at `teacher_path` over `packed_dataset` and write (or finish) the store in `out_dir`.

    dtype: stored log-probability dtype, "float16" (default; 11-bit mantissa, range to 65504: enough for
    log-probabilities of top-k tokens) or "bfloat16". teacher: capture only the sequences of this teacher name
    (phase 2); None = all. tokenizer_path: directory whose tokenizer files are hashed into the manifest (default:
    the teacher directory, if it holds any). compute_dtype: the teacher's (bf16 on CUDA, fp32 on CPU).
    shard: FSDP2-shard the teacher over the initialised process group (every rank runs every forward together).
    Rank r takes the r-th, (r+W)-th, ... selected samples; each rank writes its own shard; the manifest is written
    once every rank's part exists (by rank 0 after a barrier under torchrun, else by whichever call finishes
    last). Returns (and prints on rank 0) throughput and bytes per token for this call.
    """
    t_start = time.perf_counter()
    out_dir, teacher_path = Path(out_dir), Path(teacher_path)
    lp_dtype = str(dtype).removeprefix("torch.")
    if lp_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"dtype={dtype!r}: stored log-probabilities must be one of {LOGPROB_DTYPES}")
    if k < 1 or batch_size < 1 or block_samples < 1:
        raise ValueError(f"k={k}, batch_size={batch_size}, block_samples={block_samples}: each must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}; fix: 0 <= rank < world_size")
    cfg_file = teacher_path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{cfg_file} not found; teacher_path must be an HF model directory")
    config = json.loads(cfg_file.read_text())
    V = int(config["vocab_size"])
    if k > V:
        raise ValueError(f"k={k} exceeds the teacher's vocab_size={V}")
    device = torch.device(device) if device is not None else _mesh_device()
    compute_dtype = compute_dtype or default_dtype(device)
    sharded = shard and _distributed()

    ds = packed_dataset
    teacher_S = np.asarray(ds.teacher)
    if teacher is None:
        selected = np.arange(len(ds), dtype=np.int64)
    else:
        if teacher not in ds.teacher_names:
            raise ValueError(f"teacher={teacher!r} is not one of the dataset's teachers {ds.teacher_names}")
        selected = np.flatnonzero(teacher_S == ds.teacher_names.index(teacher)).astype(np.int64)
    per_rank = [selected[r::world_size] for r in range(world_size)]
    mine = per_rank[rank]
    counts_S = _loss_counts(ds.labels, mine)
    first_S = np.zeros(len(mine), dtype=np.int64)
    np.cumsum(counts_S[:-1], out=first_S[1:])
    R = int(counts_S.sum())
    id_dtype, st_dtype = ids_dtype(V), _storage_dtype(lp_dtype)

    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else teacher_path
    settings = {
        "format": FORMAT, "k": int(k), "vocab_size": V, "ids_dtype": id_dtype.name, "logprobs_dtype": lp_dtype,
        "logprobs_storage": st_dtype.name, "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "dataset_fingerprint": ds.fingerprint, "seq_len": int(ds.seq_len), "pad_id": int(ds.pad_id),
        "teacher_names": list(ds.teacher_names), "num_samples": int(len(ds)), "rows_of": teacher,
        "world_size": int(world_size), "block_samples": int(block_samples), "batch_size": int(batch_size),
        "tokenizer_sha256": tokenizer_sha256(tok_dir), "teacher_config": config,
        "teacher_weights_quick": weights_quick_hash(teacher_path),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _names(rank, world_size)
    manifest = _read_json(out_dir / "manifest.json")
    if manifest is not None:
        _check_same(settings, manifest, out_dir / "manifest.json")
        return _report(rank, 0, 0, 0.0, manifest, out_dir)

    part = _read_json(out_dir / names["part"])
    if part is not None:
        _check_same(settings, part["settings"], out_dir / names["part"])
    rank_done = part is not None
    progress = _read_json(out_dir / names["progress"])
    if progress is not None:
        _check_same(settings, progress["settings"], out_dir / names["progress"])
    n_blocks_mine = math.ceil(len(mine) / block_samples)
    blocks_done = progress["blocks_done"] if progress is not None else 0

    partial = {n: out_dir / (names[n] + ".partial") for n in ("ids", "logprobs")}
    arrays = None
    if not rank_done and blocks_done < n_blocks_mine and R > 0:
        if blocks_done == 0 or not all(p.exists() for p in partial.values()):
            blocks_done = 0  # no usable partial arrays: start this rank over
            arrays = {"ids": np.lib.format.open_memmap(partial["ids"], mode="w+", dtype=id_dtype, shape=(R, k)),
                      "logprobs": np.lib.format.open_memmap(partial["logprobs"], mode="w+", dtype=st_dtype,
                                                            shape=(R, k))}
        else:
            arrays = {n: np.load(p, mmap_mode="r+", allow_pickle=False) for n, p in partial.items()}
            assert arrays["ids"].shape == (R, k), "partial array does not match the recomputed row count"

    needs_teacher = sharded or (not rank_done and blocks_done < n_blocks_mine)
    model = OnlineTeacher.load(teacher_path, k, device=device, dtype=compute_dtype, shard=shard) \
        if needs_teacher else None

    # Every rank walks the same number of blocks and batch slots (ranks' shares differ by at most one sample),
    # so a sharded teacher's collectives line up; a slot without local work runs a 1-token dummy forward.
    max_len = max(len(p) for p in per_rank)
    n_blocks = math.ceil(max_len / block_samples)
    t_compute, samples_done, rows_done = time.perf_counter(), 0, 0
    for b in range(n_blocks):
        lo, hi = b * block_samples, min((b + 1) * block_samples, len(mine))
        need = not rank_done and b >= blocks_done and lo < hi
        if sharded:
            if not _any_rank(need):
                continue
            slots = max(min(block_samples, len(p) - lo) for p in per_rank)
        elif not need:
            continue
        else:
            slots = hi - lo
        for j in range(math.ceil(slots / batch_size)):
            s_lo, s_hi = lo + j * batch_size, min(lo + (j + 1) * batch_size, hi)
            if not need or s_lo >= s_hi:
                model.dummy_step()
                continue
            idx_N, ids_NK, logprobs_NK = model.loss_topk(ds.batch(mine[s_lo:s_hi]))
            ids, lp = _to_storage(ids_NK, logprobs_NK, id_dtype, lp_dtype)
            r0, n = int(first_S[s_lo]), int(counts_S[s_lo:s_hi].sum())
            if len(ids) != n:
                raise RuntimeError(f"samples {mine[s_lo]}..{mine[s_hi - 1]}: the teacher returned {len(ids)} rows, "
                                   f"the labels have {n} loss positions")
            if n:
                arrays["ids"][r0:r0 + n] = ids
                arrays["logprobs"][r0:r0 + n] = lp
            samples_done += s_hi - s_lo
            rows_done += n
        if need:
            _commit_block(arrays, out_dir / names["progress"], settings, b + 1)
    seconds = time.perf_counter() - t_compute

    if not rank_done:
        _finish_rank(out_dir, names, arrays, partial, settings, mine, first_S, counts_S, R, k, id_dtype, st_dtype)
    del arrays
    manifest = _maybe_write_manifest(out_dir, settings, world_size, rank, teacher_path)
    report = _report(rank, samples_done * int(ds.seq_len), rows_done, seconds, manifest, out_dir)
    report["wall_seconds"] = time.perf_counter() - t_start
    if rank == 0:
        print(f"capture rank 0: {report['tokens']} tokens ({report['loss_tokens']} loss tokens) in "
              f"{seconds:.2f} s = {report['tokens_per_s']:.0f} tokens/s ({report['loss_tokens_per_s']:.0f} loss "
              f"tokens/s); store: {report.get('bytes_per_token', float('nan')):.1f} bytes/token"
              f"{'' if manifest else ' (manifest pending: other ranks still running)'}", flush=True)
    return report


def _check_same(settings: dict, found: dict, where: Path) -> None:
    for key, value in settings.items():
        if found.get(key) != value:
            raise ValueError(f"{where} was written with {key}={found.get(key)!r}, this capture has {key}={value!r}; "
                             f"fix: use the same setting, or another out_dir (or delete {where.parent})")


def _commit_block(arrays, progress_path: Path, settings: dict, blocks_done: int) -> None:
    """The block's rows reach the file before the progress that claims them (msync, then atomic rename)."""
    if arrays is not None:
        for a in arrays.values():
            a.flush()
    _atomic_write_json(progress_path, {"settings": settings, "blocks_done": blocks_done})


def _finish_rank(out_dir, names, arrays, partial, settings, mine, first_S, counts_S, R, k, id_dtype, st_dtype):
    """Partial arrays -> final names, then the index, then the part file (the rank's commit)."""
    if R == 0:
        _atomic_save_npy(out_dir / names["ids"], np.zeros((0, k), dtype=id_dtype))
        _atomic_save_npy(out_dir / names["logprobs"], np.zeros((0, k), dtype=st_dtype))
    else:
        if arrays is not None:
            for a in arrays.values():
                a.flush()
        for n, p in partial.items():
            if p.exists():  # absent only when a previous call renamed it and died before the part file
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(p, out_dir / names[n])
    index_S3 = np.stack([mine, first_S, counts_S], axis=1).astype(np.int64).reshape(-1, 3)
    _atomic_save_npy(out_dir / names["index"], index_S3)
    nbytes = {n: os.path.getsize(out_dir / names[n]) for n in ("ids", "logprobs", "index")}
    _atomic_write_json(out_dir / names["part"], {"settings": settings, "rows": R, "samples": len(mine),
                                                 "files": {n: names[n] for n in nbytes}, "bytes": nbytes})
    (out_dir / names["progress"]).unlink(missing_ok=True)


def _maybe_write_manifest(out_dir: Path, settings: dict, world_size: int, rank: int, teacher_path: Path):
    """Write manifest.json once every rank's part exists; returns it (None while parts are missing)."""
    if _distributed():
        import torch.distributed as dist
        dist.barrier()
        if rank != 0:
            return None
    parts = [_read_json(out_dir / _names(r, world_size)["part"]) for r in range(world_size)]
    if any(p is None for p in parts):
        return None
    total_bytes = sum(sum(p["bytes"].values()) for p in parts)
    rows = sum(p["rows"] for p in parts)
    manifest = {
        **settings,
        "teacher": {"path": str(teacher_path), "weights": weights_sha256(teacher_path)},  # config: teacher_config
        "shards": [{"rank": r, **p["files"], "rows": p["rows"], "samples": p["samples"], "bytes": p["bytes"]}
                   for r, p in enumerate(parts)],
        "rows": rows, "bytes": total_bytes,
        "bytes_per_token": total_bytes / rows if rows else None,
        "sample_assignment": "selected samples (ascending; all, or those of rows_of) s_0, s_1, ...: s_i -> rank i % W",
    }
    _atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def _report(rank, tokens, loss_tokens, seconds, manifest, out_dir) -> dict:
    report = {"rank": rank, "out_dir": str(out_dir), "tokens": tokens, "loss_tokens": loss_tokens,
              "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
              "loss_tokens_per_s": loss_tokens / seconds if seconds > 0 else 0.0, "complete": manifest is not None}
    if manifest is not None:
        report.update(bytes=manifest["bytes"], rows=manifest["rows"], bytes_per_token=manifest["bytes_per_token"])
    return report


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
            self._ids.append(np.load(self.path / sh["ids"], mmap_mode="r", allow_pickle=False))
            self._logprobs.append(np.load(self.path / sh["logprobs"], mmap_mode="r", allow_pickle=False))
            index = np.load(self.path / sh["index"], allow_pickle=False)
            self._where_S3[index[:, 0]] = np.concatenate([np.full((len(index), 1), i), index[:, 1:]], axis=1)

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
        counts_B = (labels_BT != IGNORE_INDEX).sum(1).tolist()
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
        lp_NK = np.concatenate(lps) if lps else np.zeros((0, self.k), dtype=_storage_dtype(self.logprobs_dtype))
        if self.logprobs_dtype == "bfloat16":
            logprobs_NK = torch.from_numpy(lp_NK.view(np.int16)).view(torch.bfloat16)
        else:
            logprobs_NK = torch.from_numpy(lp_NK)
        dev = self.device
        return dense_topk(idx_N.to(dev), ids_NK.to(dev), logprobs_NK.to(dev), B, T)
