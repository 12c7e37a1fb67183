"""The trainer end to end on CPU: tiny models, a tiny tokenizer, gloo. Multi-process runs go through torchrun.

Default run: one fast path of each behaviour (about two minutes on 2 cores); `-m slow` adds FSDP, crash
mid-save, resharded resume, activation checkpointing, the store round trip through torchrun.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import trainer_fixtures as fx  # noqa: E402

from model import capture_qk, load_hf  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train import loop as L  # noqa: E402
from train.loss import attention_kl_sum  # noqa: E402
from train.config import ConfigError, make_config  # noqa: E402
from train.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.make_world(tmp_path_factory.mktemp("world"))


def base_overrides(w, run_dir, steps=4, **kw):
    o = {"model.path": w["student"], "data.paths": w["data"], "teachers.teacher.path": w["teacher"],
         "data.seq_len": 64, "data.micro_batch": 2, "data.grad_accum": 1, "teachers.k": 8,
         "optim.lr": 1e-3, "schedule.steps": steps, "schedule.warmup_steps": 1, "logging.every": 1,
         "logging.progress": False, "logging.plot": False, "run.dir": str(run_dir),
         "data.cache_dir": str(w["root"] / "cache")}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items() if v is not None]


def cfg_for(w, run_dir, sub="kd", **kw):
    return make_config(sub, None, base_overrides(w, run_dir, **kw))


def losses(run_dir) -> list[float]:
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    return [r["loss"] for r in recs]


def write_toml(path: Path, overrides: list[str]) -> Path:
    """A run.toml from overrides (sections and keys as given), for the subprocess runs."""
    tables: dict = {}
    for o in overrides:
        key, value = o.split("=", 1)
        parts = key.split(".")
        tables.setdefault(".".join(parts[:-1]), {})[parts[-1]] = value
    lines = []
    for table, kv in tables.items():
        lines.append(f"[{table}]")
        for k, v in kv.items():
            if v in ("True", "False"):
                v = v.lower()
            elif k == "paths":
                v = json.dumps([v])
            else:
                try:
                    float(v)
                except ValueError:
                    v = json.dumps(v)
            lines.append(f"{k} = {v}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_script(tmp_path, body: str, args: list[str], expect_rc=0, env_extra=None):
    """Run `body` (python, with `cfg` argv handling) in a fresh interpreter; returns the completed process."""
    script = tmp_path / "driver.py"
    script.write_text(f"import os, signal, sys\nsys.path.insert(0, {str(REPO)!r})\n" + body)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------------------
# One step's gradients against a naive reference (full logits, full KL)


class _GradRecorder(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def test_step_grads_equal_naive_reference(world, tmp_path):
    """train_step (2 micro-batches, fused chunked top-k loss with K = V, i.e. the full KL) == autograd on full
    logits and the full-vocabulary KL, normalised by the step's loss tokens; lambda = 0.7, tau = 2."""
    V = world["vocab"]
    cfg = cfg_for(world, tmp_path / "run", **{"teachers.k": V, "data.grad_accum": 2, "loss.kd_weight": 0.7,
                                              "loss.tau": 2.0})
    env = L.parallel.init_distributed("cpu")
    out = L.Output(tmp_path, False, 1, False, 1, 0)
    packed, sampler = L.build_data(cfg, tmp_path, env, out)
    teachers = L.build_teachers(cfg, packed, env)
    student = load_hf(world["student"])
    module = L.StudentWithLoss(student, L.LossSettings(0.7, 2.0, 0.0, 0.0))
    opt = _GradRecorder(list(module.parameters()))
    ctx = L.StepContext(module, opt, teachers, None, env, grad_clip=0.0, aux_scale=0.5, k=V)
    idx = sampler.next_indices()
    micro = [packed.batch(c) for c in np.array_split(idx, 2)]
    s = L.train_step(ctx, micro, lr=1e-3)

    ref = load_hf(world["student"])
    teacher = load_hf(world["teacher"])
    n = sum(int((mb.labels_BT != -100).sum()) for mb in micro)
    total = 0.0
    for mb in micro:
        zs = ref.logits(ref(mb.tokens_BT, mb.positions_BT, mb.doc_ids_BT))
        with torch.no_grad():
            zt = teacher.logits(teacher(mb.tokens_BT, mb.positions_BT, mb.doc_ids_BT))
        m = mb.labels_BT != -100
        ce = torch.nn.functional.cross_entropy(zs[m], mb.labels_BT[m], reduction="sum")
        pt = (zt[m] / 2.0).log_softmax(-1)
        kl = (pt.exp() * (pt - (zs[m] / 2.0).log_softmax(-1))).sum() * 4.0
        total = total + (0.3 * ce + 0.7 * kl) / n
    total.backward()
    assert math.isclose(s["loss"], total.item(), rel_tol=1e-5)
    worst = max(((g - p.grad).norm() / p.grad.norm()).item() for g, p in zip(opt.grads, ref.parameters()))
    print(f"naive step: loss rel err {abs(s['loss'] - total.item()) / total.item():.2e}, worst grad rel err {worst:.2e}")
    assert worst < 1e-4, worst


