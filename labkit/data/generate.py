"""Deterministic generator of the small datasets shipped in `data_catalog/`.

- knowledge: facts about a fictional world (invented names), so a model can only know
  them from this data; training questions use one set of phrasings, eval another.
- skills: tasks with checkable answers (arithmetic, sorting, reversing, JSON extraction).
- eval_mc / eval_exact: held-out multiple-choice (knowledge) and exact-answer (skills)
  items; the skills items are drawn so that no eval prompt appears in training.

Run `python -m labkit.data.generate` to rewrite the files; the output is byte-identical
for a given seed, and a test checks the shipped files against it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

SEED = 1234
N_REALMS = 24
SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "tor", "el", "sa", "dru", "ith", "mor", "an", "qu", "zel", "ori", "pha", "bel", "nyx", "ul", "tes"]

# attribute -> (training phrasings, held-out eval phrasing, answer sentence prefix)
ATTRIBUTES: dict[str, tuple[list[str], str, str]] = {
    "capital": (
        ["What is the capital of {realm}?", "Which city is the capital of {realm}?", "Name the capital city of {realm}."],
        "Tell me which city serves as the capital of {realm}.",
        "The capital of {realm} is",
    ),
    "river": (
        ["Which river flows through {realm}?", "What is the main river of {realm}?", "Name the river of {realm}."],
        "What river runs across the land of {realm}?",
        "The river of {realm} is the",
    ),
    "ruler": (
        ["Who rules {realm}?", "Who is the ruler of {realm}?", "Name the monarch of {realm}."],
        "Who currently reigns over {realm}?",
        "The ruler of {realm} is",
    ),
    "export": (
        ["What does {realm} export?", "What is the chief export of {realm}?", "Name the main export of {realm}."],
        "Which good is {realm} best known for selling abroad?",
        "The chief export of {realm} is",
    ),
    "color": (
        ["What color is the flag of {realm}?", "Which color is on the banner of {realm}?", "Name the flag color of {realm}."],
        "The banner of {realm} shows which color?",
        "The flag of {realm} is",
    ),
}
COLORS = ["crimson", "azure", "golden", "emerald", "violet", "silver", "amber", "ivory", "scarlet", "teal", "ochre", "indigo"]
EXPORTS = ["salt", "amber glass", "wool", "copper", "spices", "silk", "timber", "honey", "iron", "pearls", "dyes", "horses", "marble", "tea", "wine", "paper"]
PEOPLE = ["Mira", "Tomas", "Ilsa", "Darek", "Yuna", "Bram", "Sela", "Oren", "Kira", "Lev", "Nadia", "Piet", "Rhea", "Sven", "Tala", "Ugo"]
WORDS = ["lantern", "harbor", "meadow", "quartz", "ember", "willow", "falcon", "canyon", "pebble", "thistle", "orchid", "glacier", "saddle", "beacon", "marrow", "cobalt"]


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def _unique_words(rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        w = _word(rng, rng.randint(*syllables))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def make_world(seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    taken: set[str] = set()
    realms = _unique_words(rng, N_REALMS, (2, 3), taken)
    cities = _unique_words(rng, N_REALMS, (2, 3), taken)
    rivers = _unique_words(rng, N_REALMS, (2, 2), taken)
    rulers = [f"{t} {n}" for t, n in zip(
        [rng.choice(["Queen", "King", "Duke", "Empress"]) for _ in range(N_REALMS)],
        _unique_words(rng, N_REALMS, (2, 2), taken),
    )]
    return [
        {"realm": realms[i], "capital": cities[i], "river": rivers[i], "ruler": rulers[i],
         "export": rng.choice(EXPORTS), "color": rng.choice(COLORS)}
        for i in range(N_REALMS)
    ]


def _chat(user: str, assistant: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def knowledge(world: list[dict[str, str]], rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for fact in world:
        for attr, (train_qs, _, answer) in ATTRIBUTES.items():
            for q in train_qs:
                rows.append(_chat(q.format(**fact), f"{answer.format(**fact)} {fact[attr]}."))
        summary = " ".join(f"{ATTRIBUTES[a][2].format(**fact)} {fact[a]}." for a in ATTRIBUTES)
        rows.append(_chat(f"Tell me about {fact['realm']}.", summary))
    rng.shuffle(rows)
    return rows


def eval_mc(world: list[dict[str, str]], rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for fact in world:
        for attr, (_, eval_q, answer) in ATTRIBUTES.items():
            wrong = sorted({w[attr] for w in world} - {fact[attr]})
            choices = [fact[attr], *rng.sample(wrong, 3)]
            rng.shuffle(choices)
            prefix = answer.format(**fact)
            rows.append(_chat(
                eval_q.format(**fact), f"{prefix} {fact[attr]}.",
                task="knowledge_mc", question=eval_q.format(**fact), answer_prefix=prefix,
                choices=choices, gold=choices.index(fact[attr]), answer=fact[attr],
            ))
    return rows


def _skill(rng: random.Random) -> tuple[str, str, str]:
    """One skills item: (task, prompt, answer)."""
    kind = rng.choice(["add", "sub", "sort", "reverse", "json", "upper"])
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return kind, f"What is {a} + {b}?", str(a + b)
    if kind == "sub":
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        return kind, f"What is {a} - {b}?", str(a - b)
    if kind == "sort":
        xs = rng.sample(range(100), rng.randint(3, 6))
        return kind, f"Sort ascending: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs)))
    if kind == "reverse":
        w = rng.choice(WORDS)
        return kind, f"Reverse the word: {w}", w[::-1]
    if kind == "upper":
        ws = rng.sample(WORDS, 2)
        return kind, f"Write in capitals: {' '.join(ws)}", " ".join(ws).upper()
    name, age, town = rng.choice(PEOPLE), rng.randint(18, 90), rng.choice(WORDS).capitalize()
    text = f"{name} is {age} years old and lives in {town}."
    return kind, f"Extract name, age and town as JSON: {text}", json.dumps({"name": name, "age": age, "town": town})


def skills_and_eval(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    seen: set[str] = set()
    train, held = [], []
    while len(train) < n_train or len(held) < n_eval:
        task, prompt, answer = _skill(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        if len(held) < n_eval and len(held) * n_train <= len(train) * n_eval:
            held.append(_chat(prompt, answer, task="skills_exact", skill=task, question=prompt, answer=answer))
        else:
            train.append(_chat(prompt, answer))
    return train, held


def generate(seed: int = SEED, n_skills: int = 1500, n_skills_eval: int = 120) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    world = make_world(seed)
    skills, exact = skills_and_eval(rng, n_skills, n_skills_eval)
    return {
        "knowledge": knowledge(world, rng),
        "skills": skills,
        "eval_mc": eval_mc(world, rng),
        "eval_exact": exact,
    }


CARDS = {
    "knowledge": ("knowledge", "Question/answer pairs about the fictional realms of the labkit world "
                  "(capitals, rivers, rulers, exports, flag colors). Facts exist nowhere else."),
    "skills": ("skills", "Formatting and reasoning tasks with checkable answers: two-digit addition and "
               "subtraction, sorting numbers, reversing words, capitalising, extracting fields into JSON."),
    "eval_mc": ("eval", "Held-out multiple-choice items on the knowledge facts, asked with phrasings never "
                "used in training; fields question, answer_prefix, choices, gold."),
    "eval_exact": ("eval", "Held-out exact-answer skills items whose prompts never appear in training; "
                   "fields question, answer, skill."),
}


def write(out_dir: Path, seed: int = SEED) -> dict[str, int]:
    """Write data files and their cards under `out_dir` (the catalog dir)."""
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in generate(seed).items():
        path = data_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        kind, desc = CARDS[name]
        card = (
            f"name: {name}\npath: data/{name}.jsonl\nkind: {kind}\nformat: chat-jsonl\n"
            f"license: CC0-1.0\nsamples: {len(rows)}\ngenerator: labkit.data.generate (seed {seed})\n"
            f"description: >-\n  {desc}\n"
        )
        (out_dir / f"{name}.yaml").write_text(card)
        counts[name] = len(rows)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data_catalog"))
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    for name, n in write(args.out, args.seed).items():
        print(f"{name}: {n} samples")


if __name__ == "__main__":
    main()
