"""Online teachers: one of our models loaded from an HF directory, frozen, placed over the ranks in one of
PLACEMENTS (whole on every rank, FSDP2-sharded, or its experts spread: train.teachers.expert); and `TeacherSet`,
which holds a run's teachers by name (online or a store) and runs each only on the rows that name it
(docs/design.md, decision 3).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model import Transformer, load_hf
from model.attention import spans_to
from train import parallel
from train.data import IGNORE
from train.errors import ConfigError
from train.teachers.signal import Rows, TopK, default_dtype, dense_topk, loss_positions, select_rows, topk_logprobs
from train.teachers.store import StoreReader

# How an online teacher's weights are placed over the ranks of its group (the node's under HSDP):
#   replicate  whole on every rank
#   shard      FSDP2, 1/W of every tensor per rank, each block all-gathered for its forward (shard_teacher)
#   expert     an MoE teacher's E/W experts of every layer per rank and the rest replicated, tokens sent to the
#              experts' owners by all-to-all (train.teachers.expert); no weight is ever gathered
PLACEMENTS = ("replicate", "shard", "expert")


def resolve_placement(placement: str | None, shard: bool = False) -> str:
    """`placement` checked, or the legacy `shard` flag's ("shard" / "replicate") when it is None."""
    if placement is None:
        return "shard" if shard else "replicate"
    if placement not in PLACEMENTS:
        raise ConfigError(f"teacher placement={placement!r} is not one of {PLACEMENTS}; pick one of them")
    if shard and placement != "shard":
        raise ConfigError(f"shard=True contradicts placement={placement!r}; drop shard (placement='shard' is the "
                          f"same as shard=True)")
    return placement


def shard_teacher(model: Transformer, mesh=None) -> Transformer:
    """FSDP2 forward-only sharding of a frozen teacher over the ranks, applied from outside the model.

    Order: each block its own unit (its weights are gathered just before it runs and freed right after, so a
    rank holds 1/W of the teacher plus one block), the LM head its own unit (OnlineTeacher gathers it once per
    batch around the chunk loop with unshard()/reshard()), then the root (embeddings and final norm).
    Every rank must then call the teacher the same number of times: TeacherSet and capture keep them in step.
    `mesh`: the ranks that share one copy (under HSDP the node's: train.parallel.shard_mesh); default: all.
    Experts are placed as the student's are (train.parallel.expert_placement): Mixtral's 8 experts over 32
    ranks on dim 0 would pad 8 expert slots to 32.
    """
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = parallel.world_mesh()
    place = parallel.expert_placement(mesh.size())
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, shard_placement_fn=place)
    fully_shard(model.output, mesh=mesh, reshard_after_forward=True, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, shard_placement_fn=place)
    return model



