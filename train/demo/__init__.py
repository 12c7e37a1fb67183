"""The embedded demo: the paper's whole pipeline, and its claims, in miniature, on 2 CPU cores.

    python train/main.py                      # (no arguments) the full demo into runs/demo
    python train/main.py --quick              # reduced, < 3 min: for CI and a first look (runs/demo-quick)
    python train/main.py --seeds 0,1,2        # students, DAE and evaluation repeated per seed: mean +- std

Stages (each prints progress, each is cached in its own directory under --out, keyed on its configuration and
on the keys of the stages it reads, so a second run reuses the teacher and whatever else did not change):
  data          a synthetic instruction corpus with checkable answers (9 general task families + a product
                catalogue domain family), a byte-level BPE tokenizer trained on it (train/demo/corpus.py), and the
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
# Rooms: settings.py (sizes, steps, the fixed settings and why), corpus.py (data and tokenizer), pipeline.py
# (the stage cache, the stages, run_demo, main), report.py (claims, exchange rate, tables, plots, report.md).
from train.demo.pipeline import Pipeline, main, run_demo
from train.demo.report import (
                               Exchange,
                               claims_table,
                               exchange_rate,
                               exchange_summary,
                               exchange_text,
                               isotonic,
                               judge_claims,
)
from train.demo.settings import (
                               BUDGET_MULTIPLES,
                               FULL,
                               LABELS,
                               MODELS,
                               QUICK,
                               SFT_BUDGETS,
                               STUDENTS,
                               Arch,
                               DemoSize,
)

__all__ = ["main", "run_demo", "Pipeline", "judge_claims", "claims_table", "isotonic", "Exchange", "exchange_rate",
           "exchange_summary", "exchange_text", "FULL", "QUICK", "MODELS", "STUDENTS", "SFT_BUDGETS",
           "BUDGET_MULTIPLES", "LABELS", "Arch", "DemoSize"]
