"""Every check that can be made before weights or data load: only config.json, tokenizer files and store
manifests are read, so a bad setting fails in seconds, not after a 93 GB teacher has been read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from model.hf import args_from_config
from train.config import Config, ConfigError
from train.data import tokenizer_fingerprint
from train.loss import check_compatible
from train.teachers.store import tokenizer_sha256


def read_model_args(path: str, what: str):
    """The ModelArgs of an HF model directory, from its config.json alone (the one reader of it); `what` names
    the setting that pointed there, for the error."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{what} {path!r} has no config.json; point it at an HF model directory")
    return args_from_config(json.loads(cfg_file.read_text()), where=str(cfg_file))


def read_model_dtype(path: str) -> str | None:
    """The dtype an HF directory's config.json declares (`torch_dtype`, or `dtype` in transformers 5), if one of
    ours (float32 / bfloat16 / float16); the final export is written in it."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    return name if name in ("float32", "bfloat16", "float16") else None


def check_store(store: str, name: str, vocab_size: int, cfg: Config, tok_dir: str) -> None:
    """A top-k store against the run, from its manifest.json alone."""
    mf = Path(store) / "manifest.json"
    if not mf.is_file():
        raise ConfigError(f"teachers.{name}.store={store!r} is not a complete store (no manifest.json); run or "
                          f"finish `train/main.py capture` first")
    m = json.loads(mf.read_text())
    checks = [("teacher vocab_size", m.get("vocab_size"), vocab_size, "a teacher of the student's tokenizer"),
              ("k", m.get("k"), cfg.teachers.k, f"--teachers.k={m.get('k')}"),
              ("seq_len", m.get("seq_len"), cfg.data.seq_len, f"--data.seq_len={m.get('seq_len')}")]
    for what, theirs, mine, fix in checks:
        if theirs != mine:
            raise ConfigError(f"store {store}: {what} is {theirs}, this run has {mine}; fix: {fix}")
    rows_of = m.get("rows_of")
    if rows_of not in (None, name) and cfg.subcommand == "dae":
        raise ConfigError(f"store {store} holds the rows of teacher {rows_of!r}, but is configured as teacher "
                          f"{name!r}; swap the stores or capture with --capture.rows_of={name}")
    if rows_of is not None and cfg.subcommand == "kd":  # else it fails after packing, at the first missing row
        raise ConfigError(f"store {store} holds only the rows of teacher {rows_of!r} (captured with "
                          f"--capture.rows_of={rows_of}); kd distils on every row: capture without capture.rows_of")
    theirs_tok, mine_tok = m.get("tokenizer_sha256"), tokenizer_sha256(tok_dir)
    if theirs_tok is not None and mine_tok is not None and theirs_tok != mine_tok:
        raise ConfigError(f"store {store} was captured with another tokenizer than the student's ({tok_dir}): "
                          f"tokenizer_sha256 is {theirs_tok[:12]}.. in the store, {mine_tok[:12]}.. here; distil only "
                          "between models of one tokenizer")





def preflight(cfg: Config) -> dict:
    """Everything that can be checked without loading weights or data; returns the models' ModelArgs."""
    sc = cfg.subcommand
    student = read_model_args(cfg.model.path, "model.path")
    tok_dir = cfg.data.tokenizer or cfg.model.path
    if cfg.data.paths:
        for p in cfg.data.paths:
            if not Path(p).exists():
                raise ConfigError(f"data.paths: {p!r} not found (cwd {os.getcwd()}); fix the path")
        if tokenizer_fingerprint(tok_dir) is None and not (Path(tok_dir) / "tokenizer_config.json").exists():
            raise ConfigError(f"no tokenizer in {tok_dir!r} (tokenizer.json / tokenizer.model); set "
                             f"--data.tokenizer=<directory with the student's tokenizer>")
    elif not (Path(cfg.data.packed) / "meta.json").is_file():
        raise ConfigError(f"data.packed={cfg.data.packed!r} is not a packed dataset (no meta.json); give the "
                         f"directory a PackedDataset was saved to, or use data.paths")
    teachers = {}
    if sc != "sft":
        for name, spec in cfg.teachers.named.items():
            if spec.store:
                check_store(spec.store, name, student.vocab_size, cfg, tok_dir)
                continue
            t = teachers[name] = read_model_args(spec.path, f"teachers.{name}.path")
            if t.vocab_size != student.vocab_size:
                raise ConfigError(f"teacher {name!r} has vocab_size {t.vocab_size}, the student {student.vocab_size}: "
                                 f"top-k ids would index different tokens; use a teacher and student that share "
                                 f"one tokenizer (never resize a vocabulary to make them agree)")
            mine, theirs = tokenizer_fingerprint(tok_dir), tokenizer_fingerprint(spec.path)
            if mine is not None and theirs is not None and mine != theirs:
                raise ConfigError(f"teacher {name!r} ({spec.path}) has a different tokenizer from the student's "
                                 f"({tok_dir}): same vocab size but different tokens; distil only between "
                                 f"models of one tokenizer")
        if cfg.loss.attn_weight > 0:
            (name,) = cfg.teachers.named
            try:
                check_compatible(student, teachers[name], cfg.data.seq_len)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return {"student": student, "teachers": teachers, "student_dtype": read_model_dtype(cfg.model.path)}
