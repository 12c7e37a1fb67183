"""Evaluation on held-out chats with checkable answers: the demo's stand-ins for MT-Bench and AlpacaEval.

    train/main.py eval --model DIR [--teacher DIR] [--baseline DIR] --data FILE [--tokenizer DIR] [--out FILE]

Per model, on the held-out rows (`train.data.load_rows` schema; `family` names the task family, teacher
"domain" / `domain: true` marks the domain family):
- exact-match accuracy per task family, over EVERY assistant turn of every row (both turns of a two-turn item).
  Turn k is asked after the REFERENCE answers of turns < k (teacher-forced history), so each turn is scored on
  its own and a wrong first answer does not also sink the second. Greedy decoding with the KV cache
  (model/generate.py); prediction and reference are compared after whitespace normalisation.
- domain accuracy (the domain family) and general accuracy (the unweighted mean over the general families, so a
  family with more held-out rows does not count more), before and after DAE.
- win rate against a baseline model (the SFT student in the demo), judged deterministically per turn: a correct
  answer beats a wrong one; otherwise (both right or both wrong) the answer with the higher mean per-token
  log-likelihood under the teacher (answer tokens and `</s>`) wins; equal likelihoods (e.g. identical answers)
  are a tie worth 1/2. The baseline against itself scores exactly 0.5.
- distribution metrics on the reference answers (teacher-forced, every assistant token incl. `</s>`):
  KL(teacher || student) per token over the full vocabulary, top-1 agreement with the teacher, and the student's
  answer NLL per token. All micro-averaged over answer tokens.

Dimensions: B sequences in a batch, T tokens, N answer tokens gathered from a batch, V vocabulary.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from model.generate import generate
from train.data import IGNORE
from train.errors import ModelDirError

DOMAIN_TEACHER = "domain"


@dataclass
class EvalItem:
    """One assistant turn to answer: the prompt as training renders it (history = reference answers)."""
    row: int
    turn: int
    family: str
    domain: bool
    prompt_ids: list
    answer_ids: list      # reference answer tokens as training sees them, ending with </s>
    reference: str


@dataclass
class EvalSet:
    items: list
    docs: list            # (ids, labels) per row: the teacher-forced sequences for the distribution metrics
    families: list        # general families first (sorted), then the domain families
    eos_id: int
    pad_id: int


def _answer_runs(labels: list) -> list:
    """[(start, end)) of every run of labelled positions: position i predicts token i+1, so the turn's tokens are
    ids[start+1 : end+1] and its prompt is ids[:start+1]."""
    runs, start = [], None
    for i, lab in enumerate(labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def build_eval_set(rows, tokenizer) -> EvalSet:
    """Rows (dicts with messages, teacher, family; e.g. from train.data.load_rows) -> one item per assistant turn.

    Prompts are cut out of the training tokenisation (train.data.tokenize_chat) itself, so generation sees
    exactly the token sequence the model was trained on, up to and including `[/INST]`."""
    from train.data import tokenize_chat

    items, docs = [], []
    for r, row in enumerate(rows):
        messages = row["messages"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        ids, labels = tokenize_chat(messages, tokenizer)
        runs = _answer_runs(labels)
        if len(runs) != len(answers):
            raise ValueError(f"eval row {r + 1}: {len(answers)} assistant turns but {len(runs)} answer spans after "
                             "tokenisation; fix: check the tokenizer's chat template")
        family = row.get("family") or "all"
        domain = row.get("teacher") == DOMAIN_TEACHER or bool(row.get("domain"))
        for k, ((a, b), ref) in enumerate(zip(runs, answers)):
            items.append(EvalItem(r, k, family, domain, ids[:a + 1], ids[a + 1:b + 1], ref))
        docs.append((ids, labels))
    if not items:
        raise ValueError("eval: no rows with an answer; fix: pass the held-out split")
    general = sorted({it.family for it in items if not it.domain})
    domain = sorted({it.family for it in items if it.domain} - set(general))
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return EvalSet(items, docs, general + domain, eos_id, pad_id)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def is_correct(prediction: str, reference: str) -> bool:
    return _normalise(prediction) == _normalise(reference)


def generate_answers(model, es: EvalSet, batch_size: int = 64, slack: int = 4) -> list:
    """Greedy answers (token ids, without </s>) for every item, batched by prompt length.

    Each batch may generate `slack` tokens more than its longest reference (+ </s>): an answer that has not
    ended by then cannot match any reference of the batch, so decoding further only costs time."""
    model.eval()
    order = sorted(range(len(es.items)), key=lambda i: len(es.items[i].prompt_ids))
    out = [None] * len(es.items)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        max_new = max(len(es.items[i].answer_ids) for i in chunk) + slack
        gen = generate(model, [es.items[i].prompt_ids for i in chunk], max_new, eos_id=es.eos_id, pad_id=es.pad_id)
        for i, g in zip(chunk, gen):
            out[i] = g
    return out


def _right_pad(seqs: list, pad_id: int):
    """[B, T] tensor of the sequences, right-padded with `pad_id`; right padding needs no document ids (causal
    attention)."""
    T = max(len(s) for s in seqs)
    tokens_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens_BT[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens_BT


@torch.no_grad()
def answer_loglik(model, prompts: list, answers: list, eos_id: int, pad_id: int, batch_size: int = 64) -> list:
    """Mean per-token log-likelihood under `model` of each answer followed by </s>, given its prompt."""
    model.eval()
    dev = model.output.weight.device
    out = []
    for s in range(0, len(prompts), batch_size):
        seqs = [list(p) + list(a) + [eos_id] for p, a in zip(prompts[s:s + batch_size], answers[s:s + batch_size])]
        tokens_BT = _right_pad(seqs, pad_id).to(dev)
        labels_BT = torch.full_like(tokens_BT, IGNORE)
        for b, (p, a) in enumerate(zip(prompts[s:s + batch_size], answers[s:s + batch_size])):
            n = len(p)
            labels_BT[b, n - 1:n + len(a)] = tokens_BT[b, n:n + len(a) + 1]
        mask_BT = labels_BT != IGNORE
        logp_NV = F.log_softmax(model.logits(model(tokens_BT)[mask_BT]).float(), -1)
        lp_N = logp_NV.gather(1, labels_BT[mask_BT][:, None])[:, 0]
        row_N = torch.arange(len(seqs), device=dev)[:, None].expand_as(mask_BT)[mask_BT]
        sums = torch.zeros(len(seqs), device=dev).index_add_(0, row_N, lp_N)
        out += (sums / mask_BT.sum(1)).tolist()
    return out


@torch.no_grad()
def distribution_metrics(student, teacher, es: EvalSet, batch_size: int = 32) -> dict:
    """Teacher-forced reference answers: per-token KL(teacher || student), top-1 agreement, student NLL (and the
    teacher's NLL for scale). Without a teacher only the student's NLL is computed."""
    student.eval()
    if teacher is not None:
        teacher.eval()
        if teacher.args.vocab_size != student.args.vocab_size:
            raise ValueError(f"teacher vocab {teacher.args.vocab_size} != student vocab {student.args.vocab_size}; "
                             "fix: distribution metrics need the same tokenizer")
    dev = student.output.weight.device
    kl = agree = nll = t_nll = 0.0
    n = 0
    order = sorted(range(len(es.docs)), key=lambda i: len(es.docs[i][0]))
    for s in range(0, len(order), batch_size):
        chunk = [es.docs[i] for i in order[s:s + batch_size]]
        tokens_BT = _right_pad([ids for ids, _ in chunk], es.pad_id).to(dev)
        labels_BT = _right_pad([lab for _, lab in chunk], IGNORE).to(dev)
        mask_BT = labels_BT != IGNORE
        labels_N = labels_BT[mask_BT]
        s_logp_NV = F.log_softmax(student.logits(student(tokens_BT)[mask_BT]).float(), -1)
        nll += -s_logp_NV.gather(1, labels_N[:, None]).sum().item()
        n += len(labels_N)
        if teacher is not None:
            t_logp_NV = F.log_softmax(teacher.logits(teacher(tokens_BT)[mask_BT]).float(), -1)
            kl += (t_logp_NV.exp() * (t_logp_NV - s_logp_NV)).sum().item()
            agree += (t_logp_NV.argmax(-1) == s_logp_NV.argmax(-1)).sum().item()
            t_nll += -t_logp_NV.gather(1, labels_N[:, None]).sum().item()
    out = {"answer_nll": nll / n, "answer_tokens": n}
    if teacher is not None:
        out.update(kl=kl / n, top1_agreement=agree / n, teacher_nll=t_nll / n)
    return out


def accuracy(es: EvalSet, correct: list) -> dict:
    """{"family/<name>": acc, ..., "domain": .., "general": .., "all": ..}; general = unweighted mean over the
    general families, domain = over the domain turns, all = over every turn."""
    per: dict = {}
    for it, ok in zip(es.items, correct):
        per.setdefault(it.family, []).append(float(ok))
    out = {f"family/{f}": sum(per[f]) / len(per[f]) for f in es.families}
    gen = [out[f"family/{f}"] for f in es.families if not any(it.domain for it in es.items if it.family == f)]
    dom = [float(ok) for it, ok in zip(es.items, correct) if it.domain]
    out["general"] = sum(gen) / len(gen) if gen else float("nan")
    out["domain"] = sum(dom) / len(dom) if dom else float("nan")
    out["all"] = sum(map(float, correct)) / len(correct)
    return out


def win_rate(correct_a: list, correct_b: list, ll_a: list, ll_b: list) -> float:
    """Share of turns A wins against B (module doc): correct beats wrong, else higher teacher log-likelihood;
    exact ties count 1/2."""
    score = 0.0
    for ca, cb, la, lb in zip(correct_a, correct_b, ll_a, ll_b, strict=True):
        if ca != cb:
            score += float(ca)
        else:
            score += 1.0 if la > lb else 0.5 if la == lb else 0.0
    return score / len(correct_a)


@dataclass
class ModelEval:
    """Everything one model's evaluation produces; `win_rate` against a baseline needs two of these."""
    answers: list                      # generated ids per item (no </s>)
    correct: list                      # bool per item
    metrics: dict                      # accuracy(...) + distribution_metrics(...)
    teacher_ll: list | None = None     # teacher's mean per-token log-likelihood of each answer
    texts: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"answers": self.answers, "correct": self.correct, "metrics": self.metrics,
                "teacher_ll": self.teacher_ll, "texts": self.texts}

    @classmethod
    def from_json(cls, d: dict) -> "ModelEval":
        return cls(**d)


