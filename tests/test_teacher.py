"""Online teacher signals: chunked top-k against full logits, the TopK contract, one teacher per row; a step's
signals up front equal the per-micro-batch ones; sharded over a node's mesh (2 and 4 gloo ranks) they equal the
single-process teacher's, with the counters that prove the work (forwards, rows, gathered bytes)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelArgs, MoEArgs, Transformer, save_hf
from train.data import PackedDataset
from train.data import IGNORE as IGNORE_INDEX
from train.teachers import (OnlineTeacher, TeacherSet, TeacherSpec, TopK, build_teachers,
                           head_chunk_rows, topk_logprobs)

V, L = 211, 24


def _args(moe: bool = False, vocab_size: int = V) -> ModelArgs:
    return ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, vocab_size=vocab_size,
                     max_position_embeddings=64, moe=MoEArgs(num_experts=4, num_experts_per_tok=2) if moe else None)


def _teacher_dir(path, seed: int, moe: bool = False):
    # std 0.3 spreads the logits (std 0.02 leaves them nearly uniform, where top-k order is a coin toss).
    model = Transformer(_args(moe)).init_weights(std=0.3, generator=torch.Generator().manual_seed(seed))
    return save_hf(model, path)


def _packed(S: int, teacher_S, names=("reference", "domain"), seed: int = 0) -> PackedDataset:
    """S rows of two documents each (prompt, then answer with loss), padded tails, as `pack` lays them out."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, V, (S, L)).astype(np.int32)
    labels = np.full((S, L), IGNORE_INDEX, np.int32)
    positions = np.zeros((S, L), np.int32)
    doc_ids = np.full((S, L), -1, np.int32)
    for s in range(S):
        cut, end = int(rng.integers(6, 12)), int(rng.integers(16, L + 1))
        for d, (a, b) in enumerate(((0, cut), (cut, end))):
            positions[s, a:b] = np.arange(b - a)
            doc_ids[s, a:b] = 2 * s + d
            answer = a + (b - a) // 2
            labels[s, answer:b - 1] = tokens[s, answer + 1:b]
        positions[s, end:] = np.arange(L - end)
    return PackedDataset(tokens, labels, positions, doc_ids, np.asarray(teacher_S, np.int32), list(names), L, 0, {})


def _full_topk(model: Transformer, batch, k: int) -> TopK:
    """Oracle: the whole [B, T, V] logits, fp32 log-softmax, torch.topk, zeroed at ignored positions."""
    with torch.no_grad():
        logits = model.logits(model(batch.tokens_BT, batch.positions_BT, batch.doc_ids_BT)).float()
    lp, ids = torch.log_softmax(logits, -1).topk(k, -1)
    keep = (batch.labels_BT != IGNORE_INDEX)[..., None]
    return TopK(torch.where(keep, ids, 0), torch.where(keep, lp, 0.0))


def test_head_chunk_rows_arithmetic():
    assert head_chunk_rows(32000) == 1398          # 256 MiB / (6 B x 32000)
    assert head_chunk_rows(10**9) == 1             # never zero


@pytest.mark.parametrize("k,chunk_rows,N", [(5, 8, 37), (1, 4, 9), (16, None, 13), (7, 64, 0)])
def test_chunked_topk_equals_full(k, chunk_rows, N):
    g = torch.Generator().manual_seed(k)
    hidden_ND, weight_VD = torch.randn(N, 24, generator=g), torch.randn(V, 24, generator=g)
    ids, lp = topk_logprobs(hidden_ND, weight_VD, k, chunk_rows)
    expect_lp, expect_ids = torch.log_softmax(hidden_ND @ weight_VD.T, -1).topk(k, -1)
    assert ids.dtype == torch.long and lp.dtype == torch.float32 and ids.shape == (N, k)
    assert torch.equal(ids, expect_ids)
    torch.testing.assert_close(lp, expect_lp, rtol=1e-5, atol=1e-5)


