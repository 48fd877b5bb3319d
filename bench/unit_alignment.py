"""How close is each student's last hidden state to the teacher's, by every feature objective of the comparison
(issue 14's "what you checked"): does the logit loss alone already align the paired units?

    python bench/unit_alignment.py --out runs/compare                   # every trained student of the grid
    python bench/unit_alignment.py --out runs/compare --runs cut rkl-b0.5-seed1

Reads what ``bench/compare_methods.py`` left in ``--out`` (the teacher, the cut, ``runs/<name>/student``, the
dev split) and writes ``--records/unit_alignment.json`` and ``.md``. For each model it runs the 100 dev rows
(prompt + response, the training encoding) and takes the LM-head input of every non-pad token (the rows of
the feature loss, ``loss.feature_tokens: all``), then measures against the teacher's, in float64, over all
those tokens at once (the ``global`` scope over the whole split):

- ``corr``: mean over the d_S student units of the Pearson correlation between student unit m and the
  teacher unit it is paired with (``unit_pairing.json``: the unit it was cut from); ``flexkd`` is the
  Flex-KD loss sum_m (1 - C_mm)^2 on these tokens;
- ``corr_shuffled``: the same with the teacher units permuted (seeded): the level of an unpaired unit;
- ``cka``: linear CKA between the student's d_S units and all d_T teacher units (what CKA + rkl trains);
- ``r2``: the share of the teacher's centred hidden state that the best linear map of the student's
  explains (least squares on these tokens; what projector + rkl trains, its projector being such a map).

The dev rows are the ones the weights were chosen on, never a test set: this is a diagnostic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flexkd_ds.evaluation import metrics  # noqa: E402
from flexkd_ds.evaluation.ablation import head_inputs  # noqa: E402
from flexkd_ds.inputs import models  # noqa: E402

MEASURES = ("corr", "corr_shuffled", "flexkd", "cka", "r2")


def hidden_states(source: Path, tokenizer, rows, *, batch_size: int) -> torch.Tensor:
    """(N, d) float64 LM-head inputs of every non-pad token of ``rows`` (bf16 compute, as in training)."""
    model = models.load_causal_lm(source, dtype=torch.bfloat16)
    model.eval()
    kept = []
    with torch.no_grad(), head_inputs(model) as captured:
        for batch in metrics.nll_batches(
            rows, tokenizer, max_length=256, batch_size=batch_size, by_length=True
        ):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            kept.append(captured.pop()[batch["attention_mask"].bool()].double())
    return torch.cat(kept)


def centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0, keepdim=True)


def unit_correlations(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of column m of ``student`` with column m of ``teacher`` (both (N, d))."""
    s, t = centred(student), centred(teacher)
    return (s * t).sum(0) / (s.norm(dim=0) * t.norm(dim=0))


def linear_cka(student: torch.Tensor, teacher: torch.Tensor) -> float:
    s, t = centred(student), centred(teacher)
    cross = torch.linalg.matrix_norm(s.T @ t) ** 2
    return float(cross / (torch.linalg.matrix_norm(s.T @ s) * torch.linalg.matrix_norm(t.T @ t)))


def linear_r2(student: torch.Tensor, teacher: torch.Tensor) -> float:
    s, t = centred(student), centred(teacher)
    fit = s @ torch.linalg.lstsq(s, t).solution
    return float(1 - (t - fit).pow(2).sum() / t.pow(2).sum())


def measure(
    student: torch.Tensor, teacher: torch.Tensor, units: torch.Tensor, shuffled: torch.Tensor
) -> dict:
    corr = unit_correlations(student, teacher[:, units])
    return {
        "corr": float(corr.mean()),
        "corr_shuffled": float(unit_correlations(student, teacher[:, shuffled]).mean()),
        "flexkd": float((1 - corr).pow(2).sum()),
        "cka": linear_cka(student, teacher),
        "r2": linear_r2(student, teacher),
    }


def method_of(name: str) -> str:
    return name if name in ("cut", "teacher") else name.rsplit("-seed", 1)[0]


def markdown(results: dict, tokens: int) -> str:
    lines = [
        "# Unit alignment on the dev split (diagnostic)",
        "",
        f"`bench/unit_alignment.py`: {tokens:,} tokens of the 100 dev rows; the student's LM-head input against "
        "the teacher's, float64. corr: mean correlation of paired units (Flex-KD's C_mm); shuffled: the same "
        "with the teacher units permuted; flexkd: sum (1 - C_mm)^2; cka: linear CKA to all 576 teacher units; "
        "r2: share of the teacher's centred state a linear map of the student's explains.",
        "",
        "| model | runs | " + " | ".join(MEASURES) + " |",
        "| --- | --- | " + " | ".join("---" for _ in MEASURES) + " |",
    ]
    groups: dict[str, list[dict]] = {}
    for name, values in results.items():
        groups.setdefault(method_of(name), []).append(values)
    for method, runs in groups.items():
        cells = []
        for key in MEASURES:
            vals = [r[key] for r in runs]
            digits = 1 if key == "flexkd" else 3
            spread = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.fmean(vals):.{digits}f}{spread}")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sd over training seeds."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the compare_methods.py --out dir")
    p.add_argument("--records", type=Path, default=REPO / "docs" / "data" / "compare",
                   help="where unit_alignment.json / .md go (default docs/data/compare)")  # fmt: skip
    p.add_argument("--width", type=int, default=432, help="the cut's width (default 432)")
    p.add_argument("--runs", nargs="*", default=None,
                   help="names under --out/runs (and 'cut'); default: every run with a student")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    cut = args.out / f"prune-w{args.width}" / "pruned_student"
    names = args.runs or ["cut"] + sorted(
        d.name for d in (args.out / "runs").iterdir() if (d / "student" / "config.json").is_file()
    )
    missing = [n for n in names if n != "cut" and not (args.out / "runs" / n / "student").is_dir()]
    if missing:
        raise SystemExit(f"no student under {args.out / 'runs'} for: {', '.join(missing)}")
    pairing = next((args.out / "runs").glob("*/unit_pairing.json"), None)
    if pairing is None:
        raise SystemExit(f"no unit_pairing.json under {args.out / 'runs'}: run a feature method first")
    units = torch.tensor(json.loads(pairing.read_text())["units"])
    shuffled = units[torch.randperm(len(units), generator=torch.Generator().manual_seed(0))]

    tokenizer = models.load_tokenizer(args.out / "teacher")
    rows = metrics.load_eval_rows(args.out / "data" / "dev.jsonl")
    start = time.time()
    teacher = hidden_states(args.out / "teacher", tokenizer, rows, batch_size=args.batch_size)
    print(
        f"teacher: {teacher.shape[0]} tokens x {teacher.shape[1]} units ({time.time() - start:.0f} s)",
        flush=True,
    )
    path = args.records / "unit_alignment.json"
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    for name in names:
        if name in results and args.runs is None:
            continue  # measured before (the runs do not change)
        start = time.time()
        source = cut if name == "cut" else args.out / "runs" / name / "student"
        student = hidden_states(source, tokenizer, rows, batch_size=args.batch_size)
        if student.shape[0] != teacher.shape[0]:
            raise SystemExit(f"{name}: {student.shape[0]} tokens against the teacher's {teacher.shape[0]}")
        results[name] = measure(student, teacher, units, shuffled)
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[name].items())
              + f" ({time.time() - start:.0f} s)", flush=True)  # fmt: skip
        path.write_text(json.dumps({"tokens": teacher.shape[0], "results": results}, indent=1) + "\n")
    (args.records / "unit_alignment.md").write_text(markdown(results, teacher.shape[0]))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
