"""Build the offline assets shipped in ``lightning_llm/assets``: sample datasets in every format and the tiny tokenizer.

The data is a small synthetic curriculum (sums, capitals, opposites, colours, animal sounds) answered in one fixed
sentence pattern, so a model of a few hundred thousand parameters visibly learns it in minutes on a CPU, and wrong
answers make natural "rejected" completions for the preference formats.

Run from the repository root (deterministic; re-running reproduces the committed files byte for byte)::

    python scripts/make_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "lightning_llm" / "assets"
DATA_DIR = ASSETS / "data"
TOKENIZER_DIR = ASSETS / "tokenizer"
VOCAB_SIZE = 1024
SYSTEM_PROMPT = "You are a helpful assistant. Answer in one short sentence."

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Austria": "Vienna",
    "Ireland": "Dublin", "Cuba": "Havana", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "early": "late", "open": "closed", "full": "empty", "old": "young", "hard": "soft", "high": "low",
    "wet": "dry", "rich": "poor", "strong": "weak", "loud": "quiet", "long": "short", "thick": "thin",
    "near": "far", "clean": "dirty",
}
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "milk": "white", "a carrot": "orange", "a lemon": "yellow", "the sea": "blue",
    "a leaf": "green", "blood": "red", "chocolate": "brown", "a plum": "purple", "ash": "grey",
}
SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
    "lion": "roar", "owl": "hoot", "horse": "neigh", "frog": "ribbit", "mouse": "squeak", "bee": "buzz",
}


def _questions(rng: random.Random) -> list[tuple[str, str, str]]:
    """Every (question, correct answer, wrong answer) of the curriculum, shuffled."""
    items: list[tuple[str, str, str]] = []
    for a in range(10):
        for b in range(10):
            wrong = a + b + rng.choice([-2, -1, 1, 2, 3]) if a + b > 2 else a + b + rng.choice([1, 2, 3])
            items.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."))
    capitals = list(CAPITALS.values())
    for country, capital in CAPITALS.items():
        wrong = rng.choice([c for c in capitals if c != capital])
        items.append(
            (f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
             f"The capital of {country} is {wrong}.")
        )
    words = list(OPPOSITES.values())
    for word, opposite in OPPOSITES.items():
        wrong = rng.choice([w for w in words if w != opposite])
        items.append(
            (f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.",
             f"The opposite of {word} is {wrong}.")
        )
    colours = sorted(set(COLOURS.values()))
    for thing, colour in COLOURS.items():
        wrong = rng.choice([c for c in colours if c != colour])
        subject = thing[0].upper() + thing[1:]
        items.append((f"What colour is {thing}?", f"{subject} is {colour}.", f"{subject} is {wrong}."))
    sounds = list(SOUNDS.values())
    for animal, sound in SOUNDS.items():
        wrong = rng.choice([s for s in sounds if s != sound])
        items.append(
            (f"What sound does a {animal} make?", f"A {animal} says {sound}.", f"A {animal} says {wrong}.")
        )
    rng.shuffle(items)
    return items


def _solutions() -> dict[str, str]:
    """The short gold answer of every question (the ``solution`` column of the prompt-only sample, what an
    exact-answer reward compares a completion's answer with)."""
    solutions = {f"What is {a} plus {b}?": str(a + b) for a in range(10) for b in range(10)}
    solutions.update({f"What is the capital of {country}?": capital for country, capital in CAPITALS.items()})
    solutions.update({f"What is the opposite of {word}?": opposite for word, opposite in OPPOSITES.items()})
    solutions.update({f"What colour is {thing}?": colour for thing, colour in COLOURS.items()})
    solutions.update({f"What sound does a {animal} make?": sound for animal, sound in SOUNDS.items()})
    return solutions


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _write_jsonl(name: str, rows: list[dict]) -> None:
    path = DATA_DIR / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):4d} rows to {path.relative_to(ASSETS.parents[1])}")


