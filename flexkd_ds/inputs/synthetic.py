"""Procedurally generated instruction data for the quickstart and tests (no dataset text is copied).

Every row is computed from random numbers and a small hand-written vocabulary, so answers are correct by
construction: arithmetic (plain and word problems), sorting / reversing lists, unit conversion, letter
counting, string transformations and small number facts. Rows use the MiniLLM layout (``instruction``,
``input``, ``output``, ``prompt``) plus ``task`` (the generator's name, like MiniLLM's ``topic``).

    python -m flexkd_ds.inputs.synthetic --num-rows 2000 --seed 0 --out data/synthetic_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flexkd_ds.inputs.data import format_alpaca_prompt

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kira",
    "Leo",
    "Maya",
    "Noor",
]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "books", "coins", "cards"]
WORDS = [
    "river", "garden", "pencil", "window", "planet", "silver", "rocket", "banana", "castle", "forest",
    "mirror", "orange", "puzzle", "candle", "bottle", "ladder", "market", "island", "button", "kitten",
    "summer", "yellow", "breeze", "coffee", "letter", "bridge", "shadow", "anchor", "meadow", "tunnel",
]  # fmt: skip
# (from unit, to unit, factor): value_in_to = value_in_from * factor
CONVERSIONS = [
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("liters", "milliliters", 1000),
]  # fmt: skip
Row = dict[str, str]
Task = Callable[[random.Random], tuple[str, str, str]]  # rng -> (instruction, input, output)


def _join(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice("+-*")
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    instruction = rng.choice(["Calculate the result.", "Compute the value of the expression.", "Evaluate:"])
    return instruction, f"{a} {op} {b}", f"{a} {op} {b} = {result}"


def _word_problem(rng: random.Random) -> tuple[str, str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return q, "", f"{name} has {a} + {b} = {a + b} {item} now."
    if kind == 1:
        a = rng.randint(5, 90)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?"
        return q, "", f"{a} - {b} = {a - b}, so {a - b} {item} are left."
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        return q, "", f"There are {a} * {b} = {a * b} {item} in total."
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    q = f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each friend get?"
    return q, "", f"Each friend gets {a * b} / {a} = {b} {item}."


def _sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    values = rng.sample(range(1, 100), rng.randint(3, 8))
    descending = rng.random() < 0.4
    order = "descending" if descending else "ascending"
    instruction = rng.choice(
        [f"Sort the following numbers in {order} order.", f"Arrange these numbers in {order} order."]
    )
    return instruction, _join(values), _join(sorted(values, reverse=descending))


def _reverse_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    instruction = rng.choice(
        ["Reverse the order of the words in this list.", "List these words in reverse order."]
    )
    return instruction, _join(words), _join(reversed(words))


def _convert_units(rng: random.Random) -> tuple[str, str, str]:
    src, dst, factor = rng.choice(CONVERSIONS)
    value = rng.randint(2, 50)
    instruction = rng.choice([f"Convert {value} {src} to {dst}.", f"How many {dst} are in {value} {src}?"])
    return (
        instruction,
        "",
        f"{value} {src} is {value * factor} {dst}, because 1 {src[:-1]} is {factor} {dst}.",
    )


def _count_letter(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("jqxz")
    n = word.count(letter)
    instruction = f"How many times does the letter '{letter}' appear in the word '{word}'?"
    return instruction, "", f"The letter '{letter}' appears {n} time{'s' * (n != 1)} in '{word}'."


def _transform_string(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    text = " ".join(words)
    kind = rng.randrange(4)
    if kind == 0:
        return "Rewrite the text in uppercase letters.", text, text.upper()
    if kind == 1:
        return "Spell the text backwards, character by character.", text, text[::-1]
    if kind == 2:
        return (
            "Form an acronym from the first letter of each word.",
            text,
            "".join(w[0] for w in words).upper(),
        )
    return (
        "How many characters does the text have, counting spaces?",
        text,
        f"The text has {len(text)} characters.",
    )


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _number_fact(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(4)
    n = rng.randint(2, 500)
    if kind == 0:
        parity = "even" if n % 2 == 0 else "odd"
        return f"Is {n} even or odd?", "", f"{n} is {parity}."
    if kind == 1:
        return (
            f"Is {n} a prime number?",
            "",
            f"{'Yes' if _is_prime(n) else 'No'}, {n} is {'' if _is_prime(n) else 'not '}prime.",
        )
    if kind == 2:
        digits = " + ".join(str(n))
        return f"What is the sum of the digits of {n}?", "", f"{digits} = {sum(map(int, str(n)))}"
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    seq = [start + step * i for i in range(4)]
    return (
        "What number comes next in the sequence?",
        _join(seq),
        f"{start + step * 4} (each number adds {step}).",
    )


TASKS: dict[str, Task] = {
    "arithmetic": _arithmetic,
    "word_problem": _word_problem,
    "sort_numbers": _sort_numbers,
    "reverse_words": _reverse_words,
    "convert_units": _convert_units,
    "count_letter": _count_letter,
    "transform_string": _transform_string,
    "number_fact": _number_fact,
}


def synthetic_instructions(num_rows: int, seed: int = 0) -> list[Row]:
    """Generate ``num_rows`` rows (dicts with instruction, input, output, prompt, task), deterministic for ``seed``.

    Rows are generated one after another from one RNG, so the first k rows are the same for any num_rows >= k.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    rng = random.Random(seed)
    names = list(TASKS)
    rows = []
    for _ in range(num_rows):
        task = rng.choice(names)
        instruction, input_text, output = TASKS[task](rng)
        prompt = format_alpaca_prompt(instruction, input_text)
        rows.append(
            {
                "instruction": instruction,
                "input": input_text,
                "output": output,
                "prompt": prompt,
                "task": task,
            }
        )
    return rows


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON Lines (UTF-8, one object per line), atomically (temp file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write generated instruction data (MiniLLM JSONL layout).")
    parser.add_argument("--num-rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output .jsonl path")
    args = parser.parse_args(argv)
    path = write_jsonl(synthetic_instructions(args.num_rows, args.seed), args.out)
    print(f"wrote {args.num_rows} rows to {path}")


if __name__ == "__main__":
    main()
