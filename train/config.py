"""Run configuration: one dataclass per component, read from TOML, overridden by dotted flags.

    cfg = make_config("kd", "configs/kd.toml", ["optim.lr=2e-5", "--teachers.teacher.path=/ckpt/mixtral"])

Every key has a default and a help text (the `help` metadata below); `configs/<subcommand>.toml` shows each
key with its help as a comment, and `python train/main.py SUBCOMMAND --help` prints the same list. A key
that does not exist, a value of the wrong type or a section the subcommand does not read is a `ValueError`
that lists the valid keys. Only structure and value ranges are checked here (cheap, no files opened); the
trainer checks paths, vocabularies and layer shapes from the models' config.json files before loading any
weights (`train.loop.preflight`).

Components receive their own section only (`cfg.optim` goes to the optimizer, `cfg.data` to the data
pipeline, ...); `Config` is the bundle the entry point hands out, not an object threaded everywhere.
TOML has no null: optional keys (type `X | None`) are left out of the file to mean None, and `none` on the
command line sets None.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from train.errors import ConfigError  # re-exported: train.config.ConfigError

SUBCOMMANDS = ("kd", "dae", "sft", "capture", "prepare", "upcycle", "export", "plan")


def _f(default, help: str, example=None):
    """A dataclass field with a help text (shown in --help and as the comment in configs/*.toml); optional
    keys (default None) carry an example value for the commented-out line of the example files."""
    meta = {"help": help, "example": example}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dir: str = _f("", "run directory (config, metrics.jsonl, step-N/ checkpoints, final/); empty: "
                      "runs/<subcommand>-<date>-<time>")
    seed: int = _f(0, "seed of torch, numpy and Python RNGs and of the data order (applied on every rank)")
    device: str = _f("auto", "auto (cuda when available), cuda or cpu")


@dataclass
class ModelConfig:
    path: str = _f("", "student: HF directory (MistralForCausalLM / MixtralForCausalLM, safetensors); dae: "
                       "the phase-1 student's final/; upcycle: the dense model; export: optional (default: "
                       "the run's)")
    dtype: str = _f("float32", "dtype of the student's weights and optimizer state (float32 or bfloat16); on "
                               "CUDA the forward runs under bf16 autocast either way")


@dataclass
class DataConfig:
    paths: list[str] = _f([], "chat rows: JSONL / JSON / parquet files or save_to_disk directories "
                              "(`messages`, optional `teacher` or `domain` per row)")
    packed: str = _f("", "instead of `paths`: a directory written by train.data.PackedDataset.save (offline "
                         "teachers need exactly the packing their store was captured on)")
    tokenizer: str = _f("", "tokenizer directory; empty: model.path")
    seq_len: int = _f(2048, "tokens per packed sequence")
    micro_batch: int = _f(1, "sequences per rank per forward/backward")
    grad_accum: int = _f(1, "micro-batches per optimizer step; global batch = micro_batch * grad_accum * ranks")
    domain_fraction: float | None = _f(None, "dae: fraction of sequences drawn from `domain` rows (the paper "
                                             "used ~0.1); leave out for the dataset's own mix", example=0.1)
    pad_id: int | None = _f(None, "an EXISTING token id used for padding (label -100); leave out: the "
                                  "tokenizer's pad, else eos", example=2)
    cache_dir: str = _f("", "shared cache of prepared (tokenised and packed) data, found there by a key of the rows' "
                            "files, tokenizer, seq_len and packing settings; every later run with the same data "
                            "reuses it; empty: $DISTILL_DATA_CACHE, else ~/.cache/distill/data")
    num_proc: int | None = _f(None, "tokenisation processes when preparing; leave out: every CPU core", example=8)


PLACEMENTS = ("replicate", "shard", "expert")  # how an online teacher's weights sit on the GPUs of a node


@dataclass
class TeacherConfig:
    path: str = _f("", "online teacher: HF directory, loaded frozen on every rank")
    store: str = _f("", "offline teacher: top-k store directory written by `capture`")
    shard: bool = _f(False, "online teacher: the same as placement = \"shard\" (kept for older configs)")
    placement: str = _f("", "online teacher: replicate (a whole copy on every GPU), shard (FSDP2 over the GPUs of "
                            "one node, for a teacher larger than one GPU) or expert (each GPU of the node holds "
                            "whole experts); empty: shard when shard = true, else replicate")
    max_tokens: int = _f(0, "online teacher: tokens per forward when a step's signals are computed up front (the "
                            "rows of all micro-batches together); 0 = all of a step's rows in one forward; `plan` "
                            "reports the largest that fits")


@dataclass
class TeachersConfig:
    k: int = _f(64, "teacher top-k kept per loss position (32..128 is the useful range)")
    dtype: str = _f("auto", "dtype of online teachers' weights: auto (bfloat16 on CUDA, float32 on CPU), "
                            "bfloat16 or float32")
    named: dict[str, TeacherConfig] = _f({}, "one [teachers.<name>] table per teacher: kd/capture one teacher "
                                            "(any name, rows without `teacher` use `reference`), dae exactly "
                                            "`reference` and `domain`")


@dataclass
class LossConfig:
    kd_weight: float = _f(1.0, "lambda: loss = (1 - lambda) * CE + lambda * KD (paper: 1.0; sft forces 0)")
    tau: float = _f(1.0, "distillation temperature (KD term scaled by tau^2; paper: 1.0)")
    attn_weight: float = _f(0.0, "weight of the attention-transfer term (kd with an online teacher of the same "
                                 "layers and heads only); 0 = off")
    aux_coef: float | None = _f(None, "MoE students: weight of the load-balancing loss; leave out: the "
                                      "student's router_aux_loss_coef", example=0.02)


@dataclass
class OptimConfig:
    lr: float = _f(1e-5, "peak learning rate (AdamW)")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.0, "decoupled weight decay on matrices (norm gains excluded)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value; 0 = no clipping")
    max_bad_steps: int = _f(10, "non-finite loss or gradient: the step is skipped; after this many in a row the "
                                "run stops (the last checkpoint stays intact)")


@dataclass
class ScheduleConfig:
    steps: int = _f(1000, "optimizer steps in the run")
    warmup_steps: int = _f(0, "linear warm-up from 0 to optim.lr")
    min_lr_ratio: float = _f(0.1, "cosine decay ends at min_lr_ratio * optim.lr")


@dataclass
class ParallelConfig:
    strategy: str = _f("auto", "fsdp (FSDP2 fully_shard), ddp, or none; auto: fsdp on several GPUs, ddp on "
                               "several CPU processes, none for one process")
    activation_checkpointing: bool = _f(False, "recompute each transformer block in the backward")
    compile: bool = _f(False, "torch.compile each transformer block")
    timeout_s: int = _f(1800, "collective timeout (process group init)")
    mixed_precision: str = _f("auto", "bf16: every matmul in bf16, fp32 master weights and optimizer state, fp32 "
                                      "gradient reduction (FSDP2 MixedPrecisionPolicy; autocast under ddp/none); "
                                      "fp32: fp32 all through; auto: bf16 on CUDA, fp32 on the CPU")
    shard_group: int = _f(0, "fsdp: ranks that shard one copy of the model; the world is replicate x shard "
                             "(HSDP) when it is smaller than the world. 0: the node's GPUs when there are "
                             "several nodes, else every rank")
    fit_check: bool = _f(True, "on CUDA: at start-up, plan this run (train/main.py plan, in a subprocess on "
                               "rank 0) against the GPU's memory and stop one whose planned peak exceeds it, "
                               "naming the fix; false: start anyway")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "save a checkpoint every N optimizer steps (0: only on SIGTERM/SIGINT)")
    keep: int = _f(2, "complete checkpoints kept (older ones deleted after a newer one is complete)")
    resume: str = _f("", "'auto': continue from the newest complete step-N/ in run.dir (fresh start when there "
                         "is none); a step-N/ path: from that one; empty: fresh run")
    export_final: bool = _f(True, "write the final student to run_dir/final/ (HF safetensors), in the dtype of "
                                  "model.path's config.json")
    async_save: bool = _f(True, "write checkpoints from a background thread (DCP async_save): the step waits only "
                                "for a copy of the state to host memory (one per rank); false: write in the step")


@dataclass
class LoggingConfig:
    every: int = _f(10, "one log line and metrics.jsonl record every N steps")
    progress: bool = _f(True, "tqdm progress bar on rank 0 (when tqdm is installed)")
    plot: bool = _f(True, "loss_curve.png at the end (when matplotlib is installed)")
    tensorboard: bool = _f(False, "also write the metrics.jsonl scalars to run_dir/tensorboard/ (pip install "
                                  "tensorboard)")
    peak_tflops: float | None = _f(None, "accelerator peak bf16 TFLOP/s for MFU; leave out: from the GPU name",
                                   example=989.0)


@dataclass
class EvalConfig:
    every: int = _f(0, "validation every N optimizer steps on held-out rows (0: off): CE on the answer tokens, "
                       "KL(teacher || student) over the teacher's top-k (tau = 1) and top-1 agreement, as val_* in "
                       "metrics.jsonl; needs one of paths, packed, fraction")
    paths: list[str] = _f([], "held-out chat rows (the data.paths schema), prepared and packed as the training rows")
    packed: str = _f("", "instead of paths: held-out data prepared by `train/main.py prepare` (a prepared-* directory "
                         "of the cache), of the student's tokenizer and data.seq_len")
    fraction: float = _f(0.0, "instead of paths: set this fraction of the training data's packed sequences (whole "
                              "documents) aside before sampling; they never reach training, and a store captured "
                              "from the data covers them")
    max_tokens: int = _f(65536, "tokens (sequences x data.seq_len) per validation at most: the first held-out "
                                "sequences of a fixed order, split evenly over the ranks")


@dataclass
class CaptureConfig:
    out: str = _f("", "store directory to write (top-k ids and log-probs per loss position, plus the packed "
                      "data they key on)")
    batch_size: int = _f(8, "sequences per teacher forward")
    rows_of: str = _f("", "phase 2: capture only the rows of this teacher (`reference` or `domain`; the data is "
                          "then packed as dae packs it); empty: every row (phase 1)")
    logprobs_dtype: str = _f("float16", "stored log-probability dtype: float16 or bfloat16")
    block_samples: int = _f(64, "sequences per committed block (a restarted capture resumes after the last)")


@dataclass
class PrepareConfig:
    phase: int = _f(1, "which runs will read the data, i.e. how teachers are packed: 1 = kd, sft and capture (every "
                       "teacher the rows name, `reference` first); 2 = dae and capture with rows_of (`reference`, "
                       "`domain`)")
    chunk_rows: int = _f(2048, "rows per tokenisation task (the unit handed to a process)")


@dataclass
class UpcycleConfig:
    out: str = _f("", "HF directory to write the MoE student to")
    num_experts: int = _f(2, "experts per layer (the paper's 2x7B: 2)")
    top_k: int = _f(2, "experts per token")
    aux_loss_coef: float = _f(0.02, "router load-balancing coefficient stored in the new config.json")
    router_std: float = _f(0.02, "std of the random router init (zeros would tie every token)")
    seed: int = _f(0, "seed of the router init")


@dataclass
class ExportConfig:
    checkpoint: str = _f("", "a step-N/ directory, or a run directory (its newest complete checkpoint)")
    out: str = _f("", "HF directory to write; empty: <checkpoint's run dir>/export-step-N")
    dtype: str = _f("bfloat16", "dtype of the exported weights")


@dataclass
class PlanConfig:
    nodes: int = _f(1, "nodes of the planned run")
    gpus_per_node: int = _f(8, "GPUs per node")
    gpu_memory_gb: float = _f(80.0, "memory of one GPU in GB (1e9 bytes): 80 for H100-80GB, 141 for H200")
    peak_tflops: float = _f(989.0, "dense bf16 peak of one GPU in TFLOP/s (H100 / H200 SXM: 989)")
    mfu: float = _f(0.4, "model FLOPs utilisation assumed for the step-time estimate")
    headroom_gb: float = _f(4.0, "memory left for the CUDA context, NCCL buffers and fragmentation")


SECTION_TYPES = {
    "run": RunConfig, "model": ModelConfig, "data": DataConfig, "teachers": TeachersConfig, "loss": LossConfig,
    "optim": OptimConfig, "schedule": ScheduleConfig, "parallel": ParallelConfig, "checkpoint": CheckpointConfig,
    "logging": LoggingConfig, "capture": CaptureConfig, "prepare": PrepareConfig, "upcycle": UpcycleConfig,
    "export": ExportConfig, "plan": PlanConfig, "eval": EvalConfig,
}
_TRAIN = ("run", "model", "data", "teachers", "loss", "optim", "schedule", "parallel", "checkpoint", "logging",
          "eval")
SECTIONS = {
    "kd": _TRAIN, "dae": _TRAIN, "sft": tuple(s for s in _TRAIN if s != "teachers"),
    "capture": ("run", "data", "teachers", "parallel", "capture"),
    "prepare": ("data", "prepare"),
    "upcycle": ("model", "upcycle"),
    "export": ("model", "export"),
    "plan": _TRAIN + ("plan",),  # reads a kd / dae / sft run's file as it is
}


@dataclass
class Config:
    subcommand: str
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def sections(self) -> tuple[str, ...]:
        return SECTIONS[self.subcommand]

    def to_dict(self) -> dict:
        """The sections this subcommand reads, as plain TOML-able values (None dropped)."""
        out = {}
        for s in self.sections:
            d = dataclasses.asdict(getattr(self, s))
            if s == "teachers":
                d.update(d.pop("named"))
            out[s] = _drop_none(d)
        return {"subcommand": self.subcommand, **out}


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """The one map from a config's dtype name to torch's dtype; "auto" -> None (the component decides)."""
    if name == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r} is not one of {DTYPE_NAMES} (or auto)")
    import torch
    return getattr(torch, name)


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


# ------------------------------------------------------------------------------------------------------------
# Building: defaults <- TOML <- overrides, with type checks


def make_config(subcommand: str, toml_path=None, overrides=()) -> Config:
    """Defaults, then the TOML file, then `section.key=value` overrides (leading `--` allowed); checked."""
    if subcommand not in SECTIONS:
        raise ConfigError(f"unknown subcommand {subcommand!r}; valid: {', '.join(SECTIONS)}")
    cfg = Config(subcommand)
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing TOML file (examples: configs/*.toml)")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax") from e
        data.pop("subcommand", None)  # resolved configs carry it; the command line decides
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table; valid sections "
                                 f"for {subcommand}: {', '.join(cfg.sections)}")
            for key, value in table.items():
                _set(cfg, section, key, value, from_text=False, where=str(path))
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value "
                             f"(e.g. --optim.lr=2e-5)")
        dotted, value = text.split("=", 1)
        parts = dotted.split(".")
        if len(parts) == 3 and parts[0] == "teachers":
            _set(cfg, "teachers", parts[1], {parts[2]: value}, from_text=True, where=f"override {item!r}")
        elif len(parts) == 2:
            _set(cfg, parts[0], parts[1], value, from_text=True, where=f"override {item!r}")
        else:
            raise ConfigError(f"override {item!r}: the key must be section.key (or teachers.<name>.key)")
    validate(cfg)
    return cfg


def _set(cfg: Config, section: str, key: str, value, *, from_text: bool, where: str) -> None:
    if section not in cfg.sections:
        raise ConfigError(f"{where}: section [{section}] is not read by `{cfg.subcommand}`; valid sections: "
                         f"{', '.join(cfg.sections)}")
    obj = getattr(cfg, section)
    if section == "teachers" and isinstance(value, dict):  # [teachers.<name>] table
        spec = obj.named.setdefault(key, TeacherConfig())
        for k, v in value.items():
            _set_field(spec, f"teachers.{key}", k, v, from_text, where)
        return
    if section == "teachers" and key == "named":
        raise ConfigError(f"{where}: give teachers as [teachers.<name>] tables, e.g. [teachers.reference] "
                         f"path = \"...\"")
    _set_field(obj, section, key, value, from_text, where)


def _set_field(obj, section: str, key: str, value, from_text: bool, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj) if f.name != "named"}
    if key not in fields:
        extra = " (or a [teachers.<name>] table)" if section == "teachers" else ""
        raise ConfigError(f"{where}: unknown key {section}.{key}; valid keys of [{section}]: "
                         f"{', '.join(fields)}{extra}")
    hint = typing.get_type_hints(type(obj))[key]
    try:
        setattr(obj, key, _coerce_text(value, hint) if from_text else _check_value(value, hint))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {section}.{key} = {value!r}: {e}; expected {_type_name(hint)}") from None


def _optional(hint):
    """(inner type, allows None)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _type_name(hint) -> str:
    inner, opt = _optional(hint)
    name = getattr(inner, "__name__", str(inner)) if typing.get_origin(inner) is None else str(inner)
    return name + (" (or `none`)" if opt else "")


def _check_value(value, hint):
    """A TOML value against a field type: ints are accepted for floats, nothing else converts."""
    inner, _ = _optional(hint)
    if typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner)
        if not isinstance(value, list):
            raise TypeError(f"got {type(value).__name__}")
        return [_check_value(v, elem) for v in value]
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is int and isinstance(value, bool) or not isinstance(value, inner):
        raise TypeError(f"got {type(value).__name__}")
    return value


def _coerce_text(text: str, hint):
    """A command-line string to a field type."""
    inner, opt = _optional(hint)
    if opt and text.strip().lower() in ("none", "null"):
        return None
    if typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner)
        s = text.strip()
        if s.startswith("["):
            try:
                return _check_value(tomllib.loads(f"v = {s}")["v"], inner)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"not a TOML array ({e})") from None
        return [_coerce_text(p.strip(), elem) for p in s.split(",") if p.strip()]
    if inner is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError("not a boolean (true/false)")
    if inner is int:
        return int(text)
    if inner is float:
        return float(text)
    return text


# ------------------------------------------------------------------------------------------------------------
# Checks that need no files


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Value ranges and subcommand rules; raises ValueError naming the key and the fix."""
    sc = cfg.subcommand
    if "run" in cfg.sections:
        _require(cfg.run.device in ("auto", "cpu", "cuda"), f"run.device={cfg.run.device!r}; use auto, cpu or cuda")
        _require(cfg.run.seed >= 0, f"run.seed={cfg.run.seed}; use a non-negative seed")
    if "model" in cfg.sections and sc != "export":  # export reads it from the run's config.json
        _require(bool(cfg.model.path), f"model.path is missing; set --model.path=<HF directory of the "
                                       f"{'model to upcycle' if sc == 'upcycle' else 'student'}>")
        _require(cfg.model.dtype in ("float32", "bfloat16"),
                 f"model.dtype={cfg.model.dtype!r}; use float32 or bfloat16")
    if "data" in cfg.sections:
        d = cfg.data
        _require(bool(d.paths) != bool(d.packed) or sc == "plan",  # plan reads no data
                 "give exactly one of data.paths (chat rows) and data.packed (a packed dataset directory)")
        _require(d.seq_len >= 2, f"data.seq_len={d.seq_len}; use at least 2")
        _require(d.micro_batch >= 1, f"data.micro_batch={d.micro_batch}; use at least 1")
        _require(d.grad_accum >= 1, f"data.grad_accum={d.grad_accum}; use at least 1")
        if d.domain_fraction is not None:
            _require(0.0 <= d.domain_fraction <= 1.0, f"data.domain_fraction={d.domain_fraction}; use a value "
                                                      f"in [0, 1]")
            _require(sc == "dae", f"data.domain_fraction is a dae setting; remove it for {sc}")
    if "teachers" in cfg.sections:
        t = cfg.teachers
        _require(1 <= t.k, f"teachers.k={t.k}; use at least 1 (32..128 is typical)")
        _require(t.dtype in ("auto", "float32", "bfloat16"),
                 f"teachers.dtype={t.dtype!r}; use auto, bfloat16 or float32")
        _require(bool(t.named) or sc == "plan", f"{sc} needs a teacher: add a [teachers.<name>] table with path = \"<HF dir>\""
                                + ("" if sc == "capture" else " or store = \"<capture store>\""))
        for name, spec in t.named.items():
            _require(bool(spec.path) != bool(spec.store),
                     f"teachers.{name}: give exactly one of path (online HF directory) and store (offline top-k "
                     f"store)")
            if sc == "capture":
                _require(bool(spec.path), f"teachers.{name}: capture runs the teacher, so it needs path = "
                                          f"\"<HF dir>\", not a store")
            _require(spec.placement in ("",) + PLACEMENTS,
                     f"teachers.{name}.placement={spec.placement!r}; use one of {', '.join(PLACEMENTS)}")
            _require(not spec.shard or spec.placement in ("", "shard"),
                     f"teachers.{name}: shard = true is placement = \"shard\", but placement = "
                     f"{spec.placement!r}; remove shard (or set it to false)")
            spec.placement = spec.placement or ("shard" if spec.shard else "replicate")
            spec.shard = spec.placement == "shard"  # one truth; a resolved config reads back the same
            _require(not spec.store or spec.placement == "replicate",
                     f"teachers.{name}: placement = {spec.placement!r} places an online teacher's weights; a store "
                     f"has none: remove placement/shard or give path instead of store")
            _require(spec.max_tokens >= 0, f"teachers.{name}.max_tokens={spec.max_tokens}; use 0 (a whole step's "
                                           f"rows per forward) or a positive token count, e.g. a multiple of "
                                           f"data.seq_len")
        if sc == "dae":
            _require(set(t.named) == {"reference", "domain"},
                     f"dae needs exactly the teachers `reference` and `domain` (got {sorted(t.named)}); name the "
                     f"tables [teachers.reference] and [teachers.domain]")
        elif sc in ("kd", "capture"):
            _require(len(t.named) == 1, f"{sc} uses one teacher (got {sorted(t.named)}); for per-row teachers use "
                                        f"dae")
    if "loss" in cfg.sections:
        lo = cfg.loss
        if sc == "sft":
            lo.kd_weight = 0.0  # the baseline: CE only; no teacher exists in this run
        _require(0.0 <= lo.kd_weight <= 1.0, f"loss.kd_weight={lo.kd_weight}; lambda must be in [0, 1]")
        _require(lo.tau > 0, f"loss.tau={lo.tau}; the temperature must be > 0")
        _require(lo.attn_weight >= 0, f"loss.attn_weight={lo.attn_weight}; use 0 (off) or a positive weight")
        if lo.attn_weight > 0 and not (sc == "plan" and not cfg.teachers.named):
            _require(sc in ("kd", "plan"),
                     f"loss.attn_weight is a kd-only term (the paper's phase 1); set it to 0 for {sc}")
            spec = next(iter(cfg.teachers.named.values()))
            _require(bool(spec.path), "loss.attn_weight > 0 needs an online teacher (attention maps cannot be "
                                      "stored): give the teacher path = \"<HF dir>\" instead of store")
        _require(lo.aux_coef is None or lo.aux_coef >= 0, f"loss.aux_coef={lo.aux_coef}; use >= 0")
    if "optim" in cfg.sections:
        o = cfg.optim
        _require(o.lr > 0 and math.isfinite(o.lr), f"optim.lr={o.lr}; use a positive learning rate")
        _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
                 f"optim.betas={o.betas}; give two values in [0, 1), e.g. [0.9, 0.95]")
        _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}; use 0 (off) or a positive norm")
        _require(o.max_bad_steps >= 1, f"optim.max_bad_steps={o.max_bad_steps}; use at least 1")
    if "schedule" in cfg.sections:
        s = cfg.schedule
        _require(s.steps >= 1, f"schedule.steps={s.steps}; use at least 1")
        _require(0 <= s.warmup_steps <= s.steps, f"schedule.warmup_steps={s.warmup_steps}; use 0..schedule.steps (= {s.steps})")
        _require(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio={s.min_lr_ratio}; use a value in [0, 1]")
    if "parallel" in cfg.sections:
        pa = cfg.parallel
        _require(pa.strategy in ("auto", "fsdp", "ddp", "none"),
                 f"parallel.strategy={pa.strategy!r}; use auto, fsdp, ddp or none")
        _require(pa.mixed_precision in ("auto", "bf16", "fp32"),
                 f"parallel.mixed_precision={pa.mixed_precision!r}; use auto, bf16 or fp32")
        _require(pa.shard_group >= 0, f"parallel.shard_group={pa.shard_group}; use 0 (auto) or a divisor of the "
                                      f"world size")
    if sc == "plan":
        pl = cfg.plan
        _require(pl.nodes >= 1, f"plan.nodes={pl.nodes}; a run needs at least 1 node")
        _require(pl.gpus_per_node >= 1, f"plan.gpus_per_node={pl.gpus_per_node}; plan a run of at least 1 GPU "
                                        f"per node (the plan is for GPU runs)")
        _require(pl.gpu_memory_gb > 0 and math.isfinite(pl.gpu_memory_gb),
                 f"plan.gpu_memory_gb={pl.gpu_memory_gb}; give the memory of one GPU in GB, > 0 (80 for "
                 f"H100-80GB, 141 for H200)")
        _require(pl.peak_tflops > 0 and 0 < pl.mfu <= 1, f"plan.peak_tflops={pl.peak_tflops}, plan.mfu={pl.mfu}; "
                                                         f"use a positive peak and an MFU in (0, 1]")
        _require(0 <= pl.headroom_gb < pl.gpu_memory_gb, f"plan.headroom_gb={pl.headroom_gb}; use a value in "
                                                         f"[0, plan.gpu_memory_gb)")
    if "checkpoint" in cfg.sections:
        c = cfg.checkpoint
        _require(c.every >= 0, f"checkpoint.every={c.every}; use 0 (only on signals) or a step count")
        _require(c.keep >= 1, f"checkpoint.keep={c.keep}; keep at least 1")
        _require(c.resume in ("", "auto") or Path(c.resume).name.startswith("step-"),
                 f"checkpoint.resume={c.resume!r}; use 'auto', a run_dir/step-N path, or leave it empty")
        _require(c.resume != "auto" or bool(cfg.run.dir),
                 "checkpoint.resume=auto needs the run to resume: set --run.dir=<its directory>")
    if "logging" in cfg.sections:
        _require(cfg.logging.every >= 1, f"logging.every={cfg.logging.every}; use at least 1")
    if "eval" in cfg.sections:
        e = cfg.eval
        _require(e.every >= 0, f"eval.every={e.every}; use 0 (off) or a step count")
        _require(0.0 <= e.fraction < 1.0, f"eval.fraction={e.fraction}; use a value in [0, 1) (0: none held out)")
        _require(e.every == 0 or e.max_tokens >= cfg.data.seq_len,
                 f"eval.max_tokens={e.max_tokens} is less than one sequence; use at least data.seq_len (= "
                 f"{cfg.data.seq_len})")
        given = [k for k, v in (("eval.paths", e.paths), ("eval.packed", e.packed), ("eval.fraction", e.fraction))
                 if v]
        _require(len(given) <= 1, f"{' and '.join(given)} are all set; give one source of held-out rows")
        _require(e.every == 0 or bool(given), f"eval.every={e.every} needs held-out rows: set eval.paths=<chat rows "
                                              f"file>, eval.packed=<prepared directory> or eval.fraction=<e.g. "
                                              f"0.02> (or eval.every=0)")
    if sc == "capture":
        _require(bool(cfg.capture.out), "capture.out is missing; set --capture.out=<store directory to write>")
        c = cfg.capture
        _require(c.batch_size >= 1 and c.block_samples >= 1, f"capture.batch_size={c.batch_size}, "
                 f"capture.block_samples={c.block_samples}; use at least 1")
        _require(c.rows_of in ("", "reference", "domain"), f"capture.rows_of={c.rows_of!r}; use reference, domain "
                                                          f"or leave it empty")
        _require(c.logprobs_dtype in ("float16", "bfloat16"),
                 f"capture.logprobs_dtype={c.logprobs_dtype!r}; use float16 or bfloat16")
    if sc == "prepare":
        _require(bool(cfg.data.paths), "prepare reads chat rows: set data.paths (data.packed is already prepared)")
        _require(bool(cfg.data.tokenizer), "prepare needs the student's tokenizer: set data.tokenizer=<directory>")
        _require(cfg.prepare.phase in (1, 2), f"prepare.phase={cfg.prepare.phase}; use 1 (kd, sft, capture) or 2 "
                                              f"(dae, capture with rows_of)")
        _require(cfg.prepare.chunk_rows >= 1, f"prepare.chunk_rows={cfg.prepare.chunk_rows}; use at least 1")
        _require(cfg.data.num_proc is None or cfg.data.num_proc >= 1, f"data.num_proc={cfg.data.num_proc}; use at "
                                                                      f"least 1 or leave it out")
    if sc == "upcycle":
        u = cfg.upcycle
        _require(bool(u.out), "upcycle.out is missing; set --upcycle.out=<HF directory to write>")
        _require(1 <= u.top_k <= u.num_experts, f"upcycle.top_k={u.top_k} must be in [1, upcycle.num_experts="
                                                f"{u.num_experts}]")
    if sc == "export":
        _require(bool(cfg.export.checkpoint), "export.checkpoint is missing; set --export.checkpoint=<run dir or "
                                              "its step-N/>")
        _require(cfg.export.dtype in ("float32", "bfloat16"),
                 f"export.dtype={cfg.export.dtype!r}; use bfloat16 or float32")


# ------------------------------------------------------------------------------------------------------------
# Writing: the resolved config into the run dir, and help texts


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (readable back with make_config)."""
    d = cfg.to_dict()
    lines = [f"subcommand = {_toml_value(d.pop('subcommand'))}"]
    for section, table in d.items():
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        for name, sub in table.items():
            if isinstance(sub, dict):
                lines += ["", f"[{section}.{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_resolved(cfg: Config, run_dir) -> None:
    run_dir = Path(run_dir)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def describe(subcommand: str) -> str:
    """Every key the subcommand reads, with type, default and help (for --help)."""
    out = []
    for s in SECTIONS[subcommand]:
        out.append(f"[{s}]")
        cls = SECTION_TYPES[s]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "named":
                out.append(f"  [teachers.<name>] path = \"...\" | store = \"...\"   {f.metadata['help']}")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"  --{s}.{f.name}={default!r:<10} ({_type_name(hints[f.name])})  {f.metadata['help']}")
    return "\n".join(out)
