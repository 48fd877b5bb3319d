"""Tests for flexkd_ds.inputs.data (loading, rendering, masking, batching, sampling) and flexkd_ds.inputs.synthetic."""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from flexkd_ds.inputs import data
from flexkd_ds.inputs.data import (
    DataError,
    InstructionDataset,
    InstructionRow,
    collate,
    encode_example,
    load_instruction_rows,
    pad_token_id,
    render_prompt,
)
from flexkd_ds.inputs.synthetic import synthetic_instructions, write_jsonl
from flexkd_ds.runtime.sampling import ResumableDistributedSampler, shard_for_scoring

SHARED = Path(__file__).resolve().parents[2] / "shared"
INSTRUCT = SHARED / "data" / "instruct"
GPT2 = SHARED / "tokenizers" / "gpt2"

# Written out literally (not built from the module's constants) so a template typo fails here.
EXPECTED_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a primary colour.\n\n### Response:\n"
)
EXPECTED_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
    "\n\n### Input:\n2 and 3\n\n### Response:\n"
)
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ALPACA_ROWS = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say NA.", "input": "", "output": "NA"},
]


@pytest.fixture(scope="module")
def gpt2():
    if not GPT2.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2} (the repo's parent must hold shared/)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GPT2)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


def _write_jsonl_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ loading


def _write(fmt: str, path: Path, rows: list[dict]) -> Path:
    if fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "jsonl":
        _write_jsonl_text(path, [json.dumps(r) for r in rows])
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv"])
def test_load_each_file_format(tmp_path, cache, fmt):
    rows = [dict(r) for r in ALPACA_ROWS] + [{"instruction": "Give a number.", "input": "", "output": "42"}]
    loaded = load_instruction_rows(_write(fmt, tmp_path / f"train.{fmt}", rows), cache_dir=cache)
    assert len(loaded) == 4 and loaded.num_bad == 0
    assert [r.instruction for r in loaded] == [r["instruction"] for r in rows]
    # CSV cells stay text: "NA" is not NaN, "42" is not an int, an empty input is "".
    assert [r.references for r in loaded] == [("Red.",), ("5",), ("NA",), ("42",)]
    assert [r.input for r in loaded] == ["", "2 and 3", "", ""]
    assert [r.row_number for r in loaded] == [1, 2, 3, 4]
    assert render_prompt(loaded[0]) == EXPECTED_NO_INPUT
    assert render_prompt(loaded[1]) == EXPECTED_WITH_INPUT


def test_parquet_list_outputs_and_minillm_layout(tmp_path, cache):
    rows = [
        {"prompt": "Q: one?\nA:", "output": ["1", "one"]},
        {"prompt": "Q: two?\nA:", "output": ["2"]},
    ]
    loaded = load_instruction_rows(_write("parquet", tmp_path / "eval.parquet", rows), cache_dir=cache)
    assert [r.references for r in loaded] == [("1", "one"), ("2",)]
    assert loaded[0].response == "1" and loaded[0].instruction is None
    assert render_prompt(loaded[1]) == "Q: two?\nA:"  # a rendered prompt is used as is


def test_directory_loads_every_supported_file_in_order(tmp_path, cache):
    _write("jsonl", tmp_path / "b.jsonl", ALPACA_ROWS[:1])
    _write("csv", tmp_path / "a.csv", ALPACA_ROWS[1:])
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = load_instruction_rows(tmp_path, cache_dir=cache)
    assert [r.instruction for r in loaded] == ["Add the numbers.", "Say NA.", "Name a primary colour."]
    assert [Path(s).name for s in loaded.sources] == ["a.csv", "b.jsonl"]


def test_max_rows_and_field_map(tmp_path, cache):
    rows = [{"instruction": f"Q{i}", "context": "", "response": f"A{i}"} for i in range(10)]
    path = _write("jsonl", tmp_path / "dolly_like.jsonl", rows)
    loaded = load_instruction_rows(
        path, max_rows=3, field_map={"input": "context", "output": "response"}, cache_dir=cache
    )
    assert [r.response for r in loaded] == ["A0", "A1", "A2"]
    with pytest.raises(DataError, match=r"dolly_like\.jsonl.*\['instruction', 'context', 'response'\]"):
        load_instruction_rows(path, cache_dir=cache)  # no 'output' column without the map


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_instruction_rows(missing)


def test_prompt_only_rows_load_when_the_teacher_writes_the_responses(tmp_path, cache):
    """need_output=False (data.responses=teacher): no output column, or empty outputs, are fine; a row
    without any prompt is still refused, and the default still requires the output column."""
    rows = [{"instruction": "Name a colour."}, {"instruction": "Say hi.", "input": "to Ana"}]
    path = _write("csv", tmp_path / "prompts.csv", rows)
    loaded = load_instruction_rows(path, cache_dir=cache, need_output=False)
    assert [(r.instruction, r.input, r.references) for r in loaded] == [
        ("Name a colour.", "", ("",)),
        ("Say hi.", "to Ana", ("",)),
    ]
    with pytest.raises(DataError, match="need 'output'"):
        load_instruction_rows(path, cache_dir=cache)
    bad = _write_jsonl_text(tmp_path / "bad.jsonl", ['{"instruction": "ok", "output": ""}', '{"input": "x"}'])
    with pytest.raises(DataError, match="bad.jsonl, row 2: needs a non-empty 'prompt'"):
        load_instruction_rows(bad, cache_dir=cache, need_output=False)


def test_empty_file_is_an_error(tmp_path, cache):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no usable rows"):
        load_instruction_rows(path, cache_dir=cache, on_bad_row="skip")


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs["split"]))
        return datasets.Dataset.from_list([{"instruction": "Hi", "context": "", "response": "Hello"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    fmap = {"input": "context", "output": "response"}
    loaded = load_instruction_rows("databricks/databricks-dolly-15k", field_map=fmap)
    assert calls[-1] == ("databricks/databricks-dolly-15k", None, "train")
    assert loaded[0].response == "Hello" and "databricks-dolly-15k" in loaded.sources[0]
    load_instruction_rows("org/sni:default", split="validation", field_map=fmap)
    assert calls[-1] == ("org/sni", "default", "validation")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match="could not load hub dataset 'org/x' config 'c' split 'test'.*no network"
    ):
        load_instruction_rows("org/x:c", split="test")


def _shared_rows(name: str) -> list[dict]:
    path = INSTRUCT / name
    if not path.is_file():
        pytest.skip(f"{path} not found (the repo's parent must hold shared/data)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_real_dolly_rows_render_to_the_files_prompts(cache):
    raw = _shared_rows("dolly_dev.jsonl")
    loaded = load_instruction_rows(INSTRUCT / "dolly_dev.jsonl", cache_dir=cache)
    assert len(loaded) == 1000 == len(raw) and loaded.num_bad == 0
    # The files' `prompt` field is MiniLLM's own rendering: our template must reproduce it from the raw fields.
    from_fields = [
        render_prompt({"instruction": r["instruction"], "input": r["input"], "output": "x"}) for r in raw
    ]
    assert from_fields == [r["prompt"] for r in raw]
    assert [render_prompt(r) for r in loaded] == [r["prompt"] for r in raw]
    assert sum(bool(r["input"].strip()) for r in raw) > 0  # both template variants were exercised


def test_real_sinst_keeps_every_reference(cache):
    raw = _shared_rows("sinst_valid.jsonl")
    loaded = load_instruction_rows(INSTRUCT / "sinst_valid.jsonl", cache_dir=cache)
    assert len(loaded) == 1694
    assert [list(r.references) for r in loaded] == [r["output"] for r in raw]
    assert max(len(r.references) for r in loaded) > 1
    assert loaded[0].meta["topic"] == raw[0]["topic"]


# ---------------------------------------------------------------------------------------------- rendering


def test_template_rendering_matches_the_expected_strings():
    assert render_prompt({"instruction": "Name a primary colour.", "output": "Red"}) == EXPECTED_NO_INPUT
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert render_prompt(row, None, "plain") == EXPECTED_WITH_INPUT
    whitespace_input = {"instruction": "Name a primary colour.", "input": "  \n", "output": "Red"}
    assert render_prompt(whitespace_input) == EXPECTED_NO_INPUT


def test_chat_rendering_uses_the_tokenizer_template():
    if not GPT2.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2)  # a private copy: the template is set on it
    with pytest.raises(ValueError, match="chat template"):
        render_prompt({"instruction": "Hi", "output": "Hello"}, tok, "chat")
    tok.chat_template = TINY_CHAT_TEMPLATE
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert render_prompt(row, tok, "chat") == "<|user|>Add the numbers.\n\n2 and 3\n<|assistant|>"
    no_input = {"instruction": "Hi", "input": "", "output": "Hello"}
    assert render_prompt(no_input, tok, "chat") == "<|user|>Hi\n<|assistant|>"
    prompt_only = {"prompt": "Q: 2+2?\nA:", "output": "4"}
    assert render_prompt(prompt_only, tok, "chat") == "<|user|>Q: 2+2?\nA:\n<|assistant|>"
    with pytest.raises(ValueError, match="'plain' or 'chat'"):
        render_prompt(no_input, tok, "markdown")


# --------------------------------------------------------------------------------------------- bad rows

GOOD = json.dumps({"instruction": "Name a primary colour.", "input": "", "output": "Red"})
BAD_LINES = {
    "missing_output": (json.dumps({"instruction": "Q"}), "missing 'output'"),
    "empty_response": (json.dumps({"instruction": "Q", "output": "  \n "}), "empty or whitespace"),
    "empty_list": (json.dumps({"instruction": "Q", "output": []}), "non-empty list"),
    "no_prompt": (json.dumps({"instruction": " ", "output": "A"}), "needs a non-empty 'prompt'"),
    "instruction_type": (
        json.dumps({"instruction": 7, "output": "A"}),
        "'instruction' must be a string, got int",
    ),
    "reference_type": (json.dumps({"instruction": "Q", "output": ["a", 3]}), "reference 2 .* got int"),
    "bad_json": ('{"instruction": "Q", "output": oops}', "unparseable JSON line"),
    "not_object": ('["Q", "A"]', "expected an object"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_each_bad_row_kind_names_file_and_row(tmp_path, cache, kind):
    bad, reason = BAD_LINES[kind]
    path = _write_jsonl_text(tmp_path / f"{kind}.jsonl", [GOOD, "", bad, GOOD])  # line 2 is blank
    with pytest.raises(DataError, match=rf"{kind}\.jsonl, row 3: .*{reason}") as err:
        load_instruction_rows(path, cache_dir=cache)
    assert "set data.on_bad_row=skip" in str(err.value)


def test_bad_csv_and_parquet_rows_are_counted_from_one(tmp_path, cache):
    rows = [dict(ALPACA_ROWS[0]), {"instruction": "Q", "input": "", "output": ""}]
    for fmt in ("csv", "parquet"):
        with pytest.raises(DataError, match=rf"bad\.{fmt}, row 2: .*empty"):
            load_instruction_rows(_write(fmt, tmp_path / f"bad.{fmt}", rows), cache_dir=cache)


def test_skip_mode_counts_and_reports(tmp_path, cache, caplog):
    kinds = sorted(BAD_LINES)
    lines = [GOOD] + [BAD_LINES[k][0] for k in kinds] + [GOOD, GOOD]
    path = _write_jsonl_text(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="flexkd_ds.inputs.data"):
        loaded = load_instruction_rows(path, on_bad_row="skip", cache_dir=cache)
    assert len(loaded) == 3 and loaded.num_bad == len(kinds)
    assert [r.row_number for r in loaded] == [1, len(lines) - 1, len(lines)]
    assert len(loaded.bad_examples) == data.MAX_BAD_EXAMPLES
    assert loaded.bad_examples[0].startswith(f"{path}, row 2: ")
    assert f"{len(kinds)} malformed rows skipped" in loaded.summary()
    assert "malformed rows" in caplog.text


def test_zero_usable_rows_is_an_error_even_when_skipping(tmp_path, cache):
    path = _write_jsonl_text(tmp_path / "allbad.jsonl", [BAD_LINES["empty_response"][0]] * 2)
    with pytest.raises(DataError, match=r"allbad\.jsonl: no usable rows \(2 malformed\)"):
        load_instruction_rows(path, on_bad_row="skip", cache_dir=cache)
    with pytest.raises(ValueError, match="on_bad_row"):
        load_instruction_rows(path, on_bad_row="ignore")


# ---------------------------------------------------------------------------------------------- encoding


def test_labels_are_shifted_and_cover_exactly_the_response(gpt2):
    prompt, response = EXPECTED_WITH_INPUT, "The sum is 5."
    ex = encode_example(prompt, response, gpt2, max_length=128)
    ids, labels = ex["input_ids"], ex["labels"]
    prompt_ids, response_ids = gpt2.encode(prompt), gpt2.encode(response)
    assert ids == prompt_ids + response_ids + [gpt2.eos_token_id]  # GPT-2 adds no BOS
    assert len(labels) == len(ids) and labels[-1] == -100
    labelled = [t for t in range(len(ids)) if labels[t] != -100]
    assert labelled == list(range(len(prompt_ids) - 1, len(ids) - 1))
    assert all(labels[t] == ids[t + 1] for t in labelled)
    assert gpt2.decode([x for x in labels if x != -100]) == response + "<|endoftext|>"
    assert ex["prompt_length"] == len(prompt_ids) and not ex["truncated"]


def test_long_prompt_is_left_truncated_keeping_its_end_and_the_response(gpt2):
    prompt = " ".join(f"filler{i}" for i in range(300)) + "\nEND OF PROMPT\n"
    response = "Short answer."
    ex = encode_example(prompt, response, gpt2, max_length=48)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == 48 and ex["truncated"]
    assert gpt2.decode([x for x in labels if x != -100]) == response + "<|endoftext|>"
    kept_prompt = gpt2.decode(ids[: ex["prompt_length"]])
    assert kept_prompt.endswith("\nEND OF PROMPT\n") and prompt.endswith(kept_prompt)
    capped = encode_example(prompt, response, gpt2, max_length=512, max_prompt_length=10)
    assert capped["prompt_length"] == 10 and capped["input_ids"][:10] == gpt2.encode(prompt)[-10:]


def test_overlong_response_is_cut_on_the_right_keeping_one_prompt_token(gpt2):
    prompt, response = "Tell me a story.\n", " ".join(["once upon a time"] * 20)
    ex = encode_example(prompt, response, gpt2, max_length=16)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == 16 and ex["prompt_length"] == 1 and ex["truncated"]
    assert ids[0] == gpt2.encode(prompt)[-1]
    assert ids[1:] == gpt2.encode(response)[:15]  # no EOS: the model must not learn to stop mid-response
    assert sum(x != -100 for x in labels) == 15 and labels[-1] == -100
    with pytest.raises(ValueError, match="max_length=1"):
        encode_example(prompt, response, gpt2, max_length=1)


class CharTokenizer:
    """LLaMA-like stub: one id per character (ord + 10), "<s>" = BOS 1 added by encode, "</s>" = EOS 2."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def encode(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        for piece in re.split(r"(<s>|</s>)", text):
            ids += {"<s>": [1], "</s>": [2]}.get(piece, [ord(c) + 10 for c in piece])
        return ids


def test_bos_policy_never_doubles_special_tokens(gpt2):
    tok = CharTokenizer()
    ex = encode_example("ab", "c", tok, max_length=10)  # auto: this tokenizer adds BOS itself
    assert ex["input_ids"] == [1, ord("a") + 10, ord("b") + 10, ord("c") + 10, 2]
    assert ex["labels"] == [-100, -100, ord("c") + 10, 2, -100]
    rendered_bos = encode_example("<s>ab", "c</s>", tok, max_length=10)  # chat templates may render BOS/EOS
    assert rendered_bos["input_ids"] == ex["input_ids"]
    assert encode_example("ab", "c", tok, max_length=10, add_bos=False)["input_ids"][0] == ord("a") + 10
    truncated = encode_example("abcdef", "xy", tok, max_length=5)  # BOS stays first when the prompt is cut
    assert truncated["input_ids"] == [1, ord("f") + 10, ord("x") + 10, ord("y") + 10, 2]
    assert encode_example("ab", "c", gpt2, max_length=10)["input_ids"][0] != gpt2.bos_token_id


def test_collate_pads_right_and_masks(gpt2):
    ex_a = encode_example("Hi\n", "Hello there.", gpt2, max_length=64)
    ex_b = encode_example("A much longer prompt for the second example\n", "Ok.", gpt2, max_length=64)
    pad = pad_token_id(gpt2)
    assert pad == gpt2.eos_token_id  # GPT-2 has no pad token: EOS pads
    batch = collate([ex_a, ex_b, None], pad, pad_to_multiple_of=8)
    width = max(len(ex_a["input_ids"]), len(ex_b["input_ids"]))
    assert batch["input_ids"].shape == (3, -(-width // 8) * 8) and batch["input_ids"].dtype == torch.long
    for i, ex in enumerate([ex_a, ex_b]):
        n = len(ex["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert (batch["input_ids"][i, n:] == pad).all() and (batch["labels"][i, n:] == -100).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["loss_mask"].dtype == torch.bool
    assert torch.equal(batch["loss_mask"], batch["labels"] != -100)
    expected_tokens = sum(sum(x != -100 for x in ex["labels"]) for ex in (ex_a, ex_b))
    assert batch["loss_mask"].sum().item() == expected_tokens
    assert batch["attention_mask"][2].sum() == 1 and not batch["loss_mask"][2].any()  # placeholder row
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad)


def test_pad_token_id_refuses_a_tokenizer_without_pad_or_eos():
    class NoSpecials:
        pad_token_id = eos_token_id = None

    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        pad_token_id(NoSpecials())


def test_instruction_dataset_encodes_rows_like_encode_example(gpt2):
    rows = synthetic_instructions(40, seed=3)
    lazy = InstructionDataset(rows, gpt2, max_length=40)
    eager = InstructionDataset(rows, gpt2, max_length=40, eager=True, show_progress=False)
    assert len(lazy) == len(eager) == 40
    for i in (0, 17, 39):
        expected = encode_example(rows[i]["prompt"], rows[i]["output"], gpt2, max_length=40)
        assert lazy[i] == eager[i] == expected
    assert eager.num_truncated == sum(
        encode_example(r["prompt"], r["output"], gpt2, max_length=40)["truncated"] for r in rows
    )
    assert eager.num_truncated > 0  # the Alpaca header alone is ~30 tokens
    with pytest.raises(ValueError, match="chat template"):
        InstructionDataset(rows, gpt2, max_length=40, prompt_style="chat")
    with pytest.raises(ValueError, match=r"<memory>, row 1: max_length=1 is too small"):
        InstructionDataset(rows, gpt2, max_length=1)[0]


# ---------------------------------------------------------------------------------------------- sampling


def _epoch_by_rank(n, world, seed, epoch):
    samplers = [ResumableDistributedSampler(n, rank=r, world_size=world, seed=seed) for r in range(world)]
    return [s.epoch_indices(epoch) for s in samplers]


@pytest.mark.parametrize("n,world", [(12, 3), (10, 3), (2, 5), (7, 1)])
def test_sampler_epoch_covers_every_example_with_equal_rank_lengths(n, world):
    for epoch in (0, 1):
        per_rank = _epoch_by_rank(n, world, seed=5, epoch=epoch)
        length = -(-n // world)
        assert all(len(ix) == length for ix in per_rank)
        # Interleave back: global position p = i * world + r.
        order = [per_rank[p % world][p // world] for p in range(length * world)]
        assert sorted(order[:n]) == list(range(n))  # a permutation of all examples
        assert order[n:] == (order[:n] * world)[: len(order) - n]  # padding wraps around
        if n % world == 0 and world > 1:
            assert not set(per_rank[0]) & set(per_rank[1])  # ranks are disjoint


def test_sampler_continues_across_epochs_and_shuffles_differently():
    s = ResumableDistributedSampler(10, rank=1, world_size=2, seed=0)
    e0, e1, e2 = (s.epoch_indices(e) for e in range(3))
    assert e0 != e1 and sorted(e0 + _epoch_by_rank(10, 2, 0, 0)[0]) == list(range(10))
    drawn = s.next_indices(3) + s.next_indices(9) + s.next_indices(0) + s.next_indices(2)
    assert drawn == e0 + e1 + e2[:4]
    assert (s.epoch, s.position) == (2, 4)
    e3 = s.epoch_indices(3)
    assert list(itertools.islice(iter(s), 3)) == e2[4:] + e3[:2]
    assert (s.epoch, s.position) == (3, 2)


def test_sampler_state_round_trip_resumes_at_the_exact_next_index():
    a = ResumableDistributedSampler(23, rank=2, world_size=4, seed=11)
    a.next_indices(4)
    a.next_indices(5)
    state = json.loads(json.dumps(a.state_dict()))
    assert state == {"epoch": 1, "position": 3, "seed": 11, "num_examples": 23, "world_size": 4}
    b = ResumableDistributedSampler(23, rank=2, world_size=4, seed=999)
    b.load_state_dict(state)
    assert b.next_indices(10) == a.next_indices(10)
    explicit = ResumableDistributedSampler(23, rank=2, world_size=4, seed=11, epoch=1, position=3)
    assert (
        explicit.next_indices(4)
        == ResumableDistributedSampler(23, rank=2, world_size=4, seed=11).next_indices(13)[-4:]
    )
    with pytest.raises(ValueError, match="num_examples=23 but this run has num_examples=24"):
        ResumableDistributedSampler(24, rank=0, world_size=4, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=4 but this run has world_size=8"):
        ResumableDistributedSampler(23, rank=0, world_size=8, seed=11).load_state_dict(state)


def test_sampler_seeds_and_shuffle_flag():
    def first_epoch(seed, shuffle=True):
        return ResumableDistributedSampler(50, rank=0, world_size=1, seed=seed, shuffle=shuffle).next_indices(
            50
        )

    assert first_epoch(1) == first_epoch(1) and first_epoch(1) != first_epoch(2)
    assert first_epoch(1, shuffle=False) == list(range(50))
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ResumableDistributedSampler(5, rank=2, world_size=2, seed=0)


@pytest.mark.parametrize("n,world,batch", [(1, 4, 2), (7, 3, 2), (10, 2, 5), (33, 4, 3)])
def test_shard_for_scoring_gives_equal_batches_and_each_example_once(n, world, batch):
    shards = [shard_for_scoring(n, r, world, batch) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) >= 1
    assert all(len(b) == batch for s in shards for b in s)
    real = [i for s in shards for b in s for i in b if i is not None]
    assert sorted(real) == list(range(n))
    for s in shards:  # placeholders only pad the end of a rank's list
        flat = [i for b in s for i in b]
        assert flat == [i for i in flat if i is not None] + [None] * flat.count(None)
    assert sum(i is None for s in shards for b in s for i in b) == len(shards[0]) * batch * world - n


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_rows_are_deterministic_varied_and_loadable(tmp_path, cache):
    rows = synthetic_instructions(300, seed=7)
    assert rows == synthetic_instructions(300, seed=7) and rows != synthetic_instructions(300, seed=8)
    assert synthetic_instructions(50, seed=7) == rows[:50]
    assert len({r["task"] for r in rows}) >= 6 and len({r["prompt"] for r in rows}) > 250
    assert all(r["prompt"] == render_prompt(InstructionRow.from_record(r)) for r in rows)
    path = write_jsonl(rows, tmp_path / "out" / "synthetic.jsonl")
    loaded = load_instruction_rows(path, cache_dir=cache)
    assert [(r.instruction, r.input, r.response) for r in loaded] == [
        (r["instruction"], r["input"], r["output"]) for r in rows
    ]


def test_synthetic_answers_are_correct():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    factors = {("kilometers", "meters"): 1000, ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000,
               ("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("days", "hours"): 24,
               ("weeks", "days"): 7, ("liters", "milliliters"): 1000}  # fmt: skip
    checked = dict.fromkeys(
        ["arithmetic", "word_problem", "sort_numbers", "count_letter", "convert_units"], 0
    )
    for r in synthetic_instructions(400, seed=0):
        task, out = r["task"], r["output"]
        if task in ("arithmetic", "word_problem"):
            a, op, b, c = re.search(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)", out).groups()
            assert ops[op](int(a), int(b)) == int(c), r
            assert a in r["instruction"] + r["input"] and b in r["instruction"] + r["input"]
        elif task == "sort_numbers":
            values = [int(x) for x in r["input"].split(", ")]
            descending = "descending" in r["instruction"]
            assert [int(x) for x in out.split(", ")] == sorted(values, reverse=descending), r
        elif task == "count_letter":
            letter, word = re.search(r"letter '(\w)' appear in the word '(\w+)'", r["instruction"]).groups()
            assert int(re.search(r"appears (\d+) time", out).group(1)) == word.count(letter), r
        elif task == "convert_units":
            value, src, dst = re.search(r"(\d+) (\w+) is (?:\d+) (\w+)", out).groups()
            assert f"{int(value) * factors[(src, dst)]} {dst}" in out, r
        else:
            continue
        checked[task] += 1
    assert all(count >= 10 for count in checked.values()), checked


def test_an_unterminated_string_reads_as_one_sentence(tmp_path, cache):
    """JSON's own message ends in 'starting at': the row error must not say 'starting at at column'."""
    path = _write_jsonl_text(tmp_path / "cut.jsonl", [GOOD, '{"instruction": "Say hi.", "output": "hi'])
    with pytest.raises(DataError) as err:
        load_instruction_rows(path, cache_dir=cache)
    assert "Unterminated string starting at: column " in str(err.value) and "at at" not in str(err.value)
