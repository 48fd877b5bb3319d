"""Teacher-written training responses (``data.responses=teacher``): sequence-level distillation data.

Before the importance pass (which scores the same data) the teacher answers every training prompt once. The
prompts are split over the ranks by index; each rank generates its share, sampled per row from
(``seed``, row index) so the answers do not depend on the world size or the batch (evaluation.generation).
A teacher small enough to hold whole (half the free memory of the device, per local rank) is gathered out of
ZeRO-3 into a plain copy (``plain_copy``) that decodes without ZeRO hooks; a larger one generates in ZeRO-3
with ``synced_gpus`` (much slower: every decoding step gathers every layer). Each answer is cut at the first Alpaca section marker (``###``) that small instruction
models often echo after answering; an answer that is then empty drops its prompt (counted in the log).

Rank 0 writes ``<output_dir>/teacher_responses.jsonl`` (MiniLLM layout, the teacher's answer as ``output``)
and its recipe ``teacher_responses.json`` (teacher, data, prompt hash, generation settings). A later run in the
same directory (a resume, the prune or score job) reuses the file when the recipe matches and refuses it,
naming the difference, when it does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from flexkd_ds import __version__
from flexkd_ds.evaluation.generation import generate
from flexkd_ds.inputs import data
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.inputs.synthetic import write_jsonl
from flexkd_ds.runtime.dist import DistEnv, all_gather_objects, barrier
from flexkd_ds.runtime.engines import gathered

logger = logging.getLogger("flexkd_ds")

RESPONSES_FILE = "teacher_responses.jsonl"
RECIPE_FILE = "teacher_responses.json"
_SECTION = re.compile(r"\n\s*###")


def clean_response(text: str) -> str:
    """The answer up to the first ``###`` section marker on a new line, stripped."""
    return _SECTION.split(text, maxsplit=1)[0].strip()


def response_recipe(cfg: DistillConfig, teacher_name: str, prompts: Sequence[str], split: str) -> dict:
    """What determines the responses; a cache is reused only when this is equal."""
    digest = hashlib.sha256("\x00".join(prompts).encode("utf-8")).hexdigest()
    d = cfg.data
    return {
        "teacher": teacher_name,
        "data": d.valid if split == "valid" else d.train,
        "num_prompts": len(prompts),
        "prompts_sha256": digest,
        "prompt_style": d.prompt_style,
        "max_tokens": d.response_tokens,
        "temperature": d.response_temperature,
        "top_p": d.response_top_p if d.response_temperature > 0 else None,
        "seed": cfg.seed,
    }


def _paths(cfg: DistillConfig, split: str) -> tuple[Path, Path]:
    out = Path(cfg.output_dir)
    if split == "valid":
        return out / RESPONSES_FILE.replace(".jsonl", ".valid.jsonl"), out / RECIPE_FILE.replace(
            ".json", ".valid.json"
        )
    return out / RESPONSES_FILE, out / RECIPE_FILE


def _read_cache(rows_path: Path, recipe_path: Path, recipe: dict) -> list[data.InstructionRow] | None:
    if not rows_path.is_file():
        return None
    if not recipe_path.is_file():
        raise ValueError(
            f"{rows_path} has no recipe file {recipe_path.name} beside it, so it cannot be checked against this "
            "run; delete it (the teacher writes it again) or use another output_dir"
        )
    saved = json.loads(recipe_path.read_text())
    saved.pop("created_by", None)
    saved.pop("num_responses", None)
    differ = [k for k in sorted(set(saved) | set(recipe)) if saved.get(k) != recipe.get(k)]
    if differ:
        detail = "; ".join(f"{k}: file {saved.get(k)!r}, this run {recipe.get(k)!r}" for k in differ)
        raise ValueError(
            f"{rows_path} was written for other settings ({detail}). Delete it and {recipe_path.name} for the "
            "teacher to write new responses, or use another output_dir"
        )
    loaded = data.load_instruction_rows(rows_path)
    return loaded.rows


