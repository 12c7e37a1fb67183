"""Online teachers: one of our models loaded from an HF directory, frozen, placed over the ranks in one of
PLACEMENTS (whole on every rank, FSDP2-sharded, or its experts spread: train.teachers.expert); and `TeacherSet`,
which holds a run's teachers by name (online or a store) and runs each only on the rows that name it
(docs/design.md, decision 3).
"""
from __future__ import annotations

import math
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
    process runs every placement as `replicate`); `sharded`: wrapped by `shard_teacher` over the ranks of `group`
    (None: every rank); expert: its MoE layers swapped by train.teachers.expert.expert_parallel over `group`.
    Both are `collective`: every rank of the group must run each forward together."""

    def __init__(self, model: Transformer, k: int, sharded: bool = False, chunk_rows: int | None = None,
                 group=None, placement: str | None = None):
        if not 1 <= k <= model.args.vocab_size:
            raise ValueError(f"k={k} must be in [1, vocab_size={model.args.vocab_size}]")
        self.model, self.k, self.sharded, self.chunk_rows, self.group = model, k, sharded, chunk_rows, group
        self.placement = placement or ("shard" if sharded else "replicate")
        assert self.placement in PLACEMENTS and sharded == (self.placement == "shard"), (self.placement, sharded)
        self.device = next(iter(model.parameters())).device if not sharded else parallel.mesh_device()
        self.gather_bytes = gathered_bytes(model) if sharded else 0  # expert: no weight is ever gathered

    @property
    def collective(self) -> bool:
        """Every rank of `group` must call each forward (FSDP2's all-gathers; the experts' all-to-alls)."""
        return self.placement != "replicate"

    @classmethod
    def load(cls, path, k: int, device="cpu", dtype: torch.dtype | None = None, shard: bool = False,
             chunk_rows: int | None = None, mesh=None, placement: str | None = None) -> "OnlineTeacher":
        """Load an HF directory with `load_hf` and freeze it (no grad, eval). `placement` (replicate | shard | expert;
        default: "shard" when `shard`, else "replicate"): "shard", when a process group is initialised, shards it
        with FSDP2 over `mesh` (a 1-D mesh, default every rank; the trainer passes the node's,
        train.parallel.node_mesh): built on the meta device and sharded, then given its weights by rank 0, which
        alone reads the whole teacher into host memory (train.parallel.materialize_from_rank0); each GPU holds
        1/W of it, so a teacher larger than one GPU fits.
        "expert": each rank reads only its E/W experts of every layer plus the replicated rest from the
        safetensors (load_hf(experts=...): host memory per rank ~ its GPU share, 14.5 GB for Mixtral-8x7B at
        W = 8), then train.teachers.expert.expert_parallel. ConfigError for a dense teacher or E not divisible by
        W, from config.json before any weight is read."""
        path = Path(path)
        dtype = dtype or default_dtype(device)
        placement = resolve_placement(placement, shard)
        if placement == "expert":
            return cls._load_expert(path, k, device, dtype, chunk_rows, mesh)
        shard = placement == "shard" and parallel.is_distributed()
        model = load_hf(path, dtype=dtype, device="meta" if shard else device)
        model.requires_grad_(False).eval()
        if not shard:
            return cls(model, k, chunk_rows=chunk_rows)
        if mesh is None:
            mesh = parallel.world_mesh()
        shard_teacher(model, mesh)
        parallel.materialize_from_rank0(model, lambda: load_hf(path, dtype=dtype, device="cpu").state_dict(),
                                        parallel.mesh_device())
        return cls(model, k, sharded=True, chunk_rows=chunk_rows, group=mesh.get_group())

    @classmethod
    def _load_expert(cls, path: Path, k: int, device, dtype, chunk_rows, mesh) -> "OnlineTeacher":
        from train.teachers.expert import check_expert_placement, expert_group, expert_parallel
        args = load_hf(path, dtype=dtype, device="meta").args  # config and tensor names checked, no weight read
        group = expert_group(mesh) if parallel.is_distributed() else None
        ep = torch.distributed.get_world_size(group) if group is not None else 1
        check_expert_placement(args, ep, f"teacher {path}")  # a dense teacher is refused even in one process
        if group is None:
            model = load_hf(path, dtype=dtype, device=device).requires_grad_(False).eval()
            return cls(model, k, chunk_rows=chunk_rows)
        L, r = args.moe.num_experts // ep, torch.distributed.get_rank(group)
        model = load_hf(path, dtype=dtype, device=device, experts=range(r * L, (r + 1) * L))
        model.requires_grad_(False).eval()
        return cls(expert_parallel(model, mesh), k, chunk_rows=chunk_rows, group=group, placement="expert")

    @torch.no_grad()
    def loss_topk(self, rows):
        """(idx_N, ids_NK, logprobs_NK) for the loss positions of `rows` (a PackedBatch or Rows); idx_N are flat
        indices into B*T in ascending order. Hidden states are gathered at the N loss positions before the LM
        head, so [B, T, V] logits never exist (about half the positions of a chat batch are prompt).
        Zero rows (B = 0) run every block and the head gather on an empty batch: what a sharded teacher's
        collectives need from a rank without rows while another rank of its mesh has some."""
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

    def empty_step(self, T: int = 1) -> None:
        """One forward on zero rows (see loss_topk)."""
        self.loss_topk(empty_rows(T))


def gathered_bytes(model) -> int:
    """Bytes one forward of an FSDP2-sharded model all-gathers into this rank: every parameter once (blocks,
    head and root are each gathered once per forward), less the shard the rank holds; computed from the
    DTensor parameters' global and local sizes (FSDP2's padding of uneven shards not counted)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += (p.numel() - local.numel()) * p.element_size()
    return total


