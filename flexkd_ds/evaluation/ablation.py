"""Importance ablation and selection stability: do the scored units matter to the teacher?

Ablation (the paper's Table 8 / Figure 1). For each p in a list, zero the top-p%, the bottom-p% and
random p% of the teacher's last hidden units (the LM-head input, DESIGN.md) and measure the response NLL
(nats per response token) on evaluation batches against the unablated teacher. If the function-tangent
scores found the units the output depends on, removing the top units hurts far more than removing the
bottom ones, with random removal in between.

Stability. Score the teacher on several disjoint subsets of the scoring data and report the pairwise overlap
of the top-d_S selections (the paper: 91.5% on XSum, 96.3% on CNN/DM with 640 examples).

Accuracy, for a classification set (rows with an ``options`` list of candidate answers holding the gold
``output``; ``choice_set``): each option is scored by its summed log-probability (EOS included) after the
prompt and the highest wins (ties: the first option). It is reported next to the NLL for every setting.

Percent -> units: ``k = floor(p * d_T / 100 + 1/2)`` (round half up, computed exactly from the decimal
value of p), clamped to [1, d_T - 1] so every ablation removes something and keeps something.

Pure torch and python: nothing here knows about ranks. The job around it is ``flexkd_ds.jobs.ablate``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flexkd_ds.evaluation.metrics import mean_std, response_nll
from flexkd_ds.inputs import data
from flexkd_ds.method import importance

DEFAULT_PERCENTS = (5.0, 10.0, 20.0, 50.0)
KINDS = ("top", "bottom", "random")


# ---- Which units ----------------------------------------------------------------------------------------


def check_percents(percents: Iterable[float]) -> tuple[float, ...]:
    """The percents as floats, each strictly inside (0, 100), no duplicates; ``ValueError`` otherwise."""
    values = []
    for p in percents:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p < 100:
            raise ValueError(f"ablation percent must be a number strictly between 0 and 100; got {p!r}")
        values.append(float(p))
    if not values:
        raise ValueError("no ablation percent given; pass at least one, e.g. 5 10 20 50")
    if len(set(values)) != len(values):
        raise ValueError(f"ablation percents contain duplicates: {values}")
    return tuple(values)


def units_for_percent(percent: float, d_teacher: int) -> int:
    """Units removed at ``percent`` of ``d_teacher``: round half up, clamped to [1, d_T - 1].

    ``Fraction(str(p))`` keeps the decimal value exact (12.5% of 4 units is exactly 0.5 -> 1).
    """
    (percent,) = check_percents([percent])
    if d_teacher < 2:
        raise ValueError(f"d_teacher must be >= 2 to remove some units and keep others; got {d_teacher}")
    exact = Fraction(str(percent)) * d_teacher / 100
    return min(max(math.floor(exact + Fraction(1, 2)), 1), d_teacher - 1)


def ablation_units(scores: Tensor, k: int, kind: str, *, seed: int | None = None) -> Tensor:
    """(k,) int64 unit indices to zero: ``kind`` = top / bottom (by ``scores``, ties -> lower index) / random.

    ``random`` draws a permutation from ``torch.Generator().manual_seed(seed)``: the same seed gives the same
    units on every machine, and for one seed the set at a smaller k is a subset of the set at a larger k.
    """
    importance._check_scores_1d(scores)
    d_teacher = scores.shape[0]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if kind == "top":
        return importance.select_units(scores, k)
    if not 1 <= k <= d_teacher:
        raise ValueError(f"k must be in [1, d_T = {d_teacher}]; got {k}")
    if kind == "bottom":
        return torch.sort(scores.detach(), stable=True).indices[:k].to(torch.int64)
    if seed is None:
        raise ValueError("kind='random' needs a seed (reproducible draws)")
    return torch.randperm(d_teacher, generator=torch.Generator().manual_seed(seed))[:k]


# ---- Hooks on the LM head ----------------------------------------------------------------------------


def _head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head); load it as a causal LM")
    return head


@contextlib.contextmanager
def zeroed_units(model: nn.Module, unit_indices: Tensor | Sequence[int]) -> Iterator[None]:
    """Inside the block, the given columns of the LM-head input ``(..., d_T)`` are exactly 0.

    A forward pre-hook on ``model.get_output_embeddings()`` replaces the head input by a copy with those
    columns filled with zeros (``index_fill``, so even inf/NaN entries become 0). The hook is removed when
    the block exits, also on an exception. Works on a plain model and on a DeepSpeed engine's ``module``.
    """
    head = _head(model)
    index = torch.as_tensor(unit_indices, dtype=torch.int64).flatten()
    if index.numel() and (int(index.min()) < 0 or torch.unique(index).numel() != index.numel()):
        raise ValueError(f"unit_indices must be distinct non-negative ints; got {index.tolist()}")

    def zero_columns(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # (B, T, d_T) or any (..., d_T)
        if index.numel() and int(index.max()) >= hidden.shape[-1]:
            raise ValueError(f"unit index {int(index.max())} is out of range for d_T = {hidden.shape[-1]}")
        return (hidden.index_fill(-1, index.to(hidden.device), 0), *args[1:])

    handle = head.register_forward_pre_hook(zero_columns)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def head_inputs(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the LM-head input of every forward inside the block (a list that grows; hook removed on exit)."""
    captured: list[Tensor] = []
    handle = _head(model).register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


