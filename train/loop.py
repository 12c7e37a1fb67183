"""The training loop of `kd` (phase 1), `dae` (phase 2) and `sft` (the lambda = 0 baseline): one loop for all.

    run_dir = train.loop.run(train.config.make_config("kd", "configs/kd.toml"))

`run` works in-process (one process, no process group) and under torchrun (one process per device). It checks
the configuration against the models' config.json files (`preflight`) before any weights or data are loaded,
builds data, teachers and student, and then repeats `train_step`:

    train_step          one optimizer step: the step's loss-token count (all micro-batches and ranks, one
                        all-reduce, a device tensor), forward_backward per micro-batch, clip, AdamW, metrics
    forward_backward    one micro-batch: the rows' teacher signals (each row from its own teacher), the
                        student forward and fused loss inside the wrapped module, backward

Dimensions: B sequences per micro-batch, T tokens per sequence, K teacher top-k, D hidden, V vocabulary,
N = B*T flattened token positions, L layers, H heads.

Normalisation (DESIGN decision 2): every term's sum over loss tokens is divided by n, the loss-token count of
the whole optimizer step over all micro-batches and ranks, so the gradient is the same whatever the split
into micro-batches and ranks. FSDP and DDP average gradients over ranks, hence the loss is multiplied by the
world size before backward. The MoE load-balancing loss is a per-forward mean and is averaged over the
step's forwards (coef * aux / (grad_accum * world)).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import kernels
from model import Transformer, capture_qk, load_hf, save_hf
from model.attention import spans_to
from model.hf import args_from_config
from train import checkpoint as ckpt
from train import parallel
from train.attn_loss import attention_kl_sum, check_compatible
from train.config import Config, ConfigError, write_resolved
from train.data import IGNORE, tokenizer_fingerprint
from train.store import expected_for, tokenizer_sha256
from train.teacher import sum_over_ranks

TRAIN_SUBCOMMANDS = ("kd", "dae", "sft")
# Per-step statistics, summed over micro-batches and ranks (one all-reduce) and read on the host once.
STATS = ("loss", "ce_sum", "kd_sum", "attn_sum", "aux", "stop")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


# ------------------------------------------------------------------------------------------------------------
# Checks before heavy work: only config.json / tokenizer files are read


def _model_args(path: str, what: str):
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{what} {path!r} has no config.json; point it at an HF model directory")
    return args_from_config(json.loads(cfg_file.read_text()), where=str(cfg_file))


def check_store(store: str, name: str, vocab_size: int, cfg: Config, tok_dir: str) -> None:
    """A top-k store against the run, from its manifest.json alone."""
    mf = Path(store) / "manifest.json"
    if not mf.is_file():
        raise ConfigError(f"teachers.{name}.store={store!r} is not a complete store (no manifest.json); run or "
                          f"finish `train/main.py capture` first")
    m = json.loads(mf.read_text())
    checks = [("teacher vocab_size", m.get("vocab_size"), vocab_size, "a teacher of the student's tokenizer"),
              ("k", m.get("k"), cfg.teachers.k, f"--teachers.k={m.get('k')}"),
              ("seq_len", m.get("seq_len"), cfg.data.seq_len, f"--data.seq_len={m.get('seq_len')}")]
    for what, theirs, mine, fix in checks:
        if theirs != mine:
            raise ConfigError(f"store {store}: {what} is {theirs}, this run has {mine}; fix: {fix}")
    rows_of = m.get("rows_of")
    if rows_of not in (None, name) and cfg.subcommand == "dae":
        raise ConfigError(f"store {store} holds the rows of teacher {rows_of!r}, but is configured as teacher "
                          f"{name!r}; swap the stores or capture with --capture.rows_of={name}")
    if rows_of is not None and cfg.subcommand == "kd":  # else it fails after packing, at the first missing row
        raise ConfigError(f"store {store} holds only the rows of teacher {rows_of!r} (captured with "
                          f"--capture.rows_of={rows_of}); kd distils on every row: capture without capture.rows_of")
    theirs_tok, mine_tok = m.get("tokenizer_sha256"), tokenizer_sha256(tok_dir)
    if theirs_tok is not None and mine_tok is not None and theirs_tok != mine_tok:
        raise ConfigError(f"store {store} was captured with another tokenizer than the student's ({tok_dir}): "
                          f"tokenizer_sha256 is {theirs_tok[:12]}.. in the store, {mine_tok[:12]}.. here; distil only "
                          "between models of one tokenizer")


def preflight(cfg: Config) -> dict:
    """Everything that can be checked without loading weights or data; returns the models' ModelArgs."""
    sc = cfg.subcommand
    student = _model_args(cfg.model.path, "model.path")
    tok_dir = cfg.data.tokenizer or cfg.model.path
    if cfg.data.paths:
        for p in cfg.data.paths:
            if not Path(p).exists():
                raise ConfigError(f"data.paths: {p!r} not found (cwd {os.getcwd()}); fix the path")
        if tokenizer_fingerprint(tok_dir) is None and not (Path(tok_dir) / "tokenizer_config.json").exists():
            raise ConfigError(f"no tokenizer in {tok_dir!r} (tokenizer.json / tokenizer.model); set "
                             f"--data.tokenizer=<directory with the student's tokenizer>")
    elif not (Path(cfg.data.packed) / "meta.json").is_file():
        raise ConfigError(f"data.packed={cfg.data.packed!r} is not a packed dataset (no meta.json); give the "
                         f"directory a PackedDataset was saved to, or use data.paths")
    teachers = {}
    if sc != "sft":
        for name, spec in cfg.teachers.named.items():
            if spec.store:
                check_store(spec.store, name, student.vocab_size, cfg, tok_dir)
                continue
            t = teachers[name] = _model_args(spec.path, f"teachers.{name}.path")
            if t.vocab_size != student.vocab_size:
                raise ConfigError(f"teacher {name!r} has vocab_size {t.vocab_size}, the student {student.vocab_size}: "
                                 f"top-k ids would index different tokens; use a teacher and student that share "
                                 f"one tokenizer (never resize a vocabulary to make them agree)")
            mine, theirs = tokenizer_fingerprint(tok_dir), tokenizer_fingerprint(spec.path)
            if mine is not None and theirs is not None and mine != theirs:
                raise ConfigError(f"teacher {name!r} ({spec.path}) has a different tokenizer from the student's "
                                 f"({tok_dir}): same vocab size but different tokens; distil only between "
                                 f"models of one tokenizer")
        if cfg.loss.attn_weight > 0:
            (name,) = cfg.teachers.named
            try:
                check_compatible(student, teachers[name])
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return {"student": student, "teachers": teachers}


