"""The embedded demo: claim verdicts, the exchange rate and the stage cache on hand-made cases; the students' pool
disjoint from the teachers' rows; `--quick` end to end (default run); the full demo with 3 seeds (slow), which
writes the exchange rate and mean +- std per claim into the run's report.md."""
import json
import os
from pathlib import Path

import pytest

from train import demo
from train.demo import corpus as DD


def _metrics(general, domain):
    return {"general": general, "domain": domain}


def _seed(kd=0.5, sft=0.4, attn=0.5, moe=0.6, sft_moe=0.5, dae_gen=0.5, dae_dom=0.6, kd_dom=0.1,
          curve=(0.45, 0.5, 0.55)):
    """One seed's metrics; curve: SFT general accuracy at 2b, 4b, 8b."""
    return {"sft": _metrics(sft, 0.1), "kd": _metrics(kd, kd_dom), "kd_attn": _metrics(attn, 0.1),
            "sft_moe": _metrics(sft_moe, 0.1), "kd_moe": _metrics(moe, 0.1), "dae": _metrics(dae_gen, dae_dom),
            **{name: _metrics(acc, 0.1) for name, acc in zip(demo.SFT_BUDGETS[1:], curve, strict=True)}}


def _verdicts(claims):
    return {c["claim"]: c["verdict"] for c in claims}


def test_claims_with_seeds():
    # paired differences across 3 seeds: kd - sft = .10, .12, .08 (std .02) -> held; C3 (kd_moe - sft_moe) -
    # (kd - sft) = (.51 - .42) - .10, (.51 - .40) - .12, (.48 - .41) - .08 = -.01 each -> did not hold
    per_seed = [_seed(kd=0.5, sft=0.4, moe=0.51, sft_moe=0.42), _seed(kd=0.52, sft=0.4, moe=0.51, sft_moe=0.40),
                _seed(kd=0.48, sft=0.4, moe=0.48, sft_moe=0.41)]
    claims = demo.judge_claims(per_seed, [], [])
    v = _verdicts(claims)
    assert v["C1"] == "held"
    c1 = claims[0]
    assert c1["mean"] == pytest.approx(0.10) and c1["std"] == pytest.approx(0.02) and c1["spread_kind"] == "seed std"
    assert v["C2"] == "held (no harm)"           # attn == kd in every seed
    assert v["C3"] == "did not hold"            # the MoE student gains less
    assert claims[2]["mean"] == pytest.approx(-0.01)
    # a MoE student whose KD gain over its own SFT is larger in every seed: C3 held
    bigger = [_seed(kd=0.5, sft=0.4, moe=0.6, sft_moe=0.4), _seed(kd=0.5, sft=0.42, moe=0.61, sft_moe=0.4),
              _seed(kd=0.5, sft=0.41, moe=0.62, sft_moe=0.41)]
    c3 = next(c for c in demo.judge_claims(bigger, [], []) if c["claim"] == "C3")
    assert c3["verdict"] == "held" and c3["mean"] == pytest.approx((0.1 + 0.13 + 0.12) / 3)
    assert v["C4a"] == "held" and v["C4b"] == "held" and v["C4"] == "held"
    # DAE that loses general accuracy beyond the spread fails C4
    worse = [_seed(dae_gen=0.3), _seed(dae_gen=0.31), _seed(dae_gen=0.29)]
    assert _verdicts(demo.judge_claims(worse, [], []))["C4"] == "did not hold"


