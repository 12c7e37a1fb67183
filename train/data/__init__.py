"""Chat rows -> tokenised, completion-masked documents -> fixed-length packed sequences -> batches.

Public API (stable; the trainer, teacher store, demo and eval code against these names):

    load_rows(paths_or_dataset, teacher_names=None, cache_dir=None) -> datasets.Dataset
        Reads JSONL / JSON / parquet files, a directory saved with `Dataset.save_to_disk`, or a `datasets.Dataset`.
        Accepted row schemas: `messages` ({role, content}; roles system/user/assistant), ShareGPT
        `conversations` ({from, value}), or `prompt` + `response`. Optional `teacher` (str) or `domain` (bool,
        true -> "domain", false -> "reference"); default teacher "reference"; optional `family` (str).
        Returns columns: messages (list of {role, content}), teacher (str), family (str; "" when absent).
        Bad rows raise ValueError naming file, row (1-based) and the fix; rows with an empty answer are
        skipped and counted in one warning per file.
    MISTRAL_CHAT_TEMPLATE: str
        The built-in template (`<s>[INST] user [/INST] answer</s>...`, system folded into the first user turn),
        used whenever the tokenizer has no chat template of its own.
    format_chat(messages, tokenizer) -> (text: str, spans: list[tuple[int, int]])
        The conversation rendered by the tokenizer's chat template (or the built-in one) and the character span
        of every assistant turn (its answer plus the template's end-of-turn text, e.g. `</s>`).
    tokenize_chat(messages, tokenizer) -> (ids: list[int], labels: list[int])
        ids == tokenizer.apply_chat_template(messages) for rows whose content holds none of the tokenizer's
        special-token strings; in rows that do (`<s>`, `</s>`, `[INST]` where special, ...), those strings are
        encoded as text, so only the template's own markers are control tokens (chat.py). labels[i] = ids[i+1]
        where token i+1 belongs to an assistant turn, else -100 (next-token labels: CE and KD see exactly the
        same positions).
    encode_prompt(messages, tokenizer) -> list[int]
        Generation prompt: the conversation up to (not including) its last answer, exactly as training renders
        it. A trailing assistant turn is dropped, so an eval row can be passed as is.
    split_for_eval(messages) -> (prompt_messages, reference_answer)
    tokenize_rows(ds, tokenizer, max_seq_len, num_proc=None, cache_dir=None) -> datasets.Dataset
        One `datasets.map` pass (parallel, cached on disk). Columns: input_ids, labels (int32 lists, at most
        max_seq_len long), num_tokens (length before truncation), truncated (bool), teacher, family.
    pack(tokenized_ds, seq_len, teacher_names=None, pad_id=0) -> PackedDataset
        Best-fit-decreasing packing into [S, L] sequences, each holding documents of ONE teacher.
    PackedDataset: tokens, labels, positions, doc_ids ([S, L] numpy), teacher ([S], index into teacher_names),
        teacher_names, seq_len, pad_id, stats (dict), fingerprint (str); len(); .batch(indices) -> PackedBatch;
        .save(dir); PackedDataset.load(dir, mmap=True, verify=False). No pickle anywhere (npy + JSON).
    prepare_packed(paths_or_dataset, tokenizer, seq_len, teacher_names=None, cache_dir=None, num_proc=None,
                   pad_id=None) -> PackedDataset
        The three stages above in one call, the packed result cached (npy + JSON) under cache_dir.
    train.data.prepare (not imported here): prepare(paths, tokenizer_dir, seq_len, teacher_names=None, pad_id=None,
        cache_dir=None, processes=None) -> Path (`train/main.py prepare`: rows -> packed int32 arrays once, in
        worker processes, in bounded memory, into a shared cache keyed by data_key(...)); load_prepared(dir, key)
        -> PackedDataset (memory-mapped, numpy alone, checked); build_packed(data_config, ...) for kd/dae/sft/capture.
    PackedBatch: tokens_BT, labels_BT, positions_BT, doc_ids_BT, teacher_B, sample_idx_B (torch int64);
        .to(device, non_blocking=False), .pin_memory().
    Sampler(packed, batch_size, rank=0, world_size=1, seed=0, domain_fraction=None, domain_teacher="domain")
        .next_batch() -> PackedBatch (this rank's `batch_size` sequences of the current global batch),
        .next_indices() -> np.ndarray, .state_dict() -> dict[str, int], .load_state_dict(state),
        .steps_per_epoch, .epoch.
    sequential_batches(packed, batch_size, rank=0, world_size=1) -> Iterator[PackedBatch]
        Every sequence exactly once, in index order, sequence i on rank i % world_size (for capturing a store).

Rooms: rows.py (loading, schemas), chat.py (template, tokenisation, completion labels, IGNORE),
packing.py (PackedDataset, pack, prepare_packed), sampler.py (Sampler, sequential_batches), prepare.py (prepared
data in a shared cache, found by key; the training path on it never imports `datasets`).
"""
from train.data.chat import (IGNORE, MISTRAL_CHAT_TEMPLATE, encode_prompt, format_chat, tokenize_chat,
                             tokenize_rows, tokenizer_fingerprint)
from train.data.packing import PAD_DOC_ID, PackedBatch, PackedDataset, pack, prepare_packed
from train.data.rows import DEFAULT_TEACHER, load_rows, split_for_eval
from train.data.sampler import Sampler, sequential_batches

__all__ = ["IGNORE", "PAD_DOC_ID", "DEFAULT_TEACHER", "MISTRAL_CHAT_TEMPLATE", "load_rows", "split_for_eval",
           "format_chat", "tokenize_chat", "encode_prompt", "tokenize_rows", "tokenizer_fingerprint", "pack",
           "prepare_packed", "PackedBatch", "PackedDataset", "Sampler", "sequential_batches"]