def test_chunked_topk_bf16_head_fp32_softmax():
    """bf16 weights: the GEMM runs in bf16 (as the teacher's head), the normalisation in fp32."""
    g = torch.Generator().manual_seed(1)
    hidden_ND, weight_VD = torch.randn(11, 24, generator=g), torch.randn(V, 24, generator=g)
    ids, lp = topk_logprobs(hidden_ND, weight_VD.bfloat16(), 6, chunk_rows=3)
    logits = (hidden_ND.bfloat16() @ weight_VD.bfloat16().T).float()
    expect_lp, expect_ids = torch.log_softmax(logits, -1).topk(6, -1)
    assert torch.equal(ids, expect_ids) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, expect_lp, rtol=1e-5, atol=1e-5)


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k=0"):
        topk_logprobs(torch.randn(2, 4), torch.randn(5, 4), 0)


@pytest.mark.parametrize("moe", [False, True], ids=["mistral", "mixtral"])
def test_online_signals_match_full_logits(tmp_path, moe):
    teacher = OnlineTeacher.load(_teacher_dir(tmp_path / "t", 0, moe), k=8, chunk_rows=5)
    model = teacher.model
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert next(model.parameters()).dtype == torch.float32  # fp32 on CPU
    batch = _packed(5, [0] * 5).batch([4, 0, 2])
    got, expect = teacher.signals(batch), _full_topk(model, batch, 8)
    assert got.ids_BTK.shape == (3, L, 8) and got.ids_BTK.dtype == torch.long
    assert torch.equal(got.ids_BTK, expect.ids_BTK)
    torch.testing.assert_close(got.logprobs_BTK, expect.logprobs_BTK, rtol=1e-5, atol=1e-5)
    ignored = batch.labels_BT == IGNORE_INDEX
    assert ignored.any() and (got.ids_BTK[ignored] == 0).all() and (got.logprobs_BTK[ignored] == 0).all()


def test_two_teachers_each_row_from_its_own(tmp_path):
    specs = {"reference": TeacherSpec(path=str(_teacher_dir(tmp_path / "ref", 1))),
             "domain": {"path": str(_teacher_dir(tmp_path / "dom", 2))}}
    teachers = build_teachers(specs, k=4, names=["reference", "domain"])
    teacher_S = [0, 1, 1, 0, 1, 0]
    packed = _packed(6, teacher_S)
    batch = packed.batch([0, 1, 2, 3, 4])  # rows: ref, dom, dom, ref, dom
    seen = {}  # name -> token rows each model actually received
    for name in specs:
        model = teachers.online(name)
        model.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0]))
    got = teachers.signals(batch)

    assert teachers.rows_seen == {"reference": 2, "domain": 3}
    assert [t.shape[0] for t in seen["reference"]] == [2] and [t.shape[0] for t in seen["domain"]] == [3]
    assert torch.equal(seen["reference"][0], batch.tokens_BT[[0, 3]])
    assert torch.equal(seen["domain"][0], batch.tokens_BT[[1, 2, 4]])
    for b, t in enumerate(teacher_S[:5]):
        own = _full_topk(teachers.online(["reference", "domain"][t]), packed.batch([b]), 4)
        other = _full_topk(teachers.online(["domain", "reference"][t]), packed.batch([b]), 4)
        assert torch.equal(got.ids_BTK[b], own.ids_BTK[0])
        torch.testing.assert_close(got.logprobs_BTK[b], own.logprobs_BTK[0], rtol=1e-5, atol=1e-5)
        assert not torch.equal(got.ids_BTK[b], other.ids_BTK[0])  # the teachers really differ

    teachers.signals(packed.batch([5, 0]))  # a one-teacher batch: the domain teacher does not run
    assert teachers.rows_seen == {"reference": 4, "domain": 3}


def test_row_naming_a_teacher_not_loaded_fails(tmp_path):
    teachers = build_teachers({"reference": {"path": str(_teacher_dir(tmp_path / "ref", 1))}}, k=4,
                              names=["reference", "domain"])
    batch = _packed(3, [0, 1, 0]).batch([0, 1, 2])
    with pytest.raises(ValueError, match="row 1 names teacher 'domain'.*not loaded"):
        teachers.signals(batch)
    batch.teacher_B[1] = 5
    with pytest.raises(ValueError, match="row 1 names teacher index 5"):
        teachers.signals(batch)
    assert teachers.rows_seen == {"reference": 0}


