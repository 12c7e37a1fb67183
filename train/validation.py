"""Validation during training (`[eval]`): every `eval.every` optimizer steps, on a fixed held-out split, the student's
CE on the answer tokens, KL(teacher || student) over the teacher's top-k and top-1 agreement with the teacher,
against the same teacher signals as training (online teachers, or a store), logged as val_* in metrics.jsonl.

Where the held-out rows come from (one of):
    eval.fraction   a fraction of the training data's packed sequences, chosen from (run.seed) before the sampler is
                    built; the sampler never draws them (`Sampler(members=...)`), so they never reach training. Whole
                    sequences are whole documents (a document lives in exactly one sequence), so this is a split of
                    rows; it is made after packing so that the prepared data is shared with runs without a split
                    and a store captured from that data (keyed by sequence) covers the held-out rows as well.
    eval.paths      held-out chat rows, prepared and packed like the training rows (same tokenizer, seq_len, cache).
    eval.packed     held-out data already prepared by `train/main.py prepare`; its recorded tokenizer and seq_len
                    must be the run's.
A store holds signals for the sequences of the data it was captured from only: with eval.paths / eval.packed and a
store teacher, validation reports CE only and says so in the log (val_kd and val_top1 are then absent). sft has no
teacher: CE only as well.

Cost: at most eval.max_tokens tokens (whole sequences) per validation, the first of a fixed order of the held-out
sequences, split evenly over the ranks (each rank the same number of forwards: FSDP and sharded teachers need
every rank in each one); the four sums cross ranks in one all-reduce and reach the host once.

Dimensions: B sequences per batch, T tokens per sequence, N loss positions of a batch, K teacher top-k, S sequences.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model.attention import spans_to
from train import parallel
from train.errors import ConfigError, DataError
from train.metrics import VAL_KEYS  # noqa: F401  (the metrics.jsonl keys `validate` fills)
from train.teachers.signal import loss_positions

_SPLIT_STREAM = 20  # numpy seed words (run.seed, stream): the held-out choice and order; the sampler uses 0..3
_ORDER_STREAM = 21


@dataclass
class HeldOut:
    """The validation set: which sequences of which packed data, and how they are read."""
    packed: object              # PackedDataset holding them (the training data's, or one of their own)
    order_S: np.ndarray         # the held-out sequence indices in evaluation order (the same on every rank)
    teacher_map: np.ndarray     # packed.teacher index -> the run's teacher index (TeacherSet.names)
    with_teacher: bool          # teacher signals exist for these rows: KL and top-1 are computed
    every: int
    sequences: int              # evaluated per validation: a multiple of the world size
    micro_batch: int


def split_heldout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training sequences, held-out sequences) of a packed dataset of n sequences, both sorted: round(fraction * n)
    sequences, at least one when fraction > 0, drawn from `seed` alone (not the world size)."""
    count = max(1, round(fraction * n)) if fraction > 0 else 0
    perm_S = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return np.sort(perm_S[count:]), np.sort(perm_S[:count])


def training_members(cfg, n: int) -> np.ndarray | None:
    """The sequences the sampler may draw: all but the eval.fraction split (None: every one)."""
    if not cfg.eval.fraction:
        return None
    train_S, held_S = split_heldout(n, cfg.eval.fraction, cfg.run.seed)
    if len(train_S) == 0:
        raise DataError(f"eval.fraction={cfg.eval.fraction} holds out all {n} sequences of the data; lower it")
    return train_S


