"""Chat formatting and tokenisation with completion labels: one code path for training, capture and eval.

A conversation is rendered by the tokenizer's chat template (or `MISTRAL_CHAT_TEMPLATE`); assistant turns are
located as character spans and mapped to tokens through offsets; labels[i] = ids[i+1] where token i+1 belongs
to an assistant turn, else IGNORE (next-token labels: CE and KD see exactly the same positions).

Control tokens come from the template only. Message content is text, as in Mistral's own encoder
(mistral-common): a chat whose content holds the literal strings of the tokenizer's special tokens (`<s>`, `</s>`,
`[INST]` where it is special, ...; HTML strike-through, a question about tokenisers) is encoded with those strings
as ordinary text tokens, never as BOS/EOS/[INST]. Rows without such strings are tokenised exactly as
`tokenizer.apply_chat_template` does; rows with them differ from it by design (it would emit the control tokens).
How (`_TextSafe`): the content's special strings are escaped to private-use characters before the template
renders, the template's own special strings are then mapped to private-use characters that a twin of the
tokenizer (same vocabulary and ids; its special tokens renamed to those characters, BPE vocabulary entries and
merges renamed/dropped so that text can never reach them) reads as its control tokens, and the escapes go back to
the content's original text. The whole text is still encoded in one call, so the pieces between control tokens
are split and pre-tokenised exactly as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

IGNORE = -100  # the one no-loss label (prompt, padding, last token of a document); every room imports it here
_FORMAT_VERSION = "chat-v2"  # bump when the labels' semantics change (v2: content's special strings are text)
# Tokenisation caches are keyed on this file's bytes (not the package's), so an edit to the chat rules
# invalidates them instead of serving stale labels, while an edit to packing or sampling does not.
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


# ----------------------------------------------------------------------------------------------------------
# Control tokens only from the template (module doc)

_ESCAPE_BASE = 0xF0000     # Supplementary Private Use Area-A: a content special string while the template renders
_CONTROL_BASE = 0x100000   # Area-B: a template special string, read by the twin tokenizer as its control token
_PRIVATE = re.compile("[\U000F0000-\U0010FFFF]")


class _TextSafe:
    """The special strings of one tokenizer and its text-safe twin (module doc). Built once per tokenizer."""

    def __init__(self, tokenizer):
        specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
                          key=lambda c: (-len(c), c))  # longest first: a regex alternation takes the first match
        self.specials = [c for c in specials if c]
        self.find = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        self.escape = {c: chr(_ESCAPE_BASE + i) for i, c in enumerate(self.specials)}
        self.control = {c: chr(_CONTROL_BASE + i) for i, c in enumerate(self.specials)}
        self.unescape = {e: c for c, e in self.escape.items()}
        self._to_final = re.compile("|".join([re.escape(c) for c in self.specials] + list(self.unescape))) \
            if self.specials else None
        self._tokenizer = tokenizer
        self._twin = None

    def touches(self, messages: list) -> bool:
        return self.find is not None and any(self.find.search(m["content"]) for m in messages)

    def escaped(self, messages: list) -> list:
        for m in messages:
            if _PRIVATE.search(m["content"]):
                raise ValueError(f"a {m['role']} turn holds Unicode private-use characters (U+F0000..U+10FFFF) and "
                                 f"the tokenizer's special strings {self.specials}; the two together cannot be told "
                                 f"apart from the template's markers; fix: remove the private-use characters")
        return [{**m, "content": self.find.sub(lambda x: self.escape[x.group()], m["content"])} for m in messages]

    def final(self, text: str) -> str:
        """Rendered escaped text -> the twin's input: template specials -> control chars, escapes -> content text."""
        return self._to_final.sub(lambda x: self.control.get(x.group()) or self.unescape[x.group()], text)

    @property
    def twin(self):
        if self._twin is None:
            from tokenizers import Tokenizer
            spec = json.loads(self._tokenizer.backend_tokenizer.to_str())
            for t in spec.get("added_tokens", []):
                if t.get("special") and t["content"] in self.control:
                    t["content"] = self.control[t["content"]]
            model = spec.get("model") or {}
            if model.get("type") == "BPE":  # text must never reach a control id through the vocabulary either
                vocab = model["vocab"]
                for c, z in self.control.items():
                    if c in vocab:
                        vocab[z] = vocab.pop(c)
                if model.get("unk_token") in self.control:
                    model["unk_token"] = self.control[model["unk_token"]]
                pair = lambda m: m.split(" ", 1) if isinstance(m, str) else m  # noqa: E731
                model["merges"] = [m for m in model.get("merges", []) if "".join(pair(m)) not in self.control]
            spec["post_processor"], spec["truncation"], spec["padding"] = None, None, None
            self._twin = Tokenizer.from_str(json.dumps(spec))
            self.control_ids = {self._twin.token_to_id(z) for z in self.control.values()}
        return self._twin

    def encode(self, text: str) -> tuple[list, list]:
        """(ids, offsets) of the twin's input; checks that control ids came from the template only."""
        enc = self.twin.encode(text, add_special_tokens=False)
        n_control = sum(text.count(z) for z in self.control.values())
        if sum(i in self.control_ids for i in enc.ids) != n_control:
            raise ValueError("message text was encoded to a control token by the tokenizer's model; fix: report the "
                             "tokenizer (its vocabulary reaches a special token from text)")
        return list(enc.ids), list(enc.offsets)