def evaluate_model(model, es: EvalSet, tokenizer, teacher=None, batch_size: int = 64) -> ModelEval:
    answers = generate_answers(model, es, batch_size)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    correct = [is_correct(t, it.reference) for t, it in zip(texts, es.items)]
    metrics = accuracy(es, correct)
    metrics.update(distribution_metrics(model, teacher, es, batch_size=max(1, batch_size // 2)))
    teacher_ll = None
    if teacher is not None:
        teacher_ll = answer_loglik(teacher, [it.prompt_ids for it in es.items], answers, es.eos_id, es.pad_id,
                                   batch_size)
    return ModelEval(answers, correct, metrics, teacher_ll, texts)


def with_win_rate(ev: ModelEval, baseline: ModelEval) -> float:
    if ev.teacher_ll is None or baseline.teacher_ll is None:
        raise ValueError("win rate needs the teacher's log-likelihoods; fix: evaluate both models with a teacher")
    return win_rate(ev.correct, baseline.correct, ev.teacher_ll, baseline.teacher_ll)


# ----------------------------------------------------------------------------------------------------------
# CLI


def format_table(names: list, results: dict, columns: list, spread: dict | None = None) -> str:
    """A plain-text table: one row per model, one column per metric (fractions as %, others 3 decimals);
    with `spread` ({name: {column: std}}) each cell reads mean±std."""
    def num(v, key):
        return f"{v:.3f}" if key in ("kl", "answer_nll", "teacher_nll") else f"{100 * v:.1f}"

    def cell(name, key):
        v = results[name].get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        sd = (spread or {}).get(name, {}).get(key)
        return num(v, key) + (f"±{num(sd, key)}" if sd is not None else "")
    header = ["model"] + [c.removeprefix("family/") for c in columns]
    rows = [[n] + [cell(n, c) for c in columns] for n in names]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise ModelDirError(f"{path}: no tokenizer files; fix: pass --tokenizer DIR (the demo writes it to "
                         "runs/demo/data/tokenizer)")
    return AutoTokenizer.from_pretrained(str(path))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="train/main.py eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="HF directory of the model to evaluate")
    p.add_argument("--data", required=True, nargs="+", help="held-out rows (JSONL/JSON/parquet/saved dataset)")
    p.add_argument("--teacher", type=Path, help="HF directory of the teacher (KL, agreement, win-rate judge)")
    p.add_argument("--baseline", type=Path, help="HF directory of the baseline for the win rate (needs --teacher)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: --model)")
    p.add_argument("--limit", type=int, help="evaluate only the first N rows")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, help="write the metrics (and answers) as JSON here")
    a = p.parse_args(argv)
    if a.baseline is not None and a.teacher is None:
        p.error("--baseline needs --teacher (the teacher judges ties)")

    from model import load_hf
    from train.data import load_rows
    from train.errors import DataError, reraise_as
    from train.preflight import check_model_dir

    for flag, path in (("--model", a.model), ("--teacher", a.teacher), ("--baseline", a.baseline)):
        if path is not None:
            check_model_dir(str(path), flag)
    tokenizer = _load_tokenizer(a.tokenizer or a.model)
    with reraise_as(DataError):
        rows = load_rows(a.data)
        if a.limit:
            rows = rows.select(range(min(a.limit, len(rows))))
        es = build_eval_set(rows, tokenizer)

    def load(path):
        with reraise_as(ModelDirError, f"{path}: "):
            return load_hf(path)
    teacher = load(a.teacher) if a.teacher else None
    ev = evaluate_model(load(a.model), es, tokenizer, teacher, a.batch_size)
    names, results = ["model"], {"model": ev.metrics}
    if a.baseline is not None:
        base = evaluate_model(load(a.baseline), es, tokenizer, teacher, a.batch_size)
        ev.metrics["win_rate"] = with_win_rate(ev, base)
        base.metrics["win_rate"] = 0.5
        names.append("baseline")
        results["baseline"] = base.metrics
    cols = [f"family/{f}" for f in es.families] + ["general", "domain", "all"]
    cols += [c for c in ("win_rate", "kl", "top1_agreement", "answer_nll") if c in ev.metrics]
    print(f"{len(rows)} rows, {len(es.items)} turns; accuracy in %, turn 2 asked after the reference turn 1")
    print(format_table(names, results, cols))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"metrics": ev.metrics, "answers": ev.texts}, indent=1))
    return ev.metrics


if __name__ == "__main__":
    main(sys.argv[1:])
