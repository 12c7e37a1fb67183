"""The embedded demo: the paper's whole pipeline, and its claims, in miniature, on 2 CPU cores.

    python train/main.py                      # (no arguments) the full demo into runs/demo
    python train/demo.py --quick              # reduced, < 3 min: for CI and a first look (runs/demo-quick)
    python train/demo.py --seeds 0,1,2        # students, DAE and evaluation repeated per seed: mean +- std

Stages (each prints progress, each is cached in its own directory under --out, keyed on its configuration and
on the keys of the stages it reads, so a second run reuses the teacher and whatever else did not change):
  data          a synthetic instruction corpus with checkable answers (9 general task families + a product
                catalogue domain family), a byte-level BPE tokenizer trained on it (train/demo_data.py), and the
                students' pool: rows of the same families and distribution that share no prompt with any row the
                teacher or the domain expert trains on (checked here); the budgets b, 2b, 4b, 8b are nested
                prefixes of its general rows
  teacher       a tiny Mixtral (MoE, 4 experts, top-2) trained from scratch (`sft`) on the general corpus rows
  domain_expert the teacher fine-tuned (`sft`) on the corpus catalogue rows
  seed-S/init   the students' common initialisation (dense Mistral), and its MoE upcycling (2 experts, top-2)
  seed-S/sft, sft_2b, sft_4b, sft_8b   SFT (lambda = 0) on b, 2b, 4b, 8b instructions   } all: the same steps,
  seed-S/kd, kd_attn                   KD, KD + attention transfer, on b               } batch and learning-
  seed-S/sft_moe, kd_moe               SFT and KD of the upcycled MoE student, on b    } rate schedule
  seed-S/dae    DAE on the KD student: reference = teacher, domain = domain expert, ~10 % domain sequences
                (domain rows from the students' pool)
then every model is evaluated (train/eval.py) and one table is printed; report.md, exchange_rate.png,
family_accuracy.png, loss_curves.png and summary.json are written to --out; every model is an HF directory
(`final/`).

The headline is the exchange rate: "the teacher was worth ~x instructions", x the SFT budget at which SFT matches
the KD student at b, read off the seed-mean SFT curve made monotone (isotonic fit) by interpolation in
log(budget), a bound ("less than b", "more than 8b") off the curve; per-seed values beside it. The claims (C1-C4
of the issues) are judged on general accuracy (domain accuracy for C4's first half) against a spread: with
several seeds the standard deviation over seeds of the paired contrast; with one seed the paired standard error
of the contrast over the held-out turns (evaluation noise only, a lower bound of the seed spread; the table says
which). C3 is the paper's: KD's gain over SFT at b for the MoE student against the same gain for the dense one.
The settings (FULL, QUICK below) were fixed before any 3-seed run and nothing here is tuned to make a claim hold.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

_VERSION = "demo-v2"  # bump when a stage's semantics change: invalidates every cached stage

BUDGET_MULTIPLES = (1, 2, 4, 8)   # SFT budgets b, 2b, 4b, 8b instructions
SFT_BUDGETS = tuple("sft" if m == 1 else f"sft_{m}b" for m in BUDGET_MULTIPLES)
STUDENTS = SFT_BUDGETS + ("kd", "kd_attn", "sft_moe", "kd_moe")
MODELS = ("teacher", "domain_expert") + STUDENTS + ("dae",)
LABELS = {"teacher": "teacher (MoE 4x, top-2)", "domain_expert": "domain expert", "sft": "SFT student @ b",
          **{f"sft_{m}b": f"SFT student @ {m}b" for m in BUDGET_MULTIPLES[1:]},
          "kd": "KD student @ b", "kd_attn": "KD + attn student @ b", "sft_moe": "SFT MoE 2x student @ b",
          "kd_moe": "KD MoE 2x student @ b", "dae": "DAE (KD student)"}


@dataclass
class Arch:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    experts: int = 0          # 0 = dense
    top_k: int = 2


@dataclass
class DemoSize:
    """Everything the stages depend on. Sized by measurement on 2 CPU cores (see the README for the times)."""
    n_train: int               # the teachers' rows (general: teacher; domain: domain expert)
    n_eval: int
    vocab_size: int
    teacher: Arch
    student: Arch
    moe_student_experts: int
    seq_len: int
    batch: int                 # packed sequences of seq_len tokens per optimizer step
    teacher_steps: int
    teacher_lr: float
    expert_steps: int
    expert_lr: float
    budget: int                # b: general instructions of the KD students and of the smallest SFT budget
    student_steps: int
    student_lr: float
    dae_steps: int
    dae_lr: float
    domain_fraction: float
    kd_top_k: int
    attn_weight: float
    warmup: int
    domain_share: float = 0.2  # of the corpus and of the students' pool
    data_seed: int = 0

    @property
    def n_pool(self) -> int:
        """Students' pool rows: 8b general rows plus the same domain share as the teachers' corpus."""
        return round(max(BUDGET_MULTIPLES) * self.budget / (1 - self.domain_share))


TEACHER = Arch(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, experts=4, top_k=2)
STUDENT = Arch(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128)

# Settings of demo-v2 (issue 22), fixed before any 3-seed run; what changed from demo-v1 and why:
# - The students' instructions come from a pool disjoint from the teachers' rows (demo_data.generate_corpus
#   n_pool: the prompt space is split in two by a hash; teachers train on one side, students on the other), so
#   the teacher's soft targets on them are predictions, not recall. n_train (the teachers' rows) is unchanged.
# - The instruction budget b and the steps: every student run reads student_steps * batch sequences of about
#   5.35 rows each (measured: 4800 rows pack into 897 sequences of 128 tokens), 400 * 16 * 5.35 = 34,200 rows.
#   b is set so that the largest SFT budget, 8b = 32,000, is read about once (1.07 epochs) and b about 8.5
#   times: every SFT budget is fully used and the smaller ones repeat, the regime where more instructions can
#   still help. b = 4,000 (quick: 64 * 16 * 5.35 / 8 = 685 -> 640).
# - Steps cut to fit 15 minutes on 2 cores with twice the student runs (4 SFT budgets and an SFT run of the MoE
#   student added to the 4 runs of demo-v1): students 800 -> 400, teacher 2000 -> 1500 (2.7 epochs of its
#   48,000 general rows instead of 3.6), domain expert 300 -> 200, DAE 300 -> 200; quick likewise (teacher
#   250 -> 200, students 120 -> 64, expert and DAE 60 -> 40). Measured per-step costs on 2 idle cores: teacher
#   0.22 s, SFT student 0.06 s, KD 0.11 s, KD + attention 0.20 s, KD MoE 0.17 s.
# - Seeds 0, 1, 2 for the claims, as before; learning rates, batch, warm-up, architectures, k, tau, lambda and
#   the attention weight unchanged.
FULL = DemoSize(n_train=60000, n_eval=1000, vocab_size=1000, teacher=TEACHER, student=STUDENT,
                moe_student_experts=2, seq_len=128, batch=16, teacher_steps=1500, teacher_lr=3e-3,
                expert_steps=200, expert_lr=1e-3, budget=4000, student_steps=400, student_lr=3e-3,
                dae_steps=200, dae_lr=1e-3, domain_fraction=0.1, kd_top_k=64, attn_weight=1.0, warmup=50)
QUICK = replace(FULL, n_train=6000, n_eval=300, teacher_steps=200, expert_steps=40, budget=640, student_steps=64,
                dae_steps=40, warmup=20)


# ------------------------------------------------------------------------------------------------------------
# Stage cache


class Pipeline:
    """Runs stages in order; a stage whose directory holds a marker with the same key is reused."""

    def __init__(self, out: Path):
        self.out = out
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self.cached: list[str] = []

    def log(self, msg: str) -> None:
        print(f"[demo {time.perf_counter() - self.t0:6.0f}s] {msg}", flush=True)

    def stage(self, name: str, config: dict, build) -> tuple[Path, str]:
        """(stage directory, key). `build(directory)` makes the stage's content; it runs only on a cache miss."""
        key = hashlib.sha256(json.dumps({"v": _VERSION, **config}, sort_keys=True, default=str).encode()
                             ).hexdigest()[:16]
        d = self.out / name
        marker = d / "stage.json"
        done = json.loads(marker.read_text()) if marker.exists() else {}
        if done.get("key") == key:
            self.log(f"{name}: cached ({d})")
            self.cached.append(name)
            self.times[name] = done.get("seconds", 0.0)
            return d, key
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        self.log(f"{name}: building")
        t = time.perf_counter()
        build(d)
        seconds = time.perf_counter() - t
        marker.write_text(json.dumps({"key": key, "seconds": seconds, "config": config}, indent=1, default=str))
        self.times[name] = seconds
        self.log(f"{name}: done in {seconds:.0f}s")
        return d, key


