"""Tests of flexkd_ds.method.prune against references written out here: explicit weight slices, float64
statistics from captured activations, and teachers whose layers are deleted by hand."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from flexkd_ds.inputs.models import build_causal_lm_from_config, tiny_config
from flexkd_ds.method.prune import (
    PrunePlan,
    collect_prune_statistics,
    make_plan,
    prune_checkpoint,
    prune_model,
    prune_tensor,
    pruned_config,
)

VOCAB, HIDDEN, LAYERS, HEADS, FFN, HEAD_DIM = 40, 16, 3, 4, 32, 4
CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_gqa": ("llama", {"num_key_value_heads": 2}),
    "opt": ("opt", {}),
    "opt_proj": ("opt", {"word_embed_proj_dim": 12}),
    "gpt2": ("gpt2", {}),
}


def make_teacher(case: str, seed: int = 0):
    """(config, eval-mode teacher) with every parameter random, so biases and norm weights differ per unit."""
    family, overrides = CASES[case]
    config = tiny_config(
        family,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        vocab_size=VOCAB,
        intermediate_size=FFN,
        **overrides,
    )
    model = build_causal_lm_from_config(config, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm = "norm" in name or ".ln_" in name
            param.copy_(1 + 0.2 * noise if is_norm and name.endswith("weight") else 0.3 * noise)
    return config, model


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """(3, 9) ids with a left-padded and a right-padded row."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=gen)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, :3] = 0
    attention_mask[2, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model, batch) -> torch.Tensor:
    """(n_valid, V) logits at the valid positions (padded query rows may be garbage)."""
    with torch.no_grad():
        out = model(**batch, use_cache=False).logits
    return out[batch["attention_mask"].bool()]


def head_input_width(case: str) -> int:
    return CASES[case][1].get("word_embed_proj_dim", HIDDEN)


def some_units(width: int, count: int, seed: int = 3) -> list[int]:
    """``count`` distinct units in a shuffled (unsorted) order."""
    units = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    assert units != sorted(units)
    return units


def heads_channels(heads: list[int]) -> list[int]:
    return [h * HEAD_DIM + c for h in heads for c in range(HEAD_DIM)]


# ---- Full width: the identity and a permutation of the residual channels -----------------------------


@pytest.mark.parametrize("order", ["identity", "permuted"])
@pytest.mark.parametrize("case", list(CASES))
def test_full_width_student_reproduces_teacher(case, order):
    config, teacher = make_teacher(case)
    width = head_input_width(case)
    units = list(range(width)) if order == "identity" else some_units(width, width)
    plan = make_plan(config, units, allow_full_width=True)
    assert plan.layers == list(range(LAYERS)) and plan.mlp_neurons is None and plan.heads is None
    assert plan.norm_scales is None
    student = prune_model(teacher, plan)
    batch = make_batch()
    torch.testing.assert_close(logits(student, batch), logits(teacher, batch), atol=1e-5, rtol=0)
    # The permutation really is applied (a student that ignored the units would pass the logits check).
    embedding = teacher.get_input_embeddings().weight
    assert torch.equal(student.get_input_embeddings().weight, embedding[:, units])
    if config.tie_word_embeddings:
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    else:
        assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, units])


# ---- Narrow students: every weight is the teacher's slice --------------------------------------------


def narrow_plan(case: str, d_s: int, **kwargs):
    config, teacher = make_teacher(case)
    units = some_units(head_input_width(case), d_s)
    stats = collect_prune_statistics(teacher, [make_batch(0), make_batch(1)], units)
    plan = make_plan(config, units, stats, **kwargs)
    return config, teacher, plan, prune_model(teacher, plan)