# ------------------------------------------------------------------------------------------------------------
# The trainable module: student forward and the fused loss in one forward, so DDP/FSDP see the LM head used
# inside the wrapped module (the loss reads the head weight directly instead of producing logits).


@dataclass
class LossSettings:
    kd_weight: float
    tau: float
    attn_weight: float
    aux_coef: float


class StudentWithLoss(nn.Module):
    def __init__(self, student: Transformer, loss: LossSettings, teacher_args=None):
        super().__init__()
        self.student, self.loss, self.teacher_args = student, loss, teacher_args

    def forward(self, tokens_BT, labels_BT, positions_BT, doc_ids_BT, ids_BTK, logprobs_BTK, normalizer,
                aux_scale: float, teacher_qk=None, check_ids: bool = False, doc_spans=None):
        """(loss to backpropagate, detached [loss, ce_sum, kd_sum, attn_sum, aux])."""
        s, lo = self.student, self.loss
        attn = teacher_qk is not None
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if tokens_BT.is_cuda
                    else contextlib.nullcontext())
        with autocast, (capture_qk(s) if attn else contextlib.nullcontext()) as student_qk:
            hidden_BTD, aux = s.forward_with_aux(tokens_BT, positions_BT, doc_ids_BT, doc_spans=doc_spans)
        out = head_loss(hidden_BTD, s.output.weight, labels_BT, ids_BTK, logprobs_BTK, lo.tau, lo.kd_weight,
                        normalizer, check_ids)
        loss = out.loss
        attn_sum = torch.zeros((), device=loss.device)
        if attn:
            attn_sum = attention_kl_sum(student_qk, teacher_qk, s.args, self.teacher_args, labels_BT, doc_ids_BT)
            loss = loss + lo.attn_weight * attn_sum / (normalizer * s.args.n_layers * s.args.n_heads)
        if s.args.moe is not None and lo.aux_coef > 0:
            loss = loss + (lo.aux_coef * aux_scale) * aux
        stats = torch.stack([loss.detach().float(), out.ce_sum.float(), out.kd_sum.float(),
                             attn_sum.detach().float(), aux.detach().float()])
        return loss, stats