# ------------------------------------------------------------------------------------------------------------
# Global normalisation: 2 ranks x grad_accum 1 == 1 rank x grad_accum 2


def test_two_ranks_equal_grad_accum(world, tmp_path):
    one = L.run(cfg_for(world, tmp_path / "one", steps=3, **{"data.grad_accum": 2}))
    toml = write_toml(tmp_path / "two.toml", base_overrides(world, tmp_path / "two", steps=3))
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "train/main.py", "kd", "--config",
                           str(toml), "--parallel.strategy=ddp"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = losses(one), losses(tmp_path / "two")
    assert len(a) == 3 and np.allclose(a, b, rtol=2e-6, atol=0), (a, b)
    wa, wb = load_hf(one / "final"), load_hf(tmp_path / "two" / "final")
    for (name, p), q in zip(wa.named_parameters(), wb.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: SIGKILL between checkpoints, resume == uninterrupted; SIGTERM saves and exits 0

KILL_AT_STEP = """
import train.loop as L
from train.config import make_config
kill_at, sig = int(os.environ["KILL_AT"]), getattr(signal, os.environ["SIG"])
orig, calls = L.train_step, [0]
def train_step(*a, **k):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), sig)
    return orig(*a, **k)
L.train_step = train_step
L.run(make_config("kd", sys.argv[1], sys.argv[2:]))
"""


SLOW_WRITE = """
from torch.distributed.checkpoint import FileSystemWriter
orig_write = FileSystemWriter.write_data
def write_data(self, *a, **k):  # the step-4 checkpoint's shards never finish: its async save is in flight
    if str(self.path).endswith(".tmp-step-4"):
        import time; time.sleep(600)
    return orig_write(self, *a, **k)
FileSystemWriter.write_data = write_data
"""


def test_sigkill_then_resume_equals_uninterrupted(world, tmp_path):
    """SIGKILL at the start of step 5, after the step-4 save started. Synchronous saves: step-4/ is complete.
    Async saves (the default), with step-4's write held in flight: step-2/ is the newest complete checkpoint,
    .tmp-step-4/ has no DCP index yet. Either way `--resume auto` repeats the uninterrupted run's losses."""
    kw = {"checkpoint.every": 2, "data.grad_accum": 2}
    ref = L.run(cfg_for(world, tmp_path / "ref", steps=6, **kw))
    for async_save, complete in ((False, ["step-2", "step-4"]), (True, ["step-2"])):
        killed = tmp_path / f"killed-{async_save}"
        toml = write_toml(tmp_path / "run.toml", base_overrides(world, killed, steps=6, **kw,
                                                                **{"checkpoint.async_save": async_save}))
        run_script(tmp_path, (SLOW_WRITE if async_save else "") + KILL_AT_STEP, [str(toml)],
                   expect_rc=-signal.SIGKILL, env_extra={"KILL_AT": "5", "SIG": "SIGKILL"})
        assert [p.name for p in ckpt.complete_checkpoints(killed)] == complete
        assert (killed / ".tmp-step-4").is_dir() is async_save and not (killed / ".tmp-step-4" / ".metadata").exists()
        assert not (killed / "final").exists()
        if not async_save:
            with pytest.raises(ConfigError, match="resume auto"):  # a fresh start would mix two runs in one dir
                L.run(cfg_for(world, killed, steps=6, **kw))
        L.run(cfg_for(world, killed, steps=6, **kw, **{"checkpoint.resume": "auto",
                                                       "checkpoint.async_save": async_save}))
        a, b = losses(ref), losses(killed)
        assert len(b) == 6 and np.allclose(a, b, rtol=1e-6, atol=0), (async_save, a, b)
        assert [p.name for p in ckpt.complete_checkpoints(killed)] == ["step-4", "step-6"]  # keep = 2
        assert not list(killed.glob(".tmp-*"))
        wa, wb = load_hf(ref / "final"), load_hf(killed / "final")
        assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(wa.parameters(), wb.parameters()))


