"""Importance-guided structured pruning: a narrower, shallower student cut out of the teacher (Minitron).

Flex-KD ranks the units of the teacher's LM-head input and keeps ``units`` (d_S,) in rank order. In a pre-norm
transformer those coordinates are the residual stream's at every layer, so student unit m starts as teacher
unit ``units[m]`` (file order, not sorted) in the embeddings, every read and write of the residual, the norms
and the LM head. OPT with ``word_embed_proj_dim != hidden_size`` is the exception: the units index the
projected width, so only ``embed_tokens``, ``lm_head``, ``project_in`` (input) and ``project_out`` (output)
are sliced and the residual keeps ``hidden_size``. The rest is ranked on calibration batches of the full
teacher (``collect_prune_statistics``), every statistic a mean over valid (mask == 1) tokens:

- depth: block importance ``1 - cos(x_in, x_out)`` of each layer; the ``num_layers`` most important are kept,
  in their original order and renumbered 0..k-1.
- MLP: magnitude ``|a|`` at the down projection's input; the top ``intermediate_size`` neurons per layer.
- heads (OPT, GPT-2): the attention width there is the residual width (head_dim = hidden / heads is fixed),
  so a residual of d_S keeps ``d_S / head_dim`` whole heads per layer: those with the largest mean L2 norm of
  their output before the output projection. LLaMA sets ``head_dim`` apart from the width and keeps all heads.
- norms: a norm's statistic runs over all d_T channels in the teacher, over d_S in the student. RMSNorm
  ``y = w x / rms(x)``: the student's ``w[units] x_S / rms(x_S)`` matches the teacher's ``y[units]`` when its
  weight is ``w[units] * rms(x_S) / rms(x)``; the scale is that ratio's token mean. LayerNorm
  ``y = w (x - mu) / sigma + b``: the weight gets the mean ``std(x_S) / std(x)`` and the bias is only sliced,
  because ``b`` is added after the normalisation and does not depend on sigma (scaling it too would move every
  output by ``(s - 1) b``). Measured on a 64-wide LayerNorm with random affine, d_S = 32: relative error of
  the student's output against the teacher's ``y[units]`` when a massive-activation channel (+20) is dropped,
  1.31 uncalibrated, 0.27 scaling w, 0.48 scaling w and b (kept: 0.28, 0.12, 0.16); on iid inputs all three
  are within 1% of each other. The mean shift ``mu - mu_S`` is left uncorrected: it varies per token.

Pure torch + transformers. The hooks read activations only, never parameters, so the statistics also come out
of a ZeRO-3 engine (partitioned parameters, full activations); ``PruneStatistics.state_tensor`` packs them for
one all-reduce. ``prune_checkpoint`` streams a safetensors checkpoint tensor by tensor.
"""

from __future__ import annotations

import copy
import json
import logging
import operator
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from flexkd_ds.inputs.models import resolve_dtype

logger = logging.getLogger(__name__)

# ---- Families: where things live and how each parameter is cut ---------------------------------------
# A rule gives, per tensor dim, what selects along it: "E" LM-head-input units, "R" residual units, "H"
# channels of the kept heads, "Q" GPT-2's fused q|k|v head channels, "N" kept MLP neurons, None: whole dim.
# KEEP passes the tensor through (rotary buffers, unpruned biases); DROP discards it.
KEEP, DROP = "keep", "drop"
_QKV = {f"self_attn.{p}_proj.{k}": r for p in "qkv" for k, r in (("weight", ("H", "R")), ("bias", ("H",)))}
_OPT_NORMS = ("self_attn_layer_norm", "final_layer_norm")


@dataclass(frozen=True)
class _Family:
    base: str  # base-model path inside the *ForCausalLM
    prefixes: tuple[str, ...]  # name prefixes of base-model tensors in state dicts and checkpoints
    layers: str  # name of the layer list
    layer_norms: tuple[str, ...]
    final_norm: str
    rms_norm: bool
    attn_out: str  # its input is the heads' concatenated output (B, T, heads * head_dim)
    mlp_out: str  # its input is the MLP activation (B, T, intermediate)
    layer_rules: dict[str, object]
    global_rules: dict[str, object]