def head_loss(hidden_BTD, weight_VD, labels_BT, ids_BTK, logprobs_BTK, tau, kd_weight, normalizer, check_ids):
    """LM head + CE + top-k KD, fused and chunked (kernels/kd_loss.py): Triton on CUDA, the chunked torch path
    on CPU. On CUDA the head runs in bf16 (as autocast would run an nn.Linear), outside autocast because the
    loss function picks its own precisions (fp32 softmax statistics, fp32 dW accumulation)."""
    from kernels.kd_loss import linear_topk_kd_loss_chunked
    hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    N, K = hidden_ND.shape[0], ids_BTK.shape[-1]
    args = (labels_BT.reshape(N), ids_BTK.reshape(N, K), logprobs_BTK.reshape(N, K))  # K = 0 for sft
    if hidden_ND.is_cuda:
        hidden_ND, weight_VD = hidden_ND.to(torch.bfloat16), weight_VD.to(torch.bfloat16)
    fn = kernels.linear_topk_kd_loss if kernels.use_triton(hidden_ND) else linear_topk_kd_loss_chunked
    with torch.autocast(hidden_ND.device.type, enabled=False):
        return fn(hidden_ND, weight_VD, *args, tau=tau, kd_weight=kd_weight, normalizer=normalizer,
                  check_ids=check_ids)


# ------------------------------------------------------------------------------------------------------------
# The step


@dataclass
class StepContext:
    """What the step needs besides the data; built once."""
    module: nn.Module                 # parallelized StudentWithLoss
    optimizer: torch.optim.Optimizer
    teachers: object | None           # train.teacher.TeacherSet (None for sft)
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


def forward_backward(ctx: StepContext, batch, normalizer, last: bool) -> torch.Tensor:
    """One micro-batch: teacher signal, student forward + fused loss, backward. Returns the detached stats."""
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
    stops every rank after it."""
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    normalizer = global_loss_tokens(micro_batches, ctx.env)
    stats = torch.zeros(len(STATS), device=ctx.env.device)
    for i, mb in enumerate(micro_batches):
        stats[:5] += forward_backward(ctx, mb, normalizer, last=i == len(micro_batches) - 1)
    ctx.check_ids = False
    stats[5] = float(stop is not None and stop.requested)
    parallel.all_reduce_sum(stats, ctx.env)
    grad_norm = clip_grad_norm(ctx.module, ctx.grad_clip)
    values = torch.cat([stats, grad_norm.reshape(1).to(stats), normalizer.reshape(1)]).tolist()  # host sync: 1/step
    s = dict(zip(STATS + ("grad_norm", "n_tokens"), values))
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
# Output: rank 0 only, through one object


class Output:
    """Rank 0's log lines, progress bar, metrics.jsonl and loss curve; other ranks get a silent instance."""

    def __init__(self, run_dir: Path, active: bool, every: int, progress: bool, total: int, start: int):
        self.active, self.every, self.run_dir = active, every, run_dir
        self.history: list[dict] = []
        self.bar = None
        self._window: list[dict] = []
        self._t0 = time.perf_counter()
        if not active:
            return
        self.metrics_file = run_dir / "metrics.jsonl"
        if self.metrics_file.exists():  # resumed: keep the records up to the checkpoint, drop later ones
            kept = [json.loads(x) for x in self.metrics_file.read_text().splitlines() if x.strip()]
            self.history = [r for r in kept if r.get("step", 0) <= start]
        self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        if progress:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")
            except ImportError:
                self.info("tqdm not installed: no progress bar (pip install tqdm)")

    def info(self, msg: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, step: int, rec: dict, force: bool = False) -> None:
        if not self.active:
            return
        self._window.append(rec)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_s']:.0f}", refresh=False)
        if step % self.every and not force:
            return
        w, self._window = self._window, []
        now = time.perf_counter()
        out = {"step": step, **{k: sum(r[k] for r in w) / len(w) for k in ("loss", "ce", "kd", "attn", "aux",
                                                                            "grad_norm")},
               "lr": rec["lr"], "tokens": rec["tokens"], "tok_s": sum(r["step_tokens"] for r in w) / (now - self._t0),
               "skipped": rec["skipped"], "peak_mem_gb": rec["peak_mem_gb"]}
        if rec.get("mfu") is not None:
            out["mfu"] = rec["mfu"]
        self._t0 = now
        self.history.append(out)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(out) + "\n")
        mfu = f" mfu {100 * out['mfu']:.1f}%" if "mfu" in out else ""
        self.info(f"step {step:6d} | loss {out['loss']:.4f} ce {out['ce']:.4f} kd {out['kd']:.4f} "
                  f"attn {out['attn']:.4f} | gnorm {out['grad_norm']:.3f} lr {out['lr']:.2e} | "
                  f"{out['tok_s']:.0f} tok/s mem {out['peak_mem_gb']:.2f} GB{mfu}")

    def close(self, plot: bool) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if plot and self.history:
            plot_losses(self.history, self.run_dir / "loss_curve.png", self.info)