def test_sigterm_saves_complete_checkpoint_and_stops(world, tmp_path, monkeypatch):
    """In-process (the handler is the same under torchrun, which forwards SIGTERM to every rank); main.py then
    exits 0. A SIGTERM during step 3 ends the run after step 3 with a complete step-3/."""
    orig, calls = L.train_step, [0]

    def train_step(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(*a, **k)
    monkeypatch.setattr(L, "train_step", train_step)
    before = signal.getsignal(signal.SIGTERM)
    L.run(cfg_for(world, tmp_path / "run", steps=20))
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    done = ckpt.complete_checkpoints(tmp_path / "run")
    assert [p.name for p in done] == ["step-3"]
    state = json.loads((done[0] / ckpt.STATE_FILE).read_text())
    assert state["step"] == 3 and state["sampler"]["step"] == 3
    assert not list((tmp_path / "run").glob(".tmp-*")) and not (tmp_path / "run" / "final").exists()
    monkeypatch.setattr(L, "train_step", orig)
    L.run(cfg_for(world, tmp_path / "run", steps=5, **{"checkpoint.resume": "auto"}))  # and it resumes from there
    assert len(losses(tmp_path / "run")) == 5


@pytest.mark.slow
def test_sigterm_subprocess_exits_0(world, tmp_path):
    toml = write_toml(tmp_path / "run.toml", base_overrides(world, tmp_path / "run", steps=20))
    script = tmp_path / "main_with_kill.py"
    script.write_text(f"import os, signal, sys\nsys.path.insert(0, {str(REPO)!r})\n" + KILL_AT_STEP.replace(
        'L.run(make_config("kd", sys.argv[1], sys.argv[2:]))',
        'from train.main import main\nsys.exit(main(["kd", "--config", sys.argv[1]]))'))
    proc = subprocess.run([sys.executable, str(script), str(toml)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KILL_AT": "3", "SIG": "SIGTERM"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["step-3"]


def test_partial_checkpoint_is_ignored(world, tmp_path):
    run_dir = tmp_path / "run"
    L.run(cfg_for(world, run_dir, steps=2, **{"checkpoint.every": 2}))
    partial = run_dir / ".tmp-step-9"  # what a crash mid-save leaves
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"garbage")
    assert ckpt.latest(run_dir).name == "step-2"
    L.run(cfg_for(world, run_dir, steps=3, **{"checkpoint.every": 2, "checkpoint.resume": "auto"}))
    assert not partial.exists() and ckpt.latest(run_dir).name == "step-3"


def test_metadata_unpickler_refuses_foreign_globals(tmp_path):
    import io
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        ckpt._MetadataUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


# ------------------------------------------------------------------------------------------------------------
# Non-finite steps


def test_nonfinite_steps_are_skipped_then_stop(world, tmp_path, monkeypatch):
    import kernels
    orig, calls = kernels.linear_topk_kd_loss, [0]

    def poisoned(*a, **k):
        out = orig(*a, **k)
        calls[0] += 1
        bad = calls[0] == 2 or calls[0] >= 4  # step 2, then every step from 4 on
        return out._replace(loss=out.loss * float("nan")) if bad else out
    monkeypatch.setattr(kernels, "linear_topk_kd_loss", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="non-finite steps in a row"):
        L.run(cfg_for(world, run_dir, steps=10, **{"optim.max_bad_steps": 2, "checkpoint.every": 3}))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [0, 1, 1, 2, 3]
    assert ckpt.latest(run_dir).name == "step-3"  # the last good checkpoint, untouched


# ------------------------------------------------------------------------------------------------------------
# dae: every row reaches its own teacher; the domain fraction holds


def test_dae_routes_rows_and_holds_domain_fraction(tmp_path, monkeypatch):
    w = fx.make_world(tmp_path / "w", n_rows=60, domain_every=3)  # a third of the rows are domain rows
    domain_teacher = fx.make_model(tmp_path / "domain", w["vocab"], Path(w["tok"]), seed=7, layers=1)
    seen: dict = {"reference": [], "domain": []}
    orig_build = L.build_teachers

    def build(cfg, packed, env, mesh=None):
        ts = orig_build(cfg, packed, env, mesh)
        for name, src in ts.sources.items():
            def signals(rows, _src=src, _name=name, _orig=src.signals):
                seen[_name] += [packed.teacher_names[int(packed.teacher[s])] for s in rows.sample_idx_B.tolist()]
                return _orig(rows)
            src.signals = signals
        return ts
    monkeypatch.setattr(L, "build_teachers", build)
    o = base_overrides(w, tmp_path / "run", steps=12, **{"teachers.teacher.path": None,
                                                        "data.micro_batch": 4, "data.domain_fraction": 0.75})
    cfg = make_config("dae", None, o + [f"teachers.reference.path={w['teacher']}",
                                        f"teachers.domain.path={domain_teacher}"])
    L.run(cfg)
    assert set(seen["reference"]) == {"reference"} and set(seen["domain"]) == {"domain"}
    n = len(seen["reference"]) + len(seen["domain"])
    assert n == 12 * 4
    frac = len(seen["domain"]) / n
    assert abs(frac - 0.75) < 3 * math.sqrt(0.75 * 0.25 / n), frac  # the data's own mix would give ~1/3


# ------------------------------------------------------------------------------------------------------------
# Export


def test_final_loads_in_transformers_with_our_logits(world, tmp_path):
    import transformers
    run_dir = L.run(cfg_for(world, tmp_path / "run", steps=2, **{"checkpoint.every": 2}))
    final = run_dir / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ours = load_hf(final).eval()
    ids = torch.tensor([tok("What is 3 plus 4?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours.logits(ours(ids)), atol=1e-5, rtol=1e-4)
    trained, start = load_hf(final), load_hf(world["student"])
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), start.parameters()))
    # the `export` subcommand turns the step-2 checkpoint into the same weights
    from train.main import main
    assert main(["export", f"--export.checkpoint={run_dir}", f"--export.out={tmp_path / 'exp'}",
                 "--export.dtype=float32"]) == 0
    exported = load_hf(tmp_path / "exp")
    assert all(torch.equal(p, q) for p, q in zip(exported.parameters(), trained.parameters()))


# ------------------------------------------------------------------------------------------------------------
# Attention transfer


def test_attention_kl_equals_full_maps_and_keeps_no_maps(world):
    import transformers
    student, teacher = load_hf(world["student"]), load_hf(world["student"])
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, world["vocab"], (2, 11))
    labels = torch.randint(0, world["vocab"], (2, 11))
    labels[:, :4] = -100
    with capture_qk(student) as qs:
        student(tokens)
    with torch.no_grad(), capture_qk(teacher) as qt:
        teacher(tokens)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        got = attention_kl_sum(qs, qt, student.args, teacher.args, labels)
    # Kept for the backward: q, k and the shared boolean masks [B, 1, T, T]; no per-head [B, H, T, T] map.
    assert not any(len(s) == 4 and s[1] > 1 and s[-1] == s[-2] == 11 for s in saved), saved
    got.backward()
    g_ours = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}

    def maps(m, d):  # HF eager attention probabilities, all layers at once
        from model import save_hf
        save_hf(m, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
        return hf, hf(tokens, output_attentions=True).attentions
    hs, a_s = maps(student, world["root"] / "attn-s")
    with torch.no_grad():
        _, a_t = maps(teacher, world["root"] / "attn-t")
    rows = (labels != -100)[:, None, :, None]
    ref = sum((at * (at.clamp_min(1e-30).log() - as_.clamp_min(1e-30).log()) * rows).sum()
              for as_, at in zip(a_s, a_t))
    assert math.isclose(got.item(), ref.item(), rel_tol=1e-4)
    ref.backward()
    from model.hf import _simple_name_map
    names = _simple_name_map(student.args)  # HF name -> ours
    g_ref = {names[n]: p.grad for n, p in hs.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert set(g_ref) == {n for n, g in g_ours.items() if g.abs().sum() > 0}
    assert max(((g_ours[n] - g).norm() / g.norm()).item() for n, g in g_ref.items()) < 1e-3


def test_kd_with_attention_term_runs(world, tmp_path):
    same = fx.make_model(tmp_path / "t", world["vocab"], Path(world["tok"]), seed=5)  # the student's shape
    run_dir = L.run(cfg_for(world, tmp_path / "run", steps=2, **{"teachers.teacher.path": str(same),
                                                                "loss.attn_weight": 0.5}))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["attn"] > 0 and math.isfinite(r["loss"]) for r in recs)


def test_mfu_is_per_device(world, tmp_path, monkeypatch):
    """MFU = the step's FLOPs (all ranks' tokens) / time / (ranks x one device's peak). Rank 0 of a 2-process run
    (faked: no process group, so the collectives are skipped) must not be credited with the other rank's work.
    The step record's tok_s and mfu share the step time, so their ratio is exact."""
    from train import parallel
    fake = parallel.Env(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), owns_group=False)
    monkeypatch.setattr(L.parallel, "init_distributed", lambda *a, **k: fake)
    monkeypatch.setattr(L.parallel, "resolve_strategy", lambda *a, **k: "none")
    recs, orig = [], L.Output.step
    monkeypatch.setattr(L.Output, "step", lambda self, step, rec, force=False: (recs.append(rec),
                                                                                 orig(self, step, rec, force)))
    cfg = cfg_for(world, tmp_path / "run", steps=2, **{"logging.peak_tflops": 1.0,
                                                       "checkpoint.export_final": False})
    L.run(cfg)
    shapes = L.preflight(cfg)
    fpt = (L.flops_per_token(shapes["student"], 64, train=True)
           + L.flops_per_token(shapes["teachers"]["teacher"], 64, train=False))
    assert len(recs) == 2
    for r in recs:
        assert math.isclose(r["mfu"] / r["tok_s"], fpt / (2 * 1e12), rel_tol=1e-9), (r["mfu"] / r["tok_s"], fpt)


