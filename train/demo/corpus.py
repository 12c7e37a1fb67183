"""The demo's own data, made from a seed with no download: an instruction corpus with exactly checkable answers,
and a byte-level BPE tokenizer trained on it.

Public API:
    generate_corpus(seed, out_dir, n_train, n_eval, domain_share=0.2, two_turn_share=0.25, n_pool=0)
        Writes out_dir/train.jsonl, out_dir/eval.jsonl (rows: {"messages", "family", "domain"}) and
        out_dir/catalogue.json (the synthetic product table the domain family asks about); returns their paths
        under keys "train", "eval", "catalogue". Same arguments -> byte-identical files. With n_pool > 0 also
        out_dir/pool.jsonl (key "pool"): n_pool rows of the same families and distribution whose first user
        turns lie on the other side of a fixed split of the prompt space (`prompt_side`) than every train row's,
        so pool and train share no prompt (the demo's students learn from the pool, its teachers from train).
    prompt_side(prompt) -> int: 0 (train side) or 1 (pool side), a hash of the prompt text.
    first_user(row) -> str: a row's first user turn, the prompt that identifies an item.
    shared_prompts(rows_a, rows_b) -> set[str]: the first user turns that occur in both row lists.
    GENERAL_FAMILIES, DOMAIN_FAMILY: the family names (9 general families, one domain family "catalogue").
    train_tokenizer(corpus_paths, out_dir, vocab_size=2000, seed=0) -> str
        Byte-level BPE (`tokenizers`), special tokens <unk>=0 <s>=1 </s>=2 [INST]=3 [/INST]=4, digits split one
        per token, Mistral chat template; an HF tokenizer directory that transformers.AutoTokenizer loads.
        Same inputs -> byte-identical files.
    check_answer(prediction, reference) -> bool: exact match after stripping whitespace.

Answers are short and deterministic (a number, a word, a short list) so an eval is an exact-match count. The
eval split shares no first user turn with the training split (so no eval prompt is ever seen in training);
catalogue facts are all taught in training, but each (product, attribute) is asked in eval with a phrasing
that training never uses for it, so the eval measures recall of domain knowledge, not of strings.
Sizes are for tiny models on 2 CPU cores: user turns are < 40 tokens and answers < 12 tokens with the demo
tokenizer (tests check it).
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

GENERAL_FAMILIES = ("arithmetic", "sorting", "counting", "string_edit", "extraction", "unit_conversion",
                    "word_problem", "list_reasoning", "comparison")
DOMAIN_FAMILY = "catalogue"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")  # ids 0..4, in this order
SYSTEM_PROMPT = "Answer with the result only."

_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock", "lake",
          "milk", "rain", "snow", "door", "book", "cup", "hat", "key", "box", "pen", "car")
_FRUITS = ("apple", "pear", "plum", "fig", "lime", "grape", "peach", "melon")
_ANIMALS = ("cat", "dog", "horse", "mouse", "goat", "sheep", "duck", "frog")
_NAMES = ("Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kim", "Leo", "Mia", "Noor")
_CITIES = ("Lima", "Oslo", "Rome", "Kyiv", "Pune", "Baku", "Doha", "Lyon", "Quito", "Turin")
_ITEMS = ("apples", "books", "coins", "eggs", "pens", "stamps", "shells", "cards")
_UNITS = (  # (from, to, factor): value in `to` = value in `from` * factor
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("liters", "ml", 1000))


def _nums(xs) -> str:
    return ", ".join(str(x) for x in xs)


# Each family returns a list of (user, answer) turns: one turn, or two when two_turn is set.

def _arithmetic(rng: random.Random, two_turn: bool):
    op = rng.choice("+-x")
    if op == "+":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        turns = [(f"What is {a} + {b}?", a + b)]
    elif op == "-":
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        turns = [(f"What is {a} - {b}?", a - b)]
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        turns = [(f"What is {a} times {b}?", a * b)]
    if two_turn:
        c = rng.randint(1, 20)
        total = turns[0][1]
        if rng.random() < 0.5 or total < c:
            turns.append((f"Now add {c}.", total + c))
        else:
            turns.append((f"Now subtract {c}.", total - c))
    return [(q, str(a)) for q, a in turns]


def _sorting(rng, two_turn):
    if rng.random() < 0.6:
        xs = rng.sample(range(10), rng.randint(3, 5))
        desc = rng.random() < 0.4
        out = sorted(xs, reverse=desc)
        turns = [(f"Sort {'descending' if desc else 'ascending'}: {_nums(xs)}", _nums(out))]
        follow = ("Which is the largest?", str(max(xs))) if rng.random() < 0.5 else (
            "Which is the smallest?", str(min(xs)))
    else:
        ws = rng.sample(_FRUITS + _ANIMALS, rng.randint(3, 4))
        turns = [(f"Sort alphabetically: {', '.join(ws)}", ", ".join(sorted(ws)))]
        follow = ("Which comes first?", sorted(ws)[0])
    return turns + [follow] if two_turn else turns


def _counting(rng, two_turn):
    kind = rng.randrange(3)
    if kind == 0:
        ws = [rng.choice(_WORDS) for _ in range(rng.randint(3, 7))]
        more = [rng.choice(_WORDS) for _ in range(rng.randint(2, 6))]
        turns = [(f"How many words are in: {' '.join(ws)}?", len(ws)), (f"And in: {' '.join(more)}?", len(more))]
    elif kind == 1:
        pool = rng.sample(_WORDS, 3)
        ws = [rng.choice(pool) for _ in range(rng.randint(4, 7))]
        w = rng.choice(pool)
        turns = [(f"How many times does {w} appear in: {' '.join(ws)}?", ws.count(w)),
                 ("How many words are there in total?", len(ws))]
    else:
        xs = [rng.randint(0, 9) for _ in range(rng.randint(4, 6))]
        turns = [(f"How many even numbers are in: {_nums(xs)}?", sum(x % 2 == 0 for x in xs)),
                 ("And how many odd numbers?", sum(x % 2 == 1 for x in xs))]
    return [(q, str(a)) for q, a in turns[: 2 if two_turn else 1]]


def _string_edit(rng, two_turn):
    ws = rng.sample(_WORDS, rng.randint(3, 4))
    kind = rng.randrange(4)
    if kind == 0:
        out = ws[::-1]
        q = f"Reverse the order: {', '.join(ws)}"
    elif kind == 1:
        w = rng.choice(ws)
        out = [x for x in ws if x != w]
        q = f"Remove {w} from: {', '.join(ws)}"
    elif kind == 2:
        out = [ws[-1]] + ws[1:-1] + [ws[0]]
        q = f"Swap the first and last: {', '.join(ws)}"
    else:
        w, n = rng.choice(_WORDS), rng.randint(2, 4)
        out = [w] * n
        q = f"Repeat {w} {n} times."
    turns = [(q, ", ".join(out) if kind < 3 else " ".join(out))]
    if two_turn and kind < 3:
        turns.append(("Now drop the first item.", ", ".join(out[1:])))
    elif two_turn:
        turns.append(("Now once more.", " ".join(out + [w])))
    return turns


def _extraction(rng, two_turn):
    record = {"name": rng.choice(_NAMES), "city": rng.choice(_CITIES), "age": rng.randint(18, 90),
              "pet": rng.choice(_ANIMALS)}
    keys = rng.sample(list(record), 3)
    text = "; ".join(f"{k}={record[k]}" for k in keys)
    first, second = rng.sample(keys, 2)
    turns = [(f"Record: {text}. What is the {first}?", str(record[first]))]
    if two_turn:
        turns.append((f"And the {second}?", str(record[second])))
    return turns


def _unit_conversion(rng, two_turn):
    src, dst, factor = rng.choice(_UNITS)
    n = rng.randint(1, 20)
    if rng.random() < 0.5:
        turns = [(f"Convert {n} {src} to {dst}.", str(n * factor))]
        follow_n = rng.randint(1, 20)
        follow = (f"And {follow_n} {src}?", str(follow_n * factor))
    else:
        turns = [(f"Convert {n * factor} {dst} to {src}.", str(n))]
        follow_n = rng.randint(1, 20)
        follow = (f"And {follow_n * factor} {dst}?", str(follow_n))
    return turns + [follow] if two_turn else turns


def _word_problem(rng, two_turn):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(1, 10)
        c = rng.randint(0, a + b)
        q = f"{name} has {a} {item}, gets {b} more and gives away {c}. How many {item} are left?"
        ans = a + b - c
    elif kind == 1:
        a, b = rng.randint(2, 10), rng.randint(2, 9)
        q = f"A box holds {a} {item}. How many {item} are in {b} boxes?"
        ans = a * b
    else:
        b = rng.randint(2, 9)
        a = b * rng.randint(1, 9)
        q = f"{name} shares {a} {item} equally among {b} friends. How many does each get?"
        ans = a // b
    turns = [(q, str(ans))]
    if two_turn:
        d = rng.randint(1, 9)
        turns.append((f"Then {name} finds {d} more. How many now?", str(ans + d)))
    return turns


def _list_reasoning(rng, two_turn):
    kind = rng.randrange(5)
    xs = rng.sample(range(1, 30), rng.randint(3, 5))
    if kind == 0:
        turns = [(f"What is the largest number in: {_nums(xs)}?", str(max(xs)))]
    elif kind == 1:
        turns = [(f"What is the smallest number in: {_nums(xs)}?", str(min(xs)))]
    elif kind == 2:
        xs = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
        turns = [(f"What is the sum of: {_nums(xs)}?", str(sum(xs)))]
    elif kind == 3:
        ws = rng.sample(_WORDS, rng.randint(3, 5))
        i = rng.randrange(len(ws) - 1)
        xs = ws
        turns = [(f"What comes after {ws[i]} in: {', '.join(ws)}?", ws[i + 1])]
    else:
        group, other = (_FRUITS, _ANIMALS) if rng.random() < 0.5 else (_ANIMALS, _FRUITS)
        ws = rng.sample(group, 3) + [rng.choice(other)]
        rng.shuffle(ws)
        odd = next(w for w in ws if w in other)
        label = "fruit" if group is _FRUITS else "animal"
        xs = ws
        turns = [(f"Which one is not a {label}: {', '.join(ws)}?", odd)]
    if two_turn:
        turns.append(("What is the first item of the list?", str(xs[0])))
    return turns


def _comparison(rng, two_turn):
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.sample(range(100), 2)
        big = rng.random() < 0.5
        turns = [(f"Which is {'larger' if big else 'smaller'}, {a} or {b}?", str(max(a, b) if big else min(a, b)))]
        follow = (f"Is {a} greater than {b}? Answer yes or no.", "yes" if a > b else "no")
    elif kind == 1:
        n = rng.randint(0, 999)
        turns = [(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd")]
        follow = (f"And {n + 1}?", "odd" if n % 2 == 0 else "even")
    else:
        a, b = rng.sample(range(100), 2)
        turns = [(f"Is {a} greater than {b}? Answer yes or no.", "yes" if a > b else "no")]
        follow = ("What is their difference?", str(abs(a - b)))
    return turns + [follow] if two_turn else turns


_GENERATORS = dict(zip(GENERAL_FAMILIES, (_arithmetic, _sorting, _counting, _string_edit, _extraction,
                                          _unit_conversion, _word_problem, _list_reasoning, _comparison)))

# ----------------------------------------------------------------------------------------------------------
# The domain: a synthetic product catalogue. Its facts exist nowhere but in this corpus, so only a model that
# was taught them (the domain expert, then the DAE student) can answer.

_ADJECTIVES = ("nova", "zeta", "orbit", "pixel", "terra", "lumen", "vega", "astro", "coral", "delta", "ember",
               "frost", "gala", "halo", "iris", "jade")
_PRODUCTS = {"kettle": "kitchen", "toaster": "kitchen", "blender": "kitchen", "lamp": "lighting",
             "bulb": "lighting", "chair": "furniture", "desk": "furniture", "shelf": "furniture",
             "speaker": "audio", "headset": "audio"}
_COLORS = ("black", "white", "red", "blue", "green", "grey", "yellow")
_PHRASINGS = {
    "price": ("What is the price of the {p}?", "How much does the {p} cost?", "Price of the {p}?",
              "What does the {p} sell for?"),
    "stock": ("How many {p} units are in stock?", "What is the stock of the {p}?", "Stock count for the {p}?",
              "How many {p} units are left?"),
    "color": ("What color is the {p}?", "Which color does the {p} come in?", "Color of the {p}?",
              "Tell me the color of the {p}."),
    "category": ("Which category is the {p} in?", "What category does the {p} belong to?",
                 "Category of the {p}?", "Name the category of the {p}."),
}
_FOLLOW_UPS = {"price": "And its price?", "stock": "And how many are in stock?", "color": "And its color?",
               "category": "And its category?"}
_N_PRODUCTS = 24


def make_catalogue(seed: int) -> list[dict]:
    """The product table: name, category, price, stock, color; plus, per attribute, the phrasing index that
    only the eval split uses for that product."""
    rng = random.Random(f"catalogue-{seed}")
    names = sorted(f"{a} {n}" for a in _ADJECTIVES for n in _PRODUCTS)
    products = []
    for name in sorted(rng.sample(names, _N_PRODUCTS)):
        products.append({
            "name": name, "category": _PRODUCTS[name.split()[1]], "price": rng.randint(5, 99),
            "stock": rng.randint(0, 50), "color": rng.choice(_COLORS),
            "eval_phrasing": {attr: rng.randrange(len(ph)) for attr, ph in _PHRASINGS.items()},
        })
    return products


def _catalogue_item(rng: random.Random, two_turn: bool, catalogue: list, split: str):
    def phrasing(product, attr):
        held_out = product["eval_phrasing"][attr]
        if split == "eval":
            k = held_out
        else:
            k = rng.choice([i for i in range(len(_PHRASINGS[attr])) if i != held_out])
        return _PHRASINGS[attr][k].format(p=product["name"])

    if rng.random() < 0.15:
        a, b = rng.sample(catalogue, 2)
        while a["price"] == b["price"]:
            a, b = rng.sample(catalogue, 2)
        cheap = rng.random() < 0.5
        pick = min((a, b), key=lambda x: x["price"]) if cheap else max((a, b), key=lambda x: x["price"])
        turns = [(f"Which is {'cheaper' if cheap else 'more expensive'}, the {a['name']} or the {b['name']}?",
                  pick["name"])]
        if two_turn:
            turns.append(("And its price?", str(pick["price"])))
        return turns
    product = rng.choice(catalogue)
    attr, other = rng.sample(list(_PHRASINGS), 2)
    turns = [(phrasing(product, attr), str(product[attr]))]
    if two_turn:
        turns.append((_FOLLOW_UPS[other], str(product[other])))
    return turns


# ----------------------------------------------------------------------------------------------------------


def _row(turns, family: str, domain: bool, system: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "family": family, "domain": domain}


def _families_for(n: int, domain_share: float, rng: random.Random) -> list[str]:
    """n family names: round(n * domain_share) domain items, the rest spread evenly over the general families."""
    n_domain = round(n * domain_share)
    general = [GENERAL_FAMILIES[i % len(GENERAL_FAMILIES)] for i in range(n - n_domain)]
    families = general + [DOMAIN_FAMILY] * n_domain
    rng.shuffle(families)
    return families


def write_jsonl(path, rows) -> None:
    """One JSON object per line, UTF-8 kept as is."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prompt_side(prompt: str) -> int:
    """Which half of the prompt space a first user turn belongs to: 0 = train (teachers), 1 = pool (students).
    A hash, so every family and every kind within a family is split about evenly: both sides keep the same
    distribution over families and kinds, with different instances (e.g. of the 121 "a times b" prompts about
    half are the teachers' and the other half the students')."""
    return hashlib.sha256(prompt.encode("utf-8")).digest()[0] & 1


