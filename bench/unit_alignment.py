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

Each student's next-token distribution on the response tokens, through its own head, against the teacher's
(``distribution_measures``: entropy, KL both ways, top-1 agreement): where the dev NLL and sampled ROUGE-L can
rank students differently. Two more sections, from the teacher's own states: ``head_oracles`` (the dev NLL the cut's head reaches on the
teacher's kept units as they are, per-unit rescaled, or compensated for the dropped units by least squares),
and, for the ``--per-unit`` runs, the paired correlation in quarters of the kept units by their weight in the
teacher's logits, and ``residual_structure``: each student unit split into the part its teacher unit explains
(per-unit least squares) and the rest, and what the student's own head makes of each part. ``noise_curve``:
the dev NLL of the teacher's kept units with independent noise added to bring each unit's correlation down
to rho (what a given paired correlation is worth when the error is unstructured). The dev rows are the ones
the weights were chosen on, never a test set: a diagnostic.
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
DISTRIBUTION = ("entropy", "fkl", "rkl", "top1_agree")
PER_UNIT = ("sft-seed1", "rkl-b0.5-seed1", "rkl-b1-seed1", "flexkd-a0.05-seed1")
NOISE_RHOS = (0.4, 0.575, 0.7, 0.9, 0.97, 1.0)


def hidden_states(source: Path, tokenizer, rows, *, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) float64 LM-head inputs of every non-pad token of ``rows`` (bf16 compute, as in training), and
    (N,) the label each token's logits score (-100 where no response token follows: the NLL skips it)."""
    model = models.load_causal_lm(source, dtype=torch.bfloat16)
    model.eval()
    kept, labels = [], []
    with torch.no_grad(), head_inputs(model) as captured:
        for batch in metrics.nll_batches(
            rows, tokenizer, max_length=256, batch_size=batch_size, by_length=True
        ):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tokens = batch["attention_mask"].bool()
            kept.append(captured.pop()[tokens].double())
            labels.append(torch.where(batch["loss_mask"], batch["labels"], -100)[tokens])
    return torch.cat(kept), torch.cat(labels)


