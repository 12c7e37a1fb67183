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
        ids == tokenizer.apply_chat_template(messages); labels[i] = ids[i+1] where token i+1 belongs to an
        assistant turn, else -100 (next-token labels: CE and KD see exactly the same positions).
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
    PackedBatch: tokens_BT, labels_BT, positions_BT, doc_ids_BT, teacher_B, sample_idx_B (torch int64);
        .to(device, non_blocking=False), .pin_memory().
    Sampler(packed, batch_size, rank=0, world_size=1, seed=0, domain_fraction=None, domain_teacher="domain")
        .next_batch() -> PackedBatch (this rank's `batch_size` sequences of the current global batch),
        .next_indices() -> np.ndarray, .state_dict() -> dict[str, int], .load_state_dict(state),
        .steps_per_epoch, .epoch.
    sequential_batches(packed, batch_size, rank=0, world_size=1) -> Iterator[PackedBatch]
        Every sequence exactly once, in index order, sequence i on rank i % world_size (for capturing a store).

Dimension names: S packed sequences, L = T = seq_len tokens per sequence, R documents (rows of the tokenized
dataset), P their tokens laid end to end, G = batch_size * world_size sequences of one global batch.

Conventions of the packed arrays:
    labels[s, t] != -100  =>  labels[s, t] == tokens[s, t+1] and doc_ids[s, t] == doc_ids[s, t+1]
    positions restart at 0 for every document; doc_ids is the document's row index in the tokenized dataset;
    padding: token pad_id (an existing id: the vocabulary is never resized), label -100, doc id -1,
    positions 0, 1, ... of its own (padding is its own pseudo-document, so it never attends into a real one).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

IGNORE = -100               # label of positions without loss (prompt, padding, last token of a document)
PAD_DOC_ID = -1             # doc id of padding tokens
DEFAULT_TEACHER = "reference"
_FORMAT_VERSION = "data-v1"  # bump when packing semantics change (saved PackedDatasets of older versions refuse)
# Tokenisation caches are keyed on this file's bytes, so any edit here invalidates them instead of serving
# stale labels; a few extra minutes of re-tokenising beat a silently wrong mask.
_CODE_HASH = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=8).hexdigest()

# The Mistral instruct format. The system text is folded into the first user turn ("system\n\nuser"), as
# Mistral's own templates do; the answer is preceded by one space, and every answer ends with `</s>`.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is not none %}"
    "{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
_SCHEMAS = "`messages` (list of {role, content}), `conversations` (ShareGPT {from, value}) or `prompt` + `response`"


# ----------------------------------------------------------------------------------------------------------
# Loading and validating rows


def _row_features(**extra):
    from datasets import Features, List, Value
    return Features({
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "teacher": Value("string"),
        "family": Value("string"),
        **extra,
    })


def _schemas_of(columns: Sequence[str], source: str) -> list[str]:
    """The row schemas this file's columns allow, in order of preference (a row uses the first it fills)."""
    found = [name for name, needs in (("messages", ("messages",)), ("conversations", ("conversations",)),
                                      ("prompt_response", ("prompt", "response")))
             if all(c in columns for c in needs)]
    if not found:
        raise ValueError(f"{source}: no known columns (found {sorted(columns)}); fix: give each row {_SCHEMAS}")
    return found


