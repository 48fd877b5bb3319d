"""What the students' test-set generations look like (issue 14's "what you checked"): length, how often the
128-token cap stops them, ROUGE-L precision and recall, repetition. A method can lose ROUGE-L F by writing
longer (precision falls), by stopping early (recall falls) or by matching the reference less at the same
length (both fall); the F-measure alone does not say which.

    python bench/generation_shape.py --out runs/compare              # every evaluated run without a record
    python bench/generation_shape.py --out runs/compare --runs flexkd-s240-a0.05-seed1 rkl-s240-b0.5-seed1

Reads the predictions ``launch/evaluate.py`` saved for each run (``--out/eval/<run>/rouge/predictions``) and
writes ``--records/generation_shape.json`` and ``.md``. Per run, decoding (greedy; sampled over its seeds)
and set:

- ``tokens``: mean length of the prediction in the teacher's tokenizer (the decoded text encoded again, so
  within a token or two of what was generated); ``at_cap``: share of predictions within 4 tokens of the
  protocol's ``max_new_tokens`` (stopped by the cap rather than by EOS);
- ``precision``, ``recall``, ``rougeL``: ROUGE-L x 100 against the best reference (``metrics.rouge_l_parts``);
  ``rougeL`` must equal what the evaluation recorded (the script stops if it does not);
- ``repeat4``: share of the prediction's word 4-grams that occur earlier in it (degenerate loops).

The tables average the four sets' means, as the comparison's Table 3 does. Only predictions are read: no model
runs, a run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flexkd_ds.evaluation import metrics  # noqa: E402
from flexkd_ds.inputs import models  # noqa: E402

MEASURES = ("tokens", "at_cap", "precision", "recall", "rougeL", "repeat4")
CAP_SLACK = 4  # re-encoding a decoded text can move its length by a token or two


def repeated_4gram_share(text: str) -> float:
    """Share of the word 4-grams of ``text`` that already occurred earlier in it (0 below 5 words)."""
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def shape_of(rows: list[dict], tokenizer, max_new_tokens: int) -> dict[str, float]:
    """The MEASURES of one prediction file's rows, each a mean over rows."""
    predictions = [row["prediction"] for row in rows]
    parts = metrics.rouge_l_parts(predictions, [row["references"] for row in rows])
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in predictions]
    values = {
        "tokens": lengths,
        "at_cap": [float(n >= max_new_tokens - CAP_SLACK) for n in lengths],
        "precision": [p for p, _, _ in parts],
        "recall": [r for _, r, _ in parts],
        "rougeL": [f for _, _, f in parts],
        "repeat4": [repeated_4gram_share(text) for text in predictions],
    }
    return {k: statistics.fmean(v) for k, v in values.items()}


def measure_run(eval_dir: Path, name: str, tokenizer) -> dict:
    """{decoding: {set: measures}} of one evaluated run; checks the F-measure against the recorded one."""
    results = json.loads((eval_dir / "results.json").read_text())
    max_new_tokens = results["protocol"]["max_new_tokens"]
    recorded = results["models"][name]["rougeL"]
    shapes: dict[str, dict] = {}
    for set_name, by_decoding in recorded.items():
        for decoding, record in by_decoding.items():
            per_seed = []
            for seed in record["seeds"]:
                suffix = "greedy" if seed is None else f"sample.seed{seed}"
                path = eval_dir / "predictions" / name / f"{set_name}.{suffix}.jsonl"
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                per_seed.append(shape_of(rows, tokenizer, max_new_tokens))
            shape = {k: statistics.fmean(s[k] for s in per_seed) for k in MEASURES}
            if abs(shape["rougeL"] - record["mean"]) > 1e-6:
                raise SystemExit(
                    f"{name} {set_name} {decoding}: ROUGE-L from the saved predictions {shape['rougeL']:.6f} "
                    f"!= recorded {record['mean']:.6f}; were the predictions overwritten?"
                )
            shapes.setdefault(decoding, {})[set_name] = shape
    return shapes


def four_set_average(by_set: dict[str, dict]) -> dict[str, float]:
    return {k: statistics.fmean(s[k] for s in by_set.values()) for k in MEASURES}


def markdown(records: dict) -> str:
    lines = [
        "# What the generations look like (`bench/generation_shape.py`)",
        "",
        "Four-set averages of per-set means (Dolly, Self-Inst, Vicuna, S-NI; 100 / 100 / 80 / 100 rows; "
        "sampled: 5 seeds). tokens: mean prediction length; at cap: share stopped by the 128-token cap; P / R / "
        "F: ROUGE-L precision, recall, F-measure (x 100) against the best reference; repeat4: share of word "
        "4-grams seen earlier in the same prediction.",
        "",
    ]
    for decoding in ("sample", "greedy"):
        lines += [
            f"## {decoding}",
            "",
            "| run | tokens | at cap | P | R | F | repeat4 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, shapes in records.items():
            if decoding not in shapes:
                continue
            a = four_set_average(shapes[decoding])
            lines.append(
                f"| {name} | {a['tokens']:.1f} | {a['at_cap']:.3f} | {a['precision']:.2f} | {a['recall']:.2f} "
                f"| {a['rougeL']:.2f} | {a['repeat4']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the compare_methods.py --out dir")
    p.add_argument("--records", type=Path, default=REPO / "docs" / "data" / "compare",
                   help="where generation_shape.json / .md go (default docs/data/compare)")  # fmt: skip
    p.add_argument("--runs", nargs="*", default=None,
                   help="runs to measure (again); default: every evaluated run without a record")  # fmt: skip
    args = p.parse_args(argv)

    def eval_dir(name: str) -> Path:
        return args.out / "eval" / name / "rouge"

    evaluated = sorted(
        d.name for d in (args.out / "eval").iterdir() if (eval_dir(d.name) / "results.json").is_file()
    )
    path = args.records / "generation_shape.json"
    records = json.loads(path.read_text()) if path.is_file() else {}
    names = args.runs if args.runs is not None else [n for n in evaluated if n not in records]
    missing = [n for n in names if not (eval_dir(n) / "results.json").is_file()]
    if missing:
        raise SystemExit(f"no ROUGE-L evaluation under {args.out / 'eval'} for: {', '.join(missing)}")
    tokenizer = models.load_tokenizer(args.out / "teacher")
    for name in names:
        start = time.time()
        records[name] = measure_run(eval_dir(name), name, tokenizer)
        a = four_set_average(records[name]["sample"]) if "sample" in records[name] else None
        summary = (
            ""
            if a is None
            else f": sampled {a['tokens']:.1f} tokens, P {a['precision']:.2f} R {a['recall']:.2f}"
        )
        print(f"{name}{summary} ({time.time() - start:.0f} s)", flush=True)
        records = dict(sorted(records.items()))
        path.write_text(json.dumps(records, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown(records))


if __name__ == "__main__":
    main()
