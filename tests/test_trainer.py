"""Trainer pieces that need no launch: the learning-rate schedule and the metrics log kept across a resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from flexkd_ds.jobs.distill import lr_multiplier, trim_metrics


def written_out_schedule(step, warmup, total, kind, floor):
    """The documented schedule, step by step: (step + 1) / warmup during warm-up, then decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - (1.0 - floor) * done
    return floor + (1.0 - floor) * (math.cos(math.pi * done) + 1.0) / 2.0


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "floor"), [(0, 0.0), (3, 0.0), (3, 0.1)])
def test_lr_multiplier_follows_the_documented_schedule(kind, warmup, floor):
    train = SimpleNamespace(warmup_steps=warmup, lr_schedule=kind, max_steps=12, min_lr_ratio=floor)
    got = [lr_multiplier(train)(step) for step in range(14)]
    expected = [written_out_schedule(step, warmup, 12, kind, floor) for step in range(14)]
    assert got == pytest.approx(expected, abs=1e-12)
    if kind == "cosine":
        assert got[warmup] == pytest.approx(1.0) and got[12] == pytest.approx(floor)


def write_log(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail)


def test_trim_metrics_drops_the_steps_a_resume_trains_again(tmp_path):
    """A run logged steps 1..7 and died; its last checkpoint was step 4: steps 5..7 will be logged again."""
    log = tmp_path / "metrics.jsonl"
    write_log(log, range(1, 8))
    assert trim_metrics(log, 4) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads(log.read_text().splitlines()[1]) == {"step": 2, "loss": 0.5}  # kept lines unchanged
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_trim_metrics_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_log(log, range(1, 5), tail='{"step": 5, "lo')  # killed mid-write
    assert trim_metrics(log, 5) == 1
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_trim_metrics_leaves_a_consistent_log_byte_for_byte(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_log(log, range(1, 5))
    before = log.read_bytes()
    assert trim_metrics(log, 4) == 0
    assert log.read_bytes() == before
    assert trim_metrics(tmp_path / "absent.jsonl", 3) == 0
    assert not (tmp_path / "absent.jsonl").exists()


def test_trim_metrics_from_step_zero_empties_the_log(tmp_path):
    """train.resume=never into an old output dir: the log starts over with the new run."""
    log = tmp_path / "metrics.jsonl"
    write_log(log, range(1, 4))
    assert trim_metrics(log, 0) == 3
    assert log.read_text() == ""


@pytest.mark.parametrize(
    "family, extra",
    [("llama", {}), ("gpt2", {}), ("opt", {}), ("opt", {"word_embed_proj_dim": 12})],  # OPT: project_out
)
def test_student_logits_at_the_loss_rows_are_the_full_forward_s(family, extra):
    """DistillStudent(logit_rows=...) forms the logits at the label rows only, from the base model's last
    hidden state; the reference is the model's own full forward, sliced, and its LM-head input."""
    import torch

    from flexkd_ds.inputs.models import build_causal_lm_from_config, tiny_config
    from flexkd_ds.jobs.distill import DistillStudent

    config = tiny_config(family, hidden_size=24, num_layers=2, num_heads=2, vocab_size=80, **extra)
    model = build_causal_lm_from_config(config, seed=3)
    ids = torch.randint(1, 80, (3, 9), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # a right-padded row
    rows = torch.zeros_like(ids, dtype=torch.bool)
    rows[0, 4:8], rows[1, 2:5], rows[2, 8] = True, True, True
    captured = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    handle.remove()
    module = DistillStudent(model)
    with torch.no_grad():
        logits, hidden, _ = module(ids, attention, logit_rows=rows)
        whole, hidden_whole, _ = module(ids, attention)
    assert logits.shape == (1, int(rows.sum()), 80)
    torch.testing.assert_close(logits[0], full[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, captured[0], rtol=0, atol=0)
    torch.testing.assert_close(whole, full, rtol=0, atol=0)
    torch.testing.assert_close(hidden_whole, captured[0], rtol=0, atol=0)


@pytest.mark.parametrize("family, extra", [("llama", {}), ("gpt2", {}), ("opt", {"word_embed_proj_dim": 12})])
def test_fused_student_terms_equal_the_full_forward_s(family, extra):
    """DistillStudent(fused=...) returns the chunked LM + logit terms at the label rows, computed inside the LM
    head's forward; the reference is the models' own full forwards, sliced, fed to the unfused losses. Value
    and every parameter's gradient agree (float64)."""
    import torch

    from flexkd_ds.inputs.models import build_causal_lm_from_config, tiny_config
    from flexkd_ds.jobs.step import DistillStudent, FusedRequest
    from flexkd_ds.method.losses import lm_loss, logit_divergence
    from flexkd_ds.method.objective import ObjectiveWeights

    config = tiny_config(family, hidden_size=24, num_layers=2, num_heads=2, vocab_size=80, **extra)
    student = build_causal_lm_from_config(config, seed=3).double()
    teacher = build_causal_lm_from_config(
        tiny_config("llama", hidden_size=32, num_layers=1, num_heads=2, vocab_size=80), seed=4
    ).double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 80, (3, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 4:8], labels[1, 2:5], labels[2, 8] = 5, 7, 11
    mask = labels != -100
    rows = mask.reshape(-1).nonzero().flatten()
    captured = []
    handle = teacher.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits
    handle.remove()
    weights = ObjectiveWeights(
        feature_loss="none", logit_loss="rkl", beta=0.7, lm_weight=1.3, temperature=2.0
    )
    request = FusedRequest(
        labels=labels.reshape(-1)[rows],
        teacher_hidden=captured[0].reshape(-1, 32)[rows],
        teacher_head=(teacher.get_output_embeddings().weight, None),
        weights=weights,
    )
    terms, _, _ = DistillStudent(student)(ids, attention, logit_rows=rows, fused=request)
    got = torch.autograd.grad(terms.loss, list(student.parameters()), allow_unused=True)

    full = student(input_ids=ids, attention_mask=attention).logits
    reference = 0.7 * logit_divergence(
        full[mask], t_logits[mask], None, kind="rkl", temperature=2.0, reduction="sum"
    ) + 1.3 * lm_loss(full[mask], labels[mask], reduction="sum")
    want = torch.autograd.grad(reference, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(terms.loss, reference, rtol=1e-10, atol=0)
    for (name, _), a, b in zip(student.named_parameters(), got, want, strict=True):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_a_skipped_head_gives_the_same_head_input_and_no_logits():
    """engines.head_skipped: the forward still runs the head's hooks (the capture sees the same input) but
    returns a (..., 0) view instead of (B, T, V) logits; the head's forward is restored afterwards."""
    import torch

    from flexkd_ds.inputs.models import build_causal_lm_from_config, tiny_config
    from flexkd_ds.runtime.engines import HeadInput, head_skipped

    model = build_causal_lm_from_config(tiny_config("gpt2", hidden_size=16, num_layers=1, num_heads=2,
                                                    vocab_size=50), seed=0)  # fmt: skip
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    with HeadInput(model) as capture, torch.no_grad():
        whole = model(input_ids=ids).logits
        h_whole = capture.pop()
        with head_skipped(model):
            skipped = model(input_ids=ids).logits
        h_skipped = capture.pop()
        again = model(input_ids=ids).logits
    assert whole.shape == (2, 5, 50) and skipped.shape == (2, 5, 0)
    torch.testing.assert_close(h_skipped, h_whole, rtol=0, atol=0)
    torch.testing.assert_close(again, whole, rtol=0, atol=0)
