"""Sequence-classification data (``task: classification``): the paper's GLUE and IMDB sets, local files, and a
generated task for smoke runs.

A row is a text (and optionally a second text) with a label: an integer class in [0, num_labels), or a float
score for a regression task (num_labels = 1, STS-B). Presets name the hub dataset, its columns, its label
count, its validation split and its metric (the Flex-KD paper, section 4.1 and appendix C):

| ``data.train``  | hub dataset            | text, text_pair          | labels | valid split        | metric |
| --- | --- | --- | --- | --- | --- |
| ``glue:sst2``   | nyu-mll/glue sst2      | sentence                 | 2 | validation         | accuracy |
| ``glue:mrpc``   | nyu-mll/glue mrpc      | sentence1, sentence2     | 2 | validation         | mean of F1 and accuracy |
| ``glue:stsb``   | nyu-mll/glue stsb      | sentence1, sentence2     | 1 (score 0-5) | validation | mean of Pearson and Spearman |
| ``glue:rte``    | nyu-mll/glue rte       | sentence1, sentence2     | 2 | validation         | accuracy |
| ``glue:mnli``   | nyu-mll/glue mnli      | premise, hypothesis      | 3 | validation_matched | accuracy |
| ``imdb``        | stanfordnlp/imdb       | text                     | 2 | test               | accuracy |

Any other ``data.train`` is a local json/jsonl/csv/parquet file (or directory) or a hub dataset
(``name`` or ``name:config``), read with ``data.field_map`` keys ``text``, ``text_pair``, ``label`` (default:
the column names ``text``, ``text_pair``, ``label``) and ``classify.num_labels``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from flexkd_ds.inputs.data import DataError, labelled_records, text_field

BUILTIN_CLASSIFICATION = "builtin:classification"
CLASSIFICATION_FIELDS = ("text", "text_pair", "label")
METRICS = ("accuracy", "f1_accuracy", "pearson_spearman")


@dataclass(frozen=True)
class Preset:
    hub: str
    fields: dict
    num_labels: int
    valid_split: str
    metric: str


PRESETS = {
    "glue:sst2": Preset("nyu-mll/glue:sst2", {"text": "sentence"}, 2, "validation", "accuracy"),
    "glue:mrpc": Preset("nyu-mll/glue:mrpc", {"text": "sentence1", "text_pair": "sentence2"}, 2, "validation",
                        "f1_accuracy"),
    "glue:stsb": Preset("nyu-mll/glue:stsb", {"text": "sentence1", "text_pair": "sentence2"}, 1, "validation",
                        "pearson_spearman"),
    "glue:rte": Preset("nyu-mll/glue:rte", {"text": "sentence1", "text_pair": "sentence2"}, 2, "validation",
                       "accuracy"),
    "glue:mnli": Preset("nyu-mll/glue:mnli", {"text": "premise", "text_pair": "hypothesis"}, 3,
                        "validation_matched", "accuracy"),
    "imdb": Preset("stanfordnlp/imdb", {"text": "text"}, 2, "test", "accuracy"),
}  # fmt: skip


@dataclass(frozen=True)
class ClassificationSource:
    """Where the rows come from and how to read them (after presets)."""

    train: str
    train_split: str
    valid: str | None
    valid_split: str
    fields: dict
    num_labels: int
    metric: str


def resolve_source(data_cfg, classify_cfg) -> ClassificationSource:
    """``data.*`` + ``classify.*`` with a preset filled in (explicit settings win over the preset's)."""
    preset = PRESETS.get(data_cfg.train)
    fields = {name: name for name in CLASSIFICATION_FIELDS}
    fields["text_pair"] = None
    num_labels, metric, train, valid_split = (
        classify_cfg.num_labels,
        classify_cfg.metric,
        data_cfg.train,
        None,
    )
    if preset is not None:
        fields.update(preset.fields)
        train, valid_split = preset.hub, preset.valid_split
        num_labels = num_labels or preset.num_labels
        metric = preset.metric if metric == "auto" else metric
    if data_cfg.train == BUILTIN_CLASSIFICATION:
        num_labels = num_labels or 2
    fields.update(data_cfg.field_map or {})
    if not num_labels:
        raise DataError(
            f"data.train={data_cfg.train}: set classify.num_labels (the number of classes; 1 for a regression "
            f"score); presets know theirs: {sorted(PRESETS)}"
        )
    if metric == "auto":
        metric = "pearson_spearman" if num_labels == 1 else "accuracy"
    valid = data_cfg.valid
    if valid == "validation" and preset is not None:  # the preset's validation split of the same dataset
        valid = preset.hub
    return ClassificationSource(train, data_cfg.train_split, valid, valid_split or data_cfg.valid_split, fields,
                                num_labels, metric)  # fmt: skip


def _label(value: Any, num_labels: int, where: str) -> float | int:
    if num_labels == 1:
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {value!r} is not a number (a regression score)") from None
        if not math.isfinite(score):
            raise DataError(f"{where}: label {value!r} is not finite")
        return score
    try:
        as_float = float(value)
        label = int(as_float)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not a class index in [0, {num_labels})") from None
    if label != as_float or not 0 <= label < num_labels:
        raise DataError(
            f"{where}: label {value!r} is outside the classes [0, {num_labels}) (classify.num_labels={num_labels})"
        )
    return label


def load_rows(name: str, split: str, fields: dict, num_labels: int, *, max_rows: int | None = None,
              seed: int = 0, num_generated: int = 256) -> list[dict]:  # fmt: skip
    """Rows ``{"text", "text_pair" (or None), "label"}`` of a file, directory, hub dataset or the generated
    task. Raises ``DataError`` naming the source, row and column for a missing column, an empty text or a
    label outside the classes, before anything is trained."""
    if name == BUILTIN_CLASSIFICATION:
        return generated_rows(num_generated, seed, num_labels)
    pair_column = fields.get("text_pair")
    needed = [fields["text"], fields["label"], *([pair_column] if pair_column else [])]
    rows = []
    hint = "data.field_map {text: ..., text_pair: ..., label: ...}"
    for where, record in labelled_records(name, split, needed, hint, max_rows):
        if fields["label"] not in record:
            raise DataError(f"{where}: no column {fields['label']!r}")
        rows.append({"text": text_field(record, fields["text"], where),
                     "text_pair": text_field(record, pair_column, where) if pair_column else None,
                     "label": _label(record[fields["label"]], num_labels, where)})  # fmt: skip
    return rows

def generated_rows(count: int, seed: int, num_labels: int = 2) -> list[dict]:
    """A task a tiny model can learn: strings of the letters a-d; the label is the most frequent of the first
    ``num_labels`` letters (ties to the earliest); for ``num_labels = 1`` the score is the share of 'a'."""
    rng = random.Random(seed)
    rows = []
    letters = "abcd"
    for _ in range(count):
        text = "".join(rng.choice(letters) for _ in range(rng.randint(8, 24)))
        if num_labels == 1:
            label: float | int = text.count("a") / len(text)
        else:
            counts = [text.count(letters[c % 4]) for c in range(num_labels)]
            label = counts.index(max(counts))
        rows.append({"text": text, "text_pair": None, "label": label})
    return rows


class ClassificationDataset(torch.utils.data.Dataset):
    """Tokenised rows: ``input_ids`` (list of int) and ``label``; texts longer than ``max_length`` are cut
    (a pair is cut from the longer text first)."""

    def __init__(self, rows: list[dict], tokenizer, max_length: int) -> None:
        self.rows = rows
        self.items = []
        for row in rows:
            encoded = tokenizer(row["text"], row["text_pair"], truncation=True, max_length=max_length)
            ids = list(encoded["input_ids"])
            if not ids:
                raise DataError(f"a row tokenised to no tokens: {row['text'][:40]!r}")
            self.items.append({"input_ids": ids, "label": row["label"]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate(items: list[dict | None], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (B, T) and ``labels`` (B,) (long; float for regression).
    A ``None`` item (a rank's padding in evaluation) is one attended pad token with label 0 and
    ``counted`` False."""
    real = [it if it is not None else {"input_ids": [pad_id], "label": 0} for it in items]
    width = max(len(it["input_ids"]) for it in real)
    input_ids = torch.full((len(real), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(real), width), dtype=torch.long)
    for i, it in enumerate(real):
        input_ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        attention[i, : len(it["input_ids"])] = 1
    dtype = torch.float32 if regression else torch.long
    labels = torch.tensor([it["label"] for it in real], dtype=dtype)
    counted = torch.tensor([it is not None for it in items])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "counted": counted}
