"""bench/bench_step.py end to end on the CPU at the smallest scale: both variants run in their own processes, the
table has one row each plus a finite ratio row, and both sides see the same model and batch (equal first-step CE).
Timings are never asserted."""
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_bench_step_cpu_table():
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_step.py"), "--scale", "tiny",
                          "--batch", "1", "--seq-len", "64", "--warmup", "0", "--steps", "1"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    header = next(_cells(x) for x in lines if x.startswith("| variant"))
    rows = {_cells(x)[0]: dict(zip(header, _cells(x))) for x in lines if x.startswith("| ") and x != lines[0]}
    ours = next(r for k, r in rows.items() if k.startswith("ours"))
    hf = next(r for k, r in rows.items() if k.startswith("HF"))
    ratio = rows["ratio ours / HF"]
    mem_col = next(h for h in header if "peak" in h)
    for r in (ours, hf):
        assert r["B×T"] == "1×64" and r["V"] == "32000", r
        assert float(r["tok/s"]) > 0 and float(r["ms/step"]) > 0, r
        assert math.isfinite(float(r[mem_col])), r
    assert ours["K"] == "64" and hf["K"] == "V"
    for col in ("ms/step", "tok/s", mem_col):
        assert ratio[col].endswith("x") and math.isfinite(float(ratio[col][:-1])) and float(ratio[col][:-1]) > 0, ratio
    # Same weights and batch on both sides: the first step's CE agrees to float rounding.
    assert abs(float(ours["CE step 1"]) - float(hf["CE step 1"])) < 1e-3, (ours, hf)
    assert "GPU figures missing" in res.stdout
