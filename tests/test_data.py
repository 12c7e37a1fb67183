"""train/data.py and train/demo/corpus.py: masks token by token, template equality, packing, sampler, bad input,
the demo corpus and tokenizer. Built on a small demo corpus and its tokenizer (made once per session)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from train import data as D
from train.demo import corpus as DD
from train.data.chat import _fold_system


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    import datasets
    datasets.disable_progress_bars()
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return DD.generate_corpus(seed=3, out_dir=tmp_path_factory.mktemp("corpus"), n_train=1500, n_eval=100)


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    return DD.train_tokenizer([corpus["train"]], tmp_path_factory.mktemp("tok"), vocab_size=2000, seed=3)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def tokenized(corpus, tok, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    rows = D.load_rows(corpus["train"], teacher_names=["reference", "domain"], cache_dir=str(cache))
    return rows, D.tokenize_rows(rows, tok, max_seq_len=128, num_proc=1, cache_dir=str(cache))


def _ids(encoded):
    """apply_chat_template(tokenize=True) returns a list (transformers 4) or a BatchEncoding (5)."""
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


TWO_TURN = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Now add 5."}, {"role": "assistant", "content": "12"}]


# ---------------------------------------------------------------------------------------------- formatting

def test_two_turn_mask_token_by_token(tok):
    """Hand-built expectation: <s>[INST] sys\\n\\nq1 [/INST] a1</s>[INST] q2 [/INST] a2</s>, each piece encoded
    on its own (special tokens split the text, so pieces tokenize independently)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    inst, end_inst = tok.convert_tokens_to_ids(["[INST]", "[/INST]"])
    q1, a1 = _enc(tok, " Be brief.\n\nWhat is 3 + 4? "), _enc(tok, " 7")
    q2, a2 = _enc(tok, " Now add 5. "), _enc(tok, " 12")
    pieces = [([bos, inst] + q1 + [end_inst], False), (a1 + [eos], True), ([inst] + q2 + [end_inst], False),
              (a2 + [eos], True)]
    expected_ids = [t for piece, _ in pieces for t in piece]
    is_answer = [flag for piece, flag in pieces for _ in piece]
    ids, labels = D.tokenize_chat(TWO_TURN, tok)
    assert ids == expected_ids
    assert len(labels) == len(ids)
    for i in range(len(ids)):
        want = ids[i + 1] if i + 1 < len(ids) and is_answer[i + 1] else -100
        assert labels[i] == want, f"position {i} ({tok.convert_ids_to_tokens(ids[i])!r}): {labels[i]} != {want}"
    # the first answer token is predicted from [/INST]; </s> is a label; nothing after </s> is
    first = ids.index(end_inst)
    assert labels[first] == a1[0] and labels[first - 1] == -100
    eos_pos = [i for i, t in enumerate(ids) if t == eos]
    assert labels[eos_pos[0] - 1] == eos and labels[eos_pos[0]] == -100 and labels[-1] == -100
    assert sum(l != -100 for l in labels) == len(a1) + len(a2) + 2


def test_same_ids_as_apply_chat_template(tok, corpus):
    rows = [json.loads(line)["messages"] for line in open(corpus["train"])][:40] + [TWO_TURN]
    for messages in rows:
        ids, labels = D.tokenize_chat(messages, tok)
        assert ids == _ids(tok.apply_chat_template(messages, tokenize=True))
    # a tokenizer with no template of its own uses the built-in one
    bare = type(tok).from_pretrained(tok.name_or_path)
    bare.chat_template = None
    for messages in rows[:10]:
        ids, _ = D.tokenize_chat(messages, bare)
        assert ids == _ids(tok.apply_chat_template(messages, chat_template=D.MISTRAL_CHAT_TEMPLATE, tokenize=True))


# Mistral-7B-Instruct-v0.1's template (no system role, no space before the answer) and a v0.3-style one (the
# system text goes into the LAST user turn, answers trimmed): both must work; where the template moves or
# rejects the system text, it is folded into the first user turn first.
MISTRAL_V01 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0)"
               " %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
               "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