# ------------------------------------------------------------------------------------------------------------
# Stages


def build_data(d: Path, size: DemoSize) -> None:
    """Corpus, tokenizer, and the row files each stage trains on. The teachers' rows (train.jsonl) and the
    students' pool (pool.jsonl) share no prompt; checked here, a stage that fails the check is not cached."""
    from train.demo_data import first_user, generate_corpus, shared_prompts, train_tokenizer, write_jsonl
    paths = generate_corpus(size.data_seed, d, size.n_train, size.n_eval, domain_share=size.domain_share,
                            n_pool=size.n_pool)
    train_tokenizer([paths["train"]], d / "tokenizer", vocab_size=size.vocab_size, seed=size.data_seed)

    rows, pool, evals = _read_rows(paths["train"]), _read_rows(paths["pool"]), _read_rows(paths["eval"])
    general = [r for r in rows if not r["domain"]]
    domain = [r for r in rows if r["domain"]]
    pool_general = [r for r in pool if not r["domain"]]
    pool_domain = [r for r in pool if r["domain"]]
    write_jsonl(d / "general.jsonl", general)      # the teacher's data
    write_jsonl(d / "domain.jsonl", domain)        # the domain expert's data
    write_jsonl(d / "pool_domain.jsonl", pool_domain)   # DAE's domain rows
    # The budgets are nested prefixes of the students' general pool (already shuffled): b rows in budget-1, ...
    for m in BUDGET_MULTIPLES:
        write_jsonl(d / f"budget-{m}.jsonl", pool_general[:m * size.budget])
    overlap = {"teacher": len(shared_prompts(pool, general)), "domain_expert": len(shared_prompts(pool, domain)),
               "eval": len(shared_prompts(pool, evals))}
    if any(overlap.values()) or len(pool_general) < max(BUDGET_MULTIPLES) * size.budget:
        raise RuntimeError(f"students' pool: prompts shared {overlap}, {len(pool_general)} general rows for "
                           f"8b = {max(BUDGET_MULTIPLES) * size.budget}")
    (d / "counts.json").write_text(json.dumps({
        "general": len(general), "domain": len(domain), "pool_general": len(pool_general),
        "pool_domain": len(pool_domain), "budgets": [m * size.budget for m in BUDGET_MULTIPLES],
        "prompts_shared_with_pool": overlap,
        "distinct_prompts": {name: len({first_user(r) for r in rs}) for name, rs in
                             (("teacher", general), ("domain_expert", domain), ("pool", pool))}}))