def test_llama_student_weights_are_teacher_slices():
    config, teacher, plan, student = narrow_plan("llama_gqa", 8, num_layers=2, intermediate_size=20)
    units = plan.units
    assert student.config.hidden_size == 8 and student.config.num_hidden_layers == 2
    assert student.config.intermediate_size == 20 and student.config.head_dim == HEAD_DIM
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (HEADS, 2)
    t, s = teacher.model, student.model
    assert torch.equal(s.embed_tokens.weight, t.embed_tokens.weight[:, units])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, units])
    torch.testing.assert_close(
        s.norm.weight, t.norm.weight[units] * plan.norm_scales["norm"], atol=0, rtol=1e-6
    )
    for new, old in enumerate(plan.layers):
        tl, sl, neurons = t.layers[old], s.layers[new], plan.mlp_neurons[new]
        assert len(neurons) == 20 and neurons == sorted(neurons)
        assert torch.equal(sl.self_attn.q_proj.weight, tl.self_attn.q_proj.weight[:, units])
        assert torch.equal(sl.self_attn.k_proj.weight, tl.self_attn.k_proj.weight[:, units])
        assert torch.equal(sl.self_attn.v_proj.weight, tl.self_attn.v_proj.weight[:, units])
        assert torch.equal(sl.self_attn.o_proj.weight, tl.self_attn.o_proj.weight[units, :])
        assert torch.equal(sl.mlp.gate_proj.weight, tl.mlp.gate_proj.weight[neurons][:, units])
        assert torch.equal(sl.mlp.up_proj.weight, tl.mlp.up_proj.weight[neurons][:, units])
        assert torch.equal(sl.mlp.down_proj.weight, tl.mlp.down_proj.weight[units][:, neurons])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            scale = plan.norm_scales[f"layers.{old}.{norm}"]
            expected = getattr(tl, norm).weight[units] * scale
            torch.testing.assert_close(getattr(sl, norm).weight, expected, atol=0, rtol=1e-6)
    assert logits(student, make_batch()).shape[-1] == VOCAB


def test_gpt2_student_weights_are_teacher_slices():
    config, teacher, plan, student = narrow_plan("gpt2", 8, intermediate_size=20)
    units = plan.units
    assert (student.config.n_embd, student.config.n_head, student.config.n_inner) == (8, 2, 20)
    t, s = teacher.transformer, student.transformer
    for name in ("wte", "wpe"):
        assert torch.equal(getattr(s, name).weight, getattr(t, name).weight[:, units])
    assert student.lm_head.weight is s.wte.weight  # GPT-2 ties
    for new, old in enumerate(plan.layers):
        tl, sl, neurons = t.h[old], s.h[new], plan.mlp_neurons[new]
        channels = heads_channels(plan.heads[new])  # Conv1D weights are (in, out)
        qkv = channels + [HIDDEN + c for c in channels] + [2 * HIDDEN + c for c in channels]
        assert len(plan.heads[new]) == 2 and plan.heads[new] == sorted(plan.heads[new])
        assert torch.equal(sl.attn.c_attn.weight, tl.attn.c_attn.weight[units][:, qkv])
        assert torch.equal(sl.attn.c_attn.bias, tl.attn.c_attn.bias[qkv])
        assert torch.equal(sl.attn.c_proj.weight, tl.attn.c_proj.weight[channels][:, units])
        assert torch.equal(sl.attn.c_proj.bias, tl.attn.c_proj.bias[units])
        assert torch.equal(sl.mlp.c_fc.weight, tl.mlp.c_fc.weight[units][:, neurons])
        assert torch.equal(sl.mlp.c_fc.bias, tl.mlp.c_fc.bias[neurons])
        assert torch.equal(sl.mlp.c_proj.weight, tl.mlp.c_proj.weight[neurons][:, units])
        assert torch.equal(sl.mlp.c_proj.bias, tl.mlp.c_proj.bias[units])
        for norm in ("ln_1", "ln_2"):
            scale = plan.norm_scales[f"h.{old}.{norm}"]
            torch.testing.assert_close(getattr(sl, norm).weight, getattr(tl, norm).weight[units] * scale)
            assert torch.equal(getattr(sl, norm).bias, getattr(tl, norm).bias[units])  # bias: sliced only
    torch.testing.assert_close(s.ln_f.weight, t.ln_f.weight[units] * plan.norm_scales["ln_f"])
    assert torch.equal(s.ln_f.bias, t.ln_f.bias[units])
    assert logits(student, make_batch()).shape[-1] == VOCAB


