"""The step objective's normalisation (flexkd_ds.method.objective) against float64 sums written out here."""

from __future__ import annotations

import torch

from flexkd_ds.method.objective import ObjectiveWeights, micro_objective


def test_projector_term_is_a_mean_over_the_feature_rows_of_the_whole_step():
    """Two micro-batches with different prompt / response mixes: the projector term of the step is
    alpha x (sum over every feature row of the mean squared error) / (number of feature rows), whatever the
    number of response tokens (it used to be divided by the response-token count)."""
    gen = torch.Generator().manual_seed(0)
    weights = ObjectiveWeights(feature_loss="projector", logit_loss="none", alpha=0.5, lm_weight=0.0)
    micro, rows_total, sq_total, tokens_total = [], 0, 0.0, 0
    for length, response in ((7, 2), (5, 4)):  # (attended rows, response tokens) per sequence
        projected = torch.randn(2, 8, 6, generator=gen, dtype=torch.float64)
        teacher = torch.randn(2, 8, 6, generator=gen, dtype=torch.float64)
        attention = torch.zeros(2, 8, dtype=torch.bool)
        attention[:, :length] = True
        labels = torch.full((2, 8), -100)
        labels[:, length - response : length] = 3
        micro.append((projected, teacher, attention, labels))
        rows_total += int(attention.sum())
        tokens_total += int((labels != -100).sum())
        sq_total += sum(
            float(((projected[b, t] - teacher[b, t]) ** 2).mean()) for b in range(2) for t in range(length)
        )
    expected = 0.5 * sq_total / rows_total
    got = 0.0
    for projected, teacher, attention, labels in micro:
        terms = micro_objective(
            weights, student_logits=torch.zeros(2, 8, 5, dtype=torch.float64), teacher_logits=None,
            student_hidden=projected, teacher_hidden=teacher, projected_hidden=projected, labels=labels,
            feature_mask=attention, unit_indices=None, global_tokens=float(tokens_total),
            global_feature_rows=float(rows_total), grad_accum=2, world_size=1,
        )  # fmt: skip
        got += float(terms.loss) / 2  # DeepSpeed divides each micro-batch's loss by grad_accum
    assert abs(got - expected) < 1e-12 * max(1.0, expected)
    assert abs(0.5 * sq_total / tokens_total - expected) > 0.1  # the old normalisation would differ here


def test_auto_impl_says_once_which_correlation_runs_and_why(monkeypatch, caplog):
    """CPU tensors: torch, said once; CUDA tensors with a Triton that does not import: torch, as a warning
    naming the import error (it used to fall back silently)."""
    import logging
    from types import SimpleNamespace

    from flexkd_ds.method import ops

    monkeypatch.setattr(ops, "_ANNOUNCED", set())
    x = torch.zeros(4, 3)
    with caplog.at_level(logging.INFO, logger="flexkd_ds"):
        assert ops.resolve_impl("auto", x, x) == "torch"
        assert ops.resolve_impl("auto", x, x) == "torch"
    said = [r.getMessage() for r in caplog.records if "loss.impl=auto" in r.getMessage()]
    assert said == ["loss.impl=auto: the Flex-KD correlation runs on torch: the hidden states are cpu float32 "
                    "(the kernel takes CUDA fp32/fp16/bf16)"]  # fmt: skip

    def broken():
        raise RuntimeError("impl='triton' needs a working triton install") from ImportError(
            "no module named triton"
        )

    monkeypatch.setattr(ops, "_kernel_module", broken)
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cpu"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flexkd_ds"):
        assert ops.resolve_impl("auto", cuda_like) == "torch"
    (record,) = [r for r in caplog.records if "loss.impl=auto" in r.getMessage()]
    assert record.levelno == logging.WARNING and "no module named triton" in record.getMessage()
