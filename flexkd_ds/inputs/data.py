"""Instruction data: loading, prompt rendering, response-masked tokenisation and batching.

Pipeline::

    load_instruction_rows(source) -> LoadedRows of InstructionRow    # local files or a hub dataset, validated
    render_prompt(row, tokenizer, style) -> str                      # Alpaca template ("plain") or chat template
    encode_example(prompt, response, ...) -> {"input_ids", "labels"} # labels already shifted, -100 off-response
    InstructionDataset(rows, tokenizer, ...) + collate(batch, pad_id) -> (B, T) tensors

Which rows each rank sees is ``flexkd_ds.runtime.sampling``; nothing here knows about ranks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SUPPORTED_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
FIELDS = ("instruction", "input", "output", "prompt")
MAX_BAD_EXAMPLES = 5

# The Alpaca template exactly as MiniLLM renders its `prompt` field (checked against ../shared/data in the tests).
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataError(ValueError):
    """A data file, hub dataset or row cannot be used; the message names where and what to do."""


class _BadRow(Exception):
    """Internal: one row is malformed (the loader adds file and row number)."""


# ----------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class InstructionRow:
    """One validated example.

    prompt: the pre-rendered prompt (MiniLLM layout) or None; instruction/input: raw fields ("" input = none);
    references: every reference response (training uses ``response`` = the first); source/row_number: where it
    came from (row_number is 1-based; the line number for JSON Lines); meta: other scalar columns (topic, ...).
    """

    prompt: str | None
    instruction: str | None
    input: str
    references: tuple[str, ...]
    source: str = "<memory>"
    row_number: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def response(self) -> str:
        return self.references[0]

    @classmethod
    def from_record(
        cls,
        record: Mapping[str, Any],
        *,
        source: str = "<memory>",
        row_number: int = 0,
        need_output: bool = True,
    ):
        """Validate a dict in MiniLLM / Alpaca layout; raises DataError naming ``source`` and ``row_number``.
        ``need_output=False``: a prompt-only row (its reference is "" until the teacher answers it)."""
        try:
            return _parse_record(record, {f: f for f in FIELDS}, source, row_number, need_output)
        except _BadRow as bad:
            raise DataError(f"{source}, row {row_number}: {bad}") from None


def _parse_record(
    record: Any, fmap: Mapping[str, str], source: str, row_number: int, need_output: bool = True
) -> InstructionRow:
    if not isinstance(record, Mapping):
        raise _BadRow(f"expected an object with fields {FIELDS}, got {type(record).__name__}")
    values = {}
    for name in FIELDS:
        value = record.get(fmap[name])
        if value is not None and name != "output" and not isinstance(value, str):
            raise _BadRow(f"field '{fmap[name]}' must be a string, got {type(value).__name__}")
        values[name] = value
    prompt, instruction = values["prompt"], values["instruction"]
    prompt = prompt if prompt and prompt.strip() else None
    instruction = instruction if instruction and instruction.strip() else None
    if prompt is None and instruction is None:
        raise _BadRow(f"needs a non-empty '{fmap['prompt']}' (rendered prompt) or '{fmap['instruction']}'")
    output = values["output"]
    if not need_output and (output is None or output == "" or output == []):
        output = ""
    elif output is None:
        raise _BadRow(f"missing '{fmap['output']}' (the response)")
    references = [output] if isinstance(output, str) else output
    if not isinstance(references, list | tuple) or not references:
        raise _BadRow(
            f"'{fmap['output']}' must be a string or a non-empty list of strings, got {output!r:.80}"
        )
    for k, ref in enumerate(references, 1):
        if not isinstance(ref, str):
            raise _BadRow(f"reference {k} of '{fmap['output']}' must be a string, got {type(ref).__name__}")
        if not ref.strip() and need_output:
            raise _BadRow(f"reference {k} of '{fmap['output']}' is empty or whitespace (empty response)")
    meta = {k: v for k, v in record.items() if k not in fmap.values() and _is_meta_value(v)}
    return InstructionRow(
        prompt, instruction, values["input"] or "", tuple(references), source, row_number, meta
    )


def _is_meta_value(value: Any) -> bool:
    """Scalars and lists of strings (e.g. a classification row's ``options``) are kept as row metadata."""
    if isinstance(value, str | int | float | bool):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


@dataclass
class LoadedRows:
    """Result of :func:`load_instruction_rows`: ``rows`` plus the malformed rows that were skipped (if any)."""

    rows: list[InstructionRow]
    num_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)  # first MAX_BAD_EXAMPLES "where: why" lines
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[InstructionRow]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> InstructionRow:
        return self.rows[i]

    def summary(self) -> str:
        text = f"{len(self.rows)} rows from {', '.join(self.sources)}; {self.num_bad} malformed rows skipped"
        return text + "".join(f"\n  {reason}" for reason in self.bad_examples)


