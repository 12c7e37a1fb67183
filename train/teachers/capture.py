"""`capture`: run one teacher over the packed data once and write its top-k store (layout in
train/teachers/store.py), resumable block by block at any world size; `capture(cfg)` is the CLI subcommand.

Dimensions: B batch rows, T tokens per row, K teacher top-k, V vocabulary, S samples (packed sequences),
R stored rows (loss tokens), N loss positions of one batch.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from train import parallel
from train.config import torch_dtype
from train.data import IGNORE
from train.teachers.online import OnlineTeacher
from train.teachers.signal import default_dtype
from train.teachers.store import (FORMAT, LOGPROB_DTYPES, atomic_save_npy, atomic_write_json, ids_dtype, read_json,
                                  storage_dtype, tokenizer_sha256, weights_quick_hash, weights_sha256)


def _loss_counts(labels_SL, samples: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Loss positions per sample, read a few thousand sequences at a time (labels may be a 4 GB memmap)."""
    out = np.zeros(len(samples), dtype=np.int64)
    for s in range(0, len(samples), chunk):
        out[s:s + chunk] = (np.asarray(labels_SL[samples[s:s + chunk]]) != IGNORE).sum(axis=1)
    return out


def _to_storage(ids_NK: torch.Tensor, logprobs_NK: torch.Tensor, id_dtype: np.dtype, lp_dtype: str):
    """Device rows -> numpy rows in the stored dtypes. Host sync (the rows go to disk): once per batch."""
    ids = ids_NK.to(torch.int32).cpu().numpy().astype(id_dtype)
    if lp_dtype == "float16":
        lp = logprobs_NK.to(torch.float16).cpu().numpy()
    else:  # bf16 keeps fp32's range with 8 bits of mantissa; stored as its bit pattern
        lp = logprobs_NK.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return ids, lp


def block_names(block: int) -> dict[str, str]:
    """Files of one committed block; the part file, written last, is its commit."""
    tag = f"b{block:06d}"
    return {"ids": f"ids-{tag}.npy", "logprobs": f"logprobs-{tag}.npy", "index": f"index-{tag}.npy",
            "part": f"part-{tag}.json"}


