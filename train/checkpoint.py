"""Resumable checkpoints: `torch.distributed.checkpoint` (DCP) for the sharded tensors, JSON for the rest.

Layout of one checkpoint, `run_dir/step-N/`:
    .metadata, __<rank>_<i>.distcp    DCP: model parameters and AdamW moments, each rank writing its own shards
                                      (FSDP2: its slices; DDP/one process: rank 0's copy) and reading them back
                                      under any sharding
    trainer_state.json                step, sampler position, optimizer hyper-parameters (lr, betas...),
                                      skip counters, teacher row counters, world size (written by rank 0)
    rank<r>.json                      each rank's torch / CUDA / numpy / Python RNG states and its own counters

Atomic: every rank writes into `run_dir/.tmp-step-N/`; once every rank's write has finished, rank 0 lists the
files with their sizes in trainer_state.json, fsyncs and renames the directory to `step-N/`, the one step that
makes a checkpoint visible. A crash mid-save leaves a `.tmp-*` directory, which `latest()` never returns and the
next save or resume deletes; the previous `step-M/` is untouched. Only then are checkpoints beyond the newest
`keep` deleted.

Asynchronous (`Saver`, checkpoint.async_save, the default): `dcp.async_save` first stages the model and AdamW
state into host memory (a synchronous copy, so the next optimizer step may mutate the live tensors; it costs
one host copy of each rank's state: its shards of the parameters and both moments, about 1/ranks of the
checkpoint, e.g. 87 GB / 8 for a 7B on 8 GPUs), then writes the files from a background thread while training
goes on; the thread's collectives run on a gloo group of their own (`parallel.checkpoint_group`). At most one
save is in flight: the loop polls it after each step (one small all-reduce while a save is pending) and
commits it (the rename above) once every rank's write has finished; it also waits for it before the next save,
before the final export and on SIGTERM/normal exit. The JSON files are small: rank<r>.json is written when the
save starts (the RNG states of that step), trainer_state.json at commit. A crash before the commit leaves the
previous checkpoint as the newest complete one.

No pickle is written or executed from the data: DCP gets tensors only (optimizer hyper-parameters go to
JSON, since DCP would pickle them), and DCP's own `.metadata` index (a pickle by design) is read with an
unpickler that only admits DCP's metadata classes and torch's size/dtype types.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

from train.parallel import Env, all_ranks, barrier, checkpoint_group

_STEP_RE = re.compile(r"step-(\d+)")
STATE_FILE = "trainer_state.json"


# ------------------------------------------------------------------------------------------------ safe reading

class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes a DCP `.metadata` file is built from, nothing else."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "torch.distributed.tensor.")
    _ALLOWED = {("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
                ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                ("pathlib", "PosixPath")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED or module.startswith(self._ALLOWED_MODULES) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which a checkpoint index never "
                                     f"needs; refusing to load it (was the checkpoint written by this trainer?)")


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read by `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        with open(Path(self.path) / name, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ checkpoints

def step_of(path: Path) -> int:
    m = _STEP_RE.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like step-100)")
    return int(m[1])


def complete_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a `step-N/` exists only once its save finished)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and _STEP_RE.fullmatch(p.name)
             and (p / STATE_FILE).exists() and (p / ".metadata").exists()]
    return sorted(found, key=step_of)


def damage(path: Path) -> str | None:
    """Why a checkpoint that looks complete cannot be loaded, or None: its trainer state must parse and every
    file listed in it at save time must be there with its size (a lost or truncated shard, a partial copy)."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable ({e})"
    for name, size in state.get("files", {}).items():  # checkpoints older than this check list no files
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were saved"
    return None


def latest(run_dir, note=None) -> Path | None:
    """The newest complete, undamaged checkpoint; a damaged newer one is skipped and reported through `note`."""
    for p in reversed(complete_checkpoints(run_dir)):
        why = damage(p)
        if why is None:
            return p
        if note is not None:
            note(f"checkpoint {p} is damaged ({why}); falling back to the previous complete checkpoint")
    return None


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(run_dir, env: Env) -> None:
    """Delete `.tmp-step-*` leftovers of interrupted saves (rank 0), then wait for it."""
    if env.is_main:
        for p in Path(run_dir).glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)
    barrier(env)


def _json_groups(groups: list) -> list:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