def response_nll(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    """Mean -log p(label) of the rows with a label, logits = hidden @ head.T in float32 (chunked)."""
    rows = (labels != -100).nonzero().squeeze(1)
    total = 0.0
    for start in range(0, len(rows), chunk):
        take = rows[start : start + chunk]
        logits = hidden[take].float() @ head.float().T
        total += float(torch.nn.functional.cross_entropy(logits, labels[take], reduction="sum"))
    return total / len(rows)


def distribution_measures(
    student: torch.Tensor,
    student_head: torch.Tensor,
    teacher: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 512,
) -> dict:
    """Next-token distributions on the response tokens (rows with a label), each model through its own head,
    float32 logits in chunks: the student's mean entropy (nats), KL(teacher || student) (``fkl``: what a
    mode-covering student keeps low), KL(student || teacher) (``rkl``: what a mode-seeking one keeps low), how
    often the two most likely tokens agree, and the teacher's own entropy. Sampling at temperature 1 (the
    ROUGE-L protocol) draws from the student's whole distribution, so these say where NLL and ROUGE-L can part."""
    rows = (labels != -100).nonzero().squeeze(1)
    sums = dict.fromkeys((*DISTRIBUTION, "teacher_entropy"), 0.0)
    for start in range(0, len(rows), chunk):
        take = rows[start : start + chunk]
        log_q = torch.log_softmax(student[take].float() @ student_head.float().T, dim=-1)
        log_p = torch.log_softmax(teacher[take].float() @ teacher_head.float().T, dim=-1)
        q, p = log_q.exp(), log_p.exp()
        sums["entropy"] += float(-(q * log_q).sum())
        sums["teacher_entropy"] += float(-(p * log_p).sum())
        sums["fkl"] += float((p * (log_p - log_q)).sum())
        sums["rkl"] += float((q * (log_q - log_p)).sum())
        sums["top1_agree"] += float((log_q.argmax(-1) == log_p.argmax(-1)).sum())
    return {key: value / len(rows) for key, value in sums.items()}


def head_oracles(
    teacher: torch.Tensor,
    labels: torch.Tensor,
    head: torch.Tensor,
    units: torch.Tensor,
    pruned: torch.Tensor | None = None,
) -> dict:
    """What the cut's head (the teacher's head restricted to ``units``) can do with the teacher's own states.

    kept: the teacher's kept units, as they are (a student that met Flex-KD's target exactly, scale 1);
    affine: each kept unit under the per-unit scale and shift closest (least squares) to ``lsq`` (Flex-KD's
    loss is blind to both, so this is also a perfect Flex-KD student); lsq: the input whose logits are closest
    (least squares, per token) to the teacher's: kept units plus what the head can carry of the dropped ones.
    Response NLL of each on the dev rows, and how well ``lsq`` correlates with the kept units. ``pruned``: the
    cut's head as saved (default: ``head[:, units]``)."""
    pruned = head[:, units] if pruned is None else pruned
    lsq_map = torch.linalg.lstsq(pruned, head).solution  # (d_S, d_T): teacher logits ~ pruned @ map @ h
    kept, lsq = teacher[:, units], teacher @ lsq_map.T
    kc, lc = centred(kept), centred(lsq)
    scale = (kc * lc).sum(0) / kc.pow(2).sum(0)
    affine = kc * scale + lsq.mean(0)
    return {
        "nll_teacher": response_nll(teacher, head, labels),
        "nll_kept": response_nll(kept, pruned, labels),
        "nll_affine": response_nll(affine, pruned, labels),
        "nll_lsq": response_nll(lsq, pruned, labels),
        "corr_lsq_kept": float(unit_correlations(lsq, kept).mean()),
        "tokens": int((labels != -100).sum()),
    }


def residual_structure(
    student: torch.Tensor,
    kept: torch.Tensor,
    head: torch.Tensor,
    cut_head: torch.Tensor,
    labels: torch.Tensor,
    permutation: torch.Tensor,
) -> dict:
    """Split each student unit m into ``matched`` = slope_m * (centred teacher unit m) + the unit's mean (the
    per-unit least-squares fit of the student unit on its paired teacher unit ``kept[:, m]``) and ``residual``
    = the rest, and measure what the student's own ``head`` (V, d_S) makes of them.

    Response NLL of: the student (``nll_student``); ``matched`` alone (``nll_matched``); ``matched`` plus the
    residual of other tokens (rows permuted by ``permutation``: same covariance, no information about the
    token; ``nll_matched_noise``); the student with each centred unit shrunk to the matched part's scale, by
    |C_mm| (does ``matched`` win by its content or only by being smaller? ``nll_student_shrunk``); the
    teacher's unit at the student unit's own scale and mean, sign of the slope (a student whose Flex-KD loss
    is 0; ``nll_teacher_scaled``); the student through ``cut_head``, the head it started from
    (``nll_cut_head``). ``residual_share``: the residual's share of the student's centred
    energy (the mean of 1 - C_mm^2, energy-weighted). ``logit_*``: the head's view of the centred energy,
    ||head x||^2 summed over tokens, split as matched + residual + cross term (the three sum to 1); a negative
    cross term means the residual partly cancels the matched part in the logits."""
    s, t = centred(student), centred(kept)
    slope = (s * t).sum(0) / t.pow(2).sum(0)
    mean = student.mean(0)
    matched = t * slope
    residual = s - matched
    scaled = t * (s.norm(dim=0) / t.norm(dim=0)) * torch.where(slope < 0, -1.0, 1.0).to(t.dtype)
    gram = head.T @ head

    def energy(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((x @ gram) * y).sum())

    total = energy(s, s)
    return {
        "nll_student": response_nll(student, head, labels),
        "nll_matched": response_nll(matched + mean, head, labels),
        "nll_matched_noise": response_nll(matched + residual[permutation] + mean, head, labels),
        "nll_student_shrunk": response_nll(s * (matched.norm(dim=0) / s.norm(dim=0)) + mean, head, labels),
        "nll_teacher_scaled": response_nll(scaled + mean, head, labels),
        "nll_cut_head": response_nll(student, cut_head, labels),
        "residual_share": float(residual.pow(2).sum() / s.pow(2).sum()),
        "logit_matched": energy(matched, matched) / total,
        "logit_residual": energy(residual, residual) / total,
        "logit_cross": 2 * energy(matched, residual) / total,
    }


def noise_curve(
    kept: torch.Tensor, cut_head: torch.Tensor, labels: torch.Tensor, rhos, *, seed: int = 0
) -> dict[str, float]:
    """Response NLL through ``cut_head`` of the teacher's kept units with independent Gaussian noise added to
    unit m, of variance var_m (1 / rho^2 - 1) so that its correlation with the clean unit is rho (in
    expectation), then rescaled to the clean unit's mean and standard deviation. Keys: rho as '%.3f'."""
    gen = torch.Generator().manual_seed(seed)
    sd, mean = kept.std(dim=0), kept.mean(dim=0)
    curve = {}
    for rho in rhos:
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        noise = torch.randn(kept.shape, generator=gen, dtype=kept.dtype) * sd * (1 / rho**2 - 1) ** 0.5
        noisy = centred(kept + noise)
        curve[f"{rho:.3f}"] = response_nll(noisy / noisy.std(dim=0) * sd + mean, cut_head, labels)
    return curve


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


def final_dev_nll(records: Path, name: str) -> float | None:
    """The run's last dev NLL from its bench/compare_methods.py record (None for the cut or no record)."""
    path = records / "runs" / f"{name}.json"
    curve = json.loads(path.read_text()).get("dev_curve") if path.is_file() else None
    return curve[-1][1] if curve else None


def markdown(results: dict, oracle: dict, tokens: int, records: Path, structure: dict | None = None) -> str:
    lines = [
        "# Unit alignment on the dev split (diagnostic)",
        "",
        f"`bench/unit_alignment.py`: {tokens:,} tokens of the 100 dev rows; the student's LM-head input against "
        "the teacher's, float64. corr: mean correlation of paired units (Flex-KD's C_mm); shuffled: the same "
        "with the teacher units permuted; flexkd: sum (1 - C_mm)^2; cka: linear CKA to all 576 teacher units; "
        "r2: share of the teacher's centred state a linear map of the student's explains; dev NLL: the run's "
        "final dev NLL (its record).",
        "",
        "| model | runs | " + " | ".join(MEASURES) + " | dev NLL |",
        "| --- | --- | " + " | ".join("---" for _ in MEASURES) + " | --- |",
    ]
    groups: dict[str, list[str]] = {}
    for name in results:
        groups.setdefault(method_of(name), []).append(name)
    for method, names in groups.items():
        cells = []
        for key in MEASURES:
            vals = [results[n][key] for n in names]
            digits = 1 if key == "flexkd" else 3
            spread = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.fmean(vals):.{digits}f}{spread}")
        nlls = [v for v in (final_dev_nll(records, n) for n in names) if v is not None]
        cells.append(f"{statistics.fmean(nlls):.3f}" if nlls else "")
        lines.append(f"| {method} | {len(names)} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sd over training seeds."]
    lines += distribution_markdown(results, groups)
    lines += [
        "",
        "## What the cut's head can do with the teacher's own states",
        "",
        f"Response NLL on the dev rows ({oracle['tokens']:,} tokens) of logits from the teacher's last hidden "
        "state: the teacher's head on all 576 units; the cut's head (the teacher's restricted to the 432 kept "
        "units) on the kept units as they are, on each kept unit under the per-unit scale and shift closest to "
        "lsq (a perfect Flex-KD student: its loss ignores both), and on lsq, the 432-unit input whose logits "
        "are closest (least squares) to the teacher's.",
        "",
        "| input | NLL |",
        "| --- | --- |",
        f"| teacher head, all units | {oracle['nll_teacher']:.3f} |",
        f"| cut head, kept units | {oracle['nll_kept']:.3f} |",
        f"| cut head, kept units, best per-unit affine | {oracle['nll_affine']:.3f} |",
        f"| cut head, least-squares input | {oracle['nll_lsq']:.3f} |",
        "",
        f"Mean correlation of the least-squares input with the kept unit it replaces: {oracle['corr_lsq_kept']:.3f}.",
    ]
    per_unit = oracle.get("per_unit", {})
    runs = [k for k in per_unit if k not in ("groups", "logit_weight_share")]
    if runs:
        lines += [
            "",
            "## Paired-unit correlation by the unit's weight in the teacher's logits",
            "",
            "Kept units in quarters of 108 by weight = |head column|^2 x the teacher unit's variance on these "
            "tokens (largest first); the share of the summed weight each quarter holds; the mean correlation "
            "of the runs' units in it.",
            "",
            "| quarter | weight share | " + " | ".join(runs) + " |",
            "| --- | --- | " + " | ".join("---" for _ in runs) + " |",
        ]
        for i, share in enumerate(per_unit["logit_weight_share"]):
            lines.append(
                f"| {i + 1} | {share:.3f} | " + " | ".join(f"{per_unit[r][i]:.3f}" for r in runs) + " |"
            )
    lines += structure_markdown(structure or {}, results)
    return "\n".join(lines) + "\n"


