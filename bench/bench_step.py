"""End-to-end KD optimizer step: this trainer against the way HF-based distillation trainers do it.

One step = teacher signal + student forward + loss + backward + grad clip + AdamW, on the same models (one pair of
HF directories written here with save_pretrained, read by both sides) and the same batch, in the same run:

    ours       train.loop.train_step, built as train.loop.run builds it: StudentWithLoss (our Transformer,
               fused chunked LM head + CE + top-K KD from kernels/kd_loss.py), an online TeacherSet (our MoE
               teacher, top-K log-probs at loss positions only, chunked head), AdamW over decay_groups.
    HF         transformers' MistralForCausalLM student and MixtralForCausalLM teacher (sdpa attention,
               transformers' default experts implementation), full-vocabulary [B, T, V] logits from both,
               forward KL(teacher || student) on full rows masked to the loss positions (TRL's GKD loss at
               beta = 0, the paper's code), CE on the labels, clip_grad_norm_, AdamW.

Both: loss = (1 - lambda) CE + lambda tau^2 KL, summed over loss tokens and divided by their count; lambda = 0.5,
tau = 1, clip 1.0, AdamW(lr 1e-5, betas (0.9, 0.95), no weight decay); fp32 student weights with bf16 autocast
on CUDA (HF Trainer's bf16=True), bf16 teacher on CUDA; everything fp32 on a CPU. Each row of the batch is one
document with its first third masked as prompt (label -100), as in completion-only chat training. The HF
student gets no attention mask (plain causal, its best case); ours gets the document ids its loader always
passes. Our loss is top-K KD (K = 64), the baseline's full-row KL: the difference in work is the point.

Dimensions: B sequences, T tokens per sequence, D hidden, F FFN hidden, L layers, E experts, V vocabulary,
K teacher top-k.

Reported per variant, one table row each, plus a ratio row (ours / HF):
    tok/s      B*T / median step time over --steps timed steps after --warmup steps
    MFU        (GPU only) (6 N_student + 2 N_teacher_active per token, plus attention: train.loop.flops_per_token,
               the formula the trainer logs) * tok/s / the GPU's peak bf16 FLOP/s
    peak mem   each variant runs in its own fresh subprocess. CUDA: torch.cuda.max_memory_allocated over all
               steps, warm-up included (weights, grads and AdamW state included: what decides whether it fits).
               CPU: growth of peak RSS (VmHWM, after resetting the high-water mark through
               /proc/self/clear_refs) over the RSS just before the first step, i.e. gradients + AdamW state +
               activations + logits, weights excluded
    CE         the first step's CE per loss token: equal on both sides (same weights, same batch) up to float
               rounding, the check that the two sides train the same model on the same data
On a CPU the scale is tiny and only the ratios mean anything; the GPU figures are reported missing. There both
processes stay alive and their steps alternate, one torch thread each (see `child` and `measure`): run one after
the other with 2 threads each, the tok/s ratio swung between 0.5x and 4.4x from run to run on a shared 2-core host
(load 4-5); alternated single-threaded steps gave 2.04x-2.09x in six runs at load < 1 and 2.42x at load 3.9.
Timings are never asserted.
Usage: .venv/bin/python bench/bench_step.py [--scale tiny|gpu] [--steps N] [--batch B] [--seq-len T]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench._common import peak_rss, reset_peak_rss

LAM, TAU, LR, BETAS, EPS, CLIP = 0.5, 1.0, 1e-5, (0.9, 0.95), 1e-8, 1.0
IGNORE = -100

# Shapes. Per-layer shapes at "gpu" are exactly Mistral-7B's and Mixtral-8x7B's (D 4096, 32 heads, 8 KV heads,
# F 14336, E 8, top-2, V 32000, T 4096), so every GEMM has its real size; only the depth is cut to fit one H200
# (141 GB) with both models resident. Estimate for the baseline, the larger of the two:
#   student L=8: 8 x 218.1M + 2 x 131M (embeddings, head) = 2.01B params x 16 B (fp32 weights, grads, 2 AdamW
#                states) = 32 GB, + 3.5 GB of autocast's bf16 weight copies
#   teacher L=12: 12 x 1.45B + 0.26B = 17.7B params x 2 B (bf16) = 35 GB; 4.9B active per token
#   activations, B*T = 2 x 4096 = 8192 tokens: ~0.3 MB per token per student layer in bf16 -> ~20 GB
#   HF full logits: [8192, 32000] is 0.5 GB in bf16, 1 GB in fp32; ~8-10 of them alive at the loss -> ~10 GB
#   total ~100 GB, leaving ~40 GB for the allocator's slack; ours holds no [N, V] tensor (~10 GB less).
# 8192 tokens per step is a typical per-GPU micro-batch for 7B training; the per-token FLOPs are balanced between
# student training (6 x 1.87B = 11 GFLOP) and teacher forward (2 x 4.9B = 10 GFLOP), as in the paper's setup
# (Mixtral-8x7B teaching Mistral-7B: 6 x 7.2B = 43 vs 2 x 12.9B = 26 GFLOP).
# "tiny" keeps V = 32000 (the [N, V] logits are what separates the two sides) with toy widths so that the
# whole CPU run (two processes, 5 steps each) takes ~15 s on 2 cores.
SCALES = {
    "tiny": dict(student=dict(dim=128, layers=2, heads=4, kv_heads=2, hidden=256),
                 teacher=dict(dim=128, layers=2, heads=4, kv_heads=2, hidden=256, experts=8),
                 V=32000, B=2, T=256, K=64, warmup=1, steps=4),
    "gpu": dict(student=dict(dim=4096, layers=8, heads=32, kv_heads=8, hidden=14336),
                teacher=dict(dim=4096, layers=12, heads=32, kv_heads=8, hidden=14336, experts=8),
                V=32000, B=2, T=4096, K=64, warmup=3, steps=10),
}


# ------------------------------------------------------------------------------------------------ models, batch

def _hf_config(shape: dict, V: int, T: int, moe: bool):
    import transformers
    common = dict(vocab_size=V, hidden_size=shape["dim"], intermediate_size=shape["hidden"],
                  num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                  num_key_value_heads=shape["kv_heads"], head_dim=shape["dim"] // shape["heads"],
                  rope_theta=1e6, max_position_embeddings=max(T, 4096), sliding_window=None,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if moe:
        return transformers.MixtralConfig(num_local_experts=shape["experts"], num_experts_per_tok=2, **common)
    return transformers.MistralConfig(**common)


def _fill_random(p: torch.Tensor, g: torch.Generator, std: float = 0.02) -> None:
    """N(0, std) values, drawn for at most POOL elements and tiled over larger tensors: CPU normal_ is serial
    (~150M values/s), 18B values would take minutes; the tiling is memory-bound. POOL is odd so that tensors
    whose sizes are multiples of 2^k (every expert slice) start at different phases of it."""
    POOL = (1 << 24) + 43
    flat = p.view(-1)
    src = torch.empty(min(flat.numel(), POOL), dtype=p.dtype).normal_(0.0, std, generator=g)
    for s0 in range(0, flat.numel(), POOL):
        flat[s0:s0 + POOL] = src[:min(POOL, flat.numel() - s0)]


def build_models(scale: dict, workdir: str, dtype: torch.dtype) -> tuple[str, str]:
    """Random HF student and teacher saved under `workdir`. Built on the meta device in `dtype` and then filled
    (N(0, 0.02) matrices, unit norm gains) rather than through HF's initialisers: at the GPU scale that is 20B
    parameters (40 GB in bf16, built one model at a time), and only their shapes matter for speed."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    g = torch.Generator().manual_seed(0)
    dirs = []
    for name, cls, moe in (("student", transformers.MistralForCausalLM, False),
                           ("teacher", transformers.MixtralForCausalLM, True)):
        cfg = _hf_config(scale[name], scale["V"], scale["T"], moe)
        with torch.device("meta"):
            m = cls(cfg).to(dtype)
        m = m.to_empty(device="cpu")  # allocated once, in `dtype`; non-persistent buffers (RoPE) stay unset,
        # which is harmless: save_pretrained does not write them and both loaders recompute them
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    _fill_random(p, g)
        path = os.path.join(workdir, name)
        m.save_pretrained(path)
        dirs.append(path)
        del m
    return dirs[0], dirs[1]