def run_capture(teacher_path, packed_dataset, out_dir, k: int, batch_size: int, rank: int = 0, world_size: int = 1,
                dtype: str | torch.dtype = "float16", teacher: str | None = None, tokenizer_path=None,
                device=None, compute_dtype: torch.dtype | None = None, shard: bool = False,
                block_samples: int = 64, placement: str | None = None, mesh=None) -> dict:
    """Run the teacher at `teacher_path` over `packed_dataset` and write (or finish) the store in `out_dir`.

    dtype: stored log-probability dtype, "float16" (default; 11-bit mantissa, range to 65504: enough for
    log-probabilities of top-k tokens) or "bfloat16". teacher: capture only the sequences of this teacher name
    (phase 2); None = all. tokenizer_path: directory whose tokenizer files are hashed into the manifest (default:
    the teacher directory, if it holds any). compute_dtype: the teacher's (bf16 on CUDA, fp32 on CPU).
    placement: the teacher's, as in training (OnlineTeacher.load; `shard` = True is "shard"): "shard" or "expert"
    split it over `mesh` (the capture subcommand passes the node's; default every rank), and every rank of the
    process group then runs every forward together. batch_size: sequences per forward (the subcommand derives it
    from the teacher's max_tokens when set, the same budget as training).
    The selected samples are cut into blocks of `block_samples` (block b: selected samples b*n .. (b+1)*n - 1);
    each call takes the blocks not yet committed with b mod W == rank, so a capture resumes at any world size (a
    new world re-partitions the missing blocks) and the store's bytes do not depend on W.
    The manifest is written once every block exists (by rank 0 after a barrier under torchrun, else by whichever
    call finishes last). Returns (and prints on rank 0) throughput and bytes per token for this call.
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
    device = torch.device(device) if device is not None else parallel.mesh_device()
    compute_dtype = compute_dtype or default_dtype(device)
    placement = placement or ("shard" if shard else "replicate")
    sharded = placement != "replicate" and parallel.is_distributed()

    ds = packed_dataset
    teacher_S = np.asarray(ds.teacher)
    if teacher is None:
        selected = np.arange(len(ds), dtype=np.int64)
    else:
        if teacher not in ds.teacher_names:
            raise ValueError(f"teacher={teacher!r} is not one of the dataset's teachers {ds.teacher_names}")
        selected = np.flatnonzero(teacher_S == ds.teacher_names.index(teacher)).astype(np.int64)
    n_blocks = math.ceil(len(selected) / block_samples)
    id_dtype, st_dtype = ids_dtype(V), storage_dtype(lp_dtype)

    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else teacher_path
    settings = {
        "format": FORMAT, "k": int(k), "vocab_size": V, "ids_dtype": id_dtype.name, "logprobs_dtype": lp_dtype,
        "logprobs_storage": st_dtype.name, "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "dataset_fingerprint": ds.fingerprint, "seq_len": int(ds.seq_len), "pad_id": int(ds.pad_id),
        "teacher_names": list(ds.teacher_names), "num_samples": int(len(ds)), "rows_of": teacher,
        "block_samples": int(block_samples), "blocks": int(n_blocks), "batch_size": int(batch_size),
        "tokenizer_sha256": tokenizer_sha256(tok_dir), "teacher_config": config,
        "teacher_weights_quick": weights_quick_hash(teacher_path),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_json(out_dir / "manifest.json")
    if manifest is not None:
        _check_same(settings, manifest, out_dir / "manifest.json")
        return _report(rank, 0, 0, 0.0, manifest, out_dir)
    found = read_json(out_dir / "capture.json")
    if found is not None:
        _check_same(settings, found, out_dir / "capture.json")
    else:  # every rank writes the same bytes; the rename is atomic
        atomic_write_json(out_dir / "capture.json", settings)

    # Block b belongs to rank b mod W. A pure function of the block, so ranks need not agree on a listing (they
    # may even run as independent processes); balanced on resume when the missing blocks are a tail, the usual
    # state after a whole world was stopped (every rank was about equally far along its own blocks).
    missing = [b for b in range(n_blocks) if not (out_dir / block_names(b)["part"]).exists()]
    share = [[b for b in missing if b % world_size == r] for r in range(world_size)]
    block_of = lambda b: selected[b * block_samples:(b + 1) * block_samples]  # noqa: E731
    mine, rounds = share[rank], max(len(x) for x in share)
    model = OnlineTeacher.load(teacher_path, k, device=device, dtype=compute_dtype, placement=placement, mesh=mesh) \
        if (mine or (sharded and rounds)) else None

    # A sharded teacher's collectives must line up: in round i every rank runs as many batches as the largest block
    # of the round (blocks differ only at the end); a slot without local work runs a forward on zero rows.
    t_compute, samples_done, rows_done = time.perf_counter(), 0, 0
    for i in range(rounds):
        samples = block_of(mine[i]) if i < len(mine) else selected[:0]
        slots = max(len(block_of(x[i])) for x in share if i < len(x)) if sharded else len(samples)
        counts_S = _loss_counts(ds.labels, samples)
        first_S = np.zeros(len(samples), dtype=np.int64)
        np.cumsum(counts_S[:-1], out=first_S[1:])
        R = int(counts_S.sum())
        ids_RK, lp_RK = np.zeros((R, k), dtype=id_dtype), np.zeros((R, k), dtype=st_dtype)
        for j in range(math.ceil(slots / batch_size)):
            s_lo, s_hi = j * batch_size, min((j + 1) * batch_size, len(samples))
            if s_lo >= s_hi:
                model.empty_step(int(ds.seq_len))
                continue
            idx_N, ids_NK, logprobs_NK = model.loss_topk(ds.batch(samples[s_lo:s_hi]))
            ids, lp = _to_storage(ids_NK, logprobs_NK, id_dtype, lp_dtype)
            r0, n = int(first_S[s_lo]), int(counts_S[s_lo:s_hi].sum())
            if len(ids) != n:
                raise RuntimeError(f"samples {samples[s_lo]}..{samples[s_hi - 1]}: the teacher returned {len(ids)} "
                                   f"rows, the labels have {n} loss positions")
            ids_RK[r0:r0 + n], lp_RK[r0:r0 + n] = ids, lp
            samples_done += s_hi - s_lo
            rows_done += n
        if i < len(mine):
            _commit_block(out_dir, mine[i], samples, first_S, counts_S, ids_RK, lp_RK)
    seconds = time.perf_counter() - t_compute

    manifest = _maybe_write_manifest(out_dir, settings, n_blocks, rank, teacher_path)
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


def _commit_block(out_dir: Path, block: int, samples, first_S, counts_S, ids_RK, lp_RK) -> None:
    """The block's arrays (each an atomic, fsynced rename), then its part file: the commit."""
    names = block_names(block)
    atomic_save_npy(out_dir / names["ids"], ids_RK)
    atomic_save_npy(out_dir / names["logprobs"], lp_RK)
    atomic_save_npy(out_dir / names["index"], np.stack([samples, first_S, counts_S], axis=1).astype(np.int64)
                    .reshape(-1, 3))
    nbytes = {n: os.path.getsize(out_dir / names[n]) for n in ("ids", "logprobs", "index")}
    atomic_write_json(out_dir / names["part"], {"block": block, "rows": len(ids_RK), "samples": len(samples),
                                                "files": {n: names[n] for n in nbytes}, "bytes": nbytes})


