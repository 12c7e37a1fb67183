"""Entry point: `torchrun --nproc_per_node N train/main.py SUBCOMMAND --config run.toml [--section.key=value ...]`.

With no arguments it runs the embedded demo (`train.demo.main`). See `--help` and configs/*.toml.
"""
from __future__ import annotations

import os
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
    "prepare": "tokenise and pack the rows once into the shared cache (CPU, parallel); kd/dae/sft/capture find it",
    "upcycle": "turn a dense student into an MoE student (every expert a copy of the FFN)",
    "export": "a training checkpoint (run_dir/step-N/) to an HF safetensors directory",
    "eval": "evaluate models on held-out chat rows (train/eval.py; its own --help)",
    "plan": "memory per GPU, step time and whether a kd/dae/sft config fits N nodes x G GPUs (no GPU, no weights)",
}

USAGE = """usage: torchrun --nproc_per_node N train/main.py SUBCOMMAND [--config FILE.toml] [--resume auto]
                                                   [--section.key=value ...]
       python train/main.py [--quick ...]   (no subcommand: the demo; `--quick --help` for its flags)
       python train/main.py SUBCOMMAND --help   (every key of that subcommand)
       --debug (anywhere, or DISTILL_DEBUG=1): show the traceback of an expected error (bad input)

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
    """The error boundary: an expected failure (train.errors.UserError: bad config, model directory, data, store,
    checkpoint, run directory) is one line on stderr and exit code 2; `--debug` (or DISTILL_DEBUG=1) re-raises
    it with its traceback. Any other exception is a bug and keeps its traceback. Under torchrun only rank 0
    prints the line; the other ranks exit 2 quietly."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("DISTILL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    from train.errors import ConfigError, UserError
    try:
        return _main(argv)
    except UserError as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            kind = "config error" if isinstance(e, ConfigError) else "error"
            print(f"{kind}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2


def _main(argv: list[str]) -> int:
    if not argv or (argv[0].startswith("--") and argv[0] != "--help"
                    and not argv[0].startswith(("--config", "--resume"))):  # the demo, with its own flags
        if importlib.util.find_spec("train.demo") is None:
            print("The demo (train/demo/) is not in this checkout yet. Run a subcommand instead:\n\n" + USAGE)
            return 0
        from train import demo
        return demo.main(argv) or 0
    if argv[0] == "eval":
        from train import eval as evaluation
        evaluation.main(argv[1:])
        return 0
    try:
        sub, toml, overrides, want_help = parse(argv)
    except ValueError as e:
        print(f"error: {e} (train/main.py --help for the usage)", file=sys.stderr)
        return 2
    if sub is None or (want_help and sub not in COMMANDS):
        print(USAGE)
        return 0 if want_help or sub is None else 2
    from train.config import describe, make_config
    if sub not in COMMANDS:
        print(f"error: unknown subcommand {sub!r}; choose one of {', '.join(COMMANDS)} (train/main.py --help)",
              file=sys.stderr)
        return 2
    if want_help:
        print(f"{sub}: {COMMANDS[sub]}\n\nkeys (TOML [section] key = value, or --section.key=value):\n"
              + describe(sub))
        return 0
    _dispatch(make_config(sub, toml, overrides))
    return 0


def _dispatch(cfg) -> None:
    sub = cfg.subcommand
    if sub in ("kd", "dae", "sft"):
        from train.loop import run
        run_dir = run(cfg)
        if _is_rank0():
            print(f"done: {run_dir}")
    elif sub == "capture":
        from train.teachers.capture import capture
        capture(cfg)
    elif sub == "prepare":
        from train.data.prepare import prepare
        d = cfg.data
        prepare(d.paths, d.tokenizer, d.seq_len, ["reference", "domain"] if cfg.prepare.phase == 2 else None,
                d.pad_id, d.cache_dir or None, processes=d.num_proc, chunk_rows=cfg.prepare.chunk_rows)
    elif sub == "upcycle":
        from train.export import upcycle
        upcycle(cfg)
    elif sub == "export":
        from train.export import export
        export(cfg)
    elif sub == "plan":
        from train.plan import run_plan
        run_plan(cfg)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
