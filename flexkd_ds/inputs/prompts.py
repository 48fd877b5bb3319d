"""Open-ended instruction prompts generated from templates (no dataset text), for teacher-written responses.

``builtin:prompts`` is the quickstart's training data: questions, explanations, advice, lists, comparisons,
short creative writing and small classification tasks, built from hand-written templates and fillers in the
spirit of the Dolly categories (open QA, general QA, brainstorming, creative writing, classification). The
rows carry no response: the teacher writes it (``data.responses=teacher``, sequence-level distillation), so
the student learns the teacher's own distribution of fluent answers instead of templated text.

Rows are MiniLLM layout (``instruction``, ``input``, ``prompt``) plus ``task`` (the template family) and an
empty ``output``. Deterministic per seed; distinct prompts (duplicates are skipped while the space allows).

    python -m flexkd_ds.inputs.prompts --num-rows 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random

from flexkd_ds.inputs.data import format_alpaca_prompt

CONCEPTS = [
    "photosynthesis", "gravity", "the water cycle", "volcanoes", "earthquakes", "the moon's phases",
    "rainbows", "electricity", "magnets", "the immune system", "vaccines", "climate change", "recycling",
    "the internet", "solar panels", "wind turbines", "electric cars", "batteries", "compound interest",
    "inflation", "democracy", "the printing press", "the Roman Empire", "the human heart", "sleep",
    "exercise", "meditation", "bread baking", "composting", "honeybees", "coral reefs", "black holes",
    "the seasons", "tides", "clouds", "thunderstorms", "glaciers", "deserts", "rainforests", "fossils",
    "DNA", "antibiotics", "the stock market", "a budget", "public libraries", "museums", "chess",
    "jazz music", "the Olympic Games", "coffee", "tea", "chocolate", "cheese making", "bicycles",
    "airplanes", "trains", "satellites", "telescopes", "microscopes", "3D printing", "email",
    "passwords", "open source software", "spreadsheets", "a healthy breakfast", "drinking water",
]  # fmt: skip
ACTIVITIES = [
    "learning a new language", "running a first marathon", "starting a vegetable garden",
    "planning a birthday party", "moving to a new city", "studying for an exam", "training a puppy",
    "learning to play the guitar", "cooking for a large family", "saving for a holiday",
    "starting a small business", "writing a novel", "keeping a houseplant alive", "making new friends",
    "getting better sleep", "reducing screen time", "learning to swim", "organising a messy room",
    "preparing for a job interview", "teaching a child to read", "going on a long road trip",
    "volunteering in the community", "learning to code", "taking better photos", "eating more vegetables",
]  # fmt: skip
PLACES = [
    "a busy city market", "a quiet mountain village", "a tropical beach", "a snowy forest", "a public library",
    "an old lighthouse", "a train station at night", "a farm in spring", "a desert at sunrise",
    "a small bakery", "a science museum", "a football stadium", "a coral reef", "a rainy harbour town",
]  # fmt: skip
PAIRS = [
    ("a cat", "a dog"), ("tea", "coffee"), ("a lake", "a sea"), ("weather", "climate"), ("a virus", "a bacterium"),
    ("a laptop", "a tablet"), ("renting", "buying a home"), ("running", "swimming"), ("a poem", "a short story"),
    ("the sun", "the moon"), ("a frog", "a toad"), ("butter", "margarine"), ("a city", "a town"),
    ("saving", "investing"), ("a crocodile", "an alligator"), ("speed", "velocity"), ("a meteor", "a comet"),
    ("email", "a letter"), ("a piano", "a guitar"), ("trains", "planes"),
]  # fmt: skip
CHARACTERS = [
    "a curious robot", "a shy dragon", "an old fisherman", "a young inventor", "a lost kitten",
    "a brave mouse", "a grandmother who loves puzzles", "a lighthouse keeper", "a talking tree",
    "a girl who finds a map", "a chef with no sense of taste", "a retired astronaut",
]  # fmt: skip
EVENTS = [
    "finds a secret door", "learns to fly", "loses something important", "makes an unexpected friend",
    "wins a small contest", "gets lost in a storm", "discovers a hidden talent", "fixes a broken clock",
]  # fmt: skip
RECIPIENTS = [
    ("a neighbour", "inviting them to a summer barbecue"), ("a teacher", "thanking them for a great year"),
    ("a manager", "asking for a day off next Friday"), ("a friend", "congratulating them on a new job"),
    ("a landlord", "reporting a leaking tap"), ("a colleague", "suggesting a time for a short meeting"),
    ("a customer", "apologising for a late delivery"), ("a cousin", "asking for a favourite recipe"),
]  # fmt: skip
GROUPS = {
    "a fruit or a vegetable": (["apple", "banana", "mango", "pear", "cherry", "grape"],
                               ["carrot", "spinach", "broccoli", "potato", "onion", "cabbage"]),
    "a mammal or a bird": (["whale", "horse", "bat", "rabbit", "elephant", "otter"],
                           ["eagle", "penguin", "sparrow", "owl", "parrot", "swan"]),
    "a planet or a star": (["Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune"],
                           ["Sirius", "Vega", "Polaris", "Rigel", "Betelgeuse", "Altair"]),
    "a string instrument or a wind instrument": (["violin", "cello", "harp", "guitar", "banjo", "viola"],
                                                 ["flute", "clarinet", "oboe", "trumpet", "bassoon", "tuba"]),
    "a country or a city": (["France", "Kenya", "Peru", "Japan", "Canada", "Norway"],
                            ["Paris", "Nairobi", "Lima", "Tokyo", "Toronto", "Oslo"]),
}  # fmt: skip

TEMPLATES: dict[str, list[str]] = {
    "open_qa": [
        "What is {concept}?", "What should everyone know about {concept}?", "Why does {concept} matter?",
        "Tell me about {concept}.", "What are some interesting facts about {concept}?",
        "Explain {concept} to a ten-year-old.", "Explain {concept} in two or three sentences.",
    ],
    "general_qa": [
        "What is the difference between {a} and {b}?", "Compare {a} and {b}.",
        "Which is better for a beginner, {a} or {b}? Explain why.",
        "What are the pros and cons of {concept}?", "What are common misconceptions about {concept}?",
    ],
    "brainstorming": [
        "Give me some tips for {activity}.", "What should I keep in mind when {activity}?",
        "List five ideas that help with {activity}.", "How do I get started with {activity}?",
        "What are common mistakes people make when {activity}?",
    ],
    "creative_writing": [
        "Write a short story about {character} who {event}.", "Write a short poem about {concept}.",
        "Describe {place} in a few sentences.", "Write a short email to {recipient}, {purpose}.",
        "Write a diary entry from {character} who {event}.",
    ],
    "classification": ["Classify each of the following as {group}: {items}."],
}  # fmt: skip


def _fill(task: str, template: str, rng: random.Random) -> str:
    if task == "classification":
        group = rng.choice(sorted(GROUPS))
        first, second = GROUPS[group]
        items = rng.sample(first, rng.randint(2, 3)) + rng.sample(second, rng.randint(2, 3))
        rng.shuffle(items)
        return template.format(group=group, items=", ".join(items))
    a, b = rng.choice(PAIRS)
    recipient, purpose = rng.choice(RECIPIENTS)
    return template.format(
        concept=rng.choice(CONCEPTS), activity=rng.choice(ACTIVITIES), place=rng.choice(PLACES), a=a, b=b,
        character=rng.choice(CHARACTERS), event=rng.choice(EVENTS), recipient=recipient, purpose=purpose,
    )  # fmt: skip


def generated_prompts(num_rows: int, seed: int = 0) -> list[dict[str, str]]:
    """``num_rows`` distinct instruction rows (no response), deterministic for ``seed``; the first k rows are
    the same for any ``num_rows`` >= k. A template is drawn uniformly (so a family's share is its number of
    templates: one classification template, which small teachers answer worst), then its fillers."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    rng = random.Random(seed)
    templates = [(task, template) for task in sorted(TEMPLATES) for template in TEMPLATES[task]]
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < num_rows:
        task, template = rng.choice(templates)
        instruction = _fill(task, template, rng)
        attempts += 1
        if (
            instruction in seen and attempts < 20 * num_rows
        ):  # the space is large; repeats only when it is not
            continue
        seen.add(instruction)
        prompt = format_alpaca_prompt(instruction)
        rows.append({"instruction": instruction, "input": "", "output": "", "prompt": prompt, "task": task})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print generated instruction prompts (JSON Lines, no response)."
    )
    parser.add_argument("--num-rows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for row in generated_prompts(args.num_rows, args.seed):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