class OnlineTeacher:
    """A frozen model that answers top-k at loss positions. `placement`: one of PLACEMENTS, as applied (a single
    process runs every placement as `replicate`); `sharded`: wrapped by `shard_teacher`; `collective`: every rank
    of the group must run each forward together (shard, expert), hence dummy steps on ranks without rows."""

    def __init__(self, model: Transformer, k: int, placement: str = "replicate", chunk_rows: int | None = None):
        if not 1 <= k <= model.args.vocab_size:
            raise ValueError(f"k={k} must be in [1, vocab_size={model.args.vocab_size}]")
        assert placement in PLACEMENTS, placement
        self.model, self.k, self.placement, self.chunk_rows = model, k, placement, chunk_rows
        self.sharded = placement == "shard"
        self.collective = placement != "replicate"
        self.device = next(iter(model.parameters())).device if not self.sharded else parallel.mesh_device()

    @classmethod
    def load(cls, path, k: int, device="cpu", dtype: torch.dtype | None = None, shard: bool = False,
             chunk_rows: int | None = None, mesh=None, placement: str | None = None) -> "OnlineTeacher":
        """Load an HF directory with `load_hf`, freeze it (no grad, eval) and place it (`placement`, default from
        the older `shard` flag) when a process group is initialised, over `mesh`'s shard dimension (default: all
        ranks):
        - shard: built on the meta device and FSDP2-sharded, then given its weights by rank 0, which alone reads
          the whole teacher into host memory (train.parallel.materialize_from_rank0); each GPU holds 1/W of it.
        - expert: each rank reads only its E/W experts of every layer plus the replicated rest from the
          safetensors (load_hf(experts=...): host memory per rank ~ its GPU share, 14.5 GB for Mixtral-8x7B at
          W = 8), then train.teachers.expert.expert_parallel. ConfigError for a dense teacher or E not divisible
          by W, from config.json before any weight is read."""
        path = Path(path)
        dtype = dtype or default_dtype(device)
        placement = resolve_placement(placement, shard)
        if placement == "expert":
            return cls._load_expert(path, k, device, dtype, chunk_rows, mesh)
        if not parallel.is_distributed():
            placement = "replicate"  # one process holds the whole teacher whatever the placement
        shard = placement == "shard"
        model = load_hf(path, dtype=dtype, device="meta" if shard else device)
        model.requires_grad_(False).eval()
        if shard:
            shard_teacher(model, mesh)
            parallel.materialize_from_rank0(model, lambda: load_hf(path, dtype=dtype, device="cpu").state_dict(),
                                   parallel.mesh_device())
        return cls(model, k, placement=placement, chunk_rows=chunk_rows)

    @classmethod
    def _load_expert(cls, path: Path, k: int, device, dtype, chunk_rows, mesh) -> "OnlineTeacher":
        from train.teachers.expert import check_expert_placement, expert_group, expert_parallel
        args = load_hf(path, dtype=dtype, device="meta").args  # config and tensor names checked, no weight read
        group = expert_group(mesh) if parallel.is_distributed() else None
        ep = torch.distributed.get_world_size(group) if group is not None else 1
        check_expert_placement(args, ep, f"teacher {path}")  # a dense teacher is refused even in one process
        if group is None:
            model = load_hf(path, dtype=dtype, device=device).requires_grad_(False).eval()
            return cls(model, k, placement="replicate", chunk_rows=chunk_rows)
        L, r = args.moe.num_experts // ep, torch.distributed.get_rank(group)
        model = load_hf(path, dtype=dtype, device=device, experts=range(r * L, (r + 1) * L))
        model.requires_grad_(False).eval()
        return cls(expert_parallel(model, mesh), k, placement="expert", chunk_rows=chunk_rows)

    @torch.no_grad()
    def loss_topk(self, rows):
        """(idx_N, ids_NK, logprobs_NK) for the loss positions of `rows` (a PackedBatch or Rows); idx_N are flat
        indices into B*T in ascending order. Hidden states are gathered at the N loss positions before the LM
        head, so [B, T, V] logits never exist (about half the positions of a chat batch are prompt)."""
        dev = self.device
        idx_N = loss_positions(rows.labels_BT)  # host sync on CUDA labels, free on CPU labels
        tokens_BT = rows.tokens_BT.to(dev, non_blocking=True)
        positions_BT = rows.positions_BT.to(dev, non_blocking=True) if rows.positions_BT is not None else None
        doc_ids_BT = rows.doc_ids_BT.to(dev, non_blocking=True) if rows.doc_ids_BT is not None else None
        spans = spans_to(rows.doc_ids_BT, dev)  # document boundaries from the CPU ids: no device sync
        hidden_BTD = self.model(tokens_BT, positions_BT, doc_ids_BT, doc_spans=spans)
        hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1]).index_select(0, idx_N.to(dev, non_blocking=True))
        head = self.model.output
        if self.sharded:
            head.unshard()  # all-gather the V x D head once per batch, not once per chunk
        try:
            ids_NK, logprobs_NK = topk_logprobs(hidden_ND, head.weight, self.k, self.chunk_rows)
        finally:
            if self.sharded:
                head.reshard()
        return idx_N, ids_NK, logprobs_NK

    def signals(self, rows) -> TopK:
        B, T = rows.labels_BT.shape
        return dense_topk(*self.loss_topk(rows), B, T)

    @torch.no_grad()
    def dummy_step(self):
        """One forward on a single token (plus the head gather when sharded): what a sharded or expert-parallel
        teacher's collectives need from a rank that has no rows of this teacher in a step where another rank has
        some (expert: the token's K routed copies join each layer's all-to-alls)."""
        t_11 = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.loss_topk(Rows(t_11, torch.full_like(t_11, IGNORE), None, None, None))


@dataclass
class TeacherSpec:
    """One teacher of a run: online (`path`, an HF directory) or offline (`store`, a directory written by
    `capture`), exactly one of the two. `placement`: one of PLACEMENTS for an online teacher (under torchrun);
    `shard`: the older flag for placement="shard"."""
    path: str | None = None
    store: str | None = None
    shard: bool = False
    placement: str | None = None

    def __post_init__(self):
        if (self.path is None) == (self.store is None):
            raise ValueError(f"a teacher spec needs exactly one of path= (online HF directory) or store= (offline "
                             f"capture directory); got path={self.path!r}, store={self.store!r}")


