"""The real sizes on the CPU: the paper's models (published config.json files, tests/published_configs.py) wrapped
as the trainer wraps them, under fake tensors and a fake process group of 8 or 32 ranks (flat and HSDP 4 x 8);
the `plan` estimate against a real step's tensor bytes; a plan for an unusable world is a named error."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from published_configs import MISTRAL_7B, MIXTRAL_8X7B, upcycled  # noqa: E402

from model.hf import args_from_config  # noqa: E402
from train.config import ConfigError, make_config  # noqa: E402
from train.plan import (GB, PlanError, TeacherPlan, Trace, _forward_peak, check_world,  # noqa: E402
                        largest_rows_per_forward, trace_step)


def n_params(a) -> int:
    with torch.device("meta"):
        from model import Transformer
        return sum(p.numel() for p in Transformer(a).parameters())


def _check_shares(student: dict, world: int, shard: int, teacher: dict | None = None):
    """After one micro-batch of a grad_accum-2 step (not the last): sharded fp32 masters and fp32 gradients are
    total / shard within 2 %, no unsharded gradient is alive, every parameter inside the forward is bf16."""
    s = args_from_config(student)
    t = [TeacherPlan("teacher", args_from_config(teacher), True)] if teacher else []
    tr = trace_step(s, t, world=world, shard=shard, micro_batch=1, seq_len=16, grad_accum=2, k=8,
                    activation_checkpointing=True, compute_dtype=torch.bfloat16, steps=1)
    share = n_params(s) * 4 / shard
    assert abs(tr.params / share - 1) < 0.02, (tr.params, share)
    assert abs(tr.grads / share - 1) < 0.02, (tr.grads, share)
    assert tr.unsharded_grads == 0
    assert tr.param_dtypes == {torch.bfloat16}
    assert abs(tr.optimizer / (2 * share) - 1) < 0.02
    if teacher:
        tshare = n_params(t[0].args) * 2 / shard  # bf16, frozen
        assert abs(tr.teachers / tshare - 1) < 0.02, (tr.teachers, tshare)
    return tr


@pytest.mark.slow
def test_7b_on_8_ranks():
    tr = _check_shares(MISTRAL_7B, 8, 8)
    print(f"7B / 8: params {tr.params / 1e9:.3f} GB, grads {tr.grads / 1e9:.3f} GB per rank")


def test_2x7b_on_8_ranks_experts_split_on_dim_1():
    """2 experts over 8 ranks: on dim 0 ranks 0-1 would hold whole experts (2x the share, far off 2 %)."""
    _check_shares(upcycled(MISTRAL_7B, 2), 8, 8)


@pytest.mark.slow
def test_2x7b_and_sharded_teacher_on_32_ranks():
    _check_shares(upcycled(MISTRAL_7B, 2), 32, 32, teacher=MIXTRAL_8X7B)


@pytest.mark.slow
def test_hsdp_4x8_7b_and_teacher_on_the_node():
    """HSDP 4 nodes x 8: the student and the sharded teacher are sharded within the node (share = total / 8)."""
    _check_shares(MISTRAL_7B, 32, 8, teacher=MIXTRAL_8X7B)


def test_unusable_worlds_are_named_errors(tmp_path):
    mixtral = args_from_config(MIXTRAL_8X7B)
    with pytest.raises(PlanError, match="8 experts .*cannot be split evenly over a shard group of 6"):
        check_world(mixtral, [], 6, 6)
    with pytest.raises(PlanError, match="teacher 'teacher': 8 experts"):
        check_world(args_from_config(MISTRAL_7B), [TeacherPlan("teacher", mixtral, True)], 12, 12)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MISTRAL_7B))
    base = [f"model.path={model}"]
    with pytest.raises(ConfigError, match="plan.gpus_per_node=0"):
        make_config("plan", None, base + ["plan.gpus_per_node=0"])
    with pytest.raises(ConfigError, match="plan.nodes=0"):
        make_config("plan", None, base + ["plan.nodes=0"])
    for bad in ("0", "-80"):
        with pytest.raises(ConfigError, match=f"plan.gpu_memory_gb={float(bad)}.*> 0"):
            make_config("plan", None, base + [f"plan.gpu_memory_gb={bad}"])
    from train.plan import plan_world
    with pytest.raises(PlanError, match="shard_group=3 does not divide the world size 8"):
        plan_world(make_config("plan", None, base + ["parallel.shard_group=3"]))


def _measured_step_peak(a, micro_batch: int, seq_len: int) -> int:
    """Peak tensor bytes of the trainer's real train_step (FSDP2 on a 1-rank gloo group, fp32, real tensors),
    counted by torch's FSDPMemTracker over two steps (the second with AdamW's moments allocated)."""
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from model import Transformer
    from train import loop as L
    from train import parallel
    env = parallel.init_distributed("cpu", group_of_one=True)
    try:
        with torch.device("meta"):
            student = Transformer(a)
        module = L.StudentWithLoss(student, L.LossSettings(0.0, 1.0, 0.0, 0.0))
        module = parallel.parallelize(module, student.layers, strategy="fsdp", activation_checkpointing=False,
                                      compile=False, env=env, mesh=parallel.world_mesh())
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
        optimizer = torch.optim.AdamW(list(module.parameters()), lr=1e-5)
        ctx = L.StepContext(module, optimizer, None, None, env, 1.0, 1.0, 0, check_ids=False)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, a.vocab_size, (micro_batch, seq_len), generator=g)

        class Batch:
            tokens_BT, labels_BT, positions_BT, doc_ids_BT = tokens, tokens.roll(-1, 1), None, None

            def to(self, device, non_blocking=False):
                return self
        tracker = FSDPMemTracker(module, optimizer)
        with tracker:
            for _ in range(2):
                L.train_step(ctx, [Batch()], 1e-5)
                tracker.reset_mod_stats()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
        return [v for k, v in peak.items() if str(k) == "Total"][0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_plan_peak_within_15_percent_of_a_real_step():
    """A model whose state (fp32 masters, gradients, AdamW) is ~1.2 GB: the plan's fake-tensor trace against the
    real step's tensor bytes on the CPU (not RSS)."""
    a = args_from_config({**MISTRAL_7B, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 4,
                          "num_attention_heads": 12, "num_key_value_heads": 4})
    state = n_params(a) * 16
    assert state > 1e9
    planned = trace_step(a, [], world=1, shard=1, micro_batch=2, seq_len=256, grad_accum=1, k=0,
                         activation_checkpointing=False, compute_dtype=None, loss_weights=(0.0, 1.0)).peak
    measured = _measured_step_peak(a, 2, 256)
    print(f"state {state / 1e9:.2f} GB, planned peak {planned / 1e9:.3f} GB, measured {measured / 1e9:.3f} GB, "
          f"ratio {planned / measured:.3f}")
    assert abs(planned / measured - 1) < 0.15


