"""Prepared data: rows -> tokens -> packed int32 arrays, written once into a shared cache, found by a key, and
memory-mapped by every rank with numpy alone (`train/main.py prepare`; `build_packed` for kd/dae/sft/capture).

Layout of <cache_dir>/prepared-<key hash>/ (PackedDataset.save's, so `PackedDataset.load` and `data.packed` read it):
    tokens.npy, labels.npy, positions.npy, doc_ids.npy   [S, L] int32
    teacher.npy                                           [S] int32
    meta.json    PackedDataset's fields (format, seq_len, pad_id, teacher_names, stats, fingerprint = the arrays'
                 content hash, computed once here) + `key` (what the data was prepared from), `rows_sha256` (the
                 rows' bytes, hashed once here) and how long preparing took
The directory appears by one rename of a complete scratch directory: a reader sees all of it or nothing.

The key (`data_key`): a data-format version (this file's, packing's and chat's), each rows file by absolute path,
size and mtime (nothing re-reads gigabytes of rows at a start), the tokenizer's fingerprint and its config files
(chat template, special tokens), seq_len, the teachers' packing order and pad_id. Not a hash of the code: a change
of the format's meaning bumps a version.

Memory (`prepare`): documents are tokenised in chunks of rows by worker processes that write their int32 ids and
labels straight to scratch files; the main process keeps only per-document numbers (length, loss count,
teacher: ~13 B, plus best-fit's ~24 B) and per-sequence numbers (~80 B per sequence of L tokens), then writes the
[S, L] arrays block by block through memory maps that are unmapped after each block, gathering each block's
documents from a read-only map of the scratch files (also unmapped per block). Nothing per-token is held beyond
one block (~2^20 tokens, ~40 MB of index arithmetic), so peak memory does not grow with the corpus' tokens.

Dimensions: S sequences, L = seq_len, R documents, P tokens of a block.
"""
from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from train.data import chat
from train.data.chat import IGNORE, tokenizer_fingerprint
from train.data.packing import _FORMAT_VERSION as PACKED_FORMAT
from train.data.packing import _ARRAYS, PAD_DOC_ID, PackedDataset, _best_fit_decreasing
from train.data.rows import DEFAULT_TEACHER

PREPARED_FORMAT = "prepared-v1"  # bump when the layout or the meaning of a key field changes
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
_BLOCK_TOKENS = 1 << 20  # tokens written per block: ~40 B of index arithmetic per token -> ~40 MB, whatever the size
_POLL_S = 5.0
# Disk needed while preparing, per byte of JSONL rows (~4 bytes per token): arrow's copy of the rows (~1.5x), the
# flat scratch ids + labels (8 B/token, ~2x) and the arrays (16 B/token, ~4x); checked before anything is written.
_SPACE_PER_ROW_BYTE = 8


class PreparedDataError(ValueError):
    """Prepared data that cannot be used or written; the message names the directory and the fix."""


# ----------------------------------------------------------------------------------------------------------
# The key


def default_cache_dir() -> Path:
    """$DISTILL_DATA_CACHE, else ~/.cache/distill/data: shared by every run of this user (and every node that sees
    the same home directory)."""
    return Path(os.environ.get("DISTILL_DATA_CACHE") or Path.home() / ".cache" / "distill" / "data")


def _file_identity(path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: file not found; fix: check data.paths (cwd is {os.getcwd()})")
    if p.is_dir():  # a save_to_disk dataset: every file in it
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"path": str(p.resolve()), "files": [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns]
                                                    for f in files]}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tokenizer_identity(tokenizer_dir) -> str:
    """sha256 of what decides the token ids and the template: tokenizer_fingerprint (vocabulary, merges, added
    tokens) and the config files that carry the chat template and the special tokens."""
    d = Path(tokenizer_dir)
    fp = tokenizer_fingerprint(d)
    if fp is None:
        raise ValueError(f"no tokenizer.json or tokenizer.model in {d}; fix: set data.tokenizer to the student's "
                         f"tokenizer directory")
    h = hashlib.sha256(fp.encode())
    for name in _TOKENIZER_FILES:
        if (d / name).is_file():
            h.update(f"|{name}:".encode() + (d / name).read_bytes())
    return h.hexdigest()


