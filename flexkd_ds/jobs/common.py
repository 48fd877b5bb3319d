"""What the score and distill jobs share: resolving the models, tokenizer and data, checking the pair, the
teacher engine, and the importance file (reuse / recompute / refuse)."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from flexkd_ds import __version__
from flexkd_ds.inputs import data, models, pairs
from flexkd_ds.inputs.byte_tokenizer import BYTE_TOKENIZER_NAME, byte_tokenizer
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.method.importance import ImportanceFile, load_importance
from flexkd_ds.runtime.dist import DistEnv, main_first, shutdown
from flexkd_ds.runtime.engines import build_teacher_engine, deepspeed_dict, engine_dtype

logger = logging.getLogger("flexkd_ds")

BUILTIN_SYNTHETIC = "builtin:synthetic"
BUILTIN_PROMPTS = "builtin:prompts"
HELDOUT_PROMPTS = 24  # data.valid=builtin:prompts: generated prompts that are not among the training prompts
HOLDOUT = "holdout"  # data.valid=holdout: data.valid_holdout rows of data.train, not trained on


def setup_logging(env: DistEnv) -> None:
    """INFO on rank 0, warnings only elsewhere; one line format."""
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(
        level=level, format=f"[flexkd rank{env.rank}] %(message)s", stream=sys.stdout, force=True
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class ModelSpec:
    """How to obtain one model: a source to load, or a config to initialise randomly."""

    name: str  # identifier written into artifacts (importance file ``teacher``)
    config: PretrainedConfig
    source: models.ModelSource | None  # None = random init from ``config``
    seed: int

    def load(self, dtype: torch.dtype):
        if self.source is None:
            return models.build_causal_lm_from_config(self.config, seed=self.seed, dtype=dtype)
        return models.load_causal_lm(self.source, dtype=dtype)

    @property
    def width(self) -> int:
        return models.lm_head_input_size(self.config)


def model_specs(cfg: DistillConfig) -> tuple[ModelSpec, ModelSpec, object]:
    """(teacher, student, tokenizer) from ``cfg.model``; no weights are loaded here."""
    m = cfg.model
    if m.teacher is not None:
        t_source = models.resolve_model_source(m.teacher, m.teacher_gguf_file)
        t_config = models.load_config(t_source)
        # The name as the user wrote it: stable across machines (a resolved site-packages path is not).
        t_name = m.teacher if m.teacher_gguf_file is None else f"{m.teacher}/{m.teacher_gguf_file}"
        teacher = ModelSpec(t_name, t_config, t_source, cfg.seed)
    else:
        arch = dict(m.teacher_arch)
        t_config = models.tiny_config(arch.pop("family", "llama"), **arch)
        teacher = ModelSpec(f"random:{_arch_name(m.teacher_arch)}", t_config, None, cfg.seed)

    if m.student is not None:
        s_source = models.resolve_model_source(m.student, m.student_gguf_file)
        s_name = m.student if m.student_gguf_file is None else f"{m.student}/{m.student_gguf_file}"
        student = ModelSpec(s_name, models.load_config(s_source), s_source, cfg.seed)
    elif m.resolved_student_init == "pruned":  # cut after the importance pass; known now: its width
        s_config = copy.deepcopy(t_config)
        # the field models.lm_head_input_size reads (d_S): the pair checks see the student's width
        width_field = {"opt": "word_embed_proj_dim", "gpt2": "n_embd"}.get(t_config.model_type, "hidden_size")
        setattr(s_config, width_field, m.student_arch["hidden_size"])
        student = ModelSpec("pruned (not cut yet)", s_config, None, cfg.seed + 1)
    else:
        arch = dict(m.student_arch)
        if arch.pop("from_teacher", False):
            s_config = models.narrow_student_config(t_config, **arch)
        else:
            s_config = models.tiny_config(arch.pop("family", "llama"), **arch)
        student = ModelSpec(f"random:{_arch_name(m.student_arch)}", s_config, None, cfg.seed + 1)

    tokenizer_source = m.tokenizer or (m.teacher if m.teacher is not None else None)
    if tokenizer_source is None:
        raise ValueError(
            "model.tokenizer is required when the teacher is built from model.teacher_arch "
            "(e.g. model.tokenizer=path/to/tokenizer)"
        )
    if tokenizer_source == BYTE_TOKENIZER_NAME:
        tokenizer = byte_tokenizer()
    elif m.tokenizer is None and m.teacher is not None:
        tokenizer = models.load_tokenizer(teacher.source)
    else:
        tokenizer = models.load_tokenizer(models.resolve_model_source(tokenizer_source))
    models.ensure_pad_token(tokenizer)
    for spec in (teacher, student):
        if spec.source is None:  # random init: generation must stop at this tokenizer's EOS
            spec.config.bos_token_id = tokenizer.bos_token_id
            spec.config.eos_token_id = tokenizer.eos_token_id
            spec.config.pad_token_id = tokenizer.pad_token_id
    return teacher, student, tokenizer


def _arch_name(arch: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(arch.items()))


def check_models(cfg: DistillConfig, teacher: ModelSpec, student: ModelSpec, tokenizer) -> None:
    """Refuse an unusable pair before anything heavy runs (vocab, tokenizer, d_S < d_T, max_length)."""
    loss = cfg.loss
    report = pairs.check_pair(
        teacher.config,
        student.config,
        tokenizer,
        tokenizer,
        need_same_vocab=loss.logit_loss != "none" and loss.beta > 0,
        need_narrower=loss.feature_loss == "flexkd",
        max_length=cfg.data.max_length,
        teacher_name=teacher.name,
        student_name=student.name,
    )
    for warning in getattr(report, "warnings", []):
        logger.warning(warning)


def needs_teacher_responses(cfg: DistillConfig, valid: bool = False) -> bool:
    """Whether the teacher writes the responses of the training (or validation) rows."""
    return cfg.data.valid == BUILTIN_PROMPTS if valid else cfg.data.responses == "teacher"


def load_rows(cfg: DistillConfig, source: str, split: str, max_rows: int | None, *, valid: bool = False):
    """Instruction rows of a dataset source, or a built-in generated set (prompt-only rows when the teacher
    writes the responses)."""
    if source == BUILTIN_SYNTHETIC:
        from flexkd_ds.inputs.synthetic import synthetic_instructions

        return synthetic_instructions(cfg.data.num_synthetic, seed=cfg.seed)
    need_output = not needs_teacher_responses(cfg, valid)
    if source == BUILTIN_PROMPTS:
        from flexkd_ds.inputs.prompts import generated_prompts

        rows = generated_prompts(cfg.data.num_synthetic, seed=cfg.seed)
        if valid:  # held out: other prompts than the training ones
            seen = {row["instruction"] for row in rows}
            more = generated_prompts(cfg.data.num_synthetic + 4 * HELDOUT_PROMPTS, seed=cfg.seed + 1)
            rows = [row for row in more if row["instruction"] not in seen][:HELDOUT_PROMPTS]
        return [
            data.InstructionRow.from_record(row, source=source, row_number=i + 1, need_output=False)
            for i, row in enumerate(rows)
        ]
    loaded = data.load_instruction_rows(
        source,
        split=split,
        on_bad_row=cfg.data.on_bad_row,
        max_rows=max_rows,
        field_map=cfg.data.field_map,
        need_output=need_output,
    )
    if loaded.num_bad:
        logger.warning("data: %s", loaded.summary())
    return loaded


def train_dataset(
    cfg: DistillConfig, tokenizer, env: DistEnv, *, valid: bool = False, engine=None, teacher_name: str = ""
) -> data.InstructionDataset | None:
    """The tokenised training set (or, with ``valid=True``, ``data.valid``; None when ``data.valid=holdout``
    holds nothing out of too small a training set). When the teacher writes the responses
    (``needs_teacher_responses``), ``engine`` is the teacher's engine (jobs.responses)."""
    source, split = (
        (cfg.data.valid, cfg.data.valid_split) if valid else (cfg.data.train, cfg.data.train_split)
    )
    holdout = cfg.data.valid == HOLDOUT
    if valid and holdout:
        source, split = cfg.data.train, cfg.data.train_split
    with main_first(env):
        rows = load_rows(
            cfg, source, split, cfg.data.max_train_rows if holdout or not valid else None, valid=valid
        )
    if holdout:
        rows = holdout_split(cfg, list(rows), valid)
        if valid and not rows:
            return None  # too few training rows to hold any out (logged by the training set's call)
    if needs_teacher_responses(cfg, valid):
        from flexkd_ds.jobs.responses import teacher_responses

        if engine is None:
            raise RuntimeError("internal: the teacher writes the responses but no teacher engine was passed")
        rows = teacher_responses(
            cfg, engine, list(rows), tokenizer, env, teacher_name, "valid" if valid else "train"
        )
    with main_first(env):
        return data.InstructionDataset(
            rows,
            tokenizer,
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
            prompt_style=cfg.data.prompt_style,
            eager=True,
            show_progress=env.is_main,
        )