def make_batch(B: int, T: int, V: int):
    """One document per row; labels are the next tokens (already shifted, as the data pipeline gives them), the
    first third of each row is prompt (-100) and the last position has no next token."""
    from train.data import PackedBatch
    g = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(3, V, (B, T), generator=g)
    labels_BT = torch.full_like(tokens_BT, IGNORE)
    labels_BT[:, T // 3:T - 1] = tokens_BT[:, T // 3 + 1:]
    positions_BT = torch.arange(T).expand(B, T).contiguous()
    return PackedBatch(tokens_BT, labels_BT, positions_BT, torch.zeros(B, T, dtype=torch.long),
                       torch.zeros(B, dtype=torch.long), torch.arange(B))


# --------------------------------------------------------------------------------------------------- variants

def setup_ours(student_dir: str, teacher_dir: str, K: int, device: torch.device):
    """The trainer's own step, assembled from the pieces train.loop.run uses (world size 1, no wrapper)."""
    from model import load_hf
    from train import parallel
    from train.loop import StepContext, decay_groups, train_step
    from train.loss import LossSettings, StudentWithLoss
    from train.teachers import TeacherSpec, build_teachers

    env = parallel.init_distributed(device.type)
    student = load_hf(student_dir, dtype=torch.float32, device=env.device)
    module = StudentWithLoss(student, LossSettings(kd_weight=LAM, tau=TAU, attn_weight=0.0, aux_coef=0.0),
                             compute_dtype=parallel.compute_dtype("auto", env.device))
    module = parallel.parallelize(module, student.layers, strategy="none", activation_checkpointing=False,
                                  compile=False, env=env)
    optimizer = torch.optim.AdamW(decay_groups(module, 0.0), lr=LR, betas=BETAS, eps=EPS)
    teachers = build_teachers({"teacher": TeacherSpec(path=teacher_dir)}, K, device=env.device, names=["teacher"])
    ctx = StepContext(module, optimizer, teachers, None, env, CLIP, aux_scale=1.0, k=K)

    def step(batch) -> float:
        s = train_step(ctx, [batch], LR)  # one host sync inside (the step's statistics)
        return s["ce_sum"] / s["n_tokens"]
    return step


def hf_kd_loss(logits_S_BTV, logits_T_BTV, labels_BT, tau: float, lam: float):
    """(loss, CE per token): the HF-trainer way, full [B, T, V] rows in fp32 on both sides."""
    V = logits_S_BTV.shape[-1]
    mask_BT = labels_BT != IGNORE
    n = mask_BT.sum().clamp(min=1)
    s_BTV = logits_S_BTV.float()
    ce = torch.nn.functional.cross_entropy(s_BTV.view(-1, V), labels_BT.view(-1), ignore_index=IGNORE,
                                           reduction="sum")
    logq_BTV = torch.log_softmax(s_BTV / tau, dim=-1)
    logp_BTV = torch.log_softmax(logits_T_BTV.float() / tau, dim=-1)
    kl_BT = torch.nn.functional.kl_div(logq_BTV, logp_BTV, reduction="none", log_target=True).sum(-1)
    kd = tau * tau * (kl_BT * mask_BT).sum()
    return ((1 - lam) * ce + lam * kd) / n, (ce / n).detach()


def setup_hf(student_dir: str, teacher_dir: str, K: int, device: torch.device):
    import transformers
    cuda = device.type == "cuda"
    student = transformers.MistralForCausalLM.from_pretrained(student_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(device).train()
    teacher = transformers.MixtralForCausalLM.from_pretrained(
        teacher_dir, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa").to(device)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    print(f"# HF teacher experts implementation: {getattr(teacher.config, '_experts_implementation', '?')}",
          file=sys.stderr)

    def step(batch) -> float:
        b = batch.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits_S = student(input_ids=b.tokens_BT, position_ids=b.positions_BT, use_cache=False).logits
        with torch.no_grad():
            logits_T = teacher(input_ids=b.tokens_BT, position_ids=b.positions_BT, use_cache=False).logits
        loss, ce = hf_kd_loss(logits_S, logits_T, b.labels_BT, TAU, LAM)
        del logits_S, logits_T
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ce.item()  # host sync: the logged loss, as a trainer logs it
    return step


# ------------------------------------------------------------------ one variant per process, driven step by step
#
# Each variant lives in its own process (so that its peak memory is its own) and runs one step per "step" line on
# its stdin, answering one JSON line. On a CPU both processes are alive at once and the driver alternates their
# steps (ours, HF, HF, ours, ...): on a shared machine the load then hits both alike, where running one variant
# after the other let the time ratio swing 4x between runs. On a GPU they run one after the other (both resident
# would not fit).

def _reply(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def child(variant: str, student_dir: str, teacher_dir: str, scale: dict) -> None:
    """stdin "step" -> {"s": wall seconds, "ce": CE per token}; "done" -> {"peak_bytes", "before_bytes"}."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        # One thread: on a shared host a multi-threaded op waits at its barrier for whichever thread was
        # descheduled, so step time tracks the op count times the scheduler's quantum, not the work (measured
        # here: both variants at ~3.8 s/step under load, 0.6 vs 1.0 s when quiet).
        torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        batch = make_batch(scale["B"], scale["T"], scale["V"])
        step = {"ours": setup_ours, "hf": setup_hf}[variant](student_dir, teacher_dir, scale["K"], device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = reset_peak_rss()
        _reply({"ready": True})
        for line in sys.stdin:
            if line.strip() == "step":
                t0 = time.perf_counter()
                ce = step(batch)
                if cuda:
                    torch.cuda.synchronize()
                _reply({"s": time.perf_counter() - t0, "ce": ce})
            elif line.strip() == "done":
                peak = torch.cuda.max_memory_allocated() if cuda else peak_rss() - before
                _reply({"peak_bytes": peak, "before_bytes": before})
                return
    except torch.OutOfMemoryError:
        _reply({"oom": True})


class _Child:
    def __init__(self, variant: str, argv: list[str], log_dir: str):
        self.variant = variant
        self.log = open(os.path.join(log_dir, f"{variant}.stderr"), "w+")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--variant", variant, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def ask(self, command: str | None = None) -> dict:
        """Send `command` (None: just read) and return the next JSON line; RuntimeError when the child died."""
        if command is not None:
            try:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass  # it died: its stdout ends below and its stderr says why
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.proc.wait()
        self.log.seek(0)
        tail = (self.log.read().strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit {self.proc.returncode}: {tail}")

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # EOF: a child still waiting for a command exits
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=600)
        self.log.close()


def measure(argv: list[str], warmup: int, steps: int, interleave: bool, log_dir: str) -> dict:
    """Per variant: {"s": median timed step, "ce": first step's CE, "peak_bytes", ...} or {"error": why}."""
    variants = ["ours", "hf"]
    results = {v: {"times": [], "ces": []} for v in variants}
    for group in ([variants] if interleave else [[v] for v in variants]):
        kids = {v: _Child(v, argv, log_dir) for v in group}
        try:
            for i in range(-1, warmup + steps):  # round -1: wait until loaded
                for v in (group if i % 2 == 0 else group[::-1]):
                    if "error" in results[v]:
                        continue
                    try:
                        r = kids[v].ask(None if i < 0 else "step")
                    except RuntimeError as e:
                        results[v]["error"] = str(e)
                        continue
                    if r.get("oom"):
                        results[v]["error"] = "out of memory"
                    elif i >= 0:
                        results[v]["ces"].append(r["ce"])
                        if i >= warmup:
                            results[v]["times"].append(r["s"])
            for v in group:
                if "error" not in results[v]:
                    try:
                        results[v].update(kids[v].ask("done"))
                    except RuntimeError as e:
                        results[v]["error"] = str(e)
        finally:
            for kid in kids.values():
                kid.close()
    for r in results.values():
        if "error" not in r:
            r["s"], r["ce"] = statistics.median(r["times"]), r["ces"][0]
    return results


# ------------------------------------------------------------------------------------------------------ table

def _shape_str(s: dict, moe: bool) -> str:
    extra = f" E={s['experts']} top2" if moe else ""
    return f"D={s['dim']} L={s['layers']} F={s['hidden']}{extra}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default=None,
                   help="tiny (CPU, ratios only) or gpu (fills an H200); default: gpu with CUDA, else tiny")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (allocator, autotuning)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step B (default: the scale's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence T (default: the scale's)")
    p.add_argument("--workdir", default=None, help="where the HF model directories are written (gpu: ~40 GB)")
    p.add_argument("--variant", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: one child process
    p.add_argument("--dirs", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()  # creates no CUDA context: the parent leaves the GPU to the children
    scale_name = a.scale or ("gpu" if cuda else "tiny")
    if scale_name == "gpu" and not cuda:
        raise SystemExit("--scale gpu needs a CUDA device (torch sees none); use --scale tiny on a CPU")
    scale = dict(SCALES[scale_name])
    scale["B"] = a.batch or scale["B"]
    scale["T"] = a.seq_len or scale["T"]
    warmup = scale["warmup"] if a.warmup is None else a.warmup
    steps = scale["steps"] if a.steps is None else a.steps
    if steps < 1 or warmup < 0 or scale["B"] < 1 or scale["T"] < 4:
        raise SystemExit(f"--steps={steps} --warmup={warmup} --batch={scale['B']} --seq-len={scale['T']}: need "
                         "steps >= 1, warmup >= 0, batch >= 1, seq-len >= 4")

    if a.variant:
        child(a.variant, *a.dirs, scale)
        return

    from model.hf import args_from_config
    from train.metrics import flops_per_token, peak_flops

    with tempfile.TemporaryDirectory(prefix="bench_step_", dir=a.workdir) as work:
        # bf16 files at the GPU scale (half of 80 GB of disk); both sides upcast the student to fp32 on load
        dirs = build_models(scale, work, torch.bfloat16 if scale_name == "gpu" else torch.float32)
        cfgs = [args_from_config(json.load(open(os.path.join(d, "config.json")))) for d in dirs]
        argv = ["--dirs", *dirs, "--scale", scale_name, "--batch", str(scale["B"]), "--seq-len", str(scale["T"])]
        results = measure(argv, warmup, steps, interleave=not cuda, log_dir=work)

    B, T, V, K = scale["B"], scale["T"], scale["V"], scale["K"]
    tokens = B * T
    flops_tok = flops_per_token(cfgs[0], T, train=True) + flops_per_token(cfgs[1], T, train=False)
    peak = None
    if cuda:
        peak = peak_flops(torch.device("cuda", 0), None)
        dev = f"{torch.cuda.get_device_name(0)}, student fp32 + bf16 autocast, teacher bf16"
        mem_unit = "peak alloc GiB"
        print(f"# GPU: {torch.cuda.get_device_name(0)}; peak memory = torch.cuda.max_memory_allocated over the steps, "
              "in a fresh process per variant, one after the other (weights, grads, AdamW state included)")
    else:
        dev = "CPU fp32, 1 thread"
        mem_unit = "peak RSS growth MiB"
        print("# CPU only (no CUDA device): GPU figures missing. Absolute CPU numbers mean little at this toy scale; "
              "read the ratios. Each variant in its own process, steps alternated between the two; peak memory = "
              "growth of peak RSS (VmHWM) over the pre-step RSS (grads, AdamW state, activations, logits; weights "
              "excluded)")
    print(f"# one step = teacher + student fwd/bwd + loss + clip + AdamW; λ={LAM}, τ={TAU}; {warmup} warm-up + "
          f"{steps} timed steps, median; {flops_tok / 1e9:.3g} GFLOP/token (6·N_student + 2·N_teacher_active + "
          "attention)")
    print(f"| variant | device | student | teacher | B×T | V | K | ms/step | tok/s | MFU | {mem_unit} | CE step 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = (f"Mistral {_shape_str(scale['student'], False)}", f"Mixtral {_shape_str(scale['teacher'], True)}",
              f"{B}×{T}", str(V))
    labels = {"ours": ("ours: train_step, fused top-K KD", str(K)), "hf": ("HF: transformers models, full-V KL", "V")}
    tok_s, mem = {}, {}
    for variant in ("ours", "hf"):
        r = results[variant]
        name, k_col = labels[variant]
        if "error" in r:
            print(f"| {name} | {dev} | {' | '.join(shapes)} | {k_col} | {r['error']} | | | | |")
            continue
        tok_s[variant] = tokens / r["s"]
        mem[variant] = r["peak_bytes"] / (2**30 if cuda else 2**20)
        mfu = f"{100 * flops_tok * tok_s[variant] / peak:.1f}%" if peak else "n/a"
        print(f"| {name} | {dev} | {' | '.join(shapes)} | {k_col} | {r['s'] * 1e3:.1f} | {tok_s[variant]:.0f} | "
              f"{mfu} | {mem[variant]:.1f} | {r['ce']:.5f} |")
    if len(tok_s) == 2:
        speed = tok_s["ours"] / tok_s["hf"]
        memr = f"{mem['ours'] / mem['hf']:.2f}x" if mem["hf"] > 0 else "n/a"
        print(f"| ratio ours / HF | | | | | | | {1 / speed:.2f}x | {speed:.2f}x | | {memr} | |")
    else:
        print("| ratio ours / HF | | | | | | | n/a | n/a | | n/a | |")
    if not cuda:
        print(f"# host load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("# GPU figures missing (no CUDA device here): absolute tok/s, MFU and GPU peak memory come from "
              "`--scale gpu` on a GPU")


if __name__ == "__main__":
    main()