def empty_rows(T: int) -> Rows:
    """A batch of zero rows of T tokens (no loss position)."""
    t_0T = torch.zeros(0, T, dtype=torch.long)
    return Rows(t_0T, torch.full_like(t_0T, IGNORE), None, None, None)


def concat_rows(parts: list[Rows]) -> Rows:
    """Rows of several micro-batches stacked along B (all of one T)."""
    def cat(xs):
        return None if xs[0] is None else torch.cat(xs)
    return Rows(*(cat([getattr(p, f) for p in parts]) for f in Rows._fields))


@dataclass
class TeacherSpec:
    """One teacher of a run: online (`path`, an HF directory) or offline (`store`, a directory written by
    `capture`), exactly one of the two. `placement` of an online teacher: replicate, shard (FSDP2 over the mesh
    build_teachers is given, under torchrun) or expert; `shard` = True is placement "shard". `max_tokens`: tokens
    per forward when a step's signals are computed up front (0: all of a step's rows in one forward)."""
    path: str | None = None
    store: str | None = None
    shard: bool = False
    placement: str | None = None
    max_tokens: int = 0

    def __post_init__(self):
        if (self.path is None) == (self.store is None):
            raise ValueError(f"a teacher spec needs exactly one of path= (online HF directory) or store= (offline "
                             f"capture directory); got path={self.path!r}, store={self.store!r}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens}; use 0 (a whole step per forward) or a positive count")