# ------------------------------------------------------------------------------------------------------------
# Teacher signals up front: the same losses as per micro-batch, fewer forwards, counters in metrics.jsonl


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_signals_up_front_same_losses_fewer_forwards(world, tmp_path, monkeypatch):
    """kd, grad_accum 3 x micro_batch 2: the teacher runs once per step up front (max_tokens 0), or once per row
    with max_tokens = seq_len, against today's once per micro-batch; losses within 1e-6 relative."""
    kw = {"data.grad_accum": 3, "checkpoint.export_final": False}
    up = L.run(cfg_for(world, tmp_path / "up", steps=3, **kw))
    rows = L.run(cfg_for(world, tmp_path / "rows", steps=3, **kw, **{"teachers.teacher.max_tokens": 64}))
    monkeypatch.setattr(L, "step_signals", lambda ctx, micro_batches: None)  # today's per-micro-batch path
    per = L.run(cfg_for(world, tmp_path / "per", steps=3, **kw))
    a, b, c = losses(up), losses(rows), losses(per)
    assert np.allclose(a, c, rtol=1e-6, atol=0) and np.allclose(b, c, rtol=1e-6, atol=0), (a, b, c)
    for run_dir, forwards in ((up, 1), (rows, 6), (per, 3)):
        for r in records(run_dir):
            assert r["teacher.teacher.forwards"] == forwards and r["teacher.teacher.rows"] == 6, r
            assert r["teacher.teacher.empty_forwards"] == 0 and r["teacher.teacher.gathered_bytes"] == 0, r