# ---- Ablation -----------------------------------------------------------------------------------------


@dataclass
class Measure:
    """Response NLL (nats/token) of one ablation and its change against the unablated baseline."""

    nll: float
    delta: float  # nll - baseline
    ratio: float  # nll / baseline
    accuracy: float | None = None  # classification sets only (``choices``)


@dataclass
class RandomMeasure:
    """Random removal over several seeded draws: mean and population std (ddof 0, as ``metrics.mean_std``)."""

    nlls: list[float]
    seeds: list[int]
    nll_mean: float
    nll_std: float
    delta_mean: float
    ratio_mean: float
    accuracies: list[float] | None = None  # classification sets only, per draw
    accuracy_mean: float | None = None
    accuracy_std: float | None = None


@dataclass
class AblationRow:
    percent: float
    units: int
    top: Measure
    bottom: Measure
    random: RandomMeasure


@dataclass
class AblationResult:
    """What ``run_ablation`` measured; ``to_dict`` is the JSON layout, ``to_markdown`` the table."""

    d_teacher: int
    baseline_nll: float
    baseline_ppl: float
    tokens: int
    rows: list[AblationRow]
    info: dict = field(default_factory=dict)  # provenance: importance file, eval data, teacher, ...
    baseline_accuracy: float | None = None  # classification sets only
    choice_rows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        def nll(m: Measure) -> str:
            return f"{m.nll:.4f} ({m.delta:+.4f})"

        def acc(m: Measure) -> str:
            return f"{100 * m.accuracy:.1f}"

        def rnd_nll(r: RandomMeasure) -> str:
            return f"{r.nll_mean:.4f} ± {r.nll_std:.4f} ({r.delta_mean:+.4f})"

        def rnd_acc(r: RandomMeasure) -> str:
            return f"{100 * r.accuracy_mean:.1f} ± {100 * r.accuracy_std:.1f}"

        tables = [
            (
                f"Response NLL (nats/token) over {self.tokens} response tokens with the top / bottom / random p% "
                f"of the teacher's d_T = {self.d_teacher} last hidden units zeroed; (change vs the baseline).",
                nll, rnd_nll, f"{self.baseline_nll:.4f}",
            ),
        ]  # fmt: skip
        if self.baseline_accuracy is not None:
            tables.append((
                f"Accuracy (%) over {self.choice_rows} classification rows (best-scoring option), same units zeroed.",
                acc, rnd_acc, f"{100 * self.baseline_accuracy:.1f}",
            ))  # fmt: skip
        header = "| p (%) | units | top | bottom | random (mean ± std) | baseline |\n" + "| ---: " * 6 + "|"
        blocks = [
            "\n".join([title, "", header] + [
                f"| {row.percent:g} | {row.units} | {cell(row.top)} | {cell(row.bottom)} | {random_cell(row.random)} "
                f"| {baseline} |"
                for row in self.rows
            ])
            for title, cell, random_cell, baseline in tables
        ]  # fmt: skip
        return "\n\n".join(blocks) + "\n"


def _response_nll(model: nn.Module, batches: list[dict[str, Tensor]]) -> tuple[float, int]:
    result = response_nll(model, batches)  # the evaluation job's NLL: one definition in the project
    return float(result.mean), int(result.tokens)


def _measure(nll: float, baseline: float, accuracy: float | None = None) -> Measure:
    ratio = nll / baseline if baseline > 0 else math.inf
    return Measure(nll=nll, delta=nll - baseline, ratio=ratio, accuracy=accuracy)


# ---- Classification sets ---------------------------------------------------------------------------------


@dataclass
class ChoiceSet:
    """A classification set as batches: one example per (row, option), the option as the response.

    ``owners[i]`` / ``options[i]``: the row and the option index of the i-th example in batch order;
    ``gold[r]``: the index of row r's correct option.
    """

    batches: list[dict[str, Tensor]]
    owners: list[int]
    options: list[int]
    gold: list[int]


