"""The chunked logit + LM terms (flexkd_ds.method.fused_logits) against (a) float64 textbook formulas with
autograd, written out in tests/test_losses.py and here, and (b) the unfused path the trainer used before
(``nn.Linear`` logits into ``losses.logit_divergence`` and ``losses.lm_loss``)."""

from __future__ import annotations

import pytest
import torch
from test_losses import KIND_ARGS, reference_divergence
from torch.utils._python_dispatch import TorchDispatchMode

from flexkd_ds.method.fused_logits import default_chunk_rows, fused_linear_divergence
from flexkd_ds.method.losses import lm_loss, logit_divergence

ROWS, VOCAB, D_S, D_T = 37, 53, 6, 9  # awkward sizes: chunks of 8 leave a remainder of 5


def make_inputs(dtype=torch.float64, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    tensors = {
        "student_hidden": rand(ROWS, D_S, scale=1.5).requires_grad_(True),
        "student_head_weight": rand(VOCAB, D_S).requires_grad_(True),
        "teacher_hidden": rand(ROWS, D_T, scale=1.5),
        "teacher_head_weight": rand(VOCAB, D_T),
    }
    if bias:
        tensors["student_head_bias"] = rand(VOCAB).requires_grad_(True)
        tensors["teacher_head_bias"] = rand(VOCAB)
    mask = torch.rand(ROWS, generator=g) > 0.3
    mask[0], mask[-1] = True, False
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    labels[torch.rand(ROWS, generator=g) > 0.7] = -100
    return tensors, mask, labels


def textbook(tensors, mask, labels, kind, temperature, beta, lm_weight, **kwargs):
    """float64, probability space: beta * sum_masked D(p || q) + lm_weight * sum_counted -log q_y(T=1)."""
    z_s = tensors["student_hidden"].double() @ tensors["student_head_weight"].double().T
    z_t = tensors["teacher_hidden"].double() @ tensors["teacher_head_weight"].double().T
    if "student_head_bias" in tensors:
        z_s = z_s + tensors["student_head_bias"].double()
        z_t = z_t + tensors["teacher_head_bias"].double()

    def softmax(z, t):  # written out: exp(z/T - max) / sum
        e = torch.exp(z / t - (z / t).max(-1, keepdim=True).values.detach())
        return e / e.sum(-1, keepdim=True)

    per_token = reference_divergence(kind, softmax(z_t, temperature), softmax(z_s, temperature), **kwargs)
    divergence = per_token[mask].sum()
    counted = labels != -100
    nll = -torch.log(softmax(z_s, 1.0)[counted, labels[counted]]).sum()
    return beta * divergence + lm_weight * nll, divergence, nll


def unfused(tensors, mask, labels, kind, temperature, beta, lm_weight, **kwargs):
    """What the trainer computed before: full logits, then the two loss functions."""
    z_s = torch.nn.functional.linear(
        tensors["student_hidden"], tensors["student_head_weight"], tensors.get("student_head_bias")
    )
    z_t = torch.nn.functional.linear(
        tensors["teacher_hidden"], tensors["teacher_head_weight"], tensors.get("teacher_head_bias")
    )
    divergence = logit_divergence(
        z_s, z_t, mask, kind=kind, temperature=temperature, reduction="sum", **kwargs
    )
    nll = lm_loss(z_s, labels, reduction="sum")
    return beta * divergence + lm_weight * nll, divergence, nll


def grads(total, tensors):
    names = [n for n, t in tensors.items() if t.requires_grad]
    return dict(zip(names, torch.autograd.grad(total, [tensors[n] for n in names]), strict=True))


def assert_close(got, want, rtol, what):
    scale = want.abs().max().clamp_min(1e-12)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= rtol, f"{what}: max |diff| / max |ref| = {err:.3e} > {rtol:.0e}"


@pytest.mark.parametrize("kind, kwargs", KIND_ARGS)
def test_float64_matches_textbook_value_and_gradients(kind, kwargs):
    tensors, mask, labels = make_inputs(bias=True)
    settings = {"kind": kind, "temperature": 2.0, "beta": 0.7, "lm_weight": 1.3, **kwargs}
    fused = fused_linear_divergence(mask=mask, labels=labels, chunk_rows=8, **tensors, **settings)
    ref_total, ref_div, ref_nll = textbook(tensors, mask, labels, **settings)
    assert_close(fused.loss, ref_total, 1e-10, "loss")
    assert_close(fused.divergence_sum, ref_div, 1e-10, "divergence sum")
    assert_close(fused.lm_sum, ref_nll, 1e-10, "lm sum")
    got, want = grads(fused.loss, tensors), grads(ref_total, tensors)
    assert set(got) == {"student_hidden", "student_head_weight", "student_head_bias"}
    for name in got:
        assert_close(got[name], want[name], 1e-9, name)


@pytest.mark.parametrize("kind, kwargs", KIND_ARGS)
def test_float32_matches_unfused_within_1e5(kind, kwargs):
    tensors, mask, labels = make_inputs(dtype=torch.float32, seed=3)
    settings = {"kind": kind, "temperature": 2.0, "beta": 1.0, "lm_weight": 1.0, **kwargs}
    fused = fused_linear_divergence(mask=mask, labels=labels, chunk_rows=8, **tensors, **settings)
    ref_total, ref_div, _ = unfused(tensors, mask, labels, **settings)
    assert fused.loss.dtype == torch.float32
    assert_close(fused.loss, ref_total, 1e-5, "loss")
    assert_close(fused.divergence_sum, ref_div, 1e-5, "divergence sum")
    got, want = grads(fused.loss, tensors), grads(ref_total, tensors)
    for name in want:
        assert_close(got[name], want[name], 1e-5, name)


def test_grad_output_scales_and_chunking_does_not_matter():
    tensors, mask, labels = make_inputs()
    kw = {"kind": "rkl", "mask": mask, "labels": labels, "lm_weight": 0.5}
    one = fused_linear_divergence(**tensors, chunk_rows=1, **kw)
    whole = fused_linear_divergence(**tensors, chunk_rows=1000, **kw)
    assert_close(one.loss, whole.loss, 1e-12, "value")
    g1 = torch.autograd.grad(-3.0 * one.loss, tensors["student_hidden"])[0]
    g2 = torch.autograd.grad(whole.loss, tensors["student_hidden"])[0]
    assert_close(g1, -3.0 * g2, 1e-12, "grad_output = -3")


def test_second_backward_through_the_same_graph_is_refused_not_wrong():
    """backward scales the stored gradients in place (no (V, d) copy): a second backward through the same
    graph (retain_graph=True) must raise, not return gradients scaled twice."""
    tensors, mask, labels = make_inputs()
    fused = fused_linear_divergence(**tensors, mask=mask, labels=labels, kind="rkl", lm_weight=0.5)
    ref_total, _, _ = textbook(tensors, mask, labels, "rkl", 1.0, 1.0, 0.5)
    want = torch.autograd.grad(2.0 * ref_total, tensors["student_head_weight"])[0]
    got = torch.autograd.grad(2.0 * fused.loss, tensors["student_head_weight"], retain_graph=True)[0]
    assert_close(got, want, 1e-9, "first backward")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(2.0 * fused.loss, tensors["student_head_weight"])


def test_terms_off_and_no_teacher():
    tensors, _, labels = make_inputs()
    student = {k: tensors[k] for k in ("student_hidden", "student_head_weight")}
    lm_only = fused_linear_divergence(**student, labels=labels, lm_weight=1.0)
    ref = lm_loss(student["student_hidden"] @ student["student_head_weight"].T, labels, reduction="sum")
    assert_close(lm_only.loss, ref, 1e-12, "LM only (SFT)")
    assert float(lm_only.divergence_sum) == 0.0
    # everything masked and no label counted: zero loss and zero gradients, no error (a rank with no tokens)
    none = fused_linear_divergence(
        **tensors, mask=torch.zeros(ROWS, dtype=torch.bool), labels=torch.full((ROWS,), -100), lm_weight=1.0
    )
    assert float(none.loss.detach()) == 0.0
    (g,) = torch.autograd.grad(none.loss, tensors["student_hidden"])
    assert torch.count_nonzero(g) == 0


def test_no_grad_mode_gives_values_only():
    tensors, mask, labels = make_inputs()
    with torch.no_grad():
        terms = fused_linear_divergence(**tensors, mask=mask, labels=labels, kind="fkl", lm_weight=1.0)
    ref_total, _, _ = textbook(tensors, mask, labels, kind="fkl", temperature=1.0, beta=1.0, lm_weight=1.0)
    assert not terms.loss.requires_grad
    assert_close(terms.loss, ref_total, 1e-10, "value under no_grad")


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_larger_than_one_chunk_of_logits():
    rows, vocab, chunk = 256, 997, 32
    g = torch.Generator().manual_seed(0)
    s_h = torch.randn(rows, 8, generator=g, requires_grad=True)
    s_w = torch.randn(vocab, 8, generator=g, requires_grad=True)
    t_h, t_w = torch.randn(rows, 12, generator=g), torch.randn(vocab, 12, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    with LargestTensor() as fused_mode:
        terms = fused_linear_divergence(s_h, s_w, t_h, t_w, None, labels, kind="rkl", lm_weight=1.0,
                                        chunk_rows=chunk)  # fmt: skip
        terms.loss.backward()
    assert fused_mode.largest <= chunk * vocab, fused_mode.largest
    with LargestTensor() as unfused_mode:  # the check can fail: the unfused path holds (N, V)
        z_s, z_t = s_h @ s_w.T, t_h @ t_w.T
        (
            logit_divergence(z_s, z_t, None, kind="rkl", reduction="sum")
            + lm_loss(z_s, labels, reduction="sum")
        ).backward()
    assert unfused_mode.largest >= rows * vocab


def test_bf16_weights_follow_the_unfused_precision():
    tensors, mask, labels = make_inputs(dtype=torch.bfloat16, seed=5)
    fused = fused_linear_divergence(
        **tensors, mask=mask, labels=labels, kind="rkl", lm_weight=1.0, chunk_rows=8
    )
    ref_total, _, _ = unfused(tensors, mask, labels, kind="rkl", temperature=1.0, beta=1.0, lm_weight=1.0)
    assert fused.loss.dtype == torch.float32
    assert_close(fused.loss, ref_total, 1e-5, "bf16 value")  # same bf16 logits, same float32 softmax
    got, want = grads(fused.loss, tensors), grads(ref_total, tensors)
    assert got["student_head_weight"].dtype == torch.bfloat16
    for name in want:  # the fused head gradient sums chunks in float32, the unfused one in one bf16 matmul
        assert_close(got[name], want[name], 2e-2, name)


def test_default_chunk_rows():
    assert default_chunk_rows(49152) == 1024  # 2^26 / 49152 = 1365: at most 2^26 elements, a power of two
    assert default_chunk_rows(50272) == 1024
    assert default_chunk_rows(32000) == 1024  # 2097 -> 2048, capped at 1024 rows on a GPU
    assert default_chunk_rows(49152, "cpu") == 128  # 28 MiB of float32 under the 32 MiB mmap threshold
    assert default_chunk_rows(128256, "cpu") == 32
    assert default_chunk_rows(128256) == 512
    assert default_chunk_rows(50) == 1024
    assert default_chunk_rows(50, "cpu") == 4096
    assert default_chunk_rows(1 << 30) == 16


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher_head_weight": torch.zeros(VOCAB + 1, D_T)}, "vocabulary sizes differ"),
        ({"student_head_weight": torch.zeros(VOCAB, D_S + 1)}, "student_head_weight must be (V, d)"),
        ({"teacher_hidden": torch.zeros(ROWS - 1, D_T)}, "must have the same rows"),
        ({"labels": torch.full((ROWS,), VOCAB)}, "labels must lie in"),
        ({"labels": torch.zeros(ROWS)}, "integer tensor"),
        ({"mask": torch.ones(ROWS)}, "bool"),
        ({"kind": "kl"}, "kind must be one of"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"teacher_head_weight": None}, "come together"),
    ],
)
def test_bad_inputs_are_named(change, message):
    tensors, mask, labels = make_inputs()
    kwargs = {**tensors, "mask": mask, "labels": labels, "lm_weight": 1.0, "kind": "rkl", **change}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fused_linear_divergence(**kwargs)