def test_dae_sharded_teachers_two_ranks_equal_one(tmp_path):
    """dae with both teachers sharded over 2 gloo ranks (torchrun, DDP student), 2 rows per forward, equals one
    process with replicated teachers and the same global batch; rows per teacher (all ranks) agree, and rank 0
    gathers each teacher less its own shard per forward."""
    w = fx.make_world(tmp_path / "w", n_rows=60, domain_every=3)
    domain_teacher = fx.make_model(tmp_path / "domain", w["vocab"], Path(w["tok"]), seed=7, layers=1)
    def overrides(run_dir, **kw):
        o = base_overrides(w, run_dir, steps=3, **{"teachers.teacher.path": None, "data.micro_batch": 2,
                                                   "data.domain_fraction": 0.5, "checkpoint.export_final": False,
                                                   **kw})
        return o + [f"teachers.reference.path={w['teacher']}", f"teachers.domain.path={domain_teacher}"]
    one = L.run(make_config("dae", None, overrides(tmp_path / "one", **{"data.grad_accum": 4})))
    placed = [f"teachers.{n}.{k}={v}" for n in ("reference", "domain") for k, v in
              (("placement", "shard"), ("max_tokens", 128))]
    toml = write_toml(tmp_path / "two.toml", overrides(tmp_path / "two", **{"data.grad_accum": 2}) + placed)
    _torchrun(["dae", "--config", str(toml), "--parallel.strategy=ddp"])
    a, b = records(one), records(tmp_path / "two")
    # Rank 0's bytes received per forward: every parameter less its shard (FSDP2: dim 0 split in ceil(d0 / 2) rows).
    per_forward = {n: sum((p.numel() - math.ceil(p.shape[0] / 2) * p[0].numel()) * p.element_size()
                          for p in load_hf(path).parameters())
                   for n, path in (("reference", w["teacher"]), ("domain", domain_teacher))}
    assert np.allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=2e-6, atol=0), (a, b)
    for ra, rb in zip(a, b):
        for n in ("reference", "domain"):
            assert ra[f"teacher.{n}.rows"] == rb[f"teacher.{n}.rows"]
            assert ra[f"teacher.{n}.gathered_bytes"] == 0
            assert rb[f"teacher.{n}.gathered_bytes"] == rb[f"teacher.{n}.forwards"] * per_forward[n] > 0
        assert sum(ra[f"teacher.{n}.rows"] for n in ("reference", "domain")) == 8
    print("2 ranks, rank 0's teacher counters per step:", [{k: v for k, v in r.items() if k.startswith("teacher.")}
                                                          for r in b])