def data_key(paths: Sequence[str], tokenizer_dir, seq_len: int, teacher_names: Sequence[str] | None,
             pad_id: int | None) -> dict:
    """What prepared data is a function of (module doc). Cheap: file stats and the tokenizer's files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return {"format": PREPARED_FORMAT, "packed_format": PACKED_FORMAT, "chat_format": chat._FORMAT_VERSION,
            "packing": "best-fit decreasing, one teacher per sequence, truncation keeps the head",
            "rows": [_file_identity(p) for p in paths], "tokenizer": tokenizer_identity(tokenizer_dir),
            "seq_len": int(seq_len), "teacher_names": None if teacher_names is None else list(teacher_names),
            "pad_id": None if pad_id is None else int(pad_id)}


def prepared_dir(cache_dir, key: dict) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()
    return Path(cache_dir) / f"prepared-{digest}"


# ----------------------------------------------------------------------------------------------------------
# Reading


def load_prepared(directory, key: dict | None = None) -> PackedDataset:
    """The prepared arrays, memory-mapped (numpy alone), after cheap checks: meta.json, the key (when given),
    every array's header, dtype, shape and file size. Raises PreparedDataError naming what is wrong."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise PreparedDataError(f"{directory}: no readable meta.json ({e}); fix: delete the directory and run "
                                f"`train/main.py prepare` again") from None
    if key is not None:
        found = meta.get("key") or {}
        diff = sorted(k for k in set(key) | set(found) if key.get(k) != found.get(k))
        if diff:
            raise PreparedDataError(f"{directory} was prepared from other settings (differs in {', '.join(diff)}: "
                                    f"{ {k: found.get(k) for k in diff} } vs this run's { {k: key.get(k) for k in diff} }); "
                                    f"fix: delete it and run `train/main.py prepare` again")
    check_arrays(directory, meta)
    return PackedDataset.load(directory, mmap=True)


def check_arrays(directory: Path, meta: dict) -> None:
    """Each array file's header, dtype and shape against meta.json, and its size against the header: a truncated
    or foreign file is a named error before training starts, not a SIGBUS in the middle of it."""
    S, L = (meta.get("stats") or {}).get("sequences"), int(meta["seq_len"])
    for name in ("teacher",) + tuple(n for n in _ARRAYS if n != "teacher"):
        path = directory / f"{name}.npy"
        try:
            with open(path, "rb") as f:
                shape, fortran, dtype = _npy_header(f)
                offset = f.tell()
            size = path.stat().st_size
        except (OSError, ValueError) as e:
            raise PreparedDataError(f"{path}: unreadable ({type(e).__name__}: {e}); fix: delete {directory} and "
                                    f"prepare again") from None
        if S is None and name == "teacher" and len(shape) == 1:  # a PackedDataset saved without stats
            S = int(shape[0])
        want = (S,) if name == "teacher" else (S, L)
        if tuple(shape) != want or dtype != np.int32 or fortran:
            raise PreparedDataError(f"{path}: {dtype}{list(shape)}, meta.json says int32{list(want)}; fix: delete "
                                    f"{directory} and prepare again")
        if size != offset + 4 * int(np.prod(want)):
            raise PreparedDataError(f"{path}: {size} bytes, a complete int32{list(want)} array has "
                                    f"{offset + 4 * int(np.prod(want))} (truncated or appended to); fix: delete "
                                    f"{directory} and prepare again")