def _normalise_row(row: dict, schemas: list, where: str, teacher_names) -> tuple[list, str, str, bool]:
    """One raw row -> (messages, teacher, family, skip). Raises ValueError with `where` (file: row n)."""
    schema = next((s for s in schemas if row.get("prompt" if s == "prompt_response" else s) is not None),
                  schemas[0])
    if schema == "prompt_response":
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, (str, type(None))):
            raise ValueError(f"{where}: `prompt` and `response` must be strings (got {type(prompt).__name__}, "
                             f"{type(response).__name__}); fix the row")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response or ""}]
    else:
        turns = row.get(schema)
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: `{schema}` is empty or not a list, so the row has no assistant turn; "
                             f"fix: give it at least one user turn and one assistant turn")
        role_key, text_key = ("role", "content") if schema == "messages" else ("from", "value")
        messages = []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise ValueError(f"{where}: turn {k} is a {type(turn).__name__}, not a {{{role_key}, {text_key}}} "
                                 f"object; fix the row")
            raw_role, content = turn.get(role_key), turn.get(text_key)
            role = raw_role if schema == "messages" else _SHAREGPT_ROLES.get(str(raw_role).lower())
            if role not in _ROLES:
                allowed = _ROLES if schema == "messages" else tuple(_SHAREGPT_ROLES)
                raise ValueError(f"{where}: turn {k} has unknown role {raw_role!r}; fix: use one of {allowed}")
            if content is None and role == "assistant":
                content = ""  # an empty answer: skipped below, like ""
            if not isinstance(content, str):
                raise ValueError(f"{where}: turn {k} ({role}) has {text_key} of type {type(content).__name__}; "
                                 f"fix: make it a string")
            messages.append({"role": role, "content": content})
    _check_turn_order(messages, where)
    skip = any(m["role"] == "assistant" and not m["content"].strip() for m in messages)

    teacher = row.get("teacher")
    domain = row.get("domain")
    if teacher is not None and not isinstance(teacher, str):
        raise ValueError(f"{where}: `teacher` must be a string (got {teacher!r}); fix: name the row's teacher, "
                         f"e.g. \"reference\" or \"domain\"")
    if domain is not None and not isinstance(domain, (bool, np.bool_)):
        raise ValueError(f"{where}: `domain` must be true or false (got {domain!r}); fix the row")
    from_domain = None if domain is None else ("domain" if domain else DEFAULT_TEACHER)
    if teacher and from_domain and teacher != from_domain:
        raise ValueError(f"{where}: `teacher`={teacher!r} disagrees with `domain`={bool(domain)}; "
                         f"fix: keep only one of the two fields")
    teacher = teacher or from_domain or DEFAULT_TEACHER
    if teacher_names is not None and teacher not in teacher_names:
        raise ValueError(f"{where}: teacher {teacher!r} is not one of the run's teachers {list(teacher_names)}; "
                         f"fix: rename it in the data or define a teacher named {teacher!r} in the config")
    family = row.get("family")
    return messages, teacher, family if isinstance(family, str) else "", skip


def _check_turn_order(messages: list, where: str) -> None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError(f"{where}: no assistant turn; fix: add the answer as an assistant turn or drop the row")
    if "system" in roles[1:]:
        raise ValueError(f"{where}: a system turn at position {roles.index('system', 1)}; fix: keep one system "
                         f"turn, first")
    chat = roles[1:] if roles[0] == "system" else roles
    for k, role in enumerate(chat):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise ValueError(f"{where}: turns must alternate user/assistant (after an optional system turn), "
                             f"got {roles}; fix: merge consecutive turns of one role")
    if chat[-1] != "assistant":
        raise ValueError(f"{where}: the last turn is a user turn with no answer; fix: add the answer or drop "
                         f"the trailing user turn")


def _normalise_batch(batch: dict, indices: list, *, schemas: list, source: str, teacher_names) -> dict:
    out = {"messages": [], "teacher": [], "family": [], "_skip": []}
    keys = list(batch)
    for j, index in enumerate(indices):
        row = {k: batch[k][j] for k in keys}
        messages, teacher, family, skip = _normalise_row(row, schemas, f"{source}: row {index + 1}", teacher_names)
        out["messages"].append(messages)
        out["teacher"].append(teacher)
        out["family"].append(family)
        out["_skip"].append(skip)
    return out


def _load_one(path: Path, cache_dir):
    import datasets
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"{path}: is a saved DatasetDict with splits {list(loaded)}; fix: pass one split's "
                             f"directory, e.g. {path / next(iter(loaded))}")
        return loaded
    suffix = path.name.lower()
    if suffix.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        builder = "json"
    elif suffix.endswith(".parquet"):
        builder = "parquet"
    else:
        raise ValueError(f"{path}: unknown file type; fix: use .jsonl, .json, .parquet or a directory written by "
                         f"Dataset.save_to_disk")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:  # arrow's JSON errors do not name the file
        raise ValueError(f"{path}: could not be read as {builder} ({type(e).__name__}: {e}); fix the file") from e