def choice_options(row: data.InstructionRow, shared: Sequence[str] | None = None) -> tuple[list[str], int]:
    """(options, gold index) of a row: its ``options`` column (a list of strings) or ``shared``; the gold
    answer is the row's first reference and must be one of them. Raises ``data.DataError`` naming the row."""
    where = f"{Path(row.source).name}, row {row.row_number}"
    options = row.meta.get("options", shared)
    if options is None:
        raise data.DataError(f"{where}: no 'options' list (a classification set needs one on every row)")
    if not isinstance(options, list | tuple) or not all(isinstance(o, str) and o.strip() for o in options):
        raise data.DataError(f"{where}: 'options' must be a list of non-empty strings, got {options!r:.80}")
    if len(set(options)) < 2 or len(set(options)) != len(options):
        raise data.DataError(
            f"{where}: 'options' needs two or more distinct answers, got {list(options)!r:.80}"
        )
    if row.references[0] not in options:
        raise data.DataError(
            f"{where}: the answer {row.references[0]!r:.40} is not among 'options' {list(options)!r:.80}"
        )
    return list(options), list(options).index(row.references[0])


def choice_set(
    rows: Sequence[data.InstructionRow],
    tokenizer,
    *,
    max_length: int,
    batch_size: int,
    prompt_style: str = "plain",
    shared_options: Sequence[str] | None = None,
) -> ChoiceSet:
    """Encode every (row, option) pair as ``metrics.nll_batches`` encodes (prompt, reference): BOS as in
    training, EOS appended, labels on the option only; ``batch_size`` examples per batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not rows:
        raise data.DataError("the classification set has no rows")
    add_bos = data._tokenizer_adds_bos(tokenizer)
    encoded, owners, indices, gold = [], [], [], []
    for r, row in enumerate(rows):
        options, answer = choice_options(row, shared_options)
        prompt = data.render_prompt(row, tokenizer, prompt_style)
        for j, option in enumerate(options):
            example = data.encode_example(prompt, option, tokenizer, max_length=max_length, add_bos=add_bos)
            if example["truncated"]:
                raise data.DataError(
                    f"{Path(row.source).name}, row {row.row_number}: prompt + option {option!r:.40} do not fit "
                    f"in max_length={max_length}; raise data.max_length"
                )
            encoded.append(example)
            owners.append(r)
            indices.append(j)
        gold.append(answer)
    pad_id = data.pad_token_id(tokenizer)
    batches = [data.collate(encoded[i : i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]
    return ChoiceSet(batches, owners, indices, gold)


def option_logprobs(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> Tensor:
    """(N,) float64: per example, the summed log-probability of its ``loss_mask`` tokens (batch order)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in batches:
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()  # (B, T, V)
            mask = batch["loss_mask"].to(device)
            labels = batch["labels"].to(device).clamp_min(0)
            picked = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]  # (B, T)
            out.append((picked.double() * mask).sum(dim=1).cpu())
    return torch.cat(out)


def choice_accuracy(model: nn.Module, choices: ChoiceSet) -> float:
    """Fraction of rows whose best-scoring option (ties: the first) is the gold one."""
    scores = option_logprobs(model, choices.batches).tolist()
    best: dict[int, tuple[float, int]] = {}
    for owner, option, score in zip(choices.owners, choices.options, scores, strict=True):
        if owner not in best or score > best[owner][0]:
            best[owner] = (score, option)
    return sum(best[r][1] == g for r, g in enumerate(choices.gold)) / len(choices.gold)


def _scores_for(model: nn.Module, found, teacher: str | None) -> Tensor:
    """The (d_T,) scores of ``found`` (ImportanceFile or tensor), checked against ``model``'s head width."""
    if isinstance(found, importance.ImportanceFile):
        if teacher is not None:
            found.check_matches(
                teacher=teacher, d_teacher=int(found.scores.numel()), d_student=int(found.indices.numel())
            )
        scores, where = found.scores, found.path or "(in memory)"
    else:
        scores, where = found, "scores"
    importance._check_scores_1d(scores)
    head = _head(model)
    d_head = getattr(head, "in_features", None) or head.weight.shape[1]
    if scores.shape[0] != d_head:
        raise ValueError(
            f"importance {where} has d_T = {scores.shape[0]} units but the model's LM head takes {d_head}: "
            "it was computed for another teacher; score this teacher first (launch/score.py)"
        )
    return scores.detach().to("cpu", torch.float32)