def test_opt_student_weights_are_teacher_slices():
    config, teacher, plan, student = narrow_plan("opt", 8, num_layers=2, intermediate_size=20)
    units = plan.units
    student_config = student.config
    assert (student_config.hidden_size, student_config.num_attention_heads, student_config.ffn_dim) == (
        8,
        2,
        20,
    )
    t, s = teacher.model.decoder, student.model.decoder
    assert torch.equal(s.embed_tokens.weight, t.embed_tokens.weight[:, units])
    assert torch.equal(s.embed_positions.weight, t.embed_positions.weight[:, units])
    torch.testing.assert_close(
        s.final_layer_norm.weight, t.final_layer_norm.weight[units] * plan.norm_scales["final_layer_norm"]
    )
    assert torch.equal(s.final_layer_norm.bias, t.final_layer_norm.bias[units])
    for new, old in enumerate(plan.layers):
        tl, sl, neurons = t.layers[old], s.layers[new], plan.mlp_neurons[new]
        channels = heads_channels(plan.heads[new])
        for p in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(
                getattr(sl.self_attn, p).weight, getattr(tl.self_attn, p).weight[channels][:, units]
            )
            assert torch.equal(getattr(sl.self_attn, p).bias, getattr(tl.self_attn, p).bias[channels])
        assert torch.equal(sl.self_attn.out_proj.weight, tl.self_attn.out_proj.weight[units][:, channels])
        assert torch.equal(sl.self_attn.out_proj.bias, tl.self_attn.out_proj.bias[units])
        assert torch.equal(sl.fc1.weight, tl.fc1.weight[neurons][:, units])
        assert torch.equal(sl.fc1.bias, tl.fc1.bias[neurons])
        assert torch.equal(sl.fc2.weight, tl.fc2.weight[units][:, neurons])
        assert torch.equal(sl.fc2.bias, tl.fc2.bias[units])
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            scale = plan.norm_scales[f"layers.{old}.{norm}"]
            torch.testing.assert_close(getattr(sl, norm).weight, getattr(tl, norm).weight[units] * scale)
            assert torch.equal(getattr(sl, norm).bias, getattr(tl, norm).bias[units])
    assert logits(student, make_batch()).shape[-1] == VOCAB


def test_opt_projection_units_cut_the_projections_and_keep_the_residual():
    config, teacher, plan, student = narrow_plan("opt_proj", 6)
    units = plan.units
    assert plan.norm_scales is None and plan.heads is None
    assert (student.config.hidden_size, student.config.word_embed_proj_dim) == (HIDDEN, 6)
    t, s = teacher.model.decoder, student.model.decoder
    assert torch.equal(s.embed_tokens.weight, t.embed_tokens.weight[:, units])
    assert torch.equal(s.project_in.weight, t.project_in.weight[:, units])
    assert torch.equal(s.project_out.weight, t.project_out.weight[units, :])
    assert torch.equal(s.embed_positions.weight, t.embed_positions.weight)
    assert torch.equal(s.layers[1].fc1.weight, t.layers[1].fc1.weight)
    # Reference: the teacher with the embedding columns outside the units zeroed, read at the units. The
    # residual stream is untouched, so its last hidden state (LM-head input) at the units is the student's.
    reference = copy.deepcopy(teacher)
    dropped = [u for u in range(12) if u not in units]
    with torch.no_grad():
        reference.model.decoder.embed_tokens.weight[:, dropped] = 0
    batch = make_batch()
    with torch.no_grad():
        hidden_r = reference(**batch, output_hidden_states=True).hidden_states[-1]
        hidden_s = student(**batch, output_hidden_states=True).hidden_states[-1]
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden_s[valid], hidden_r[valid][:, units], atol=1e-5, rtol=0)


# ---- Depth: block importance and the kept layers -----------------------------------------------------


def silence_layer(model, family: str, index: int) -> None:
    """Zero the residual writes of one layer, which then passes its input through (block importance 0)."""
    with torch.no_grad():
        if family == "llama":
            layer = model.model.layers[index]
            modules = [layer.self_attn.o_proj, layer.mlp.down_proj]
        elif family == "opt":
            layer = model.model.decoder.layers[index]
            modules = [layer.self_attn.out_proj, layer.fc2]
        else:
            layer = model.transformer.h[index]
            modules = [layer.attn.c_proj, layer.mlp.c_proj]
        for module in modules:
            for param in module.parameters():
                param.zero_()


def reference_block_importance(model, family: str, batch) -> torch.Tensor:
    """(L,) float64 mean over valid tokens of 1 - cos(layer input, layer output), from output_hidden_states of
    a copy whose final norm is removed (so hidden_states[-1] is the last layer's raw output)."""
    bare = copy.deepcopy(model)
    if family == "llama":
        bare.model.norm = torch.nn.Identity()
    elif family == "opt":
        bare.model.decoder.final_layer_norm = None
    else:
        bare.transformer.ln_f = torch.nn.Identity()
    with torch.no_grad():
        hidden = bare(**batch, output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].bool()
    scores = []
    for i in range(LAYERS):
        a, b = hidden[i][valid].double(), hidden[i + 1][valid].double()
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        scores.append((1 - cos).mean())
    return torch.stack(scores)