def load_rows(paths_or_dataset, teacher_names: Sequence[str] | None = None, cache_dir: str | None = None):
    """Chat rows from files / a saved dataset / a `datasets.Dataset`, normalised and validated (module doc)."""
    import datasets
    if isinstance(paths_or_dataset, datasets.Dataset):
        sources = [("<dataset>", paths_or_dataset)]
    else:
        items = [paths_or_dataset] if isinstance(paths_or_dataset, (str, os.PathLike)) else list(paths_or_dataset)
        if not items:
            raise ValueError("load_rows: no input given; fix: pass a file, a list of files or a dataset")
        sources = []
        for item in items:
            if isinstance(item, datasets.Dataset):
                sources.append(("<dataset>", item))
                continue
            path = Path(item)
            if not path.exists():
                raise ValueError(f"{path}: file not found; fix: check the path (cwd is {os.getcwd()})")
            sources.append((str(path), _load_one(path, cache_dir)))
    parts = []
    for source, ds in sources:
        schemas = _schemas_of(ds.column_names, source)
        names = None if teacher_names is None else list(teacher_names)
        fingerprint = hashlib.blake2b(f"{ds._fingerprint}|{schemas}|{source}|{names}|{_CODE_HASH}".encode(),
                                      digest_size=8).hexdigest()
        normalised = ds.map(
            _normalise_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
            features=_row_features(_skip=datasets.Value("bool")), new_fingerprint=fingerprint,
            fn_kwargs=dict(schemas=schemas, source=source, teacher_names=names), desc=f"checking {Path(source).name}")
        skip = np.asarray(normalised["_skip"], dtype=bool)
        if skip.any():
            first = int(np.flatnonzero(skip)[0]) + 1
            warnings.warn(f"{source}: skipped {int(skip.sum())} of {len(skip)} rows with an empty assistant answer "
                          f"(first: row {first})", stacklevel=2)
            normalised = normalised.select(np.flatnonzero(~skip))
        parts.append(normalised.remove_columns("_skip"))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def split_for_eval(messages: list) -> tuple[list, str]:
    """(conversation before the last answer, that answer): the prompt an eval generates from and its reference."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("split_for_eval: the conversation must end with an assistant turn (the reference answer)")
    return list(messages[:-1]), messages[-1]["content"]


# ----------------------------------------------------------------------------------------------------------
# Chat formatting: one code path. The conversation is rendered by the tokenizer's chat template (or the built-in
# Mistral one); the assistant turns are located as text spans by rendering prefixes of the conversation
# (P = render(turns before the answer, add_generation_prompt) must be a prefix of Q = render(turns through the
# answer), which must be a prefix of the full render); the full text is tokenized once, with offsets, exactly
# as apply_chat_template tokenizes it, and a token is an assistant token when its characters overlap a span.


def _template_of(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (e.g. "default", "tool_use"): training uses the default
        template = template.get("default")
    return template or MISTRAL_CHAT_TEMPLATE


def _render(messages: list, tokenizer, template: str, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _fold_system(messages: list) -> list:
    if not messages or messages[0]["role"] != "system":
        return messages
    first, rest = messages[1], messages[2:]
    return [{"role": first["role"], "content": messages[0]["content"] + "\n\n" + first["content"]}] + rest


def _assistant_spans(messages: list, tokenizer, template: str) -> tuple[str, list] | None:
    """(full text, spans) when the template renders prefixes consistently, else None."""
    full = _render(messages, tokenizer, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(messages[:i], tokenizer, template, generation_prompt=True)
        through = full if i == len(messages) - 1 else _render(messages[: i + 1], tokenizer, template)
        if not (through.startswith(before) and full.startswith(through) and len(through) > len(before)):
            return None
        spans.append((len(before), len(through)))
    return full, spans


_FOLD_CACHE: dict = {}


def _needs_fold(tokenizer, template: str) -> bool:
    """Whether this template must see the system text folded into the first user turn.

    Some templates (e.g. Mistral v0.3) place the system text in the LAST user turn, or drop it from a
    conversation that ends in an answer, or reject the system role; their renders of a conversation's
    prefixes are then not prefixes of the whole, or lose the system text. Folding the system text into the
    first user turn ourselves (what the Mistral format asks for) makes them consistent. Decided once per
    template, on a probe chat.
    """
    key = (template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _FOLD_CACHE:
        probe = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Q one?"},
                 {"role": "assistant", "content": "A one."}, {"role": "user", "content": "Q two?"},
                 {"role": "assistant", "content": "A two."}]
        fold = None
        for candidate in (False, True):
            try:
                rendered = _assistant_spans(_fold_system(probe) if candidate else probe, tokenizer, template)
                if rendered is not None and "Sys." in rendered[0]:
                    fold = candidate
                    break
            except Exception:  # jinja raise_exception (e.g. "system role not supported"): try folding
                continue
        if fold is None:
            raise ValueError("the tokenizer's chat template does not render a conversation's prefixes as prefixes "
                             "of the whole, so assistant turns cannot be located; fix: set tokenizer.chat_template "
                             "= train.data.MISTRAL_CHAT_TEMPLATE (or another prefix-consistent template)")
        _FOLD_CACHE[key] = fold
    return _FOLD_CACHE[key]


def format_chat(messages: list, tokenizer) -> tuple[str, list]:
    """Rendered text and the character span of each assistant turn (answer + end-of-turn text such as `</s>`)."""
    template = _template_of(tokenizer)
    if _needs_fold(tokenizer, template):
        messages = _fold_system(messages)
    result = _assistant_spans(messages, tokenizer, template)
    if result is None:
        raise ValueError(f"chat template rendered a prefix of this conversation inconsistently: {messages!r}; fix: "
                         f"set tokenizer.chat_template = train.data.MISTRAL_CHAT_TEMPLATE")
    return result


def _labels_from_offsets(ids: list, offsets: list, spans: list) -> np.ndarray:
    """Next-token labels: labels[i] = ids[i+1] when token i+1 overlaps an assistant span, else -100."""
    ids_T = np.asarray(ids, dtype=np.int64)
    offsets_T2 = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start_T, end_T = offsets_T2[:, 0], np.maximum(offsets_T2[:, 1], offsets_T2[:, 0] + 1)  # empty offsets: 1 char
    is_answer_T = np.zeros(len(ids_T), dtype=bool)
    for a, b in spans:
        is_answer_T |= (start_T < b) & (end_T > a)
    labels_T = np.full(len(ids_T), IGNORE, dtype=np.int64)
    labels_T[:-1] = np.where(is_answer_T[1:], ids_T[1:], IGNORE)
    return labels_T


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):  # answer spans are mapped to tokens through offsets
        raise ValueError(f"{type(tokenizer).__name__} is not a `tokenizers`-backed (fast) tokenizer, so it gives no "
                         f"offsets; fix: load it with AutoTokenizer.from_pretrained(path, use_fast=True)")
    if tokenizer.eos_token is None or tokenizer.bos_token is None:
        raise ValueError("the tokenizer has no bos/eos token; fix: set tokenizer.bos_token and tokenizer.eos_token "
                         "(e.g. '<s>' and '</s>')")


def tokenize_chat(messages: list, tokenizer) -> tuple[list, list]:
    """ids (== apply_chat_template(messages)) and next-token labels (-100 outside assistant turns)."""
    _check_tokenizer(tokenizer)
    text, spans = format_chat(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = _labels_from_offsets(enc["input_ids"], enc["offset_mapping"], spans)
    return list(enc["input_ids"]), labels.tolist()


def encode_prompt(messages: list, tokenizer) -> list:
    """Token ids of the prompt that precedes the last answer, as training renders it (for generation)."""
    _check_tokenizer(tokenizer)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    template = _template_of(tokenizer)
    if _needs_fold(tokenizer, template):
        messages = _fold_system(messages)
    text = _render(messages, tokenizer, template, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------
# Tokenisation of a whole dataset (one datasets.map pass, cached)


def _tokenize_batch(batch: dict, *, tokenizer, max_seq_len: int) -> dict:
    texts, spans = [], []
    for messages in batch["messages"]:
        text, s = format_chat(messages, tokenizer)
        texts.append(text)
        spans.append(s)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)  # batched: Rust threads
    out = {"input_ids": [], "labels": [], "num_tokens": [], "truncated": []}
    for ids, offsets, s in zip(enc["input_ids"], enc["offset_mapping"], spans):
        labels_T = _labels_from_offsets(ids, offsets, s)
        n = len(ids)
        if n > max_seq_len:
            # Keep the head; the last kept position loses its label because its target token is cut off
            # (invariant: a labelled position's target is the next token of the same document).
            ids, labels_T = ids[:max_seq_len], labels_T[:max_seq_len].copy()
            labels_T[-1] = IGNORE
        out["input_ids"].append(ids)
        out["labels"].append(labels_T)
        out["num_tokens"].append(n)
        out["truncated"].append(n > max_seq_len)
    return out


def _tokenizer_hash(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(_template_of(tokenizer).encode())
    h.update(f"{tokenizer.bos_token}|{tokenizer.eos_token}".encode())
    return h.hexdigest()


def tokenize_rows(ds, tokenizer, max_seq_len: int, num_proc: int | None = None, cache_dir: str | None = None):
    """Tokenise rows from `load_rows` once (module doc). Cached by datasets, keyed on the rows, the tokenizer
    (vocabulary, template, special tokens), max_seq_len and the format version."""
    from datasets import Features, List, Value
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len}; fix: use at least 2 (a prompt token and an answer token)")
    if "messages" not in ds.column_names:
        raise ValueError(f"tokenize_rows: no `messages` column (found {ds.column_names}); fix: pass load_rows(...)")
    _check_tokenizer(tokenizer)
    _needs_fold(tokenizer, _template_of(tokenizer))  # fail here, not inside a worker, on an unusable template
    if num_proc is None:
        num_proc = 1 if len(ds) < 20_000 else max(1, min(8, os.cpu_count() or 1))
    fingerprint = hashlib.blake2b(
        f"{ds._fingerprint}|{_tokenizer_hash(tokenizer)}|{max_seq_len}|{_FORMAT_VERSION}|{_CODE_HASH}".encode(),
        digest_size=8).hexdigest()
    cache_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"tokenized-{fingerprint}.arrow")
    keep = [c for c in ("teacher", "family") if c in ds.column_names]
    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                         "num_tokens": Value("int32"), "truncated": Value("bool"),
                         **{c: ds.features[c] for c in keep}})
    return ds.map(_tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc if len(ds) > 1 else None,
                  remove_columns=[c for c in ds.column_names if c not in keep], features=features,
                  fn_kwargs=dict(tokenizer=tokenizer, max_seq_len=max_seq_len), new_fingerprint=fingerprint,
                  cache_file_name=cache_file, desc="tokenizing")


# ----------------------------------------------------------------------------------------------------------
# Packing


class _CapacityIndex:
    """Multiset of open sequences keyed by remaining capacity 0..L, with `smallest capacity >= n` in O(log L):
    a segment tree of counts over capacities. Best fit needs this query once per document; a linear scan over
    capacities would cost O(L) per document (4096 * 1e6 steps for a million documents)."""

    def __init__(self, max_capacity: int):
        self.size = 1 << max(1, max_capacity.bit_length())  # > max_capacity
        self.count = [0] * (2 * self.size)
        self.bins: list[list[int]] = [[] for _ in range(max_capacity + 1)]

    def push(self, capacity: int, bin_id: int) -> None:
        self.bins[capacity].append(bin_id)
        i = capacity + self.size
        while i:
            self.count[i] += 1
            i //= 2

    def pop_at_least(self, n: int) -> tuple[int, int] | None:
        count, i = self.count, n + self.size
        if count[i] == 0:
            while i > 1 and not (i % 2 == 0 and count[i + 1] > 0):
                i //= 2
            if i == 1:
                return None
            i += 1
            while i < self.size:
                i = 2 * i if count[2 * i] > 0 else 2 * i + 1
        capacity = i - self.size
        bin_id = self.bins[capacity].pop()
        while i:
            count[i] -= 1
            i //= 2
        return capacity, bin_id


def _best_fit_decreasing(lengths_R: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign documents to sequences: (sequence of each doc, token offset of each doc in it, sequence count).
    Longest first, each into the open sequence it fills most tightly: padding is typically < 1 % where
    sequential greedy packing wastes about half a document per sequence."""
    order = np.argsort(-lengths_R, kind="stable")  # deterministic: ties keep row order
    seq_of_R = np.empty(len(lengths_R), dtype=np.int64)
    offset_R = np.empty(len(lengths_R), dtype=np.int64)
    used: list[int] = []
    index = _CapacityIndex(seq_len)
    for d in order.tolist():
        n = int(lengths_R[d])
        found = index.pop_at_least(n)
        if found is None:
            capacity, s = seq_len, len(used)
            used.append(0)
        else:
            capacity, s = found
        seq_of_R[d], offset_R[d] = s, used[s]
        used[s] += n
        if capacity - n > 0:
            index.push(capacity - n, s)
    return seq_of_R, offset_R, len(used)


