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
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)

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


def init_distributed(device: str = "auto", timeout_s: int = 1800, group_of_one: bool = False) -> Env:
    """`group_of_one`: open a process group even for a single process (FSDP2 on a 1-rank mesh needs one)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
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
    elif world == 1 and group_of_one and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Env(rank, world, local_rank, dev, owns, local_world)


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


def max_over_ranks(counts: dict[str, int], group=None) -> dict[str, int]:
    """Integer counts by name, the largest over the ranks of `group` (default: all; unchanged without a process
    group); every rank of the group must call it with the same names. Host sync."""
    if not is_distributed():
        return dict(counts)
    names = sorted(counts)
    t = torch.tensor([counts[n] for n in names], dtype=torch.long, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(names, t.tolist()))


def any_rank(flag: bool) -> bool:
    """True if `flag` holds on any rank (a sharded teacher needs every rank in each forward). Host sync."""
    return _reduce_flag(flag, dist.ReduceOp.MAX)


def all_ranks(flag: bool) -> bool:
    """True if `flag` holds on every rank (e.g. every rank's background checkpoint write has finished). Host sync."""
    return _reduce_flag(flag, dist.ReduceOp.MIN)


def _reduce_flag(flag: bool, op) -> bool:
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(t, op=op)
    return bool(t.item())


def checkpoint_group(env: Env):
    """A gloo group of every rank for DCP's async save: its background thread's collectives (plan gather, the
    final barrier) run there, off the training group (NCCL, or the gloo group the main thread uses on the CPU).
    None without a process group (DCP then saves with no_dist). Every rank must call it."""
    return dist.new_group(backend="gloo") if env.distributed else None


def resolve_strategy(strategy: str, env: Env) -> str:
    if strategy == "auto":
        if env.world_size == 1:
            return "none"
        return "fsdp" if env.device.type == "cuda" else "ddp"
    if strategy == "ddp" and env.world_size == 1:
        return "none"  # one process: nothing to all-reduce; same numbers, no wrapper overhead
    # fsdp with one process stays fsdp (a 1-rank mesh): the mixed-precision policy can be checked on one GPU
    if strategy == "none" and env.world_size > 1:
        raise ValueError(f"parallel.strategy=none with {env.world_size} processes would train {env.world_size} "
                         f"diverging copies; use fsdp or ddp (or auto)")
    return strategy


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype every matmul runs in: bf16 (fp32 master weights, fp32 gradient reduction) or None (fp32 all
    through). auto: bf16 on CUDA, fp32 on the CPU (the reference path for correctness)."""
    if mixed_precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"parallel.mixed_precision={mixed_precision!r}; use auto, bf16 or fp32")
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if mixed_precision == "bf16" else None


def shard_group_size(setting: int, world: int, local_world: int) -> int:
    """Ranks that shard one copy of the model (FSDP2); world // it copies are replicated (HSDP). 0 = auto: the
    node's ranks when there are several nodes (parameter all-gathers then stay on NVLink, and only the once-per-
    step gradient all-reduce crosses the network), else every rank."""
    if setting < 0:
        raise ValueError(f"parallel.shard_group={setting}; use 0 (auto) or a divisor of the world size ({world})")
    size = setting or (local_world if 1 < local_world < world else world)
    if world % size:
        raise ValueError(f"parallel.shard_group={size} does not divide the world size {world}; use a divisor of "
                         f"{world} (e.g. the GPUs per node, {local_world}) or 0 (auto)")
    return size


def build_mesh(world: int, shard_size: int, device_type: str):
    """1-D mesh ("shard",) when one group shards over every rank, else 2-D ("replicate", "shard"): HSDP, rows
    of `shard_size` consecutive ranks (one node under torchrun's rank order). Built outside any FakeTensorMode."""
    from torch.distributed.device_mesh import init_device_mesh
    if shard_size == world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def world_mesh():
    """A 1-D mesh over every rank of the default group."""
    return build_mesh(dist.get_world_size(), dist.get_world_size(), mesh_device().type)


def shard_mesh(mesh):
    """The mesh dimension that shards (a sharded teacher uses it alone: one copy per node under HSDP)."""
    return mesh if mesh.ndim == 1 else mesh["shard"]


def node_mesh(env: Env, mesh=None):
    """The 1-D mesh of this node's ranks (torchrun's LOCAL_WORLD_SIZE consecutive ranks), over which a sharded or
    expert-placed teacher is split: its all-gathers then stay on the node's NVLink and never cross the network
    (a 46.7 B-parameter bf16 teacher is ~82 GB received per forward and rank). `mesh`: the run's FSDP mesh,
    reused when its shard dimension is already the node."""
    local = env.local_world_size
    if env.world_size % local:
        raise ValueError(f"{env.world_size} ranks are not whole nodes of {local} (LOCAL_WORLD_SIZE); start the same "
                         "number of processes on every node")
    if mesh is not None and shard_mesh(mesh).size() == local:
        return shard_mesh(mesh)
    return shard_mesh(build_mesh(env.world_size, local, env.device.type))


def expert_placement(shard_size: int):
    """FSDP2 `shard_placement_fn`: stacked expert tensors ([E, 2F, D], [E, D, F]) are sharded on dim 1 when E does not
    divide evenly over the shard group and dim 1 does (torchtitan's rule). On dim 0, 2 experts over 8
    ranks would leave ranks 0-1 each one whole expert of every layer (32 x 3 x 4096 x 14336 = 5.6 B parameters,
    ~90 GB with fp32 gradients and AdamW state) and the other six ranks padding."""
    from torch.distributed.tensor import Shard

    def place(param):
        if param.ndim == 3 and param.shape[0] % shard_size and param.shape[1] % shard_size == 0:
            return Shard(1)
        return Shard(0)
    return place


def parallelize(module: nn.Module, blocks: nn.ModuleList, *, strategy: str, activation_checkpointing: bool,
                compile: bool, env: Env, mesh=None, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the trainable `module` (whose transformer blocks are `blocks`) in place order:

    1. Activation checkpointing, per block: the block's activations are recomputed in the backward. First, so
       that compile and FSDP see the checkpointed block as the unit (torchtitan's order): one recompute per
       block, and under FSDP the block's all-gather serves forward and recompute alike.
    2. torch.compile, per block: blocks are identical, so one compiled graph is reused L times (a whole-model
       compile would unroll all layers and take L times longer to build).
    3. Data parallelism, last, around the result: FSDP2 `fully_shard` on every block, then on the root (which
       takes the embeddings, final norm and LM head: all-gathered once per forward and kept until the
       backward, since the fused loss uses the head inside the root's forward); or DDP around everything.
       FSDP2 on `mesh` (1-D: FSDP; 2-D: HSDP), experts placed by `expert_placement`; with `param_dtype` bf16
       the all-gathered parameters are bf16 (7B: 14.5 GB per gather instead of 29), master weights and
       optimizer state stay in the parameters' dtype (fp32) and gradients are reduced in fp32. Forward inputs
       are not cast (cast_forward_inputs=False): the loss normaliser and teacher log-probs must stay fp32;
       the residual stream is bf16 because the embedding's parameters are. DDP / none get bf16 from autocast
       (train/loss.py), fp32 masters likewise.

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
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if mesh is None:
            mesh = world_mesh()
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                  cast_forward_inputs=False)
        place = expert_placement(shard_mesh(mesh).size())
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, shard_placement_fn=place)
        fully_shard(module, mesh=mesh, mp_policy=mp, shard_placement_fn=place)
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
    """Gradient reduction of one micro-batch: `enabled` on the last of a step.

    DDP: no_sync on the others (its gradients are whole on every rank anyway). FSDP2: every micro-batch is
    reduce-scattered into the sharded fp32 gradient (torchtitan's way): set_requires_gradient_sync(False) would
    keep the whole unsharded gradient on every rank until the last one, +29 GB per rank for a 7B in fp32.
    HSDP: only the all-reduce across replicas (the inter-node one) waits for the last micro-batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(module, DDP) and not enabled:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_all_reduce"):  # FSDP2: a no-op on a 1-D mesh
        module.set_requires_all_reduce(enabled)
    yield


def forward_method(module: nn.Module, name: str):
    """The wrapped module's method `name` (a second forward, e.g. StudentWithLoss.evaluate), callable the way
    `forward` is: FSDP2 hooks only `forward`, so the method is registered with it (its call then all-gathers the
    root's parameters, the embeddings and LM head, as `forward` does); DDP's replicas are whole, so the inner
    module's method serves (no gradient flows through it, so DDP's reducer need not see the call)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(module, DDP):
        return getattr(module.module, name)
    if hasattr(module, "unshard"):  # an FSDP2 module
        from torch.distributed.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(module, name)
    return getattr(module, name)


def unwrap(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    return module.module if isinstance(module, DDP) else module