def drop_layers(model, family: str, keep: list[int]):
    """A deepcopy of ``model`` whose layer list holds only ``keep``."""
    reference = copy.deepcopy(model)
    if family == "llama":
        reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in keep])
    elif family == "opt":
        reference.model.decoder.layers = torch.nn.ModuleList(
            [reference.model.decoder.layers[i] for i in keep]
        )
    else:
        reference.transformer.h = torch.nn.ModuleList([reference.transformer.h[i] for i in keep])
    reference.config.num_hidden_layers = len(keep)
    return reference


@pytest.mark.parametrize("case", ["llama", "opt", "gpt2"])
def test_depth_keeps_the_most_important_layers(case):
    family = CASES[case][0]
    config, teacher = make_teacher(case)
    silence_layer(teacher, family, 0)  # layer 0 becomes the least important: keeping layers[:k] would fail
    batch = make_batch()
    units = some_units(HIDDEN, HIDDEN)
    stats = collect_prune_statistics(teacher, [batch], units)
    expected = reference_block_importance(teacher, family, batch)
    torch.testing.assert_close(stats.block_importance(), expected, atol=1e-6, rtol=1e-5)
    assert float(expected[0]) < 1e-6 and float(expected[1:].min()) > 1e-3
    plan = make_plan(config, units, stats, num_layers=2, allow_full_width=True)
    assert plan.layers == sorted(torch.topk(expected, 2).indices.tolist()) == [1, 2]
    student = prune_model(teacher, plan)
    assert student.config.num_hidden_layers == 2
    reference = drop_layers(teacher, family, plan.layers)
    torch.testing.assert_close(logits(student, batch), logits(reference, batch), atol=1e-5, rtol=0)


def test_mlp_neurons_are_ranked_by_mean_down_projection_input():
    config, teacher = make_teacher("llama")
    batches = [make_batch(0), make_batch(1)]
    captured = {i: [] for i in range(LAYERS)}  # post-attention norm outputs at valid tokens
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda module, args, out, i=i: captured[i].append(out.detach())
        )
        for i, layer in enumerate(teacher.model.layers)
    ]
    units = some_units(HIDDEN, 8)
    try:
        stats = collect_prune_statistics(teacher, batches, units)
    finally:
        for hook in hooks:
            hook.remove()
    for i, layer in enumerate(teacher.model.layers):
        rows = torch.cat(
            [out[b["attention_mask"].bool()] for out, b in zip(captured[i], batches, strict=True)]
        )
        rows = rows.double()
        gate, up = layer.mlp.gate_proj.weight.double(), layer.mlp.up_proj.weight.double()
        activation = torch.nn.functional.silu(rows @ gate.T) * (rows @ up.T)  # LLaMA MLP: silu(g) * u
        expected = activation.abs().mean(dim=0)
        torch.testing.assert_close(stats.neuron_magnitude()[i], expected, atol=1e-6, rtol=1e-5)
    plan = make_plan(config, units, stats, intermediate_size=5)
    for new, old in enumerate(plan.layers):
        magnitude = stats.neuron_magnitude()[old]
        assert plan.mlp_neurons[new] == sorted(torch.topk(magnitude, 5).indices.tolist())


def test_gpt2_heads_are_ranked_by_mean_head_output_norm():
    config, teacher = make_teacher("gpt2")
    with torch.no_grad():  # head 3's values x3 in every layer: it must be kept (keeping heads[:2] would fail)
        for block in teacher.transformer.h:
            block.attn.c_attn.weight[:, 2 * HIDDEN + 3 * HEAD_DIM :] *= 3
    batch = make_batch()
    captured = []  # ln_1 outputs (B, T, D): the attention input of each layer
    hooks = [
        block.ln_1.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
        for block in teacher.transformer.h
    ]
    units = some_units(HIDDEN, 8)
    try:
        stats = collect_prune_statistics(teacher, [batch], units)
    finally:
        for hook in hooks:
            hook.remove()
    mask = batch["attention_mask"].bool()  # (B, T)
    seq = mask.shape[1]
    # (B, 1, T_q, T_k): a query sees earlier keys that are not padding
    allowed = torch.ones(seq, seq).tril().bool() & mask[:, None, None, :]
    for block, y in zip(teacher.transformer.h, captured, strict=True):
        qkv = y.double() @ block.attn.c_attn.weight.double() + block.attn.c_attn.bias.double()  # (B, T, 3D)
        q, k, v = (part.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for part in qkv.split(HIDDEN, -1))
        scores = (q @ k.transpose(-1, -2) / HEAD_DIM**0.5).masked_fill(~allowed, float("-inf"))
        per_head = (scores.softmax(-1) @ v).norm(dim=-1)  # (B, H, T)
        expected = per_head.permute(0, 2, 1)[mask].mean(dim=0)  # (H,) over valid queries
        torch.testing.assert_close(
            stats.head_importance()[block.attn.layer_idx], expected, atol=1e-6, rtol=1e-5
        )
    plan = make_plan(config, units, stats)
    for layer, heads in zip(plan.layers, plan.heads, strict=True):
        assert heads == sorted(torch.topk(stats.head_importance()[layer], 2).indices.tolist())
        assert 3 in heads


