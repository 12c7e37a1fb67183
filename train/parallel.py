"""Processes and parallelism, applied to the model from outside (the model never imports torch.distributed).

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; multi-node through torchrun's
usual --nnodes / --node_rank / --rdzv_endpoint flags) and opens one process group: NCCL on CUDA, gloo on CPU.
A single process (world size 1, e.g. `train.loop.run(cfg)` called in-process) opens none: every collective
below is skipped then, and DCP checkpoints work without a group.

`parallelize` is the one function that wraps the trainable module; its order is the point of it (below).
Every collective the trainer, the teachers and capture use lives here (one module, torchtitan's
`distributed/utils.py`), so that a reader looking for "where do ranks talk" opens one file.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we opened the process group (and close it in `shutdown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return is_distributed()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def mesh_device() -> torch.device:
    """The device this rank computes on: its current GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where small control tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
    return mesh_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> Env:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device=cuda but torch sees no GPU; use run.device=cpu (or auto)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Env(rank, world, local_rank, dev, owns)


def shutdown(env: Env) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: Env) -> torch.Tensor:
    """In place; gloo needs CPU tensors, NCCL device tensors (the caller's tensor lives where its backend wants)."""
    if env.distributed:
        dist.all_reduce(t)
    return t


def broadcast_int(value: int, env: Env) -> int:
    """Rank 0's value on every rank (e.g. the run directory's timestamp)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.long, device=env.device)
    dist.broadcast(t, 0)
    return int(t.item())


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Integer counts by name, summed over the ranks of the process group (unchanged without one); every rank
    must call it with the same names. Host sync (the sums come back to Python)."""
    if not is_distributed():
        return dict(counts)
    names = sorted(counts)
    t = torch.tensor([counts[n] for n in names], dtype=torch.long, device=collective_device())
    dist.all_reduce(t)
    return dict(zip(names, t.tolist()))


def any_rank(flag: bool) -> bool:
    """True if `flag` holds on any rank (a sharded teacher needs every rank in each forward). Host sync."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def resolve_strategy(strategy: str, env: Env) -> str:
    if strategy == "auto":
        if env.world_size == 1:
            return "none"
        return "fsdp" if env.device.type == "cuda" else "ddp"
    if strategy in ("fsdp", "ddp") and env.world_size == 1:
        return "none"  # one process: nothing to shard or all-reduce; same numbers, no wrapper overhead
    if strategy == "none" and env.world_size > 1:
        raise ValueError(f"parallel.strategy=none with {env.world_size} processes would train {env.world_size} "
                         f"diverging copies; use fsdp or ddp (or auto)")
    return strategy


def parallelize(module: nn.Module, blocks: nn.ModuleList, *, strategy: str, activation_checkpointing: bool,
                compile: bool, env: Env) -> nn.Module:
    """Wrap the trainable `module` (whose transformer blocks are `blocks`) in place order:

    1. Activation checkpointing, per block: the block's activations are recomputed in the backward. First, so
       that compile and FSDP see the checkpointed block as the unit (torchtitan's order): one recompute per
       block, and under FSDP the block's all-gather serves forward and recompute alike.
    2. torch.compile, per block: blocks are identical, so one compiled graph is reused L times (a whole-model
       compile would unroll all layers and take L times longer to build).
    3. Data parallelism, last, around the result: FSDP2 `fully_shard` on every block, then on the root (which
       takes the embeddings, final norm and LM head: all-gathered once per forward and kept until the
       backward, since the fused loss uses the head inside the root's forward); or DDP around everything.

    Gradient reduction averages over ranks in both FSDP and DDP; the trainer's loss is already normalised
    by the loss-token count of all ranks, so the train step multiplies the loss by the world size instead.
    """
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)  # non-reentrant; state-dict names are kept unprefixed
    if compile:
        for block in blocks:
            block.compile()  # in place: module names and state-dict keys unchanged
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in blocks:
            fully_shard(block)
        fully_shard(module)
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                     gradient_as_bucket_view=True)
    else:
        assert strategy == "none", strategy
    return module


def materialize_from_rank0(module: nn.Module, load_full_state, device: torch.device) -> None:
    """Give weights to a module that was built on the meta device and sharded with FSDP2: storage on `device`
    for this rank's shards only, then the full state dict, which only rank 0 builds (`load_full_state()`,
    on the host), broadcast tensor by tensor, each rank keeping its shard. So a node holds the whole model in
    host memory once, on rank 0, rather than once per rank (8 ranks x 29 GB for a 7B fp32 student).
    Every rank of the default group must call this at the same point."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module.to_empty(device=device)
    full = load_full_state() if dist.get_rank() == 0 else {}
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool):
    """Gradient reduction on (the last micro-batch of a step) or off (the others accumulate locally)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(module, DDP) and not enabled:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
    yield


def unwrap(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    return module.module if isinstance(module, DDP) else module
