"""The demo's verdicts: claims C1-C4 against a spread, the exchange rate, tables, plots and report.md."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from train.demo.settings import (
    BUDGET_MULTIPLES,
    LABELS,
    MODELS,
    SFT_BUDGETS,
    STUDENTS,
    DemoSize,
)

if TYPE_CHECKING:
    from train.demo.pipeline import Pipeline




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


def mean_std_metrics(per_seed: list) -> tuple[dict, dict]:
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
    return _save(plt, fig, path)


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
    return _save(plt, fig, path)


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
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


GAP_ROWS = 1000


def read_rows(path: Path) -> list:
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