_TEXT_SAFE: dict = {}


def _text_safe(tokenizer) -> _TextSafe:
    key = id(tokenizer)
    if key not in _TEXT_SAFE or _TEXT_SAFE[key][0] is not tokenizer:
        _TEXT_SAFE[key] = (tokenizer, _TextSafe(tokenizer))  # the reference keeps the id from being reused
    return _TEXT_SAFE[key][1]


def _encode_chat(messages: list, tokenizer) -> tuple[list, list, list]:
    """(ids, offsets, assistant spans in offset coordinates): the one tokenisation of a training conversation."""
    safe = _text_safe(tokenizer)
    if not safe.touches(messages):  # the common case: exactly apply_chat_template's ids
        text, spans = format_chat(messages, tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"]), spans
    text, spans = format_chat(safe.escaped(messages), tokenizer)
    # Spans end at template render boundaries, never inside a special string, so a prefix maps on its own.
    spans = [(len(safe.final(text[:a])), len(safe.final(text[:b]))) for a, b in spans]
    ids, offsets = safe.encode(safe.final(text))
    return ids, offsets, spans


def tokenize_chat(messages: list, tokenizer) -> tuple[list, list]:
    """ids and next-token labels (-100 outside assistant turns). ids == apply_chat_template(messages) for rows whose
    content holds no special-token string; in rows that do, those strings are text tokens (module doc)."""
    _check_tokenizer(tokenizer)
    ids, offsets, spans = _encode_chat(messages, tokenizer)
    return ids, _labels_from_offsets(ids, offsets, spans).tolist()


def encode_prompt(messages: list, tokenizer) -> list:
    """Token ids of the prompt that precedes the last answer, as training renders it (for generation); the
    content's special strings are text, as in training."""
    _check_tokenizer(tokenizer)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    template = _template_of(tokenizer)
    if _needs_fold(tokenizer, template):
        messages = _fold_system(messages)
    safe = _text_safe(tokenizer)
    if not safe.touches(messages):
        text = _render(messages, tokenizer, template, generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = _render(safe.escaped(messages), tokenizer, template, generation_prompt=True)
    return safe.encode(safe.final(text))[0]


# ----------------------------------------------------------------------------------------------------------
# Tokenisation of a whole dataset (one datasets.map pass, cached)


def _tokenize_batch(batch: dict, *, tokenizer, max_seq_len: int) -> dict:
    safe = _text_safe(tokenizer)
    plain = [k for k, m in enumerate(batch["messages"]) if not safe.touches(m)]
    encoded = [None] * len(batch["messages"])
    rendered = [format_chat(batch["messages"][k], tokenizer) for k in plain]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)  # Rust threads
    for j, k in enumerate(plain):
        encoded[k] = (enc["input_ids"][j], enc["offset_mapping"][j], rendered[j][1])
    for k, messages in enumerate(batch["messages"]):
        if encoded[k] is None:  # content with special-token strings (module doc)
            encoded[k] = _encode_chat(messages, tokenizer)
    return _truncated(encoded, max_seq_len)


def _truncated(encoded, max_seq_len: int) -> dict:
    out = {"input_ids": [], "labels": [], "num_tokens": [], "truncated": []}
    for ids, offsets, s in encoded:
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
