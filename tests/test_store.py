"""Offline top-k store: capture -> StoreReader equals the online teacher; resume after a kill is byte-identical;
a store made for another run is refused with the field named; phase 2 mixes stores and online teachers."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelArgs, Transformer, save_hf
from train.data import IGNORE as IGNORE_INDEX
from train.data import PackedDataset
from train.teachers import (OnlineTeacher, StoreReader, TeacherSpec, build_teachers, expected_for, ids_dtype,
                            tokenizer_sha256)
from train.teachers.capture import run_capture
from test_teacher import L, V, _packed as packed_rows  # one layout of packed test rows for both files

K = 8
REPO = Path(__file__).resolve().parents[1]


def _teacher_dir(path, seed: int, vocab_size: int = V):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, vocab_size=vocab_size,
                     max_position_embeddings=64)
    # std 0.3 spreads the logits so that top-k order is not decided by rounding.
    save_hf(Transformer(args).init_weights(std=0.3, generator=torch.Generator().manual_seed(seed)), path)
    Path(path, "tokenizer.json").write_text('{"model": "toy", "seed": %d}' % seed)
    return Path(path)


def _packed(S: int, teacher_S=None, names=("reference", "domain"), seed: int = 0) -> PackedDataset:
    return packed_rows(S, np.zeros(S, np.int32) if teacher_S is None else teacher_S, names, seed)


def _assert_fp16_close(stored, online):
    """Within fp16 rounding: half an fp16 ulp is at most |x| * 2^-11."""
    assert (stored - online).abs().le(online.abs() * 2.0**-11 + 1e-6).all()


def _store_bytes(d: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher_dir(tmp_path_factory.mktemp("teacher"), 0)


@pytest.fixture(scope="module")
def packed():
    return _packed(21)


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, teacher, packed):
    """An uninterrupted two-rank capture (ranks run one after the other in this process)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    reports = [run_capture(teacher, packed, out, k=K, batch_size=2, rank=r, world_size=2, block_samples=4)
               for r in range(2)]
    return out, reports


def test_online_and_offline_give_the_same_topk(teacher, packed, reference_store):
    out, reports = reference_store
    assert not reports[0]["complete"] and reports[1]["complete"]  # the manifest waits for the last rank
    reader = StoreReader(out, expected_for(packed, K, teacher))
    online = OnlineTeacher.load(teacher, K)
    batch = packed.batch([20, 3, 0, 11])  # both ranks' shards, out of order
    off, on = reader.signals(batch), online.signals(batch)
    assert off.ids_BTK.dtype == torch.long and off.logprobs_BTK.dtype == torch.float32
    assert torch.equal(off.ids_BTK, on.ids_BTK)
    _assert_fp16_close(off.logprobs_BTK, on.logprobs_BTK)
    ignored = batch.labels_BT == IGNORE_INDEX
    assert (off.ids_BTK[ignored] == 0).all() and (off.logprobs_BTK[ignored] == 0).all()


def test_store_layout_and_manifest(teacher, packed, reference_store):
    out, reports = reference_store
    m = json.loads((out / "manifest.json").read_text())
    loss_tokens = int((packed.labels != IGNORE_INDEX).sum())
    assert m["rows"] == loss_tokens == reports[0]["loss_tokens"] + reports[1]["loss_tokens"]
    assert m["k"] == K and m["seq_len"] == L and m["dataset_fingerprint"] == packed.fingerprint
    assert m["ids_dtype"] == "uint16" and m["logprobs_dtype"] == "float16"
    assert m["teacher_config"] == json.loads((teacher / "config.json").read_text())
    assert len(m["teacher"]["weights"]["sha256"]) == 64 and m["tokenizer_sha256"] == tokenizer_sha256(teacher)
    assert m["bytes"] == sum(sum(s["bytes"].values()) for s in m["shards"])
    # 4 B per id+logprob pair (uint16 + fp16); the rest is the per-sample index (3 x int64 = 24 B per sample)
    # and three 128 B .npy headers per block (21 samples in blocks of 4: 6 blocks), which at real sizes (~1000
    # loss tokens per sample, 64 samples per block) vanish.
    assert len(m["shards"]) == 6 and [s["samples"] for s in m["shards"]] == [4, 4, 4, 4, 4, 1]
    assert m["bytes_per_token"] == (4 * K * m["rows"] + 24 * len(packed) + 6 * 3 * 128) / m["rows"]
    assert reports[1]["bytes_per_token"] == m["bytes_per_token"] and reports[1]["tokens_per_s"] > 0
    ids = np.load(out / m["shards"][0]["ids"], mmap_mode="r", allow_pickle=False)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and ids.shape[1] == K
    assert not list(out.glob(".*"))  # no temporaries left