def holdout_split(cfg: DistillConfig, rows: list, valid: bool) -> list:
    """``data.valid=holdout``: ``data.valid_holdout`` rows of the training rows, chosen by a ``cfg.seed``
    shuffle, are the validation set and are not trained on; with fewer than 10x as many rows nothing is held
    out (and the validation set is empty)."""
    n = cfg.data.valid_holdout
    if len(rows) < 10 * n:
        if not valid:
            logger.info(
                "data.valid=holdout: %d training rows are too few to hold out %d; no validation", len(rows), n
            )
        return [] if valid else rows
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:n])
    if not valid:
        logger.info("data.valid=holdout: %d of %d rows of %s held out for validation (not trained on)",
                    n, len(rows), cfg.data.train)  # fmt: skip
    return [row for i, row in enumerate(rows) if (i in held) == valid]


def teacher_engine(cfg: DistillConfig, teacher: ModelSpec, env: DistEnv, micro_batch_size: int):
    """The teacher's ZeRO-3 inference engine (its own DeepSpeed config)."""
    ds_dict = deepspeed_dict(
        cfg.deepspeed.teacher_config,
        micro_batch_size=micro_batch_size,
        grad_accum=1,
        world_size=env.world_size,
        dtype=cfg.model.dtype,
    )
    if teacher.source is not None and teacher.source.kind == "gguf":
        logger.info(
            "teacher %s is a GGUF file: transformers materialises it on every rank before DeepSpeed shards it",
            teacher.name,
        )
    # A random teacher is built whole (one seed, one model whatever the sharding; see engine.sharded_init).
    return build_teacher_engine(
        lambda: teacher.load(engine_dtype(ds_dict)), ds_dict, sharded=teacher.source is not None
    )