def format_alpaca_prompt(instruction: str, input: str = "") -> str:
    """The MiniLLM/Alpaca prompt; the "with input" variant when ``input`` has non-whitespace text."""
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def render_prompt(row: InstructionRow | Mapping[str, Any], tokenizer=None, style: str = "plain") -> str:
    """Prompt text for one row.

    plain: the row's rendered ``prompt`` if it has one, else :func:`format_alpaca_prompt`.
    chat: ``tokenizer.apply_chat_template`` on one user turn (``instruction`` + "\\n\\n" + ``input`` when input is
    non-empty; a row with only a rendered prompt sends that text) with ``add_generation_prompt=True``.
    """
    if not isinstance(row, InstructionRow):
        row = InstructionRow.from_record(row)
    if style == "plain":
        return row.prompt if row.prompt is not None else format_alpaca_prompt(row.instruction, row.input)
    if style != "chat":
        raise ValueError(f"prompt style must be 'plain' or 'chat', got {style!r}")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "None"
        raise ValueError(
            f"prompt style 'chat' needs a tokenizer with a chat template, but tokenizer {name!r} has none; "
            "use prompt_style='plain' or set tokenizer.chat_template"
        )
    if row.instruction is not None:
        content = row.instruction + ("\n\n" + row.input if row.input.strip() else "")
    else:
        content = row.prompt
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# -------------------------------------------------------------------------------------------- loading