def _record(row: data.InstructionRow, answer: str) -> dict:
    """The MiniLLM-layout record of ``row`` with ``answer`` as its output (other columns kept)."""
    record = {**row.meta, "instruction": row.instruction, "input": row.input, "output": answer}
    if row.prompt is not None:
        record["prompt"] = row.prompt
    return record


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A whole, hook-free copy of a (possibly ZeRO-3 partitioned) Hugging Face causal LM, in eval mode.

    Decoding through the ZeRO-3 engine re-gathers every layer at every step even when the weights are already
    gathered (measured on 2 CPU ranks: 150 s for the first batch of 32 prompts x 96 tokens through the engine;
    with the copy, each rank's 80 prompts in 3 batches took 155 s). The copy is built on the meta device and takes
    the gathered tensors, so it costs one teacher's memory; a model that is already whole is returned as is."""
    from transformers import AutoModelForCausalLM

    from flexkd_ds.inputs.models import dtype_kwarg

    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return model.eval()  # already whole and hook-free (e.g. the ablate job's plain teacher)
    persistent = model.state_dict().keys()
    with gathered(list(model.parameters())):
        state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if name not in persistent}
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config, **dtype_kwarg(next(iter(state.values())).dtype))
    copy.load_state_dict(state, strict=False, assign=True)
    for name, buffer in buffers.items():
        module_name, _, buffer_name = name.rpartition(".")
        copy.get_submodule(module_name).register_buffer(buffer_name, buffer, persistent=False)
    copy.tie_weights()
    missing = [n for n, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if missing:
        raise RuntimeError(f"internal: the generation copy of the teacher lacks {missing[:5]}")
    return copy.eval()


def _fits_whole(model: torch.nn.Module, device: torch.device, world_size: int) -> bool:
    """Whether every local rank can hold the whole teacher at once, in half the free memory."""
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    need = numel * next(model.parameters()).element_size()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return need <= free // 2
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)
    return need * local <= psutil.virtual_memory().available // 2


def teacher_responses(
    cfg: DistillConfig,
    engine,
    rows: Sequence[data.InstructionRow],
    tokenizer,
    env: DistEnv,
    teacher_name: str,
    split: str = "train",
) -> list[data.InstructionRow]:
    """``rows`` with the teacher's answers as responses (prompts whose answer is empty are dropped)."""
    prompts = [data.render_prompt(row, tokenizer, cfg.data.prompt_style) for row in rows]
    recipe = response_recipe(cfg, teacher_name, prompts, split)
    rows_path, recipe_path = _paths(cfg, split)
    cached = _read_cache(rows_path, recipe_path, recipe)
    if cached is not None:
        logger.info("reusing %d teacher responses from %s", len(cached), rows_path)
        return cached

    model = engine.module if hasattr(engine, "module") else engine
    mine = list(range(env.rank, len(prompts), env.world_size))
    whole = all(all_gather_objects(_fits_whole(model, env.device, env.world_size)))  # every rank agrees
    per_rank = -(-len(prompts) // env.world_size)
    if not whole:  # synced ZeRO-3: every rank runs the same number of batches (padding repeats a prompt)
        mine = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    d = cfg.data
    sample = d.response_temperature > 0
    if env.is_main:
        logger.info(
            "the teacher writes %d %s responses (at most %d tokens, %s) %s",
            len(prompts), split, d.response_tokens,
            f"temperature {d.response_temperature}, top-p {d.response_top_p}" if sample else "greedy",
            "with a whole copy on every rank" if whole else "in ZeRO-3 (synced ranks)",
        )  # fmt: skip
    started = time.perf_counter()
    generator = plain_copy(model) if whole else model
    try:
        texts = generate(
            generator,
            tokenizer,
            [prompts[i] for i in mine],
            max_new_tokens=d.response_tokens,
            batch_size=d.response_batch_size,
            do_sample=sample,
            seed=cfg.seed,
            temperature=d.response_temperature if sample else 1.0,
            top_p=d.response_top_p,
            max_prompt_length=d.max_prompt_length,
            synced_gpus=not whole and env.world_size > 1,
            progress=env.is_main,
            indices=mine,
        )
    finally:
        del generator
    answers: dict[int, str] = {}
    for part in all_gather_objects(list(zip(mine, texts, strict=True))):
        for index, text in part:
            answers.setdefault(index, clean_response(text))
    out_rows, records, dropped = [], [], 0
    for index, row in enumerate(rows):
        answer = answers[index]
        if not answer:
            dropped += 1
            continue
        records.append(_record(row, answer))
        out_rows.append(
            data.InstructionRow.from_record(records[-1], source=str(rows_path), row_number=len(out_rows) + 1)
        )
    if not out_rows:
        raise ValueError(
            f"the teacher's answers to all {len(rows)} {split} prompts were empty after cleaning; check the teacher "
            "and data.prompt_style (an instruction model may need prompt_style=chat)"
        )
    if env.is_main:
        write_jsonl(records, rows_path)  # atomic: temp file + rename
        recipe_path.write_text(
            json.dumps(
                {**recipe, "num_responses": len(out_rows), "created_by": f"flexkd_ds {__version__}"}, indent=1
            )
            + "\n"
        )
        lengths = [len(tokenizer(r.response, add_special_tokens=False)["input_ids"]) for r in out_rows]
        logger.info(
            "teacher responses: %d written to %s in %.0f s (%d empty after cleaning, dropped); %.0f tokens on "
            "average, %d hit the %d-token limit",
            len(out_rows), rows_path, time.perf_counter() - started, dropped,
            sum(lengths) / len(lengths), sum(n >= d.response_tokens for n in lengths), d.response_tokens,
        )  # fmt: skip
    barrier()
    return out_rows
