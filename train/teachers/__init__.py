"""Teachers: where the top-k signal of every loss position comes from (docs/design.md, decision 1).

    signal.py    the contract (`TopK`: ids + log-probs aligned with the labels) and the helpers every source
                 uses (loss positions, chunked top-k of the LM head, dense scatter)
    online.py    `OnlineTeacher` (a frozen model placed replicated, FSDP2-sharded or by experts), `TeacherSet`
                 (a run's teachers by name, each run only on its own rows), `build_teachers`
    expert.py    `expert_parallel`: an MoE teacher's experts spread over a group, tokens moved by all-to-all
    store.py     the offline top-k store: format, identity hashes, `StoreReader`
    capture.py   `run_capture` (writes a store, resumable) and the `capture` subcommand

To add a teacher source: give it a `signals(rows) -> TopK` method and a branch in `build_teachers`.
capture.py is not imported here (it is the CLI's; `import train.teachers.capture`).
"""
from train.teachers.expert import expert_parallel
from train.teachers.online import PLACEMENTS, OnlineTeacher, TeacherSet, TeacherSpec, build_teachers, shard_teacher
from train.teachers.signal import (Rows, TopK, dense_topk, head_chunk_rows, loss_positions, select_rows,
                                   topk_logprobs)
from train.teachers.store import StoreReader, expected_for, ids_dtype, tokenizer_sha256

__all__ = ["TopK", "Rows", "select_rows", "loss_positions", "topk_logprobs", "head_chunk_rows", "dense_topk", "OnlineTeacher",
           "TeacherSet", "TeacherSpec", "build_teachers", "shard_teacher", "expert_parallel", "PLACEMENTS", "StoreReader", "expected_for",
           "ids_dtype", "tokenizer_sha256"]