MISTRAL_V03_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content']"
    " + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}{%- endif %}"
    "{%- endfor %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template", [MISTRAL_V01, MISTRAL_V03_LIKE, CHATML], ids=["v0.1", "v0.3-like", "chatml"])
def test_other_templates(tok, template):
    other = type(tok).from_pretrained(tok.name_or_path)
    other.chat_template = template
    for messages in (TWO_TURN, TWO_TURN[1:], TWO_TURN[1:3]):
        ids, labels = D.tokenize_chat(messages, other)
        folded = _fold_system(messages) if template != CHATML else messages
        assert ids == _ids(other.apply_chat_template(folded, tokenize=True))
        # labelled tokens decode to exactly the answers and their end-of-turn text
        text = other.decode([l for l in labels if l != -100])
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        end = "<|im_end|>\n" if template == CHATML else "</s>"
        expected = "".join((" " if template == MISTRAL_V03_LIKE else "") + a + end for a in answers)
        assert text == expected


def test_encode_prompt_is_training_prefix(tok):
    ids, labels = D.tokenize_chat(TWO_TURN, tok)
    prompt = D.encode_prompt(TWO_TURN, tok)
    assert ids[:len(prompt)] == prompt
    assert labels[len(prompt) - 1] == ids[len(prompt)], "the last prompt token predicts the answer's first token"
    assert labels[len(prompt) - 2] == -100
    assert tok.decode(ids[len(prompt):]) == " 12</s>"
    messages, answer = D.split_for_eval(TWO_TURN)
    assert answer == "12" and D.encode_prompt(messages, tok) == prompt