def _model_args(arch: Arch, vocab: int, seq_len: int):
    from model import ModelArgs, MoEArgs
    return ModelArgs(dim=arch.dim, n_layers=arch.n_layers, n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads,
                     head_dim=arch.head_dim, hidden_dim=arch.hidden_dim, vocab_size=vocab, rope_theta=10000.0,
                     max_position_embeddings=2 * seq_len,
                     moe=MoEArgs(arch.experts, arch.top_k) if arch.experts else None)


def build_init(d: Path, arch: Arch, size: DemoSize, tokenizer_dir: Path, seed: int, upcycle_to: int = 0) -> None:
    """A fresh model (N(0, 0.02), seeded) as an HF directory; with upcycle_to, also its MoE upcycling."""
    from transformers import AutoTokenizer

    from model import Transformer, save_hf, upcycle
    from train.export import copy_tokenizer
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    model = Transformer(_model_args(arch, vocab, size.seq_len))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    save_hf(model, d / "dense")
    copy_tokenizer(tokenizer_dir, d / "dense")
    if upcycle_to:
        moe = upcycle(model, upcycle_to, top_k=min(2, upcycle_to), seed=seed)
        save_hf(moe, d / "moe")
        copy_tokenizer(tokenizer_dir, d / "moe")


def train_run(d: Path, sub: str, model_path: Path, data: list, tokenizer_dir: Path, size: DemoSize, steps: int,
              lr: float, seed: int, teachers: dict | None = None, attn_weight: float = 0.0,
              domain_fraction: float | None = None, cache_dir: Path | None = None) -> None:
    """One `sft` / `kd` / `dae` run of the trainer, in-process, into d (final/ is the model)."""
    from train.config import make_config
    from train.loop import run
    overrides = [f"run.dir={d}", f"run.seed={seed}", "run.device=cpu", f"model.path={model_path}",
                 "data.paths=" + ",".join(str(p) for p in data), f"data.tokenizer={tokenizer_dir}",
                 f"data.seq_len={size.seq_len}", f"data.micro_batch={size.batch}", "data.grad_accum=1",
                 f"optim.lr={lr}", "optim.weight_decay=0.0", f"schedule.steps={steps}",
                 f"schedule.warmup_steps={min(size.warmup, steps)}", "parallel.strategy=none",
                 "checkpoint.every=0", f"logging.every={max(1, steps // 10)}"]
    if cache_dir is not None:
        overrides.append(f"data.cache_dir={cache_dir}")
    if sub != "sft":
        overrides += [f"teachers.k={size.kd_top_k}", "teachers.dtype=float32", "loss.kd_weight=1.0",
                      "loss.tau=1.0"]
        overrides += [f"teachers.{name}.path={path}" for name, path in (teachers or {}).items()]
    if attn_weight:
        overrides.append(f"loss.attn_weight={attn_weight}")
    if domain_fraction is not None:
        overrides.append(f"data.domain_fraction={domain_fraction}")
    run(make_config(sub, None, overrides))
    if not (d / "final" / "config.json").is_file():  # SIGTERM/SIGINT: the trainer saved and exited early
        raise SystemExit(f"{d}: the run stopped before its last step (a signal); this stage is not cached, run the "
                         "demo again to continue")


# ------------------------------------------------------------------------------------------------------------
# Claims


def _mean(xs):
    return sum(xs) / len(xs)


def judge_claims(per_seed: list, per_seed_correct: list, is_domain: list) -> list:
    """per_seed: one {model: metrics} per seed; per_seed_correct: one {model: [bool per turn]} per seed;
    is_domain: per turn. Returns one dict per claim (statement, numbers, spread, verdict).

    Each claim is a paired contrast, a weighted sum of models' accuracies (C3 a difference of differences).
    Spread: with >= 2 seeds the standard deviation over seeds of the contrast; with one seed the paired standard
    error of the contrast over the held-out turns of the metric's split (evaluation noise only: a lower bound
    of the seed spread)."""
    out = []

    def compare(weights: dict, key: str):
        ds = [sum(w * r[m][key] for m, w in weights.items()) for r in per_seed]
        if len(ds) >= 2:
            return _mean(ds), statistics.stdev(ds), statistics.stdev(ds), "seed std"
        sel = [i for i, dom in enumerate(is_domain) if dom == (key == "domain")]
        c = per_seed_correct[0]
        per_turn = [sum(w * float(c[m][i]) for m, w in weights.items()) for i in sel]
        se = statistics.pstdev(per_turn) / math.sqrt(len(per_turn)) if len(per_turn) > 1 else 0.0
        return ds[0], None, se, "paired s.e."

    def record(claim, text, metric, weights, key, verdict_of):
        m, std, s, kind = compare(weights, key)
        verdict = verdict_of(m, s)
        out.append({"claim": claim, "text": text, "metric": f"{key}: {metric}", "mean": m, "std": std,
                    "spread": s, "spread_kind": kind, "seeds": len(per_seed), "verdict": verdict})
        return verdict

    def beats(m, s):
        return "held" if m > s else "not shown (gain within spread)" if m > 0 else "did not hold"

    def no_harm(m, s):
        return "held (helps)" if m > s else "held (no harm)" if m >= -s else "did not hold (hurts)"

    record("C1", "KD student beats SFT student at equal budget b", "kd - sft", {"kd": 1, "sft": -1}, "general",
           beats)
    record("C2", "attention term helps or does not hurt", "kd_attn - kd", {"kd_attn": 1, "kd": -1}, "general",
           no_harm)
    record("C3", "the larger (MoE) student gains more from KD over SFT than the dense one",
           "(kd_moe - sft_moe) - (kd - sft)", {"kd_moe": 1, "sft_moe": -1, "kd": -1, "sft": 1}, "general", beats)
    v_dom = record("C4a", "DAE raises domain accuracy", "dae - kd", {"dae": 1, "kd": -1}, "domain", beats)
    v_gen = record("C4b", "DAE keeps general accuracy (not below the spread)", "dae - kd", {"dae": 1, "kd": -1},
                   "general", lambda m, s: "held" if m >= -s else "did not hold")
    out.append({"claim": "C4", "text": "DAE: domain up, general within spread", "metric": "C4a and C4b",
                "mean": None, "std": None, "spread": None, "spread_kind": "", "seeds": len(per_seed),
                "verdict": "held" if v_dom == "held" and v_gen == "held" else "did not hold"})
    return out


