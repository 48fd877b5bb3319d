"""``launch/evaluate.py --task classification|seq2seq``: the exported classifiers and summarisers of
``task: classification`` / ``task: seq2seq`` runs (or any Hugging Face checkpoint of those classes) scored on
the paper's metrics, one process.

- classification: each ``--data NAME=SOURCE`` is a preset (``glue:sst2|mrpc|stsb|rte|mnli``, ``imdb``: their
  validation / test split as the paper reports), ``builtin:classification`` (64 generated rows) or a file with
  ``text`` [``text_pair``] ``label`` columns (``--field-map`` renames them); the metric is the preset's
  (accuracy; MRPC mean of F1 and accuracy; STS-B mean of Pearson and Spearman) or ``--metric``.
- seq2seq: ``cnn_dailymail``, ``xsum``, ``builtin:seq2seq`` or a file with ``text`` / ``target`` columns;
  greedy summaries of at most ``--max-new-tokens``, ROUGE-2 and ROUGE-L F1 x 100 (stemmer on).

Writes ``OUT/results.json`` (per model and set: every metric component, the reported ``score``, rows) and
``OUT/results.md`` (rows = models, columns = sets + average of the scores).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from flexkd_ds.evaluation.classification_metrics import task_metrics
from flexkd_ds.inputs import classification as cls_data
from flexkd_ds.inputs import models
from flexkd_ds.inputs import seq2seq as s2s_data

logger = logging.getLogger("flexkd_ds")

GENERATED_ROWS = 64
GENERATED_SEED = 1234 + 7919  # the tiny recipes' validation rows (seed 1234)


def task_rows(opts, name: str, spec: str) -> tuple[list[dict], dict]:
    """(rows, what they are: source, split, metric, num_labels) of one ``--data NAME=SOURCE``."""
    field_map = dict(opts.field_map or {})
    if opts.task == "classification":
        if spec == cls_data.BUILTIN_CLASSIFICATION:
            labels = opts.num_labels or 2
            rows = cls_data.generated_rows(opts.max_rows or GENERATED_ROWS, GENERATED_SEED, labels)
            return rows, {
                "source": spec,
                "split": None,
                "metric": _metric(opts, labels),
                "num_labels": labels,
            }
        source = cls_data.resolve_source(
            SimpleNamespace(train=spec, train_split=opts.split or "test", valid=None, valid_split=None,
                            field_map=field_map),
            SimpleNamespace(num_labels=opts.num_labels, metric=opts.metric or "auto"),
        )  # fmt: skip
        preset = cls_data.PRESETS.get(spec)
        split = opts.split or (preset.valid_split if preset else "test")
        rows = cls_data.load_rows(
            source.train, split, source.fields, source.num_labels, max_rows=opts.max_rows
        )
        info = {
            "source": source.train,
            "split": split,
            "metric": source.metric,
            "num_labels": source.num_labels,
        }
        return rows, info
    if spec == s2s_data.BUILTIN_SEQ2SEQ:
        rows = s2s_data.generated_rows(opts.max_rows or GENERATED_ROWS, GENERATED_SEED)
        return rows, {"source": spec, "split": None, "metric": "rouge2_rougeL"}
    source = s2s_data.resolve_source(SimpleNamespace(train=spec, train_split=opts.split or "test", valid=None,
                                                     valid_split=opts.split or "test", field_map=field_map))  # fmt: skip
    preset = s2s_data.PRESETS.get(spec)
    split = opts.split or (preset.valid_split if preset else "test")
    rows = s2s_data.load_rows(source.train, split, source.fields, max_rows=opts.max_rows)
    return rows, {"source": source.train, "split": split, "metric": "rouge2_rougeL"}


def _metric(opts, num_labels: int) -> str:
    if opts.metric:
        return opts.metric
    return "pearson_spearman" if num_labels == 1 else "accuracy"


def run_task_evaluate(opts) -> dict:
    """Every model on every set (the module doc); returns the results dict. Every set is read and checked and
    every source resolved before a model loads."""
    sets = {}
    for name, spec in opts.sets:
        try:
            sets[name] = task_rows(opts, name, spec)
        except (OSError, ValueError) as err:
            raise type(err)(f"--data {name}={spec}: {err}") from err
    if opts.task == "classification":
        counts = {info["num_labels"] for _, info in sets.values()}
        if len(counts) > 1:
            raise ValueError(
                f"the sets have different label counts {sorted(counts)}: evaluate them separately"
            )
    from flexkd_ds.jobs.evaluate import resolve_sources

    sources = resolve_sources(opts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    opts.out.mkdir(parents=True, exist_ok=True)
    results = {"task": opts.task, "models": {},
               "sets": {n: {**info, "n": len(rows)} for n, (rows, info) in sets.items()}}  # fmt: skip
    for name, source in sources.items():
        tokenizer = models.load_tokenizer(
            models.resolve_model_source(opts.tokenizer) if opts.tokenizer else source
        )
        models.ensure_pad_token(tokenizer)
        entry = {}
        if opts.task == "classification":
            num_labels = next(iter(sets.values()))[1]["num_labels"]
            model = _classifier(name, source, num_labels, tokenizer, device)
            for set_name, (rows, info) in sets.items():
                entry[set_name] = classify_rows(model, tokenizer, rows, info, opts, device)
                logger.info("%s on %s: %s", name, set_name, _shown(entry[set_name]))
        else:
            for set_name, (rows, _) in sets.items():
                entry[set_name] = summarise_rows(source, tokenizer, rows, opts, device)
                logger.info("%s on %s: %s", name, set_name, _shown(entry[set_name]))
        results["models"][name] = entry
    (opts.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (opts.out / "results.md").write_text(task_report(results))
    logger.info("wrote %s and %s", opts.out / "results.json", opts.out / "results.md")
    return results


def _shown(scores: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "rows")


def _classifier(name: str, source, num_labels: int, tokenizer, device):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path_or_name)
    trained = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if not trained:
        raise ValueError(
            f"--model {name}: {source.path_or_name} is not a sequence classifier (architectures "
            f"{config.architectures}); give a task=classification run's <output_dir>/student or a fine-tuned "
            "checkpoint"
        )
    if config.num_labels != num_labels:
        raise ValueError(
            f"--model {name} has {config.num_labels} labels but the sets have {num_labels}: use the task's model"
        )
    model = models.load_sequence_classifier(source, num_labels=num_labels, dtype=torch.float32).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def classify_rows(model, tokenizer, rows: list[dict], info: dict, opts, device) -> dict:
    """The metric of ``model`` on ``rows`` (batches of ``opts.batch_size``, ``opts.max_length`` tokens)."""
    regression = info["num_labels"] == 1
    limit = min(opts.max_length, getattr(model.config, "max_position_embeddings", None) or opts.max_length)
    dataset = cls_data.ClassificationDataset(rows, tokenizer, limit)
    predictions = []
    starts = range(0, len(dataset), opts.batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="classify", unit="batch", disable=not opts.progress):
            items = [dataset[i] for i in range(start, min(start + opts.batch_size, len(dataset)))]
            batch = cls_data.collate(items, tokenizer.pad_token_id, regression)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits  # fmt: skip
            predictions += logits.reshape(-1).float().tolist() if regression else logits.argmax(-1).tolist()
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    return {**task_metrics(info["metric"], predictions, labels), "rows": len(rows)}


def summarise_rows(source, tokenizer, rows: list[dict], opts, device) -> dict:
    from transformers import AutoConfig

    from flexkd_ds.jobs.seq2seq import rouge_of_summaries

    config = AutoConfig.from_pretrained(source.path_or_name)
    limit = min(opts.max_length, getattr(config, "max_position_embeddings", None) or opts.max_length)
    scores = rouge_of_summaries(
        Path(source.path_or_name), rows, tokenizer, limit, opts.max_new_tokens, device
    )
    return {**scores, "score": (scores["rouge2"] + scores["rougeL"]) / 2}


def task_report(results: dict) -> str:
    """Markdown: one row per model, one column per set (its reported score) and their average."""
    names = list(results["sets"])
    head = "| model | " + " | ".join(f"{n} ({results['sets'][n]['metric']})" for n in names) + " | average |"
    lines = [f"# {results['task']} evaluation", "", head, "|" + " --- |" * (len(names) + 2)]
    for model, entry in results["models"].items():
        scores = [entry[n]["score"] for n in names]
        cells = [f"{s:.2f}" for s in scores] + [f"{sum(scores) / len(scores):.2f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if results["task"] == "seq2seq":
        lines += ["", "Score = mean of ROUGE-2 and ROUGE-L; results.json holds each."]
    return "\n".join(lines) + "\n"