def distribution_markdown(results: dict, groups: dict[str, list[str]]) -> list[str]:
    """The next-token distribution table, for the models measured since it exists."""
    measured = {m: [n for n in names if "entropy" in results[n]] for m, names in groups.items()}
    measured = {m: names for m, names in measured.items() if names}
    if not measured:
        return []
    teacher_entropy = next(results[names[0]]["teacher_entropy"] for names in measured.values())
    lines = [
        "",
        "## Next-token distributions on the dev responses",
        "",
        "Each model through its own head, on the response tokens: the student's mean entropy (the teacher's: "
        f"{teacher_entropy:.3f} nats), KL(teacher || student) (fkl), KL(student || teacher) (rkl), the share of "
        "tokens whose most likely next token is the teacher's. Mean ± sd over training seeds.",
        "",
        "| model | runs | " + " | ".join(DISTRIBUTION) + " |",
        "| --- | --- | " + " | ".join("---" for _ in DISTRIBUTION) + " |",
    ]
    for method, names in measured.items():
        cells = []
        for key in DISTRIBUTION:
            vals = [results[n][key] for n in names]
            spread = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.fmean(vals):.3f}{spread}")
        lines.append(f"| {method} | {len(names)} | " + " | ".join(cells) + " |")
    return lines


def structure_markdown(structure: dict, results: dict) -> list[str]:
    runs, curve = structure.get("runs", {}), structure.get("noise_curve", {})
    lines = []
    if runs:
        lines += [
            "",
            "## The part of each student unit its teacher unit explains, and the rest",
            "",
            "Each student unit split into matched = its least-squares fit on the paired teacher unit (slope x "
            "centred teacher unit + the student unit's mean) and residual = the rest. Response NLL through the "
            "student's own head of: the student; matched alone; matched + the residual of other tokens "
            "(permuted rows: same covariance, no information about the token); the student with each unit shrunk "
            "to the matched part's scale (by |C_mm|: the control for matched being smaller); the teacher's unit at the "
            "student unit's scale (a Flex-KD loss of 0); and the student through the cut's head. Residual: its "
            "share of the student's centred energy. Logit energy: the head's view of the centred state, "
            "||head x||^2 over the tokens, as matched + residual + cross term (summing to 1).",
            "",
            "| run | corr | residual | NLL student | matched | matched + other tokens' residual | student shrunk "
            "| teacher unit, student scale | student, cut's head | logit energy matched / residual / cross |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in runs.items():
            corr = f"{results[name]['corr']:.3f}" if name in results else ""
            lines.append(
                f"| {name} | {corr} | {r['residual_share']:.3f} | {r['nll_student']:.3f} | "
                f"{r['nll_matched']:.3f} | {r['nll_matched_noise']:.3f} | {r['nll_student_shrunk']:.3f} | "
                f"{r['nll_teacher_scaled']:.3f} | "
                f"{r['nll_cut_head']:.3f} | {r['logit_matched']:.3f} / {r['logit_residual']:.3f} / "
                f"{r['logit_cross']:.3f} |"
            )
    if curve:
        lines += [
            "",
            "## What a paired correlation is worth when the error is unstructured",
            "",
            "The teacher's kept units through the cut's head, with independent Gaussian noise added to each unit "
            "so that it correlates rho with the clean unit, rescaled to the clean unit's mean and scale.",
            "",
            "| rho | " + " | ".join(curve) + " |",
            "| --- | " + " | ".join("---" for _ in curve) + " |",
            "| NLL | " + " | ".join(f"{v:.3f}" for v in curve.values()) + " |",
        ]
    return lines


def cut_units(out: Path, cut: Path) -> list[int]:
    """The teacher unit of each student unit: the cut's own plan (the identity pairing every run of the grid
    trains with), checked against a run's ``unit_pairing.json`` where one is left."""
    units = json.loads((cut / "prune.json").read_text())["plan"]["units"]
    pairing = next((out / "runs").glob("*/unit_pairing.json"), None)
    if pairing is not None and json.loads(pairing.read_text())["units"] != units:
        raise SystemExit(f"{pairing} pairs the units otherwise than the cut's plan ({cut / 'prune.json'})")
    return units


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the compare_methods.py --out dir")
    p.add_argument("--records", type=Path, default=REPO / "docs" / "data" / "compare",
                   help="where unit_alignment.json / .md go (default docs/data/compare)")  # fmt: skip
    p.add_argument("--width", type=int, default=432, help="the cut's width (default 432)")
    p.add_argument("--runs", nargs="*", default=None,
                   help="names under --out/runs (and 'cut'); default: every run with a student")  # fmt: skip
    p.add_argument("--per-unit", nargs="*", default=list(PER_UNIT),
                   help="runs whose per-unit correlations are grouped by the units' weight in the teacher's "
                        "logits and whose units are split into matched and residual parts (default: seed 1 "
                        "of SFT, rkl at beta 0.5 and 1, Flex-KD)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    cut = args.out / f"prune-w{args.width}" / "pruned_student"
    names = args.runs or ["cut"] + sorted(
        d.name for d in (args.out / "runs").iterdir() if (d / "student" / "config.json").is_file()
    )
    records_path = args.records / "unit_alignment.json"
    previous = json.loads(records_path.read_text()) if records_path.is_file() else {}
    old_per_unit = previous.get("head_oracles", {}).get("per_unit", {})
    per_unit_now = per_unit_to_measure(
        args.per_unit, old_per_unit, previous.get("structure", {}).get("runs", {}), args.runs
    )
    wanted = [*names, *per_unit_now]
    missing = [
        n for n in dict.fromkeys(wanted) if n != "cut" and not (args.out / "runs" / n / "student").is_dir()
    ]
    if missing:  # before any measurement: a run stopped half way would leave a record with fewer sections
        raise SystemExit(f"no student under {args.out / 'runs'} for: {', '.join(missing)}")
    units = torch.tensor(cut_units(args.out, cut))
    shuffled = units[torch.randperm(len(units), generator=torch.Generator().manual_seed(0))]

    def source_of(name: str) -> Path:
        return cut if name == "cut" else args.out / "runs" / name / "student"

    tokenizer = models.load_tokenizer(args.out / "teacher")
    rows = metrics.load_eval_rows(args.out / "data" / "dev.jsonl")
    start = time.time()
    teacher, labels = hidden_states(args.out / "teacher", tokenizer, rows, batch_size=args.batch_size)
    print(
        f"teacher: {teacher.shape[0]} tokens x {teacher.shape[1]} units ({time.time() - start:.0f} s)",
        flush=True,
    )
    head = head_weight(args.out / "teacher")
    cut_head = head_weight(cut)
    if not torch.equal(cut_head, head[:, units].to(torch.bfloat16).double()):  # the cut is saved from bf16
        raise SystemExit("the cut's head is not the teacher's restricted to the cut's units (prune.json)")
    oracle = head_oracles(teacher, labels, head, units, cut_head)
    print("head oracles: " + ", ".join(f"{k} {v:.4f}" for k, v in oracle.items()), flush=True)
    if old_per_unit:  # kept by the saves below until this run's per-unit pass replaces it
        oracle["per_unit"] = old_per_unit

    path = records_path
    results = previous.get("results", {})
    states = {}  # hidden states of --per-unit runs measured here, reused by the split below
    for name in names:
        if name in results and args.runs is None:
            continue  # measured before (the runs do not change)
        start = time.time()
        student, student_labels = hidden_states(source_of(name), tokenizer, rows, batch_size=args.batch_size)
        if not torch.equal(student_labels, labels):
            raise SystemExit(f"{name}: its tokens are not the teacher's (another tokenizer?)")
        results[name] = measure(student, teacher, units, shuffled)
        results[name].update(
            distribution_measures(student, head_weight(source_of(name)), teacher, head, labels)
        )
        if name in args.per_unit:
            states[name] = student
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[name].items())
              + f" ({time.time() - start:.0f} s)", flush=True)  # fmt: skip
        save(path, teacher.shape[0], oracle, results, previous.get("structure", {}))

    kept = teacher[:, units]
    structure = {"runs": dict(previous.get("structure", {}).get("runs", {}))}
    old_curve = previous.get("structure", {}).get("noise_curve")
    if old_curve and list(old_curve) == [f"{r:.3f}" for r in NOISE_RHOS]:
        structure["noise_curve"] = old_curve  # depends only on the teacher, the cut and the dev rows
    else:
        structure["noise_curve"] = noise_curve(kept, cut_head, labels, NOISE_RHOS)
    print("noise curve: " + ", ".join(f"rho {k}: {v:.3f}" for k, v in structure["noise_curve"].items()))
    per_unit = {"groups": "quarters of the 432 kept units by logit weight, largest first"}
    weight = head[:, units].pow(2).sum(0) * kept.var(0)  # how far each unit moves the logits
    quarters = torch.argsort(weight, descending=True).chunk(4)
    per_unit["logit_weight_share"] = [float(weight[q].sum() / weight.sum()) for q in quarters]
    per_unit.update(earlier_runs(old_per_unit, args.per_unit))
    permutation = torch.randperm(teacher.shape[0], generator=torch.Generator().manual_seed(0))
    for name in args.per_unit:
        if name not in per_unit_now:
            per_unit[name] = old_per_unit[name]  # measured before
            continue
        student = states.pop(name, None)
        if student is None:
            student, _ = hidden_states(source_of(name), tokenizer, rows, batch_size=args.batch_size)
        corr = unit_correlations(student, kept)
        per_unit[name] = [float(corr[q].mean()) for q in quarters]
        print(f"{name} per quarter: " + ", ".join(f"{v:.3f}" for v in per_unit[name]), flush=True)
        structure["runs"][name] = residual_structure(
            student, kept, head_weight(source_of(name)), cut_head, labels, permutation
        )
        print(f"{name} residual: " + ", ".join(f"{k} {v:.3f}" for k, v in structure["runs"][name].items()))
    oracle["per_unit"] = {k: per_unit[k] for k in dict.fromkeys([*old_per_unit, *per_unit]) if k in per_unit}
    save(path, teacher.shape[0], oracle, results, structure)
    (args.records / "unit_alignment.md").write_text(
        markdown(results, oracle, teacher.shape[0], args.records, structure)
    )
    print(f"wrote {path} and {path.with_suffix('.md')}")


def per_unit_to_measure(
    per_unit: list[str], old_per_unit: dict, old_runs: dict, runs: list[str] | None
) -> list[str]:
    """The ``--per-unit`` runs to measure now: those without both records (per-quarter and residual), and
    those named in ``--runs`` (measured again on request). A run recorded before and not named in ``--runs``
    keeps its record, so ``--runs NEW`` does not need the students of older runs on disk."""
    return [
        n for n in per_unit if n not in old_per_unit or n not in old_runs or (runs is not None and n in runs)
    ]


def earlier_runs(old_per_unit: dict, named: list[str]) -> dict:
    """The per-quarter records of runs measured before and not named now: they stay in the record."""
    return {
        k: v for k, v in old_per_unit.items() if k not in ("groups", "logit_weight_share") and k not in named
    }


def head_weight(source: Path) -> torch.Tensor:
    """The LM head (V, d) of a saved model, float64 (tied to the embedding in SmolLM2)."""
    model = models.load_causal_lm(source, dtype=torch.float32)
    return model.get_output_embeddings().weight.detach().double()


def save(path: Path, tokens: int, oracle: dict, results: dict, structure: dict) -> None:
    record = {"tokens": tokens, "head_oracles": oracle, "results": results, "structure": structure}
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