def test_spec_and_lookup_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path="):
        TeacherSpec()
    with pytest.raises(ValueError, match="exactly one of path="):
        TeacherSpec(path="a", store="b")
    teachers = TeacherSet({}, k=4, device="cpu")
    with pytest.raises(ValueError, match="no teacher 'x'"):
        teachers.online("x")


def assert_topk_matches(got: TopK, ref: TopK, k: int) -> None:
    """`got` (K = k) against `ref` (K = k + 1, the single-process teacher): log-probs within 1e-6 (fp32), ids exact
    wherever the rank is unambiguous: the log-prob gaps to both neighbours (the (k+1)-th included) exceed 1e-5."""
    lp = ref.logprobs_BTK
    torch.testing.assert_close(got.logprobs_BTK, lp[..., :k], rtol=0, atol=1e-6)
    gap_next = lp[..., :k] - lp[..., 1:k + 1]
    gap_prev = torch.cat([torch.full_like(gap_next[..., :1], float("inf")), gap_next[..., :-1]], -1)
    clear = (gap_next.abs() > 1e-5) & (gap_prev.abs() > 1e-5)
    assert clear.any()  # not a vacuous comparison
    assert torch.equal(got.ids_BTK[clear], ref.ids_BTK[..., :k][clear])


def test_step_signals_up_front_equal_per_micro_batch(tmp_path):
    """Three micro-batches, a dense reference (max_tokens = 2 rows) and an MoE domain teacher (0: one forward):
    the up-front signals equal the per-micro-batch ones and the single-process k+1 oracle; each teacher runs
    ceil(rows / rows per forward) times on its own rows only; a teacher without rows in a step does not run."""
    K = 4
    ref, dom = str(_teacher_dir(tmp_path / "ref", 1)), str(_teacher_dir(tmp_path / "dom", 2, moe=True))
    teachers = build_teachers({"reference": {"path": ref, "max_tokens": 2 * L + 3}, "domain": {"path": dom}}, k=K,
                              names=["reference", "domain"])
    oracle = build_teachers({"reference": {"path": ref}, "domain": {"path": dom}}, k=K + 1,
                            names=["reference", "domain"])
    calls = {}
    for name in teachers.sources:
        teachers.online(name).register_forward_hook(
            lambda m, args, out, name=name: calls.setdefault(name, []).append(args[0].shape[0]))
    packed = _packed(9, [0, 1, 1, 0, 0, 1, 0, 0, 0])
    mbs = [packed.batch([0, 1, 2]), packed.batch([3, 4, 6]), packed.batch([7, 8, 5])]
    up = teachers.step_signals(mbs)
    # reference: rows 0 | 3 4 6 | 7 8 = 6 rows, 2 per forward (budget 2L + 3 tokens): 3 forwards; domain: 3 rows, 1
    assert calls == {"reference": [2, 2, 2], "domain": [3]}, calls
    assert teachers.counters() == {
        "domain": {"rows": 3, "forwards": 1, "empty_forwards": 0, "gathered_bytes": 0},
        "reference": {"rows": 6, "forwards": 3, "empty_forwards": 0, "gathered_bytes": 0}}
    per = [teachers.signals(mb) for mb in mbs]  # today's path: each teacher once per micro-batch it has rows in
    assert teachers.forwards == {"reference": 3 + 3, "domain": 1 + 2}
    for u, p, mb in zip(up, per, mbs):
        want = oracle.signals(mb)
        assert_topk_matches(u, want, K)
        assert_topk_matches(p, want, K)
        torch.testing.assert_close(u.logprobs_BTK, p.logprobs_BTK, rtol=0, atol=1e-6)
    calls.clear()
    teachers.step_signals([packed.batch([0, 3]), packed.batch([4])])  # no domain row in this step
    assert calls == {"reference": [2, 1]} and teachers.forwards["domain"] == 3