def _npy_header(f) -> tuple:
    """(shape, fortran_order, dtype) of an open .npy file, leaving it at the first data byte."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


# ----------------------------------------------------------------------------------------------------------
# Tokenising in worker processes: rows [r0, r1) -> ids/labels int32 files + per-document numbers

_W: dict = {}
_TASKS_PER_WORKER = 8  # a worker is replaced after this many chunks: the row pages it mapped go with it


def _worker_init(sources, tokenizer, seq_len, teacher_names, scratch):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: `processes` is the number of cores used
    _W.update(sources=sources, tokenizer=tokenizer, seq_len=seq_len, teacher_names=teacher_names, scratch=scratch)


def _tokenize_chunk(task: tuple[int, int, int, int]) -> dict:
    """Rows [r0, r1) of source `src`: normalised, validated, tokenised; ids and labels to two int32 files."""
    from train.data.rows import normalise_chunk
    c, src, r0, r1 = task
    source, ds = _W["sources"][src]
    rows = normalise_chunk(ds, r0, r1, source, _W["teacher_names"])
    keep = [k for k, skip in enumerate(rows["_skip"]) if not skip]
    out = chat._tokenize_batch({"messages": [rows["messages"][k] for k in keep]}, tokenizer=_W["tokenizer"],
                               max_seq_len=_W["seq_len"])
    n = len(keep)
    lengths = np.fromiter((len(x) for x in out["input_ids"]), dtype=np.int32, count=n)
    flat = lambda col: np.concatenate([np.asarray(x, dtype=np.int32) for x in col]) if n else np.zeros(0, np.int32)  # noqa: E731
    ids, labels = flat(out["input_ids"]), flat(out["labels"])
    scratch = Path(_W["scratch"])
    ids.tofile(scratch / f"chunk-{c}.ids")
    labels.tofile(scratch / f"chunk-{c}.labels")
    loss = np.add.reduceat((labels != IGNORE).astype(np.int32), np.cumsum(lengths) - lengths) if n else \
        np.zeros(0, np.int32)
    names = [rows["teacher"][k] for k in keep]
    unique = sorted(set(names))
    codes = np.asarray([unique.index(t) for t in names], dtype=np.int16) if len(unique) > 1 else np.zeros(n, np.int16)
    skipped = [r0 + k for k, skip in enumerate(rows["_skip"]) if skip]
    return {"chunk": c, "source": source, "lengths": lengths, "num_tokens": np.asarray(out["num_tokens"], np.int32),
            "loss": loss, "teachers": unique, "codes": codes, "skipped": len(skipped),
            "first_skipped": skipped[0] if skipped else None, "rows": r1 - r0}


def _append(src: Path, dst) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst, 16 << 20)
    src.unlink()


# ----------------------------------------------------------------------------------------------------------
# Writing


def prepare(paths, tokenizer_dir, seq_len: int, teacher_names: Sequence[str] | None = None, pad_id: int | None = None,
            cache_dir=None, processes: int | None = None, chunk_rows: int = 2048, log=print) -> Path:
    """Prepare the packed data of `paths` once into `cache_dir` (module doc) and return its directory; an existing
    complete copy with the same key is returned as is. processes: tokenising processes (None: every CPU core)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = data_key(paths, tokenizer_dir, seq_len, teacher_names, pad_id)
    target = prepared_dir(cache_dir, key)
    if (target / "meta.json").exists():
        load_prepared(target, key)
        log(f"prepare: {target} already holds this data (key matches); nothing to do")
        return target
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}; fix: use at least 1")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(cache_dir, e) from None
    _remove_stale_scratch(cache_dir, target.name)
    scratch = cache_dir / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        scratch.mkdir()  # the first write: a read-only disk stops here
        need, free = _SPACE_PER_ROW_BYTE * _rows_bytes(paths), shutil.disk_usage(cache_dir).free
        if need > free:
            raise PreparedDataError(f"cannot write prepared data under {cache_dir}: the disk is full for this data "
                                    f"(it needs about {need / 1e9:.2f} GB while preparing, {free / 1e9:.2f} GB are "
                                    f"free); nothing was written; fix: free space or set data.cache_dir (or "
                                    f"$DISTILL_DATA_CACHE) to a larger disk")
        stats = _prepare_into(scratch, key, paths, tokenizer_dir, seq_len, teacher_names, pad_id, processes,
                              chunk_rows, log)
        try:
            os.replace(scratch, target)  # atomic: a reader sees a complete directory or none
        except OSError:
            if not (target / "meta.json").exists():
                raise
            log(f"prepare: another process finished {target} first; its copy is identical")
    except OSError as e:
        shutil.rmtree(scratch, ignore_errors=True)
        raise _disk_error(cache_dir, e) from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"prepare: {target}: {stats['tokens']} tokens, {stats['docs']} documents, {stats['sequences']} sequences of "
        f"{seq_len} ({100 * stats['padding_fraction']:.2f} % padding) in {stats['seconds']:.1f} s "
        f"({stats['tokens'] / max(stats['seconds'], 1e-9):.0f} tokens/s)")
    return target


