"""Summarisation data (``task: seq2seq``): CNN/DailyMail and XSum (the paper's section 4.3), local files, and a
generated task for smoke runs.

| ``data.train``    | hub dataset                    | source, target        | valid split |
| --- | --- | --- | --- |
| ``cnn_dailymail`` | abisee/cnn_dailymail 3.0.0     | article, highlights   | validation |
| ``xsum``          | EdinburghNLP/xsum              | document, summary     | validation |

Any other ``data.train`` is a local json/jsonl/csv/parquet file (or directory) or a hub dataset read with
``data.field_map`` keys ``text`` (the source) and ``target`` (the summary).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from flexkd_ds.inputs.data import labelled_records, text_field

BUILTIN_SEQ2SEQ = "builtin:seq2seq"


@dataclass(frozen=True)
class Preset:
    hub: str
    fields: dict
    valid_split: str


PRESETS = {
    "cnn_dailymail": Preset(
        "abisee/cnn_dailymail:3.0.0", {"text": "article", "target": "highlights"}, "validation"
    ),
    "xsum": Preset("EdinburghNLP/xsum", {"text": "document", "target": "summary"}, "validation"),
}


@dataclass(frozen=True)
class Seq2SeqSource:
    train: str
    train_split: str
    valid: str | None
    valid_split: str
    fields: dict


def resolve_source(data_cfg) -> Seq2SeqSource:
    preset = PRESETS.get(data_cfg.train)
    fields = {"text": "text", "target": "target"}
    train, valid_split = data_cfg.train, data_cfg.valid_split
    if preset is not None:
        fields.update(preset.fields)
        train, valid_split = preset.hub, preset.valid_split
    fields.update({k: v for k, v in (data_cfg.field_map or {}).items() if k in fields})
    valid = data_cfg.valid
    if valid == "validation" and preset is not None:
        valid = preset.hub
    return Seq2SeqSource(train, data_cfg.train_split, valid, valid_split, fields)


def load_rows(name: str, split: str, fields: dict, *, max_rows: int | None = None, seed: int = 0,
              num_generated: int = 256) -> list[dict]:  # fmt: skip
    """Rows ``{"text", "target"}``; ``DataError`` naming the source, row and column for a missing column or
    an empty text, before anything is trained."""
    if name == BUILTIN_SEQ2SEQ:
        return generated_rows(num_generated, seed)
    hint = "data.field_map {text: <source column>, target: <summary column>}"
    return [{"text": text_field(record, fields["text"], where), "target": text_field(record, fields["target"], where)}
            for where, record in labelled_records(name, split, [fields["text"], fields["target"]], hint, max_rows)]  # fmt: skip

def generated_rows(count: int, seed: int) -> list[dict]:
    """A task a tiny model can learn: the source is words of the letters a-e; the target is its first three
    words (a lead-3 "summary")."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [
            "".join(rng.choice("abcde") for _ in range(rng.randint(2, 4))) for _ in range(rng.randint(5, 9))
        ]
        rows.append({"text": " ".join(words), "target": " ".join(words[:3])})
    return rows


class Seq2SeqDataset(torch.utils.data.Dataset):
    """Tokenised rows: ``input_ids`` (source, cut to ``max_length``) and ``labels`` (target, cut to
    ``max_target_length``, ending with the tokenizer's EOS)."""

    def __init__(self, rows: list[dict], tokenizer, max_length: int, max_target_length: int) -> None:
        self.rows, self.items = rows, []
        eos = tokenizer.eos_token_id
        for row in rows:
            source = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
            target = tokenizer(row["target"], add_special_tokens=False)["input_ids"][: max_target_length - 1]
            self.items.append({"input_ids": list(source), "labels": [*target, eos]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate(items: list[dict | None], pad_id: int, decoder_start_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (B, S), ``decoder_input_ids`` (B, T) (the labels shifted
    right behind ``decoder_start_id``), ``decoder_attention_mask`` and ``labels`` (B, T) with -100 on padding.
    A ``None`` item (a rank's padding) is one pad token with no label."""
    real = [it if it is not None else {"input_ids": [pad_id], "labels": []} for it in items]
    src_w = max(len(it["input_ids"]) for it in real)
    tgt_w = max(1, max(len(it["labels"]) for it in real))
    input_ids = torch.full((len(real), src_w), pad_id, dtype=torch.long)
    attention = torch.zeros((len(real), src_w), dtype=torch.long)
    decoder_ids = torch.full((len(real), tgt_w), pad_id, dtype=torch.long)
    decoder_mask = torch.zeros((len(real), tgt_w), dtype=torch.long)
    labels = torch.full((len(real), tgt_w), -100, dtype=torch.long)
    for i, it in enumerate(real):
        n, m = len(it["input_ids"]), len(it["labels"])
        input_ids[i, :n], attention[i, :n] = torch.tensor(it["input_ids"]), 1
        decoder_ids[i, 0] = decoder_start_id
        decoder_mask[i, : max(m, 1)] = 1
        if m:
            labels[i, :m] = torch.tensor(it["labels"])
            decoder_ids[i, 1:m] = torch.tensor(it["labels"][: m - 1])
    return {"input_ids": input_ids, "attention_mask": attention, "decoder_input_ids": decoder_ids,
            "decoder_attention_mask": decoder_mask, "labels": labels}  # fmt: skip