_MESH_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[4])
    from test_teacher import L, _packed, assert_topk_matches
    from train import parallel
    from train.teachers import build_teachers
    ref, dom, node, K = sys.argv[1], sys.argv[2], int(sys.argv[3]), 4
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # `node` ranks per node (as torchrun's LOCAL_WORLD_SIZE would say): the teachers shard over the node only.
    env = parallel.Env(rank, world, rank % node, torch.device("cpu"), False, local_world_size=node)
    mesh = parallel.node_mesh(env)
    assert mesh.size() == node
    specs = {"reference": {"path": ref, "placement": "shard", "max_tokens": L}, "domain": {"path": dom, "shard": True}}
    sharded = build_teachers(specs, k=K, names=["reference", "domain"], mesh=mesh)
    oracle = build_teachers({"reference": {"path": ref}, "domain": {"path": dom}}, k=K + 1,
                            names=["reference", "domain"])
    packed = _packed(12, [0] * 6 + [1] * 6)  # samples 0-5: reference, 6-11: domain
    layout = [[[0, 6], [1, 2]], [[3, 4], [5, 0]], [[1, 3], [2, 4]], [[5, 0], [1, 2]]][rank]
    mbs = [packed.batch(x) for x in layout]
    up = sharded.step_signals(mbs)
    # reference: one row per forward, 4 forwards on every rank (the most rows on a rank of the node), rank 0 (3
    # rows) joins one with zero rows. domain: rows on rank 0 only: node 0 runs one forward (rank 1 on zero rows),
    # node 1 (ranks 2, 3) none at all: no forward, no gather.
    c = sharded.counters()
    ref_rows, dom_rows = [3, 4, 4, 4][rank], [1, 0, 0, 0][rank]
    assert {n: (x["rows"], x["forwards"], x["empty_forwards"]) for n, x in c.items()} == {
        "reference": (ref_rows, 4, 4 - ref_rows), "domain": (dom_rows, int(rank < 2), int(rank == 1))}, c
    for name, src in sharded.sources.items():
        assert c[name]["gathered_bytes"] == c[name]["forwards"] * src.gather_bytes
        per_forward = torch.tensor([src.gather_bytes])
        dist.all_reduce(per_forward, group=mesh.get_group())  # each rank receives all but its own shard
        total = sum(p.numel() * p.element_size() for p in oracle.sources[name].model.parameters())
        assert per_forward.item() == (node - 1) * total, (name, per_forward, total)
    per = [sharded.signals(mb) for mb in mbs]
    for u, p, mb in zip(up, per, mbs):
        want = oracle.signals(mb)
        assert_topk_matches(u, want, K)
        assert_topk_matches(p, want, K)
    dist.destroy_process_group()
    open(f"{sys.argv[5]}/ok-{rank}", "w").write(repr(c))  # a file per rank: the ranks' stdout lines interleave
""")


@pytest.mark.parametrize("world,node", [(2, 2), (4, 2)], ids=["2-ranks-1-node", "4-ranks-2-nodes"])
def test_sharded_over_node_mesh_equals_single_process(tmp_path, world, node):
    """Gloo ranks on the CPU, a dense (reference) and an MoE (domain) teacher FSDP2-sharded over each node's
    ranks: the up-front and per-micro-batch signals equal the single-process teacher's (log-probs within 1e-6,
    ids exact where unambiguous), a rank without rows of a teacher joins its node's forwards on zero rows, and a
    node where no rank has a row of it runs nothing; forwards, rows and gathered bytes as computed."""
    ref, dom = _teacher_dir(tmp_path / "ref", 1), _teacher_dir(tmp_path / "dom", 2, moe=True)
    script = tmp_path / "mesh.py"
    script.write_text(_MESH_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(script), str(ref), str(dom), str(node), str(repo / "tests"), str(tmp_path)],
                          env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == [f"ok-{r}" for r in range(world)]
