"""The demo's stages (each cached under --out, keyed on its configuration), `run_demo` and the CLI."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from train.demo.report import (
    SUMMARY_COLS,
    claims_table,
    exchange_summary,
    exchange_text,
    judge_claims,
    mean_std_metrics,
    plot_exchange,
    plot_families,
    plot_loss_curves,
    read_rows,
    results_table,
    teacher_gap,
    write_report,
)
from train.demo.settings import (
    BUDGET_MULTIPLES,
    FULL,
    QUICK,
    SFT_BUDGETS,
    STAGE_VERSION,
    STUDENTS,
    Arch,
    DemoSize,
)

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
        key = hashlib.sha256(json.dumps({"v": STAGE_VERSION, **config}, sort_keys=True, default=str).encode()
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
    from train.demo.corpus import (
        first_user,
        generate_corpus,
        shared_prompts,
        train_tokenizer,
        write_jsonl,
    )
    paths = generate_corpus(size.data_seed, d, size.n_train, size.n_eval, domain_share=size.domain_share,
                            n_pool=size.n_pool)
    train_tokenizer([paths["train"]], d / "tokenizer", vocab_size=size.vocab_size, seed=size.data_seed)

    rows, pool, evals = read_rows(paths["train"]), read_rows(paths["pool"]), read_rows(paths["eval"])
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
            "teacher_rows": read_rows(data_dir / "general.jsonl"),
            "student_rows": read_rows(data_dir / "budget-1.jsonl"),
            "held_out": [r for r in read_rows(data_dir / "eval.jsonl") if not r["domain"]]})
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

    mean, std = mean_std_metrics(per_seed)
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