# ------------------------------------------------------------------------------------------------------------
# sft, upcycle + MoE student, store round trip


def test_sft_is_ce_only(world, tmp_path):
    o = base_overrides(world, tmp_path / "run", steps=2, **{"teachers.teacher.path": None, "teachers.k": None})
    run_dir = L.run(make_config("sft", None, o))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] == 0 and math.isclose(r["loss"], r["ce"], rel_tol=1e-6) for r in recs)


def test_upcycle_then_kd_moe_student(world, tmp_path):
    from train.main import main
    moe = tmp_path / "moe"
    assert main(["upcycle", f"--model.path={world['student']}", f"--upcycle.out={moe}", "--upcycle.num_experts=2"]) == 0
    assert load_hf(moe).args.moe.num_experts == 2 and (moe / "tokenizer.json").exists()
    run_dir = L.run(cfg_for(world, tmp_path / "run", steps=2, **{"model.path": str(moe)}))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux"] > 0 for r in recs)
    assert load_hf(run_dir / "final").args.moe.num_experts == 2


def test_capture_then_kd_from_store_matches_online(world, tmp_path):
    from train.main import main
    store = tmp_path / "store"
    common = [f"--data.paths={world['data']}", "--data.seq_len=64", f"--data.tokenizer={world['tok']}",
              f"--data.cache_dir={world['root'] / 'cache'}", "--teachers.k=8"]
    assert main(["capture", f"--teachers.teacher.path={world['teacher']}", f"--capture.out={store}",
                 "--capture.batch_size=16", *common]) == 0
    online = L.run(cfg_for(world, tmp_path / "online", steps=3))
    offline = L.run(cfg_for(world, tmp_path / "offline", steps=3,
                            **{"teachers.teacher.path": None, "teachers.teacher.store": str(store)}))
    a, b = losses(online), losses(offline)
    assert np.allclose(a, b, rtol=2e-3), (a, b)  # the store keeps fp16 log-probabilities


# ------------------------------------------------------------------------------------------------------------
# Bad configurations fail before any weights or data are loaded


@pytest.fixture
def no_heavy_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("heavy work started before the config was checked")
    monkeypatch.setattr(L, "load_hf", boom)
    monkeypatch.setattr(L, "build_data", boom)
    monkeypatch.setattr(L.parallel, "init_distributed", boom)