# ---- Norm calibration --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama_gqa", "opt", "gpt2"])
def test_norm_ratios_match_a_float64_reference(case):
    config, teacher = make_teacher(case)
    batches = [make_batch(0), make_batch(1)]
    norm_type = torch.nn.LayerNorm if CASES[case][0] != "llama" else type(teacher.model.norm)
    captured = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: captured.setdefault(name, []).append(args[0])
        )
        for name, module in teacher.named_modules()
        if isinstance(module, norm_type)
    ]
    units = some_units(HIDDEN, 8)
    try:
        stats = collect_prune_statistics(teacher, batches, units)
    finally:
        for hook in hooks:
            hook.remove()
    ratios = stats.norm_ratios()
    prefix = {"llama": "model.", "opt": "model.decoder.", "gpt2": "transformer."}[CASES[case][0]]
    assert sorted(prefix + name for name in ratios) == sorted(captured) and len(captured) == 2 * LAYERS + 1
    for name, inputs in captured.items():
        # OPT hands its MLP norm (B * T, d) rows: the same token order as (B, T, d) flattened.
        rows = torch.cat(
            [
                x.reshape(-1, HIDDEN)[b["attention_mask"].flatten().bool()]
                for x, b in zip(inputs, batches, strict=True)
            ]
        ).double()
        kept = rows[:, units]
        if norm_type is torch.nn.LayerNorm:
            ratio = kept.std(-1, correction=0) / rows.std(-1, correction=0)
        else:
            ratio = kept.pow(2).mean(-1).sqrt() / rows.pow(2).mean(-1).sqrt()
        assert ratios[name.removeprefix(prefix)] == pytest.approx(float(ratio.mean()), rel=1e-6)
    plan = make_plan(config, units, stats, num_layers=2)
    assert plan.norm_scales == {
        k: v for k, v in ratios.items() if "." not in k or int(k.split(".")[1]) in plan.layers
    }


def test_statistics_sum_over_batches_and_survive_a_wrapper():
    """Two ranks' state tensors summed (what the all-reduce does) give the statistics of all batches."""
    config, teacher = make_teacher("gpt2")
    units = some_units(HIDDEN, 8)
    both = collect_prune_statistics(teacher, [make_batch(0), make_batch(1)], units)

    class Engine(torch.nn.Module):  # wraps the model as .module, like a DeepSpeed engine
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    first = collect_prune_statistics(Engine(teacher), [make_batch(0)], units)
    second = collect_prune_statistics(teacher, [make_batch(1)], units)
    first.load_state_tensor(first.state_tensor() + second.state_tensor())
    assert first.num_tokens == both.num_tokens == 2 * int(make_batch()["attention_mask"].sum())
    torch.testing.assert_close(first.state_tensor(), both.state_tensor(), atol=1e-9, rtol=1e-9)
    assert both.head_importance().shape == (LAYERS, HEADS)
    assert not teacher.training


