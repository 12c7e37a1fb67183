"""The demo's sizes and steps: every setting, fixed before any 3-seed run, with the reason for it."""
from __future__ import annotations

from dataclasses import dataclass, replace

STAGE_VERSION = "demo-v2"  # bump when a stage's semantics change: invalidates every cached stage

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
# - The students' instructions come from a pool disjoint from the teachers' rows (corpus.generate_corpus
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
