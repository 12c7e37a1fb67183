"""Entry point: `torchrun --nproc_per_node N train/main.py SUBCOMMAND --config run.toml [--section.key=value ...]`.

With no arguments it runs the embedded demo (`train.demo.main`). See `--help` and configs/*.toml.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (`python train/main.py`, `torchrun train/main.py`): the repository root must be importable.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import importlib.util  # noqa: E402

COMMANDS = {
    "kd": "phase 1: distil a student from one teacher (online HF model or a captured top-k store)",
    "dae": "phase 2: domain alignment; each row distilled from its own teacher (`reference` or `domain`)",
    "sft": "the baseline: the same loop with lambda = 0 (cross-entropy on the answers only, no teacher)",
    "capture": "run a teacher over the packed data once and store its top-k per loss position",
    "upcycle": "turn a dense student into an MoE student (every expert a copy of the FFN)",
    "export": "a training checkpoint (run_dir/step-N/) to an HF safetensors directory",
    "eval": "evaluate models on held-out chat rows (train/eval.py; its own --help)",
}

USAGE = """usage: torchrun --nproc_per_node N train/main.py SUBCOMMAND [--config FILE.toml] [--resume auto]
                                                   [--section.key=value ...]
       python train/main.py [--quick ...]   (no subcommand: the demo; `--quick --help` for its flags)
       python train/main.py SUBCOMMAND --help   (every key of that subcommand)

subcommands:
""" + "\n".join(f"  {k:<8} {v}" for k, v in COMMANDS.items()) + """

