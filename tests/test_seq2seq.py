"""task=seq2seq (issue 18): the two-layer importance against autograd through the whole model, the one-pass
selection against two separate passes, the batch layout, and the tiny recipe end to end on 2 CPU ranks."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import REPO, run_recipe

from flexkd_ds.inputs import seq2seq as D
from flexkd_ds.inputs.models import tiny_config
from flexkd_ds.method.seq2seq import seq2seq_tangent_scores

TINY = REPO / "launch" / "recipes" / "tiny-seq2seq.yaml"


def tiny_bart():
    from transformers import AutoModelForSeq2SeqLM

    config = tiny_config("bart", hidden_size=16, num_layers=2, num_heads=2, vocab_size=30)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).double().eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()  # a non-zero bias, so the test sees it used
    return model


def a_batch():
    items = [
        {"input_ids": [5, 6, 7, 8, 2], "labels": [9, 10, 2]},
        {"input_ids": [11, 12, 2], "labels": [13, 2]},
    ]
    return D.collate(items, pad_id=0, decoder_start_id=2)


def test_collate_shifts_the_labels_behind_the_start_token():
    batch = a_batch()
    assert batch["decoder_input_ids"].tolist() == [[2, 9, 10], [2, 13, 0]]
    assert batch["labels"].tolist() == [[9, 10, 2], [13, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def reference_scores(model, batch):
    """Autograd through the whole model: F = sum over target tokens of sum_v log p_v; per-example mean |dF/dh|
    over the source tokens (last encoder layer) and over the target tokens (last decoder layer)."""
    enc = model.get_encoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    enc.retain_grad()
    dec = model.get_decoder()(input_ids=batch["decoder_input_ids"], attention_mask=batch["decoder_attention_mask"],
                              encoder_hidden_states=enc, encoder_attention_mask=batch["attention_mask"]).last_hidden_state  # fmt: skip
    dec.retain_grad()
    logits = model.lm_head(dec) + model.final_logits_bias
    target = (batch["labels"] != -100).double()
    (torch.log_softmax(logits, -1) * target[..., None]).sum().backward()
    source = batch["attention_mask"].double()
    enc_ref = (enc.grad.abs() * source[..., None]).sum(1) / source.sum(1, keepdim=True)
    dec_ref = (dec.grad.abs() * target[..., None]).sum(1) / target.sum(1, keepdim=True)
    return enc_ref, dec_ref


def scores_of(model, batch, layers):
    with torch.no_grad():
        enc = model.get_encoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state

    def decode(states):
        return model.get_decoder()(input_ids=batch["decoder_input_ids"],
                                   attention_mask=batch["decoder_attention_mask"], encoder_hidden_states=states,
                                   encoder_attention_mask=batch["attention_mask"]).last_hidden_state  # fmt: skip

    return seq2seq_tangent_scores(enc, decode, model.lm_head.weight, model.final_logits_bias,
                                  batch["attention_mask"].bool(), batch["labels"] != -100, layers)  # fmt: skip


def test_two_layer_importance_equals_autograd_through_the_model():
    model, batch = tiny_bart(), a_batch()
    enc_ref, dec_ref = reference_scores(model, batch)
    got = scores_of(model, batch, ("encoder", "decoder"))
    torch.testing.assert_close(got["encoder"], enc_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["decoder"], dec_ref, rtol=1e-10, atol=1e-14)
    assert float(got["encoder"].abs().sum()) > 0 and float(got["decoder"].abs().sum()) > 0


def test_one_pass_selection_equals_two_separate_passes():
    model, batch = tiny_bart(), a_batch()
    both = scores_of(model, batch, ("encoder", "decoder"))
    assert torch.equal(both["encoder"], scores_of(model, batch, ("encoder",))["encoder"])
    assert torch.equal(both["decoder"], scores_of(model, batch, ("decoder",))["decoder"])
    with pytest.raises(ValueError, match="non-empty subset"):
        scores_of(model, batch, ("middle",))


def run_tiny(tmp_path, overrides=(), nprocs=2, check=True):
    return run_recipe(TINY, tmp_path, overrides, nprocs, check)


def test_holdout_validation_is_a_slice_of_ones_own_rows(tmp_path):
    """data.valid=holdout (the default beside one's own data.train) holds data.valid_holdout rows of the
    training file out, when it has 10x as many; it used to be looked up as a hub dataset named 'holdout'."""
    from flexkd_ds.inputs.config import load_config
    from flexkd_ds.jobs.seq2seq import load_rows

    def split(count, *overrides):
        path = tmp_path / f"rows{count}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in D.generated_rows(count, seed=3)))
        cfg = load_config(
            TINY, [f"output_dir={tmp_path}", f"data.train={path}", "data.valid=holdout", *overrides]
        )
        return D.generated_rows(count, seed=3), *load_rows(cfg, D.resolve_source(cfg.data))

    everything, train, valid = split(200, "data.valid_holdout=20")
    assert (len(train), len(valid)) == (180, 20)
    key = lambda r: (r["text"], r["target"])  # noqa: E731
    assert sorted(map(key, train + valid)) == sorted(map(key, everything))
    everything, train, valid = split(100)  # 100 < 10 x 64: nothing held out
    assert train == everything and valid is None


def test_tiny_seq2seq_two_ranks_end_to_end(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    out, proc = run_tiny(tmp_path)
    result = json.loads((out / "eval.json").read_text())
    assert result["rows"] == 16 and 0 <= result["rouge2"] <= 100 and 0 <= result["rougeL"] <= 100
    assert "ROUGE-2" in proc.stdout and "ROUGE-L" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert all(m["feature_encoder"] > 0 and m["feature_decoder"] > 0 for m in metrics)
    assert (out / "importance.encoder.safetensors").is_file() and (
        out / "importance.decoder.safetensors"
    ).is_file()
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "student")
    assert type(model).__name__ == "BartForConditionalGeneration" and model.config.d_model == 32
    # launch/evaluate.py --task seq2seq on the export: the run's own ROUGE on the same generated rows
    from flexkd_ds.jobs.evaluate import EvalOptions, run_evaluate

    opts = EvalOptions(models=(("student", str(out / "student")),), sets=(("gen", "builtin:seq2seq"),),
                       out=tmp_path / "eval", task="seq2seq", max_rows=16, max_new_tokens=16, progress=False)  # fmt: skip
    scores = run_evaluate(opts)["models"]["student"]["gen"]
    assert scores["rows"] == 16
    assert scores["rouge2"] == pytest.approx(result["rouge2"]) and scores["rougeL"] == pytest.approx(
        result["rougeL"]
    )
    wrong = EvalOptions(models=(("student", str(out / "student")),), sets=(("gen", "builtin:classification"),),
                        out=tmp_path / "eval2", task="classification", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="is not a sequence classifier"):
        run_evaluate(wrong)


def test_a_missing_column_stops_before_anything_is_written(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"document": "a b c", "summary": "a"}) + "\n")
    out, proc = run_tiny(tmp_path, [f"data.train={rows}", "data.valid=null"], nprocs=1, check=False)
    assert proc.returncode != 0 and "no column ['text', 'target']" in proc.stdout + proc.stderr
    assert not out.exists()
    out, _ = run_tiny(tmp_path, [f"data.train={rows}", "data.valid=null", "train.max_steps=1",
                                 "data.field_map={text: document, target: summary}"], nprocs=1)  # fmt: skip
    assert (out / "student" / "config.json").is_file()


@pytest.mark.slow
def test_pruned_bart_student_is_the_teachers_cut(tmp_path):
    """task=seq2seq with model.student_init=pruned on 2 ranks: one set of units cuts both stacks (the two
    layers' scores, each scaled to mean 1, summed), the written student is that plan applied in memory to the
    teacher the job built, and both correlation terms pair student unit m with the unit it was cut from."""
    from safetensors.torch import load_file

    from flexkd_ds.inputs.config import load_config
    from flexkd_ds.jobs.common import model_specs
    from flexkd_ds.jobs.seq2seq import load_seq2seq
    from flexkd_ds.method import prune

    overrides = ["model.student_arch={from_teacher: true, hidden_size: 32}", "model.student_init=pruned",
                 "prune.num_layers=1", "train.max_steps=2", "train.save_every=2"]  # fmt: skip
    out, proc = run_tiny(tmp_path, overrides)
    record = json.loads((out / "pruned_student" / "prune.json").read_text())
    plan = prune.PrunePlan(**record["plan"])
    assert len(plan.layers) == 2 and plan.layers[0] < 2 <= plan.layers[1]  # one of each stack
    assert len(plan.cross_heads) == 1 and len(plan.cross_heads[0]) == 2
    scores = [load_file(str(out / f"importance.{side}.safetensors"))["scores"].double() for side in D_LAYERS]
    combined = sum(s / s.mean() for s in scores)
    assert sorted(plan.units) == sorted(torch.argsort(-combined)[:32].tolist())
    assert "both layers' student unit m" in proc.stdout
    teacher, _, _ = model_specs(load_config(TINY, [f"output_dir={out}", *overrides]))
    expected = prune.prune_model(load_seq2seq(teacher, torch.float32), plan).state_dict()
    state = load_file(str(out / "pruned_student" / "model.safetensors"))
    assert (
        "model.encoder.layers.0.fc1.weight" in state
        and "model.decoder.layers.0.encoder_attn.q_proj.weight" in state
    )
    for name, tensor in state.items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=0, atol=0, msg=name)


D_LAYERS = ("encoder", "decoder")