class TeacherSet:
    """Teachers by name; each row gets the signal of its own teacher only, each teacher runs on its rows only.

    `names` is the run's ordered teacher list: batch.teacher_B[b] = i means row b is taught by names[i].
    Counters (per rank, cumulative; train_step logs their change per step): `rows_seen[name]`, the rows each
    teacher processed (the proof that none ran on others' rows); `forwards[name]`, the forwards an online
    teacher ran, `empty_forwards[name]` of them on zero rows (a sharded teacher's rank without rows joining
    the others'); `gathered_bytes[name]`, the bytes those forwards all-gathered into this rank.
    """

    def __init__(self, sources: dict, k: int, device, names: list[str] | None = None,
                 max_tokens: dict[str, int] | None = None):
        self.sources, self.k, self.device = dict(sources), k, torch.device(device)
        self.names = list(names) if names is not None else list(self.sources)
        self.max_tokens = {name: (max_tokens or {}).get(name, 0) for name in self.sources}
        self.rows_seen = {name: 0 for name in self.sources}
        self.forwards = {name: 0 for name in self.sources}
        self.empty_forwards = {name: 0 for name in self.sources}
        self.gathered_bytes = {name: 0 for name in self.sources}

    def online(self, name: str) -> Transformer | None:
        """The online teacher's model (for the attention-transfer term), None for an offline one."""
        if name not in self.sources:
            raise ValueError(f"no teacher {name!r}; loaded: {sorted(self.sources)}")
        src = self.sources[name]
        return src.model if isinstance(src, OnlineTeacher) else None

    def counters(self) -> dict[str, dict[str, int]]:
        return {n: {"rows": self.rows_seen[n], "forwards": self.forwards[n], "empty_forwards": self.empty_forwards[n],
                    "gathered_bytes": self.gathered_bytes[n]} for n in sorted(self.sources)}

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

    def _forwards_over_meshes(self, local: dict[str, int]) -> dict[str, int]:
        """Forwards each teacher runs on this rank: its own count, or for a collective (sharded) teacher the
        largest over the ranks of its mesh, so that all of them run the same forwards; 0 exactly when no rank of
        the mesh has a row of it (no forward, no gather anywhere). One all-reduce per mesh (every sharded
        teacher of a run shares the node's mesh: one), a host sync: once per step, decides which teachers run."""
        out = dict(local)
        meshes: dict[int, tuple] = {}
        for name in sorted(self.sources):  # the same order on every rank
            src = self.sources[name]
            if getattr(src, "collective", False):
                meshes.setdefault(id(src.group), (src.group, []))[1].append(name)
        for group, names in meshes.values():
            out.update(parallel.max_over_ranks({n: local[n] for n in names}, group))
        return out

    def signals(self, batch) -> TopK:
        """TopK [B, T, K] of one micro-batch, each teacher in one forward on its rows (the attention-transfer
        term's path: the teacher's per-layer queries and keys are captured during that forward, and a whole
        step's would not fit, ~0.6 GB per 2048-token micro-batch for Mixtral in bf16)."""
        return self._signals([batch], whole=True)[0]

    def step_signals(self, micro_batches) -> list[TopK]:
        """TopK [B, T, K] of every micro-batch of an optimizer step, computed up front: each teacher runs on all
        of its rows of the step, `max_tokens` tokens per forward (0: one forward), instead of once per
        micro-batch (a sharded teacher all-gathers its whole weights per forward: ~82 GB received per rank for
        Mixtral in bf16). A frozen teacher keeps nothing for backward, so only the signals stay: B x T x K ids
        (int64) and log-probs (fp32) per micro-batch, 16 x 2048 x K=32 x 12 B = 12.6 MB for a paper step."""
        return self._signals(list(micro_batches), whole=False)

    def _signals(self, micro_batches: list, whole: bool) -> list[TopK]:
        T = micro_batches[0].labels_BT.shape[1]
        todo: dict[str, list[tuple[int, int]]] = {}  # teacher -> its rows (micro-batch, row), in step order
        for m, mb in enumerate(micro_batches):
            for name, rows in self._rows_by_teacher(mb.teacher_B).items():
                todo.setdefault(name, []).extend((m, b) for b in rows)
        per_forward, local = {}, {}
        for name in self.sources:
            n = len(todo.get(name, ()))
            budget = self.max_tokens[name] if isinstance(self.sources[name], OnlineTeacher) and not whole else 0
            per_forward[name] = max(1, budget // T) if budget else max(1, n)
            local[name] = math.ceil(n / per_forward[name])
        forwards = self._forwards_over_meshes(local)  # host sync (sharded teachers): once per step
        out = [TopK(torch.zeros(*mb.labels_BT.shape, self.k, dtype=torch.long, device=self.device),
                    torch.zeros(*mb.labels_BT.shape, self.k, dtype=torch.float32, device=self.device))
               for mb in micro_batches]
        for name in sorted(self.sources):  # same order on every rank: sharded teachers' collectives line up
            src, rows, R = self.sources[name], todo.get(name, []), per_forward[name]
            for j in range(forwards[name]):
                chunk = rows[j * R:(j + 1) * R]
                sig = self._to_device(src.signals(self._gather(micro_batches, chunk, T)))
                self._scatter(out, chunk, sig)
                self.rows_seen[name] += len(chunk)
                if isinstance(src, OnlineTeacher):
                    self.forwards[name] += 1
                    self.empty_forwards[name] += not chunk
                    self.gathered_bytes[name] += src.gather_bytes
        return out

    @staticmethod
    def _gather(micro_batches, chunk: list[tuple[int, int]], T: int) -> Rows:
        """The rows of `chunk` (micro-batch, row) as one batch; zero rows when it is empty."""
        if not chunk:
            return empty_rows(T)
        parts = [select_rows(micro_batches[m], torch.tensor([b for mm, b in chunk if mm == m], dtype=torch.long))
                 for m in sorted({m for m, _ in chunk})]
        return parts[0] if len(parts) == 1 else concat_rows(parts)

    def _scatter(self, out: list[TopK], chunk: list[tuple[int, int]], sig: TopK) -> None:
        """Row i of `sig` is chunk[i] = (micro-batch m, row b): copy it to out[m] row b."""
        for m in sorted({m for m, _ in chunk}):
            at = [i for i, (mm, _) in enumerate(chunk) if mm == m]
            src_B = torch.tensor(at, dtype=torch.long, device=self.device)
            dst_B = torch.tensor([chunk[i][1] for i in at], dtype=torch.long, device=self.device)
            out[m].ids_BTK[dst_B] = sig.ids_BTK.index_select(0, src_B)
            out[m].logprobs_BTK[dst_B] = sig.logprobs_BTK.index_select(0, src_B)

    def _to_device(self, sig: TopK) -> TopK:
        return TopK(sig.ids_BTK.to(self.device, non_blocking=True), sig.logprobs_BTK.to(self.device, non_blocking=True))


def build_teachers(specs: dict, k: int, device="cpu", dtype: torch.dtype | None = None,
                   names: list[str] | None = None, expected: dict | None = None,
                   chunk_rows: int | None = None, mesh=None) -> TeacherSet:
    """A TeacherSet from `{name: TeacherSpec | dict}`. Online teachers are loaded with `load_hf` and frozen (bf16
    on CUDA, fp32 on CPU unless `dtype`); offline ones open their store with `StoreReader(store, expected)`,
    which refuses a store made with another tokenizer, packing, dataset or K (`k` is added to `expected`).
    `names`: the run's ordered teacher names that batch.teacher_B indexes (default: the order of `specs`);
    `mesh`: the ranks a sharded teacher is sharded over (default: all)."""
    sources, max_tokens = {}, {}
    for name, spec in specs.items():
        if isinstance(spec, dict):
            spec = TeacherSpec(**spec)
        max_tokens[name] = spec.max_tokens
        if spec.path is not None:
            sources[name] = OnlineTeacher.load(spec.path, k, device=device, dtype=dtype, shard=spec.shard,
                                               chunk_rows=chunk_rows, mesh=mesh, placement=spec.placement)
        else:
            reader = StoreReader(spec.store, {**(expected or {}), "k": k}, device=device)
            if reader.rows_of not in (None, name):
                raise ValueError(f"teacher {name!r}: store {spec.store} holds the rows of teacher {reader.rows_of!r}; "
                                 f"fix: point {name!r} to the store captured with teacher={name!r}")
            sources[name] = reader
    return TeacherSet(sources, k, device, names=names, max_tokens=max_tokens)
