"""The training loop of `kd` (phase 1), `dae` (phase 2) and `sft` (the lambda = 0 baseline): one loop for all.

    run_dir = train.loop.run(train.config.make_config("kd", "configs/kd.toml"))

`run` works in-process (one process, no process group) and under torchrun (one process per device). It checks
the configuration (train/preflight.py) before any weights or data are loaded, builds data, teachers and
student, and then repeats `train_step`:

    train_step          one optimizer step: the step's loss-token count (all micro-batches and ranks, one
                        all-reduce, a device tensor), the teacher signals of every micro-batch up front
                        (step_signals: each row from its own teacher, each teacher in as few forwards as its
                        max_tokens allows), forward_backward per micro-batch, clip, AdamW, metrics
    forward_backward    one micro-batch: the student forward and fused loss inside the wrapped module
                        (train/loss.py), backward; with the attention-transfer term the teacher runs here, per
                        micro-batch, to capture its queries and keys

From `train_step` to each kernel's public op: train_step -> forward_backward -> StudentWithLoss.forward ->
kernels.linear_topk_kd_loss (3 calls); the MoE ops are reached through the model's forward.
FSDP and DDP average gradients over ranks while the loss is already normalised by the loss tokens of all ranks
(train/loss.py), hence the loss is multiplied by the world size before backward.

Dimensions: B sequences per micro-batch, T tokens per sequence, K teacher top-k.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from model import Transformer, capture_qk, load_hf
from model.attention import spans_to
from train import checkpoint as ckpt
from train import parallel
from train.config import Config, torch_dtype, write_resolved
from train.errors import CheckpointError, ConfigError, DataError, DivergedError, ModelDirError, reraise_as
from train.data import IGNORE
from train.data.prepare import build_packed
from train.export import export_student
from train.loss import LossSettings, LossStats, StudentWithLoss
from train.metrics import Output, fast_paths, flops_per_token, peak_flops, peak_memory_gb
from train.preflight import preflight
from train.teachers import expected_for
from train.validation import build_heldout, due, training_members, validate

TRAIN_SUBCOMMANDS = ("kd", "dae", "sft")
# Per-step statistics: the loss module's (LossStats) and the stop flag, summed over micro-batches and ranks in
# one tensor (one all-reduce) and read on the host once, by name.
STEP_STATS = LossStats._fields + ("stop",)


# ------------------------------------------------------------------------------------------------------------
# The step


@dataclass
class StepContext:
    """What the step needs besides the data; built once."""
    module: nn.Module                 # parallelized StudentWithLoss
    optimizer: torch.optim.Optimizer
    teachers: object | None           # train.teachers.TeacherSet (None for sft)
    attn_teacher: Transformer | None  # online teacher whose attention maps are the target
    env: parallel.Env
    grad_clip: float
    aux_scale: float                  # 1 / (grad_accum * world): the aux loss is averaged over the step's forwards
    k: int
    check_ids: bool = True            # validate ids on the first step only (one host sync)


def global_loss_tokens(micro_batches, env: parallel.Env) -> torch.Tensor:
    """Loss tokens of the whole optimizer step, all micro-batches and ranks: a device tensor, one all-reduce.
    The labels are still on the CPU (the loader's), so counting them costs no device sync."""
    local = sum(int((mb.labels_BT != IGNORE).sum()) for mb in micro_batches)
    n = torch.tensor(float(local), device=env.device)
    parallel.all_reduce_sum(n, env)
    return n.clamp_(min=1.0)


def step_signals(ctx: StepContext, micro_batches) -> list | None:
    """The teacher signals (TopK) of every micro-batch of the step, computed up front (TeacherSet.step_signals:
    each teacher on its own rows, in as few forwards as its max_tokens allows; a teacher no rank of its mesh
    needs this step does not run). None for sft, and with the attention-transfer term, whose per-layer teacher
    queries and keys must be captured per micro-batch (a whole step's would not fit): see teacher_signal."""
    if ctx.teachers is None or ctx.attn_teacher is not None:
        return None
    with torch.no_grad():
        return ctx.teachers.step_signals(micro_batches)


def teacher_signal(ctx: StepContext, batch):
    """(ids_BTK, logprobs_BTK, teacher_qk) for one CPU micro-batch: each row from its own teacher only."""
    B, T = batch.labels_BT.shape
    if ctx.teachers is None:  # sft: plain CE, an empty top-k (K = 0)
        dev = ctx.env.device
        return (torch.zeros(B, T, 0, dtype=torch.long, device=dev),
                torch.zeros(B, T, 0, dtype=torch.float32, device=dev), None)
    with torch.no_grad():
        if ctx.attn_teacher is None:
            sig = ctx.teachers.signals(batch)
            return sig.ids_BTK, sig.logprobs_BTK, None
        with capture_qk(ctx.attn_teacher) as teacher_qk:
            sig = ctx.teachers.signals(batch)
    return sig.ids_BTK, sig.logprobs_BTK, teacher_qk


def forward_backward(ctx: StepContext, batch, normalizer, last: bool, signal=None) -> LossStats:
    """One micro-batch: teacher signal (`signal`, its TopK computed up front, or now), student forward + fused
    loss, backward. Returns the detached stats."""
    if signal is not None:
        ids_BTK, logprobs_BTK, teacher_qk = signal.ids_BTK, signal.logprobs_BTK, None
    else:
        ids_BTK, logprobs_BTK, teacher_qk = teacher_signal(ctx, batch)
    spans = spans_to(batch.doc_ids_BT, ctx.env.device)  # document boundaries from the CPU ids: no device sync
    b = batch.to(ctx.env.device, non_blocking=True)
    with parallel.grad_sync(ctx.module, enabled=last):
        loss, stats = ctx.module(b.tokens_BT, b.labels_BT, b.positions_BT, b.doc_ids_BT, ids_BTK, logprobs_BTK,
                                 normalizer, ctx.aux_scale, teacher_qk, ctx.check_ids, spans)
        (loss * ctx.env.world_size).backward()  # undo the ranks' gradient averaging (module doc)
    return stats


def train_step(ctx: StepContext, micro_batches, lr: float, stop=None) -> dict:
    """One optimizer step over this rank's micro-batches. Skips the update when the loss or the gradient is not
    finite (every rank sees the same all-reduced values, so all skip together). `stop.requested` (a StopFlag)
    is read after the backward and summed over ranks with the metrics: a signal on any rank during this step
    stops every rank after it. s["teachers"][name]: this step's teacher counters (TeacherSet): rows summed over
    the ranks (in the metrics' one all-reduce), forwards, empty forwards and gathered bytes of this rank."""
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    normalizer = global_loss_tokens(micro_batches, ctx.env)
    before = ctx.teachers.counters() if ctx.teachers is not None else {}
    signals = step_signals(ctx, micro_batches)
    n_stats = len(STEP_STATS)
    sums = torch.zeros(n_stats + len(before), device=ctx.env.device)
    for i, mb in enumerate(micro_batches):
        stats = forward_backward(ctx, mb, normalizer, last=i == len(micro_batches) - 1,
                                 signal=signals[i] if signals is not None else None)
        sums[:len(LossStats._fields)] += torch.stack(list(stats))
    ctx.check_ids = False
    sums[STEP_STATS.index("stop")] = float(stop is not None and stop.requested)
    teachers = {}
    if before:
        after = ctx.teachers.counters()
        teachers = {n: {key: after[n][key] - before[n][key] for key in after[n]} for n in after}
        sums[n_stats:] = torch.tensor([float(t["rows"]) for t in teachers.values()])  # small ints: exact in fp32
    parallel.all_reduce_sum(sums, ctx.env)
    grad_norm = clip_grad_norm(ctx.module, ctx.grad_clip)
    values = torch.cat([sums, grad_norm.reshape(1).to(sums), normalizer.reshape(1)]).tolist()  # host sync: 1/step
    s = dict(zip(STEP_STATS, values[:n_stats]))
    s["grad_norm"], s["n_tokens"] = values[-2], values[-1]
    for (name, t), rows in zip(teachers.items(), values[n_stats:n_stats + len(teachers)]):
        t["rows"] = int(rows)
    s["teachers"] = teachers
    s["finite"] = math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"])
    if s["finite"]:
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return s


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all ranks' shards under FSDP), clipping to max_norm when > 0."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps (the first step already gets lr/warmup), then cosine to min_ratio*lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ------------------------------------------------------------------------------------------------------------
# Building blocks of a run


def resolve_run_dir(cfg: Config, env: parallel.Env) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    stamp = parallel.broadcast_int(int(time.time()), env)  # every rank must pick the same directory
    return Path("runs") / f"{cfg.subcommand}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_data(cfg: Config, run_dir: Path, env: parallel.Env, out: Output):
    """PackedDataset and Sampler. kd/sft: one teacher teaches every row, whatever teacher the rows name (all
    packed teacher indices map to it). dae: rows name `reference` or `domain` (or carry `domain: true/false`)."""
    from train.data import Sampler
    d = cfg.data
    dae = cfg.subcommand == "dae"
    packed = build_packed(d, d.tokenizer or cfg.model.path, ["reference", "domain"] if dae else None,
                          d.cache_dir or None, env, log=out.info)
    out.info(f"data: {len(packed)} sequences of {packed.seq_len} tokens, teachers {packed.teacher_names}, "
             f"stats {json.dumps(packed.stats)}")
    if packed.seq_len != d.seq_len:
        raise ConfigError(f"the packed data has seq_len {packed.seq_len}, data.seq_len is {d.seq_len}; set "
                          f"--data.seq_len={packed.seq_len}")
    if len(packed) == 0:
        st = packed.stats
        why = (f"{st['dropped_docs_no_loss']} document(s) kept no answer token within data.seq_len={d.seq_len}; fix: "
               "raise data.seq_len" if st.get("dropped_docs_no_loss") else "fix: give it rows with answers")
        raise DataError(f"data: no sequence to train on: {why}")
    if dae and "domain" not in packed.teacher_names:
        raise ConfigError(f"dae: the data has no `domain` rows (teachers found: {packed.teacher_names}); mark "
                          f"domain rows with \"teacher\": \"domain\" or \"domain\": true")
    sampler = Sampler(packed, d.micro_batch * d.grad_accum, rank=env.rank, world_size=env.world_size,
                      seed=cfg.run.seed, domain_fraction=d.domain_fraction if dae else None,
                      members=training_members(cfg, len(packed)))  # eval.fraction's held-out rows are never drawn
    return packed, sampler


def build_teachers(cfg: Config, packed, env: parallel.Env, mesh=None):
    """TeacherSet whose `names` follow the packed data's teacher indices (kd: every index is the one teacher).
    `mesh`: the 1-D mesh that sharded / expert-placed teachers split over (the node's: train.parallel.node_mesh)."""
    if cfg.subcommand == "sft":
        return None
    from train.teachers import TeacherSpec
    from train.teachers import build_teachers as build
    t = cfg.teachers
    specs = {name: TeacherSpec(path=s.path or None, store=s.store or None, placement=s.placement,
                               max_tokens=s.max_tokens) for name, s in t.named.items()}
    if cfg.subcommand == "kd":
        (only,) = t.named
        names = [only] * len(packed.teacher_names)
    else:
        names = list(packed.teacher_names)
    dtype = torch_dtype(t.dtype)
    # Stores must be captured from exactly this packing and k; the tokenizer was compared by content in preflight.
    return build(specs, t.k, device=env.device, dtype=dtype, names=names, expected=expected_for(packed, t.k),
                 mesh=mesh)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay, vectors (norm gains) do not."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, save, exit 0; a second signal stops at once. Handlers can only
    be installed from the main thread (elsewhere, e.g. a notebook worker thread, signals keep their default)."""

    def __init__(self):
        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now, the default way (no checkpoint)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------------------------
# The run


def run(cfg: Config) -> Path:
    """Train (kd / dae / sft) as configured; returns the run directory. Works in-process and under torchrun."""
    if cfg.subcommand not in TRAIN_SUBCOMMANDS:
        raise ValueError(f"train.loop.run handles {TRAIN_SUBCOMMANDS}, not {cfg.subcommand!r}; use train/main.py")
    shapes = preflight(cfg)  # config.json files only: fails fast, before any weights or data
    env = parallel.init_distributed(cfg.run.device, cfg.parallel.timeout_s,
                                    group_of_one=cfg.parallel.strategy == "fsdp")
    try:
        return _run(cfg, env, shapes)
    finally:
        parallel.shutdown(env)


def _run(cfg: Config, env: parallel.Env, shapes: dict) -> Path:
    strategy = parallel.resolve_strategy(cfg.parallel.strategy, env)
    run_dir = resolve_run_dir(cfg, env)
    resume_from = _resume_point(cfg, run_dir, note=print if env.is_main else None)
    global_batch = cfg.data.micro_batch * cfg.data.grad_accum * env.world_size
    if resume_from:
        saved = json.loads((resume_from / ckpt.STATE_FILE).read_text())["sampler"]["global_batch"]
        if saved != global_batch:  # checked before anything is written: a refused resume changes no file
            raise ConfigError(f"{resume_from} was trained with a global batch of {saved} sequences, this run has "
                              f"{global_batch} (micro_batch x grad_accum x ranks); resume with the same global batch")
    seed_everything(cfg.run.seed)
    start = ckpt.step_of(resume_from) if resume_from else 0
    out = Output(run_dir, env.is_main, cfg.logging.every, cfg.logging.progress, cfg.schedule.steps, start,
                 tensorboard=cfg.logging.tensorboard)
    out.info(f"{cfg.subcommand}: run dir {run_dir}, {env.world_size} process(es) on {env.device.type}, "
             f"strategy {strategy}" + (f", resuming from {resume_from}" if resume_from else ""))

    compute = parallel.compute_dtype(cfg.parallel.mixed_precision, env.device)
    mesh = None  # FSDP2's (1-D, or 2-D replicate x shard for HSDP)
    if strategy == "fsdp":
        shard = parallel.shard_group_size(cfg.parallel.shard_group, env.world_size, env.local_world_size)
        mesh = parallel.build_mesh(env.world_size, shard, env.device.type)
        out.info(f"mesh: {dict(zip(mesh.mesh_dim_names, mesh.shape))}, compute dtype {compute or torch.float32}")
    teacher_mesh = None  # sharded / expert-placed teachers: the node's ranks only (their gathers stay on the node)
    placements = {n: t.placement for n, t in cfg.teachers.named.items() if t.path} if cfg.subcommand != "sft" else {}
    placed = {n: p for n, p in placements.items() if p != "replicate"}
    if env.distributed and placed:
        teacher_mesh = parallel.node_mesh(env, mesh)
        out.info(f"teachers {placed} over the node's {teacher_mesh.size()} ranks")
    out.info(fast_paths(env.device, compute, shapes["student"], placements, cfg.checkpoint.async_save,
                        env.distributed))
    if env.device.type == "cuda":  # before any weights load: a run that cannot fit stops in seconds, not at OOM
        from train.plan import GB, fit_check
        fit_check(cfg, env, torch.cuda.get_device_properties(env.device).total_memory / GB, out.info)

    with reraise_as(DataError):
        packed, sampler = build_data(cfg, run_dir, env, out)
        held = build_heldout(cfg, packed, env, out.info)
    with reraise_as(ModelDirError, "teachers: "):  # a store's or an online teacher's directory
        teachers = build_teachers(cfg, packed, env, teacher_mesh)
    dtype = torch_dtype(cfg.model.dtype)
    # FSDP: built on the meta device and sharded first; the weights arrive after (materialize_from_rank0).
    with reraise_as(ModelDirError, "model.path: "):
        student = load_hf(cfg.model.path, dtype=dtype, device="meta" if strategy == "fsdp" else env.device)
    attn_teacher, teacher_args = None, None
    if cfg.subcommand == "kd" and cfg.loss.attn_weight > 0:
        (name,) = cfg.teachers.named
        attn_teacher, teacher_args = teachers.online(name), shapes["teachers"][name]
    aux_coef = cfg.loss.aux_coef if cfg.loss.aux_coef is not None else (
        student.args.moe.router_aux_loss_coef if student.args.moe else 0.0)
    settings = LossSettings(cfg.loss.kd_weight, cfg.loss.tau, cfg.loss.attn_weight, aux_coef)
    module = StudentWithLoss(student, settings, teacher_args, compute_dtype=compute)
    module = parallel.parallelize(module, student.layers, strategy=strategy,
                                  activation_checkpointing=cfg.parallel.activation_checkpointing,
                                  compile=cfg.parallel.compile, env=env, mesh=mesh, param_dtype=compute)
    if strategy == "fsdp":
        with reraise_as(ModelDirError, "model.path: "):
            parallel.materialize_from_rank0(
                module, lambda: {f"student.{k}": v for k, v in
                                 load_hf(cfg.model.path, dtype=dtype, device="cpu").state_dict().items()}, env.device)
    evaluate = parallel.forward_method(module, "evaluate") if held is not None else None
    o = cfg.optim
    optimizer = torch.optim.AdamW(decay_groups(module, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    # Data, teachers and student have loaded, so every check has passed: only now do the run's own files appear
    # (a run refused for bad input leaves its directory as it found it; the data cache aside).
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, run_dir)
    parallel.barrier(env)
    ckpt.remove_partial(run_dir, env)
    out.open_files()

    counters = {"skipped": 0, "bad_in_a_row": 0, "tokens": 0}
    if resume_from:
        state, rank_state = ckpt.load(resume_from, module, optimizer, env)
        assert state["sampler"]["global_batch"] == sampler.global_batch  # checked before the run dir was written
        with reraise_as(ConfigError, f"{resume_from}: "):
            sampler.load_state_dict(state["sampler"])
        counters.update(state["counters"])
        if teachers is not None:
            teachers.rows_seen.update(rank_state.get("rows_seen", {}))

    ctx = StepContext(module, optimizer, teachers, attn_teacher, env, o.grad_clip,
                      1.0 / (cfg.data.grad_accum * env.world_size), cfg.teachers.k)
    seq_tokens = cfg.data.seq_len * sampler.global_batch
    peak = peak_flops(env.device, cfg.logging.peak_tflops)
    peak_all = peak * env.world_size if peak else None  # step_flops count every rank's tokens
    step_flops = flops_per_token(student.args, cfg.data.seq_len, train=True) * seq_tokens
    if teachers is not None:
        for name in cfg.teachers.named:
            if cfg.teachers.named[name].path:  # online teachers: one forward per row they teach (upper bound)
                step_flops += flops_per_token(shapes["teachers"][name], cfg.data.seq_len, train=False) * seq_tokens
    stop = StopFlag()

    saver = ckpt.Saver(run_dir, env, cfg.checkpoint.keep, cfg.checkpoint.async_save)

    def committed(path):  # a checkpoint becomes visible when its write has finished on every rank
        if path is not None:
            out.info(f"checkpoint: {path}")

    def save(step):
        trainer_state = {"sampler": sampler.state_dict(), "counters": counters}
        rank_state = {"rows_seen": dict(teachers.rows_seen) if teachers is not None else {}}
        committed(saver.save(step, module, optimizer, trainer_state, rank_state))

    step, stopped = start, False
    try:
        while step < cfg.schedule.steps:
            t0 = time.perf_counter()
            idx = sampler.next_indices()
            micro = [packed.batch(chunk) for chunk in np.array_split(idx, cfg.data.grad_accum)]
            lr = lr_at(step, o.lr, cfg.schedule.warmup_steps, cfg.schedule.steps, cfg.schedule.min_lr_ratio)
            s = train_step(ctx, micro, lr, stop)
            step += 1
            counters["tokens"] += seq_tokens
            if s["finite"]:
                counters["bad_in_a_row"] = 0
            else:
                counters["skipped"] += 1
                counters["bad_in_a_row"] += 1
                out.info(f"step {step}: non-finite loss {s['loss']} or grad norm {s['grad_norm']}: update skipped "
                         f"({counters['bad_in_a_row']} in a row, {counters['skipped']} in total)")
            dt = time.perf_counter() - t0
            val = validate(evaluate, teachers, held, env) if due(held, step) else {}  # after the update; not in dt
            n = s["n_tokens"]
            out.step(step, {
                "loss": s["loss"], "ce": s["ce_sum"] / n, "kd": s["kd_sum"] / n,
                "attn": s["attn_sum"] / (n * student.args.n_layers * student.args.n_heads),
                "aux": s["aux"] * ctx.aux_scale, "grad_norm": s["grad_norm"], "lr": lr,
                "tokens": counters["tokens"], "step_tokens": seq_tokens, "tok_s": seq_tokens / dt,
                "skipped": counters["skipped"], "peak_mem_gb": peak_memory_gb(env.device),
                "mfu": step_flops / dt / peak_all if peak_all else None, **val,
                **{f"teacher.{name}.{key}": v for name, t in s["teachers"].items() for key, v in t.items()},
            }, force=step == cfg.schedule.steps or bool(val))
            committed(saver.poll())
            if counters["bad_in_a_row"] >= o.max_bad_steps:
                committed(saver.finish())  # the save in flight holds a finite state: keep it
                raise DivergedError(f"{counters['bad_in_a_row']} non-finite steps in a row (optim.max_bad_steps="
                                   f"{o.max_bad_steps}); stopping with the last checkpoint intact. Lower optim.lr, "
                                   f"check the data, or resume from the checkpoint")
            if s["stop"] > 0:
                out.info(f"signal received: saving at step {step} and exiting")
                save(step)
                committed(saver.finish())
                stopped = True
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save(step)
    except BaseException:
        saver.abandon()
        raise
    finally:
        stop.restore()
        out.close_bar()
    if not stopped:
        if cfg.checkpoint.every and step % cfg.checkpoint.every:
            save(step)
        committed(saver.finish())  # before the export (and the end of the run): the last checkpoint is complete
        if cfg.checkpoint.export_final:
            export_student(module, run_dir / "final", env, cfg.data.tokenizer or cfg.model.path, strategy,
                           dtype=torch_dtype(shapes["student_dtype"]) if shapes.get("student_dtype") else None)
            out.info(f"final student: {run_dir / 'final'}")
        if teachers is not None:
            out.info(f"rows per teacher (all ranks): {parallel.sum_over_ranks(teachers.rows_seen)}")
    out.close(cfg.logging.plot)
    return run_dir


def _resume_point(cfg: Config, run_dir: Path, note=None) -> Path | None:
    r = cfg.checkpoint.resume
    if r == "auto":
        return ckpt.latest(run_dir, note)
    if r:
        p = Path(r)
        if not (p / ckpt.STATE_FILE).exists():
            raise CheckpointError(f"checkpoint.resume={r!r} is not a complete checkpoint directory; use --resume auto")
        why = ckpt.damage(p)
        if why is not None:
            raise CheckpointError(f"checkpoint.resume={r!r} is damaged ({why}); resume from an earlier step-N/ or "
                                  "with --resume auto (it skips damaged checkpoints)")
        if p.parent.resolve() != run_dir.resolve():
            raise ConfigError(f"checkpoint.resume={r!r} is not inside run.dir={str(run_dir)!r}; set --run.dir to "
                             f"{str(p.parent)!r}")
        return p
    if ckpt.latest(run_dir) is not None:
        raise ConfigError(f"run.dir {run_dir} already holds checkpoints; continue it with --resume auto or choose "
                         f"another --run.dir")
    return None