def _maybe_write_manifest(out_dir: Path, settings: dict, n_blocks: int, rank: int, teacher_path: Path):
    """Write manifest.json once every block's part exists; returns it (None while blocks are missing)."""
    if parallel.is_distributed():
        import torch.distributed as dist
        dist.barrier()
        if rank != 0:
            return None
    parts = [read_json(out_dir / block_names(b)["part"]) for b in range(n_blocks)]
    if any(p is None for p in parts):
        return None
    # Every block is committed, so no write is in flight: the temporaries that killed runs left behind
    # (`.<name>.tmp-<pid>` of the atomic writes) go now, and a finished store holds no stray file.
    for stale in out_dir.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
    total_bytes = sum(sum(p["bytes"].values()) for p in parts)
    rows = sum(p["rows"] for p in parts)
    manifest = {
        **settings,
        "teacher": {"path": str(teacher_path), "weights": weights_sha256(teacher_path)},  # config: teacher_config
        "shards": [{"block": b, **p["files"], "rows": p["rows"], "samples": p["samples"], "bytes": p["bytes"]}
                   for b, p in enumerate(parts)],
        "rows": rows, "bytes": total_bytes,
        "bytes_per_token": total_bytes / rows if rows else None,
        "sample_assignment": "selected samples (ascending; all, or those of rows_of) s_0, s_1, ...: block b holds "
                             "s_{b*block_samples} .. s_{(b+1)*block_samples - 1}; a world of W ranks gives each "
                             "missing block b to rank b mod W",
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def _report(rank, tokens, loss_tokens, seconds, manifest, out_dir) -> dict:
    report = {"rank": rank, "out_dir": str(out_dir), "tokens": tokens, "loss_tokens": loss_tokens,
              "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
              "loss_tokens_per_s": loss_tokens / seconds if seconds > 0 else 0.0, "complete": manifest is not None}
    if manifest is not None:
        report.update(bytes=manifest["bytes"], rows=manifest["rows"], bytes_per_token=manifest["bytes_per_token"])
    return report


def forward_batch_size(cfg) -> int:
    """Sequences per teacher forward of `capture`: the teacher's max_tokens // data.seq_len when set (the training
    run's budget), else capture.batch_size. The start-up fit check plans this same figure (train.plan.capture_peak)."""
    (spec,) = cfg.teachers.named.values()
    return max(1, spec.max_tokens // cfg.data.seq_len) if spec.max_tokens else cfg.capture.batch_size


def capture(cfg) -> None:
    """The `capture` subcommand: one teacher over the packed data, once; each rank writes its share."""
    from train.data.prepare import build_packed
    from train.errors import DataError, StoreError, reraise_as
    from train.preflight import check_data_paths, check_model_dir, check_placements, check_tokenizer_dir
    (name, spec), = cfg.teachers.named.items()
    teacher_args = check_model_dir(spec.path, f"teachers.{name}.path")
    check_placements(cfg, {name: teacher_args})
    c, d = cfg.capture, cfg.data
    if cfg.teachers.k > teacher_args.vocab_size:
        raise StoreError(f"teachers.k={cfg.teachers.k} exceeds the teacher's vocabulary ({teacher_args.vocab_size}); "
                         "lower --teachers.k")
    check_data_paths(d.paths, d.packed)
    tok_dir = d.tokenizer or spec.path
    if d.paths:
        check_tokenizer_dir(tok_dir, "data.tokenizer" if d.tokenizer else f"teachers.{name}.path (its tokenizer)")
    env = parallel.init_distributed(cfg.run.device, cfg.parallel.timeout_s)
    try:
        log = print if env.is_main else (lambda *a, **k: None)
        if env.device.type == "cuda":  # before the teacher loads: stop a capture that cannot fit (train.plan)
            from train.plan import GB, fit_check
            fit_check(cfg, env, torch.cuda.get_device_properties(env.device).total_memory / GB, log)
        with reraise_as(DataError):
            packed = build_packed(d, tok_dir, ["reference", "domain"] if c.rows_of else None, d.cache_dir or None,
                                  env, log=log)
        # The training run's placement and token budget: a teacher that fits training fits capture.
        mesh = parallel.node_mesh(env) if env.distributed and spec.placement != "replicate" else None
        batch_size = forward_batch_size(cfg)
        log(f"capture: teacher {name!r} placement {spec.placement}"
            + (f" over the node's {mesh.size()} ranks" if mesh is not None else "")
            + f", {batch_size} sequences per forward"
            + (f" (teachers.{name}.max_tokens={spec.max_tokens})" if spec.max_tokens else " (capture.batch_size)"))
        with reraise_as(StoreError, f"capture.out={c.out!r}: "):
            run_capture(spec.path, packed, c.out, cfg.teachers.k, batch_size, rank=env.rank,
                        world_size=env.world_size, dtype=c.logprobs_dtype, teacher=c.rows_of or None,
                        tokenizer_path=tok_dir, device=env.device, compute_dtype=torch_dtype(cfg.teachers.dtype),
                        placement=spec.placement, mesh=mesh, block_samples=c.block_samples)
    finally:
        parallel.shutdown(env)
