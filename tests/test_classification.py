"""task=classification (issue 18): metrics against small cases worked out by hand, the classifier importance
functional against its closed form, the pooled feature against the models' own heads, the data checks, and
the tiny recipe end to end on 2 CPU ranks (export loads with AutoModelForSequenceClassification, eval.json
holds the metric)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _helpers import REPO, run_recipe

from flexkd_ds.evaluation import classification_metrics as M
from flexkd_ds.inputs import classification as D
from flexkd_ds.inputs.data import DataError
from flexkd_ds.inputs.models import tiny_config
from flexkd_ds.jobs.classify import classifier_head, pooling_of
from flexkd_ds.method.classification import classifier_tangent_scores, pooled_rows

TINY = REPO / "launch" / "recipes" / "tiny-classification.yaml"

# ------------------------------------------------------------------------------------------------ metrics


def test_accuracy_and_f1_on_a_worked_case():
    predictions = [1, 0, 1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0, 1, 1]
    # TP = 3 (positions 0, 3, 6), FP = 1 (2), FN = 2 (4, 7), TN = 2: accuracy 5/8, F1 = 6 / (6 + 1 + 2)
    assert M.accuracy(predictions, labels) == pytest.approx(62.5)
    assert M.f1_positive(predictions, labels) == pytest.approx(100 * 6 / 9)
    mrpc = M.task_metrics("f1_accuracy", predictions, labels)
    assert mrpc["score"] == pytest.approx((62.5 + 100 * 6 / 9) / 2)
    assert M.f1_positive([0, 0], [0, 0]) == 0.0


def test_pearson_and_spearman_on_a_worked_case():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]
    # means 2.5; deviations (-1.5, -0.5, 0.5, 1.5) and (-0.5, -1.5, 1.5, 0.5): sum of products 0.75+0.75+0.75+0.75
    # = 3.0; sums of squares 5 and 5: r = 3 / 5
    assert M.pearson(x, y) == pytest.approx(60.0)
    assert M.spearman(x, y) == pytest.approx(60.0)  # already ranks
    # ties share their mean rank: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]
    assert M.average_ranks([10, 20, 20, 30]) == [1.0, 2.5, 2.5, 4.0]
    # a monotone but non-linear relation: Spearman 100, Pearson below
    x2, y2 = [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 100.0]
    assert M.spearman(x2, y2) == pytest.approx(100.0)
    assert M.pearson(x2, y2) < 90.0
    stsb = M.task_metrics("pearson_spearman", x, y)
    assert stsb["score"] == pytest.approx(60.0)
    assert M.pearson([1.0, 1.0], [0.0, 1.0]) == 0.0


# ------------------------------------------------------------------------------- importance functional


def test_class_logprob_tangent_equals_its_closed_form():
    """Through a linear head z = W h + b: F = sum_c log p_c, dF/dh = W^T (1 - C p), written out in float64."""
    g = torch.Generator().manual_seed(0)
    weight, bias = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    h = torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = classifier_tangent_scores(h, lambda x: x @ weight.T + bias)
    for b in range(4):
        z = [sum(weight[c, j] * h[b, j] for j in range(5)) + bias[c] for c in range(3)]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        p = [v / sum(e) for v in e]
        for j in range(5):
            want = abs(sum(weight[c, j] * (1 - 3 * p[c]) for c in range(3)))
            assert float(got[b, j]) == pytest.approx(float(want), rel=1e-10)
    # one output (regression): F = y(h), dF/dh = w
    w = torch.randn(1, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(classifier_tangent_scores(h, lambda x: x @ w.T), w.abs().expand(4, 5))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_the_pooled_feature_is_what_the_classifier_reads(family):
    """head(pooled_rows(hidden_states[-1])) equals the model's own logits, right-padded rows included."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(family, hidden_size=16, num_layers=2, num_heads=2, vocab_size=40)
    config.num_labels, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[1, 4:], attention[2, 6:] = 0, 0
    ids = ids.masked_fill(attention == 0, 0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        features = pooled_rows(out.hidden_states[-1], attention, pooling_of(config))
        _, head = classifier_head(model)
        torch.testing.assert_close(head(features), out.logits, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_and_their_errors_name_the_row_and_column(tmp_path):
    fields = {"text": "sentence", "text_pair": None, "label": "label"}
    good = write_jsonl(
        tmp_path / "good.jsonl", [{"sentence": "a b", "label": 1}, {"sentence": "c", "label": 0}]
    )
    assert D.load_rows(good, "train", fields, 2) == [
        {"text": "a b", "text_pair": None, "label": 1}, {"text": "c", "text_pair": None, "label": 0}]  # fmt: skip
    outside = write_jsonl(
        tmp_path / "outside.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 2}]
    )
    with pytest.raises(DataError, match=r"row 2: label 2 is outside the classes \[0, 2\)"):
        D.load_rows(outside, "train", fields, 2)
    no_column = write_jsonl(tmp_path / "nocol.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(DataError, match=r"no column \['sentence'\].*data.field_map"):
        D.load_rows(no_column, "train", fields, 2)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"sentence": " ", "label": 1}])
    with pytest.raises(DataError, match="row 1: column 'sentence' is empty"):
        D.load_rows(empty, "train", fields, 2)
    scores = write_jsonl(tmp_path / "stsb.jsonl", [{"sentence": "a", "label": "3.5"}])
    assert D.load_rows(scores, "train", fields, 1)[0]["label"] == 3.5


