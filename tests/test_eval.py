"""Evaluation metrics on hand-checkable cases: tiny random models, a tiny byte-level BPE tokenizer."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer, save_hf
from train import eval as ev

ROWS = [
    {"messages": [{"role": "user", "content": "add 2 3"}, {"role": "assistant", "content": "5"}],
     "teacher": "reference", "family": "add"},
    {"messages": [{"role": "user", "content": "add 4 4"}, {"role": "assistant", "content": "8"},
                  {"role": "user", "content": "double it"}, {"role": "assistant", "content": "16"}],
     "teacher": "reference", "family": "add"},
    {"messages": [{"role": "user", "content": "sort b a c"}, {"role": "assistant", "content": "a b c"}],
     "teacher": "reference", "family": "sort"},
    {"messages": [{"role": "user", "content": "price of mug"}, {"role": "assistant", "content": "12 dollars"}],
     "teacher": "domain", "family": "shop"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for r in ROWS for m in r["messages"]] * 5
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _model(vocab, seed=0, std=0.1, dim=32):
    args = ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=dim // 4, hidden_dim=2 * dim,
                     vocab_size=vocab, rope_theta=10000.0, max_position_embeddings=256)
    return Transformer(args).init_weights(std=std, generator=torch.Generator().manual_seed(seed)).eval()


def test_items_follow_training_tokenisation(tokenizer):
    es = ev.build_eval_set(ROWS, tokenizer)
    assert [(it.row, it.turn, it.family, it.domain) for it in es.items] == [
        (0, 0, "add", False), (1, 0, "add", False), (1, 1, "add", False), (2, 0, "sort", False), (3, 0, "shop", True)]
    assert es.families == ["add", "sort", "shop"]           # general sorted, then domain
    inst_end = tokenizer.convert_tokens_to_ids("[/INST]")
    for it in es.items:
        assert it.prompt_ids[-1] == inst_end
        assert it.answer_ids[-1] == es.eos_id
        assert tokenizer.decode(it.answer_ids[:-1]).strip() == it.reference
    # turn 2 is asked after the REFERENCE first answer, rendered exactly as in training
    second = es.items[2]
    assert tokenizer.decode(second.prompt_ids) == "<s>[INST] add 4 4 [/INST] 8</s>[INST] double it [/INST]"
    ids, labels = es.docs[1]
    assert second.prompt_ids + second.answer_ids == ids


def test_reference_answers_score_full_marks(tokenizer):
    es = ev.build_eval_set(ROWS, tokenizer)
    texts = [tokenizer.decode(it.answer_ids[:-1], skip_special_tokens=True) for it in es.items]
    correct = [ev.is_correct(t, it.reference) for t, it in zip(texts, es.items)]
    assert all(correct)
    acc = ev.accuracy(es, correct)
    assert acc == {"family/add": 1.0, "family/sort": 1.0, "family/shop": 1.0, "general": 1.0, "domain": 1.0,
                   "all": 1.0}


def test_accuracy_by_hand(tokenizer):
    es = ev.build_eval_set(ROWS, tokenizer)
    # add: 3 turns, 2 right; sort: wrong; shop (domain): right
    acc = ev.accuracy(es, [True, False, True, False, True])
    assert acc["family/add"] == pytest.approx(2 / 3) and acc["family/sort"] == 0.0 and acc["family/shop"] == 1.0
    assert acc["general"] == pytest.approx((2 / 3 + 0) / 2)   # unweighted over general families
    assert acc["domain"] == 1.0 and acc["all"] == pytest.approx(3 / 5)
    assert ev.is_correct(" a  b c \n", "a b c") and not ev.is_correct("a b", "a b c")


def test_win_rate_by_hand():
    # correct beats wrong whatever the likelihood; ties go to the likelihood; equal likelihood = 1/2
    assert ev.win_rate([True], [False], [-9.0], [-1.0]) == 1.0
    assert ev.win_rate([False], [True], [-1.0], [-9.0]) == 0.0
    assert ev.win_rate([True, False], [True, False], [-1.0, -2.0], [-2.0, -1.0]) == 0.5
    assert ev.win_rate([True, True, False, False], [True, True, False, False], [-1.0, -3.0, -2.0, -2.0],
                       [-2.0, -2.0, -2.0, -5.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    c, ll = [True, False, True], [-0.3, -1.2, -0.7]
    assert ev.win_rate(c, c, ll, ll) == 0.5


def test_model_against_itself(tokenizer):
    m = _model(len(tokenizer))
    es = ev.build_eval_set(ROWS, tokenizer)
    d = ev.distribution_metrics(m, m, es, batch_size=2)
    assert d["kl"] == pytest.approx(0.0, abs=1e-6) and d["top1_agreement"] == 1.0
    assert d["answer_nll"] == pytest.approx(d["teacher_nll"])
    n_answer_tokens = sum(len(it.answer_ids) for it in es.items)
    assert d["answer_tokens"] == n_answer_tokens


def test_kl_against_uniform_student(tokenizer):
    """A student with a zero LM head predicts the uniform distribution: KL(p || u) = log V - H(p), NLL = log V."""
    V = len(tokenizer)
    teacher, student = _model(V, seed=1), _model(V, seed=2)
    with torch.no_grad():
        student.output.weight.zero_()
    es = ev.build_eval_set(ROWS, tokenizer)
    d = ev.distribution_metrics(student, teacher, es, batch_size=3)
    ent, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in es.docs:
            mask = torch.tensor(labels) != -100
            logp = F.log_softmax(teacher.logits(teacher(torch.tensor([ids])))[0][mask], -1)
            ent += -(logp.exp() * logp).sum().item()
            n += int(mask.sum())
    assert d["answer_nll"] == pytest.approx(math.log(V), rel=1e-6)
    assert d["kl"] == pytest.approx(math.log(V) - ent / n, rel=1e-5)


def test_answer_loglik_by_hand(tokenizer):
    m = _model(len(tokenizer), seed=3)
    es = ev.build_eval_set(ROWS, tokenizer)
    prompts = [it.prompt_ids for it in es.items]
    answers = [it.answer_ids[:-1] for it in es.items]
    answers[0] = []                                   # an empty answer: only </s> is scored
    got = ev.answer_loglik(m, prompts, answers, es.eos_id, es.pad_id, batch_size=2)
    for p, a, g in zip(prompts, answers, got):
        seq = torch.tensor([p + a + [es.eos_id]])
        with torch.no_grad():
            logp = F.log_softmax(m.logits(m(seq))[0], -1)
        want = sum(logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(a + [es.eos_id])) / (len(a) + 1)
        assert g == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_memorised_model_answers_everything(tokenizer):
    """A model overfit on the rows (plain CE on the training labels) must score 100 %: the generation prompt and
    the answer comparison line up with how training renders a chat."""
    from train.data import tokenize_chat

    torch.manual_seed(0)
    m = _model(len(tokenizer), seed=4, std=0.02, dim=64).train()
    seqs = [tokenize_chat(r["messages"], tokenizer) for r in ROWS]
    tokens = ev._right_pad([s for s, _ in seqs], 0)
    labels = ev._right_pad([lab for _, lab in seqs], -100)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        loss = F.cross_entropy(m.logits(m(tokens)).flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    es = ev.build_eval_set(ROWS, tokenizer)
    res = ev.evaluate_model(m.eval(), es, tokenizer, teacher=m, batch_size=2)
    assert res.metrics["all"] == 1.0, res.texts
    assert res.metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ev.with_win_rate(res, res) == 0.5


def test_cli(tokenizer, tmp_path, capsys):
    m = _model(len(tokenizer), seed=5)
    save_hf(m, tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    out = tmp_path / "res.json"
    metrics = ev.main(["--model", str(tmp_path / "m"), "--teacher", str(tmp_path / "m"), "--baseline",
                       str(tmp_path / "m"), "--data", str(data), "--out", str(out)])
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["win_rate"] == 0.5
    assert "general" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"]["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match="no tokenizer files"):
        save_hf(m, tmp_path / "bare")
        ev.main(["--model", str(tmp_path / "bare"), "--data", str(data)])
