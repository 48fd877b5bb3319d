"""The plan of a pruned student: the supported families (where each tensor lives and how it is cut), the
teacher's widths, ``PrunePlan`` (what the student keeps), ``make_plan`` (ranking by ``PruneStatistics``) and
the student's config (``pruned_config``, ``planned_config``). Package doc: ``flexkd_ds.method.prune``."""

from __future__ import annotations

import copy
import json
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import PretrainedConfig

if TYPE_CHECKING:
    from flexkd_ds.method.prune.statistics import PruneStatistics

# ---- Families: where things live and how each parameter is cut ---------------------------------------
# A rule gives, per tensor dim, what selects along it: "E" LM-head-input units, "R" residual units, "H"
# channels of the kept heads, "X" channels of the kept cross-attention heads (BART's decoder), "Q" GPT-2's
# fused q|k|v head channels, "N" kept MLP neurons, "P" kept pooler outputs (BERT), None: whole dim.
# KEEP passes the tensor through (rotary buffers, unpruned biases); DROP discards it.
KEEP, DROP = "keep", "drop"
_QKV = {f"self_attn.{p}_proj.{k}": r for p in "qkv" for k, r in (("weight", ("H", "R")), ("bias", ("H",)))}
_CROSS_QKV = {
    f"encoder_attn.{p}_proj.{k}": r for p in "qkv" for k, r in (("weight", ("X", "R")), ("bias", ("X",)))
}
_OPT_NORMS = ("self_attn_layer_norm", "final_layer_norm")
_BART_NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
_BERT_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_SCORE = {"score.weight": (None, "E"), "score.bias": KEEP}  # the head of *ForSequenceClassification decoders


@dataclass(frozen=True)
class _Family:
    root: str  # the base model's path inside the task model (*ForCausalLM, *ForSequenceClassification, ...)
    prefixes: tuple[str, ...]  # name prefixes of base-model tensors in state dicts and checkpoints
    stacks: tuple[str, ...]  # layer lists, relative to root (BART: the encoder's, then the decoder's)
    layer_norms: tuple[str, ...]  # per layer, relative to the layer (a layer may lack one: BART's encoder)
    global_norms: dict[
        str, int
    ]  # norms outside the layers, relative to root -> the stack whose tokens they see
    rms_norm: bool
    attn_out: str  # its input is the heads' concatenated output (B, T, heads * head_dim)
    mlp_out: str  # its input is the MLP activation (B, T, intermediate)
    layer_rules: dict[str, object]
    global_rules: dict[str, object]
    cross_attn_out: str | None = None  # the cross-attention's output projection (BART's decoder)
    pooler_out: str | None = None  # the module reading the pooled output (B, P), relative to the task model


