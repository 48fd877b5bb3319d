"""Pruning the other task families (issue 18): sequence classifiers (BERT, GPT-2, LLaMA) and BART, against
references written out here: a full-width permuted student reproduces its teacher, narrow students hold the
teacher's slices, and the statistics equal float64 means of the models' own hidden states."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from flexkd_ds.inputs.models import tiny_config
from flexkd_ds.method.prune import (
    collect_prune_statistics,
    make_plan,
    planned_config,
    prune_checkpoint,
    prune_model,
)

VOCAB, HIDDEN, LAYERS, HEADS, FFN, HEAD_DIM, LABELS = 40, 16, 3, 4, 32, 4, 3


def randomise(model, seed: int):
    """Every parameter random (norm weights around 1), so each unit's bias and scale differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm = "norm" in name.lower() or ".ln_" in name
            param.copy_(1 + 0.2 * noise if is_norm and name.endswith("weight") else 0.3 * noise)
    return model.eval()


def classifier(family: str, seed: int = 0, **overrides):
    config = tiny_config(family, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, vocab_size=VOCAB,
                         intermediate_size=FFN, **overrides)  # fmt: skip
    config.num_labels, config.pad_token_id = LABELS, 0
    torch.manual_seed(seed)
    return config, randomise(AutoModelForSequenceClassification.from_config(config), seed + 1)


def bart(seed: int = 0, **overrides):
    config = tiny_config("bart", hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, vocab_size=VOCAB,
                         intermediate_size=FFN, **overrides)  # fmt: skip
    torch.manual_seed(seed)
    return config, randomise(AutoModelForSeq2SeqLM.from_config(config), seed + 1)


def batch(seq2seq: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows (classifiers pool at [CLS] or at the last attended token); BART adds a decoder side
    with its own padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[~mask.bool()] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if seq2seq:
        dec = torch.randint(3, VOCAB, (3, 5), generator=gen)
        dec_mask = torch.ones(3, 5, dtype=torch.long)
        dec_mask[0, 3:] = 0
        out |= {"decoder_input_ids": dec, "decoder_attention_mask": dec_mask}
    return out


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits if logits.dim() == 2 else logits[inputs["decoder_attention_mask"].bool()]


def shuffled(width: int, count: int, seed: int = 3) -> list[int]:
    units = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    assert units != sorted(units)
    return units


MODELS = {
    "bert": lambda: classifier("bert"),
    "gpt2": lambda: classifier("gpt2"),
    "llama": lambda: classifier("llama"),
    "bart": lambda: bart(),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_full_width_permuted_student_reproduces_the_teacher(case):
    config, teacher = MODELS[case]()
    units = shuffled(HIDDEN, HIDDEN)
    student = prune_model(teacher, make_plan(config, units, allow_full_width=True))
    assert type(student) is type(teacher)
    inputs = batch(seq2seq=case == "bart")
    expected = outputs(teacher, inputs)
    torch.testing.assert_close(outputs(student, inputs), expected, atol=2e-5, rtol=0)
    embedding = teacher.get_input_embeddings().weight
    assert torch.equal(student.get_input_embeddings().weight, embedding[:, units])


def channels(heads: list[int]) -> list[int]:
    return [h * HEAD_DIM + c for h in heads for c in range(HEAD_DIM)]


def test_bert_classifier_student_holds_the_teachers_slices():
    config, teacher = classifier("bert")
    units = shuffled(HIDDEN, 8)
    stats = collect_prune_statistics(teacher, [batch(seed=0), batch(seed=1)], units)
    plan = make_plan(config, units, stats, num_layers=2, intermediate_size=20)
    student = prune_model(teacher, plan)
    c = student.config
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads) == (8, 2, 20, 2)
    assert c.num_labels == LABELS and len(plan.pooler) == 8 and plan.cross_heads is None
    t, s = teacher.bert, student.bert
    for i, layer in enumerate(plan.layers):
        tl, sl = t.encoder.layer[layer], s.encoder.layer[i]
        kept = channels(plan.heads[i])
        neurons = plan.mlp_neurons[i]
        assert torch.equal(sl.attention.self.query.weight, tl.attention.self.query.weight[kept][:, units])
        assert torch.equal(sl.attention.self.value.bias, tl.attention.self.value.bias[kept])
        assert torch.equal(sl.attention.output.dense.weight, tl.attention.output.dense.weight[units][:, kept])
        assert torch.equal(sl.intermediate.dense.weight, tl.intermediate.dense.weight[neurons][:, units])
        assert torch.equal(sl.output.dense.weight, tl.output.dense.weight[units][:, neurons])
        assert torch.equal(sl.output.LayerNorm.bias, tl.output.LayerNorm.bias[units])
        scale = plan.norm_scales[f"encoder.layer.{layer}.output.LayerNorm"]
        torch.testing.assert_close(sl.output.LayerNorm.weight, tl.output.LayerNorm.weight[units] * scale)
    assert torch.equal(
        s.embeddings.position_embeddings.weight, t.embeddings.position_embeddings.weight[:, units]
    )
    assert torch.equal(
        s.embeddings.token_type_embeddings.weight, t.embeddings.token_type_embeddings.weight[:, units]
    )
    assert "embeddings.LayerNorm" in plan.norm_scales
    assert torch.equal(s.pooler.dense.weight, t.pooler.dense.weight[plan.pooler][:, units])
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, plan.pooler])
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)
    assert planned_config(config, 8, num_layers=2, intermediate_size=20).to_dict() == c.to_dict() | {
        "_name_or_path": planned_config(config, 8, 2, 20)._name_or_path}  # fmt: skip