# ---------------------------------------------------------------------------------------------- loading

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_schemas_and_teacher_mapping(tmp_path):
    import datasets
    rows = [
        {**GOOD, "domain": True, "family": "f"},
        {**GOOD, "teacher": "domain"},
        {**GOOD},
        {**GOOD, "domain": False},
    ]
    ds = D.load_rows(_write_jsonl(tmp_path / "a.jsonl", rows), cache_dir=str(tmp_path / "c"))
    assert ds["teacher"] == ["domain", "domain", "reference", "reference"] and ds["family"] == ["f", "", "", ""]
    sharegpt = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                   {"from": "gpt", "value": "a"}]}]
    (tmp_path / "b.json").write_text(json.dumps(sharegpt))  # a JSON array, not lines
    pr = datasets.Dataset.from_list([{"prompt": "q", "response": "a", "teacher": "domain"}])
    pr.to_parquet(str(tmp_path / "c.parquet"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(saved))
    ds = D.load_rows([tmp_path / "b.json", tmp_path / "c.parquet", saved, pr], cache_dir=str(tmp_path / "c"))
    assert ds["messages"][0] == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a"}]
    assert ds["messages"][1] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert ds["teacher"] == ["reference", "domain", "reference", "domain"]


def _msgs(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BAD_ROWS = {
    "no_assistant": (_msgs(("user", "q")), "no assistant turn"),
    "unknown_role": (_msgs(("user", "q"), ("bot", "a")), "unknown role 'bot'"),
    "not_alternating": (_msgs(("user", "q"), ("user", "q"), ("assistant", "a")), "alternate"),
    "trailing_user": (_msgs(("user", "q"), ("assistant", "a"), ("user", "q")), "last turn is a user turn"),
    "late_system": (_msgs(("user", "q"), ("system", "s"), ("assistant", "a")), "system turn"),
    "bad_teacher": ({**GOOD, "teacher": "oracle"}, "teacher 'oracle' is not one of the run's teachers"),
    "teacher_vs_domain": ({**GOOD, "teacher": "reference", "domain": True}, "disagrees"),
    "sharegpt_role": ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
                      "unknown role 'robot'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_row_and_fix(tmp_path, case):
    bad, expected = BAD_ROWS[case]
    path = _write_jsonl(tmp_path / f"{case}.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(ValueError) as info:
        D.load_rows(path, teacher_names=["reference", "domain"], cache_dir=str(tmp_path / "c"))
    message = str(info.value)
    assert str(path) in message and "row 3" in message and "fix" in message and expected in message, message


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl: file not found; fix"):
        D.load_rows(tmp_path / "missing.jsonl")
    path = _write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"cols.jsonl: no known columns \(found \['answer', 'question'\]\); fix"):
        D.load_rows(path, cache_dir=str(tmp_path / "c"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown file type; fix"):
        D.load_rows(tmp_path / "x.csv")


def test_empty_answers_skipped_and_counted(tmp_path):
    rows = [GOOD, _msgs(("user", "q"), ("assistant", "  ")), GOOD, {"prompt": "q", "response": ""}]
    path = _write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.warns(UserWarning, match=r"e.jsonl: skipped 2 of 4 rows with an empty assistant answer \(first: row 2"):
        ds = D.load_rows(path, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 2


# ---------------------------------------------------------------------------------------------- tokenize + pack

def test_tokenize_rows_labels_and_cache(tokenized, tok, tmp_path):
    rows, tds = tokenized
    assert len(tds) == len(rows) and set(tds.column_names) >= {"input_ids", "labels", "teacher", "num_tokens"}
    for k in range(0, len(rows), 97):  # spot checks against the one-row path
        ids, labels = D.tokenize_chat(rows[k]["messages"], tok)
        assert tds[k]["input_ids"] == ids and tds[k]["labels"] == labels
    for ids, labels in zip(tds["input_ids"], tds["labels"]):
        ids_T, labels_T = np.asarray(ids), np.asarray(labels)
        on = labels_T[:-1] != -100
        assert (labels_T[:-1][on] == ids_T[1:][on]).all() and labels_T[-1] == -100
    # cached: a second call is served from the same file
    cache = str(Path(tds.cache_files[0]["filename"]).parent)
    again = D.tokenize_rows(rows, tok, max_seq_len=128, num_proc=1, cache_dir=cache)
    assert again.cache_files == tds.cache_files


def _check_packed_equals_documents(packed, tds, teacher_names):
    seen = set()
    S, L = packed.tokens.shape
    assert packed.labels.shape == packed.positions.shape == packed.doc_ids.shape == (S, L)
    for s in range(S):
        docs = packed.doc_ids[s]
        real = docs != D.PAD_DOC_ID
        # padding: existing id, no loss, only at the tail, positions of its own starting at 0
        assert (packed.labels[s][~real] == -100).all() and (packed.tokens[s][~real] == packed.pad_id).all()
        n_real = int(real.sum())
        assert real[:n_real].all()
        assert (packed.positions[s][n_real:] == np.arange(L - n_real)).all()
        for d in np.unique(docs[real]).tolist():
            where = np.flatnonzero(docs == d)
            n = len(where)
            assert (where == where[0] + np.arange(n)).all(), "a document is contiguous"
            assert d not in seen
            seen.add(d)
            assert teacher_names[packed.teacher[s]] == tds[d]["teacher"], "one teacher per sequence"
            assert (packed.tokens[s, where] == np.asarray(tds[d]["input_ids"][:n])).all()
            want_labels = np.asarray(tds[d]["labels"][:n])
            if n < len(tds[d]["input_ids"]):
                want_labels[-1] = -100
            assert (packed.labels[s, where] == want_labels).all()
            assert (packed.positions[s, where] == np.arange(n)).all()
    return seen


def test_pack_equals_unpacked(tokenized):
    _, tds = tokenized
    names = ["reference", "domain"]
    packed = D.pack(tds, seq_len=96, teacher_names=names, pad_id=2)
    seen = _check_packed_equals_documents(packed, tds, names)
    assert seen == set(range(len(tds))), "every document placed exactly once"
    lengths = [len(x) for x in tds["input_ids"]]
    st = packed.stats
    assert st["tokens"] == sum(lengths) and st["docs"] == len(tds) and st["truncated_docs"] == 0
    assert st["loss_tokens"] == int((packed.labels != -100).sum())
    assert st["padding_fraction"] < 0.05, st  # best-fit decreasing packs ~20-50-token docs tightly
    assert set(packed.teacher.tolist()) == {0, 1}


def test_pack_truncation_and_drops(tok):
    import datasets
    long = _msgs(("user", "q"), ("assistant", "a b c d e f g h i j k l m n o p q r s t u v w"))
    prompt_heavy = _msgs(("user", "w " * 60), ("assistant", "x"))
    rows = D.load_rows(datasets.Dataset.from_list([GOOD, long, prompt_heavy]))
    tds = D.tokenize_rows(rows, tok, max_seq_len=1000, num_proc=1)
    L = 24
    assert len(tds[1]["input_ids"]) > L and len(tds[2]["input_ids"]) > L
    with pytest.warns(UserWarning) as record:
        packed = D.pack(tds, seq_len=L, teacher_names=["reference"])
    text = " ".join(str(w.message) for w in record)
    assert "2 of 3 documents were longer than seq_len=24" in text and "dropped 1 documents" in text
    st = packed.stats
    assert st["truncated_docs"] == 2 and st["dropped_docs_no_loss"] == 1 and st["docs"] == 2
    assert st["truncated_tokens"] == sum(len(x) - L for x in tds["input_ids"][1:])
    seen = _check_packed_equals_documents(packed, tds, ["reference"])
    assert seen == {0, 1}


def test_one_teacher_per_sequence_and_unknown_teacher(tokenized):
    _, tds = tokenized
    with pytest.raises(ValueError, match=r"teachers \['domain'\] that are not among the run's teachers"):
        D.pack(tds, seq_len=96, teacher_names=["reference"])


def test_packed_save_load_fingerprint(tokenized, tmp_path):
    _, tds = tokenized
    packed = D.pack(tds, seq_len=96, teacher_names=["reference", "domain"])
    packed.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "doc_ids.npy", "labels.npy", "meta.json", "positions.npy", "teacher.npy", "tokens.npy"]
    loaded = D.PackedDataset.load(tmp_path / "p", verify=True)  # np.load(allow_pickle=False) inside
    for name in ("tokens", "labels", "positions", "doc_ids", "teacher"):
        assert np.array_equal(getattr(loaded, name), getattr(packed, name))
    assert loaded.fingerprint == packed.fingerprint and loaded.stats == packed.stats
    assert D.pack(tds, seq_len=96, teacher_names=["reference", "domain"]).fingerprint == packed.fingerprint
    assert D.pack(tds, seq_len=80, teacher_names=["reference", "domain"]).fingerprint != packed.fingerprint
    assert D.pack(tds, seq_len=96, teacher_names=["domain", "reference"]).fingerprint != packed.fingerprint


# ---------------------------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def packed(tokenized):
    return D.pack(tokenized[1], seq_len=48, teacher_names=["reference", "domain"])


def _run(sampler, n):
    return [sampler.next_indices().tolist() for _ in range(n)]


@pytest.mark.parametrize("domain_fraction", [None, 0.3])
def test_sampler_resume_equality(packed, domain_fraction):
    kw = dict(batch_size=16, seed=7, domain_fraction=domain_fraction)
    steps = 3 * len(packed) // 16 + 5  # crosses several epoch boundaries
    full = _run(D.Sampler(packed, **kw), steps)
    first = D.Sampler(packed, **kw)
    head = _run(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores plain ints
    assert all(isinstance(v, int) for v in state.values())
    resumed = D.Sampler(packed, **kw)
    resumed.load_state_dict(state)
    assert head + _run(resumed, steps - 17) == full
    other_seed = _run(D.Sampler(packed, **{**kw, "seed": 8}), 3)
    assert other_seed != full[:3]


def test_sampler_epochs_reshuffled_and_complete(packed):
    S, B = len(packed), 8
    sampler = D.Sampler(packed, batch_size=B, seed=1)
    stream = np.concatenate(_run(sampler, 2 * S // B + 2))
    assert sorted(stream[:S].tolist()) == list(range(S)) and sorted(stream[S:2 * S].tolist()) == list(range(S))
    assert not np.array_equal(stream[:S], stream[S:2 * S])
    assert sampler.epoch == 2 and sampler.steps_per_epoch == S // B


@pytest.mark.parametrize("domain_fraction", [None, 0.25])
def test_rank_shares_disjoint_and_complete(packed, domain_fraction):
    W, B = 3, 4
    steps = len(packed) // (W * B) + 3  # one epoch and a bit
    single = _run(D.Sampler(packed, batch_size=W * B, seed=5, domain_fraction=domain_fraction), steps)
    ranks = [_run(D.Sampler(packed, batch_size=B, rank=r, world_size=W, seed=5, domain_fraction=domain_fraction),
                  steps) for r in range(W)]
    for step in range(steps):
        shares = [ranks[r][step] for r in range(W)]
        assert sum(shares, []) == single[step], "ranks together give exactly the global batch"
    if domain_fraction is None:  # within an epoch no sequence is repeated across ranks or steps
        epoch_steps = len(packed) // (W * B)
        flat = [i for step in range(epoch_steps) for r in range(W) for i in ranks[r][step]]
        assert len(flat) == len(set(flat))


def test_domain_fraction_within_sampling_error(packed):
    f, B, steps = 0.1, 32, 300
    sampler = D.Sampler(packed, batch_size=B, seed=11, domain_fraction=f)
    domain = packed.teacher_names.index("domain")
    teachers = np.concatenate([packed.teacher[sampler.next_indices()] for _ in range(steps)])
    n = len(teachers)
    share = float((teachers == domain).mean())
    assert abs(share - f) < 4 * (f * (1 - f) / n) ** 0.5, share
    zero = D.Sampler(packed, batch_size=B, seed=11, domain_fraction=0.0)
    assert all((packed.teacher[zero.next_indices()] != domain).all() for _ in range(20))
    with pytest.raises(ValueError, match="domain_fraction"):
        D.Sampler(packed, batch_size=B, domain_fraction=1.5)


def test_batch_tensors_and_sequential(packed):
    batch = D.Sampler(packed, batch_size=4, seed=0).next_batch()
    for name in ("tokens_BT", "labels_BT", "positions_BT", "doc_ids_BT"):
        assert getattr(batch, name).dtype == torch.int64 and getattr(batch, name).shape == (4, packed.seq_len)
    assert batch.teacher_B.dtype == torch.int64 and batch.sample_idx_B.dtype == torch.int64
    idx = batch.sample_idx_B.numpy()
    assert np.array_equal(batch.tokens_BT.numpy(), packed.tokens[idx])
    assert np.array_equal(batch.teacher_B.numpy(), packed.teacher[idx])
    assert batch.to("cpu").tokens_BT.equal(batch.tokens_BT)
    W = 3
    got = [b.sample_idx_B.tolist() for r in range(W) for b in D.sequential_batches(packed, 5, r, W)]
    flat = sum(got, [])
    assert sorted(flat) == list(range(len(packed)))


# ---------------------------------------------------------------------------------------------- demo data

def test_corpus_deterministic_and_held_out(corpus, tmp_path):
    again = DD.generate_corpus(seed=3, out_dir=tmp_path / "again", n_train=1500, n_eval=100)
    for split in ("train", "eval", "catalogue"):
        assert Path(again[split]).read_bytes() == Path(corpus[split]).read_bytes()
    other = DD.generate_corpus(seed=4, out_dir=tmp_path / "other", n_train=1500, n_eval=100)
    assert Path(other["train"]).read_bytes() != Path(corpus["train"]).read_bytes()
    train = [json.loads(line) for line in open(corpus["train"])]
    evals = [json.loads(line) for line in open(corpus["eval"])]
    assert len(train) == 1500 and len(evals) == 100

    def prompts(row):
        return [m["content"] for m in row["messages"] if m["role"] == "user"]

    train_first = {prompts(r)[0] for r in train}
    assert not any(prompts(r)[0] in train_first for r in evals), "no eval prompt seen in training"
    families = {r["family"] for r in train}
    assert families == set(DD.GENERAL_FAMILIES) | {DD.DOMAIN_FAMILY} and len(DD.GENERAL_FAMILIES) >= 8
    assert {r["family"] for r in evals} == families
    assert all(r["domain"] == (r["family"] == DD.DOMAIN_FAMILY) for r in train + evals)
    turns = {len(prompts(r)) for r in train}
    assert turns == {1, 2}
    # every catalogue fact asked in eval is taught somewhere in training (as a first or follow-up answer)
    catalogue = json.loads(Path(corpus["catalogue"]).read_text())
    names = {p["name"] for p in catalogue}
    taught = {" ".join(m["content"] for m in r["messages"]) for r in train if r["domain"]}
    assert all(any(n in t for t in taught) for n in names)


def test_corpus_fits_tiny_models(corpus, tok):
    rows = [json.loads(line) for line in open(corpus["train"])] + [json.loads(line) for line in open(corpus["eval"])]
    for row in rows:
        for m in row["messages"]:
            n = len(_enc(tok, " " + m["content"]))
            if m["role"] == "user":
                assert n < 40, m
            elif m["role"] == "assistant":
                assert n < 12, m


def test_tokenizer_deterministic_and_loadable(corpus, tok_dir, tok, tmp_path):
    again = DD.train_tokenizer([corpus["train"]], tmp_path / "again", vocab_size=2000, seed=3)
    files = sorted(p.name for p in Path(tok_dir).iterdir())
    assert files == sorted(p.name for p in Path(again).iterdir()) and "tokenizer.json" in files
    for name in files:
        assert (Path(tok_dir) / name).read_bytes() == (Path(again) / name).read_bytes(), name
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == list(DD.SPECIAL_TOKENS)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.chat_template == D.MISTRAL_CHAT_TEMPLATE
    assert 300 < len(tok) <= 2000
    text = "Sort ascending: 7, 2, 9"
    assert tok.decode(_enc(tok, text)) == text
    assert DD.check_answer(" 42\n", "42") and not DD.check_answer("4 2", "42")


def test_tokenize_rows_parallel_matches_serial(tokenized, tok, tmp_path):
    """num_proc > 1 (the default on large data) pickles the tokenizer into workers; same rows come back."""
    rows, tds = tokenized
    small = rows.select(range(60))
    parallel = D.tokenize_rows(small, tok, max_seq_len=128, num_proc=2, cache_dir=str(tmp_path))
    assert parallel["input_ids"] == tds["input_ids"][:60] and parallel["labels"] == tds["labels"][:60]


def test_prepare_packed_caches(corpus, tok, tmp_path):
    names = ["reference", "domain"]
    first = D.prepare_packed(corpus["eval"], tok, seq_len=64, teacher_names=names, cache_dir=str(tmp_path), num_proc=1)
    assert first.pad_id == tok.eos_token_id and first.stats["docs"] == 100
    assert len(list(tmp_path.glob("packed-*"))) == 1
    again = D.prepare_packed(corpus["eval"], tok, seq_len=64, teacher_names=names, cache_dir=str(tmp_path), num_proc=1)
    assert again.fingerprint == first.fingerprint and isinstance(again.tokens, np.memmap)


# ------------------------------------------------------------------------------ control tokens only from the template
# The demo tokenizer's special tokens are <unk>, <s>, </s>, [INST] and [/INST] (in Mistral's v1 tokenizer the latter
# two are plain text; here they are special, the harder case).

SPECIAL_CHAT = [{"role": "system", "content": "Quote <unk> as is."},
                {"role": "user", "content": "What does <s> mean in HTML? And [INST] x [/INST]?"},
                {"role": "assistant", "content": "<s>struck</s> text; [INST] and [/INST] are markers. </s>"},
                {"role": "user", "content": "And </s><s>?"}, {"role": "assistant", "content": "[/INST]<unk>"}]


def _special_ids(tok):
    return {tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "[INST]", "[/INST]", "<unk>")}


def test_content_special_strings_are_text(tok):
    from train.data.chat import _fold_system
    specials = _special_ids(tok)
    assert len(specials) == 5 and all(t in tok.all_special_tokens for t in ("<s>", "</s>", "[INST]", "[/INST]"))
    ids, labels = D.tokenize_chat(SPECIAL_CHAT, tok)
    # The template's own markers, from the same conversation rendered with neutral content of the same shape
    neutral = [{**m, "content": m["content"].replace("<", "(").replace("[", "(")} for m in SPECIAL_CHAT]
    n_ids = _ids(tok.apply_chat_template(_fold_system(neutral), tokenize=True))
    assert [i for i in ids if i in specials] == [i for i in n_ids if i in specials]  # markers unchanged, in order
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 2
    assert ids.count(tok.convert_tokens_to_ids("[INST]")) == 2 == ids.count(tok.convert_tokens_to_ids("[/INST]"))
    # apply_chat_template itself would put control tokens inside the answers (the defect being fixed)
    raw = _ids(tok.apply_chat_template(_fold_system(SPECIAL_CHAT), tokenize=True))
    assert raw.count(tok.eos_token_id) > 2
    # every content piece is the text encoding of itself; labels cover exactly each answer and its </s>
    assert tok.decode(ids) == tok.apply_chat_template(_fold_system(SPECIAL_CHAT), tokenize=False)
    answers = [m["content"] for m in SPECIAL_CHAT if m["role"] == "assistant"]
    assert tok.decode([l for l in labels if l != -100]) == "".join(" " + a + "</s>" for a in answers)
    eos_at = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert all(labels[i - 1] == tok.eos_token_id for i in eos_at)
    loss_ids = [l for l in labels if l != -100]
    assert [l for l in loss_ids if l in specials] == [tok.eos_token_id] * 2  # only the two real </s>
    # the same tokens as the content encoded alone as text (split_special_tokens): no control id inside
    a1 = _ids(tok(" " + answers[0], add_special_tokens=False, split_special_tokens=True))
    start = [i for i in range(len(ids)) if ids[i:i + len(a1)] == a1]
    assert start and not (set(a1) & specials)
    # eval prompts follow the same rule and are a prefix of the training ids
    prompt = D.encode_prompt(SPECIAL_CHAT, tok)
    assert ids[:len(prompt)] == prompt and [i for i in prompt if i in specials] == [tok.bos_token_id] + [
        tok.convert_tokens_to_ids("[INST]"), tok.convert_tokens_to_ids("[/INST]"), tok.eos_token_id] + [
        tok.convert_tokens_to_ids("[INST]"), tok.convert_tokens_to_ids("[/INST]")]


def test_text_safe_twin_equals_tokenizer_on_plain_rows(tok, corpus):
    """The twin tokenizer (special path) gives exactly the normal ids on rows without special strings: only the
    content's special strings change their encoding, nothing around them."""
    from train.data.chat import _text_safe, format_chat
    safe = _text_safe(tok)
    rows = [json.loads(line)["messages"] for line in open(corpus["train"])][:40] + [TWO_TURN]
    for messages in rows:
        text, _ = format_chat(messages, tok)
        assert safe.encode(safe.final(text))[0] == _ids(tok(text, add_special_tokens=False))


def test_special_rows_in_tokenize_rows_and_chatml(tok, tmp_path):
    import datasets
    rows = datasets.Dataset.from_list([{"messages": TWO_TURN, "teacher": "reference", "family": ""},
                                       {"messages": SPECIAL_CHAT, "teacher": "reference", "family": ""}])
    tds = D.tokenize_rows(rows, tok, max_seq_len=512, num_proc=1, cache_dir=str(tmp_path))
    for k, messages in enumerate((TWO_TURN, SPECIAL_CHAT)):
        assert (tds[k]["input_ids"], tds[k]["labels"]) == D.tokenize_chat(messages, tok)
    # a template whose markers are plain text (ChatML) and content with the tokenizer's specials
    other = type(tok).from_pretrained(tok.name_or_path)
    other.chat_template = CHATML
    msgs = [{"role": "user", "content": "Is </s> special?"}, {"role": "assistant", "content": "Not here: </s>."}]
    ids, labels = D.tokenize_chat(msgs, other)
    assert not (set(ids) & _special_ids(tok))
    assert other.decode([l for l in labels if l != -100]) == "Not here: </s>.<|im_end|>\n"
    with pytest.raises(ValueError, match="private-use"):
        D.tokenize_chat([{"role": "user", "content": "<s>\U00100000"}, {"role": "assistant", "content": "a"}], tok)