def test_bad_configs_fail_early(world, tmp_path, no_heavy_work):
    wrong_vocab = fx.make_model(tmp_path / "wv", world["vocab"] + 3, None, seed=3)
    other_tok_dir = tmp_path / "ot"
    fx.make_tokenizer(other_tok_dir, fx.make_rows(48), specials=["<unk>", "</s>", "<s>", "[INST]", "[/INST]"])
    other_tok = fx.make_model(tmp_path / "otm", world["vocab"], other_tok_dir, seed=3)
    deep = fx.make_model(tmp_path / "deep", world["vocab"], Path(world["tok"]), seed=4, layers=3)
    cases = [
        ({"optim.lrr": 1}, "unknown key optim.lrr; valid keys of \\[optim\\]: lr, betas"),
        ({"optim.lr": "fast"}, "optim.lr = 'fast'.*expected float"),
        ({"data.micro_batch": "1.5"}, "data.micro_batch"),
        ({"model.path": ""}, "model.path is missing"),
        ({"model.path": str(tmp_path / "nope")}, "no such directory"),
        ({"teachers.teacher.path": str(wrong_vocab)}, "vocab_size .*never resize"),
        ({"teachers.teacher.path": str(other_tok)}, "different tokenizer"),
        ({"teachers.teacher.path": str(deep), "loss.attn_weight": 0.1}, "same layers and heads.*2 layers x 4 heads"),
        ({"loss.kd_weight": 1.5}, "lambda must be in"),
        ({"data.domain_fraction": 0.2}, "dae setting"),
        ({"checkpoint.resume": "auto", "run.dir": ""}, "--run.dir"),
        ({"teachers.teacher.store": str(tmp_path)}, "exactly one of path"),
    ]
    for kw, pattern in cases:  # ConfigError, or ModelDirError for a model directory: both a one-line CLI error
        with pytest.raises(UserError, match=pattern):
            L.run(cfg_for(world, tmp_path / "run", **kw))
    with pytest.raises(ConfigError, match="section \\[export\\] is not read by `kd`"):
        make_config("kd", None, base_overrides(world, tmp_path) + ["export.out=x"])
    with pytest.raises(ConfigError, match="dae needs exactly the teachers `reference` and `domain`"):
        make_config("dae", None, base_overrides(world, tmp_path))
    store = tmp_path / "fake-store"
    store.mkdir()
    with pytest.raises(ConfigError, match="not a complete store"):
        L.run(cfg_for(world, tmp_path / "run", **{"teachers.teacher.path": None,
                                                  "teachers.teacher.store": str(store)}))
    (store / "manifest.json").write_text(json.dumps({"vocab_size": world["vocab"], "k": 16, "seq_len": 64}))
    with pytest.raises(ConfigError, match="k is 16.*--teachers.k=16"):
        L.run(cfg_for(world, tmp_path / "run", **{"teachers.teacher.path": None,
                                                  "teachers.teacher.store": str(store)}))
    from train.teachers import tokenizer_sha256
    k_run = make_config("kd", None, base_overrides(world, tmp_path)).teachers.k
    manifest = {"vocab_size": world["vocab"], "k": k_run, "seq_len": 64,
                "tokenizer_sha256": tokenizer_sha256(other_tok_dir)}
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="another tokenizer"):
        L.run(cfg_for(world, tmp_path / "run", **{"teachers.teacher.path": None,
                                                  "teachers.teacher.store": str(store)}))
    manifest.update(tokenizer_sha256=None, rows_of="domain")  # a phase-2 store of one teacher's rows
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="only the rows of teacher 'domain'.*capture without capture.rows_of"):
        L.run(cfg_for(world, tmp_path / "run", **{"teachers.teacher.path": None,
                                                  "teachers.teacher.store": str(store)}))


def test_placements_that_do_not_fit_the_world_fail_early(world, tmp_path, no_heavy_work, monkeypatch):
    """A placed teacher splits over one node's ranks: refused at start-up (preflight, before any weight or data)
    when the world is not whole nodes, the teacher is dense under "expert", or its experts do not split evenly."""
    moe = fx.make_model(tmp_path / "moe", world["vocab"], Path(world["tok"]), seed=3, moe=True)  # 4 experts
    cases = [
        ("8", "3", world["teacher"], "shard", r"8 ranks are not whole nodes of 3 \(LOCAL_WORLD_SIZE\)"),
        ("4", "4", world["teacher"], "expert", r"teachers\.teacher\.placement = 'expert': teacher 'teacher' .* is "
                                               r"dense"),
        ("6", "3", str(moe), "expert", r"4 experts cannot be split whole over a node of 3 ranks"),
        ("6", "3", str(moe), "shard", r"4 experts .* cannot be split evenly over a node of 3 ranks"),
    ]
    for ws, local, path, placement, pattern in cases:
        monkeypatch.setenv("WORLD_SIZE", ws)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        with pytest.raises(ConfigError, match=pattern):
            L.run(cfg_for(world, tmp_path / "run", **{"teachers.teacher.path": path,
                                                      "teachers.teacher.placement": placement}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 nodes of 2: 4 experts split whole; the run goes on to start
    with pytest.raises(AssertionError, match="heavy work started"):
        L.run(cfg_for(world, tmp_path / "run", **{"teachers.teacher.path": str(moe),
                                                  "teachers.teacher.placement": "expert"}))
    assert not (tmp_path / "run").exists()


def test_cli_help_and_errors(capsys):
    from train.main import main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(s in out for s in ("kd", "dae", "sft", "capture", "upcycle", "export", "eval"))
    assert main(["kd", "--help"]) == 0
    assert "--optim.lr" in capsys.readouterr().out
    assert main(["kd", "--optim.nope=1"]) == 2
    assert "unknown key optim.nope" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# Slow: FSDP, crash mid-save, resharded resume, activation checkpointing


def _torchrun(args, nproc=2):
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "train/main.py", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_equals_ddp_and_resumes_resharded(world, tmp_path):
    kw = {"checkpoint.every": 2}
    for name, strategy in (("ddp", "ddp"), ("fsdp", "fsdp")):
        toml = write_toml(tmp_path / f"{name}.toml", base_overrides(world, tmp_path / name, steps=4, **kw))
        _torchrun(["kd", "--config", str(toml), f"--parallel.strategy={strategy}"])
    assert np.allclose(losses(tmp_path / "ddp"), losses(tmp_path / "fsdp"), rtol=1e-5)
    a, b = load_hf(tmp_path / "ddp" / "final"), load_hf(tmp_path / "fsdp" / "final")
    assert all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
    # resume the FSDP (2 ranks) checkpoint in one process with grad_accum 2: same global batch, same losses
    import shutil
    shutil.copytree(tmp_path / "fsdp", tmp_path / "re")
    shutil.rmtree(tmp_path / "re" / "step-4")
    L.run(cfg_for(world, tmp_path / "re", steps=4, **kw, **{"data.grad_accum": 2, "checkpoint.resume": "auto"}))
    assert np.allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "re"), rtol=1e-5)