# ---- Checkpoints, names, the plan file ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "teacher_shard"), [("llama_gqa", "8KB"), ("gpt2", None), ("opt_proj", "8KB")]
)
def test_prune_checkpoint_matches_prune_model(tmp_path, case, teacher_shard):
    config, teacher = make_teacher(case)
    d_s = 6 if case == "opt_proj" else 8
    units = some_units(head_input_width(case), d_s)
    stats = collect_prune_statistics(teacher, [make_batch()], units)
    plan = make_plan(config, units, stats, num_layers=2, intermediate_size=20)
    src, dst = tmp_path / "teacher", tmp_path / "student"
    teacher.save_pretrained(src, **({"max_shard_size": teacher_shard} if teacher_shard else {}))
    assert (src / "model.safetensors.index.json").exists() == (teacher_shard is not None)
    prune_checkpoint(src, dst, plan, max_shard_size="6KB")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in dst.glob("*.safetensors")) == shards
    written = {}
    for shard in shards:
        with safe_open(dst / shard, framework="pt") as reader:
            written |= {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
    student = prune_model(teacher, plan)
    expected = student.state_dict()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(expected) - tied <= set(written) <= set(expected)
    for name, tensor in written.items():
        assert torch.equal(tensor, expected[name]), name
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    batch = make_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(student, batch), atol=1e-6, rtol=0)


def test_prune_checkpoint_casts_to_dtype_and_refuses_a_used_directory(tmp_path):
    config, teacher = make_teacher("llama")
    plan = make_plan(config, some_units(HIDDEN, HIDDEN), allow_full_width=True)
    teacher.save_pretrained(tmp_path / "teacher")
    prune_checkpoint(tmp_path / "teacher", tmp_path / "student", plan, dtype="bf16")
    with safe_open(tmp_path / "student" / "model.safetensors", framework="pt") as reader:
        embedding = reader.get_tensor("model.embed_tokens.weight")
    assert embedding.dtype == torch.bfloat16
    assert torch.equal(embedding, teacher.model.embed_tokens.weight[:, plan.units].to(torch.bfloat16))
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        prune_checkpoint(tmp_path / "teacher", tmp_path / "student", plan)


def test_prune_tensor_names_with_and_without_prefix():
    config, teacher = make_teacher("gpt2")
    plan = PrunePlan("gpt2", units=some_units(HIDDEN, 8), layers=[0, 2], heads=[[0, 3], [1, 2]])
    weight = teacher.transformer.h[2].attn.c_attn.weight
    [(name, a)] = prune_tensor("transformer.h.2.attn.c_attn.weight", weight, plan, config)
    [(bare_name, b)] = prune_tensor("h.2.attn.c_attn.weight", weight, plan, config)
    assert (name, bare_name) == ("transformer.h.1.attn.c_attn.weight", "h.1.attn.c_attn.weight")
    assert torch.equal(a, b)
    dropped_layer = teacher.transformer.h[1].mlp.c_fc.weight
    assert prune_tensor("transformer.h.1.mlp.c_fc.weight", dropped_layer, plan, config) == []
    assert prune_tensor("h.0.attn.bias", torch.ones(1, 1, 8, 8), plan, config) == []  # legacy mask buffer
    llama_config, llama = make_teacher("llama")
    llama_plan = PrunePlan("llama", units=some_units(HIDDEN, 8), layers=[1])
    inv_freq = llama.model.rotary_emb.inv_freq
    [(name, out)] = prune_tensor("model.rotary_emb.inv_freq", inv_freq, llama_plan, llama_config)
    assert name == "model.rotary_emb.inv_freq" and out is inv_freq
    opt_config, opt = make_teacher("opt")
    opt_plan = PrunePlan("opt", units=list(range(HIDDEN)), layers=[2])
    fc1 = opt.model.decoder.layers[2].fc1.weight
    [(name, _)] = prune_tensor("decoder.layers.2.fc1.weight", fc1, opt_plan, opt_config)
    assert name == "decoder.layers.0.fc1.weight"


def test_plan_json_round_trip():
    plan = PrunePlan("opt", [3, 1, 2, 0], [0, 2], [[1, 5], [0, 7]], [[2], [0]], {"final_layer_norm": 0.9})
    assert PrunePlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        PrunePlan.from_json(json.dumps({**json.loads(plan.to_json()), "extra": 1}))
    with pytest.raises(ValueError, match="increasing"):
        PrunePlan("opt", [0, 1], [2, 0])


# ---- Bad input ---------------------------------------------------------------------------------------