def load_instruction_rows(
    source: str | Path,
    *,
    split: str = "train",
    on_bad_row: str = "error",
    max_rows: int | None = None,
    field_map: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
    need_output: bool = True,
) -> LoadedRows:
    """Load and validate instruction rows with Hugging Face ``datasets``.

    source: a .json (list of objects or JSON Lines) / .jsonl / .parquet / .csv file, a directory (every such file
        in it, sorted, not recursive), or a hub dataset "name" or "name:config" (``split`` applies to hub data
        only: a local file is one split).
    Layouts: MiniLLM (``prompt`` + ``output``) or Alpaca (``instruction`` + optional ``input`` + ``output``);
        ``output`` is a string or a list of reference strings. ``field_map`` renames, e.g. dolly-15k on the hub:
        ``{"input": "context", "output": "response"}``.
    on_bad_row: "error" raises DataError at the first malformed row (file + 1-based row number + reason);
        "skip" skips it, counts it in ``num_bad``, keeps the first reasons in ``bad_examples`` and logs a warning.
    max_rows: stop after this many usable rows. A file or dataset with zero usable rows is always an error.
    need_output=False: prompts only (the teacher will write the responses); a missing or empty ``output`` is
        kept as the single reference "".
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    unknown = set(field_map or {}) - set(FIELDS)
    if unknown:
        raise ValueError(f"field_map keys must be among {FIELDS}, got {sorted(unknown)}")
    fmap = {name: (field_map or {}).get(name, name) for name in FIELDS}
    result = LoadedRows(rows=[])
    for label, columns, records in _open_sources(source, split, cache_dir):
        if columns is not None:
            _check_columns(label, columns, fmap, need_output)
        result.sources.append(label)
        num_good = num_bad_here = 0
        for row_number, record in records:
            try:
                if isinstance(record, _BadRow):
                    raise record
                result.rows.append(_parse_record(record, fmap, label, row_number, need_output))
                num_good += 1
            except _BadRow as bad:
                where = f"{label}, row {row_number}: {bad}"
                if on_bad_row == "error":
                    raise DataError(
                        f"{where}. Fix the row or set data.on_bad_row=skip (skipped rows are counted and reported)."
                    ) from None
                num_bad_here += 1
                if len(result.bad_examples) < MAX_BAD_EXAMPLES:
                    result.bad_examples.append(where)
            if max_rows is not None and len(result.rows) >= max_rows:
                break
        result.num_bad += num_bad_here
        if num_good == 0:
            raise DataError(f"{label}: no usable rows ({num_bad_here} malformed). {result.summary()}")
        if max_rows is not None and len(result.rows) >= max_rows:
            break
    if result.num_bad:
        logger.warning("skipped malformed rows: %s", result.summary())
    return result


def labelled_records(name: str, split: str, columns_needed: Sequence[str], hint: str, max_rows: int | None = None):
    """``(where, record)`` for each row of a file, directory or hub dataset whose columns include
    ``columns_needed`` (the task datasets: classification, seq2seq). A missing column is a ``DataError`` naming
    the source, its columns and ``hint`` (how to map them); a row that is not a record names its row. Stops
    after ``max_rows``; a source without rows is a ``DataError``."""
    count = 0
    for label, columns, records in _open_sources(name, split, None):
        missing = [c for c in columns_needed if columns is not None and c not in columns]
        if missing:
            raise DataError(f"{label}: no column {missing} (columns: {list(columns)}); map them with {hint}")
        for row_number, record in records:
            where = f"{label}, row {row_number}"
            if not isinstance(record, dict):
                raise DataError(f"{where}: {record}")
            yield where, record
            count += 1
            if max_rows is not None and count >= max_rows:
                return
    if not count:
        raise DataError(f"{name}: no rows")


def text_field(record: Mapping[str, Any], column: str, where: str) -> str:
    """The non-empty text of ``column`` in ``record``, or a ``DataError`` naming the row and the column."""
    value = record.get(column)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: column {column!r} is empty or not text")
    return value


def _check_columns(
    label: str, columns: Sequence[str], fmap: Mapping[str, str], need_output: bool = True
) -> None:
    has_prompt = fmap["prompt"] in columns or fmap["instruction"] in columns
    if not has_prompt or (need_output and fmap["output"] not in columns):
        raise DataError(
            f"{label}: columns {list(columns)} fit no accepted layout: need '{fmap['output']}' and "
            f"'{fmap['prompt']}' (MiniLLM) or '{fmap['instruction']}' (+ '{fmap['input']}') (Alpaca); "
            "pass field_map to rename columns"
        )


def _open_sources(source, split, cache_dir) -> Iterator[tuple[str, list[str] | None, Iterator]]:
    """Yield (label, column names or None, iterator of (row_number, record or _BadRow)) per file / dataset."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"directory {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
        for file in files:
            yield _open_file(file, cache_dir)
    elif path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        yield _open_file(path, cache_dir)
    elif path.suffix.lower() in SUPPORTED_SUFFIXES or text.startswith(("/", "./", "../", "~", ".\\")):
        raise DataError(f"data file not found: {path} (resolved to {path.resolve()})")
    else:
        yield _open_hub(text, split, cache_dir)


def _open_file(path: Path, cache_dir) -> tuple[str, list[str] | None, Iterator]:
    import datasets

    builder = SUPPORTED_SUFFIXES[path.suffix.lower()]
    kwargs: dict[str, Any] = {}
    if builder == "csv":  # read every cell as text: "42" stays a string, "NA" and "" are not NaN
        import pandas as pd

        try:
            header = list(pd.read_csv(path, nrows=0).columns)  # the names datasets' pandas reader will use
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: could not read the CSV header: {err}") from err
        kwargs = {
            "keep_default_na": False,
            "features": datasets.Features(dict.fromkeys(header, datasets.Value("string"))),
        }
    try:
        ds = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as err:  # re-raised as DataError or handled by the precise JSON reader
        if builder != "json":
            raise DataError(f"{path}: could not be read as {builder}: {err.__cause__ or err}") from err
        return str(path), None, _python_json_records(path)
    numbers = _json_row_numbers(path) if builder == "json" else None
    if numbers is not None and len(numbers) != len(ds):
        numbers = None  # cannot map records to lines exactly: fall back to record numbers
    records = ((numbers[i] if numbers else i + 1, rec) for i, rec in enumerate(ds))
    return str(path), list(ds.column_names), records


def _json_row_numbers(path: Path) -> list[int] | None:
    """Line number of each record of a JSON Lines file (blank lines skipped); None for a JSON array file."""
    numbers = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not numbers and line.lstrip().startswith(b"["):
                    return None
                numbers.append(lineno)
    return numbers


def _python_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Slow exact reader used when ``datasets`` fails: finds the unparseable line (row = line number)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from err
        yield from enumerate(data, 1)
        return
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, _BadRow(f"unparseable JSON line ({err.msg}: column {err.colno})")


def _open_hub(name: str, split: str, cache_dir) -> tuple[str, list[str] | None, Iterator]:
    import datasets

    repo, _, config = name.partition(":")
    if not repo or (name.count(":") and not config):
        raise DataError(f"hub dataset name must be 'name' or 'name:config', got {name!r}")
    label = f"hub dataset {repo!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
    try:
        ds = datasets.load_dataset(repo, config or None, split=split, cache_dir=cache_dir)
    except Exception as err:  # network, auth, unknown split...: one clear message
        raise DataError(
            f"could not load {label}: {type(err).__name__}: {err}. If {name!r} was meant as a local file or "
            f"directory, it does not exist ({Path(name).resolve()})"
        ) from err
    return label, list(ds.column_names), ((i + 1, rec) for i, rec in enumerate(ds))


# ------------------------------------------------------------------------------------------- encoding


def _tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer defines BOS and puts it first when encoding with special tokens (LLaMA: yes,
    GPT-2: no): we then prepend it ourselves, since prompt and response are encoded without special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def encode_example(
    prompt: str,
    response: str,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    add_eos: bool = True,
    add_bos: bool | None = None,
) -> dict[str, Any]:
    """Tokenise one (prompt, response) pair with labels already shifted for next-token prediction.

    Returns ``input_ids`` (list[int], length T <= max_length) = [BOS] + prompt + response (+ EOS); ``labels``
    (list[int], length T) with ``labels[t] = input_ids[t + 1]`` when that token belongs to the response (EOS
    included) and -100 elsewhere, so ``logits[:, t]`` aligns with ``labels[:, t]`` and the last label is -100;
    ``prompt_length`` (tokens before the response, BOS included) and ``truncated`` (bool).

    Prompt and response are encoded separately with ``add_special_tokens=False``. BOS: ``add_bos=None`` prepends
    it when the tokenizer itself would (see ``_tokenizer_adds_bos``); a prompt whose text already starts with BOS
    (chat templates often render it) keeps exactly one. EOS is appended unless the response already ends in it.
    Truncation: ``max_prompt_length`` (BOS included) first left-truncates the prompt. Then, if prompt + response
    exceed ``max_length``, the prompt is left-truncated (its end, next to the response, is kept; BOS stays first)
    so the whole response fits; if the response alone does not fit next to BOS + one prompt token, the prompt
    keeps only its last token and the response is cut on the right (losing its EOS: the model should not learn
    to stop there).
    """
    if add_bos is None:
        add_bos = _tokenizer_adds_bos(tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer defines no bos_token_id; pass add_bos=False")
    prefix = [tokenizer.bos_token_id] if add_bos else []
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if prefix and prompt_ids[:1] == prefix:
        prompt_ids = prompt_ids[1:]
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer defines no eos_token_id; pass add_eos=False")
        if response_ids[-1:] != [tokenizer.eos_token_id]:
            response_ids.append(tokenizer.eos_token_id)
    if not response_ids:
        raise ValueError(f"response {response[:40]!r} encodes to zero tokens")
    if not prefix and not prompt_ids:
        raise ValueError(
            "the prompt encodes to zero tokens and no BOS is added: nothing predicts the response"
        )
    min_prompt = min(1, len(prompt_ids))  # keep at least one real prompt token when there is one
    if max_length < len(prefix) + min_prompt + 1:
        raise ValueError(f"max_length={max_length} is too small: need >= {len(prefix) + min_prompt + 1}")
    truncated = False
    if max_prompt_length is not None:
        keep = max_prompt_length - len(prefix)
        if keep < min_prompt:
            raise ValueError(f"max_prompt_length={max_prompt_length} leaves no prompt token (BOS counts)")
        if len(prompt_ids) > keep:
            prompt_ids, truncated = prompt_ids[len(prompt_ids) - keep :], True
    room = max_length - len(prefix) - len(response_ids)
    if room >= min_prompt:
        if len(prompt_ids) > room:
            prompt_ids, truncated = prompt_ids[len(prompt_ids) - room :], True
    else:
        prompt_ids = prompt_ids[len(prompt_ids) - min_prompt :]
        response_ids, truncated = response_ids[: max_length - len(prefix) - min_prompt], True
    prompt_length = len(prefix) + len(prompt_ids)
    return {
        "input_ids": prefix + prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * (prompt_length - 1) + response_ids + [IGNORE_INDEX],
        "prompt_length": prompt_length,
        "truncated": truncated,
    }


class InstructionDataset(torch.utils.data.Dataset):
    """Training examples: ``render_prompt(row, style)`` + the row's first reference, through ``encode_example``.

    rows: LoadedRows or a sequence of InstructionRow / dicts in MiniLLM layout. ``eager=True`` tokenises everything
    up front (tqdm bar; ``num_truncated`` is then known), otherwise each item is tokenised on access.
    """

    def __init__(
        self,
        rows: LoadedRows | Sequence[InstructionRow | Mapping[str, Any]],
        tokenizer,
        *,
        max_length: int,
        max_prompt_length: int | None = None,
        prompt_style: str = "plain",
        add_eos: bool = True,
        add_bos: bool | None = None,
        eager: bool = False,
        show_progress: bool = True,
    ):
        rows = rows.rows if isinstance(rows, LoadedRows) else rows
        self.rows = [
            r if isinstance(r, InstructionRow) else InstructionRow.from_record(r, row_number=i + 1)
            for i, r in enumerate(rows)
        ]
        if not self.rows:
            raise ValueError("InstructionDataset needs at least one row")
        if prompt_style not in ("plain", "chat"):
            raise ValueError(f"prompt_style must be 'plain' or 'chat', got {prompt_style!r}")
        self.tokenizer, self.prompt_style = tokenizer, prompt_style
        if add_bos is None:
            add_bos = _tokenizer_adds_bos(tokenizer)  # resolved once, not per example
        self._kwargs = dict(
            max_length=max_length, max_prompt_length=max_prompt_length, add_eos=add_eos, add_bos=add_bos
        )
        render_prompt(
            self.rows[0], tokenizer, prompt_style
        )  # fail now, not in a worker, without a chat template
        self._encoded: list[dict] | None = None
        self.num_truncated: int | None = None
        if eager:
            bar = tqdm(range(len(self.rows)), desc="tokenising", disable=not show_progress)
            self._encoded = [self._encode(i) for i in bar]
            self.num_truncated = sum(ex["truncated"] for ex in self._encoded)

    def _encode(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        prompt = render_prompt(row, self.tokenizer, self.prompt_style)
        try:
            return encode_example(prompt, row.response, self.tokenizer, **self._kwargs)
        except ValueError as err:
            raise ValueError(f"{row.source}, row {row.row_number}: {err}") from err

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._encoded[i] if self._encoded is not None else self._encode(i)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (safe: padding has attention 0 and label -100)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError(
        "the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before batching"
    )


def collate(
    batch: Sequence[Mapping[str, Any] | None], pad_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into tensors.

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``labels`` (B, T) long with -100 on
    padding and ``loss_mask`` (B, T) bool = labels != -100. T = longest example (rounded up to
    ``pad_to_multiple_of``). A ``None`` item (the scorer's placeholder) becomes one attended pad token with
    no labels: an all-zero attention row can turn softmax into NaN in some attention kernels.
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch; every micro-batch needs at least one example")
    items = [{"input_ids": [pad_id], "labels": [IGNORE_INDEX]} if ex is None else ex for ex in batch]
    width = max(len(ex["input_ids"]) for ex in items)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(items):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"batch item {i}: {n} input_ids but {len(ex['labels'])} labels")
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "loss_mask": labels != IGNORE_INDEX,
    }