KILL_IN_SAVE = """
import torch.distributed.checkpoint as dcp
import train.loop as L
from train.config import make_config
orig, calls = dcp.save, [0]
def save(*a, **k):
    orig(*a, **k)
    calls[0] += 1
    if calls[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # shards written, not yet renamed into place
dcp.save = save
L.run(make_config("kd", sys.argv[1], sys.argv[2:]))
"""


@pytest.mark.slow
def test_crash_mid_save_keeps_previous_checkpoint(world, tmp_path):
    kw = {"checkpoint.every": 2, "checkpoint.async_save": False}  # the kill is in the synchronous dcp.save
    ref = L.run(cfg_for(world, tmp_path / "ref", steps=6, **kw))
    toml = write_toml(tmp_path / "run.toml", base_overrides(world, tmp_path / "run", steps=6, **kw))
    run_script(tmp_path, KILL_IN_SAVE, [str(toml)], expect_rc=-signal.SIGKILL)
    assert (tmp_path / "run" / ".tmp-step-4").exists() and ckpt.latest(tmp_path / "run").name == "step-2"
    L.run(cfg_for(world, tmp_path / "run", steps=6, **kw, **{"checkpoint.resume": "auto"}))
    assert np.allclose(losses(ref), losses(tmp_path / "run"), rtol=1e-6)


@pytest.mark.slow
def test_activation_checkpointing_and_compile_same_losses(world, tmp_path):
    a = L.run(cfg_for(world, tmp_path / "a", steps=3))
    b = L.run(cfg_for(world, tmp_path / "b", steps=3, **{"parallel.activation_checkpointing": True}))
    c = L.run(cfg_for(world, tmp_path / "c", steps=3, **{"parallel.activation_checkpointing": True,
                                                         "parallel.compile": True}))
    assert np.allclose(losses(a), losses(b), rtol=1e-6) and np.allclose(losses(a), losses(c), rtol=1e-5)


def test_attention_windows_compared_as_they_act():
    """Mistral's sliding_window 4096 and Mixtral's none are one mask at seq_len <= 4096 (the paper's pair)."""
    from model import ModelArgs
    from train.loss import check_compatible
    mistral, mixtral = ModelArgs(sliding_window=4096), ModelArgs(sliding_window=None)
    for seq_len in (2048, 4096):
        check_compatible(mistral, mixtral, seq_len)
    with pytest.raises(ValueError, match="at seq_len 8192 the student sees 4096 keys back.*teacher 8192"):
        check_compatible(mistral, mixtral, 8192)


def test_fsdp_on_one_rank_equals_none(world, tmp_path, monkeypatch):
    """parallel.strategy=fsdp in one process is FSDP2 on a 1-rank mesh (a single GPU can check the policy),
    not silently `none`; in fp32 it trains the same numbers."""
    wrapped = []
    orig = L.parallel.parallelize

    def spy(module, blocks, **kw):
        out = orig(module, blocks, **kw)
        wrapped.append((kw["strategy"], type(out).__name__, kw["mesh"].size() if kw["mesh"] is not None else None))
        return out
    monkeypatch.setattr(L.parallel, "parallelize", spy)
    a = L.run(cfg_for(world, tmp_path / "none", steps=3, **{"parallel.strategy": "none"}))
    b = L.run(cfg_for(world, tmp_path / "fsdp", steps=3, **{"parallel.strategy": "fsdp"}))
    assert wrapped == [("none", "StudentWithLoss", None), ("fsdp", "FSDPStudentWithLoss", 1)]
    assert np.allclose(losses(a), losses(b), rtol=1e-5)