def test_presets_fill_columns_labels_split_and_metric():
    from flexkd_ds.inputs.config import load_config

    cfg = load_config(TINY, ["data.train=glue:mrpc", "classify.num_labels=null", "classify.metric=auto",
                             "data.valid=validation"])  # fmt: skip
    source = D.resolve_source(cfg.data, cfg.classify)
    assert source.train == "nyu-mll/glue:mrpc" and source.valid == "nyu-mll/glue:mrpc"
    assert (source.fields["text"], source.fields["text_pair"]) == ("sentence1", "sentence2")
    assert (source.num_labels, source.metric, source.valid_split) == (2, "f1_accuracy", "validation")
    stsb = D.resolve_source(load_config(TINY, ["data.train=glue:stsb", "classify.num_labels=null",
                                               "classify.metric=auto"]).data,
                            load_config(TINY, ["classify.num_labels=null", "classify.metric=auto"]).classify)  # fmt: skip
    assert (stsb.num_labels, stsb.metric) == (1, "pearson_spearman")


def test_holdout_validation_follows_the_10x_rule(tmp_path):
    """data.valid=holdout holds data.valid_holdout rows out only of a training set 10x as large (the option's
    documented rule, as for instruction data); before, 64 of 60 rows left nothing to train on."""
    from flexkd_ds.inputs.config import load_config
    from flexkd_ds.jobs.classify import load_sets
    from flexkd_ds.jobs.common import model_specs

    def sets(*overrides):
        cfg = load_config(TINY, [f"output_dir={tmp_path}", "data.valid=holdout", *overrides])
        return load_sets(cfg, model_specs(cfg)[2], D.resolve_source(cfg.data, cfg.classify))

    train, valid = sets("data.num_synthetic=60")  # 60 < 10 x 64: all trained on, no validation
    assert len(train) == 60 and valid is None
    train, valid = sets("data.num_synthetic=256", "data.valid_holdout=16")
    assert (len(train), len(valid)) == (240, 16)


# ------------------------------------------------------------------------------------- end to end


def run_tiny(tmp_path, overrides=(), nprocs=2, check=True):
    return run_recipe(TINY, tmp_path, overrides, nprocs, check)


def test_tiny_classification_two_ranks_end_to_end(tmp_path):
    from transformers import AutoModelForSequenceClassification

    out, proc = run_tiny(tmp_path)
    result = json.loads((out / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["rows"] == 64 and 0 <= result["score"] <= 100
    assert "validation (64 rows): accuracy" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and all(m["examples"] == 16 for m in metrics)
    model = AutoModelForSequenceClassification.from_pretrained(out / "student").eval()
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.hidden_size == 32
    assert model.config.num_labels == 2
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[98, 99, 100, 101]])).logits
    assert logits.shape == (1, 2)


@pytest.mark.slow
def test_tiny_decoder_classifier_two_ranks(tmp_path):
    """GPT-2 classifiers (pooled at the last token) and a regression task (one output, MSE, no logit term)."""
    from transformers import AutoModelForSequenceClassification

    arch = "{family: gpt2, hidden_size: %d, num_layers: 2, num_heads: 4, vocab_size: 259}"
    out, _ = run_tiny(tmp_path, [f"model.teacher_arch={arch % 64}", f"model.student_arch={arch % 32}",
                                 "classify.num_labels=1", "classify.metric=auto", "loss.beta=0"])  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    assert result["metric"] == "pearson_spearman" and {"pearson", "spearman"} <= set(result)
    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.num_labels == 1


