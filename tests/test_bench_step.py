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


def test_peak_rss_growth_is_the_childs_own():
    """A bench child is exec'd from a parent whose own peak can be larger (the parent builds the models): the
    child's peak-RSS growth must not include it. ru_maxrss does (Linux keeps the pre-exec peak in the signal
    struct, and clear_refs does not lower it); VmHWM does not."""
    child = ("from bench._common import peak_rss, reset_peak_rss; before = reset_peak_rss(); "
             "print(peak_rss() - before)")
    parent = ("import subprocess, sys; x = bytearray(512 << 20); x[::4096] = b'\\1' * len(x[::4096]); del x; "
              f"sys.exit(subprocess.run([sys.executable, '-c', {child!r}]).returncode)")
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", parent], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.strip()) < 64 << 20, res.stdout
