"""DeepSpeed dicts: load a ``ds_configs/*.json`` file, resolve its precision for the device, and fill the
batch sizes (the one function that does, checking micro x accumulation x world = global batch). Pure python."""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Mapping
from typing import Any

from flexkd_ds.inputs.config import ConfigError, _check, resolve_path, resolved_dtype

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

_OWNED_KEYS = {  # keys the jobs set from this config; a file that set them too would fight it
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr / betas / weight_decay / adam_eps",
    "scheduler": "train.lr_schedule / warmup_steps / min_lr_ratio",
    "tensorboard": "deepspeed.tensorboard",
}
# DeepSpeed ignores unknown top-level keys: a 'zero_optimisation' typo would silently turn ZeRO off.
_COMMON_DS_KEYS = ("zero_optimization", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown", "data_types",
                   "activation_checkpointing", "communication_data_type", "flops_profiler", "comms_logger")  # fmt: skip


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def load_ds_config(path: str | os.PathLike, key: str = "deepspeed config") -> dict:
    """A DeepSpeed JSON file (relative: current directory, then project root) with DeepSpeed settings only."""
    p = resolve_path(path, key)
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: cannot parse {p}: {e}", key) from None
    _check(isinstance(ds, dict), key, f"{key}: {p} must hold a JSON object")
    _check(not set(BATCH_KEYS) & set(ds), key, f"batch sizes come from train.* — remove them from {p}")
    for k in ds:
        _check(k not in _OWNED_KEYS, key, f"'{k}' comes from {_OWNED_KEYS.get(k)} — remove it from {p}")
        close = difflib.get_close_matches(k, _COMMON_DS_KEYS, n=1, cutoff=0.8)
        _check(k in _COMMON_DS_KEYS or not close, key, f"unknown key {k!r} in {p}; did you mean {close}?")
    stray = [k for k in _auto_keys(ds) if k not in ("bf16.enabled", "fp16.enabled")]
    _check(
        not stray,
        key,
        f"{p}: only bf16.enabled / fp16.enabled may be \"auto\"; DeepSpeed silently replaces 'auto' by its "
        f"default, so set {', '.join(stray)} to concrete values",
    )
    try:
        zero_stage(ds)
    except ConfigError as e:
        raise ConfigError(f"{e} in {p}", key) from None
    return ds


def zero_stage(ds_dict: Mapping[str, Any]) -> int:
    """The ZeRO stage (0-3) of a DeepSpeed dict; 0 without a zero_optimization section."""
    stage = (ds_dict.get("zero_optimization") or {}).get("stage", 0)
    _check(type(stage) is int and 0 <= stage <= 3, (), f"zero_optimization.stage must be 0-3; got {stage!r}")
    return stage


def fill_batch_sizes(
    ds_dict: Mapping[str, Any],
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    global_batch_size: int | None = None,
) -> dict:
    """A copy of ``ds_dict`` with the three DeepSpeed batch keys: the one place they are set.

    ``train_batch_size = micro_batch_size x grad_accum x world_size``; ``global_batch_size``, when given,
    must equal it (``ValueError`` naming all four numbers otherwise).
    """
    for name, v in (
        ("micro_batch_size", micro_batch_size),
        ("grad_accum", grad_accum),
        ("world_size", world_size),
    ):
        if type(v) is not int or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    total = micro_batch_size * grad_accum * world_size
    if global_batch_size is not None and global_batch_size != total:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} != train.micro_batch_size={micro_batch_size} x "
            f"train.grad_accum={grad_accum} x world_size={world_size} = {total}; change one of them or set "
            "train.global_batch_size=null"
        )
    values = dict(zip(BATCH_KEYS, (total, micro_batch_size, grad_accum), strict=True))
    clash = {k: ds_dict[k] for k in BATCH_KEYS if k in ds_dict and ds_dict[k] != values[k]}
    if clash:
        raise ValueError(f"the DeepSpeed dict already holds other batch sizes {clash}; expected {values}")
    return {**copy.deepcopy(dict(ds_dict)), **values}


def resolve_precision(ds_dict: Mapping[str, Any], device_type: str, dtype: str = "auto") -> dict:
    """A copy of ``ds_dict`` whose ``bf16`` / ``fp16`` ``enabled`` flags are booleans.

    ``"auto"`` (or a missing section) follows ``dtype`` (model.dtype; auto = bf16 on GPU, fp32 on CPU). An
    explicit boolean in the file wins over ``dtype="auto"`` and must agree with any other dtype. Run this
    before DeepSpeed sees the dict: DeepSpeed drops ``"auto"`` and would silently run in fp32.
    """
    want = resolved_dtype(dtype, device_type)
    out = copy.deepcopy(dict(ds_dict))
    for name in ("bf16", "fp16"):
        section = dict(out.get(name) or {})
        flag = section.get("enabled", "auto")
        if flag == "auto":
            section["enabled"] = want == name
        elif not isinstance(flag, bool):
            raise ValueError(f'{name}.enabled must be true, false or "auto"; got {flag!r}')
        elif dtype != "auto" and flag != (want == name):
            raise ValueError(f"model.dtype={dtype} contradicts {name}.enabled={flag} in the DeepSpeed config")
        if section["enabled"] or name in out:
            out[name] = section
    enabled = [n for n in ("bf16", "fp16") if out.get(n, {}).get("enabled")]
    if len(enabled) > 1:
        raise ValueError("bf16.enabled and fp16.enabled are both true in the DeepSpeed config")
    if device_type == "cpu" and "fp16" in enabled:
        raise ValueError("fp16 is not supported on CPU; use model.dtype=bf16 or fp32")
    return out
