"""`train/main.py plan`: will a run fit, and how long will a step take, before any GPU is touched.

    python train/main.py plan --config configs/kd.toml --plan.nodes=4 --plan.gpus_per_node=8 --plan.gpu_memory_gb=141

Only the models' config.json files are read. The student and the online teachers are built from them under
FakeTensorMode (tensors with shapes and dtypes, no storage) inside a fake process group of the planned world
(`torch.testing._internal.distributed.fake_pg`: collectives return at once), wrapped exactly as the run wraps
them (train.parallel.parallelize: AC, FSDP2 on the run's 1-D or HSDP mesh, the bf16 policy, expert placement;
train.teachers.online.shard_teacher), and one optimizer step (grad_accum micro-batches of the teacher's top-k,
the student's forward, fused loss and backward, AdamW) is traced by torch's FSDPMemTracker, which counts the
bytes of every live tensor by kind (torchtitan's memory estimator works the same way). The device mesh is built
outside FakeTensorMode; FSDP2 will not run a forward on meta parameters, hence fake ones. The figures are rank
0's (every rank holds the same shares up to rounding).

What the trace sees and what it does not: the CPU torch paths of the kernels stand in for the CUDA ones (the
fused loss's chunk loop has the same chunk; the grouped GEMM's torch._grouped_mm the same [M, 2F] outputs;
SDPA's flash path the same O(T) saved state); the CUDA caching allocator's fragmentation, the CUDA context and
NCCL's buffers are not tensors, hence `plan.headroom_gb`. Every figure printed is an estimate from this
simulation, not a measurement on a GPU.

Dimensions: B sequences per micro-batch, T tokens per sequence, K teacher top-k.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

GB = 1e9  # GPU memory is sold in 1e9 bytes (80 GB H100 = 79.6 GiB usable for tensors: see headroom)


class PlanError(ValueError):
    """A world the configuration cannot use; the message names the value and the fix."""


@dataclass
class TeacherPlan:
    name: str
    args: object           # ModelArgs
    sharded: bool          # split over the node's GPUs (placement shard or expert, on more than one GPU)
    placement: str = ""    # replicate | shard | expert (train.config.PLACEMENTS); "": shard if sharded, else replicate
    max_tokens: int = 0    # tokens per teacher forward when a step's signals are computed up front; 0: all rows

    def __post_init__(self):
        self.placement = self.placement or ("shard" if self.sharded else "replicate")

    def rows_per_forward(self, step_rows: int, seq_len: int) -> int:
        """Rows of one forward (TeacherSet.step_signals): max_tokens // seq_len, or a rank's whole step."""
        return max(1, min(step_rows, self.max_tokens // seq_len)) if self.max_tokens else step_rows


@dataclass
class Trace:
    """Per-rank bytes of one traced optimizer step."""
    params: int            # the student's sharded master weights
    grads: int             # the student's sharded gradients after a micro-batch (grad_accum > 1: not the last)
    unsharded_grads: int   # whole gradients alive after that micro-batch (0 when every micro-batch reduce-scatters)
    optimizer: int         # AdamW moments
    teachers: int          # online teachers' weights (their share under sharding)
    peak: int              # the tracker's peak of all live tensors over the step
    activations: int       # peak of the tensors the tracker counts as activations (saved for backward, outputs)
    param_dtypes: set = field(default_factory=set)  # dtypes the student's parameters have inside its forward
    kinds: dict = field(default_factory=dict)       # the tracker's peak per kind of tensor


def check_world(student_args, teachers: list[TeacherPlan], world: int, shard: int, node: int | None = None) -> None:
    """PlanError for a world the models cannot be sharded over evenly: a stacked expert tensor that neither its
    expert dimension nor its second dimension splits into `shard` equal parts (the student; `node` for the
    teachers, which split over one node: default `shard`) would put whole experts on a few ranks; an
    expert-placed teacher needs experts that a node's GPUs share whole."""
    if world < 1:
        raise PlanError(f"a world of {world} GPUs; plan at least 1 (plan.nodes x plan.gpus_per_node)")
    node = node or shard
    for t in teachers:
        if t.placement == "expert" and t.sharded and (t.args.moe is None or t.args.moe.num_experts % node):
            have = f"{t.args.moe.num_experts} experts" if t.args.moe else "no experts (dense)"
            raise PlanError(f"teacher {t.name!r}: placement expert over a node of {node} GPUs, but it has {have}; "
                            f"use --teachers.{t.name}.placement=shard, or nodes of a divisor of the expert count")
    for what, a, n in [("student", student_args, shard)] + [(f"teacher {t.name!r}", t.args, node) for t in teachers
                                                             if t.sharded and t.placement == "shard"]:
        if a.moe is None:
            continue
        E, F, D = a.moe.num_experts, a.hidden_dim, a.dim
        if E % n and ((2 * F) % n or D % n):
            raise PlanError(f"{what}: {E} experts ([{E}, {2 * F}, {D}] and [{E}, {D}, {F}]) cannot be split "
                            f"evenly over a shard group of {n} GPUs (neither {E} nor {2 * F} and {D} are "
                            f"multiples of {n}); use a shard group that divides one of them "
                            f"(--parallel.shard_group=N, or --plan.gpus_per_node=N)")


@contextlib.contextmanager
def fake_world(world: int):
    """A fake default process group of `world` ranks (this process is rank 0); refuses to replace a real one."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("plan needs a process without a process group (it opens a fake one); run it outside "
                           "torchrun or in a subprocess")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def trace_step(student_args, teachers: list[TeacherPlan], *, world: int, shard: int, micro_batch: int,
               seq_len: int, grad_accum: int, k: int, activation_checkpointing: bool,
               compute_dtype: torch.dtype | None, master_dtype: torch.dtype = torch.float32,
               teacher_dtype: torch.dtype = torch.bfloat16, loss_weights=(1.0, 1.0), steps: int = 2,
               node: int | None = None) -> Trace:
    """Trace `steps` optimizer steps on rank 0 of a fake world (module doc), one micro-batch each, two in the
    first with grad_accum > 1 (the bytes a non-last micro-batch leaves behind are measured after the first);
    the second step runs with AdamW's moments allocated, where the peak is (steps=1
    suffices for the sharded bytes alone). The student's trace is kept per process for its arguments, so
    several teacher set-ups of one student cost one trace. `node`: the GPUs a placed teacher splits over (one
    node's; default `shard`)."""
    node = node or shard
    check_world(student_args, teachers, world, shard, node)
    st = _trace_student(student_args, world, shard, micro_batch, seq_len, grad_accum > 1, k,
                        activation_checkpointing, compute_dtype, master_dtype, tuple(loss_weights), steps)
    teacher_bytes = _teacher_shares(teachers, world, node, teacher_dtype) if teachers else 0
    # Peak: the student's traced step with the teachers' weights resident, or a teacher's forward (up front, on
    # max_tokens of the step's rows) on top of the student's state (masters, gradients, moments), whichever is
    # larger; plus the step's signals computed up front beyond the one micro-batch the trace holds.
    teacher_fwd = max((_teacher_forward_bytes(t, t.rows_per_forward(micro_batch * grad_accum, seq_len), seq_len,
                                              node) for t in teachers), default=0)
    peak = (teacher_bytes + signal_bytes(micro_batch, seq_len, grad_accum, k)
            + max(st["kinds"]["Total"], st["params"] + st["grads"] + st["opt"] + teacher_fwd))
    return Trace(params=st["params"], grads=st["grads"], unsharded_grads=st["unsharded"], optimizer=st["opt"],
                 teachers=teacher_bytes, peak=peak, activations=st["kinds"].get("ACT", 0),
                 param_dtypes=set(st["dtypes"]), kinds=dict(st["kinds"]))


_STUDENT_TRACES: dict = {}


def _trace_student(a, world, shard, B, T, accumulating, k, ac, compute_dtype, master_dtype, loss_weights, steps):
    key = (repr(a), world, shard, B, T, accumulating, k, ac, compute_dtype, master_dtype, loss_weights, steps)
    if key in _STUDENT_TRACES:
        return _STUDENT_TRACES[key]
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from kernels.grouped_gemm import torch_grouped_mm_runs
    from model import Transformer
    from train import parallel
    from train.loss import LossSettings, StudentWithLoss

    for dt in {compute_dtype or master_dtype, master_dtype}:
        torch_grouped_mm_runs("cpu", dt)  # the probe runs on real tensors, once, before FakeTensorMode
    env = parallel.Env(0, world, 0, torch.device("cpu"), False, shard)
    with fake_world(world):
        mesh = parallel.build_mesh(world, shard, "cpu")  # outside FakeTensorMode
        with FakeTensorMode():
            student = _meta_model(Transformer, a, master_dtype)
            module = StudentWithLoss(student, LossSettings(loss_weights[0], loss_weights[1], 0.0, 0.0),
                                     compute_dtype=compute_dtype)
            module = parallel.parallelize(module, student.layers, strategy="fsdp", activation_checkpointing=ac,
                                          compile=False, env=env, mesh=mesh, param_dtype=compute_dtype)
            module.to_empty(device="cpu")
            optimizer = torch.optim.AdamW([p for p in module.parameters()], lr=1e-5)
            seen_dtypes: set = set()
            hooks = [blk.register_forward_pre_hook(
                lambda mod, args: seen_dtypes.update(p.dtype for p in mod.parameters(recurse=True)))
                for blk in student.layers]
            tracker = FSDPMemTracker(module, optimizer)
            tokens_BT = torch.zeros(B, T, dtype=torch.long)
            labels_BT = torch.zeros(B, T, dtype=torch.long)
            normalizer = torch.tensor(float(B * T * world * (2 if accumulating else 1)))
            after_first = None
            with tracker:
                for step in range(steps):
                    # step 0 with grad_accum > 1: a non-last micro-batch (measured), then the last one (under
                    # HSDP only the last puts gradients into .grad, where AdamW finds them)
                    for last in ([False, True] if accumulating and step == 0 else [True]):
                        ids_BTK = torch.zeros(B, T, k, dtype=torch.long)
                        logprobs_BTK = torch.zeros(B, T, k, dtype=torch.float32)
                        with parallel.grad_sync(module, enabled=last):
                            loss, _ = module(tokens_BT, labels_BT, None, None, ids_BTK, logprobs_BTK, normalizer,
                                             1.0, None, False)
                            loss.backward()
                        del loss, ids_BTK, logprobs_BTK
                        if after_first is None:
                            after_first = tracker.get_tracker_snapshot("current")
                            grads = _local_bytes(p.grad for p in module.parameters()) + _held_reductions(module)
                        tracker.reset_mod_stats()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            for h in hooks:
                h.remove()
            peak = tracker.get_tracker_snapshot("peak")
            params = _local_bytes(module.parameters())
            opt = _local_bytes(v for st in optimizer.state.values() for v in st.values()
                               if torch.is_tensor(v) and v.ndim > 0)
    (dev_peak,) = peak.values()
    (cur,) = after_first.values()
    out = {"params": params, "grads": grads, "opt": opt, "dtypes": frozenset(seen_dtypes),
           "kinds": {str(key).rsplit(".", 1)[-1]: v for key, v in dev_peak.items()},
           "unsharded": {str(key).rsplit(".", 1)[-1]: v for key, v in cur.items()}.get("UNSHARDED_GRAD", 0)}
    _STUDENT_TRACES[key] = out
    return out


def _held_reductions(module: nn.Module) -> int:
    """Bytes of the reduce-scattered gradients FSDP2 keeps outside `.grad` between micro-batches under HSDP
    with set_requires_all_reduce(False) (each group's partial reduce output, the size of its shard in fp32).
    A private attribute of torch 2.13's FSDP2 (0 where it does not exist)."""
    total = 0
    for m in module.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        for group in getattr(state, "_fsdp_param_groups", ()) if state is not None else ():
            total += _local_bytes([getattr(group, "_partial_reduce_output", None)])
    return total


def signal_bytes(micro_batch: int, seq_len: int, grad_accum: int, k: int) -> int:
    """Bytes of a step's up-front teacher signals beyond one micro-batch's: ids int64 + log-probs fp32 = 12 B per
    position and top-k entry (16 x 2048 x K=32 x 12 B = 12.6 MB for a paper step)."""
    return (grad_accum - 1) * micro_batch * seq_len * k * 12


def teacher_bytes_by_placement(t: TeacherPlan, world: int, node: int, dtype: torch.dtype) -> dict[str, int | None]:
    """Rank 0's weight bytes of teacher `t` under each placement over a node of `node` GPUs, each as the run would
    place it (None where the placement cannot hold it: expert for a dense teacher or E not divisible by the node,
    shard where no dimension of the experts splits)."""
    out: dict[str, int | None] = {}
    for placement in ("replicate", "shard", "expert"):
        other = TeacherPlan(t.name, t.args, placement != "replicate" and node > 1, placement)
        try:
            check_world(dataclasses.replace(t.args, moe=None), [other], world, node, node)
        except PlanError:
            out[placement] = None
            continue
        out[placement] = _teacher_shares([other], world, node, dtype)
    return out


def all_to_all_bytes(t: TeacherPlan, B: int, T: int, node: int) -> int:
    """Bytes one rank sends over one forward of B x T tokens of an expert-placed teacher (bf16): every MoE layer
    sends each routed copy (B*T*K rows of D) to its expert's owner and gets as many back, the (node-1)/node that
    leave the rank, with balanced routing; received bytes are the same. Mixtral-8x7B, B*T = 16k, 8 ranks:
    2 x 32 layers x 16384 x 2 x 4096 x 2 B x 7/8 = 15 GB."""
    a = t.args
    K = a.moe.num_experts_per_tok
    return 2 * a.n_layers * B * T * K * a.dim * 2 * (node - 1) // node


def _expert_share(a, dtype: torch.dtype, node: int) -> int:
    """An expert-placed teacher's bytes on one GPU, by arithmetic: everything but the experts whole, and
    E / node of the experts (3 F x D each per layer)."""
    total = _n_params(a)
    experts = a.n_layers * a.moe.num_experts * 3 * a.hidden_dim * a.dim
    return ((total - experts) + experts // node) * dtype.itemsize


def _teacher_shares(teachers: list[TeacherPlan], world: int, shard: int, dtype: torch.dtype) -> int:
    """Bytes of the online teachers' weights on rank 0: whole (replicated), its share (shard_teacher over a
    mesh of `shard` GPUs, the node's, experts placed as the run places them) or, expert-placed, its experts
    split over those GPUs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from model import Transformer
    from train import parallel
    from train.teachers.online import shard_teacher
    with fake_world(world):
        mesh = parallel.build_mesh(world, shard, "cpu")
        with FakeTensorMode():
            total = 0
            for t in teachers:
                if t.sharded and t.placement == "expert":
                    total += _expert_share(t.args, dtype, shard)
                    continue
                m = _meta_model(Transformer, t.args, dtype)
                m.requires_grad_(False).eval()
                if t.sharded:
                    shard_teacher(m, parallel.shard_mesh(mesh))
                    m = m.to_empty(device="cpu")
                total += _local_bytes(m.parameters())  # replicated: the meta model's sizes are the bytes
    return total


def _meta_model(cls, args, dtype):
    """A model on the meta device built in `dtype` (a .to() of a meta model cannot swap parameters under
    FakeTensorMode)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return cls(args)
    finally:
        torch.set_default_dtype(old)


def _teacher_forward_bytes(t: TeacherPlan, B: int, T: int, shard: int) -> int:
    """Transient bytes of one online teacher forward (no grad, bf16), by arithmetic: the block being run and the
    next one prefetched, all-gathered (sharded teacher); the residual stream and one block's widest
    intermediate (attention q/k/v/o, or the MoE's [T*K, 2F] rows); the LM head gathered for the top-k chunk
    loop and one chunk's logits (bf16 + fp32, train.teachers.signal.head_chunk_rows)."""
    from train.teachers.signal import head_chunk_rows
    a = t.args
    E = a.moe.num_experts if a.moe else 1
    K = a.moe.num_experts_per_tok if a.moe else 1
    block = 2 * (a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.hidden_dim * E)
    gathered = 2 * block + 2 * a.vocab_size * a.dim if t.sharded and t.placement == "shard" else 0
    widest = max(a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads), K * 3 * a.hidden_dim, a.dim)
    acts = B * T * 2 * (3 * a.dim + widest)
    chunk = min(B * T, head_chunk_rows(a.vocab_size)) * a.vocab_size * 6
    return gathered + acts + chunk


# ------------------------------------------------------------------------------------------------------------
# The `plan` subcommand


def plan_world(cfg) -> tuple[int, int]:
    """(world, shard group size) of the planned run; PlanError for one the config cannot use."""
    from train import parallel
    pl = cfg.plan
    world = pl.nodes * pl.gpus_per_node
    if world < 1:
        raise PlanError(f"plan.nodes={pl.nodes} x plan.gpus_per_node={pl.gpus_per_node} is no GPU; plan at least 1")
    try:
        shard = parallel.shard_group_size(cfg.parallel.shard_group, world, pl.gpus_per_node)
    except ValueError as e:
        raise PlanError(str(e)) from None
    return world, shard


@dataclass
class Plan:
    lines: list[str]
    fits: bool
    peak_gb: float
    trace: Trace


def make_plan(cfg, shapes: dict | None = None) -> Plan:
    """The plan of `cfg` (a kd / dae / sft / plan Config) on plan.nodes x plan.gpus_per_node GPUs."""
    from train.config import torch_dtype
    from train.metrics import flops_per_token
    from train.preflight import read_model_args

    pl, d, p = cfg.plan, cfg.data, cfg.parallel
    world, shard = plan_world(cfg)
    student = shapes["student"] if shapes else read_model_args(cfg.model.path, "model.path")
    teachers = []
    stores = []
    for name, spec in cfg.teachers.named.items():
        if spec.store:
            stores.append(name)
        else:
            args = (shapes or {}).get("teachers", {}).get(name) or read_model_args(spec.path, f"teachers.{name}.path")
            teachers.append(TeacherPlan(name, args, spec.placement != "replicate" and pl.gpus_per_node > 1,
                                        spec.placement, spec.max_tokens))
    compute = torch.bfloat16 if p.mixed_precision in ("auto", "bf16") else None  # the plan is for GPUs
    master = torch_dtype(cfg.model.dtype)
    teacher_dtype = torch_dtype(cfg.teachers.dtype) or torch.bfloat16
    common = dict(world=world, shard=shard, micro_batch=d.micro_batch, seq_len=d.seq_len, grad_accum=d.grad_accum,
                  k=cfg.teachers.k, compute_dtype=compute, master_dtype=master, teacher_dtype=teacher_dtype,
                  node=pl.gpus_per_node)
    ac = p.activation_checkpointing
    tr = trace_step(student, teachers, activation_checkpointing=ac, **common)
    other = trace_step(student, teachers, activation_checkpointing=not ac, **common)
    tr_ac, tr_noac = (tr, other) if ac else (other, tr)

    budget = pl.gpu_memory_gb * GB - pl.headroom_gb * GB
    fits = tr.peak <= budget
    tokens_step = d.seq_len * d.micro_batch * d.grad_accum * world
    f_student = flops_per_token(student, d.seq_len, train=True)
    f_teachers = sum(flops_per_token(t.args, d.seq_len, train=False) for t in teachers)
    step_s = (f_student + f_teachers) * tokens_step / (world * pl.peak_tflops * 1e12 * pl.mfu)
    ckpt_bytes = (tr.params + tr.optimizer) * shard  # one replica's shards: every parameter and both moments once

    def gb(x):
        return f"{x / GB:6.1f} GB"
    mesh = f"{world // shard} x {shard} (HSDP: replicate x shard)" if shard < world else f"{world} (FSDP)"
    tdesc = ", ".join(f"{t.name} online" for t in teachers) or ""
    tdesc = ", ".join(x for x in (tdesc, ", ".join(f"{s} from a store" for s in stores)) if x) or "none (sft)"
    L = [f"plan (simulation: fake tensors, fake process group; rank 0 of {world} GPUs, estimates, not measurements)",
         f"  world {pl.nodes} node(s) x {pl.gpus_per_node} GPUs = {world}; mesh {mesh}; GPU {pl.gpu_memory_gb:g} GB",
         f"  student {_describe(student)}; teachers: {tdesc}",
         *_teacher_lines(tr, teachers, d, pl.gpus_per_node, budget, teacher_dtype, cfg.teachers.k),
         f"  batch: micro_batch {d.micro_batch} x seq_len {d.seq_len} x grad_accum {d.grad_accum} x {world} ranks "
         f"= {tokens_step:,} tokens/step; compute {'bf16' if compute else 'fp32'}, masters {cfg.model.dtype}",
         "  per rank:",
         f"    parameters (sharded masters)   {gb(tr.params)}",
         f"    gradients (sharded)            {gb(tr.grads)}   unsharded after a non-last micro-batch: "
         f"{gb(tr.unsharded_grads).strip()}",
         f"    optimizer (AdamW moments)      {gb(tr.optimizer)}",
         f"    teachers' weights              {gb(tr.teachers)}",
         f"    activations, AC on / off       {gb(tr_ac.activations)} / {gb(tr_noac.activations).strip()}",
         f"    loss chunk (logits, fp32)      {gb(_loss_chunk_bytes(student, d.micro_batch * d.seq_len))}",
         f"    peak, AC on / off              {gb(tr_ac.peak)} / {gb(tr_noac.peak).strip()}   "
         f"(this run: AC {'on' if ac else 'off'})",
         f"    budget                         {gb(budget)}   (GPU {pl.gpu_memory_gb:g} GB - headroom "
         f"{pl.headroom_gb:g} GB)",
         f"  checkpoint: {ckpt_bytes / GB:.0f} GB on disk (fp32 masters + AdamW), {gb(tr.params + tr.optimizer).strip()}"
         f" per rank (its shards)",
         f"  FLOPs per token: student {f_student / 1e9:.1f} GFLOP (6N + attention), teachers "
         f"{f_teachers / 1e9:.1f} GFLOP (2N active + attention)",
         f"  step time at MFU {pl.mfu:g} of {pl.peak_tflops:g} TFLOP/s: {step_s:.1f} s "
         f"({tokens_step / step_s / world:,.0f} tokens/s per GPU)"]
    if fits:
        L.append(f"  verdict: fits ({gb(budget - tr.peak).strip()} to spare)")
    else:
        L.append(f"  verdict: does NOT fit (peak {gb(tr.peak).strip()} > budget {gb(budget).strip()}); "
                 + _fixes(cfg, tr, tr_ac, teachers, stores, budget, shard))
    return Plan(L, fits, tr.peak / GB, tr)


def _forward_peak(tr: Trace, teachers: list[TeacherPlan], d, node: int, k: int, rows: dict) -> int:
    """trace_step's peak with teacher t's forward on rows[t.name] rows (the others' as configured)."""
    step_rows = d.micro_batch * d.grad_accum
    fwd = max(_teacher_forward_bytes(t, rows.get(t.name) or t.rows_per_forward(step_rows, d.seq_len), d.seq_len,
                                     node) for t in teachers)
    return (tr.teachers + signal_bytes(d.micro_batch, d.seq_len, d.grad_accum, k)
            + max(tr.kinds["Total"], tr.params + tr.grads + tr.optimizer + fwd))


def largest_rows_per_forward(tr: Trace, t: TeacherPlan, teachers, d, node: int, k: int, budget: float) -> int:
    """The most rows (of a rank's step) one forward of `t` may take with the peak within `budget`; 0: none."""
    fits = [r for r in range(1, d.micro_batch * d.grad_accum + 1)
            if _forward_peak(tr, teachers, d, node, k, {t.name: r}) <= budget]
    return max(fits, default=0)


def _teacher_lines(tr: Trace, teachers: list[TeacherPlan], d, node: int, budget: float, dtype, k: int) -> list[str]:
    """Per online teacher: its placement, the forwards of a step under its max_tokens (an upper bound: a teacher
    that teaches every row), the bytes all-gathered per forward (sharded: the whole teacher less the rank's
    share, bf16), and the largest max_tokens that fits."""
    out = []
    step_rows = d.micro_batch * d.grad_accum
    for t in teachers:
        where = {"replicate": "replicated (a whole copy per GPU)", "shard": f"sharded over the node's {node} GPUs",
                 "expert": f"experts split over the node's {node} GPUs"}[t.placement] if t.sharded else \
            "replicated (a whole copy per GPU)"
        rows = t.rows_per_forward(step_rows, d.seq_len)
        forwards = -(-step_rows // rows)
        line = (f"  teacher {t.name}: {where}; max_tokens {t.max_tokens or 'auto (a step)'}: {rows} rows x "
                f"{d.seq_len} = {rows * d.seq_len:,} tokens per forward, {forwards} forward(s) per step")
        if t.sharded and t.placement == "shard":
            full = _n_params(t.args) * dtype.itemsize
            per_forward = full - full // node
            line += f", {per_forward / GB:.1f} GB all-gathered per GPU per forward ({forwards * per_forward / GB:.0f} GB per step)"
        if t.sharded and t.placement == "expert":
            a2a = all_to_all_bytes(t, rows, d.seq_len, node)
            line += (f", all-to-all {a2a / GB:.1f} GB sent + as much received per GPU per forward "
                     f"({t.args.n_layers} layers x 2, balanced routing; no weight gathers)")
        best = largest_rows_per_forward(tr, t, teachers, d, node, k, budget)
        line += (f"; largest that fits: max_tokens {best * d.seq_len:,}" if best else
                 "; not even one sequence per forward fits")
        out.append(line)
        by = teacher_bytes_by_placement(t, node, node, dtype)
        out.append(f"    {t.name}'s weights per GPU by placement: " + " | ".join(
            f"{p}{'*' if p == t.placement else ''} {'n/a' if x is None else f'{x / GB:.1f} GB'}" for p, x in by.items())
            + "   (* this run)")
    return out


def _n_params(a) -> int:
    with torch.device("meta"):
        from model import Transformer
        return sum(p.numel() for p in Transformer(a).parameters())


def _describe(a) -> str:
    n = a.n_layers * (a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)
                      + 3 * a.dim * a.hidden_dim * (a.moe.num_experts if a.moe else 1)
                      + (a.dim * a.moe.num_experts if a.moe else 0)) + 2 * a.vocab_size * a.dim
    kind = f"MoE {a.moe.num_experts} experts top-{a.moe.num_experts_per_tok}" if a.moe else "dense"
    return f"{n / 1e9:.2f} B parameters ({kind})"


def _loss_chunk_bytes(a, n_tokens: int) -> int:
    from kernels.kd_loss import _chunk_size
    return _chunk_size(n_tokens, a.dim, a.vocab_size) * a.vocab_size * 4


def _fixes(cfg, tr: Trace, tr_ac: Trace, teachers, stores, budget: float, shard: int) -> str:
    """The single changes that would make it fit, by the traced figures; else what to combine."""
    over = tr.peak - budget
    options = []
    for t in teachers:
        if not t.sharded:
            share = tr.teachers / max(1, len(teachers))
            saved = share - share / shard
            options.append((saved, f"shard the teacher over the node (--teachers.{t.name}.placement=shard, saves "
                                   f"~{saved / GB:.0f} GB)"))
            if t.args.moe is not None and t.args.moe.num_experts % cfg.plan.gpus_per_node == 0:
                saved = share - _expert_share(t.args, torch.bfloat16, cfg.plan.gpus_per_node)
                options.append((saved, f"spread the teacher's experts over the node (--teachers.{t.name}.placement="
                                       f"expert, saves ~{saved / GB:.0f} GB, no weight gathers)"))
            options.append((share, f"use a store (capture the teacher once, --teachers.{t.name}.store=..., saves "
                                   f"~{share / GB:.0f} GB)"))
    d, node = cfg.data, cfg.plan.gpus_per_node
    for t in teachers:  # a smaller teacher forward: more forwards per step (more gathers when sharded)
        best = largest_rows_per_forward(tr, t, teachers, d, node, cfg.teachers.k, budget)
        if 0 < best < t.rows_per_forward(d.micro_batch * d.grad_accum, d.seq_len):
            saved = tr.peak - _forward_peak(tr, teachers, d, node, cfg.teachers.k, {t.name: best})
            options.append((saved, f"--teachers.{t.name}.max_tokens={best * d.seq_len} (saves ~{saved / GB:.0f} GB)"))
    if not cfg.parallel.activation_checkpointing:
        saved = tr.peak - tr_ac.peak
        options.append((saved, f"activation checkpointing (--parallel.activation_checkpointing=true, saves "
                               f"~{saved / GB:.0f} GB)"))
    if cfg.data.micro_batch > 1:
        saved = tr.activations * (1 - 1 / cfg.data.micro_batch)
        options.append((saved, f"micro_batch 1 with grad_accum x {cfg.data.micro_batch} (same global batch, saves "
                               f"up to ~{saved / GB:.0f} GB)"))
    enough = [text for saved, text in sorted(options, reverse=True) if saved >= over]
    if enough:
        return "fix: " + "; or ".join(enough)
    if options:
        return ("no single change is enough (" + ", ".join(t for _, t in sorted(options, reverse=True)) +
                "); combine them, or plan more GPUs per shard group / GPUs with more memory")
    return "no setting of this run helps: plan more GPUs (a larger shard group) or GPUs with more memory"


def run_plan(cfg) -> Plan:
    """The `plan` subcommand: prints the plan; returns it."""
    from train.config import ConfigError
    try:
        plan = make_plan(cfg)
    except PlanError as e:
        raise ConfigError(str(e)) from None
    print("\n".join(plan.lines))
    return plan


# ------------------------------------------------------------------------------------------------------------
# The start-up fit check: kd / dae / sft / capture on CUDA


def capture_peak(cfg, world: int, node: int) -> tuple[int, list[str]]:
    """Per-rank peak bytes of `capture` (one teacher, forward only, capture's sequences per forward):
    the teacher's weights (its share of the node's GPUs when placed over them) plus one forward's transient
    bytes; and its report lines."""
    from train.config import torch_dtype
    from train.preflight import read_model_args
    from train.teachers.capture import forward_batch_size
    (name, spec), = cfg.teachers.named.items()
    B = forward_batch_size(cfg)
    t = TeacherPlan(name, read_model_args(spec.path, f"teachers.{name}.path"),
                    spec.placement != "replicate" and node > 1, spec.placement)
    check_world(dataclasses.replace(t.args, moe=None), [t], world, node, node)  # no student in a capture
    weights = _teacher_shares([t], world, node, torch_dtype(cfg.teachers.dtype) or torch.bfloat16)
    fwd = _teacher_forward_bytes(t, B, cfg.data.seq_len, node)
    lines = [f"capture plan (simulation; rank 0 of {world} GPUs): teacher {name!r} {_describe(t.args)}, "
             f"placement {t.placement}: weights {weights / GB:.1f} GB + one forward of "
             f"{B} x {cfg.data.seq_len} tokens {fwd / GB:.1f} GB"]
    return weights + fwd, lines


def _fit_child(subcommand: str, toml_path: str, nodes: int, gpus_per_node: int, gpu_memory_gb: float,
               out_path: str) -> None:
    """Runs in the subprocess that `fit_check` starts: plans the run and writes {fits, peak_gb, lines} as JSON."""
    import json

    from train.config import make_config
    cfg = make_config(subcommand, toml_path)
    cfg.plan.nodes, cfg.plan.gpus_per_node, cfg.plan.gpu_memory_gb = nodes, gpus_per_node, gpu_memory_gb
    try:
        if subcommand == "capture":
            peak, lines = capture_peak(cfg, nodes * gpus_per_node, gpus_per_node)
            result = {"peak_gb": peak / GB, "lines": lines, "fix": "fix: place the teacher over the node "
                      "(--teachers.<name>.placement=shard, or expert for an MoE) or fewer sequences per forward "
                      "(--capture.batch_size, or --teachers.<name>.max_tokens when set)"}
        else:
            plan = make_plan(cfg)
            verdict = plan.lines[-1].split("; ", 1)
            result = {"peak_gb": plan.peak_gb, "lines": plan.lines,
                      "fix": verdict[1] if len(verdict) > 1 else ""}
    except PlanError as e:
        result = {"error": str(e)}
    with open(out_path, "w") as f:
        json.dump(result, f)


def fit_check(cfg, env, gpu_memory_gb: float, log) -> None:
    """Stop a run whose planned peak exceeds `gpu_memory_gb` (the device's memory), naming the fix.

    Rank 0 plans the run (make_plan; capture: capture_peak) for the world it is in (nodes = world / ranks per
    node) in a subprocess: the plan opens a fake process group, which a torchrun worker that already has its
    real one cannot (train.plan.fake_world). The other ranks wait for its verdict in one broadcast. A planned
    peak above the device's whole memory refuses the run (ConfigError, exit 2 at the CLI); one above the
    budget (memory - plan.headroom_gb) only warns: the plan was within 7 % of a measured CPU step (README),
    and the headroom is a guess. Costs the time of one plan: seconds for small models, ~1-3 minutes of CPU for
    a 7B student (two traced steps under fake tensors)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from train import parallel
    from train.config import ConfigError, to_toml
    if not cfg.parallel.fit_check:
        log("fit check: off (parallel.fit_check=false)")
        return
    refuse = 0
    if env.is_main:
        gpus = max(1, env.local_world_size)
        nodes = max(1, env.world_size // gpus)
        log(f"fit check: planning this run on {nodes} x {gpus} GPU(s) of {gpu_memory_gb:.1f} GB (a simulation in a "
            f"subprocess; skip with --parallel.fit_check=false)")
        repo = str(Path(__file__).resolve().parents[1])
        child_env = {k: v for k, v in os.environ.items()  # not a torchrun worker: no real process group there
                     if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                  "MASTER_ADDR", "MASTER_PORT") and not k.startswith("TORCHELASTIC_")}
        child_env["CUDA_VISIBLE_DEVICES"] = ""  # fake tensors on the CPU: the child never touches a GPU
        child_env["PYTHONPATH"] = os.pathsep.join(x for x in (repo, os.environ.get("PYTHONPATH")) if x)
        with tempfile.TemporaryDirectory(prefix="distill-fit-") as tmp:
            toml_path, out_path = Path(tmp) / "run.toml", Path(tmp) / "plan.json"
            toml_path.write_text(to_toml(cfg))
            code = (f"from train.plan import _fit_child; _fit_child({cfg.subcommand!r}, {str(toml_path)!r}, {nodes}, "
                    f"{gpus}, {gpu_memory_gb!r}, {str(out_path)!r})")
            proc = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True)
            result = json.loads(out_path.read_text()) if proc.returncode == 0 and out_path.exists() else None
        if result is None:  # the check itself failed: say so and go on (it must never be why a run cannot start)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            log(f"fit check: could not plan this run ({tail[0]}); starting without it")
        elif "error" in result:
            log(f"fit check: {result['error']}")
            refuse = 2
        else:
            for line in result["lines"]:
                log(line)
            peak, budget = result["peak_gb"], gpu_memory_gb - cfg.plan.headroom_gb
            if peak > gpu_memory_gb:
                refuse = 1
                log(f"fit check: planned peak {peak:.1f} GB > this GPU's {gpu_memory_gb:.1f} GB; {result['fix']}")
            elif peak > budget:
                log(f"fit check: WARNING planned peak {peak:.1f} GB leaves less than plan.headroom_gb="
                    f"{cfg.plan.headroom_gb:g} GB of this GPU's {gpu_memory_gb:.1f} GB: it may run out of memory")
            else:
                log(f"fit check: fits (planned peak {peak:.1f} GB of {gpu_memory_gb:.1f} GB)")
    refuse = parallel.broadcast_int(refuse, env)
    if refuse:
        raise ConfigError("this run cannot fit: " + ("its planned peak memory exceeds the GPU's" if refuse == 1 else
                          "its world cannot shard the models evenly") + " (the fit check's lines above give "
                          "the figures and the fix); to start anyway: --parallel.fit_check=false")