def _tiny_model_dirs(tmp_path):
    """tmp_path/student and tmp_path/teacher: config.json only, the published Mistral-7B / Mixtral-8x7B configs at a
    tiny size (plan reads nothing else)."""
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 256}
    for name, c in (("student", {**MISTRAL_7B, **tiny}), ("teacher", {**MIXTRAL_8X7B, **tiny})):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text(json.dumps(c))


def test_plan_cli_says_fits_or_names_the_fix(tmp_path, capsys):
    from train.main import main
    _tiny_model_dirs(tmp_path)
    args = ["plan", f"--model.path={tmp_path / 'student'}", f"--teachers.teacher.path={tmp_path / 'teacher'}",
            "--data.seq_len=64", "--plan.gpus_per_node=8", "--plan.headroom_gb=0"]
    assert main(args + ["--plan.gpu_memory_gb=80"]) == 0
    out = capsys.readouterr().out
    assert "simulation" in out and "verdict: fits" in out and "mesh 8 (FSDP)" in out
    assert main(args + ["--plan.gpu_memory_gb=0.0001"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and ("shard the teacher" in out or "combine" in out)
    assert main(args + ["--plan.nodes=2", "--parallel.shard_group=3"]) == 2
    assert "shard_group=3 does not divide the world size 16" in capsys.readouterr().err


def _tiny_run(tmp_path, sub="kd", extra=()):
    _tiny_model_dirs(tmp_path)
    base = [f"--teachers.teacher.path={tmp_path / 'teacher'}", "--data.seq_len=64", "--data.paths=x.jsonl"]
    if sub != "capture":
        base.append(f"--model.path={tmp_path / 'student'}")
    else:
        base.append(f"--capture.out={tmp_path / 'store'}")
    return make_config(sub, None, base + list(extra))


@pytest.mark.parametrize("sub", ["kd", "capture"])
def test_fit_check_stops_a_run_that_cannot_fit_and_names_the_switch(tmp_path, sub):
    """The start-up check that kd / dae / sft / capture run on CUDA, called here with a stated device memory:
    the plan runs in a subprocess (as under torchrun), a tiny device refuses with the fix and the switch, a large
    one passes, and the switch turns it off."""
    from train import parallel
    from train.plan import fit_check
    cfg = _tiny_run(tmp_path, sub)
    env = parallel.Env(0, 1, 0, torch.device("cpu"), False, 1)
    lines = []
    fit_check(cfg, env, 80.0, lines.append)
    assert any("fit check: fits (planned peak" in x for x in lines), lines
    assert any("simulation" in x for x in lines)
    lines.clear()
    with pytest.raises(ConfigError, match="cannot fit.*--parallel.fit_check=false"):
        fit_check(cfg, env, 0.001, lines.append)
    refusal = [x for x in lines if "> this GPU's 0.0 GB" in x]
    assert refusal and ("fix:" in refusal[0] or "combine" in refusal[0]), lines
    cfg.parallel.fit_check = False
    lines.clear()
    fit_check(cfg, env, 0.001, lines.append)
    assert lines == ["fit check: off (parallel.fit_check=false)"]


def _fit_rank(rank, world, init, tmp, results):
    import torch.distributed as dist

    from train import parallel
    from train.plan import fit_check
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = _tiny_run(Path(tmp), "kd")
        env = parallel.Env(rank, world, rank, torch.device("cpu"), True, world)
        try:
            fit_check(cfg, env, 0.001, lambda *a: None)
            results[rank] = "started"
        except ConfigError as e:
            results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_fit_check_under_a_process_group_every_rank_stops(tmp_path):
    """Inside a real (gloo) process group rank 0 plans in a subprocess and every rank gets its verdict."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    init = f"file://{tmp_path / 'pg'}"
    _tiny_run(tmp_path, "kd")
    mp.spawn(_fit_rank, args=(2, init, str(tmp_path), results), nprocs=2)
    assert set(results.keys()) == {0, 1}
    assert all("cannot fit" in results[r] for r in (0, 1)), dict(results)


def test_plan_chooses_the_teacher_token_budget(tmp_path, capsys):
    """More rows per up-front teacher forward, more memory: the plan's largest fitting max_tokens is the last
    row count under the budget; the CLI reports each teacher's placement, forwards per step and gathered bytes;
    an expert placement of a dense teacher, or over a node its experts do not divide, is refused."""
    from types import SimpleNamespace
    mixtral = args_from_config(MIXTRAL_8X7B)
    t = TeacherPlan("teacher", mixtral, True, "shard")
    d = SimpleNamespace(micro_batch=1, grad_accum=16, seq_len=2048)
    tr = Trace(params=10 * GB, grads=10 * GB, unsharded_grads=0, optimizer=20 * GB, teachers=12 * GB, peak=0,
               activations=0, kinds={"Total": 41 * GB})  # below state + any teacher forward
    peaks = [_forward_peak(tr, [t], d, 8, 32, {"teacher": r}) for r in range(1, 17)]
    assert all(a < b for a, b in zip(peaks, peaks[1:]))
    assert largest_rows_per_forward(tr, t, [t], d, 8, 32, (peaks[5] + peaks[6]) / 2) == 6
    assert largest_rows_per_forward(tr, t, [t], d, 8, 32, peaks[0] - 1) == 0
    assert TeacherPlan("t", mixtral, True, "shard", max_tokens=3 * 2048 + 5).rows_per_forward(16, 2048) == 3
    with pytest.raises(PlanError, match="placement expert over a node of 8 GPUs, but it has no experts"):
        check_world(mixtral, [TeacherPlan("teacher", args_from_config(MISTRAL_7B), True, "expert")], 8, 8)
    with pytest.raises(PlanError, match="placement expert over a node of 3 GPUs, but it has 8 experts"):
        check_world(mixtral, [TeacherPlan("teacher", mixtral, True, "expert")], 6, 6, 3)

    from train.main import main
    _tiny_model_dirs(tmp_path)
    args = ["plan", f"--model.path={tmp_path / 'student'}", f"--teachers.teacher.path={tmp_path / 'teacher'}",
            "--data.seq_len=64", "--data.grad_accum=4", "--plan.gpus_per_node=8", "--plan.nodes=2",
            "--plan.gpu_memory_gb=80"]
    assert main(args + ["--teachers.teacher.placement=shard", "--teachers.teacher.max_tokens=128"]) == 0
    out = capsys.readouterr().out
    assert "teacher teacher: sharded over the node's 8 GPUs; max_tokens 128: 2 rows x 64 = 128 tokens per " \
           "forward, 2 forward(s) per step" in out, out
    assert "GB all-gathered per GPU per forward" in out and "largest that fits: max_tokens 256" in out
    assert main(args) == 0
    assert "teacher teacher: replicated (a whole copy per GPU); max_tokens auto (a step): 4 rows" in \
        capsys.readouterr().out


def test_mixtral_8x7b_expert_placement_on_8_gpus_is_about_15_gb():
    """Expert placement: per GPU the replicated non-expert weights plus 1/8 of the experts (bf16), against the
    arithmetic from the published config and the other placements."""
    from train.plan import teacher_bytes_by_placement
    mixtral = args_from_config(MIXTRAL_8X7B)
    by = teacher_bytes_by_placement(TeacherPlan("teacher", mixtral, True, "expert"), 8, 8, torch.bfloat16)
    total = n_params(mixtral)
    experts = mixtral.n_layers * mixtral.moe.num_experts * 3 * mixtral.dim * mixtral.hidden_dim
    assert by["expert"] == 2 * (total - experts) + 2 * experts // 8
    assert by["replicate"] == 2 * total
    assert abs(by["shard"] / (2 * total / 8) - 1) < 0.02
    print({k: f"{v / 1e9:.2f} GB" for k, v in by.items()})
    assert 14e9 < by["expert"] < 15.5e9  # the "~15 GB per GPU"
    # 6 GPUs: 8 experts do not split (expert n/a, a named error when asked for); a dense teacher has no experts.
    assert teacher_bytes_by_placement(TeacherPlan("teacher", mixtral, False), 6, 6, torch.bfloat16)["expert"] is None
    with pytest.raises(PlanError, match="placement expert over a node of 6 GPUs, but it has 8 experts"):
        check_world(args_from_config(MISTRAL_7B), [TeacherPlan("teacher", mixtral, True, "expert")], 6, 6)
    with pytest.raises(PlanError, match="teacher 'dense': placement expert over a node of 8 GPUs, but it has no"):
        check_world(mixtral, [TeacherPlan("dense", args_from_config(MISTRAL_7B), True, "expert")], 8, 8)


def test_plan_reports_each_placement(tmp_path):
    """The plan's teacher lines: weights per GPU under replicate | shard | expert with this run's marked, the
    all-to-all bytes of an expert-placed teacher, and expert placement offered as a fix."""
    from train.plan import make_plan
    _tiny_model_dirs(tmp_path)
    base = [f"model.path={tmp_path / 'student'}", f"teachers.teacher.path={tmp_path / 'teacher'}", "data.seq_len=64",
            "plan.gpus_per_node=8", "plan.headroom_gb=0"]
    text = "\n".join(make_plan(make_config("plan", None, base + ["plan.gpu_memory_gb=80",
                                                                 "teachers.teacher.placement=expert"])).lines)
    assert "experts split over the node's 8 GPUs" in text
    assert "replicate " in text and "| shard " in text and "| expert* " in text
    # 2 x 2 layers x 64 tokens x K=2 x D=64 x 2 B x 7/8 = 57,344 bytes = 0.0 GB on this tiny model
    assert "all-to-all 0.0 GB sent" in text and "verdict: fits" in text
    text = "\n".join(make_plan(make_config("plan", None, base + ["plan.gpu_memory_gb=0.0001"])).lines)
    assert "replicate* " in text and "placement=expert" in text and "does NOT fit" in text
