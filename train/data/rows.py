"""Chat rows from files or a `datasets.Dataset`, normalised to one schema and validated (rows, not tokens).

Accepted schemas: `messages` ({role, content}; roles system/user/assistant), ShareGPT `conversations`
({from, value}), or `prompt` + `response`. Optional `teacher` (str) or `domain` (bool: true -> "domain",
false -> "reference"); default teacher "reference"; optional `family` (str). Output columns: messages,
teacher, family. Bad rows raise ValueError naming file, row (1-based) and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_TEACHER = "reference"
ROW_FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")  # or a save_to_disk directory
# The normalisation cache is keyed on this file's bytes (not the whole package's): an edit to the row rules
# re-checks the rows, an edit to packing or sampling does not.
_CODE_HASH = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=8).hexdigest()

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
    if not suffix.endswith(ROW_FILE_SUFFIXES):
        raise ValueError(f"{path}: unknown file type; fix: use one of {', '.join(ROW_FILE_SUFFIXES)} or a directory "
                         f"written by Dataset.save_to_disk")
    builder = "parquet" if suffix.endswith(".parquet") else "json"
    if builder == "json":
        _check_json_file(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:  # arrow's JSON errors do not name the file
        raise ValueError(f"{path}: could not be read as {builder} ({type(e).__name__}: {e}); fix the file") from e


def _check_json_file(path: Path) -> None:
    """An empty file or a malformed line, named with its line number (arrow's reader says neither). One pass of
    json.loads over the file: a second read of what `datasets` reads next, cheap beside tokenisation."""
    import gzip
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        try:
            text_start = f.read(1 << 16)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e}); fix: save it as UTF-8 JSON lines") from None
        if not text_start.strip():
            raise ValueError(f"{path}: no rows (the file is empty); fix: point data.paths at a file with rows")
        if text_start.lstrip().startswith("["):  # one JSON array (a .json file), not JSON lines
            try:
                json.loads(text_start + f.read())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); fix the "
                                 "file") from None
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}); fix or "
                                 "remove that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object (one row "
                                 "per line: {\"messages\": [...]}); fix that line")


def raw_sources(paths_or_dataset, cache_dir: str | None = None) -> list:
    """[(source name, raw datasets.Dataset)] of the inputs, before normalisation (arrow-backed, memory-mapped)."""
    import datasets
    if isinstance(paths_or_dataset, datasets.Dataset):
        return [("<dataset>", paths_or_dataset)]
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
    return sources


def normalise_chunk(ds, start: int, stop: int, source: str, teacher_names) -> dict:
    """Rows [start, stop) of one raw source, normalised and validated (columns messages, teacher, family, _skip):
    what `load_rows` does to a whole source, for callers that stream a source in chunks."""
    schemas = _schemas_of(ds.column_names, source)
    return _normalise_batch(ds[start:stop], list(range(start, stop)), schemas=schemas, source=source,
                            teacher_names=None if teacher_names is None else list(teacher_names))


def load_rows(paths_or_dataset, teacher_names: Sequence[str] | None = None, cache_dir: str | None = None):
    """Chat rows from files / a saved dataset / a `datasets.Dataset`, normalised and validated (module doc)."""
    import datasets
    sources = raw_sources(paths_or_dataset, cache_dir)
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