def _disk_error(cache_dir: Path, e: OSError) -> PreparedDataError:
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied"}.get(e.errno)
    if why is None:  # arrow's write errors carry no errno ("N requested and M written")
        try:
            free = shutil.disk_usage(cache_dir).free
        except OSError:
            free = None
        why = (f"the disk is full ({free} bytes free)" if free is not None and free < 16 << 20
               else f"{type(e).__name__}: {e}")
    return PreparedDataError(f"cannot write prepared data under {cache_dir}: {why} ({e.strerror or e}); nothing was "
                             f"left behind; fix: free space or set data.cache_dir (or $DISTILL_DATA_CACHE) to a "
                             f"writable directory with room for ~24 bytes per token")


def _remove_stale_scratch(cache_dir: Path, name: str) -> None:
    """Scratch directories of this key left by a killed process on this host."""
    host = socket.gethostname()
    for d in cache_dir.glob(f".{name}.tmp-{host}-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _prepare_into(scratch: Path, key: dict, paths, tokenizer_dir, seq_len, teacher_names, pad_id, processes,
                  chunk_rows, log) -> dict:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    chat._check_tokenizer(tok)
    chat._needs_fold(tok, chat._template_of(tok))  # fail here, not inside a worker, on an unusable template
    if pad_id is None:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    work = scratch / "work"
    work.mkdir()
    from train.data.rows import _schemas_of, raw_sources
    sources = raw_sources(paths, cache_dir=str(work / "rows"))
    for source, ds in sources:
        _schemas_of(ds.column_names, source)  # fail here on a file with no known columns
    tasks = [(0, src, r0, min(r0 + chunk_rows, len(ds))) for src, (_, ds) in enumerate(sources)
             for r0 in range(0, len(ds), chunk_rows)]
    tasks = [(c, *t[1:]) for c, t in enumerate(tasks)]
    n_rows = sum(len(ds) for _, ds in sources)
    processes = max(1, min(processes or os.cpu_count() or 1, len(tasks)))
    log(f"prepare: {n_rows} rows, {len(tasks)} chunks of {chunk_rows} rows, {processes} tokenising process(es)")

    # 1. Normalise + tokenise in worker processes (the main process never reads the rows' pages); chunks appended
    #    in order to two flat int32 files; per-document numbers kept.
    lengths, num_tokens, loss, codes, names, skipped = [], [], [], [], {}, {}
    with open(work / "ids.bin", "wb") as ids_f, open(work / "labels.bin", "wb") as labels_f:
        pool = multiprocessing.get_context("fork").Pool(processes, _worker_init,
                                                        (sources, tok, seq_len, teacher_names, work),
                                                        maxtasksperchild=_TASKS_PER_WORKER)
        try:
            for res in pool.imap(_tokenize_chunk, tasks):
                c = res["chunk"]
                _append(work / f"chunk-{c}.ids", ids_f)
                _append(work / f"chunk-{c}.labels", labels_f)
                remap = np.asarray([names.setdefault(n, len(names)) for n in res["teachers"]] or [0], dtype=np.int16)
                lengths.append(res["lengths"]), num_tokens.append(res["num_tokens"]), loss.append(res["loss"])
                codes.append(remap[res["codes"]])
                count = skipped.setdefault(res["source"], [0, 0, None])
                count[0] += res["skipped"]
                count[1] += res["rows"]
                if count[2] is None:
                    count[2] = res["first_skipped"]
        finally:
            pool.terminate()
            pool.join()
    for source, (n_skip, n_src, first) in skipped.items():
        if n_skip:
            warnings.warn(f"{source}: skipped {n_skip} of {n_src} rows with an empty assistant answer (first: row "
                          f"{first + 1})", stacklevel=3)
    del sources
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
    kept_R, full_R, loss_R, code_R = (cat(lengths, np.int32), cat(num_tokens, np.int32), cat(loss, np.int32),
                                      cat(codes, np.int16))
    del lengths, num_tokens, loss, codes
    t_tok = time.perf_counter() - t0

    # 2. Assign documents to sequences (pack()'s rule and order, from lengths alone).
    found = sorted(names)
    if teacher_names is None:
        teacher_names = ([DEFAULT_TEACHER] if DEFAULT_TEACHER in found else []) + [t for t in found
                                                                                  if t != DEFAULT_TEACHER]
    teacher_names = list(teacher_names)
    to_run = np.asarray([teacher_names.index(n) for n in sorted(names, key=names.get)], dtype=np.int32)
    teacher_R = to_run[code_R] if len(code_R) else np.zeros(0, np.int32)
    keep_R = loss_R > 0
    seq_of_R = np.full(len(kept_R), -1, dtype=np.int64)
    offset_R = np.zeros(len(kept_R), dtype=np.int32)
    seq_teacher, n_seqs = [], 0
    for t in range(len(teacher_names)):
        docs = np.flatnonzero(keep_R & (teacher_R == t))
        if len(docs) == 0:
            continue
        seq_local, offset_local, count = _best_fit_decreasing(kept_R[docs].astype(np.int64), seq_len)
        seq_of_R[docs] = seq_local + n_seqs
        offset_R[docs] = offset_local
        seq_teacher += [t] * count
        n_seqs += count
        del seq_local, offset_local, docs
    t_pack = time.perf_counter() - t0 - t_tok

    # 3. Write the arrays block by block (module doc).
    _write_arrays(scratch, work, kept_R, keep_R, seq_of_R, offset_R, np.asarray(seq_teacher, dtype=np.int32),
                  n_seqs, seq_len, pad_id)
    shutil.rmtree(work)
    n_tokens = int(kept_R[keep_R].sum())
    stats = {
        "docs": int(keep_R.sum()), "sequences": int(n_seqs), "tokens": n_tokens,
        "loss_tokens": int(loss_R[keep_R].sum()), "truncated_docs": 0, "truncated_tokens": 0,
        "dropped_docs_no_loss": int((~keep_R).sum()), "dropped_tokens": int(kept_R[~keep_R].sum()),
        "padding_fraction": float(1.0 - n_tokens / max(1, n_seqs * seq_len)),
        "sequences_per_teacher": {name: int(seq_teacher.count(t)) for t, name in enumerate(teacher_names)},
        "truncated_docs_at_tokenize": int((full_R > kept_R).sum()),
        "truncated_tokens_at_tokenize": int((full_R.astype(np.int64) - kept_R).sum()),
    }
    if stats["truncated_docs_at_tokenize"]:
        warnings.warn(f"prepare: {stats['truncated_docs_at_tokenize']} documents longer than seq_len={seq_len} were "
                      f"truncated ({stats['truncated_tokens_at_tokenize']} tokens cut)", stacklevel=2)
    if stats["dropped_docs_no_loss"]:
        warnings.warn(f"prepare: dropped {stats['dropped_docs_no_loss']} documents with no answer token left after "
                      f"truncation ({stats['dropped_tokens']} tokens); fix: raise seq_len", stacklevel=2)
    settings = {"format": PACKED_FORMAT, "seq_len": int(seq_len), "pad_id": int(pad_id),
                "teacher_names": teacher_names}
    fingerprint = _content_hash(scratch, settings)
    t_all = time.perf_counter() - t0
    meta = {**settings, "stats": stats, "fingerprint": fingerprint, "key": key, "rows_sha256": _rows_sha256(paths),
            "prepared": {"seconds": round(t_all, 3), "tokenize_seconds": round(t_tok, 3),
                         "pack_seconds": round(t_pack, 3), "processes": processes, "chunk_rows": chunk_rows}}
    for name in _ARRAYS:  # on disk before the rename publishes them (a crash leaves no half-written arrays)
        with open(scratch / f"{name}.npy", "rb+") as f:
            os.fsync(f.fileno())
    with open(scratch / "meta.json", "w") as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return {**stats, "seconds": t_all}