def test_bert_pooler_outputs_are_ranked_by_mean_magnitude():
    config, teacher = classifier("bert")
    inputs = [batch(seed=0), batch(seed=1)]
    stats = collect_prune_statistics(teacher, inputs, shuffled(HIDDEN, 8))
    # the reference: tanh(W h_[CLS] + b) from the model's own last hidden state, in float64
    pooled = []
    for b in inputs:
        with torch.no_grad():
            last = teacher.bert(**b).last_hidden_state[:, 0].double()
        dense = teacher.bert.pooler.dense
        pooled.append(torch.tanh(last @ dense.weight.double().T + dense.bias.double()))
    expected = torch.cat(pooled).abs().mean(dim=0)
    torch.testing.assert_close(stats.pooler_magnitude(), expected, atol=1e-6, rtol=1e-5)
    plan = make_plan(config, shuffled(HIDDEN, 8), stats, calibrate_norms=False)
    assert plan.pooler == sorted(torch.argsort(-expected)[:8].tolist())


def block_reference(states: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of 1 - cos(layer input, layer output), from output_hidden_states, float64."""
    valid = mask.bool()
    return torch.stack([
        (1 - torch.nn.functional.cosine_similarity(a[valid].double(), b[valid].double(), dim=-1)).mean()
        for a, b in zip(states[:-1], states[1:], strict=True)
    ])  # fmt: skip


def test_bart_statistics_use_each_stacks_own_tokens():
    config, teacher = bart()
    inputs = batch(seq2seq=True)
    stats = collect_prune_statistics(teacher, [inputs], shuffled(HIDDEN, 8))
    with torch.no_grad():
        out = teacher(**inputs, output_hidden_states=True)
    expected = torch.cat([
        block_reference(out.encoder_hidden_states, inputs["attention_mask"]),
        block_reference(out.decoder_hidden_states, inputs["decoder_attention_mask"]),
    ])  # fmt: skip
    torch.testing.assert_close(stats.block_importance(), expected, atol=1e-6, rtol=1e-5)
    assert stats.num_tokens == int(inputs["attention_mask"].sum() + inputs["decoder_attention_mask"].sum())
    assert stats.cross_head_importance()[:LAYERS].abs().sum() == 0  # encoder layers have no cross-attention
    assert bool((stats.cross_head_importance()[LAYERS:] > 0).all())


def test_bart_student_keeps_layers_of_each_stack_and_the_teachers_slices():
    config, teacher = bart()
    units = shuffled(HIDDEN, 8)
    stats = collect_prune_statistics(teacher, [batch(True, 0), batch(True, 1)], units)
    plan = make_plan(config, units, stats, num_layers=2)
    encoder = [i for i in plan.layers if i < LAYERS]
    decoder = [i - LAYERS for i in plan.layers if i >= LAYERS]
    assert len(encoder) == len(decoder) == 2 and len(plan.cross_heads) == 2
    importance = stats.block_importance()
    assert encoder == sorted(torch.argsort(-importance[:LAYERS])[:2].tolist())
    assert decoder == sorted(torch.argsort(-importance[LAYERS:])[:2].tolist())
    student = prune_model(teacher, plan)
    c = student.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads) == (8, 2, 2, 2)
    t, s = teacher.model, student.model
    for j, layer in enumerate(decoder):
        tl, sl = t.decoder.layers[layer], s.decoder.layers[j]
        heads, cross = channels(plan.heads[len(encoder) + j]), channels(plan.cross_heads[j])
        assert torch.equal(sl.self_attn.q_proj.weight, tl.self_attn.q_proj.weight[heads][:, units])
        assert torch.equal(sl.encoder_attn.k_proj.weight, tl.encoder_attn.k_proj.weight[cross][:, units])
        assert torch.equal(sl.encoder_attn.out_proj.weight, tl.encoder_attn.out_proj.weight[units][:, cross])
        assert torch.equal(sl.encoder_attn_layer_norm.bias, tl.encoder_attn_layer_norm.bias[units])
        key = f"decoder.layers.{layer}.encoder_attn_layer_norm"
        torch.testing.assert_close(sl.encoder_attn_layer_norm.weight,
                                   tl.encoder_attn_layer_norm.weight[units] * plan.norm_scales[key])  # fmt: skip
    for j, layer in enumerate(encoder):
        assert torch.equal(s.encoder.layers[j].fc1.weight, t.encoder.layers[layer].fc1.weight[:, units])
    assert torch.equal(s.shared.weight, t.shared.weight[:, units])
    assert s.encoder.embed_tokens.weight is s.shared.weight and student.lm_head.weight is s.shared.weight
    assert torch.equal(s.decoder.embed_positions.weight, t.decoder.embed_positions.weight[:, units])
    assert torch.equal(student.final_logits_bias, teacher.final_logits_bias)
    assert {"encoder.layernorm_embedding", "decoder.layernorm_embedding"} <= set(plan.norm_scales)
    assert planned_config(config, 8, num_layers=2).d_model == 8


@pytest.mark.parametrize("case", ["bert", "gpt2", "bart"])
def test_prune_checkpoint_streams_the_same_student(tmp_path, case):
    config, teacher = MODELS[case]()
    units = shuffled(HIDDEN, 8)
    inputs = [batch(seq2seq=case == "bart", seed=s) for s in (0, 1)]
    plan = make_plan(config, units, collect_prune_statistics(teacher, inputs, units), num_layers=2)
    teacher.save_pretrained(tmp_path / "teacher")
    expected = prune_model(teacher, plan).state_dict()
    prune_checkpoint(tmp_path / "teacher", tmp_path / "student", plan)
    auto = AutoModelForSeq2SeqLM if case == "bart" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path / "student").state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_bart_width_must_be_whole_heads_and_scaled_embeddings_are_refused():
    config, teacher = bart()
    stats = collect_prune_statistics(teacher, [batch(True)], shuffled(HIDDEN, 6))
    with pytest.raises(ValueError, match=r"d_S=6 is not a multiple of head_dim=4.*\[4, 8\]"):
        make_plan(config, shuffled(HIDDEN, 6), stats)
    scaled, _ = bart(scale_embedding=True)
    with pytest.raises(ValueError, match="scale_embedding=True is not supported"):
        make_plan(scaled, shuffled(HIDDEN, 8))
