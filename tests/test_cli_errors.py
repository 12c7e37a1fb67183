"""Bad input through the real CLI (`train.main.main(argv)` in-process, a few as subprocesses): every case exits 2
with one line on stderr that names the bad value or file, no traceback, and leaves the run directory as it was.
Faults: a damaged newest checkpoint is skipped by `--resume auto` with identical losses; a refused resume
changes no file; `--debug` shows the traceback."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import trainer_fixtures as fx  # noqa: E402

from train.main import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = fx.make_world(tmp_path_factory.mktemp("cli"), n_rows=24)
    w["tmp"] = tmp_path_factory.mktemp("cases")
    return w


def base(w, run_dir, **kw):
    o = {"model.path": w["student"], "data.paths": w["data"], "teachers.teacher.path": w["teacher"],
         "data.seq_len": 64, "data.micro_batch": 2, "data.grad_accum": 1, "teachers.k": 8, "optim.lr": 1e-3,
         "schedule.steps": 4, "schedule.warmup_steps": 1, "logging.every": 1, "logging.progress": False,
         "logging.plot": False, "run.dir": str(run_dir), "data.cache_dir": str(w["root"] / "cache"),
         "checkpoint.every": 2}
    o.update(kw)
    return [f"--{k}={v}" for k, v in o.items() if v is not None]


def tree(d: Path) -> dict:
    """Every file under d with its size and modification time (what a failed run must not change)."""
    d = Path(d)
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def cli(argv, capsys):
    """(exit code, stderr, stdout) of one in-process CLI call."""
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err, cap.out


def copy_model(w, name, src="student") -> Path:
    dst = w["tmp"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(w[src], dst)
    return dst


def edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def rows_file(w, name, lines) -> str:
    p = w["tmp"] / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(p)


GOOD = {"messages": [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"}]}


def _nan_model(w):
    d = copy_model(w, "nan")
    f = d / "model.safetensors"
    t = load_file(f)
    name = "model.layers.0.mlp.down_proj.weight"
    t[name][0, 0] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    return d, name


def _sharded(w, drop: bool):
    d = copy_model(w, "sharded" + ("-drop" if drop else ""))
    t = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(t)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, ns in parts.items():
        save_file({n: t[n] for n in ns}, d / fname, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    if drop:
        (d / "model-00002-of-00002.safetensors").unlink()
    return d


def _truncated(w):
    d = copy_model(w, "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _bin_only(w):
    d = copy_model(w, "bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    return d


def _tok_remote(w):
    d = w["tmp"] / "tok-remote"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(w["tok"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tok.MyTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _store(w, **manifest):
    d = w["tmp"] / ("store-" + "-".join(f"{k}" for k in sorted(manifest)))
    d.mkdir(exist_ok=True)
    if manifest:
        (d / "manifest.json").write_text(json.dumps({"vocab_size": w["vocab"], "k": 8, "seq_len": 64, **manifest}))
    return d


def _file(w, name):
    p = w["tmp"] / name
    p.write_text("x")
    return p


def _vocab_model(w, vocab, name):
    """A tiny model with one of the Mistral family's vocabulary sizes (2 MB of embeddings at dim 8)."""
    out = w["tmp"] / f"vocab-{name}"
    return out if out.exists() else fx.make_model(out, vocab, w["tok"], seed=6, dim=8, hidden=8, heads=2, kv_heads=1)


def _other_vocab(w):
    return fx.make_model(w["tmp"] / "other-vocab", w["vocab"] + 7, seed=5)


def _long_rows(w):
    long_prompt = " ".join(["word"] * 200)
    return rows_file(w, "long.jsonl", [{"messages": [{"role": "user", "content": long_prompt},
                                                     {"role": "assistant", "content": "ok"}]}] * 3)