def test_bad_classification_input_stops_before_anything_is_written(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"text": "abc", "label": 0}) + "\n" + json.dumps({"text": "abd", "label": 5}) + "\n"
    )
    out, proc = run_tiny(tmp_path, [f"data.train={rows}", "data.valid=null"], nprocs=1, check=False)
    assert proc.returncode != 0
    assert "row 2: label 5 is outside the classes [0, 2)" in proc.stdout + proc.stderr
    assert not out.exists()
    _, proc = run_tiny(tmp_path, ["loss.beta=1", "classify.num_labels=1"], nprocs=1, check=False)
    assert proc.returncode != 0 and "regression task" in proc.stdout + proc.stderr


def test_a_teacher_with_another_label_set_is_refused_before_anything_is_written(tmp_path):
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("bert", hidden_size=64, num_layers=1, num_heads=4, vocab_size=259)
    config.num_labels = 3
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "teacher3")
    out, proc = run_tiny(tmp_path, [f"model.teacher={tmp_path / 'teacher3'}", "model.teacher_arch=null"], nprocs=1,
                         check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "is a classifier with 3 labels, but the task has 2" in proc.stdout + proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_resumed_classification_run_ends_as_the_straight_one(tmp_path):
    """Checkpoints and resume are the causal-LM job's: 6 steps, then the same command extended to 12, equals
    12 steps straight (losses per step and the exported weights). Constant lr: a cosine schedule depends on
    train.max_steps."""
    from safetensors.torch import load_file

    fixed = ["train.lr_schedule=constant", "train.warmup_steps=0", "train.save_every=0"]
    straight, _ = run_tiny(tmp_path / "a", [*fixed, "train.max_steps=12"])
    resumed, _ = run_tiny(tmp_path / "b", [*fixed, "train.max_steps=6"])
    resumed, proc = run_tiny(tmp_path / "b", [*fixed, "train.max_steps=12"])
    read = lambda out: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [m["step"] for m in read(resumed)] == list(range(1, 13))
    for a, b in zip(read(resumed), read(straight), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    got, want = (
        load_file(resumed / "student" / "model.safetensors"),
        load_file(straight / "student" / "model.safetensors"),
    )
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_pruned_bert_student_is_the_teachers_cut(tmp_path):
    """task=classification with model.student_init=pruned on 2 ranks (ZeRO-3 teacher): the written student is
    the recorded plan applied in memory to the teacher the job built (same recipe and seed), its units are the
    importance file's, and training starts from it and exports a BertForSequenceClassification."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from flexkd_ds.inputs.config import load_config
    from flexkd_ds.jobs.classify import load_classifier
    from flexkd_ds.jobs.common import model_specs
    from flexkd_ds.method import prune

    overrides = ["model.student_arch={from_teacher: true, hidden_size: 32}", "model.student_init=pruned",
                 "prune.num_layers=1", "train.max_steps=2", "train.save_every=2"]  # fmt: skip
    out, proc = run_recipe(TINY, tmp_path, overrides)
    record = json.loads((out / "pruned_student" / "prune.json").read_text())
    plan = prune.PrunePlan(**record["plan"])
    assert len(plan.layers) == 1 and len(plan.heads[0]) == 2 and len(plan.pooler) == 32
    assert plan.units == load_file(str(out / "importance.safetensors"))["indices"].tolist()
    teacher, _, _ = model_specs(load_config(TINY, [f"output_dir={out}", *overrides]))
    expected = prune.prune_model(load_classifier(teacher, 2, torch.float32), plan).state_dict()
    state = load_file(str(out / "pruned_student" / "model.safetensors"))
    assert set(state) <= set(expected) and "classifier.weight" in state
    for name, tensor in state.items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=0, atol=0, msg=name)
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert type(student).__name__ == "BertForSequenceClassification" and student.config.hidden_size == 32
    # launch/evaluate.py scores the export in one process as the 2-rank run scored its engine
    from flexkd_ds.jobs.evaluate import EvalOptions, run_evaluate

    opts = EvalOptions(models=(("pruned", str(out / "student")),), sets=(("gen", "builtin:classification"),),
                       out=tmp_path / "eval", task="classification", progress=False)  # fmt: skip
    result = run_evaluate(opts)["models"]["pruned"]["gen"]
    expected = json.loads((out / "eval.json").read_text())
    assert result["rows"] == expected["rows"] == 64
    assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert "| pruned |" in (tmp_path / "eval" / "results.md").read_text()
