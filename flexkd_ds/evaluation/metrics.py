"""The metrics of the MiniLLM / Flex-KD evaluation protocol: test rows, response NLL, ROUGE-L.

Pipeline::

    load_eval_rows(path) -> [EvalRow]                      # prompt rendered, every reference kept
    generate(model, tokenizer, prompts, ...) -> [str]      # flexkd_ds.evaluation.generation: batched, left-padded
    rouge_l(predictions, references) -> [float]            # rouge-score, best over references, x 100
    nll_batches(rows, tokenizer, ...) + response_nll(model, batches) -> NLLResult

ROUGE-L follows MiniLLM's ``rouge_metric.py`` (taken from Super-NaturalInstructions' evaluation):
``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` with the package's default tokenizer (lower-case,
non-alphanumerics to spaces, Porter stemming), ``score(target=reference, prediction=prediction).fmeasure``,
the maximum over an example's references, times 100; a set's score is the mean over its examples.

The job around them (models, sets, decodings, ranks, the tables) is ``flexkd_ds.jobs.evaluate``.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flexkd_ds.inputs import data

logger = logging.getLogger("flexkd_ds")

ROUGE_TYPE = "rougeL"
ROUGE_USE_STEMMER = True  # MiniLLM / Super-NaturalInstructions: RougeScorer(['rougeL'], use_stemmer=True)


@dataclass(frozen=True)
class EvalRow:
    """One test example."""

    prompt: str  # rendered prompt text (data.render_prompt with the given style)
    references: tuple[str, ...]  # one or more reference responses (MiniLLM ``output`` may be a list)
    source: str  # file name + 1-based row number, for error messages and the predictions file


def eval_rows_from(
    rows: Iterable[data.InstructionRow], *, tokenizer=None, prompt_style: str = "plain"
) -> list[EvalRow]:
    """EvalRows from validated instruction rows (prompt rendered with ``prompt_style``)."""
    return [
        EvalRow(
            data.render_prompt(row, tokenizer, prompt_style),
            row.references,
            f"{Path(row.source).name}:{row.row_number}",
        )
        for row in rows
    ]


def load_eval_rows(path, *, tokenizer=None, prompt_style: str = "plain", max_rows=None) -> list[EvalRow]:
    """Test rows of a MiniLLM-layout file (``prompt`` or ``instruction`` [+ ``input``], and ``output``: a string
    or a list of references). Raises ``data.DataError`` for a missing file (named), a row without ``output``
    (file + row) or an empty file; ``max_rows`` keeps the first rows."""
    loaded = instruction_rows(path, max_rows)
    return eval_rows_from(loaded, tokenizer=tokenizer, prompt_style=prompt_style)


def instruction_rows(path, max_rows, label: str | None = None) -> data.LoadedRows:
    """Validated rows of one test file; errors start with ``label`` (e.g. "--data dolly") when given."""
    path, prefix = Path(path), f"{label}: " if label else ""
    if not path.is_file():
        raise data.DataError(f"{prefix}test file not found: {path} (resolved to {path.resolve()})")
    try:
        return data.load_instruction_rows(path, on_bad_row="error", max_rows=max_rows)
    except data.DataError as err:
        raise data.DataError(f"{prefix}{err}") from None


# ------------------------------------------------------------------------------------------------ NLL


@dataclass(frozen=True)
class NLLResult:
    """Summed response negative log-likelihood (nats) over ``tokens`` response tokens (EOS included)."""

    nll_sum: float
    tokens: int

    @property
    def mean(self) -> float:
        """Nats per response token (nan without tokens)."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        """exp(mean); inf past float range."""
        return math.nan if not self.tokens else math.exp(self.mean) if self.mean < 709.0 else math.inf

    def __add__(self, other: NLLResult) -> NLLResult:
        return NLLResult(self.nll_sum + other.nll_sum, self.tokens + other.tokens)


def response_nll(model, batches: Iterable[Mapping[str, torch.Tensor]]) -> NLLResult:
    """Sum of -log p(label) over the ``loss_mask`` positions of every batch (``data.collate`` layout: labels
    already shifted, so ``logits[:, t]`` scores ``labels[:, t]``).

    Calls ``model(input_ids=, attention_mask=).logits`` in eval mode without gradients; the log-softmax is
    taken in fp32 and the sum accumulated in fp64. A batch with no response token still runs the forward
    (ZeRO-3 ranks must run the same number of forwards) and adds nothing.
    """
    was_training = getattr(model, "training", False)
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits  # (B, T, V)
                mask = batch["loss_mask"].to(device)
                labels = batch["labels"].to(device)[mask]  # (N,)
                picked = logits[mask].float()  # (N, V)
                total += F.cross_entropy(picked, labels, reduction="sum").double().cpu()
                tokens += int(mask.sum())
    finally:
        model.train(was_training)
    return NLLResult(float(total), tokens)


def nll_batches(
    rows: Sequence[EvalRow],
    tokenizer,
    *,
    max_length: int,
    batch_size: int,
    num_batches: int | None = None,
    by_length: bool = False,
) -> Iterator[dict]:
    """Batches of prompt + FIRST reference, encoded by ``data.encode_example`` (BOS as in training, EOS
    appended, labels on the response only) and right-padded by ``data.collate`` (pad = EOS when the tokenizer
    has no pad token). ``num_batches`` pads the stream with placeholder batches (no response token) so every
    ZeRO-3 rank runs the same number of forwards. ``by_length``: batch the rows in order of encoded length
    (stable), so a batch pads little; the summed NLL is the same up to the float rounding of other batch
    shapes (the instruction test sets pad to 1.9x their tokens in file order at 16 rows a batch, 1.03x sorted)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = data.pad_token_id(tokenizer)
    add_bos = data._tokenizer_adds_bos(tokenizer)
    encoded = []
    for row in rows:
        try:
            encoded.append(
                data.encode_example(
                    row.prompt, row.references[0], tokenizer, max_length=max_length, add_bos=add_bos
                )
            )
        except ValueError as err:
            raise ValueError(f"{row.source}: {err}") from err
    if by_length:
        encoded.sort(key=lambda ex: len(ex["input_ids"]))
    count = 0
    for start in range(0, len(encoded), batch_size):
        count += 1
        yield data.collate(encoded[start : start + batch_size], pad_id)
    while num_batches is not None and count < num_batches:
        count += 1
        yield data.collate([None], pad_id)


# ---------------------------------------------------------------------------------------------- ROUGE


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per example: ROUGE-L F-measure x 100, the best over that example's references (MiniLLM's choice:
    ``RougeScorer(["rougeL"], use_stemmer=True)``, default tokenizer)."""
    return [f for _, _, f in rouge_l_parts(predictions, references)]


def rouge_l_parts(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> list[tuple[float, float, float]]:
    """Per example: (precision, recall, F-measure) x 100 of ROUGE-L against the reference with the best F
    (the one ``rouge_l`` scores); precision is LCS / prediction length, recall LCS / reference length."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    scorer = _scorer()
    scores = []
    for k, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"example {k}: references must be a non-empty list of strings, got {refs!r:.60}")
        parts = [scorer.score(target=ref, prediction=prediction)[ROUGE_TYPE] for ref in refs]
        best = max(parts, key=lambda score: score.fmeasure)  # the first of equal F, as max over F did
        scores.append((100.0 * best.precision, 100.0 * best.recall, 100.0 * best.fmeasure))
    return scores


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([ROUGE_TYPE], use_stemmer=ROUGE_USE_STEMMER)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0; 0 for one value) of ``values``."""
    return (statistics.fmean(values), statistics.pstdev(values)) if values else (math.nan, math.nan)