# (id, argv builder (world, run_dir) -> argv, text the one line must contain)
CASES = [
    ("unknown-key", lambda w, r: ["kd", *base(w, r), "--optim.nope=1"], "unknown key optim.nope"),
    ("wrong-type", lambda w, r: ["kd", *base(w, r), "--optim.lr=fast"], "optim.lr"),
    ("config-missing", lambda w, r: ["kd", "--config", str(w["tmp"] / "none.toml")], "none.toml"),
    ("config-bad-toml", lambda w, r: ["kd", "--config", rows_file(w, "bad.toml", ["[optim", "lr = 1"])],
     "bad.toml"),
    ("unknown-subcommand", lambda w, r: ["distil", *base(w, r)], "unknown subcommand 'distil'"),
    ("resume-no-value", lambda w, r: ["kd", "--resume"], "--resume needs a value"),
    ("kd-weight-range", lambda w, r: ["kd", *base(w, r, **{"loss.kd_weight": 1.5})], "kd_weight"),
    ("model-dir-missing", lambda w, r: ["kd", *base(w, r, **{"model.path": str(w["tmp"] / "nope")})],
     "no such directory"),
    ("model-no-config", lambda w, r: ["kd", *base(w, r, **{"model.path": str(
        (lambda d: ((d / "config.json").unlink(), d)[1])(copy_model(w, "nocfg")))})], "has no config.json"),
    ("config-bad-json", lambda w, r: ["kd", *base(w, r, **{"model.path": str(
        (lambda d: ((d / "config.json").write_text("{oops"), d)[1])(copy_model(w, "badjson")))})],
     "not valid JSON"),
    ("config-missing-key", lambda w, r: ["kd", *base(w, r, **{"model.path": str(
        edit_config(copy_model(w, "nokey"), hidden_size=None))})], "missing key 'hidden_size'"),
    ("model-type", lambda w, r: ["kd", *base(w, r, **{"model.path": str(
        edit_config(copy_model(w, "llama"), model_type="llama"))})], "model_type='llama'"),
    ("remote-code-config", lambda w, r: ["kd", *base(w, r, **{"model.path": str(
        edit_config(copy_model(w, "remote"), auto_map={"AutoModel": "m.M"}))})], "auto_map"),
    ("tied-embeddings", lambda w, r: ["kd", *base(w, r, **{"model.path": str(
        edit_config(copy_model(w, "tied"), tie_word_embeddings=True))})], "tie_word_embeddings"),
    ("bin-weights", lambda w, r: ["kd", *base(w, r, **{"model.path": str(_bin_only(w))})], "pytorch_model.bin"),
    ("missing-shard", lambda w, r: ["kd", *base(w, r, **{"model.path": str(_sharded(w, drop=True))})],
     "model-00002-of-00002.safetensors"),
    ("truncated-safetensors", lambda w, r: ["kd", *base(w, r, **{"model.path": str(_truncated(w))})],
     "model.safetensors: not a readable safetensors file"),
    ("wrong-shape", lambda w, r: ["kd", *base(w, r, **{"model.path": str(
        edit_config(copy_model(w, "shape"), intermediate_size=40))})], "config.json implies"),
    ("nan-weight", lambda w, r: ["kd", *base(w, r, **{"model.path": str(_nan_model(w)[0])})],
     "model.layers.0.mlp.down_proj.weight holds NaN"),
    ("tokenizer-remote-code", lambda w, r: ["kd", *base(w, r, **{"data.tokenizer": str(_tok_remote(w))})],
     "auto_map"),
    ("no-tokenizer", lambda w, r: ["kd", *base(w, r, **{"data.tokenizer": str(w["tmp"])})], "holds no tokenizer"),
    ("teacher-vocab", lambda w, r: ["kd", *base(w, r, **{"teachers.teacher.path": str(_other_vocab(w))})],
     "vocab_size"),
    ("mistral-v0.1-student-v0.3-teacher", lambda w, r: ["kd", *base(w, r, **{
        "model.path": str(_vocab_model(w, 32000, "v01")), "teachers.teacher.path": str(_vocab_model(w, 32768, "v03"))})],
     "32,768-token teacher pairs with a student of Mistral-7B(-Instruct)-v0.3"),
    ("teacher-missing", lambda w, r: ["kd", *base(w, r, **{"teachers.teacher.path": str(w["tmp"] / "t-nope")})],
     "teachers.teacher.path"),
    ("k-over-vocab", lambda w, r: ["kd", *base(w, r, **{"teachers.k": 100000})], "teachers.k=100000"),
    ("data-missing", lambda w, r: ["kd", *base(w, r, **{"data.paths": str(w["tmp"] / "rows-nope.jsonl")})],
     "rows-nope.jsonl"),
    ("data-extension", lambda w, r: ["kd", *base(w, r, **{"data.paths": str(_file(w, "rows.txt"))})],
     "unknown file type"),
    ("data-bad-line", lambda w, r: ["kd", *base(w, r, **{"data.paths": rows_file(
        w, "badline.jsonl", [GOOD, GOOD, '{"messages": [oops', GOOD])})], "badline.jsonl: line 3"),
    ("data-empty", lambda w, r: ["kd", *base(w, r, **{"data.paths": rows_file(w, "empty.jsonl", [])})],
     "empty.jsonl: no rows"),
    ("data-not-object", lambda w, r: ["kd", *base(w, r, **{"data.paths": rows_file(
        w, "list.jsonl", [GOOD, [1, 2]])})], "line 2 is a JSON list"),
    ("data-unknown-role", lambda w, r: ["kd", *base(w, r, **{"data.paths": rows_file(w, "role.jsonl", [
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}])})],
     "unknown role 'robot'"),
    ("data-not-alternating", lambda w, r: ["kd", *base(w, r, **{"data.paths": rows_file(w, "alt.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]}])})], "alternate"),
    ("data-no-assistant", lambda w, r: ["kd", *base(w, r, **{"data.paths": rows_file(w, "noans.jsonl", [
        {"messages": [{"role": "user", "content": "a"}]}])})], "no assistant turn"),
    ("data-all-too-long", lambda w, r: ["kd", *base(w, r, **{"data.paths": _long_rows(w), "data.seq_len": 16})],
     "raise data.seq_len"),
    ("packed-not-packed", lambda w, r: ["kd", *base(w, r, **{"data.paths": None, "data.packed": str(w["tmp"])})],
     "data.packed"),
    ("run-dir-is-file", lambda w, r: ["kd", *base(w, r, **{"run.dir": str(_file(w, "runfile"))})], "is a file"),
    ("run-dir-unwritable", lambda w, r: ["kd", *base(w, r, **{"run.dir": str(_file(w, "parentfile") / "run")})],
     "not writable"),
    ("store-no-manifest", lambda w, r: ["kd", *base(w, r, **{"teachers.teacher.path": None,
                                                             "teachers.teacher.store": str(_store(w))})],
     "not a complete store"),
    ("store-other-k", lambda w, r: ["kd", *base(w, r, **{"teachers.teacher.path": None,
                                                         "teachers.teacher.store": str(_store(w, k=16))})],
     "k is 16"),
    ("store-other-seq-len", lambda w, r: ["kd", *base(w, r, **{"teachers.teacher.path": None,
                                                               "teachers.teacher.store": str(_store(w, seq_len=32))})],
     "seq_len is 32"),
    ("store-other-tokenizer", lambda w, r: ["kd", *base(w, r, **{
        "teachers.teacher.path": None, "teachers.teacher.store": str(_store(w, tokenizer_sha256="0" * 64))})],
     "another tokenizer"),
    ("resume-not-checkpoint", lambda w, r: ["kd", *base(w, r), "--resume", str(w["tmp"])], "checkpoint.resume="),
    ("resume-incomplete", lambda w, r: ["kd", *base(w, r), "--resume", str(r / "step-3")],
     "not a complete checkpoint"),
    ("export-missing", lambda w, r: ["export", f"--export.checkpoint={w['tmp'] / 'no-run'}"], "not found"),
    ("export-no-checkpoint", lambda w, r: ["export", f"--export.checkpoint={w['tmp']}"], "neither"),
    ("eval-missing-model", lambda w, r: ["eval", "--model", str(w["tmp"] / "m-nope"), "--data", w["data"]],
     "--model"),
    ("eval-missing-data", lambda w, r: ["eval", "--model", w["student"], "--data", str(w["tmp"] / "d.jsonl"),
                                        "--tokenizer", w["tok"]], "d.jsonl"),
    ("upcycle-missing-model", lambda w, r: ["upcycle", f"--model.path={w['tmp'] / 'u-nope'}",
                                            f"--upcycle.out={w['tmp'] / 'u-out'}"], "no such directory"),
]


@pytest.mark.parametrize("make_argv, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_named_line(world, tmp_path, capsys, make_argv, expect):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("a user's file")
    argv = make_argv(world, run_dir)
    before = tree(run_dir)
    rc, err, _ = cli(argv, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith(("error:", "config error:"))]
    assert rc == 2, err
    # one error line, the last thing printed (progress bars of the data stage may precede it on stderr)
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert expect in errors[0], errors[0]
    assert "Traceback" not in err
    assert tree(run_dir) == before  # nothing new or changed in the run directory


def test_at_least_forty_kinds():
    assert len({c[0] for c in CASES}) >= 40


def test_debug_shows_the_traceback(world, tmp_path, capsys):
    argv = ["kd", *base(world, tmp_path / "run", **{"model.path": str(world["tmp"] / "nope")})]
    with pytest.raises(ValueError, match="no such directory"):
        main(argv + ["--debug"])


@pytest.mark.parametrize("argv_tail, expect", [
    (["kd", "--optim.nope=1"], "unknown key optim.nope"),
    (["kd", "--model.path=/nonexistent/model", "--data.paths=x.jsonl", "--teachers.teacher.path=/nonexistent/t"],
     "no such directory"),
    (["export", "--export.checkpoint=/nonexistent/run"], "not found"),
])
def test_subprocess_exit_code_and_stderr(tmp_path, argv_tail, expect):
    proc = subprocess.run([sys.executable, "train/main.py", *argv_tail], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------------------
# Faults around checkpoints


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_damaged_checkpoint_falls_back_and_refused_resume_changes_nothing(world, tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["kd", *base(world, ref, **{"schedule.steps": 6})]) == 0
    assert main(["kd", *base(world, run, **{"schedule.steps": 6})]) == 0
    capsys.readouterr()
    # The newest checkpoint (step-6) loses a shard: --resume auto names it and resumes from step-4.
    shard = next((run / "step-6").glob("*.distcp"))
    shard.unlink()
    for p in list(run.glob("step-*")):
        if p.name not in ("step-4", "step-6"):
            shutil.rmtree(p)
    rc, err, out = cli(["kd", *base(world, run, **{"schedule.steps": 6}), "--resume", "auto"], capsys)
    assert rc == 0
    out += err
    assert "step-6 is damaged" in out and shard.name in out
    assert _losses(run) == _losses(ref)  # steps 5-6 re-run from step-4: bitwise the uninterrupted run's losses
    # export of a damaged checkpoint: a named error, not a traceback
    shutil.rmtree(run / "step-6")
    shutil.copytree(run / "step-4", run / "step-8")
    next((run / "step-8").glob("*.distcp")).unlink()
    rc, err, _ = cli(["export", f"--export.checkpoint={run / 'step-8'}", f"--model.path={world['student']}"], capsys)
    assert rc == 2 and "damaged" in err and "Traceback" not in err
    shutil.rmtree(run / "step-8")
    # a resume refused for a global-batch mismatch leaves config.json / config.toml as they were
    before = tree(run)
    rc, err, _ = cli(["kd", *base(world, run, **{"schedule.steps": 8, "data.micro_batch": 4}), "--resume", "auto"],
                  capsys)
    assert rc == 2 and "global batch" in err
    assert tree(run) == before


def test_export_never_writes_nan(world, tmp_path):
    from model import load_hf, save_hf
    m = load_hf(world["student"])
    with torch.no_grad():
        m.layers[0].attention.wq.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj.weight holds NaN or Inf"):
        save_hf(m, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
