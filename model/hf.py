"""HF directories of `MistralForCausalLM` / `MixtralForCausalLM` in and out, through safetensors only.

Loading is lazy per shard: the model is built on the meta device and each tensor is read from its shard straight
into its final dtype, so peak host memory stays near one copy of the model (plus one tensor). Mixtral's
per-expert tensors (`experts.{e}.w1/w3/w2`) are written into slices of our stacked parameters as they arrive.
Saving writes into a temporary sibling directory and renames it into place: a crash leaves either the old
directory or none, never a half-written one that looks complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.model import ModelArgs, MoEArgs, Transformer

SUPPORTED = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}

# (our name, HF name) for every non-expert tensor of layer {i}; experts are handled by _EXPERT_RE.
_LAYER_MAP = [
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
]
_DENSE_FFN_MAP = [
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
]
_GLOBAL_MAP = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]
_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def args_from_config(cfg: dict, where: str = "config.json") -> ModelArgs:
    """Our ModelArgs from an HF config dict; ValueError naming `where` and the key for anything unusable."""
    try:
        return _args_from_config(cfg, where)
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}; config.json is incomplete (copy it again from the "
                         "model's source)") from None


def _args_from_config(cfg: dict, where: str) -> ModelArgs:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: holds a JSON {type(cfg).__name__}, not an object; fix the file")
    if cfg.get("auto_map"):
        raise ValueError(f"{where}: auto_map asks for the model's own Python code ({sorted(cfg['auto_map'])}); this "
                         "trainer never runs remote code: use a standard MistralForCausalLM / MixtralForCausalLM "
                         "checkpoint")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{where}: model_type={model_type!r} is not supported; this trainer reads "
                         f"{sorted(SUPPORTED)} (MistralForCausalLM / MixtralForCausalLM) checkpoints")
    if cfg.get("tie_word_embeddings"):
        raise ValueError(f"{where}: tie_word_embeddings=true is not supported (Mistral/Mixtral have an untied "
                         "LM head); set it to false and provide lm_head.weight")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_type={rope['rope_type']!r} is not supported; only default RoPE")
    n_heads = cfg["num_attention_heads"]
    moe = None
    if model_type == "mixtral":
        moe = MoEArgs(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
                      router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.02))
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))),
        sliding_window=cfg.get("sliding_window"),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2), moe=moe)


def config_from_args(a: ModelArgs, dtype: torch.dtype) -> dict:
    model_type = "mistral" if a.moe is None else "mixtral"
    cfg = {
        "architectures": [SUPPORTED[model_type]], "model_type": model_type,
        "hidden_size": a.dim, "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
        "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "hidden_act": "silu",
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": a.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "sliding_window": a.sliding_window, "max_position_embeddings": a.max_position_embeddings,
        "bos_token_id": a.bos_token_id, "eos_token_id": a.eos_token_id, "tie_word_embeddings": False,
        "attention_dropout": 0.0, "initializer_range": 0.02,
        "dtype": str(dtype).removeprefix("torch."), "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if a.moe is not None:
        cfg.update(num_local_experts=a.moe.num_experts, num_experts_per_tok=a.moe.num_experts_per_tok,
                   router_aux_loss_coef=a.moe.router_aux_loss_coef, output_router_logits=False,
                   router_jitter_noise=0.0)
    return cfg


def _simple_name_map(a: ModelArgs) -> dict[str, str]:
    """HF name -> our name for every tensor that maps one to one (all but the experts)."""
    pairs = list(_GLOBAL_MAP)
    for i in range(a.n_layers):
        layer = _LAYER_MAP + (_DENSE_FFN_MAP if a.moe is None else
                              [("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight")])
        pairs += [(ours.format(i=i), hf.format(i=i)) for ours, hf in layer]
    return {hf: ours for ours, hf in pairs}


def _shard_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the shard file that holds it (from the index, or the single model.safetensors)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: path / f for f in set(weight_map.values())}
        for f, p in files.items():
            if not p.exists():
                raise ValueError(f"{index} lists shard {f!r}, which is missing from {path}; copy the complete "
                                 "checkpoint directory (all shards) again")
        return {name: files[f] for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        if pickles:
            raise ValueError(f"{path} holds pickle weights ({pickles[0]}), which are never loaded (a pickle can run "
                             "code); convert them once to safetensors, e.g. with transformers: "
                             "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json; point to an HF "
                         "directory saved with safe_serialization")
    return {name: single for name in _header(single)}


def _header(f: Path) -> dict[str, tuple]:
    """Tensor name -> shape from a safetensors file's header alone (no weight is read); a truncated or foreign
    file is a ValueError naming it."""
    try:
        with safe_open(f, "pt") as h:
            return {name: tuple(h.get_slice(name).get_shape()) for name in h.keys()}
    except Exception as e:  # safetensors' SafetensorError does not name the file
        raise ValueError(f"{f}: not a readable safetensors file ({e}); it is truncated or not safetensors: copy "
                         "it again") from None


def load_hf(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            experts: range | None = None) -> Transformer:
    """Read an HF Mistral/Mixtral directory into our Transformer (weights cast to `dtype`, placed on `device`).

    device="meta": check the directory (config, tensor names and shapes) and return the model on the meta
    device without reading any weight, for sharding before the weights arrive (train.parallel).
    `experts` (a Mixtral, e.g. range(2, 4)): read only those experts of every MoE layer, so each layer's w13/w2
    hold len(experts) experts in that order while the gate still scores all E. Such a model is incomplete on
    its own (its MoE forward refuses the mismatch): train.teachers.expert runs it, each rank holding its slice.
    The other experts are never read (Mixtral-8x7B: 11.3 of the 90 GB of bf16 experts per rank at 8 ranks)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{cfg_file} not found; `path` must be an HF model directory with config.json")
    args = args_from_config(json.loads(cfg_file.read_text()), where=str(cfg_file))
    with torch.device("meta"):
        model = Transformer(args)
    # The directory must hold exactly what save_hf writes for this config: its names and shapes, read off the
    # meta model (no memory, no copies).
    shapes = {name: tuple(t.shape) for name, t in hf_state_dict(model).items()}
    located = _shard_files(path)
    unexpected = sorted(set(located) - set(shapes))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) {unexpected[:5]} for a "
                         f"{'Mixtral' if args.moe else 'Mistral'} config; remove them or fix config.json")
    missing = sorted(set(shapes) - set(located))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]} (of {len(missing)}); the checkpoint is "
                         "incomplete or config.json describes another model")

    for f in sorted(set(located.values())):  # every shard's header: readable, names and shapes as implied
        header = _header(f)
        absent = sorted(n for n, g in located.items() if g == f and n not in header)
        if absent:
            raise ValueError(f"{f}: the index places {absent[:3]} (of {len(absent)}) in this shard, its header does "
                             "not hold them; the shard and the index disagree: copy the directory again")
        for name, shape in header.items():
            if name in shapes and shape != shapes[name]:
                raise ValueError(f"{f}: tensor {name} has shape {shape} but config.json implies {shapes[name]}; "
                                 "config.json and the weights disagree")

    if experts is not None:
        if args.moe is None:
            raise ValueError(f"{path} is a dense model; experts={experts} applies to a Mixtral (MoE) directory only")
        if len(experts) == 0 or experts.step != 1 or not 0 <= experts.start < experts.stop <= args.moe.num_experts:
            raise ValueError(f"experts={experts} must be a non-empty contiguous range within the "
                             f"{args.moe.num_experts} experts of {path}")
        for layer in model.layers:  # still meta: w13/w2 take the slice's shapes, which load_state_dict then checks
            ff = layer.feed_forward
            ff.w13 = torch.nn.Parameter(ff.w13[experts.start:experts.stop])
            ff.w2 = torch.nn.Parameter(ff.w2[experts.start:experts.stop])
    if torch.device(device).type == "meta":
        return model.to(dtype)

    names = _simple_name_map(args)
    state: dict[str, torch.Tensor] = {}
    if args.moe is not None:
        E, F_, D = args.moe.num_experts, args.hidden_dim, args.dim
        first = 0
        if experts is not None:
            E, first = len(experts), experts.start
        for i in range(args.n_layers):
            state[f"layers.{i}.feed_forward.w13"] = torch.empty(E, 2 * F_, D, dtype=dtype, device=device)
            state[f"layers.{i}.feed_forward.w2"] = torch.empty(E, D, F_, dtype=dtype, device=device)

    by_file: dict[Path, list[str]] = {}
    for name, f in located.items():
        by_file.setdefault(f, []).append(name)
    for f, hf_names in sorted(by_file.items()):
        with safe_open(f, "pt", device="cpu") as shard:
            for name in hf_names:
                m = _EXPERT_RE.fullmatch(name)
                if m is not None and experts is not None and int(m[2]) not in experts:
                    continue  # another rank's expert: never read
                t = shard.get_tensor(name)
                if tuple(t.shape) != shapes[name]:
                    raise ValueError(f"{f.name}: tensor {name} has shape {tuple(t.shape)} but config.json implies "
                                     f"{shapes[name]}; config.json and the weights disagree")
                t = t.to(device=device, dtype=dtype)
                # Checked where the tensor lands (on the GPU for a GPU load: a host scan of a 93 GB teacher would
                # cost minutes); one host sync per tensor, at load time only.
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{f}: tensor {name} holds NaN or Inf values; the checkpoint is corrupt (or was "
                                     "saved from a diverged run): use an earlier one")
                if m is None:
                    state[names[name]] = t
                    continue
                i, e, w = int(m[1]), int(m[2]) - first, m[3]
                if w == "w2":
                    state[f"layers.{i}.feed_forward.w2"][e] = t
                else:
                    rows = slice(0, args.hidden_dim) if w == "w1" else slice(args.hidden_dim, 2 * args.hidden_dim)
                    state[f"layers.{i}.feed_forward.w13"][e, rows] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under HF names, experts split back into per-expert tensors (contiguous copies)."""
    a = model.args
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {hf: ours[o].contiguous() for hf, o in _simple_name_map(a).items()}
    if a.moe is not None:
        for i in range(a.n_layers):
            w13, w2 = ours[f"layers.{i}.feed_forward.w13"], ours[f"layers.{i}.feed_forward.w2"]
            for e in range(a.moe.num_experts):
                p = f"model.layers.{i}.block_sparse_moe.experts.{e}"
                out[f"{p}.w1.weight"] = w13[e, :a.hidden_dim].contiguous()
                out[f"{p}.w3.weight"] = w13[e, a.hidden_dim:].contiguous()
                out[f"{p}.w2.weight"] = w2[e].contiguous()
    return out


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r} not understood; use bytes (int) or e.g. '5GB', '200MB', '20KB'")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])


def save_hf(model: Transformer, path, max_shard_size="5GB") -> Path:
    """Write `model` as an HF directory (config.json, shards, index when sharded), atomically."""
    path = Path(path)
    limit = _parse_size(max_shard_size)
    tensors = hf_state_dict(model)
    dtype = next(iter(tensors.values())).dtype
    for name, t in tensors.items():  # never write a model that cannot be loaded back (load_hf refuses NaN/Inf)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save {path}: tensor {name} holds NaN or Inf values (the run diverged); "
                             "export an earlier checkpoint")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):  # HF's order: sorted names, a new shard once the limit would be passed
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        n = len(shards)
        weight_map = {}
        for j, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_from_args(model.args, dtype), indent=2))
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
