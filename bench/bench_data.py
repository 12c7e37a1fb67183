"""Data preparation at scale: `prepare` (train/data/prepare.py) against today's path (`prepare_packed`: datasets.map
tokenisation + whole-corpus numpy packing), on a synthetic chat corpus made here, each measurement in a fresh child
process.

Corpus: chat rows of realistic length mixes, pseudo-words drawn Zipf-like from a 20k-word lexicon with punctuation,
digits and newlines; `long` mix: 1-4 turns (55/25/12/8 %), 20 % with a system prompt, user turns lognormal (median
40 words), answers lognormal (median 150 words, a tail beyond seq_len); `short` mix: one turn, median 12 + 30 words
(many short documents: separates the per-document slope from the per-token one). Tokenizer: the demo's byte-level
BPE (`train.demo.corpus.train_tokenizer`, vocabulary 8000) trained on a sample; tokens/s depend on it (Mistral's
sentencepiece-style tokenizer is not available offline).

Reported per run: wall seconds and tokens/s (tokens = packed tokens, i.e. after truncation), and memory:
    hwm      growth of the main process's peak RSS (VmHWM, after resetting the mark through /proc/self/clear_refs)
             over its RSS after imports; VmHWM counts resident file-backed pages too (memory maps of the rows' arrow
             files and of the arrays), which the kernel can drop
    anon     growth of the main process's anonymous RSS (RssAnon, sampled every 20 ms): the memory a run really needs
    workers  peak RSS of the largest worker process (RUSAGE_CHILDREN; the old path's datasets.map workers included)
Slopes: least squares of the new path's growth (1 process) on tokens and documents over every size and both mixes:
growth = a + b * tokens + c * docs. Every child sets TOKENIZERS_PARALLELISM=false, so N processes use N cores.

Usage: .venv/bin/python bench/bench_data.py [--sizes 2e6,5e6,1e7,2e7,5e7] [--short-sizes 5e6,1e7]
                                            [--old-sizes 2e6,1e7,5e7] [--procs 1,2] [--seq-len 2048] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import reset_peak_rss  # noqa: E402

MIXES = {
    # turns weights, p(system), user median words, answer median words, sigma
    "long": ((0.55, 0.25, 0.12, 0.08), 0.2, 40, 150, 1.0),
    "short": ((1.0,), 0.0, 12, 30, 0.6),
}


# ------------------------------------------------------------------------------------------------------ corpus


def _lexicon(rng, n=20000):
    syll = np.array(["ka", "to", "ri", "men", "sa", "lo", "ve", "dan", "pi", "ur", "el", "mo", "ta", "ni", "gre", "sh",
                     "qu", "ex", "ion", "ar", "be", "co", "di", "fa", "lu", "ne", "po", "st", "th", "wo"])
    words = {"".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(n * 2)}
    words = np.array(sorted(words))[:n]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    return words, np.cumsum(p / p.sum())


def _text(rng, words, cdf, median, sigma, cap=4000):
    n = int(min(cap, max(1, rng.lognormal(np.log(median), sigma))))
    w = words[np.minimum(np.searchsorted(cdf, rng.random(n)), len(words) - 1)].tolist()
    for k in rng.choice(n, size=max(1, n // 12)).tolist():  # punctuation, digits, line breaks
        w[k] += rng.choice([".", ",", "?", "\n", ":", " 42", " 3.14", "!"])
    return " ".join(w)


def make_corpus(path: Path, mix: str, n_rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words, cdf = _lexicon(np.random.default_rng(1234))
    weights, p_system, user_med, answer_med, sigma = MIXES[mix]
    with open(path, "w") as f:
        for _ in range(n_rows):
            messages = []
            if rng.random() < p_system:
                messages.append({"role": "system", "content": _text(rng, words, cdf, 20, 0.5)})
            for _ in range(int(rng.choice(len(weights), p=weights)) + 1):
                messages.append({"role": "user", "content": _text(rng, words, cdf, user_med, sigma)})
                messages.append({"role": "assistant", "content": _text(rng, words, cdf, answer_med, sigma)})
            f.write(json.dumps({"messages": messages}) + "\n")


# ------------------------------------------------------------------------------------------------------ child


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def child(args) -> None:
    """One measured run in this fresh process; prints one JSON line."""
    import datasets  # noqa: F401  (imports before the baseline: both paths need them)
    import transformers  # noqa: F401

    from train import data as D
    from train.data import prepare as P
    datasets.disable_progress_bars()
    base_rss, base_anon = reset_peak_rss(), _status("RssAnon")
    peak_anon = [base_anon]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    if args.child == "new":
        out = P.prepare(args.rows, args.tok, args.seq_len, None, None, args.cache, processes=args.procs,
                        log=lambda *a: None)
        stats = json.loads((Path(out) / "meta.json").read_text())["stats"]
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.tok)
        packed = D.prepare_packed(args.rows, tok, args.seq_len, None, cache_dir=args.cache, num_proc=args.procs)
        stats = packed.stats
    seconds = time.perf_counter() - t0
    done.set()
    peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
    print(json.dumps({"path": args.child, "procs": args.procs, "tokens": stats["tokens"], "docs": stats["docs"],
                      "seconds": seconds, "hwm_growth": _status("VmHWM") - base_rss,
                      "anon_growth": peak_anon[0] - base_anon,
                      "worker_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))


def measure(path: str, rows: Path, tok: Path, procs: int, seq_len: int, cache: Path) -> dict:
    import shutil
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(cache)}
    res = subprocess.run([sys.executable, __file__, "--child", path, "--rows", str(rows), "--tok", str(tok),
                          "--procs", str(procs), "--seq-len", str(seq_len), "--cache", str(cache)],
                         capture_output=True, text=True, env=env)
    shutil.rmtree(cache, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"child {path} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2e6,5e6,1e7,2e7,5e7", help="target tokens of the `long` corpora")
    ap.add_argument("--short-sizes", default="5e6,1e7", help="target tokens of the `short` corpora")
    ap.add_argument("--old-sizes", default="2e6,1e7,5e7", help="sizes (of --sizes) also run on today's path")
    ap.add_argument("--procs", default="1,2", help="process counts of the largest size (others: 1)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_data"))
    ap.add_argument("--out", type=Path, help="JSON results file (default: WORK/results.json)")
    ap.add_argument("--child", choices=("new", "old"))
    ap.add_argument("--rows"), ap.add_argument("--tok"), ap.add_argument("--cache")
    args, _ = ap.parse_known_args()
    if args.child:
        args.procs = int(args.procs)
        return child(args)

    from train.demo import corpus as DD
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tok"
    if not (tok / "tokenizer.json").exists():
        make_corpus(work / "sample.jsonl", "long", 3000, seed=99)
        DD.train_tokenizer([work / "sample.jsonl"], tok, vocab_size=8000)
    # tokens per row of each mix, from a small calibration corpus, to size the corpora
    per_row = {}
    for mix in MIXES:
        calib = work / f"calib-{mix}.jsonl"
        if not calib.exists():
            make_corpus(calib, mix, 2000, seed=7)
        r = measure("new", calib, tok, 1, args.seq_len, work / "cache")
        per_row[mix] = r["tokens"] / 2000
    print(f"tokens per row: {per_row}", flush=True)

    runs = []
    plan = sorted([("long", float(s)) for s in args.sizes.split(",") if s] +
                  [("short", float(s)) for s in args.short_sizes.split(",") if s], key=lambda m: m[1])
    largest = max(float(s) for s in args.sizes.split(","))
    old_sizes = {float(s) for s in args.old_sizes.split(",") if s}
    for mix in MIXES:  # one corpus per mix at its largest size; smaller ones are its first rows
        sizes = [t for m, t in plan if m == mix]
        full = work / f"{mix}-full.jsonl"
        if sizes and not full.exists():
            t0 = time.perf_counter()
            make_corpus(full, mix, int(max(sizes) / per_row[mix]), seed=11)
            print(f"made {full.name}: {full.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
    for mix, target in plan:
        n_rows = int(target / per_row[mix])
        rows = work / f"{mix}-{int(target)}.jsonl"
        if not rows.exists():
            with open(work / f"{mix}-full.jsonl") as src, open(rows, "w") as dst:
                for _, line in zip(range(n_rows), src):
                    dst.write(line)
        procs = [int(p) for p in args.procs.split(",")] if (mix == "long" and target == largest) else [1]
        paths = [("new", p) for p in procs] + ([("old", p) for p in procs] if mix == "long" and target in old_sizes
                                              else [])
        for path, p in paths:
            r = measure(path, rows, tok, p, args.seq_len, work / "cache")
            r.update(mix=mix, rows_bytes=rows.stat().st_size)
            runs.append(r)
            print(f"{mix:5s} {path:3s} procs={p} tokens={r['tokens']:>11,} docs={r['docs']:>9,} "
                  f"{r['seconds']:8.1f} s {r['tokens'] / r['seconds']:>9,.0f} tok/s  hwm +{r['hwm_growth'] / 2**20:8.1f} MiB"
                  f"  anon +{r['anon_growth'] / 2**20:8.1f} MiB  worker peak {r['worker_peak'] / 2**20:7.1f} MiB",
                  flush=True)
            (args.out or work / "results.json").write_text(json.dumps(runs, indent=1))

    # slopes of the new path (1 process): growth = a + b tokens + c docs
    for field in ("hwm_growth", "anon_growth"):
        for path in ("new", "old"):
            sel = [r for r in runs if r["path"] == path and r["procs"] == 1]
            if len({(r["tokens"], r["docs"]) for r in sel}) < 3:
                continue
            X = np.array([[1.0, r["tokens"], r["docs"]] for r in sel])
            y = np.array([r[field] for r in sel], dtype=np.float64)
            (a, b, c), *_ = np.linalg.lstsq(X, y, rcond=None)
            resid = y - X @ np.array([a, b, c])
            at_1b = a + b * 1e9 + c * 1e9 / np.mean([r["tokens"] / r["docs"] for r in sel if r["mix"] == "long"])
            print(f"{path} {field}: {a / 2**20:.1f} MiB + {b:.3f} B/token + {c:.2f} B/doc (max residual "
                  f"{np.abs(resid).max() / 2**20:.1f} MiB) -> {at_1b / 2**30:.2f} GiB at 1 B tokens of the long mix")


if __name__ == "__main__":
    main()