def build_heldout(cfg, packed, env: parallel.Env, log) -> HeldOut | None:
    """The run's validation set (None when eval.every = 0), after the training data (`packed`) is built."""
    e = cfg.eval
    if not e.every:
        if e.paths or e.packed:
            log("eval: held-out rows given but eval.every = 0: no validation")
        return None
    train_names = list(packed.teacher_names)
    stores = sorted(n for n, s in cfg.teachers.named.items() if s.store) if cfg.subcommand != "sft" else []
    if e.fraction:
        held, (_, order_S) = packed, split_heldout(len(packed), e.fraction, cfg.run.seed)
        with_teacher = cfg.subcommand != "sft"
        source = f"{len(order_S)} of the training data's {len(packed)} sequences (eval.fraction={e.fraction})"
    else:
        held = _load_heldout(cfg, train_names, env, log)
        order_S = np.arange(len(held), dtype=np.int64)
        with_teacher = cfg.subcommand != "sft" and not stores
        source = f"{len(held)} sequences of {e.packed or ', '.join(e.paths)}"
        if stores:
            log(f"eval: teacher(s) {stores} read a store, which holds signals for the training data's sequences only; "
                f"validation on {e.packed or 'eval.paths'} reports CE only (no val_kd, val_top1). For the KL too, hold "
                f"out part of the captured data with eval.fraction instead")
    if len(order_S) == 0:
        raise DataError(f"eval: the held-out data ({source}) has no sequence with an answer token")
    order_S = np.random.default_rng([cfg.run.seed, _ORDER_STREAM]).permutation(order_S)
    fit = min(len(order_S), e.max_tokens // cfg.data.seq_len)
    sequences = fit - fit % env.world_size
    if sequences == 0:
        fix = (f"raise eval.max_tokens to >= {env.world_size * cfg.data.seq_len}" if fit < len(order_S) else
               "hold out more rows" + (" (raise eval.fraction)" if e.fraction else ""))
        raise ConfigError(f"eval: {fit} held-out sequence(s) to evaluate ({len(order_S)} held out, eval.max_tokens="
                          f"{e.max_tokens} at data.seq_len={cfg.data.seq_len}), fewer than the {env.world_size} ranks "
                          f"(each evaluates the same number); {fix}")
    log(f"eval: every {e.every} steps on {sequences} sequences ({sequences * cfg.data.seq_len} tokens) of {source}"
        + ("" if with_teacher else "; CE only"))
    dae = cfg.subcommand == "dae"
    teacher_map = np.asarray([_teacher_index(n, train_names, dae) for n in held.teacher_names], dtype=np.int64)
    return HeldOut(held, order_S, teacher_map, with_teacher, e.every, sequences, cfg.data.micro_batch)


def _teacher_index(name: str, train_names: list, dae: bool) -> int:
    """A held-out row's teacher in the run's order. kd: one teacher teaches every row, whatever it names."""
    if name in train_names:
        return train_names.index(name)
    if dae:
        raise DataError(f"eval: held-out rows name teacher {name!r}; dae's teachers are {train_names}")
    return 0


def _load_heldout(cfg, train_names: list, env: parallel.Env, log):
    """eval.paths prepared like the training rows, or eval.packed after its tokenizer and seq_len are checked."""
    from train.data.prepare import build_packed, load_prepared, tokenizer_identity
    e, tok_dir = cfg.eval, cfg.data.tokenizer or cfg.model.path
    if e.paths:
        d = replace(cfg.data, paths=list(e.paths), packed="")
        names = ["reference", "domain"] if cfg.subcommand == "dae" else None
        return build_packed(d, tok_dir, names, cfg.data.cache_dir or None, env, log=log)
    meta_path = Path(e.packed) / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"eval.packed={e.packed!r} holds no meta.json; give a directory written by `train/main.py "
                          f"prepare` (a prepared-* directory of the data cache), or use eval.paths=<chat rows>")
    meta = json.loads(meta_path.read_text())
    recorded = (meta.get("key") or {}).get("tokenizer")
    if recorded is None:
        raise ConfigError(f"eval.packed={e.packed!r} does not record its tokenizer (not written by `prepare`); "
                          f"prepare the held-out rows with `train/main.py prepare`, or give them as eval.paths")
    mine = tokenizer_identity(tok_dir)
    if recorded != mine:
        raise ConfigError(f"eval.packed={e.packed!r} was prepared with another tokenizer than the student's "
                          f"({tok_dir}): {recorded[:12]}.. there, {mine[:12]}.. here; prepare the held-out rows with "
                          f"--data.tokenizer={tok_dir}")
    if int(meta["seq_len"]) != cfg.data.seq_len:
        raise ConfigError(f"eval.packed={e.packed!r} has seq_len {meta['seq_len']}, data.seq_len is "
                          f"{cfg.data.seq_len}; prepare it with --data.seq_len={cfg.data.seq_len}")
    return load_prepared(e.packed)


def due(held: HeldOut | None, step: int) -> bool:
    return held is not None and step % held.every == 0


def validate(module_evaluate, teachers, held: HeldOut, env: parallel.Env) -> dict:
    """The val_* metrics of the student now: `module_evaluate` is `StudentWithLoss.evaluate` reached through
    `train.parallel.forward_method`; `teachers` the run's TeacherSet (None: sft). Per-token means over the answer
    tokens of every rank's share."""
    W, dev = env.world_size, env.device
    mine_S = held.order_S[:held.sequences][env.rank::W]  # sequences // W on every rank
    sums = torch.zeros(4, device=dev)  # CE, KL, top-1 agreements, loss tokens (StudentWithLoss.evaluate)
    seen = dict(teachers.rows_seen) if teachers is not None else None
    for start in range(0, len(mine_S), held.micro_batch):
        batch = held.packed.batch(mine_S[start:start + held.micro_batch])
        batch.teacher_B = torch.from_numpy(held.teacher_map[batch.teacher_B.numpy()])
        idx_N = loss_positions(batch.labels_BT)  # CPU labels: no device sync
        if held.with_teacher:
            with torch.no_grad():
                sig = teachers.signals(batch)
            K = sig.ids_BTK.shape[-1]
            rows_N = idx_N.to(sig.ids_BTK.device)
            ids_NK = sig.ids_BTK.reshape(-1, K).index_select(0, rows_N)
            logprobs_NK = sig.logprobs_BTK.reshape(-1, K).index_select(0, rows_N)
        else:  # K = 0: CE only
            ids_NK, logprobs_NK = torch.zeros(len(idx_N), 0, dtype=torch.long), torch.zeros(len(idx_N), 0)
        spans = spans_to(batch.doc_ids_BT, dev)  # document boundaries from the CPU ids: no device sync
        b, idx_N = batch.to(dev, non_blocking=True), idx_N.to(dev, non_blocking=True)
        sums += module_evaluate(b.tokens_BT, b.positions_BT, b.doc_ids_BT, idx_N,
                                b.labels_BT.reshape(-1).index_select(0, idx_N), ids_NK.to(dev), logprobs_NK.to(dev),
                                spans)
    if seen is not None:  # rows_seen counts training rows (the routing proof and the final log line)
        teachers.rows_seen.update(seen)
    parallel.all_reduce_sum(sums, env)
    ce, kd, top1, n = sums.tolist()  # host sync: once per validation
    n = max(n, 1.0)
    out = {"val_ce": ce / n, "val_tokens": int(n)}
    if held.with_teacher:
        out.update(val_kd=kd / n, val_top1=top1 / n)
    return out