class TeacherSet:
    """Teachers by name; `signals(batch)` gives each row the signal of its own teacher only.

    `names` is the run's ordered teacher list: batch.teacher_B[b] = i means row b is taught by names[i].
    `rows_seen[name]` counts the rows each teacher actually processed (the proof that none ran on others' rows).
    """

    def __init__(self, sources: dict, k: int, device, names: list[str] | None = None):
        self.sources, self.k, self.device = dict(sources), k, torch.device(device)
        self.names = list(names) if names is not None else list(self.sources)
        self.rows_seen = {name: 0 for name in self.sources}
        self.dummy_steps = {name: 0 for name in self.sources}

    def online(self, name: str) -> Transformer | None:
        """The online teacher's model (for the attention-transfer term), None for an offline one."""
        if name not in self.sources:
            raise ValueError(f"no teacher {name!r}; loaded: {sorted(self.sources)}")
        src = self.sources[name]
        return src.model if isinstance(src, OnlineTeacher) else None

    def _rows_by_teacher(self, teacher_B: torch.Tensor) -> dict[str, list[int]]:
        teacher_list = teacher_B.tolist()  # host sync (free: the loader's teacher_B is a CPU tensor)
        groups: dict[str, list[int]] = {}
        for b, i in enumerate(teacher_list):
            if not 0 <= i < len(self.names):
                raise ValueError(f"row {b} names teacher index {i}, but the run's teachers are {self.names} "
                                 f"(indices 0..{len(self.names) - 1}); the data and the teacher config disagree")
            name = self.names[i]
            if name not in self.sources:
                raise ValueError(f"row {b} names teacher {name!r} (index {i}), which is not loaded; loaded: "
                                 f"{sorted(self.sources)}; add a spec for {name!r} to the run's teachers")
            groups.setdefault(name, []).append(b)
        return groups

    def _global_counts(self, groups: dict[str, list[int]]) -> dict[str, int] | None:
        """Rows per teacher summed over ranks, when a sharded or expert-parallel teacher needs all ranks to call
        it together.
        Host sync: one per step, decides which teachers run."""
        if not any(isinstance(s, OnlineTeacher) and s.collective for s in self.sources.values()):
            return None
        return parallel.sum_over_ranks({n: len(groups.get(n, ())) for n in self.sources})

    def signals(self, batch) -> TopK:
        """TopK [B, T, K] on `self.device`; each row from its own teacher, each teacher run once on its rows."""
        B, T = batch.labels_BT.shape
        groups = self._rows_by_teacher(batch.teacher_B)
        global_counts = self._global_counts(groups)
        if len(groups) == 1 and global_counts is None:  # the common phase-1 case: no gather/scatter
            (name, rows), = groups.items()
            self.rows_seen[name] += len(rows)
            return self._to_device(self.sources[name].signals(batch))
        ids_BTK = torch.zeros(B, T, self.k, dtype=torch.long, device=self.device)
        logprobs_BTK = torch.zeros(B, T, self.k, dtype=torch.float32, device=self.device)
        for name in sorted(self.sources):  # same order on every rank: sharded teachers' collectives line up
            rows = groups.get(name)
            src = self.sources[name]
            if rows is None:
                if global_counts is not None and global_counts[name] > 0 and getattr(src, "collective", False):
                    src.dummy_step()
                    self.dummy_steps[name] += 1
                continue
            rows_B = torch.tensor(rows, dtype=torch.long)
            sig = self._to_device(src.signals(select_rows(batch, rows_B)))
            rows_B = rows_B.to(self.device)
            ids_BTK[rows_B] = sig.ids_BTK
            logprobs_BTK[rows_B] = sig.logprobs_BTK
            self.rows_seen[name] += len(rows)
        return TopK(ids_BTK, logprobs_BTK)

    def _to_device(self, sig: TopK) -> TopK:
        return TopK(sig.ids_BTK.to(self.device, non_blocking=True), sig.logprobs_BTK.to(self.device, non_blocking=True))


def build_teachers(specs: dict, k: int, device="cpu", dtype: torch.dtype | None = None,
                   names: list[str] | None = None, expected: dict | None = None,
                   chunk_rows: int | None = None, mesh=None) -> TeacherSet:
    """A TeacherSet from `{name: TeacherSpec | dict}`. Online teachers are loaded with `load_hf` and frozen (bf16
    on CUDA, fp32 on CPU unless `dtype`); offline ones open their store with `StoreReader(store, expected)`,
    which refuses a store made with another tokenizer, packing, dataset or K (`k` is added to `expected`).
    `names`: the run's ordered teacher names that batch.teacher_B indexes (default: the order of `specs`);
    `mesh`: the ranks a sharded or expert-parallel teacher is spread over (default: all)."""
    sources = {}
    for name, spec in specs.items():
        if isinstance(spec, dict):
            spec = TeacherSpec(**spec)
        if spec.path is not None:
            sources[name] = OnlineTeacher.load(spec.path, k, device=device, dtype=dtype, shard=spec.shard,
                                               chunk_rows=chunk_rows, mesh=mesh, placement=spec.placement)
        else:
            reader = StoreReader(spec.store, {**(expected or {}), "k": k}, device=device)
            if reader.rows_of not in (None, name):
                raise ValueError(f"teacher {name!r}: store {spec.store} holds the rows of teacher {reader.rows_of!r}; "
                                 f"fix: point {name!r} to the store captured with teacher={name!r}")
            sources[name] = reader
    return TeacherSet(sources, k, device, names=names)