def test_claims_one_seed_use_paired_standard_error():
    # 4 general turns + 2 domain turns; kd right on 3 general turns where sft is right on 1
    is_domain = [False, False, False, False, True, True]
    correct = {"sft": [1, 0, 0, 0, 0, 0], "kd": [1, 1, 1, 0, 0, 0], "kd_attn": [1, 1, 1, 0, 0, 0],
               "sft_moe": [1, 1, 0, 0, 0, 0], "kd_moe": [1, 1, 0, 0, 0, 0], "dae": [1, 1, 1, 0, 1, 1]}
    per_seed = [_seed(kd=0.75, sft=0.25, attn=0.75, moe=0.5, sft_moe=0.5, dae_gen=0.75, dae_dom=1.0, kd_dom=0.0)]
    claims = {c["claim"]: c for c in demo.judge_claims(per_seed, [correct], is_domain)}
    # per-turn differences kd - sft on general turns: 0, 1, 1, 0 -> pstdev 0.5, s.e. 0.5 / 2 = 0.25
    assert claims["C1"]["spread"] == pytest.approx(0.25) and claims["C1"]["spread_kind"] == "paired s.e."
    assert claims["C1"]["verdict"] == "held"                     # +0.5 > 0.25
    # C3 per general turn: (kd_moe - sft_moe) - (kd - sft) = 0 - 0, 0 - 1, 0 - 1, 0 - 0 -> mean -0.5, pstdev 0.5
    assert claims["C3"]["mean"] == pytest.approx(-0.5) and claims["C3"]["spread"] == pytest.approx(0.25)
    assert claims["C3"]["verdict"] == "did not hold"
    assert claims["C4a"]["spread"] == 0.0 and claims["C4a"]["verdict"] == "held"
    assert claims["C4"]["verdict"] == "held"
    assert "| C1 |" in demo.claims_table(list(claims.values()))


def test_isotonic_fit():
    assert demo.isotonic([0.1, 0.3, 0.2, 0.4]) == pytest.approx([0.1, 0.25, 0.25, 0.4])
    assert demo.isotonic([0.5, 0.4, 0.3]) == pytest.approx([0.4, 0.4, 0.4])
    assert demo.isotonic([0.1, 0.2, 0.2, 0.3]) == [0.1, 0.2, 0.2, 0.3]


def test_exchange_rate_on_hand_made_curves():
    budgets = [1000, 2000, 4000, 8000]
    curve = [0.30, 0.40, 0.50, 0.60]
    # on a point of the curve, and halfway between 2b and 4b in log-budget: sqrt(2000 * 4000)
    assert demo.exchange_rate(budgets, curve, 0.40) == demo.Exchange(pytest.approx(2000), "=")
    assert demo.exchange_rate(budgets, curve, 0.45).instructions == pytest.approx(2000 * 2 ** 0.5)
    assert demo.exchange_rate(budgets, curve, 0.30) == demo.Exchange(1000.0, "=")
    # off the curve: bounds
    assert demo.exchange_rate(budgets, curve, 0.25) == demo.Exchange(1000.0, "<")
    assert demo.exchange_rate(budgets, curve, 0.61) == demo.Exchange(8000.0, ">")
    assert demo.Exchange(8000.0, ">").text(1000) == "more than 8b = 8,000"
    assert demo.Exchange(1000.0, "<").text(1000) == "less than b = 1,000"
    # a non-monotone curve is fitted first: [.3, .5, .4, .6] -> [.3, .45, .45, .6]; .45 is reached at 2b (the
    # first budget of the flat part), .5 a third of the way from 4b to 8b in log-budget
    bumpy = [0.30, 0.50, 0.40, 0.60]
    assert demo.exchange_rate(budgets, bumpy, 0.45).instructions == pytest.approx(2000)
    assert demo.exchange_rate(budgets, bumpy, 0.50).instructions == pytest.approx(4000 * 2 ** (1 / 3))
    with pytest.raises(ValueError, match="budgets"):
        demo.exchange_rate([2000, 1000], [0.1, 0.2], 0.15)


