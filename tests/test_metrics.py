"""train/metrics.py: metrics.jsonl records, and the opt-in TensorBoard writer read back from its event file."""
import json
import math

import pytest

from train.metrics import Output


def _rec(i):
    return {"loss": 2.0 / (i + 1), "ce": 1.5 / (i + 1), "kd": 0.5 / (i + 1), "attn": 0.0, "aux": 0.01 * i,
            "grad_norm": 1.0 + i, "lr": 1e-4 * (i + 1), "tokens": 64 * (i + 1), "step_tokens": 64, "tok_s": 1000.0,
            "skipped": 0, "peak_mem_gb": 0.5, "mfu": None}


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = Output(tmp_path, active=True, every=2, progress=False, total=6, start=0, tensorboard=True)
    assert list(tmp_path.iterdir()) == []  # construction writes nothing (a run that fails while loading leaves no file)
    out.open_files()
    for i in range(6):
        out.step(i + 1, _rec(i))
    out.close(plot=False)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {f"train/{k}" for k in records[0] if k != "step"}
    for key in records[0]:
        if key == "step":
            continue
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [2, 4, 6]
        for e, r in zip(events, records):  # event files hold fp32
            assert math.isclose(e.value, r[key], rel_tol=1e-6, abs_tol=1e-9), (key, e.value, r[key])


def test_tensorboard_off_writes_nothing(tmp_path):
    out = Output(tmp_path, active=True, every=1, progress=False, total=1, start=0)
    out.open_files()
    out.step(1, _rec(0))
    out.close(plot=False)
    assert not (tmp_path / "tensorboard").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_tensorboard_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tb)
    out = Output(tmp_path, active=True, every=1, progress=False, total=1, start=0, tensorboard=True)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        out.open_files()


def test_fast_paths_names_versions_and_the_cpu_fallbacks():
    import torch

    from model import ModelArgs, MoEArgs
    from train.metrics import fast_paths
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, vocab_size=64,
                     moe=MoEArgs(num_experts=2, num_experts_per_tok=2))
    text = fast_paths(torch.device("cpu"), None, args)
    assert f"torch {torch.__version__}" in text and "triton" in text
    assert "packed attention: dense-mask SDPA" in text and "the CPU path" in text
    assert "torch twins (the CPU path) (MoE student, 2 experts)" in text and "precision: fp32" in text
    assert "checkpoint saves: asynchronous" in text and "expert-parallel all-to-all: not used (no online" in text
    text = fast_paths(torch.device("cpu"), None, args, {"reference": "expert", "domain": "shard"}, False, True)
    assert "checkpoint saves: synchronous" in text and "in use for teacher(s) reference" in text


def test_validation_metrics_reach_jsonl_tensorboard_and_the_plot(tmp_path, capsys):
    """A step that validated (train/validation.py) writes its val_* with that step's record, even between logging
    steps; TensorBoard files them under val/; the loss plot draws them."""
    pytest.importorskip("matplotlib")
    tb = pytest.importorskip("tensorboard")  # noqa: F841
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = Output(tmp_path, active=True, every=4, progress=False, total=4, start=0, tensorboard=True)
    out.open_files()
    val = {"val_ce": 2.5, "val_kd": 0.75, "val_top1": 0.5, "val_tokens": 80}
    for i in range(4):
        out.step(i + 1, {**_rec(i), **(val if i == 1 else {})}, force=i == 1)
    out.close(plot=True)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {k: records[0][k] for k in val} == val and not set(val) & set(records[1])
    assert "val ce 2.5000 kd 0.7500 top1 50.0%" in capsys.readouterr().out
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("val/kd")] == [(2, 0.75)]
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