Examples with every key commented: configs/<subcommand>.toml. Multi-node: torchrun's usual flags
(--nnodes, --node_rank, --rdzv_backend c10d --rdzv_endpoint HOST:PORT); checkpoints need a shared filesystem.
"""


def parse(argv: list[str]):
    """(subcommand, toml path or None, overrides, help requested)."""
    sub, toml, overrides, want_help = None, None, [], False
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            want_help = True
        elif a == "--config" or a.startswith("--config="):
            toml = a.split("=", 1)[1] if "=" in a else next(it, None)
            if toml is None:
                raise ValueError("--config needs a file: --config run.toml")
        elif a == "--resume" or a.startswith("--resume="):
            value = a.split("=", 1)[1] if "=" in a else next(it, None)
            if value is None:
                raise ValueError("--resume needs a value: --resume auto (or a run_dir/step-N path)")
            overrides.append(f"checkpoint.resume={value}")
        elif a.startswith("--"):
            overrides.append(a)
        elif sub is None:
            sub = a
        else:
            raise ValueError(f"unexpected argument {a!r}; overrides look like --section.key=value")
    return sub, toml, overrides, want_help


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("--") and argv[0] != "--help"
                    and not argv[0].startswith(("--config", "--resume"))):  # the demo, with its own flags
        if importlib.util.find_spec("train.demo") is None:
            print("The demo (train/demo.py) is not in this checkout yet. Run a subcommand instead:\n\n" + USAGE)
            return 0
        from train import demo
        return demo.main(argv) or 0
    if argv[0] == "eval":
        if importlib.util.find_spec("train.eval") is None:
            print("train/eval.py is not in this checkout; `eval` is unavailable", file=sys.stderr)
            return 2
        from train import eval as evaluation
        evaluation.main(argv[1:])
        return 0
    try:
        sub, toml, overrides, want_help = parse(argv)
    except ValueError as e:
        print(f"error: {e}\n\n{USAGE}", file=sys.stderr)
        return 2
    if sub is None or (want_help and sub not in COMMANDS):
        print(USAGE)
        return 0 if want_help or sub is None else 2
    from train.config import ConfigError, describe, make_config
    if sub not in COMMANDS:
        print(f"error: unknown subcommand {sub!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if want_help:
        print(f"{sub}: {COMMANDS[sub]}\n\nkeys (TOML [section] key = value, or --section.key=value):\n"
              + describe(sub))
        return 0
    try:
        cfg = make_config(sub, toml, overrides)
        _dispatch(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


def _dispatch(cfg) -> None:
    sub = cfg.subcommand
    if sub in ("kd", "dae", "sft"):
        from train.loop import run
        run_dir = run(cfg)
        if _is_rank0():
            print(f"done: {run_dir}")
    elif sub == "capture":
        capture(cfg)
    elif sub == "upcycle":
        upcycle(cfg)
    elif sub == "export":
        export(cfg)


def _is_rank0() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def capture(cfg) -> None:
    """One teacher over the packed data, once; each rank writes its share of the store (train/store.py)."""
    import torch

    from train import parallel
    from train.config import ConfigError
    from train.loop import _model_args, build_packed
    from train.store import run_capture
    (name, spec), = cfg.teachers.named.items()
    _model_args(spec.path, f"teachers.{name}.path")
    c, d = cfg.capture, cfg.data
    tok_dir = d.tokenizer or spec.path
    if d.paths and not any((Path(tok_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"no tokenizer in {tok_dir!r}; set --data.tokenizer=<the student's tokenizer directory>")
    env = parallel.init_distributed(cfg.run.device, cfg.parallel.timeout_s)
    try:
        cache = Path(d.cache_dir) if d.cache_dir else Path(c.out).with_name(Path(c.out).name + ".data")
        packed = build_packed(d, tok_dir, ["reference", "domain"] if c.rows_of else None, cache, env)
        dtype = None if cfg.teachers.dtype == "auto" else getattr(torch, cfg.teachers.dtype)
        run_capture(spec.path, packed, c.out, cfg.teachers.k, c.batch_size, rank=env.rank,
                    world_size=env.world_size, dtype=c.logprobs_dtype, teacher=c.rows_of or None,
                    tokenizer_path=tok_dir, device=env.device, compute_dtype=dtype, shard=spec.shard,
                    block_samples=c.block_samples)
    finally:
        parallel.shutdown(env)


def upcycle(cfg) -> None:
    import model as M
    from train.loop import copy_tokenizer
    u = cfg.upcycle
    dense = M.load_hf(cfg.model.path, dtype=getattr(__import__("torch"), cfg.model.dtype))
    moe = M.upcycle(dense, u.num_experts, u.top_k, router_std=u.router_std, aux_loss_coef=u.aux_loss_coef,
                    seed=u.seed)
    out = M.save_hf(moe, u.out)
    copy_tokenizer(cfg.model.path, out)
    print(f"upcycled {cfg.model.path} -> {out} ({u.num_experts} experts, top-{u.top_k})")


def export(cfg) -> None:
    import json

    import torch

    import model as M
    from train import checkpoint as ckpt
    from train.loop import LossSettings, StudentWithLoss, _model_args, copy_tokenizer
    path = Path(cfg.export.checkpoint)
    if not (path / ckpt.STATE_FILE).exists():
        newest = ckpt.latest(path)
        if newest is None:
            raise SystemExit(f"export: {path} is neither a complete step-N/ checkpoint nor a run directory that "
                             f"holds one")
        path = newest
    run_cfg = json.loads((path.parent / "config.json").read_text()) if (path.parent / "config.json").exists() else {}
    model_path = cfg.model.path or run_cfg.get("model", {}).get("path", "")
    if not model_path:
        raise SystemExit("export: set --model.path=<the student's HF directory the run started from> (its "
                         "config.json gives the architecture)")
    args = _model_args(model_path, "model.path")
    with torch.device("meta"):
        student = M.Transformer(args)
    student = student.to_empty(device="cpu")  # fp32 shell; DCP fills it, then it is cast for saving
    module = StudentWithLoss(student, LossSettings(1.0, 1.0, 0.0, 0.0))
    ckpt.load_model_only(path, module)
    student = student.to(getattr(torch, cfg.export.dtype))
    out = Path(cfg.export.out) if cfg.export.out else path.parent / f"export-{path.name}"
    M.save_hf(student, out)
    copy_tokenizer(run_cfg.get("data", {}).get("tokenizer") or model_path, out)
    print(f"exported {path} -> {out}")


if __name__ == "__main__":
    sys.exit(main())