def test_bad_units_layers_and_sizes_are_refused():
    config, teacher = make_teacher("llama")
    stats = collect_prune_statistics(teacher, [make_batch()], some_units(HIDDEN, 8))
    units = stats.units
    with pytest.raises(ValueError, match=r"d_S < d_T units; got d_S=16, d_T=16"):
        make_plan(config, list(range(HIDDEN)), stats)
    with pytest.raises(ValueError, match=r"outside \[0, d_T=16\): \[16\]"):
        make_plan(config, [0, 16], stats)
    with pytest.raises(ValueError, match=r"duplicated: \[1\]"):
        make_plan(config, [1, 1, 2], stats)
    for bad in (0, LAYERS + 1):
        with pytest.raises(ValueError, match=rf"num_layers must be an int in \[1, {LAYERS}\].*got {bad}"):
            make_plan(config, units, stats, num_layers=bad)
    for bad in (0, FFN + 1):
        with pytest.raises(ValueError, match=rf"intermediate_size must be an int in \[1, {FFN}\].*got {bad}"):
            make_plan(config, units, stats, intermediate_size=bad)
    with pytest.raises(ValueError, match=r"\['num_layers', 'norm calibration'\] needs statistics"):
        make_plan(config, units, num_layers=2)
    with pytest.raises(ValueError, match="collected for the same units"):
        make_plan(config, units[::-1], stats)
    assert make_plan(config, units[::-1], stats, calibrate_norms=False).norm_scales is None


def test_unsupported_family_is_refused():
    from transformers import GPTNeoXConfig

    neox = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
    )
    for call in (lambda: make_plan(neox, [0, 1]), lambda: pruned_config(neox, PrunePlan("llama", [0], [0]))):
        with pytest.raises(
            ValueError,
            match=r"does not support model family 'gpt_neox'.*\['bart', 'bert', 'gpt2', 'llama', 'opt'\]",
        ):
            call()


@pytest.mark.parametrize(("case", "d_s", "nearest"), [("gpt2", 10, "[8, 12]"), ("opt", 6, "[4, 8]")])
def test_width_must_be_whole_heads_for_opt_and_gpt2(case, d_s, nearest):
    config, teacher = make_teacher(case)
    units = some_units(HIDDEN, d_s)
    stats = collect_prune_statistics(teacher, [make_batch()], units)
    message = (
        rf"d_S={d_s} is not a multiple of head_dim={HEAD_DIM}.*nearest valid widths: {re.escape(nearest)}"
    )
    with pytest.raises(ValueError, match=message):
        make_plan(config, units, stats)


def test_prune_tensor_refuses_unknown_names_and_wrong_shapes():
    config, teacher = make_teacher("llama")
    plan = PrunePlan("llama", units=some_units(HIDDEN, 8), layers=[0, 1, 2])
    with pytest.raises(ValueError, match=r"unknown llama layer tensor 'model.layers.0.self_attn.qkv.weight'"):
        prune_tensor("model.layers.0.self_attn.qkv.weight", torch.zeros(48, 16), plan, config)
    with pytest.raises(ValueError, match=r"unknown llama tensor 'model.vision_tower.weight'"):
        prune_tensor("model.vision_tower.weight", torch.zeros(4), plan, config)
    with pytest.raises(
        ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(16, 30\); dim 1 should be 32"
    ):
        prune_tensor("model.layers.0.mlp.down_proj.weight", torch.zeros(16, 30), plan, config)
    with pytest.raises(ValueError, match="project_in/out: d_S=16 equals hidden_size"):
        opt_config = tiny_config(
            "opt", hidden_size=HIDDEN, num_layers=1, num_heads=HEADS, vocab_size=VOCAB, word_embed_proj_dim=24
        )
        make_plan(opt_config, list(range(HIDDEN)))
    with pytest.raises(ValueError, match="plan is for family 'opt', the teacher is 'llama'"):
        pruned_config(config, PrunePlan("opt", [0, 1], [0]))


def test_a_quantized_teachers_student_is_plain_and_round_trips_through_save_and_load(tmp_path):
    """A GGUF teacher's config carries quantization_config; the cut student holds plain tensors, so its config
    must not (transformers would refuse to save the re-loaded student). The width is a multiple of the head
    count, which LlamaConfig checks on save (the job refuses other widths up front)."""
    _, teacher = make_teacher("llama")
    teacher.config.quantization_config = {"quant_method": "gguf", "gguf_file": "t.gguf", "dequantize": False}
    width = HEADS * 2
    student = prune_model(teacher, PrunePlan("llama", units=some_units(HIDDEN, width), layers=[0, 1]))
    assert not hasattr(student.config, "quantization_config")
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    again.save_pretrained(tmp_path / "s2")  # refused when quantization_config leaked into the student
    ids = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(again(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=0)
