"""What a run shows: rank 0's log lines and progress bar, metrics.jsonl, the loss-curve PNG, an opt-in
TensorBoard writer with the same scalars, and the figures they report (peak memory, FLOPs per token, MFU).
To change what is logged, this is the file.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

VAL_KEYS = ("val_ce", "val_kd", "val_top1", "val_tokens")  # train/validation.py's, at the steps it ran

class Output:
    """Rank 0's log lines, progress bar, metrics.jsonl and loss curve; other ranks get a silent instance.

    Construction writes nothing: log lines can be printed while data and models load, and a run that fails
    there leaves no file behind. `open_files()` (after every check has passed) starts metrics.jsonl and the
    TensorBoard writer; the progress bar opens at the first step, so the lines of loading (and an error there)
    are never glued onto a bar."""

    def __init__(self, run_dir: Path, active: bool, every: int, progress: bool, total: int, start: int,
                 tensorboard: bool = False):
        self.active, self.every, self.run_dir, self.start = active, every, run_dir, start
        self.history: list[dict] = []
        self.bar = None
        self.tb = None
        self._tensorboard = tensorboard
        self._window: list[dict] = []
        self._t0 = time.perf_counter()
        self._bar_args = dict(total=total, initial=start) if progress else None
        self.metrics_file = run_dir / "metrics.jsonl"

    def open_files(self) -> None:
        if not self.active:
            return
        if self.metrics_file.exists():  # resumed: keep the records up to the checkpoint, drop later ones
            kept = [json.loads(x) for x in self.metrics_file.read_text().splitlines() if x.strip()]
            self.history = [r for r in kept if r.get("step", 0) <= self.start]
        self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        if self._tensorboard:
            self.tb = tensorboard_writer(self.run_dir / "tensorboard", purge_step=self.start + 1)

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
        if self._bar_args is not None:
            self._open_bar()
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
        # Teacher counters (train.loop.train_step): per optimizer step, averaged over the logged window like the
        # losses: teacher.<name>.rows (all ranks), .forwards, .empty_forwards, .gathered_bytes (rank 0's).
        out.update({k: sum(r[k] for r in w) / len(w) for k in rec if k.startswith("teacher.")})
        out.update({k: rec[k] for k in VAL_KEYS if k in rec})
        self._t0 = now
        self.history.append(out)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(out) + "\n")
        if self.tb is not None:  # the same scalars as the metrics.jsonl record, under train/<name>
            for key, value in out.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"val/{key[4:]}" if key in VAL_KEYS else f"train/{key}", value, step)
            self.tb.flush()
        mfu = f" mfu {100 * out['mfu']:.1f}%" if "mfu" in out else ""
        val = "" if "val_ce" not in out else f" | val ce {out['val_ce']:.4f}" + (
            f" kd {out['val_kd']:.4f} top1 {100 * out['val_top1']:.1f}%" if "val_kd" in out else "")
        self.info(f"step {step:6d} | loss {out['loss']:.4f} ce {out['ce']:.4f} kd {out['kd']:.4f} "
                  f"attn {out['attn']:.4f} | gnorm {out['grad_norm']:.3f} lr {out['lr']:.2e} | "
                  f"{out['tok_s']:.0f} tok/s mem {out['peak_mem_gb']:.2f} GB{mfu}{val}")

    def _open_bar(self) -> None:
        args, self._bar_args = self._bar_args, None
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(dynamic_ncols=True, desc="train", **args)
        except ImportError:
            self.info("tqdm not installed: no progress bar (pip install tqdm)")

    def close_bar(self) -> None:
        """Close the progress bar (also on an error, so that the error line starts on a line of its own)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self, plot: bool) -> None:
        if not self.active:
            return
        self.close_bar()
        if self.tb is not None:
            self.tb.close()
        if plot and self.history:
            plot_losses(self.history, self.run_dir / "loss_curve.png", self.info)


def tensorboard_writer(log_dir: Path, purge_step: int):
    """torch's SummaryWriter, imported only when asked for (the `tensorboard` package is an extra). purge_step:
    a resumed run discards events after its checkpoint, as metrics.jsonl drops its later records."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("logging.tensorboard = true needs the tensorboard package: pip install tensorboard "
                          "(or pip install '.[tensorboard]'); or set logging.tensorboard = false") from e
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


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
    for key, name in (("val_ce", "held-out ce"), ("val_kd", "held-out kd")):  # at the validation steps only
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), "o--", label=name)
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


def fast_paths(device: torch.device, compute_dtype, student_args, placements: dict | None = None,
               async_save: bool = True, distributed: bool = False) -> str:
    """The run log's statement of this torch: versions, and for each fast path whether it is in use here or which
    fallback is (a cluster's torch is not CI's: 2.13 here, 2.11 on the lent GPU image)."""
    import kernels
    from model import attention
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = device.type == "cuda"
    dtype = compute_dtype or torch.float32
    gqa = student_args.n_heads != student_args.n_kv_heads
    attn = attention.pick_path(cuda, dtype, gqa, host_spans=True)
    attn_text = {"varlen": "varlen attention from host-built document spans",
                 "flex": "compiled FlexAttention with a document block mask",
                 "dense": "dense-mask SDPA (the twin; T x T mask" + (", no fast path in this torch)" if cuda else
                                                                      ", the CPU path)")}[attn]
    on_triton = kernels.use_triton(torch.empty(0, device=device))
    kernel_text = "Triton" if on_triton else f"torch twins ({'DISTILL_KERNELS=torch' if cuda else 'the CPU path'})"
    lines = [f"torch {torch.__version__}, triton {triton_version}, device {device}",
             f"  packed attention: {attn_text}",
             f"  routing / grouped GEMM / fused KD loss: {kernel_text}"
             + ("" if student_args.moe is None else f" (MoE student, {student_args.moe.num_experts} experts)"),
             f"  precision: {'bf16 compute, fp32 master weights and gradient reduction' if compute_dtype else 'fp32'}",
             "  checkpoint saves: " + (_async_save_text(distributed) if async_save else
                                       "synchronous, in the step (checkpoint.async_save=false)"),
             "  expert-parallel all-to-all: " + _expert_text(placements or {}, distributed)]
    return "\n".join(lines)


def _async_save_text(distributed: bool) -> str:
    import torch.distributed.checkpoint as dcp
    if not hasattr(dcp, "async_save"):
        return "synchronous: this torch has no DCP async_save"
    return ("asynchronous (DCP async_save on a gloo group of its own; the step waits only for the copy to host "
            "memory)" + ("" if distributed else ", one process"))


def _expert_text(placements: dict, distributed: bool) -> str:
    expert = sorted(n for n, p in placements.items() if p == "expert")
    if not expert:
        return "not used (" + (", ".join(f"teacher {n}: {p}" for n, p in sorted(placements.items())) or
                               "no online teacher") + "; students are never expert-parallel)"
    if not distributed:
        return f"not used: one process holds the whole of teacher(s) {', '.join(expert)} (placement expert needs " \
               f"torchrun)"
    return f"in use for teacher(s) {', '.join(expert)} (train.teachers.expert)"