FAMILIES: dict[str, _Family] = {
    "llama": _Family(
        "model", ("model.",), "layers", ("input_layernorm", "post_attention_layernorm"), "norm", True,
        "self_attn.o_proj", "mlp.down_proj",
        {**{f"self_attn.{p}_proj.weight": (None, "R") for p in "qkv"},
         **{f"self_attn.{p}_proj.bias": KEEP for p in "qkv"},
         "self_attn.o_proj.weight": ("R", None), "self_attn.o_proj.bias": ("R",),
         "mlp.gate_proj.weight": ("N", "R"), "mlp.up_proj.weight": ("N", "R"), "mlp.gate_proj.bias": ("N",),
         "mlp.up_proj.bias": ("N",), "mlp.down_proj.weight": ("R", "N"), "mlp.down_proj.bias": ("R",),
         "input_layernorm.weight": ("R",), "post_attention_layernorm.weight": ("R",),
         "self_attn.rotary_emb.inv_freq": KEEP},
        {"embed_tokens.weight": (None, "E"), "norm.weight": ("R",), "lm_head.weight": (None, "E"),
         "lm_head.bias": KEEP, "rotary_emb.inv_freq": KEEP, "rotary_emb.original_inv_freq": KEEP},
    ),
    "opt": _Family(
        "model.decoder", ("model.decoder.", "decoder."), "layers", _OPT_NORMS,
        "final_layer_norm", False, "self_attn.out_proj", "fc2",
        {**_QKV, "self_attn.out_proj.weight": ("R", "H"), "self_attn.out_proj.bias": ("R",),
         "fc1.weight": ("N", "R"), "fc1.bias": ("N",), "fc2.weight": ("R", "N"), "fc2.bias": ("R",),
         **{f"{norm}.{kind}": ("R",) for norm in _OPT_NORMS for kind in ("weight", "bias")}},
        {"embed_tokens.weight": (None, "E"), "embed_positions.weight": (None, "R"),
         "project_in.weight": (None, "E"), "project_out.weight": ("E", None),
         "final_layer_norm.weight": ("R",), "final_layer_norm.bias": ("R",), "lm_head.weight": (None, "E")},
    ),
    # GPT-2's Conv1D stores weights (in, out), transposed against nn.Linear.
    "gpt2": _Family(
        "transformer", ("transformer.",), "h", ("ln_1", "ln_2"), "ln_f", False, "attn.c_proj", "mlp.c_proj",
        {"ln_1.weight": ("R",), "ln_1.bias": ("R",), "ln_2.weight": ("R",), "ln_2.bias": ("R",),
         "attn.c_attn.weight": ("R", "Q"), "attn.c_attn.bias": ("Q",),
         "attn.c_proj.weight": ("H", "R"), "attn.c_proj.bias": ("R",),
         "mlp.c_fc.weight": ("R", "N"), "mlp.c_fc.bias": ("N",),
         "mlp.c_proj.weight": ("N", "R"), "mlp.c_proj.bias": ("R",),
         # causal-mask buffers of old GPT-2 checkpoints: the model rebuilds them, transformers ignores them
         "attn.bias": DROP, "attn.masked_bias": DROP},
        {"wte.weight": (None, "E"), "wpe.weight": (None, "R"), "ln_f.weight": ("R",), "ln_f.bias": ("R",),
         "lm_head.weight": (None, "E")},
    ),
}  # fmt: skip


@dataclass(frozen=True)
class _Shapes:
    """The teacher's widths, read from its config."""

    family: str
    d_teacher: int  # LM-head input width, the space of ``units``
    residual: int
    num_heads: int
    head_dim: int
    intermediate: int
    num_layers: int

    @property
    def projected(self) -> bool:  # OPT project_in/out: units index the projection, not the residual
        return self.d_teacher != self.residual


def _family_name(config: PretrainedConfig) -> str:
    name = getattr(config, "model_type", None)
    if name not in FAMILIES:
        raise ValueError(
            f"pruning does not support model family {name!r} ({type(config).__name__}); supported: "
            f"{sorted(FAMILIES)} (LlamaForCausalLM, OPTForCausalLM, GPT2LMHeadModel)"
        )
    return name


