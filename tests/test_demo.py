"""The embedded demo: claim verdicts and the stage cache on hand-made cases; `--quick` end to end (default run);
the full demo with 3 seeds (slow), which writes mean +- std per claim into the run's report.md."""
import json
import os
from pathlib import Path

import pytest

from train import demo


def _metrics(general, domain):
    return {"general": general, "domain": domain}


def _seed(kd=0.5, sft=0.4, attn=0.5, moe=0.6, dae_gen=0.5, dae_dom=0.6, kd_dom=0.1):
    return {"sft": _metrics(sft, 0.1), "kd": _metrics(kd, kd_dom), "kd_attn": _metrics(attn, 0.1),
            "kd_moe": _metrics(moe, 0.1), "dae": _metrics(dae_gen, dae_dom)}


def _verdicts(claims):
    return {c["claim"]: c["verdict"] for c in claims}


def test_claims_with_seeds():
    # paired differences across 3 seeds: kd - sft = .10, .12, .08 (std .02) -> held; moe - kd = .01, -.01, .0
    per_seed = [_seed(kd=0.5, sft=0.4, moe=0.51), _seed(kd=0.52, sft=0.4, moe=0.51), _seed(kd=0.48, sft=0.4, moe=0.48)]
    claims = demo.judge_claims(per_seed, [], [])
    v = _verdicts(claims)
    assert v["C1"] == "held"
    c1 = claims[0]
    assert c1["mean"] == pytest.approx(0.10) and c1["std"] == pytest.approx(0.02) and c1["spread_kind"] == "seed std"
    assert v["C2"] == "held (no harm)"           # attn == kd in every seed
    assert v["C3"] == "did not hold"            # mean gain 0
    assert v["C4a"] == "held" and v["C4b"] == "held" and v["C4"] == "held"
    # DAE that loses general accuracy beyond the spread fails C4
    worse = [_seed(dae_gen=0.3), _seed(dae_gen=0.31), _seed(dae_gen=0.29)]
    assert _verdicts(demo.judge_claims(worse, [], []))["C4"] == "did not hold"


def test_claims_one_seed_use_paired_standard_error():
    # 4 general turns + 2 domain turns; kd right on 3 general turns where sft is right on 1
    is_domain = [False, False, False, False, True, True]
    correct = {"sft": [1, 0, 0, 0, 0, 0], "kd": [1, 1, 1, 0, 0, 0], "kd_attn": [1, 1, 1, 0, 0, 0],
               "kd_moe": [1, 1, 0, 0, 0, 0], "dae": [1, 1, 1, 0, 1, 1]}
    per_seed = [_seed(kd=0.75, sft=0.25, attn=0.75, moe=0.5, dae_gen=0.75, dae_dom=1.0, kd_dom=0.0)]
    claims = {c["claim"]: c for c in demo.judge_claims(per_seed, [correct], is_domain)}
    # per-turn differences kd - sft on general turns: 0, 1, 1, 0 -> pstdev 0.5, s.e. 0.5 / 2 = 0.25
    assert claims["C1"]["spread"] == pytest.approx(0.25) and claims["C1"]["spread_kind"] == "paired s.e."
    assert claims["C1"]["verdict"] == "held"                     # +0.5 > 0.25
    assert claims["C3"]["verdict"] == "did not hold"             # moe - kd = -0.25
    assert claims["C4a"]["spread"] == 0.0 and claims["C4a"]["verdict"] == "held"
    assert claims["C4"]["verdict"] == "held"
    assert "| C1 |" in demo.claims_table(list(claims.values()))


def test_stage_cache_is_keyed_on_config(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "x").write_text("1")

    pipe = demo.Pipeline(tmp_path)
    d1, k1 = pipe.stage("s", {"a": 1}, build)
    d2, k2 = pipe.stage("s", {"a": 1}, build)
    assert (d1, k1) == (d2, k2) and len(calls) == 1 and pipe.cached == ["s"]
    _, k3 = pipe.stage("s", {"a": 2}, build)                      # another config: rebuilt in place
    assert k3 != k1 and len(calls) == 2
    # a stage interrupted before its marker was written is rebuilt, not trusted
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "partial").write_text("")
    pipe.stage("t", {}, build)
    assert len(calls) == 3 and not (tmp_path / "t" / "partial").exists()


def test_quick_demo_end_to_end(tmp_path, capsys):
    """The whole pipeline at --quick size (< 3 min on 2 idle cores), then a second run that reuses every stage."""
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KD student" in printed and "| C1 |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == set(demo.MODELS)
    for m in demo.MODELS:
        assert 0.0 <= summary["mean"][m]["general"] <= 1.0
        assert "kl" in summary["mean"][m] and "win_rate" in summary["mean"][m]
    assert summary["mean"]["sft"]["win_rate"] == 0.5
    assert summary["mean"]["teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert [c["claim"] for c in summary["claims"]] == ["C1", "C2", "C3", "C4a", "C4b", "C4"]
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "| C4 |" in report
    for d in ["teacher", "domain_expert", "seed-0/sft", "seed-0/kd", "seed-0/kd_attn", "seed-0/kd_moe", "seed-0/dae"]:
        assert (out / d / "final" / "config.json").exists(), d
        assert (out / d / "metrics.jsonl").exists(), d
    assert json.loads((out / "seed-0/kd_moe/final/config.json").read_text())["num_local_experts"] == 2
    assert json.loads((out / "teacher/final/config.json").read_text())["num_local_experts"] == 4
    pytest.importorskip("matplotlib")
    assert (out / "family_accuracy.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0

    again = demo.run_demo(out, demo.QUICK, [0], quick=True)
    assert "teacher" in again["cached"] and "seed-0/dae" in again["cached"]
    assert again["mean"] == summary["mean"]


@pytest.mark.slow
def test_full_demo_three_seeds():
    """The full demo with student seeds 0, 1, 2 (teacher and domain expert shared and cached): mean +- std per
    claim in report.md. Writes into DISTILL_DEMO_OUT (default runs/demo, so a plain demo run's stages are reused)."""
    out = Path(os.environ.get("DISTILL_DEMO_OUT", "runs/demo"))
    assert demo.main(["--seeds", "0,1,2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2]
    assert all(c["std"] is not None for c in summary["claims"] if c["mean"] is not None)
    report = (out / "report.md").read_text()
    assert "seed std" in report and "3 seed(s)" in report