def plot_losses(history: list[dict], path: Path, note=print) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("matplotlib not installed: no loss_curve.png (pip install matplotlib); metrics.jsonl has the numbers")
        return
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "ce", "kd", "attn"):
        ys = [r[key] for r in history]
        if any(ys):
            ax.plot(steps, ys, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per loss token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (host RSS)


_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in _PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def flops_per_token(args, seq_len: int, train: bool) -> float:
    """6 (train) or 2 (forward) x active non-embedding parameters, plus attention scores (PaLM's appendix B):
    12 L H Dh T per token for training, a third of it forward-only."""
    D, F, L, H, G, Dh, V = args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, \
        args.vocab_size
    ffn = 3 * D * F * (args.moe.num_experts_per_tok if args.moe else 1) + (D * args.moe.num_experts if args.moe else 0)
    params = L * (D * Dh * (2 * H + 2 * G) + ffn) + V * D
    attn = 12 * L * H * Dh * seq_len
    return 6 * params + attn if train else (2 * params + attn / 3)


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


def build_packed(d, tokenizer_dir: str, teacher_names, cache_dir: Path, env: parallel.Env):
    """The PackedDataset of `d` (a DataConfig): rank 0 tokenises and packs into `cache_dir` first, the other ranks
    then read the same cache (train.data.prepare_packed is deterministic and keyed by content)."""
    from train.data import PackedDataset, prepare_packed
    if d.packed:
        return PackedDataset.load(d.packed)
    from transformers import AutoTokenizer
    packed = None
    for turn in (True, False):  # rank 0 first, then everyone else
        if env.is_main == turn:
            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
            packed = prepare_packed(d.paths, tok, d.seq_len, teacher_names=teacher_names, cache_dir=str(cache_dir),
                                    num_proc=d.num_proc, pad_id=d.pad_id)
        parallel.barrier(env)
    return packed


def build_data(cfg: Config, run_dir: Path, env: parallel.Env, out: Output):
    """PackedDataset and Sampler. kd/sft: one teacher teaches every row, whatever teacher the rows name (all
    packed teacher indices map to it). dae: rows name `reference` or `domain` (or carry `domain: true/false`)."""
    from train.data import Sampler
    d = cfg.data
    dae = cfg.subcommand == "dae"
    packed = build_packed(d, d.tokenizer or cfg.model.path, ["reference", "domain"] if dae else None,
                          Path(d.cache_dir) if d.cache_dir else run_dir / "data", env)
    out.info(f"data: {len(packed)} sequences of {packed.seq_len} tokens, teachers {packed.teacher_names}, "
             f"stats {json.dumps(packed.stats)}")
    if packed.seq_len != d.seq_len:
        raise ConfigError(f"the packed data has seq_len {packed.seq_len}, data.seq_len is {d.seq_len}; set "
                          f"--data.seq_len={packed.seq_len}")
    if dae and "domain" not in packed.teacher_names:
        raise ConfigError(f"dae: the data has no `domain` rows (teachers found: {packed.teacher_names}); mark "
                          f"domain rows with \"teacher\": \"domain\" or \"domain\": true")
    sampler = Sampler(packed, d.micro_batch * d.grad_accum, rank=env.rank, world_size=env.world_size,
                      seed=cfg.run.seed, domain_fraction=d.domain_fraction if dae else None)
    return packed, sampler


def build_teachers(cfg: Config, packed, env: parallel.Env):
    """TeacherSet whose `names` follow the packed data's teacher indices (kd: every index is the one teacher)."""
    if cfg.subcommand == "sft":
        return None
    from train.teacher import TeacherSpec
    from train.teacher import build_teachers as build
    t = cfg.teachers
    specs = {name: TeacherSpec(path=s.path or None, store=s.store or None, shard=s.shard)
             for name, s in t.named.items()}
    if cfg.subcommand == "kd":
        (only,) = t.named
        names = [only] * len(packed.teacher_names)
    else:
        names = list(packed.teacher_names)
    dtype = None if t.dtype == "auto" else getattr(torch, t.dtype)
    # Stores must be captured from exactly this packing and k; the tokenizer was compared by content in preflight.
    return build(specs, t.k, device=env.device, dtype=dtype, names=names, expected=expected_for(packed, t.k))


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay, vectors (norm gains) do not."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def export_student(module: nn.Module, path: Path, env: parallel.Env, tokenizer_dir: str | None,
                   strategy: str) -> None:
    """The student as an HF directory (safetensors, config.json, tokenizer files); every rank must call it."""
    inner = parallel.unwrap(module).student
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            with torch.device("meta"):
                model = Transformer(inner.args)
            model.load_state_dict({k.removeprefix("student."): v for k, v in full.items()}, assign=True)
    else:
        model = inner
    if env.is_main:
        save_hf(model, path)
        copy_tokenizer(tokenizer_dir, path)
    parallel.barrier(env)