def run_ablation(
    model: nn.Module,
    found: importance.ImportanceFile | Tensor,
    batches: Sequence[dict[str, Tensor]],
    *,
    percents: Sequence[float] = DEFAULT_PERCENTS,
    random_draws: int = 3,
    seed: int = 0,
    teacher: str | None = None,
    choices: ChoiceSet | None = None,
    progress: bool = True,
) -> AblationResult:
    """Response NLL of ``model`` on ``batches`` with the top / bottom / random p% units zeroed.

    Args:
        model: the teacher (any HF causal LM; eval mode is set here). Batches must be on its device.
        found: an ``ImportanceFile`` or its ``scores`` (d_T,). With ``teacher`` given, a file made for
            another teacher is refused (``ImportanceFile.check_matches``); a d_T that differs from the
            model's head width is always refused.
        batches: batches as made by ``data.collate`` (``metrics.nll_batches``); evaluated once per setting:
            ``1 + len(percents) * (2 + random_draws)`` passes in all.
        random_draws: draws per p; draw j uses seed ``seed + j`` (the same draws for every p).
        choices: a classification set (``choice_set``): its accuracy is measured in every setting too.

    Returns the measurements; ``write_report`` saves them as ``ablation.json`` and ``ablation.md``.
    """
    percents = check_percents(percents)
    if isinstance(random_draws, bool) or not isinstance(random_draws, int) or random_draws < 1:
        raise ValueError(f"random_draws must be an int >= 1; got {random_draws!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("no evaluation batches: the evaluation data has no rows")
    scores = _scores_for(model, found, teacher)
    d_teacher = scores.shape[0]
    model.eval()
    seeds = [seed + j for j in range(random_draws)]
    settings = [(None, "baseline", None)] + [
        (p, kind, s)
        for p in percents
        for kind, s in [("top", None), ("bottom", None)] + [("random", s) for s in seeds]
    ]
    nlls: dict[tuple, float] = {}
    accs: dict[tuple, float | None] = {}
    tokens = 0
    for p, kind, s in tqdm(settings, desc="ablation", unit="setting", disable=not progress):
        units = [] if p is None else ablation_units(scores, units_for_percent(p, d_teacher), kind, seed=s)
        with zeroed_units(model, units):
            nlls[(p, kind, s)], tokens = _response_nll(model, batches)
            accs[(p, kind, s)] = None if choices is None else choice_accuracy(model, choices)
    if tokens == 0:
        raise ValueError("the evaluation batches hold no response token (every label is -100)")
    baseline = nlls[(None, "baseline", None)]
    rows = []
    for p in percents:
        draws = [nlls[(p, "random", s)] for s in seeds]
        mean, std = mean_std(draws)
        draw_accs = None if choices is None else [accs[(p, "random", s)] for s in seeds]
        acc_mean, acc_std = (None, None) if draw_accs is None else mean_std(draw_accs)
        rows.append(
            AblationRow(
                percent=p,
                units=units_for_percent(p, d_teacher),
                top=_measure(nlls[(p, "top", None)], baseline, accs[(p, "top", None)]),
                bottom=_measure(nlls[(p, "bottom", None)], baseline, accs[(p, "bottom", None)]),
                random=RandomMeasure(
                    nlls=draws,
                    seeds=seeds,
                    nll_mean=mean,
                    nll_std=std,
                    delta_mean=mean - baseline,
                    ratio_mean=mean / baseline if baseline > 0 else math.inf,
                    accuracies=draw_accs,
                    accuracy_mean=acc_mean,
                    accuracy_std=acc_std,
                ),
            )
        )
    return AblationResult(
        d_teacher, baseline, math.exp(baseline), tokens, rows,
        baseline_accuracy=accs[(None, "baseline", None)], choice_rows=0 if choices is None else len(choices.gold),
    )  # fmt: skip


# ---- Selection stability ------------------------------------------------------------------------------


def example_tangent_scores(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    functional: str = "sum_logprobs",
    row_mask: Callable[[dict[str, Tensor]], Tensor] | None = None,
    chunk_tokens: int = 4096,
    progress: bool = True,
) -> Tensor:
    """(N, d_T) float32 per-example tangent scores of a plain (single-process) model over ``batches``.

    ``row_mask(batch) -> (B, T) bool`` picks the scored tokens (default: every attended token; the jobs pass
    ``scoring.feature_rows``). ``functional='label_logprob'`` scores response tokens only. Examples without
    a scored token are dropped, as the accumulator of the scoring job does.
    """
    head = _head(model)
    weight = head.weight.detach()
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias.detach()
    model.eval()
    rows_out = []
    with head_inputs(model) as captured, torch.no_grad():
        for batch in tqdm(batches, desc="stability scores", unit="batch", disable=not progress):
            rows = batch["attention_mask"].bool() if row_mask is None else row_mask(batch)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            scores, rows = importance.batch_tangent_scores(
                captured.pop(), weight, batch, rows, functional=functional, head_bias=bias,
                chunk_tokens=chunk_tokens,
            )  # fmt: skip
            rows_out.append(scores[rows.any(dim=1)].to("cpu", torch.float32))
    if not rows_out:
        raise ValueError("no scoring batches were given")
    return torch.cat(rows_out)


@dataclass
class StabilityResult:
    """Pairwise overlap of the top-d_S selections of disjoint subsets of the scoring examples."""

    d_student: int
    subset_sizes: list[int]
    subset_examples: list[list[int]]  # row indices of per_example_scores in each subset
    pairs: list[tuple[int, int]]
    overlaps: list[float]
    mean: float
    min: float
    overlap_with_all: list[float]  # each subset's selection vs the selection from all examples
    seed: int


def selection_stability(
    per_example_scores: Tensor, d_student: int, *, subsets: int = 3, seed: int = 0
) -> StabilityResult:
    """Split the N examples (rows of ``per_example_scores`` (N, d_T)) into ``subsets`` disjoint parts at random
    (``torch.Generator().manual_seed(seed)``; sizes differ by at most one), select the top-d_S units of each
    part's mean score, and report the overlap ``|E_a & E_b| / d_S`` of every pair a < b."""
    if per_example_scores.dim() != 2:
        raise ValueError(f"per_example_scores must be (N, d_T); got shape {tuple(per_example_scores.shape)}")
    num_examples = per_example_scores.shape[0]
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 2:
        raise ValueError(f"subsets must be an int >= 2 (overlap needs two selections); got {subsets!r}")
    if num_examples < subsets:
        raise ValueError(
            f"{num_examples} scored examples cannot fill {subsets} disjoint subsets; "
            "raise importance.num_examples or lower --subsets"
        )
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    parts = list(torch.tensor_split(order, subsets))
    selections = [
        importance.select_units(importance.aggregate_scores(per_example_scores[part]), d_student)
        for part in parts
    ]
    everything = importance.select_units(importance.aggregate_scores(per_example_scores), d_student)
    pairs = list(itertools.combinations(range(subsets), 2))
    overlaps = [importance.selection_overlap(selections[a], selections[b]) for a, b in pairs]
    return StabilityResult(
        d_student=d_student,
        subset_sizes=[int(part.numel()) for part in parts],
        subset_examples=[part.tolist() for part in parts],
        pairs=pairs,
        overlaps=overlaps,
        mean=statistics.fmean(overlaps),
        min=min(overlaps),
        overlap_with_all=[importance.selection_overlap(sel, everything) for sel in selections],
        seed=seed,
    )


def stability_markdown(result: StabilityResult) -> str:
    sizes = ", ".join(map(str, result.subset_sizes))
    pairs = ", ".join(
        f"{a}-{b}: {100 * o:.1f}%" for (a, b), o in zip(result.pairs, result.overlaps, strict=True)
    )
    return (
        f"Selection stability: top-{result.d_student} units of {len(result.subset_sizes)} disjoint subsets "
        f"of the scoring data (sizes {sizes}, split seed {result.seed}).\n\n"
        f"| pairwise overlap mean | min | pairs |\n| ---: | ---: | --- |\n"
        f"| {100 * result.mean:.1f}% | {100 * result.min:.1f}% | {pairs} |\n"
    )


# ---- Report -------------------------------------------------------------------------------------------


def write_report(
    output_dir: str | os.PathLike,
    ablation: AblationResult | None = None,
    stability: StabilityResult | None = None,
) -> tuple[Path, Path]:
    """Write ``ablation.json`` and ``ablation.md`` in ``output_dir`` (atomically); returns their paths."""
    if ablation is None and stability is None:
        raise ValueError("nothing to report: pass an ablation result, a stability result or both")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"ablation": None if ablation is None else ablation.to_dict()}
    payload["stability"] = None if stability is None else asdict(stability)
    parts = ["# Importance ablation\n"]
    if ablation is not None:
        parts.append(ablation.to_markdown())
    if stability is not None:
        parts.append(stability_markdown(stability))
    written = []
    for name, text in (("ablation.json", json.dumps(payload, indent=2)), ("ablation.md", "\n".join(parts))):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
        written.append(out / name)
    return written[0], written[1]