def importance_metadata(cfg: DistillConfig, teacher: ModelSpec, accumulator, tail: float) -> dict:
    return {
        "teacher": teacher.name,
        "layer": "last_hidden_state",
        "functional": cfg.importance.functional,
        "num_examples": accumulator.num_examples,
        "num_tokens": accumulator.num_tokens,
        "tail_mass": f"{tail:.6f}",
        "dataset": cfg.data.train,
        "seed": cfg.seed,
        "created_by": f"flexkd_ds {__version__}",
    }


def existing_importance(cfg: DistillConfig, teacher: ModelSpec, d_student: int) -> ImportanceFile | None:
    """The importance file to reuse, None to compute one; raises on a file made for another pair."""
    path = cfg.importance.resolved_path(cfg.output_dir)
    if cfg.importance.recompute or not Path(path).is_file():
        return None
    found = load_importance(path)
    found.check_matches(
        teacher=teacher.name,
        d_teacher=teacher.width,
        d_student=d_student,
        functional=cfg.importance.functional,
    )
    return found


# Errors a user can fix from the message alone: a config, data, pair or file-contract problem, a missing
# package. Anything else (a torch RuntimeError, a bug) keeps its traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, ImportError)
TRACEBACK_ENV = "FLEXKD_TRACEBACK"


@contextlib.contextmanager
def expected_errors(prog: str):
    """For a launch script's ``main``: an expected error prints one line ``<prog>: error: <message>`` on rank 0
    (no traceback; ``FLEXKD_TRACEBACK=1`` shows it) and every rank exits non-zero (2 for a config error, else
    1), so the launcher's output ends with the reason instead of two tracebacks."""
    from flexkd_ds.inputs.config import ConfigError

    try:
        yield
        shutdown()  # every rank got here: no collective is pending
    except EXPECTED_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        rank = int(os.environ.get("RANK", "0") or 0)
        if rank == 0:
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(error, ConfigError) else 1)


def name_student(config, what: str, teacher_name: str, **record) -> None:
    """Give a written student its own name: a GGUF-derived config carries the teacher's (general.name, as
    ``_model_name_or_path``), which the student's config.json would otherwise repeat. ``flexkd_ds`` records
    where it came from."""
    config._model_name_or_path = f"{what} (flexkd-ds) of {teacher_name}"
    config.flexkd_ds = {"made_by": f"flexkd_ds {__version__}", "teacher": teacher_name, **record}
