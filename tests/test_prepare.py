"""train/data/prepare.py: prepared arrays byte-identical to prepare_packed, found again by key (no second
tokenisation), loaded without `datasets`, and bad input (other settings, truncated arrays, full or read-only disk)
named before training with nothing half-written left behind."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from train import data as D
from train.demo import corpus as DD
from train.config import make_config
from train.data import prepare as P

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["reference", "domain"]


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    import datasets
    datasets.disable_progress_bars()
    yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    corpus = DD.generate_corpus(seed=5, out_dir=root / "corpus", n_train=1200, n_eval=20)
    tok_dir = DD.train_tokenizer([corpus["train"]], root / "tok", vocab_size=2000, seed=5)
    return {"root": root, "rows": corpus["train"], "tok": tok_dir}


def _env(rank=0, world_size=1):
    return SimpleNamespace(rank=rank, world_size=world_size, is_main=rank == 0)


def _data(world, **kw):
    d = make_config("kd", None, [f"data.paths={world['rows']}", "model.path=x", "teachers.t.path=y"]).data
    for k, v in kw.items():
        setattr(d, k, v)
    return d


@pytest.mark.parametrize("processes", [1, 2])
def test_prepared_arrays_identical_to_prepare_packed(world, tmp_path, processes):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(world["tok"])
    for seq_len, names in ((64, NAMES), (48, None)):  # 48: some documents truncated, some dropped
        ref = D.prepare_packed(world["rows"], tok, seq_len, names, cache_dir=str(tmp_path / "old"), num_proc=1)
        out = P.prepare(world["rows"], world["tok"], seq_len, names, None, tmp_path / "new", processes=processes,
                        chunk_rows=150, log=lambda *a: None)
        for name in ("tokens", "labels", "positions", "doc_ids", "teacher"):
            a, b = np.load(out / f"{name}.npy"), np.asarray(getattr(ref, name))
            assert a.dtype == b.dtype == np.int32 and a.shape == b.shape and a.tobytes() == b.tobytes(), name
        new = P.load_prepared(out)
        assert new.fingerprint == ref.fingerprint and new.stats == ref.stats and new.teacher_names == ref.teacher_names
        assert new.fingerprint == new._content_hash()  # the stored hash is the arrays' own
    assert ref.stats["truncated_docs_at_tokenize"] > 0
    # nothing but the prepared directories is left in the cache
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "new").iterdir()) == ["prepared", "prepared"]


def test_two_runs_reuse_one_prepared_copy(world, tmp_path, monkeypatch):
    d = _data(world, seq_len=64, cache_dir=str(tmp_path / "cache"), num_proc=1)
    calls = []  # tokenisation runs in worker processes; count the preparations that start them
    real = P._prepare_into
    monkeypatch.setattr(P, "_prepare_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = P.build_packed(d, world["tok"], None, d.cache_dir, _env(), log=lambda *a: None)
    n_calls = len(calls)
    assert n_calls > 0
    second = P.build_packed(d, world["tok"], None, d.cache_dir, _env(), log=lambda *a: None)
    assert len(calls) == n_calls  # no second tokenisation
    assert second.fingerprint == first.fingerprint and isinstance(second.tokens, np.memmap)
    assert len(list(Path(d.cache_dir).glob("prepared-*"))) == 1
    # the same tokenizer content from another directory (capture uses the teacher's): the same key
    other_tok = shutil.copytree(world["tok"], tmp_path / "teacher_tok")
    P.build_packed(d, str(other_tok), None, d.cache_dir, _env(), log=lambda *a: None)
    assert len(calls) == n_calls and len(list(Path(d.cache_dir).glob("prepared-*"))) == 1
    # the rows file changed (mtime): a new key, prepared again
    rows = Path(world["rows"])
    st = rows.stat()
    os.utime(rows, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        P.build_packed(d, world["tok"], None, d.cache_dir, _env(), log=lambda *a: None)
    finally:
        os.utime(rows, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(calls) > n_calls and len(list(Path(d.cache_dir).glob("prepared-*"))) == 2


def test_cli_prepare_then_training_loader_without_datasets(world, tmp_path):
    cache = tmp_path / "cache"
    args = [f"--data.paths={world['rows']}", f"--data.tokenizer={world['tok']}", "--data.seq_len=64",
            f"--data.cache_dir={cache}", "--data.num_proc=2", "--prepare.phase=2", "--prepare.chunk_rows=200"]
    from train.main import main
    assert main(["prepare", *args]) == 0
    (prepared,) = cache.glob("prepared-*")
    assert json.loads((prepared / "meta.json").read_text())["key"]["teacher_names"] == NAMES
    # The training path in a fresh process where `datasets` cannot be imported (the GPU image has none).
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("datasets is blocked in this test")
sys.meta_path.insert(0, Block())
from types import SimpleNamespace
from train.config import make_config
from train.data.prepare import build_packed
from train.data import Sampler
d = make_config("dae", None, ["data.paths={world['rows']}", "data.seq_len=64", "data.cache_dir={cache}", "model.path=x",
                             "teachers.reference.path=a", "teachers.domain.path=b"]).data
env = SimpleNamespace(rank=0, world_size=1, is_main=True)
packed = build_packed(d, "{world['tok']}", ["reference", "domain"], d.cache_dir, env, log=lambda *a: None)
batch = Sampler(packed, 4, seed=0, domain_fraction=0.5).next_batch()
assert "datasets" not in sys.modules and batch.tokens_BT.shape == (4, 64)
print("ok", len(packed), type(packed.tokens).__name__)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[0] == "ok" and res.stdout.split()[2] == "memmap"


def test_prepared_from_other_settings_and_truncated_arrays(world, tmp_path):
    log = lambda *a: None  # noqa: E731
    out = P.prepare(world["rows"], world["tok"], 64, None, None, tmp_path, processes=1, log=log)
    # a directory of other settings where this run's key points (a copy, a stale or foreign directory)
    key = P.data_key([world["rows"]], world["tok"], 128, None, None)
    shutil.copytree(out, P.prepared_dir(tmp_path, key))
    with pytest.raises(P.PreparedDataError, match=r"prepared from other settings \(differs in seq_len"):
        P.load_prepared(P.prepared_dir(tmp_path, key), key)
    d = _data(world, seq_len=128)
    with pytest.raises(P.PreparedDataError, match="other settings"):
        P.build_packed(d, world["tok"], None, tmp_path, _env(), log=log)
    # truncated arrays: named before any training, also through data.packed
    broken = shutil.copytree(out, tmp_path / "broken")
    with open(broken / "labels.npy", "r+b") as f:
        f.truncate(os.path.getsize(broken / "labels.npy") - 4)
    with pytest.raises(P.PreparedDataError, match=r"labels\.npy: .* \(truncated or appended to\)"):
        P.load_prepared(broken)
    with pytest.raises(P.PreparedDataError, match="truncated"):
        P.build_packed(_data(world, packed=str(broken), paths=[]), world["tok"], None, tmp_path, _env(), log=log)
    (broken / "meta.json").write_text("{")
    with pytest.raises(P.PreparedDataError, match="no readable meta.json"):
        P.load_prepared(broken)


def test_other_ranks_wait_and_see_rank0_failure(world, tmp_path, monkeypatch):
    d = _data(world, seq_len=64)
    key = P.data_key(d.paths, world["tok"], 64, None, None)
    target = P.prepared_dir(tmp_path, key)
    monkeypatch.setattr(P, "_POLL_S", 0.01)
    failed = target.with_name(target.name + ".failed")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")
    failed.write_text(json.dumps({"run": "launch-1", "error": "OSError: stale"}))  # an earlier launch's: ignored
    monkeypatch.setattr(P, "wait_timeout_s", lambda paths: 0.3)
    with pytest.raises(P.PreparedDataError, match=r"did not appear within 0.3 s"):
        P.build_packed(d, world["tok"], None, tmp_path, _env(rank=1, world_size=2), log=lambda *a: None)
    failed.write_text(json.dumps({"run": "launch-2", "error": "OSError: disk full"}))
    with pytest.raises(P.PreparedDataError, match="rank 0 failed to prepare .*disk full"):
        P.build_packed(d, world["tok"], None, tmp_path, _env(rank=1, world_size=2), log=lambda *a: None)
    monkeypatch.undo()
    assert P.wait_timeout_s(d.paths) == int(900 + 5 * os.path.getsize(world["rows"]) / 1e6)


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.decode().strip()})")


@pytest.mark.parametrize("case", ["full", "full-midway", "read-only", "not-a-directory"])
def test_cache_on_full_or_read_only_disk(world, tmp_path, monkeypatch, case):
    disk = tmp_path / "disk"
    if case == "not-a-directory":
        disk.write_text("a file where the cache directory should be")
        cache, match = disk / "cache", "cannot write prepared data under .*: (FileExistsError|NotADirectoryError)"
    else:
        # full: the space check refuses up front; full-midway: the check is switched off, so the disk fills
        # while the rows are converted and tokenised (400 kB: less than the rows' copy plus the arrays)
        _mount_tmpfs(disk, "size=1m,ro" if case == "read-only" else "size=400k")
        cache = disk
        match = {"full": "the disk is full for this data", "full-midway": "the disk is full",
                 "read-only": "read-only"}[case]
        if case == "full-midway":
            monkeypatch.setattr(P, "_SPACE_PER_ROW_BYTE", 0)
    try:
        with pytest.raises(P.PreparedDataError, match=match):
            P.prepare(world["rows"], world["tok"], 64, None, None, cache, processes=1, log=lambda *a: None)
        if case != "not-a-directory":
            assert list(cache.iterdir()) == []  # nothing half-written left behind
    finally:
        if case != "not-a-directory":  # lazy: the failed call's arrow maps may still be open in this process
            subprocess.run(["umount", "-l", str(disk)], check=True)


def test_skipped_and_bad_rows(world, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(world["tok"])
    lines = open(world["rows"]).read().splitlines()[:300]
    empty = json.loads(lines[7])
    empty["messages"][-1]["content"] = " "
    lines[7] = json.dumps(empty)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 1 of 300 rows with an empty assistant answer \(first: row 8\)"):
        out = P.prepare(str(rows), world["tok"], 64, None, None, tmp_path / "c", processes=2, chunk_rows=50,
                        log=lambda *a: None)
    ref = D.prepare_packed(str(rows), tok, 64, None, cache_dir=str(tmp_path / "old"), num_proc=1)
    assert P.load_prepared(out).fingerprint == ref.fingerprint  # doc ids count only the kept rows, as before
    bad = json.loads(lines[3])
    bad["messages"][0]["role"] = "robot"
    lines[120] = json.dumps(bad)
    rows.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl: row 121: turn 0 has unknown role 'robot'"):
        P.prepare(str(rows), world["tok"], 64, None, None, tmp_path / "bad", processes=2, chunk_rows=50,
                  log=lambda *a: None)
    assert list((tmp_path / "bad").iterdir()) == []


def test_rank1_waits_for_rank0(world, tmp_path, monkeypatch):
    import threading
    monkeypatch.setattr(P, "_POLL_S", 0.05)
    d = _data(world, seq_len=64, num_proc=1)
    got, lines = {}, []
    waiter = threading.Thread(target=lambda: got.update(
        r1=P.build_packed(d, world["tok"], None, tmp_path, _env(rank=1, world_size=2), log=lambda *a: None)))
    waiter.start()
    r0 = P.build_packed(d, world["tok"], None, tmp_path, _env(rank=0, world_size=2), log=lines.append)
    waiter.join(timeout=120)
    assert got["r1"].fingerprint == r0.fingerprint and "preparing it now on rank 0" in lines[0]
