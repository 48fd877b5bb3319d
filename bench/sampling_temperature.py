"""Does a lower sampling temperature reorder the students? (issue 14's follow-up; dev split only.)

The comparison samples at temperature 1, the paper's protocol. Flex-KD's student is less sharp than the rkl
students (seed 1: mean entropy 2.85 nats on the dev responses against 2.82 and 2.76 for rkl at beta 0.5
and 1, `bench/unit_alignment.py`), so at temperature 1 it samples more of its tail; a reviewer will ask
whether its ROUGE-L deficit is that. This script answers on the 100 dev rows (never a test set): each
run's sampled ROUGE-L at each temperature, and greedy decoding (the limit of temperature 0), with length and
ROUGE-L precision / recall (`bench/generation_shape.py`'s measures).

    python bench/sampling_temperature.py --out runs/compare                       # 3 seed-1 students
    python bench/sampling_temperature.py --out runs/compare --temperatures 1 0.85 0.7 0.5 \\
        --runs rkl-s240-b0.5-seed1 flexkd-s240-a0.05-seed1 flexkd-s240-a0.05-seed2

Each (run, temperature) is one ``launch/evaluate.py`` pass over ``--out/data/dev.jsonl`` with the
comparison's settings (5 sampling seeds 10..50, 128 new tokens, bf16, 64 prompts per call), kept under
``--out/eval-dev/<run>/t<T>`` (``greedy`` for greedy): a stopped sweep resumes where it stopped, and adding a
temperature or a run measures only what is new. Alone on 2 CPU cores a sampled pass should take about 3 min
and a greedy one under 1 (the test-set ROUGE-L passes' rate, 0.38 s per generated row); beside a training
run or another evaluation one sampling seed took 8 min, so run it alone. Writes
``--records/sampling_temperature.json`` and ``.md``.

Paired differences against ``--base`` use the sampling seeds, which the evaluation shares between models
(each row draws with the same seed in every model): their interval is over the 5 sampling seeds, so it
measures sampling noise only, not the training seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import generation_shape  # noqa: E402  (the same measures and F check as the test-set passes)
from compare_methods import t_interval  # noqa: E402

from flexkd_ds.inputs import models  # noqa: E402

SET = "Dev"
DEFAULT_RUNS = ("rkl-s240-b0.5-seed1", "rkl-s240-b1-seed1", "flexkd-s240-a0.05-seed1")


def pass_dir(out: Path, run: str, temperature: float | None) -> Path:
    """Where one pass lives: ``eval-dev/<run>/t0.7`` (sampled) or ``eval-dev/<run>/greedy``."""
    return out / "eval-dev" / run / ("greedy" if temperature is None else f"t{temperature:g}")


def evaluate_command(out: Path, run: str, temperature: float | None, rows: int) -> list[str]:
    """The ``launch/evaluate.py`` call of one pass: the comparison's ROUGE-L settings on the dev rows."""
    decoding = (
        ["--decoding", "greedy"]
        if temperature is None
        else ["--decoding", "sample", f"--temperature={temperature:g}"]
    )
    return [
        sys.executable, str(REPO / "launch" / "evaluate.py"), f"--model={run}={out / 'runs' / run / 'student'}",
        f"--data={SET}={out / 'data' / 'dev.jsonl'}", "--no-progress", "--dtype=bf16", "--batch-size=64",
        "--metrics", "rouge", *decoding, f"--max-rows={rows}", "--max-new-tokens=128",
        f"--out={pass_dir(out, run, temperature)}",
    ]  # fmt: skip


def paired(values: list[float], base: list[float]) -> dict:
    """Mean difference over the shared sampling seeds with a 95 % t interval (n >= 2), and its sign count."""
    diffs = [v - b for v, b in zip(values, base, strict=True)]
    mean, half = t_interval(diffs)
    lo, hi = (None, None) if half != half else (mean - half, mean + half)  # nan below 2 seeds
    return {"mean": mean, "n": len(diffs), "lo": lo, "hi": hi, "up": sum(d > 0 for d in diffs)}


def read_pass(directory: Path, run: str, tokenizer, temperature: float | None, rows: int) -> dict:
    """One pass's ROUGE-L (mean and per seed) and its generations' shape (tokens, P, R, at cap).

    The pass kept on disk must be the one asked for now (a sweep with another ``--rows`` shares the dirs).
    """
    results = json.loads((directory / "results.json").read_text())
    want = {"max_rows": rows, "decoding": "greedy" if temperature is None else "sample"}
    if temperature is not None:
        want["temperature"] = temperature
    got = {k: results["protocol"].get(k) for k in want}
    if got != want:
        raise SystemExit(f"{directory} was evaluated with {got}, not {want}: delete it to measure it again")
    record = next(iter(results["models"][run]["rougeL"][SET].values()))
    ((decoding, by_set),) = generation_shape.measure_run(directory, run, tokenizer).items()
    shape = by_set[SET]
    return {"decoding": decoding, "rougeL": record["mean"], "per_seed": record["per_seed"],
            **{k: shape[k] for k in ("tokens", "at_cap", "precision", "recall")}}  # fmt: skip