def _counting(monkeypatch, fail_at=None):
    """Count teacher batches; optionally raise on call number `fail_at` (an injected crash)."""
    calls = []
    real = OnlineTeacher.loss_topk

    def wrapped(self, rows):
        calls.append(rows.tokens_BT.shape[0])
        if len(calls) == fail_at:
            raise KeyboardInterrupt("injected")
        return real(self, rows)
    monkeypatch.setattr(OnlineTeacher, "loss_topk", wrapped)
    return calls


def test_interrupted_capture_resumes_to_the_same_bytes(tmp_path, monkeypatch, teacher, packed, reference_store):
    """21 samples in blocks of 4 (blocks 0-4: 2 batches of 2; block 5: 1 sample), two ranks: rank 0 takes blocks
    0, 2, 4, rank 1 blocks 1, 3, 5 (b mod 2). Rank 1 dies in its 4th batch (block 3's second), after committing
    block 1; the restart in a world of ONE process takes the missing blocks 3 and 5 and redoes only them, and the
    store equals the uninterrupted two-rank one byte for byte."""
    out = tmp_path / "store"
    run_capture(teacher, packed, out, k=K, batch_size=2, rank=0, world_size=2, block_samples=4)
    calls = _counting(monkeypatch, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        run_capture(teacher, packed, out, k=K, batch_size=2, rank=1, world_size=2, block_samples=4)
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-b00000{b}.json" for b in (0, 1, 2, 4)]
    assert not (out / "manifest.json").exists()
    calls.clear()
    report = run_capture(teacher, packed, out, k=K, batch_size=2, rank=0, world_size=1, block_samples=4)
    assert calls == [2, 2, 1]  # block 3 (4 samples) and block 5 (1) only
    assert report["complete"] and report["tokens"] == 5 * L
    assert _store_bytes(out) == _store_bytes(reference_store[0])


def test_capture_resumes_in_a_larger_world(tmp_path, monkeypatch, teacher, packed, reference_store):
    """One process dies in block 2 after committing blocks 0 and 1; a world of three takes the missing blocks 2-5
    by b mod 3 (rank 0: 3, rank 1: 4, rank 2: 2 and 5); the last to finish writes the manifest; the bytes equal
    the two-rank capture's."""
    out = tmp_path / "store"
    calls = _counting(monkeypatch, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_capture(teacher, packed, out, k=K, batch_size=2, block_samples=4)
    assert len(list(out.glob("part-*"))) == 2
    monkeypatch.undo()
    calls = _counting(monkeypatch)  # no more failures
    reports = [run_capture(teacher, packed, out, k=K, batch_size=2, rank=r, world_size=3, block_samples=4)
               for r in range(3)]
    assert [r["tokens"] // L for r in reports] == [4, 4, 5] and calls == [2, 2, 2, 2, 2, 2, 1]
    assert [r["complete"] for r in reports] == [False, False, True]
    assert _store_bytes(out) == _store_bytes(reference_store[0])


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from train.data import PackedDataset
    from train.teachers import OnlineTeacher
    from train.teachers.capture import run_capture
    teacher, data, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    real, calls = OnlineTeacher.loss_topk, []
    def loss_topk(self, rows):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers: a crash
        return real(self, rows)
    OnlineTeacher.loss_topk = loss_topk
    run_capture(teacher, PackedDataset.load(data), out, k=%d, batch_size=3, block_samples=6)
""" % K)


def test_sigkilled_capture_resumes_to_the_same_bytes(tmp_path, teacher, packed):
    data, out, ref = tmp_path / "data", tmp_path / "store", tmp_path / "ref"
    packed.save(data)
    run_capture(teacher, packed, ref, k=K, batch_size=3, block_samples=6)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # 21 samples, blocks of 6 = 2 batches of 3: the kill lands in block 2's second batch.
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(teacher), str(data), str(out), "6"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in out.glob("part-*")) == ["part-b000000.json", "part-b000001.json"]
    report = run_capture(teacher, packed, out, k=K, batch_size=3, block_samples=6)
    assert report["tokens"] == 9 * L  # blocks 2 (6 samples) and 3 (the last 3) only
    assert _store_bytes(out) == _store_bytes(ref)
    again = run_capture(teacher, packed, out, k=K, batch_size=3, block_samples=6)  # complete: nothing to do
    assert again["tokens"] == 0 and again["complete"]


@pytest.mark.parametrize("field,value", [("k", 4), ("seq_len", 32), ("dataset_fingerprint", "0" * 32),
                                         ("tokenizer_sha256", "f" * 64)])
def test_mismatching_manifest_is_refused(reference_store, packed, teacher, field, value):
    out, _ = reference_store
    expected = {**expected_for(packed, K, teacher), field: value}
    stored = json.loads((out / "manifest.json").read_text())[field]
    with pytest.raises(ValueError, match=f"{field} is {stored!r} in the store, {value!r} in the run"):
        StoreReader(out, expected)


def test_reader_refuses_other_data_incomplete_store_and_unknown_samples(tmp_path, reference_store, packed):
    out, _ = reference_store
    other = _packed(21, seed=1)
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        StoreReader(out, expected_for(other, K))
    reader = StoreReader(out)  # no expectations: reads, but the batch still has to fit the stored rows
    counts = lambda d: (d.labels != IGNORE_INDEX).sum(1)  # noqa: E731
    s = int(np.flatnonzero(counts(other) != counts(packed))[0])
    with pytest.raises(ValueError, match=f"sample {s}: the store holds"):
        reader.signals(other.batch([s]))
    with pytest.raises(ValueError, match="sample 21 is not in store"):
        reader.rows(21)
    with pytest.raises(ValueError, match="no_such_field"):
        StoreReader(out, {"no_such_field": 1})
    with pytest.raises(ValueError, match="not a complete top-k store"):
        StoreReader(tmp_path)


def test_resume_with_other_settings_is_refused(tmp_path, teacher, packed, monkeypatch):
    out = tmp_path / "store"
    _counting(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_capture(teacher, packed, out, k=K, batch_size=2, block_samples=2)
    with pytest.raises(ValueError, match="block_samples=2.*block_samples=4"):
        run_capture(teacher, packed, out, k=K, batch_size=2, block_samples=4)


def test_bf16_logprobs_and_int32_ids(tmp_path):
    assert ids_dtype(65536) == np.uint16 and ids_dtype(65537) == np.int32
    big_v = _teacher_dir(tmp_path / "big", 3, vocab_size=70000)
    packed = _packed(4)
    out = tmp_path / "store"
    run_capture(big_v, packed, out, k=4, batch_size=4, dtype=torch.bfloat16)
    m = json.loads((out / "manifest.json").read_text())
    assert m["ids_dtype"] == "int32" and m["logprobs_dtype"] == "bfloat16"
    batch = packed.batch([2, 1])
    off, on = StoreReader(out, {"k": 4}).signals(batch), OnlineTeacher.load(big_v, 4).signals(batch)
    assert torch.equal(off.ids_BTK, on.ids_BTK)
    assert (off.logprobs_BTK - on.logprobs_BTK).abs().le(on.logprobs_BTK.abs() * 2.0**-8).all()  # bf16 rounding


def test_phase2_store_per_teacher_mixed_with_online(tmp_path):
    """DAE: the domain teacher's store covers only its rows; the reference runs online; each row gets its own."""
    ref, dom = _teacher_dir(tmp_path / "ref", 1), _teacher_dir(tmp_path / "dom", 2)
    teacher_S = [0, 1, 0, 1, 1, 0, 1]
    packed = _packed(7, teacher_S)
    dom_store = tmp_path / "dom_store"
    rep = run_capture(dom, packed, dom_store, k=K, batch_size=2, teacher="domain")
    assert rep["tokens"] == 4 * L  # only the domain rows ran
    expected = expected_for(packed, K)
    mixed = build_teachers({"reference": {"path": str(ref)}, "domain": TeacherSpec(store=str(dom_store))}, k=K,
                           names=packed.teacher_names, expected=expected)
    assert mixed.online("domain") is None and mixed.online("reference") is not None
    online = build_teachers({"reference": {"path": str(ref)}, "domain": {"path": str(dom)}}, k=K,
                            names=packed.teacher_names)
    batch = packed.batch([0, 1, 2, 3, 4, 5, 6])
    a, b = mixed.signals(batch), online.signals(batch)
    assert torch.equal(a.ids_BTK, b.ids_BTK)
    _assert_fp16_close(a.logprobs_BTK, b.logprobs_BTK)
    assert mixed.rows_seen == online.rows_seen == {"reference": 3, "domain": 4}
    with pytest.raises(ValueError, match="sample 0 is not in store"):  # a reference row asked of the domain store
        mixed.sources["domain"].signals(packed.batch([0]))
    with pytest.raises(ValueError, match="holds the rows of teacher 'domain'"):
        build_teachers({"reference": {"store": str(dom_store)}}, k=K, expected=expected)


_FSDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from train.data import PackedDataset
    from train.teachers import OnlineTeacher, build_teachers
    from train.teachers.capture import run_capture
    teacher, other, data, out = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    packed = PackedDataset.load(data)
    # "reference" is sharded over both ranks; rank 0's batch has no reference row, so it must join the reference
    # teacher's collectives with a forward on zero rows while rank 1 runs its rows.
    import train.teachers.online as T
    loads, real_load = [], T.load_hf
    T.load_hf = lambda path, dtype, device: (loads.append((str(path), str(device))), real_load(path, dtype, device))[1]
    sharded = build_teachers({"reference": {"path": teacher, "shard": True}, "domain": {"path": other}}, k=%d,
                             names=packed.teacher_names)
    T.load_hf = real_load
    assert sharded.sources["reference"].sharded and not sharded.sources["domain"].sharded
    # Only rank 0 reads the sharded teacher's weights (into host memory); rank 1 builds it on the meta device.
    assert [d for p, d in loads if p == teacher] == [["meta", "cpu"], ["meta"]][rank], loads
    rows = [[1, 3], [0, 1, 2]][rank]  # teacher of samples: 0 ref, 1 dom, 2 ref, 3 dom (set by the test)
    batch = packed.batch(rows)
    got = sharded.signals(batch)
    plain = build_teachers({"reference": {"path": teacher}, "domain": {"path": other}}, k=%d,
                           names=packed.teacher_names)
    want = plain.signals(batch)
    assert torch.equal(got.ids_BTK, want.ids_BTK) and torch.equal(got.logprobs_BTK, want.logprobs_BTK)
    assert sharded.rows_seen == [{"reference": 0, "domain": 2}, {"reference": 2, "domain": 1}][rank]
    assert sharded.empty_forwards["reference"] == [1, 0][rank], sharded.empty_forwards
    assert sharded.forwards == {"reference": 1, "domain": [1, 1][rank]}, sharded.forwards
    # One forward gathers every parameter but this rank's shard: over both ranks, (W - 1) x the teacher's bytes.
    got_bytes = torch.tensor([sharded.gathered_bytes["reference"]])
    dist.all_reduce(got_bytes)
    n_params = sum(p.numel() for p in plain.sources["reference"].model.parameters())
    assert got_bytes.item() == (2 - 1) * n_params * 4 and sharded.gathered_bytes["domain"] == 0, got_bytes
    # Sharded capture: 21 samples in blocks of 4 (the last holds 1) over 2 ranks: in the last round rank 0's block
    # has 4 samples (2 batches) and rank 1's 1 (1 batch), so rank 1 joins rank 0's second batch with an empty forward.
    dummies, real_empty = [], OnlineTeacher.empty_step
    OnlineTeacher.empty_step = lambda self, T: (dummies.append(T), real_empty(self, T))
    run_capture(teacher, packed, out, k=%d, batch_size=2, rank=rank, world_size=2, block_samples=4, shard=True)
    assert dummies == [[], [packed.seq_len]][rank], dummies
    dist.destroy_process_group()
""" % (K, K, K))


def test_fsdp_sharded_teacher_and_capture_under_torchrun(tmp_path, teacher, packed, reference_store):
    """Two gloo ranks on the CPU: FSDP2-sharded teacher signals equal the plain teacher's, ranks without rows
    keep the collectives in step, and a sharded capture writes exactly the store of an unsharded one."""
    data, out, script = tmp_path / "data", tmp_path / "store", tmp_path / "fsdp.py"
    script.write_text(_FSDP_SCRIPT)
    # `packed`'s tokens with samples 1 and 3 on "domain" (for the TeacherSet part); the capture takes all samples.
    teacher_S = np.asarray([0, 1, 0, 1] + [0] * 17, np.int32)
    PackedDataset(packed.tokens, packed.labels, packed.positions, packed.doc_ids, teacher_S, packed.teacher_names,
                  L, 0, {}).save(data)
    other = _teacher_dir(tmp_path / "other", 5)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(teacher), str(other), str(data), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The arrays equal the unsharded two-rank capture of the same tokens byte for byte (the JSON files differ in
    # the dataset fingerprint, since the teacher ids differ).
    ref, got = _store_bytes(reference_store[0]), _store_bytes(out)
    assert sorted(got) == sorted(ref)
    assert all(got[n] == ref[n] for n in ref if n.endswith(".npy"))


_KILL_IN_WRITE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from train.data import PackedDataset
    from train.teachers.capture import run_capture
    teacher, data, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(1)
        if len(calls) == kill_at:  # the temporary is written and fsynced, the rename has not happened
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
    run_capture(teacher, PackedDataset.load(data), out, k=%d, batch_size=3, block_samples=6)
""" % K)


# os.replace calls: 1-4 progress of blocks 1-4, 5-6 the partial arrays (no temporary), 7 index, 8 part, 9 manifest
@pytest.mark.parametrize("kill_at", [1, pytest.param(4, marks=pytest.mark.slow),
                                     pytest.param(7, marks=pytest.mark.slow), 9])
def test_capture_killed_inside_a_write_resumes_without_stray_files(tmp_path, teacher, packed, kill_at):
    data, out, ref = tmp_path / "data", tmp_path / "store", tmp_path / "ref"
    packed.save(data)
    run_capture(teacher, packed, ref, k=K, batch_size=3, block_samples=6)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_WRITE_SCRIPT, str(teacher), str(data), str(out),
                           str(kill_at)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(f.name.startswith(".") and ".tmp-" in f.name for f in out.iterdir())  # the kill left a temporary
    run_capture(teacher, packed, out, k=K, batch_size=3, block_samples=6)
    assert _store_bytes(out) == _store_bytes(ref)  # same files (no `.<name>.tmp-<pid>` left), same bytes