# ------------------------------------------------------------------------------------------------------------
# The exchange rate: how many instructions SFT needs to match KD at b


def isotonic(ys: list) -> list:
    """The non-decreasing sequence closest to ys in least squares (pool-adjacent-violators, equal weights)."""
    blocks = []  # [mean, count]
    for y in ys:
        blocks.append([float(y), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(n)]


@dataclass
class Exchange:
    """SFT instructions worth the KD student's b. relation "=": on the curve, `instructions` interpolated;
    "<": KD is below SFT at the smallest budget (instructions = that budget); ">": KD is above SFT at the largest
    budget (instructions = that budget)."""
    instructions: float
    relation: str

    def text(self, b: int) -> str:
        if self.relation == "<":
            return f"less than b = {self.instructions:,.0f}"
        if self.relation == ">":
            return f"more than {self.instructions / b:g}b = {self.instructions:,.0f}"
        return f"~{self.instructions:,.0f} ({self.instructions / b:.2f}b)"


def exchange_rate(budgets: list, sft_acc: list, kd_acc: float) -> Exchange:
    """The SFT budget at which SFT matches kd_acc: SFT accuracy against budget made monotone (isotonic fit),
    then the first budget where the fit reaches kd_acc, interpolated linearly in log(budget)."""
    if len(budgets) != len(sft_acc) or len(budgets) < 2 or any(b <= 0 for b in budgets) or budgets != sorted(budgets):
        raise ValueError(f"budgets {budgets} / accuracies {sft_acc}; fix: >= 2 increasing positive budgets, one "
                         "accuracy each")
    fit = isotonic(sft_acc)
    if kd_acc > fit[-1]:
        return Exchange(float(budgets[-1]), ">")
    if kd_acc < fit[0]:
        return Exchange(float(budgets[0]), "<")
    i = next(i for i, f in enumerate(fit) if f >= kd_acc)
    if i == 0:
        return Exchange(float(budgets[0]), "=")
    t = (kd_acc - fit[i - 1]) / (fit[i] - fit[i - 1])      # fit[i - 1] < kd_acc <= fit[i]
    lo, hi = math.log(budgets[i - 1]), math.log(budgets[i])
    return Exchange(math.exp(lo + t * (hi - lo)), "=")


def exchange_summary(per_seed: list, budgets: list, key: str = "general") -> dict:
    """The headline (seed-mean SFT curve against seed-mean KD at b) and the per-seed values, for KD and KD +
    attention. Spread: the seed std of log2(instructions) when every seed is on the curve."""
    out = {"budgets": budgets}
    curves = [[r[m][key] for m in SFT_BUDGETS] for r in per_seed]
    mean_curve = [_mean(c) for c in zip(*curves, strict=True)]
    # How much SFT itself gains from b to 8b: the exchange rate only resolves what that rise resolves.
    rises = [c[-1] - c[0] for c in curves]
    out["sft_rise"] = {"fit": isotonic(mean_curve)[-1] - isotonic(mean_curve)[0], "raw": _mean(rises),
                       "std": statistics.stdev(rises) if len(rises) >= 2 else None}
    for model in ("kd", "kd_attn"):
        head = exchange_rate(budgets, mean_curve, _mean([r[model][key] for r in per_seed]))
        seeds = [exchange_rate(budgets, c, r[model][key]) for c, r in zip(curves, per_seed, strict=True)]
        logs = [math.log2(e.instructions) for e in seeds]
        on_curve = all(e.relation == "=" for e in seeds)
        out[model] = {"instructions": head.instructions, "relation": head.relation,
                      "text": head.text(budgets[0]), "sft_fit": isotonic(mean_curve),
                      "per_seed": [asdict(e) for e in seeds], "per_seed_text": [e.text(budgets[0]) for e in seeds],
                      "log2_std": statistics.stdev(logs) if on_curve and len(seeds) >= 2 else None}
    return out


def exchange_text(ex: dict) -> str:
    b = ex["budgets"][0]
    lines = []
    for model, what in (("kd", "The teacher was worth"), ("kd_attn", "With the attention term it was worth")):
        e = ex[model]
        spread = (f"; seed std of log2(instructions) {e['log2_std']:.2f}" if e["log2_std"] is not None else
                  "; no seed spread: not every seed is on the curve" if len(e["per_seed"]) >= 2 else "; one seed")
        lines.append(f"- {what} {e['text']} instructions: the SFT budget at which SFT matches {LABELS[model]} "
                     f"(b = {b:,}); per seed: {', '.join(e['per_seed_text'])}{spread}.")
    rise = ex["sft_rise"]
    std = f" ± {100 * rise['std']:.1f} (seed std)" if rise["std"] is not None else " (one seed)"
    lines.append(f"- SFT's own gain from b to {max(BUDGET_MULTIPLES)}b: {100 * rise['raw']:+.1f}{std} accuracy points "
                 f"({100 * rise['fit']:+.1f} on the isotonic fit of the seed mean). Where this rise is within the "
                 "spread, the SFT curve is flat and an exchange rate off it (a bound) says only that KD is above a "
                 "flat curve; C1 below says whether that gap itself is larger than the spread.")
    return "\n".join(lines)


def claims_table(claims: list) -> str:
    lines = ["| claim | statement | measured (accuracy points) | spread | verdict |", "|---|---|---|---|---|"]
    for c in claims:
        if c["mean"] is None:
            meas, spread = c["metric"], ""
        else:
            std = f" ± {100 * c['std']:.1f} (seed std)" if c["std"] is not None else ""
            meas = f"{c['metric']} = {100 * c['mean']:+.1f}{std}, {c['seeds']} seed(s)"
            spread = f"{100 * c['spread']:.1f} ({c['spread_kind']})"
        lines.append(f"| {c['claim']} | {c['text']} | {meas} | {spread} | {c['verdict']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Tables, plots, report


SUMMARY_COLS = ["general", "domain", "all", "win_rate", "kl", "top1_agreement", "answer_nll"]


def _mean_std_metrics(per_seed: list) -> tuple[dict, dict]:
    mean, std = {}, {}
    for m in per_seed[0]:
        mean[m], std[m] = {}, {}
        for k, v in per_seed[0][m].items():
            if isinstance(v, (int, float)):
                xs = [r[m][k] for r in per_seed]
                mean[m][k] = _mean(xs)
                std[m][k] = statistics.stdev(xs) if len(xs) >= 2 else None
    return mean, std


def results_table(mean: dict, std: dict, columns: list) -> str:
    """One row per model; with several seeds every cell is mean±std over the seeds."""
    from train.eval import format_table
    names = [m for m in MODELS if m in mean]
    multi = any(std[m].get(c) is not None for m in names for c in columns)
    return format_table([LABELS[m] for m in names], {LABELS[m]: mean[m] for m in names}, columns,
                        spread={LABELS[m]: std[m] for m in names} if multi else None)


def _metrics(run_dir: Path) -> list[dict]:
    """The trainer's metrics.jsonl records of a run ([] when it has none)."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _last_ce(run_dir: Path) -> float | None:
    recs = _metrics(run_dir)
    return recs[-1]["ce"] if recs else None


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_families(mean: dict, families: list, path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return False
    names = [m for m in MODELS if m in mean]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, m in enumerate(names):
        ys = [100 * mean[m][f"family/{f}"] for f in families]
        ax.bar([j + i * width for j in range(len(families))], ys, width, label=LABELS[m])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))])
    ax.set_xticklabels(families, rotation=25, ha="right")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_loss_curves(runs: dict, path: Path) -> bool:
    """runs: {label: run dir with metrics.jsonl}: one panel per stage kind, the training loss of every run (and,
    for KD runs, the cross-entropy on the labels, which is what SFT minimises)."""
    plt = _pyplot()
    if plt is None:
        return False
    panels = {"teacher / domain expert (CE)": ["teacher", "domain_expert"],
              "students (solid: training loss, dashed: CE)": list(STUDENTS), "DAE (KD loss; dashed: CE)": ["dae"]}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (title, names) in zip(axes, panels.items()):
        for label, run_dir in runs.items():
            if label.split("@")[0] not in names:
                continue
            recs = _metrics(run_dir)
            if not recs:
                continue
            steps = [r["step"] for r in recs]
            line, = ax.plot(steps, [r["loss"] for r in recs], label=label)
            if any(r["kd"] for r in recs):  # KD runs: their CE on the labels too, comparable with SFT's loss
                ax.plot(steps, [r["ce"] for r in recs], color=line.get_color(), linestyle="--", alpha=0.6)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_exchange(per_seed: list, ex: dict, path: Path) -> bool:
    """General accuracy against the SFT budget (log x): per-seed points, the seed mean and its isotonic fit, the
    KD students at b, and where the fit meets KD (the exchange rate)."""
    plt = _pyplot()
    if plt is None:
        return False
    budgets = ex["budgets"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in per_seed:
        ax.plot(budgets, [100 * r[m]["general"] for m in SFT_BUDGETS], "o", color="grey", alpha=0.4, ms=4)
    mean = [100 * _mean([r[m]["general"] for r in per_seed]) for m in SFT_BUDGETS]
    ax.plot(budgets, mean, "o", color="C0", label="SFT (seed mean; grey: seeds)")
    ax.plot(budgets, [100 * f for f in ex["kd"]["sft_fit"]], "-", color="C0", alpha=0.6, label="SFT isotonic fit")
    for model, color, marker in (("kd", "C1", "s"), ("kd_attn", "C2", "D"), ("sft_moe", "C4", "v"),
                                 ("kd_moe", "C3", "^")):
        ys = [100 * r[model]["general"] for r in per_seed]
        ax.errorbar([budgets[0]], [_mean(ys)], yerr=[statistics.stdev(ys)] if len(ys) >= 2 else None,
                    fmt=marker, color=color, capsize=3, label=f"{LABELS[model]}")
        if model in ex and ex[model]["relation"] == "=":
            x = ex[model]["instructions"]
            ax.plot([budgets[0], x], [_mean(ys)] * 2, ":", color=color)
            ax.axvline(x, color=color, linestyle=":", alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets)
    ax.set_xticklabels([f"{m}b\n{x:,}" for m, x in zip(BUDGET_MULTIPLES, budgets)])
    ax.set_xlabel("instructions (SFT budget)")
    ax.set_ylabel("general exact-match accuracy (%)")
    ax.set_title(f"What the teacher is worth: KD at b against SFT at b..{max(BUDGET_MULTIPLES)}b "
                 f"({len(per_seed)} seed(s))", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


GAP_ROWS = 1000


def _read_rows(path: Path) -> list:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def teacher_gap(teacher, tokenizer, row_sets: dict) -> dict:
    """The teacher's answer NLL per token (teacher-forced) on the first GAP_ROWS rows of each set: its training
    rows, the students' rows (never seen) and held-out rows. The gap between the first and the others is what it
    memorised rather than learnt."""
    from train import eval as ev
    return {name: ev.distribution_metrics(teacher, None, ev.build_eval_set(rows[:GAP_ROWS], tokenizer))["answer_nll"]
            for name, rows in row_sets.items()}


def write_report(out: Path, size: DemoSize, seeds: list, mean: dict, std: dict, families: list, claims: list,
                 ex: dict, gap: dict, counts: dict, pipe: Pipeline, wall: float, n_turns: dict, plots: bool,
                 quick: bool) -> str:
    fam_cols = [f"family/{f}" for f in families]
    shared = counts["prompts_shared_with_pool"]
    teacher_ce = _last_ce(out / "teacher")
    data_note = (
        f"The students' instructions are a pool of {counts['pool_general']:,} general and {counts['pool_domain']:,} "
        f"domain rows disjoint from every row the teacher ({counts['general']:,} general rows) and the domain expert "
        f"({counts['domain']:,} domain rows) trained on: same families and distribution, different instances (the "
        "prompt space is split in two by a hash of the first user turn). Checked when the data is made: prompts "
        f"shared with the teacher's rows {shared['teacher']}, with the domain expert's {shared['domain_expert']}, "
        f"with the held-out rows {shared['eval']}. Budgets (nested prefixes of the pool): "
        f"{', '.join(f'{m}b = {x:,}' for m, x in zip(BUDGET_MULTIPLES, counts['budgets']))} instructions; every "
        f"student takes {size.student_steps} steps of {size.batch} sequences of {size.seq_len} tokens with the same "
        "schedule from one initialisation per seed (the MoE students from its upcycling).")
    gap_note = (f"- The teacher's generalisation gap (answer NLL per token, teacher-forced, general rows, the first "
                f"{GAP_ROWS} of each set): its training rows {gap['teacher_rows']:.3f}, the students' rows at b "
                f"{gap['student_rows']:.3f}, held-out rows {gap['held_out']:.3f}"
                + (f"; its last training-batch CE {teacher_ce:.3f}" if teacher_ce is not None else "") + ". "
                "On the students' rows its targets are predictions of the same kind as on held-out rows.")
    notes = ["Measured context for reading the claims:", "", gap_note,
             f"- DAE continues the KD student for {size.dae_steps} more steps on the same general rows "
             f"({100 * (1 - size.domain_fraction):.0f} % of the sequences) after its {size.student_steps}: part "
             "of any general-accuracy change after DAE is that extra training, not the domain alignment itself. "
             "Its domain rows come from the students' pool too (the domain expert never trained on them).",
             f"- The MoE students are the dense init upcycled to {size.moe_student_experts} experts with top-2, so "
             "both experts run on every token (twice the FFN compute of the dense student)."]
    lines = [
        f"# Demo report{' (--quick)' if quick else ''}", "",
        f"Wall time of this invocation: {wall:.0f} s on {torch.get_num_threads()} CPU thread(s) "
        f"(cached stages: {', '.join(pipe.cached) or 'none'}). Seeds: {seeds}.", "",
        "Stage times (s, when built):", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in pipe.times.items()], "",
        "## What the teacher is worth", "",
        data_note, "",
        exchange_text(ex), "",
        "Read off the seed-mean SFT curve of general accuracy against budget, made monotone (isotonic fit) and "
        "interpolated in log(budget); off the curve the value is a bound. SFT general accuracy (%) by budget: "
        + ", ".join(f"{m}b {100 * mean[n]['general']:.1f}" for m, n in zip(BUDGET_MULTIPLES, SFT_BUDGETS))
        + f"; KD @ b {100 * mean['kd']['general']:.1f}, KD + attn @ b {100 * mean['kd_attn']['general']:.1f}.", "",
        "## Results", "",
        f"Held-out: {n_turns['general']} general turns over {len(families) - 1} families and {n_turns['domain']} "
        "domain (catalogue) turns; both turns of two-turn items, turn 2 asked after the reference turn 1. "
        "Accuracy and agreement in %; win rate against the SFT student at b (correct beats wrong, ties by the "
        "teacher's mean per-token log-likelihood); KL(teacher || model) and answer NLL per token on the "
        "reference answers.", "",
        "```", results_table(mean, std, SUMMARY_COLS), "```", "",
        "Per family:", "", "```", results_table(mean, std, fam_cols), "```", "",
        "## Claims", "", claims_table(claims), "",
        *notes, "",
        "Verdicts: `held` = a gain larger than the spread; `not shown` = a gain within the spread; `did not "
        "hold` = no gain; for C2 `no harm` = not worse than the spread. With one seed the spread is only the "
        "evaluation's paired standard error; run `python train/demo.py --seeds 0,1,2` (the slow test does) for "
        "the seed spread.", "",
    ]
    if plots:
        lines += ["## Plots", "", "![accuracy against budget](exchange_rate.png)", "",
                  "![per-family accuracy](family_accuracy.png)", "", "![loss curves](loss_curves.png)", ""]
    lines += ["## Setup", "", "```", json.dumps({**asdict(size), "n_pool": size.n_pool}, indent=1), "```", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


# ------------------------------------------------------------------------------------------------------------
# The demo


def run_demo(out: Path, size: DemoSize, seeds: list, quick: bool = False) -> dict:
    from transformers import AutoTokenizer

    from model import load_hf
    from train import eval as ev
    from train.data import load_rows

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(out)
    cache = out / "cache"   # tokenised + packed data, shared by every run (keyed by content in train/data.py)
    pipe.log(f"out {out}; {'quick' if quick else 'full'} size; seeds {seeds}; torch threads "
             f"{torch.get_num_threads()}")

    data_cfg = {k: getattr(size, k) for k in ("n_train", "n_eval", "vocab_size", "data_seed", "budget",
                                              "domain_share")}
    data_dir, data_key = pipe.stage("data", data_cfg, lambda d: build_data(d, size))
    tok_dir = data_dir / "tokenizer"
    counts = json.loads((data_dir / "counts.json").read_text())
    pipe.log(f"data: {counts['general']} general rows (teacher), {counts['domain']} domain rows (domain expert); "
             f"students' pool {counts['pool_general']} general + {counts['pool_domain']} domain rows, prompts "
             f"shared with the teachers' rows: {counts['prompts_shared_with_pool']}; budgets {counts['budgets']}")

    t_cfg = {"data": data_key, "arch": asdict(size.teacher), "seq_len": size.seq_len, "seed": size.data_seed}
    tinit_dir, tinit_key = pipe.stage("teacher_init", t_cfg,
                                      lambda d: build_init(d, size.teacher, size, tok_dir, seed=10_000))
    teach_cfg = {"init": tinit_key, "steps": size.teacher_steps, "lr": size.teacher_lr, "batch": size.batch,
                 "warmup": size.warmup}
    teacher_dir, teacher_key = pipe.stage("teacher", teach_cfg, lambda d: train_run(
        d, "sft", tinit_dir / "dense", [data_dir / "general.jsonl"], tok_dir, size, size.teacher_steps,
        size.teacher_lr, seed=size.data_seed, cache_dir=cache))
    exp_cfg = {"teacher": teacher_key, "steps": size.expert_steps, "lr": size.expert_lr}
    expert_dir, expert_key = pipe.stage("domain_expert", exp_cfg, lambda d: train_run(
        d, "sft", teacher_dir / "final", [data_dir / "domain.jsonl"], tok_dir, size, size.expert_steps,
        size.expert_lr, seed=size.data_seed, cache_dir=cache))

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    es = ev.build_eval_set(list(load_rows(str(data_dir / "eval.jsonl"))), tokenizer)
    n_turns = {"general": sum(not it.domain for it in es.items), "domain": sum(it.domain for it in es.items)}
    teacher_model = load_hf(teacher_dir / "final")

    gap_file = teacher_dir / f"gap-{data_key}.json"
    if gap_file.exists():
        gap = json.loads(gap_file.read_text())
    else:
        gap = teacher_gap(teacher_model, tokenizer, {
            "teacher_rows": _read_rows(data_dir / "general.jsonl"),
            "student_rows": _read_rows(data_dir / "budget-1.jsonl"),
            "held_out": [r for r in _read_rows(data_dir / "eval.jsonl") if not r["domain"]]})
        gap_file.write_text(json.dumps(gap))
    pipe.log("teacher answer NLL: " + ", ".join(f"{k} {v:.3f}" for k, v in gap.items()))

    def evaluate(name: str, model_dir: Path, model_key: str) -> ev.ModelEval:
        f = model_dir / f"eval-{hashlib.sha256((model_key + teacher_key + data_key).encode()).hexdigest()[:12]}.json"
        if f.exists():
            return ev.ModelEval.from_json(json.loads(f.read_text()))
        t = time.perf_counter()
        res = ev.evaluate_model(load_hf(model_dir / "final"), es, tokenizer, teacher=teacher_model)
        f.write_text(json.dumps(res.to_json()))
        pipe.log(f"eval {name}: general {100 * res.metrics['general']:.1f} % domain "
                 f"{100 * res.metrics['domain']:.1f} % ({time.perf_counter() - t:.0f}s)")
        return res

    shared = {"teacher": evaluate("teacher", teacher_dir, teacher_key),
              "domain_expert": evaluate("domain_expert", expert_dir, expert_key)}

    per_seed, per_seed_correct, runs = [], [], {"teacher": teacher_dir, "domain_expert": expert_dir}
    for seed in seeds:
        sd = f"seed-{seed}"
        init_cfg = {"data": data_key, "arch": asdict(size.student), "experts": size.moe_student_experts,
                    "seq_len": size.seq_len, "seed": seed}
        init_dir, init_key = pipe.stage(f"{sd}/init", init_cfg, lambda d: build_init(
            d, size.student, size, tok_dir, seed=seed, upcycle_to=size.moe_student_experts))
        common = {"data": data_key, "steps": size.student_steps, "lr": size.student_lr, "batch": size.batch,
                  "warmup": size.warmup, "seed": seed, "k": size.kd_top_k}
        # name: (subcommand, init, budget multiple, teacher dir, attention weight)
        specs = {name: ("sft", init_dir / "dense", m, None, 0.0) for name, m in zip(SFT_BUDGETS, BUDGET_MULTIPLES)}
        specs.update({
            "kd": ("kd", init_dir / "dense", 1, teacher_dir, 0.0),
            "kd_attn": ("kd", init_dir / "dense", 1, teacher_dir, size.attn_weight),
            "sft_moe": ("sft", init_dir / "moe", 1, None, 0.0),
            "kd_moe": ("kd", init_dir / "moe", 1, teacher_dir, 0.0),
        })
        dirs, keys = {}, {}
        for name, (sub, model_path, m, tdir, attn) in specs.items():
            cfg = {**common, "init": init_key, "model": model_path.name, "sub": sub, "attn": attn, "budget": m,
                   "teacher": teacher_key if tdir else None}
            dirs[name], keys[name] = pipe.stage(f"{sd}/{name}", cfg, lambda d, sub=sub, mp=model_path, m=m, td=tdir,
                                                a=attn: train_run(
                d, sub, mp, [data_dir / f"budget-{m}.jsonl"], tok_dir, size, size.student_steps, size.student_lr,
                seed=seed, teachers={"teacher": td / "final"} if td else None, attn_weight=a, cache_dir=cache))
        dae_cfg = {"kd": keys["kd"], "teacher": teacher_key, "expert": expert_key, "steps": size.dae_steps,
                   "lr": size.dae_lr, "fraction": size.domain_fraction, "seed": seed}
        dirs["dae"], keys["dae"] = pipe.stage(f"{sd}/dae", dae_cfg, lambda d: train_run(
            d, "dae", dirs["kd"] / "final", [data_dir / "budget-1.jsonl", data_dir / "pool_domain.jsonl"],
            tok_dir, size, size.dae_steps, size.dae_lr, seed=seed,
            teachers={"reference": teacher_dir / "final", "domain": expert_dir / "final"},
            domain_fraction=size.domain_fraction, cache_dir=cache))

        evals = dict(shared)
        for name in STUDENTS + ("dae",):
            evals[name] = evaluate(f"{sd}/{name}", dirs[name], keys[name])
            runs[f"{name}@{seed}" if len(seeds) > 1 else name] = dirs[name]
        metrics = {}
        for name, res in evals.items():
            metrics[name] = dict(res.metrics)
            metrics[name]["win_rate"] = ev.with_win_rate(res, evals["sft"])
        per_seed.append(metrics)
        per_seed_correct.append({name: res.correct for name, res in evals.items()})

    mean, std = _mean_std_metrics(per_seed)
    claims = judge_claims(per_seed, per_seed_correct, [it.domain for it in es.items])
    ex = exchange_summary(per_seed, counts["budgets"])
    families = es.families
    plots = plot_exchange(per_seed, ex, out / "exchange_rate.png")
    plots = plot_families(mean, families, out / "family_accuracy.png") and plots
    plots = plot_loss_curves(runs, out / "loss_curves.png") and plots
    wall = time.perf_counter() - t_start
    print("\n" + results_table(mean, std, SUMMARY_COLS))
    print("\n" + results_table(mean, std, [f"family/{f}" for f in families]))
    print("\n" + exchange_text(ex))
    print("\n" + claims_table(claims))
    write_report(out, size, seeds, mean, std, families, claims, ex, gap, counts, pipe, wall, n_turns, plots, quick)
    summary = {"wall_s": wall, "seeds": seeds, "per_seed": per_seed, "mean": mean, "std": std, "claims": claims,
               "exchange": ex, "teacher_nll": gap, "data": counts, "stage_seconds": pipe.times,
               "cached": pipe.cached, "n_turns": n_turns, "quick": quick}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    pipe.log(f"finished in {wall:.0f}s: {out / 'report.md'}; models in {out}/*/final and {out}/seed-*/*/final")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train/main.py (demo)", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes (< 3 min): CI and a first look")
    p.add_argument("--out", type=Path, help="run directory (default runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--seeds", default="0", help="comma-separated student seeds, e.g. 0,1,2 (teacher is shared)")
    a = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("the demo runs in one process; start it with --nproc_per_node 1 (or plain python)", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        p.error(f"--seeds {a.seeds!r}: give distinct non-negative integers, e.g. 0,1,2")
    out = a.out or Path("runs/demo-quick" if a.quick else "runs/demo")
    run_demo(out, QUICK if a.quick else FULL, seeds, quick=a.quick)
    return 0


if __name__ == "__main__":
    _root = str(Path(__file__).resolve().parents[1])  # `python train/demo.py`: the repository root must import
    if _root not in sys.path:
        sys.path.insert(0, _root)
    sys.exit(main())
