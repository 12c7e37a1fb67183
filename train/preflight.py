"""Every check that can be made before weights or data load: only config.json, tokenizer files and store
manifests are read, so a bad setting fails in seconds, not after a 93 GB teacher has been read.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from model import load_hf
from model.hf import args_from_config
from train.config import Config
from train.errors import ConfigError, DataError, ModelDirError, RunDirError
from train.data import tokenizer_fingerprint
from train.data.rows import ROW_FILE_SUFFIXES
from train.loss import check_compatible
from train.teachers.store import tokenizer_sha256


def read_config_json(path: str, what: str) -> dict:
    """An HF model directory's config.json as a dict (the one reader of it): present and valid JSON. `what`
    names the setting that pointed there."""
    d = Path(path)
    if not d.is_dir():
        raise ModelDirError(f"{what}={str(path)!r}: no such directory (cwd {os.getcwd()}); point it at an HF model "
                            "directory")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ModelDirError(f"{what}={str(path)!r} has no config.json; point it at an HF model directory")
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{cfg_file}: not valid JSON ({e}); copy config.json again") from None


def read_model_args(path: str, what: str):
    """The ModelArgs of an HF model directory from its config.json alone: complete, no remote code."""
    try:
        return args_from_config(read_config_json(path, what), where=str(Path(path) / "config.json"))
    except ModelDirError:
        raise
    except ValueError as e:
        raise ModelDirError(str(e)) from None


def check_model_dir(path: str, what: str):
    """read_model_args, then the weights as far as their headers tell (load_hf on the meta device: safetensors
    only, every shard of the index present and readable, tensor names and shapes as config.json implies), and
    the tokenizer files when the directory holds any. No weight is read."""
    args = read_model_args(path, what)
    try:
        load_hf(path, device="meta")
    except ValueError as e:
        raise ModelDirError(f"{what}: {e}") from None
    check_tokenizer_dir(path, what, required=False)
    return args


def check_tokenizer_dir(path: str, what: str, required: bool = True) -> None:
    """A tokenizer directory that AutoTokenizer can load without remote code."""
    d = Path(path)
    has_files = any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_files:
        if required:
            raise ModelDirError(f"{what}={str(path)!r} holds no tokenizer (tokenizer.json / tokenizer.model); set "
                                "--data.tokenizer=<directory with the student's tokenizer>")
        return
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        try:
            tcfg = json.loads(tc.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelDirError(f"{tc}: not valid JSON ({e}); copy the tokenizer files again") from None
        if isinstance(tcfg, dict) and tcfg.get("auto_map"):
            raise ModelDirError(f"{tc}: auto_map asks for the tokenizer's own Python code; this trainer never runs "
                                "remote code: use a tokenizer.json (fast) tokenizer")
    if required:
        from transformers import AutoTokenizer
        try:
            AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
        except Exception as e:  # transformers raises many types; the directory is the culprit either way
            raise ModelDirError(f"{what}={str(path)!r}: the tokenizer does not load ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]})") from None


def check_run_dir(run_dir: str) -> None:
    """The run directory is, or can become, a writable directory (checked before anything is written)."""
    if not run_dir:
        return
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise RunDirError(f"run.dir={run_dir!r} is a file, not a directory; choose another --run.dir")
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"run.dir={run_dir!r}: {str(probe)!r} is not writable; choose a --run.dir you can write")


def check_data_paths(paths, packed: str) -> None:
    if paths:
        for p in paths:
            path = Path(p)
            if not path.exists():
                raise DataError(f"data.paths: {p!r} not found (cwd {os.getcwd()}); fix the path")
            if path.is_file() and not path.name.lower().endswith(ROW_FILE_SUFFIXES):
                raise DataError(f"data.paths: {p!r} has an unknown file type; use {', '.join(ROW_FILE_SUFFIXES)} or a "
                                "directory written by Dataset.save_to_disk")
    elif not (Path(packed) / "meta.json").is_file():
        raise ConfigError(f"data.packed={packed!r} is not a packed dataset (no meta.json); give the directory a "
                          "PackedDataset was saved to, or use data.paths")


def read_model_dtype(path: str) -> str | None:
    """The dtype an HF directory's config.json declares (`torch_dtype`, or `dtype` in transformers 5), if one of
    ours (float32 / bfloat16 / float16); the final export is written in it."""
    cfg = read_config_json(path, "model.path")
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





# The Mistral family's two vocabularies: v1 (32,000 tokens: Mistral-7B v0.1 / v0.2, Mixtral-8x7B v0.1) and v3
# (32,768: Mistral-7B v0.3, Mixtral-8x22B v0.1). The paper's pair is the v0.1 family.
MISTRAL_VOCABS = {32000: "Mistral-7B(-Instruct)-v0.1/v0.2 or Mixtral-8x7B(-Instruct)-v0.1",
                  32768: "Mistral-7B(-Instruct)-v0.3 or Mixtral-8x22B(-Instruct)-v0.1"}


def pairing_hint(teacher_vocab: int, student_vocab: int) -> str:
    """What pairs with what when a teacher and student come from the two Mistral vocabularies ('' otherwise)."""
    if {teacher_vocab, student_vocab} != set(MISTRAL_VOCABS):
        return ""
    return (f". The {teacher_vocab:,}-token teacher pairs with a student of {MISTRAL_VOCABS[teacher_vocab]}; the "
            f"{student_vocab:,}-token student with a teacher of {MISTRAL_VOCABS[student_vocab]} (the paper's pair: "
            f"Mixtral-8x7B-Instruct-v0.1 teaching Mistral-7B-v0.1)")


def check_placements(cfg: Config, teachers: dict, world: int | None = None, local: int | None = None) -> None:
    """Each online teacher's placement against the world torchrun starts (WORLD_SIZE, LOCAL_WORLD_SIZE by
    default): a sharded or expert-placed teacher splits over the ranks of one node (train.parallel.node_mesh), so
    the world must be whole nodes and the teacher's tensors must split evenly over a node. `teachers`: their
    ModelArgs by name. One rank is a one-rank mesh: any placement then holds the whole teacher."""
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    local = local if local is not None else int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    for name, spec in cfg.teachers.named.items():
        if spec.placement == "replicate" or not spec.path:
            continue
        what = f"teachers.{name}.placement = {spec.placement!r}"
        if local < 1 or world % local:
            raise ConfigError(f"{what} splits the teacher over one node's ranks, but {world} ranks are not whole "
                              f"nodes of {local} (LOCAL_WORLD_SIZE); start the same number of processes on every "
                              f"node, or use placement = \"replicate\"")
        a = teachers[name]
        if spec.placement == "expert":
            if a.moe is None:
                raise ConfigError(f"{what}: teacher {name!r} ({spec.path}) is dense, it has no experts to place; use "
                                  f"placement = \"shard\" (or \"replicate\")")
            E = a.moe.num_experts
            if E % local:
                raise ConfigError(f"{what}: {E} experts cannot be split whole over a node of {local} ranks ({E} is "
                                  f"not a multiple of {local}); use placement = \"shard\", or nodes of a divisor "
                                  f"of {E} GPUs")
        elif a.moe is not None:
            E, F, D = a.moe.num_experts, a.hidden_dim, a.dim
            if E % local and ((2 * F) % local or D % local):  # train.parallel.expert_placement's rule
                raise ConfigError(f"{what}: {E} experts ([{E}, {2 * F}, {D}] and [{E}, {D}, {F}]) cannot be split "
                                  f"evenly over a node of {local} ranks (neither {E} nor {2 * F} and {D} are "
                                  f"multiples of {local}); use placement = \"replicate\", or nodes of a divisor of "
                                  f"{E} GPUs")


def preflight(cfg: Config) -> dict:
    """Everything that can be checked without loading weights or data; returns the models' ModelArgs."""
    sc = cfg.subcommand
    check_run_dir(cfg.run.dir)
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard = true needs the tensorboard package: pip install tensorboard (or "
                          "pip install '.[tensorboard]'); or set --logging.tensorboard=false")
    student = check_model_dir(cfg.model.path, "model.path")
    tok_dir = cfg.data.tokenizer or cfg.model.path
    check_data_paths(cfg.data.paths, cfg.data.packed)
    if cfg.data.paths:
        check_tokenizer_dir(tok_dir, "data.tokenizer" if cfg.data.tokenizer else "model.path (its tokenizer)")
    teachers = {}
    if sc != "sft":
        if cfg.teachers.k > student.vocab_size:
            raise ConfigError(f"teachers.k={cfg.teachers.k} exceeds the vocabulary ({student.vocab_size} tokens); "
                              f"use --teachers.k={min(64, student.vocab_size)}")
        for name, spec in cfg.teachers.named.items():
            if spec.store:
                check_store(spec.store, name, student.vocab_size, cfg, tok_dir)
                continue
            t = teachers[name] = check_model_dir(spec.path, f"teachers.{name}.path")
            if t.vocab_size != student.vocab_size:
                raise ConfigError(f"teacher {name!r} has vocab_size {t.vocab_size}, the student {student.vocab_size}: "
                                  f"top-k ids would index different tokens; use a teacher and student that share "
                                  f"one tokenizer (never resize a vocabulary to make them agree)"
                                  + pairing_hint(t.vocab_size, student.vocab_size))
            mine, theirs = tokenizer_fingerprint(tok_dir), tokenizer_fingerprint(spec.path)
            if mine is not None and theirs is not None and mine != theirs:
                raise ConfigError(f"teacher {name!r} ({spec.path}) has a different tokenizer from the student's "
                                  f"({tok_dir}): same vocab size but different tokens; distil only between "
                                  f"models of one tokenizer")
        check_placements(cfg, teachers)
        if cfg.loss.attn_weight > 0:
            (name,) = cfg.teachers.named
            try:
                check_compatible(student, teachers[name], cfg.data.seq_len)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return {"student": student, "teachers": teachers, "student_dtype": read_model_dtype(cfg.model.path)}