def teacher_shapes(config: PretrainedConfig) -> _Shapes:
    """The widths pruning reads from a teacher config (d_T, residual, heads, head_dim, MLP, layers); raises
    ``ValueError`` naming the family when it is not supported."""
    family = _family_name(config)
    if family == "gpt2":
        width, heads, layers = config.n_embd, config.n_head, config.n_layer
        return _Shapes(family, width, width, heads, width // heads, config.n_inner or 4 * width, layers)
    width, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    if family == "llama":
        head_dim = getattr(config, "head_dim", None) or width // heads
        return _Shapes(family, width, width, heads, head_dim, config.intermediate_size, layers)
    d_teacher = config.word_embed_proj_dim or width
    return _Shapes(family, d_teacher, width, heads, width // heads, config.ffn_dim, layers)


# ---- The plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunePlan:
    """What the student keeps of the teacher; ``to_json`` is the job's ``prune.json``."""

    family: str
    """``"llama"``, ``"opt"`` or ``"gpt2"`` (the teacher's ``config.model_type``)."""
    units: list[int]
    """d_S teacher LM-head-input units, in file order: student unit m is teacher unit ``units[m]``."""
    layers: list[int]
    """Kept teacher layers, increasing; student layer i is teacher layer ``layers[i]``."""
    mlp_neurons: list[list[int]] | None = None
    """None: all; else per kept layer its kept intermediate indices, increasing, all of one length."""
    heads: list[list[int]] | None = None
    """None: all; else per kept layer its kept heads, increasing (OPT and GPT-2 only)."""
    norm_scales: dict[str, float] | None = None
    """None: no calibration; else norm name (``layers.3.input_layernorm``, ``ln_f``: teacher numbering, no
    ``model.``/``transformer.`` prefix) -> factor applied to its sliced weight."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"PrunePlan.family must be one of {sorted(FAMILIES)}; got {self.family!r}")
        object.__setattr__(self, "units", _int_list("units", self.units))
        object.__setattr__(self, "layers", _int_list("layers", self.layers))
        if len(set(self.units)) != len(self.units) or not self.units:
            raise ValueError(f"PrunePlan.units must be non-empty and unique; got {len(self.units)} entries")
        if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"PrunePlan.layers must be non-empty and increasing; got {self.layers}")
        for field in ("mlp_neurons", "heads"):
            per_layer = getattr(self, field)
            if per_layer is None:
                continue
            per_layer = [_int_list(f"{field}[{i}]", row) for i, row in enumerate(per_layer)]
            object.__setattr__(self, field, per_layer)
            if len(per_layer) != len(self.layers) or len({len(row) for row in per_layer}) != 1:
                raise ValueError(
                    f"PrunePlan.{field} needs one list per kept layer ({len(self.layers)}), all of one "
                    f"length; got lengths {[len(row) for row in per_layer]}"
                )
            if any(not row or any(b <= a for a, b in zip(row, row[1:], strict=False)) for row in per_layer):
                raise ValueError(f"PrunePlan.{field}: every layer's list must be non-empty and increasing")
        if self.norm_scales is not None:
            scales = {str(k): float(v) for k, v in self.norm_scales.items()}
            bad = {k: v for k, v in scales.items() if not (0.0 < v < float("inf"))}
            if bad:
                raise ValueError(f"PrunePlan.norm_scales must be finite and > 0; got {bad}")
            object.__setattr__(self, "norm_scales", scales)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        data = json.loads(text)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"prune plan JSON has unknown keys {unknown}")
        return cls(**data)


def _int_list(what: str, values: Sequence[int] | Tensor) -> list[int]:
    """``values`` (a 1-D int tensor or a sequence of ints, numpy ints included) as a list of Python ints."""
    if isinstance(values, Tensor):
        if (
            values.dim() != 1
            or values.is_floating_point()
            or values.is_complex()
            or values.dtype == torch.bool
        ):
            raise ValueError(
                f"{what} must be a 1-D int tensor; got shape {tuple(values.shape)} {values.dtype}"
            )
        return values.tolist()
    values = list(values)
    if any(isinstance(v, bool) or not hasattr(v, "__index__") for v in values):
        raise ValueError(f"{what} must be a sequence of ints; got {values!r:.80}")
    return [operator.index(v) for v in values]


def _check_plan(plan: PrunePlan, shapes: _Shapes) -> None:
    """Raise ``ValueError`` naming every field of ``plan`` that does not fit the teacher ``shapes``."""
    d_s, problems = len(plan.units), []
    if plan.family != shapes.family:
        problems.append(f"plan is for family {plan.family!r}, the teacher is {shapes.family!r}")
    lists = [("units", plan.units, shapes.d_teacher), ("layers", plan.layers, shapes.num_layers)]
    lists += [(f"mlp_neurons[{i}]", row, shapes.intermediate) for i, row in enumerate(plan.mlp_neurons or [])]
    lists += [(f"heads[{i}]", row, shapes.num_heads) for i, row in enumerate(plan.heads or [])]
    for what, values, size in lists:
        outside = [v for v in values if not 0 <= v < size]
        if outside:
            problems.append(f"{what} has values outside [0, {size}): {outside[:8]}")
    residual_pruned = not shapes.projected and d_s < shapes.residual
    if shapes.family == "llama" and plan.heads is not None:
        problems.append("head pruning is not implemented for LLaMA (heads must be None)")
    elif residual_pruned and shapes.family != "llama":
        kept = len(plan.heads[0]) * shapes.head_dim if plan.heads else shapes.residual
        if kept != d_s:
            problems.append(
                f"the kept heads give an attention width of {kept}, not d_S={d_s} ({shapes.family} "
                "ties the two; make the plan with make_plan)"
            )
    if shapes.projected and d_s == shapes.residual:
        problems.append(_PROJECTION_CLASH.format(d_s=d_s))
    if problems:
        raise ValueError("the prune plan does not fit the teacher:\n- " + "\n- ".join(problems))


_PROJECTION_CLASH = (
    "OPT with project_in/out: d_S={d_s} equals hidden_size, so the student config would have no projection "
    "layers (OPT adds them only when word_embed_proj_dim != hidden_size); keep a different number of units"
)


def _nearest_widths(d_s: int, head_dim: int, limit: int) -> list[int]:
    below, above = d_s // head_dim * head_dim, (d_s // head_dim + 1) * head_dim
    return [w for w in (below, above) if 0 < w < limit]


def _count(what: str, value: int | None, upper: int) -> int:
    """``value`` (None: ``upper``), checked to be an int in [1, upper]."""
    count = upper if value is None else value
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= upper:
        raise ValueError(f"{what} must be an int in [1, {upper}] (None keeps all); got {value!r}")
    return count


def _top(scores: Tensor, k: int) -> list[int]:
    """The ``k`` largest entries of ``scores`` (1-D), ties to the lower index, in increasing order."""
    order = torch.argsort(-scores.to(torch.float64), stable=True)[:k]
    return sorted(order.tolist())


def make_plan(
    config: PretrainedConfig,
    units: Sequence[int] | Tensor,
    stats: PruneStatistics | None = None,
    *,
    num_layers: int | None = None,
    intermediate_size: int | None = None,
    calibrate_norms: bool = True,
    allow_full_width: bool = False,
) -> PrunePlan:
    """The plan for a student of ``units`` (d_S,) int (Flex-KD ``indices``, file order) of teacher ``config``.

    Keeps the ``num_layers`` layers of highest block importance (None: all), the top ``intermediate_size``
    neurons of each kept layer (None: all), for OPT/GPT-2 with a pruned residual the top ``d_S / head_dim``
    heads of each kept layer, and with ``calibrate_norms`` the norm scales of ``stats`` (module doc).
    ``allow_full_width`` accepts d_S = d_T (depth/MLP pruning only; the units may still permute).
    ``stats`` (``collect_prune_statistics`` for these units) is needed as soon as anything is ranked.
    """
    shapes = teacher_shapes(config)
    units = _int_list("units", units)
    d_t, d_s = shapes.d_teacher, len(units)
    outside = [u for u in units if not 0 <= u < d_t]
    if outside:
        raise ValueError(f"units has {len(outside)} values outside [0, d_T={d_t}): {outside[:8]}")
    if len(set(units)) != d_s:
        duplicates = sorted(u for u, n in Counter(units).items() if n > 1)
        raise ValueError(f"units must be unique; duplicated: {duplicates[:8]}")
    if d_s == 0 or d_s > d_t or (d_s == d_t and not allow_full_width):
        raise ValueError(
            f"a pruned student keeps d_S < d_T units; got d_S={d_s}, d_T={d_t} "
            "(pass allow_full_width=True to prune only depth/MLP)"
        )
    n_layers = _count("num_layers", num_layers, shapes.num_layers)
    n_neurons = _count("intermediate_size", intermediate_size, shapes.intermediate)
    if shapes.projected and d_s == shapes.residual:
        raise ValueError(_PROJECTION_CLASH.format(d_s=d_s))
    residual_pruned = not shapes.projected and d_s < shapes.residual
    prune_heads = residual_pruned and shapes.family != "llama"
    if prune_heads and d_s % shapes.head_dim:
        raise ValueError(
            f"{shapes.family}: d_S={d_s} is not a multiple of head_dim={shapes.head_dim} (the attention "
            "width equals the residual width, so whole heads are kept); nearest valid widths: "
            f"{_nearest_widths(d_s, shapes.head_dim, d_t)}"
        )
    if shapes.family == "gpt2" and n_layers < shapes.num_layers and config.scale_attn_by_inverse_layer_idx:
        raise ValueError(
            "gpt2 with scale_attn_by_inverse_layer_idx=True scales attention by the layer index; "
            "dropping layers would change it: keep num_layers=None"
        )
    ranked = {
        "num_layers": n_layers < shapes.num_layers,
        "intermediate_size": n_neurons < shapes.intermediate,
        "heads": prune_heads,
        "norm calibration": calibrate_norms and residual_pruned,
    }
    needs = [what for what, needed in ranked.items() if needed]
    if needs and stats is None:
        raise ValueError(
            f"ranking {needs} needs statistics: pass stats=collect_prune_statistics(teacher, "
            "batches, units) (or calibrate_norms=False to skip the norm calibration)"
        )
    if needs:
        stats.check_matches(shapes, units, need_heads=prune_heads, need_norms="norm calibration" in needs)

    layers = list(range(shapes.num_layers))
    if n_layers < shapes.num_layers:
        layers = _top(stats.block_importance(), n_layers)
    neurons = heads = scales = None
    if n_neurons < shapes.intermediate:
        magnitude = stats.neuron_magnitude()  # (L, intermediate)
        neurons = [_top(magnitude[layer], n_neurons) for layer in layers]
    if prune_heads:
        head_scores = stats.head_importance()  # (L, heads)
        heads = [_top(head_scores[layer], d_s // shapes.head_dim) for layer in layers]
    if calibrate_norms and residual_pruned:
        family, ratios = FAMILIES[shapes.family], stats.norm_ratios()
        names = [f"{family.layers}.{i}.{norm}" for i in layers for norm in family.layer_norms]
        scales = {name: ratios[name] for name in [*names, family.final_norm] if name in ratios}
    return PrunePlan(shapes.family, units, layers, neurons, heads, scales)


# ---- Statistics --------------------------------------------------------------------------------------


class PruneStatistics:
    """Sums over valid tokens of the full teacher's activation statistics (module doc); means on request.

    Sums are float64 on the CPU. ``state_tensor()`` packs ``[tokens, block (L), neurons (L*I), heads (L*H),
    norms (N)]`` into one float64 tensor whose elementwise sum over ranks is the union's state: all-reduce it
    and ``load_state_tensor`` the result. ``heads`` is empty unless collected; ``norm_names`` lists the
    calibrated norms (none when the residual is not pruned).
    """

    def __init__(self, shapes: _Shapes, units: list[int], norm_names: list[str], heads: bool) -> None:
        self.shapes, self.units, self.norm_names = shapes, list(units), list(norm_names)
        layers = shapes.num_layers
        self.num_tokens = 0
        self.block_sum = torch.zeros(layers, dtype=torch.float64)
        self.neuron_sum = torch.zeros(layers, shapes.intermediate, dtype=torch.float64)
        self.head_sum = torch.zeros(layers, shapes.num_heads if heads else 0, dtype=torch.float64)
        self.norm_sum = torch.zeros(len(norm_names), dtype=torch.float64)

    def _parts(self) -> list[Tensor]:
        return [self.block_sum, self.neuron_sum, self.head_sum, self.norm_sum]

    def state_tensor(self) -> Tensor:
        return torch.cat(
            [torch.tensor([float(self.num_tokens)], dtype=torch.float64)]
            + [part.flatten() for part in self._parts()]
        )

    def load_state_tensor(self, state: Tensor) -> None:
        state = state.detach().to("cpu", torch.float64)
        size = 1 + sum(part.numel() for part in self._parts())
        if state.shape != (size,) or not bool(torch.isfinite(state).all()):
            raise ValueError(
                f"state must be a finite float tensor of shape ({size},); got {tuple(state.shape)}"
            )
        self.num_tokens, offset = int(state[0]), 1
        for part in self._parts():
            part.copy_(state[offset : offset + part.numel()].view_as(part))
            offset += part.numel()

    def _mean(self, total: Tensor) -> Tensor:
        if self.num_tokens == 0:
            raise ValueError("no valid token was seen: give batches whose attention_mask has ones")
        return total / self.num_tokens

    def block_importance(self) -> Tensor:
        """(L,) float64: mean ``1 - cos(layer input, layer output)``."""
        return self._mean(self.block_sum)

    def neuron_magnitude(self) -> Tensor:
        """(L, intermediate) float64: mean ``|a|`` at each layer's down-projection input."""
        return self._mean(self.neuron_sum)

    def head_importance(self) -> Tensor:
        """(L, heads) float64: mean L2 norm of each head's output before the output projection."""
        return self._mean(self.head_sum)

    def norm_ratios(self) -> dict[str, float]:
        """Norm name -> mean ``rms(x[units]) / rms(x)`` (RMSNorm) or ``std(x[units]) / std(x)`` (LN)."""
        return dict(zip(self.norm_names, self._mean(self.norm_sum).tolist(), strict=True))

    def check_matches(self, shapes: _Shapes, units: list[int], *, need_heads: bool, need_norms: bool) -> None:
        """Raise ``ValueError`` if these statistics cannot rank a plan for ``shapes`` and ``units``."""
        if self.shapes != shapes:
            raise ValueError(f"statistics were collected on a teacher of {self.shapes}, not {shapes}")
        if self.num_tokens == 0:
            raise ValueError("statistics hold no valid token: collect them on non-empty batches")
        if not all(bool(torch.isfinite(part).all()) for part in self._parts()):
            raise ValueError("statistics hold non-finite values (NaN/inf activations in the teacher?)")
        if need_heads and self.head_sum.shape[1] == 0:
            raise ValueError("head pruning needs head statistics: collect with need_heads=True")
        if need_norms and (self.units != units or not self.norm_names):
            raise ValueError(
                "norm calibration needs statistics collected for the same units (the ratios depend "
                "on them): collect again with these units, or pass calibrate_norms=False"
            )


def _unwrap(model: torch.nn.Module) -> PreTrainedModel:
    inner = getattr(model, "module", None)  # a DeepSpeed engine (or DDP) wraps the HF model as .module
    return inner if isinstance(inner, PreTrainedModel) else model


def collect_prune_statistics(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    units: Sequence[int] | Tensor,
    *,
    need_heads: bool = True,
    need_norms: bool = True,
) -> PruneStatistics:
    """Run the full teacher ``model`` (a causal LM, possibly wrapped by a DeepSpeed engine) on ``batches``.

    Each batch maps ``input_ids`` and ``attention_mask`` (B, T) to tensors already on the model's device; only
    tokens with mask 1 count. ``units`` (d_S,) are the kept LM-head-input units (norm ratios depend on them).
    The model runs in eval mode under ``no_grad`` (its mode is restored). Memory: O(L * intermediate).
    """
    inner = _unwrap(model)
    shapes = teacher_shapes(inner.config)
    family = FAMILIES[shapes.family]
    units = _int_list("units", units)
    if not units or not all(0 <= u < shapes.d_teacher for u in units):
        raise ValueError(f"units must be non-empty and in [0, d_T={shapes.d_teacher})")
    base = inner.get_submodule(family.base)
    layers = getattr(base, family.layers)
    norms: dict[str, torch.nn.Module] = {}
    # With OPT's project_in/out the residual keeps its width: nothing to calibrate.
    if need_norms and not shapes.projected:
        for i, layer in enumerate(layers):
            norms |= {f"{family.layers}.{i}.{name}": getattr(layer, name) for name in family.layer_norms}
        if getattr(base, family.final_norm, None) is not None:
            norms[family.final_norm] = getattr(base, family.final_norm)
    stats = PruneStatistics(shapes, units, list(norms), need_heads)
    current: dict[str, Tensor] = {}
    unit_index = torch.tensor(units)

    def valid_rows(x: Tensor) -> Tensor:  # (B, T, d) or (B * T, d) -> (n_valid, d) float32 (float64 kept)
        mask = current["mask"].to(x.device)
        if x.dim() == 2 and x.shape[0] == mask.numel():  # OPT flattens tokens around its MLP
            mask = mask.flatten()
        elif tuple(x.shape[:2]) != tuple(mask.shape):
            raise RuntimeError(f"activation of shape {tuple(x.shape)} does not match the batch's (B, T)")
        rows = x.detach()[mask]
        return rows if rows.dtype == torch.float64 else rows.float()

    def on_block(i: int):
        def hook(module, args, kwargs, output) -> None:
            x_in = valid_rows(args[0] if args else kwargs["hidden_states"])
            x_out = valid_rows(output[0] if isinstance(output, (tuple, list)) else output)
            stats.block_sum[i] += (1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum().double().cpu()

        return hook

    def on_mlp(i: int):
        def hook(module, args) -> None:
            stats.neuron_sum[i] += valid_rows(args[0]).abs().sum(dim=0).double().cpu()

        return hook

    def on_attn(i: int):
        def hook(module, args) -> None:
            rows = valid_rows(args[0])  # (n, heads * head_dim)
            per_head = rows.view(rows.shape[0], shapes.num_heads, -1).norm(dim=-1)  # (n, heads)
            stats.head_sum[i] += per_head.sum(dim=0).double().cpu()

        return hook

    def on_norm(j: int):
        def hook(module, args) -> None:
            x = valid_rows(args[0])  # (n, d_T)
            kept = x[:, unit_index.to(x.device)]  # (n, d_S)
            if family.rms_norm:
                ratio = kept.pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt().clamp_min(1e-30)
            else:
                ratio = kept.std(-1, correction=0) / x.std(-1, correction=0).clamp_min(1e-30)
            stats.norm_sum[j] += ratio.sum().double().cpu()

        return hook

    handles = []
    modes = {module: module.training for module in model.modules()}
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
            handles.append(layer.get_submodule(family.mlp_out).register_forward_pre_hook(on_mlp(i)))
            if need_heads:
                handles.append(layer.get_submodule(family.attn_out).register_forward_pre_hook(on_attn(i)))
        for j, module in enumerate(norms.values()):
            handles.append(module.register_forward_pre_hook(on_norm(j)))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
                if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
                    raise ValueError(
                        f"input_ids and attention_mask must both be (B, T); got "
                        f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
                    )
                current["mask"] = attention_mask.bool()
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                stats.num_tokens += int(current["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return stats


# ---- Building the student ----------------------------------------------------------------------------


def pruned_config(teacher_config: PretrainedConfig, plan: PrunePlan) -> PretrainedConfig:
    """A copy of ``teacher_config`` with the student's width, depth, intermediate size and heads."""
    shapes = teacher_shapes(teacher_config)
    _check_plan(plan, shapes)
    d_s, depth = len(plan.units), len(plan.layers)
    intermediate = len(plan.mlp_neurons[0]) if plan.mlp_neurons else shapes.intermediate
    heads = len(plan.heads[0]) if plan.heads else shapes.num_heads
    config = copy.deepcopy(teacher_config)
    if shapes.family == "llama":  # head_dim set explicitly: it would otherwise follow hidden_size / heads
        config.update({"hidden_size": d_s, "num_hidden_layers": depth, "intermediate_size": intermediate})
        config.head_dim = shapes.head_dim
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [teacher_config.layer_types[i] for i in plan.layers]
    elif shapes.family == "opt":
        width = shapes.residual if shapes.projected else d_s
        config.update({"hidden_size": width, "word_embed_proj_dim": d_s, "num_attention_heads": heads})
        config.update({"ffn_dim": intermediate, "num_hidden_layers": depth})
    else:  # n_inner explicit: None would mean 4 * the NEW width
        config.update(dict(n_embd=d_s, n_head=heads, n_layer=depth, n_inner=intermediate))
    config._name_or_path = ""
    if hasattr(config, "quantization_config"):  # e.g. a GGUF teacher's: the cut weights are plain tensors
        del config.quantization_config
    return config


def planned_config(
    teacher_config: PretrainedConfig,
    d_student: int,
    num_layers: int | None = None,
    intermediate_size: int | None = None,
) -> PretrainedConfig:
    """The config a pruned student of these sizes will have, known before any statistics (for the planner):
    which units, layers, neurons and heads are kept does not change the shapes."""
    shapes = teacher_shapes(teacher_config)
    depth = num_layers or shapes.num_layers
    heads = None
    if shapes.family != "llama" and not shapes.projected:  # whole heads carry the pruned residual
        heads = [list(range(d_student // shapes.head_dim))] * depth
    mlp = [list(range(intermediate_size))] * depth if intermediate_size else None
    plan = PrunePlan(shapes.family, list(range(d_student)), list(range(depth)), mlp, heads)
    return pruned_config(teacher_config, plan)


def _split_prefix(name: str, family: _Family) -> tuple[str, str]:
    """(base-model prefix or "", the rest) of a tensor name."""
    prefix = next((p for p in family.prefixes if name.startswith(p)), "")
    return prefix, name[len(prefix) :]


_LAYER_NAME = re.compile(r"^(?P<list>[a-z]+)\.(?P<index>\d+)\.(?P<rest>.+)$")


def _route(name: str, plan: PrunePlan, shapes: _Shapes) -> tuple[str | None, object, int | None, str | None]:
    """(student name or None when dropped, rule, student layer, norm-scale key) of teacher tensor ``name``."""
    family = FAMILIES[shapes.family]
    prefix, core = _split_prefix(name, family)
    match = _LAYER_NAME.match(core)
    if match and match["list"] == family.layers:
        rest, teacher_layer = match["rest"], int(match["index"])
        rule = family.layer_rules.get(rest)
        if rule is None:
            raise ValueError(f"unknown {shapes.family} layer tensor {name!r}: no pruning rule for {rest!r}")
        if teacher_layer >= shapes.num_layers:
            raise ValueError(
                f"tensor {name!r} is in layer {teacher_layer} but the teacher has {shapes.num_layers}"
            )
        if rule == DROP or teacher_layer not in plan.layers:
            return None, rule, None, None
        layer = plan.layers.index(teacher_layer)
        norm = rest.rsplit(".", 1)[0] if rest.endswith(".weight") else None
        key = f"{family.layers}.{teacher_layer}.{norm}" if norm in family.layer_norms else None
        return f"{prefix}{family.layers}.{layer}.{rest}", rule, layer, key
    rule = family.global_rules.get(core)
    if rule is None:
        raise ValueError(
            f"unknown {shapes.family} tensor {name!r}: no pruning rule for it (supported names: "
            f"{sorted(family.global_rules)} and per-layer {sorted(family.layer_rules)})"
        )
    key = family.final_norm if core == f"{family.final_norm}.weight" else None
    return (None if rule == DROP else name), rule, None, key


def _selection(
    selector: str, plan: PrunePlan, shapes: _Shapes, layer: int | None
) -> tuple[int, list[int] | None]:
    """(teacher size of the dim, kept indices in student order or None for all) for one rule letter."""
    residual_units = None if shapes.projected else plan.units
    if selector == "E":
        return shapes.d_teacher, plan.units
    if selector == "R":
        return shapes.residual, residual_units
    if selector == "N":
        return shapes.intermediate, None if plan.mlp_neurons is None else plan.mlp_neurons[layer]
    heads = None if plan.heads is None else plan.heads[layer]
    channels = (
        None if heads is None else [h * shapes.head_dim + c for h in heads for c in range(shapes.head_dim)]
    )
    if selector == "H":
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
    new_name, rule, layer, norm_key = _route(name, plan, shapes)
    if new_name is None:
        return []
    if rule == KEEP:
        return [(new_name, tensor)]
    if tensor.dim() != len(rule):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {len(rule)} dims")
    selections = [(dim, *_selection(s, plan, shapes, layer)) for dim, s in enumerate(rule) if s is not None]
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


def _meta_student(config: PretrainedConfig) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def prune_model(teacher: torch.nn.Module, plan: PrunePlan) -> PreTrainedModel:
    """The student of ``plan`` cut from an in-memory ``teacher`` (full parameters), in its dtype and device,
    in eval mode; its embeddings and LM head are tied when the teacher's config ties them."""
    teacher = _unwrap(teacher)
    if any(getattr(p, "ds_numel", None) is not None for p in teacher.parameters()):
        raise ValueError("the teacher's parameters are ZeRO-3 partitions: save it and use prune_checkpoint")
    state = teacher.state_dict()
    student_state = {}
    for name, tensor in state.items():
        student_state.update(prune_tensor(name, tensor.detach(), plan, teacher.config))
    buffers = {name: b for name, b in teacher.named_buffers() if name not in state}
    return assemble_student(teacher.config, plan, student_state, buffers)


def assemble_student(
    teacher_config: PretrainedConfig,
    plan: PrunePlan,
    student_state: Mapping[str, Tensor],
    teacher_buffers: Mapping[str, Tensor],
) -> PreTrainedModel:
    """The student of ``plan`` from tensors already cut by ``prune_tensor`` (student names; a tied LM head may
    be left out), in their dtype and device, in eval mode. ``teacher_buffers``: the teacher's non-persistent
    buffers (rotary ``inv_freq``; teacher names), which no state dict holds and are passed through."""
    config = pruned_config(teacher_config, plan)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    first = next(iter(student_state.values()))
    student = _meta_student(config).to(first.dtype)
    student.to_empty(device=first.device)
    missing, unexpected = student.load_state_dict(dict(student_state), strict=False)
    head = student.get_output_embeddings()
    head_names = {f"{n}.weight" for n, m in student.named_modules() if m is head}
    missing = [m for m in missing if not (tied and m in head_names)]
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
) -> Path:
    """Write the student of ``plan`` from the HF safetensors checkpoint in ``src_dir`` to ``dst_dir``.

    Reads one tensor at a time (``safe_open``), so the teacher is never whole in memory; the student is held
    one output shard at a time. Writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards
    and ``model.safetensors.index.json`` past ``max_shard_size``), ``config.json`` and a copy of
    ``generation_config.json``. ``dtype`` casts floating tensors (None: as stored). Returns ``dst_dir``.
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
    missing = {_split_prefix(name, family)[1] for name in _meta_student(config).state_dict()} - written
    if getattr(config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
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