def build_datasets(seed: int = 0) -> dict[str, list[dict]]:
    """Every sample dataset, keyed by file name."""
    rng = random.Random(seed)
    items = _questions(rng)
    datasets: dict[str, list[dict]] = {}

    messages = []
    for i, (question, answer, _) in enumerate(items * 3):
        conversation = [_user(question), _assistant(answer)]
        if i % 5 == 0:
            conversation.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        if i % 7 == 0:  # a few two-turn conversations
            q2, a2, _ = items[(i * 13 + 5) % len(items)]
            conversation += [_user(q2), _assistant(a2)]
        messages.append({"messages": conversation})
    rng.shuffle(messages)
    datasets["messages"] = messages

    datasets["sharegpt"] = [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a, _ in items[:60]
    ]
    datasets["text"] = [{"text": f"Question: {q}\nAnswer: {a}"} for q, a, _ in items]
    datasets["prompt_completion"] = [{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"} for q, a, _ in items]
    datasets["prompt_completion_conversational"] = [
        {"prompt": [_user(q)], "completion": [_assistant(a)]} for q, a, _ in items
    ]
    datasets["preference"] = [
        {"prompt": [_user(q)], "chosen": [_assistant(a)], "rejected": [_assistant(w)]} for q, a, w in items
    ]
    datasets["preference_standard"] = [
        {"prompt": f"Question: {q}\nAnswer:", "chosen": f" {a}", "rejected": f" {w}"} for q, a, w in items
    ]
    datasets["preference_implicit"] = [
        {"chosen": [_user(q), _assistant(a)], "rejected": [_user(q), _assistant(w)]} for q, a, w in items
    ]
    unpaired = []
    for i, (q, a, w) in enumerate(items):
        # An imbalanced mix (about 2 desirable : 1 undesirable), as real feedback logs are.
        unpaired.append({"prompt": [_user(q)], "completion": [_assistant(a)], "label": True})
        if i % 2 == 0:
            unpaired.append({"prompt": [_user(q)], "completion": [_assistant(w)], "label": False})
    datasets["unpaired_preference"] = unpaired
    solutions = _solutions()
    datasets["prompt_only"] = [{"prompt": [_user(q)], "solution": solutions[q]} for q, _, _ in items]
    datasets["stepwise"] = _stepwise(rng)
    return datasets


def _stepwise(rng: random.Random, n: int = 160) -> list[dict]:
    """Three-number sums solved step by step; a wrong step and every step after it are labelled False."""
    rows = []
    for _ in range(n):
        a, b, c = (rng.randint(1, 9) for _ in range(3))
        first, second = a + b, a + b + c
        bad_step = rng.choice([None, None, 0, 1])
        if bad_step == 0:
            first += rng.choice([-1, 1, 2])
            second = first + c
        elif bad_step == 1:
            second += rng.choice([-2, -1, 1])
        steps = [f"{a} plus {b} is {first}.", f"{first} plus {c} is {second}.", f"The answer is {second}."]
        labels = [True, True, True] if bad_step is None else [i < bad_step for i in range(3)]
        rows.append({"prompt": f"What is {a} plus {b} plus {c}?", "completions": steps, "labels": labels})
    return rows


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: columns left out of the tokenizer's training corpus (added after the tokenizer was first trained; the answers
#: they hold are in the corpus already, inside the sentences)
NOT_IN_CORPUS = ("solution",)


def _corpus(datasets: dict[str, list[dict]]) -> list[str]:
    texts = []
    for rows in datasets.values():
        for row in rows:
            texts.append(json.dumps({k: v for k, v in row.items() if k not in NOT_IN_CORPUS}, ensure_ascii=False))
    texts += [f"<|im_start|>{role}\n" for role in ("system", "user", "assistant")]
    return texts


def build_tokenizer(datasets: dict[str, list[dict]]) -> None:
    """Train a byte-level BPE tokenizer on the sample data and save it with a ChatML-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightning_llm.data.chat import FALLBACK_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(datasets), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=512,
    )
    fast.chat_template = FALLBACK_CHAT_TEMPLATE  # ChatML with {% generation %} markers
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(TOKENIZER_DIR)
    print(f"wrote tokenizer ({len(fast)} tokens) to {TOKENIZER_DIR.relative_to(ASSETS.parents[1])}")


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    datasets = build_datasets()
    for name, rows in datasets.items():
        _write_jsonl(name, rows)
    build_tokenizer(datasets)


if __name__ == "__main__":
    main()