def _arrow_columns(ds, names):
    import pyarrow as pa
    table = ds.with_format("arrow")[:] if len(ds) else pa.table({n: [] for n in names})
    return {n: table.column(n).combine_chunks() if isinstance(table.column(n), pa.ChunkedArray)
            else table.column(n) for n in names}


@dataclass
class PackedBatch:
    """One rank's micro-batch. All int64 torch tensors; labels are next tokens (-100 = no loss)."""
    tokens_BT: torch.Tensor
    labels_BT: torch.Tensor
    positions_BT: torch.Tensor
    doc_ids_BT: torch.Tensor
    teacher_B: torch.Tensor      # index into the run's teacher names; one teacher per sequence
    sample_idx_B: torch.Tensor   # global index of each sequence in the PackedDataset (offline stores key on it)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                              for f in fields(self)})

    def pin_memory(self) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


_ARRAYS = ("tokens", "labels", "positions", "doc_ids", "teacher")


class PackedDataset:
    """Packed sequences as numpy arrays (module doc). Build with `pack`, persist with save/load (npy + JSON)."""

    def __init__(self, tokens, labels, positions, doc_ids, teacher, teacher_names, seq_len, pad_id, stats,
                 fingerprint=None):
        self.tokens, self.labels, self.positions, self.doc_ids, self.teacher = (
            tokens, labels, positions, doc_ids, teacher)
        self.teacher_names, self.seq_len, self.pad_id = list(teacher_names), int(seq_len), int(pad_id)
        self.stats = dict(stats)
        self.fingerprint = fingerprint or self._content_hash()

    def __len__(self) -> int:
        return len(self.teacher)

    def _settings(self) -> dict:
        return {"format": _FORMAT_VERSION, "seq_len": self.seq_len, "pad_id": self.pad_id,
                "teacher_names": self.teacher_names}

    def _content_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self._settings(), sort_keys=True).encode())
        for name in _ARRAYS:
            array = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(memoryview(array.reshape(-1).view(np.uint8)))
        return h.hexdigest()

    def batch(self, indices) -> PackedBatch:
        """The sequences at `indices` (global indices) as a PackedBatch of int64 CPU tensors."""
        idx_B = np.asarray(indices, dtype=np.int64)
        take = lambda a: torch.from_numpy(np.asarray(a[idx_B], dtype=np.int64))  # noqa: E731
        return PackedBatch(take(self.tokens), take(self.labels), take(self.positions), take(self.doc_ids),
                           take(self.teacher), torch.from_numpy(idx_B.copy()))

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(getattr(self, name)), allow_pickle=False)
        meta = {**self._settings(), "stats": self.stats, "fingerprint": self.fingerprint}
        (directory / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory, mmap: bool = True, verify: bool = False) -> "PackedDataset":
        """mmap=True maps the arrays (ranks share the page cache); verify=True re-hashes the content."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise ValueError(f"{directory}: no meta.json, not a saved PackedDataset; fix: write it with .save()")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: packed with format {meta.get('format')!r}, this code reads "
                             f"{_FORMAT_VERSION!r}; fix: pack the data again")
        arrays = {n: np.load(directory / f"{n}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
                  for n in _ARRAYS}
        packed = cls(**arrays, teacher_names=meta["teacher_names"], seq_len=meta["seq_len"], pad_id=meta["pad_id"],
                     stats=meta["stats"], fingerprint=meta["fingerprint"])
        if verify and packed._content_hash() != meta["fingerprint"]:
            raise ValueError(f"{directory}: content does not match its fingerprint; fix: pack the data again")
        return packed


def pack(tokenized_ds, seq_len: int, teacher_names: Sequence[str] | None = None, pad_id: int = 0) -> PackedDataset:
    """Pack tokenised documents (from `tokenize_rows`) into [S, seq_len] sequences, one teacher per sequence.

    teacher_names: the run's teachers, in the order `teacher` indexes them (default: "reference" first, then
    the other names found, sorted). pad_id: any EXISTING token id (never add a pad token); padding carries
    label -100 and doc id -1, so its value only needs to be a valid embedding row.
    A document longer than seq_len keeps its first seq_len tokens (counted in stats and warned about); a
    document left without any loss token (all-prompt after truncation) is dropped, counted and warned about.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}; fix: use at least 2")
    if pad_id < 0:
        raise ValueError(f"pad_id={pad_id}; fix: pass an existing token id, e.g. tokenizer.eos_token_id")
    missing = {"input_ids", "labels"} - set(tokenized_ds.column_names)
    if missing:
        raise ValueError(f"pack: columns {sorted(missing)} missing (found {tokenized_ds.column_names}); fix: pass "
                         f"tokenize_rows(...)")
    has_teacher = "teacher" in tokenized_ds.column_names
    cols = _arrow_columns(tokenized_ds, ["input_ids", "labels"] + (["teacher"] if has_teacher else []))
    import pyarrow.compute as pc
    lengths_R = pc.list_value_length(cols["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    ids_flat = pc.list_flatten(cols["input_ids"]).to_numpy(zero_copy_only=False)
    labels_flat = pc.list_flatten(cols["labels"]).to_numpy(zero_copy_only=False)
    names_R = np.asarray(cols["teacher"].to_pylist() if has_teacher else [DEFAULT_TEACHER] * len(lengths_R),
                         dtype=object)
    n_docs = len(lengths_R)
    if n_docs >= 2**31:
        raise ValueError(f"{n_docs} documents overflow int32 doc ids; fix: split the dataset")

    found = sorted(set(names_R.tolist()))
    if teacher_names is None:
        teacher_names = ([DEFAULT_TEACHER] if DEFAULT_TEACHER in found else []) + [t for t in found
                                                                                  if t != DEFAULT_TEACHER]
    teacher_names = list(teacher_names)
    unknown = [t for t in found if t not in teacher_names]
    if unknown:
        raise ValueError(f"pack: rows name teachers {unknown} that are not among the run's teachers {teacher_names}; "
                         f"fix: add them to the config or relabel the rows")
    teacher_R = np.asarray([teacher_names.index(t) for t in names_R.tolist()], dtype=np.int32).reshape(-1)

    # Truncate to seq_len (head kept) and compute each kept token's source index in the flat arrays.
    starts_R = np.zeros(n_docs, dtype=np.int64)
    np.cumsum(lengths_R[:-1], out=starts_R[1:])
    kept_R = np.minimum(lengths_R, seq_len)
    truncated_R = lengths_R > seq_len
    doc_P = np.repeat(np.arange(n_docs, dtype=np.int64), kept_R)
    kept_starts_R = np.cumsum(kept_R) - kept_R
    within_P = np.arange(len(doc_P), dtype=np.int64) - kept_starts_R[doc_P]
    src_P = starts_R[doc_P] + within_P
    labels_P = labels_flat[src_P].astype(np.int32)
    labels_P[(kept_starts_R + kept_R - 1)[truncated_R]] = IGNORE  # target cut off (see tokenize_rows)
    loss_R = np.bincount(doc_P, weights=labels_P != IGNORE, minlength=n_docs).astype(np.int64)
    keep_R = loss_R > 0

    # Each teacher's documents are packed on their own, so a sequence never mixes teachers.
    seq_of_R = np.full(n_docs, -1, dtype=np.int64)
    offset_R = np.zeros(n_docs, dtype=np.int64)
    seq_teacher, n_seqs = [], 0
    for t in range(len(teacher_names)):
        docs = np.flatnonzero(keep_R & (teacher_R == t))
        if len(docs) == 0:
            continue
        seq_local, offset_local, count = _best_fit_decreasing(kept_R[docs], seq_len)
        seq_of_R[docs] = seq_local + n_seqs
        offset_R[docs] = offset_local
        seq_teacher += [t] * count
        n_seqs += count

    tokens_SL = np.full((n_seqs, seq_len), pad_id, dtype=np.int32)
    labels_SL = np.full((n_seqs, seq_len), IGNORE, dtype=np.int32)
    doc_ids_SL = np.full((n_seqs, seq_len), PAD_DOC_ID, dtype=np.int32)
    positions_SL = np.zeros((n_seqs, seq_len), dtype=np.int32)
    placed = keep_R[doc_P]
    dest = (seq_of_R[doc_P] * seq_len + offset_R[doc_P] + within_P)[placed]
    tokens_SL.reshape(-1)[dest] = ids_flat[src_P[placed]]
    labels_SL.reshape(-1)[dest] = labels_P[placed]
    doc_ids_SL.reshape(-1)[dest] = doc_P[placed]
    positions_SL.reshape(-1)[dest] = within_P[placed]
    # Padding is one pseudo-document per sequence tail, positions 0, 1, ... (within max_position_embeddings).
    used_S = (doc_ids_SL != PAD_DOC_ID).sum(axis=1)
    pad_SL = doc_ids_SL == PAD_DOC_ID
    positions_SL[pad_SL] = (np.arange(seq_len)[None, :] - used_S[:, None])[pad_SL]

    n_tokens = int(kept_R[keep_R].sum())
    stats = {
        "docs": int(keep_R.sum()), "sequences": int(n_seqs), "tokens": n_tokens,
        "loss_tokens": int(loss_R[keep_R].sum()),
        "truncated_docs": int(truncated_R.sum()), "truncated_tokens": int((lengths_R - kept_R).sum()),
        "dropped_docs_no_loss": int((~keep_R).sum()), "dropped_tokens": int(kept_R[~keep_R].sum()),
        "padding_fraction": float(1.0 - n_tokens / max(1, n_seqs * seq_len)),
        "sequences_per_teacher": {name: int(seq_teacher.count(t)) for t, name in enumerate(teacher_names)},
    }
    if "num_tokens" in tokenized_ds.column_names:  # documents already cut at tokenize_rows' max_seq_len
        full_R = np.asarray(tokenized_ds["num_tokens"], dtype=np.int64)
        stats["truncated_docs_at_tokenize"] = int((full_R > lengths_R).sum())
        stats["truncated_tokens_at_tokenize"] = int((full_R - lengths_R).sum())
    if stats["truncated_docs"] or stats.get("truncated_docs_at_tokenize"):
        warnings.warn(f"pack: {stats['truncated_docs']} documents longer than seq_len={seq_len} were truncated "
                      f"({stats['truncated_tokens']} tokens cut; {stats.get('truncated_docs_at_tokenize', 0)} "
                      f"already cut at tokenize_rows' max_seq_len)", stacklevel=2)
    if stats["dropped_docs_no_loss"]:
        warnings.warn(f"pack: dropped {stats['dropped_docs_no_loss']} documents with no answer token left after "
                      f"truncation ({stats['dropped_tokens']} tokens); fix: raise seq_len", stacklevel=2)
    return PackedDataset(tokens_SL, labels_SL, positions_SL, doc_ids_SL, np.asarray(seq_teacher, dtype=np.int32),
                         teacher_names, seq_len, pad_id, stats)


def prepare_packed(paths_or_dataset, tokenizer, seq_len: int, teacher_names: Sequence[str] | None = None,
                   cache_dir: str | None = None, num_proc: int | None = None,
                   pad_id: int | None = None) -> PackedDataset:
    """load_rows -> tokenize_rows(max_seq_len=seq_len) -> pack, in one call. With cache_dir, every stage is cached
    there and the PackedDataset is saved under cache_dir/packed-<key> and loaded (memory-mapped) next time.
    pad_id defaults to the tokenizer's pad token, else its eos token (both existing ids).
    Under torchrun call it on rank 0 first and then on the others after a barrier: the stages are
    deterministic, so the others then only read the caches (concurrent first builds would race on the files)."""
    rows = load_rows(paths_or_dataset, teacher_names=teacher_names, cache_dir=cache_dir)
    tokenized = tokenize_rows(rows, tokenizer, max_seq_len=seq_len, num_proc=num_proc, cache_dir=cache_dir)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cache_dir is None:
        return pack(tokenized, seq_len, teacher_names, pad_id=pad_id)
    key = hashlib.blake2b(f"{tokenized._fingerprint}|{seq_len}|{teacher_names}|{pad_id}|{_CODE_HASH}".encode(),
                          digest_size=8).hexdigest()
    target = Path(cache_dir) / f"packed-{key}"
    if (target / "meta.json").exists():
        return PackedDataset.load(target)
    packed = pack(tokenized, seq_len, teacher_names, pad_id=pad_id)
    scratch = Path(cache_dir) / f".packed-{key}-{os.getpid()}"
    packed.save(scratch)
    try:
        os.replace(scratch, target)  # atomic: a reader sees a complete directory or none
    except OSError:  # another process finished first; its copy is identical
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    return PackedDataset.load(target)


# ----------------------------------------------------------------------------------------------------------
# Sampling


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
    State: a few ints (step, consumed positions per stream). Resuming with the same batch_size * world_size
    gives exactly the batches an uninterrupted run would.
    """

    def __init__(self, packed: PackedDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 domain_fraction: float | None = None, domain_teacher: str = "domain"):
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
        teacher_S = np.asarray(packed.teacher)
        if domain_fraction is None:
            self._streams = [_Stream(np.arange(len(packed), dtype=np.int64), self.seed, 0)]
        else:
            if not 0.0 <= domain_fraction <= 1.0:
                raise ValueError(f"domain_fraction={domain_fraction}; fix: use a value in [0, 1]")
            if domain_teacher not in packed.teacher_names:
                raise ValueError(f"domain_teacher {domain_teacher!r} is not among the packed teachers "
                                 f"{packed.teacher_names}; fix: name the domain teacher of the rows")
            is_domain_S = teacher_S == packed.teacher_names.index(domain_teacher)
            general, domain = np.flatnonzero(~is_domain_S), np.flatnonzero(is_domain_S)
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
        return max(1, len(self.packed) // self.global_batch)

    @property
    def epoch(self) -> int:
        """Epochs completed over the whole dataset (by sequences consumed)."""
        return sum(self._consumed) // len(self.packed)

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

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "global_batch": self.global_batch,
                **{f"consumed_{k}": c for k, c in enumerate(self._consumed)}}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}; fix: build the "
                             f"sampler with the checkpoint's seed")
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


def tokenizer_fingerprint(directory) -> str | None:
    """What must agree between two tokenizers for their token ids to mean the same: the vocabulary, merges and
    added tokens of tokenizer.json (or the sentencepiece model's bytes), not the file's formatting or the
    library version that wrote it. None when the directory holds neither."""
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        tok = json.loads((d / "tokenizer.json").read_text())
        model = tok.get("model")
        if not isinstance(model, dict):  # not a `tokenizers` file we can read semantically: its bytes decide
            return (d / "tokenizer.json").read_bytes().hex()
        vocab = model.get("vocab")
        added = sorted((t["id"], t["content"]) for t in tok.get("added_tokens", []))
        return json.dumps([model.get("type"), vocab, model.get("merges"), added], sort_keys=True)
    if (d / "tokenizer.model").is_file():
        return (d / "tokenizer.model").read_bytes().hex()
    return None
