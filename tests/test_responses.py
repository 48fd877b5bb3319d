"""Teacher-written responses (data.responses=teacher, builtin:prompts) and the held-out report, on the tiny
recipe's random LLaMA teacher with the byte tokenizer: the cached responses are the teacher's own greedy
continuations (Hugging Face generate, one prompt at a time, written out here), a rerun reuses them, other
settings are refused, and the held-out NLLs in heldout.json match a plain forward of the teacher."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from _helpers import DISTILL, RECIPE, run_job

from flexkd_ds.inputs import data
from flexkd_ds.inputs.config import load_config
from flexkd_ds.inputs.prompts import generated_prompts
from flexkd_ds.jobs.common import model_specs
from flexkd_ds.jobs.responses import clean_response

QUICK = [
    "data.train=builtin:prompts",
    "data.responses=teacher",
    "data.valid=builtin:prompts",
    "data.num_synthetic=12",
    "data.response_tokens=6",
    "data.response_temperature=0",
    "train.max_steps=2",
    "importance.num_examples=8",
]


def test_clean_response_cuts_at_an_echoed_section_marker():
    assert clean_response("  The sun.\n\n### Instruction:\nMore") == "The sun."
    assert clean_response("A\n  ### Response: again") == "A"
    assert clean_response("Use C# and ###s inline.") == "Use C# and ###s inline."
    assert clean_response("\n### Response:\nonly an echo") == ""


def test_generated_prompts_are_distinct_deterministic_and_prefix_stable():
    rows = generated_prompts(300, seed=5)
    assert len({r["instruction"] for r in rows}) == 300
    assert generated_prompts(40, seed=5) == rows[:40]
    assert generated_prompts(40, seed=6) != rows[:40]
    assert all(r["prompt"] == data.format_alpaca_prompt(r["instruction"]) and r["output"] == "" for r in rows)
    assert {r["task"] for r in rows} == {
        "brainstorming",
        "classification",
        "creative_writing",
        "general_qa",
        "open_qa",
    }


def greedy_reference(teacher, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The teacher's greedy continuation of one unpadded prompt, decoded and cut like the job's. The prompt is
    encoded as the tokenizer encodes text (BOS only if it adds one) and, as the tiny teacher has 128
    positions, keeps its last 128 - max_new_tokens tokens (BOS, if any, stays first)."""
    prefix = [tokenizer.bos_token_id] if tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id else []
    keep = teacher.config.max_position_embeddings - max_new_tokens - len(prefix)
    ids = torch.tensor([prefix + tokenizer.encode(prompt, add_special_tokens=False)[-keep:]])
    out = teacher.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return clean_response(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_teacher_responses_are_its_greedy_answers_reused_and_refused_for_other_settings(tmp_path):
    out = tmp_path / "run"
    run_job(DISTILL, out, QUICK, nprocs=1)
    rows = [json.loads(line) for line in (out / "teacher_responses.jsonl").read_text().splitlines()]
    recipe = json.loads((out / "teacher_responses.json").read_text())
    assert recipe["max_tokens"] == 6 and recipe["temperature"] == 0 and recipe["num_responses"] == len(rows)

    cfg = load_config(RECIPE, [f"output_dir={out}", *QUICK])
    teacher, _, tokenizer = model_specs(cfg)
    model = teacher.load(torch.float32).eval()
    prompts = generated_prompts(12, seed=cfg.seed)
    expected = [(p["instruction"], greedy_reference(model, tokenizer, p["prompt"], 6)) for p in prompts]
    assert [(r["instruction"], r["output"]) for r in rows] == [(i, a) for i, a in expected if a]

    # held-out report: the teacher's NLL on its own held-out answers, by a plain forward written out here
    heldout = json.loads((out / "heldout.json").read_text())
    valid = [json.loads(line) for line in (out / "teacher_responses.valid.jsonl").read_text().splitlines()]
    assert heldout["rows"] == len(valid) and not {r["instruction"] for r in valid} & {
        p["instruction"] for p in prompts
    }
    total, count = 0.0, 0
    for row in valid:
        ex = data.encode_example(row["prompt"], row["output"], tokenizer, max_length=cfg.data.max_length)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()
        labels = torch.tensor(ex["labels"])
        keep = labels != data.IGNORE_INDEX
        total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    assert heldout["teacher"] == pytest.approx(total / count, rel=1e-5)
    assert math.isfinite(heldout["student_start"]) and math.isfinite(heldout["student_end"])

    before = (out / "teacher_responses.jsonl").read_bytes()
    again = run_job(DISTILL, out, [*QUICK, "train.max_steps=3"], nprocs=1)
    assert re.search(rf"reusing {len(rows)} teacher responses from ", again.output), again.tail()
    assert (out / "teacher_responses.jsonl").read_bytes() == before

    # resume=never: past the resume check (which would stop this rerun first, naming data.response_tokens)
    other = run_job(
        DISTILL, out, [*QUICK, "train.max_steps=4", "data.response_tokens=7", "train.resume=never"], nprocs=1,
        check=False,
    )  # fmt: skip
    assert other.returncode != 0 and "max_tokens: file 6, this run 7" in other.output, other.tail()
    assert "Delete it and teacher_responses.json" in other.output
    assert (out / "teacher_responses.jsonl").read_bytes() == before


@pytest.mark.slow
def test_two_ranks_write_the_same_sampled_responses_as_one(tmp_path):
    sampled = [*QUICK, "data.response_temperature=0.8", "train.max_steps=1"]
    run_job(DISTILL, tmp_path / "one", sampled, nprocs=1)
    run_job(DISTILL, tmp_path / "two", sampled, nprocs=2)
    one = (tmp_path / "one" / "teacher_responses.jsonl").read_text()
    assert one == (tmp_path / "two" / "teacher_responses.jsonl").read_text()


def _shm_buffers() -> set[str]:
    from pathlib import Path

    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/shm"), reason="no /dev/shm")
def test_a_cpu_run_leaves_no_deepspeed_buffer_in_shared_memory(tmp_path):
    """DeepSpeed's CPU allreduce creates a 66 MB /dev/shm file per rank and never removes it; the job's
    process group removes its own at exit (runtime.dist). A concurrent job's buffers may come and go, so
    only new names that stay are counted."""
    before = _shm_buffers()
    run_job(DISTILL, tmp_path / "run", ["train.max_steps=1", "importance.num_examples=4"], nprocs=1)
    assert _shm_buffers() - before == set()