def _quiet_single_process() -> None:
    """One process without a process group: DCP warns that it saves without a group, as intended (async saves
    warn from their background thread, where a `warnings.catch_warnings` block would not reach)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                            category=UserWarning)


class Saver:
    """Writes `run_dir/step-N/` checkpoints (module doc), asynchronously when `async_save`; every rank must make
    the same calls at the same steps (`save`, `poll`, `finish`), each of which returns the path of a checkpoint
    it committed, else None.

    `async_save` relies on DCP's staging for the snapshot: `dcp.async_save` returns once the state is copied to
    host memory (one host copy of this rank's state), so the caller may step the optimizer right after. Without
    a process group (one process) DCP saves with `no_dist` from its thread all the same."""

    def __init__(self, run_dir, env: Env, keep: int, async_save: bool = True):
        self.run_dir, self.env, self.keep, self.async_save = Path(run_dir), env, keep, async_save
        self._group = checkpoint_group(env) if async_save else None
        self._pending = None  # (future, step, trainer_state) of the save in flight
        if not env.distributed:
            _quiet_single_process()

    def save(self, step: int, module, optimizer, trainer_state: dict, rank_state: dict) -> Path | None:
        """Start saving the current state as step-<step>/ (first finishing the one in flight). trainer_state:
        rank 0's (global) state; rank_state: this rank's own (e.g. how many rows its teachers saw)."""
        committed = self.finish()
        tmp = self.run_dir / f".tmp-step-{step}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        osd = get_optimizer_state_dict(module, optimizer)
        tensors = {"model": get_model_state_dict(module), "optim": osd["state"]}
        # JSON round trip: a snapshot of the counters and sampler state, which the loop goes on mutating
        state = json.loads(json.dumps({**trainer_state, "step": step, "world_size": self.env.world_size,
                                       "param_groups": _json_groups(osd["param_groups"])}))
        (tmp / f"rank{self.env.rank}.json").write_text(json.dumps({**rank_state, "rng": rng_state()}))
        if self.async_save:
            future = dcp.async_save(tensors, checkpoint_id=tmp, process_group=self._group,
                                    no_dist=not self.env.distributed)
            self._pending = (getattr(future, "upload_completion", future), step, state)  # a Future, or a response
            return committed
        dcp.save(tensors, checkpoint_id=tmp, no_dist=not self.env.distributed)
        self._pending = (None, step, state)
        return self.finish() or committed

    def poll(self) -> Path | None:
        """Commit the save in flight if every rank's write has finished (a collective while one is pending)."""
        if self._pending is None:
            return None
        future = self._pending[0]
        if not all_ranks(future is None or future.done()):
            return None
        return self.finish()

    def finish(self) -> Path | None:
        """Wait for the save in flight (if any) and commit it: trainer_state.json, fsync, rename, prune."""
        if self._pending is None:
            return None
        future, step, state = self._pending
        self._pending = None
        if future is not None:
            future.result()  # a failed write raises here: the .tmp- directory stays, the last checkpoint holds
        barrier(self.env)
        final, tmp = self.run_dir / f"step-{step}", self.run_dir / f".tmp-step-{step}"
        if self.env.is_main:
            state["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in complete_checkpoints(self.run_dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.env)
        return final

    def abandon(self) -> None:
        """On an error: let one process's write end without committing it (the `.tmp-` directory is deleted by
        the next run). Under a process group it is left alone: waiting on a peer that may have died could hang."""
        if self._pending is not None and self._pending[0] is not None and not self.env.distributed:
            try:
                self._pending[0].result()
            except Exception:  # noqa: BLE001 - the run is already failing with its own error
                pass
        self._pending = None


def save(run_dir, step: int, module, optimizer, trainer_state: dict, rank_state: dict, env: Env,
         keep: int) -> Path:
    """Write `run_dir/step-<step>/` synchronously (module doc); every rank must call it."""
    return Saver(run_dir, env, keep, async_save=False).save(step, module, optimizer, trainer_state, rank_state)


def load(path, module, optimizer, env: Env) -> tuple[dict, dict]:
    """Restore module, optimizer and this rank's RNG from `path` in place; returns (trainer_state, rank_state)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE}); use --resume auto to pick the "
                         f"newest complete one")
    state = json.loads(state_file.read_text())
    msd = get_model_state_dict(module)
    osd = get_optimizer_state_dict(module, optimizer)  # creates the AdamW moments to load into
    tensors = {"model": msd, "optim": osd["state"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, checkpoint_id=path, storage_reader=SafeReader(path), no_dist=not env.distributed)
    set_model_state_dict(module, msd)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["param_groups"]]
    set_optimizer_state_dict(module, optimizer, {"state": osd["state"], "param_groups": groups})
    rank_file = path / f"rank{env.rank}.json"
    rank_state = {}
    if rank_file.exists():  # absent when resuming on more ranks than saved: those start from the seed
        rank_state = json.loads(rank_file.read_text())
        set_rng_state(rank_state.pop("rng"))
    return state, rank_state


def load_model_only(path, module) -> None:
    """Model weights only (the `export` subcommand), in one process, into a plain module."""
    path = Path(path)
    msd = get_model_state_dict(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": msd}, checkpoint_id=path, storage_reader=SafeReader(path), no_dist=True)
    set_model_state_dict(module, msd)
