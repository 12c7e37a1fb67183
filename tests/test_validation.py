"""Validation during training (train/validation.py): the val_* metrics equal an offline computation on the same rows
with full logits, the held-out rows never reach training, a store covers eval.fraction's rows, and bad input is a
named error. Tiny models on the CPU (tests/trainer_fixtures.py), in-process runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import trainer_fixtures as fx  # noqa: E402
from test_trainer import cfg_for  # noqa: E402  (the trainer tests' run overrides)

from model import load_hf  # noqa: E402
from train import loop as L  # noqa: E402
from train import validation as V  # noqa: E402
from train.errors import ConfigError, UserError  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fx.make_world(tmp_path_factory.mktemp("world"))


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def offline_metrics(student_dir, teacher_dir, packed, seqs, k: int) -> dict:
    """CE, KL(teacher's top-k, renormalised || student) and top-1 agreement per answer token, from full logits of
    both models in fp32 (no kernel, no chunking): the quantities validation claims to report."""
    student, teacher = load_hf(student_dir), load_hf(teacher_dir)
    ce = kl = top1 = n = 0.0
    with torch.no_grad():
        for s in seqs:
            b = packed.batch([s])
            zs = student.logits(student(b.tokens_BT, b.positions_BT, b.doc_ids_BT))[0]
            zt = teacher.logits(teacher(b.tokens_BT, b.positions_BT, b.doc_ids_BT))[0]
            m = b.labels_BT[0] != -100
            logq, logt = zs[m].log_softmax(-1), zt[m].log_softmax(-1)
            ce += -logq.gather(1, b.labels_BT[0][m][:, None]).sum().item()
            top_lp, top_ids = logt.topk(k, dim=-1)
            p = top_lp.log_softmax(-1)  # the teacher's top-k renormalised
            kl += (p.exp() * (p - logq.gather(1, top_ids))).sum().item()
            top1 += (zs[m].argmax(-1) == zt[m].argmax(-1)).sum().item()
            n += int(m.sum())
    return {"val_ce": ce / n, "val_kd": kl / n, "val_top1": top1 / n, "val_tokens": int(n)}


def test_validation_equals_offline_and_heldout_never_trained(world, tmp_path, monkeypatch):
    """kd, online teacher, eval.fraction: at steps 2 and 4 the val_* records; at step 4 (the final student) they
    equal the offline computation on the same held-out sequences. Every sequence the steps drew is outside the
    held-out split, and the split is the one `split_heldout` names."""
    drawn = []
    orig = L.train_step

    def spy(ctx, micro, lr, stop=None):
        drawn.extend(int(i) for mb in micro for i in mb.sample_idx_B)
        return orig(ctx, micro, lr, stop)
    monkeypatch.setattr(L, "train_step", spy)
    k = 8
    run_dir = L.run(cfg_for(world, tmp_path / "run", steps=4, **{"eval.every": 2, "eval.fraction": 0.25,
                                                                 "eval.max_tokens": 64 * 5, "teachers.k": k}))
    recs = records(run_dir)
    assert [r["step"] for r in recs if "val_ce" in r] == [2, 4]
    assert all("val_ce" not in r for r in recs if r["step"] % 2)

    d = cfg_for(world, tmp_path / "unused").data
    packed = L.build_packed(d, world["student"], None, d.cache_dir, L.parallel.init_distributed("cpu"),
                            log=lambda m: None)  # the run's prepared data, from the cache
    train_S, held_S = V.split_heldout(len(packed), 0.25, 0)
    assert len(held_S) == round(0.25 * len(packed)) and not set(drawn) & set(held_S.tolist())
    assert len(drawn) == 4 * 2 and set(drawn) <= set(train_S.tolist())
    order = np.random.default_rng([0, V._ORDER_STREAM]).permutation(held_S)[:5]
    want = offline_metrics(run_dir / "final", world["teacher"], packed, order, k)
    got = recs[-1]
    print("validation", {key: got[key] for key in V.VAL_KEYS}, "offline", want)
    assert got["val_tokens"] == want["val_tokens"]
    for key in ("val_ce", "val_kd", "val_top1"):
        assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (key, got[key], want[key])
    assert 0 < got["val_kd"] and 0 <= got["val_top1"] <= 1


def test_store_covers_fraction_and_paths_report_ce_only(world, tmp_path, capsys):
    """A store captured from the data serves eval.fraction's held-out sequences (val_kd as the online teacher's, to
    the store's fp16 log-probabilities); with eval.paths a store has no signal, and validation says CE only."""
    from train.main import main
    store = tmp_path / "store"
    assert main(["capture", f"--teachers.teacher.path={world['teacher']}", f"--capture.out={store}",
                 f"--data.paths={world['data']}", "--data.seq_len=64", f"--data.tokenizer={world['tok']}",
                 f"--data.cache_dir={world['root'] / 'cache'}", "--teachers.k=8"]) == 0
    ev = {"eval.every": 1, "eval.fraction": 0.25, "eval.max_tokens": 64 * 4}
    online = records(L.run(cfg_for(world, tmp_path / "online", steps=1, **ev)))[-1]
    offline = records(L.run(cfg_for(world, tmp_path / "offline", steps=1, **ev, **{
        "teachers.teacher.path": None, "teachers.teacher.store": str(store)})))[-1]
    assert offline["val_tokens"] == online["val_tokens"] > 0
    for key in ("val_ce", "val_kd", "val_top1"):
        assert abs(offline[key] - online[key]) <= 2e-3 * abs(online[key]) + 1e-6, (key, offline[key], online[key])

    heldout_rows = fx.write_jsonl(fx.make_rows(12, seed=7), tmp_path / "heldout.jsonl")
    capsys.readouterr()
    rec = records(L.run(cfg_for(world, tmp_path / "paths", steps=1, **{
        "teachers.teacher.path": None, "teachers.teacher.store": str(store), "eval.every": 1,
        "eval.paths": str(heldout_rows)})))[-1]
    assert "val_ce" in rec and "val_kd" not in rec and "val_top1" not in rec
    assert "reports CE only" in capsys.readouterr().out


def test_sft_validates_ce_only(world, tmp_path):
    rec = records(L.run(cfg_for(world, tmp_path / "sft", "sft", steps=1, **{
        "teachers.teacher.path": None, "teachers.k": None, "eval.every": 1, "eval.fraction": 0.2})))[-1]
    assert rec["val_ce"] > 0 and "val_kd" not in rec


def test_bad_eval_input_is_a_named_error(world, tmp_path):
    with pytest.raises(ConfigError, match="eval.every=2 needs held-out rows"):
        cfg_for(world, tmp_path / "a", **{"eval.every": 2})
    with pytest.raises(ConfigError, match="give one source of held-out rows"):
        cfg_for(world, tmp_path / "a", **{"eval.every": 2, "eval.fraction": 0.1, "eval.paths": world["data"]})
    with pytest.raises(ConfigError, match="less than one sequence"):
        cfg_for(world, tmp_path / "a", **{"eval.every": 2, "eval.fraction": 0.1, "eval.max_tokens": 10})

    # Held-out data prepared with another tokenizer (same vocabulary size, other merges).
    from train.data.prepare import prepare
    other_tok = tmp_path / "other_tok"
    fx.make_tokenizer(other_tok, fx.make_rows(30, seed=5), specials=["<unk>", "</s>", "<s>", "[INST]", "[/INST]"])
    rows = fx.write_jsonl(fx.make_rows(10, seed=6), tmp_path / "held.jsonl")
    prepared = prepare([str(rows)], str(other_tok), 64, None, None, tmp_path / "cache", processes=1, log=lambda m: None)
    with pytest.raises(ConfigError, match="another tokenizer than the student's"):
        L.run(cfg_for(world, tmp_path / "b", **{"eval.every": 1, "eval.packed": str(prepared)}))
    assert not (tmp_path / "b").exists()  # refused before the run directory is written

    # Resuming with another held-out split would train on held-out rows.
    run = tmp_path / "c"
    L.run(cfg_for(world, run, steps=2, **{"eval.every": 2, "eval.fraction": 0.25, "checkpoint.every": 1,
                                         "checkpoint.export_final": False}))
    with pytest.raises(UserError, match="eval.fraction and run.seed"):
        L.run(cfg_for(world, run, steps=3, **{"eval.every": 2, "eval.fraction": 0.5, "checkpoint.resume": "auto"}))


def test_sampler_never_draws_held_out_sequences_in_either_pool():
    """dae's two pools (general, domain) both lose the held-out sequences; over several epochs every training
    sequence is drawn and no held-out one; a resume from another split is refused."""
    from train.data import Sampler
    from train.data.packing import PackedDataset
    S, T = 40, 8
    z = np.zeros((S, T), dtype=np.int32)
    packed = PackedDataset(z, z, z, z, (np.arange(S) % 4 == 0).astype(np.int32), ["reference", "domain"], T, 0, {})
    train_S, held_S = V.split_heldout(S, 0.2, seed=3)
    assert len(held_S) == 8 and sorted(np.concatenate([train_S, held_S]).tolist()) == list(range(S))
    assert (packed.teacher[held_S] == 1).any()  # the split reaches into the domain pool too
    sampler = Sampler(packed, 4, rank=0, world_size=2, seed=3, domain_fraction=0.3, members=train_S)
    drawn = []
    for _ in range(40):  # 40 global batches of 8: ~10 epochs of the 32 training sequences
        drawn += sampler._global_indices()[0].tolist()  # the whole global batch, every rank's share
        sampler.next_indices()
    drawn = np.asarray(drawn)
    assert not set(drawn.tolist()) & set(held_S.tolist()) and set(drawn.tolist()) == set(train_S.tolist())
    other = Sampler(packed, 4, rank=0, world_size=2, seed=3, domain_fraction=0.3,
                    members=V.split_heldout(S, 0.3, seed=3)[0])
    with pytest.raises(ValueError, match="eval.fraction and run.seed"):
        other.load_state_dict(sampler.state_dict())
    Sampler(packed, 4, rank=0, world_size=2, seed=3, domain_fraction=0.3, members=train_S).load_state_dict(
        sampler.state_dict())
