"""Cutting the student out of the teacher: each tensor routed to its rule and sliced (``prune_tensor``), the
student assembled in memory (``prune_model``, ``assemble_student``) or streamed from a safetensors
checkpoint (``prune_checkpoint``). Package doc: ``flexkd_ds.method.prune``."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from flexkd_ds.inputs.models import resolve_dtype
from flexkd_ds.method.prune.plan import (
    DROP,
    FAMILIES,
    KEEP,
    PrunePlan,
    _Family,
    _Shapes,
    pruned_config,
    teacher_shapes,
)
from flexkd_ds.method.prune.statistics import _unwrap

logger = logging.getLogger(__name__)


# ---- Building the student ----------------------------------------------------------------------------


def _split_prefix(name: str, family: _Family) -> tuple[str, str]:
    """(base-model prefix or "", the rest) of a tensor name."""
    prefix = next((p for p in family.prefixes if name.startswith(p)), "")
    return prefix, name[len(prefix) :]


def _layer_of(core: str, family: _Family) -> tuple[int, int, str] | None:
    """(stack, layer index in the teacher's stack, the rest of the name) of a layer tensor's name, else None."""
    for stack, path in enumerate(family.stacks):
        match = re.match(rf"^{re.escape(path)}\.(\d+)\.(.+)$", core)
        if match:
            return stack, int(match[1]), match[2]
    return None


def _route(name: str, plan: PrunePlan, shapes: _Shapes) -> tuple:
    """(student name or None when dropped, rule, flat kept-layer position, stack-local student layer, norm-scale
    key) of teacher tensor ``name``; the two layer positions are None outside the layers."""
    family = FAMILIES[shapes.family]
    prefix, core = _split_prefix(name, family)
    found = _layer_of(core, family)
    if found is not None:
        stack, local, rest = found
        rule = family.layer_rules.get(rest)
        if rule is None:
            raise ValueError(f"unknown {shapes.family} layer tensor {name!r}: no pruning rule for {rest!r}")
        if local >= shapes.stacks[stack]:
            raise ValueError(
                f"tensor {name!r} is in layer {local} but the teacher has {shapes.stacks[stack]}"
            )
        teacher_layer = shapes.offset(stack) + local
        if rule == DROP or teacher_layer not in plan.layers:
            return None, rule, None, None, None
        position = plan.layers.index(teacher_layer)
        student_layer = sum(shapes.stack_of(i) == stack for i in plan.layers[:position])
        norm = rest.rsplit(".", 1)[0] if rest.endswith(".weight") else None
        path = family.stacks[stack]
        key = f"{path}.{local}.{norm}" if norm in family.layer_norms else None
        return f"{prefix}{path}.{student_layer}.{rest}", rule, position, student_layer, key
    rule = family.global_rules.get(core)
    if rule is None:
        raise ValueError(
            f"unknown {shapes.family} tensor {name!r}: no pruning rule for it (supported names: "
            f"{sorted(family.global_rules)} and per-layer {sorted(family.layer_rules)})"
        )
    norm = core.rsplit(".", 1)[0] if core.endswith(".weight") else None
    key = norm if norm in family.global_norms else None
    return (None if rule == DROP else name), rule, None, None, key


def _selection(
    selector: str, plan: PrunePlan, shapes: _Shapes, layer: int | None, stack_layer: int | None
) -> tuple[int, list[int] | None]:
    """(teacher size of the dim, kept indices in student order or None for all) for one rule letter; ``layer``
    is the flat kept-layer position, ``stack_layer`` the position among its stack's kept layers."""
    residual_units = None if shapes.projected else plan.units
    if selector == "E":
        return shapes.d_teacher, plan.units
    if selector == "R":
        return shapes.residual, residual_units
    if selector == "N":
        return shapes.intermediate, None if plan.mlp_neurons is None else plan.mlp_neurons[layer]
    if selector == "P":
        return shapes.pooler, plan.pooler
    if selector == "X":
        heads = None if plan.cross_heads is None else plan.cross_heads[stack_layer]
    else:
        heads = None if plan.heads is None else plan.heads[layer]
    channels = (
        None if heads is None else [h * shapes.head_dim + c for h in heads for c in range(shapes.head_dim)]
    )
    if selector in "HX":
        return shapes.num_heads * shapes.head_dim, channels
    width = shapes.residual  # "Q": GPT-2's c_attn output is q | k | v, each (heads * head_dim)
    return 3 * width, None if channels is None else [part * width + c for part in range(3) for c in channels]


def prune_tensor(
    name: str, tensor: Tensor, plan: PrunePlan, teacher_config: PretrainedConfig
) -> list[tuple[str, Tensor]]:
    """The student's ``(name, tensor)`` pairs cut from teacher tensor ``name``: one pair, or none when the
    tensor belongs to a dropped layer (layers renumber 0..k-1) or is an obsolete buffer.

    ``name`` is a ``state_dict`` or safetensors name, with or without the base-model prefix (``model.``,
    ``model.decoder.``/``decoder.``, ``transformer.``); the student name keeps it. Dims are cut by units (in
    plan order), heads and neurons; norm weights are multiplied by their ``plan.norm_scales`` factor.
    Raises ``ValueError`` for an unknown name or a shape that does not fit the teacher config.
    """
    shapes = teacher_shapes(teacher_config)
    new_name, rule, layer, stack_layer, norm_key = _route(name, plan, shapes)
    if new_name is None:
        return []
    if rule == KEEP:
        return [(new_name, tensor)]
    if tensor.dim() != len(rule):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {len(rule)} dims")
    selections = [
        (dim, *_selection(s, plan, shapes, layer, stack_layer)) for dim, s in enumerate(rule) if s is not None
    ]
    for dim, size, _ in selections:
        if tensor.shape[dim] != size:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}; dim {dim} should be {size} for "
                "this teacher config: is it the right checkpoint?"
            )
    for dim, size, index in selections:
        if index is not None:
            index_tensor = torch.tensor(index, device=tensor.device)
            if int(index_tensor.min()) < 0 or int(index_tensor.max()) >= size:
                raise ValueError(f"plan indices for {name!r} dim {dim} fall outside [0, {size})")
            tensor = tensor.index_select(dim, index_tensor)
    if norm_key is not None and plan.norm_scales is not None:
        if norm_key not in plan.norm_scales:
            raise ValueError(f"plan.norm_scales has no entry for norm {norm_key!r} (tensor {name!r})")
        compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        tensor = (tensor.to(compute) * plan.norm_scales[norm_key]).to(tensor.dtype)
    return [(new_name, tensor)]


