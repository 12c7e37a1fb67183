"""Checkpoint or trained module -> an HF directory (safetensors, config.json, tokenizer files).
`export_student` is what a run calls at its end; `export(cfg)` is the `export` subcommand.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

import model as M
from train import checkpoint as ckpt
from train import parallel
from train.config import torch_dtype
from train.errors import CheckpointError, ConfigError, ModelDirError, reraise_as

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def export_student(module: nn.Module, path: Path, env: parallel.Env, tokenizer_dir: str | None,
                   strategy: str, dtype: torch.dtype | None = None) -> None:
    """The student as an HF directory (safetensors, config.json, tokenizer files); every rank must call it.
    `dtype`: the weights' dtype on disk (the run passes the student's original one: a bf16 checkpoint in, bf16
    out, 14.5 GB for a 7B instead of 29 GB in the fp32 masters); None: the masters' dtype."""
    inner = parallel.unwrap(module).student
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            with torch.device("meta"):
                model = M.Transformer(inner.args)
            model.load_state_dict({k.removeprefix("student."): v for k, v in full.items()}, assign=True)
    else:
        model = inner
    if env.is_main:
        if dtype is not None and next(model.parameters()).dtype != dtype:
            with torch.device("meta"):
                cast = M.Transformer(model.args)
            cast.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True)
            model = cast
        M.save_hf(model, path)
        copy_tokenizer(tokenizer_dir, path)
    parallel.barrier(env)


def copy_tokenizer(src, dst: Path) -> None:
    if not src:
        return
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, dst / name)


def export(cfg) -> None:
    """The `export` subcommand: a step-N/ checkpoint (or the newest one of a run directory) -> an HF directory."""
    from train.loss import LossSettings, StudentWithLoss
    from train.preflight import read_model_args
    path = Path(cfg.export.checkpoint)
    if not path.exists():
        raise CheckpointError(f"export.checkpoint={str(path)!r} not found (cwd {Path.cwd()}); give a run_dir/step-N "
                              "directory or a run directory")
    if not (path / ckpt.STATE_FILE).exists():
        newest = ckpt.latest(path, note=print)
        if newest is None:
            raise CheckpointError(f"export.checkpoint={str(path)!r} is neither a complete step-N/ checkpoint nor a "
                                  "run directory that holds one")
        path = newest
    why = ckpt.damage(path)
    if why is not None:
        raise CheckpointError(f"export.checkpoint={str(path)!r} is damaged ({why}); export an earlier step-N/")
    run_cfg = json.loads((path.parent / "config.json").read_text()) if (path.parent / "config.json").exists() else {}
    model_path = cfg.model.path or run_cfg.get("model", {}).get("path", "")
    if not model_path:
        raise ConfigError("export: set --model.path=<the student's HF directory the run started from> (its "
                          "config.json gives the architecture)")
    args = read_model_args(model_path, "model.path")
    with torch.device("meta"):
        student = M.Transformer(args)
    student = student.to_empty(device="cpu")  # fp32 shell; DCP fills it, then it is cast for saving
    module = StudentWithLoss(student, LossSettings(1.0, 1.0, 0.0, 0.0))
    ckpt.load_model_only(path, module)
    student = student.to(torch_dtype(cfg.export.dtype))
    out = Path(cfg.export.out) if cfg.export.out else path.parent / f"export-{path.name}"
    with reraise_as(CheckpointError, f"export of {path}: "):
        M.save_hf(student, out)  # refuses NaN/Inf weights (a diverged run), writing nothing
    copy_tokenizer(run_cfg.get("data", {}).get("tokenizer") or model_path, out)
    print(f"exported {path} -> {out}")


def upcycle(cfg) -> None:
    """The `upcycle` subcommand: a dense student -> an MoE student whose experts are copies of its FFN."""
    from train.preflight import check_model_dir
    u = cfg.upcycle
    check_model_dir(cfg.model.path, "model.path")
    with reraise_as(ModelDirError, "model.path: "):
        dense = M.load_hf(cfg.model.path, dtype=torch_dtype(cfg.model.dtype))
    moe = M.upcycle(dense, u.num_experts, u.top_k, router_std=u.router_std, aux_loss_coef=u.aux_loss_coef,
                    seed=u.seed)
    out = M.save_hf(moe, u.out)
    copy_tokenizer(cfg.model.path, out)
    print(f"upcycled {cfg.model.path} -> {out} ({u.num_experts} experts, top-{u.top_k})")