def _write_arrays(scratch: Path, work: Path, kept_R, keep_R, seq_of_R, offset_R, teacher_S, S: int, L: int,
                  pad_id: int) -> None:
    headers = {}
    for name in _ARRAYS:
        shape = (S,) if name == "teacher" else (S, L)
        path = scratch / f"{name}.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": shape})
            headers[name] = f.tell()
            nbytes = 4 * int(np.prod(shape))
            if nbytes:
                # Reserve the blocks now: a full disk is an OSError here, not a SIGBUS inside a memory map later.
                os.posix_fallocate(f.fileno(), headers[name], nbytes)
    if S == 0:
        return
    with open(scratch / "teacher.npy", "r+b") as f:
        f.seek(headers["teacher"])
        f.write(teacher_S.astype("<i4").tobytes())

    # Documents in sequence order; each document's first token in the flat files.
    start_R = np.zeros(len(kept_R), dtype=np.int64)
    np.cumsum(kept_R[:-1], out=start_R[1:])
    placed_R = np.flatnonzero(keep_R)
    order = placed_R[np.argsort(seq_of_R[placed_R], kind="stable")]
    first_doc_S = np.searchsorted(seq_of_R[order], np.arange(S + 1))
    block = max(1, _BLOCK_TOKENS // L)
    for s0 in range(0, S, block):
        s1 = min(S, s0 + block)
        docs = order[first_doc_S[s0]:first_doc_S[s1]]
        n_R = kept_R[docs].astype(np.int64)
        doc_P = np.repeat(np.arange(len(docs)), n_R)
        within_P = np.arange(len(doc_P), dtype=np.int64) - np.repeat(np.cumsum(n_R) - n_R, n_R)
        dest_P = (seq_of_R[docs] - s0)[doc_P] * L + offset_R[docs][doc_P] + within_P
        out = {}
        for name in ("tokens", "labels", "positions", "doc_ids"):  # fresh maps per block, unmapped at its end
            out[name] = np.memmap(scratch / f"{name}.npy", dtype="<i4", mode="r+",
                                  offset=headers[name] + 4 * s0 * L, shape=(s1 - s0) * L)
        for name, src in (("tokens", "ids.bin"), ("labels", "labels.bin")):
            out[name][:] = IGNORE if name == "labels" else pad_id
            out[name][dest_P] = _read_ranges(work / src, start_R[docs], n_R)
        out["doc_ids"][:] = PAD_DOC_ID
        out["doc_ids"][dest_P] = docs[doc_P]
        # Padding is one pseudo-document per sequence tail, positions 0, 1, ... (as pack() writes it).
        used_S = np.bincount(seq_of_R[docs] - s0, weights=n_R, minlength=s1 - s0).astype(np.int64)
        positions = (np.arange(L)[None, :] - used_S[:, None]).reshape(-1)
        positions[dest_P] = within_P
        out["positions"][:] = positions
        for a in out.values():
            a.flush()
        del out, positions, doc_P, within_P, dest_P


def _read_ranges(path: Path, start_R: np.ndarray, n_R: np.ndarray) -> np.ndarray:
    """The int32 ranges [start, start + n) of a flat file, concatenated, read with pread (one call per document,
    ~3 us each). Not through a memory map: a block's documents lie all over the file, and the kernel maps up to
    64 kB of page cache around every touched page (fault-around), which showed as resident file pages growing
    with the file (~4 B/token of VmHWM at 5-20 M tokens) although the process holds none of it."""
    out = np.empty(int(n_R.sum()), dtype="<i4")
    view, pos = memoryview(out).cast("B"), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, n in zip(start_R.tolist(), n_R.tolist()):
            got = os.preadv(fd, [view[4 * pos:4 * (pos + n)]], 4 * start)
            if got != 4 * n:
                raise OSError(errno.EIO, f"{path}: short read ({got} of {4 * n} bytes at {4 * start})")
            pos += n
    finally:
        os.close(fd)
    return out


def _content_hash(directory: Path, settings: dict) -> str:
    """PackedDataset._content_hash over the files, read in 16 MB pieces (no map, so no resident pages)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name in _ARRAYS:
        with open(directory / f"{name}.npy", "rb") as f:
            shape, _, dtype = _npy_header(f)
            h.update(f"{name}:{dtype.str}:{tuple(shape)}".encode())
            while piece := f.read(16 << 20):
                h.update(piece)
    return h.hexdigest()


def _rows_sha256(paths) -> str:
    """sha256 of the rows' bytes (every file of a directory), computed once, stored in meta.json."""
    h = hashlib.sha256()
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = Path(p)
        for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
            h.update(f"{f.name}:".encode())
            with open(f, "rb") as fh:
                while piece := fh.read(16 << 20):
                    h.update(piece)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# A run's data, under one process or torchrun


def _rows_bytes(paths) -> int:
    size = 0
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = Path(p)
        size += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return size


def wait_timeout_s(paths) -> int:
    """How long ranks other than 0 wait for rank 0 to prepare: 15 minutes plus 5 s per MB of rows (0.2 MB/s, well
    under the slowest single-process rate measured in bench/bench_data.py), so a 4 GB corpus (~1 B tokens) gets
    ~6 hours; a failure on rank 0 ends the wait at once (it leaves a .failed note)."""
    return int(900 + 5 * _rows_bytes(paths) / 1e6)


def _run_id() -> str | None:
    return os.environ.get("TORCHELASTIC_RUN_ID")  # the same on every rank of one torchrun launch


def _failure_note(failed: Path, started: float) -> str | None:
    """Rank 0's failure note when it belongs to this launch (same torchrun run id; without one: written after this
    rank started waiting, minus a few seconds of clock skew), else None (a stale note of an earlier launch)."""
    try:
        note, mtime = json.loads(failed.read_text()), failed.stat().st_mtime
    except (OSError, ValueError):
        return None
    run = _run_id()
    mine = note.get("run") == run if run is not None else mtime >= started - 5
    return note.get("error", "?") if mine else None


def build_packed(d, tokenizer_dir: str, teacher_names, cache_dir, env, log=print) -> PackedDataset:
    """The PackedDataset of `d` (a DataConfig) for kd/dae/sft/capture: `d.packed` when given; else the prepared
    data with this key in cache_dir (None: `default_cache_dir()`), memory-mapped with numpy alone. Only when none
    exists does rank 0 prepare it (every CPU core) while the other ranks wait for the directory, with a timeout
    that grows with the rows' size (`wait_timeout_s`, logged), polling the file system, not a collective."""
    if d.packed:
        directory = Path(d.packed)
        meta = directory / "meta.json"
        if meta.exists():
            check_arrays(directory, json.loads(meta.read_text()))
        return PackedDataset.load(directory)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = data_key(d.paths, tokenizer_dir, d.seq_len, teacher_names, d.pad_id)
    target = prepared_dir(cache_dir, key)
    if (target / "meta.json").exists():
        if env.is_main:
            log(f"data: prepared copy {target} (no tokenisation)")
        return load_prepared(target, key)
    failed = target.with_name(target.name + ".failed")
    if env.is_main:
        failed.unlink(missing_ok=True)
        log(f"data: no prepared copy in {cache_dir}; preparing it now on rank 0"
            + (f" while {env.world_size - 1} other rank(s) wait up to {wait_timeout_s(d.paths)} s (15 min + 5 s per MB "
               f"of rows)" if env.world_size > 1 else "")
            + "; next time run `train/main.py prepare` beforehand, so that no rank waits")
        try:
            prepare(d.paths, tokenizer_dir, d.seq_len, teacher_names, d.pad_id, cache_dir, processes=d.num_proc,
                    log=log)
        except BaseException as e:
            if env.world_size > 1:
                try:
                    failed.write_text(json.dumps({"run": _run_id(), "error": f"{type(e).__name__}: {e}"}))
                except OSError:
                    pass
            raise
    else:
        timeout = wait_timeout_s(d.paths)
        print(f"rank {env.rank}: waiting up to {timeout} s for rank 0 to prepare {target} (15 min + 5 s per MB of "
              f"rows)", flush=True)
        t0, started = time.monotonic(), time.time()
        while not (target / "meta.json").exists():
            note = _failure_note(failed, started)
            if note is not None:
                raise PreparedDataError(f"rank 0 failed to prepare {target}: {note}")
            if time.monotonic() - t0 > timeout:
                raise PreparedDataError(f"rank {env.rank}: {target} did not appear within {timeout} s; fix: run "
                                        f"`train/main.py prepare --config ...` beforehand")
            time.sleep(_POLL_S)
    return load_prepared(target, key)