def first_user(row: dict) -> str:
    """The row's first user turn (module doc)."""
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def shared_prompts(rows_a, rows_b) -> set:
    """First user turns present in both lists of rows (the prompt that identifies an item; later turns are
    generic follow-ups such as "And its price?" whose answers depend on the first)."""
    return {first_user(r) for r in rows_a} & {first_user(r) for r in rows_b}


def generate_corpus(seed: int, out_dir, n_train: int, n_eval: int, domain_share: float = 0.2,
                    two_turn_share: float = 0.25, n_pool: int = 0) -> dict:
    """Write train.jsonl, eval.jsonl, catalogue.json (and pool.jsonl when n_pool > 0) under out_dir (module doc);
    returns their paths."""
    if n_train < 1 or n_eval < 0 or n_pool < 0:
        raise ValueError(f"n_train={n_train}, n_eval={n_eval}, n_pool={n_pool}; fix: n_train >= 1, n_eval >= 0 "
                         "and n_pool >= 0")
    if not 0.0 <= domain_share <= 1.0 or not 0.0 <= two_turn_share <= 1.0:
        raise ValueError(f"domain_share={domain_share}, two_turn_share={two_turn_share}; fix: use values in [0, 1]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    catalogue = make_catalogue(seed)

    def make(family, rng, split):
        two_turn = rng.random() < two_turn_share
        system = rng.random() < 0.1
        if family == DOMAIN_FAMILY:
            return _row(_catalogue_item(rng, two_turn, catalogue, split), family, True, system)
        return _row(_GENERATORS[family](rng, two_turn), family, False, system)

    # Eval first (an even share per family, domain included), then train, rejecting any row whose first user
    # turn is an eval prompt. The eval rows' phrasings of catalogue facts are never used in training anyway.
    eval_rng = random.Random(f"eval-{seed}")
    eval_families = [([*GENERAL_FAMILIES, DOMAIN_FAMILY])[i % (len(GENERAL_FAMILIES) + 1)] for i in range(n_eval)]
    eval_rows, seen = [], set()
    for family in eval_families:
        for _ in range(1000):  # distinct eval prompts too, so each eval row counts once
            row = make(family, eval_rng, "eval")
            if first_user(row) not in seen:
                break
        seen.add(first_user(row))
        eval_rows.append(row)

    def draw(n, rng, side):
        """n rows outside the eval split; with side set, only prompts on that side of the split."""
        rows = []
        for family in _families_for(n, domain_share, rng):
            for _ in range(1000):
                row = make(family, rng, "train")
                prompt = first_user(row)
                if prompt not in seen and (side is None or prompt_side(prompt) == side):
                    break
            else:
                raise RuntimeError(f"family {family}: could not draw a prompt outside the eval split"
                                   + ("" if side is None else f" on side {side}"))
            rows.append(row)
        return rows

    # Without a pool the train rows draw from the whole prompt space (the files are as before the pool existed).
    train_rows = draw(n_train, random.Random(f"train-{seed}"), 0 if n_pool else None)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl",
             "catalogue": out_dir / "catalogue.json"}
    if n_pool:
        paths["pool"] = out_dir / "pool.jsonl"
        write_jsonl(paths["pool"], draw(n_pool, random.Random(f"pool-{seed}"), 1))
    write_jsonl(paths["train"], train_rows)
    write_jsonl(paths["eval"], eval_rows)
    table = [{k: v for k, v in p.items() if k != "eval_phrasing"} for p in catalogue]
    paths["catalogue"].write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def check_answer(prediction: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace (answers are short and deterministic)."""
    return prediction.strip() == reference.strip()


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def _texts(corpus_paths):
    """The text between special tokens of every rendered chat, exactly as MISTRAL_CHAT_TEMPLATE lays it out
    (" system\n\nuser " inside [INST] ... [/INST], " answer" before </s>), so the merges learnt are the ones used."""
    for path in corpus_paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                messages = json.loads(line)["messages"]
                system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
                for message in messages:
                    if message["role"] == "user":
                        yield " " + system + message["content"] + " "
                        system = ""
                    elif message["role"] == "assistant":
                        yield " " + message["content"]


def train_tokenizer(corpus_paths, out_dir, vocab_size: int = 2000, seed: int = 0) -> str:
    """Train the demo tokenizer and save it as an HF tokenizer directory (module doc); returns out_dir.

    BPE training in `tokenizers` is deterministic (merges ordered by count, then by pair), so `seed` is unused;
    it is accepted so that every demo artefact is made from the same seed argument. The JSON files are written
    here with fixed key order, so identical inputs give byte-identical files (same `tokenizers` version).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from train.data import MISTRAL_CHAT_TEMPLATE

    if isinstance(corpus_paths, (str, Path)):
        corpus_paths = [corpus_paths]
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}; fix: use at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    tokenizer = Tokenizer(models.BPE())
    # Digits one per token (as Mistral's tokenizer does), a leading space kept with the first digit: numbers
    # then share their digit embeddings, which tiny models need to learn arithmetic at all.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tokenizer.train_from_iterator(_texts(corpus_paths), trainer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(tokenizer.to_str())
    (out / "tokenizer.json").write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    # tokenizer_class PreTrainedTokenizerFast: loadable by transformers 4.x and 5.x (5.x maps it to its
    # TokenizersBackend); the template is stored inline, which both read.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "additional_special_tokens": ["[INST]", "[/INST]"],
        "chat_template": MISTRAL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "additional_special_tokens": ["[INST]", "[/INST]"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1, sort_keys=True) + "\n",
                                                 encoding="utf-8")
    return str(out)
