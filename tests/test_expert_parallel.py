"""Expert parallelism for an MoE teacher (train/teachers/expert.py): under 2 and 4 gloo ranks on the CPU the
teacher's top-k equals the single-process teacher's, a rank without rows of it joins the all-to-alls with a
forward on zero rows, a rank with an empty batch and an expert that gets no token go through the layer; bad placements are
named errors before any weight is read."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelArgs, MoEArgs, Transformer, load_hf, save_hf
from train.errors import ConfigError
from train.teachers import OnlineTeacher
from train.teachers.capture import run_capture
from train.teachers.expert import check_expert_placement
from test_teacher import V, _packed

K = 8
E = 4
REPO = Path(__file__).resolve().parents[1]


def _teacher_dir(path, seed: int, moe: bool = True) -> Path:
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, vocab_size=V,
                     max_position_embeddings=64, moe=MoEArgs(num_experts=E, num_experts_per_tok=2) if moe else None)
    # std 0.3 spreads the logits so that top-k order is not decided by rounding (test_teacher's choice).
    save_hf(Transformer(args).init_weights(std=0.3, generator=torch.Generator().manual_seed(seed)), path)
    return Path(path)


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory):
    return _teacher_dir(tmp_path_factory.mktemp("moe"), 0)


@pytest.fixture(scope="module")
def dense_teacher(tmp_path_factory):
    return _teacher_dir(tmp_path_factory.mktemp("dense"), 1, moe=False)


def test_load_reads_only_the_given_experts(moe_teacher):
    whole = load_hf(moe_teacher)
    part = load_hf(moe_teacher, experts=range(1, 3))
    for a, b in zip(whole.layers, part.layers):
        assert torch.equal(b.feed_forward.w13, a.feed_forward.w13[1:3])
        assert torch.equal(b.feed_forward.w2, a.feed_forward.w2[1:3])
        assert torch.equal(b.feed_forward.gate.weight, a.feed_forward.gate.weight)  # the gate scores all E
        assert torch.equal(b.attention.wq.weight, a.attention.wq.weight)
    with pytest.raises(ValueError, match="contiguous range"):
        load_hf(moe_teacher, experts=range(3, 5))


def test_bad_placements_are_named_errors(moe_teacher, dense_teacher):
    args = load_hf(moe_teacher, device="meta").args
    with pytest.raises(ConfigError, match=r"4 experts do not split over ep=3 ranks; use a group of \[1, 2, 4\]"):
        check_expert_placement(args, 3)
    check_expert_placement(args, 4)
    with pytest.raises(ConfigError, match="needs an MoE .* this one is dense; use placement='shard'"):
        OnlineTeacher.load(dense_teacher, K, placement="expert")  # refused even in a single process
    with pytest.raises(ConfigError, match="placement='experts' is not one of"):
        OnlineTeacher.load(moe_teacher, K, placement="experts")
    # One process: the whole teacher, as `replicate`; the legacy flag still means `shard`.
    assert OnlineTeacher.load(moe_teacher, K, placement="expert").placement == "replicate"
    with pytest.raises(ValueError, match="shard=True contradicts placement='expert'"):
        OnlineTeacher.load(moe_teacher, K, shard=True, placement="expert")


_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import kernels
    import train.teachers.expert as X
    from kernels.moe import moe_experts
    from train.data import IGNORE, PackedDataset
    from train.teachers import OnlineTeacher, build_teachers
    moe, dense, data = sys.argv[1:4]
    K, E = %d, %d
    dist.init_process_group("gloo")
    rank, R = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)

    # 1. The layer alone, against kernels.moe.moe_experts with all E experts: rank 1 has no token at all and no
    #    rank routes a token to the last expert (its logit is -1e4), so its owner receives no row for it (at
    #    R = 4: no row at all) and still joins both all-to-alls.
    D, F = 16, 24
    g = torch.Generator().manual_seed(7)  # the same experts on every rank
    w13, w2 = torch.randn(E, 2 * F, D, generator=g) / 4, torch.randn(E, D, F, generator=g) / 4
    T = [5, 0, 9, 3][rank]
    x_TD = torch.randn(T, D)
    logits_TE = torch.randn(T, E)
    logits_TE[:, E - 1] = -1e4
    routing = kernels.route_topk(logits_TE, 2)
    L = E // R
    got = X.dispatch_experts_combine(x_TD, routing, w13[rank * L:(rank + 1) * L], w2[rank * L:(rank + 1) * L],
                                     dist.group.WORLD)
    want = moe_experts(x_TD, routing, w13, w2)
    assert got.shape == want.shape == (T, D)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    # 2. The teacher under expert parallelism through TeacherSet, against the single-process teacher. Samples 1
    #    and 3 are the dense "domain" teacher's, the others the MoE "reference" teacher's; rank 0's batch has no
    #    reference row, so it joins every all-to-all of the reference teacher with a forward on zero rows.
    received = []  # rows each rank's experts received per layer call, to show the empty cases were exercised
    real = X.dispatch_experts_combine
    def spy(x_TD, routing, w13, w2, group):
        sent = routing.counts_E.view(R, -1)
        received.append((x_TD.shape[0], int((sent == 0).sum())))
        return real(x_TD, routing, w13, w2, group)
    X.dispatch_experts_combine = spy
    packed = PackedDataset.load(data)
    ep = build_teachers({"reference": {"path": moe, "placement": "expert"}, "domain": {"path": dense}}, k=K,
                        names=packed.teacher_names)
    ref = ep.sources["reference"]
    assert ref.placement == "expert" and ref.collective and not ref.sharded
    assert all(layer.feed_forward.w13.shape[0] == E // R for layer in ref.model.layers)  # only its experts
    rows = {2: [[1, 3], [0, 2, 4, 5]], 4: [[1, 3], [0, 2], [4, 5, 6], [7, 1]]}[R][rank]
    batch = packed.batch(rows)
    got = ep.signals(batch)
    n_ref = sum(packed.teacher[r] == 0 for r in rows)
    assert ep.rows_seen["reference"] == n_ref and ep.empty_forwards["reference"] == (0 if n_ref else 1), \
        ep.empty_forwards
    assert ep.forwards["reference"] == 1  # every rank of the group runs the one forward of this step
    assert len(received) == 2  # one call per MoE layer: the rows' forward, or the empty one's
    X.dispatch_experts_combine = real
    # The single-process teacher, with K + 1 to see the margin below the K-th log-prob.
    plain = OnlineTeacher.load(moe, K + 1)
    dom = OnlineTeacher.load(dense, K)
    keep = torch.tensor([packed.teacher[r] == 0 for r in rows])
    worst = 0.0
    for b, r in enumerate(rows):
        one = packed.batch([r])
        want = (plain if keep[b] else dom).signals(one)
        ids, lp = want.ids_BTK[0], want.logprobs_BTK[0]
        lp_k = lp[:, :K]
        torch.testing.assert_close(got.logprobs_BTK[b], lp_k, rtol=0, atol=1e-6)
        worst = max(worst, (got.logprobs_BTK[b] - lp_k).abs().max().item())
        if keep[b]:
            loss_T = one.labels_BT[0] != IGNORE  # the teacher answers at loss positions only (zeros elsewhere)
            clear = loss_T & ((lp[:, K - 1] - lp[:, K]) > 1e-5)
            assert clear.sum() >= 0.9 * loss_T.sum() > 0, (clear, loss_T)  # the ids check below is not vacuous
            assert torch.equal(got.ids_BTK[b][clear], ids[clear, :K])
        else:
            assert torch.equal(got.ids_BTK[b], ids)
    # 3. A capture under expert placement writes the arrays of a single-process capture: 8 samples in blocks of 3
    #    (3, 3, 2) over R ranks: a rank with a shorter block or none joins the slots of the longest with forwards
    #    on zero rows (2 ranks: rank 1 in round 1; 4 ranks: rank 2 once, rank 3 twice).
    from pathlib import Path
    from train.teachers.capture import run_capture
    ref_out, ep_out = Path(data).parent / "ref_store", Path(data).parent / "ep_store"  # ref_out: by the test
    dummies, real_empty = [], OnlineTeacher.empty_step
    OnlineTeacher.empty_step = lambda self, T=1: (dummies.append(1), real_empty(self, T))
    run_capture(moe, packed, ep_out, k=K, batch_size=2, rank=rank, world_size=R, block_samples=3, placement="expert")
    assert len(dummies) == ({2: [0, 1], 4: [0, 0, 1, 2]}[R][rank]), dummies
    dist.barrier()
    if rank == 0:
        npy = sorted(f.name for f in ref_out.iterdir() if f.suffix == ".npy")
        assert npy and npy == sorted(f.name for f in ep_out.iterdir() if f.suffix == ".npy")
        assert all((ref_out / n).read_bytes() == (ep_out / n).read_bytes() for n in npy)

    report = [None] * R
    dist.all_gather_object(report, (received, worst))
    if rank == 0:
        print("per rank: [(tokens, experts sent nothing) per MoE layer], max |log-prob - single process|:", report)
    dist.destroy_process_group()
""" % (K, E))


def _run(tmp_path, moe_teacher, dense_teacher, nproc: int):
    data, script = tmp_path / "data", tmp_path / "ep.py"
    script.write_text(_SCRIPT)
    teacher_S = np.asarray([0, 1, 0, 1, 0, 0, 0, 0], np.int32)
    packed = _packed(8, teacher_S)
    packed.save(data)
    # The single-process capture the script's expert-parallel one must equal (here: a capture ends in a barrier
    # when a process group exists).
    run_capture(moe_teacher, packed, tmp_path / "ref_store", k=K, batch_size=2, block_samples=3)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), str(moe_teacher), str(dense_teacher), str(data)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_expert_parallel_teacher_equals_single_process(tmp_path, moe_teacher, dense_teacher, nproc):
    _run(tmp_path, moe_teacher, dense_teacher, nproc)
