"""Deterministic, resumable, rank-sharded sampling over a PackedDataset; G = batch_size * world_size sequences
of one global batch."""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np

from train.data.packing import PackedBatch, PackedDataset


def _permutation(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


class _Stream:
    """An infinite sequence of pool members: epoch e is a permutation drawn from (seed, stream, e)."""

    def __init__(self, members: np.ndarray, seed: int, stream: int):
        self.members, self.seed, self.stream = members, seed, stream
        self._cache: dict[int, np.ndarray] = {}

    def take(self, start: int, count: int) -> np.ndarray:
        """Members at stream positions start .. start+count-1."""
        n = len(self.members)
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs, within = np.divmod(pos, n)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs).tolist():
            if e not in self._cache:
                if len(self._cache) > 2:  # only the current and the next epoch are ever needed
                    self._cache.pop(min(self._cache))
                self._cache[e] = _permutation(self.seed, self.stream, e, n)
            sel = epochs == e
            out[sel] = self.members[self._cache[e][within[sel]]]
        return out


class Sampler:
    """Deterministic, resumable, rank-sharded sampler over a PackedDataset.

    Global batch g (of batch_size * world_size sequences) is the next block of an infinite stream; rank r
    takes its slice [r * batch_size, (r + 1) * batch_size), so ranks are disjoint and together complete.
    Without domain_fraction the stream is every sequence, reshuffled each epoch from (seed, epoch).
    With domain_fraction f (phase 2), each slot of a global batch is drawn from the domain pool (sequences of
    teacher `domain_teacher`) with probability f, else from the general pool (all others); the coin flips
    come from (seed, step), each pool is its own reshuffled stream. The fraction is over packed sequences,
    i.e. over tokens, since sequences are nearly full.
    members: the sequences it may draw (default every one); the others, e.g. a held-out validation split
    (train/validation.py), are never drawn.
    State: a few ints (step, consumed positions per stream). Resuming with the same batch_size * world_size
    gives exactly the batches an uninterrupted run would.
    """

    def __init__(self, packed: PackedDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 domain_fraction: float | None = None, domain_teacher: str = "domain", members=None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; fix: use at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} with world_size={world_size}; fix: 0 <= rank < world_size")
        if seed < 0:
            raise ValueError(f"seed={seed}; fix: use a non-negative seed")
        if len(packed) == 0:
            raise ValueError("Sampler: the packed dataset has no sequences; fix: give it rows with answers")
        self.packed, self.batch_size, self.rank, self.world_size = packed, batch_size, rank, world_size
        self.seed, self.domain_fraction = int(seed), domain_fraction
        self.global_batch = batch_size * world_size
        self.members = (np.arange(len(packed), dtype=np.int64) if members is None
                        else np.unique(np.asarray(members, dtype=np.int64)))
        if len(self.members) == 0 or not 0 <= self.members[0] <= self.members[-1] < len(packed):
            raise ValueError(f"Sampler: members must be a non-empty set of sequence indices in [0, {len(packed)}); "
                             f"fix: hold out fewer sequences")
        allowed_S = np.zeros(len(packed), dtype=bool)
        allowed_S[self.members] = True
        teacher_S = np.asarray(packed.teacher)
        if domain_fraction is None:
            self._streams = [_Stream(self.members, self.seed, 0)]
        else:
            if not 0.0 <= domain_fraction <= 1.0:
                raise ValueError(f"domain_fraction={domain_fraction}; fix: use a value in [0, 1]")
            if domain_teacher not in packed.teacher_names:
                raise ValueError(f"domain_teacher {domain_teacher!r} is not among the packed teachers "
                                 f"{packed.teacher_names}; fix: name the domain teacher of the rows")
            is_domain_S = teacher_S == packed.teacher_names.index(domain_teacher)
            general, domain = np.flatnonzero(~is_domain_S & allowed_S), np.flatnonzero(is_domain_S & allowed_S)
            for name, pool, needed in (("general", general, domain_fraction < 1), ("domain", domain,
                                                                                  domain_fraction > 0)):
                if needed and len(pool) == 0:
                    raise ValueError(f"domain_fraction={domain_fraction} needs {name} sequences, and there are none; "
                                     f"fix: add {name} rows or set domain_fraction to {0 if name == 'domain' else 1}")
            self._streams = [_Stream(general, self.seed, 1), _Stream(domain, self.seed, 2)]
        self.step = 0
        self._consumed = [0] * len(self._streams)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.members) // self.global_batch)

    @property
    def epoch(self) -> int:
        """Epochs completed over the whole dataset (by sequences consumed)."""
        return sum(self._consumed) // len(self.members)

    def _global_indices(self) -> tuple[np.ndarray, list]:
        """The next global batch and how many positions it takes from each stream (the state does not move)."""
        G = self.global_batch
        if len(self._streams) == 1:
            return self._streams[0].take(self._consumed[0], G), [G]
        is_domain_G = np.random.default_rng([self.seed, 3, self.step]).random(G) < self.domain_fraction
        out_G, taken = np.empty(G, dtype=np.int64), []
        for k, sel in enumerate((~is_domain_G, is_domain_G)):
            taken.append(int(sel.sum()))
            out_G[sel] = self._streams[k].take(self._consumed[k], taken[-1])
        return out_G, taken

    def next_indices(self) -> np.ndarray:
        """This rank's sequence indices for the next step; advances the state."""
        global_G, taken = self._global_indices()
        self._consumed = [c + t for c, t in zip(self._consumed, taken)]
        self.step += 1
        return global_G[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next_batch(self) -> PackedBatch:
        return self.packed.batch(self.next_indices())

    def _members_digest(self) -> str | None:
        """None when every sequence is drawn, else a hash of the members (a resume must draw from the same ones)."""
        if len(self.members) == len(self.packed):
            return None
        return hashlib.blake2b(self.members.tobytes(), digest_size=8).hexdigest()

    def state_dict(self) -> dict:
        digest = self._members_digest()
        return {"seed": self.seed, "step": self.step, "global_batch": self.global_batch,
                **{f"consumed_{k}": c for k, c in enumerate(self._consumed)}, **({"members": digest} if digest else {})}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}; fix: build the "
                             f"sampler with the checkpoint's seed")
        if state.get("members") != self._members_digest():
            raise ValueError(f"the checkpoint's sampler drew from {'a held-out split of ' if state.get('members') else ''}"
                             f"the data, this one from {'another split of ' if self._members_digest() else 'all of '}"
                             f"it; fix: resume with the checkpoint's eval.fraction and run.seed (else held-out rows "
                             f"would be trained on, or training rows skipped)")
        consumed = [int(state[f"consumed_{k}"]) for k in range(len(self._streams)) if f"consumed_{k}" in state]
        if len(consumed) != len(self._streams):
            raise ValueError("sampler state was saved with a different domain_fraction setting (one stream vs "
                             "general + domain); fix: resume with the same domain_fraction on/off")
        self.step, self._consumed = int(state["step"]), consumed


def sequential_batches(packed: PackedDataset, batch_size: int, rank: int = 0,
                       world_size: int = 1) -> Iterator[PackedBatch]:
    """Every sequence once, in index order; sequence i goes to rank i % world_size. The last batch may be short."""
    mine = np.arange(rank, len(packed), world_size, dtype=np.int64)
    for start in range(0, len(mine), batch_size):
        yield packed.batch(mine[start:start + batch_size])