def label(temperature: float | None) -> str:
    return "greedy" if temperature is None else f"T={temperature:g}"


def markdown(records: dict, base: str, temperatures: list[float | None], rows: int) -> str:
    lines = [
        "# Sampling temperature on the dev split (`bench/sampling_temperature.py`)",
        "",
        f"The first {rows} dev rows (held out of training, used to choose weights; never a test set). Sampled: mean over "
        "5 sampling seeds. F / P / R: ROUGE-L x 100 against the reference; tokens: mean length; at cap: share "
        "stopped by the 128-token cap.",
        "",
        "| run | " + " | ".join(f"{label(t)}: F (P / R, tokens)" for t in temperatures) + " |",
        "| --- |" + " --- |" * len(temperatures),
    ]
    for run, by_t in records.items():
        cells = []
        for t in temperatures:
            r = by_t.get(label(t))
            cells.append("" if r is None else
                         f"{r['rougeL']:.2f} ({r['precision']:.2f} / {r['recall']:.2f}, {r['tokens']:.0f})")  # fmt: skip
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += ["", f"## Minus {base}, paired by sampling seed (interval: sampling noise only)", "",
              "| run | " + " | ".join(label(t) for t in temperatures) + " |",
              "| --- |" + " --- |" * len(temperatures)]  # fmt: skip
    for run, by_t in records.items():
        if run == base:
            continue
        cells = []
        for t in temperatures:
            mine, theirs = by_t.get(label(t)), records.get(base, {}).get(label(t))
            if mine is None or theirs is None:
                cells.append("")
                continue
            d = paired(mine["per_seed"], theirs["per_seed"])
            cells.append(f"{d['mean']:+.2f}" + ("" if d["lo"] is None else
                         f" [{d['lo']:+.2f}, {d['hi']:+.2f}], {d['up']} / {d['n']} up"))  # fmt: skip
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the compare_methods.py --out dir")
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                   help=f"students under --out/runs (default: {' '.join(DEFAULT_RUNS)})")  # fmt: skip
    p.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.7],
                   help="sampling temperatures, each > 0 (default: 1 0.7); greedy is always added")  # fmt: skip
    p.add_argument("--base", default=None, help="the run the others are paired against (default: the first)")
    p.add_argument("--rows", type=int, default=100, help="dev rows (default: all 100)")
    p.add_argument("--records", type=Path, default=REPO / "docs" / "data" / "compare",
                   help="where sampling_temperature.json / .md go (default docs/data/compare)")  # fmt: skip
    args = p.parse_args(argv)
    if any(t <= 0 for t in args.temperatures):
        p.error(f"--temperatures must be > 0 (greedy is always measured); got {args.temperatures}")
    base = args.base or args.runs[0]
    if base not in args.runs:
        p.error(f"--base {base} is not one of --runs")
    missing = [r for r in args.runs if not (args.out / "runs" / r / "student").is_dir()]
    if missing:
        raise SystemExit(f"no student under {args.out / 'runs'} for: {', '.join(missing)} (train them first)")
    if not (args.out / "data" / "dev.jsonl").is_file():
        raise SystemExit(
            f"no dev split at {args.out / 'data' / 'dev.jsonl'}: run bench/compare_methods.py first"
        )

    temperatures: list[float | None] = [*args.temperatures, None]
    path = args.records / "sampling_temperature.json"
    records = json.loads(path.read_text()) if path.is_file() else {}
    tokenizer = models.load_tokenizer(args.out / "teacher")
    todo = [(r, t) for r in args.runs for t in temperatures]
    for i, (run, t) in enumerate(todo, 1):
        directory = pass_dir(args.out, run, t)
        if not (directory / "results.json").is_file():
            start = time.time()
            print(f"[{i}/{len(todo)}] {run} {label(t)} ...", end=" ", flush=True)
            done = subprocess.run(evaluate_command(args.out, run, t, args.rows), cwd=REPO,
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"launch/evaluate.py failed for {run} {label(t)}:\n{done.stderr[-3000:]}")
            print(f"{time.time() - start:.0f} s", flush=True)
        records.setdefault(run, {})[label(t)] = read_pass(directory, run, tokenizer, t, args.rows)
        path.write_text(json.dumps(records, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown(records, base, temperatures, args.rows))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