def test_exchange_summary_headline_and_seeds():
    # seed curves (b..8b) .30 .40 .50 .60 and .32 .42 .52 .62; KD .45 and .47: headline on the mean curve
    # (.31 .41 .51 .61 against .46) halfway between 2b and 4b; both seeds halfway too; attn above 8b in one seed
    per_seed = [_seed(sft=0.30, curve=(0.40, 0.50, 0.60), kd=0.45, attn=0.70),
                _seed(sft=0.32, curve=(0.42, 0.52, 0.62), kd=0.47, attn=0.50)]
    ex = demo.exchange_summary(per_seed, [1000, 2000, 4000, 8000])
    assert ex["kd"]["relation"] == "=" and ex["kd"]["instructions"] == pytest.approx(2000 * 2 ** 0.5)
    assert [e["instructions"] for e in ex["kd"]["per_seed"]] == pytest.approx([2000 * 2 ** 0.5] * 2)
    assert ex["kd"]["log2_std"] == pytest.approx(0.0, abs=1e-9)
    assert [e["relation"] for e in ex["kd_attn"]["per_seed"]] == [">", "="]
    assert ex["kd_attn"]["log2_std"] is None
    assert ex["sft_rise"]["raw"] == pytest.approx(0.30) and ex["sft_rise"]["std"] == pytest.approx(0.0, abs=1e-12)
    text = demo.exchange_text(ex)
    assert "The teacher was worth ~2,828 (2.83b) instructions" in text and "more than 8b = 8,000" in text


def test_students_pool_shares_no_prompt_with_the_teachers_rows(tmp_path):
    paths = DD.generate_corpus(seed=5, out_dir=tmp_path, n_train=3000, n_eval=200, n_pool=2000)
    read = lambda p: [json.loads(line) for line in open(p)]  # noqa: E731
    train, pool, evals = read(paths["train"]), read(paths["pool"]), read(paths["eval"])
    assert len(train) == 3000 and len(pool) == 2000
    assert DD.shared_prompts(pool, train) == set() and DD.shared_prompts(pool, evals) == set()
    assert DD.shared_prompts(train, evals) == set()
    assert {DD.prompt_side(DD.first_user(r)) for r in train} == {0}
    assert {DD.prompt_side(DD.first_user(r)) for r in pool} == {1}
    # same families, same domain share, every kind present: e.g. multiplication prompts on both sides
    for rows in (train, pool):
        assert {r["family"] for r in rows} == set(DD.GENERAL_FAMILIES) | {DD.DOMAIN_FAMILY}
        assert sum(r["domain"] for r in rows) == round(0.2 * len(rows))
        assert any(" times " in DD.first_user(r) for r in rows)
    # the check can fail: rows drawn without the split do share prompts (the small families repeat)
    whole = read(DD.generate_corpus(seed=6, out_dir=tmp_path / "whole", n_train=3000, n_eval=0)["train"])
    assert DD.shared_prompts(whole, train)


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
    assert summary["data"]["prompts_shared_with_pool"] == {"teacher": 0, "domain_expert": 0, "eval": 0}
    assert summary["data"]["budgets"] == [m * demo.QUICK.budget for m in demo.BUDGET_MULTIPLES]
    assert summary["exchange"]["kd"]["relation"] in ("<", "=", ">")
    assert set(summary["teacher_nll"]) == {"teacher_rows", "student_rows", "held_out"}
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "| C4 |" in report and "The teacher was worth" in report
    assert "prompts shared with the teacher's rows 0" in report
    for d in ["teacher", "domain_expert", "seed-0/dae"] + [f"seed-0/{s}" for s in demo.STUDENTS]:
        assert (out / d / "final" / "config.json").exists(), d
        assert (out / d / "metrics.jsonl").exists(), d
    for moe in ("kd_moe", "sft_moe"):
        assert json.loads((out / f"seed-0/{moe}/final/config.json").read_text())["num_local_experts"] == 2
    # the SFT budgets differ only in their rows: same steps, batch and schedule
    tokens = {s: json.loads((out / f"seed-0/{s}/metrics.jsonl").read_text().splitlines()[-1])["tokens"]
              for s in demo.STUDENTS}
    assert len(set(tokens.values())) == 1
    assert json.loads((out / "teacher/final/config.json").read_text())["num_local_experts"] == 4
    pytest.importorskip("matplotlib")
    for png in ("exchange_rate.png", "family_accuracy.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 0, png

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
    assert len(summary["exchange"]["kd"]["per_seed"]) == 3
    report = (out / "report.md").read_text()
    assert "seed std" in report and "3 seed(s)" in report and "The teacher was worth" in report