FAMILIES: dict[str, _Family] = {
    "llama": _Family(
        "model", ("model.",), ("layers",), ("input_layernorm", "post_attention_layernorm"), {"norm": 0}, True,
        "self_attn.o_proj", "mlp.down_proj",
        {**{f"self_attn.{p}_proj.weight": (None, "R") for p in "qkv"},
         **{f"self_attn.{p}_proj.bias": KEEP for p in "qkv"},
         "self_attn.o_proj.weight": ("R", None), "self_attn.o_proj.bias": ("R",),
         "mlp.gate_proj.weight": ("N", "R"), "mlp.up_proj.weight": ("N", "R"), "mlp.gate_proj.bias": ("N",),
         "mlp.up_proj.bias": ("N",), "mlp.down_proj.weight": ("R", "N"), "mlp.down_proj.bias": ("R",),
         "input_layernorm.weight": ("R",), "post_attention_layernorm.weight": ("R",),
         "self_attn.rotary_emb.inv_freq": KEEP},
        {"embed_tokens.weight": (None, "E"), "norm.weight": ("R",), "lm_head.weight": (None, "E"),
         "lm_head.bias": KEEP, "rotary_emb.inv_freq": KEEP, "rotary_emb.original_inv_freq": KEEP, **_SCORE},
    ),
    "opt": _Family(
        "model.decoder", ("model.decoder.", "decoder."), ("layers",), _OPT_NORMS, {"final_layer_norm": 0}, False,
        "self_attn.out_proj", "fc2",
        {**_QKV, "self_attn.out_proj.weight": ("R", "H"), "self_attn.out_proj.bias": ("R",),
         "fc1.weight": ("N", "R"), "fc1.bias": ("N",), "fc2.weight": ("R", "N"), "fc2.bias": ("R",),
         **{f"{norm}.{kind}": ("R",) for norm in _OPT_NORMS for kind in ("weight", "bias")}},
        {"embed_tokens.weight": (None, "E"), "embed_positions.weight": (None, "R"),
         "project_in.weight": (None, "E"), "project_out.weight": ("E", None),
         "final_layer_norm.weight": ("R",), "final_layer_norm.bias": ("R",), "lm_head.weight": (None, "E"),
         **_SCORE},
    ),
    # GPT-2's Conv1D stores weights (in, out), transposed against nn.Linear.
    "gpt2": _Family(
        "transformer", ("transformer.",), ("h",), ("ln_1", "ln_2"), {"ln_f": 0}, False, "attn.c_proj",
        "mlp.c_proj",
        {"ln_1.weight": ("R",), "ln_1.bias": ("R",), "ln_2.weight": ("R",), "ln_2.bias": ("R",),
         "attn.c_attn.weight": ("R", "Q"), "attn.c_attn.bias": ("Q",),
         "attn.c_proj.weight": ("H", "R"), "attn.c_proj.bias": ("R",),
         "mlp.c_fc.weight": ("R", "N"), "mlp.c_fc.bias": ("N",),
         "mlp.c_proj.weight": ("N", "R"), "mlp.c_proj.bias": ("R",),
         # causal-mask buffers of old GPT-2 checkpoints: the model rebuilds them, transformers ignores them
         "attn.bias": DROP, "attn.masked_bias": DROP},
        {"wte.weight": (None, "E"), "wpe.weight": (None, "R"), "ln_f.weight": ("R",), "ln_f.bias": ("R",),
         "lm_head.weight": (None, "E"), **_SCORE},
    ),
    # Post-norm: the residual stream is each LayerNorm's output, so the units index it in every layer as in
    # the pre-norm families. The pooler (tanh(W h_CLS)) is not residual: its outputs are kept by magnitude.
    "bert": _Family(
        "bert", ("bert.",), ("encoder.layer",), _BERT_NORMS, {"embeddings.LayerNorm": 0}, False,
        "attention.output.dense", "output.dense",
        {**{f"attention.self.{p}.{k}": r for p in ("query", "key", "value")
            for k, r in (("weight", ("H", "R")), ("bias", ("H",)))},
         "attention.output.dense.weight": ("R", "H"), "attention.output.dense.bias": ("R",),
         "intermediate.dense.weight": ("N", "R"), "intermediate.dense.bias": ("N",),
         "output.dense.weight": ("R", "N"), "output.dense.bias": ("R",),
         **{f"{norm}.{kind}": ("R",) for norm in _BERT_NORMS for kind in ("weight", "bias")}},
        {"embeddings.word_embeddings.weight": (None, "R"), "embeddings.position_embeddings.weight": (None, "R"),
         "embeddings.token_type_embeddings.weight": (None, "R"), "embeddings.LayerNorm.weight": ("R",),
         "embeddings.LayerNorm.bias": ("R",), "embeddings.position_ids": KEEP, "embeddings.token_type_ids": KEEP,
         "pooler.dense.weight": ("P", "R"), "pooler.dense.bias": ("P",), "classifier.weight": (None, "P"),
         "classifier.bias": KEEP},
        pooler_out="classifier",
    ),
    # Encoder-decoder, post-norm; one residual width and one tied embedding for both stacks, so one set of
    # units cuts both (see flexkd_ds.jobs.seq2seq for how they are chosen).
    "bart": _Family(
        "model", ("model.",), ("encoder.layers", "decoder.layers"), _BART_NORMS,
        {"encoder.layernorm_embedding": 0, "decoder.layernorm_embedding": 1}, False, "self_attn.out_proj", "fc2",
        {**_QKV, **_CROSS_QKV, "self_attn.out_proj.weight": ("R", "H"), "self_attn.out_proj.bias": ("R",),
         "encoder_attn.out_proj.weight": ("R", "X"), "encoder_attn.out_proj.bias": ("R",),
         "fc1.weight": ("N", "R"), "fc1.bias": ("N",), "fc2.weight": ("R", "N"), "fc2.bias": ("R",),
         **{f"{norm}.{kind}": ("R",) for norm in _BART_NORMS for kind in ("weight", "bias")}},
        {"shared.weight": (None, "E"), "encoder.embed_tokens.weight": (None, "E"),
         "decoder.embed_tokens.weight": (None, "E"), "encoder.embed_positions.weight": (None, "R"),
         "decoder.embed_positions.weight": (None, "R"),
         **{f"{side}.layernorm_embedding.{kind}": ("R",) for side in ("encoder", "decoder")
            for kind in ("weight", "bias")},
         "lm_head.weight": (None, "E"), "final_logits_bias": KEEP},
        cross_attn_out="encoder_attn.out_proj",
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
    num_layers: int  # all stacks together
    stack_layers: tuple[
        int, ...
    ] = ()  # layers per stack, in FAMILIES[family].stacks order; () = (num_layers,)
    pooler: int = 0  # BERT: the pooler's output width

    @property
    def projected(self) -> bool:  # OPT project_in/out: units index the projection, not the residual
        return self.d_teacher != self.residual

    @property
    def stacks(self) -> tuple[int, ...]:
        return self.stack_layers or (self.num_layers,)

    def stack_of(self, layer: int) -> int:
        """The stack of flat layer index ``layer`` (stacks are numbered one after the other)."""
        offset = 0
        for stack, count in enumerate(self.stacks):
            if layer < offset + count:
                return stack
            offset += count
        raise ValueError(f"layer {layer} is outside the teacher's {self.num_layers} layers")

    def offset(self, stack: int) -> int:
        return sum(self.stacks[:stack])


_SUPPORTED = (
    "LlamaForCausalLM, OPTForCausalLM, GPT2LMHeadModel, their *ForSequenceClassification, "
    "BertForSequenceClassification, BartForConditionalGeneration"
)


def _family_name(config: PretrainedConfig) -> str:
    name = getattr(config, "model_type", None)
    if name not in FAMILIES:
        raise ValueError(
            f"pruning does not support model family {name!r} ({type(config).__name__}); supported: "
            f"{sorted(FAMILIES)} ({_SUPPORTED})"
        )
    return name


def teacher_shapes(config: PretrainedConfig) -> _Shapes:
    """The widths pruning reads from a teacher config (d_T, residual, heads, head_dim, MLP, layers); raises
    ``ValueError`` naming the family when it is not supported."""
    family = _family_name(config)
    if family == "gpt2":
        width, heads, layers = config.n_embd, config.n_head, config.n_layer
        return _Shapes(family, width, width, heads, width // heads, config.n_inner or 4 * width, layers)
    if family == "bart":
        pairs = {"attention heads": (config.encoder_attention_heads, config.decoder_attention_heads),
                 "ffn_dim": (config.encoder_ffn_dim, config.decoder_ffn_dim)}  # fmt: skip
        unequal = {k: v for k, v in pairs.items() if v[0] != v[1]}
        if unequal:
            raise ValueError(f"pruning BART needs the encoder and decoder alike; they differ in {unequal}")
        if getattr(config, "scale_embedding", False):
            raise ValueError(
                "pruning BART with scale_embedding=True is not supported: the embeddings are scaled by "
                "sqrt(d_model), which changes with the width"
            )
        width, heads = config.d_model, config.encoder_attention_heads
        stacks = (config.encoder_layers, config.decoder_layers)
        return _Shapes(
            family, width, width, heads, width // heads, config.encoder_ffn_dim, sum(stacks), stacks
        )
    width, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    if family == "llama":
        head_dim = getattr(config, "head_dim", None) or width // heads
        return _Shapes(family, width, width, heads, head_dim, config.intermediate_size, layers)
    if family == "bert":
        return _Shapes(
            family, width, width, heads, width // heads, config.intermediate_size, layers, (), width
        )
    d_teacher = config.word_embed_proj_dim or width
    return _Shapes(family, d_teacher, width, heads, width // heads, config.ffn_dim, layers)


# ---- The plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunePlan:
    """What the student keeps of the teacher; ``to_json`` is the job's ``prune.json``."""

    family: str
    """A key of ``FAMILIES`` (the teacher's ``config.model_type``)."""
    units: list[int]
    """d_S teacher LM-head-input units, in file order: student unit m is teacher unit ``units[m]``."""
    layers: list[int]
    """Kept teacher layers, increasing; student layer i is teacher layer ``layers[i]``. With two stacks (BART)
    the teacher's layers are numbered encoder first, then decoder (decoder layer j is ``encoder_layers + j``),
    and each stack's kept layers are renumbered from 0 in the student."""
    mlp_neurons: list[list[int]] | None = None
    """None: all; else per kept layer its kept intermediate indices, increasing, all of one length."""
    heads: list[list[int]] | None = None
    """None: all; else per kept layer its kept heads, increasing (OPT, GPT-2, BERT, BART: not LLaMA)."""
    norm_scales: dict[str, float] | None = None
    """None: no calibration; else norm name (``layers.3.input_layernorm``, ``ln_f``: teacher numbering, no
    ``model.``/``transformer.`` prefix) -> factor applied to its sliced weight."""
    cross_heads: list[list[int]] | None = None
    """BART: None: all; else per kept decoder layer its kept cross-attention heads, increasing."""
    pooler: list[int] | None = None
    """BERT: None: all; else the kept pooler outputs (d_S of them), increasing."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"PrunePlan.family must be one of {sorted(FAMILIES)}; got {self.family!r}")
        object.__setattr__(self, "units", _int_list("units", self.units))
        object.__setattr__(self, "layers", _int_list("layers", self.layers))
        if len(set(self.units)) != len(self.units) or not self.units:
            raise ValueError(f"PrunePlan.units must be non-empty and unique; got {len(self.units)} entries")
        if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"PrunePlan.layers must be non-empty and increasing; got {self.layers}")
        for field in ("mlp_neurons", "heads", "cross_heads"):
            per_layer = getattr(self, field)
            if per_layer is None:
                continue
            per_layer = [_int_list(f"{field}[{i}]", row) for i, row in enumerate(per_layer)]
            object.__setattr__(self, field, per_layer)
            wrong_count = field != "cross_heads" and len(per_layer) != len(self.layers)  # checked with shapes
            if wrong_count or not per_layer or len({len(row) for row in per_layer}) != 1:
                raise ValueError(
                    f"PrunePlan.{field} needs one list per kept layer ({len(self.layers)}), all of one "
                    f"length; got lengths {[len(row) for row in per_layer]}"
                )
            if any(not row or any(b <= a for a, b in zip(row, row[1:], strict=False)) for row in per_layer):
                raise ValueError(f"PrunePlan.{field}: every layer's list must be non-empty and increasing")
        if self.pooler is not None:
            pooler = _int_list("pooler", self.pooler)
            object.__setattr__(self, "pooler", pooler)
            if not pooler or any(b <= a for a, b in zip(pooler, pooler[1:], strict=False)):
                raise ValueError("PrunePlan.pooler must be non-empty and increasing")
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
    lists += [(f"cross_heads[{i}]", row, shapes.num_heads) for i, row in enumerate(plan.cross_heads or [])]
    lists += [("pooler", plan.pooler or [], shapes.pooler)]
    for what, values, size in lists:
        outside = [v for v in values if not 0 <= v < size]
        if outside:
            problems.append(f"{what} has values outside [0, {size}): {outside[:8]}")
    residual_pruned = not shapes.projected and d_s < shapes.residual
    family = FAMILIES[shapes.family]
    kept_per_stack = [sum(shapes.stack_of(i) == k for i in plan.layers if 0 <= i < shapes.num_layers)
                      for k in range(len(shapes.stacks))]  # fmt: skip
    if len(shapes.stacks) > 1 and 0 in kept_per_stack:
        problems.append(f"every stack must keep a layer; kept per stack: {kept_per_stack}")
    if plan.cross_heads is not None:
        if family.cross_attn_out is None:
            problems.append(f"{shapes.family} has no cross-attention (cross_heads must be None)")
        elif len(plan.cross_heads) != kept_per_stack[-1]:
            problems.append(f"cross_heads needs one list per kept decoder layer ({kept_per_stack[-1]}); got "
                            f"{len(plan.cross_heads)}")  # fmt: skip
        elif residual_pruned and len(plan.cross_heads[0]) * shapes.head_dim != d_s:
            problems.append(f"the kept cross-attention heads give a width of "
                            f"{len(plan.cross_heads[0]) * shapes.head_dim}, not d_S={d_s}")  # fmt: skip
    elif family.cross_attn_out is not None and residual_pruned:
        problems.append("a narrower BART student needs cross_heads (make the plan with make_plan)")
    if plan.pooler is not None and not shapes.pooler:
        problems.append(f"{shapes.family} has no pooler (pooler must be None)")
    elif shapes.pooler and residual_pruned and len(plan.pooler or []) != d_s:
        problems.append(f"a narrower BERT keeps d_S={d_s} pooler outputs; got "
                        f"{'all' if plan.pooler is None else len(plan.pooler)}")  # fmt: skip
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

    Keeps the ``num_layers`` layers of highest block importance (None: all; BART: that many of each stack),
    the top ``intermediate_size`` neurons of each kept layer (None: all), for OPT/GPT-2/BERT/BART with a pruned
    residual the top ``d_S / head_dim`` heads of each kept layer (and cross-attention heads of each kept BART
    decoder layer, and d_S BERT pooler outputs by magnitude), and with ``calibrate_norms`` the norm scales of
    ``stats`` (module doc).
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
    n_layers = _count("num_layers", num_layers, min(shapes.stacks))
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
    depth_pruned = n_layers < min(shapes.stacks) or len(set(shapes.stacks)) > 1
    if shapes.family == "gpt2" and depth_pruned and config.scale_attn_by_inverse_layer_idx:
        raise ValueError(
            "gpt2 with scale_attn_by_inverse_layer_idx=True scales attention by the layer index; "
            "dropping layers would change it: keep num_layers=None"
        )
    family = FAMILIES[shapes.family]
    ranked = {
        "num_layers": depth_pruned,
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
    if depth_pruned:  # the top n_layers of each stack, numbered encoder first
        importance, layers = stats.block_importance(), []
        for stack in range(len(shapes.stacks)):
            offset, count = shapes.offset(stack), shapes.stacks[stack]
            layers += [offset + i for i in _top(importance[offset : offset + count], n_layers)]
    neurons = heads = cross = pooler = scales = None
    if n_neurons < shapes.intermediate:
        magnitude = stats.neuron_magnitude()  # (L, intermediate)
        neurons = [_top(magnitude[layer], n_neurons) for layer in layers]
    if prune_heads:
        head_scores = stats.head_importance()  # (L, heads)
        heads = [_top(head_scores[layer], d_s // shapes.head_dim) for layer in layers]
        if family.cross_attn_out is not None:
            cross_scores, last = stats.cross_head_importance(), len(shapes.stacks) - 1
            cross = [
                _top(cross_scores[i], d_s // shapes.head_dim) for i in layers if shapes.stack_of(i) == last
            ]
        if shapes.pooler:
            pooler = _top(stats.pooler_magnitude(), d_s)
    if calibrate_norms and residual_pruned:
        ratios = stats.norm_ratios()
        names = [f"{layer_name(shapes, i)}.{norm}" for i in layers for norm in family.layer_norms]
        scales = {name: ratios[name] for name in [*names, *family.global_norms] if name in ratios}
    return PrunePlan(shapes.family, units, layers, neurons, heads, scales, cross, pooler)


def layer_name(shapes: _Shapes, layer: int) -> str:
    """The teacher's name of flat layer ``layer`` relative to the base model: ``layers.3``, ``h.3``,
    ``encoder.layer.3``, ``decoder.layers.1`` (BART numbers its decoder after its encoder in plans)."""
    stack = shapes.stack_of(layer)
    return f"{FAMILIES[shapes.family].stacks[stack]}.{layer - shapes.offset(stack)}"


# ---- The student's config --------------------------------------------------------------------------


def pruned_config(teacher_config: PretrainedConfig, plan: PrunePlan) -> PretrainedConfig:
    """A copy of ``teacher_config`` with the student's width, depth, intermediate size and heads."""
    shapes = teacher_shapes(teacher_config)
    _check_plan(plan, shapes)
    d_s, depth = len(plan.units), len(plan.layers)
    intermediate = len(plan.mlp_neurons[0]) if plan.mlp_neurons else shapes.intermediate
    heads = len(plan.heads[0]) if plan.heads else shapes.num_heads
    config = copy.deepcopy(teacher_config)
    kept = [sum(shapes.stack_of(i) == k for i in plan.layers) for k in range(len(shapes.stacks))]
    if shapes.family == "llama":  # head_dim set explicitly: it would otherwise follow hidden_size / heads
        config.update({"hidden_size": d_s, "num_hidden_layers": depth, "intermediate_size": intermediate})
        config.head_dim = shapes.head_dim
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [teacher_config.layer_types[i] for i in plan.layers]
    elif shapes.family == "opt":
        width = shapes.residual if shapes.projected else d_s
        config.update({"hidden_size": width, "word_embed_proj_dim": d_s, "num_attention_heads": heads})
        config.update({"ffn_dim": intermediate, "num_hidden_layers": depth})
    elif shapes.family == "bert":
        config.update({"hidden_size": d_s, "num_attention_heads": heads, "intermediate_size": intermediate,
                       "num_hidden_layers": depth})  # fmt: skip
    elif shapes.family == "bart":
        config.update({"d_model": d_s, "encoder_attention_heads": heads, "decoder_attention_heads": heads,
                       "encoder_ffn_dim": intermediate, "decoder_ffn_dim": intermediate,
                       "encoder_layers": kept[0], "decoder_layers": kept[1]})  # fmt: skip
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
    layers = [
        shapes.offset(k) + i for k, count in enumerate(shapes.stacks) for i in range(num_layers or count)
    ]
    heads = cross = pooler = None
    if shapes.family != "llama" and not shapes.projected:  # whole heads carry the pruned residual
        heads = [list(range(d_student // shapes.head_dim))] * len(layers)
        if FAMILIES[shapes.family].cross_attn_out is not None:
            cross = heads[: num_layers or shapes.stacks[-1]]
        pooler = list(range(d_student)) if shapes.pooler else None
    mlp = [list(range(intermediate_size))] * len(layers) if intermediate_size else None
    plan = PrunePlan(shapes.family, list(range(d_student)), layers, mlp, heads, None, cross, pooler)
    return pruned_config(teacher_config, plan)