def _student_class(config: PretrainedConfig, model_class: type | None = None) -> type:
    """``model_class``, else the config's first architecture (``BertForSequenceClassification``, ...), else
    ``AutoModelForCausalLM``."""
    if model_class is not None:
        return model_class
    import transformers

    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], AutoModelForCausalLM) if names else AutoModelForCausalLM


def _meta_student(config: PretrainedConfig, model_class: type | None = None) -> PreTrainedModel:
    cls = _student_class(config, model_class)
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


def prune_model(teacher: torch.nn.Module, plan: PrunePlan) -> PreTrainedModel:
    """The student of ``plan`` cut from an in-memory ``teacher`` (full parameters), in its dtype and device,
    in eval mode, of the teacher's class (a causal LM, a sequence classifier, a seq2seq LM); its embeddings and
    LM head are tied when the teacher's config ties them."""
    teacher = _unwrap(teacher)
    if any(getattr(p, "ds_numel", None) is not None for p in teacher.parameters()):
        raise ValueError("the teacher's parameters are ZeRO-3 partitions: save it and use prune_checkpoint")
    state = teacher.state_dict()
    student_state = {}
    for name, tensor in state.items():
        student_state.update(prune_tensor(name, tensor.detach(), plan, teacher.config))
    buffers = {name: b for name, b in teacher.named_buffers() if name not in state}
    return assemble_student(teacher.config, plan, student_state, buffers, model_class=type(teacher))


def assemble_student(
    teacher_config: PretrainedConfig,
    plan: PrunePlan,
    student_state: Mapping[str, Tensor],
    teacher_buffers: Mapping[str, Tensor],
    *,
    model_class: type | None = None,
) -> PreTrainedModel:
    """The student of ``plan`` from tensors already cut by ``prune_tensor`` (student names; a tied LM head may
    be left out), in their dtype and device, in eval mode. ``teacher_buffers``: the teacher's non-persistent
    buffers (rotary ``inv_freq``; teacher names), which no state dict holds and are passed through.
    ``model_class``: the student's class (the teacher's; None: the config's architecture, else a causal LM)."""
    config = pruned_config(teacher_config, plan)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    first = next(iter(student_state.values()))
    student = _meta_student(config, model_class).to(first.dtype)
    groups: dict[
        int, set[str]
    ] = {}  # tied parameters (LM head = embedding; BART's three embeddings) by identity
    for name, param in student.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    student.to_empty(device=first.device)
    missing, unexpected = student.load_state_dict(dict(student_state), strict=False)
    loaded = set(student_state)
    aliases = {name: group - {name} for group in groups.values() for name in group}
    missing = [m for m in missing if not (tied and aliases.get(m, set()) & loaded)]
    if missing or unexpected:
        raise ValueError(
            f"the cut tensors do not fit the student: missing {missing}, unexpected {unexpected}"
        )
    student_buffers = dict(student.named_buffers())
    unset = {name for name in student_buffers if name not in student_state}
    for name, buffer in teacher_buffers.items():
        for new_name, value in prune_tensor(name, buffer, plan, teacher_config):
            student_buffers[new_name].copy_(value)
            unset.discard(new_name)
    if unset:
        raise ValueError(f"student buffers {sorted(unset)} have no teacher counterpart to copy")
    if tied:
        student.tie_weights()
    return student.eval()