def copy_tokenizer(src, dst: Path) -> None:
    if not src:
        return
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, dst / name)


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
    env = parallel.init_distributed(cfg.run.device, cfg.parallel.timeout_s)
    try:
        return _run(cfg, env, shapes)
    finally:
        parallel.shutdown(env)


def _run(cfg: Config, env: parallel.Env, shapes: dict) -> Path:
    strategy = parallel.resolve_strategy(cfg.parallel.strategy, env)
    run_dir = resolve_run_dir(cfg, env)
    resume_from = _resume_point(cfg, run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, run_dir)
    parallel.barrier(env)
    ckpt.remove_partial(run_dir, env)
    seed_everything(cfg.run.seed)
    start = ckpt.step_of(resume_from) if resume_from else 0
    out = Output(run_dir, env.is_main, cfg.logging.every, cfg.logging.progress, cfg.schedule.steps, start)
    out.info(f"{cfg.subcommand}: run dir {run_dir}, {env.world_size} process(es) on {env.device.type}, "
             f"strategy {strategy}" + (f", resuming from {resume_from}" if resume_from else ""))

    packed, sampler = build_data(cfg, run_dir, env, out)
    teachers = build_teachers(cfg, packed, env)
    dtype = getattr(torch, cfg.model.dtype)
    # FSDP: built on the meta device and sharded first; the weights arrive after (materialize_from_rank0).
    student = load_hf(cfg.model.path, dtype=dtype, device="meta" if strategy == "fsdp" else env.device)
    attn_teacher, teacher_args = None, None
    if cfg.subcommand == "kd" and cfg.loss.attn_weight > 0:
        (name,) = cfg.teachers.named
        attn_teacher, teacher_args = teachers.online(name), shapes["teachers"][name]
    aux_coef = cfg.loss.aux_coef if cfg.loss.aux_coef is not None else (
        student.args.moe.router_aux_loss_coef if student.args.moe else 0.0)
    settings = LossSettings(cfg.loss.kd_weight, cfg.loss.tau, cfg.loss.attn_weight, aux_coef)
    module = StudentWithLoss(student, settings, teacher_args)
    module = parallel.parallelize(module, student.layers, strategy=strategy,
                                  activation_checkpointing=cfg.parallel.activation_checkpointing,
                                  compile=cfg.parallel.compile, env=env)
    if strategy == "fsdp":
        parallel.materialize_from_rank0(
            module, lambda: {f"student.{k}": v for k, v in
                             load_hf(cfg.model.path, dtype=dtype, device="cpu").state_dict().items()}, env.device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(decay_groups(module, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    counters = {"skipped": 0, "bad_in_a_row": 0, "tokens": 0}
    if resume_from:
        state, rank_state = ckpt.load(resume_from, module, optimizer, env)
        if state["sampler"]["global_batch"] != sampler.global_batch:
            raise ConfigError(f"{resume_from} was trained with a global batch of {state['sampler']['global_batch']} "
                             f"sequences, this run has {sampler.global_batch} (micro_batch x grad_accum x ranks); "
                             f"resume with the same global batch")
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

    def save(step):
        trainer_state = {"sampler": sampler.state_dict(), "counters": counters}
        rank_state = {"rows_seen": dict(teachers.rows_seen) if teachers is not None else {}}
        path = ckpt.save(run_dir, step, module, optimizer, trainer_state, rank_state, env, cfg.checkpoint.keep)
        out.info(f"checkpoint: {path}")

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
            n = s["n_tokens"]
            out.step(step, {
                "loss": s["loss"], "ce": s["ce_sum"] / n, "kd": s["kd_sum"] / n,
                "attn": s["attn_sum"] / (n * student.args.n_layers * student.args.n_heads),
                "aux": s["aux"] * ctx.aux_scale, "grad_norm": s["grad_norm"], "lr": lr,
                "tokens": counters["tokens"], "step_tokens": seq_tokens, "tok_s": seq_tokens / dt,
                "skipped": counters["skipped"], "peak_mem_gb": peak_memory_gb(env.device),
                "mfu": step_flops / dt / peak_all if peak_all else None,
            }, force=step == cfg.schedule.steps)
            if counters["bad_in_a_row"] >= o.max_bad_steps:
                raise RuntimeError(f"{counters['bad_in_a_row']} non-finite steps in a row (optim.max_bad_steps="
                                   f"{o.max_bad_steps}); stopping with the last checkpoint intact. Lower optim.lr, "
                                   f"check the data, or resume from the checkpoint")
            if s["stop"] > 0:
                out.info(f"signal received: saving at step {step} and exiting")
                save(step)
                stopped = True
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save(step)
    finally:
        stop.restore()
    if not stopped:
        if cfg.checkpoint.every and step % cfg.checkpoint.every:
            save(step)
        if cfg.checkpoint.export_final:
            export_student(module, run_dir / "final", env, cfg.data.tokenizer or cfg.model.path, strategy)
            out.info(f"final student: {run_dir / 'final'}")
        if teachers is not None:
            out.info(f"rows per teacher (all ranks): {sum_over_ranks(teachers.rows_seen)}")
    out.close(cfg.logging.plot)
    return run_dir


def _resume_point(cfg: Config, run_dir: Path) -> Path | None:
    r = cfg.checkpoint.resume
    if r == "auto":
        return ckpt.latest(run_dir)
    if r:
        p = Path(r)
        if not (p / ckpt.STATE_FILE).exists():
            raise ConfigError(f"checkpoint.resume={r!r} is not a complete checkpoint directory; use --resume auto")
        if p.parent.resolve() != run_dir.resolve():
            raise ConfigError(f"checkpoint.resume={r!r} is not inside run.dir={str(run_dir)!r}; set --run.dir to "
                             f"{str(p.parent)!r}")
        return p
    if ckpt.latest(run_dir) is not None:
        raise ConfigError(f"run.dir {run_dir} already holds checkpoints; continue it with --resume auto or choose "
                         f"another --run.dir")
    return None
