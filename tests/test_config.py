"""Config: TOML + dotted overrides into per-component dataclasses; example files complete; errors name the fix."""
import dataclasses
import re
from pathlib import Path

import pytest

from train.config import (SECTION_TYPES, SECTIONS, ConfigError, TeacherConfig, make_config, to_toml,
                          write_resolved)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("sub", list(SECTIONS))
def test_example_file_parses_and_comments_every_key(sub):
    path = CONFIGS / f"{sub}.toml"
    cfg = make_config(sub, path)
    text = path.read_text()
    for section in SECTIONS[sub]:
        assert f"[{section}]" in text
        for f in dataclasses.fields(SECTION_TYPES[section]):
            if f.name == "named":
                continue
            m = re.search(rf"^((?:# .*\n)+)#? ?{f.name} = ", text.split(f"[{section}]")[1], re.M)
            assert m, f"{sub}.toml: [{section}] {f.name} missing or without a comment"
    if "teachers" in SECTIONS[sub]:
        assert cfg.teachers.named and all(f"[teachers.{n}]" in text for n in cfg.teachers.named)
        for f in dataclasses.fields(TeacherConfig):
            assert re.search(rf"^#? ?{f.name} = ", text, re.M)


def test_overrides_coerce_types_and_round_trip(tmp_path):
    cfg = make_config("dae", CONFIGS / "dae.toml", [
        "--optim.lr=3e-5", "data.paths=a.jsonl,b.jsonl", "--optim.betas=[0.8, 0.9]", "--data.domain_fraction=0.3",
        "--parallel.compile=true", "--schedule.steps=70", "--loss.aux_coef=0.01", "--teachers.domain.store=s",
        "--teachers.domain.path=", "--logging.peak_tflops=none"])
    assert cfg.optim.lr == 3e-5 and cfg.data.paths == ["a.jsonl", "b.jsonl"] and cfg.optim.betas == [0.8, 0.9]
    assert cfg.parallel.compile is True and cfg.schedule.steps == 70 and cfg.data.domain_fraction == 0.3
    assert cfg.teachers.named["domain"].store == "s" and cfg.teachers.named["domain"].path == ""
    assert cfg.logging.peak_tflops is None
    write_resolved(cfg, tmp_path)
    again = make_config("dae", tmp_path / "config.toml")
    assert again == cfg and to_toml(again) == to_toml(cfg)
    assert (tmp_path / "config.json").exists()


def test_each_component_gets_its_own_dataclass():
    cfg = make_config("kd", CONFIGS / "kd.toml")
    for s in SECTIONS["kd"]:
        assert isinstance(getattr(cfg, s), SECTION_TYPES[s])
    assert cfg.teachers.named["teacher"] == TeacherConfig(path="models/Mixtral-8x7B-Instruct-v0.1",
                                                          placement="replicate")


def test_teacher_placement_resolves_and_refuses():
    """placement: shard = true is "shard"; the resolved config says which; bad values are named errors."""
    kd = CONFIGS / "kd.toml"
    assert make_config("kd", kd).teachers.named["teacher"].placement == "replicate"
    t = make_config("kd", kd, ["teachers.teacher.shard=true"]).teachers.named["teacher"]
    assert (t.placement, t.shard) == ("shard", True)
    t = make_config("kd", kd, ["teachers.teacher.placement=expert", "teachers.teacher.max_tokens=8192"])
    assert (t.teachers.named["teacher"].placement, t.teachers.named["teacher"].shard) == ("expert", False)
    assert t.teachers.named["teacher"].max_tokens == 8192
    for overrides, pattern in [
            (["teachers.teacher.placement=fsdp"], r"teachers\.teacher\.placement='fsdp'; use one of replicate, "
                                                  r"shard, expert"),
            (["teachers.teacher.shard=true", "teachers.teacher.placement=expert"], r"shard = true is placement = "
                                                                                   r"\"shard\", but placement = "
                                                                                   r"'expert'"),
            (["teachers.teacher.max_tokens=-1"], r"teachers\.teacher\.max_tokens=-1"),
            (["teachers.teacher.path=", "teachers.teacher.store=s", "teachers.teacher.placement=shard"],
             r"a store has none")]:
        with pytest.raises(ConfigError, match=pattern):
            make_config("kd", kd, overrides)


def test_sft_forces_lambda_zero():
    assert make_config("sft", CONFIGS / "sft.toml", ["loss.kd_weight=0.5"]).loss.kd_weight == 0.0


@pytest.mark.parametrize("overrides,pattern", [
    (["optim.lrr=1"], r"unknown key optim\.lrr; valid keys of \[optim\]: lr, betas, eps"),
    (["optim.lr=abc"], r"optim\.lr = 'abc'.*expected float"),
    (["parallel.compile=maybe"], r"not a boolean"),
    (["data.micro_batch=2.5"], r"data\.micro_batch"),
    (["nosection.key=1"], r"section \[nosection\] is not read by `kd`; valid sections: run, model"),
    (["teachers.teacher.paths=x"], r"valid keys of \[teachers\.teacher\]: path, store, shard, placement, max_tokens"),
    (["optim.lr"], r"must look like --section\.key=value"),
    (["a.b.c.d=1"], r"section\.key"),
    (["model.path="], r"model\.path is missing"),
    (["teachers.teacher.store=x"], r"exactly one of path"),
    (["loss.tau=0"], r"temperature must be > 0"),
    (["schedule.warmup_steps=5000"], r"warmup_steps"),
    (["loss.attn_weight=1", "teachers.teacher.path=", "teachers.teacher.store=s"], r"needs an online teacher"),
    (["teachers.second.path=x"], r"kd uses one teacher"),
])
def test_bad_overrides(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make_config("kd", CONFIGS / "kd.toml", overrides)


def test_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = \"fast\"\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: optim\.lr = 'fast': got str; expected float"):
        make_config("kd", bad, ["model.path=m", "data.paths=d", "teachers.t.path=t"])
    bad.write_text("[optim\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        make_config("kd", bad)
    bad.write_text("lr = 1\n")
    with pytest.raises(ConfigError, match="must be a \\[section\\] table"):
        make_config("kd", bad)
    with pytest.raises(ConfigError, match="not found"):
        make_config("kd", tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown subcommand 'train'"):
        make_config("train")