# ---- Streaming a checkpoint --------------------------------------------------------------------------


def _byte_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be an int (bytes) or like '5GB', '500MiB'; got {size!r}")
    unit = (match[2] or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match[1]) * factor)


def _source_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return [src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    found = sorted(p.name for p in src.iterdir()) if src.is_dir() else "not a directory"
    raise ValueError(
        f"{src} holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json; "
        f"found {found}); convert it with save_pretrained(safe_serialization=True)"
    )


def prune_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    plan: PrunePlan,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    model_class: type | None = None,
) -> Path:
    """Write the student of ``plan`` from the HF safetensors checkpoint in ``src_dir`` to ``dst_dir``.

    Reads one tensor at a time (``safe_open``), so the teacher is never whole in memory; the student is held
    one output shard at a time. Writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards
    and ``model.safetensors.index.json`` past ``max_shard_size``), ``config.json`` and a copy of
    ``generation_config.json``. ``dtype`` casts floating tensors (None: as stored). ``model_class``: the
    student's class (None: the config's first architecture). Returns ``dst_dir``.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    files = _source_files(src)
    teacher_config = AutoConfig.from_pretrained(src)
    config = pruned_config(teacher_config, plan)
    shapes = teacher_shapes(teacher_config)
    target = None if dtype is None else resolve_dtype(dtype)
    limit = _byte_size(max_shard_size)
    if dst.resolve() == src.resolve() or list(dst.glob("model*.safetensors*")):
        raise ValueError(f"{dst} already holds a checkpoint (or is the source): write to an empty directory")

    # Route every name first: an unknown tensor or a missing student tensor fails before anything is written.
    family, names = FAMILIES[shapes.family], []
    for file in files:
        with safe_open(file, framework="pt") as reader:
            names += list(reader.keys())
    written = {_split_prefix(new, family)[1] for new in (_route(n, plan, shapes)[0] for n in names) if new}
    meta = _meta_student(config, model_class)
    missing = {_split_prefix(name, family)[1] for name in meta.state_dict()} - written
    if getattr(config, "tie_word_embeddings", False):  # aliases of a tensor the checkpoint holds
        groups: dict[int, set[str]] = {}
        for name, param in meta.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), set()).add(_split_prefix(name, family)[1])
        missing = {m for m in missing if not any(m in g and g & written for g in groups.values())}
    if missing:
        raise ValueError(f"{src} lacks tensors the student needs: {sorted(missing)[:8]}")

    dst.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []  # tensor names of each written shard

    def write(shard: dict[str, Tensor]) -> None:
        save_file(shard, str(dst / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
        shards.append(list(shard))

    shard, shard_bytes, total = {}, 0, 0
    try:
        for file in files:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    for new_name, tensor in prune_tensor(name, reader.get_tensor(name), plan, teacher_config):
                        if target is not None and tensor.is_floating_point():
                            tensor = tensor.to(target)
                        size = tensor.numel() * tensor.element_size()
                        if shard and shard_bytes + size > limit:
                            write(shard)
                            shard, shard_bytes = {}, 0
                        shard[new_name] = tensor.contiguous()
                        shard_bytes, total = shard_bytes + size, total + size
        write(shard)
    except BaseException:
        for i in range(len(shards)):
            (dst / f"shard-{i:05d}.tmp").unlink(missing_ok=True)
        raise
    count, weight_map = len(shards), {}
    for i, shard_names in enumerate(shards):
        final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(dst / f"shard-{i:05d}.tmp", dst / final)
        weight_map |= dict.fromkeys(shard_names, final)
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if target is not None:
        config.dtype = target
    config.save_pretrained(dst)
    if (src / "generation_config.json").is_file():
        (dst / "generation_config.json").write_bytes((src / "generation_config.json").read_bytes())
    logger.info(
        "pruned %s -> %s: %d tensors in %d shard(s), %.1f MB", src, dst, len(weight_map), count, total / 1e6
    )
    return dst
